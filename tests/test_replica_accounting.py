"""Replica accounting: durable locations, Smart Node inventories and the swarm, per item and per piece."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from noded.p2p.replicas import count, durable_locations, summary

MD5 = "0123456789abcdef0123456789abcdef"


def test_durable_needs_the_same_bytes_at_a_durable_location() -> None:
    rows = [
        {"location": "sourcecoop", "md5": MD5.upper(), "sha256": None, "size": 10},
        {"location": "zenodo", "md5": "f" * 32, "sha256": None, "size": 10},  # other bytes
        {"location": "ia", "md5": MD5, "sha256": None, "size": 11},  # other size
        {"location": "inbox", "md5": MD5, "sha256": None, "size": 10},  # that is us
        {"location": "peer:amsterdam", "md5": MD5, "sha256": None, "size": 10},  # a cache, may evict
    ]
    assert durable_locations(md5=MD5, sha256=None, size=10, pushed=False, replicas=rows) == ["sourcecoop"]
    assert durable_locations(md5=MD5, sha256=None, size=10, pushed=True, replicas=rows) == ["r2", "sourcecoop"]
    assert durable_locations(md5=None, sha256=None, size=10, pushed=False, replicas=rows) == []


def test_pieces_count_durable_nodes_and_swarm_without_double_counting() -> None:
    r = count(
        "a.parquet",
        4,
        durable=["sourcecoop"],
        nodes={"toronto": None, "vol-1": frozenset({0, 1}), "vol-2": frozenset({1, 9})},
        seeders=2,
        leechers=3,
        availability=[1, 4, 0, 1],
        me_seeding=True,
    )
    # nodes per piece: 2,3,1,1; swarm per piece: availability (known) = 1,4,0,1
    assert r.pieces == (3, 5, 2, 2)
    assert r.min_copies == 2
    # Without availability the scrape's seeders (this node taken off) stand for the swarm.
    assert count("a", 2, seeders=3, me_seeding=True).pieces == (2, 2)
    assert count("a", 2, seeders=3, availability=[0, 1]).pieces == (0, 1)
    body = r.public()
    assert body["nodes"] == {"whole": ["toronto"], "partial": {"vol-1": 2, "vol-2": 1}}
    assert body["swarm"]["seeders"] == 2 and body["swarm"]["leechers"] == 3
    assert body["pieces"]["min"] == 2


def test_availability_of_another_piece_count_is_ignored() -> None:
    r = count("a", 3, availability=[5, 5])
    assert r.availability is None and r.pieces == (0, 0, 0)


@given(
    n=st.integers(1, 20),
    durable=st.integers(0, 3),
    whole=st.integers(0, 4),
    seeders=st.none() | st.integers(0, 10),
    data=st.data(),
)
def test_an_extra_holder_never_lowers_a_count(
    n: int, durable: int, whole: int, seeders: int | None, data: st.DataObject
) -> None:
    avail = data.draw(st.none() | st.lists(st.integers(0, 6), min_size=n, max_size=n))
    part = data.draw(st.sets(st.integers(0, n - 1)))
    nodes: dict[str, frozenset[int] | None] = {f"w{i}": None for i in range(whole)}
    base = count("k", n, durable=[f"d{i}" for i in range(durable)], nodes=nodes, seeders=seeders, availability=avail)
    more = count(
        "k",
        n,
        durable=[f"d{i}" for i in range(durable)],
        nodes={**nodes, "new": frozenset(part)},
        seeders=seeders,
        availability=avail,
    )
    assert all(b <= m for b, m in zip(base.pieces, more.pieces, strict=True))
    assert all(m - b <= 1 for b, m in zip(base.pieces, more.pieces, strict=True))
    assert all(p >= durable for p in base.pieces)


def test_summary_says_how_many_items_are_below_k() -> None:
    rs = [count("a", 2, durable=["ia"]), count("b", 2), count("c", 2, durable=["ia", "zenodo"])]
    s = summary(rs, 2)
    assert s["below_k"] == 2 and s["no_copy"] == 1
    assert s["sentence"] == "2 items have fewer than 2 copies"
    assert [x["key"] for x in s["at_risk"]] == ["b", "a"]


def test_a_peers_piece_inventory_keeps_good_entries_and_skips_bad_ones() -> None:
    import pytest

    from noded.p2p.sync import InventoryError, parse_pieces_page

    ih = "a" * 40
    body = {
        "items": [
            {"key": "ok.parquet", "infohash": ih.upper(), "pieces": [0, 3]},
            {"key": "", "infohash": ih, "pieces": [1]},
            {"key": "neg.parquet", "infohash": ih, "pieces": [-1]},
            {"key": "bool.parquet", "infohash": ih, "pieces": [True]},
            {"key": "short.parquet", "infohash": "ab", "pieces": [1]},
            "not an object",
        ]
    }
    assert parse_pieces_page(body) == {"ok.parquet": (ih, frozenset({0, 3}))}
    with pytest.raises(InventoryError):
        parse_pieces_page({"items": "nope"})
