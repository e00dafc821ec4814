"""R2 as an origin, as a catalog adapter: `noded.r2.source.list_catalog` behind the `Adapter` protocol.

The listing itself (ListObjectsV2 under the prefix, key confinement, HEADs for the sha256/md5 our
pushers store) lives in `noded.r2.source`; its `R2Source` fetches by key, so no listed URL is "owned"
here and the HTTP engine never pulls R2 objects itself.
"""

from __future__ import annotations

from noded.core.config import Config
from noded.core.counters import Traffic
from noded.core.logs import get_logger
from noded.origins.catalog.base import Adapter, CatalogError, Limits, Listing
from noded.origins.pipeline import limits_of
from noded.origins.sources import Source
from noded.r2.source import R2Source, list_catalog

log = get_logger("noded.origins")

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


class R2Origin:
    """R2 as an origin (origins.r2.enabled), an `OriginExtension` of the pull pipeline: its source is
    tried last, its listing joins the catalogs."""

    name = NAME

    def __init__(self, cfg: Config, traffic: Traffic) -> None:
        self.cfg = cfg
        self.traffic = traffic
        self.source: R2Source | None = None

    async def open(self) -> tuple[Source | None, Adapter | None]:
        if not self.cfg.origins.r2.enabled:
            return None, None
        self.source = await R2Source.open(self.cfg.r2, self.traffic)
        if self.source is None:
            log.warning("origins.r2_unavailable", reason="neither R2 credentials nor r2.public_url are configured")
            return None, None
        adapter = R2Adapter(self.source, limits_of(self.cfg)) if self.source.client is not None else None
        return self.source, adapter

    async def close(self) -> None:
        source, self.source = self.source, None
        if source is not None:
            await source.close()
