"""`noded demo`: a local origin and two nodes on loopback in a temporary directory, for a newcomer.

One command, no external service: it generates a few datasets, serves them from a Zenodo-shaped
origin inside this process, starts two `noded run` processes (toronto and amsterdam) that know the
origin and each other, prints the dashboard URLs and follows the items until both nodes hold them.
Ctrl-C stops everything and removes the directory (unless --keep).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import ClientSession, ClientTimeout, web

from noded.cli.main import EXTRA_COMMANDS
from noded.core.units import format_size, parse_size

RECORD_ID = 4242
NODES = ("toronto", "amsterdam")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def generate_datasets(directory: Path, count: int, size: int, seed: int = 7) -> dict[str, Path]:
    """Deterministic files of pseudo-random bytes (the same on every run, so infohashes repeat)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out: dict[str, Path] = {}
    for i in range(count):
        name = f"demo-dataset-{i + 1}.bin"
        path = directory / name
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 20)
                f.write(rng.randbytes(n))
                left -= n
        out[name] = path
    return out


def _md5(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 - Zenodo publishes md5, the origin shape needs it
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


PROBE_RANGE_MAX = 64 * 1024  # a request for a range this small is a mirror probe, not a pull


class OriginState:
    """What the demo origin has published and what it has served."""

    def __init__(self) -> None:
        self.published = False  # the record lists its files only once both nodes are up
        self.pulled: dict[str, int] = {}  # bytes sent to pulls, per file
        self.probed = 0  # bytes sent to small range probes

    def count(self, name: str, nbytes: int, ranged: bool) -> None:
        if ranged and nbytes <= PROBE_RANGE_MAX:
            self.probed += nbytes
        else:
            self.pulled[name] = self.pulled.get(name, 0) + nbytes


def origin_app(files: dict[str, Path], base_url: str, state: OriginState | None = None) -> web.Application:
    """The parts of Zenodo's API the catalog and the fetcher use: the record JSON and file content.

    With a `state`, the record lists no files until `state.published`, and content bytes are counted, so
    the demo can show that each dataset was pulled from the origin once and replicated peer to peer.
    """
    sums = {n: _md5(p) for n, p in files.items()}
    st = state or OriginState()
    if state is None:
        st.published = True

    async def record(request: web.Request) -> web.Response:
        if request.match_info["rid"] != str(RECORD_ID):
            return web.json_response({"status": 404, "message": "PID does not exist."}, status=404)
        return web.json_response(
            {
                "id": RECORD_ID,
                "recid": str(RECORD_ID),
                "metadata": {"title": "noded demo datasets", "publication_date": "2025-01-01"},
                "files": [
                    {
                        "id": hashlib.sha1(n.encode()).hexdigest(),  # noqa: S324 - an id, not security
                        "key": n,
                        "size": p.stat().st_size,
                        "checksum": f"md5:{sums[n]}",
                        "links": {"self": f"{base_url}/api/records/{RECORD_ID}/files/{n}/content"},
                    }
                    for n, p in files.items()
                    if st.published
                ],
                "links": {"self": f"{base_url}/api/records/{RECORD_ID}"},
            }
        )

    async def content(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info["name"])
        if path is None:
            return web.json_response({"status": 404, "message": "not found"}, status=404)
        # FileResponse answers Range requests and sends the file with sendfile.
        return web.FileResponse(path, headers={"ETag": f'"md5:{sums[path.name]}"'})

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        name = request.match_info.get("name")
        if name in files and request.method == "GET" and response.status in (200, 206):
            st.count(name, response.content_length or 0, "Range" in request.headers)

    async def root(request: web.Request) -> web.Response:
        return web.json_response({"links": {"records": f"{base_url}/api/records"}})

    app = web.Application()
    app.on_response_prepare.append(count)
    app.router.add_get("/", root)
    app.router.add_get("/api/records/{rid}", record)
    app.router.add_get("/api/records/{rid}/files/{name}/content", content)
    return app


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))


