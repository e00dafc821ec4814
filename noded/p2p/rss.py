"""RSS 2.0 feed of the node's torrents, for qBittorrent's / Transmission's RSS auto-downloaders. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formatdate
from xml.etree import ElementTree as ET


@dataclass(frozen=True, slots=True)
class FeedItem:
    title: str
    infohash: str
    torrent_size: int  # bytes of the .torrent file the enclosure links to
    updated: float
    torrent_url: str
    magnet: str | None = None


# The torrent RSS namespace (ezRSS) qBittorrent's and other clients' feed readers take magnets from.
TORRENT_NS = "http://xmlns.ezrss.it/0.1/"


def render_feed(node_name: str, link: str, items: Iterable[FeedItem]) -> bytes:
    ET.register_namespace("torrent", TORRENT_NS)
    rss = ET.Element("rss", version="2.0")
    ch = ET.SubElement(rss, "channel")
    ET.SubElement(ch, "title").text = f"noded {node_name}: torrents"
    ET.SubElement(ch, "link").text = link
    ET.SubElement(ch, "description").text = f"Datasets seeded by the Data for Canada Smart Node {node_name}"
    for it in items:
        e = ET.SubElement(ch, "item")
        ET.SubElement(e, "title").text = it.title
        ET.SubElement(e, "guid", isPermaLink="false").text = it.infohash
        ET.SubElement(e, "link").text = it.torrent_url
        ET.SubElement(e, "pubDate").text = formatdate(it.updated, usegmt=True)
        ET.SubElement(e, "enclosure", url=it.torrent_url, length=str(it.torrent_size), type="application/x-bittorrent")
        if it.magnet:
            ET.SubElement(e, f"{{{TORRENT_NS}}}infoHash").text = it.infohash
            ET.SubElement(e, f"{{{TORRENT_NS}}}magnetURI").text = it.magnet
    body: bytes = ET.tostring(rss, encoding="unicode").encode()
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body
