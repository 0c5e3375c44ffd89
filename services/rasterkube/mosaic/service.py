"""The Mosaic job: STAC scenes → cloud-masked composites per time window → GeoZarr, on Ray.

I/O and orchestration only; the numerics are :mod:`rasterkube.mosaic.composite`, the
tables :mod:`~rasterkube.mosaic.recipes`, the grid rules :mod:`~rasterkube.mosaic.gridding`.

Output (one store per AOI row)
    ``variables`` (time, band, y, x) float32 reflectance, NaN where no valid observation;
    ``count`` (time, y, x) uint16, the observations used per pixel (valid in the mask and in
    every band); coords ``time`` (window start), ``time_end`` (window end, exclusive),
    ``band`` (``<collection>:<band id>``), ``y``/``x`` (pixel centres).
    Group attributes: the ``proj:``/``spatial:`` conventions plus ``rasterkube:dataset``,
    ``rasterkube:scenes`` (item ids used) and ``rasterkube:stac``.  With
    ``output.multiscales`` the store is a pyramid (:mod:`rasterkube.multiscale`: level ``0``
    holds the above, ×2 coarser levels ``1..N``), built before the commit.

A multi-row AOI (``aoi.uri``) writes a **mosaic index** instead of a single store:
``<output.uri>/<row key>.zarr`` per row (key from an ``id``/``name`` column, else
``row-00000``…) and ``<output.uri>/index.parquet`` — GeoParquet in EPSG:4326 with the row
geometry, ``key``, ``location`` (the store URI), ``crs`` and ``scenes``.  Each store is
committed atomically; the index is removed first and written last, so an index that exists
lists only complete stores.

Execution: the output grid is cut into blocks of ``chunkSize`` pixels (one zarr chunk, so
writers never share a chunk); each block is a Ray task that reads only the scenes whose
footprint meets it, window by window, in row strips sized so the stack of one window stays
under :data:`STACK_BUDGET_BYTES` — memory per task is bounded whatever the AOI or the
number of scenes, and the executor bounds the tasks in flight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from rasterkube import geozarr, storage
from rasterkube.api.kinds import Mosaic, MosaicSpec
from rasterkube.errors import UserError
from rasterkube.grid import GeoGrid, Window
from rasterkube.jobs.context import JobContext, JobRequest, JobResult, commit_store
from rasterkube.mosaic import composite, gridding, reads, stac
from rasterkube.mosaic.aoi import WGS84, load_aoi
from rasterkube.mosaic.recipes import Recipe, recipe_for
from rasterkube.runtime.blocks import plan_blocks, row_strips
from rasterkube.runtime.executor import run_blocks
from rasterkube.runtime.progress import Reporter, ScaledReporter

COUNT_VAR: Final = "count"
TIME_END_COORD: Final = "time_end"
INDEX_FILE: Final = "index.parquet"
STORE_SUFFIX: Final = ".zarr"
# One window's stack (N, B, h, w) float32 plus the compositing copy stays under this.
STACK_BUDGET_BYTES: Final = 128 * 2**20
STACK_COPIES: Final = 2
# Progress: blocks are most of the work; committing (and the index) the rest.
BLOCKS_PERCENT: Final = 95
COMMIT_PERCENT: Final = 97
SUMMARY_MAX_STORES: Final = 20
# Share of a store's progress for its blocks when a multiscale pyramid follows.
MULTISCALE_FROM: Final = 85


@dataclass(frozen=True)
class RowPlan:
    """One output store: where, on which grid, from which scenes."""

    key: str
    geometry: Any  # shapely, EPSG:4326
    grid: GeoGrid
    scenes: tuple[stac.Scene, ...]
    output_uri: str


@dataclass(frozen=True)
class MosaicPlan:
    recipe: Recipe
    band_ids: tuple[str, ...]
    windows: tuple[composite.Window, ...]
    rows: tuple[RowPlan, ...]
    catalog: str  # what was searched, for attrs and messages
    index_uri: str | None  # set for a multi-row AOI


# ---------------------------------------------------------------------------- planning


def _crs_string(crs: Any) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def choose_grid(geometry: Any, recipe: Recipe, crs: str | None, resolution: float | None) -> GeoGrid:
    """The output grid of one AOI (see :mod:`rasterkube.mosaic.gridding`)."""
    import shapely
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError

    if crs is None:
        centroid = geometry.centroid
        target = CRS.from_user_input(gridding.utm_crs(centroid.x, centroid.y))
    else:
        try:
            target = CRS.from_user_input(crs)
        except CRSError as exc:
            raise UserError(f"spec.crs: {crs!r} is not a CRS pyproj knows ({exc}); use e.g. EPSG:32633") from None
    if target.is_geographic and resolution is None:
        raise UserError(f"spec.resolution: required with the geographic crs {crs} (in degrees, e.g. 0.0001)")
    res = resolution if resolution is not None else recipe.resolution
    anchor = recipe.anchor if math.isclose(res, recipe.resolution) and not target.is_geographic else 0.0
    to_target = Transformer.from_crs(CRS.from_user_input(WGS84), target, always_xy=True)
    # Densify so the bounds of the projected polygon include its curved edges.
    dense = shapely.segmentize(geometry, max_segment_length=0.01)
    projected = shapely.transform(dense, lambda xy: np.column_stack(to_target.transform(xy[:, 0], xy[:, 1])))
    bounds = projected.bounds
    if not all(math.isfinite(v) for v in bounds):
        raise UserError(f"spec.crs: the AOI is outside the area of use of {_crs_string(target)}")
    try:
        return gridding.aligned_grid(bounds, _crs_string(target), res, anchor)
    except ValueError as exc:
        raise UserError(f"spec.resolution: {exc}") from None


def _time_windows(spec: MosaicSpec) -> list[composite.Window]:
    try:
        return composite.time_windows(spec.time.start, spec.time.end, spec.time.window)
    except ValueError as exc:
        raise UserError(f"spec.time.window: {exc}") from None


def _search(spec: MosaicSpec, recipe: Recipe, geometry: Any, windows: Sequence[composite.Window]) -> tuple[list[stac.Scene], str]:
    start, end = windows[0][0], windows[-1][1]
    collection = (spec.stac.collection if spec.stac else None) or recipe.collection
    if spec.stac is not None and spec.stac.catalog is not None:
        found = stac.search_catalog(spec.stac.catalog, collection, geometry, start, end, spec.max_cloud_cover)
        return found, spec.stac.catalog
    url = spec.stac.api if spec.stac is not None and spec.stac.api else recipe.default_api
    field = "spec.stac.api" if spec.stac is not None else f"spec.stac (default STAC API of {recipe.dataset})"
    return stac.search_api(url, collection, geometry, start, end, spec.max_cloud_cover, field), str(url)


def _with_assets(scenes: list[stac.Scene], needed: Sequence[str]) -> tuple[list[stac.Scene], set[str]]:
    """Scenes that have every needed asset, and the asset keys some scene lacked."""
    missing: set[str] = set()
    kept = []
    for scene in scenes:
        lacking = [a for a in needed if a not in scene.assets]
        missing.update(lacking)
        if not lacking:
            kept.append(scene)
    return kept, missing


def _row_uri(base: str, key: str) -> str:
    return storage.join(base, f"{key}{STORE_SUFFIX}")


def preflight(resource: Mosaic, request: JobRequest) -> MosaicPlan:
    """Every check (AOI, CRS, bands, time, the catalog and its scenes); writes nothing."""
    spec = resource.spec
    recipe = recipe_for(spec.dataset)
    band_ids, unknown = recipe.resolve_bands(spec.bands)
    if unknown:
        raise UserError(
            f"spec.bands: {', '.join(map(repr, unknown))} not bands of {recipe.dataset}; "
            f"use band ids or asset names: {recipe.band_help()}"
        )
    windows = _time_windows(spec)
    rows = load_aoi(spec.aoi)
    multi = spec.aoi.uri is not None
    needed = [recipe.assets[b] for b in band_ids] + [recipe.mask_asset]
    base = storage.normalize(request.output_uri)
    plans, catalog = [], ""
    for row in rows:
        grid = choose_grid(row.geometry, recipe, spec.crs, spec.resolution)
        found, catalog = _search(spec, recipe, row.geometry, windows)
        scenes, missing = _with_assets(found, needed)
        where = f" for AOI row {row.key}" if multi else ""
        if not found:
            raise UserError(
                f"spec.time: no scenes of {spec.stac.collection if spec.stac and spec.stac.collection else recipe.collection} "
                f"in {spec.time.start}..{spec.time.end} over the AOI{where} with eo:cloud_cover ≤ {spec.max_cloud_cover:g} "
                f"in {catalog}; widen the time range or the AOI, or raise maxCloudCover"
            )
        if not scenes:
            raise UserError(
                f"spec.bands: the {len(found)} scenes found{where} lack the assets {', '.join(sorted(missing))} "
                f"that {recipe.dataset} needs; check the catalog's layout or choose other bands"
            )
        plans.append(RowPlan(row.key, row.geometry, grid, tuple(scenes), _row_uri(base, row.key) if multi else base))
    return MosaicPlan(recipe, tuple(band_ids), tuple(windows), tuple(plans), catalog,
                      storage.join(base, INDEX_FILE) if multi else None)  # fmt: skip


# ------------------------------------------------------------------------------ blocks


@dataclass(frozen=True)
class BlockParams:
    """Everything a block task needs; put in the Ray object store once per store."""

    dataset: str
    grid: GeoGrid
    scenes: tuple[stac.Scene, ...]
    footprints: tuple[tuple[float, float, float, float], ...]  # scene bounds in the grid CRS
    band_assets: tuple[str, ...]
    windows: tuple[composite.Window, ...]
    out_uri: str
    data_var: str


def footprint_in(scene: stac.Scene, crs: str) -> tuple[float, float, float, float]:
    """A scene's bbox in ``crs`` (densified, so it contains the curved projected box)."""
    from rasterio.warp import transform_bounds

    try:
        return tuple(transform_bounds(WGS84, crs, *scene.bbox, densify_pts=21))  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 — outside the CRS's area of use: read it and let GDAL decide
        return (-math.inf, -math.inf, math.inf, math.inf)


