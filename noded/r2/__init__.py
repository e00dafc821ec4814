"""Stage 3b, push: Cloudflare R2 (S3 API through boto3). The client and its compatibility settings
(`client`), the multipart pusher (`push`), R2 as an origin and a location (`source`, `catalog`).

Pure policy (no I/O): `partsize` (part sizes within R2's limits), `budget` (bytes in flight).
"""
