"""Stage 1, fetch: catalog adapters list what each origin publishes (untrusted input, validated in
`catalog/`), the HTTP engine pulls it (`fetch`), and the pull pipeline (`pipeline`) decides who fetches
what from where and hands verified bytes to the cache. `schedule` holds the bandwidth timetable every
transfer (origins, BitTorrent, R2) draws from.

Pure policy (no I/O): `rendezvous` (which node fetches from an origin), `catalog.keys` (key
normalisation).
"""
