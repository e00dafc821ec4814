"""The real daemon (`python -m noded run`) pushing to moto's S3 server: crashes, outages, secrets."""

from __future__ import annotations

import hashlib
import itertools
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.core.authorization import enable_iam_authentication

from tests.conftest import NodedProcess, free_port, noded_factory  # noqa: F401 - fixture
from tests.r2_fixtures import (
    ACCESS_KEY,
    BUCKET,
    PREFIX,
    SECRET_KEY,
    CountingMotoServer,
    payload,
    prepare_state,
    r2_config,
    s3_client,
    s3server,  # noqa: F401 - fixture
    wait_for,
)

MiB = 1024**2
CREDS = {"R2_ACCESS_KEY_ID": ACCESS_KEY, "R2_SECRET_ACCESS_KEY": SECRET_KEY}


def status(p: NodedProcess) -> dict[str, Any]:
    code, body = p.get("/v1/status")
    assert code == 200, body
    return dict(body)


def make_node(factory: Any, tmp: Path, endpoint: str, files: dict[str, bytes], env: dict[str, str], **r2: Any) -> Any:
    node = factory("toronto", start=False, env=env, r2=r2_config(endpoint, **r2))
    prepare_state(tmp / "toronto" / "cache", tmp / "toronto" / "state", files)
    return node.start()


def assert_no_secret(p: NodedProcess, *extra: str) -> None:
    api = json.dumps(status(p))
    for text in (p.output(), api, *extra):
        assert SECRET_KEY not in text
        assert ACCESS_KEY not in text


def uploads(server: CountingMotoServer) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = (
        s3_client(server.endpoint).list_multipart_uploads(Bucket=BUCKET, Prefix=PREFIX).get("Uploads", [])
    )
    return got


