"""The output grid of a mosaic: CRS choice and pixel-exact alignment. Pure functions.

Conventions (as :class:`rasterkube.grid.GeoGrid`): the transform maps pixel *corners*
(GDAL/rasterio ``Affine``), north up; the ``x``/``y`` coordinates of a store are pixel
*centres* (``c + a·(col + ½)``, ``f + e·(row + ½)``).

Alignment: pixel edges sit on ``k·resolution + anchor·resolution`` for integer ``k``, in
both axes, whatever the AOI.  Two mosaics on the same CRS and resolution therefore share
pixels exactly (a pixel of one is a pixel of the other), and a recipe whose anchor matches
its collection's native grid (Sentinel-2 tiles: edges on multiples of 10 m, anchor 0;
Landsat WRS-2: centres on multiples of 30 m, anchor ½) reads native pixels unresampled.
The grid covers the AOI's bounding box in the output CRS, grown outwards to whole pixels.
"""

from __future__ import annotations

import math
from typing import Final

from rasterkube.grid import GeoGrid

UTM_ZONE_WIDTH_DEG: Final = 6
UTM_NORTH_EPSG_BASE: Final = 32600
UTM_SOUTH_EPSG_BASE: Final = 32700
# Snapping tolerance in pixels: a bound within this of a pixel edge is on it (floating
# point error of reprojected bounds must not add a whole row or column).
SNAP_EPS: Final = 1e-6
MAX_PIXELS: Final = 2**36  # 65 536² — beyond this a typo in resolution or CRS units is likely


def utm_crs(lon: float, lat: float) -> str:
    """The WGS 84 / UTM zone CRS (``EPSG:326zz`` north, ``EPSG:327zz`` south) for a point.

    Standard 6° zones from 180° W; the Norway and Svalbard exceptions are ignored (as
    most tools do for choosing an output grid).
    """
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise ValueError(f"({lon}, {lat}) is not a longitude/latitude")
    zone = min(int((lon + 180.0) // UTM_ZONE_WIDTH_DEG) + 1, 60)
    return f"EPSG:{(UTM_NORTH_EPSG_BASE if lat >= 0 else UTM_SOUTH_EPSG_BASE) + zone}"


def _snap_down(value: float, res: float, offset: float) -> float:
    k = math.floor((value - offset) / res + SNAP_EPS)
    return k * res + offset


def _snap_up(value: float, res: float, offset: float) -> float:
    k = math.ceil((value - offset) / res - SNAP_EPS)
    return k * res + offset


def aligned_grid(
    bounds: tuple[float, float, float, float], crs: str, resolution: float, anchor: float = 0.0
) -> GeoGrid:
    """The smallest north-up grid with square ``resolution`` pixels, edges on
    ``(k + anchor)·resolution``, covering ``bounds`` = (minx, miny, maxx, maxy) in ``crs``."""
    if resolution <= 0 or not math.isfinite(resolution):
        raise ValueError(f"resolution must be positive, got {resolution}")
    if not 0.0 <= anchor < 1.0:
        raise ValueError(f"anchor must be in [0, 1), got {anchor}")
    minx, miny, maxx, maxy = bounds
    if not (math.isfinite(minx) and math.isfinite(maxy) and minx <= maxx and miny <= maxy):
        raise ValueError(f"bounds {bounds} are not finite minx ≤ maxx, miny ≤ maxy")
    offset = anchor * resolution
    x0, x1 = _snap_down(minx, resolution, offset), _snap_up(maxx, resolution, offset)
    y0, y1 = _snap_down(miny, resolution, offset), _snap_up(maxy, resolution, offset)
    # A degenerate (point or line) AOI still gets one pixel.
    width = max(1, round((x1 - x0) / resolution))
    height = max(1, round((y1 - y0) / resolution))
    if width * height > MAX_PIXELS:
        raise ValueError(f"{height}×{width} pixels at resolution {resolution} is too large; check resolution and crs")
    return GeoGrid(crs, (resolution, 0.0, x0, 0.0, -resolution, y0 + height * resolution), (height, width))


def intersects(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Open-interval overlap of two (minx, miny, maxx, maxy) boxes (touching edges do not count)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
