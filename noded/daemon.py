"""The composition root: builds the components, starts them in order, stops them in reverse.

Signals: SIGTERM/SIGINT stop gracefully within `STOP_TIMEOUT`; SIGHUP reloads what can be reloaded.
systemd: READY=1 once the store is open, the cache reconciled and the API listens (the BitTorrent
restore may still be running: status shows it), STATUS= every few seconds, WATCHDOG=1
at half of WATCHDOG_USEC only while the loop is healthy, STOPPING=1 on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from pathlib import Path
from typing import Any

from noded.api import cache_routes, origins_routes
from noded.api import items as item_routes
from noded.api import torrents as torrent_routes
from noded.api.app import ApiServer, RouteSetup, build_status
from noded.api.transparency import ROUTES as TRANSPARENCY_ROUTES
from noded.cache.accounting import Cache
from noded.cache.watch import Watcher
from noded.core import instance
from noded.core.component import Component, Node, Reloadable, supervise
from noded.core.config import Config, ConfigError, load_config, read_secret
from noded.core.logs import configure as configure_logging
from noded.core.logs import get_logger
from noded.core.reload import plan as reload_plan
from noded.core.sdnotify import Notifier, watchdog_interval
from noded.core.store import Store
from noded.core.units import format_size
from noded.origins.pipeline import Origins
from noded.origins.rekey import Rekey
from noded.origins.schedule import Schedule
from noded.r2.catalog import R2Origin
from noded.transparency.metrics import Metrics
from noded.transparency.probe import Prober
from noded.transparency.reverify import ReverifyQueue
from noded.transparency.traffic import TrafficRecorder

log = get_logger("noded.daemon")

STOP_TIMEOUT = 8.0  # seconds for all components together; systemd's TimeoutStopSec is larger
STATUS_INTERVAL = 2.0
LAG_PROBE_INTERVAL = 0.25
UNHEALTHY_LAG = 5.0  # seconds of loop lag at which watchdog pings stop


class StoreComponent:
    name = "store"

    def __init__(self, store: Store) -> None:
        self.store = store

    async def start(self) -> None:
        await self.store.open()

    async def stop(self) -> None:
        await self.store.close()

    def status(self) -> dict[str, Any]:
        # The file's name only: the status is public to any page the API's CORS lets read it, and the
        # directory layout of the machine is not its business.
        return {"state": "running" if self.store.is_open else "stopped", "database": self.store.path.name}


def peer_down_grace(cfg: Config) -> float:
    """How long a peer must fail polls before it counts as down (one refused poll is not an outage:
    the peer may be starting at the same moment)."""
    return 3 * cfg.bittorrent.peer_poll_interval


def peer_not_down(sync: Any, name: str, grace: float, now: float | None = None) -> bool:
    """Up, not polled yet, or failing for less than `grace`: a node must not grab items its peer owns
    before it has really asked."""
    view = sync.peers.get(name)
    if view is None:
        return False
    now = time.time() if now is None else now
    return bool(view.up or view.down_since is None or now - view.down_since < grace)


def peers_settled(sync: Any, grace: float, now: float | None = None) -> bool:
    """Every peer is known up, or has been failing for at least `grace`."""
    now = time.time() if now is None else now
    return all(v.up or (v.down_since is not None and now - v.down_since >= grace) for v in sync.peers.values())


def api_token(cfg: Config) -> str | None:
    return read_secret(cfg.api.token_credential, cfg.api.token_env)


class Daemon:
    def __init__(self, cfg: Config, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.store = Store(cfg.paths.state_dir / "noded.sqlite3")
        self.node = Node(cfg=cfg, store=self.store, instance=instance.new_instance_id())
        self.notifier = Notifier()
        self._stop = asyncio.Event()
        self._started: list[Component] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.routes: list[RouteSetup] = []
        self.peer_sync: Any = None  # noded.p2p.sync.PeerSync when BitTorrent is enabled
        self.swarm: Any = None  # noded.p2p.swarm.Swarm when BitTorrent is enabled
        self.components: list[Component] = self.build()

    # -- composition -------------------------------------------------------------------------
    def build(self) -> list[Component]:
        """Every component in start order. The store first, the API last (READY means serving)."""
        comps: list[Component] = [StoreComponent(self.store)]
        # Rows and files keyed by origin paths move to dataset names once, before the cache reconciles.
        comps.append(Rekey(self.node))
        # Transparency: traffic buckets, metrics, mirror probes, their API routes.
        comps += [TrafficRecorder(self.node), Metrics(self.node), Prober(self.node), ReverifyQueue(self.node)]
        self.routes += TRANSPARENCY_ROUTES
        # Cache before P2P: startup reconciliation settles which files are intact before anything is seeded.
        cache = Cache(self.node)
        comps += [cache, Watcher(self.node, cache)]
        self.routes.append(cache_routes.setup)
        self.routes.append(item_routes.setup)
        # Origins: bandwidth timetable, catalog refresh and the pull pipeline. The peer's source goes
        # first (below); R2 as an origin is an extension whose source goes last.
        self.schedule = Schedule(self.cfg.schedule, self.node)
        self.origins = Origins(self.node, down=self.schedule.down)
        self.origins.extensions.append(R2Origin(self.cfg, self.node.traffic))
        comps += [self.schedule, self.origins]
        self.routes.append(origins_routes.setup)
        comps += self._p2p_components()
        # The peer is the pull pipeline's first source, and tells who is up.
        sync = getattr(self, "peer_sync", None)
        if sync is not None:
            self.origins.sources_first.append(sync.source)
            # Then datasets added from the public swarm (`noded add`): trackers, DHT and web seeds.
            self.origins.sources_first.append(self.swarm.source)
            self.origins.peer_up = lambda name: peer_not_down(sync, name, peer_down_grace(self.node.cfg))
            self.origins.peers_ready = lambda: peers_settled(sync, peer_down_grace(self.node.cfg))
        # R2: push cached items.
        if self.cfg.r2.enabled:
            from noded.r2.push import R2Pusher

            comps.append(R2Pusher(self.node, up=self.schedule.up))
        comps.append(ApiServer(self.node, self.routes, api_token(self.cfg)))
        return comps

    def _p2p_components(self) -> list[Component]:
        """BitTorrent engine, peer sync (its `source` is the pipeline's "peer" source), web seed."""
        from noded.api import swarm_routes
        from noded.p2p.engine import P2PEngine
        from noded.p2p.swarm import Swarm
        from noded.p2p.sync import PeerSync
        from noded.p2p.webseed import WebSeedServer

        self.routes.append(torrent_routes.setup)
        out: list[Component] = []
        if self.cfg.bittorrent.enabled:
            # READY does not wait for every seeded torrent: status shows the restore ("restoring n/m").
            engine = P2PEngine(self.node, schedule=self.schedule, restore_in_background=True)
            # The origins pipeline takes `self.peer_sync.source` as its first source (before origins).
            self.peer_sync = PeerSync(self.node, engine)
            self.swarm = Swarm(self.node, engine, self.peer_sync)
            out += [engine, self.peer_sync, self.swarm]
            self.routes.append(swarm_routes.setup)
            if self.cfg.volunteer.enabled:
                from noded.p2p.volunteer import Volunteer

                # Volunteer mode: pieces of what the network is closest to losing, from the swarm; the
                # pipeline refreshes the catalogue but pulls nothing whole.
                volunteer = Volunteer(self.node, engine, self.peer_sync)
                self.origins.may_pull = volunteer.may_pull
                out.append(volunteer)
        if self.cfg.http_mirror.enabled:
            out.append(WebSeedServer(self.node))
        return out

    # -- run ---------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        # Their default action ends the process without cleanup: they dump state to the log instead.
        loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(self.dump_status()))
        loop.add_signal_handler(signal.SIGUSR2, self.dump_tasks)
        try:
            await self._start_all()
        except Exception as e:
            log.error("daemon.start_failed", error=str(e), exc_info=True)
            await self._stop_all()
            return 1
        await self._record_instance()
        # What start-up built (modules, botocore's models, the config) lives as long as the process:
        # kept out of the collector, a full collection no longer walks it on the loop thread (about
        # 50 ms here for a started daemon's heap: an API answer that late).
        gc.collect()
        gc.freeze()
        self.node.ready = True
        self.notifier.ready(self.status_line())
        log.info("daemon.ready", node=self.cfg.node.name, components=[c.name for c in self._started])
        self._tasks = [
            supervise(self._lag_monitor, "lag-monitor", self.node, "daemon"),
            supervise(self._status_loop, "status-loop", self.node, "daemon"),
        ]
        wd = watchdog_interval()
        if wd:
            self._tasks.append(supervise(lambda: self._watchdog_loop(wd), "watchdog", self.node, "daemon"))
        await self._stop.wait()
        self.node.stopping = True
        self.notifier.stopping()
        log.info("daemon.stopping")
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stop_all()
        await self._forget_instance()
        log.info("daemon.stopped")
        self.notifier.close()
        return 0

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        if not self._stop.is_set():
            log.info("daemon.signal", signal=sig.name if sig else None)
        self._stop.set()

    async def _start_all(self) -> None:
        for comp in self.components:
            t0 = time.monotonic()
            await comp.start()
            self._started.append(comp)
            self.node.components[comp.name] = comp
            log.info("component.started", component=comp.name, seconds=round(time.monotonic() - t0, 3))

    async def _stop_all(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT
        for comp in reversed(self._started):
            remaining = max(0.5, deadline - time.monotonic())
            try:
                await asyncio.wait_for(comp.stop(), timeout=remaining)
                log.info("component.stopped", component=comp.name)
            except TimeoutError:
                log.error("component.stop_timeout", component=comp.name, seconds=round(remaining, 1))
            except Exception as e:
                log.error("component.stop_failed", component=comp.name, error=str(e), exc_info=True)
        self._started.clear()

    async def _record_instance(self) -> None:
        """Tell tools on this machine which ports are ours (`noded check-config` run beside us)."""
        listens: dict[str, tuple[str, int]] = {}
        api, web = self.node.get("api"), self.node.get("webseed")
        if api is not None and api.port:
            listens["api.port"] = (self.cfg.api.bind, int(api.port))
        if web is not None and web.port:
            listens["http_mirror.port"] = (self.cfg.http_mirror.bind, int(web.port))
        rec = instance.Instance(self.node.instance, os.getpid(), listens)
        try:
            await asyncio.get_running_loop().run_in_executor(None, instance.write, self.cfg.paths.state_dir, rec)
        except OSError as e:
            log.warning("instance.write_failed", error=str(e))

    async def _forget_instance(self) -> None:
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().run_in_executor(
                None, instance.remove, self.cfg.paths.state_dir, self.node.instance
            )

    # -- signals that only tell ---------------------------------------------------------------
    async def dump_status(self) -> None:
        """SIGUSR1: the status the API serves, into the log (for a node whose API cannot be reached)."""
        try:
            st = await build_status(self.node)
        except Exception as e:
            log.error("daemon.status_failed", error=str(e))
            return
        log.info(
            "daemon.status",
            line=self.status_line(),
            ready=st["ready"],
            items=st["items"],
            cache=st["cache"],
            components={n: c.get("state") for n, c in st["components"].items()},
            problems=st["problems"],
            loop_lag_ms=st["loop_lag_ms"],
        )

    def dump_tasks(self) -> None:
        """SIGUSR2: the event loop's tasks and the line each waits at, into the log."""
        tasks = []
        for t in asyncio.all_tasks():
            frames = t.get_stack(limit=1)
            where = f"{frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else "-"
            tasks.append(f"{t.get_name()} @ {where}")
        log.info("daemon.tasks", count=len(tasks), tasks=sorted(tasks))

    # -- reload ------------------------------------------------------------------------------
    async def reload(self) -> None:
        if self.config_path is None:
            log.warning("config.reload_skipped", reason="no config file")
            return
        self.notifier.reloading()
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, load_config, self.config_path)
        except ConfigError as e:
            problems = [str(p) for p in e.problems]
            log.error("config.reload_rejected", problems=problems)
            self.node.reload = {**(self.node.reload or {}), "rejected": problems, "rejected_at": time.time()}
            self.notifier.ready(self.status_line())
            return
        # Keys that need a restart keep their running values, so the node does what it reports.
        running, applied, restart = reload_plan(self.cfg, new)
        self.cfg = self.node.cfg = running
        if any(k.startswith("log.") for k in applied):
            configure_logging(running.log.format, running.log.level)
        failed: list[str] = []
        for comp in self._started:
            if isinstance(comp, Reloadable):
                try:
                    await comp.reload(running)
                except Exception as e:
                    failed.append(comp.name)
                    log.error("component.reload_failed", component=comp.name, error=str(e), exc_info=True)
        self.node.reload = {"applied": applied, "restart_required": restart, "at": time.time()}
        if failed:
            self.node.reload["failed_components"] = failed
        log.info("config.reloaded", applied=applied, restart_required=restart)
        self.notifier.ready(self.status_line())

    # -- health ------------------------------------------------------------------------------
    async def _lag_monitor(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_PROBE_INTERVAL)
            self.node.loop_lag = max(0.0, time.monotonic() - t0 - LAG_PROBE_INTERVAL)

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            # Only a loop that is running these lines, and is not lagging badly, is healthy.
            if self.node.loop_lag < UNHEALTHY_LAG:
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _status_loop(self) -> None:
        while True:
            try:
                summary = await self.store.run(self.store.cache_summary)
                self._summary = summary
                self.notifier.status(self.status_line())
            except Exception as e:
                log.warning("status.failed", error=str(e))
            await asyncio.sleep(STATUS_INTERVAL)

    _summary: dict[str, int] | None = None

    def status_line(self) -> str:
        s = self._summary or {}
        cache = self.node.get("cache")
        used = cache.status().get("used_bytes") if cache else s.get("cached_disk_bytes", 0)
        peers = self.node.get("sync")
        up = peers.status().get("peers_up", 0) if peers else 0
        rin = self.node.traffic.total_rate("in")
        rout = self.node.traffic.total_rate("out")
        problems = f"; {len(self.node.problems)} problem(s)" if self.node.problems else ""
        return (
            f"{s.get('cached_items', 0)} cached, {format_size(used or 0)}/{format_size(self.cfg.cache.budget)}, "
            f"peers up {up}/{len(self.cfg.peers)}, in {format_size(rin)}/s out {format_size(rout)}/s{problems}"
        )


async def run_daemon(cfg: Config, config_path: Path | None) -> int:
    daemon = Daemon(cfg, config_path)
    try:
        return await daemon.run()
    finally:
        with contextlib.suppress(Exception):
            daemon.notifier.close()
