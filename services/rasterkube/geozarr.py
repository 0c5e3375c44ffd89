"""GeoZarr stores: ``(time, band, y, x)`` arrays with ``proj:``/``spatial:`` attributes.

All raster outputs (mosaics, predictions, scores) share this layout (DESIGN §3). Jobs create
the store's metadata once on the driver, workers write disjoint chunk-aligned regions, and
:func:`finalize` consolidates the metadata into the root ``zarr.json`` before the commit.
Outputs also carry the CF ``spatial_ref`` grid-mapping variable (``crs_wkt``, ``spatial_ref``,
``GeoTransform``) named by each raster's ``grid_mapping`` attribute, so rioxarray, odc-geo
and GDAL find their CRS and transform too.

Reading is one layer for every service: :func:`describe` opens any store — rasterkube's, or
one written by xarray (zarr v2 or v3), rioxarray or odc-stac — and normalises what it says
into a :class:`StoreInfo` (grid, times, bands, nodata, and a
:class:`~rasterkube.storelayout.SourceLayout` saying how to read it; the interpretation is
the pure functions of :mod:`rasterkube.storelayout`). :func:`read_block` reads any window of
it as decoded (time, band, y, x) values, touching only the chunks the window needs.
Everything here is I/O; the numerics live elsewhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import xarray as xr
import zarr

from rasterkube import storage
from rasterkube import storelayout as L
from rasterkube.constants import DATA_VAR, DIMS
from rasterkube.errors import UserError
from rasterkube.grid import GeoGrid, Window, conventions
from rasterkube.storelayout import SourceLayout

TIME_UNITS: Final = "seconds since 1970-01-01T00:00:00"
TIME_ATTRS: Final = {"units": TIME_UNITS, "calendar": "proleptic_gregorian", "standard_name": "time"}
# Keep one chunk of the data variable well under what a task should hold in memory.
MAX_CHUNK_BYTES: Final = 32 * 1024 * 1024
# Root attribute of the zarr-conventions multiscales layout (see rasterkube.multiscale). A store
# with it keeps its full-resolution arrays in the base level's child group, not at the root:
# xarray's DataTree requires child groups to align with their parents, so root (y, x) arrays
# and coarser children cannot coexist. Readers here resolve that group transparently.
MULTISCALES_ATTR: Final = "multiscales"
#: The CF grid-mapping variable of every output, and the attributes naming it on each raster.
SPATIAL_REF: Final = L.SPATIAL_REF
GRID_MAPPING_ATTRS: Final = {L.GRID_MAPPING_ATTR: SPATIAL_REF, "coordinates": SPATIAL_REF}
#: Root metadata files: zarr v3 (``zarr.json``) or v2 (``.zgroup``, written by zarr v2 writers).
ROOT_METADATA_FILES: Final = ("zarr.json", ".zgroup")
#: zarr v2 consolidated metadata: rewritten last by v2 writers, so it versions the store.
V2_CONSOLIDATED: Final = ".zmetadata"
CONVENTIONS_ATTR: Final = "zarr_conventions"
#: numpy kinds of the values a raster may hold: bool, signed and unsigned integers, floats.
NUMERIC_KINDS: Final = "biuf"


class StoreError(UserError):
    """A store that is missing, incomplete or not shaped like a rasterkube GeoZarr store.

    ``field`` says which part of the request is at fault (``source``, ``dataVar``, ``bands``),
    so callers can name the spec field in the message."""

    def __init__(self, message: str, field: str = "source") -> None:
        super().__init__(message)
        self.field = field

    def in_spec(self, source_field: str) -> UserError:
        """The same problem, named by its spec field (``source_field`` for source problems)."""
        return UserError(f"spec.{source_field if self.field == 'source' else self.field}: {self}")


def _store(uri: str, read_only: bool = False) -> Any:
    """A zarr store for ``uri``: a local path as is, anything else through fsspec."""
    if "://" not in uri:
        return uri
    return zarr.storage.FsspecStore.from_url(uri, storage_options=storage.storage_options(uri), read_only=read_only)


def _open_group(uri: str, mode: str = "r") -> zarr.Group:
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not yet part of the v3 spec; we rely on it.
        warnings.simplefilter("ignore", UserWarning)
        return zarr.open_group(_store(uri, read_only=mode == "r"), mode=mode)


def open_group(uri: str, mode: str = "r") -> zarr.Group:
    """The store's root group (consolidated metadata used when present)."""
    return _open_group(uri, mode=mode)


