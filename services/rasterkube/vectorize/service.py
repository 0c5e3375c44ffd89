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

Work split (for throughput on few cores): block tasks read, threshold, label, polygonize,
finish (area, reprojection) and encode their interior polygons as Arrow-ready columns (WKB,
bounding boxes: :class:`~rasterkube.vectorize.polygons.Rows`), so the driver never decodes
them; as blocks finish, the driver matches the seams of the edge pieces
(:class:`~rasterkube.vectorize.polygons.SeamMerger`) and starts tasks that union every
group no missing block can join any more — next to the remaining block tasks, so after the
last block only what it completed is left to merge; then the driver Hilbert-sorts on the
boxes and writes the Parquet file with pyarrow a row group at a time, gathering each row
group's rows from the blocks' own WKB buffers (:class:`FeatureSet`: the output is held once,
zstd-compressed as each block arrives, never as a second sorted copy; the GeoParquet metadata
written here, :func:`geo_metadata`).
With ``output.pmtiles`` the tiler still needs every polygon as a geometry at once (one
spatial index over all of them, for every tile of every zoom). Only a
``simplifyTolerance`` brings all polygons of a band to the driver as geometries, because the
topology-preserving simplification must see them together.

Nodata: NaN and the store's nodata (``StoreInfo.nodata``: the fill value of rasterkube's own
integer stores; other writers' ``_FillValue``/``nodata`` are NaN once decoded) are never
foreground. A
threshold no value of the band's dtype can exceed is an error before anything runs; one
above all the values the band holds gives an honest empty GeoParquet (with the schema), and
the summary says why (``note``: the largest value, no valid pixel, or all under ``minArea``).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

import numpy as np

from rasterkube import geozarr, provenance, storage
from rasterkube.api.kinds import Vectorization, VectorizationSpec, VectorizeMethod
from rasterkube.constants import DATA_VAR
from rasterkube.errors import UserError
from rasterkube.grid import Window
from rasterkube.jobs.context import JobContext, JobRequest, JobResult
from rasterkube.runtime.blocks import plan_blocks
from rasterkube.runtime.executor import TaskGroup, default_in_flight, run_blocks
from rasterkube.runtime.progress import Reporter, ScaledReporter
from rasterkube.vectorize import polygons as P

# Target block side in pixels (rounded to whole zarr chunks): one block of one band and time
# step is 4 MiB of float32 values, and the seams — the serial part of the merge — stay few.
BLOCK_SIDE: Final = 1024
# Share of the progress bar for the block tasks; the merge and the write take the rest.
BLOCKS_PERCENT: Final = 90.0
GEOPARQUET_VERSION: Final = "1.1.0"
# geopandas' hilbert_distance default (its maximum): 2^16 cells a side.
HILBERT_LEVEL: Final = 16
# Vertices of complete groups gathered before a merge task is started while blocks still run:
# a few ms of unions per task, so the task overhead stays small next to the work.
MERGE_TASK_VERTICES: Final = 8_000
# Rows per Parquet row group: row groups of polygons near each other on the Hilbert curve, so
# a reader filtering on the bbox covering column skips most of a large file; and the driver
# gathers one row group's sorted columns at a time (~18 MiB of WKB at ~1.1 KiB a polygon), so
# writing does not hold a second copy of the output. Outputs of fewer rows keep one row group.
ROW_GROUP_ROWS: Final = 16_384
# Rows gathered at a time into a row group's WKB column (a few MiB of transient copies).
GATHER_ROWS: Final = 4096
STAT_COLUMNS: Final = ("score_min", "score_max", "score_std", "pixel_count", "area_m2")


@dataclass(frozen=True)
class BlockParams:
    """Everything a block task needs; put in the Ray object store once."""

    source: geozarr.SourceLayout
    band_indices: tuple[int, ...]
    shape: tuple[int, int]
    transform: P.Transform
    threshold: float
    connectivity: int
    finish: P.Finish
    centerlines: bool = False
    nodata: float | None = None


