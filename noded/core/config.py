"""TOML -> frozen, validated settings.

Every problem is reported at once, each naming its key (and the line where it can be found) and what
is expected, so an operator fixes a config in one round. Unknown keys are errors: a typo must never be
silently ignored. Schema checks (pydantic) are separate from checks of the machine (directories,
filesystem size, ports), which `check_environment` performs.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import shutil
import socket
import stat
import tomllib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from noded.core.quota import read_system_quota
from noded.core.units import parse_rate, parse_size

EX_CONFIG = 78  # sysexits.h: configuration error; systemd's RestartPreventExitStatus uses it


def _http_url(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
    return v.rstrip("/")


def _root_url(v: str) -> str:
    """An origin's site root: noded appends the API paths itself, so a path would be doubled."""
    v = _http_url(v)
    parts = urlsplit(v)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"expected the site's root URL such as https://{parts.hostname} "
            f"(no path: noded adds the API paths), got {v!r}"
        )
    return v


_IA_IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _ia_identifier(v: str) -> str:
    if not _IA_IDENT_RE.match(v):
        raise ValueError(f"expected an archive.org identifier (letters, digits, '.', '_', '-'; no spaces), got {v!r}")
    return v


def _host_port(v: str) -> str:
    host, sep, port = v.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port (e.g. 203.0.113.7:6881), got {v!r}")
    return v


def _ip(v: str) -> str:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise ValueError(f"expected an IP address such as 127.0.0.1 or ::1, got {v!r}") from None
    return v


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _name(v: str) -> str:
    if not _NAME_RE.match(v):
        raise ValueError(f"expected a lowercase name of letters, digits, '-' or '_' (max 63), got {v!r}")
    return v


ByteSize = Annotated[int, BeforeValidator(parse_size)]
Rate = Annotated[int | None, BeforeValidator(parse_rate)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
RootUrl = Annotated[str, AfterValidator(_root_url)]
IaIdentifier = Annotated[str, AfterValidator(_ia_identifier)]
HostPort = Annotated[str, AfterValidator(_host_port)]
IPAddr = Annotated[str, AfterValidator(_ip)]
Name = Annotated[str, AfterValidator(_name)]
Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=7 * 86400)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class NodeConfig(_Section):
    name: Name
    region: str = Field(min_length=1, max_length=64)


class PathsConfig(_Section):
    cache_dir: Path
    state_dir: Path


class CacheConfig(_Section):
    budget: ByteSize
    high_watermark: float = Field(0.95, gt=0, le=1)
    low_watermark: float = Field(0.85, gt=0, le=1)
    free_space_floor: ByteSize = 1_000_000_000
    # The most the node may keep on the cache's filesystem, for a quota the system does not report
    # (statvfs shows a shared filesystem's free space, not the user's quota). None: no such limit.
    quota: ByteSize | None = None
    # How often disk accounting is refreshed and the watermarks checked (also woken by events).
    check_interval: Seconds = 10.0
    # An origin listing older than this no longer counts as a durable copy for eviction.
    listing_max_age: Seconds = 86400.0
    # `noded verify` and daemon re-verification read at most this many bytes per second.
    verify_rate: ByteSize = 200_000_000
    # Watch the cache directory for files deleted or changed behind noded's back.
    watch_cache: bool = True

    @model_validator(mode="after")
    def _order(self) -> CacheConfig:
        if self.low_watermark >= self.high_watermark:
            raise ValueError("low_watermark must be below high_watermark")
        if self.budget <= 0:
            raise ValueError("budget must be positive")
        if self.quota is not None and self.quota <= 0:
            raise ValueError("quota must be positive")
        return self


class ApiConfig(_Section):
    bind: IPAddr = "127.0.0.1"
    port: Port = 8470
    max_body_bytes: ByteSize = 64 * 1024
    # The bearer token for write endpoints: a systemd credential of this name, else this env var.
    token_credential: str = "api-token"  # noqa: S105 - a name, not a secret
    token_env: str = "NODED_API_TOKEN"  # noqa: S105 - a name, not a secret
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])


class HttpMirrorConfig(_Section):
    enabled: bool = True
    bind: IPAddr = "127.0.0.1"
    port: Port = 8471
    # URL path prefix the published web-seed URLs put before the key (e.g. "/processed"); "" = none.
    strip_prefix: str = Field("", pattern=r"^(/[A-Za-z0-9._~-]+)*$")


