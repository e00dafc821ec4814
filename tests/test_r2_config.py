"""R2 settings: defaults are valid, bad values are refused with the key and the rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from noded.core.config import ConfigError, parse_config
from noded.core.counters import Traffic
from noded.r2.client import MissingCredentials, R2Credentials, client_config, load_credentials
from noded.r2.source import R2Source
from tests.conftest import base_config, to_toml


def parse(tmp: Path, **r2: object) -> object:
    return parse_config(to_toml(base_config(tmp, r2=r2)))


def test_defaults_are_valid_and_r2_compatible(tmp_path: Path) -> None:
    cfg = parse_config(to_toml(base_config(tmp_path)))
    r2 = cfg.r2  # type: ignore[attr-defined]
    assert not r2.enabled and r2.region == "auto" and r2.part_size == 8 * 1024**2
    bc = client_config(r2, 4)
    # boto3 >= 1.36's default CRC32 trailer is refused by R2: only send checksums when required.
    assert bc.request_checksum_calculation == "when_required"
    assert bc.response_checksum_validation == "when_required"
    assert bc.region_name == "auto"


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("part_size", "1MiB", "part_size must be between 5 MiB and 5 GiB"),
        ("multipart_threshold", "6GiB", "multipart_threshold must be between"),
        ("max_concurrency", 0, "greater than or equal to 1"),
        ("prefix", "/abs/", "prefix must not start with '/'"),
        ("retry_max", 0.5, "retry_max must not be below retry_initial"),
        ("endpoint", "ftp://x", "expected an http:// or https:// URL"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse(tmp_path, **{key: value})
    text = str(ei.value)
    assert text.startswith("r2") and needle in text


def test_credentials_from_systemd_credentials_dir_win_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(to_toml(base_config(tmp_path, r2={"enabled": True}))).r2
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "r2-access-key-id").write_text("AKIDFROMFILE0001\n")
    (creds / "r2-secret-access-key").write_text("file-secret-value-0001\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("R2_ACCESS_KEY_ID", "AKIDFROMENV00001")
    monkeypatch.setenv("R2_SECRET_ACCESS_KEY", "env-secret-value-0001")
    got = load_credentials(cfg)
    assert got == R2Credentials("AKIDFROMFILE0001", "file-secret-value-0001")
    assert "secret" not in repr(got) and "AKID" not in repr(got)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    monkeypatch.delenv("R2_SECRET_ACCESS_KEY")
    with pytest.raises(MissingCredentials, match="R2_SECRET_ACCESS_KEY") as ei:
        load_credentials(cfg)
    assert "AKIDFROMENV00001" not in str(ei.value)


async def test_r2_origin_needs_credentials_or_a_public_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("CREDENTIALS_DIRECTORY", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    plain = parse_config(to_toml(base_config(tmp_path))).r2
    assert R2Source.from_config(plain, Traffic()) is None
    public = parse_config(to_toml(base_config(tmp_path, r2={"public_url": "https://pub.example.r2.dev"}))).r2
    src = await R2Source.open(public, Traffic())
    assert src is not None and src.client is None
    await src.close()