@dataclass(frozen=True)
class BlockOutput:
    """Per (time, feature): the finished interior polygons, the edge pieces to merge, and the
    block's largest valid value where it had no foreground (None where it had some; NaN when
    it had no valid pixel) — for the summary of an empty result.

    ``final`` is Arrow-ready :class:`~rasterkube.vectorize.polygons.Rows` (finished in the
    task), or canonical Components when simplifying: the topology-preserving simplification
    needs all polygons of a band at once, so the driver finishes them."""

    final: list[list[P.Rows | P.Components]]
    pieces: list[list[P.BlockPieces]]
    empty_max: list[list[float | None]]

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled whole, numpy arrays in band: Ray deserializes out-of-band arrays as views
        into its object store, and any view the driver keeps (a block's seam strips stay in
        the SeamMerger, its rows until the file is written) pins the block's whole result
        there — every polygon twice, in the store and in the driver, growing with the area."""
        parts = (self.final, self.pieces, self.empty_max)
        return _unpickle_output, (pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL),)


def _unpickle_output(data: bytes) -> BlockOutput:
    return BlockOutput(*pickle.loads(data))


def vectorize_block(block: Window, p: BlockParams) -> BlockOutput:
    """Polygonize one block for every time step and feature band (a Ray task)."""
    x = geozarr.read_block(p.source, block, p.band_indices)
    bounds = (block.y0, block.y1, block.x0, block.x1)
    final: list[list[P.Rows | P.Components]] = []
    pieces: list[list[P.BlockPieces]] = []
    empty_max: list[list[float | None]] = []
    for t in range(x.shape[0]):
        final.append([])
        pieces.append([])
        empty_max.append([])
        for f in range(x.shape[1]):
            v = x[t, f]
            r = P.polygonize_block(v, p.threshold, p.connectivity, bounds, p.shape, p.transform, p.centerlines,
                                   p.nodata)  # fmt: skip
            final[t].append(r.final if p.finish.simplify_tolerance > 0 else P.Rows.of(P.finish(r.final, p.finish)))
            # Only the pieces travel back to the driver; the finished ones are already above.
            pieces[t].append(P.BlockPieces(P.Components.concat([]), r.pieces, r.piece_labels, r.edges))
            empty_max[t].append(None if len(r.final) or len(r.pieces) else valid_max(v, p.nodata))
    return BlockOutput(final, pieces, empty_max)


def merge_part(groups: P.Groups, p: BlockParams) -> tuple[np.ndarray, P.Rows | P.Components]:
    """Merge a run of groups of pieces (a Ray task); finished like a block's own polygons.
    Returns the groups' keys with them (the driver orders merged components by key)."""
    merged = P.merge_groups(groups, p.transform, p.centerlines)
    if p.finish.simplify_tolerance > 0:
        return groups.keys, merged
    # min_area may drop some: keep the keys of the rows that stay.
    kept, features = P.finish_kept(merged, p.finish)
    return groups.keys[kept], P.Rows.of(features)


def valid_max(values: np.ndarray, nodata: float | None) -> float:
    """Largest value that is neither NaN nor ``nodata``; NaN when there is none."""
    valid = values[values != nodata] if nodata is not None and not np.isnan(nodata) else values.ravel()
    if valid.dtype.kind == "f":
        valid = valid[~np.isnan(valid)]
    return float(valid.max()) if valid.size else float("nan")


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
    _check_threshold(spec.threshold, np.dtype(info.dtype))
    return info, band_idx


def _check_threshold(threshold: float, dtype: np.dtype) -> None:
    """A threshold no value of the band's type can exceed is an error (known without reading
    a pixel, and always a mistake, e.g. 255 on uint8 data); one above the values the band
    happens to hold is an honest empty result (the summary says the largest value)."""
    if np.isnan(threshold):
        raise UserError("spec.threshold: must be a number, not NaN")
    top = np.iinfo(dtype).max if dtype.kind in "iu" else np.finfo(dtype).max
    if threshold >= top:
        raise UserError(f"spec.threshold: {threshold:g} is not below the largest {dtype} value ({top:g}), so no "
                        "pixel can be above it; use a threshold within the band's range")  # fmt: skip


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