def level0_group(attrs: dict[str, Any]) -> str:
    """The group holding the full-resolution arrays: "" (the root) for a plain store, else the
    multiscales layout's base level (the entry not derived from another, by convention "0")."""
    multiscales = attrs.get(MULTISCALES_ATTR)
    if not multiscales:
        return ""
    layout = multiscales.get("layout") or []
    base = [entry["asset"] for entry in layout if "derived_from" not in entry]
    if not base:
        raise StoreError(f"the {MULTISCALES_ATTR} layout has no base level (every level is derived from another)")
    return str(base[0])


def _join_path(group: str, name: str) -> str:
    return f"{group}/{name}" if group else name


def open_data_array(uri: str, data_var: str, mode: str = "r") -> zarr.Array:
    """``data_var`` of a committed store, in its full-resolution group (root or multiscale level 0)."""
    group = _open_group(uri, mode=mode)
    return group[_join_path(level0_group(dict(group.attrs)), data_var)]  # type: ignore[return-value]


def _open_array(uri: str, path: str) -> zarr.Array:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return zarr.open_array(_store(uri, read_only=True), path=path, mode="r")


def to_epoch_seconds(times: Sequence[np.datetime64] | np.ndarray) -> np.ndarray:
    return np.asarray(times, dtype="datetime64[s]").astype(np.int64)


@dataclass(frozen=True)
class StoreInfo:
    """What a job needs to know about a store before reading it."""

    uri: str
    grid: GeoGrid
    times: np.ndarray  # datetime64[s]
    bands: tuple[str, ...]
    data_var: str
    dtype: np.dtype
    chunks: tuple[int, int, int, int]
    data_vars: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    #: How to read it (see :func:`read_block`); ``None`` only for a store being created.
    layout: L.SourceLayout | None = None
    #: A value that marks missing pixels besides NaN (the zarr fill value of rasterkube's own
    #: integer stores, e.g. 255 in uint8); None when NaN is the only nodata. Foreign stores'
    #: nodata is already NaN after decoding.
    nodata: float | None = None
    zarr_format: int = 3

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.times), len(self.bands), *self.grid.shape  # type: ignore[return-value]

    def band_indices(self, wanted: Sequence[str] | None, field_name: str = "bands") -> list[int]:
        """Indices of ``wanted`` bands, or a StoreError naming the field and the bands there are."""
        if wanted is None:
            return list(range(len(self.bands)))
        missing = [b for b in wanted if b not in self.bands]
        if missing:
            raise StoreError(
                f"{', '.join(map(repr, missing))} not in {self.uri} (its bands are {', '.join(self.bands)})",
                field=field_name,
            )
        return [self.bands.index(b) for b in wanted]


def default_chunks(n_bands: int, itemsize: int, spatial: int) -> tuple[int, int, int, int]:
    """One time step, all bands, square tiles; tiles shrink until a chunk fits MAX_CHUNK_BYTES."""
    while spatial > 64 and n_bands * spatial * spatial * itemsize > MAX_CHUNK_BYTES:
        spatial //= 2
    return 1, n_bands, spatial, spatial


def create(
    uri: str,
    grid: GeoGrid,
    times: Sequence[np.datetime64] | np.ndarray,
    bands: Sequence[str],
    *,
    dtype: str | np.dtype = "float32",
    chunk_size: int = 512,
    data_var: str = DATA_VAR,
    attrs: dict[str, Any] | None = None,
    fill_value: Any = None,
    extra_coords: dict[str, tuple[str, np.ndarray, dict[str, Any]]] | None = None,
    write: bool = True,
) -> StoreInfo:
    """Write the metadata and coordinates of an empty store; data chunks stay unwritten (fill).

    ``write=False`` writes nothing and only returns what ``create`` would describe: for a
    resumed staging store, which already has this metadata and some of its chunks (writing
    it again would delete them)."""
    dtype = np.dtype(dtype)
    if fill_value is None:
        fill_value = np.nan if dtype.kind == "f" else 0
    chunks = default_chunks(len(bands), dtype.itemsize, chunk_size)
    chunks = (1, chunks[1], min(chunks[2], grid.shape[0]), min(chunks[3], grid.shape[1]))
    group_attrs = {**grid.to_attrs(), CONVENTIONS_ATTR: conventions(), **(attrs or {})}
    if write:
        _write_metadata(uri, grid, times, bands, dtype, chunks, data_var, group_attrs, fill_value, extra_coords)
    return StoreInfo(
        uri=uri,
        grid=grid,
        times=np.asarray(times, dtype="datetime64[s]"),
        bands=tuple(bands),
        data_var=data_var,
        dtype=dtype,
        chunks=chunks,  # type: ignore[arg-type]
        data_vars=(data_var,),
        attrs=group_attrs,
        layout=L.SourceLayout(uri, (L.ArrayRef(data_var, DIMS, "y", "x", "time", "band"),),
                              tuple((0, i) for i in range(len(bands))), dtype, True, len(times)),  # fmt: skip
    )


