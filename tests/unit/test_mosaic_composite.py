"""Unit tests for rasterkube.mosaic.composite against brute-force references.

The references are deliberately naive: per-pixel Python loops, ``statistics.median``,
masking by testing each SCL class / QA bit by hand from the product tables written
out again below.  They share no code with the implementation under test.  Every
RuntimeWarning is an error here: all-invalid pixels must be silent.
"""

from __future__ import annotations

import itertools
import statistics
import tracemalloc
import warnings

import numpy as np
import pytest

from rasterkube.mosaic.composite import (
    assign_windows,
    best_pixel,
    composite,
    landsat_sr_scale,
    landsat_st_scale,
    masked_median,
    qa_pixel_valid,
    scl_valid,
    sentinel2_scale,
    time_windows,
)

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

D = np.datetime64
# Written out again from the product definitions, independent of the module's constants.
SCL_EXPECTED_VALID = {
    0: False,  # no data
    1: False,  # saturated / defective
    2: True,  # dark area pixels
    3: False,  # cloud shadows
    4: True,  # vegetation
    5: True,  # not vegetated
    6: True,  # water
    7: False,  # unclassified
    8: False,  # cloud medium probability
    9: False,  # cloud high probability
    10: False,  # thin cirrus
    11: True,  # snow / ice
}
QA_FILL, QA_DILATED, QA_CIRRUS, QA_CLOUD, QA_SHADOW, QA_SNOW, QA_CLEAR, QA_WATER = range(8)
QA_REJECT_BITS = (QA_FILL, QA_DILATED, QA_CIRRUS, QA_CLOUD, QA_SHADOW)