def test_sigkill_during_multipart_then_restart_completes_and_leaves_no_upload(
    tmp_path: Path,
    noded_factory: Any,  # noqa: F811
    s3server: CountingMotoServer,  # noqa: F811
) -> None:
    data = payload(30 * MiB + 5, seed=21)
    srv = s3server.counting
    srv.rules.append(lambda r: 0.25 if r.op == "UploadPart" else None)  # slow parts: time to kill
    p = make_node(noded_factory, tmp_path, s3server.endpoint, {"big/file.parquet": data}, CREDS, max_concurrency=1)
    wait_for(lambda: len(srv.ops("UploadPart")) >= 2, what="two parts uploaded")
    p.kill()  # SIGKILL: no cleanup runs
    orphans = uploads(s3server)
    assert len(orphans) == 1 and orphans[0]["Key"] == PREFIX + "big/file.parquet"
    assert s3_client(s3server.endpoint).list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["KeyCount"] == 0

    srv.rules.clear()
    srv.clear()
    p.start()
    wait_for(lambda: status(p)["push_backlog"]["items"] == 0, timeout=60, what="push backlog empty")
    assert uploads(s3server) == []
    obj = s3_client(s3server.endpoint).get_object(Bucket=BUCKET, Key=PREFIX + "big/file.parquet")
    assert obj["Body"].read() == data
    assert obj["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    # The restart resumed the upload: only the parts R2 did not hold yet were sent again.
    [resumed] = [e for e in p.log_events() if e.get("event") == "r2.multipart_resumed"]
    assert resumed["parts"] == 7 and resumed["parts_done"] >= 1  # the part in flight at the kill may be lost
    assert len(srv.ops("UploadPart")) == 7 - resumed["parts_done"]
    assert srv.ops("CreateMultipartUpload") == [] and len(srv.ops("CompleteMultipartUpload")) == 1
    assert "r2.pushed" in [e.get("event") for e in p.log_events()]
    st = status(p)
    assert "r2" not in st["problems"] and st["components"]["r2"]["pushed"] == 1
    assert_no_secret(p)
    p.stop()


def test_wrong_credentials_keep_the_daemon_up_and_items_cached(
    tmp_path: Path,
    noded_factory: Any,  # noqa: F811
    s3server: CountingMotoServer,  # noqa: F811
) -> None:
    wrong = {"R2_ACCESS_KEY_ID": "AKIDWRONGWRONG0000", "R2_SECRET_ACCESS_KEY": "wrong-secret-VALUE-0123456789"}
    with enable_iam_authentication():  # moto now checks signatures against its (empty) IAM user list
        p = make_node(noded_factory, tmp_path, s3server.endpoint, {"a.csv": payload(1000)}, wrong, retry_initial=0.2)
        wait_for(
            lambda: len([e for e in p.log_events() if e.get("event") == "r2.unavailable"]) >= 4,
            timeout=30,
            what="four failed attempts",
        )
        st = status(p)
        reason = st["problems"]["r2"]
        assert "credentials" in reason and "403" in reason
        assert st["items"]["cached"] == 1 and st["push_backlog"] == {"items": 1, "bytes": 1000}
        assert st["components"]["r2"]["state"] == "backoff"
        delays = [e["retry_in"] for e in p.log_events() if e.get("event") == "r2.unavailable"]
        assert all(b > a for a, b in itertools.pairwise(delays)), delays  # backing off
        code, _ = p.get("/healthz")
        assert code == 200 and p.proc is not None and p.proc.poll() is None
        for secret in wrong.values():
            assert secret not in p.output() and secret not in json.dumps(status(p))
        assert_no_secret(p)
    assert s3_client(s3server.endpoint).list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0
    p.stop()


@pytest.fixture
def late_server() -> Iterator[tuple[int, list[CountingMotoServer]]]:
    port = free_port()
    servers: list[CountingMotoServer] = []
    yield port, servers
    for s in servers:
        s.stop()


def test_unreachable_endpoint_backs_off_then_recovers_when_r2_returns(
    tmp_path: Path,
    noded_factory: Any,  # noqa: F811
    late_server: tuple[int, list[CountingMotoServer]],
) -> None:
    port, servers = late_server
    endpoint = f"http://127.0.0.1:{port}"
    data = payload(2 * MiB, seed=22)
    p = make_node(noded_factory, tmp_path, endpoint, {"late.tif": data}, CREDS, retry_initial=0.2, retry_max=1.0)
    wait_for(lambda: "r2" in status(p)["problems"], what="problem reported")
    reason = status(p)["problems"]["r2"]
    assert "cannot reach R2" in reason and endpoint in reason
    wait_for(lambda: len([e for e in p.log_events() if e.get("event") == "r2.unavailable"]) >= 3, what="three attempts")
    assert status(p)["push_backlog"]["items"] == 1

    server = CountingMotoServer(port=port)
    server.start()
    servers.append(server)
    urllib.request.urlopen(urllib.request.Request(server.endpoint + "/moto-api/reset", method="POST")).read()
    s3_client(server.endpoint).create_bucket(Bucket=BUCKET)
    wait_for(lambda: status(p)["push_backlog"]["items"] == 0, timeout=30, what="pushed after recovery")
    assert "r2" not in status(p)["problems"]
    assert s3_client(server.endpoint).get_object(Bucket=BUCKET, Key=PREFIX + "late.tif")["Body"].read() == data
    assert "r2.recovered" in [e.get("event") for e in p.log_events()]
    assert_no_secret(p)
    p.stop()


def test_missing_credentials_are_reported_not_fatal(
    tmp_path: Path,
    noded_factory: Any,  # noqa: F811
    s3server: CountingMotoServer,  # noqa: F811
) -> None:
    p = make_node(noded_factory, tmp_path, s3server.endpoint, {"b.csv": payload(10)}, {"R2_ACCESS_KEY_ID": ""})
    st = status(p)
    assert "no R2 credentials" in st["problems"]["r2"] and "R2_SECRET_ACCESS_KEY" in st["problems"]["r2"]
    assert st["components"]["r2"]["state"] == "no-credentials"
    assert st["push_backlog"]["items"] == 1
    p.stop()
