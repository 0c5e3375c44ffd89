"""What a raster store says about itself → how rasterkube reads it. Pure functions, no I/O.

rasterkube's own stores say it one way (DESIGN §3): one ``variables`` array with dims
``(time, band, y, x)``, the ``proj:``/``spatial:`` group attributes, NaN (or the zarr fill
value) for missing pixels. Stores written by other tools say the same things in other ways,
and :func:`rasterkube.geozarr.describe` turns all of them into one :class:`SourceLayout`
(which arrays hold which bands, in which dim order, how to decode them) plus a
:class:`~rasterkube.grid.GeoGrid`, with these functions:

* **dims** (:func:`canonical_axes`): ``y``/``lat``/``latitude`` and ``x``/``lon``/``longitude``
  (or the names ``spatial:dimensions`` gives), ``time`` (optional: a store without it is one
  time step), ``band``/``bands``/``channel`` (optional: a variable without it is one band), in
  any order.
* **bands** (:func:`choose_arrays`): the ``dataVar`` variable; else the only variable on the
  grid; else — the odc-stac layout, one variable per band — every variable on the grid,
  each one band, in alphabetical order of their names.
* **grid** (:func:`grid_from_metadata`): the CRS from ``proj:code``/``proj:wkt2``/
  ``proj:projjson``, else from the CF grid-mapping variable that rioxarray and odc-geo write
  (``crs_wkt``/``spatial_ref`` WKT, or CF projection parameters); the transform from
  ``spatial:transform``, else the grid mapping's GDAL ``GeoTransform``, else the x/y
  coordinates (pixel centres, regularly spaced); all of them checked against each other.
* **nodata and packing** (:func:`cf_decoding`): the CF attributes ``_FillValue``,
  ``missing_value``, ``scale_factor``, ``add_offset``, ``_Unsigned`` (and the ``nodata``
  attribute odc-stac and GDAL-minded writers use, read as ``_FillValue``) are kept as they are
  and applied to each block read by xarray's own CF decoding
  (:func:`xarray.conventions.decode_cf_variable`), so foreign stores read as xarray users see
  them: scale and offset applied, nodata → NaN.

What a store does not say is refused with a :class:`LayoutError` that names what is missing
and how to add it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from rasterkube.constants import DATA_VAR, DIMS
from rasterkube.grid import GeoGrid

TIME, BAND, Y, X = DIMS
#: Dim names read as each canonical axis (lower case); ``spatial:dimensions`` may name others.
AXIS_NAMES: Final[dict[str, tuple[str, ...]]] = {
    TIME: ("time",),
    BAND: ("band", "bands", "channel"),
    Y: ("y", "lat", "latitude"),
    X: ("x", "lon", "longitude"),
}
#: CF attributes that change what raw values mean; xarray's CF coders apply them.
CF_DECODING_ATTRS: Final = ("_FillValue", "missing_value", "scale_factor", "add_offset", "_Unsigned")
#: Not CF, but how odc-stac (and GDAL-minded writers) mark nodata: read as ``_FillValue``.
NODATA_ATTR: Final = "nodata"
#: The CF grid-mapping variable rioxarray and odc-geo write (and rasterkube outputs carry).
SPATIAL_REF: Final = "spatial_ref"
GRID_MAPPING_ATTR: Final = "grid_mapping"
WKT_ATTRS: Final = ("crs_wkt", "spatial_ref")
GEOTRANSFORM_ATTR: Final = "GeoTransform"
#: Coordinates and transforms agree when they differ by less than this share of a pixel.
GRID_TOLERANCE: Final = 1e-3
#: Source chunks larger than this per side are read in windows of this size (planning only):
#: blocks stay small whatever chunking the writer chose, so job memory stays flat.
MAX_PLAN_CHUNK: Final = 512

HOW_TO_CRS: Final = (
    "add one: with rioxarray `ds = ds.rio.write_crs('EPSG:32633')` (writes the spatial_ref coordinate), "
    "or the attribute `ds.attrs['proj:code'] = 'EPSG:32633'`"
)
HOW_TO_DIMS: Final = "rename them, e.g. `ds = ds.rename({'row': 'y', 'col': 'x'})`"


#: Where a message names the store (else the store's URI is put in front of it).
STORE: Final = "{store}"


class LayoutError(ValueError):
    """The store does not say something rasterkube needs; the message says how to add it.

    ``field`` is the part of a request at fault (``source`` or ``dataVar``)."""

    def __init__(self, message: str, field: str = "source") -> None:
        super().__init__(message)
        self.field = field

    def about(self, uri: str) -> str:
        """The message with the store named."""
        text = str(self)
        return text.replace(STORE, uri) if STORE in text else f"{uri}: {text}"


@dataclass(frozen=True)
class ArrayRef:
    """One zarr array holding some of the bands, and how its dims map onto (time, band, y, x).

    ``cf``: the CF attributes to decode its raw values with (empty: the raw values are the data)."""

    path: str
    dims: tuple[str, ...]
    y_dim: str
    x_dim: str
    time_dim: str | None = None
    band_dim: str | None = None
    cf: tuple[tuple[str, Any], ...] = ()

    def axis_of(self, dim: str) -> str:
        return {self.time_dim: TIME, self.band_dim: BAND, self.y_dim: Y, self.x_dim: X}[dim]


@dataclass(frozen=True)
class SourceLayout:
    """How to read a store's bands as (time, band, y, x) blocks (put in Ray's object store once).

    ``bands[i]`` = (index into ``arrays``, position along that array's band dim or None).
    ``native``: one (time, band, y, x) array whose raw values are the data — read as is."""

    uri: str
    arrays: tuple[ArrayRef, ...]
    bands: tuple[tuple[int, int | None], ...]
    dtype: np.dtype
    native: bool
    n_times: int


# ------------------------------------------------------------------------------------- dims


def canonical_axes(dims: Sequence[str], spatial_dims: Sequence[str] | None = None) -> dict[str, str]:
    """Canonical axis (time, band, y, x) → the store's dim name, for the dims of one variable.

    ``spatial_dims``: the (y, x) names the ``spatial:dimensions`` attribute gives, if any.
    Time and band may be absent; y and x may not; a dim that is none of them is an error."""
    found: dict[str, str] = {}
    unknown = []
    for dim in dims:
        axis = _axis_of(dim, spatial_dims)
        if axis is None or axis in found:
            unknown.append(dim)
        else:
            found[axis] = dim
    if unknown:
        names = ", ".join(f"{a}: {'/'.join(n)}" for a, n in AXIS_NAMES.items())
        raise LayoutError(
            f"dims {', '.join(map(repr, unknown))} of ({', '.join(dims)}) are not ones rasterkube reads "
            f"(it reads {names}; time and band may be left out); {HOW_TO_DIMS}, or drop the extra dim with "
            "`ds.isel(...)`"
        )
    missing = [a for a in (Y, X) if a not in found]
    if missing:
        raise LayoutError(
            f"dims ({', '.join(dims)}) have no {' and no '.join(missing)} dim (it reads {Y}: {'/'.join(AXIS_NAMES[Y])}, "
            f"{X}: {'/'.join(AXIS_NAMES[X])}); {HOW_TO_DIMS}"
        )
    return found


def _axis_of(dim: str, spatial_dims: Sequence[str] | None) -> str | None:
    if spatial_dims and len(spatial_dims) == 2 and dim in spatial_dims:
        return Y if dim == spatial_dims[0] else X
    lower = dim.lower()
    return next((axis for axis, names in AXIS_NAMES.items() if lower in names), None)


def on_grid(dims: Sequence[str], spatial_dims: Sequence[str] | None = None) -> bool:
    """Whether a variable with ``dims`` has both spatial dims (a raster, not a coordinate)."""
    axes = {_axis_of(d, spatial_dims) for d in dims}
    return Y in axes and X in axes


# ------------------------------------------------------------------------------------ bands


def choose_arrays(data_var: str, variables: Mapping[str, Sequence[str]],
                  spatial_dims: Sequence[str] | None = None) -> list[str]:  # fmt: skip
    """Which variables hold the bands: ``data_var`` if the store has it; else (only when
    ``data_var`` is the default name) the one variable on the grid, or — one variable per
    band, as odc-stac writes — all variables on the grid, in alphabetical order.

    ``variables``: data variable name → dims."""
    if data_var in variables:
        return [data_var]
    rasters = {name: tuple(dims) for name, dims in variables.items() if on_grid(dims, spatial_dims)}
    listing = ", ".join(f"{n} {tuple(d)}" for n, d in sorted(variables.items())) or "none"
    if data_var != DATA_VAR or not rasters:
        raise LayoutError(f"{data_var!r} is not a variable of {STORE} (its variables: {listing})",
                          "dataVar" if data_var != DATA_VAR else "source")  # fmt: skip
    if len(rasters) == 1:
        return list(rasters)
    with_band = [n for n, dims in rasters.items() if BAND in canonical_axes(dims, spatial_dims)]
    if with_band:
        raise LayoutError(
            f"the store has no {DATA_VAR!r} variable and several rasters with a band dim ({', '.join(sorted(with_band))}); "
            f"name the one to read (ChangeScore: spec.dataVar), or keep only one, e.g. `ds[['{sorted(with_band)[0]}']]`",
            "dataVar",
        )
    dims_seen = {tuple(canonical_axes(d, spatial_dims).items()) for d in rasters.values()}
    if len(dims_seen) > 1:
        raise LayoutError(
            f"the store has one variable per band but they differ in dims ({listing}); give them all the same dims "
            "(e.g. `ds = ds.drop_vars([...])` or `ds.expand_dims('time')`)"
        )
    return sorted(rasters)


def band_labels(values: Sequence[Any] | None, size: int) -> tuple[str, ...]:
    """Band labels from a band coordinate (as strings); GDAL's numbers 1..n without one."""
    if values is None:
        return tuple(str(i + 1) for i in range(size))
    labels = tuple(str(v.item() if isinstance(v, np.generic) else v) for v in values)
    if len(set(labels)) != len(labels):
        raise LayoutError(f"the band coordinate has repeated labels ({', '.join(labels)}); make them unique")
    return labels


def band_selection(wanted: Sequence[int], band_chunk: int) -> tuple[slice | list[int], list[int] | None]:
    """How to read bands ``wanted`` of an array chunked by ``band_chunk`` along its band dim:
    (selection, picks within what it reads). The span from the first to the last band as one
    slice — a plain read, much faster in zarr than a list — when it touches no chunk that no
    wanted band needs (all bands in one chunk: the common layout); else the list itself
    (orthogonal indexing reads only the chunks of those bands, e.g. one band per chunk)."""
    lo, hi = min(wanted), max(wanted) + 1
    if len({i // band_chunk for i in wanted}) < (hi - 1) // band_chunk - lo // band_chunk + 1:
        return list(wanted), None
    picks = [i - lo for i in wanted]
    return slice(lo, hi), None if picks == list(range(hi - lo)) else picks


# ------------------------------------------------------------------------------------- grid


def crs_string(crs_input: Any) -> str:
    """A CRS as rasterkube names it: ``AUTH:CODE`` when the definition is exactly one, else WKT2."""
    from pyproj import CRS

    crs = CRS.from_user_input(crs_input)
    auth = crs.to_authority(min_confidence=100)
    if auth is not None:
        candidate = CRS.from_user_input(":".join(auth))
        if candidate == crs:
            return ":".join(auth)
    return crs.to_wkt()


def crs_from_metadata(attrs: Mapping[str, Any], grid_mapping: Mapping[str, Any] | None) -> str | None:
    """The CRS the store declares (``proj:`` attributes first, then the CF grid mapping), or None."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    candidates: list[tuple[str, Any]] = []
    for key in ("proj:code", "proj:wkt2", "proj:projjson"):
        if attrs.get(key):
            candidates.append((key, attrs[key]))
            break
    if not candidates and grid_mapping:
        wkt = next((grid_mapping[k] for k in WKT_ATTRS if isinstance(grid_mapping.get(k), str) and grid_mapping[k]), None)
        if wkt is not None:
            candidates.append(("crs_wkt", wkt))
        elif grid_mapping.get("grid_mapping_name"):
            try:
                return crs_string(CRS.from_cf(dict(grid_mapping)))
            except (CRSError, ValueError, KeyError) as exc:
                raise LayoutError(f"its grid mapping has CF parameters pyproj cannot read ({exc}); {HOW_TO_CRS}") from None
    for key, value in candidates:
        try:
            return crs_string(value)
        except CRSError as exc:
            raise LayoutError(f"its {key} is not a CRS pyproj knows ({exc}); {HOW_TO_CRS}") from None
    return None


def transform_from_coords(values: np.ndarray, axis: str) -> tuple[float, float]:
    """(pixel size, edge of the first pixel) from 1-D pixel-centre coordinates (regular spacing)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) < 2 or not np.isfinite(v).all():
        raise LayoutError(f"the {axis} coordinate has {len(v)} value(s); a transform needs at least 2 "
                          f"(or a GeoTransform: `ds.rio.write_transform(...)`)")  # fmt: skip
    step = (v[-1] - v[0]) / (len(v) - 1)
    if step == 0 or np.abs(np.diff(v) - step).max() > GRID_TOLERANCE * abs(step):
        raise LayoutError(
            f"the {axis} coordinate is not regularly spaced; rasterkube reads regular grids: resample it first "
            "(e.g. rioxarray `ds.rio.reproject(...)` or odc-geo `ds.odc.reproject(...)`)"
        )
    return float(step), float(v[0] - step / 2)


def parse_geotransform(value: Any) -> tuple[float, float, float, float, float, float]:
    """GDAL's ``GeoTransform`` ("c a b f d e") → the affine (a, b, c, d, e, f)."""
    parts = value.split() if isinstance(value, str) else list(value)
    try:
        c, a, b, f, d, e = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise LayoutError(f"its {GEOTRANSFORM_ATTR} {value!r} is not six numbers (c a b f d e, GDAL's order)") from None
    return a, b, c, d, e, f


def grid_from_metadata(
    attrs: Mapping[str, Any],
    grid_mapping: Mapping[str, Any] | None,
    shape: tuple[int, int],
    ys: np.ndarray | None,
    xs: np.ndarray | None,
) -> GeoGrid:
    """The store's grid: CRS and transform from what it declares, checked against its x/y
    coordinates (pixel centres) and its data's ``shape`` (height, width)."""
    crs = crs_from_metadata(attrs, grid_mapping)
    if crs is None:
        raise LayoutError(
            "it declares no CRS (no proj:code/proj:wkt2 attribute, no grid mapping variable with crs_wkt "
            f"or spatial_ref); {HOW_TO_CRS}"
        )
    from_coords = None
    if ys is not None and xs is not None and len(ys) > 1 and len(xs) > 1:
        a, c = transform_from_coords(xs, X)
        e, f = transform_from_coords(ys, Y)
        from_coords = (a, 0.0, c, 0.0, e, f)
    declared, source = None, ""
    if "spatial:transform" in attrs:
        declared, source = tuple(float(v) for v in attrs["spatial:transform"]), "spatial:transform"
        declared_shape = tuple(int(v) for v in attrs.get("spatial:shape", shape))
        if declared_shape != tuple(shape):
            raise LayoutError(f"its spatial:shape {list(declared_shape)} is not the data's (y, x) shape {list(shape)}; "
                              "fix the attribute")  # fmt: skip
    elif grid_mapping and grid_mapping.get(GEOTRANSFORM_ATTR) is not None:
        declared, source = parse_geotransform(grid_mapping[GEOTRANSFORM_ATTR]), GEOTRANSFORM_ATTR
    if declared is not None and from_coords is not None and not transforms_agree(declared, from_coords, shape):
        raise LayoutError(
            f"its {source} {list(declared)} disagrees with its x/y coordinates (which give {list(from_coords)}); "
            f"fix or remove the {source} attribute"
        )
    transform = declared or from_coords
    if transform is None:
        raise LayoutError(
            "it declares no transform (no spatial:transform attribute, no GeoTransform, no x/y coordinates); "
            "add x/y coordinates (pixel centres) or `ds.rio.write_transform(transform)`"
        )
    try:
        return GeoGrid(crs, transform, shape)  # type: ignore[arg-type]
    except ValueError as exc:
        raise LayoutError(f"its grid is not one rasterkube reads ({exc})") from None


def transforms_agree(t1: Sequence[float], t2: Sequence[float], shape: tuple[int, int]) -> bool:
    """Whether two affines put every pixel corner of a ``shape`` grid within GRID_TOLERANCE pixel."""
    a1, b1, c1, d1, e1, f1 = t1
    a2, b2, c2, d2, e2, f2 = t2
    h, w = shape
    pixel = min(abs(a1), abs(e1)) or 1.0
    corners = [(0, 0), (w, 0), (0, h), (w, h)]
    for col, row in corners:
        x1, y1 = a1 * col + b1 * row + c1, d1 * col + e1 * row + f1
        x2, y2 = a2 * col + b2 * row + c2, d2 * col + e2 * row + f2
        if math.hypot(x1 - x2, y1 - y2) > GRID_TOLERANCE * pixel:
            return False
    return True


# ---------------------------------------------------------------------------------- nodata


def cf_decoding(attrs: Mapping[str, Any], raw_dtype: np.dtype) -> tuple[tuple[str, Any], ...]:
    """The CF attributes that change what ``raw_dtype`` values mean (empty: they mean themselves).

    ``attrs`` as xarray reports them with ``mask_and_scale=False`` (``_FillValue`` decoded
    from zarr v3's base64 and zarr v2's ``fill_value``). A NaN fill on float data changes
    nothing (NaN is already missing) and is dropped, so such stores keep the raw fast path."""
    cf: dict[str, Any] = {k: _plain(attrs[k]) for k in CF_DECODING_ATTRS if k in attrs and attrs[k] is not None}
    if NODATA_ATTR in attrs and "_FillValue" not in cf and attrs[NODATA_ATTR] is not None:
        cf["_FillValue"] = _plain(attrs[NODATA_ATTR])
    if np.dtype(raw_dtype).kind == "f":
        for key in ("_FillValue", "missing_value"):
            if key in cf and _all_nan(cf[key]):
                del cf[key]
    return tuple(sorted(cf.items()))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _all_nan(value: Any) -> bool:
    try:
        return bool(np.all(np.isnan(np.asarray(value, dtype=np.float64))))
    except (TypeError, ValueError):
        return False


def is_native(dims: Sequence[str], cf: Sequence[Any], n_arrays: int) -> bool:
    """rasterkube's own layout: one (time, band, y, x) array whose raw values are the data."""
    return n_arrays == 1 and tuple(dims) == DIMS and not cf


def plan_chunks(chunks: Mapping[str, int], axes: Mapping[str, str], n_bands: int) -> tuple[int, int, int, int]:
    """(time, band, y, x) chunk sizes for block planning; y/x capped at MAX_PLAN_CHUNK."""
    t = chunks.get(axes.get(TIME, ""), 1)
    b = chunks.get(axes.get(BAND, ""), n_bands)
    return int(t), int(b), min(int(chunks[axes[Y]]), MAX_PLAN_CHUNK), min(int(chunks[axes[X]]), MAX_PLAN_CHUNK)
