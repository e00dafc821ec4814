"""R2 as an origin, as a catalog adapter: the R2 helper's `list_catalog` behind the `Adapter` protocol.

The listing itself (ListObjectsV2 under the prefix, key confinement, HEADs for the sha256/md5 our
pushers store) lives in `noded.r2source`; its `R2Source` fetches by key, so no listed URL is "owned"
here and the HTTP engine never pulls R2 objects itself.
"""

from __future__ import annotations

from noded.catalog.base import CatalogError, Limits, Listing
from noded.r2source import R2Source, list_catalog

NAME = "r2"


class R2Adapter:
    name = NAME

    def __init__(self, source: R2Source, limits: Limits) -> None:
        self.source = source
        self.limits = limits

    def owns(self, url: str) -> bool:
        return False

    async def list(self) -> Listing:
        client = self.source.client
        if client is None:
            raise CatalogError("listing R2 needs credentials (a public URL alone cannot list the bucket)")
        try:
            entries = await list_catalog(
                client,
                max_items=self.limits.max_entries,
                max_size=self.limits.max_item_size,
                public_url=self.source.cfg.public_url,
            )
        except Exception as e:  # boto3/botocore errors: this origin's refresh fails, nothing else
            raise CatalogError(f"R2 listing failed: {type(e).__name__}: {e}") from None
        if len(entries) > self.limits.max_entries:
            raise CatalogError(f"R2 lists more than {self.limits.max_entries} objects")
        return Listing(NAME, entries=entries, pages=1)
