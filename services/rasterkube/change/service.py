"""The ChangeScore job: read a time series blockwise, score every pixel, write a GeoZarr store.

I/O and orchestration only; the numerics are the pure functions in
:mod:`rasterkube.change.scores`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from rasterkube import geozarr, multiscale, storage
from rasterkube.api import ChangeScore, ChangeScoreSpec
from rasterkube.api.kinds import ChangeMethod, Distance, Selector
from rasterkube.change import clustering, scores
from rasterkube.errors import UserError
from rasterkube.grid import GeoGrid, Window
from rasterkube.jobs.context import (
    JobContext,
    JobRequest,
    JobResult,
    commit_store,
    raster_summary,
)
from rasterkube.runtime.blocks import plan_blocks, row_strips, shift
from rasterkube.runtime.executor import run_blocks
from rasterkube.runtime.progress import Reporter, ScaledReporter

# Pixels scored at once inside a block: bounds the (T, T, N) float64 distance matrix.
STRIP_PIXELS: Final = 65_536
MIN_TIME_STEPS: Final = 2
# Progress: blocks are most of the work; consolidating and committing the output the rest.
SAMPLE_PERCENT: Final = 5
MULTISCALE_PERCENT: Final = 85  # where the pyramid starts, when one is asked for
BLOCKS_PERCENT: Final = 95
COMMIT_PERCENT: Final = 97
# clusterTransition fits its clusters on a sample of the whole window before any block runs:
# SAMPLE_GRID² small windows spread evenly over it (each read touches few chunks, so the
# driver's memory stays small whatever the AOI), at most SAMPLE_PIXELS valid pixels per step.
SAMPLE_GRID: Final = 6
SAMPLE_SIDE: Final = 48
SAMPLE_PIXELS: Final = 10_000
SAMPLE_SEED: Final = 0


def score_names(spec: ChangeScoreSpec) -> list[str]:
    """Output bands in ``spec.methods`` order: distance methods give their score (and its robust
    z-score); clusterTransition gives ``cluster_transition_label`` and ``cluster_transition``
    (a 0/1 band: no z-score)."""
    names: list[str] = []
    for method in spec.methods:
        if method == ChangeMethod.CLUSTER_TRANSITION:
            names.extend(clustering.BANDS)
            continue
        names.append(scores.score_name(method, spec.distance, False))
        if spec.robust_time_zscore:
            names.append(scores.score_name(method, spec.distance, True))
    return names


def selector_window(selector: Selector | None, grid: GeoGrid) -> Window:
    """The source window to score, or a UserError naming the selector field."""
    full = Window(0, grid.shape[0], 0, grid.shape[1])
    if selector is None:
        return full
    if selector.bbox is not None:
        bbox = _bbox_to_crs(tuple(selector.bbox), selector.bbox_crs, grid.crs)
        try:
            return grid.window_for_bbox(bbox)
        except ValueError:
            raise UserError(
                f"spec.selector.bbox: {selector.bbox} ({selector.bbox_crs}) does not overlap the source "
                f"(bounds {tuple(round(v, 3) for v in grid.bbox)} in {grid.crs})"
            ) from None
    y0, y1 = selector.y or (0, grid.shape[0])
    x0, x1 = selector.x or (0, grid.shape[1])
    for axis, (lo, hi), size in (("y", (y0, y1), grid.shape[0]), ("x", (x0, x1), grid.shape[1])):
        if hi > size:
            raise UserError(f"spec.selector.{axis}: [{lo}, {hi}) goes past the source's {size} pixels; use stop ≤ {size}")
    return Window(y0, y1, x0, x1)


def _bbox_to_crs(bbox: tuple[float, ...], src: str, dst: str) -> tuple[float, float, float, float]:
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError

    try:
        transformer = Transformer.from_crs(CRS.from_user_input(src), CRS.from_user_input(dst), always_xy=True)
    except CRSError as exc:
        raise UserError(f"spec.selector.bboxCrs: {src!r} is not a CRS pyproj knows ({exc})") from None
    return transformer.transform_bounds(*bbox, densify_pts=21)  # type: ignore[return-value]


@dataclass(frozen=True)
class BlockParams:
    """Everything a block task needs; put in the Ray object store once."""

    source: geozarr.SourceLayout
    band_indices: tuple[int, ...]
    offset: tuple[int, int]
    methods: tuple[str, ...]
    distance: str
    robust: bool
    out_uri: str
    out_var: str
    names: tuple[str, ...] = ()
    cluster_model: clustering.ClusterModel | None = None


def score_strip(x: np.ndarray, p: BlockParams) -> np.ndarray:
    """(T, B, N) → (T, len(p.names), N): every requested band, in ``p.names`` order."""
    bands: dict[str, np.ndarray] = {}
    distance_methods = [m for m in p.methods if m != ChangeMethod.CLUSTER_TRANSITION]
    if distance_methods:
        names, values = scores.compute_scores(x, distance_methods, p.distance, p.robust)
        bands.update({name: values[:, i] for i, name in enumerate(names)})
    if p.cluster_model is not None:
        values = clustering.cluster_bands(x, p.cluster_model)
        bands.update({name: values[:, i] for i, name in enumerate(clustering.BANDS)})
    return np.stack([bands[name] for name in p.names], axis=1)


def score_block(block: Window, p: BlockParams) -> int:
    """Score one output block (a Ray task). Returns the number of pixels scored."""
    source = shift(block, *p.offset)
    parts = []
    for strip in row_strips(source, STRIP_PIXELS):
        x = geozarr.read_block(p.source, strip, p.band_indices)
        t, b, h, w = x.shape
        values = score_strip(x.reshape(t, b, h * w), p)
        parts.append(values.reshape(t, values.shape[1], h, w))
    # One write per block: blocks are chunk-aligned, so tasks never share a chunk.
    geozarr.write_region(p.out_uri, p.out_var, block, np.concatenate(parts, axis=2))
    return block.shape[0] * block.shape[1]


def preflight(resource: ChangeScore, request: JobRequest) -> tuple[geozarr.StoreInfo, list[int], Window]:
    """All checks that need the source store; run before anything is written."""
    spec, source_uri = resource.spec, request.source_uri
    if source_uri is None:
        raise UserError("spec.source: no store to read (refs must be resolved before the job runs)")
    try:
        info = geozarr.describe(source_uri, spec.data_var)
        band_idx = info.band_indices(spec.bands)
    except geozarr.StoreError as exc:
        raise exc.in_spec(resource.spec.source.field_path) from None
    if len(info.times) < MIN_TIME_STEPS:
        raise UserError(
            f"spec.source: {source_uri} has {len(info.times)} time step; change scores need at least {MIN_TIME_STEPS} "
            "(use a Mosaic with a time.window that yields several composites)"
        )
    is_int8 = np.dtype(info.dtype) == np.int8
    if spec.distance == Distance.ALPHA_EARTH_COSINE and not is_int8:
        raise UserError(
            f"spec.distance: alphaEarthCosine expects int8 AlphaEarth embeddings, but {info.data_var} is {info.dtype}; "
            "use cosine for de-quantized float embeddings"
        )
    if is_int8 and spec.distance != Distance.ALPHA_EARTH_COSINE:
        raise UserError(
            f"spec.distance: {info.data_var} holds int8 values (quantized embeddings?); use alphaEarthCosine"
        )
    return info, band_idx, selector_window(spec.selector, info.grid)


def sample_windows(window: Window, grid: int = SAMPLE_GRID, side: int = SAMPLE_SIDE) -> list[Window]:
    """Up to ``grid``² windows of at most ``side`` px, centred on an even grid over ``window``."""
    h, w = window.shape
    sy, sx = min(side, h), min(side, w)
    ys = np.unique(np.linspace(0, h - sy, min(grid, max(1, h // sy))).round().astype(int))
    xs = np.unique(np.linspace(0, w - sx, min(grid, max(1, w // sx))).round().astype(int))
    return [Window(window.y0 + y, window.y0 + y + sy, window.x0 + x, window.x0 + x + sx) for y in ys for x in xs]


def sample_features(source: geozarr.SourceLayout, band_idx: list[int], window: Window, metric: str) -> list[np.ndarray]:
    """Per time step, up to SAMPLE_PIXELS valid feature vectors drawn from the whole window
    (deterministic: a fixed seed). I/O on the driver, one small window at a time."""
    windows = sample_windows(window)
    per_window = max(1, SAMPLE_PIXELS // len(windows))
    rng = np.random.default_rng(SAMPLE_SEED)
    parts: list[list[np.ndarray]] = []
    for win in windows:
        x = geozarr.read_block(source, win, band_idx)
        t, b, h, w = x.shape
        feats, valid = clustering.raw_features(x.reshape(t, b, h * w), metric)
        parts = parts or [[] for _ in range(t)]
        for step in range(t):
            good = feats[step][valid[step]]
            if len(good) > per_window:
                good = good[rng.choice(len(good), per_window, replace=False)]
            parts[step].append(good)
    return [np.concatenate(p) for p in parts]


def fit_clusters(spec: ChangeScoreSpec, info: geozarr.StoreInfo, band_idx: list[int], window: Window) -> clustering.ClusterModel:
    """Global clusters for clusterTransition, fitted before the blocks (which only assign)."""
    assert info.layout is not None
    samples = sample_features(info.layout, band_idx, window, spec.distance)
    k = spec.clustering.k
    for step, sample in enumerate(samples):
        if len(sample) < k:
            day = str(info.times[step].astype("datetime64[D]"))
            raise UserError(
                f"spec.clustering.k: the time step {day} has only {len(sample)} valid sampled pixels, fewer than "
                f"k={k} clusters; lower k, or choose a selector window with more valid data"
            )
    return clustering.fit_model(samples, spec.distance, k, spec.clustering.method, seed=SAMPLE_SEED)


def run(
    resource: ChangeScore, ctx: JobContext, reporter: Reporter, prepared: tuple[geozarr.StoreInfo, list[int], Window]
) -> JobResult:
    spec = resource.spec
    request = ctx.request
    info, band_idx, window = prepared
    assert request.source_uri is not None
    names = score_names(spec)
    model = None
    if ChangeMethod.CLUSTER_TRANSITION in spec.methods:
        reporter.progress(0, "sampling pixels for clusterTransition")
        model = fit_clusters(spec, info, band_idx, window)
    blocks_lo = SAMPLE_PERCENT if model is not None else 0
    blocks_hi = MULTISCALE_PERCENT if spec.output.multiscales else BLOCKS_PERCENT
    out_grid = info.grid.window(window)
    tmp = storage.stage(request.output_uri, request.run_id)  # claimed; dead runs' leftovers cleaned
    attrs: dict[str, Any] = {"rasterkube:kind": resource.kind, "rasterkube:source": request.source_uri}
    if model is not None:
        attrs[multiscale.CATEGORICAL_BANDS_ATTR] = [clustering.LABEL_BAND]  # mode, not mean, in a pyramid
    out = geozarr.create(
        tmp,
        out_grid,
        info.times,
        names,
        dtype="float32",
        chunk_size=info.chunks[2],
        attrs=attrs,
    )
    assert info.layout is not None
    params = BlockParams(
        source=info.layout,
        band_indices=tuple(band_idx),
        offset=(window.y0, window.x0),
        methods=tuple(spec.methods),
        distance=spec.distance,
        robust=spec.robust_time_zscore,
        out_uri=tmp,
        out_var=out.data_var,
        names=tuple(names),
        cluster_model=model,
    )
    blocks = plan_blocks(out_grid.shape, out.chunks[2:], spec.xy_block_multiplier)
    try:
        run_blocks(
            score_block,
            blocks,
            params,
            num_cpus=spec.resources.cpus,
            max_in_flight=ctx.max_in_flight,
            reporter=ScaledReporter(reporter, blocks_lo, blocks_hi),
            message="scoring blocks",
        )
        levels = commit_store(
            tmp,
            request.output_uri,
            reporter,
            multiscales=spec.output.multiscales,
            pyramid_percent=(MULTISCALE_PERCENT, BLOCKS_PERCENT),
            commit_percent=COMMIT_PERCENT,
            num_cpus=spec.resources.cpus,
            max_in_flight=ctx.max_in_flight,
        )
    except BaseException:
        storage.remove(tmp)
        raise
    summary = raster_summary(out, len(blocks))
    if levels is not None:
        summary["multiscales"] = [list(g.shape) for g in levels]
    return JobResult(uri=request.output_uri, summary=summary)
