"""Cache sub-commands: `noded pin KEY`, `noded unpin KEY`, `noded evict --dry-run`, `noded verify`.

pin/unpin go through the running node's API (bearer token from the same credential the daemon uses).
`evict --dry-run` asks the running node (it knows which items are in use) and falls back to reading
the store directly when the node is down. `verify` works on the store and the cache directly, so it
also runs while the daemon is stopped; it is resumable (checkpoints in the store).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import sys
import urllib.parse
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from noded.cli.main import EX_UNAVAILABLE, EXTRA_COMMANDS, _table, api_call, load_or_exit
from noded.core.config import Config, read_secret
from noded.core.units import format_size, parse_rate

if TYPE_CHECKING:
    from noded.cache.accounting import Cache


def _log_to_stderr(cfg: Config) -> None:
    """Commands that work in-process print their results on stdout; their log lines go to stderr."""
    import structlog

    from noded.core.logs import configure

    configure("console" if cfg.log.format == "auto" else cfg.log.format, cfg.log.level)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


def _quoted(key: str) -> str:
    return urllib.parse.quote(key, safe="/")


def _token(cfg: Config) -> str:
    token = read_secret(cfg.api.token_credential, cfg.api.token_env)
    if not token:
        print(
            f"noded: no API token: set ${cfg.api.token_env} or the systemd credential {cfg.api.token_credential}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return token


# -- pin / unpin ---------------------------------------------------------------------------------
def _pin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("key", help="item key (path under the cache root)")
    p.add_argument("--json", action="store_true", help="print the item as JSON")


def _pin(args: argparse.Namespace, pinned: bool) -> int:
    cfg = load_or_exit(args, check_env=False)
    item = api_call(args, "POST" if pinned else "DELETE", f"/v1/items/{_quoted(args.key)}/pin", token=_token(cfg))
    if args.json:
        print(json.dumps(item, indent=2))
    else:
        print(
            f"{'pinned' if item['pinned'] else 'unpinned'} {item['key']} (version {item['version']}, {item['state']})"
        )
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    return _pin(args, True)


def cmd_unpin(args: argparse.Namespace) -> int:
    return _pin(args, False)


# -- evict --dry-run -----------------------------------------------------------------------------
def _evict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="print the plan and why each item is (not) evictable")
    p.add_argument("--limit", type=int, default=1000, help="items to list, least recently used first (default 1000)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--offline", action="store_true", help="read the store directly even if the node is running")


@contextlib.asynccontextmanager
async def _offline_cache(cfg: Config) -> AsyncIterator[Cache]:
    """The cache component over the node's store, not started: for commands run beside (or without) the daemon."""
    from noded.cache.accounting import Cache
    from noded.core.component import Node
    from noded.core.store import Store

    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    try:
        yield Cache(Node(cfg=cfg, store=store))
    finally:
        await store.close()


async def _offline_plan(cfg: Config, limit: int) -> dict[str, Any]:
    async with _offline_cache(cfg) as cache:
        return await cache.plan_report(limit)


