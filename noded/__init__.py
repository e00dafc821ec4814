"""noded: the replication daemon of the Data for Canada Smart Nodes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("noded")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
