"""Synthetic GeoZarr stores for tests."""

from __future__ import annotations

import numpy as np

from rasterkube import geozarr, storage
from rasterkube.grid import GeoGrid, Window

UTM33 = "EPSG:32633"


def grid(height: int, width: int, res: float = 10.0) -> GeoGrid:
    return GeoGrid(UTM33, (res, 0.0, 400000.0, 0.0, -res, 5600000.0), (height, width))


def write_store(uri: str, data: np.ndarray, chunk: int = 16, bands: list[str] | None = None,
                start_year: int = 2017) -> str:  # fmt: skip
    """Commit a (time, band, y, x) array as a GeoZarr store at ``uri``."""
    tmp = storage.temporary_uri(uri)
    write_uncommitted(tmp, data, chunk, bands, start_year)
    storage.commit(tmp, uri)
    return uri


def write_uncommitted(tmp: str, data: np.ndarray, chunk: int = 16, bands: list[str] | None = None,
                      start_year: int = 2017) -> str:  # fmt: skip
    """Write and finalize a store at ``tmp`` (a staged sibling) without committing it."""
    t, b, h, w = data.shape
    times = np.array([f"{start_year + i}-01-01" for i in range(t)], dtype="datetime64[s]")
    geozarr.create(tmp, grid(h, w), times, bands or [f"test:b{i}" for i in range(b)],
                   dtype=data.dtype, chunk_size=chunk)  # fmt: skip
    geozarr.write_region(tmp, "variables", Window(0, h, 0, w), data)
    geozarr.finalize(tmp)
    return tmp


def random_series(t: int, b: int, h: int, w: int, seed: int = 0, nan_fraction: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, b, h, w)).astype(np.float32)
    x += np.linspace(0, 1, t, dtype=np.float32)[:, None, None, None]  # a drift through time
    mask = rng.random((t, 1, h, w)) < nan_fraction
    return np.where(mask, np.nan, x).astype(np.float32)