def _write_metadata(
    uri: str,
    grid: GeoGrid,
    times: Sequence[np.datetime64] | np.ndarray,
    bands: Sequence[str],
    dtype: np.dtype,
    chunks: tuple[int, int, int, int],
    data_var: str,
    group_attrs: dict[str, Any],
    fill_value: Any,
    extra_coords: dict[str, tuple[str, np.ndarray, dict[str, Any]]] | None,
) -> None:
    group = _open_group(uri, mode="w")
    group.attrs.update(group_attrs)
    shape = (len(times), len(bands), *grid.shape)
    group.create_array(
        data_var,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill_value,
        dimension_names=DIMS,
        attributes={"grid_mapping_convention": "proj:", **GRID_MAPPING_ATTRS},
    )
    write_spatial_ref(group, grid)
    _coord(group, "time", to_epoch_seconds(times), time_attrs(times))
    _coord(group, "band", np.asarray(list(bands), dtype=str), {"long_name": "band label"})
    _coord(group, "y", grid.y_coords(), {"standard_name": "projection_y_coordinate", "axis": "Y"})
    _coord(group, "x", grid.x_coords(), {"standard_name": "projection_x_coordinate", "axis": "X"})
    for name, (dim, values, coord_attrs) in (extra_coords or {}).items():
        _coord(group, name, values, coord_attrs, dim=dim)


def time_attrs(times: Sequence[np.datetime64] | np.ndarray) -> dict[str, Any]:
    """CF attributes of a time coordinate; a missing time (NaT: a source without dates) is
    stored as int64 min with that as ``_FillValue``, which xarray decodes back to NaT."""
    if np.isnat(np.asarray(times, dtype="datetime64[s]")).any():
        return {**TIME_ATTRS, "_FillValue": int(np.iinfo(np.int64).min)}
    return dict(TIME_ATTRS)


def write_spatial_ref(group: zarr.Group, grid: GeoGrid) -> None:
    """The CF grid-mapping variable (a 0-d array, as rioxarray writes it) for ``grid``."""
    arr = group.create_array(SPATIAL_REF, shape=(), dtype="int64", dimension_names=(),
                             attributes=grid.cf_grid_mapping(), overwrite=True)  # fmt: skip
    arr[...] = 0


def _coord(group: zarr.Group, name: str, values: np.ndarray, attrs: dict[str, Any], dim: str | None = None) -> None:
    arr = group.create_array(
        name, shape=values.shape, dtype=values.dtype if values.dtype.kind != "U" else str,
        dimension_names=(dim or name,), attributes=attrs,
    )  # fmt: skip
    arr[:] = values


def add_variable(
    uri: str, name: str, like: StoreInfo, *, n_bands: int | None, dtype: str | np.dtype, fill_value: Any
) -> None:
    """A second variable on the same grid, e.g. the per-window observation count of a mosaic.

    With ``n_bands=None`` it has dims (time, y, x)."""
    group = _open_group(uri, mode="a")
    if n_bands is None:
        shape, chunks, dims = (len(like.times), *like.grid.shape), (1, *like.chunks[2:]), ("time", "y", "x")
    else:
        shape, chunks = (len(like.times), n_bands, *like.grid.shape), (1, n_bands, *like.chunks[2:])
        dims = ("time", "band", "y", "x")
    group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value, dimension_names=dims,
                       attributes=dict(GRID_MAPPING_ATTRS))  # fmt: skip


def write_region(uri: str, data_var: str, window: Window, data: np.ndarray, time: slice | int = slice(None)) -> None:
    """Write ``data`` ((time, band, y, x) or (time, y, x)) into a chunk-aligned window."""
    arr = zarr.open_array(_store(uri), path=data_var, mode="r+")
    ys, xs = window.slices
    if arr.ndim == 4:
        arr[time, :, ys, xs] = data
    else:
        arr[time, ys, xs] = data


