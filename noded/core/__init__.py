"""The shared core every stage builds on: settings, the item model, the SQLite store, the component
protocol, units, logging, systemd notification, one-pass hashing and byte counters.

Nothing here imports a stage. Pure (no I/O): `model`, `units`.
"""
