"""Benchmark: noded's time to "cached and verified" for 1 GiB from a local nginx origin.

Same run, same file, same origin (Debian's nginx on 127.0.0.1 with its own temp config, sendfile on):
  (a) curl -o                         bare transfer, no verification
  (b) curl -o && md5sum && sha256sum  the serial way to get a verified copy
  noded                               Origins.pull(): segmented download, md5 + sha256 + piece sha1s
                                      while streaming, verify, fsync, rename, store row -> cached
noded is durable (fsync before rename) where curl is not; that cost is included.

It also measures, in the same run, what the three digests alone cost on this machine (md5, sha256
and 16 MiB-piece sha1 over the file in memory, one core each) and curl's own CPU seconds for the
transfer (receiving and writing the bytes: what any client spends at least), and the lower bounds
they set for a cached-and-verified copy:
  floor_digests_s = max(md5, (md5 + sha256 + sha1) / cores)              (receiving and writing free)
  floor_s         = max(md5, (md5 + sha256 + sha1 + curl CPU) / cores)   (receiving as cheap as curl)
as ratios to curl's time (`floor_digests_vs_curl`, `floor_vs_curl`), plus noded's CPU seconds.

Run:  python bench/pull.py [--size-mib 1024] [--rounds 3]
With several rounds, curl and noded alternate (curl, noded, curl, noded, ...) and the figures are the
medians of their rounds: on a virtual machine whose neighbours come and go, one round of either side
varies by 2x. The last line printed is one JSON object with ratio_vs_serial and ratio_vs_curl (noded /
baseline) and ratio_vs_floor (noded / floor_s), plus each round's times.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from noded.core.component import Node  # noqa: E402
from noded.core.config import parse_config  # noqa: E402
from noded.core.logs import configure  # noqa: E402
from noded.core.model import State  # noqa: E402
from noded.core.store import Store  # noqa: E402
from noded.origins.pipeline import Origins  # noqa: E402

MiB = 1024 * 1024

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ application/xml xml; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {tmp}/www;
        location = /b {{ default_type application/xml; alias {tmp}/www/listing.xml; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_blob(path: Path, size: int) -> str:
    h = hashlib.md5()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(16 * MiB, left))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


def hash_costs(path: Path) -> dict[str, float]:
    """Seconds each digest takes over the whole file on one core (bytes already in memory)."""
    data = path.read_bytes()
    view = memoryview(data)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    hashlib.md5(data, usedforsecurity=False).digest()
    out["md5"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hashlib.sha256(data).digest()
    out["sha256"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for off in range(0, len(data), 16 * MiB):
        hashlib.sha1(view[off : off + 16 * MiB], usedforsecurity=False).digest()
    out["sha1_pieces"] = time.perf_counter() - t0
    return out


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: str, cpu: list[float] | None = None) -> float:
    t0, c0 = time.perf_counter(), children_cpu()
    subprocess.run(["bash", "-c", cmd], check=True)
    if cpu is not None:
        cpu.append(children_cpu() - c0)
    return time.perf_counter() - t0


async def noded_pull(tmp: Path, url: str) -> tuple[float, str, float]:
    tmp.mkdir(parents=True, exist_ok=True)
    configure("console", "warning")
    cfg_text = f"""
