"""Benchmark: /healthz and /v1/status latency and event-loop lag while the node pulls 1 GiB.

Baseline (same run): the same load against the same node while it is idle. The pull is a streamed HTTP
download running on the node's own loop (see bench/_pull_node.py) from a local aiohttp origin serving a
file with sendfile. Load: closed-loop aiohttp clients in this process (2 on /healthz, 2 on /v1/status).

    /work/venv/bin/python bench/api.py [--size 1GiB] [--idle-seconds 8]

Last line: one JSON object with healthz_p50_ms, healthz_p99_ms, status_p50_ms, status_p99_ms,
loop_lag_p99_ms (under the pull) and the idle baseline's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import base_config, free_port, noded_env, write_config  # noqa: E402

from noded.units import parse_size  # noqa: E402

ORIGIN = """
import sys
from aiohttp import web
path, port = sys.argv[1], int(sys.argv[2])
app = web.Application()
async def get(request):
    return web.FileResponse(path)
app.router.add_get("/big.bin", get)
web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
"""


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


async def hammer(session: aiohttp.ClientSession, url: str, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        async with session.get(url) as r:
            await r.read()
            assert r.status == 200, r.status
        out.append((time.perf_counter() - t0) * 1000)


async def load(api: str, until: Any) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {"healthz": [], "status": []}
    stop = asyncio.Event()
    conn = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=conn) as s:
        tasks = [asyncio.create_task(hammer(s, api + "/healthz", stop, res["healthz"])) for _ in range(2)]
        tasks += [asyncio.create_task(hammer(s, api + "/v1/status", stop, res["status"])) for _ in range(2)]
        await until()
        stop.set()
        await asyncio.gather(*tasks)
    return res


async def get_json(api: str, path: str, method: str = "GET") -> Any:
    async with aiohttp.ClientSession() as s, s.request(method, api + path) as r:
        return await r.json()


def summary(res: dict[str, list[float]], lag: dict[str, float], seconds: float) -> dict[str, float]:
    return {
        "healthz_p50_ms": round(pct(res["healthz"], 0.5), 3),
        "healthz_p99_ms": round(pct(res["healthz"], 0.99), 3),
        "status_p50_ms": round(pct(res["status"], 0.5), 3),
        "status_p99_ms": round(pct(res["status"], 0.99), 3),
        "loop_lag_p50_ms": lag["lag_p50_ms"],
        "loop_lag_p99_ms": lag["lag_p99_ms"],
        "loop_lag_max_ms": lag["lag_max_ms"],
        "requests": len(res["healthz"]) + len(res["status"]),
        "seconds": round(seconds, 2),
    }


async def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    size = parse_size(args.size)
    src = tmp / "big.bin"
    block = os.urandom(16 * 1024 * 1024)
    with open(src, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
    oport = free_port()
    origin = subprocess.Popen([sys.executable, "-c", ORIGIN, str(src), str(oport)])
    cfg = base_config(tmp / "node", log={"format": "json", "level": "warning"})
    cfg_path = write_config(tmp / "node", cfg)
    api = f"http://127.0.0.1:{cfg['api']['port']}"
    log = open(tmp / "node.log", "wb")  # noqa: SIM115 - closed in finally
    node = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "_pull_node.py"),
            str(cfg_path),
            f"http://127.0.0.1:{oport}/big.bin",
            str(tmp / "pulled.bin"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=noded_env(),
        cwd=ROOT,
    )
    try:
        for _ in range(300):
            try:
                if (await get_json(api, "/readyz"))["ready"]:
                    break
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("node not ready: " + (tmp / "node.log").read_text()[-2000:])
        await asyncio.sleep(1.0)

        # Baseline: the idle node under the same load.
        t0 = time.monotonic()
        idle = await load(api, lambda: asyncio.sleep(args.idle_seconds))
        idle_s = time.monotonic() - t0
        idle_lag = await get_json(api, f"/bench/lag?seconds={idle_s:.1f}")

        # Under a pull of the whole file.
        await get_json(api, "/bench/pull", "POST")
        t0 = time.monotonic()

        async def pulled() -> None:
            while True:
                st = (await get_json(api, "/v1/status"))["components"]["benchpull"]
                if st["state"] == "done":
                    return
                await asyncio.sleep(0.2)

        busy = await load(api, pulled)
        busy_s = time.monotonic() - t0
        busy_lag = await get_json(api, f"/bench/lag?seconds={busy_s:.1f}")
        st = (await get_json(api, "/v1/status"))["components"]["benchpull"]
        tr = await get_json(api, "/v1/traffic")
        assert st["bytes"] == size, st
        assert tr["totals_since_start"]["zenodo"]["in"]["bytes"] == size
        return {
            "busy": summary(busy, busy_lag, busy_s),
            "idle": summary(idle, idle_lag, idle_s),
            "pull_seconds": round(st["seconds"], 2),
            "pull_MBps": round(size / st["seconds"] / 1e6, 1),
            "size_bytes": size,
        }
    finally:
        for p in (node, origin):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--idle-seconds", type=float, default=8.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="noded-bench-api-"))
    try:
        r = asyncio.run(bench(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    b, i = r["busy"], r["idle"]
    print(f"{'':28}{'idle node (baseline)':>22}{'during pull':>16}{'ratio':>8}")
    for k in (
        "healthz_p50_ms",
        "healthz_p99_ms",
        "status_p50_ms",
        "status_p99_ms",
        "loop_lag_p50_ms",
        "loop_lag_p99_ms",
        "loop_lag_max_ms",
        "requests",
    ):
        ratio = b[k] / i[k] if i[k] else float("nan")
        print(f"{k:28}{i[k]:>22}{b[k]:>16}{ratio:>8.2f}")
    print(f"pull: {r['size_bytes']} bytes in {r['pull_seconds']} s ({r['pull_MBps']} MB/s) during the load")
    out = {
        "healthz_p50_ms": b["healthz_p50_ms"],
        "healthz_p99_ms": b["healthz_p99_ms"],
        "status_p50_ms": b["status_p50_ms"],
        "status_p99_ms": b["status_p99_ms"],
        "loop_lag_p99_ms": b["loop_lag_p99_ms"],
        "pull_seconds": r["pull_seconds"],
        "pull_MBps": r["pull_MBps"],
        "requests": b["requests"],
        "baseline_idle": i,
        "healthz_p99_ratio_vs_idle": round(b["healthz_p99_ms"] / i["healthz_p99_ms"], 2)
        if i["healthz_p99_ms"]
        else None,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