def node_config(root: Path, name: str, ports: dict[str, dict[str, int]], origin_url: str) -> str:
    me = ports[name]
    lines = [
        "[node]",
        f"name = {_toml(name)}",
        'region = "demo"',
        "[paths]",
        f"cache_dir = {_toml(root / name / 'cache')}",
        f"state_dir = {_toml(root / name / 'state')}",
        "[cache]",
        'budget = "2GB"',
        'free_space_floor = "10MB"',
        "[api]",
        'bind = "127.0.0.1"',
        f"port = {me['api']}",
        "[http_mirror]",
        'bind = "127.0.0.1"',
        f"port = {me['http']}",
        "[log]",
        'format = "json"',
        'level = "info"',
        "[origins]",
        "refresh_interval = 30.0",
        'preference = ["peer", "zenodo"]',
        "[origins.zenodo]",
        "enabled = true",
        f"base_url = {_toml(origin_url)}",
        f"records = [{RECORD_ID}]",
        "[origins.inbox]",
        f"dir = {_toml(root / name / 'inbox')}",
        "[fetch]",
        "peer_wait = 20.0",
        "[bittorrent]",
        "peer_poll_interval = 1.0",  # a demo wants to see replication within seconds
        f'listen_interfaces = "127.0.0.1:{me["bt"]:d}"',
        "[probe]",
        "interval = 5.0",
        "timeout = 3.0",
        "[traffic]",
        "flush_interval = 5.0",
    ]
    for other, p in ports.items():
        if other != name:
            lines += [
                "[[peers]]",
                f"name = {_toml(other)}",
                f'api_url = "http://127.0.0.1:{p["api"]:d}"',
                f'bittorrent = "127.0.0.1:{p["bt"]:d}"',
            ]
    return "\n".join(lines) + "\n"


async def _get_json(session: ClientSession, url: str) -> Any:
    async with session.get(url) as r:
        return await r.json() if r.status < 500 or r.content_type == "application/json" else None


async def _wait_ready(session: ClientSession, api: str, proc: asyncio.subprocess.Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"node exited with status {proc.returncode}")
        with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError):
            body = await _get_json(session, api + "/readyz")
            if isinstance(body, dict) and body.get("ready"):
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"node at {api} not ready after {timeout:.0f} s")


@dataclass
class Demo:
    root: Path
    files: dict[str, Path]
    ports: dict[str, dict[str, int]]
    origin_port: int
    configs: dict[str, Path]
    logs: dict[str, BinaryIO]

    @property
    def origin_url(self) -> str:
        return f"http://127.0.0.1:{self.origin_port}"


