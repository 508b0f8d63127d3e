"""The SDK's version (kept equal to ``version`` in clients/python/pyproject.toml)."""

__version__ = "0.1.0"
