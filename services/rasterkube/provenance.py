"""Provenance: a STAC Item beside every output, written atomically with it (DESIGN §3).

Where the items are (docs/provenance.md):

- A **GeoZarr store** (Mosaic, Prediction, ChangeScore) holds its item at
  ``<store>/stac-item.json``. It is written into the temporary store before
  :func:`rasterkube.storage.commit`, so the commit makes the data and its item appear together.
- A **file output** (Vectorization's GeoParquet, and its PMTiles archive) has the sibling
  ``<file>.stac-item.json``: one item, an asset per file. The old item is removed before the
  first new file is committed and the new item is committed after the last, so an item never
  claims a file that is not there, nor describes a version of it that another run wrote.
- A **Mosaic index** (multi-row AOI) has ``<output>/collection.json``: a STAC Collection that
  links the item inside every row store and has the index GeoParquet as its asset. It is
  removed with the index when a run starts and written after the index at the end.

Items are STAC 1.1.0 with the processing (v1.2.0), projection (v2.0.0) and, for rasters,
raster (v2.0.0) extensions, and ``rasterkube:`` fields naming the resource, its spec hash, the
run, the sources and (Predictions) the model's sha256. Geometry and bbox are in EPSG:4326 (the
grid's outline, densified before it is projected, so curved edges are inside it). Asset hrefs
are relative to the item, so an output keeps its provenance when it is moved or copied.
Every document is validated against the shipped schemas (:mod:`rasterkube.stacschema`)
before it is written.

The builders are pure functions (values in, dicts out); the I/O helpers are at the end.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np

from rasterkube import stacschema, storage
from rasterkube.constants import API_VERSION
from rasterkube.grid import GeoGrid

ITEM_FILE: Final = "stac-item.json"  # inside a store
ITEM_SUFFIX: Final = ".stac-item.json"  # appended to a file output's name
COLLECTION_FILE: Final = "collection.json"  # in a Mosaic index's directory
SOFTWARE: Final = "rasterkube"
#: processing:expression holds the resource's spec (defaults filled in) in this format.
SPEC_FORMAT: Final = f"{API_VERSION} spec"
#: A collection must name a license; rasterkube cannot know the data's, so it says "other".
LICENSE: Final = "other"
WGS84: Final = "EPSG:4326"
WEB_MERCATOR: Final = "EPSG:3857"
#: Points per edge of a grid's outline projected to lon/lat: few for the geometry, many for
#: the bbox (which must contain the curved edges whatever the projection).
FOOTPRINT_POINTS: Final = 5
BBOX_POINTS: Final = 21
#: Decimals of lon/lat kept in geometry and bbox (1e-7 degree is about 1 cm).
LONLAT_DECIMALS: Final = 7

ASSET_DATA: Final = "data"
ASSET_PMTILES: Final = "pmtiles"
ASSET_INDEX: Final = "index"
REL_DERIVED_FROM: Final = "derived_from"
REL_ITEM: Final = "item"
REL_COLLECTION: Final = "collection"
GEOJSON_TYPE: Final = "application/geo+json"
JSON_TYPE: Final = "application/json"
ZARR_TYPE: Final = "application/vnd.zarr"
PARQUET_TYPE: Final = "application/vnd.apache.parquet"
PMTILES_TYPE: Final = "application/vnd.pmtiles"

#: The ``rasterkube:`` item properties (what docs/provenance.md lists).
KIND: Final = "rasterkube:kind"
NAME: Final = "rasterkube:name"
NAMESPACE: Final = "rasterkube:namespace"
GENERATION: Final = "rasterkube:generation"
UID: Final = "rasterkube:uid"
SPEC_HASH: Final = "rasterkube:spec_hash"
RUN_ID: Final = "rasterkube:run_id"
SOURCES: Final = "rasterkube:sources"
SOURCE_ITEMS: Final = "rasterkube:source_items"
MODEL_URI: Final = "rasterkube:model_uri"
MODEL_SHA256: Final = "rasterkube:model_sha256"
FEATURE_COUNT: Final = "rasterkube:feature_count"
ROW: Final = "rasterkube:row"  # the AOI row key of a Mosaic index store

# STAC 1.1 data_type values (data-values.json) that numpy names the same way.
_STAC_DATA_TYPES: Final = frozenset(
    {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"}
)
_AUTH_CODE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*:[A-Za-z0-9_.-]+$")


# ----------------------------------------------------------------------------- who, from what


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(SOFTWARE)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Provenance:
    """Who made an output, how and from what: the same for every item one run writes."""

    kind: str
    name: str
    namespace: str
    spec: Mapping[str, Any]  # the wire form, defaults filled in (what spec_hash hashes)
    spec_hash: str
    run_id: str
    lineage: str  # one sentence: what was done to which input
    created: str  # RFC 3339, UTC
    software_version: str
    generation: int | None = None
    uid: str | None = None
    sources: tuple[str, ...] = ()  # URIs read: stores, STAC catalogs or APIs
    source_items: tuple[str, ...] = ()  # ids of the STAC items read (a Mosaic's scenes)
    derived_from: tuple[str, ...] = ()  # hrefs of the sources' STAC items
    model_uri: str | None = None
    model_sha256: str | None = None

    @classmethod
    def of(cls, resource: Any, run_id: str, lineage: str, **inputs: Any) -> Provenance:
        """From a parsed :class:`rasterkube.api.Resource`; ``inputs`` are the keyword fields
        sources, source_items, derived_from, model_uri and model_sha256."""
        meta = resource.metadata
        return cls(kind=str(resource.kind), name=meta.name, namespace=meta.namespace, spec=resource.spec.to_wire(),
                   spec_hash=resource.spec_hash, run_id=run_id, lineage=lineage, created=utc_now(),
                   software_version=software_version(), generation=meta.generation, uid=meta.uid,
                   **{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in inputs.items()})  # fmt: skip


def item_id(kind: str, namespace: str, name: str, key: str | None = None) -> str:
    """``<kind>-<namespace>-<name>`` (``-<row key>`` for a Mosaic index row): unique per output."""
    base = f"{kind.lower()}-{namespace}-{name}"
    return f"{base}-{key}" if key else base


def processing_fields(prov: Provenance) -> dict[str, Any]:
    return {
        "processing:software": {SOFTWARE: prov.software_version},
        "processing:datetime": prov.created,
        "processing:lineage": prov.lineage,
        "processing:expression": {"format": SPEC_FORMAT, "expression": dict(prov.spec)},
    }


def rasterkube_fields(prov: Provenance) -> dict[str, Any]:
    """The resource, its spec hash, the run and the sources (optional ones only when known)."""
    out: dict[str, Any] = {KIND: prov.kind, NAME: prov.name, NAMESPACE: prov.namespace}
    if prov.generation is not None:
        out[GENERATION] = prov.generation
    if prov.uid is not None:
        out[UID] = prov.uid
    out.update({SPEC_HASH: prov.spec_hash, RUN_ID: prov.run_id, SOURCES: list(prov.sources)})
    if prov.source_items:
        out[SOURCE_ITEMS] = list(prov.source_items)
    if prov.model_sha256 is not None:
        out[MODEL_URI] = prov.model_uri
        out[MODEL_SHA256] = prov.model_sha256
    return out


def _links(prov: Provenance) -> list[dict[str, Any]]:
    return [{"rel": REL_DERIVED_FROM, "href": href, "type": GEOJSON_TYPE} for href in prov.derived_from]


# --------------------------------------------------------------------------------- where, when


def _iso(t: np.datetime64) -> str:
    return f"{np.datetime_as_string(np.datetime64(t, 's'), unit='s')}Z"


def time_fields(times: Sequence[np.datetime64] | np.ndarray, created: str, end: np.datetime64 | None = None) -> dict[str, Any]:
    """``datetime``, or ``start_datetime``/``end_datetime`` (inclusive) spanning ``times``.

    ``end`` overrides the last time (a Mosaic's windows end after their start). A source
    without dates (every time NaT) gets the processing time as ``datetime``."""
    values = np.asarray(times, dtype="datetime64[s]")
    values = values[~np.isnat(values)]
    if not len(values):
        return {"datetime": created}
    start = values.min()
    stop = np.datetime64(end, "s") if end is not None and not np.isnat(end) else values.max()
    if stop <= start:
        return {"datetime": _iso(start)}
    return {"datetime": None, "start_datetime": _iso(start), "end_datetime": _iso(stop)}


def _outline(grid: GeoGrid, points: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid's bounding box as a closed counter-clockwise ring with ``points`` per edge."""
    x0, y0, x1, y1 = grid.bbox
    t = np.linspace(0.0, 1.0, points)[:-1]
    xs = np.concatenate([x0 + (x1 - x0) * t, np.full_like(t, x1), x1 - (x1 - x0) * t, np.full_like(t, x0), [x0]])
    ys = np.concatenate([np.full_like(t, y0), y0 + (y1 - y0) * t, np.full_like(t, y1), y1 - (y1 - y0) * t, [y0]])
    return xs, ys


def footprint(grid: GeoGrid) -> tuple[dict[str, Any], list[float]]:
    """GeoJSON Polygon and bbox in EPSG:4326 of the grid's area (STAC's geometry and bbox)."""
    from pyproj import CRS, Transformer

    transformer = Transformer.from_crs(CRS.from_user_input(grid.crs), CRS.from_user_input(WGS84), always_xy=True)

    def lonlat(points: int) -> tuple[np.ndarray, np.ndarray]:
        lon, lat = transformer.transform(*_outline(grid, points))
        if not (np.isfinite(lon).all() and np.isfinite(lat).all()):
            raise ValueError(f"the grid's outline does not project to lon/lat from {grid.crs}")
        return np.asarray(lon), np.asarray(lat)

    lon, lat = lonlat(FOOTPRINT_POINTS)
    ring = [[round(float(x), LONLAT_DECIMALS), round(float(y), LONLAT_DECIMALS)] for x, y in zip(lon, lat, strict=True)]
    ring[-1] = ring[0]  # closed exactly, whatever the rounding
    dense_lon, dense_lat = lonlat(BBOX_POINTS)
    scale = 10.0**LONLAT_DECIMALS  # rounded outwards: the bbox contains the whole grid
    lo = [math.floor(float(v.min()) * scale) / scale for v in (dense_lon, dense_lat)]
    hi = [math.ceil(float(v.max()) * scale) / scale for v in (dense_lon, dense_lat)]
    bbox = [lo[0], lo[1], hi[0], hi[1]]
    return {"type": "Polygon", "coordinates": [ring]}, bbox


def projection_fields(grid: GeoGrid) -> dict[str, Any]:
    """proj:code (or proj:wkt2 for a CRS without one), bbox, shape, transform and geometry in
    the grid's own CRS."""
    from pyproj import CRS

    x0, y0, x1, y1 = grid.bbox
    crs: dict[str, Any] = {"proj:code": grid.crs} if _AUTH_CODE.match(grid.crs) else {
        "proj:code": None, "proj:wkt2": CRS.from_user_input(grid.crs).to_wkt()}  # fmt: skip
    return {
        **crs,
        "proj:bbox": [x0, y0, x1, y1],
        "proj:shape": list(grid.shape),
        "proj:transform": list(grid.transform),
        "proj:geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
    }


def resolution_m(grid: GeoGrid) -> float | None:
    """Pixel size in metres of a projected grid; None for a geographic one (no single value)."""
    from pyproj import CRS

    crs = CRS.from_user_input(grid.crs)
    if crs.is_geographic or not crs.axis_info:
        return None
    return abs(grid.resolution[0]) * crs.axis_info[0].unit_conversion_factor


def raster_bands(labels: Sequence[str], dtype: Any, nodata: float | None, grid: GeoGrid,
                 scale_offset: tuple[float, float] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """STAC 1.1 ``bands`` with the raster extension's fields: name, data_type, nodata ("nan"
    for floats, whose missing value is NaN), pixel sampling and size, scale/offset when the
    stored values are packed."""
    dt = np.dtype(dtype)
    common: dict[str, Any] = {"data_type": dt.name if dt.name in _STAC_DATA_TYPES else "other"}
    if dt.kind == "f":
        common["nodata"] = "nan"
    elif nodata is not None:
        common["nodata"] = nodata
    common["raster:sampling"] = "area"  # pixel-is-area (spatial:registration "pixel")
    size = resolution_m(grid)
    if size is not None:
        common["raster:spatial_resolution"] = size
    if scale_offset is not None:
        common["raster:scale"], common["raster:offset"] = scale_offset
    return [{"name": label, **common} for label in labels]


# ------------------------------------------------------------------------------------ builders


@dataclass(frozen=True)
class RasterOutput:
    """What a raster item describes: a store's grid, times, bands and values."""

    grid: GeoGrid
    times: np.ndarray  # datetime64
    bands: tuple[str, ...]
    dtype: str
    nodata: float | None = None
    end: np.datetime64 | None = None  # inclusive end when the last time step spans a window
    title: str = ""
    properties: Mapping[str, Any] = field(default_factory=dict)  # extra summary fields


def raster_item(prov: Provenance, id_: str, out: RasterOutput, collection: str | None = None) -> dict[str, Any]:
    """The STAC Item of a GeoZarr store; its ``data`` asset is the store (``./``: the item sits
    inside it). ``collection``: the id of the Mosaic index collection the store belongs to."""
    geometry, bbox = footprint(out.grid)
    links = _links(prov)
    if collection is not None:
        links.append({"rel": REL_COLLECTION, "href": f"../{COLLECTION_FILE}", "type": JSON_TYPE})
    item: dict[str, Any] = {
        "type": "Feature",
        "stac_version": stacschema.STAC_VERSION,
        "stac_extensions": [stacschema.PROCESSING_EXTENSION, stacschema.PROJECTION_EXTENSION,
                            stacschema.RASTER_EXTENSION],  # fmt: skip
        "id": id_,
        "geometry": geometry,
        "bbox": bbox,
        "properties": {
            **time_fields(out.times, prov.created, out.end),
            "created": prov.created,
            **processing_fields(prov),
            **projection_fields(out.grid),
            **rasterkube_fields(prov),
            **out.properties,
        },
        "links": links,
        "assets": {
            ASSET_DATA: {
                "href": "./",
                "type": ZARR_TYPE,
                "title": out.title or f"GeoZarr store of {prov.kind} {prov.namespace}/{prov.name}",
                "roles": ["data"],
                "bands": raster_bands(out.bands, out.dtype, out.nodata, out.grid),
            }
        },
    }
    if collection is not None:
        item["collection"] = collection
    return item


@dataclass(frozen=True)
class FileAsset:
    """One file of a vector output, beside the item."""

    key: str
    filename: str
    media_type: str
    crs: str
    title: str
    roles: tuple[str, ...] = ("data",)


def vector_item(prov: Provenance, id_: str, area: GeoGrid, times: np.ndarray, files: Sequence[FileAsset],
                properties: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The STAC Item of a file output (GeoParquet, PMTiles). Its geometry is the analysed
    ``area`` (the source grid: where features were looked for, also when none were found);
    each asset's proj:code is the CRS of its geometries."""
    geometry, bbox = footprint(area)

    def asset(f: FileAsset) -> dict[str, Any]:
        crs = {"proj:code": f.crs} if _AUTH_CODE.match(f.crs) else {"proj:wkt2": f.crs}
        return {"href": f"./{f.filename}", "type": f.media_type, "title": f.title, "roles": list(f.roles), **crs}

    return {
        "type": "Feature",
        "stac_version": stacschema.STAC_VERSION,
        "stac_extensions": [stacschema.PROCESSING_EXTENSION, stacschema.PROJECTION_EXTENSION],
        "id": id_,
        "geometry": geometry,
        "bbox": bbox,
        "properties": {
            **time_fields(times, prov.created),
            "created": prov.created,
            **processing_fields(prov),
            **rasterkube_fields(prov),
            **(properties or {}),
        },
        "links": _links(prov),
        "assets": {f.key: asset(f) for f in files},
    }


def index_collection(prov: Provenance, id_: str, rows: Sequence[tuple[str, Mapping[str, Any]]],
                     index_filename: str) -> dict[str, Any]:  # fmt: skip
    """The STAC Collection of a Mosaic index: ``rows`` are (href relative to the collection,
    item) of every row store; the index GeoParquet is its asset. The processing fields sit
    on the provider (where the extension wants them for collections)."""
    boxes = [list(item["bbox"]) for _, item in rows]
    union = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    starts, ends = [], []
    for _, item in rows:
        p = item["properties"]
        starts.append(p.get("start_datetime") or p["datetime"])
        ends.append(p.get("end_datetime") or p["datetime"])
    return {
        "type": "Collection",
        "stac_version": stacschema.STAC_VERSION,
        "stac_extensions": [stacschema.PROCESSING_EXTENSION],
        "id": id_,
        "title": f"{prov.kind} {prov.namespace}/{prov.name}",
        "description": f"One GeoZarr store per AOI row of the {prov.kind} {prov.namespace}/{prov.name}: {prov.lineage}",
        "license": LICENSE,
        # STAC 1.1: the overall box alone, or followed by two or more sub-boxes (one row: alone).
        "extent": {"spatial": {"bbox": [union, *boxes] if len(boxes) > 1 else [union]},
                   "temporal": {"interval": [[min(starts), max(ends)]]}},  # fmt: skip
        "providers": [{"name": SOFTWARE, "roles": ["processor"], **processing_fields(prov)}],
        "links": [{"rel": REL_ITEM, "href": href, "type": GEOJSON_TYPE, "title": item["id"]} for href, item in rows]
        + _links(prov),
        "assets": {
            ASSET_INDEX: {"href": f"./{index_filename}", "type": PARQUET_TYPE, "roles": ["metadata"],
                          "title": "Mosaic index (GeoParquet): one row per store, its geometry and location"}  # fmt: skip
        },
        **rasterkube_fields(prov),
    }


# -------------------------------------------------------------------------------------- I/O


def dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def store_item_uri(store_uri: str) -> str:
    return storage.join(store_uri, ITEM_FILE)


def file_item_uri(file_uri: str) -> str:
    return file_uri + ITEM_SUFFIX


def collection_uri(index_dir: str) -> str:
    return storage.join(index_dir, COLLECTION_FILE)


def validated(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` once it validates against the shipped schemas (raises otherwise)."""
    stacschema.validate(doc)
    return doc


def write_into_store(tmp_store_uri: str, doc: Mapping[str, Any]) -> None:
    """Validate and write a store's item into its temporary prefix (the commit publishes it)."""
    stacschema.validate(dict(doc))
    fs, path = storage.filesystem(tmp_store_uri)
    fs.pipe_file(posixpath.join(path, ITEM_FILE), dumps(doc).encode())


def commit_json(uri: str, doc: Mapping[str, Any], run_id: str) -> None:
    """Validate ``doc`` and make it appear at ``uri`` whole (storage.commit_file)."""
    stacschema.validate(dict(doc))
    text = dumps(doc)

    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)

    storage.commit_file(write, uri, run_id)


def read(uri: str) -> dict[str, Any]:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "r", encoding="utf-8") as fh:
        return dict(json.load(fh))


def source_item_href(source_uri: str) -> str | None:
    """The item inside a source store (one rasterkube wrote), for the ``derived_from`` link."""
    uri = store_item_uri(storage.normalize(source_uri))
    return uri if storage.exists(uri) else None


def from_source_store(resource: Any, request: Any, lineage: str, **extra: Any) -> Provenance:
    """The provenance of a job that reads one store (``request.source_uri``)."""
    source = request.source_uri
    derived = source_item_href(source)
    return Provenance.of(resource, request.run_id, lineage, sources=(source,),
                         derived_from=(derived,) if derived else (), **extra)  # fmt: skip
