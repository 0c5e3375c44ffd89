"""Multiscale coarsening and layout (pure functions) against straightforward numpy references."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest

from rasterkube import multiscale
from rasterkube.grid import GeoGrid


def reference_mean(a: np.ndarray) -> np.ndarray:
    """Cell by cell: nanmean of the pixels the cell has (partial cells at odd edges)."""
    h, w = a.shape[-2:]
    out = np.full((*a.shape[:-2], -(-h // 2), -(-w // 2)), np.nan, dtype=np.float64)
    for i in range(out.shape[-2]):
        for j in range(out.shape[-1]):
            cell = a[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(*a.shape[:-2], -1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[..., i, j] = np.nanmean(cell.astype(np.float64), axis=-1)
    return out


def reference_mode(cell: np.ndarray) -> float:
    values = [v for v in cell.ravel().tolist() if not (isinstance(v, float) and np.isnan(v))]
    if not values:
        return np.nan
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (1, 5), (5, 1), (3, 2, 13, 11)])
def test_mean_matches_nanmean_reference(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=shape).astype(np.float32)
    a[rng.random(shape) < 0.3] = np.nan
    got = multiscale.coarsen_mean(a)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference_mean(a), rtol=1e-6, equal_nan=True)


def test_mean_all_nan_cell_and_partial_edge_cell() -> None:
    a = np.array([[np.nan, np.nan, 1.0], [np.nan, np.nan, 3.0], [5.0, np.nan, 7.0]], dtype=np.float32)
    got = multiscale.coarsen_mean(a)
    # top-left all NaN; top-right partial column (1, 3); bottom-left partial row (5, NaN); corner 7
    np.testing.assert_array_equal(got, np.array([[np.nan, 2.0], [5.0, 7.0]], dtype=np.float32))


def test_mean_rejects_integers() -> None:
    with pytest.raises(ValueError, match="float"):
        multiscale.coarsen_mean(np.zeros((2, 2), dtype=np.int32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_mode_matches_reference(dtype: type) -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, size=(2, 9, 7)).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        a[rng.random(a.shape) < 0.25] = np.nan
    got = multiscale.coarsen_mode(a)
    assert got.dtype == dtype and got.shape == (2, 5, 4)
    for t in range(2):
        for i in range(5):
            for j in range(4):
                want = reference_mode(a[t, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2])
                np.testing.assert_equal(got[t, i, j], np.asarray(want, dtype=np.float64).astype(dtype)
                                        if not np.isnan(want) else want)  # fmt: skip


def test_mode_ties_go_to_the_smallest_label_and_nan_does_not_vote() -> None:
    a = np.array([[3.0, 1.0], [1.0, 3.0]], dtype=np.float32)
    assert multiscale.coarsen_mode(a)[0, 0] == 1.0
    b = np.array([[np.nan, np.nan], [np.nan, 2.0]], dtype=np.float32)
    assert multiscale.coarsen_mode(b)[0, 0] == 2.0
    assert np.isnan(multiscale.coarsen_mode(np.full((2, 2), np.nan, dtype=np.float32))).all()


def test_coarsen_mixes_mean_and_mode_per_band() -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 3, size=(3, 6, 5)).astype(np.float32)
    got = multiscale.coarsen(a, (False, True, False), band_axis=0)
    np.testing.assert_allclose(got[[0, 2]], multiscale.coarsen_mean(a[[0, 2]]))
    np.testing.assert_array_equal(got[1], multiscale.coarsen_mode(a[1]))
    # no per-band flags: the dtype decides
    np.testing.assert_array_equal(multiscale.coarsen(a.astype(np.uint8), None), multiscale.coarsen_mode(a.astype(np.uint8)))


def test_band_modes_rule() -> None:
    assert multiscale.band_modes(np.dtype("float32"), ["a", "lab"], ["lab"]) == (False, True)
    assert multiscale.band_modes(np.dtype("uint8"), ["a", "b"], []) == (True, True)


def test_level_shapes_stop_at_min_size_or_one_chunk() -> None:
    assert multiscale.level_shapes((1000, 700), (512, 512), 256) == [(1000, 700), (500, 350)]  # fits one chunk
    assert multiscale.level_shapes((1000, 700), (128, 128), 256) == [(1000, 700), (500, 350), (250, 175)]
    assert multiscale.level_shapes((600, 600), (128, 128), 100) == [(600, 600), (300, 300), (150, 150), (75, 75)]
    assert multiscale.level_shapes((300, 300), (512, 512), 16) == [(300, 300)]  # one chunk already
    assert multiscale.level_shapes((37, 29), (8, 8), 4) == [(37, 29), (19, 15), (10, 8), (5, 4)]


def test_level_grid_and_layout() -> None:
    grid = GeoGrid("EPSG:32633", (10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0), (7, 9))
    one = multiscale.level_grid(grid, 1)
    assert one.transform == (20.0, 0.0, 1000.0, 0.0, -20.0, 5000.0) and one.shape == (4, 5)
    assert one.bbox == (1000.0, 4920.0, 1100.0, 5000.0)  # the partial last cells reach past level 0
    ms = multiscale.layout([grid, one], multiscale.AVERAGE)
    assert ms["resampling_method"] == "average"
    assert ms["layout"][0] == {
        "asset": "0",
        "transform": {"scale": [1.0, 1.0], "translation": [0.0, 0.0]},
        "spatial:transform": list(grid.transform),
        "spatial:shape": [7, 9],
    }
    assert ms["layout"][1]["derived_from"] == "0" and ms["layout"][1]["transform"]["scale"] == [2.0, 2.0]
    assert ms["layout"][1]["spatial:shape"] == [4, 5]
