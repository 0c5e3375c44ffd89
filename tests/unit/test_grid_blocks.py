"""Grid geometry and block planning (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from rasterkube.grid import GeoGrid, Window
from rasterkube.runtime.blocks import plan_blocks, row_strips

GRID = GeoGrid("EPSG:32633", (10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0), (7, 9))


def test_pixel_centres_and_bbox() -> None:
    np.testing.assert_allclose(GRID.x_coords()[:2], [1005.0, 1015.0])
    np.testing.assert_allclose(GRID.y_coords()[:2], [4995.0, 4985.0])
    assert GRID.bbox == (1000.0, 4930.0, 1090.0, 5000.0)


def test_window_subgrid_and_attrs_round_trip() -> None:
    sub = GRID.window(Window(2, 5, 3, 9))
    assert sub.shape == (3, 6)
    np.testing.assert_allclose(sub.x_coords(), GRID.x_coords()[3:9])
    np.testing.assert_allclose(sub.y_coords(), GRID.y_coords()[2:5])
    assert GeoGrid.from_attrs(sub.to_attrs()) == sub
    with pytest.raises(ValueError, match="outside the grid"):
        GRID.window(Window(0, 8, 0, 1))


def test_window_for_bbox() -> None:
    assert GRID.window_for_bbox((1012.0, 4971.0, 1031.0, 4999.0)) == Window(0, 3, 1, 4)
    with pytest.raises(ValueError, match="does not overlap"):
        GRID.window_for_bbox((0.0, 0.0, 10.0, 10.0))


def test_rotated_grid_rejected() -> None:
    with pytest.raises(ValueError, match="rotated"):
        GeoGrid("EPSG:4326", (1.0, 0.5, 0.0, 0.0, -1.0, 0.0), (2, 2))


@pytest.mark.parametrize(("shape", "chunk", "mult"), [((37, 53), (8, 8), 2), ((16, 16), (16, 16), 4), ((1, 100), (4, 7), 3)])
def test_blocks_tile_exactly_and_align_to_chunks(shape, chunk, mult) -> None:
    blocks = plan_blocks(shape, chunk, mult)
    cover = np.zeros(shape, dtype=int)
    for b in blocks:
        cover[b.slices] += 1
        assert b.y0 % chunk[0] == 0 and b.x0 % chunk[1] == 0
        assert b.shape[0] <= chunk[0] * mult and b.shape[1] <= chunk[1] * mult
    assert (cover == 1).all()


def test_row_strips_bound_pixels() -> None:
    strips = list(row_strips(Window(4, 20, 0, 10), max_pixels=35))
    assert all((s.y1 - s.y0) * 10 <= 35 for s in strips)
    assert strips[0].y0 == 4 and strips[-1].y1 == 20
