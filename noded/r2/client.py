"""boto3 for R2 (or any S3-compatible store), on its own executor, with R2's compatibility settings.

boto3 >= 1.36 adds an aws-chunked CRC32 trailer to uploads by default; R2 rejects it with a misleading
"Unauthorized", so checksums are only sent when an operation requires them. Credentials come from
systemd credentials or the environment, are registered with the log scrubber at once, and are never
part of a repr, a log line or the status API.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Literal, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from noded.core.config import R2Config, read_secret
from noded.core.counters import Traffic
from noded.core.logs import register_secret

T = TypeVar("T")
CHANNEL = "r2"


class MissingCredentials(Exception):
    pass


@dataclass(frozen=True)
class R2Credentials:
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)

    def __repr__(self) -> str:
        return "R2Credentials(***)"


def load_credentials(cfg: R2Config) -> R2Credentials:
    key_id = read_secret(cfg.access_key_id_credential, cfg.access_key_id_env)
    secret = read_secret(cfg.secret_access_key_credential, cfg.secret_access_key_env)
    register_secret(key_id)
    register_secret(secret)
    if not key_id or not secret:
        missing = []
        if not key_id:
            missing.append(f"$CREDENTIALS_DIRECTORY/{cfg.access_key_id_credential} or ${cfg.access_key_id_env}")
        if not secret:
            missing.append(f"$CREDENTIALS_DIRECTORY/{cfg.secret_access_key_credential} or ${cfg.secret_access_key_env}")
        raise MissingCredentials("no R2 credentials: set " + " and ".join(missing))
    return R2Credentials(key_id, secret)


def client_config(cfg: R2Config, max_pool: int) -> botocore.config.Config:
    return botocore.config.Config(
        region_name=cfg.region,
        signature_version="s3v4",
        # Bodies carry a checksum header (Content-MD5 on single PUTs, CRC32 on parts) and R2 is reached
        # over TLS: hashing every body again for the signature (botocore's default without TLS) would
        # only cost CPU.
        s3={"addressing_style": cfg.addressing_style, "payload_signing_enabled": False},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": cfg.request_attempts, "mode": "standard"},
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        max_pool_connections=max_pool,
        user_agent_extra="noded",
    )


class SentCounter:
    """A request body that reports the bytes the HTTP connection sent from it, so a part that fails
    midway counts what went out, not its length. The connection reads a block, sends it, and comes back
    for the next: a block counts once the next is asked for (or the end is reached). A rewind (botocore
    retries a request from the start) drops the block in hand, whose fate is unknown. A server that
    refuses the body after `Expect: 100-continue` makes the connection read without sending; S3 and
    R2 answer 100 first."""

    BLOCK = 256 * 1024

    def __init__(self, body: bytes | bytearray | IO[bytes], on_sent: Callable[[int], None]) -> None:
        self._f: IO[bytes] = io.BytesIO(body) if isinstance(body, bytes | bytearray) else body
        self._on_sent = on_sent
        self._in_hand = 0

    def read(self, size: int | None = -1) -> bytes:
        if self._in_hand:
            self._on_sent(self._in_hand)
        block = self._f.read(max(size, self.BLOCK) if size is not None and size >= 0 else -1)
        self._in_hand = len(block)
        return block

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._in_hand = 0
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


Kind = Literal["outage", "conflict", "missing", "item"]


@dataclass(frozen=True)
class R2Failure:
    """What an exception from boto3 means for the pusher."""

    kind: Kind  # outage: R2 as a whole is unusable now (back off); the others concern one object
    reason: str
    status: int | None = None


_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Unauthorized", "InvalidToken"}
_BUSY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "TooManyRequests"}


def classify(exc: BaseException, endpoint: str, bucket: str) -> R2Failure:
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        msg = str(err.get("Message") or "").strip()
        detail = f"{status} {code}" + (f": {msg}" if msg else "")
        if code in _AUTH_CODES or status in (401, 403):
            return R2Failure("outage", f"R2 rejected our credentials ({detail}); check the R2 access key", status)
        if code in _BUSY_CODES or (status is not None and status >= 500) or status == 429:
            return R2Failure("outage", f"R2 is failing or overloaded ({detail})", status)
        if code == "NoSuchBucket":
            return R2Failure("outage", f"bucket {bucket!r} does not exist at {endpoint}", status)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return R2Failure("conflict", f"an object appeared at this key meanwhile ({detail})", status)
        if code in ("404", "NoSuchKey", "NoSuchUpload", "NotFound") or status == 404:
            return R2Failure("missing", f"not found ({detail})", status)
        return R2Failure("item", f"R2 refused the request ({detail})", status)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return R2Failure("outage", "no R2 credentials")
    if isinstance(exc, botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError | OSError):
        return R2Failure("outage", f"cannot reach R2 at {endpoint}: {type(exc).__name__}")
    return R2Failure("item", f"{type(exc).__name__}: {exc}")


class R2Client:
    """One S3 client (thread-safe) and a dedicated pool of threads that run its blocking calls."""

    def __init__(self, cfg: R2Config, creds: R2Credentials, traffic: Traffic, *, threads: int | None = None) -> None:
        self.cfg = cfg
        self.traffic = traffic
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix
        threads = threads or cfg.max_concurrency + 4  # parts in flight, plus HEADs and listings
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="r2")
        # An own session: boto3's default session is not safe to share between threads.
        session = boto3.session.Session()
        self.s3: Any = session.client(
            "s3",
            endpoint_url=cfg.endpoint,
            aws_access_key_id=creds.access_key_id,
            aws_secret_access_key=creds.secret_access_key,
            config=client_config(cfg, threads),
        )
        # Count every HTTP attempt (botocore's own retries included) and the body bytes it really sent.
        self.s3.meta.events.register("before-send.s3", self._count_request)

    def _count_request(self, request: Any, **_: Any) -> None:
        self.traffic.add(CHANNEL, "out", 0, requests=1)
        body = request.body
        if body and not isinstance(body, SentCounter):
            request.body = SentCounter(body, self._count_sent)

    def _count_sent(self, n: int) -> None:
        self.traffic.add(CHANNEL, "out", n)

    def object_key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def item_key(self, object_key: str) -> str | None:
        return object_key[len(self.prefix) :] if object_key.startswith(self.prefix) else None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking boto3 call on the R2 threads; a failure is counted as an error."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))
        except Exception:
            self.traffic.add(CHANNEL, "out", 0, errors=1)
            raise

    def failure(self, exc: BaseException) -> R2Failure:
        return classify(exc, self.cfg.endpoint, self.bucket)

    def presign(self, method: Literal["get_object", "head_object"], object_key: str, expires: int = 3600) -> str:
        """A signed URL (local computation, no request) for plain HTTP clients."""
        url: str = self.s3.generate_presigned_url(
            method, Params={"Bucket": self.bucket, "Key": object_key}, ExpiresIn=expires
        )
        return url

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.s3.close()
