"""Per-pixel temporal change scores: the pure numerics of the ChangeScore service.

Everything here is a pure function over numpy arrays (no I/O, no global state).

Data layout
-----------
Inputs ``x`` have shape ``(T, B, N)``: time steps, bands, pixels.  Callers with a
``(T, B, Y, X)`` raster reshape it to ``(T, B, Y * X)`` (a free view for C-ordered
data) and reshape the results back.

A time step of a pixel is *invalid* when any of its bands is missing:

* float input: the band is NaN (or ±inf, which would otherwise poison every
  distance to that step without being a meaningful observation);
* int8 input (AlphaEarth Foundations embeddings): the band equals the nodata
  value :data:`ALPHA_EARTH_NODATA` (-128).

Every distance involving an invalid step is NaN, and invalid steps never take
part in a medoid.

Precision and memory
--------------------
Distances are always computed in float64 from *direct differences* (never the
``|a|² + |b|² - 2a·b`` Gram expansion, which cancels catastrophically for
near-equal vectors), so float32 input gives the same answers as its exact float64
value.  Work proceeds in pixel chunks whose float64 working set is a few MiB, so
temporaries stay bounded (and cache-resident) regardless of ``N``; only the
outputs scale with ``N``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "ALPHA_EARTH_NODATA",
    "ALPHA_EARTH_SCALE",
    "IMPLEMENTED_METHODS",
    "MAD_TO_SIGMA",
    "MEAN_AD_TO_SIGMA",
    "METHODS",
    "METHOD_CLUSTER_TRANSITION",
    "METHOD_DIFFERENCE",
    "METHOD_LOO_MEDOID",
    "METRICS",
    "METRIC_ALPHA_EARTH_COSINE",
    "METRIC_COSINE",
    "METRIC_EUCLIDEAN",
    "TIE_ATOL",
    "TIE_RTOL",
    "compute_scores",
    "dequantize_alpha_earth",
    "difference",
    "loo_medoid",
    "pairwise_distances",
    "robust_time_zscore",
    "score_name",
]

# --------------------------------------------------------------------------- names

METRIC_EUCLIDEAN: Final = "euclidean"
METRIC_COSINE: Final = "cosine"
METRIC_ALPHA_EARTH_COSINE: Final = "alphaEarthCosine"
METRICS: Final[tuple[str, ...]] = (METRIC_EUCLIDEAN, METRIC_COSINE, METRIC_ALPHA_EARTH_COSINE)

METHOD_DIFFERENCE: Final = "difference"
METHOD_LOO_MEDOID: Final = "looMedoid"
METHOD_CLUSTER_TRANSITION: Final = "clusterTransition"
METHODS: Final[tuple[str, ...]] = (METHOD_DIFFERENCE, METHOD_LOO_MEDOID, METHOD_CLUSTER_TRANSITION)
#: Methods this module computes. clusterTransition needs clusters fitted on the whole AOI
#: first, so it lives in :mod:`rasterkube.change.clustering`.
IMPLEMENTED_METHODS: Final[tuple[str, ...]] = (METHOD_DIFFERENCE, METHOD_LOO_MEDOID)

# Band-name fragments (snake_case) for each API name (camelCase).
_METHOD_SLUG: Final[dict[str, str]] = {
    METHOD_DIFFERENCE: "difference",
    METHOD_LOO_MEDOID: "loo_medoid",
    METHOD_CLUSTER_TRANSITION: "cluster_transition",
}
_METRIC_SLUG: Final[dict[str, str]] = {
    METRIC_EUCLIDEAN: "euclidean",
    METRIC_COSINE: "cosine",
    METRIC_ALPHA_EARTH_COSINE: "alpha_earth_cosine",
}
_DISTANCE_SUFFIX: Final = "distance"
_ROBUST_SUFFIX: Final = "robust_time_zscore"
_NAME_SEPARATOR: Final = "_"

# ------------------------------------------------------------------------ numerics

#: int8 value marking a missing AlphaEarth band.
ALPHA_EARTH_NODATA: Final = -128
#: AlphaEarth signed-square quantization: v = sign(q) * (q / 127.5) ** 2.
ALPHA_EARTH_SCALE: Final = 127.5

#: MAD -> standard deviation of a normal distribution (1 / Φ⁻¹(3/4)).
MAD_TO_SIGMA: Final = 1.4826
#: Mean absolute deviation -> standard deviation of a normal (√(π/2)); the usual
#: modified-z-score fallback when the MAD is 0.
MEAN_AD_TO_SIGMA: Final = 1.2533

#: Medoid candidates whose leave-one-out sum is within ``TIE_RTOL * min + TIE_ATOL``
#: of the minimum are tied, and the lowest time index wins.  The tolerance absorbs
#: float64 rounding of mathematically equal sums (which are common: two candidates
#: of a 2-element set always tie), while real float32-sized gaps still decide.
TIE_RTOL: Final = 1e-12
TIE_ATOL: Final = 1e-300

# Target size of one chunk's float64 (T, B, pixels) block.  A few such blocks are
# alive at once; keeping them within L2 (512 KiB was fastest on a 1.25 MiB-L2 Xeon
# for T=9, B=64, with a flat optimum up to ~2 MiB) makes the kernel cache-bound
# rather than memory-bound, and bounds temporaries independently of N.
_CHUNK_BYTES: Final = 1 << 19
_MIN_CHUNK_PIXELS: Final = 64

_FloatArray = npt.NDArray[np.float64]
_BoolArray = npt.NDArray[np.bool_]


def _build_alpha_earth_table() -> npt.NDArray[np.float32]:
    """De-quantized value of every int8 code (computed in float64), indexed by its uint8 bits."""
    q = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float64)
    table = np.sign(q) * (q / ALPHA_EARTH_SCALE) ** 2
    table[q == ALPHA_EARTH_NODATA] = np.nan
    return table.astype(np.float32)


# With only 256 codes, de-quantization is a single gather from a read-only table.
_ALPHA_EARTH_TABLE: Final = _build_alpha_earth_table()
_ALPHA_EARTH_TABLE.flags.writeable = False


def dequantize_alpha_earth(q: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """De-quantize AlphaEarth Foundations int8 embeddings.

    AlphaEarth stores embeddings with signed-square quantization::

        v = sign(q) * (q / 127.5) ** 2

    so ``q = 127`` gives ``(127 / 127.5)² ≈ 0.99217`` and ``q = -64`` gives
    ``-(64 / 127.5)²``.  ``q = -128`` (:data:`ALPHA_EARTH_NODATA`) is nodata and
    becomes NaN.

    Parameters
    ----------
    q
        int8 array of any shape.

    Returns
    -------
    float32 array of the same shape.
    """
    codes = np.asarray(q)
    if codes.dtype != np.int8:
        raise ValueError(f"AlphaEarth codes must be int8, got dtype {codes.dtype}")
    return _ALPHA_EARTH_TABLE[codes.view(np.uint8)]


# ----------------------------------------------------------------------- validation


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def _as_stack(x: npt.ArrayLike, metric: str) -> npt.NDArray[Any]:
    """Validate ``x`` as a (T, B, N) stack usable with ``metric`` and return it as an array."""
    _check_metric(metric)
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"x must have shape (T, B, N) = (time, band, pixel); got shape {arr.shape}")
    if arr.dtype == np.int8:
        if metric != METRIC_ALPHA_EARTH_COSINE:
            raise ValueError(
                f"int8 input is only supported with metric {METRIC_ALPHA_EARTH_COSINE!r} "
                f"(quantized AlphaEarth embeddings); got metric {metric!r}. "
                "Convert the data to float first to use it as plain numbers."
            )
    elif not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"x must be a float array (NaN = missing) or int8 AlphaEarth codes "
            f"(-128 = missing) with metric {METRIC_ALPHA_EARTH_COSINE!r}; got dtype {arr.dtype}"
        )
    return arr


# -------------------------------------------------------------------------- kernels


def _pixel_chunks(n_time: int, n_band: int, n_pixel: int) -> Iterator[slice]:
    """Pixel slices whose float64 (T, B, chunk) block is about ``_CHUNK_BYTES``."""
    per_pixel = max(1, n_time * n_band) * np.dtype(np.float64).itemsize
    step = max(_MIN_CHUNK_PIXELS, _CHUNK_BYTES // per_pixel)
    for start in range(0, n_pixel, step):
        yield slice(start, min(start + step, n_pixel))


def _load(x: npt.NDArray[Any], pixels: slice) -> tuple[_FloatArray, _BoolArray]:
    """float64 vectors (T, B, c) and step validity (T, c) of one pixel chunk.

    The vectors are a fresh array that the caller may overwrite.  Invalid steps
    hold arbitrary values: callers mask every result that involves them.

    int8 AlphaEarth codes become ``q·|q|``, which is exactly 127.5² times the
    de-quantized value ``sign(q)·(q/127.5)²`` and exact in integer arithmetic.
    The cosine distance (the only metric :func:`_as_stack` allows for int8) does
    not see a common scale, so this is the same metric without the rounding of
    the de-quantization, and several times cheaper than a table lookup.
    """
    block = x[:, :, pixels]
    if block.dtype == np.int8:
        valid = (block != ALPHA_EARTH_NODATA).all(axis=1)
        codes = block.astype(np.int16)  # |q·|q|| <= 128² fits int16
        np.multiply(codes, np.abs(codes), out=codes)
        return codes.astype(np.float64), valid
    values = block.astype(np.float64)  # always a copy
    finite: _BoolArray = np.isfinite(values)
    return values, np.all(finite, axis=1)


def _embed(values: _FloatArray, metric: str) -> tuple[_FloatArray, _BoolArray | None]:
    """Points whose Euclidean geometry gives ``metric``, plus the zero-norm mask for cosines.

    Overwrites ``values``.  Cosine distances are evaluated as ``½‖â - b̂‖²`` on unit
    vectors ``â = a/‖a‖``: algebraically ``1 - a·b/(‖a‖‖b‖)``, but the difference
    form keeps full relative precision for near-parallel vectors (where
    ``1 - dot`` cancels) and is exactly 0 for identical vectors.  (The float64
    norm cannot over- or underflow for float32 or int8 input; float64 input would
    need components beyond ~1e±150 for that.)
    """
    if metric == METRIC_EUCLIDEAN:
        return values, None
    norms = np.sqrt(np.einsum("tbn,tbn->tn", values, values))
    with np.errstate(invalid="ignore", divide="ignore"):
        # A zero vector has no direction: 0/0 = NaN makes its distances NaN, and
        # _mask_pairs restores the 0 between two zero vectors.
        np.divide(values, norms[:, None, :], out=values)
    return values, norms == 0


def _distance_between(a: _FloatArray, b: _FloatArray, metric: str) -> _FloatArray:
    """Distances between embedded points (..., B, c) → (..., c), before :func:`_mask_pairs`."""
    with np.errstate(invalid="ignore"):  # inf - inf at invalid steps, masked later
        diff = a - b
    np.multiply(diff, diff, out=diff)
    squared: _FloatArray = diff.sum(axis=-2)
    if metric == METRIC_EUCLIDEAN:
        np.sqrt(squared, out=squared)
    else:
        squared *= 0.5
    return squared


def _mask_pairs(
    dist: _FloatArray,
    valid_a: _BoolArray,
    valid_b: _BoolArray,
    zero_a: _BoolArray | None,
    zero_b: _BoolArray | None,
) -> None:
    """In place: 0 between two (identical) zero vectors, NaN unless both steps are valid."""
    if zero_a is not None and zero_b is not None:
        dist[zero_a & zero_b] = 0.0
    dist[~(valid_a & valid_b)] = np.nan


def _pairwise_chunk(values: _FloatArray, valid: _BoolArray, metric: str) -> _FloatArray:
    """(T, T, c) float64 distance matrix of one chunk (overwrites ``values``).

    Exactly symmetric (each pair is computed once and written to both halves).
    """
    n_time = values.shape[0]
    points, zero = _embed(values, metric)
    dist = np.zeros((n_time, n_time, values.shape[2]))
    for s in range(n_time - 1):
        # One vectorized call per row of the upper triangle: (T-s-1, B, c) temporaries.
        row = _distance_between(points[s + 1 :], points[s], metric)
        dist[s, s + 1 :] = row
        dist[s + 1 :, s] = row
    _mask_pairs(
        dist,
        valid[:, None, :],
        valid[None, :, :],
        None if zero is None else zero[:, None, :],
        None if zero is None else zero[None, :, :],
    )
    return dist


def _difference_chunk(values: _FloatArray, valid: _BoolArray, metric: str) -> _FloatArray:
    """(T, c) float64 distance of each step to its predecessor, NaN at t=0 (overwrites ``values``)."""
    points, zero = _embed(values, metric)
    out = np.full((values.shape[0], values.shape[2]), np.nan)
    # Same operand order as _pairwise_chunk, so the two agree bit for bit.
    out[1:] = _distance_between(points[1:], points[:-1], metric)
    _mask_pairs(
        out[1:],
        valid[1:],
        valid[:-1],
        None if zero is None else zero[1:],
        None if zero is None else zero[:-1],
    )
    return out


def _loo_medoid_from_pairwise(dist: _FloatArray, valid: _BoolArray) -> _FloatArray:
    """Leave-one-out medoid scores (T, c) from one symmetric (T, T, c) distance matrix.

    For each ``t``, the candidates are the valid steps ``O_t`` other than ``t`` and
    candidate ``s`` costs ``S_t(s) = Σ_{u∈O_t} D[s, u]``.  Rather than summing anew
    for every ``t`` (O(T³)), all costs come from one row sum over the valid steps:
    ``S_t(s) = rowsum[s] - D[s, t]``, evaluated for all ``(t, s)`` at once.

    A NaN distance between two *valid* steps (cosine with exactly one zero vector)
    would make ``rowsum[s]`` NaN and could not be subtracted back out, so such
    entries are summed as 0 and counted instead: ``S_t(s)`` is undefined — and
    ``s`` not a candidate — iff an undefined distance remains after removing ``t``.
    """
    n_time = dist.shape[0]
    if n_time < 2:
        return np.full(valid.shape, np.nan)
    missing = np.isnan(dist)
    undefined = missing & valid[:, None, :] & valid[None, :, :]
    finite_dist = np.where(missing, 0.0, dist)  # invalid steps contribute nothing
    row_sum = finite_dist.sum(axis=1)
    row_undefined = undefined.sum(axis=1)

    # Axis 0 is the left-out step t, axis 1 the candidate s; by symmetry
    # D[s, t] = D[t, s], so the subtracted term is finite_dist itself.
    cost = row_sum[None, :, :] - finite_dist
    candidate = valid[None, :, :] & (row_undefined[None, :, :] == undefined)
    diagonal = np.arange(n_time)
    candidate[diagonal, diagonal] = False  # s ≠ t
    cost[~candidate] = np.inf
    best = cost.min(axis=1)
    tied = cost <= (best + (TIE_RTOL * best + TIE_ATOL))[:, None, :]
    medoid = tied.argmax(axis=1)  # first True: the lowest tied index wins
    score = np.take_along_axis(dist, medoid[:, None, :], axis=1)[:, 0, :]
    # best is inf when no candidate is left (fewer than 2 valid steps).
    return np.where(valid & np.isfinite(best), score, np.nan)


# ---------------------------------------------------------------------- public API


def pairwise_distances(x: npt.ArrayLike, metric: str) -> _FloatArray:
    """All pairwise distances between the time steps of every pixel.

    Parameters
    ----------
    x
        (T, B, N) float array, or int8 AlphaEarth codes with ``metric="alphaEarthCosine"``.
    metric
        ``"euclidean"`` (L2 norm of the difference), ``"cosine"``
        (``1 - a·b/(‖a‖‖b‖)``) or ``"alphaEarthCosine"`` (cosine distance of
        de-quantized AlphaEarth embeddings; float input is taken as already
        de-quantized).  For the cosines, a zero vector has no direction: its
        distance to a non-zero vector is NaN, to another zero vector 0.

    Returns
    -------
    (T, T, N) float64, symmetric with a zero diagonal, NaN where either step is
    invalid.  Peak memory is the output plus a bounded per-chunk working set.
    """
    arr = _as_stack(x, metric)
    n_time, n_band, n_pixel = arr.shape
    out = np.empty((n_time, n_time, n_pixel))
    for pixels in _pixel_chunks(n_time, n_band, n_pixel):
        out[:, :, pixels] = _pairwise_chunk(*_load(arr, pixels), metric)
    return out


def difference(x: npt.ArrayLike, metric: str) -> npt.NDArray[np.float32]:
    """Distance of every time step to the previous one.

    Parameters
    ----------
    x, metric
        As for :func:`pairwise_distances`.

    Returns
    -------
    (T, N) float32; NaN at ``t = 0`` and where step ``t`` or ``t - 1`` is invalid.
    """
    arr = _as_stack(x, metric)
    n_time, n_band, n_pixel = arr.shape
    out = np.empty((n_time, n_pixel), dtype=np.float32)
    for pixels in _pixel_chunks(n_time, n_band, n_pixel):
        out[:, pixels] = _difference_chunk(*_load(arr, pixels), metric)
    return out


def loo_medoid(x: npt.ArrayLike, metric: str) -> npt.NDArray[np.float32]:
    """Leave-one-out medoid score: distance of each step to the medoid of the others.

    For each ``t``, ``O_t`` is the set of valid steps other than ``t``; the medoid
    ``m_t`` is the ``s ∈ O_t`` minimizing ``Σ_{u∈O_t} D[s, u]`` and the score is
    ``D[t, m_t]``.  Sums are float64; candidates within :data:`TIE_RTOL` (relative)
    plus :data:`TIE_ATOL` of the minimum are tied and the lowest time index wins.
    Candidates whose sum contains an undefined (NaN) distance between valid steps
    (cosine with exactly one zero vector) are skipped.

    Cost is O(T²·B·N): one pairwise matrix per pixel chunk serves every ``t``.

    Parameters
    ----------
    x, metric
        As for :func:`pairwise_distances`.

    Returns
    -------
    (T, N) float32; NaN where ``t`` is invalid or ``O_t`` has no usable candidate
    (in particular whenever fewer than 2 steps are valid).
    """
    arr = _as_stack(x, metric)
    n_time, n_band, n_pixel = arr.shape
    out = np.empty((n_time, n_pixel), dtype=np.float32)
    for pixels in _pixel_chunks(n_time, n_band, n_pixel):
        values, valid = _load(arr, pixels)
        out[:, pixels] = _loo_medoid_from_pairwise(_pairwise_chunk(values, valid, metric), valid)
    return out


def _nanmedian_time(a: _FloatArray) -> _FloatArray:
    """Median over axis 0 ignoring NaN; NaN for all-NaN columns, without warnings.

    Sorting puts NaNs last, so the median of the ``k`` finite values sits at sorted
    positions ``(k - 1) // 2`` and ``k // 2`` (averaged as numpy does).
    """
    if a.shape[0] == 0:
        return np.full(a.shape[1:], np.nan)
    ordered = np.sort(a, axis=0)
    count = np.count_nonzero(~np.isnan(a), axis=0)
    low = np.maximum(count - 1, 0) // 2  # both 0 for an empty column, masked below
    high = count // 2
    pick_low = np.take_along_axis(ordered, low[None, :], axis=0)[0]
    pick_high = np.take_along_axis(ordered, high[None, :], axis=0)[0]
    median: _FloatArray = (pick_low + pick_high) / 2
    median[count == 0] = np.nan
    return median


def robust_time_zscore(s: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Robust z-score of every pixel's series through time.

    ``z = (s - median) / (1.4826 · MAD)`` over the finite values of each pixel
    (column).  When the MAD is 0 (more than half the values equal the median) the
    modified-z-score convention ``z = (s - median) / (1.2533 · meanAD)`` is used,
    with ``meanAD`` the mean absolute deviation from the median.  When that is 0
    too, all finite values equal the median and their z-score is 0.  Non-finite
    inputs give NaN and the result never contains ±inf (values beyond the float32
    range are clipped to it).

    Parameters
    ----------
    s
        (T, N) scores.

    Returns
    -------
    (T, N) float32.
    """
    series = np.asarray(s, dtype=np.float64)
    if series.ndim != 2:
        raise ValueError(f"s must have shape (T, N) = (time, pixel); got shape {series.shape}")
    series = np.where(np.isfinite(series), series, np.nan)
    median = _nanmedian_time(series)
    deviation = series - median
    abs_deviation = np.abs(deviation)
    mad = _nanmedian_time(abs_deviation)
    count = np.count_nonzero(~np.isnan(series), axis=0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean_ad = np.nansum(abs_deviation, axis=0) / count
        scale = np.where(mad > 0, MAD_TO_SIGMA * mad, MEAN_AD_TO_SIGMA * mean_ad)
        z = np.where(scale > 0, deviation / scale, np.where(deviation == 0, 0.0, np.nan))
    float32_max = float(np.finfo(np.float32).max)
    return np.clip(z, -float32_max, float32_max).astype(np.float32)


def score_name(method: str, metric: str, robust: bool) -> str:
    """Band name of a score: ``<method>_<metric>_distance[_robust_time_zscore]`` in snake_case.

    >>> score_name("looMedoid", "cosine", robust=True)
    'loo_medoid_cosine_distance_robust_time_zscore'
    """
    _check_method(method)
    _check_metric(metric)
    parts = [_METHOD_SLUG[method], _METRIC_SLUG[metric], _DISTANCE_SUFFIX]
    if robust:
        parts.append(_ROBUST_SUFFIX)
    return _NAME_SEPARATOR.join(parts)


def compute_scores(
    x: npt.ArrayLike,
    methods: Sequence[str],
    metric: str,
    robust: bool,
) -> tuple[list[str], npt.NDArray[np.float32]]:
    """Compute the requested change-score bands.

    Parameters
    ----------
    x
        (T, B, N) float array (any float dtype; NaN = missing), or int8 AlphaEarth
        codes (-128 = missing), which require ``metric="alphaEarthCosine"``.
    methods
        Non-empty sequence of distinct methods from :data:`METHODS`; only
        ``"difference"`` and ``"looMedoid"`` are implemented.
    metric
        One of :data:`METRICS`.
    robust
        Also emit each method's :func:`robust_time_zscore`.

    Returns
    -------
    names
        Band names (see :func:`score_name`): per method, the raw distance band and,
        if ``robust``, its robust z-score band right after it.
    scores
        (T, len(names), N) float32.
    """
    _check_metric(metric)
    if isinstance(methods, str):
        # A bare string is a Sequence[str] of characters: almost certainly a mistake.
        raise ValueError(f"methods must be a sequence of method names, not the string {methods!r}")
    method_list = list(methods)
    if not method_list:
        raise ValueError(f"methods must not be empty; allowed: {', '.join(METHODS)}")
    for method in method_list:
        _check_method(method)
    if len(set(method_list)) != len(method_list):
        raise ValueError(f"methods must be distinct (band names would collide); got {method_list}")
    for method in method_list:
        if method not in IMPLEMENTED_METHODS:
            raise NotImplementedError(
                f"change-score method {method!r} is not computed here (it needs clusters fitted on the whole AOI: "
                f"see rasterkube.change.clustering); available: {', '.join(IMPLEMENTED_METHODS)}"
            )
    arr = _as_stack(x, metric)
    n_time, n_band, n_pixel = arr.shape

    names: list[str] = []
    raw_band: dict[str, int] = {}  # method -> its raw band index in the output
    for method in method_list:
        raw_band[method] = len(names)
        names.append(score_name(method, metric, robust=False))
        if robust:
            names.append(score_name(method, metric, robust=True))

    out = np.empty((n_time, len(names), n_pixel), dtype=np.float32)
    for pixels in _pixel_chunks(n_time, n_band, n_pixel):
        values, valid = _load(arr, pixels)
        # looMedoid needs the full matrix; difference is its first sub-diagonal
        # (bit-identical to _difference_chunk), so share it when both are asked for.
        dist = _pairwise_chunk(values, valid, metric) if METHOD_LOO_MEDOID in raw_band else None
        for method, band in raw_band.items():
            if method == METHOD_LOO_MEDOID:
                assert dist is not None
                out[:, band, pixels] = _loo_medoid_from_pairwise(dist, valid)
            elif dist is not None:
                out[0, band, pixels] = np.nan
                out[1:, band, pixels] = np.diagonal(dist, offset=-1).T  # D[t, t-1] for t >= 1
            else:
                out[:, band, pixels] = _difference_chunk(values, valid, metric)
    if robust:
        # The z-score standardizes the emitted float32 band, over all of time per pixel.
        for band in raw_band.values():
            out[:, band + 1, :] = robust_time_zscore(out[:, band, :])
    return names, out
