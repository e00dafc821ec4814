"""Traffic accounting: does every byte land once, in the right channel, and what does counting cost?

  mixed:  one node seeding a few cached items (P2P engine + web seed + traffic recorder, in this
          process).
          100 transfers, one after the other: a libtorrent client at the seed target's endpoint
          (127.0.0.2:P, one target per such transfer) or a swarm client behind the same address on
          another port, or on 127.0.0.3;
          unthrottled, throttled (the node's upload limit for that torrent), or leaving midway; and
          plain HTTP GETs of the web seed. Truth is what each client received. At the end the node's
          counters per channel are compared with the truth per channel:
            accounted_fraction     = bytes received that were counted in their right channel / bytes received
            misattributed_fraction = bytes one channel counted too many while another counted too few
                                     / bytes received ("unattributed" counts as too few)
            overcount_fraction     = bytes counted beyond what the clients received / bytes received
                                     (sent to a client that left before reading them)
  cost:   one 1 GiB transfer node -> raw libtorrent client over loopback, accounting on against
          accounting off (the baseline, same run), interleaved rounds after one warm-up. The client runs
          in a process of its own, so the bench process's CPU time (all its threads: the loop, the
          executor, libtorrent's) is the node's. CPU time, unlike wall time, does not stretch when other
          jobs share the cores:
            accounting_cost        = median node CPU with accounting on / median with it off - 1
            accounting_cost_direct = the accounting rounds the engine ran during each transfer times the
                                     process CPU of one round (measured alone, 200 rounds back to back
                                     with an active torrent and a connected peer) / the transfer's CPU
            accounting_cost_wall   = the same ratio as accounting_cost in wall time (noisy)

Usage: .venv/bin/python bench/traffic.py [--transfers 100] [--cost-mib 1024] [--rounds 7]
(--transfers 0 runs the cost part alone.)
The last line is one JSON object with accounted_fraction, misattributed_fraction and accounting_cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from noded.cache.layout import CacheLayout  # noqa: E402
from noded.core.component import Node  # noqa: E402
from noded.core.config import Config  # noqa: E402
from noded.p2p.engine import SWEEP_INTERVAL, P2PEngine  # noqa: E402
from noded.p2p.ledger import SETTLE_AFTER, UNATTRIBUTED  # noqa: E402
from noded.p2p.webseed import WebSeedServer  # noqa: E402
from noded.transparency.traffic import TrafficRecorder  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.p2p_helpers import content, make_config, open_node, put_cached_sync  # noqa: E402
from tests.traffic_helpers import Client  # noqa: E402

MiB = 1024 * 1024
SIZES = (1 * MiB, 3 * MiB, 8 * MiB, 16 * MiB)


def config(tmp: Path, targets: list[tuple[str, int]] | None = None) -> Config:
    over: dict[str, Any] = {
        "bittorrent": {"listen_interfaces": f"127.0.0.1:{free_port()}", "seed_target_interval": 3600.0},
        "http_mirror": {"port": 0},
    }
    if targets:
        over["seed_targets"] = [{"name": f"target{k}", "bittorrent": f"{h}:{p}"} for k, (h, p) in enumerate(targets)]
    return make_config(tmp, **over)


async def seed(node: Node, layout: CacheLayout, items: list[tuple[str, bytes]]) -> tuple[P2PEngine, dict[str, bytes]]:
    for key, data in items:
        await node.store.run(put_cached_sync, node.store, layout, key, data)
    engine = P2PEngine(node, layout)
    await engine.start()
    await engine.seed_pending()
    torrents = {}
    for it in await node.store.run(node.store.items):
        assert it.infohash
        torrents[it.infohash] = layout.torrent_path(it.infohash).read_bytes()
    return engine, torrents


async def p2p_transfer(engine: Any, ih: str, tor: bytes, client: Client, mode: str, size: int) -> int:
    """One client takes one torrent from the node; returns the payload bytes it received."""
    h = engine.session.handles[ih]
    # Leaving midway: slow enough that little waits in socket buffers when the client goes (bytes the
    # node handed to the kernel but the client never read count as sent, not as received).
    h.set_upload_limit({"throttled": 24 * MiB, "midway": 4 * MiB}.get(mode, 0))
    await asyncio.to_thread(client.start, tor)
    try:
        # The node reaches the client on its listen endpoint (as it reaches a seed target).
        engine.session.connect_peer(ih, client.host, client.port)
        until = size // 2 if mode == "midway" else None
        ok = await asyncio.to_thread(client.wait, until=until, timeout=120)
        if not ok:
            raise RuntimeError(f"transfer {mode} {size} to {client.host}:{client.port} did not finish")
        await asyncio.to_thread(client.drop)
    finally:
        client.close()
    return client.received


def http_get(url: str) -> int:
    with urllib.request.urlopen(url) as r:
        return len(r.read())


async def mixed(n: int, tmp: Path, rng: random.Random) -> dict[str, Any]:
    host = "127.0.0.2"
    # libtorrent remembers an endpoint that finished a torrent as a seed and a seed does not connect to
    # seeds: each transfer to a seed target uses a target of its own (all behind one address).
    target_ports = [free_port(host) for _ in range(n)]
    cfg = config(tmp / "node", [(host, p) for p in target_ports])
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    items = [(f"mix/{i}.bin", content(size, 100 + i)) for i, size in enumerate(SIZES)]
    recorder = TrafficRecorder(node)
    await recorder.start()
    engine, torrents = await seed(node, layout, items)
    web = WebSeedServer(node, layout)
    await web.start()
    truth: dict[str, int] = {}
    kinds: dict[str, int] = {}
    t0 = time.monotonic()
    try:
        ihs = list(torrents)
        for i in range(n):
            kind = rng.choice(("target", "same-address", "swarm", "webseed"))
            mode = rng.choice(("full", "full", "throttled", "midway"))
            if kind == "webseed":
                key, _ = rng.choice(items)
                got = await asyncio.to_thread(http_get, f"http://127.0.0.1:{web.port}/{key}")
                truth["webseed"] = truth.get("webseed", 0) + got
                kinds["webseed"] = kinds.get("webseed", 0) + 1
                continue
            ih = ihs[i % len(ihs)]
            size = _size_of(torrents[ih])
            if kind == "target":
                client, channel = Client(host, target_ports[i], tmp / f"c{i}"), f"seed:target{i}"
            elif kind == "same-address":
                client, channel = Client(host, free_port(host), tmp / f"c{i}"), "swarm"
            else:
                client, channel = Client("127.0.0.3", free_port("127.0.0.3"), tmp / f"c{i}"), "swarm"
            print("transfer", i, kind, mode, size, file=sys.stderr, flush=True)
            got = await p2p_transfer(engine, ih, torrents[ih], client, mode, size)
            truth[channel] = truth.get(channel, 0) + got
            kinds[f"{kind}/{mode}"] = kinds.get(f"{kind}/{mode}", 0) + 1
            shutil.rmtree(tmp / f"c{i}", ignore_errors=True)
        seconds = time.monotonic() - t0
        await engine.account_now()
        await asyncio.sleep(SETTLE_AFTER)
        await engine.account_now()
    finally:
        await web.stop()
        await engine.stop()
        await recorder.stop()
    counted = {ch: c.bytes for (ch, d), c in node.traffic.totals.items() if d == "out" and c.bytes}
    sql = "SELECT channel, SUM(bytes) FROM traffic WHERE direction='out' GROUP BY channel"
    stored = await node.store.run(lambda: dict(node.store.conn.execute(sql)))
    await node.store.close()
    total = sum(truth.values())
    channels = set(truth) | set(counted)
    right = sum(min(counted.get(ch, 0), truth.get(ch, 0)) for ch in channels if ch != UNATTRIBUTED)
    surplus = sum(max(0, counted.get(ch, 0) - truth.get(ch, 0)) for ch in channels if ch != UNATTRIBUTED)
    deficit = sum(max(0, truth.get(ch, 0) - counted.get(ch, 0)) for ch in channels)
    named = sum(v for ch, v in counted.items() if ch != UNATTRIBUTED)
    return {
        "transfers": n,
        "seconds": round(seconds, 1),
        "kinds": kinds,
        "truth_bytes": truth,
        "counted_bytes": counted,
        "stored_equals_counted": {k: int(v) for k, v in stored.items()} == counted,
        "accounted_fraction": round(right / total, 6),
        # Bytes one channel has too many while another has too few.
        "misattributed_fraction": round(min(surplus, deficit) / total, 6),
        # Counted beyond what the clients received: bytes the node handed to its socket that a client
        # leaving midway never read (in the kernels' buffers when it closed).
        "overcount_fraction": round(max(0, named - total) / total, 6),
    }


def _no_mix() -> dict[str, Any]:
    return {
        k: None
        for k in (
            "transfers",
            "accounted_fraction",
            "misattributed_fraction",
            "overcount_fraction",
            "stored_equals_counted",
        )
    }


def _size_of(tor: bytes) -> int:
    from noded.p2p import torrent as T

    return T.parse_torrent(tor).total_size


def leech_main(torrent: Path, host: str, port: int, save: Path) -> None:
    """The other side of a cost round, in a process of its own so the node's process CPU is the node's:
    listen, say so, take the whole torrent from whoever connects, print what was received."""
    client = Client(host, port, save)
    client.start(torrent.read_bytes())
    print("listening", flush=True)
    if not client.wait(timeout=600):
        raise SystemExit("transfer did not finish")
    print("complete", flush=True)
    client.drop()
    print(json.dumps({"received": client.received}), flush=True)
    client.close()


async def one_big(tmp: Path, size: int, accounting: bool, state: dict[str, Any]) -> dict[str, float]:
    """One client process takes `size` bytes from the node (the node already seeds it): the node
    process's CPU seconds and the wall seconds from the connection to completion."""
    engine: P2PEngine = state["engine"]
    engine.accounting = accounting
    save = tmp / "big-client"
    port = free_port("127.0.0.3")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--leech",
        str(state["torrent_path"]),
        "127.0.0.3",
        str(port),
        str(save),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        if (await proc.stdout.readline()).strip() != b"listening":
            raise RuntimeError("the client did not start")
        rounds0 = state["rounds"]
        cpu0, t0 = time.process_time(), time.monotonic()
        engine.session.connect_peer(state["ih"], "127.0.0.3", port)
        if (await asyncio.wait_for(proc.stdout.readline(), 600)).strip() != b"complete":
            raise RuntimeError("1 GiB transfer did not finish")
        cpu, dt = time.process_time() - cpu0, time.monotonic() - t0
        rounds = state["rounds"] - rounds0
        done = json.loads(await proc.stdout.readline())
        if done["received"] < size:
            raise RuntimeError(f"the client received {done['received']} of {size} bytes")
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        shutil.rmtree(save, ignore_errors=True)
    return {"cpu": cpu, "wall": dt, "rounds": rounds}


