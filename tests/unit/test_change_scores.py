"""Unit tests for rasterkube.change.scores against a brute-force float64 reference.

The reference below is deliberately naive: per-pixel Python loops, math.fsum, the
textbook cosine formula 1 - a·b/(|a||b|), and medoid sums recomputed from scratch
for every left-out step.  It shares no code with the implementation under test.
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from rasterkube.change import scores
from rasterkube.change.scores import (
    METRIC_ALPHA_EARTH_COSINE,
    METRIC_COSINE,
    METRIC_EUCLIDEAN,
    compute_scores,
    dequantize_alpha_earth,
    difference,
    loo_medoid,
    pairwise_distances,
    robust_time_zscore,
    score_name,
)

NODATA = -128
ALL_METRICS = (METRIC_EUCLIDEAN, METRIC_COSINE, METRIC_ALPHA_EARTH_COSINE)
TIE_RTOL, TIE_ATOL = 1e-12, 1e-300
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def assert_close_f32(actual: np.ndarray, expected: np.ndarray) -> None:
    """float32 outputs vs the float64 reference: float32 rounding, plus a tiny absolute
    slack for near-zero cosine distances (computed by a different formula there)."""
    np.testing.assert_allclose(actual, expected, rtol=2e-7, atol=1e-12, equal_nan=True)


def assert_close_f64(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-14, equal_nan=True)


# ------------------------------------------------------------------ brute reference


def ref_vector(x: np.ndarray, t: int, n: int) -> list[float] | None:
    """Float64 vector of step t of pixel n, or None if the step is invalid."""
    column = x[t, :, n]
    if x.dtype == np.int8:
        if any(int(q) == NODATA for q in column):
            return None
        return [math.copysign((int(q) / 127.5) ** 2, int(q)) if q else 0.0 for q in column]
    values = [float(v) for v in column]
    return values if all(math.isfinite(v) for v in values) else None


def ref_distance(a: Sequence[float], b: Sequence[float], metric: str) -> float:
    if metric == METRIC_EUCLIDEAN:
        return math.sqrt(math.fsum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True)))
    norm_a = math.sqrt(math.fsum(ai * ai for ai in a))
    norm_b = math.sqrt(math.fsum(bi * bi for bi in b))
    if norm_a == 0 and norm_b == 0:
        return 0.0
    if norm_a == 0 or norm_b == 0:
        return math.nan
    return 1.0 - math.fsum(ai * bi for ai, bi in zip(a, b, strict=True)) / (norm_a * norm_b)


def ref_pairwise(x: np.ndarray, metric: str) -> np.ndarray:
    n_time, _, n_pixel = x.shape
    out = np.full((n_time, n_time, n_pixel), np.nan)
    for n in range(n_pixel):
        vectors = [ref_vector(x, t, n) for t in range(n_time)]
        for s in range(n_time):
            for t in range(n_time):
                a, b = vectors[s], vectors[t]
                if a is None or b is None:
                    continue
                out[s, t, n] = 0.0 if s == t else ref_distance(a, b, metric)
    return out


def ref_difference(x: np.ndarray, metric: str) -> np.ndarray:
    dist = ref_pairwise(x, metric)
    out = np.full(x.shape[::2], np.nan)
    for t in range(1, x.shape[0]):
        out[t] = dist[t, t - 1]
    return out


def ref_medoid(dist: np.ndarray, valid: list[bool], t: int) -> int | None:
    """Leave-one-out medoid of step t of one pixel, sums recomputed from scratch."""
    others = [s for s in range(len(valid)) if valid[s] and s != t]
    sums = {s: sum(dist[s, u] for u in others) for s in others}
    finite = {s: v for s, v in sums.items() if not math.isnan(v)}
    if not valid[t] or not finite:
        return None
    best = min(finite.values())
    return min(s for s, v in finite.items() if v <= best + TIE_RTOL * best + TIE_ATOL)


def ref_loo_medoid(x: np.ndarray, metric: str) -> np.ndarray:
    dist = ref_pairwise(x, metric)
    n_time, _, n_pixel = x.shape
    out = np.full((n_time, n_pixel), np.nan)
    for n in range(n_pixel):
        valid = [ref_vector(x, t, n) is not None for t in range(n_time)]
        for t in range(n_time):
            medoid = ref_medoid(dist[:, :, n], valid, t)
            if medoid is not None:
                out[t, n] = dist[t, medoid, n]
    return out


def ref_robust_zscore(s: np.ndarray) -> np.ndarray:
    out = np.full(s.shape, np.nan)
    for n in range(s.shape[1]):
        column = s[:, n].astype(np.float64)
        finite = column[np.isfinite(column)]
        if finite.size == 0:
            continue
        median = np.median(finite)
        mad = np.median(np.abs(finite - median))
        mean_ad = np.mean(np.abs(finite - median))
        for t, value in enumerate(column):
            if not math.isfinite(value):
                continue
            if mad > 0:
                out[t, n] = (value - median) / (1.4826 * mad)
            elif mean_ad > 0:
                out[t, n] = (value - median) / (1.2533 * mean_ad)
            else:
                out[t, n] = 0.0
    return out


# ----------------------------------------------------------------------- fixtures


def random_stack(metric: str, seed: int, n_time: int = 7, n_band: int = 4, n_pixel: int = 60) -> np.ndarray:
    """Random (T, B, N) data exercising missing bands, duplicates and degenerate pixels."""
    rng = np.random.default_rng(seed)
    shape = (n_time, n_band, n_pixel)
    hole = rng.random(shape) < 0.03  # ~11% of steps invalid with 4 bands
    if metric == METRIC_ALPHA_EARTH_COSINE:
        x: np.ndarray = rng.integers(-127, 128, size=shape).astype(np.int8)
        x[hole] = NODATA
        missing: float = NODATA
    else:
        x = rng.normal(size=shape)
        x[hole] = np.nan
        missing = np.nan
    if metric != METRIC_ALPHA_EARTH_COSINE:
        x[rng.random(shape) < 0.005] = np.inf  # ±inf marks a step invalid like NaN
        x[rng.random(shape) < 0.005] = -np.inf
    x[:, :, 0] = missing  # no valid step
    x[1:, 0, 1] = missing  # one valid step
    x[2:, 0, 2] = missing  # two valid steps
    if n_time < 6:
        return x
    x[3, :, 3:10] = x[1, :, 3:10]  # exact duplicates across time -> exact medoid ties
    x[4, :, 3:6] = x[1, :, 3:6]
    if metric == METRIC_COSINE:
        x[2, :, 10:14] = 0.0  # zero vectors: undefined cosine to anything non-zero
        x[5, :, 12:14] = 0.0  # ... but 0 between two zero vectors
    return x


# ------------------------------------------------------------------ dequantization


def test_dequantize_alpha_earth_values() -> None:
    q = np.array([127, -64, 0, NODATA, 1, -127], dtype=np.int8)
    v = dequantize_alpha_earth(q)
    assert v.dtype == np.float32
    assert v.shape == q.shape
    assert v[0] == pytest.approx(0.9921722, abs=1e-7)  # (127 / 127.5)²
    assert v[1] == pytest.approx(-((64 / 127.5) ** 2), rel=1e-7)
    assert v[2] == 0.0
    assert np.isnan(v[3])
    assert v[4] == pytest.approx((1 / 127.5) ** 2, rel=1e-7)
    assert v[5] == pytest.approx(-((127 / 127.5) ** 2), rel=1e-7)


def test_dequantize_alpha_earth_all_codes_and_shape() -> None:
    q = np.arange(-128, 128, dtype=np.int16).astype(np.int8).reshape(4, 8, 8)
    v = dequantize_alpha_earth(q)
    assert v.shape == q.shape
    expected = np.sign(q.astype(np.float64)) * (q / 127.5) ** 2
    expected[q == NODATA] = np.nan
    np.testing.assert_allclose(v, expected, rtol=1e-7)
    assert np.isnan(v).sum() == 1


def test_dequantize_alpha_earth_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="int8"):
        dequantize_alpha_earth(np.array([1, 2], dtype=np.int16))


# ------------------------------------------------------------ distance functions


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_pairwise_matches_reference(metric: str) -> None:
    x = random_stack(metric, seed=1)
    got = pairwise_distances(x, metric)
    expected = ref_pairwise(x, metric)
    assert got.dtype == np.float64
    assert got.shape == (7, 7, 60)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert_close_f64(got, expected)
    np.testing.assert_array_equal(got, got.transpose(1, 0, 2))


def test_pairwise_diagonal_zero_and_nan_for_invalid() -> None:
    x = random_stack(METRIC_EUCLIDEAN, seed=2)
    got = pairwise_distances(x, METRIC_EUCLIDEAN)
    diagonal = np.diagonal(got).T  # (T, N)
    valid = np.isfinite(x).all(axis=1)
    assert (diagonal[valid] == 0).all()
    assert np.isnan(diagonal[~valid]).all()
    assert (~valid).any()


def test_euclidean_keeps_precision_for_near_equal_vectors() -> None:
    # |a|^2 + |b|^2 - 2ab would return 0 (or garbage) here; direct differences are exact.
    a = np.full(64, 1000.0)
    b = a.copy()
    b[0] += 1e-9
    x = np.stack([a, b])[:, :, None]
    got = pairwise_distances(x, METRIC_EUCLIDEAN)[0, 1, 0]
    assert got == pytest.approx(b[0] - a[0], rel=1e-12, abs=0)


def test_cosine_keeps_precision_for_near_parallel_vectors() -> None:
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([1.0, 1e-6, 0.0])
    x = np.stack([a, b])[:, :, None]
    got = pairwise_distances(x, METRIC_COSINE)[0, 1, 0]
    # 1 - 1/sqrt(1 + ε) ≈ 5e-13, written without cancellation; 1 - dot keeps ~4 digits here.
    exact = -math.expm1(-0.5 * math.log1p(1e-12))
    assert got == pytest.approx(exact, rel=1e-9, abs=0)


def test_cosine_zero_vectors() -> None:
    zero, one, two = [0.0, 0.0], [1.0, 2.0], [2.0, 4.0]
    x = np.array([zero, zero, one, two]).T[None].transpose(2, 1, 0)  # (T=4, B=2, N=1)
    got = pairwise_distances(x, METRIC_COSINE)[:, :, 0]
    assert got[0, 1] == 0.0  # two (identical) zero vectors
    assert np.isnan(got[0, 2]) and np.isnan(got[3, 1])  # direction undefined
    assert got[2, 3] == pytest.approx(0.0, abs=1e-15)  # parallel vectors


def test_alpha_earth_int8_matches_cosine_of_dequantized() -> None:
    q = random_stack(METRIC_ALPHA_EARTH_COSINE, seed=3)
    from_codes = pairwise_distances(q, METRIC_ALPHA_EARTH_COSINE)
    from_floats = pairwise_distances(dequantize_alpha_earth(q), METRIC_COSINE)
    # dequantize_alpha_earth rounds to float32; the int8 path de-quantizes in float64.
    np.testing.assert_allclose(from_codes, from_floats, rtol=1e-5, atol=1e-6, equal_nan=True)
    # Float input with alphaEarthCosine is taken as already de-quantized.
    floats = dequantize_alpha_earth(q)
    np.testing.assert_array_equal(
        pairwise_distances(floats, METRIC_ALPHA_EARTH_COSINE), pairwise_distances(floats, METRIC_COSINE)
    )


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_difference_matches_reference(metric: str) -> None:
    x = random_stack(metric, seed=4)
    got = difference(x, metric)
    expected = ref_difference(x, metric)
    assert got.dtype == np.float32
    assert got.shape == (7, 60)
    assert np.isnan(got[0]).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert_close_f32(got, expected)


# -------------------------------------------------------------------- LOO medoid


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("seed", [5, 6])
def test_loo_medoid_matches_reference(metric: str, seed: int) -> None:
    x = random_stack(metric, seed=seed)
    got = loo_medoid(x, metric)
    expected = ref_loo_medoid(x, metric)
    assert got.dtype == np.float32
    assert got.shape == (7, 60)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert_close_f32(got, expected)
    assert np.isfinite(expected).mean() > 0.5  # the comparison is not vacuous


def test_loo_medoid_float32_input_is_computed_in_float64() -> None:
    x32 = random_stack(METRIC_EUCLIDEAN, seed=7).astype(np.float32)
    np.testing.assert_array_equal(
        loo_medoid(x32, METRIC_EUCLIDEAN), loo_medoid(x32.astype(np.float64), METRIC_EUCLIDEAN)
    )


def _points_to_stack(points: Sequence[Sequence[float]], dtype: npt.DTypeLike) -> np.ndarray:
    """(T, B) points of one pixel -> (T, B, 1) stack."""
    return np.asarray(points, dtype=dtype)[:, :, None]


def _with_anchors(points: Sequence[Sequence[float]], anchors: np.ndarray) -> np.ndarray:
    """float32 (T, B, N) stack: the same candidates 1.. in every pixel, step 0 = anchors[n]."""
    x = np.repeat(_points_to_stack(points, np.float32), len(anchors), axis=2)
    x[0] = anchors.T
    return x


def _loo_sums(x: np.ndarray, metric: str, t: int, n: int) -> dict[int, float]:
    dist = ref_pairwise(x[:, :, n : n + 1], metric)[:, :, 0]
    others = [s for s in range(x.shape[0]) if s != t]
    return {s: math.fsum(dist[s, u] for u in others) for s in others}


# Four collinear candidates 1..4 at x = 0, 1, 2, 3: the middle two (steps 2 and 3)
# have exactly equal sums (4).
LINE = [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]
# Four candidates symmetric under the reflection x <-> y (1<->4, 2<->3): the cosine
# sums of steps 2 and 3 are mathematically equal.
MIRROR = [[0.0, 0.0, 0.0], [5.0, 1.0, 0.0], [3.0, 2.0, 0.0], [2.0, 3.0, 0.0], [1.0, 5.0, 0.0]]
# Step 0 (left out, t = 0) varies per pixel: it shifts every row sum, so float32
# rounding of the sums lands differently in each pixel, while D[0,2] != D[0,3]
# lets the score tell which medoid was chosen.
_K = np.arange(16.0)
LINE_ANCHORS = np.stack([0.37 * _K - 2.0, 7.0 + 0.11 * _K], axis=1)
MIRROR_ANCHORS = np.stack([np.ones_like(_K), 0.13 * _K - 0.4, 0.02 * _K], axis=1)
TIE_CASES = [(METRIC_EUCLIDEAN, LINE, LINE_ANCHORS), (METRIC_COSINE, MIRROR, MIRROR_ANCHORS)]
TIE_IDS = [METRIC_EUCLIDEAN, METRIC_COSINE]


@pytest.mark.parametrize(("metric", "points", "anchors"), TIE_CASES, ids=TIE_IDS)
def test_loo_medoid_float32_near_tie(metric: str, points: list[list[float]], anchors: np.ndarray) -> None:
    # Lifting step 2 off the line/plane by δ = 3e-5 raises its sum by O(δ²): step 3
    # becomes the medoid by a margin far below float32 resolution but far above
    # float64 rounding and the 1e-12 tie tolerance.  Float32 sums (or a looser tie
    # tolerance) would tie or flip them and pick the lower index 2 in many pixels.
    lifted = [list(p) for p in points]
    lifted[2][-1] = 3e-5
    x = _with_anchors(lifted, anchors)
    dist = ref_pairwise(x, metric)
    for n in range(x.shape[2]):  # preconditions: a genuine float32 near-tie, visible in the score
        sums = _loo_sums(x, metric, t=0, n=n)
        assert 1e-11 < (sums[2] - sums[3]) / sums[3] < FLOAT32_EPS / 8
        assert min(sums, key=sums.__getitem__) == 3
        assert abs(dist[0, 2, n] - dist[0, 3, n]) > 1e-3

    got = loo_medoid(x, metric)
    np.testing.assert_allclose(got[0], dist[0, 3], rtol=1e-6)
    assert_close_f32(got, ref_loo_medoid(x, metric))


@pytest.mark.parametrize(("metric", "points", "anchors"), TIE_CASES, ids=TIE_IDS)
def test_loo_medoid_exact_tie_takes_lowest_index(metric: str, points: list[list[float]], anchors: np.ndarray) -> None:
    x = _with_anchors(points, anchors)
    dist = ref_pairwise(x, metric)
    for n in range(x.shape[2]):
        sums = _loo_sums(x, metric, t=0, n=n)
        assert sums[2] == pytest.approx(sums[3], rel=1e-14, abs=0)  # precondition: a tie
        assert abs(dist[0, 2, n] - dist[0, 3, n]) > 1e-3
    got = loo_medoid(x, metric)
    np.testing.assert_allclose(got[0], dist[0, 2], rtol=1e-6)
    assert_close_f32(got, ref_loo_medoid(x, metric))


def test_loo_medoid_two_candidates_always_tie() -> None:
    # With T=3 every O_t has two elements whose sums are both D[a, b]: lowest index wins.
    x = _points_to_stack([[0.0], [1.0], [10.0]], np.float64)
    np.testing.assert_array_equal(loo_medoid(x, METRIC_EUCLIDEAN)[:, 0], [1.0, 1.0, 10.0])


def test_loo_medoid_duplicate_candidates_tie() -> None:
    # Steps 1 and 3 are identical: equal sums, step 1 (lower) is the medoid for t=0.
    x = _points_to_stack([[0.0, 5.0], [1.0, 0.0], [4.0, 0.0], [1.0, 0.0], [2.5, 0.5]], np.float32)
    got = loo_medoid(x, METRIC_EUCLIDEAN)[:, 0]
    assert_close_f32(got, ref_loo_medoid(x, METRIC_EUCLIDEAN)[:, 0])


# ------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_single_time_step(metric: str) -> None:
    x = random_stack(metric, seed=8, n_time=1, n_pixel=5)
    assert pairwise_distances(x, metric).shape == (1, 1, 5)
    assert np.isnan(difference(x, metric)).all()
    assert np.isnan(loo_medoid(x, metric)).all()
    names, bands = compute_scores(x, ["difference", "looMedoid"], metric, robust=True)
    assert len(names) == 4
    assert bands.shape == (1, 4, 5)
    assert np.isnan(bands).all()


def test_two_time_steps() -> None:
    x = np.array([[[0.0, 0.0, np.nan]], [[3.0, 4.0, 1.0]]])  # (T=2, B=1, N=3)
    x = np.concatenate([x, np.zeros_like(x)], axis=1)  # B=2: (0,0)->(3,0), (0,0)->(4,0)
    diff = difference(x, METRIC_EUCLIDEAN)
    np.testing.assert_array_equal(diff, [[np.nan, np.nan, np.nan], [3.0, 4.0, np.nan]])
    # Each step's only other valid step is its medoid.
    np.testing.assert_array_equal(loo_medoid(x, METRIC_EUCLIDEAN), [[3.0, 4.0, np.nan], [3.0, 4.0, np.nan]])


def test_results_do_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    x = random_stack(METRIC_COSINE, seed=9, n_pixel=500)
    whole = compute_scores(x, ["looMedoid", "difference"], METRIC_COSINE, robust=True)[1]
    monkeypatch.setattr(scores, "_CHUNK_BYTES", 1)  # -> minimum-size chunks, with a ragged tail
    chunked = compute_scores(x, ["looMedoid", "difference"], METRIC_COSINE, robust=True)[1]
    np.testing.assert_array_equal(whole, chunked)


def test_peak_memory_is_bounded() -> None:
    # Materializing (T, T, B, N) float64 would need ~1.3 GB here; allow the (T, T, N)
    # output plus a few chunk-sized temporaries.
    n_time, n_band, n_pixel = 9, 64, 32_000
    x = np.random.default_rng(10).normal(size=(n_time, n_band, n_pixel)).astype(np.float32)
    output_bytes = n_time * n_time * n_pixel * 8
    slack = 24 * 2**20
    tracemalloc.start()
    try:
        pairwise_distances(x, METRIC_EUCLIDEAN)
        _, pairwise_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loo_medoid(x, METRIC_COSINE)
        _, loo_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pairwise_peak < output_bytes + slack, pairwise_peak
    # loo_medoid only keeps (T, N) float32 beyond its chunk.
    assert loo_peak < n_time * n_pixel * 4 + slack, loo_peak


# ------------------------------------------------------------ robust z-score


def test_robust_zscore_matches_reference_random() -> None:
    rng = np.random.default_rng(11)
    s = rng.gamma(2.0, size=(9, 200))
    s[rng.random(s.shape) < 0.15] = np.nan
    s[:, 0] = np.nan
    s[1:, 1] = np.nan  # a single finite value -> z = 0
    got = robust_time_zscore(s.astype(np.float32))
    expected = ref_robust_zscore(s.astype(np.float32))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert got[0, 1] == 0.0


def test_robust_zscore_known_values() -> None:
    s = np.array([1.0, 2.0, 3.0, 4.0, 100.0])[:, None]  # median 3, MAD 1
    np.testing.assert_allclose(robust_time_zscore(s)[:, 0], (s[:, 0] - 3.0) / 1.4826, rtol=1e-6)


def test_robust_zscore_mad_zero_and_constant_columns() -> None:
    s = np.array(
        [
            # MAD=0 -> mean-AD fallback | all equal -> 0 | NaN stays NaN | even count
            [1.0, 2.0, np.nan, 1.0],
            [1.0, 2.0, np.nan, 1.0],
            [1.0, 2.0, np.nan, 1.0],
            [5.0, 2.0, np.nan, 9.0],
            [np.nan, np.nan, np.nan, 9.0],
        ]
    )
    got = robust_time_zscore(s)
    assert not np.isinf(got).any()
    mean_ad = 4.0 / 4  # |s - 1| = 0, 0, 0, 4 over 4 finite values
    np.testing.assert_allclose(got[:, 0], [0, 0, 0, 4.0 / (1.2533 * mean_ad), np.nan], rtol=1e-6)
    np.testing.assert_array_equal(got[:, 1], [0, 0, 0, 0, np.nan])
    assert np.isnan(got[:, 2]).all()
    np.testing.assert_allclose(got, ref_robust_zscore(s), rtol=1e-6, equal_nan=True)


def test_robust_zscore_never_inf() -> None:
    s = np.array([[0.0, 1.0], [0.0, np.inf], [1e-300, 1.0], [1e300, -np.inf]])
    got = robust_time_zscore(s)
    assert not np.isinf(got).any()
    assert np.isnan(got[1, 1]) and np.isnan(got[3, 1])  # non-finite inputs are missing


def test_robust_zscore_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"\(T, N\)"):
        robust_time_zscore(np.zeros((2, 3, 4)))


# ----------------------------------------------------------------- names & API


@pytest.mark.parametrize(
    ("method", "metric", "robust", "expected"),
    [
        ("difference", "euclidean", False, "difference_euclidean_distance"),
        ("looMedoid", "cosine", True, "loo_medoid_cosine_distance_robust_time_zscore"),
        ("clusterTransition", "alphaEarthCosine", False, "cluster_transition_alpha_earth_cosine_distance"),
        ("looMedoid", "alphaEarthCosine", True, "loo_medoid_alpha_earth_cosine_distance_robust_time_zscore"),
    ],
)
def test_score_name(method: str, metric: str, robust: bool, expected: str) -> None:
    assert score_name(method, metric, robust) == expected


def test_score_name_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="allowed: difference, looMedoid, clusterTransition"):
        score_name("loo_medoid", "cosine", False)
    with pytest.raises(ValueError, match="allowed: euclidean, cosine, alphaEarthCosine"):
        score_name("looMedoid", "manhattan", False)


@pytest.mark.parametrize("robust", [False, True])
def test_compute_scores_bands(robust: bool) -> None:
    q = random_stack(METRIC_ALPHA_EARTH_COSINE, seed=12)
    names, bands = compute_scores(q, ["looMedoid", "difference"], METRIC_ALPHA_EARTH_COSINE, robust)
    loo = loo_medoid(q, METRIC_ALPHA_EARTH_COSINE)
    diff = difference(q, METRIC_ALPHA_EARTH_COSINE)
    assert bands.dtype == np.float32
    if robust:
        assert names == [
            "loo_medoid_alpha_earth_cosine_distance",
            "loo_medoid_alpha_earth_cosine_distance_robust_time_zscore",
            "difference_alpha_earth_cosine_distance",
            "difference_alpha_earth_cosine_distance_robust_time_zscore",
        ]
        expected = [loo, robust_time_zscore(loo), diff, robust_time_zscore(diff)]
    else:
        assert names == ["loo_medoid_alpha_earth_cosine_distance", "difference_alpha_earth_cosine_distance"]
        expected = [loo, diff]
    assert bands.shape == (7, len(names), 60)
    for i, band in enumerate(expected):
        np.testing.assert_array_equal(bands[:, i], band, err_msg=names[i])


def test_compute_scores_difference_alone_matches_reference() -> None:
    x = random_stack(METRIC_EUCLIDEAN, seed=13).astype(np.float16)
    names, bands = compute_scores(x, ["difference"], METRIC_EUCLIDEAN, robust=False)
    assert names == ["difference_euclidean_distance"]
    assert_close_f32(bands[:, 0], ref_difference(x, METRIC_EUCLIDEAN))


def test_compute_scores_errors() -> None:
    q = np.zeros((3, 2, 4), dtype=np.int8)
    x = q.astype(np.float32)
    with pytest.raises(ValueError, match="int8 input is only supported with metric 'alphaEarthCosine'"):
        compute_scores(q, ["difference"], METRIC_COSINE, robust=False)
    with pytest.raises(ValueError, match="int8 input"):
        loo_medoid(q, METRIC_EUCLIDEAN)
    with pytest.raises(ValueError, match=r"unknown method 'median'; allowed: difference, looMedoid"):
        compute_scores(x, ["median"], METRIC_COSINE, robust=False)
    with pytest.raises(ValueError, match=r"unknown metric 'l1'; allowed: euclidean, cosine, alphaEarthCosine"):
        compute_scores(x, ["difference"], "l1", robust=False)
    with pytest.raises(NotImplementedError, match="clusterTransition"):
        compute_scores(x, ["difference", "clusterTransition"], METRIC_COSINE, robust=False)
    with pytest.raises(ValueError, match="distinct"):
        compute_scores(x, ["difference", "difference"], METRIC_COSINE, robust=False)
    with pytest.raises(ValueError, match="empty"):
        compute_scores(x, [], METRIC_COSINE, robust=False)
    with pytest.raises(ValueError, match="not the string"):
        compute_scores(x, "difference", METRIC_COSINE, robust=False)
    with pytest.raises(ValueError, match=r"\(T, B, N\)"):
        compute_scores(x[0], ["difference"], METRIC_COSINE, robust=False)
    with pytest.raises(ValueError, match="dtype int32"):
        pairwise_distances(q.astype(np.int32), METRIC_ALPHA_EARTH_COSINE)
