"""Component "volunteer": a small node holds what the network is closest to losing, down to single pieces.

Every catalogue item with a torrent joins the node's libtorrent session, holding no pieces at first: the
tracker and the connected peers then tell how many copies of each piece exist (scrape, availability).
Each round the node counts copies per piece (`replicas.count`: durable locations, peer inventories,
the swarm), runs the pure selection (`coverage.select`) within its budget and applies the result as
piece priorities (`pieces.PieceHolder`). No coordinator: each node decides from what it sees, with a
rendezvous tie-break so volunteers do not all pick the same pieces.

Origins are touched only for an item whose wanted pieces have no copy in the swarm or on any node:
then the torrent's web seeds (the organisation's HTTP locations) are switched on for it. The pull
pipeline never fetches whole items in this mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import libtorrent as lt

from noded.cache.layout import CacheLayout
from noded.core.component import Node, supervise
from noded.core.logs import get_logger
from noded.core.model import Item, State
from noded.core.store import Store
from noded.p2p import torrent as T
from noded.p2p.coverage import ItemState, Selection, select
from noded.p2p.engine import P2PEngine
from noded.p2p.pieces import PieceHolder
from noded.p2p.replicas import ItemReplicas, count, durable_locations, summary
from noded.p2p.settings import ALERT_MASK

log = get_logger("noded.p2p.volunteer")


@dataclass(frozen=True, slots=True)
class Meta:
    infohash: str
    piece_sizes: tuple[int, ...]
    data: bytes
    web_seeds: tuple[str, ...]


def piece_sizes(total: int, piece_length: int) -> tuple[int, ...]:
    n = T.num_pieces(total, piece_length)
    return tuple(min(piece_length, total - i * piece_length) for i in range(n))


def _current_items(store: Store) -> list[Item]:
    """The newest version of every item with an infohash (superseded versions are not the catalogue)."""
    newest: dict[str, Item] = {}
    after = 0
    while True:
        batch = store.items(after_id=after, limit=5000)
        if not batch:
            break
        after = batch[-1].id
        for it in batch:
            if it.infohash and it.state is not State.EVICTED:
                cur = newest.get(it.key)
                if cur is None or it.version > cur.version:
                    newest[it.key] = it
    return list(newest.values())


def _durable(store: Store, items: Iterable[Item]) -> dict[str, list[str]]:
    return {
        it.key: durable_locations(
            md5=it.md5, sha256=it.sha256, size=it.size, pushed=it.pushed, replicas=store.replicas(it.key)
        )
        for it in items
    }


class Volunteer:
    name = "volunteer"

    def __init__(self, node: Node, engine: P2PEngine, sync: Any = None, layout: CacheLayout | None = None) -> None:
        self.node = node
        self.engine = engine
        self.sync = sync  # PeerSync, for peer inventories (whole items and partial holdings)
        cfg = node.cfg
        self.layout = layout or engine.layout
        self.holder = PieceHolder(engine.session, self.layout)
        self._meta: dict[str, Meta | None] = {}  # infohash -> metadata (None: unreadable torrent)
        self._replicas: dict[str, ItemReplicas] = {}  # key -> last count
        self._keys: dict[str, str] = {}  # infohash -> key
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_scrape = 0.0
        self.rounds = 0
        self.last_round: float | None = None
        self.last_selection: Selection | None = None
        self.acquired_bytes = 0
        self.released_bytes = 0
        self.missing_pieces = 0  # pieces chosen but not yet verified here, as of the last round
        self.origin_items: set[str] = set()  # keys whose web seeds are on (no copy anywhere else)
        v = cfg.volunteer
        self.budget = v.budget or int(cfg.cache.budget * cfg.cache.low_watermark)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        up = self.node.cfg.volunteer.upload_limit
        # Volunteers keep connections to peers that want nothing from them: those peers' bitfields are
        # the per-piece counts. The upload cap is a volunteer's promise of a light footprint.
        # Scrape replies are tracker alerts.
        settings: dict[str, Any] = {
            "close_redundant_connections": False,
            "alert_mask": int(ALERT_MASK | lt.alert_category.tracker),
        }
        if self.node.cfg.volunteer.allow_local_trackers:
            settings["ssrf_mitigation"] = False
        self.engine.session.apply_settings(settings)
        if up:
            self.engine.upload_cap = up
            self.engine.session.apply_settings({"upload_rate_limit": up})
        self._task = supervise(self._loop, "volunteer", self.node, self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        interval = self.node.cfg.volunteer.interval
        while True:
            await self.run_round()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    # -- one round --------------------------------------------------------------------------
    async def _meta_of(self, infohash: str) -> Meta | None:
        if infohash in self._meta:
            return self._meta[infohash]
        path = self.layout.torrent_path(infohash)

        def load() -> Meta | None:
            try:
                m = T.parse_torrent(path.read_bytes())
            except (OSError, T.TorrentError) as e:
                log.warning("volunteer.torrent_unreadable", infohash=infohash, error=str(e))
                return None
            if not m.single_file or m.infohash != infohash:
                return None
            return Meta(infohash, piece_sizes(m.total_size, m.piece_length), m.data, m.web_seeds)

        meta = await asyncio.get_running_loop().run_in_executor(None, load)
        self._meta[infohash] = meta
        return meta

    def _peer_holdings(self) -> dict[str, dict[str, frozenset[int] | None]]:
        """key -> node -> pieces (None: whole), from the peers' inventories."""
        out: dict[str, dict[str, frozenset[int] | None]] = {}
        if self.sync is None:
            return out
        for view in self.sync.peers.values():
            if not view.up:
                continue
            for key, pi in view.items.items():
                out.setdefault(key, {})[view.name] = None
                self._keys.setdefault(pi.infohash, key)
            for key, (_ih, pieces) in getattr(view, "partial", {}).items():
                out.setdefault(key, {}).setdefault(view.name, pieces)
        return out

    async def run_round(self) -> Selection:
        store = self.node.store
        items = await store.run(_current_items, store)
        metas: dict[str, Meta] = {}
        for it in items:
            assert it.infohash is not None
            m = await self._meta_of(it.infohash)
            if m is not None and it.state is not State.CACHED:
                metas[it.key] = m
                self._keys[m.infohash] = it.key
        by_key = {it.key: it for it in items if it.key in metas}
        # Every catalogue torrent in the session (holding nothing yet): the swarm tells its counts.
        for key, m in metas.items():
            if m.infohash not in self.holder.holdings and m.infohash not in self.engine.session.handles:
                try:
                    await self.holder.hold(m.infohash, m.data, frozenset())
                except Exception as e:
                    log.warning("volunteer.add_failed", key=key, error=str(e))
        now = time.time()
        if now - self._last_scrape >= self.node.cfg.volunteer.scrape_interval:
            self._last_scrape = now
            for m in metas.values():
                self.holder.scrape(m.infohash)
        durable = await store.run(_durable, store, by_key.values())
        peers = self._peer_holdings()
        avail = await self.holder.availability_all([m.infohash for m in metas.values()])
        have = await self.holder.have_all([m.infohash for m in metas.values()])
        for ih, h in self.holder.holdings.items():
            # Pieces found in the file after a restart are held: the selection keeps or really drops them.
            extra = have.get(ih, frozenset()) - h.want
            if extra:
                h.want = h.want | extra
        vcfg = self.node.cfg.volunteer
        # Snapshots taken on the loop; the counting and the selection run in an executor (large catalogues).
        scrapes = {m.infohash: self.holder.scrapes.get(m.infohash) for m in metas.values()}
        holds = {m.infohash: self.holder.holdings.get(m.infohash) for m in metas.values()}
        held_now = {ih: (h.want, bool(h.web_seeds)) for ih, h in holds.items() if h is not None}

        def decide() -> tuple[dict[str, ItemReplicas], list[ItemState], Selection]:
            counted: dict[str, ItemReplicas] = {}
            states: list[ItemState] = []
            for key, m in metas.items():
                sc = scrapes[m.infohash]
                held, web = held_now.get(m.infohash, (frozenset(), False))
                mine = have.get(m.infohash, frozenset())
                av = avail.get(m.infohash)
                if av is not None and web:
                    av = [max(0, a - 1) for a in av]  # a web seed connection has every piece: not a copy
                r = count(
                    key,
                    len(m.piece_sizes),
                    durable=durable.get(key, ()),
                    nodes=peers.get(key),
                    seeders=sc.seeders if sc else None,
                    leechers=sc.leechers if sc else None,
                    availability=av,
                    me_seeding=len(mine) == len(m.piece_sizes),
                )
                counted[key] = r
                states.append(ItemState(key, m.piece_sizes, r.pieces, vcfg.weight(key), by_key[key].pinned, held))
            sel = select(states, self.budget, self.node.cfg.node.name, vcfg.hysteresis, self.rounds)
            return counted, states, sel

        counted, states, sel = await asyncio.get_running_loop().run_in_executor(None, decide)
        self._replicas = counted
        for st in states:
            m = metas[st.key]
            want = sel.hold.get(st.key, frozenset())
            r = self._replicas[st.key]
            # Origins only for pieces nobody else has (durable copies are the origins themselves), and only
            # until those pieces are here.
            missing = want - have.get(m.infohash, frozenset())
            lonely = any(r.pieces[i] - len(r.durable) <= 0 for i in missing)
            try:
                await self.holder.hold(m.infohash, m.data, want)
                self.holder.set_web_seeds(m.infohash, m.web_seeds if lonely else ())
            except Exception as e:
                log.warning("volunteer.hold_failed", key=st.key, error=str(e))
                continue
            if lonely and want:
                self.origin_items.add(st.key)
            else:
                self.origin_items.discard(st.key)
        self.missing_pieces = sum(
            len(sel.hold.get(st.key, frozenset()) - have.get(metas[st.key].infohash, frozenset())) for st in states
        )
        self.acquired_bytes += sel.acquire_bytes
        self.released_bytes += sel.release_bytes
        self.rounds += 1
        self.last_round = time.time()
        self.last_selection = sel
        if sel.acquire_bytes or sel.release_bytes:
            log.info(
                "volunteer.round",
                held_bytes=sel.bytes,
                acquire=sel.acquire_bytes,
                release=sel.release_bytes,
                items=len(sel.hold),
            )
        return sel

    # -- what others ask --------------------------------------------------------------------
    def may_pull(self, item: Item) -> bool:
        """The pull pipeline fetches nothing whole in volunteer mode: holdings come from the swarm."""
        return False

    def replicas_of(self, key: str) -> dict[str, Any] | None:
        r = self._replicas.get(key)
        if r is None:
            return None
        body = r.public()
        m = next((ih for ih, k in self._keys.items() if k == key), None)
        hold = self.holder.holdings.get(m) if m else None
        body["held_here"] = sorted(hold.want) if hold is not None else []
        return body

    def partial_holdings(self) -> list[tuple[str, str, list[int]]]:
        """(infohash, key, pieces held) of every torrent this node holds pieces of, for peers and locate."""
        out = []
        for ih, h in self.holder.holdings.items():
            key = self._keys.get(ih)
            if h.want and key is not None:
                out.append((ih, key, sorted(h.want)))
        return sorted(out, key=lambda t: t[1])

    def status(self) -> dict[str, Any]:
        sel = self.last_selection
        k = self.node.cfg.volunteer.copies_target
        health = self.node.loops.get("volunteer")
        return {
            "state": "running" if self._task is not None and not self._task.done() else "stopped",
            "budget": self.budget,
            "rounds": self.rounds,
            "last_round": self.last_round,
            "held_items": sum(1 for h in self.holder.holdings.values() if h.want),
            "held_pieces": sum(len(h.want) for h in self.holder.holdings.values()),
            "held_bytes": sel.bytes if sel else 0,
            "pinned_over_budget": bool(sel and sel.over_budget),
            "missing_pieces": self.missing_pieces,
            "last_acquire_bytes": sel.acquire_bytes if sel else 0,
            "last_release_bytes": sel.release_bytes if sel else 0,
            "acquired_bytes": self.acquired_bytes,
            "released_bytes": self.released_bytes,
            "origin_items": len(self.origin_items),
            "downloaded_bytes": self.holder.retired_down
            + sum(ts.downloaded for ih, ts in self.engine.session.states.items() if ih in self.holder.holdings),
            "uploaded_bytes": self.holder.retired_up
            + sum(ts.uploaded for ih, ts in self.engine.session.states.items() if ih in self.holder.holdings),
            "crashes": health.crashes if health else 0,
            "last_error": health.last_error if health else None,
            "replicas": summary(self._replicas.values(), k),
        }
