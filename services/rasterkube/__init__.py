"""rasterkube: Earth-observation mosaics, inference, change scores and vectorization on Ray.

``rasterkube.Client`` is the Python client (imported on first use, so jobs stay light)."""

from typing import Any

__all__ = ["Client", "Result"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rasterkube import client

        return getattr(client, name)
    raise AttributeError(f"module 'rasterkube' has no attribute {name!r}")
