"""Stage 3a, replicate: the BitTorrent side of the node. Deterministic torrents matching the
organisation's (`torrent`), the libtorrent session in its own thread with alerts handed to the loop
(`session`, `engine`, `settings`, `resume`), peer sync and the peer as a fetch source (`sync`,
`follow`), imported published torrents (`importer`), the BEP 19 web seed (`webseed`) and the RSS feed
(`rss`).
"""
