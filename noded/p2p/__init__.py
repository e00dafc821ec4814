"""BitTorrent side of the node: deterministic torrents, the libtorrent session, sync and seeding."""
