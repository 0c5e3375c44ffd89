"""The Vectorization job: read a raster blockwise, polygonize on Ray, write GeoParquet.

I/O and orchestration only; the numerics are the pure functions in
:mod:`rasterkube.vectorize.polygons` (see its docstring for the seamless block merge).
Output: one GeoParquet 1.1 file (bbox covering column, rows in Hilbert order of the
geometries), one row per polygon per feature band and time step (columns ``label``, ``time``,
``score_mean``; with ``stats`` also ``score_min``, ``score_max``, ``score_std``,
``pixel_count``, ``area_m2``; with ``medialSkeletonize`` a second geometry column
``centerline``), written to a hidden sibling and committed at the end — never a partial file
at the output URI. With ``output.pmtiles`` a PMTiles archive of the same features sits next
to it (:func:`pmtiles_uri`), committed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from rasterkube import geozarr, storage
from rasterkube.api.kinds import Vectorization, VectorizeMethod
from rasterkube.constants import DATA_VAR
from rasterkube.errors import UserError
from rasterkube.grid import Window
from rasterkube.jobs.context import JobContext, JobRequest, JobResult
from rasterkube.runtime.blocks import plan_blocks
from rasterkube.runtime.executor import run_blocks
from rasterkube.runtime.progress import Reporter, ScaledReporter
from rasterkube.vectorize import polygons as P

# Target block side in pixels (rounded to whole zarr chunks): one block of one band and time
# step is 4 MiB of float32 values, and the seams — the serial part of the merge — stay few.
BLOCK_SIDE: Final = 1024
# Share of the progress bar for the block tasks; the merge and the write take the rest.
BLOCKS_PERCENT: Final = 90.0
GEOPARQUET_VERSION: Final = "1.1.0"
STAT_COLUMNS: Final = ("score_min", "score_max", "score_std", "pixel_count", "area_m2")


@dataclass(frozen=True)
class BlockParams:
    """Everything a block task needs; put in the Ray object store once."""

    source_uri: str
    band_indices: tuple[int, ...]
    shape: tuple[int, int]
    transform: P.Transform
    threshold: float
    connectivity: int
    finish: P.Finish
    centerlines: bool = False


@dataclass(frozen=True)
class BlockOutput:
    """Per (time, feature): the finished interior polygons and the edge pieces to merge."""

    final: list[list[P.Features]]
    pieces: list[list[P.BlockPieces]]


def vectorize_block(block: Window, p: BlockParams) -> BlockOutput:
    """Polygonize one block for every time step and feature band (a Ray task)."""
    x = geozarr.read_region(p.source_uri, DATA_VAR, block, p.band_indices)
    bounds = (block.y0, block.y1, block.x0, block.x1)
    final: list[list[P.Features]] = []
    pieces: list[list[P.BlockPieces]] = []
    for t in range(x.shape[0]):
        final.append([])
        pieces.append([])
        for f in range(x.shape[1]):
            r = P.polygonize_block(x[t, f], p.threshold, p.connectivity, bounds, p.shape, p.transform, p.centerlines)
            final[t].append(P.finish(r.final, p.finish))
            # Only the pieces travel back to the driver; the finished ones are already above.
            pieces[t].append(P.BlockPieces(P.Components.concat([]), r.pieces, r.piece_labels, r.edges))
    return BlockOutput(final, pieces)


def preflight(resource: Vectorization, request: JobRequest) -> tuple[geozarr.StoreInfo, list[int]]:
    """All checks that need the source; run before anything is written."""
    spec, source_uri = resource.spec, request.source_uri
    if spec.method != VectorizeMethod.RASTERIO:  # pragma: no cover — the enum has one value today
        raise UserError(f"spec.method: {spec.method} is not available; use rasterio")
    _check_crs(spec.output.crs)
    if spec.output.pmtiles and not pmtiles_available():
        raise UserError("spec.output.pmtiles: needs the optional packages pmtiles and mapbox-vector-tile "
                        "(pip install 'rasterkube[pmtiles]'); install them or remove output.pmtiles")  # fmt: skip
    if source_uri is None:
        raise UserError("spec.source: no store to read (refs must be resolved before the job runs)")
    try:
        info = geozarr.describe(source_uri, DATA_VAR)
        band_idx = info.band_indices(spec.features, field_name="features")
    except geozarr.StoreError as exc:
        raise exc.in_spec(resource.spec.source.field_path) from None
    if np.dtype(info.dtype).kind not in "fiu":
        raise UserError(f"spec.source: {source_uri} holds {info.dtype} values; vectorization needs numbers")
    return info, band_idx


def pmtiles_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("pmtiles", "mapbox_vector_tile"))


def _check_crs(crs: str) -> None:
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(crs)
    except CRSError as exc:
        raise UserError(f"spec.output.crs: {crs!r} is not a CRS pyproj knows ({exc}); e.g. EPSG:4326") from None


def run(resource: Vectorization, ctx: JobContext, reporter: Reporter) -> JobResult:
    spec = resource.spec
    request = ctx.request
    info, band_idx = preflight(resource, request)
    assert request.source_uri is not None
    grid = info.grid
    params = BlockParams(
        source_uri=request.source_uri,
        band_indices=tuple(band_idx),
        shape=grid.shape,
        transform=grid.transform,
        threshold=spec.threshold,
        connectivity=spec.connectivity,
        finish=P.Finish(grid.crs, spec.output.crs, spec.simplify_tolerance, spec.min_area),
        centerlines=spec.medial_skeletonize,
    )
    multiplier = max(1, BLOCK_SIDE // max(info.chunks[2], info.chunks[3]))
    blocks = plan_blocks(grid.shape, info.chunks[2:], multiplier)
    outputs = run_blocks(
        vectorize_block,
        blocks,
        params,
        num_cpus=spec.resources.cpus,
        max_in_flight=ctx.max_in_flight,
        reporter=ScaledReporter(reporter, 0, BLOCKS_PERCENT),
        message="polygonizing blocks",
    )
    reporter.progress(BLOCKS_PERCENT, "merging polygons across block edges")
    windows = [(b.y0, b.y1, b.x0, b.x1) for b in blocks]
    tables = []
    for t, time in enumerate(info.times):
        for f, label in enumerate(spec.features):
            merged = P.merge_pieces([o.pieces[t][f] for o in outputs], windows, spec.connectivity, grid.transform,
                                    spec.medial_skeletonize)  # fmt: skip
            features = P.Features.concat([*(o.final[t][f] for o in outputs), P.finish(merged, params.finish)])
            tables.append(feature_table(features, label, time, spec.stats))
    gdf = to_geodataframe(tables, spec.output.crs, spec.stats, spec.medial_skeletonize)
    reporter.progress(95.0, f"writing {len(gdf)} features")
    result = summary(gdf, spec.features, info, blocks)
    if spec.output.pmtiles:
        from rasterkube.vectorize import tiles

        size = pixel_size_m(grid.crs, grid.resolution[0])
        # Vector tiles carry one geometry: the polygons (the centre lines stay in the GeoParquet).
        polygons = gdf.drop(columns=["centerline"]) if "centerline" in gdf.columns else gdf
        uri = pmtiles_uri(request.output_uri)
        stats: dict[str, Any] = {}
        storage.commit_file(lambda path: stats.update(tiles.write_pmtiles(polygons, path, size)), uri, request.run_id)
        result["pmtiles"] = {"uri": uri, **stats}
    write_geoparquet(gdf, request.output_uri, request.run_id)
    reporter.progress(100.0, f"wrote {len(gdf)} features")
    return JobResult(uri=request.output_uri, summary=result)


def pmtiles_uri(output_uri: str) -> str:
    """``x.parquet`` → ``x.pmtiles``; any other name gets ``.pmtiles`` appended."""
    base = output_uri[: -len(".parquet")] if output_uri.endswith(".parquet") else output_uri
    return base + ".pmtiles"


def pixel_size_m(crs: str, resolution: float) -> float:
    from pyproj import CRS

    c = CRS.from_user_input(crs)
    if c.is_geographic:
        return abs(resolution) * 111_320.0  # metres per degree at the equator: a zoom estimate
    unit = c.axis_info[0].unit_conversion_factor if c.axis_info else 1.0
    return abs(resolution) * unit


def feature_table(features: P.Features, label: str, time: np.datetime64, stats: bool) -> dict[str, Any]:
    n, m = len(features), features.moments
    table: dict[str, Any] = {
        "label": np.full(n, label, dtype=object),
        "time": np.full(n, np.datetime64(time, "s")),
        "score_mean": m.mean,
        "geometry": features.geometry,
        "centerline": features.centerline,
    }
    if stats:
        table.update(score_min=m.vmin, score_max=m.vmax, score_std=m.std, pixel_count=m.count,
                     area_m2=features.area_m2)  # fmt: skip
    return table


def to_geodataframe(tables: list[dict[str, Any]], crs: str, stats: bool, centerlines: bool = False) -> Any:
    """One GeoDataFrame, typed even when empty, rows in Hilbert order of the geometries so
    row groups are spatially compact (readers skip them using the bbox covering column).

    With ``centerlines`` a second geometry column ``centerline`` holds each polygon's centre
    line ((Multi)LineString; null for a one-pixel skeleton)."""
    import geopandas as gpd
    import pandas as pd

    columns = ["label", "time", "score_mean", *(STAT_COLUMNS if stats else ())]
    data = {c: np.concatenate([t[c] for t in tables]) if tables else np.zeros(0) for c in columns}
    geometry = np.concatenate([t["geometry"] for t in tables]) if tables else np.empty(0, dtype=object)
    frame = pd.DataFrame(data, columns=columns).astype({
        "label": "string", "time": "datetime64[s]", "score_mean": "float64",
        **({"score_min": "float64", "score_max": "float64", "score_std": "float64", "pixel_count": "int64",
            "area_m2": "float64"} if stats else {}),
    })  # fmt: skip
    gdf = gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(geometry, crs=crs), crs=crs)
    if centerlines:
        lines = np.concatenate([t["centerline"] for t in tables]) if tables else np.empty(0, dtype=object)
        gdf["centerline"] = gpd.GeoSeries(lines, crs=crs)
    if len(gdf):
        order = np.argsort(gdf.geometry.hilbert_distance(), kind="stable")
        gdf = gdf.iloc[order].reset_index(drop=True)
    return gdf


def write_geoparquet(gdf: Any, uri: str, run_id: str) -> None:
    """GeoParquet 1.1 with the bbox covering column, committed atomically."""
    storage.commit_file(lambda path: _to_parquet(gdf, path), uri, run_id)


def _to_parquet(gdf: Any, path: str) -> None:
    gdf.to_parquet(path, index=False, schema_version=GEOPARQUET_VERSION, write_covering_bbox=True,
                   compression="zstd")  # fmt: skip


def summary(gdf: Any, labels: list[str], info: geozarr.StoreInfo, blocks: list[Window]) -> dict[str, Any]:
    counts = gdf["label"].value_counts()
    return {
        "feature_count": int(len(gdf)),
        "label_counts": {label: int(counts.get(label, 0)) for label in labels},
        "crs": str(gdf.crs.to_string()) if gdf.crs is not None else None,
        "bounds": [float(v) for v in gdf.total_bounds] if len(gdf) else None,
        "times": [str(t) for t in info.times.astype("datetime64[D]")],
        "blocks": len(blocks),
    }
