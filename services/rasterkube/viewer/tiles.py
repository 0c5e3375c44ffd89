"""Raster map tiles from GeoZarr grids: pure numerics (no I/O).

An XYZ tile (Web Mercator, EPSG:3857, 256 px) is rendered by taking its pixel centres into the
store's CRS, picking the pyramid level whose pixels are as large as possible but no larger
than the tile's pixels there (:func:`pick_level`), and sampling that level by nearest
neighbour (:func:`sample_indices`). Pixels outside the grid and NaN pixels are transparent.

Colours (:data:`COLORMAPS`): continuous bands are stretched linearly from ``vmin`` to ``vmax``
onto a colormap given by evenly spaced stops and interpolated to 256 entries — ``viridis``
(default), ``magma``, ``gray`` and the diverging ``rdbu`` (blue = low, red = high), with the
stops of matplotlib's maps of those names. Class-label bands use :data:`CATEGORICAL` (the
"tab10" palette, cycled by ``int(value) % 10``). Three bands can be shown as an RGB composite,
each stretched on its own range.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

TILE_SIZE: Final = 256
MERCATOR_HALF: Final = 20037508.342789244  # metres from the origin to the edge of EPSG:3857
MAX_ZOOM: Final = 22

COLORMAPS: Final[dict[str, tuple[str, ...]]] = {
    "viridis": ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"),
    "magma": ("#000004", "#180f3d", "#440f76", "#721f81", "#9e2f7f", "#cd4071", "#f1605d", "#fd9668", "#feca8d", "#fcfdbf"),
    "gray": ("#000000", "#ffffff"),
    "rdbu": ("#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"),
}  # fmt: skip
DEFAULT_COLORMAP: Final = "viridis"
CATEGORICAL: Final = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                      "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def lut(name: str, n: int = 256) -> npt.NDArray[np.uint8]:
    """(n, 3) uint8 lookup table interpolated linearly between the colormap's stops."""
    if name not in COLORMAPS:
        raise ValueError(f"unknown colormap {name!r}; use one of {', '.join(COLORMAPS)}")
    stops = np.array([_rgb(c) for c in COLORMAPS[name]], dtype=np.float64)
    at = np.linspace(0, 1, len(stops))
    x = np.linspace(0, 1, n)
    return np.stack([np.interp(x, at, stops[:, i]) for i in range(3)], axis=1).round().astype(np.uint8)


# ------------------------------------------------------------------------------- geometry


def tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """EPSG:3857 bounds (xmin, ymin, xmax, ymax) of XYZ tile z/x/y (y counted from the north)."""
    if not (0 <= z <= MAX_ZOOM and 0 <= x < 2**z and 0 <= y < 2**z):
        raise ValueError(f"no tile {z}/{x}/{y}")
    size = 2 * MERCATOR_HALF / 2**z
    x0, y1 = -MERCATOR_HALF + x * size, MERCATOR_HALF - y * size
    return x0, y1 - size, x0 + size, y1


