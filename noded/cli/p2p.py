"""P2P sub-commands: `noded make-torrent PATH`, `noded check-torrent FILE|MAGNET` and
`noded add MAGNET|INFOHASH|FILE.torrent|URL`.

make-torrent writes the same torrent py3createtorrent writes with
`--piece-length 16384 --md5 --source "Data for Canada"` (same infohash), for a file or a dataset
directory; check-torrent validates a .torrent or magnet link as the daemon's import does; add asks the
running node (its API, with the API token) to fetch a dataset from the swarm and cache it.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
import urllib.parse
from pathlib import Path

from noded.cli.main import EX_UNAVAILABLE, EXTRA_COMMANDS, api_call, load_or_exit
from noded.core.config import read_secret
from noded.core.model import PIECE_LENGTH

EX_DATAERR = 65  # sysexits.h: the input data was incorrect


def _add_make(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="file or dataset directory")
    p.add_argument("-o", "--output", type=Path, help="output .torrent (default: <name>.torrent here)")
    p.add_argument("-t", "--tracker", action="append", default=[], help="announce URL (repeatable)")
    p.add_argument("-w", "--web-seed", action="append", default=[], help="BEP 19 web seed URL (repeatable)")
    p.add_argument("--source", default="Data for Canada", help="source tag in the info dict")


def _make(args: argparse.Namespace) -> int:
    from noded.p2p import torrent as T

    path: Path = args.path
    try:
        if path.is_dir():
            info, _ = T.build_dataset_torrent(path, source=args.source)
        elif path.is_file():
            pieces, md5s = T.hash_files([path.resolve()])  # named by the operator: a symlink is followed
            info = T.single_file_info(path.name, path.stat().st_size, md5s[0], pieces, source=args.source)
        else:
            print(f"noded: {path} is neither a file nor a directory", file=sys.stderr)
            return 2
    except (OSError, T.TorrentError) as e:
        print(f"noded: cannot make a torrent of {path}: {e}", file=sys.stderr)
        return EX_DATAERR
    data = T.encode_torrent(info, trackers=args.tracker, web_seeds=args.web_seed)
    out: Path = args.output or Path(f"{path.name}.torrent")
    out.write_bytes(data)
    print(f"{T.infohash_of(info)}  {out}  ({PIECE_LENGTH // 1024 // 1024} MiB pieces)")
    return 0


def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help=".torrent file or magnet: link")


def _check(args: argparse.Namespace) -> int:
    from noded.p2p import torrent as T

    try:
        if args.input.startswith("magnet:"):
            m = T.parse_magnet(args.input)
            print(f"ok  magnet {m.infohash}  name={m.name!r}  web seeds={len(m.web_seeds)}")
            return 0
        with open(args.input, "rb") as f:
            data = f.read(T.MAX_TORRENT_BYTES + 1)
        meta = T.parse_torrent(data)
    except OSError as e:
        print(f"noded: cannot read {args.input}: {e.strerror}", file=sys.stderr)
        return 2
    except T.TorrentError as e:
        print(f"noded: rejected {args.input}: {e}", file=sys.stderr)
        return EX_DATAERR
    print(
        f"ok  {meta.infohash}  {meta.name}  {meta.total_size} bytes  {meta.num_pieces} pieces of {meta.piece_length}"
        f"  md5={meta.md5}  source={meta.source!r}  web seeds={len(meta.web_seeds)}"
    )
    return 0


def _add_add(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="magnet link, infohash, .torrent file, or the http(s) URL of a .torrent")
    p.add_argument("--wait", action="store_true", help="wait until the dataset is cached (or has failed)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits (default 3600)")


def _add(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args, check_env=False)
    token = read_secret(cfg.api.token_credential, cfg.api.token_env)
    if not token:
        print(f"noded: no API token: set ${cfg.api.token_env} or the systemd credential", file=sys.stderr)
        return EX_UNAVAILABLE
    text: str = args.input
    path = Path(text)
    if not text.startswith(("magnet:", "http://", "https://")) and path.is_file():
        try:
            data = path.read_bytes()
        except OSError as e:
            print(f"noded: cannot read {text}: {e.strerror}", file=sys.stderr)
            return 2
        body = {"torrent": base64.b64encode(data).decode()}
    else:
        body = {"source": text}
    # A magnet's metadata comes from the swarm first: the call may take up to bittorrent.metadata_timeout.
    out = api_call(args, "POST", "/v1/add", body, token=token, timeout=cfg.bittorrent.metadata_timeout + 30)
    print(f"added {out['key']}  {out['infohash']}  {out['size']} bytes  ({out['state']})")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    item = out
    while time.monotonic() < deadline:
        item = api_call(args, "GET", "/v1/items/" + urllib.parse.quote(out["key"], safe="/"))
        if item["state"] == "cached":
            print(f"cached {item['key']}  sha256 {item.get('sha256')}")
            return 0
        if item["state"] == "failed":
            print(f"noded: {item['key']} failed: {item.get('error')}", file=sys.stderr)
            return 1
        time.sleep(1)
    print(f"noded: {out['key']} not cached after {args.timeout:.0f}s (state {item['state']})", file=sys.stderr)
    return 1


EXTRA_COMMANDS["make-torrent"] = ("build a deterministic (py3createtorrent-identical) .torrent", _add_make, _make)
EXTRA_COMMANDS["check-torrent"] = ("validate a .torrent file or magnet link", _add_check, _check)
EXTRA_COMMANDS["add"] = (
    "fetch a dataset from the swarm: magnet, infohash, .torrent or its URL (needs the API token)",
    _add_add,
    _add,
)