# ----------------------------------------------------------------------------- helpers


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def sentinel2_scenes(
    rng: np.random.Generator, n: int, bands: int, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """DNs (N, B, H, W) uint16 and SCL (N, H, W) with cloud blobs, rings, shadows, cirrus."""
    scl = rng.choice(np.array([2, 4, 5, 6, 11], dtype=np.uint8), size=(n, h, w))
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 7)
            scl[i][_disc(h, w, cy + 4, cx + 3, r)] = 3  # shadow, offset from the cloud
            scl[i][_disc(h, w, cy, cx, r + 2)] = 8
            scl[i][_disc(h, w, cy, cx, r)] = 9
        if rng.random() < 0.3:
            scl[i][_disc(h, w, rng.uniform(0, h), rng.uniform(0, w), 5)] = 10
        scl[i][rng.random((h, w)) < 0.02] = 7
        scl[i][rng.random((h, w)) < 0.01] = 1
        if rng.random() < 0.3:
            scl[i][:, : rng.integers(1, w // 3)] = 0  # swath edge
    # A corner cloudy in every scene: all-invalid pixels.
    scl[:, :2, :2] = 9
    dn = rng.integers(1000, 6000, size=(n, bands, h, w), dtype=np.uint16)
    dn[np.broadcast_to((scl == 0)[:, None], dn.shape)] = 0
    return dn, scl


def daily_times(start: str, n: int, step_days: int) -> np.ndarray:
    return D(start, "s") + np.arange(n) * np.timedelta64(step_days, "D")


def brute_median(stack: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel loops: an observation counts when valid and finite in every band."""
    n, b, h, w = stack.shape
    out = np.full((b, h, w), np.nan)
    count = np.zeros((h, w), dtype=int)
    for y in range(h):
        for x in range(w):
            use = [i for i in range(n) if valid[i, y, x] and all(not np.isnan(stack[i, k, y, x]) for k in range(b))]
            count[y, x] = len(use)
            for k in range(b):
                if use:
                    out[k, y, x] = statistics.median(float(stack[i, k, y, x]) for i in use)
    return out, count


def brute_best(
    stack: np.ndarray, valid: np.ndarray, times: np.ndarray, centre: np.datetime64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, b, h, w = stack.shape
    out = np.full((b, h, w), np.nan)
    count = np.zeros((h, w), dtype=int)
    chosen = np.full((h, w), -1)
    for y in range(h):
        for x in range(w):
            best = None
            for i in range(n):
                if not valid[i, y, x] or any(np.isnan(stack[i, k, y, x]) for k in range(b)):
                    continue
                count[y, x] += 1
                key = (abs(int((times[i] - centre) / np.timedelta64(1, "s"))), times[i], i)
                if best is None or key < best:
                    best = key
            if best is not None:
                chosen[y, x] = best[2]
                out[:, y, x] = stack[best[2], :, y, x]
    return out, count, chosen


def brute_scl_valid(scl: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: SCL_EXPECTED_VALID.get(int(v), False), otypes=[bool])(scl)


def brute_qa_valid(qa: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: all(not (int(v) >> bit) & 1 for bit in QA_REJECT_BITS), otypes=[bool])(qa)


def assert_f32_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_allclose(actual, expected, rtol=2e-7, atol=0, equal_nan=True)


# ------------------------------------------------------------------------ masking tables


@pytest.mark.parametrize("value", [*range(12), 12, 200, 255])
def test_scl_each_class(value: int) -> None:
    expected = SCL_EXPECTED_VALID.get(value, False)
    assert scl_valid(np.array([value], dtype=np.uint8)).tolist() == [expected]


def test_scl_shape_and_dtypes() -> None:
    scl = np.arange(12, dtype=np.int16).reshape(3, 4)
    assert scl_valid(scl).shape == (3, 4)
    assert scl_valid(scl).dtype == bool
    with pytest.raises(TypeError, match="integer"):
        scl_valid(scl.astype(np.float32))


@pytest.mark.parametrize("bit", range(16))
def test_qa_pixel_each_bit(bit: int) -> None:
    qa = np.array([1 << bit], dtype=np.uint16)
    assert qa_pixel_valid(qa).tolist() == [bit not in QA_REJECT_BITS]


def test_qa_pixel_combinations() -> None:
    qa = np.array(
        [
            (1 << QA_CLEAR) | (1 << QA_WATER),  # clear water
            (1 << QA_SNOW),  # snow is a surface observation
            (1 << QA_CLEAR) | (1 << QA_CLOUD),
            (1 << QA_CLEAR) | (1 << QA_SHADOW),
            0b0101_0100_0100_0000,  # clear, low confidences (21824): a typical clear land pixel
            0b0101_0100_0100_0010,  # the same, dilated cloud
            0xFFFF,
        ],
        dtype=np.uint16,
    )
    assert qa_pixel_valid(qa).tolist() == [True, True, False, False, True, False, False]
    with pytest.raises(TypeError, match="uint16"):
        qa_pixel_valid(qa.astype(np.float64))


# --------------------------------------------------------------------------- scale/offset


def test_landsat_sr_scale_values() -> None:
    dn = np.array([0, 1, 7273, 10000, 43636, 65535], dtype=np.uint16)
    out = landsat_sr_scale(dn)
    assert out.dtype == np.float32
    assert np.isnan(out[0])
    expected = dn[1:].astype(np.float64) * 0.0000275 - 0.2
    np.testing.assert_allclose(out[1:], expected, rtol=1e-6, atol=1e-9)
    assert out[3] == pytest.approx(0.075, abs=1e-7)
    assert out[2] == pytest.approx(7.5e-6, rel=1e-4)  # no float32 cancellation near 0


def test_landsat_st_scale_values() -> None:
    dn = np.array([[0, 29300], [1, 65535]], dtype=np.uint16)
    out = landsat_st_scale(dn)
    assert out.shape == (2, 2) and out.dtype == np.float32
    assert np.isnan(out[0, 0])
    assert out[0, 1] == pytest.approx(29300 * 0.00341802 + 149.0, rel=1e-7)
    assert out[1, 0] == pytest.approx(149.00341802, rel=1e-7)
    assert out[1, 1] == pytest.approx(65535 * 0.00341802 + 149.0, rel=1e-7)


@pytest.mark.parametrize(
    ("baseline", "offset"),
    [("02.09", 0), ("03.01", 0), ("N0301", 0), ("04.00", -1000), ("05.09", -1000), ("N0511", -1000), ("5.10", -1000)],
)
def test_sentinel2_scale_baselines(baseline: str, offset: int) -> None:
    dn = np.array([0, 1, 500, 1000, 2345, 11000], dtype=np.uint16)
    out = sentinel2_scale(dn, baseline)
    assert out.dtype == np.float32
    assert np.isnan(out[0])
    np.testing.assert_allclose(out[1:], (dn[1:].astype(np.float64) + offset) / 10000, rtol=1e-6, atol=1e-9)


def test_sentinel2_scale_negative_reflectance_survives() -> None:
    assert sentinel2_scale(np.array([500], dtype=np.uint16), "04.00")[0] == pytest.approx(-0.05)


@pytest.mark.parametrize("baseline", ["", "four", "04", "04.0.0", "N04000"])
def test_sentinel2_bad_baseline(baseline: str) -> None:
    with pytest.raises(ValueError, match="processing baseline"):
        sentinel2_scale(np.array([1], dtype=np.uint16), baseline)


# ---------------------------------------------------------------------------- windows


def _days(windows: list[tuple[np.datetime64, np.datetime64]]) -> list[tuple[str, str]]:
    return [(str(s.astype("datetime64[D]")), str(e.astype("datetime64[D]"))) for s, e in windows]


def test_windows_p1y() -> None:
    assert _days(time_windows("2019-01-01", "2022-01-01", "P1Y")) == [
        ("2019-01-01", "2020-01-01"),
        ("2020-01-01", "2021-01-01"),
        ("2021-01-01", "2022-01-01"),
    ]


def test_windows_p3m_quarters() -> None:
    assert _days(time_windows(D("2020-01-01"), D("2021-01-01"), "P3M")) == [
        ("2020-01-01", "2020-04-01"),
        ("2020-04-01", "2020-07-01"),
        ("2020-07-01", "2020-10-01"),
        ("2020-10-01", "2021-01-01"),
    ]


@pytest.mark.parametrize(
    ("start", "expected_ends"),
    [
        ("2020-01-31", ["2020-02-29", "2020-03-31", "2020-04-30", "2020-05-31"]),  # leap year
        ("2021-01-31", ["2021-02-28", "2021-03-31", "2021-04-30", "2021-05-31"]),
        ("2021-01-30", ["2021-02-28", "2021-03-30", "2021-04-30", "2021-05-30"]),
    ],
)
def test_windows_p1m_month_end_does_not_drift(start: str, expected_ends: list[str]) -> None:
    windows = _days(time_windows(start, expected_ends[-1], "P1M"))
    assert [e for _, e in windows] == expected_ends
    assert [s for s, _ in windows] == [start, *expected_ends[:-1]]


def test_windows_p2w_p10d_and_clipping() -> None:
    assert _days(time_windows("2020-01-01", "2020-02-01", "P2W")) == [
        ("2020-01-01", "2020-01-15"),
        ("2020-01-15", "2020-01-29"),
        ("2020-01-29", "2020-02-01"),  # clipped
    ]
    assert _days(time_windows("2020-01-01", "2020-01-25", "P10D"))[-1] == ("2020-01-21", "2020-01-25")


def test_windows_p1y6m_and_time_of_day() -> None:
    windows = time_windows("2020-01-01T06:00:00Z", "2023-01-01", "P1Y6M")
    assert windows[0] == (D("2020-01-01T06:00:00"), D("2021-07-01T06:00:00"))
    assert windows[1] == (D("2021-07-01T06:00:00"), D("2023-01-01T00:00:00"))
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert end == start


def test_windows_none_is_one_window() -> None:
    assert time_windows("2020-03-01", "2020-09-01", None) == [(D("2020-03-01"), D("2020-09-01"))]


@pytest.mark.parametrize(
    ("window", "match"),
    [
        ("PT1H", "time components"),
        ("P1DT12H", "time components"),
        ("P1.5M", "unsupported"),
        ("1M", "unsupported"),
        ("P", "unsupported"),
        ("P-1M", "unsupported"),
        ("P0D", "positive"),
    ],
)
def test_windows_errors(window: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        time_windows("2020-01-01", "2021-01-01", window)


def test_windows_end_before_start() -> None:
    with pytest.raises(ValueError, match="after"):
        time_windows("2021-01-01", "2021-01-01", "P1M")


def test_assign_windows_half_open() -> None:
    windows = time_windows("2020-01-01", "2021-01-01", "P3M")
    times = np.array(
        ["2019-12-31T23:59:59", "2020-01-01", "2020-03-31T23:59:59", "2020-04-01", "2020-12-31", "2021-01-01", "NaT"],
        dtype="datetime64[s]",
    )
    assert assign_windows(times, windows).tolist() == [-1, 0, 0, 1, 3, -1, -1]
    assert assign_windows(times, []).tolist() == [-1] * len(times)


def test_assign_windows_rejects_overlaps() -> None:
    with pytest.raises(ValueError, match="overlapping"):
        assign_windows([D("2020-01-05")], [(D("2020-01-01"), D("2020-02-01")), (D("2020-01-15"), D("2020-03-01"))])


# ---------------------------------------------------------------------------- reducers


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9])
def test_masked_median_equals_nanmedian(n: int) -> None:
    rng = np.random.default_rng(n)
    stack = rng.normal(size=(n, 3, 17, 19)).astype(np.float32)
    stack[rng.random(stack.shape) < 0.4] = np.nan
    stack[:, :, 0, 0] = np.nan
    stack[:, 1, 3, :] = np.nan  # one band all-NaN along a row
    before = stack.copy()
    median, count = masked_median(stack)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # np.nanmedian warns on all-NaN slices
        expected = np.nanmedian(stack, axis=0)
    np.testing.assert_array_equal(median, expected)  # bit-identical, NaN in the same places
    assert median.dtype == np.float32
    np.testing.assert_array_equal(stack, before)  # input untouched
    np.testing.assert_array_equal(count, (~np.isnan(stack).any(axis=1)).sum(axis=0))
    assert count.dtype == np.uint16


def test_masked_median_brute_force_and_all_invalid() -> None:
    rng = np.random.default_rng(7)
    stack = rng.uniform(0, 1, size=(6, 2, 9, 8)).astype(np.float32)
    invalid = rng.random((6, 9, 8)) < 0.5
    invalid[:, 4, 4] = True
    stack[np.broadcast_to(invalid[:, None], stack.shape)] = np.nan
    median, count = masked_median(stack)
    expected, expected_count = brute_median(stack, np.ones((6, 9, 8), bool))
    assert_f32_close(median, expected)
    np.testing.assert_array_equal(count, expected_count)
    assert count[4, 4] == 0 and np.isnan(median[:, 4, 4]).all()


def test_masked_median_peak_memory_is_one_copy() -> None:
    stack = np.random.default_rng(3).random((40, 4, 64, 64), dtype=np.float32)
    stack[stack < 0.3] = np.nan
    tracemalloc.start()
    try:
        masked_median(stack)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * stack.nbytes, f"peak {peak / stack.nbytes:.2f}× the stack"


def test_best_pixel_brute_force() -> None:
    rng = np.random.default_rng(11)
    n = 9
    stack = rng.uniform(size=(n, 3, 10, 12)).astype(np.float32)
    invalid = rng.random((n, 10, 12)) < 0.6
    invalid[:, 0, 0] = True
    stack[np.broadcast_to(invalid[:, None], stack.shape)] = np.nan
    stack[2, 1, 5, 5] = np.nan  # one band missing invalidates the whole observation
    times = D("2020-06-01T10:00:00") + rng.permutation(n) * np.timedelta64(5, "D")
    centre = D("2020-06-16T10:00:00")
    values, count, chosen = best_pixel(stack, times, centre)
    exp_values, exp_count, exp_chosen = brute_best(stack, np.ones((n, 10, 12), bool), times, centre)
    np.testing.assert_array_equal(chosen, exp_chosen)
    np.testing.assert_array_equal(values, exp_values.astype(np.float32))
    np.testing.assert_array_equal(count, exp_count)
    assert chosen[0, 0] == -1 and count[0, 0] == 0 and np.isnan(values[:, 0, 0]).all()


def test_best_pixel_tie_goes_to_earlier() -> None:
    stack = np.stack([np.full((1, 2, 2), v, np.float32) for v in (1.0, 2.0, 3.0)])
    stack[0, :, 1, 1] = np.nan  # the earlier scene is cloudy here
    times = np.array(["2020-01-20", "2020-01-10", "2020-01-01"], dtype="datetime64[D]")
    values, count, chosen = best_pixel(stack, times, D("2020-01-15"))  # 20th and 10th equidistant
    assert chosen.tolist() == [[1, 1], [1, 1]]
    stack[1, :, 0, 0] = np.nan
    values, count, chosen = best_pixel(stack, times, D("2020-01-15"))
    assert chosen[0, 0] == 0 and values[0, 0, 0] == 1.0 and count[0, 0] == 2


# ------------------------------------------------------------------------- composites


def _window_reference(stack, valid, times, windows, method):
    out, counts = [], []
    for start, end in windows:
        sel = [i for i in range(len(times)) if start <= times[i] < end]
        if method == "median":
            v, c = brute_median(stack[sel], valid[sel])
        else:
            v, c, _ = brute_best(stack[sel], valid[sel], times[sel], start + (end - start) // 2)
        out.append(v)
        counts.append(c)
    return np.stack(out), np.stack(counts)


@pytest.mark.parametrize("method", ["median", "best"])
def test_composite_sentinel2_clouds(method: str) -> None:
    rng = np.random.default_rng(2024)
    n, h, w = 14, 20, 22
    dn, scl = sentinel2_scenes(rng, n, 3, h, w)
    stack = sentinel2_scale(dn, "05.09")
    times = daily_times("2021-12-20T10:30:00", n, 9)  # one scene before the first window
    windows = time_windows("2022-01-01", "2022-05-01", "P1M")
    values, counts = composite(stack, scl_valid(scl), times, windows, method)
    expected, expected_counts = _window_reference(stack, brute_scl_valid(scl), times, windows, method)
    assert values.shape == (4, 3, h, w) and values.dtype == np.float32
    assert counts.shape == (4, h, w) and counts.dtype == np.uint16
    np.testing.assert_array_equal(counts, expected_counts)
    assert_f32_close(values, expected)
    assert (counts[:, :2, :2] == 0).all() and np.isnan(values[:, :, :2, :2]).all()
    assert counts.max() > 1  # the scenes are not trivially all cloudy


def test_composite_landsat_qa_clouds() -> None:
    rng = np.random.default_rng(5)
    n, h, w = 10, 16, 18
    qa = np.full((n, h, w), (1 << QA_CLEAR), dtype=np.uint16)
    qa[rng.random((n, h, w)) < 0.1] |= 1 << QA_WATER
    qa[rng.random((n, h, w)) < 0.05] |= 1 << QA_SNOW
    for i in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        qa[i][_disc(h, w, cy, cx, 6)] = 1 << QA_DILATED
        qa[i][_disc(h, w, cy, cx, 4)] = (1 << QA_CLOUD) | (1 << QA_DILATED)
        qa[i][_disc(h, w, cy + 3, cx - 3, 3) & ~_disc(h, w, cy, cx, 6)] = 1 << QA_SHADOW
        qa[i][_disc(h, w, rng.uniform(0, h), rng.uniform(0, w), 2)] = 1 << QA_CIRRUS
    qa[:3, :, :2] = 1 << QA_FILL
    dn = rng.integers(7273, 20000, size=(n, 2, h, w), dtype=np.uint16)
    dn[:3, :, :, :2] = 0
    stack = landsat_sr_scale(dn)
    times = daily_times("2020-01-03", n, 16)
    windows = time_windows("2020-01-01", "2020-12-31", "P3M")
    values, counts = composite(stack, qa_pixel_valid(qa), times, windows, "median")
    expected, expected_counts = _window_reference(stack, brute_qa_valid(qa), times, windows, "median")
    np.testing.assert_array_equal(counts, expected_counts)
    assert_f32_close(values, expected)


def test_composite_fill_in_one_band_drops_the_observation() -> None:
    stack = np.stack([np.full((2, 1, 1), v, np.float32) for v in (1.0, 2.0, 10.0)])
    stack[2, 1, 0, 0] = np.nan  # band 1 fill in the last scene: band 0's 10.0 must go too
    times = daily_times("2020-01-01", 3, 1)
    values, counts = composite(stack, np.ones((3, 1, 1), bool), times, [(times[0], times[-1] + 1)])
    assert counts[0, 0, 0] == 2
    assert values[0, :, 0, 0].tolist() == [1.5, 1.5]


def test_composite_empty_window_and_invalid_method() -> None:
    stack = np.ones((2, 1, 2, 2), np.float32)
    times = np.array(["2020-01-05", "2020-03-05"], dtype="datetime64[D]")
    windows = time_windows("2020-01-01", "2020-04-01", "P1M")
    values, counts = composite(stack, np.ones((2, 2, 2), bool), times, windows, "best")
    assert counts[:, 0, 0].tolist() == [1, 0, 1]
    assert np.isnan(values[1]).all() and (values[[0, 2]] == 1).all()
    with pytest.raises(ValueError, match="median"):
        composite(stack, np.ones((2, 2, 2), bool), times, windows, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid_mask"):
        composite(stack, np.ones((2, 2), bool), times, windows)


def test_best_pixel_partial_observations_are_not_used() -> None:
    stack = np.full((2, 2, 1, 1), np.nan, np.float32)
    stack[0, 0] = 5.0  # band 0 seen, band 1 missing: not a valid observation
    stack[1, 1] = 7.0
    values, count, chosen = best_pixel(stack, daily_times("2020-01-01", 2, 1), D("2020-01-01"))
    assert chosen[0, 0] == -1 and count[0, 0] == 0
    assert np.isnan(values).all()
