"""Windowed reads of COG assets onto an output grid (rasterio/GDAL). I/O only.

Only the pixels an output window needs are read: GDAL fetches the COG tiles under the
window (HTTP range requests on ``s3://``/``https://``), never whole scenes.

* Same CRS, same pixel size and whole-pixel offset (the native grid of a recipe, see
  :mod:`rasterkube.mosaic.gridding`): a plain windowed read, no resampling at all.
* Anything else: a ``WarpedVRT`` onto the output window (GDAL reads only the source
  region under it).  When the output is coarser than the source, the read opens the
  coarsest COG overview that is still at least as fine as the output (``OVERVIEW_LEVEL``),
  so a 100 m mosaic of 10 m data reads the ×8 overview, not the full-resolution tiles.
* Resampling is nearest neighbour by default (as odc-stac's default): every output value
  is a real observation, and masks (SCL classes, QA bits) must never be interpolated.
* Nodata is explicit: every read returns ``(data, valid)``; ``valid`` is False where the
  source is nodata (its nodata value, or its mask/alpha) or outside the scene footprint.
  Callers never see a silent fill value as data.

Transient errors (HTTP 5xx, timeouts, throttling) are retried with back-off; GDAL's own
HTTP retries are switched on too.  S3 settings come from the ``AWS_*`` environment (the
executor carries it to Ray workers): ``AWS_ENDPOINT_URL`` is translated into GDAL's
``AWS_S3_ENDPOINT``/``AWS_HTTPS``/``AWS_VIRTUAL_HOSTING`` so GDAL's ``/vsis3/`` reads the
same S3-compatible server as s3fs does.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import urlparse

import numpy as np
import numpy.typing as npt

from rasterkube.grid import GeoGrid

T = TypeVar("T")

GDAL_DEFAULTS: Final[Mapping[str, str]] = {
    # A COG is one file: listing its directory on open is pure latency on object stores.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "VSI_CACHE": "TRUE",
}
READ_ATTEMPTS: Final = 4
RETRY_BASE_DELAY_S: Final = 0.5
# Messages of errors that retrying cannot fix.
PERMANENT_ERRORS: Final = (
    "no such file",
    "does not exist",
    "not recognized as being in a supported file format",
    "not recognised",
    "access denied",
    "forbidden",
    "http response code: 403",
    "http response code: 404",
)
# Offsets within this fraction of a pixel count as whole pixels (float noise in transforms).
ALIGN_EPS: Final = 1e-6


def gdal_options(env: Mapping[str, str]) -> dict[str, str]:
    """GDAL config for reads: our defaults, S3 endpoint translated, the user's GDAL_* win."""
    options = {k: v for k, v in GDAL_DEFAULTS.items() if k not in env}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint and "AWS_S3_ENDPOINT" not in env:
        parsed = urlparse(endpoint)
        options["AWS_S3_ENDPOINT"] = parsed.netloc or parsed.path
        options["AWS_HTTPS"] = "YES" if parsed.scheme == "https" else "NO"
        # Custom endpoints (MinIO, moto, Ceph) serve path-style URLs.
        options["AWS_VIRTUAL_HOSTING"] = "FALSE"
    return options


def gdal_env() -> Any:
    """A ``rasterio.Env`` for reading assets with the current process environment."""
    import rasterio

    return rasterio.Env(**gdal_options(os.environ))


def is_transient(exc: BaseException) -> bool:
    message = str(exc).lower()
    return not any(p in message for p in PERMANENT_ERRORS)