def pixel_centres(bounds: tuple[float, float, float, float], size: int = TILE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(size, size) arrays of the x and y of the tile's pixel centres (row 0 = north)."""
    x0, _, x1, y1 = bounds
    step = (x1 - x0) / size
    xs = x0 + (np.arange(size) + 0.5) * step
    ys = y1 - (np.arange(size) + 0.5) * step
    return np.meshgrid(xs, ys)


def native_zoom(pixel_size_m: float, latitude: float) -> float:
    """The zoom at which one tile pixel covers ``pixel_size_m`` on the ground at ``latitude``."""
    ground = 2 * MERCATOR_HALF * math.cos(math.radians(latitude)) / TILE_SIZE
    return math.log2(ground / max(pixel_size_m, 1e-6))


@dataclass(frozen=True)
class LevelGrid:
    """A pyramid level's affine (north-up: a = pixel width, e = −pixel height) and shape."""

    a: float
    c: float
    e: float
    f: float
    shape: tuple[int, int]

    @classmethod
    def from_transform(cls, transform: Sequence[float], shape: Sequence[int]) -> LevelGrid:
        a, _, c, _, e, f = (float(v) for v in transform)
        return cls(a, c, e, f, (int(shape[0]), int(shape[1])))


def tile_pixel_size(xs: np.ndarray, ys: np.ndarray) -> float:
    """A tile pixel's size in the store CRS units (median spacing of the transformed centres)."""
    dx = np.hypot(np.diff(xs, axis=1), np.diff(ys, axis=1))
    dy = np.hypot(np.diff(xs, axis=0), np.diff(ys, axis=0))
    values = np.concatenate([dx[np.isfinite(dx)], dy[np.isfinite(dy)]])
    return float(np.median(values)) if values.size else math.inf


def pick_level(levels: Sequence[LevelGrid], pixel_size: float) -> int:
    """The coarsest level whose pixels are no larger than ``pixel_size`` (level 0 if none is)."""
    best = 0
    for i, level in enumerate(levels):
        if abs(level.a) <= pixel_size * 1.0001:
            best = i
    return best


def sample_indices(level: LevelGrid, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, inside) of the level pixels containing each point; rows/cols are 0 outside."""
    with np.errstate(invalid="ignore"):
        cols = np.floor((xs - level.c) / level.a)
        rows = np.floor((ys - level.f) / level.e)
    inside = np.isfinite(cols) & np.isfinite(rows)
    inside &= (cols >= 0) & (cols < level.shape[1]) & (rows >= 0) & (rows < level.shape[0])
    return np.where(inside, rows, 0).astype(np.int64), np.where(inside, cols, 0).astype(np.int64), inside


# ------------------------------------------------------------------------------- colour


def colorize(values: np.ndarray, vmin: float, vmax: float, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """(h, w) values → (h, w, 4) RGBA uint8; NaN → transparent."""
    table = lut(colormap)
    v = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(v)
    span = vmax - vmin if vmax != vmin else 1.0
    idx = np.clip((np.where(valid, v, vmin) - vmin) / span, 0, 1) * (len(table) - 1)
    rgba = np.zeros((*v.shape, 4), dtype=np.uint8)
    rgba[..., :3] = table[idx.round().astype(np.int64)]
    rgba[..., 3] = np.where(valid, 255, 0)
    return rgba


def colorize_classes(values: np.ndarray) -> np.ndarray:
    """Class labels → the categorical palette (``int(value) % 10``); NaN → transparent."""
    palette = np.array([_rgb(c) for c in CATEGORICAL], dtype=np.uint8)
    v = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(v)
    rgba = np.zeros((*v.shape, 4), dtype=np.uint8)
    rgba[..., :3] = palette[np.where(valid, v, 0).astype(np.int64) % len(palette)]
    rgba[..., 3] = np.where(valid, 255, 0)
    return rgba


def colorize_rgb(channels: Sequence[np.ndarray], ranges: Sequence[tuple[float, float]]) -> np.ndarray:
    """Three bands → RGB, each stretched on its (vmin, vmax); transparent where any is NaN."""
    stack = np.stack([np.asarray(c, dtype=np.float64) for c in channels], axis=-1)
    valid = np.isfinite(stack).all(axis=-1)
    lo = np.array([r[0] for r in ranges])
    span = np.array([(r[1] - r[0]) or 1.0 for r in ranges])
    scaled = np.clip((np.nan_to_num(stack) - lo) / span, 0, 1) * 255
    rgba = np.zeros((*valid.shape, 4), dtype=np.uint8)
    rgba[..., :3] = scaled.round().astype(np.uint8)
    rgba[..., 3] = np.where(valid, 255, 0)
    return rgba


def value_range(values: np.ndarray, low: float = 2.0, high: float = 98.0) -> tuple[float, float]:
    """A robust stretch: the ``low``/``high`` percentiles of the finite values ((0, 1) if none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 1.0
    lo, hi = (float(p) for p in np.percentile(v, [low, high]))
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


# ------------------------------------------------------------------------------- PNG


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgba: np.ndarray, level: int = 6) -> bytes:
    """(h, w, 4) uint8 → PNG bytes (8-bit RGBA, no filtering)."""
    arr = np.ascontiguousarray(rgba, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 4:
        raise ValueError(f"need an (h, w, 4) array, got {arr.shape}")
    h, w, _ = arr.shape
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), arr.reshape(h, w * 4)], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, level)) + _chunk(b"IEND", b"")


EMPTY_TILE: Final = encode_png(np.zeros((TILE_SIZE, TILE_SIZE, 4), dtype=np.uint8), 9)
