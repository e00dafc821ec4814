"""The `noded` command: run | status | check-config, and the cache, p2p and demo sub-commands."""

from noded.cli.main import main

__all__ = ["main"]
