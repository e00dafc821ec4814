"""One-time move of a store and cache keyed by origin paths to dataset names, without reading a byte.

Before items were keyed by dataset name, a Source Cooperative object was the item
`<product>/<name>` (its key inside the account) and the same file from Zenodo or IA was `<name>`:
two rows, sometimes two copies on disk. This step renames each such row to `<name>` and its file
with `rename(2)`; when a `<name>` row already exists and the two agree on size and checksums, they
become one (the cached copy is kept, a second copy is deleted, URLs and pins merge). Rows that
disagree are left as they were and reported (a conflict the catalog will show as well).

It runs once per store (meta `keys.dataset_names`), before the cache reconciles files with rows, and
is safe to interrupt: a file already renamed is recognised on the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noded.cache.layout import CacheLayout, UnsafePath
from noded.core.component import Node
from noded.core.logs import get_logger
from noded.core.model import Item, State
from noded.core.store import Store
from noded.origins.catalog.keys import dataset_name

log = get_logger("noded.origins.rekey")

META = "keys.dataset_names"


@dataclass(slots=True)
class RekeyReport:
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (old key, new key)
    merged: list[tuple[str, str]] = field(default_factory=list)  # (old key, existing key it joined)
    copies_removed: list[str] = field(default_factory=list)  # second copies deleted (relative paths)
    conflicts: list[str] = field(default_factory=list)


def _agree(a: Item, b: Item) -> bool:
    for x, y in ((a.md5, b.md5), (a.sha256, b.sha256), (a.sha1, b.sha1)):
        if x and y and x.lower() != y.lower():
            return False
    return not (a.size is not None and b.size is not None and a.size != b.size)


def _move_file(layout: CacheLayout, old: str, new: str) -> None:
    """rename(2) the cached file; a second run finds it already moved."""
    src, dst = layout.final_path(old), layout.final_path(new)
    if src.is_file() and not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
    _prune_empty_dirs(layout.root, src.parent)


def _prune_empty_dirs(root: Path, d: Path) -> None:
    while d != root and d.is_relative_to(root):
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


def _rename_refs(store: Store, old: str, new: str) -> None:
    c = store.conn
    c.execute("UPDATE OR REPLACE replicas SET key=? WHERE key=?", (new, old))
    c.execute("UPDATE OR REPLACE suspects SET key=? WHERE key=?", (new, old))
    c.execute("UPDATE reports SET item_key=? WHERE item_key=?", (new, old))
    c.execute("UPDATE OR REPLACE locations SET key=? WHERE key=?", (new, old))


def rekey(store: Store, layout: CacheLayout) -> RekeyReport:
    """Blocking (store thread or open_sync store): the whole move; returns what it did."""
    report = RekeyReport()
    if store.get_meta(META) == "1":
        return report
    olds = [
        str(r[0])
        for r in store.conn.execute("SELECT DISTINCT key FROM items WHERE origin='sourcecoop' AND instr(key, '/') > 0")
    ]
    for old in olds:
        new = dataset_name(old)
        try:
            layout.final_path(old)
            layout.final_path(new)
        except UnsafePath:
            continue
        mine, theirs = store.versions(old), store.versions(new)
        if not theirs:
            # Rename first: a crash before the commit leaves the row pointing at a moved file, which the
            # next run moves no further and then commits.
            if any(r.state == State.CACHED for r in mine):
                _move_file(layout, old, new)
            with store.tx() as c:
                c.execute("UPDATE items SET key=? WHERE key=?", (new, old))
                _rename_refs(store, old, new)
            report.renamed.append((old, new))
            continue
        a, b = mine[-1], theirs[-1]
        if not _agree(a, b):
            report.conflicts.append(f"{old} and {new} are different content; both kept")
            continue
        _merge(store, layout, a, b, mine, report)
        report.merged.append((old, new))
    store.set_meta(META, "1")
    return report


def _merge(store: Store, layout: CacheLayout, a: Item, b: Item, mine: list[Item], report: RekeyReport) -> None:
    """Rows `mine` (old key, newest `a`) join the existing item `b`; one copy of the bytes stays."""
    old, new = a.key, b.key
    take_file = a.state == State.CACHED and b.state != State.CACHED
    if take_file:
        _move_file(layout, old, new)
    elif a.state == State.CACHED:
        with contextlib.suppress(FileNotFoundError):
            layout.final_path(old).unlink()
            report.copies_removed.append(old)
        _prune_empty_dirs(layout.root, layout.final_path(old).parent)
    with store.tx() as c:
        fields: dict[str, Any] = {}
        if take_file:
            fields = {
                "size": a.size,
                "md5": b.md5 or a.md5,
                "sha256": b.sha256 or a.sha256,
                "sha1": b.sha1 or a.sha1,
                "disk_bytes": a.disk_bytes,
                "mtime_ns": a.mtime_ns,
                "verified_at": a.verified_at,
                "pushed": a.pushed or b.pushed,
                "seeding": a.seeding,
                "infohash": b.infohash or a.infohash,
                "last_access": max(a.last_access, b.last_access),
            }
            pieces = store.get_pieces(a.id)
            if pieces is not None:
                store.set_pieces(b.id, *pieces)
            store.set_state(b.id, State.CACHED, error=None, **fields)
        urls = list(dict.fromkeys([*b.urls, *a.urls]))
        c.execute(
            "UPDATE items SET urls=?, pinned=MAX(pinned, ?), md5=COALESCE(md5, ?), sha1=COALESCE(sha1, ?),"
            " sha256=COALESCE(sha256, ?), etag=COALESCE(etag, ?) WHERE id=?",
            (json.dumps(urls), int(any(r.pinned for r in mine)), a.md5, a.sha1, a.sha256, a.etag, b.id),
        )
        c.execute("DELETE FROM items WHERE key=?", (old,))
        _rename_refs(store, old, new)


class Rekey:
    """Component: runs the move once at start, before the cache looks at its files."""

    name = "rekey"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.report = RekeyReport()

    async def start(self) -> None:
        cfg = self.node.cfg
        store = self.node.store
        if not cfg.origins.sourcecoop.strip_product:
            return
        layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
        self.report = await store.run(rekey, store, layout)
        r = self.report
        if r.renamed or r.merged or r.conflicts:
            log.info(
                "rekey.done",
                renamed=len(r.renamed),
                merged=len(r.merged),
                copies_removed=len(r.copies_removed),
                conflicts=len(r.conflicts),
            )
        for line in r.conflicts:
            log.warning("rekey.conflict", conflict=line)

    async def stop(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        r = self.report
        return {
            "state": "done",
            "renamed": len(r.renamed),
            "merged": len(r.merged),
            "copies_removed": len(r.copies_removed),
            "conflicts": r.conflicts[:20],
        }
