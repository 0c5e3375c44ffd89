"""Viewer numerics: tile geometry, level choice, nearest sampling, colours, PNG; vendored JS."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rasterkube.viewer import tiles, vendor
from rasterkube.viewer.layers import layer_id


def test_tile_bounds_cover_the_world_and_split_in_four() -> None:
    half = tiles.MERCATOR_HALF
    assert tiles.tile_bounds(0, 0, 0) == pytest.approx((-half, -half, half, half))
    assert tiles.tile_bounds(1, 0, 0) == pytest.approx((-half, 0, 0, half))  # y counts from the north
    assert tiles.tile_bounds(1, 1, 1) == pytest.approx((0, -half, half, 0))
    with pytest.raises(ValueError):
        tiles.tile_bounds(1, 2, 0)


def test_pixel_centres_run_west_to_east_and_north_to_south() -> None:
    xs, ys = tiles.pixel_centres((0.0, 0.0, 256.0, 256.0))
    assert xs[0, 0] == 0.5 and xs[0, -1] == 255.5
    assert ys[0, 0] == 255.5 and ys[-1, 0] == 0.5


def _levels(n: int, res: float = 10.0) -> list[tiles.LevelGrid]:
    return [tiles.LevelGrid(res * 2**i, 0.0, -res * 2**i, 0.0, (64 >> i, 64 >> i)) for i in range(n)]


@pytest.mark.parametrize(
    ("pixel_size", "level"),
    [(1.0, 0), (10.0, 0), (19.9, 0), (20.0, 1), (39.0, 1), (45.0, 2), (80.0, 3), (10_000.0, 3)],
)
def test_pick_level_takes_the_coarsest_level_not_coarser_than_the_screen(pixel_size: float, level: int) -> None:
    assert tiles.pick_level(_levels(4), pixel_size) == level


def test_tile_pixel_size_is_the_spacing_of_the_centres() -> None:
    xs, ys = np.meshgrid(np.arange(5) * 3.0, np.arange(5) * -3.0)
    assert tiles.tile_pixel_size(xs, ys) == pytest.approx(3.0)


def test_sample_indices_nearest_pixel_and_outside() -> None:
    level = tiles.LevelGrid(10.0, 100.0, -10.0, 1000.0, (3, 4))
    xs = np.array([[100.0, 139.9, 140.0, 99.9, 105.0]])
    ys = np.array([[1000.0, 970.1, 995.0, 995.0, np.nan]])
    rows, cols, inside = tiles.sample_indices(level, xs, ys)
    assert inside.tolist() == [[True, True, False, False, False]]
    assert rows[0, :2].tolist() == [0, 2] and cols[0, :2].tolist() == [0, 3]


def test_colorize_stretches_onto_the_colormap_and_nan_is_transparent() -> None:
    rgba = tiles.colorize(np.array([[0.0, 1.0, np.nan, 5.0, -3.0]]), 0.0, 1.0, "viridis")
    first, last = tiles._rgb(tiles.COLORMAPS["viridis"][0]), tiles._rgb(tiles.COLORMAPS["viridis"][-1])
    assert tuple(rgba[0, 0, :3]) == first and tuple(rgba[0, 1, :3]) == last
    assert rgba[0, :, 3].tolist() == [255, 255, 0, 255, 255]
    assert tuple(rgba[0, 3, :3]) == last and tuple(rgba[0, 4, :3]) == first  # clipped
    with pytest.raises(ValueError, match="unknown colormap"):
        tiles.colorize(np.zeros((1, 1)), 0, 1, "jet")


def test_lut_interpolates_between_stops() -> None:
    gray = tiles.lut("gray")
    assert gray.shape == (256, 3) and gray[0].tolist() == [0, 0, 0] and gray[-1].tolist() == [255, 255, 255]
    assert np.all(np.diff(gray[:, 0].astype(int)) >= 0)


def test_classes_cycle_the_categorical_palette() -> None:
    rgba = tiles.colorize_classes(np.array([[0.0, 3.0, 13.0, np.nan]]))
    assert tuple(rgba[0, 1, :3]) == tiles._rgb(tiles.CATEGORICAL[3]) == tuple(rgba[0, 2, :3])
    assert rgba[0, 3, 3] == 0


def test_rgb_composite_stretches_each_band() -> None:
    ones = np.ones((1, 2))
    rgba = tiles.colorize_rgb([ones * 2, ones * 0, np.array([[1.0, np.nan]])], [(0, 2), (0, 1), (0, 4)])
    assert rgba[0, 0].tolist() == [255, 0, 64, 255] and rgba[0, 1, 3] == 0


def test_value_range_is_robust_and_never_empty() -> None:
    values = np.concatenate([np.linspace(0, 1, 1000), [1e6, np.nan]])
    lo, hi = tiles.value_range(values)
    assert 0 <= lo < 0.05 and 0.95 < hi < 1.01
    assert tiles.value_range(np.array([np.nan])) == (0.0, 1.0)
    assert tiles.value_range(np.array([3.0, 3.0])) == (3.0, 4.0)


def test_png_round_trip() -> None:
    rgba = np.random.default_rng(0).integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(tiles.encode_png(rgba))).convert("RGBA"))
    np.testing.assert_array_equal(decoded, rgba)
    empty = np.asarray(Image.open(io.BytesIO(tiles.EMPTY_TILE)).convert("RGBA"))
    assert empty.shape == (256, 256, 4) and not empty.any()


def test_native_zoom_matches_web_mercator_resolution() -> None:
    # At the equator a zoom-0 tile pixel is 156543 m.
    assert tiles.native_zoom(156543.03392804097, 0.0) == pytest.approx(0.0, abs=1e-6)
    assert tiles.native_zoom(10.0, 60.0) == pytest.approx(np.log2(156543.034 * 0.5 / 10.0), abs=1e-4)


def test_layer_ids_are_url_safe_and_unique() -> None:
    taken: set[str] = set()
    assert layer_id("/a/b/change scores.zarr", taken) == "change-scores"
    assert layer_id("/x/change scores.parquet", taken) == "change-scores-2"
    assert layer_id("s3://bucket/p/polys.pmtiles", taken) == "polys"


def test_vendored_javascript_matches_its_manifest() -> None:
    """static/vendor/ holds exactly the pinned npm files (refresh: python -m rasterkube.viewer.vendor)."""
    assert vendor.check() == []
