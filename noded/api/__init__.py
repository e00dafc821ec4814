"""The node's local HTTP API (aiohttp)."""
