"""Catalog adapters: turn an origin's listing into `CatalogEntry`s (untrusted input, validated here)."""
