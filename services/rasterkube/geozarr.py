"""GeoZarr stores: ``(time, band, y, x)`` arrays with ``proj:``/``spatial:`` attributes.

All raster outputs (mosaics, predictions, scores) share this layout (DESIGN §3). Jobs create
the store's metadata once on the driver, workers write disjoint chunk-aligned regions, and
:func:`finalize` consolidates the metadata into the root ``zarr.json`` before the commit.
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
from rasterkube.constants import DATA_VAR
from rasterkube.errors import UserError
from rasterkube.grid import GeoGrid, Window, conventions

TIME_UNITS: Final = "seconds since 1970-01-01T00:00:00"
TIME_ATTRS: Final = {"units": TIME_UNITS, "calendar": "proleptic_gregorian", "standard_name": "time"}
# Keep one chunk of the data variable well under what a task should hold in memory.
MAX_CHUNK_BYTES: Final = 32 * 1024 * 1024
# Root attribute of the zarr-conventions multiscales layout (see rasterkube.multiscale). A store
# with it keeps its full-resolution arrays in the base level's child group, not at the root:
# xarray's DataTree requires child groups to align with their parents, so root (y, x) arrays
# and coarser children cannot coexist. Readers here resolve that group transparently.
MULTISCALES_ATTR: Final = "multiscales"


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
) -> StoreInfo:
    """Write the metadata and coordinates of an empty store; data chunks stay unwritten (fill)."""
    dtype = np.dtype(dtype)
    if fill_value is None:
        fill_value = np.nan if dtype.kind == "f" else 0
    chunks = default_chunks(len(bands), dtype.itemsize, chunk_size)
    chunks = (1, chunks[1], min(chunks[2], grid.shape[0]), min(chunks[3], grid.shape[1]))
    group_attrs = {**grid.to_attrs(), "zarr_conventions": conventions(), **(attrs or {})}
    group = _open_group(uri, mode="w")
    group.attrs.update(group_attrs)
    shape = (len(times), len(bands), *grid.shape)
    group.create_array(
        data_var,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill_value,
        dimension_names=("time", "band", "y", "x"),
        attributes={"grid_mapping_convention": "proj:"},
    )
    _coord(group, "time", to_epoch_seconds(times), TIME_ATTRS)
    _coord(group, "band", np.asarray(list(bands), dtype=str), {"long_name": "band label"})
    _coord(group, "y", grid.y_coords(), {"standard_name": "projection_y_coordinate", "axis": "Y"})
    _coord(group, "x", grid.x_coords(), {"standard_name": "projection_x_coordinate", "axis": "X"})
    for name, (dim, values, coord_attrs) in (extra_coords or {}).items():
        _coord(group, name, values, coord_attrs, dim=dim)
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
    )


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
    group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value, dimension_names=dims)


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
    """Read (time, band, y, x) of ``window``; bands picked in the order given.

    Works on plain and multiscale stores alike (the full-resolution level is read)."""
    arr = open_data_array(uri, data_var)
    ys, xs = window.slices
    block = arr[time, :, ys, xs]
    if band_indices is not None and list(band_indices) != list(range(arr.shape[1])):
        block = block[:, list(band_indices)]
    return np.asarray(block)


def describe(uri: str, data_var: str = DATA_VAR) -> StoreInfo:
    """Read a committed store's layout, with errors that say what is wrong and what to do."""
    if not storage.exists(uri):
        raise StoreError(f"{uri} does not exist; check the URI or run the resource that produces it first")
    if not storage.is_committed(uri):
        raise StoreError(f"{uri} is not a complete store (no zarr.json): a run may have failed; run it again")
    try:
        group = _open_group(uri)
    except Exception as exc:  # zarr raises several types for a non-zarr directory
        raise StoreError(f"{uri} is not a Zarr store: {exc}") from None
    attrs = dict(group.attrs)
    try:
        grid = GeoGrid.from_attrs(attrs)
    except ValueError as exc:
        raise StoreError(f"{uri}: {exc}") from None
    base = level0_group(attrs)
    if base:
        group = group[base]  # type: ignore[assignment]
    names = tuple(sorted(k for k, v in group.members() if isinstance(v, zarr.Array) and v.ndim >= 3))
    if data_var not in names:
        raise StoreError(f"{data_var!r} is not a variable of {uri} (it has {', '.join(names) or 'none'})", "dataVar")
    arr = group[data_var]
    if arr.ndim != 4 or tuple(arr.metadata.dimension_names or ()) != ("time", "band", "y", "x"):
        raise StoreError(f"{data_var!r} in {uri} must have dims (time, band, y, x)", "dataVar")
    times = np.asarray(group["time"][:], dtype=np.int64).astype("datetime64[s]")
    bands = tuple(str(b) for b in group["band"][:])
    return StoreInfo(
        uri=uri,
        grid=grid,
        times=times,
        bands=bands,
        data_var=data_var,
        dtype=arr.dtype,
        chunks=tuple(arr.chunks),  # type: ignore[arg-type]
        data_vars=names,
        attrs=attrs,
    )


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
        return xr.open_zarr(uri, group=group, consolidated=True, storage_options=opts or None, zarr_format=3)
