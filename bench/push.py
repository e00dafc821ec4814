"""Benchmark: one file through noded's R2 pusher vs boto3's upload_file with default settings.

Both upload the same file to the same moto S3 server (a separate `moto_server` process on
127.0.0.1, so the server does not share this process's GIL) in the same run. The noded figure is the
wall time from the "cached" wake-up of a running pusher until the item is marked pushed (HEAD,
multipart upload with a CRC32 per part, confirming HEAD) for a copy verified moments before, as after
a pull; `--rehash-after 0` times a copy verified long ago, which is hashed again while it uploads. The
boto3 figure is one `upload_file` call on a ready client (CRC32 per part by default).
Rounds alternate which side goes first; the best time of each side counts. Prints a human summary, then ONE JSON
line: {"ratio_vs_boto3": noded throughput / boto3 throughput, ...}.

    /work/venv/bin/python bench/push.py [--size-mib 512] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from statistics import median

import boto3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from noded.cache.layout import CacheLayout, publish  # noqa: E402
from noded.core.component import Node  # noqa: E402
from noded.core.config import Config  # noqa: E402
from noded.core.model import CatalogEntry, State  # noqa: E402
from noded.core.store import Store  # noqa: E402
from noded.r2.push import R2Pusher  # noqa: E402

BUCKET = "bench"
KEY_ID, SECRET = "AKIDBENCH000000", "bench-secret-value-000000"
MiB = 1024**2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(port: int) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def make_file(path: Path, size: int) -> tuple[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            b = block[: min(left, len(block))]
            f.write(b)
            md5.update(b)
            sha.update(b)
            left -= len(b)
    return md5.hexdigest(), sha.hexdigest()


def cpu() -> float:
    """CPU seconds this process has used (all threads): the client's share of the 2 cores."""
    t = os.times()
    return t.user + t.system


