"""Benchmark: one 1 GiB file from three throttled local mirrors, cached and verified.

Three HTTP mirrors of the same file on 127.0.0.1 (aiohttp servers in a separate process, so serving
does not share noded's interpreter), each with a capacity enforced for the mirror as a whole (one
token bucket for all its connections, so more connections cannot exceed it), by default 15, 25 and
40 MB/s: modest on purpose (the machine is shared), and their sum far below this machine's
verified-pull floor (bench/pull.py), so the mirrors, not the CPU, set the pace. The first mirror also
serves a STAC Item listing the file with the other two as alternates, md5 as file:checksum: one item,
three locations.

Same run, same mirrors:
  curl -o from the fastest mirror                       (no verification)
  aria2c with all three URIs, -x <per-host cap>, --checksum=md5=...   (verifies after the download)
  noded: Origins.pull() from all three (segments in proportion to throughput, endgame, md5 + sha256 +
         piece sha1 while streaming, fsync, rename, store row)
and a second scenario: the fastest mirror stops answering (connections held open, nothing sent) once it
has sent half its share; noded finishes from the other two.

Run:  /work/main/.venv/bin/python bench/multisource.py [--size-mib 1024] [--rates 15,25,40]
The last line printed is one JSON object: noded_s, aria2c_s, curl_best_s, capacity_sum_MBps,
ratio_vs_aria2c (aria2c_s / noded_s), fraction_of_capacity (noded MB/s / capacity sum),
bytes_requested_total (what the mirrors sent during noded's pull), and stop_* for the second scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pull import free_port, make_blob  # noqa: E402  (the single-origin bench beside this one)

MiB = 1024 * 1024
NAME = "big.bin"
CHUNK = 256 * 1024


# -- the mirrors (run in a child process) --------------------------------------------------------
def serve(file: Path, ports: list[int], rates: list[float], md5: str) -> None:
    from aiohttp import web

    size = file.stat().st_size

    class Mirror:
        def __init__(self, rate: float) -> None:
            self.rate = rate
            self.tokens = 0.0
            self.stamp = time.monotonic()
            self.sent = 0
            self.stop_after: int | None = None
            self.lock = asyncio.Lock()

        async def take(self, n: int) -> None:
            # One bucket for every connection of this mirror, a tenth of a second of burst.
            async with self.lock:
                now = time.monotonic()
                self.tokens = min(self.rate * 0.1, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                self.tokens -= n
                if self.tokens < 0:
                    await asyncio.sleep(-self.tokens / self.rate)

        def stopped(self) -> bool:
            return self.stop_after is not None and self.sent >= self.stop_after

    fd = os.open(file, os.O_RDONLY)

    def app_for(index: int, m: Mirror) -> web.Application:
        async def data(request: web.Request) -> web.StreamResponse:
            start, end, status = 0, size, 200
            rng = request.headers.get("Range", "")
            if rng.startswith("bytes="):
                a, _, b = rng[6:].partition("-")
                start, end, status = int(a), (int(b) + 1 if b else size), 206
                end = min(end, size)
                if start >= size:
                    return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            headers = {"Content-Length": str(end - start), "ETag": f'"{md5}"', "Accept-Ranges": "bytes"}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            resp = web.StreamResponse(status=status, headers=headers)
            await resp.prepare(request)
            pos = start
            while pos < end:
                while m.stopped():  # stops answering: the connection stays open, nothing comes
                    await asyncio.sleep(0.5)
                n = min(CHUNK, end - pos)
                await m.take(n)
                await resp.write(os.pread(fd, n, pos))
                m.sent += n
                pos += n
            await resp.write_eof()
            return resp

        async def stats(request: web.Request) -> web.Response:
            return web.json_response({"sent": m.sent})

        async def control(request: web.Request) -> web.Response:
            if "reset" in request.query:
                m.sent, m.stop_after = 0, None
            if "stop_after" in request.query:
                m.stop_after = int(request.query["stop_after"])
            return web.json_response({"sent": m.sent})

        async def item(request: web.Request) -> web.Response:
            host = request.host
            urls = [f"http://127.0.0.1:{p}/data/{NAME}" for p in ports]
            body = {
                "type": "Feature",
                "stac_version": "1.0.0",
                "stac_extensions": [
                    "https://stac-extensions.github.io/file/v2.1.0/schema.json",
                    "https://stac-extensions.github.io/alternate-assets/v1.2.0/schema.json",
                ],
                "id": "bench",
                "geometry": None,
                "properties": {"datetime": "2025-01-01T00:00:00Z"},
                "links": [{"rel": "self", "href": f"http://{host}/item.json"}],
                "assets": {
                    "data": {
                        "href": urls[0],
                        "roles": ["data"],
                        "file:size": size,
                        "file:checksum": "d50110" + md5,
                        "alternate": {f"m{i}": {"href": u} for i, u in enumerate(urls[1:], 1)},
                    }
                },
            }
            return web.json_response(body)

        app = web.Application()
        app.router.add_get(f"/data/{NAME}", data)
        app.router.add_get("/_stats", stats)
        app.router.add_get("/_control", control)
        if index == 0:
            app.router.add_get("/item.json", item)
        return app

    async def main() -> None:
        runners = []
        for i, (port, rate) in enumerate(zip(ports, rates, strict=True)):
            runner = web.AppRunner(app_for(i, Mirror(rate)), access_log=None, shutdown_timeout=0.2)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# -- the bench ---------------------------------------------------------------------------------------
def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def sent(ports: list[int]) -> list[int]:
    return [int(get_json(f"http://127.0.0.1:{p}/_stats")["sent"]) for p in ports]


def reset(ports: list[int]) -> None:
    for p in ports:
        get_json(f"http://127.0.0.1:{p}/_control?reset=1")


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


async def noded_pull(tmp: Path, catalog: str) -> tuple[float, str, dict[str, int]]:
    from noded.core.component import Node
    from noded.core.config import parse_config
    from noded.core.logs import configure
    from noded.core.model import State
    from noded.core.store import Store
    from noded.origins.pipeline import Origins

    configure("console", "warning")
    shutil.rmtree(tmp / "cache", ignore_errors=True)
    shutil.rmtree(tmp / "state", ignore_errors=True)
    cfg = parse_config(f"""
