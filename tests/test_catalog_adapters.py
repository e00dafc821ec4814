"""Each adapter lists a multi-page catalog correctly, against servers speaking the real shapes."""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from noded.core.config import FetchConfig, InternetArchiveConfig, SourceCoopConfig, ZenodoConfig
from noded.core.counters import Traffic
from noded.origins.catalog.base import CatalogError, Limits
from noded.origins.catalog.ia import InternetArchiveAdapter
from noded.origins.catalog.sourcecoop import SourceCoopAdapter
from noded.origins.catalog.zenodo import ZenodoAdapter
from noded.origins.fetch import HttpClient
from tests.catalog_servers import ArchiveServer, ZenodoServer, ia_file, ia_metadata, zenodo_file, zenodo_record


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    client = HttpClient(FetchConfig(retry_initial=0.05, max_attempts=3), Traffic())
    await client.start()
    yield client
    await client.close()


@pytest.fixture(scope="module")
def moto() -> Iterator[tuple[str, Any]]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    yield url, s3
    server.stop()


async def test_sourcecoop_lists_all_pages_and_never_takes_a_multipart_etag_for_md5(
    moto: tuple[str, Any], http: HttpClient
) -> None:
    url, s3 = moto
    s3.create_bucket(Bucket="dataforcanada")
    blobs = {f"d4c-datapkg-statistical/f{i}.parquet": os.urandom(100 + i) for i in range(5)}
    for key, data in blobs.items():
        s3.put_object(Bucket="dataforcanada", Key=key, Body=data)
    s3.put_object(Bucket="dataforcanada", Key="other/skip.bin", Body=b"x")
    # A multipart object: its ETag is md5-of-md5s plus "-2", not the file's md5.
    big = os.urandom(5 * 1024 * 1024 + 1)
    mp = s3.create_multipart_upload(Bucket="dataforcanada", Key="d4c-datapkg-statistical/big.pmtiles")
    parts = []
    for n, chunk in enumerate((big[: 5 * 1024 * 1024], big[5 * 1024 * 1024 :]), start=1):
        r = s3.upload_part(
            Bucket="dataforcanada",
            Key="d4c-datapkg-statistical/big.pmtiles",
            UploadId=mp["UploadId"],
            PartNumber=n,
            Body=chunk,
        )
        parts.append({"ETag": r["ETag"], "PartNumber": n})
    s3.complete_multipart_upload(
        Bucket="dataforcanada",
        Key="d4c-datapkg-statistical/big.pmtiles",
        UploadId=mp["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    cfg = SourceCoopConfig(
        enabled=True, endpoint=url, bucket="", prefixes=["dataforcanada/d4c-datapkg-statistical/"], max_keys_per_page=2
    )
    listing = await SourceCoopAdapter(cfg, http, Limits()).list()
    assert listing.pages == 3 and not listing.rejected
    got = {e.key: e for e in listing.entries}
    # Keyed by dataset name (the product prefix is the location's path, not the item's name).
    assert set(got) == {*(k.split("/", 1)[1] for k in blobs), "big.pmtiles"}
    for path, data in blobs.items():
        key = path.split("/", 1)[1]
        assert got[key].md5 == hashlib.md5(data).hexdigest()
        assert got[key].size == len(data)
        assert got[key].urls == (f"{url}/dataforcanada/{path}",)
        assert got[key].extra["path"] == f"dataforcanada/{path}"
    multi = got["big.pmtiles"]
    assert multi.md5 is None and multi.etag and multi.etag.endswith("-2") and multi.size == len(big)
    assert multi.extra["multipart"] is True


async def test_zenodo_community_of_three_pages_records_and_concepts(aiohttp_server: Any, http: HttpClient) -> None:
    z = ZenodoServer(page_size=2)
    server = await aiohttp_server(z.app())
    base = str(server.make_url("")).rstrip("/")
    for rid in range(101, 106):  # 5 records in the community -> pages of 2, 2, 1
        z.records[rid] = zenodo_record(base, rid, [zenodo_file(base, rid, f"c{rid}.parquet")])
    z.communities["dataforcanada"] = list(range(101, 106))
    z.records[200] = zenodo_record(base, 200, [zenodo_file(base, 200, "single.gpkg", size=None)])
    z.records[301] = zenodo_record(base, 301, [zenodo_file(base, 301, "v1.tif")], concept=300)
    z.records[302] = zenodo_record(base, 302, [zenodo_file(base, 302, "v2.tif")], concept=300)
    z.concepts[300] = 302
    cfg = ZenodoConfig(
        enabled=True,
        base_url=base,
        records=[200],
        concepts=[300],
        communities=["dataforcanada"],
        requests_per_minute=6000,
        search_requests_per_minute=6000,
    )
    listing = await ZenodoAdapter(cfg, http, Limits()).list()
    keys = sorted(e.key for e in listing.entries)
    assert keys == sorted([*(f"c{r}.parquet" for r in range(101, 106)), "single.gpkg", "v2.tif"])
    community_pages = [p for _, p in z.log.requests if p.startswith("/api/communities/")]
    assert len(community_pages) == 3
    e = next(e for e in listing.entries if e.key == "c101.parquet")
    assert e.md5 == hashlib.md5(b"c101.parquet").hexdigest() and e.size == len(b"c101.parquet")
    assert e.urls == (f"{base}/api/records/101/files/c101.parquet/content",)


async def test_zenodo_guest_pacing_and_rate_limit_headers(aiohttp_server: Any, http: HttpClient) -> None:
    z = ZenodoServer(page_size=1)
    server = await aiohttp_server(z.app())
    base = str(server.make_url("")).rstrip("/")
    for rid in (1, 2, 3):
        z.records[rid] = zenodo_record(base, rid, [zenodo_file(base, rid, f"f{rid}")])
    z.communities["c"] = [1, 2, 3]
    cfg = ZenodoConfig(
        enabled=True, base_url=base, communities=["c"], requests_per_minute=240, search_requests_per_minute=120
    )
    http.pace_host(base, cfg.requests_per_minute)
    await ZenodoAdapter(cfg, http, Limits()).list()
    times = [t for t, _ in z.log.requests]
    # Community pages are searches: their own, lower pace (Zenodo allows 30/min) on top of the host's.
    assert len(times) == 3 and all(b - a >= 0.45 for a, b in itertools.pairwise(times))
    # A server that says "0 left until <reset>" is not asked again before then.
    reset = int(time.time()) + 3  # whole seconds, as Zenodo sends it
    z.rate_headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)}
    z.log.requests.clear()
    await ZenodoAdapter(cfg, http, Limits()).list()
    times = [t for t, _ in z.log.requests]
    second_at = time.time() - (time.monotonic() - times[1])  # when the 2nd request arrived
    assert second_at >= reset - 0.05


