"""A frozen description of a raster grid (like odc-geo's GeoBox), and the zarr-conventions
``proj:``/``spatial:`` attributes that carry it (DESIGN §3)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

PROJ_CONVENTION: Final = {
    "uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f",
    "name": "proj:",
    "schema_url": "https://raw.githubusercontent.com/zarr-experimental/geo-proj/refs/tags/v1/schema.json",
    "spec_url": "https://github.com/zarr-experimental/geo-proj/blob/v1/README.md",
    "description": "Coordinate reference system information for geospatial data",
}
SPATIAL_CONVENTION: Final = {
    "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4",
    "name": "spatial:",
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v1/schema.json",
    "spec_url": "https://github.com/zarr-conventions/spatial/blob/v1/README.md",
    "description": "Spatial coordinate information",
}
SPATIAL_DIMS: Final = ["y", "x"]
#: ``proj:`` attributes that carry a CRS, in order of preference.
PROJ_CRS_KEYS: Final = ("proj:code", "proj:wkt2", "proj:projjson")
_AUTH_CODE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*:[A-Za-z0-9_.-]+$")


def proj_attrs(crs: str) -> dict[str, Any]:
    """``proj:code`` for an ``AUTH:CODE`` CRS, else ``proj:wkt2`` (a CRS with no code)."""
    return {"proj:code": crs} if _AUTH_CODE.match(crs) else {"proj:wkt2": crs}


@dataclass(frozen=True)
class Window:
    """A half-open pixel window [y0, y1) × [x0, x1)."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


@dataclass(frozen=True)
class GeoGrid:
    """CRS + affine transform (a, b, c, d, e, f as in GDAL/rasterio ``Affine``) + (height, width).

    Only north-up grids (b = d = 0) are supported, so pixel centres are 1-D ``x``/``y`` coords.
    """

    crs: str
    transform: tuple[float, float, float, float, float, float]
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        a, b, _, d, e, _ = self.transform
        if b != 0 or d != 0:
            raise ValueError("rotated grids are not supported (transform b and d must be 0)")
        if a == 0 or e == 0:
            raise ValueError("pixel size must not be 0")
        if self.shape[0] <= 0 or self.shape[1] <= 0:
            raise ValueError(f"grid shape must be positive, got {self.shape}")

    @property
    def resolution(self) -> tuple[float, float]:
        return self.transform[0], self.transform[4]

    def x_coords(self) -> np.ndarray:
        a, _, c, *_ = self.transform
        return c + a * (np.arange(self.shape[1], dtype=np.float64) + 0.5)

    def y_coords(self) -> np.ndarray:
        *_, e, f = self.transform
        return f + e * (np.arange(self.shape[0], dtype=np.float64) + 0.5)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        a, _, c, _, e, f = self.transform
        xs = (c, c + a * self.shape[1])
        ys = (f, f + e * self.shape[0])
        return min(xs), min(ys), max(xs), max(ys)

    def window(self, w: Window) -> GeoGrid:
        """The sub-grid covering ``w`` (same CRS and resolution, shifted origin)."""
        if not (0 <= w.y0 < w.y1 <= self.shape[0] and 0 <= w.x0 < w.x1 <= self.shape[1]):
            raise ValueError(f"window {w} is outside the grid of shape {self.shape}")
        a, b, c, d, e, f = self.transform
        return GeoGrid(self.crs, (a, b, c + a * w.x0, d, e, f + e * w.y0), w.shape)

    def window_for_bbox(self, bbox: tuple[float, float, float, float]) -> Window:
        """The smallest pixel window covering ``bbox`` (in this grid's CRS), clipped to the grid."""
        a, _, c, _, e, f = self.transform
        cols = sorted(((bbox[0] - c) / a, (bbox[2] - c) / a))
        rows = sorted(((bbox[1] - f) / e, (bbox[3] - f) / e))
        x0, x1 = max(0, int(np.floor(cols[0]))), min(self.shape[1], int(np.ceil(cols[1])))
        y0, y1 = max(0, int(np.floor(rows[0]))), min(self.shape[0], int(np.ceil(rows[1])))
        if x0 >= x1 or y0 >= y1:
            raise ValueError(f"bbox {bbox} does not overlap the grid bounds {self.bbox}")
        return Window(y0, y1, x0, x1)

    def to_attrs(self) -> dict[str, Any]:
        return {
            **proj_attrs(self.crs),
            "spatial:dimensions": SPATIAL_DIMS,
            "spatial:transform": list(self.transform),
            "spatial:shape": list(self.shape),
            "spatial:bbox": list(self.bbox),
            "spatial:registration": "pixel",
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> GeoGrid:
        """The grid of the ``proj:``/``spatial:`` attributes (rasterkube's own stores; see
        :func:`rasterkube.storelayout.grid_from_metadata` for what other writers declare)."""
        crs_key = next((k for k in PROJ_CRS_KEYS if attrs.get(k)), None)
        try:
            transform = tuple(float(v) for v in attrs["spatial:transform"])
            shape = tuple(int(v) for v in attrs["spatial:shape"])
            if crs_key is None:
                raise KeyError(PROJ_CRS_KEYS[0])
        except KeyError as exc:
            raise ValueError(f"store has no {exc.args[0]} attribute: not a GeoZarr store written by rasterkube") from None
        value = attrs[crs_key]
        crs = value if isinstance(value, str) else json.dumps(value)  # proj:projjson is an object
        return cls(crs, transform, shape)  # type: ignore[arg-type]

    def cf_grid_mapping(self) -> dict[str, Any]:
        """Attributes of the CF grid-mapping variable (``spatial_ref``) as rioxarray writes them:
        the CRS as WKT (``crs_wkt`` and GDAL's ``spatial_ref``), its CF parameters, and GDAL's
        ``GeoTransform`` — what rioxarray, odc-geo and GDAL read; ``proj:``/``spatial:`` stay
        the store's primary convention (DESIGN §3)."""
        from pyproj import CRS

        crs = CRS.from_user_input(self.crs)
        wkt = crs.to_wkt()
        try:
            cf = {k: v for k, v in crs.to_cf().items() if k != "crs_wkt"}
        except Exception:  # noqa: BLE001 — a CRS without a CF form still has its WKT
            cf = {}
        a, b, c, d, e, f = self.transform
        return {**cf, "crs_wkt": wkt, "spatial_ref": wkt,
                "GeoTransform": " ".join(repr(float(v)) for v in (c, a, b, f, d, e))}  # fmt: skip


def conventions() -> list[dict[str, str]]:
    return [dict(PROJ_CONVENTION), dict(SPATIAL_CONVENTION)]