class LogConfig(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class SourceCoopConfig(_Section):
    enabled: bool = False
    # Path-style S3 endpoint: the data.source.coop proxy (or any S3-compatible host with `bucket` set).
    endpoint: RootUrl = "https://data.source.coop"
    bucket: str = ""  # empty with the proxy: the account is the first path segment
    prefixes: list[str] = Field(default_factory=list)
    max_keys_per_page: int = Field(1000, ge=1, le=1000)
    # Key an object by its dataset name: the bucket key without its first segment (the product), so
    # `<account>/<product>/<name>` is the item `<name>` that Zenodo, IA and the torrents also list.
    strip_product: bool = True

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str, info: ValidationInfo) -> str:
        host = urlsplit(str(info.data.get("endpoint", ""))).hostname or ""
        if not v and host.endswith("opendata.source.coop"):
            raise ValueError(
                f'bucket = "" only works with the data.source.coop proxy (account as the first prefix segment); '
                f'{host} needs the bucket named, or use endpoint = "https://data.source.coop"'
            )
        return v

    @field_validator("prefixes")
    @classmethod
    def _prefixes(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("bucket"):
            return v
        if info.data.get("enabled") and not v:
            raise ValueError('with bucket = "" name at least one "account/product/" prefix')
        for p in v:
            segments = p.lstrip("/").split("/")
            if len(segments) < 2 or not segments[0] or not segments[1]:
                raise ValueError(
                    f'with bucket = "" a prefix is "account/product/..." (e.g. "dataforcanada/ca-orthoimagery-labs/"); '
                    f"{p!r} names no account and product (an account alone lists only its products)"
                )
        return v


class ZenodoConfig(_Section):
    enabled: bool = False
    base_url: RootUrl = "https://zenodo.org"
    records: list[int] = Field(default_factory=list)
    concepts: list[int] = Field(default_factory=list)
    communities: list[str] = Field(default_factory=list)
    requests_per_minute: int = Field(60, ge=1, le=10_000)
    # Zenodo's search endpoints (community listings) allow fewer requests than record GETs.
    search_requests_per_minute: int = Field(30, ge=1, le=10_000)
    # Zenodo blocks clients above 2 connections (fetch.max_connections_per_host still caps it).
    max_connections_per_host: int = Field(2, ge=1, le=64)


class InternetArchiveConfig(_Section):
    enabled: bool = False
    base_url: RootUrl = "https://archive.org"
    identifiers: list[IaIdentifier] = Field(default_factory=list)
    # Whole collections, listed through the scrape API (every identifier in them is mirrored).
    collections: list[IaIdentifier] = Field(default_factory=list)
    include_derivatives: bool = False
    # Files the Archive generates about an item (not datasets; _files.xml never matches its own md5).
    skip_suffixes: list[str] = Field(
        default_factory=lambda: ["_files.xml", "_meta.xml", "_meta.sqlite", "__ia_thumb.jpg", "_reviews.xml"]
    )
    requests_per_minute: int = Field(60, ge=1, le=10_000)


class StacConfig(_Section):
    enabled: bool = False
    # Static catalogs (a Catalog or Collection JSON whose child/item links are followed on the same host,
    # an Item, or an ItemCollection) and stac-geoparquet files, read over HTTP.
    catalogs: list[HttpUrl] = Field(default_factory=list)
    geoparquet: list[HttpUrl] = Field(default_factory=list)
    skip_roles: list[str] = Field(default_factory=lambda: ["thumbnail", "overview", "metadata"])
    max_documents: int = Field(10_000, ge=1)  # catalog JSON documents followed per refresh


class InboxConfig(_Section):
    enabled: bool = True
    dir: Path = Path("inbox")
    stable_seconds: Seconds = 5.0
    # While some process still holds the file open, it must be stable this long instead (a writer stalled by
    # the kernel looks idle; a close event publishes at once either way).
    open_grace: Seconds = 60.0


class TorrentImportConfig(_Section):
    files: list[Path] = Field(default_factory=list)
    magnets: list[str] = Field(default_factory=list)


class R2OriginConfig(_Section):
    enabled: bool = False


class OriginsConfig(_Section):
    refresh_interval: Seconds = 3600.0
    # Order in which origins are tried for a pull; healthy ones not listed follow.
    preference: list[str] = Field(default_factory=lambda: ["sourcecoop", "r2", "zenodo", "ia"])
    max_items_per_origin: int = Field(200_000, ge=1)
    max_item_size: ByteSize = 5 * 1000**4
    max_page_bytes: ByteSize = 64 * 1024**2  # one listing page (XML/JSON) larger than this is refused
    failed_retry_after: Seconds = 3600.0  # a failed item becomes wanted again after this long
    # An item no location publishes a checksum for (size only) is neither pulled nor published.
    require_checksum: bool = False
    sourcecoop: SourceCoopConfig = SourceCoopConfig()
    zenodo: ZenodoConfig = ZenodoConfig()
    ia: InternetArchiveConfig = InternetArchiveConfig()
    stac: StacConfig = StacConfig()
    inbox: InboxConfig = InboxConfig()
    torrents: TorrentImportConfig = TorrentImportConfig()
    r2: R2OriginConfig = R2OriginConfig()

    @model_validator(mode="after")
    def _known(self) -> OriginsConfig:
        known = {"sourcecoop", "zenodo", "ia", "stac", "inbox", "torrents", "r2", "peer"}
        bad = [p for p in self.preference if p not in known]
        if bad:
            raise ValueError(f"preference names unknown origins {bad}; known: {sorted(known)}")
        return self


class FetchConfig(_Section):
    max_concurrent_items: int = Field(4, ge=1, le=256)
    max_items_per_origin: int = Field(2, ge=1, le=256)
    max_connections_per_host: int = Field(4, ge=1, le=64)
    # At least 64 KiB: 0 would send "Range: bytes=0--1", tiny ones a request per few bytes.
    segment_size: Annotated[ByteSize, Field(ge=64 * 1024)] = 64 * 1024**2
    segments_per_item: int = Field(4, ge=1, le=64)
    # An item listed at several HTTP locations (with a checksum to check the whole) takes its segments
    # from all of them at once, each location up to segments_per_item connections (and its host's cap).
    multi_location: bool = True
    connect_timeout: Seconds = 15.0
    read_timeout: Seconds = 60.0
    max_attempts: int = Field(8, ge=1, le=100)
    # First retry wait and its cap (exponential with jitter); Retry-After from a server overrides them.
    retry_initial: Seconds = 1.0
    retry_max: Seconds = 300.0
    # Consecutive failures after which a whole host is backed off; a longer wait makes a pull try the next origin.
    host_failure_threshold: int = Field(3, ge=1, le=100)
    host_backoff_max_wait: Seconds = 120.0
    # A host's Retry-After/X-RateLimit wait up to this long holds its items in the queue (never FAILED);
    # a longer one is logged and the item tries its other locations (or fails and is retried later).
    max_retry_after: Seconds = 3600.0
    # Retries, waits and stalls of one host or URL are logged at most this often.
    log_interval: Seconds = 30.0
    # How long a node waits for the rendezvous owner of an item before pulling from the origin itself.
    peer_wait: Seconds = 600.0
    user_agent: str = "noded (+https://github.com/dataforcanada; Data for Canada Smart Node)"


class R2Config(_Section):
    enabled: bool = False
    endpoint: HttpUrl = "https://ACCOUNT.r2.cloudflarestorage.com"
    bucket: str = "dataforcanada"
    prefix: str = ""
    region: str = "auto"
    public_url: HttpUrl | None = None
    # Names, not values: the secrets come from $CREDENTIALS_DIRECTORY/<name> or the environment.
    access_key_id_credential: str = "r2-access-key-id"
    secret_access_key_credential: str = "r2-secret-access-key"  # noqa: S105 - a name, not a secret
    access_key_id_env: str = "R2_ACCESS_KEY_ID"
    secret_access_key_env: str = "R2_SECRET_ACCESS_KEY"  # noqa: S105 - a name, not a secret
    multipart_threshold: ByteSize = 64 * 1024**2
    # Each part carries an x-amz-checksum-crc32 header the store verifies on arrival ("none": only
    # the whole-file sha256 check before completing; for S3-compatible stores that refuse the header).
    part_checksum: Literal["crc32", "none"] = "crc32"
    # A copy hashed and found right less than this long ago, whose file's mtime is unchanged since,
    # is uploaded without hashing it again; an older one is re-hashed while it uploads so bit rot never
    # completes into R2. 0: always re-hash.
    rehash_after: float = Field(3600.0, ge=0, le=30 * 86400)
    # Parts in flight across all uploads (8 MiB x 10 measured fastest against the S3 test server).
    max_concurrency: int = Field(10, ge=1, le=64)
    create_only: bool = False
    # Smallest part size used; larger files get larger parts so no upload needs more than 10,000.
    part_size: ByteSize = 8 * 1024**2
    # Bytes of parts held in memory at once (parts grow with the file: ~500 MiB at 4.9 TiB).
    max_buffer_bytes: ByteSize = 256 * 1024**2
    # Items uploaded at once; their parts share the max_concurrency request slots.
    max_concurrent_items: int = Field(2, ge=1, le=64)
    # "path" works with every S3-compatible store (R2, MinIO, moto); "virtual" uses bucket.host.
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    connect_timeout: Seconds = 10.0
    read_timeout: Seconds = 120.0
    # botocore's own quick retries per request (throttling, 5xx) before the pusher backs off.
    request_attempts: int = Field(3, ge=1, le=20)
    # Pusher backoff after R2 outages (5xx, auth, connection): doubles from initial up to max.
    retry_initial: Seconds = 2.0
    retry_max: Seconds = 600.0
    # How often the pusher rescans the store without a "cached" wake-up.
    rescan_interval: Seconds = 300.0
    # Multipart uploads under the prefix older than this are garbage, whoever started them (0: only ours).
    stale_upload_age: float = Field(2 * 86400.0, ge=0)

    @model_validator(mode="after")
    def _parts(self) -> R2Config:
        mib, gib = 1024**2, 1024**3
        if not 5 * mib <= self.part_size <= 5 * gib:
            raise ValueError("part_size must be between 5 MiB and 5 GiB (the S3/R2 part limits)")
        if not 5 * mib <= self.multipart_threshold <= 5 * gib:
            raise ValueError("multipart_threshold must be between 5 MiB and 5 GiB (a single PUT holds at most 5 GiB)")
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must not be below retry_initial")
        if self.prefix.startswith("/"):
            raise ValueError("prefix must not start with '/'")
        return self


class PeerConfig(_Section):
    name: Name
    api_url: HttpUrl
    bittorrent: HostPort


class SeedTargetConfig(_Section):
    name: Name
    bittorrent: HostPort
    http_url: HttpUrl | None = None


class BitTorrentConfig(_Section):
    enabled: bool = True
    listen_interfaces: str = "0.0.0.0:6881"
    dht: bool = False
    lsd: bool = False
    upnp: bool = False
    natpmp: bool = False
    utp: bool = False  # uTP caps throughput on fast links (17.5 MB/s measured vs 250+ MB/s TCP)
    trackers: list[HttpUrl] = Field(default_factory=list)
    # BEP 19 web seeds; {name} is the file name, {key} the item key.
    web_seed_templates: list[str] = Field(default_factory=list)
    source_tag: str = "Data for Canada"
    resume_save_interval: Seconds = 300.0
    # Adopt every item a peer holds that this node has never seen: keeps the Smart Nodes' caches in sync.
    mirror_peers: bool = True
    # How often each peer's /v1/inventory is polled.
    peer_poll_interval: Seconds = 30.0
    # One poll of one peer (every inventory page) must end within this, or the peer counts as failing;
    # each peer is polled on its own, so a slow one delays nobody else.
    peer_poll_timeout: Seconds = 60.0
    # A peer download that makes no progress for this long is abandoned (the origins are tried next).
    peer_stall_timeout: Seconds = 60.0
    # How often every seeded torrent is offered to the seed targets (connect_peer).
    seed_target_interval: Seconds = 60.0
    # The host:port BitTorrent clients reach this node at (x.pe= in magnets), when it differs from the
    # listen address: a port allocated behind NAT or a proxy. Empty: the listen address when it names
    # one host, else none.
    public_address: str = ""
    # DHT routers a node with `dht = true` joins through (host:port).
    dht_bootstrap_nodes: list[str] = Field(
        default_factory=lambda: [
            "dht.libtorrent.org:25401",
            "router.bittorrent.com:6881",
            "dht.transmissionbt.com:6881",
        ]
    )
    # How long `noded add` waits for a magnet's or infohash's metadata from the swarm.
    metadata_timeout: Seconds = 120.0

    @model_validator(mode="after")
    def _listen(self) -> BitTorrentConfig:
        for part in self.listen_interfaces.split(","):
            _host_port(part.strip())
        if self.public_address:
            try:
                _host_port(self.public_address)
            except ValueError as e:
                raise ValueError(f"public_address: {e}") from None
        for n in self.dht_bootstrap_nodes:
            try:
                _host_port(n)
            except ValueError as e:
                raise ValueError(f"dht_bootstrap_nodes: {e}") from None
        for t in self.web_seed_templates:
            if "{name}" not in t and "{key}" not in t:
                raise ValueError(f"web_seed_templates entry {t!r} has neither {{name}} nor {{key}}")
            _http_url(t.replace("{name}", "x").replace("{key}", "x"))
        return self


class VolunteerConfig(_Section):
    """A small node that holds what the network is closest to losing, down to single pieces."""

    enabled: bool = False
    # Bytes of pieces to hold; 0: the cache budget times its low watermark.
    budget: ByteSize = 0
    # Seconds between decisions (counts gathered, selection made, piece priorities applied).
    interval: Seconds = 60.0
    # Seconds between tracker scrapes of every catalogue torrent.
    scrape_interval: Seconds = 300.0
    # A held piece competes as if it had this many fewer copies: 0.5 moves a copy only where the minimum
    # rises (to a piece with two fewer copies in all); larger values tolerate noisier counts, lower minimum.
    hysteresis: float = Field(0.5, ge=0, le=100)
    # Status and the dashboard count items with fewer copies than this.
    copies_target: int = Field(3, ge=1, le=1000)
    # Upload cap in bytes/s for a volunteer's BitTorrent traffic (0: unlimited); the timetable may lower it.
    upload_limit: ByteSize = 2_000_000
    # Operator priorities: item key prefix -> weight (2.0 aims for twice the copies, 0 never holds it).
    priorities: dict[str, float] = Field(default_factory=dict)
    # Scrape trackers on 127.0.0.1 too (private fleets and tests): turns off libtorrent's SSRF mitigation,
    # which lets a localhost tracker be asked only for /announce.
    allow_local_trackers: bool = False

    @model_validator(mode="after")
    def _weights(self) -> VolunteerConfig:
        bad = {k: v for k, v in self.priorities.items() if not 0 <= v <= 1000}
        if bad:
            raise ValueError(f"priorities must be weights from 0 to 1000, got {bad}")
        return self

    def weight(self, key: str) -> float:
        """The weight of the longest matching prefix (1.0 when none matches)."""
        best, w = -1, 1.0
        for prefix, v in self.priorities.items():
            if key.startswith(prefix) and len(prefix) > best:
                best, w = len(prefix), v
        return w


_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def parse_days(spec: str) -> frozenset[int]:
    """'mon-fri', 'sat,sun', 'all' -> weekday numbers (Monday = 0)."""
    spec = spec.strip().lower()
    if spec in ("all", "*", "daily"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, _, hi = part.partition("-")
        if lo not in _DAYS or (hi and hi not in _DAYS):
            raise ValueError(f"expected days like 'mon-fri' or 'sat,sun', got {spec!r}")
        a, b = _DAYS.index(lo), _DAYS.index(hi or lo)
        out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(out)


def parse_hours(spec: str) -> frozenset[int]:
    """'08-18' (start inclusive, end exclusive; may wrap midnight), '22-06', 'all'."""
    spec = spec.strip().lower()
    if spec in ("all", "*"):
        return frozenset(range(24))
    m = re.fullmatch(r"(\d{1,2})\s*-\s*(\d{1,2})", spec)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 24 or m.group(1) == m.group(2):
        raise ValueError(f"expected hours like '08-18' or '22-06' (0-24), got {spec!r}")
    a, b = int(m.group(1)), int(m.group(2)) % 24
    return frozenset(range(a, b) if a < b else [*range(a, 24), *range(0, b)])


class ScheduleSlot(_Section):
    days: str
    hours: str
    down: Rate = None
    up: Rate = None

    @model_validator(mode="after")
    def _parse(self) -> ScheduleSlot:
        parse_days(self.days)
        parse_hours(self.hours)
        return self


class ScheduleConfig(_Section):
    timezone: str = "UTC"
    default_down: Rate = None
    default_up: Rate = None
    slots: list[ScheduleSlot] = Field(default_factory=list)

    @model_validator(mode="after")
    def _tz(self) -> ScheduleConfig:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {self.timezone!r}") from None
        return self


class ProbeConfig(_Section):
    enabled: bool = True
    interval: Seconds = 60.0
    timeout: Seconds = 10.0
    jitter: float = Field(0.1, ge=0, le=1)
    fail_threshold: int = Field(3, ge=1, le=100)
    success_threshold: int = Field(2, ge=1, le=100)
    slow_seconds: Seconds = 2.0


class ReportsConfig(_Section):
    per_client_per_hour: int = Field(10, ge=1, le=10_000)
    # All clients together: many addresses cannot flood the moderation queue either.
    per_hour_total: int = Field(500, ge=1, le=1_000_000)
    max_open: int = Field(10_000, ge=1)

    @model_validator(mode="after")
    def _totals(self) -> ReportsConfig:
        if self.per_hour_total < self.per_client_per_hour:
            raise ValueError(
                f"per_hour_total ({self.per_hour_total}) is below per_client_per_hour ({self.per_client_per_hour})"
            )
        return self


class TrafficConfig(_Section):
    flush_interval: Seconds = 10.0  # how often counters are written into the hourly buckets
    retention_days: int = Field(30, ge=1, le=366)  # hourly buckets older than this are pruned
    quiet_hours: int = Field(6, ge=1, le=24)  # how many hours of the coming day /v1/traffic advises


class Config(_Section):
    node: NodeConfig
    paths: PathsConfig
    cache: CacheConfig
    api: ApiConfig = ApiConfig()
    http_mirror: HttpMirrorConfig = HttpMirrorConfig()
    log: LogConfig = LogConfig()
    origins: OriginsConfig = OriginsConfig()
    fetch: FetchConfig = FetchConfig()
    r2: R2Config = R2Config()
    peers: list[PeerConfig] = Field(default_factory=list)
    seed_targets: list[SeedTargetConfig] = Field(default_factory=list)
    bittorrent: BitTorrentConfig = BitTorrentConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    probe: ProbeConfig = ProbeConfig()
    reports: ReportsConfig = ReportsConfig()
    traffic: TrafficConfig = TrafficConfig()
    volunteer: VolunteerConfig = VolunteerConfig()

    @model_validator(mode="after")
    def _unique(self) -> Config:
        if self.volunteer.enabled and not self.bittorrent.enabled:
            raise ValueError("volunteer.enabled needs bittorrent.enabled: the swarm is where a volunteer gets pieces")
        if self.volunteer.budget > self.cache.budget:
            raise ValueError("volunteer.budget must not exceed cache.budget")
        names = [p.name for p in self.peers] + [s.name for s in self.seed_targets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"peer/seed target names must be unique; repeated: {dup}")
        if self.node.name in names:
            raise ValueError(f"node.name {self.node.name!r} is also listed as a peer")
        return self

    @property
    def inbox_dir(self) -> Path:
        return self.origins.inbox.dir


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"{self.key}{where}: {self.message}"


class ConfigError(Exception):
    """Raised with every problem found; `str()` lists them one per line."""

    def __init__(self, problems: list[Problem], path: Path | None = None) -> None:
        self.problems = problems
        self.path = path
        super().__init__("\n".join(str(p) for p in problems))


def _line_index(text: str) -> dict[str, int]:
    """Map dotted key paths to the line that defines them (best effort; arrays of tables get [i])."""
    index: dict[str, int] = {}
    table: list[str] = []
    counters: dict[str, int] = {}
    key_re = re.compile(r'^\s*("?)([A-Za-z0-9_.-]+)\1\s*=')
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("[["):
            name = line.strip("[] ")
            counters[name] = counters.get(name, -1) + 1
            table = [*name.split("."), str(counters[name])]
            index.setdefault(".".join(table), lineno)
            index.setdefault(name, lineno)
        elif line.startswith("["):
            table = line.strip("[] ").split(".")
            index.setdefault(".".join(table), lineno)
        else:
            m = key_re.match(raw)
            if m:
                index.setdefault(".".join([*table, *m.group(2).split(".")]), lineno)
    return index


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in the file are relative to the file's directory, not the caller's cwd."""

    def fix(section: dict[str, Any] | None, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            p = Path(section[key]).expanduser()
            section[key] = str(p if p.is_absolute() else (base / p))

    paths = data.get("paths")
    fix(paths, "cache_dir")
    fix(paths, "state_dir")
    origins = data.get("origins")
    if isinstance(origins, dict):
        inbox = origins.get("inbox")
        if isinstance(inbox, dict):
            fix(inbox, "dir")
        torrents = origins.get("torrents")
        if isinstance(torrents, dict) and isinstance(torrents.get("files"), list):
            torrents["files"] = [
                str(Path(f) if Path(f).is_absolute() else base / f) if isinstance(f, str) else f
                for f in torrents["files"]
            ]
    # A relative inbox dir defaults under the state dir's parent when not given.
    if isinstance(paths, dict) and isinstance(paths.get("state_dir"), str):
        origins = data.setdefault("origins", {})
        if isinstance(origins, dict):
            inbox = origins.setdefault("inbox", {})
            if isinstance(inbox, dict) and "dir" not in inbox:
                inbox["dir"] = str(Path(paths["state_dir"]).parent / "inbox")


def parse_config(text: str, source: Path | None = None) -> Config:
    base = source.parent.resolve() if source else Path.cwd()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ConfigError([Problem("<file>", f"not valid TOML: {e}", int(m.group(1)) if m else None)], source) from None
    _resolve_paths(data, base)
    lines = _line_index(text)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = [str(x) for x in err["loc"]]
            key = ".".join(loc) or "<root>"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see config.example.toml)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            # The line of the key itself, else of its nearest enclosing table.
            line = None
            for i in range(len(loc), 0, -1):
                line = lines.get(".".join(loc[:i]))
                if line:
                    break
            problems.append(Problem(key, msg, line))
        raise ConfigError(problems, source) from None


MAX_CONFIG_BYTES = 4 * 1024 * 1024


def _read_config_file(path: Path) -> str:
    """The file's text; only a regular file is read (a FIFO or a device would block or never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError([Problem("<file>", f"{path} is not a regular file")], path)
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError([Problem("<file>", f"{path} is larger than {MAX_CONFIG_BYTES} bytes")], path)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
    finally:
        os.close(fd)


def load_config(path: Path) -> Config:
    try:
        text = _read_config_file(path)
    except FileNotFoundError:
        raise ConfigError([Problem("<file>", f"config file {path} does not exist")], path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem("<file>", f"cannot read {path}: {e}")], path) from None
    return parse_config(text, path)


def config_warnings(path: Path) -> list[str]:
    """What is allowed but unwise about the config file itself."""
    out = []
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if st.st_mode & stat.S_IWOTH:
            out.append(
                f"{path} is world-writable (mode {stat.S_IMODE(st.st_mode):o}): any local user could change "
                f"what this node fetches, serves and where it pushes; chmod o-w it"
            )
    return out


def _check_dir(key: str, path: Path) -> Iterable[Problem]:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        yield Problem(key, f"cannot create directory {path}: {e.strerror}")
        return
    if not os.access(path, os.W_OK | os.X_OK):
        yield Problem(key, f"directory {path} is not writable by this user (uid {os.getuid()})")


def _check_port(key: str, bind: str, port: int) -> Iterable[Problem]:
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError as e:
            why = "already in use" if e.errno == errno.EADDRINUSE else e.strerror
            yield Problem(key, f"cannot listen on {bind}:{port}: {why}")


def _check_quota(cfg: Config) -> Iterable[Problem]:
    """The budget against the quotas: the configured one, and the user's as the system reports it."""
    c = cfg.cache
    if c.quota is not None and c.budget > c.quota:
        yield Problem("cache.budget", f"{c.budget} bytes is larger than cache.quota ({c.quota} bytes)")
    system = read_system_quota(cfg.paths.cache_dir)
    if system is not None and c.budget > system.limit:
        yield Problem(
            "cache.budget",
            f"{c.budget} bytes is larger than the disk quota of {cfg.paths.cache_dir}: "
            f"{system.limit} bytes, {system.used} in use ({system.source})",
        )


# What the state directory holds itself: an inbox there must not be (or be inside) one of these.
STATE_ENTRIES = ("noded.sqlite3", "noded.sqlite3-wal", "noded.sqlite3-shm", "noded.lock", "torrents", "resume")


def _inside(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b)


def check_layout(cfg: Config) -> Iterable[Problem]:
    """The cache, state and inbox directories must not be one another or inside one another (with the
    cache's partial area inside the cache): a dataset named like the database would replace it, the
    inbox would swallow published files. An inbox in its own subdirectory of the state directory is
    the one nesting allowed. Paths are compared resolved (symlinks followed)."""
    cache, state = cfg.paths.cache_dir.resolve(), cfg.paths.state_dir.resolve()
    if _inside(cache, state) or _inside(state, cache):
        how = "is" if cache == state else "overlaps"
        yield Problem("paths.state_dir", f"{state} {how} paths.cache_dir ({cache}); give each its own directory")
    if not cfg.origins.inbox.enabled:
        return
    inbox = cfg.origins.inbox.dir.resolve()
    if _inside(inbox, cache) or _inside(cache, inbox):
        yield Problem("origins.inbox.dir", f"{inbox} overlaps paths.cache_dir ({cache}); give each its own directory")
    if _inside(state, inbox):
        yield Problem("origins.inbox.dir", f"{inbox} is or contains paths.state_dir ({state})")
    elif inbox.is_relative_to(state) and inbox.relative_to(state).parts[0] in STATE_ENTRIES:
        yield Problem("origins.inbox.dir", f"{inbox} is one of paths.state_dir's own entries")


def check_environment(
    cfg: Config, *, check_ports: bool = True, held: Collection[tuple[str, int]] = ()
) -> list[Problem]:
    """Checks against this machine: directories, filesystem capacity, listening ports. `held` are the
    (bind, port) pairs the daemon running on this configuration's state directory listens on: in use,
    but by the process this configuration is for."""
    problems: list[Problem] = list(check_layout(cfg))
    problems += _check_dir("paths.cache_dir", cfg.paths.cache_dir)
    problems += _check_dir("paths.state_dir", cfg.paths.state_dir)
    if cfg.origins.inbox.enabled:
        problems += _check_dir("origins.inbox.dir", cfg.origins.inbox.dir)
    if cfg.paths.cache_dir.is_dir():
        total = shutil.disk_usage(cfg.paths.cache_dir).total
        if cfg.cache.budget > total:
            problems.append(
                Problem(
                    "cache.budget",
                    f"{cfg.cache.budget} bytes is larger than the filesystem of {cfg.paths.cache_dir} ({total} bytes)",
                )
            )
        if cfg.cache.free_space_floor >= total:
            problems.append(
                Problem(
                    "cache.free_space_floor",
                    f"{cfg.cache.free_space_floor} bytes is not below the size of the filesystem of "
                    f"{cfg.paths.cache_dir} ({total} bytes): nothing could ever be fetched",
                )
            )
        problems += _check_quota(cfg)
    for f in cfg.origins.torrents.files:
        if not f.is_file():
            problems.append(Problem("origins.torrents.files", f"torrent file {f} does not exist"))
    if check_ports:
        if (cfg.api.bind, cfg.api.port) not in held:
            problems += _check_port("api.port", cfg.api.bind, cfg.api.port)
        if cfg.http_mirror.enabled and (cfg.http_mirror.bind, cfg.http_mirror.port) not in held:
            problems += _check_port("http_mirror.port", cfg.http_mirror.bind, cfg.http_mirror.port)
            if (cfg.http_mirror.bind, cfg.http_mirror.port) == (cfg.api.bind, cfg.api.port):
                problems.append(Problem("http_mirror.port", "must differ from api.port"))
    return problems


def load_and_check(path: Path, *, check_ports: bool = True, held: Collection[tuple[str, int]] = ()) -> Config:
    cfg = load_config(path)
    problems = check_environment(cfg, check_ports=check_ports, held=held)
    if problems:
        lines = _line_index(_read_config_file(path))
        raise ConfigError([Problem(p.key, p.message, p.line or lines.get(p.key)) for p in problems], path)
    return cfg


def read_secret(credential: str, env: str) -> str | None:
    """A secret from $CREDENTIALS_DIRECTORY/<credential> (systemd LoadCredential=), else env var."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and credential:
        p = Path(cred_dir) / credential
        try:
            return p.read_text(encoding="utf-8").strip() or None
        except OSError:
            pass
    value = os.environ.get(env) if env else None
    return value.strip() if value and value.strip() else None