async def test_ia_originals_by_default_derivatives_on_request_and_missing_sizes(
    aiohttp_server: Any, http: HttpClient
) -> None:
    ia = ArchiveServer()
    server = await aiohttp_server(ia.app())
    base = str(server.make_url("")).rstrip("/")
    a, b = os.urandom(50), os.urandom(70)
    ia.items["d4c-census-2021"] = ia_metadata(
        "d4c-census-2021",
        [
            ia_file("census 2021.parquet", a),
            ia_file("nosize.pmtiles", b, with_size=False),
            ia_file("census 2021.parquet.thumb.png", b"png", source="derivative"),
            ia_file("d4c-census-2021_meta.xml", b"<x/>", source="metadata"),
        ],
    )
    ia.items["d4c-other"] = ia_metadata("d4c-other", [ia_file("other.gpkg", b"gpkg")])
    cfg = InternetArchiveConfig(enabled=True, base_url=base, identifiers=["d4c-census-2021", "d4c-other"])
    listing = await InternetArchiveAdapter(cfg, http, Limits()).list()
    got = {e.key: e for e in listing.entries}
    assert set(got) == {"census 2021.parquet", "nosize.pmtiles", "other.gpkg"}
    assert got["nosize.pmtiles"].size is None and got["nosize.pmtiles"].md5 == hashlib.md5(b).hexdigest()
    assert got["census 2021.parquet"].size == 50 and got["census 2021.parquet"].sha1 == hashlib.sha1(a).hexdigest()
    assert got["census 2021.parquet"].urls == (f"{base}/download/d4c-census-2021/census%202021.parquet",)
    assert got["census 2021.parquet"].mtime == 1735689600.0
    assert listing.pages == 2
    with_derivatives = await InternetArchiveAdapter(
        cfg.model_copy(update={"include_derivatives": True}), http, Limits()
    ).list()
    assert "census 2021.parquet.thumb.png" in {e.key for e in with_derivatives.entries}
    with pytest.raises(CatalogError, match="does not exist"):
        await InternetArchiveAdapter(cfg.model_copy(update={"identifiers": ["nope"]}), http, Limits()).list()


async def test_ia_collection_listed_through_the_scrape_api(aiohttp_server: Any, http: HttpClient) -> None:
    ia = ArchiveServer()
    server = await aiohttp_server(ia.app())
    base = str(server.make_url("")).rstrip("/")
    idents = [f"d4c-item-{i}" for i in range(5)]
    for i in idents:
        ia.items[i] = ia_metadata(i, [ia_file(f"{i}.parquet", i.encode()), ia_file(f"{i}_files.xml", b"<f/>")])
    ia.collections["dataforcanada"] = idents
    cfg = InternetArchiveConfig(enabled=True, base_url=base, collections=["dataforcanada"], identifiers=["d4c-item-0"])
    listing = await InternetArchiveAdapter(cfg, http, Limits()).list()
    assert sorted(e.key for e in listing.entries) == sorted(f"{i}.parquet" for i in idents)
    scrapes = [p for _, p in ia.log.requests if p.startswith("/services/search/v1/scrape")]
    assert len(scrapes) == 3 and "cursor=c2" in scrapes[1] and "cursor=c4" in scrapes[2]  # pages of 2, 2, 1
    assert sum(1 for _, p in ia.log.requests if p == "/metadata/d4c-item-0") == 1  # listed once, though named twice