def run(
    resource: Vectorization, ctx: JobContext, reporter: Reporter, prepared: tuple[geozarr.StoreInfo, list[int]]
) -> JobResult:
    spec = resource.spec
    request = ctx.request
    info, band_idx = prepared
    assert request.source_uri is not None
    grid = info.grid
    assert info.layout is not None
    params = BlockParams(
        source=info.layout,
        band_indices=tuple(band_idx),
        shape=grid.shape,
        transform=grid.transform,
        threshold=spec.threshold,
        connectivity=spec.connectivity,
        finish=P.Finish(grid.crs, spec.output.crs, spec.simplify_tolerance, spec.min_area),
        centerlines=spec.medial_skeletonize,
        nodata=info.nodata,
    )
    multiplier = max(1, BLOCK_SIDE // max(info.chunks[2], info.chunks[3]))
    blocks = plan_blocks(grid.shape, info.chunks[2:], multiplier)
    windows = [(b.y0, b.y1, b.x0, b.x1) for b in blocks]
    bands = [(t, f) for t in range(len(info.times)) for f in range(len(spec.features))]
    # Pieces on block edges are grouped into whole-raster components as blocks finish, and the
    # unions of complete groups run as tasks next to the remaining blocks: after the last block
    # only the groups it completes are left to merge.
    mergers = {tf: P.SeamMerger(windows, spec.connectivity) for tf in bands}
    waiting: dict[tuple[int, int], list[P.Groups]] = {tf: [] for tf in bands}
    waiting_vertices = dict.fromkeys(bands, 0)
    keys: list[tuple[int, int]] = []  # (time, feature) of each merge task, in submission order

    with TaskGroup(merge_part, params, num_cpus=spec.resources.cpus) as merges:

        def submit(tf: tuple[int, int], groups: P.Groups) -> None:
            keys.append(tf)
            merges.submit(groups)

        def on_block(index: int, output: BlockOutput) -> None:
            for t, f in bands:
                mergers[t, f].add(index, output.pieces[t][f])
                if (ready := mergers[t, f].ready()).n_groups:
                    waiting[t, f].append(ready)
                    waiting_vertices[t, f] += ready.cost()
                if waiting_vertices[t, f] >= MERGE_TASK_VERTICES:
                    submit((t, f), P.Groups.concat(waiting[t, f]))
                    waiting[t, f], waiting_vertices[t, f] = [], 0
            # The mergers hold what they still need of the seam pieces; the block's copy would
            # keep every seam piece of the job alive (as geometries) until the file is written.
            output.pieces.clear()
            # Every polygon stays on the driver until the file is written: its WKB compressed
            # (~7×), unpacked a block at a time as row groups are gathered.
            for t, f in bands:
                if isinstance(rows := output.final[t][f], P.Rows):
                    output.final[t][f] = rows.packed()

        outputs = run_blocks(vectorize_block, blocks, params, num_cpus=spec.resources.cpus,
                             max_in_flight=ctx.max_in_flight, reporter=ScaledReporter(reporter, 0, BLOCKS_PERCENT),
                             message="polygonizing blocks", on_result=on_block)  # fmt: skip
        reporter.progress(BLOCKS_PERCENT, "merging polygons across block edges")
        # What the last blocks completed: split over the workers, they are the job's tail.
        n_parts = max(1, default_in_flight() // 2)
        for tf in bands:
            rest = P.Groups.concat([*waiting[tf], mergers[tf].ready()])
            assert mergers[tf].open_pieces == 0, "pieces left unmerged after the last block"
            for part in rest.split(n_parts) if rest.n_groups else []:
                submit(tf, part)
        merged_parts = merges.results(ScaledReporter(reporter, BLOCKS_PERCENT, 95.0),
                                      "merging polygons across block edges")  # fmt: skip
    parts: list[tuple[str, np.datetime64, P.Rows]] = []
    for t, time in enumerate(info.times):
        for f, label in enumerate(spec.features):
            finals = [o.final[t][f] for o in outputs]
            mine = [m for k, m in zip(keys, merged_parts, strict=True) if k == (t, f)]
            # Merged components in the order of their smallest piece key (block, label): the
            # same rows in the same order however the blocks and merges finished.
            order = np.argsort(np.concatenate([np.zeros(0, np.int64), *(k for k, _ in mine)]), kind="stable")
            if params.finish.simplify_tolerance > 0:  # all polygons of the band at once (see BlockOutput)
                merged = P.Components.concat([c for _, c in mine]).take(order)  # type: ignore[misc]
                rows = P.Rows.of(P.finish(P.Components.concat([*finals, merged]), params.finish))  # type: ignore[list-item]
            else:
                merged_rows = P.Rows.concat([r for _, r in mine]).take(order)  # type: ignore[misc]
                rows = P.Rows.concat([*finals, merged_rows])  # type: ignore[list-item]
            parts.append((label, time, rows))
    merged_parts = mine = []  # drop the merged rows before their ordering (parts hold them ordered)
    features = feature_set(parts, spec.output.crs, spec.stats, spec.medial_skeletonize)
    reporter.progress(95.0, f"writing {features.num_rows} features")
    result = summary(features, spec.features, info, blocks, spec.output.crs)
    if not features.num_rows:
        result["note"] = empty_note(outputs, spec.features, spec.threshold, spec.min_area)
    item = output_item(resource, request, info, features.num_rows)  # before any file: a bad item writes nothing
    # The old item goes first and the new one is committed after the last file (provenance).
    storage.remove(provenance.file_item_uri(request.output_uri))
    if spec.output.pmtiles:
        from rasterkube.vectorize import tiles

        size = pixel_size_m(grid.crs, grid.resolution[0])
        # Vector tiles carry one geometry: the polygons (the centre lines stay in the GeoParquet).
        polygons = to_geodataframe(features, spec.output.crs)
        uri = pmtiles_uri(request.output_uri)
        stats: dict[str, Any] = {}
        storage.commit_file(lambda path: stats.update(tiles.write_pmtiles(polygons, path, size)), uri, request.run_id)
        result["pmtiles"] = {"uri": uri, **stats}
    write_geoparquet(features, request.output_uri, request.run_id)
    provenance.commit_json(provenance.file_item_uri(request.output_uri), item, request.run_id)
    reporter.progress(100.0, f"wrote {features.num_rows} features")
    return JobResult(uri=request.output_uri, summary=result)


def lineage(spec: VectorizationSpec, source_uri: str) -> str:
    """processing:lineage: what was polygonized, in a sentence."""
    features = ", ".join(spec.features)
    return (f"polygons ({spec.connectivity}-connected) of the pixels above {spec.threshold:g} in {features} of "
            f"{source_uri}")  # fmt: skip


def _filename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def output_item(resource: Vectorization, request: JobRequest, info: geozarr.StoreInfo, n_features: int) -> dict[str, Any]:
    """The STAC item of the GeoParquet (and the PMTiles archive beside it), validated."""
    spec = resource.spec
    assert request.source_uri is not None
    files = [provenance.FileAsset(provenance.ASSET_DATA, _filename(request.output_uri), provenance.PARQUET_TYPE,
                                  spec.output.crs, "polygons (GeoParquet 1.1)")]  # fmt: skip
    if spec.output.pmtiles:
        files.append(provenance.FileAsset(provenance.ASSET_PMTILES, _filename(pmtiles_uri(request.output_uri)),
                                          provenance.PMTILES_TYPE, provenance.WEB_MERCATOR, "vector tiles (PMTiles)",
                                          roles=("visual",)))  # fmt: skip
    item = provenance.vector_item(
        provenance.from_source_store(resource, request, lineage(spec, request.source_uri)),
        provenance.item_id(resource.kind, resource.namespace, resource.name), info.grid, info.times, files,
        properties={provenance.FEATURE_COUNT: int(n_features)},
    )
    return provenance.validated(item)


def empty_note(outputs: list[BlockOutput], labels: list[str], threshold: float, min_area: float) -> str:
    """Why a result is empty, per feature band: no valid pixel, no pixel above the threshold
    (with the band's largest value), or every polygon under ``minArea``."""
    notes = []
    for f, label in enumerate(labels):
        maxima = [o.empty_max[t][f] for o in outputs for t in range(len(o.empty_max))]
        if any(m is None for m in maxima):
            notes.append(f"{label!r}: every polygon above the threshold is smaller than minArea ({min_area:g} m²)")
        elif all(np.isnan(m) for m in maxima):  # type: ignore[arg-type]
            notes.append(f"{label!r}: no valid pixel (all NaN or nodata)")
        else:
            top = np.nanmax(np.asarray(maxima, dtype=np.float64))
            notes.append(f"{label!r}: no pixel above the threshold {threshold:g} (largest value {top:g})")
    return "0 features; " + "; ".join(notes)


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


@dataclass(frozen=True)
class FeatureSet:
    """Every feature of the output, held once: the rows in the order the job made them (WKB in
    one Arrow chunk per block), each row's part (label and time), and the Hilbert order the
    file is written in. Tables of the sorted rows are gathered a row group at a time
    (:meth:`row_groups`), so writing never holds a second, sorted copy of the whole output
    (which made the driver's peak grow with the polygon count)."""

    rows: P.Rows
    labels: tuple[str, ...]
    times: tuple[np.datetime64, ...]
    part_of: np.ndarray
    order: np.ndarray
    crs: str
    stats: bool
    centerlines: bool

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def table(self, rows: slice = slice(None)) -> Any:
        """The sorted rows ``rows`` (of the Hilbert order) as a pyarrow Table with the
        GeoParquet metadata (columns: see :func:`feature_table`)."""
        import pyarrow as pa

        order = self.order[rows]
        r, m = self.rows, self.rows.moments
        # Label and time by part index, expanded in C++ (20k Python strings cost the tail 40 ms).
        which = pa.array(self.part_of[order], pa.int64())
        columns: dict[str, Any] = {
            "label": pa.array(list(self.labels), pa.string()).take(which),
            "time": pa.array(np.array(self.times, dtype="datetime64[s]"), pa.timestamp("s")).take(which),
            "score_mean": pa.array(m.mean[order], pa.float64()),
        }
        if self.stats:
            columns.update(score_min=pa.array(m.vmin[order], pa.float64()),
                           score_max=pa.array(m.vmax[order], pa.float64()),
                           score_std=pa.array(m.std[order], pa.float64()),
                           pixel_count=pa.array(m.count[order], pa.int64()),
                           area_m2=pa.array(r.area_m2[order], pa.float64()))  # fmt: skip
        columns["geometry"] = _gather(r.wkb_array, order)
        if self.centerlines:
            columns["centerline"] = _gather(r.centerline_array, order)
        bbox = r.bbox[order]
        columns["bbox"] = pa.StructArray.from_arrays([pa.array(bbox[:, i], pa.float64()) for i in range(4)],
                                                     names=["xmin", "ymin", "xmax", "ymax"])  # fmt: skip
        assert all(len(c) == len(order) for c in columns.values())
        return pa.table(columns).replace_schema_metadata({b"geo": self._geo})

    @cached_property
    def _geo(self) -> bytes:
        """The ``geo`` metadata of all rows (each row group's schema carries the whole file's)."""
        return json.dumps(geo_metadata(self.crs, self.rows, self.centerlines)).encode()

    def row_groups(self, size: int = ROW_GROUP_ROWS) -> Iterator[Any]:
        """The sorted rows as tables of at most ``size`` rows (one table with no rows when
        there are none, so the file keeps its schema and one empty row group, as
        ``pyarrow.parquet.write_table`` writes it)."""
        for start in range(0, max(self.num_rows, 1), size):
            yield self.table(slice(start, start + size))


def _gather(values: Any, order: np.ndarray) -> Any:
    """``values[order]`` as a binary column in chunks of ``GATHER_ROWS``: gathering across the
    blocks' chunks copies a batch up to three times (:func:`~rasterkube.vectorize.polygons.take_rows`),
    so only one copy of a whole row group is ever held. The Parquet writer writes a chunked
    column into the same row group and pages as one array (tested byte for byte)."""
    import pyarrow as pa

    batches = [_narrow(P.take_rows(values, order[i : i + GATHER_ROWS])) for i in range(0, len(order), GATHER_ROWS)]
    return pa.chunked_array(batches, batches[0].type if batches else pa.binary())


def _narrow(values: Any) -> Any:
    """A large_binary array as binary (32-bit offsets) where it fits, as ``pa.array`` makes
    the column (a row group over 2 GiB of WKB keeps 64-bit offsets)."""
    import pyarrow as pa

    return values.cast(pa.binary()) if values.nbytes <= np.iinfo(np.int32).max else values


def feature_set(parts: list[tuple[str, np.datetime64, P.Rows]], crs: str, stats: bool,
                centerlines: bool = False) -> FeatureSet:  # fmt: skip
    """All features of ``parts`` (label, time, rows) and their Hilbert order (of the bounding
    boxes: computed without the geometries). The WKB stays in the parts' chunks (no copy)."""
    rows = P.Rows.concat([r for _, _, r in parts])
    part_of = np.repeat(np.arange(len(parts)), [len(r) for _, _, r in parts])
    return FeatureSet(rows, tuple(label for label, _, _ in parts), tuple(t for _, t, _ in parts), part_of,
                      hilbert_order(rows.bbox), crs, stats, centerlines)  # fmt: skip


def feature_table(parts: list[tuple[str, np.datetime64, P.Rows]], crs: str, stats: bool,
                  centerlines: bool = False) -> Any:  # fmt: skip
    """One pyarrow Table of all features, typed even when empty, rows in Hilbert order of the
    geometries' bounding boxes (what ``GeoSeries.hilbert_distance`` computes) so row groups
    are spatially compact; readers skip them using the bbox covering column.

    Columns: ``label``, ``time``, ``score_mean`` (with ``stats`` also ``score_min``,
    ``score_max``, ``score_std``, ``pixel_count``, ``area_m2``), ``geometry`` (WKB), with
    ``centerlines`` ``centerline`` (WKB; null for a one-pixel skeleton), and ``bbox``. The
    GeoParquet metadata (:func:`geo_metadata`) is attached to the schema. The job itself
    writes row group by row group from the :func:`feature_set` instead."""
    return feature_set(parts, crs, stats, centerlines).table()


def hilbert_order(bbox: np.ndarray) -> np.ndarray:
    """Stable order of rows by the Hilbert distance of their bounding box midpoints over the
    total bounds — geopandas' own ``hilbert_distance`` (level 16), so a reader's
    ``hilbert_distance()`` is non-decreasing. Its encoder is fed the boxes directly: the public
    method needs geometries, and building 20k shapely boxes just to read their bounds back
    cost the job's serial tail 70 ms."""
    if not len(bbox):
        return np.zeros(0, dtype=np.intp)
    try:
        from geopandas.tools.hilbert_curve import _continuous_to_discrete_coords, _encode
    except ImportError:  # pragma: no cover — a geopandas without them: the public method
        import geopandas as gpd
        import shapely

        boxes = gpd.GeoSeries(shapely.box(bbox[:, 0], bbox[:, 1], bbox[:, 2], bbox[:, 3]))
        return np.argsort(boxes.hilbert_distance().to_numpy(), kind="stable")
    x, y = _continuous_to_discrete_coords(np.asarray(bbox, dtype=np.float64), HILBERT_LEVEL, None)
    return np.argsort(_encode(HILBERT_LEVEL, x, y), kind="stable")


GEOMETRY_TYPES: Final = {0: "Point", 1: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString",
                         6: "MultiPolygon", 7: "GeometryCollection"}  # fmt: skip


def geo_metadata(crs: str, rows: P.Rows, centerlines: bool) -> dict[str, Any]:
    """GeoParquet 1.1 ``geo`` metadata: WKB columns, PROJJSON CRS, geometry types, bbox, and
    the ``bbox`` covering column of the primary geometry."""
    projjson = P._crs(crs).to_json_dict()
    # As geopandas does: PROJ < 9.x cannot read ids on the members of a datum ensemble.
    for member in projjson.get("datum_ensemble", {}).get("members", []):
        member.pop("id", None)

    def column(type_ids: np.ndarray, bbox: np.ndarray | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"encoding": "WKB", "crs": projjson,
                                "geometry_types": sorted({GEOMETRY_TYPES[int(t)] for t in np.unique(type_ids) if t >= 0})}  # fmt: skip
        if bbox is not None and len(bbox):
            meta["bbox"] = [float(bbox[:, 0].min()), float(bbox[:, 1].min()), float(bbox[:, 2].max()),
                            float(bbox[:, 3].max())]  # fmt: skip
        return meta

    columns = {"geometry": {**column(rows.type_id, rows.bbox),
                            "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}}}  # fmt: skip
    if centerlines:
        columns["centerline"] = column(rows.centerline_type_id, None)
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": columns,
            "creator": {"library": "rasterkube"}}  # fmt: skip


def to_geodataframe(table: Any, crs: str) -> Any:
    """The polygons of a feature table — or of a :class:`FeatureSet`, row group by row group,
    never its whole sorted table at once — as a GeoDataFrame (for the PMTiles writer)."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    if isinstance(table, FeatureSet):
        frames = [to_geodataframe(group, crs) for group in table.row_groups()]
        return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=crs)
    frame = table.drop_columns([c for c in ("geometry", "centerline", "bbox") if c in table.column_names]).to_pandas()
    geometry = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(geometry, crs=crs), crs=crs)


def write_geoparquet(features: Any, uri: str, run_id: str) -> None:
    """GeoParquet 1.1 with the bbox covering column, committed atomically; ``features`` a
    :class:`FeatureSet` (written a row group at a time) or a pyarrow Table."""
    storage.commit_file(lambda path: _to_parquet(features, path), uri, run_id)


def _to_parquet(features: Any, path: str) -> None:
    import pyarrow.parquet as pq

    if not isinstance(features, FeatureSet):
        pq.write_table(features, path, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        return
    groups = features.row_groups()
    first = next(groups)
    with pq.ParquetWriter(path, first.schema, compression="zstd") as writer:
        writer.write_table(first, row_group_size=ROW_GROUP_ROWS)
        del first  # one row group's columns in memory at a time
        for group in groups:
            writer.write_table(group, row_group_size=ROW_GROUP_ROWS)


def summary(features: FeatureSet, labels: list[str], info: geozarr.StoreInfo, blocks: list[Window],
            crs: str) -> dict[str, Any]:  # fmt: skip
    per_part = np.bincount(features.part_of, minlength=len(features.labels))
    counts: dict[str, int] = {}
    for label, n in zip(features.labels, per_part.tolist(), strict=True):
        counts[label] = counts.get(label, 0) + int(n)
    bbox = features.rows.bbox
    bounds = None
    if features.num_rows:
        bounds = [float(v) for v in (bbox[:, 0].min(), bbox[:, 1].min(), bbox[:, 2].max(), bbox[:, 3].max())]
    return {
        "feature_count": int(features.num_rows),
        "label_counts": {label: counts.get(label, 0) for label in labels},
        "crs": P._crs(crs).to_string(),
        "bounds": bounds,
        "times": [str(t) for t in info.times.astype("datetime64[D]")],
        "blocks": len(blocks),
    }
