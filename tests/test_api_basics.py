"""API skeleton over a real socket: JSON answers, 4xx for bad requests, never a 500; secrets never logged."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

from tests.conftest import NodedProcess, base_config, http_json, write_config


def _raw(
    node: NodedProcess, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    host, port = node.api.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.headers.get_content_type(), r.read()
    finally:
        c.close()


def test_endpoints_and_errors(noded_factory) -> None:  # type: ignore[no-untyped-def]
    node = noded_factory()
    status, body = node.get("/healthz")
    assert status == 200 and body["status"] == "ok"
    assert set(body) == {"status", "instance"}
    status, body = node.get("/readyz")
    assert status == 200 and body["ready"] is True

    status, st = node.get("/v1/status")
    assert status == 200
    assert st["node"] == "toronto"
    assert st["cache"]["budget_bytes"] == 10**9
    assert set(st["items"]) >= {"wanted", "fetching", "cached", "evicted", "failed", "quarantined"}
    assert st["components"]["store"]["state"] == "running"
    assert st["uptime_seconds"] >= 0

    # Unknown path, wrong method: JSON 404 / 405.
    for method, path, code in (("GET", "/nope", 404), ("DELETE", "/v1/status", 405)):
        status, ctype, raw = _raw(node, method, path)
        assert status == code and ctype == "application/json", raw
        assert json.loads(raw)["error"]["status"] == code

    # Oversized body on an endpoint that reads one: 413 JSON (limit from config, default 64 KiB).
    status, ctype, raw = _raw(
        node, "POST", "/v1/reports", body=b"x" * 200_000, headers={"Content-Type": "application/json"}
    )
    assert status == 413 and ctype == "application/json", raw
    assert "too large" in json.loads(raw)["error"]["message"]
    # Malformed JSON: 400 JSON.
    status, ctype, raw = _raw(
        node, "POST", "/v1/reports", body=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert status == 400 and ctype == "application/json", raw

    # Malformed request line / header: 4xx, the server stays up.
    host, port = node.api.removeprefix("http://").split(":")
    import socket

    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        reply = s.recv(200)
    # aiohttp answers protocol errors itself (before any handler): a 400, never a 500 or a hang.
    assert reply.split(b" ")[1] == b"400", reply
    assert node.get("/healthz")[0] == 200

    # CORS for GET so dashboards elsewhere can read.
    status, _, _ = _raw(node, "OPTIONS", "/v1/status", headers={"Origin": "https://dash.example"})
    assert status == 204
    assert node.stop() == 0


def test_secret_never_reaches_logs_or_api(tmp_path: Path) -> None:
    secret = "s3cr3t-T0ken-value-9f8e7d"
    r2_secret = "R2-SECRET-abcdef0123456789"
    cfg = write_config(tmp_path, base_config(tmp_path))
    node = NodedProcess(
        cfg, env={"NODED_API_TOKEN": secret, "R2_SECRET_ACCESS_KEY": r2_secret, "R2_ACCESS_KEY_ID": "AKIDEXAMPLE123"}
    ).start()
    try:
        # Requests that carry or guess the token, and a status read.
        http_json(node.api + "/v1/status", headers={"Authorization": f"Bearer {secret}"})
        http_json(node.api + f"/nope?token={secret}")
        _, st = node.get("/v1/status")
        assert secret not in json.dumps(st) and r2_secret not in json.dumps(st)
        assert node.stop() == 0
    finally:
        node.kill()
    out = node.output()
    assert out.strip(), "the daemon logged nothing"
    assert secret not in out
    assert r2_secret not in out


def test_logging_scrubs_registered_secrets(capsys) -> None:  # type: ignore[no-untyped-def]
    from noded.core import logs

    logs.configure("json", "info", secrets=["hunter2-but-longer"])
    log = logs.get_logger("t")
    log.info(
        "x.event", url="https://u:hunter2-but-longer@host/", api_token="abc123456", nested={"p": "hunter2-but-longer"}
    )
    try:
        raise RuntimeError("failed with hunter2-but-longer")
    except RuntimeError:
        log.exception("x.failed")
    out = capsys.readouterr().out
    import structlog

    structlog.reset_defaults()
    assert "hunter2-but-longer" not in out
    assert "abc123456" not in out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines[0]["event"] == "x.event" and lines[0]["api_token"] == "***"