def with_retries(fn: Callable[[], T], attempts: int = READ_ATTEMPTS, base_delay_s: float = RETRY_BASE_DELAY_S) -> T:
    """``fn()``, retried with exponential back-off on transient rasterio I/O errors."""
    from rasterio.errors import RasterioIOError

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except RasterioIOError as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            time.sleep(base_delay_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def aligned_offset(src_transform: tuple[float, ...], grid: GeoGrid) -> tuple[int, int] | None:
    """(row, col) of the grid's origin in source pixels when both share pixel size and the
    offset is whole pixels (no resampling needed); None otherwise. Pure."""
    a, b, c, d, e, f = src_transform[:6]
    ga, _, gc, _, ge, gf = grid.transform
    if b != 0 or d != 0 or not (math.isclose(a, ga, rel_tol=1e-9) and math.isclose(e, ge, rel_tol=1e-9)):
        return None
    col, row = (gc - c) / a, (gf - f) / e
    if abs(col - round(col)) > ALIGN_EPS or abs(row - round(row)) > ALIGN_EPS:
        return None
    return round(row), round(col)


def overview_level(src_res: float, target_res: float, factors: list[int]) -> int | None:
    """Index of the coarsest overview whose pixels are still ≤ ``target_res`` (None: full
    resolution). Pure. ``factors`` as ``dataset.overviews(1)`` (ascending decimation)."""
    level = None
    for i, factor in enumerate(factors):
        if src_res * factor <= target_res * (1 + ALIGN_EPS):
            level = i
    return level


def _target_res_in_src(src: Any, grid: GeoGrid) -> float:
    """The output pixel size expressed in the source CRS units (approximate)."""
    from rasterio.warp import transform_bounds

    minx, miny, maxx, maxy = transform_bounds(grid.crs, src.crs, *grid.bbox, densify_pts=21)
    return min((maxx - minx) / grid.shape[1], (maxy - miny) / grid.shape[0])


def _read_aligned(src: Any, grid: GeoGrid, row: int, col: int) -> tuple[np.ndarray, npt.NDArray[np.bool_]]:
    from rasterio.windows import Window as RioWindow

    height, width = grid.shape
    data = np.zeros((height, width), dtype=src.dtypes[0])
    valid = np.zeros((height, width), dtype=bool)
    r0, r1 = max(row, 0), min(row + height, src.height)
    c0, c1 = max(col, 0), min(col + width, src.width)
    if r0 < r1 and c0 < c1:
        window = RioWindow(c0, r0, c1 - c0, r1 - r0)
        out = (slice(r0 - row, r1 - row), slice(c0 - col, c1 - col))
        data[out] = src.read(1, window=window)
        valid[out] = src.read_masks(1, window=window) > 0
    return data, valid


def _read_warped(src: Any, grid: GeoGrid, resampling: Any) -> tuple[np.ndarray, npt.NDArray[np.bool_]]:
    from affine import Affine
    from rasterio.vrt import WarpedVRT

    height, width = grid.shape
    with WarpedVRT(
        src,
        crs=grid.crs,
        transform=Affine(*grid.transform),
        width=width,
        height=height,
        resampling=resampling,
        # No nodata value in the source: an alpha band marks what lies outside the footprint.
        add_alpha=src.nodata is None,
    ) as vrt:
        data = vrt.read(1)
        valid = vrt.read_masks(1) > 0
    return data, valid


def read_asset(href: str, grid: GeoGrid, resampling: str = "nearest") -> tuple[np.ndarray, npt.NDArray[np.bool_]]:
    """Band 1 of ``href`` on ``grid``: (data in the source dtype, valid mask), both (H, W).

    Call inside :func:`gdal_env` (one Env per block keeps GDAL's caches warm)."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.enums import Resampling

    def read() -> tuple[np.ndarray, npt.NDArray[np.bool_]]:
        with rasterio.open(href) as src:
            same_crs = src.crs is not None and CRS.from_user_input(grid.crs) == src.crs
            if same_crs:
                offset = aligned_offset(tuple(src.transform), grid)
                if offset is not None:
                    return _read_aligned(src, grid, *offset)
            level = None
            factors = src.overviews(1)
            if factors:
                level = overview_level(abs(src.transform.a), _target_res_in_src(src, grid), factors)
            if level is None:
                return _read_warped(src, grid, Resampling[resampling])
        with rasterio.open(href, overview_level=level) as ovr:
            return _read_warped(ovr, grid, Resampling[resampling])

    return with_retries(read)