def read_region(
    uri: str,
    data_var: str,
    window: Window,
    band_indices: Sequence[int] | None = None,
    time: slice = slice(None),
) -> np.ndarray:
    """Read (time, band, y, x) of ``window`` of any store :func:`describe` accepts; bands
    picked in the order given. Describes the store first: jobs describe once and call
    :func:`read_block` with the layout."""
    layout = describe(uri, data_var).layout
    assert layout is not None
    return read_block(layout, window, band_indices, time)


def read_block(
    layout: L.SourceLayout,
    window: Window,
    band_indices: Sequence[int] | None = None,
    time: slice = slice(None),
    step: int = 1,
) -> np.ndarray:
    """Decoded (time, band, y, x) values of ``window`` (every ``step``-th pixel), bands in the
    order given. Reads only the chunks the window touches; plain and multiscale stores alike
    (the layout points at the full-resolution level).

    rasterkube's own layout is read as it is. Other layouts are read per array in their own dim
    order, decoded with xarray's CF decoding (scale/offset applied, nodata → NaN) and put in
    (time, band, y, x) order."""
    wanted = list(range(len(layout.bands))) if band_indices is None else [int(i) for i in band_indices]
    ys = slice(window.y0, window.y1, step)
    xs = slice(window.x0, window.x1, step)
    if layout.native:
        arr = _open_array(layout.uri, layout.arrays[0].path)
        block = arr[time, :, ys, xs]
        if wanted != list(range(arr.shape[1])):
            block = block[:, wanted]
        return np.asarray(block)
    shape = (len(range(layout.n_times)[time]), len(wanted), len(range(window.y0, window.y1, step)),
             len(range(window.x0, window.x1, step)))  # fmt: skip
    out = np.empty(shape, dtype=layout.dtype)
    by_array: dict[int, list[tuple[int, int | None]]] = {}
    for position, band in enumerate(wanted):
        array_index, along = layout.bands[band]
        by_array.setdefault(array_index, []).append((position, along))
    for array_index, members in by_array.items():
        ref = layout.arrays[array_index]
        arr = _open_array(layout.uri, ref.path)
        picks: dict[str, Any] = {L.TIME: time, L.Y: ys, L.X: xs}
        after: list[int] | None = None
        if ref.band_dim is not None:
            along = [int(i) for _, i in members if i is not None]
            picks[L.BAND], after = L.band_selection(along, arr.chunks[ref.dims.index(ref.band_dim)])
        key = tuple(picks[ref.axis_of(d)] for d in ref.dims)
        raw = arr.oindex[key] if isinstance(picks.get(L.BAND), list) else arr[key]
        if after is not None:  # the bands asked for, out of the span read
            raw = np.take(raw, after, axis=ref.dims.index(ref.band_dim))  # type: ignore[arg-type]
        out[:, [p for p, _ in members]] = to_canonical(decode(np.asarray(raw), ref), ref)
    return out