[node]
name = "bench"
region = "local"
[paths]
cache_dir = "{tmp}/cache"
state_dir = "{tmp}/state"
[cache]
budget = "4GB"
[origins.sourcecoop]
enabled = true
endpoint = "{url}"
bucket = "b"
"""
    cfg = parse_config(cfg_text)
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    origins = Origins(Node(cfg=cfg, store=store))
    await origins.open()
    try:
        await origins.refresh_all()
        item = await store.run(store.get_current, "big.bin")
        assert item is not None
        t0, c0 = time.perf_counter(), cpu_seconds()
        await origins.pull(item)
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds() - c0
        done = await store.run(store.get_current, "big.bin")
        assert done is not None and done.state == State.CACHED, done
        return elapsed, str(done.md5), cpu
    finally:
        await origins.stop()
        await store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mib * MiB
    tmp = Path(tempfile.mkdtemp(prefix="noded-bench-"))
    os.chmod(tmp, 0o755)  # nginx workers run as nobody
    nginx: subprocess.Popen[bytes] | None = None
    try:
        www = tmp / "www"
        www.mkdir()
        md5 = make_blob(www / "big.bin", size)
        (www / "b").mkdir()
        os.replace(www / "big.bin", www / "b" / "big.bin")
        (www / "listing.xml").write_text(
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>'
            "<IsTruncated>false</IsTruncated><Contents><Key>big.bin</Key>"
            f"<ETag>&quot;{md5}&quot;</ETag><Size>{size}</Size></Contents></ListBucketResult>"
        )
        port = free_port()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port))
        nginx = subprocess.Popen(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)])
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        src = f"{url}/b/big.bin"
        subprocess.run(["cat", str(www / "b" / "big.bin")], stdout=subprocess.DEVNULL, check=True)  # warm cache
        out = tmp / "out.bin"
        # The serial baseline, one step after the other (timed per step to show where time goes).
        steps = [f"curl -sf -o {out} {src}", f"md5sum {out} >/dev/null", f"sha256sum {out} >/dev/null"]
        parts = [timed(step) for step in steps]
        t_serial = sum(parts)
        out.unlink()
        curl_runs: list[float] = []
        curl_cpus: list[float] = []
        noded_runs: list[tuple[float, float]] = []
        for r in range(args.rounds):
            curl_runs.append(timed(f"curl -sf -o {out} {src}", curl_cpus))
            out.unlink()
            t, got_md5, c = asyncio.run(noded_pull(tmp / f"round{r}", url))
            assert got_md5 == md5
            noded_runs.append((t, c))
            shutil.rmtree(tmp / f"round{r}")
        t_curl = statistics.median(curl_runs)
        curl_cpu = [statistics.median(curl_cpus)]
        t_noded = statistics.median(t for t, _ in noded_runs)
        noded_cpu = statistics.median(c for _, c in noded_runs)
        costs = hash_costs(www / "b" / "big.bin")
        cores = os.cpu_count() or 1
        floor_digests = max(costs["md5"], sum(costs.values()) / cores)
        floor = max(costs["md5"], (sum(costs.values()) + curl_cpu[0]) / cores)
        figures = {
            "bench": "pull",
            "size_bytes": size,
            "cores": os.cpu_count(),
            "curl_s": round(t_curl, 3),
            "serial_s": round(t_serial, 3),
            "serial_parts_s": [round(p, 3) for p in parts],
            "noded_s": round(t_noded, 3),
            "noded_MBps": round(size / t_noded / 1e6, 1),
            "ratio_vs_curl": round(t_noded / t_curl, 3),
            "ratio_vs_serial": round(t_noded / t_serial, 3),
            "noded_cpu_s": round(noded_cpu, 2),
            "hash_one_core_s": {k: round(v, 3) for k, v in costs.items()},
            "curl_cpu_s": round(curl_cpu[0], 3),
            "floor_digests_s": round(floor_digests, 3),
            "floor_digests_vs_curl": round(floor_digests / t_curl, 3),
            "floor_s": round(floor, 3),
            "floor_vs_curl": round(floor / t_curl, 3),
            # How close noded comes to the lower bound this machine sets for a verified copy.
            "ratio_vs_floor": round(t_noded / floor, 3),
            "rounds": args.rounds,
            "curl_runs_s": [round(t, 3) for t in curl_runs],
            "curl_cpu_runs_s": [round(c, 3) for c in curl_cpus],
            "noded_runs_s": [round(t, 3) for t, _ in noded_runs],
            "noded_cpu_runs_s": [round(c, 2) for _, c in noded_runs],
        }
        print(f"curl -o:                 {t_curl:7.2f} s")
        print(f"curl && md5sum && sha256: {t_serial:7.2f} s  (curl, md5sum, sha256sum: {parts})")
        print(f"noded cached+verified:   {t_noded:7.2f} s")
        print(f"ratio vs curl {figures['ratio_vs_curl']}, vs serial {figures['ratio_vs_serial']}")
        print(
            f"digests alone, one core each: {figures['hash_one_core_s']}; on {cores} cores with free I/O they "
            f"need >= {floor_digests:.2f} s = {floor_digests / t_curl:.2f}x curl; with curl's own "
            f"{curl_cpu[0]:.2f} CPU-s of receiving and writing >= {floor:.2f} s = {floor / t_curl:.2f}x curl; "
            f"noded used {noded_cpu:.2f} CPU-s"
        )
        print(json.dumps(figures))
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
