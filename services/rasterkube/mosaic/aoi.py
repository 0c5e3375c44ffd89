"""Areas of interest (``spec.aoi``) → validated EPSG:4326 geometries, one per mosaic.

``geometry`` and ``bbox`` give one mosaic; ``uri`` (GeoParquet or GeoJSON, local or
``s3://``) gives one mosaic per row.  Every problem is a UserError naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from rasterkube import storage
from rasterkube.api.kinds import Aoi
from rasterkube.errors import UserError

WGS84: Final = "EPSG:4326"
AREAL_TYPES: Final = ("Polygon", "MultiPolygon")
# Columns that name a row's store, in order of preference (else the row number).
KEY_COLUMNS: Final = ("id", "name")
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]+")
PARQUET_SUFFIXES: Final = (".parquet", ".geoparquet")


@dataclass(frozen=True)
class AoiRow:
    """One mosaic's area: a key (names its store) and a valid, non-empty polygon in EPSG:4326."""

    key: str
    geometry: Any  # shapely Polygon | MultiPolygon


def _check_lonlat(geom: Any, field: str) -> None:
    minx, miny, maxx, maxy = geom.bounds
    if not (-180.0 <= minx <= maxx <= 180.0 and -90.0 <= miny <= maxy <= 90.0):
        raise UserError(
            f"{field}: bounds {tuple(round(v, 3) for v in geom.bounds)} are not longitude/latitude; "
            "give the AOI in EPSG:4326 (degrees), or use aoi.uri with a file that declares its CRS"
        )


def check_geometry(geom: Any, field: str) -> Any:
    """A valid, non-empty (Multi)Polygon in lon/lat, or a UserError naming ``field``."""
    from shapely.validation import explain_validity

    if geom is None or geom.is_empty:
        raise UserError(f"{field}: the AOI is empty; give a polygon with an area")
    if geom.geom_type not in AREAL_TYPES:
        raise UserError(f"{field}: a {geom.geom_type} has no area; give a Polygon or MultiPolygon (or a bbox)")
    if not geom.is_valid:
        raise UserError(
            f"{field}: invalid polygon ({explain_validity(geom)}); fix it, e.g. with shapely.make_valid "
            "or by removing self-intersections"
        )
    if geom.area == 0:
        raise UserError(f"{field}: the AOI has zero area")
    _check_lonlat(geom, field)
    return geom


def _from_geojson(obj: dict[str, Any]) -> Any:
    from shapely.geometry import shape

    if obj.get("type") == "Feature":
        obj = obj.get("geometry") or {}
    if "crs" in obj:
        raise UserError("spec.aoi.geometry: GeoJSON geometries are EPSG:4326 (RFC 7946); remove the 'crs' member")
    try:
        return shape(obj)
    except Exception as exc:  # noqa: BLE001 — any failure here is bad user input, reported as such
        raise UserError(f"spec.aoi.geometry: not a GeoJSON geometry ({exc})") from None


def _read_frame(uri: str) -> Any:
    import fsspec
    import geopandas

    field = "spec.aoi.uri"
    if not storage.exists(uri):
        raise UserError(f"{field}: {uri} does not exist")
    try:
        if uri.lower().endswith(PARQUET_SUFFIXES):
            return geopandas.read_parquet(uri, storage_options=storage.storage_options(uri) or None)
        with fsspec.open(uri, "rb", **storage.storage_options(uri)) as fh:
            return geopandas.read_file(fh)
    except Exception as exc:  # noqa: BLE001 — any failure here is bad user input, reported as such
        raise UserError(f"{field}: cannot read {uri} as GeoParquet or GeoJSON ({type(exc).__name__}: {exc})") from None


def row_keys(frame: Any) -> list[str]:
    """Store names for the rows: the ``id``/``name`` column if unique, else ``row-00000``…"""
    for column in KEY_COLUMNS:
        if column in frame.columns:
            keys = [_UNSAFE.sub("-", str(v)).strip("-.") for v in frame[column]]
            if all(keys) and len(set(keys)) == len(keys):
                return keys
    return [f"row-{i:05d}" for i in range(len(frame))]


def load_aoi(aoi: Aoi) -> list[AoiRow]:
    """The AOI rows of a spec, validated; one row unless ``aoi.uri`` has several."""
    from shapely.geometry import box

    if aoi.bbox is not None:
        return [AoiRow("aoi", check_geometry(box(*aoi.bbox), "spec.aoi.bbox"))]
    if aoi.geometry is not None:
        return [AoiRow("aoi", check_geometry(_from_geojson(aoi.geometry), "spec.aoi.geometry"))]
    assert aoi.uri is not None
    uri = storage.normalize(aoi.uri)
    frame = _read_frame(uri)
    if len(frame) == 0:
        raise UserError(f"spec.aoi.uri: {uri} has no rows; give at least one polygon")
    if frame.crs is None:
        raise UserError(f"spec.aoi.uri: {uri} declares no CRS; write it with one (e.g. EPSG:4326)")
    try:
        frame = frame.to_crs(WGS84)
    except Exception as exc:  # noqa: BLE001 — any failure here is bad user input, reported as such
        raise UserError(f"spec.aoi.uri: cannot transform {uri} from {frame.crs} to {WGS84} ({exc})") from None
    keys = row_keys(frame)
    return [AoiRow(key, check_geometry(geom, f"spec.aoi.uri (row {i}, {key})"))
            for i, (key, geom) in enumerate(zip(keys, frame.geometry, strict=True))]  # fmt: skip