async def round_cpu(engine: P2PEngine, n: int, *, sweep: bool) -> float:
    """Process CPU seconds of one accounting round (all threads: the loop, the executor, libtorrent's
    network thread answering status() and get_peer_info()), over `n` back-to-back rounds."""
    cpu0 = time.process_time()
    for _ in range(n):
        await engine._account(sweep=sweep)
    return (time.process_time() - cpu0) / n


async def cost(tmp: Path, size: int, rounds: int) -> dict[str, Any]:
    cfg = config(tmp / "big")
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    engine, torrents = await seed(node, layout, [("big/one.bin", content(size, 7))])
    ih, tor = next(iter(torrents.items()))
    torrent_path = tmp / "big.torrent"
    torrent_path.write_bytes(tor)
    state: dict[str, Any] = {"engine": engine, "ih": ih, "torrent_path": torrent_path, "rounds": 0}
    # Count the accounting rounds the engine's own loop runs during each transfer.
    account = engine._account

    async def counting(*, sweep: bool = False) -> None:
        if engine.accounting:
            state["rounds"] += 1
        await account(sweep=sweep)

    engine._account = counting  # type: ignore[method-assign]
    on: list[dict[str, float]] = []
    off: list[dict[str, float]] = []
    try:
        await one_big(tmp, size, True, state)  # warm-up: page cache, connection paths
        for r in range(rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            for acc in order:
                (on if acc else off).append(await one_big(tmp, size, acc, state))
        # One round's cost, measured alone with a connected, active torrent (a client that stays).
        save = tmp / "idle-client"
        client = Client("127.0.0.3", free_port("127.0.0.3"), save)
        await asyncio.to_thread(client.start, tor)
        try:
            engine.session.connect_peer(ih, client.host, client.port)
            await asyncio.to_thread(client.wait, until=16 * MiB, timeout=120)
            client.handle.pause()
            engine.accounting = True
            per_round = await round_cpu(engine, 200, sweep=False)
            per_sweep = await round_cpu(engine, 50, sweep=True)
        finally:
            client.close()
            shutil.rmtree(save, ignore_errors=True)
    finally:
        engine._account = account  # type: ignore[method-assign]
        engine.accounting = True
        await engine.stop()
        await node.store.close()
    cpu_on = median(x["cpu"] for x in on)
    cpu_off = median(x["cpu"] for x in off)
    wall_on = median(x["wall"] for x in on)
    wall_off = median(x["wall"] for x in off)
    # What the rounds the loop ran during a transfer cost, from the per-round figure above.
    sweeps = [x["wall"] / SWEEP_INTERVAL for x in on]
    direct = [(x["rounds"] * per_round + s * (per_sweep - per_round)) / y["cpu"] for x, s, y in zip(on, sweeps, off)]
    return {
        "cost_bytes": size,
        "accounting_on_cpu_s": [round(x["cpu"], 3) for x in on],
        "accounting_off_cpu_s": [round(x["cpu"], 3) for x in off],
        "accounting_on_wall_s": [round(x["wall"], 3) for x in on],
        "accounting_off_wall_s": [round(x["wall"], 3) for x in off],
        "rounds_during_transfer": [int(x["rounds"]) for x in on],
        # Node process CPU per byte with accounting on against off (the baseline), medians of
        # interleaved rounds: CPU time, unlike wall time, does not stretch when other jobs share the cores.
        "accounting_cost": round(cpu_on / cpu_off - 1, 4),
        "accounting_cost_wall": round(wall_on / wall_off - 1, 4),
        # The same cost built from its parts: rounds run during a transfer times one round's process CPU.
        "accounting_round_cpu_ms": round(per_round * 1000, 3),
        "accounting_sweep_cpu_ms": round(per_sweep * 1000, 3),
        "accounting_cost_direct": round(median(direct), 5),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transfers", type=int, default=100)
    ap.add_argument("--cost-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--leech", nargs=4, metavar=("TORRENT", "HOST", "PORT", "SAVE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.leech:
        torrent, host, port, save = args.leech
        leech_main(Path(torrent), host, int(port), Path(save))
        return
    with tempfile.TemporaryDirectory(prefix="bench-traffic-") as d:
        tmp = Path(d)
        mix = await mixed(args.transfers, tmp, random.Random(args.seed)) if args.transfers else _no_mix()
        print(json.dumps({"part": "mixed", **mix}), flush=True)
        c = await cost(tmp, args.cost_mib * MiB, args.rounds)
        print(json.dumps({"part": "cost", **c}), flush=True)
    out = {
        "bench": "traffic",
        "transfers": mix["transfers"],
        "accounted_fraction": mix["accounted_fraction"],
        "misattributed_fraction": mix["misattributed_fraction"],
        "overcount_fraction": mix["overcount_fraction"],
        "stored_equals_counted": mix["stored_equals_counted"],
        "cost_bytes": c["cost_bytes"],
        "accounting_cost": c["accounting_cost"],
        "accounting_cost_direct": c["accounting_cost_direct"],
        "accounting_cost_wall": c["accounting_cost_wall"],
        "accounting_on_cpu_s_median": median(c["accounting_on_cpu_s"]),
        "accounting_off_cpu_s_median": median(c["accounting_off_cpu_s"]),
        "accounting_round_cpu_ms": c["accounting_round_cpu_ms"],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
