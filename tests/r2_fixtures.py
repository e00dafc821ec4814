"""An S3 wire server for the R2 tests: moto's app behind a WSGI middleware that counts real requests.

The middleware sees every HTTP request the server receives (from the daemon subprocess too), can
delay some (to SIGKILL a daemon mid-upload) and can answer some with R2's overload reply (503
SlowDown, S3 XML) before moto sees them.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3
import botocore.config
import pytest
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from noded.cache.layout import CacheLayout, publish
from noded.core.model import CatalogEntry, Item, State
from noded.core.store import Store

ACCESS_KEY = "AKIDNODEDTEST123456"
SECRET_KEY = "s3cr3t-NODED-test-value-9f8e7d6c"
BUCKET = "dataforcanada"
PREFIX = "mirror/"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    length: int
    op: str
    headers: dict[str, str] = field(default_factory=dict)  # x-amz-*, content-encoding (lower-case names)
    body: bytes = b""  # kept for CompleteMultipartUpload only (small XML)
    start: float = 0.0
    end: float = 0.0  # when the server finished handling it (0 while in flight)


def s3_op(method: str, path: str, query: dict[str, list[str]]) -> str:
    """The S3 operation name of a request, from its method, path and query (path-style addressing)."""
    on_object = path.strip("/").count("/") >= 1
    if "uploadId" in query:
        if method == "PUT":
            return "UploadPart"
        return {"POST": "CompleteMultipartUpload", "DELETE": "AbortMultipartUpload", "GET": "ListParts"}.get(
            method, method
        )
    if "uploads" in query:
        return "CreateMultipartUpload" if method == "POST" else "ListMultipartUploads"
    if not on_object:
        return {"GET": "ListObjects", "PUT": "CreateBucket", "HEAD": "HeadBucket"}.get(method, method)
    return {"PUT": "PutObject", "GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method, method)


Rule = Callable[[Request], "tuple[int, str] | float | None"]


@dataclass
class CountingApp:
    app: Any
    requests: list[Request] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        headers = {
            k[5:].replace("_", "-").lower(): str(v)
            for k, v in environ.items()
            if k.startswith("HTTP_X_AMZ_") or k == "HTTP_CONTENT_ENCODING"
        }
        req = Request(method, path, query, int(environ.get("CONTENT_LENGTH") or 0), s3_op(method, path, query), headers)
        if req.op == "CompleteMultipartUpload":
            req.body = environ["wsgi.input"].read(req.length)
            environ["wsgi.input"] = io.BytesIO(req.body)
        if not path.startswith("/moto-api"):
            with self.lock:
                self.requests.append(req)
        for rule in list(self.rules):
            action = rule(req)
            if isinstance(action, float | int) and not isinstance(action, bool) and action > 0:
                time.sleep(action)
            elif isinstance(action, tuple):
                status, code = action
                environ["wsgi.input"].read(req.length)  # drain the body like a real server
                body = (
                    f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{code}</Message></Error>"
                )
                start_response(f"{status} {code}", [("Content-Type", "application/xml")])
                return [body.encode()]
        req.start = time.monotonic()
        out = self.app(environ, start_response)
        req.end = time.monotonic()
        return out

    def ops(self, *names: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if not names or r.op in names]

    def max_overlap(self, *names: str) -> int:
        """Most requests of these kinds the server was handling at the same moment."""
        events = sorted(
            [(r.start, 1) for r in self.ops(*names)] + [(r.end, -1) for r in self.ops(*names)],
            key=lambda e: (e[0], e[1]),
        )
        cur = best = 0
        for _, d in events:
            cur += d
            best = max(best, cur)
        return best

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()


class CountingMotoServer(ThreadedMotoServer):
    def __init__(self, port: int = 0) -> None:
        super().__init__(ip_address="127.0.0.1", port=port, verbose=False)
        self.counting = CountingApp(DomainDispatcherApplication(create_backend_app))

    def _server_entry(self) -> None:
        self._server = make_server(
            self._ip_address, self._port, self.counting, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"


def s3_client(endpoint: str, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=botocore.config.Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


@pytest.fixture
def s3server() -> Iterator[CountingMotoServer]:
    server = CountingMotoServer()
    server.start()
    # moto's backends are global to the process: start every test from an empty S3.
    urllib.request.urlopen(urllib.request.Request(server.endpoint + "/moto-api/reset", method="POST")).read()
    s3_client(server.endpoint).create_bucket(Bucket=BUCKET)
    server.counting.clear()
    try:
        yield server
    finally:
        server.counting.rules.clear()
        server.stop()


@pytest.fixture
def r2_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"R2_ACCESS_KEY_ID": ACCESS_KEY, "R2_SECRET_ACCESS_KEY": SECRET_KEY}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return env


def r2_config(endpoint: str, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "enabled": True,
        "endpoint": endpoint,
        "bucket": BUCKET,
        "prefix": PREFIX,
        "region": "us-east-1",
        "multipart_threshold": "5MiB",
        "part_size": "5MiB",
        "max_concurrency": 4,
        "retry_initial": 0.2,
        "retry_max": 2.0,
        "request_attempts": 1,
        "connect_timeout": 2.0,
        "read_timeout": 10.0,
    }
    cfg.update(overrides)
    return cfg


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking test bytes."""
    out = bytearray()
    block = hashlib.sha256(f"noded-{seed}".encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def add_cached_item(
    store: Store,
    layout: CacheLayout,
    key: str,
    data: bytes,
    *,
    md5: str | None = None,
    verified_at: float | None = None,
) -> Item:
    """The real contract for a cached item: a store row in state cached with its checksums, and the
    verified bytes published under the final path (`verified_at`: when they were hashed; None: unknown)."""
    layout.ensure()
    sha256 = hashlib.sha256(data).hexdigest()
    md5 = md5 or hashlib.md5(data).hexdigest()
    item, _ = store.upsert_entry(CatalogEntry(origin="inbox", key=key, urls=(), size=len(data), md5=md5, sha256=sha256))
    partial = layout.partial_path(item.id, item.version)
    partial.write_bytes(data)
    st = publish(partial, layout.final_path(key))
    return store.set_state(
        item.id,
        State.CACHED,
        size=len(data),
        md5=md5,
        sha256=sha256,
        disk_bytes=st.st_blocks * 512,
        mtime_ns=st.st_mtime_ns,
        verified_at=verified_at,
    )


def prepare_state(cache_dir: Path, state_dir: Path, files: dict[str, bytes]) -> dict[str, Item]:
    store = Store(state_dir / "noded.sqlite3")
    store.open_sync()
    try:
        layout = CacheLayout(cache_dir, state_dir)
        return {k: add_cached_item(store, layout, k, v) for k, v in files.items()}
    finally:
        store.close_sync()


def wait_for(pred: Callable[[], Any], timeout: float = 30, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def read_all(path: Path) -> bytes:
    return Path(os.fspath(path)).read_bytes()