def prepare(args: argparse.Namespace, size: int) -> Demo:
    """Everything that touches the disk before the loop starts: datasets, configs, log files."""
    root = Path(args.dir).resolve() if args.dir else Path(tempfile.mkdtemp(prefix="noded-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"noded demo: working in {root}")
    files = generate_datasets(root / "origin", args.items, size)
    print(f"noded demo: generated {len(files)} datasets of {format_size(size)} each")
    ports = {n: {"api": _free_port(), "http": _free_port(), "bt": _free_port()} for n in NODES}
    origin_port = _free_port()
    configs: dict[str, Path] = {}
    logs: dict[str, BinaryIO] = {}
    for name in NODES:
        cfg = root / name / "config.toml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(node_config(root, name, ports, f"http://127.0.0.1:{origin_port}"))
        configs[name] = cfg
        logs[name] = open(root / name / "noded.log", "ab")  # noqa: SIM115 - closed by cmd_demo
    return Demo(root, files, ports, origin_port, configs, logs)


async def run_demo(args: argparse.Namespace, demo: Demo) -> int:
    origin = OriginState()
    runner = web.AppRunner(origin_app(demo.files, demo.origin_url, origin), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", demo.origin_port).start()
    print(f"noded demo: Zenodo-shaped origin at {demo.origin_url}/api/records/{RECORD_ID}")
    procs: dict[str, asyncio.subprocess.Process] = {}
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    token = secrets.token_urlsafe(24)
    env["NODED_API_TOKEN"] = token  # lets the demo ask both nodes to refresh their catalog
    rc = 1
    try:
        for name in NODES:
            log = demo.logs[name]
            procs[name] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "noded", "-c", str(demo.configs[name]), "run", stdout=log, stderr=log, env=env
            )
        async with ClientSession(timeout=ClientTimeout(total=5)) as session:
            for name in NODES:
                api = f"http://127.0.0.1:{demo.ports[name]['api']}"
                await _wait_ready(session, api, procs[name], 30)
                print(f"noded demo: {name} ready; dashboard {api}/  (log {demo.root / name / 'noded.log'})")
            # Publish only now that both nodes are up: each dataset is pulled from the origin by the node
            # that ranks first for it (rendezvous hashing) and reaches the other over BitTorrent.
            origin.published = True
            for name in NODES:
                api = f"http://127.0.0.1:{demo.ports[name]['api']}"
                async with session.post(api + "/v1/catalog/refresh", headers={"Authorization": f"Bearer {token}"}) as r:
                    if r.status >= 400:
                        print(f"noded demo: {name} refused the catalog refresh: HTTP {r.status}")
            print(f"noded demo: published {len(demo.files)} datasets at the origin")
            rc = await _follow(session, demo.ports, len(demo.files), args.timeout)
            total = sum(p.stat().st_size for p in demo.files.values())
            pulled = sum(origin.pulled.values())
            print(
                f"noded demo: the origin served {pulled} bytes to pulls for {total} bytes of datasets "
                f"({pulled / total if total else 0:.2f}x; 1.00x means each was fetched from it exactly once), "
                f"plus {origin.probed} bytes to mirror probes"
            )
            if not args.no_wait:
                print("noded demo: running; press Ctrl-C to stop")
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                await asyncio.wait_for(p.wait(), 15)
            except TimeoutError:
                p.kill()
                await p.wait()
        await runner.cleanup()
    return rc


async def _follow(session: ClientSession, ports: dict[str, dict[str, int]], want: int, timeout: float) -> int:
    """Print progress until every node caches every dataset; 0 when replicated, 1 on timeout."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        cached: dict[str, int] = {}
        mirrors: dict[str, str] = {}
        for name in NODES:
            api = f"http://127.0.0.1:{ports[name]['api']}"
            try:
                st = await _get_json(session, api + "/v1/status")
            except (TimeoutError, OSError, ValueError):
                st = None
            cached[name] = int(st["items"].get("cached", 0)) if isinstance(st, dict) else -1
            if isinstance(st, dict):
                mirrors[name] = ", ".join(f"{m['name']} {m['status']}" for m in st.get("mirrors", []))
        line = "  ".join(f"{n}: {c}/{want} cached, mirrors [{mirrors.get(n, '?')}]" for n, c in cached.items())
        if line != last:
            print(f"noded demo: {line}")
            last = line
        if all(c >= want for c in cached.values()):
            print("noded demo: every dataset is on both nodes")
            return 0
        if time.monotonic() > deadline:
            print(
                f"noded demo: not replicated after {timeout:.0f} s. If no node pulled anything, this build has no "
                "pull pipeline (origins component); the nodes, probes, traffic and dashboard still run."
            )
            return 1
        await asyncio.sleep(1.0)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=3, help="how many datasets to generate (default 3)")
    p.add_argument("--size", default="8MiB", help="size of each dataset (default 8MiB)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for replication (default 120)")
    p.add_argument("--dir", help="work here instead of a new temporary directory (kept afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--no-wait", action="store_true", help="exit once replicated or timed out (no Ctrl-C wait)")


def cmd_demo(args: argparse.Namespace) -> int:
    if not 1 <= args.items <= 100:
        print("noded demo: --items must be between 1 and 100", file=sys.stderr)
        return 2
    try:
        size = parse_size(args.size)
    except ValueError as e:
        print(f"noded demo: --size: {e}", file=sys.stderr)
        return 2
    if not 1 <= size <= 4 * 1024**3:
        print("noded demo: --size must be between 1 byte and 4GiB", file=sys.stderr)
        return 2
    demo = prepare(args, size)
    try:
        return asyncio.run(run_demo(args, demo))
    except KeyboardInterrupt:
        return 130
    finally:
        for log in demo.logs.values():
            log.close()
        if args.keep or args.dir:
            print(f"noded demo: kept {demo.root}")
        else:
            shutil.rmtree(demo.root, ignore_errors=True)


EXTRA_COMMANDS["demo"] = (
    "start a local origin and two nodes on loopback in a temporary directory and watch them replicate",
    _add_arguments,
    cmd_demo,
)