[node]
name = "bench"
region = "local"
[paths]
cache_dir = "{tmp}/cache"
state_dir = "{tmp}/state"
[cache]
budget = "4GB"
[origins.stac]
enabled = true
catalogs = ["{catalog}"]
""")
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    origins = Origins(Node(cfg=cfg, store=store))
    await origins.open()
    seen: dict[str, int] = {}

    async def watch() -> None:
        while True:
            for p in origins.status()["pulls"]:
                for loc in p["locations"]:
                    seen[loc["location"]] = loc["bytes"]
            await asyncio.sleep(0.5)

    try:
        await origins.refresh_all()
        item = await store.run(store.get_current, NAME)
        assert item is not None and len(item.urls) == 3, item
        watcher = asyncio.create_task(watch())
        t0 = time.perf_counter()
        await origins.pull(item)
        elapsed = time.perf_counter() - t0
        watcher.cancel()
        done = await store.run(store.get_current, NAME)
        assert done is not None and done.state == State.CACHED, done
        return elapsed, str(done.md5), seen
    finally:
        await origins.stop()
        await store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rates", default="15,25,40", help="each mirror's capacity, MB/s")
    ap.add_argument("--connections", type=int, default=4, help="per-host connection cap (noded's default)")
    ap.add_argument("--serve", nargs=4, metavar=("FILE", "PORTS", "RATES", "MD5"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        f, ports_s, rates_s, md5 = args.serve
        serve(Path(f), [int(p) for p in ports_s.split(",")], [float(r) for r in rates_s.split(",")], md5)
        return
    size = args.size_mib * MiB
    rates = [float(r) * 1e6 for r in args.rates.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="noded-bench-ms-"))
    server: subprocess.Popen[bytes] | None = None
    try:
        blob = tmp / NAME
        md5 = make_blob(blob, size)
        ports = [free_port() for _ in rates]
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(blob), ",".join(map(str, ports)), ",".join(map(str, rates)), md5],
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        urls = [f"http://127.0.0.1:{p}/data/{NAME}" for p in ports]
        fastest = max(range(len(rates)), key=lambda i: rates[i])
        cap_sum = sum(rates)
        print(f"mirror capacities: {[r / 1e6 for r in rates]} MB/s (sum {cap_sum / 1e6:.0f} MB/s), {size} bytes")
        out = tmp / "out"
        out.mkdir()

        reset(ports)
        t_curl = timed(["curl", "-sf", "-o", str(out / "curl.bin"), urls[fastest]])
        (out / "curl.bin").unlink()
        print(f"curl from the fastest:   {t_curl:7.2f} s")

        reset(ports)
        aria = ["aria2c", "-q", "-d", str(out), "-o", "aria.bin", "--file-allocation=none", "--allow-overwrite=true"]
        aria += [f"-x{args.connections}", f"-s{args.connections * len(urls)}", "-k1M", "--uri-selector=adaptive"]
        aria += [f"--checksum=md5={md5}", "--auto-file-renaming=false", *urls]
        t_aria = timed(aria)
        aria_bytes = sum(sent(ports))
        (out / "aria.bin").unlink()
        print(f"aria2c, all three + md5: {t_aria:7.2f} s  (mirrors sent {aria_bytes} bytes)")

        catalog = f"http://127.0.0.1:{ports[0]}/item.json"
        reset(ports)
        t_noded, got, seen = asyncio.run(noded_pull(tmp / "n1", catalog))
        assert got == md5
        per_mirror = sent(ports)
        print(f"noded, all three:        {t_noded:7.2f} s  (mirrors sent {per_mirror}; status saw {seen})")

        # Second scenario: the fastest mirror stops answering once it has sent half of its share.
        reset(ports)
        half_share = int(size * rates[fastest] / cap_sum / 2)
        get_json(f"http://127.0.0.1:{ports[fastest]}/_control?stop_after={half_share}")
        t_stop, got, _ = asyncio.run(noded_pull(tmp / "n2", catalog))
        assert got == md5
        stop_sent = sent(ports)
        print(f"noded, fastest stops:    {t_stop:7.2f} s  (mirrors sent {stop_sent})")

        figures = {
            "bench": "multisource",
            "size_bytes": size,
            "cores": os.cpu_count(),
            "capacities_MBps": [r / 1e6 for r in rates],
            "capacity_sum_MBps": round(cap_sum / 1e6, 1),
            "curl_best_s": round(t_curl, 3),
            "aria2c_s": round(t_aria, 3),
            "aria2c_bytes_requested_total": aria_bytes,
            "noded_s": round(t_noded, 3),
            "noded_MBps": round(size / t_noded / 1e6, 1),
            "ratio_vs_aria2c": round(t_aria / t_noded, 3),
            "fraction_of_capacity": round(size / t_noded / cap_sum, 3),
            "bytes_requested_total": sum(per_mirror),
            "bytes_requested_per_mirror": per_mirror,
            "bytes_requested_vs_size": round(sum(per_mirror) / size, 4),
            "stop_noded_s": round(t_stop, 3),
            "stop_bytes_requested_total": sum(stop_sent),
            "stop_bytes_requested_per_mirror": stop_sent,
        }
        print(json.dumps(figures))
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
