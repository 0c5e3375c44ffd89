"""Multiscale pyramids of GeoZarr stores (DESIGN §3 "Multiscales").

Layout (the zarr-conventions ``multiscales`` convention, v1)::

    store/                 root: proj:/spatial: of level 0, ``multiscales`` {layout, resampling_method},
    ├── 0/                 full resolution: ``variables`` (time, band, y, x), other (…, y, x)
    │                      variables, and the coords time, band, y, x (+ any other 1-D coords)
    ├── 1/                 ×2 coarser, derived_from "0", its own ``spatial:`` attributes
    └── N/                 the last level has its smaller side ≤ ``min_size`` px or fits one chunk

The root keeps no (y, x) arrays: xarray's DataTree requires every child group to align with
its parents, so full-resolution root arrays and coarser children cannot coexist in a tree that
``xarray.open_datatree(uri, engine="zarr")`` can open. Level 0 therefore *is* the data, and
:mod:`rasterkube.geozarr` readers (``describe``, ``read_region``, ``open_dataset``) resolve it
transparently, so every service reads a multiscale store like a plain one.

Resampling: each level cell is a 2×2 block of the level above. Continuous bands take the mean
of the valid (non-NaN) pixels; class-label bands take the mode (ties → the smallest value).
A band is a class label when its variable has an integer or bool dtype, or when it is listed
in the group attribute ``rasterkube:categorical_bands`` (float label bands with NaN nodata,
e.g. ChangeScore's ``cluster_transition_label``). Odd sizes: a level is ``ceil(n / 2)`` long;
the last cell of an odd side uses the pixels it has, so its footprint extends half a coarse
pixel past the level-0 bbox (``spatial:bbox`` of each level says so).

Execution: each level is computed from the previous one block by block as Ray tasks
(``runtime.executor.run_blocks``), one time step at a time inside a block, so memory is flat
in the AOI size. :func:`build` works in place on a store that is not yet committed (a job's
temporary output); :func:`build_committed` makes a pyramid for a committed store atomically.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import zarr

from rasterkube import geozarr, storage
from rasterkube.constants import DATA_VAR
from rasterkube.grid import GeoGrid, Window, conventions
from rasterkube.runtime.blocks import plan_blocks
from rasterkube.runtime.executor import run_blocks
from rasterkube.runtime.progress import NullReporter, Reporter, ScaledReporter

MULTISCALES_CONVENTION: Final = {
    "uuid": "d35379db-88df-4056-af3a-620245f8e347",
    "name": "multiscales",
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/multiscales/refs/tags/v1/schema.json",
    "spec_url": "https://github.com/zarr-conventions/multiscales/blob/v1/README.md",
    "description": "Multiscale layout of zarr datasets",
}
MULTISCALES_ATTR: Final = geozarr.MULTISCALES_ATTR
CATEGORICAL_BANDS_ATTR: Final = "rasterkube:categorical_bands"
#: Resampling method names, as the convention lists them.
AVERAGE: Final = "average"
MODE: Final = "mode"
BASE_LEVEL: Final = "0"
FACTOR: Final = 2
#: Stop coarsening once the smaller side is at most this (a map tile), or the level fits a chunk.
MIN_SIZE: Final = 256
#: Level chunks per block side: a block reads (2·2·chunk)² source pixels per time step.
BLOCK_MULTIPLIER: Final = 2
SPATIAL_DIMS: Final = ("y", "x")
GROUP_METADATA: Final = "zarr.json"

_Array = npt.NDArray[Any]


# ---------------------------------------------------------------------------------- numerics


def _pad_even(a: _Array, fill: Any) -> _Array:
    """Pad the last two axes to even lengths with ``fill`` (the partial cell of an odd side)."""
    pad_y, pad_x = a.shape[-2] % 2, a.shape[-1] % 2
    if not (pad_y or pad_x):
        return a
    widths = [(0, 0)] * (a.ndim - 2) + [(0, pad_y), (0, pad_x)]
    return np.pad(a, widths, constant_values=fill)


def _cells(a: _Array) -> _Array:
    """(..., 2h, 2w) → (..., h, w, 4): the four pixels of each coarse cell on the last axis."""
    *lead, h2, w2 = a.shape
    blocks = a.reshape(*lead, h2 // 2, 2, w2 // 2, 2)
    return np.moveaxis(blocks, -3, -2).reshape(*lead, h2 // 2, w2 // 2, 4)


def coarsen_mean(a: npt.ArrayLike) -> _Array:
    """×2 mean of the last two axes over valid (non-NaN) pixels; all-NaN cells stay NaN.

    Float input only (NaN is the nodata); sums are float64, the result has the input dtype.
    """
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"mean coarsening needs a float array (NaN = nodata), got {arr.dtype}")
    cells = _cells(_pad_even(arr, np.nan))
    valid = ~np.isnan(cells)
    total = np.where(valid, cells, 0).sum(axis=-1, dtype=np.float64)
    count = valid.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count  # 0/0 = NaN for all-NaN cells
    return mean.astype(arr.dtype)


def coarsen_mode(a: npt.ArrayLike) -> _Array:
    """×2 mode (most frequent value) of the last two axes; ties go to the smallest value.

    Float input: NaN pixels do not vote and all-NaN cells stay NaN. Integer/bool input: every
    pixel votes (there is no nodata value to skip). The result has the input dtype.
    """
    arr = np.asarray(a)
    is_float = np.issubdtype(arr.dtype, np.floating)
    padded_valid = _pad_even(np.ones(arr.shape, dtype=bool), False)
    values = _cells(_pad_even(arr, np.nan if is_float else 0))
    valid = _cells(padded_valid)
    if is_float:
        valid &= ~np.isnan(values)
    # votes[..., i] = how many valid pixels of the cell equal pixel i (4×4 comparisons per cell).
    same = (values[..., :, None] == values[..., None, :]) & valid[..., None, :]
    votes = np.where(valid, same.sum(axis=-1), -1)
    best = votes.max(axis=-1, keepdims=True)
    winners = (votes == best) & valid
    if is_float:
        mode = np.where(winners, values, np.inf).min(axis=-1)
        mode[~valid.any(axis=-1)] = np.nan
        return mode.astype(arr.dtype)
    sentinel = np.iinfo(arr.dtype).max if arr.dtype != np.bool_ else True
    return np.where(winners, values, sentinel).min(axis=-1).astype(arr.dtype)


def coarsen(a: npt.ArrayLike, mode_bands: Sequence[bool] | None, band_axis: int = 0) -> _Array:
    """×2 coarsening of the last two axes: mode for the bands flagged in ``mode_bands`` (along
    ``band_axis``), mean for the others; ``None`` means one method for all: mode for integer
    and bool dtypes, mean for floats."""
    arr = np.asarray(a)
    if mode_bands is None:
        return coarsen_mode(arr) if not np.issubdtype(arr.dtype, np.floating) else coarsen_mean(arr)
    flags = np.asarray(mode_bands, dtype=bool)
    if flags.all():
        return coarsen_mode(arr)
    if not flags.any():
        return coarsen_mean(arr)
    out = np.empty((*arr.shape[:-2], *level_shape(arr.shape[-2:])), dtype=arr.dtype)
    index: list[Any] = [slice(None)] * arr.ndim
    for picked, fn in ((flags, coarsen_mode), (~flags, coarsen_mean)):
        index[band_axis] = np.flatnonzero(picked)
        out[tuple(index)] = fn(arr[tuple(index)])
    return out


def level_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The next level's (height, width): every side halves, rounding up (partial last cell)."""
    return -(-int(shape[0]) // FACTOR), -(-int(shape[1]) // FACTOR)


def level_shapes(shape: tuple[int, int], chunk: tuple[int, int], min_size: int = MIN_SIZE) -> list[tuple[int, int]]:
    """Shapes of levels 0..N: halve until the smaller side is ≤ ``min_size`` or one chunk holds the level."""
    shapes = [shape]
    while True:
        h, w = shapes[-1]
        if min(h, w) <= min_size or (h <= chunk[0] and w <= chunk[1]) or min(h, w) == 1:
            return shapes
        shapes.append(level_shape((h, w)))


def level_grid(grid: GeoGrid, level: int) -> GeoGrid:
    """Level ``level``'s grid: same origin and CRS, pixels 2**level times larger."""
    a, b, c, d, e, f = grid.transform
    shape = grid.shape
    for _ in range(level):
        shape = level_shape(shape)
    scale = float(FACTOR**level)
    return GeoGrid(grid.crs, (a * scale, b, c, d, e * scale, f), shape)


def layout(grids: Sequence[GeoGrid], method: str) -> dict[str, Any]:
    """The convention's ``multiscales`` attribute for levels ``0..len(grids)-1``.

    ``transform`` is relative to the parent level (scale 2, no translation: all levels share
    the top-left corner); ``spatial:transform``/``spatial:shape`` give each level's absolute grid.
    """
    entries: list[dict[str, Any]] = []
    for level, grid in enumerate(grids):
        entry: dict[str, Any] = {"asset": str(level)}
        if level:
            entry["derived_from"] = str(level - 1)
            entry["transform"] = {"scale": [float(FACTOR)] * 2, "translation": [0.0, 0.0]}
            entry["resampling_method"] = method
        else:
            entry["transform"] = {"scale": [1.0, 1.0], "translation": [0.0, 0.0]}
        entry["spatial:transform"] = list(grid.transform)
        entry["spatial:shape"] = list(grid.shape)
        entries.append(entry)
    return {"layout": entries, "resampling_method": method}


def band_modes(dtype: np.dtype, bands: Sequence[str], categorical: Sequence[str]) -> tuple[bool, ...]:
    """Per band: True for mode (class labels), False for mean. See the module docstring."""
    if not np.issubdtype(dtype, np.floating):
        return (True,) * len(bands)
    labels = set(categorical)
    return tuple(b in labels for b in bands)


# --------------------------------------------------------------------------------------- I/O


@dataclass(frozen=True)
class LevelVariable:
    """One (…, y, x) variable to coarsen. ``mode_bands`` is per band for (time, band, y, x)
    variables, ``None`` for others (dtype rule)."""

    name: str
    mode_bands: tuple[bool, ...] | None


@dataclass(frozen=True)
class LevelParams:
    """What a block task needs to compute one level from its parent (put in Ray's object store once)."""

    uri: str
    source_group: str
    target_group: str
    source_shape: tuple[int, int]
    variables: tuple[LevelVariable, ...]


def coarsen_block(block: Window, p: LevelParams) -> int:
    """Compute one chunk-aligned block of a level from its parent (a Ray task); returns pixels."""
    src = Window(
        block.y0 * FACTOR, min(block.y1 * FACTOR, p.source_shape[0]),
        block.x0 * FACTOR, min(block.x1 * FACTOR, p.source_shape[1]),
    )  # fmt: skip
    root = geozarr.open_group(p.uri, mode="r+")
    for var in p.variables:
        source = root[f"{p.source_group}/{var.name}"]
        target = root[f"{p.target_group}/{var.name}"]
        # One time step at a time: memory is one (band, 2h, 2w) slab whatever the series length.
        for t in range(source.shape[0]):
            slab = np.asarray(source[(t, Ellipsis, *src.slices)])
            target[(t, Ellipsis, *block.slices)] = coarsen(slab, var.mode_bands, band_axis=0)
    return block.shape[0] * block.shape[1]


def _write_group_metadata(uri: str, path: str, attrs: dict[str, Any]) -> None:
    """(Re)write a group's zarr.json with ``attrs`` and no consolidated metadata.

    Written directly: after moving arrays, a stale consolidated listing must not survive, and
    zarr's own group writers may delete a group's children when overwriting it."""
    fs, root = storage.filesystem(uri)
    target = posixpath.join(root, path, GROUP_METADATA) if path else posixpath.join(root, GROUP_METADATA)
    fs.makedirs(posixpath.dirname(target), exist_ok=True)
    body = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    fs.pipe_file(target, json.dumps(body, indent=2, allow_nan=True).encode())


def _read_group_attrs(uri: str, path: str = "") -> dict[str, Any]:
    fs, root = storage.filesystem(uri)
    target = posixpath.join(root, path, GROUP_METADATA) if path else posixpath.join(root, GROUP_METADATA)
    with fs.open(target, "rb") as f:
        return dict(json.load(f).get("attributes", {}))


def _move(uri: str, name: str, dest: str) -> None:
    fs, root = storage.filesystem(uri)
    src, dst = posixpath.join(root, name), posixpath.join(root, dest, name)
    if "://" not in uri:
        os.rename(src, dst)  # a rename: free, whatever the array's size
    else:  # object stores: one batch of server-side copies, then the deletes
        keys = fs.find(src)
        fs.copy(keys, [posixpath.join(dst, posixpath.relpath(k, src)) for k in keys])
        fs.rm(keys)


def _ensure_base_level(uri: str, root_attrs: dict[str, Any]) -> None:
    """Move a plain store's root arrays into the base level group (no-op for a multiscale store)."""
    if geozarr.level0_group(root_attrs):
        return
    fs, root = storage.filesystem(uri)
    members = [
        posixpath.basename(p.rstrip("/"))
        for p in fs.ls(root, detail=False)
        if fs.isdir(p) and fs.exists(posixpath.join(p, GROUP_METADATA))
    ]
    if BASE_LEVEL in members:
        raise ValueError(f"{uri} has a child {BASE_LEVEL!r} but no {MULTISCALES_ATTR} layout: not a rasterkube store")
    _write_group_metadata(uri, BASE_LEVEL, root_attrs)
    for name in members:
        _move(uri, name, BASE_LEVEL)


def _remove_derived_levels(uri: str, root_attrs: dict[str, Any]) -> None:
    """Delete the levels an earlier build derived, so a rebuild starts from level 0 only."""
    previous = (root_attrs.get(MULTISCALES_ATTR) or {}).get("layout") or []
    for entry in previous:
        if "derived_from" in entry:
            storage.remove(storage.join(uri, str(entry["asset"])))


def _level_attrs(base_attrs: dict[str, Any], grid: GeoGrid) -> dict[str, Any]:
    attrs = {k: v for k, v in base_attrs.items() if k != MULTISCALES_ATTR}
    attrs.update(grid.to_attrs())
    attrs["zarr_conventions"] = conventions()
    return attrs


def _create_level(uri: str, level: int, grid: GeoGrid, base: zarr.Group, attrs: dict[str, Any]) -> list[str]:
    """Create level ``level``'s group and empty arrays (coords written); returns the (…, y, x) names."""
    root = geozarr.open_group(uri, mode="r+")
    group = root.create_group(str(level), overwrite=True)
    group.attrs.update(_level_attrs(attrs, grid))
    spatial: list[str] = []
    for name, arr in base.arrays():
        dims = tuple(arr.metadata.dimension_names or ())
        common = {"dimension_names": dims, "attributes": dict(arr.attrs)}
        if name == geozarr.SPATIAL_REF:  # the CF grid mapping: this level's GeoTransform
            geozarr.write_spatial_ref(group, grid)
        elif dims in ((SPATIAL_DIMS[0],), (SPATIAL_DIMS[1],)):
            values = grid.y_coords() if dims == (SPATIAL_DIMS[0],) else grid.x_coords()
            coord = group.create_array(name, shape=values.shape, dtype=values.dtype, **common)
            coord[:] = values
        elif dims[-2:] == SPATIAL_DIMS:
            shape = (*arr.shape[:-2], *grid.shape)
            chunks = (*arr.chunks[:-2], min(arr.chunks[-2], grid.shape[0]), min(arr.chunks[-1], grid.shape[1]))
            group.create_array(name, shape=shape, chunks=chunks, dtype=arr.dtype, fill_value=arr.fill_value, **common)
            spatial.append(name)
        else:  # time, band and other coordinates: small, copied as they are
            values = np.asarray(arr[...])
            dtype = str if values.dtype.kind in "UOT" else values.dtype
            copy = group.create_array(name, shape=values.shape, dtype=dtype, **common)
            copy[...] = values
    return spatial


def build(
    uri: str,
    *,
    reporter: Reporter | None = None,
    num_cpus: float = 1.0,
    max_in_flight: int | None = None,
    min_size: int = MIN_SIZE,
    block_multiplier: int = BLOCK_MULTIPLIER,
) -> list[GeoGrid]:
    """Turn the *uncommitted* GeoZarr store at ``uri`` into a multiscale store, in place.

    For a job's temporary output, after its blocks and before ``geozarr.finalize`` and
    ``storage.commit`` (so the pyramid is committed atomically with the data). The root's
    arrays move into group ``0`` (a rename on local disks); a store that already has a pyramid
    is rebuilt from its level 0. Returns the grids of levels 0..N. Needs Ray (``ensure_ray``).
    """
    reporter = reporter or NullReporter()
    root_attrs = _read_group_attrs(uri)
    grid = GeoGrid.from_attrs(root_attrs)
    _ensure_base_level(uri, root_attrs)
    _remove_derived_levels(uri, root_attrs)
    base_attrs = {k: v for k, v in root_attrs.items() if k != MULTISCALES_ATTR}
    # A fresh root: no stale consolidated listing of moved or removed arrays, no old layout
    # (until the new one is written last).
    _write_group_metadata(uri, "", base_attrs)
    base = geozarr.open_group(uri, mode="r")[BASE_LEVEL]
    assert isinstance(base, zarr.Group)
    data = base.get(DATA_VAR)
    chunk = tuple(data.chunks[-2:]) if isinstance(data, zarr.Array) else grid.shape
    shapes = level_shapes(grid.shape, chunk, min_size)  # type: ignore[arg-type]
    grids = [level_grid(grid, level) for level in range(len(shapes))]

    bands = [str(b) for b in base["band"][:]] if "band" in base else []
    categorical = [str(b) for b in base_attrs.get(CATEGORICAL_BANDS_ATTR, [])]
    variables: list[LevelVariable] = []
    for name, arr in base.arrays():
        dims = tuple(arr.metadata.dimension_names or ())
        if len(dims) > 2 and dims[-2:] == SPATIAL_DIMS:
            per_band = dims[-3] == "band" and arr.ndim == 4
            variables.append(LevelVariable(name, band_modes(arr.dtype, bands, categorical) if per_band else None))
    # The layout's one default method: mode only when every band is a class label.
    flags = [
        flag
        for v in variables
        for flag in (v.mode_bands if v.mode_bands is not None else (not np.issubdtype(base[v.name].dtype, np.floating),))
    ]
    method = MODE if flags and all(flags) else AVERAGE

    total = sum(g.shape[0] * g.shape[1] for g in grids[1:]) or 1
    done = 0
    for level in range(1, len(grids)):
        names = set(_create_level(uri, level, grids[level], base, base_attrs))
        params = LevelParams(
            uri=uri,
            source_group=str(level - 1),
            target_group=str(level),
            source_shape=grids[level - 1].shape,
            variables=tuple(v for v in variables if v.name in names),
        )
        level_chunk = _level_chunk(uri, level, chunk)  # type: ignore[arg-type]
        pixels = grids[level].shape[0] * grids[level].shape[1]
        run_blocks(
            coarsen_block,
            plan_blocks(grids[level].shape, level_chunk, block_multiplier),
            params,
            num_cpus=num_cpus,
            max_in_flight=max_in_flight,
            reporter=ScaledReporter(reporter, 100.0 * done / total, 100.0 * (done + pixels) / total),
            message=f"multiscale level {level}/{len(grids) - 1}",
        )
        done += pixels
    conventions_list = [c for c in base_attrs.get("zarr_conventions", conventions()) if c.get("name") != "multiscales"]
    root = {**base_attrs, "zarr_conventions": [*conventions_list, dict(MULTISCALES_CONVENTION)]}
    root[MULTISCALES_ATTR] = layout(grids, method)
    _write_group_metadata(uri, "", root)
    reporter.progress(100, f"multiscale pyramid: {len(grids)} levels")
    return grids


def _level_chunk(uri: str, level: int, fallback: tuple[int, int]) -> tuple[int, int]:
    group = geozarr.open_group(uri, mode="r")[str(level)]
    assert isinstance(group, zarr.Group)
    arrays = [a for _, a in group.arrays() if len(a.chunks) > 2]
    return tuple(arrays[0].chunks[-2:]) if arrays else fallback  # type: ignore[return-value]


def _copy_tree(src_uri: str, dst_uri: str) -> None:
    """Copy a store for an in-place rebuild. Local: chunk files are hard links (build never
    rewrites a level-0 chunk; it moves and reads them), metadata files real copies (they are
    rewritten). Object stores: server-side copies."""
    if "://" in src_uri:
        fs, src = storage.filesystem(src_uri)
        _, dst = storage.filesystem(dst_uri)
        keys = fs.find(src)
        fs.copy(keys, [posixpath.join(dst, posixpath.relpath(k, src)) for k in keys])
        return

    def link_or_copy(src: str, dst: str) -> None:
        if os.path.basename(src) == GROUP_METADATA:
            shutil.copy2(src, dst)
            return
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(src, dst)

    shutil.copytree(src_uri, dst_uri, copy_function=link_or_copy)


def check_rewritable(info: geozarr.StoreInfo) -> None:
    """A pyramid is built by rewriting the store in place (its arrays move into level ``0``):
    only for stores in rasterkube's own layout. Another tool's store (per-band variables,
    other dims, CF-packed values, zarr v2) would no longer read in that tool, so it is refused
    with how to get a pyramid instead."""
    if info.layout is not None and info.layout.native and info.zarr_format == 3:
        return
    raise geozarr.StoreError(
        f"{info.uri} is not in rasterkube's layout (one zarr v3 'variables' array (time, band, y, x) of plain values), "
        "and a pyramid is built by rewriting the store in place, which would break it for the tool that wrote it; "
        "run a resource on it with spec.output.multiscales: true, or copy it into rasterkube's layout first "
        "(README: Stores from other tools)"
    )


def build_committed(uri: str, *, reporter: Reporter | None = None, min_size: int = MIN_SIZE) -> list[GeoGrid]:
    """Add (or rebuild) the pyramid of a committed store atomically: copy it to a temporary
    sibling, :func:`build` there, consolidate, commit over the original. Readers see the old
    store until the commit, and a failure leaves it untouched (`rasterkube multiscales`)."""
    uri = storage.normalize(uri)
    check_rewritable(geozarr.describe(uri))  # a clear message unless it is a complete rasterkube store
    tmp = storage.stage(uri)
    try:
        _copy_tree(uri, tmp)
        grids = build(tmp, reporter=reporter, min_size=min_size)
        geozarr.finalize(tmp)
        storage.commit(tmp, uri)
    except BaseException:
        storage.remove(tmp)
        raise
    return grids