def load_stack(
    recipe: Recipe, scenes: Sequence[stac.Scene], band_assets: Sequence[str], grid: GeoGrid
) -> tuple[np.ndarray, np.ndarray]:
    """(N, B, h, w) float32 reflectance (NaN = nodata) and (N, h, w) mask validity on ``grid``.

    A scene whose mask is invalid everywhere on ``grid`` is not read further (cloudy scenes
    cost one mask read)."""
    n, (h, w) = len(scenes), grid.shape
    stack = np.full((n, len(band_assets), h, w), np.nan, dtype=np.float32)
    valid = np.zeros((n, h, w), dtype=bool)
    for i, scene in enumerate(scenes):
        mask_dn, mask_ok = reads.read_asset(scene.assets[recipe.mask_asset], grid)
        valid[i] = mask_ok & recipe.mask_valid(mask_dn)
        if not valid[i].any():
            continue
        for b, asset in enumerate(band_assets):
            dn, ok = reads.read_asset(scene.assets[asset], grid)
            reflectance = recipe.reflectance(dn, scene.properties)
            reflectance[~ok] = np.nan
            stack[i, b] = reflectance
    return stack, valid


def composite_block(block: Window, p: BlockParams) -> int:
    """Composite one output block (a Ray task); returns the observations read."""
    recipe = recipe_for(p.dataset)
    grid = p.grid.window(block)
    bounds = grid.bbox
    here = [i for i, fp in enumerate(p.footprints) if gridding.intersects(fp, bounds)]
    if not here:
        return 0  # unwritten chunks read as the fill values: NaN and count 0
    times = np.array([p.scenes[i].time for i in here])
    window_of = composite.assign_windows(times, p.windows)
    h, w = grid.shape
    values = np.full((len(p.windows), len(p.band_assets), h, w), np.nan, dtype=np.float32)
    counts = np.zeros((len(p.windows), h, w), dtype=np.uint16)
    observations = 0
    with reads.gdal_env():
        for k, window in enumerate(p.windows):
            members = [here[j] for j in np.flatnonzero(window_of == k)]
            if not members:
                continue
            per_pixel = STACK_COPIES * len(members) * len(p.band_assets) * np.dtype(np.float32).itemsize
            for strip in row_strips(Window(0, h, 0, w), max(w, STACK_BUDGET_BYTES // per_pixel)):
                scenes = [p.scenes[i] for i in members]
                stack, valid = load_stack(recipe, scenes, p.band_assets, grid.window(strip))
                v, c = composite.composite(stack, valid, [s.time for s in scenes], [window], recipe.method)
                values[k, :, strip.y0 : strip.y1] = v[0]
                counts[k, strip.y0 : strip.y1] = c[0]
                observations += stack.shape[0] * strip.shape[0] * strip.shape[1]
    geozarr.write_region(p.out_uri, p.data_var, block, values)
    geozarr.write_region(p.out_uri, COUNT_VAR, block, counts)
    return observations


# --------------------------------------------------------------------------------- run


def _write_store(plan: MosaicPlan, row: RowPlan, spec: MosaicSpec, resource: Mosaic, ctx: JobContext,
                 reporter: Reporter) -> dict[str, Any]:  # fmt: skip
    """Composite one AOI row into its store (temporary prefix, committed at the end)."""
    request = ctx.request
    tmp = storage.stage(row.output_uri, request.run_id)  # claimed; dead runs' leftovers cleaned
    starts = np.array([w[0] for w in plan.windows], dtype="datetime64[s]")
    ends = np.array([w[1] for w in plan.windows], dtype="datetime64[s]")
    out = geozarr.create(
        tmp, row.grid, starts, [plan.recipe.label(b) for b in plan.band_ids], dtype="float32",
        chunk_size=spec.chunk_size,
        attrs={"rasterkube:kind": resource.kind, "rasterkube:dataset": plan.recipe.dataset,
               "rasterkube:stac": plan.catalog, "rasterkube:scenes": [s.id for s in row.scenes],
               "rasterkube:time_window": spec.time.window or ""},
        extra_coords={TIME_END_COORD: ("time", geozarr.to_epoch_seconds(ends), dict(geozarr.TIME_ATTRS))},
    )  # fmt: skip
    geozarr.add_variable(tmp, COUNT_VAR, out, n_bands=None, dtype="uint16", fill_value=0)
    params = BlockParams(
        dataset=plan.recipe.dataset,
        grid=row.grid,
        scenes=row.scenes,
        footprints=tuple(footprint_in(s, row.grid.crs) for s in row.scenes),
        band_assets=tuple(plan.recipe.assets[b] for b in plan.band_ids),
        windows=plan.windows,
        out_uri=tmp,
        data_var=out.data_var,
    )
    blocks = plan_blocks(row.grid.shape, out.chunks[2:], 1)
    try:
        observations = run_blocks(
            composite_block, blocks, params, num_cpus=spec.resources.cpus, max_in_flight=ctx.max_in_flight,
            reporter=ScaledReporter(reporter, 0, MULTISCALE_FROM if spec.output.multiscales else 100),
            message=f"compositing blocks of {row.key}",
        )  # fmt: skip
        pyramid = commit_store(tmp, row.output_uri, reporter, multiscales=spec.output.multiscales,
                               pyramid_percent=(MULTISCALE_FROM, 100), commit_percent=None,
                               num_cpus=spec.resources.cpus, max_in_flight=ctx.max_in_flight)  # fmt: skip
        levels = len(pyramid) if pyramid is not None else 1
    except BaseException:
        storage.remove(tmp)
        raise
    return {
        "shape": list(out.shape),
        "bands": list(out.bands),
        "times": [str(t) for t in out.times.astype("datetime64[D]")],
        "crs": row.grid.crs,
        "transform": list(row.grid.transform),
        "scenes": len(row.scenes),
        "blocks": len(blocks),
        "observations": int(sum(observations)),
        "levels": levels,
    }


def _write_index(plan: MosaicPlan, summaries: Sequence[dict[str, Any]], run_id: str) -> None:
    import geopandas

    assert plan.index_uri is not None
    frame = geopandas.GeoDataFrame(
        {
            "key": [r.key for r in plan.rows],
            "location": [r.output_uri for r in plan.rows],
            "crs": [s["crs"] for s in summaries],
            "scenes": [s["scenes"] for s in summaries],
        },
        geometry=[r.geometry for r in plan.rows],
        crs=WGS84,
    )
    storage.commit_file(lambda path: frame.to_parquet(path, write_covering_bbox=True), plan.index_uri, run_id)


def run(resource: Mosaic, ctx: JobContext, reporter: Reporter, plan: MosaicPlan) -> JobResult:
    spec = resource.spec
    if plan.index_uri is not None:
        storage.remove(plan.index_uri)  # the old index must not vouch for stores being replaced
    summaries = []
    share = BLOCKS_PERCENT / len(plan.rows)
    for i, row in enumerate(plan.rows):
        row_reporter = ScaledReporter(reporter, i * share, (i + 1) * share)
        summaries.append(_write_store(plan, row, spec, resource, ctx, row_reporter))
    reporter.progress(COMMIT_PERCENT, "outputs committed")
    base = storage.normalize(ctx.request.output_uri)
    if plan.index_uri is None:
        reporter.progress(100, "output committed")
        return JobResult(uri=base, summary={"dataset": plan.recipe.dataset, **summaries[0]})
    _write_index(plan, summaries, ctx.request.run_id)
    reporter.progress(100, "mosaic index committed")
    return JobResult(
        uri=base,
        summary={
            "dataset": plan.recipe.dataset,
            "index": plan.index_uri,
            "stores": len(plan.rows),
            "locations": [r.output_uri for r in plan.rows[:SUMMARY_MAX_STORES]],
            "bands": summaries[0]["bands"],
            "times": summaries[0]["times"],
            "scenes": sum(s["scenes"] for s in summaries),
            "note": f"one GeoZarr store per AOI row under {base}; index (GeoParquet, location column) at {plan.index_uri}",
        },
    )