def proc_cpu(pid: int) -> float:
    """CPU seconds a process has used (the S3 server's share of the 2 cores)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SERVER_PID = 0  # set in main(): the moto_server process


def run_boto3(endpoint: str, path: Path, key: str, cpus: list[float], server: list[float]) -> float:
    # Defaults on purpose (TransferConfig 8 MiB parts, 10 threads; default checksum behaviour).
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )
    t0, c0, s0 = time.perf_counter(), cpu(), proc_cpu(SERVER_PID)
    s3.upload_file(str(path), BUCKET, key)
    cpus.append(cpu() - c0)
    server.append(proc_cpu(SERVER_PID) - s0)
    return time.perf_counter() - t0


async def run_noded(
    endpoint: str,
    work: Path,
    data: Path,
    md5: str,
    sha256: str,
    size: int,
    prefix: str,
    r2_extra: dict[str, object],
    cpus: list[float],
    server: list[float],
) -> float:
    cfg = Config.model_validate(
        {
            "node": {"name": "bench", "region": "bench"},
            "paths": {"cache_dir": str(work / "cache"), "state_dir": str(work / "state")},
            "cache": {"budget": "10GB"},
            "r2": {
                "enabled": True,
                "endpoint": endpoint,
                "bucket": BUCKET,
                "prefix": prefix,
                "region": "us-east-1",
                **r2_extra,
            },
        }
    )
    os.environ["R2_ACCESS_KEY_ID"], os.environ["R2_SECRET_ACCESS_KEY"] = KEY_ID, SECRET
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    layout.ensure()
    node = Node(cfg=cfg, store=store)
    pusher = R2Pusher(node)
    # A running daemon has its client and first pass behind it when an item is published.
    await pusher.start()
    while pusher.status()["state"] != "idle":
        if "r2" in node.problems:
            raise RuntimeError(node.problems["r2"])
        await asyncio.sleep(0.01)
    item, _ = await store.run(
        store.upsert_entry, CatalogEntry("inbox", "bench/file.bin", (), size=size, md5=md5, sha256=sha256)
    )
    partial = layout.partial_path(item.id, item.version)
    os.link(data, partial)  # same bytes, no copy
    st = publish(partial, layout.final_path(item.key))
    # As the pull pipeline leaves a row it has just verified: checksums, mtime and the time of hashing.
    await store.run(
        store.set_state,
        item.id,
        State.CACHED,
        size=size,
        md5=md5,
        sha256=sha256,
        mtime_ns=st.st_mtime_ns,
        verified_at=time.time(),
    )
    t0, c0, s0 = time.perf_counter(), cpu(), proc_cpu(SERVER_PID)
    node.notify("cached")  # what the pull pipeline does after publishing
    while True:
        got = await store.run(store.get_item, item.id)
        if got is not None and got.pushed:
            break
        if "r2" in node.problems:
            raise RuntimeError(node.problems["r2"])
        await node.wait("pushed", 0.5)
    elapsed = time.perf_counter() - t0
    cpus.append(cpu() - c0)
    server.append(proc_cpu(SERVER_PID) - s0)
    await pusher.stop()
    await store.close()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--part-size-mib", type=int, help="override r2.part_size (default: noded's default)")
    ap.add_argument("--concurrency", type=int, help="override r2.max_concurrency (default: noded's default)")
    ap.add_argument("--skip-boto3", action="store_true", help="only time noded (for tuning; no ratio)")
    ap.add_argument(
        "--rehash-after",
        type=float,
        help="override r2.rehash_after; 0 re-hashes the file while uploading (a copy verified long ago)",
    )
    args = ap.parse_args()
    size = args.size_mib * MiB
    r2_extra: dict[str, object] = {}
    if args.part_size_mib:
        r2_extra["part_size"] = args.part_size_mib * MiB
    if args.concurrency:
        r2_extra["max_concurrency"] = args.concurrency
    if args.rehash_after is not None:
        r2_extra["rehash_after"] = args.rehash_after
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="noded-bench-push-"))
    moto = start_moto(port)
    global SERVER_PID
    SERVER_PID = moto.pid
    try:
        admin = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
        )
        admin.create_bucket(Bucket=BUCKET)
        admin.put_object(Bucket=BUCKET, Key="warmup", Body=b"w" * MiB)  # first-request costs out of the timings
        data = work / "data.bin"
        md5, sha256 = make_file(data, size)
        boto_times, noded_times = [], []
        boto_cpu: list[float] = []
        noded_cpu: list[float] = []
        boto_server: list[float] = []
        noded_server: list[float] = []
        for r in range(args.rounds):

            def boto() -> None:
                if not args.skip_boto3:
                    boto_times.append(run_boto3(endpoint, data, f"boto3/{r}/file.bin", boto_cpu, boto_server))
                    admin.delete_object(Bucket=BUCKET, Key=f"boto3/{r}/file.bin")

            if r % 2 == 0:
                boto()
            noded_times.append(
                asyncio.run(
                    run_noded(
                        endpoint,
                        work / f"n{r}",
                        data,
                        md5,
                        sha256,
                        size,
                        f"noded/{r}/",
                        r2_extra,
                        noded_cpu,
                        noded_server,
                    )
                )
            )
            if r % 2 == 1:
                boto()
            head = admin.head_object(Bucket=BUCKET, Key=f"noded/{r}/bench/file.bin")
            assert head["ContentLength"] == size and head["Metadata"]["sha256"] == sha256
            admin.delete_object(Bucket=BUCKET, Key=f"noded/{r}/bench/file.bin")
    finally:
        moto.kill()
        moto.wait()
        shutil.rmtree(work, ignore_errors=True)
    n = min(noded_times)
    b = min(boto_times) if boto_times else float("nan")
    mb = size / 1e6
    print(f"boto3.upload_file (defaults): {b:.2f} s  {mb / b:.1f} MB/s   (runs: {[round(t, 2) for t in boto_times]})")
    print(f"noded R2 pusher (defaults):  {n:.2f} s  {mb / n:.1f} MB/s   (runs: {[round(t, 2) for t in noded_times]})")
    print(
        f"client CPU seconds (median): boto3 {median(boto_cpu) if boto_cpu else float('nan'):.2f}, "
        f"noded {median(noded_cpu):.2f}; server CPU seconds (median): "
        f"boto3 {median(boto_server) if boto_server else float('nan'):.2f}, noded {median(noded_server):.2f}"
    )
    print(f"ratio noded/boto3: {b / n:.2f}x")
    print(
        json.dumps(
            {
                "bench": "push",
                "bytes": size,
                "rounds": args.rounds,
                "boto3_seconds": round(b, 3),
                "noded_seconds": round(n, 3),
                "boto3_MBps": round(mb / b, 1),
                "noded_MBps": round(mb / n, 1),
                "boto3_client_cpu_s": round(median(boto_cpu), 2) if boto_cpu else None,
                "noded_client_cpu_s": round(median(noded_cpu), 2),
                "boto3_server_cpu_s": round(median(boto_server), 2) if boto_server else None,
                "noded_server_cpu_s": round(median(noded_server), 2),
                "ratio_vs_boto3": round(b / n, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