def render_plan(plan: dict[str, Any], source: str) -> str:
    p = plan["plan"]
    lines = [
        f"source    {source}",
        f"cache     {format_size(plan['used_bytes'])} used (+{format_size(plan['reserved_bytes'])} reserved) of "
        f"{format_size(plan['budget'])}; high {format_size(plan['high_bytes'])}, low {format_size(plan['low_bytes'])}; "
        f"filesystem free {format_size(plan['fs_free_bytes'])}",
        f"need      {format_size(plan['need_bytes'])} to free"
        + ("" if plan["need_bytes"] else " (below the high watermark and above the free-space floor)"),
        f"plan      evict {p['evict']} item(s), freeing {format_size(p['freed_bytes'])}"
        + (
            " (first round; the daemon plans again after it)"
            if p.get("truncated")
            else ("" if p["sufficient"] else " -- NOT ENOUGH: new fetches would wait")
        ),
    ]
    for why, n in sorted(p["kept"].items()):
        lines.append(f"kept      {n} item(s): {why}")
    if plan["items"]:
        rows: list[tuple[Any, ...]] = [("lru", "key", "ver", "size", "last access (UTC)", "verdict")]
        for i, it in enumerate(plan["items"], 1):
            when = dt.datetime.fromtimestamp(it["last_access"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            verdict = ("EVICT: " if it["evict"] else "keep: ") + it["reason"]
            rows.append((i, it["key"], it["version"], format_size(it["disk_bytes"]), when, verdict))
        lines += ["", _table(rows)]
        if len(plan["items"]) < plan.get("cached_items", 0):
            lines.append(f"... {plan['cached_items'] - len(plan['items'])} more (raise --limit)")
    return "\n".join(lines)


def cmd_evict(args: argparse.Namespace) -> int:
    if not args.dry_run:
        print("noded: only `noded evict --dry-run` exists; the daemon evicts by itself", file=sys.stderr)
        return 2
    if not 0 < args.limit <= 10_000_000:
        print("noded: --limit must be between 1 and 10000000", file=sys.stderr)
        return 2
    cfg = load_or_exit(args, check_env=False)
    plan: dict[str, Any] | None = None
    source = "running node (in-use items known)"
    if not args.offline:
        try:
            plan = api_call(args, "GET", f"/v1/cache/plan?limit={min(args.limit, 10_000)}")
        except SystemExit as e:
            if e.code != EX_UNAVAILABLE:
                raise
            print("noded: node not reachable; reading the store directly", file=sys.stderr)
    if plan is None:
        source = "store read directly (node not running: in-use items unknown)"
        _log_to_stderr(cfg)
        plan = asyncio.run(_offline_plan(cfg, args.limit))
    print(json.dumps(plan, indent=2) if args.json else render_plan(plan, source))
    return 0


# -- verify --------------------------------------------------------------------------------------
def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("keys", nargs="*", help="items to verify now (default: all cached items, resumable)")
    p.add_argument("--restart", action="store_true", help="start a full pass over instead of resuming")
    p.add_argument("--rate", help="read at most this much per second, e.g. 100MB/s (default: cache.verify_rate)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


async def _verify(cfg: Config, args: argparse.Namespace, rate: int | None) -> dict[str, Any]:
    from noded.cache.verify import Verifier

    async with _offline_cache(cfg) as cache:
        v = Verifier(cache, rate=rate)
        rep = await (v.verify_keys(args.keys) if args.keys else v.verify_all(restart=args.restart))
        return rep.as_dict()


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args, check_env=False)
    try:
        rate = (parse_rate(args.rate) or 0) if args.rate else None  # 0: unlimited
    except ValueError as e:
        print(f"noded: --rate: {e}", file=sys.stderr)
        return 2
    _log_to_stderr(cfg)
    rep = asyncio.run(_verify(cfg, args, rate))
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        resumed = f", resumed after item id {rep['resumed_after_id']}" if rep["resumed_after_id"] else ""
        print(
            f"verified {rep['checked']} item(s), {format_size(rep['bytes_read'])} in {rep['seconds']}s{resumed}: "
            f"{rep['ok']} ok, {len(rep['corrupt'])} corrupt, {len(rep['missing'])} missing"
        )
        for k in rep["corrupt"]:
            print(f"  corrupt  {k}: quarantined; will be fetched again")
        for k in rep["missing"]:
            print(f"  missing  {k}: will be fetched again")
        for k in rep["unknown"]:
            print(f"  unknown  {k}: no such item")
        for k in rep["not_cached"]:
            print(f"  skipped  {k}: not cached on this node")
        for k in rep["unverifiable"]:
            print(f"  skipped  {k}: no recorded checksum")
    bad = rep["corrupt"] or rep["missing"] or rep["unknown"]
    return 1 if bad else 0


EXTRA_COMMANDS["pin"] = ("pin an item: never evicted (needs the API token)", _pin_args, cmd_pin)
EXTRA_COMMANDS["unpin"] = ("unpin an item (needs the API token)", _pin_args, cmd_unpin)
EXTRA_COMMANDS["evict"] = ("show what eviction would do: `noded evict --dry-run`", _evict_args, cmd_evict)
EXTRA_COMMANDS["verify"] = ("re-hash cached items against their recorded checksums", _verify_args, cmd_verify)
