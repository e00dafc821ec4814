"""Stage 2, hold: the on-disk layout with atomic publish (`layout`), disk accounting, reservations and
the eviction loop (`accounting`, with its SQL in `db`), verification of cached copies (`verify`), and
the watcher of the inbox and of changes made by hand (`watch`).

Pure policy (no I/O): `eviction` (what to evict, never the last durable copy).
"""