def decode(raw: np.ndarray, ref: L.ArrayRef) -> np.ndarray:
    """Raw values of ``ref`` decoded by xarray's CF decoding (its ``cf`` attributes)."""
    if not ref.cf:
        return raw
    from xarray.conventions import decode_cf_variable

    variable = xr.Variable(ref.dims, raw, attrs=dict(ref.cf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SerializationWarning on e.g. a _FillValue/missing_value pair
        decoded = decode_cf_variable(ref.path, variable, mask_and_scale=True, decode_times=False,
                                     decode_timedelta=False)  # fmt: skip
    return np.asarray(decoded.values)


def to_canonical(data: np.ndarray, ref: L.ArrayRef) -> np.ndarray:
    """An array in ``ref.dims`` order → (time, band, y, x), length-1 axes for absent time/band."""
    present = [ref.axis_of(d) for d in ref.dims]
    data = np.transpose(data, [present.index(axis) for axis in DIMS if axis in present])
    if ref.time_dim is None:
        data = data[None]
    if ref.band_dim is None:
        data = data[:, None]
    return data


def decoded_dtype(raw_dtype: np.dtype, ref: L.ArrayRef) -> np.dtype:
    """The dtype :func:`decode` gives for ``raw_dtype`` values (int16 + scale_factor → float…)."""
    probe = np.zeros((1,) * len(ref.dims), dtype=raw_dtype)
    return decode(probe, ref).dtype


def is_complete(uri: str) -> bool:
    """A committed rasterkube store (``zarr.json``) or a zarr v2 store (``.zgroup``)."""
    fs, path = storage.filesystem(uri)
    return any(fs.exists(f"{path.rstrip('/')}/{name}") for name in ROOT_METADATA_FILES)


def store_version(uri: str) -> str:
    """A token for this commit of the store at ``uri``: the versions of its root metadata
    objects (zarr v3 ``zarr.json``; v2 ``.zmetadata``/``.zgroup``), which every commit writes
    again. Resumed runs key their finished blocks by it (:mod:`rasterkube.staging`)."""
    names = (*ROOT_METADATA_FILES, V2_CONSOLIDATED)
    versions = {n: storage.object_version(storage.join(uri, n)) for n in names}
    return ";".join(f"{n}:{v}" for n, v in versions.items() if v is not None)


def _open_xarray(uri: str, group: str | None) -> xr.Dataset:
    """The store as xarray sees it, undecoded values (CF attributes kept), decoded times and
    coordinates; nothing but metadata and 1-d coordinates is read."""
    opts = storage.storage_options(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(uri, group=group or None, consolidated=None, storage_options=opts or None,
                            mask_and_scale=False, decode_coords="all", decode_timedelta=False,
                            chunks=None)  # fmt: skip


def describe(uri: str, data_var: str = DATA_VAR) -> StoreInfo:
    """Read a committed store's layout, with errors that say what is wrong and what to do.

    Any store whose grid, dims and bands :mod:`rasterkube.storelayout` can read: rasterkube's
    own, and those xarray, rioxarray and odc-stac write (README "Stores from other tools")."""
    if not storage.exists(uri):
        raise StoreError(f"{uri} does not exist; check the URI or run the resource that produces it first")
    if not is_complete(uri):
        raise StoreError(f"{uri} is not a complete store (no zarr.json, nor .zgroup of zarr v2): a run may have "
                         "failed; run it again")
    try:
        group = _open_group(uri)
    except Exception as exc:  # zarr raises several types for a non-zarr directory
        raise StoreError(f"{uri} is not a Zarr store: {exc}") from None
    attrs = dict(group.attrs)
    base = level0_group(attrs)
    level = group[base] if base else group
    assert isinstance(level, zarr.Group)
    grid_attrs = {**attrs, **dict(level.attrs)}
    try:
        ds = _open_xarray(uri, base)
    except Exception as exc:  # noqa: BLE001 — whatever xarray cannot open, the user must fix
        raise StoreError(f"{uri}: xarray cannot open it ({type(exc).__name__}: {exc}); write it with xarray's to_zarr") from None
    try:
        return _interpret(uri, base, attrs, grid_attrs, ds, level, data_var)
    except L.LayoutError as exc:
        raise StoreError(exc.about(uri), exc.field) from None


def _interpret(uri: str, base: str, attrs: dict[str, Any], grid_attrs: dict[str, Any], ds: xr.Dataset,
               level: zarr.Group, data_var: str) -> StoreInfo:  # fmt: skip
    """A StoreInfo from what xarray and zarr report (metadata only; the rules are storelayout's)."""
    spatial_dims = grid_attrs.get("spatial:dimensions")
    variables = {str(name): tuple(str(d) for d in v.dims) for name, v in ds.data_vars.items()}
    names = L.choose_arrays(data_var, variables, spatial_dims)
    first = ds[names[0]]
    axes = L.canonical_axes(variables[names[0]], spatial_dims)
    refs, raw_dtypes = [], []
    for name in names:
        var = ds[name]
        ax = L.canonical_axes(variables[name], spatial_dims)
        raw_dtypes.append(np.dtype(var.dtype))
        refs.append(L.ArrayRef(_join_path(base, name), variables[name], ax[L.Y], ax[L.X], ax.get(L.TIME),
                               ax.get(L.BAND), L.cf_decoding(var.attrs, var.dtype)))  # fmt: skip
    if len(names) == 1 and L.BAND in axes:
        band_dim = axes[L.BAND]
        coord = ds[band_dim].values if band_dim in ds.coords else None
        bands = L.band_labels(coord, ds.sizes[band_dim])
        band_refs = tuple((0, i) for i in range(len(bands)))
    else:
        bands = tuple(names)
        band_refs = tuple((i, None) for i in range(len(names)))
    times = _times(ds, axes.get(L.TIME))
    grid_mapping = _grid_mapping(ds, first)
    ys = _coord_values(ds, axes[L.Y])
    xs = _coord_values(ds, axes[L.X])
    var_grid_attrs = {k: v for k, v in first.attrs.items() if str(k).startswith(("proj:", "spatial:"))}
    grid = L.grid_from_metadata({**var_grid_attrs, **grid_attrs}, grid_mapping,
                                (ds.sizes[axes[L.Y]], ds.sizes[axes[L.X]]), ys, xs)  # fmt: skip
    for name, raw in zip(names, raw_dtypes, strict=True):
        if raw.kind not in NUMERIC_KINDS:
            raise L.LayoutError(f"{name!r} holds {raw} values; rasterkube reads numbers (bool, integers, floats)")
    dtype = np.result_type(*(decoded_dtype(d, r) for d, r in zip(raw_dtypes, refs, strict=True)))
    native = L.is_native(variables[names[0]], refs[0].cf, len(refs))
    arr = level[names[0]]
    assert isinstance(arr, zarr.Array)
    source_chunks = dict(zip(variables[names[0]], arr.chunks, strict=True))
    chunks = L.plan_chunks(source_chunks, axes, len(bands))
    if native and CONVENTIONS_ATTR in attrs:  # a GeoZarr writer's chunks as they are: blocks align with them
        chunks = tuple(int(c) for c in arr.chunks)  # type: ignore[assignment]
    nodata = None
    if native and arr.fill_value is not None and not np.isnan(float(arr.fill_value)):
        nodata = float(arr.fill_value)
    layout = L.SourceLayout(uri, tuple(refs), band_refs, np.dtype(dtype), native, len(times))
    return StoreInfo(uri=uri, grid=grid, times=times, bands=bands, data_var=names[0] if len(names) == 1 else data_var,
                     dtype=np.dtype(dtype), chunks=chunks, data_vars=tuple(sorted(variables)), attrs=attrs,
                     layout=layout, nodata=nodata, zarr_format=int(level.metadata.zarr_format))  # fmt: skip


def _times(ds: xr.Dataset, time_dim: str | None) -> np.ndarray:
    """datetime64[s] of the time dim; one step (the scalar ``time`` coordinate, else NaT) without."""
    if time_dim is None:
        scalar = ds.coords.get("time")
        if scalar is not None and scalar.ndim == 0 and np.issubdtype(scalar.dtype, np.datetime64):
            return np.asarray([scalar.values], dtype="datetime64[s]")
        return np.asarray([np.datetime64("NaT")], dtype="datetime64[s]")
    if time_dim not in ds.coords:
        raise L.LayoutError(f"its {time_dim!r} dim has no coordinate; add the dates: "
                            f"`ds = ds.assign_coords({time_dim}=dates)`")  # fmt: skip
    values = ds[time_dim].values
    if not np.issubdtype(values.dtype, np.datetime64):
        raise L.LayoutError(
            f"its {time_dim!r} coordinate holds {values.dtype} values, not dates; store datetime64 values, or give it "
            f"CF units, e.g. `ds['{time_dim}'].attrs['units'] = 'days since 2020-01-01'`"
        )
    return np.asarray(values, dtype="datetime64[s]")


def _grid_mapping(ds: xr.Dataset, var: xr.DataArray) -> dict[str, Any] | None:
    """Attributes of the variable's CF grid mapping (``grid_mapping``, else ``spatial_ref``)."""
    name = var.encoding.get(L.GRID_MAPPING_ATTR) or var.attrs.get(L.GRID_MAPPING_ATTR)
    if isinstance(name, str) and name:
        name = name.split(":")[0].split()[0]  # CF's extended form "crs: x y" names it first
    if not name or name not in ds.variables:
        name = SPATIAL_REF if SPATIAL_REF in ds.variables else None
    return dict(ds[name].attrs) if name else None


def _coord_values(ds: xr.Dataset, dim: str) -> np.ndarray | None:
    if dim in ds.coords and ds[dim].ndim == 1:
        return np.asarray(ds[dim].values)
    return None


def finalize(uri: str) -> None:
    """Consolidate all metadata into the root zarr.json (the object committed last)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(_store(uri))


def open_dataset(uri: str) -> xr.Dataset:
    """The store as a lazy xarray Dataset (decoded times, band labels as a coordinate).

    For a multiscale store this is the full-resolution level; ``xarray.open_datatree`` gives all."""
    opts = storage.storage_options(uri)
    group = level0_group(dict(_open_group(uri).attrs)) or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return xr.open_zarr(uri, group=group, consolidated=None, storage_options=opts or None)
