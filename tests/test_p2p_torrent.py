"""Deterministic torrents (acceptance 4) and hostile-input rejection / published-torrent import (acceptance 6)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import libtorrent as lt
import pytest

from noded.core.model import PIECE_LENGTH
from noded.p2p import torrent as T
from tests.conftest import FIXTURE_TORRENTS

SOURCE = "Data for Canada"


def py3createtorrent(path: Path, out: Path, *extra: str) -> bytes:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "py3createtorrent",
            "--piece-length",
            "16384",
            "--md5",
            "--source",
            SOURCE,
            "--force",
            "--quiet",
            "-o",
            str(out),
            *extra,
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def write_random(p: Path, size: int, seed: int) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(hashlib.shake_256(seed.to_bytes(4, "big")).digest(size) if size else b"")


def test_single_file_infohash_matches_py3createtorrent(tmp_path: Path) -> None:
    f = tmp_path / "ca_test_layer.pmtiles"
    write_random(f, 2 * PIECE_LENGTH + 12345, 1)  # three pieces, the last one short
    ref = T.parse_torrent(
        py3createtorrent(
            f, tmp_path / "ref.torrent", "-t", "https://tracker.example/announce", "--webseed", "https://m/x"
        )
    )
    pieces, md5s = T.hash_files([f])
    info = T.single_file_info(f.name, f.stat().st_size, md5s[0], pieces, source=SOURCE)
    ours = T.encode_torrent(info, web_seeds=["https://example.org/ca_test_layer.pmtiles"])
    assert T.infohash_of(info) == ref.infohash
    assert T.parse_torrent(ours).infohash == ref.infohash
    assert lt.torrent_info(ours).info_hashes().v1 == lt.torrent_info(ref.data).info_hashes().v1
    assert ref.md5 == hashlib.md5(f.read_bytes()).hexdigest()
    # The same inputs always give the same file (no creation date): every node writes identical torrents.
    assert T.encode_torrent(info, web_seeds=["https://example.org/ca_test_layer.pmtiles"]) == ours


def test_multi_file_dataset_infohash_matches_py3createtorrent(tmp_path: Path) -> None:
    d = tmp_path / "ca_dataset_2024"
    # Files whose sizes straddle piece boundaries, mixed-case names and nested directories.
    write_random(d / "b_tiles.pmtiles", PIECE_LENGTH + 100, 2)
    write_random(d / "A_readme.txt", 777, 3)
    write_random(d / "sub" / "z.parquet", PIECE_LENGTH - 50, 4)
    write_random(d / "sub" / "Deep" / "x.tif", 4096, 5)
    write_random(d / "c_empty.txt", 0, 6)
    ref = T.parse_torrent(py3createtorrent(d, tmp_path / "ref.torrent"))
    info, order = T.build_dataset_torrent(d, source=SOURCE)
    assert T.infohash_of(info) == ref.infohash
    assert [tuple(p.split("/")) for p in order] == [f.path for f in ref.files]
    assert T.parse_torrent(T.encode_torrent(info)).infohash == ref.infohash


def test_stored_pieces_rebuild_the_same_torrent(tmp_path: Path) -> None:
    """A torrent built from piece hashes taken elsewhere equals one built by reading the file."""
    f = tmp_path / "layer.bin"
    write_random(f, PIECE_LENGTH // 2, 7)
    ref = T.parse_torrent(py3createtorrent(f, tmp_path / "ref.torrent"))
    pieces = hashlib.sha1(f.read_bytes()).digest()
    info = T.single_file_info("layer.bin", f.stat().st_size, ref.md5, pieces, source=SOURCE)
    assert T.infohash_of(info) == ref.infohash


fixtures = sorted(FIXTURE_TORRENTS.glob("*.torrent")) if FIXTURE_TORRENTS.is_dir() else []


@pytest.mark.fixtures
@pytest.mark.skipif(not fixtures, reason="../shared/fixtures/d4c-torrents absent")
def test_published_torrents_import_intact() -> None:
    assert len(fixtures) == 9
    for path in fixtures:
        data = path.read_bytes()
        meta = T.parse_torrent(data)
        lt_ti = lt.torrent_info(data)
        assert meta.infohash == str(lt_ti.info_hashes().v1)
        assert meta.single_file and meta.piece_length == PIECE_LENGTH and meta.source == SOURCE
        assert meta.md5 and len(meta.md5) == 32
        assert len(meta.web_seeds) == 3 and all(meta.name in u for u in meta.web_seeds)
        assert meta.trackers == ("https://tracker.labs.dataforcanada.org/announce",)
        entry = meta.catalog_entry()
        assert (entry.key, entry.size, entry.md5, entry.infohash) == (
            meta.name,
            lt_ti.total_size(),
            meta.md5,
            meta.infohash,
        )
        # Rebuilding the info dict from what we keep (name, size, md5, piece hashes) reproduces the infohash.
        decoded = lt.bdecode(data)[b"info"]
        info = T.single_file_info(meta.name, meta.total_size, meta.md5, decoded[b"pieces"], source=SOURCE)
        assert T.infohash_of(info) == meta.infohash


def _torrent(info: dict[bytes, object]) -> bytes:
    return bytes(lt.bencode({b"info": info}))


def _good_info() -> dict[bytes, object]:
    return {b"length": 10, b"name": b"ok.bin", b"piece length": 16384, b"pieces": b"\x01" * 20}


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "bencode"),
        (b"d4:infod4:name", "bencode"),
        (b"i1e", "no 'info'"),
        (b"l" * 100_000 + b"e" * 100_000, "bencode"),  # absurd nesting depth
        (_torrent({**_good_info(), b"name": b"../../etc/passwd"}), "unsafe name"),
        (_torrent({**_good_info(), b"name": b".."}), "unsafe name"),
        (_torrent({**_good_info(), b"name": b"a\x00b"}), "control"),
        (_torrent({**_good_info(), b"name": b"x" * 300}), "too long"),
        (
            _torrent(
                {
                    b"files": [{b"length": 10, b"path": [b"..", b"escape"]}],
                    b"name": b"d",
                    b"piece length": 16384,
                    b"pieces": b"\x01" * 20,
                }
            ),
            "unsafe name",
        ),
        (
            _torrent(
                {
                    b"files": [{b"length": 10, b"path": [b"/abs"]}],
                    b"name": b"d",
                    b"piece length": 16384,
                    b"pieces": b"\x01" * 20,
                }
            ),
            "unsafe name",
        ),
        (_torrent({**_good_info(), b"length": 10**18}), "exceeds"),
        (_torrent({**_good_info(), b"length": -5}), "negative"),
        (_torrent({**_good_info(), b"pieces": b"\x01" * 20 * 5000}), "piece hashes"),
        (_torrent({**_good_info(), b"pieces": b"\x01" * 19}), "20-byte"),
        (_torrent({**_good_info(), b"piece length": 1000}), "power of two"),
        (_torrent({**_good_info(), b"piece length": 2**40}), "power of two"),
        (_torrent({**_good_info(), b"md5sum": b"nothex"}), "md5sum"),
        (_torrent({**_good_info(), b"name": b"\xff\xfe"}), "UTF-8"),
        (b"d4:info" + _torrent(_good_info())[7:-1] + b"x" * (T.MAX_TORRENT_BYTES) + b"e", "too large"),
    ],
)
def test_hostile_torrents_rejected(data: bytes, why: str) -> None:
    with pytest.raises(T.TorrentError, match=why):
        T.parse_torrent(data)


def test_good_minimal_torrent_is_accepted() -> None:
    """The hostile cases above differ from this one in the one field they break."""
    meta = T.parse_torrent(_torrent(_good_info()))
    assert meta.name == "ok.bin" and meta.total_size == 10 and meta.num_pieces == 1


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("http://example.org/x", "not a magnet"),
        ("magnet:?dn=x", "exactly one xt"),
        ("magnet:?xt=urn:btih:zz", "neither 40 hex"),
        ("magnet:?xt=urn:btih:" + "a" * 40 + "&xt=urn:btih:" + "b" * 40, "exactly one xt"),
        ("magnet:?xt=urn:btih:" + "a" * 40 + "&dn=..%2F..%2Fetc", "unsafe name"),
        ("magnet:?xt=urn:btih:" + "a" * 40 + "&dn=" + "x" * 9000, "at most"),
        ("magnet:?xt=urn:btih:" + "a" * 40 + "\n", "control"),
    ],
)
def test_hostile_magnets_rejected(uri: str, why: str) -> None:
    with pytest.raises(T.TorrentError, match=why):
        T.parse_magnet(uri)


def test_magnet_accepted() -> None:
    m = T.parse_magnet(
        "magnet:?xt=urn:btih:" + "AB" * 20 + "&dn=layer.pmtiles&tr=https://t.example/announce&ws=https://m.example/x"
    )
    assert m.infohash == "ab" * 20 and m.name == "layer.pmtiles"
    assert m.trackers == ("https://t.example/announce",) and m.web_seeds == ("https://m.example/x",)
    b32 = T.parse_magnet("magnet:?xt=urn:btih:" + "A" * 32)
    assert b32.infohash == "00" * 20


def test_web_seed_urls() -> None:
    urls = T.web_seed_urls(
        "processed/a.pmtiles",
        ["https://data.source.coop/x/a.pmtiles", "s3://nope"],
        ["https://data-01.example/processed/{name}", "https://data-02.example/{key}"],
    )
    assert urls == [
        "https://data.source.coop/x/a.pmtiles",
        "https://data-01.example/processed/a.pmtiles",
        "https://data-02.example/processed/a.pmtiles",
    ]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    from tests.conftest import ROOT, noded_env

    return subprocess.run(
        [sys.executable, "-m", "noded", *args], capture_output=True, text=True, env=noded_env(), cwd=cwd or ROOT
    )


def test_cli_make_and_check_torrent(tmp_path: Path) -> None:
    f = tmp_path / "layer.pmtiles"
    write_random(f, PIECE_LENGTH + 5, 9)
    ref = T.parse_torrent(py3createtorrent(f, tmp_path / "ref.torrent"))
    r = run_cli("make-torrent", str(f), "-o", str(tmp_path / "ours.torrent"), "-w", "https://m.example/x", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == ref.infohash
    assert T.parse_torrent((tmp_path / "ours.torrent").read_bytes()).web_seeds == ("https://m.example/x",)
    r = run_cli("check-torrent", str(tmp_path / "ours.torrent"), cwd=tmp_path)
    assert r.returncode == 0 and ref.infohash in r.stdout
    (tmp_path / "bad.torrent").write_bytes(_torrent({**_good_info(), b"name": b"../x"}))
    r = run_cli("check-torrent", str(tmp_path / "bad.torrent"), cwd=tmp_path)
    assert r.returncode == 65 and "unsafe name" in r.stderr
    r = run_cli("check-torrent", "magnet:?xt=urn:btih:nothex", cwd=tmp_path)
    assert r.returncode == 65
