"""Command line: `noded run | check-config | status | ...`.

Exit codes: 0 success; 1 runtime failure; 2 usage error; 69 (EX_UNAVAILABLE) the local API cannot be
reached; 75 (EX_TEMPFAIL) another noded holds the state or cache directory; 78 (EX_CONFIG) the configuration
is invalid (systemd does not restart on it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from noded import __version__
from noded.core.config import EX_CONFIG, Config, ConfigError, config_warnings, load_and_check, load_config
from noded.core.units import format_size

EX_UNAVAILABLE = 69
DEFAULT_CONFIG = "/etc/noded/config.toml"

Command = Callable[[argparse.Namespace], int]
# Further sub-commands register here: name -> (help, add-arguments, run)
EXTRA_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Command]] = {}


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("NODED_CONFIG") or DEFAULT_CONFIG)


def _print_config_error(e: ConfigError) -> None:
    where = f" in {e.path}" if e.path else ""
    print(f"noded: configuration error{where} ({len(e.problems)} problem(s)):", file=sys.stderr)
    for p in e.problems:
        print(f"  - {p}", file=sys.stderr)
    print("noded: see config.example.toml for every key, its type and its default", file=sys.stderr)


def load_or_exit(args: argparse.Namespace, *, check_env: bool = True, check_ports: bool = True) -> Config:
    path = _config_path(args)
    try:
        if check_env:
            return load_and_check(path, check_ports=check_ports)
        return load_config(path)
    except ConfigError as e:
        _print_config_error(e)
        raise SystemExit(EX_CONFIG) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    from noded.core import instance

    held: set[tuple[str, int]] = set()
    if not args.skip_ports:
        # A daemon already running on this state directory holds its ports: they are not a conflict.
        try:
            state_dir = load_config(_config_path(args)).paths.state_dir
        except ConfigError as e:
            _print_config_error(e)
            return EX_CONFIG
        running = instance.running(state_dir)
        if running is not None:
            held = set(running.listens.values())
            ports = ", ".join(f"{k} {b}:{p}" for k, (b, p) in sorted(running.listens.items()))
            print(
                f"noded: noded (pid {running.pid}) is running on {state_dir} and listens on {ports}; "
                "those ports were not test-bound (a change to them needs a restart)"
            )
    cfg = _load_checked(args, held)
    for w in config_warnings(_config_path(args)):
        print(f"noded: warning: {w}", file=sys.stderr)
    print(
        f"noded: configuration {_config_path(args)} is valid (node {cfg.node.name}, "
        f"budget {format_size(cfg.cache.budget)})"
    )
    return 0


def _load_checked(args: argparse.Namespace, held: set[tuple[str, int]]) -> Config:
    try:
        return load_and_check(_config_path(args), check_ports=not args.skip_ports, held=held)
    except ConfigError as e:
        _print_config_error(e)
        raise SystemExit(EX_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    from noded.cache.layout import INTERNAL
    from noded.core.config import read_secret
    from noded.core.logs import configure, get_logger
    from noded.core.statelock import EX_TEMPFAIL, DirectoryLocked, lock_directories
    from noded.daemon import run_daemon

    # Until the daemon's own handlers are in place, SIGUSR1/SIGUSR2 must not end the process.
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    cfg = load_or_exit(args)
    # Before anything is opened: a second daemon on the same directories stops here, touching nothing.
    try:
        lock = lock_directories(cfg.paths.state_dir, cfg.paths.cache_dir / INTERNAL)
    except (DirectoryLocked, OSError) as e:
        print(f"noded: cannot run: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    configure(
        cfg.log.format,
        cfg.log.level,
        secrets=[
            read_secret(cfg.api.token_credential, cfg.api.token_env),
            read_secret(cfg.r2.access_key_id_credential, cfg.r2.access_key_id_env),
            read_secret(cfg.r2.secret_access_key_credential, cfg.r2.secret_access_key_env),
        ],
    )
    for w in config_warnings(_config_path(args)):
        get_logger("noded.config").warning("config.warning", warning=w)
    try:
        return asyncio.run(run_daemon(cfg, _config_path(args)))
    finally:
        lock.release()


def api_base(args: argparse.Namespace) -> str:
    if getattr(args, "url", None):
        return str(args.url).rstrip("/")
    from noded.core import instance

    cfg = load_or_exit(args, check_env=False)
    # The daemon running on this state directory, where it listens now: the file may name a new port
    # that waits for a restart.
    running = instance.running(cfg.paths.state_dir)
    if running is not None:
        return instance.base_url(*running.listens["api.port"])
    return instance.base_url(cfg.api.bind, cfg.api.port)


def api_call(
    args: argparse.Namespace, method: str, path: str, body: Any = None, token: str | None = None, timeout: float = 10
) -> Any:
    url = api_base(args) + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - our own local API
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except Exception:
            msg = e.reason
        print(f"noded: {method} {url} -> {e.code}: {msg}", file=sys.stderr)
        raise SystemExit(1) from None
    except (urllib.error.URLError, OSError) as e:
        print(f"noded: cannot reach the node's API at {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        raise SystemExit(EX_UNAVAILABLE) from None


def _table(rows: Sequence[Sequence[Any]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def render_status(st: dict[str, Any]) -> str:
    c = st["cache"]
    lines = [
        f"node      {st['node']} ({st['region']})  version {st['version']}  "
        f"uptime {st['uptime_seconds']:.0f}s  ready {st['ready']}",
        f"cache     {format_size(c['used_bytes'])} used of {format_size(c['budget_bytes'])} "
        f"(+{format_size(c['reserved_bytes'])} reserved), {c['cached_items']} items, {c['pinned_items']} pinned",
        f"backlog   {st['push_backlog']['items']} items / {format_size(st['push_backlog']['bytes'])} not in R2",
        "items     " + ", ".join(f"{k} {v}" for k, v in st["items"].items()),
    ]
    rel = st.get("reload")
    if rel and "at" in rel:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rel["at"]))
        lines.append(f"reload    {when} UTC: applied {', '.join(rel['applied']) or 'nothing'}")
        if rel["restart_required"]:
            lines.append(f"          waiting for a restart: {', '.join(rel['restart_required'])}")
    if rel and rel.get("rejected"):
        lines.append(f"reload    last file rejected: {'; '.join(rel['rejected'])[:300]}")
    comps = [("component", "state", "detail")]
    for name, s in st["components"].items():
        detail = ", ".join(f"{k}={v}" for k, v in s.items() if k != "state" and not isinstance(v, dict | list))
        comps.append((name, s.get("state", "?"), detail[:80]))
    lines += ["", _table(comps)]
    mirrors = st.get("mirrors")
    if mirrors:
        rows: list[tuple[Any, ...]] = [("mirror", "status", "latency ms", "uptime 24h", "reason")]
        for m in mirrors:
            up = m.get("uptime_24h")
            rows.append(
                (
                    m["name"],
                    m["status"],
                    m.get("latency_ms") or "-",
                    "-" if up is None else f"{up * 100:.1f}%",
                    m.get("reason") or "",
                )
            )
        lines += ["", _table(rows)]
    if st["rates"]:
        rows = [("channel", "in/s", "out/s")]
        for ch, r in sorted(st["rates"].items()):
            rows.append((ch, format_size(r["in"]), format_size(r["out"])))
        lines += ["", _table(rows)]
    quiet = st.get("quiet_hours")
    if quiet:
        lines.append(f"\nquiet hours (UTC, coming day): {', '.join(str(h) for h in quiet)}")
    if st["problems"]:
        lines.append("")
        lines += [f"problem   {k}: {v}" for k, v in st["problems"].items()]
    return "\n".join(lines)


def render_failing(items: list[dict[str, Any]]) -> str:
    """The items that failed or wait for a host, with why and when they are tried again."""
    rows: list[tuple[Any, ...]] = [("item", "origin", "state", "cause", "next attempt (UTC)", "reason")]
    for it in items:
        if it["state"] == "wanted" and it.get("cause") != "waiting":
            continue
        nxt = it.get("next_attempt")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(nxt)) if nxt else "-"
        reason = (it.get("reason") or "").replace("\n", " ")
        rows.append((it["key"][:60], it["origin"], it["state"], it.get("cause") or "-", when, reason[:100]))
    return "" if len(rows) == 1 else _table(rows)


def cmd_status(args: argparse.Namespace) -> int:
    st = api_call(args, "GET", "/v1/status")
    failing: list[dict[str, Any]] = []
    if st["items"].get("failed") or any(k.startswith("items:") for k in st["problems"]):
        failing = api_call(args, "GET", "/v1/items?state=failed,wanted&limit=50")["items"]
    if args.json:
        print(json.dumps({**st, "failing_items": failing}, indent=2))
    else:
        print(render_status(st))
        table = render_failing(failing)
        if table:
            print("\n" + table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noded", description="Data for Canada Smart Node replication daemon")
    p.add_argument("--version", action="version", version=f"noded {__version__}")
    p.add_argument("-c", "--config", help=f"config file (default $NODED_CONFIG or {DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground (systemd runs this)")
    run.set_defaults(func=cmd_run)

    chk = sub.add_parser("check-config", help="validate the configuration and the machine; exit 78 if bad")
    chk.add_argument("--skip-ports", action="store_true", help="do not test that the ports are free")
    chk.set_defaults(func=cmd_check_config)

    st = sub.add_parser("status", help="show the running node's status (reads the local API)")
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    st.add_argument("--url", help="API base URL (default: from the config)")
    st.set_defaults(func=cmd_status)

    for name, (help_text, add_args, func) in EXTRA_COMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--url", help="API base URL (default: from the config)")
        add_args(sp)
        sp.set_defaults(func=func)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    _register_extra_commands()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


def _register_extra_commands() -> None:
    """Import the modules that add sub-commands (kept out of module import time)."""
    import importlib

    for mod in ("noded.cli.cache", "noded.cli.demo", "noded.cli.p2p"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
