"""Blockwise polygonization equals one whole-raster rasterio.features.shapes call."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio.features
import shapely
from affine import Affine
from scipy import ndimage

from rasterkube.vectorize import polygons as P

TRANSFORM = (10.0, 0.0, 400000.0, 0.0, -10.0, 5600000.0)
UTM = "EPSG:32633"


def blobs(h: int, w: int, seed: int, density: float = 0.5, sigma: float = 2.5) -> np.ndarray:
    """Smooth random field: blobs of many sizes, with holes, crossing block edges; some NaN."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma)
    field = (field - field.mean()) / field.std()
    values = (field + rng.normal(scale=0.15, size=(h, w))).astype(np.float32)
    values[rng.random((h, w)) < 0.01] = np.nan
    return values


def reference(values: np.ndarray, threshold: float, connectivity: int) -> list[shapely.Geometry]:
    """ONE rasterio.features.shapes call over the whole raster, in canonical form."""
    mask = P.foreground(values, threshold)
    geoms = [shapely.geometry.shape(g) for g, _ in rasterio.features.shapes(
        mask.astype(np.uint8), mask=mask, connectivity=connectivity, transform=Affine(*TRANSFORM))]  # fmt: skip
    return list(P.canonical(np.array(geoms, dtype=object)))


def wkb_set(geoms) -> list[bytes]:
    return sorted(shapely.to_wkb(np.asarray(geoms, dtype=object)))


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize(
    ("h", "w", "block", "seed"), [(97, 83, (16, 16), 0), (64, 131, (13, 29), 1), (50, 50, (7, 7), 2)]
)
def test_blockwise_equals_whole_raster_shapes(connectivity: int, h: int, w: int, block, seed: int) -> None:
    values = blobs(h, w, seed)
    got = P.polygonize(values, 0.3, connectivity, TRANSFORM, block_shape=block)
    want = reference(values, 0.3, connectivity)
    assert len(got) == len(want) > 10
    # bit-identical geometries (normalized WKB), not just "close"
    assert wkb_set(got.geometry) == wkb_set(want)
    assert all(shapely.is_valid(got.geometry))
    n_blocks = -(-h // block[0]) * -(-w // block[1])
    assert n_blocks > 9
    # the test is meaningful: many components cross block edges and some have holes
    whole = P.polygonize(values, 0.3, connectivity, TRANSFORM)
    assert len(whole) == len(want)
    big = [g for g in want if shapely.bounds(g)[2] - shapely.bounds(g)[0] > block[1] * 10]
    assert big, "no component spans a block"
    assert any(shapely.get_num_interior_rings(g) > 0 for g in want if g.geom_type == "Polygon")


@pytest.mark.parametrize("connectivity", [4, 8])
def test_statistics_match_numpy_over_the_same_pixels(connectivity: int) -> None:
    values = blobs(61, 77, seed=5)
    got = P.polygonize(values, 0.2, connectivity, TRANSFORM, block_shape=(9, 11))
    labels, n = P.label_components(P.foreground(values, 0.2), connectivity)
    whole = P.polygonize_labels(labels, n, connectivity)
    # map each whole-raster component to its pixels through the canonical geometry
    by_wkb = {w: i + 1 for i, w in enumerate(shapely.to_wkb(P.canonical(whole, TRANSFORM)))}
    ids = np.array([by_wkb[w] for w in shapely.to_wkb(got.geometry)])
    assert sorted(ids) == list(range(1, n + 1))
    for k, lab in enumerate(ids):
        pix = values[labels == lab].astype(np.float64)
        m = got.moments
        assert m.count[k] == pix.size
        np.testing.assert_allclose(m.mean[k], pix.mean(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.std[k], pix.std(), rtol=1e-9, atol=1e-12)
        assert m.vmin[k] == pix.min() and m.vmax[k] == pix.max()
    area = P.area_m2(got.geometry, UTM)
    np.testing.assert_allclose(area, got.moments.count * 100.0)


def test_ring_around_a_hole_split_in_four_blocks() -> None:
    values = np.zeros((10, 10), np.float32)
    values[1:9, 1:9] = 1
    values[3:7, 3:7] = 0  # the hole, centred on the block corner
    values[4:6, 4:6] = 1  # an island in the hole: its own polygon
    got = P.polygonize(values, 0.5, 4, TRANSFORM, block_shape=(5, 5))
    assert len(got) == 2
    ring = next(g for g in got.geometry if shapely.get_num_interior_rings(g) == 1)
    assert shapely.get_num_coordinates(ring) == 10  # 4 + 4 corners + closing points; no seam vertices
    assert sorted(got.moments.count) == [4, 48]


def test_diagonal_touch_across_a_block_corner() -> None:
    values = np.zeros((4, 4), np.float32)
    values[1, 1] = values[2, 2] = 1  # touch only at the corner shared by four 2×2 blocks
    four = P.polygonize(values, 0.5, 4, TRANSFORM, block_shape=(2, 2))
    eight = P.polygonize(values, 0.5, 8, TRANSFORM, block_shape=(2, 2))
    assert len(four) == 2 and len(eight) == 1
    assert eight.geometry[0].geom_type == "MultiPolygon" and eight.moments.count[0] == 2
    assert wkb_set(eight.geometry) == wkb_set(reference(values, 0.5, 8))


def test_min_area_simplify_and_reprojection() -> None:
    values = blobs(40, 40, seed=3)
    comps = P.polygonize(values, 0.3, 4, TRANSFORM, block_shape=(8, 8))
    small = int(np.median(comps.moments.count))
    out = P.finish(comps, P.Finish(UTM, UTM, min_area=small * 100.0))
    assert 0 < len(out) < len(comps)
    assert (out.moments.count >= small).all() and (out.area_m2 >= small * 100.0).all()
    simplified = P.finish(comps, P.Finish(UTM, UTM, simplify_tolerance=15.0))
    assert shapely.get_num_coordinates(simplified.geometry).sum() < shapely.get_num_coordinates(comps.geometry).sum()
    assert all(shapely.is_valid(simplified.geometry))
    wgs = P.finish(comps, P.Finish(UTM, "EPSG:4326"))
    x0, y0, x1, y1 = shapely.total_bounds(wgs.geometry)
    assert 13.5 < x0 < x1 < 13.7 and 50.5 < y0 < y1 < 50.6  # UTM 33N: 100 km west of 15°E, 5600 km north
    back = P.reproject(wgs.geometry, "EPSG:4326", UTM)
    np.testing.assert_allclose(shapely.total_bounds(back), shapely.total_bounds(comps.geometry), atol=1e-6)
    np.testing.assert_allclose(wgs.area_m2, comps.moments.count * 100.0)


def test_geographic_grid_area_is_geodesic() -> None:
    values = np.zeros((4, 4), np.float32)
    values[1:3, 1:3] = 1
    comps = P.polygonize(values, 0.5, 4, (0.001, 0.0, 10.0, 0.0, -0.001, 0.0))  # near the equator
    area = P.area_m2(comps.geometry, "EPSG:4326")
    assert area[0] == pytest.approx(4 * 111.32**2, rel=0.01)  # ~111 m per 0.001° at the equator


@pytest.mark.parametrize("threshold", [10.0, np.inf])
def test_empty_result(threshold: float) -> None:
    values = blobs(20, 20, seed=4)
    got = P.polygonize(values, threshold, 8, TRANSFORM, block_shape=(6, 6))
    assert len(got) == 0 and len(got.moments.count) == 0
    assert len(P.finish(got, P.Finish(UTM, "EPSG:4326"))) == 0


def test_all_nan_is_background() -> None:
    values = np.full((8, 8), np.nan, np.float32)
    assert len(P.polygonize(values, -np.inf, 4, TRANSFORM, block_shape=(3, 3))) == 0


def test_combine_moments_is_exact_not_average_of_averages() -> None:
    a, b = np.array([1.0, 2.0, 3.0]), np.array([10.0])
    m = P.Moments.concat([
        P.Moments(np.array([3]), np.array([a.mean()]), np.array([((a - a.mean()) ** 2).sum()]), np.array([1.0]),
                  np.array([3.0])),
        P.Moments(np.array([1]), np.array([10.0]), np.array([0.0]), np.array([10.0]), np.array([10.0])),
    ])  # fmt: skip
    c = P.combine_moments(m, np.array([0, 0]), 1)
    both = np.concatenate([a, b])
    assert c.count[0] == 4 and c.mean[0] == pytest.approx(both.mean()) and c.std[0] == pytest.approx(both.std())
    assert c.mean[0] != pytest.approx((a.mean() + 10.0) / 2)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_centerlines_blockwise_equal_whole_raster(connectivity: int) -> None:
    values = blobs(57, 71, seed=6)
    got = P.polygonize(values, 0.3, connectivity, TRANSFORM, block_shape=(10, 13), centerlines=True)
    whole = P.polygonize(values, 0.3, connectivity, TRANSFORM, centerlines=True)  # one block
    by_polygon = dict(zip(shapely.to_wkb(whole.geometry), whole.centerline, strict=True))
    lines = [by_polygon[w] for w in shapely.to_wkb(got.geometry)]
    assert sum(line is not None for line in lines) > 10
    for mine, want in zip(got.centerline, lines, strict=True):
        assert (mine is None and want is None) or shapely.equals_exact(mine, want, 0)
    for poly, line in zip(got.geometry, got.centerline, strict=True):
        assert line is None or shapely.covers(poly, line)


def test_centerline_of_a_bar_is_its_middle() -> None:
    values = np.zeros((9, 40), np.float32)
    values[2:7, 3:37] = 1  # 5 px tall, 34 px long
    comps = P.polygonize(values, 0.5, 8, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), block_shape=(4, 8), centerlines=True)
    line = comps.centerline[0]
    assert line.geom_type == "LineString" and line.length > 25
    y = shapely.get_coordinates(line)[:, 1]
    assert np.median(y) == 4.5 and np.abs(y - 4.5).max() <= 1  # the middle row (skimage thins ends a little)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_nodata_is_background_and_outside_the_statistics(connectivity: int) -> None:
    """An integer band has no NaN: its fill value marks missing pixels, and a fill value above
    the threshold (uint8 255, int16 32767, or 0 under a negative threshold) must not become
    foreground."""
    rng = np.random.default_rng(7)
    field = blobs(60, 70, seed=7)
    values = np.round(np.nan_to_num(field) * 100).astype(np.int16)
    nodata = 32767
    values[10:30, 5:50] = nodata  # a missing strip across many blocks
    values[rng.random(values.shape) < 0.02] = nodata
    got = P.polygonize(values, 30, connectivity, TRANSFORM, block_shape=(11, 13), nodata=nodata)
    want = reference(np.where(values == nodata, 0, values).astype(np.float32), 30, connectivity)
    assert len(got) == len(want) > 10
    assert wkb_set(got.geometry) == wkb_set(want)
    assert got.moments.vmax.max() < nodata
    assert got.moments.count.sum() == ((values > 30) & (values != nodata)).sum()
    # without the nodata value the fill pixels would be foreground (the bug this guards against)
    unmasked = P.polygonize(values, 30, connectivity, TRANSFORM, block_shape=(11, 13))
    assert unmasked.moments.vmax.max() == nodata and len(unmasked) != len(got)


def test_drop_collinear_equals_douglas_peucker_at_zero() -> None:
    values = blobs(80, 90, seed=8)
    pieces = P.Components.concat([
        P.polygonize_block(values[y0:y0 + 16, x0:x0 + 16], 0.3, 8, (y0, y0 + 16, x0, x0 + 16), values.shape,
                           TRANSFORM).pieces for y0 in range(0, 80, 16) for x0 in range(0, 90, 16)
    ]).geometry  # fmt: skip
    unions = np.array([shapely.union_all(pieces[i:i + 5]) for i in range(0, len(pieces), 5)], dtype=object)
    assert {g.geom_type for g in unions} == {"Polygon", "MultiPolygon"}
    mine = shapely.normalize(P.drop_collinear(unions))
    dp = shapely.normalize(shapely.simplify(unions, 0.0, preserve_topology=True))
    assert (shapely.to_wkb(mine) == shapely.to_wkb(dp)).all()
    assert shapely.get_num_coordinates(mine).sum() < shapely.get_num_coordinates(unions).sum()


@pytest.mark.parametrize("tolerance", [10.0, 20.0, 40.0])
def test_simplify_keeps_neighbours_apart(tolerance: float) -> None:
    """4-connected components touch diagonally; simplifying them one by one made them overlap."""
    values = blobs(200, 200, seed=1)
    comps = P.polygonize(values, 0.3, 4, TRANSFORM, block_shape=(64, 64))
    out = P.finish(comps, P.Finish(UTM, UTM, simplify_tolerance=tolerance)).geometry

    def pairs(geoms: np.ndarray) -> tuple[int, int]:
        a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
        keep = a < b
        return int((shapely.area(shapely.intersection(geoms[a[keep]], geoms[b[keep]])) > 1e-6).sum()), int(keep.sum())

    overlapping, touching = pairs(out)
    assert overlapping == 0 and touching == pairs(comps.geometry)[1] > 50  # still touching, never overlapping
    assert shapely.is_valid(out).all()
    assert shapely.get_num_coordinates(out).sum() < 0.6 * shapely.get_num_coordinates(comps.geometry).sum()


def test_rows_are_the_features_as_wkb_and_bounds() -> None:
    values = blobs(40, 40, seed=9)
    features = P.finish(P.polygonize(values, 0.3, 4, TRANSFORM, block_shape=(8, 8), centerlines=True),
                        P.Finish(UTM, "EPSG:4326"))  # fmt: skip
    rows = P.Rows.of(features)
    assert len(rows) == len(features) > 5
    assert (shapely.to_wkb(shapely.from_wkb(rows.wkb)) == shapely.to_wkb(features.geometry)).all()
    np.testing.assert_array_equal(rows.bbox, shapely.bounds(features.geometry))
    assert set(rows.type_id.tolist()) <= {3, 6}
    assert (rows.centerline_type_id[shapely.is_missing(features.centerline)] == -1).all()
    both = P.Rows.concat([rows, P.Rows.of(P.Features.concat([])), rows])
    assert len(both) == 2 * len(rows) and both.bbox.shape == (2 * len(rows), 4)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_merging_split_groups_equals_merging_all(k: int) -> None:
    values = blobs(90, 100, seed=10)
    blocks = [(y0, min(y0 + 12, 90), x0, min(x0 + 15, 100)) for y0 in range(0, 90, 12) for x0 in range(0, 100, 15)]
    results = [P.polygonize_block(values[y0:y1, x0:x1], 0.3, 8, (y0, y1, x0, x1), values.shape, TRANSFORM)
               for y0, y1, x0, x1 in blocks]  # fmt: skip
    groups = P.group_pieces(results, blocks, 8)
    whole = P.merge_groups(groups, TRANSFORM)
    parts = groups.split(k)
    assert 1 < len(parts) <= k and sum(p.n_groups for p in parts) == groups.n_groups
    split = P.Components.concat([P.merge_groups(p, TRANSFORM) for p in parts])
    assert (shapely.to_wkb(split.geometry) == shapely.to_wkb(whole.geometry)).all()
    np.testing.assert_array_equal(split.moments.count, whole.moments.count)
    np.testing.assert_array_equal(split.moments.m2, whole.moments.m2)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seam_merger_hands_out_only_complete_groups_in_any_block_order(connectivity: int, seed: int) -> None:
    """Blocks added in a random order, ready() asked after each: every group handed out is a
    whole-raster component (equal to the one grouping all blocks at once gives), each exactly
    once, numbered by key — so merging as blocks finish gives the same result."""
    values = blobs(90, 100, seed=20 + seed, sigma=3.0)
    blocks = [(y0, min(y0 + 12, 90), x0, min(x0 + 15, 100)) for y0 in range(0, 90, 12) for x0 in range(0, 100, 15)]
    results = [P.polygonize_block(values[y0:y1, x0:x1], 0.3, connectivity, (y0, y1, x0, x1), values.shape, TRANSFORM)
               for y0, y1, x0, x1 in blocks]  # fmt: skip
    whole = P.group_pieces(results, blocks, connectivity)
    want = P.merge_groups(whole, TRANSFORM)
    merger = P.SeamMerger(blocks, connectivity)
    handed: list[P.Groups] = []
    early = 0
    order = np.random.default_rng(seed).permutation(len(blocks))
    for step, k in enumerate(order):
        merger.add(int(k), results[k])
        ready = merger.ready()
        assert np.all(np.diff(ready.keys) > 0)
        if ready.n_groups:
            handed.append(ready)
            early += ready.n_groups if step < len(order) - 1 else 0
    assert merger.open_pieces == 0 and merger.ready().n_groups == 0
    got = P.Groups.concat(handed)
    assert got.n_groups == whole.n_groups and len(got.pieces) == len(whole.pieces)
    # most groups are complete (and merged) before the last block arrives
    assert early > whole.n_groups // 2
    merged = P.merge_groups(got, TRANSFORM)
    by_key = np.argsort(got.keys, kind="stable")
    np.testing.assert_array_equal(got.keys[by_key], whole.keys)
    assert (shapely.to_wkb(merged.geometry[by_key]) == shapely.to_wkb(want.geometry)).all()
    np.testing.assert_array_equal(merged.moments.count[by_key], want.moments.count)
    with pytest.raises(ValueError, match="added twice"):
        merger.add(int(order[0]), results[order[0]])
