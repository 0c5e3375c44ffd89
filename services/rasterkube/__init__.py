"""rasterkube: Earth-observation mosaics, inference, change scores and vectorization on Ray.

``rasterkube.Client`` is the Python client (imported on first use, so jobs stay light)."""

import os
import sys
from typing import Any

__all__ = ["Client", "Result"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rasterkube import client

        return getattr(client, name)
    raise AttributeError(f"module 'rasterkube' has no attribute {name!r}")


def _keep_local_ray_on_loopback() -> None:
    """A Ray that runs on this machine only (embedded, or RAY_ADDRESS on loopback) talks over
    127.0.0.1: with Ray's multi-node mode on (its Linux default) a driver rewrites 127.0.0.1 to
    the machine's network address and every Ray process listens there. Ray reads the switch
    once, at import, so it is set here, before rasterkube imports ray; an explicit setting and
    a Ray imported earlier are left alone (the README says so)."""
    if "ray" in sys.modules:
        return
    address = os.environ.get("RAY_ADDRESS", "")
    host = address.removeprefix("ray://").removeprefix("http://").rpartition(":")[0] or address
    if address in ("", "local") or host in ("localhost", "::1", "[::1]") or host.startswith("127."):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


_keep_local_ray_on_loopback()
