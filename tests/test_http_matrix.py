"""The HTTP rules of every download route, checked with the real curl binary against a running daemon:
the web seed (under a configured path prefix), the .torrent route and the RSS feed.

Validators and conditional requests (304), strong If-Range (a different or weak tag, or a date other
than exactly Last-Modified, gets the full 200), single ranges, multi-range as multipart/byteranges,
416 only when nothing is satisfiable, HEAD, `curl -C -` resume, and resuming after the file changed.
"""

from __future__ import annotations

import email.utils
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from noded.cache.layout import CacheLayout
from noded.core.config import load_config
from noded.core.store import Store
from tests.conftest import NodedProcess
from tests.p2p_helpers import content, put_cached_sync

CURL = shutil.which("curl")
pytestmark = [pytest.mark.skipif(CURL is None, reason="curl is not installed"), pytest.mark.slow]

KEY = "census/2021/da.parquet"
SIZE = 3 * 1024 * 1024 + 777


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def curl(url: str, *args: str, headers: dict[str, str] | None = None, tmp: Path) -> Answer:
    """One request with curl; the last response's status, headers (lower-case names) and body."""
    assert CURL is not None
    hfile, bfile = tmp / "curl.headers", tmp / "curl.body"
    for f in (hfile, bfile):
        f.unlink(missing_ok=True)
    cmd = [CURL, "-sS", "--max-time", "30", "-D", str(hfile), "-o", str(bfile), *args]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    subprocess.run([*cmd, url], check=True, capture_output=True, timeout=60)
    blocks = [b for b in hfile.read_bytes().decode("latin-1").split("\r\n\r\n") if b.strip()]
    lines = blocks[-1].split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        hdrs[name.strip().lower()] = value.strip()
    return Answer(status, hdrs, bfile.read_bytes() if bfile.exists() else b"")


def multipart_parts(a: Answer) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges body."""
    m = re.fullmatch(r"multipart/byteranges; boundary=(\S+)", a.headers["content-type"])
    assert m, a.headers
    delim = b"--" + m.group(1).encode()
    assert a.body.rstrip(b"\r\n").endswith(delim + b"--")
    out = []
    for chunk in a.body.split(delim)[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        fields = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (ln.partition(":") for ln in head.decode("latin-1").split("\r\n") if ln)
        )
        assert data.endswith(b"\r\n")
        out.append((fields["content-range"], data[:-2]))
    return out


def _seed(node: NodedProcess, key: str, data: bytes) -> Path:
    cfg = load_config(node.config)
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    store.open_sync()
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    put_cached_sync(store, layout, key, data)
    store.close_sync()
    return layout.final_path(key)


def _wait_infohash(node: NodedProcess, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, inv = node.get("/v1/inventory")
        items = [i for i in inv["items"] if i["seeding"] and i["infohash"]]
        if items:
            return str(items[0]["infohash"])
        time.sleep(0.2)
    raise AssertionError(node.output()[-3000:])


@pytest.fixture
def served(noded_factory: Any, tmp_path: Path) -> tuple[NodedProcess, str, bytes, Path]:
    data = content(SIZE, 7)
    # The watcher is off so the test can swap the file under the web seed, as a new release would.
    node = noded_factory(
        "toronto", start=False, http_mirror={"strip_prefix": "/processed"}, cache={"watch_cache": False}
    )
    path = _seed(node, KEY, data)
    node.start()
    cfg = load_config(node.config)
    base = f"http://127.0.0.1:{cfg.http_mirror.port}/processed/{KEY}"
    return node, base, data, path


def test_web_seed_http_matrix(served: tuple[NodedProcess, str, bytes, Path], tmp_path: Path) -> None:
    _node, url, data, path = served
    full = curl(url, tmp=tmp_path)
    assert full.status == 200 and full.body == data
    etag, lm = full.headers["etag"], full.headers["last-modified"]
    assert etag.startswith('"') and full.headers["accept-ranges"] == "bytes"
    assert int(full.headers["content-length"]) == SIZE

    # One range; If-Range with the same strong tag or exactly the Last-Modified date keeps it.
    for extra in ({}, {"If-Range": etag}, {"If-Range": lm}):
        a = curl(url, "-r", "10-19", headers=extra, tmp=tmp_path)
        assert a.status == 206, extra
        assert a.body == data[10:20] and a.headers["content-range"] == f"bytes 10-19/{SIZE}"

    # If-Range that does not match strongly: the whole representation, 200.
    later = email.utils.formatdate(email.utils.parsedate_to_datetime(lm).timestamp() + 1, usegmt=True)
    for stale in ('"other"', "W/" + etag, later, "not a date"):
        a = curl(url, "-r", "10-19", headers={"If-Range": stale}, tmp=tmp_path)
        assert a.status == 200 and a.body == data, stale
        assert "content-range" not in a.headers

    # Several ranges: multipart/byteranges with exactly those bytes, never 416.
    a = curl(url, "-r", "0-9,20-29", tmp=tmp_path)
    assert a.status == 206
    assert multipart_parts(a) == [(f"bytes 0-9/{SIZE}", data[0:10]), (f"bytes 20-29/{SIZE}", data[20:30])]
    assert int(a.headers["content-length"]) == len(a.body)
    # ...with an unsatisfiable one among them: the satisfiable ones are sent.
    a = curl(url, "-r", f"0-9,{SIZE + 5}-{SIZE + 9},-4", tmp=tmp_path)
    assert a.status == 206
    assert multipart_parts(a) == [(f"bytes 0-9/{SIZE}", data[:10]), (f"bytes {SIZE - 4}-{SIZE - 1}/{SIZE}", data[-4:])]
    # Overlapping ranges are merged into one.
    a = curl(url, "-r", "0-9,5-19", tmp=tmp_path)
    assert a.status == 206 and a.body == data[:20] and a.headers["content-range"] == f"bytes 0-19/{SIZE}"
    # Suffix and open ranges.
    a = curl(url, "-r", "-100", tmp=tmp_path)
    assert a.status == 206 and a.body == data[-100:]
    a = curl(url, "-r", f"{SIZE - 50}-", tmp=tmp_path)
    assert a.status == 206 and a.body == data[-50:]
    # Nothing satisfiable: 416 with the complete length.
    a = curl(url, "-r", f"{SIZE}-", tmp=tmp_path)
    assert a.status == 416 and a.headers["content-range"] == f"bytes */{SIZE}"
    # A Range header that is not a valid bytes range is ignored.
    for bad in ("bytes=abc", "bytes=20-10", "items=0-5"):
        a = curl(url, headers={"Range": bad}, tmp=tmp_path)
        assert a.status == 200 and a.body == data, bad

    # Conditional GET.
    assert curl(url, headers={"If-None-Match": etag}, tmp=tmp_path).status == 304
    assert curl(url, headers={"If-None-Match": f'"x", W/{etag}'}, tmp=tmp_path).status == 304  # weak comparison
    assert curl(url, headers={"If-Modified-Since": lm}, tmp=tmp_path).status == 304
    assert curl(url, headers={"If-None-Match": '"other"', "If-Modified-Since": lm}, tmp=tmp_path).status == 200
    assert curl(url, headers={"If-Match": '"other"'}, tmp=tmp_path).status == 412
    # HEAD: the headers of a GET and no body.
    a = curl(url, "-I", tmp=tmp_path)
    assert a.status == 200 and a.headers["etag"] == etag and int(a.headers["content-length"]) == SIZE

    # curl's own resume: a partial file is completed with `-C -`.
    out = tmp_path / "resumed"
    out.write_bytes(data[: SIZE // 3])
    subprocess.run([CURL or "curl", "-sS", "-C", "-", "-o", str(out), url], check=True, timeout=60)
    assert out.read_bytes() == data

    # The file changes (a new release at the same path): a resume guarded by If-Range gets the new whole file.
    new = content(SIZE + 100, 8)
    tmp_new = path.with_name(path.name + ".new")
    tmp_new.write_bytes(new)
    old_mtime = email.utils.parsedate_to_datetime(lm).timestamp()
    os.utime(tmp_new, (old_mtime + 10, old_mtime + 10))
    os.replace(tmp_new, path)
    for validator in (etag, lm):
        a = curl(url, "-r", f"{SIZE // 3}-", headers={"If-Range": validator}, tmp=tmp_path)
        assert a.status == 200 and a.body == new, validator
        assert a.headers["etag"] != etag and a.headers["last-modified"] != lm
    # Without If-Range the client would splice old and new bytes; with the new tag it resumes.
    fresh = curl(url, "-I", tmp=tmp_path).headers["etag"]
    a = curl(url, "-r", "100-", headers={"If-Range": fresh}, tmp=tmp_path)
    assert a.status == 206 and a.body == new[100:]


def test_torrent_and_feed_http(served: tuple[NodedProcess, str, bytes, Path], tmp_path: Path) -> None:
    node, _url, _data, _path = served
    ih = _wait_infohash(node)
    turl = f"{node.api}/v1/torrents/{ih}.torrent"
    t = curl(turl, tmp=tmp_path)
    assert t.status == 200 and t.headers["content-type"] == "application/x-bittorrent"
    tag = t.headers["etag"]
    assert curl(turl, headers={"If-None-Match": tag}, tmp=tmp_path).status == 304
    assert curl(turl, headers={"If-Modified-Since": t.headers["last-modified"]}, tmp=tmp_path).status == 304
    a = curl(turl, "-r", "0-9", headers={"If-Range": '"other"'}, tmp=tmp_path)
    assert a.status == 200 and a.body == t.body
    a = curl(turl, "-r", "0-9,20-29", tmp=tmp_path)
    assert a.status == 206
    assert [p for _, p in multipart_parts(a)] == [t.body[0:10], t.body[20:30]]

    feed_url = f"{node.api}/v1/torrents.rss"
    f = curl(feed_url, tmp=tmp_path)
    assert f.status == 200 and f.headers["content-type"].startswith("application/rss+xml")
    enclosures = [e.attrib for e in ET.fromstring(f.body).iter("enclosure")]
    assert [e["url"] for e in enclosures] == [turl]
    assert int(enclosures[0]["length"]) == len(t.body)  # the .torrent's size, not the dataset's
    assert int(enclosures[0]["length"]) != SIZE
    ftag, flm = f.headers["etag"], f.headers["last-modified"]
    assert curl(feed_url, headers={"If-None-Match": ftag}, tmp=tmp_path).status == 304
    assert curl(feed_url, headers={"If-Modified-Since": flm}, tmp=tmp_path).status == 304
    assert curl(feed_url, headers={"If-None-Match": '"stale"'}, tmp=tmp_path).status == 200
    again = curl(feed_url, tmp=tmp_path)
    assert again.body == f.body and again.headers["etag"] == ftag and again.headers["last-modified"] == flm
