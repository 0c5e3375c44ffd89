"""Mosaic planning: recipe tables, grid choice and alignment, STAC filtering, AOI checks,
read helpers and the local-catalog conversions. Pure functions, no Ray, no network."""

from __future__ import annotations

import numpy as np
import pytest
from rasterkube.api.kinds import Aoi
from rasterkube.errors import UserError
from rasterkube.grid import GeoGrid
from rasterkube.mosaic import composite, gridding, localstac, reads
from rasterkube.mosaic.aoi import check_geometry, load_aoi
from rasterkube.mosaic.recipes import RECIPES, recipe_for
from rasterkube.mosaic.stac import Scene, scene_matches
from shapely.geometry import Polygon, box

# ------------------------------------------------------------------------------ recipes


def test_every_dataset_has_a_recipe() -> None:
    from rasterkube.api.kinds import Dataset

    assert set(RECIPES) == {d.value for d in Dataset}
    assert recipe_for("sentinel-2-l2a").method == composite.METHOD_MEDIAN
    assert recipe_for("sentinel-2-l2a-best").method == composite.METHOD_BEST
    assert recipe_for("landsat-c2-l2").mask_asset == "qa_pixel"


@pytest.mark.parametrize(
    ("dataset", "name", "band"),
    [
        ("sentinel-2-l2a", "B04", "B04"),
        ("sentinel-2-l2a", "red", "B04"),
        ("sentinel-2-l2a", "sentinel-2-l2a:B04", "B04"),
        ("sentinel-2-l2a", "nir08", "B8A"),
        ("sentinel-2-l2a", "swir16", "B11"),
        ("sentinel-2-l2a-best", "nir", "B08"),
        ("landsat-c2-l2", "nir08", "nir08"),
        ("landsat-c2-l2", "landsat-c2-l2:swir22", "swir22"),
        ("landsat-c2-l2", "B04", None),
        ("sentinel-2-l2a", "qa_pixel", None),
    ],
)
def test_band_names_map_to_band_ids(dataset: str, name: str, band: str | None) -> None:
    assert recipe_for(dataset).band_id(name) == band


def test_labels_and_unknown_bands() -> None:
    s2 = recipe_for("sentinel-2-l2a-best")
    assert s2.label("B04") == "sentinel-2-l2a:B04"  # labels name the collection, not the reducer
    assert s2.resolve_bands(["red", "B04", "B99"]) == (["B04"], ["B99"])
    assert s2.resolve_bands(None) == (["B02", "B03", "B04", "B08"], [])
    assert recipe_for("landsat-c2-l2").assets["red"] == "red"


def test_sentinel2_scaling_follows_the_item_baseline() -> None:
    s2 = recipe_for("sentinel-2-l2a")
    dn = np.array([0, 1000, 3000], dtype=np.uint16)
    new = s2.reflectance(dn, {"s2:processing_baseline": "05.09"})
    old = s2.reflectance(dn, {"s2:processing_baseline": "02.14"})
    harmonised = s2.reflectance(dn, {"s2:processing_baseline": "02.14", "earthsearch:boa_offset_applied": True})
    np.testing.assert_allclose(new[1:], [0.0, 0.2], atol=1e-7)
    np.testing.assert_allclose(old[1:], [0.1, 0.3], atol=1e-7)
    np.testing.assert_allclose(harmonised[1:], [0.0, 0.2], atol=1e-7)
    assert np.isnan(new[0]) and np.isnan(old[0])


# --------------------------------------------------------------------------------- grid


@pytest.mark.parametrize(
    ("lon", "lat", "crs"),
    [(13.4, 52.5, "EPSG:32633"), (-106.9, 40.3, "EPSG:32613"), (-180.0, 0.0, "EPSG:32601"),
     (180.0, -10.0, "EPSG:32760"), (2.9999, -33.0, "EPSG:32731"), (3.0, 10.0, "EPSG:32631")],
)  # fmt: skip
def test_utm_zone_of_a_point(lon: float, lat: float, crs: str) -> None:
    assert gridding.utm_crs(lon, lat) == crs


def test_aligned_grid_snaps_outwards_to_resolution_multiples() -> None:
    grid = gridding.aligned_grid((100.5, 200.2, 139.9, 229.0), "EPSG:32633", 10.0)
    assert grid.transform == (10.0, 0.0, 100.0, 0.0, -10.0, 230.0)
    assert grid.shape == (3, 4)
    np.testing.assert_allclose(grid.x_coords(), [105, 115, 125, 135])  # pixel centres
    np.testing.assert_allclose(grid.y_coords(), [225, 215, 205])


def test_anchor_half_puts_pixel_centres_on_multiples() -> None:
    grid = gridding.aligned_grid((336380.0, 4460600.0, 338200.0, 4462420.0), "EPSG:32613", 30.0, anchor=0.5)
    assert grid.transform[2] == 336375.0 and grid.transform[5] == 4462425.0  # the Landsat sample's corner
    assert np.all(grid.x_coords() % 30 == 0)


def test_bounds_on_an_edge_do_not_add_a_pixel() -> None:
    eps = 1e-9  # float noise of a reprojection
    grid = gridding.aligned_grid((0.0 - eps, 0.0 + eps, 100.0 + eps, 50.0 - eps), "EPSG:3857", 10.0)
    assert grid.shape == (5, 10)


def test_two_aois_share_pixels() -> None:
    a = gridding.aligned_grid((3.0, 4.0, 57.0, 61.0), "EPSG:32633", 10.0)
    b = gridding.aligned_grid((23.0, 14.0, 97.0, 33.0), "EPSG:32633", 10.0)
    assert (a.transform[2] - b.transform[2]) % 10 == 0 and (a.transform[5] - b.transform[5]) % 10 == 0


def test_intersects_is_open() -> None:
    assert gridding.intersects((0, 0, 1, 1), (0.5, 0.5, 2, 2))
    assert not gridding.intersects((0, 0, 1, 1), (1, 0, 2, 1))


def test_choose_grid_default_and_explicit() -> None:
    from rasterkube.mosaic.service import choose_grid

    aoi = box(13.40, 52.50, 13.41, 52.51)
    grid = choose_grid(aoi, recipe_for("sentinel-2-l2a"), None, None)
    assert grid.crs == "EPSG:32633" and grid.resolution == (10.0, -10.0)
    assert grid.transform[2] % 10 == 0 and grid.transform[5] % 10 == 0
    ll = choose_grid(aoi, recipe_for("sentinel-2-l2a"), "EPSG:4326", 0.001)
    assert ll.crs == "EPSG:4326" and ll.shape == (10, 10)
    with pytest.raises(UserError, match="spec.resolution: required"):
        choose_grid(aoi, recipe_for("sentinel-2-l2a"), "EPSG:4326", None)
    with pytest.raises(UserError, match="spec.crs"):
        choose_grid(aoi, recipe_for("sentinel-2-l2a"), "EPSG:999999", None)


# --------------------------------------------------------------------------------- STAC


def _scene(**kw: object) -> Scene:
    base: dict[str, object] = {"id": "a", "time": np.datetime64("2021-06-01T10:00:00", "s"),
                               "bbox": (10.0, 50.0, 11.0, 51.0), "assets": {}, "collection": "sentinel-2-l2a",
                               "cloud_cover": 20.0}  # fmt: skip
    base.update(kw)
    return Scene(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, True),
        ({"cloud_cover": 80.0}, False),
        ({"cloud_cover": 75.0}, True),  # ≤ maxCloudCover
        ({"cloud_cover": None}, True),  # no property: kept
        ({"time": np.datetime64("2022-01-01T00:00:00", "s")}, False),  # end is exclusive
        ({"time": np.datetime64("2021-01-01T00:00:00", "s")}, True),  # start is inclusive
        ({"bbox": (20.0, 50.0, 21.0, 51.0)}, False),
        ({"collection": "landsat-c2-l2"}, False),
        # the footprint geometry wins over the bbox
        ({"geometry": {"type": "Polygon", "coordinates": [[[10.9, 50.9], [11, 50.9], [11, 51], [10.9, 50.9]]]}}, False),
    ],
)
def test_scene_filter(changes: dict[str, object], expected: bool) -> None:
    aoi = box(10.2, 50.2, 10.4, 50.4)
    start, end = np.datetime64("2021-01-01", "s"), np.datetime64("2022-01-01", "s")
    assert scene_matches(_scene(**changes), aoi, start, end, 75.0, "sentinel-2-l2a") is expected


def test_unreadable_catalog_names_the_field(tmp_path) -> None:
    from rasterkube.mosaic.stac import search_catalog

    t0, t1 = np.datetime64("2020-01-01", "s"), np.datetime64("2021-01-01", "s")
    with pytest.raises(UserError, match=r"spec.stac.catalog: .* does not exist"):
        search_catalog(str(tmp_path / "nope"), "landsat-c2-l2", box(0, 0, 1, 1), t0, t1, 50)
    (tmp_path / "catalog.json").write_text("{not json")
    with pytest.raises(UserError, match="spec.stac.catalog: cannot read"):
        search_catalog(str(tmp_path), "landsat-c2-l2", box(0, 0, 1, 1), t0, t1, 50)


# ---------------------------------------------------------------------------------- AOI


def test_aoi_checks_name_the_field() -> None:
    bowtie = Polygon([(0, 0), (1, 1), (1, 0), (0, 1), (0, 0)])
    with pytest.raises(UserError, match=r"spec.aoi.geometry: invalid polygon \(Self-intersection"):
        check_geometry(bowtie, "spec.aoi.geometry")
    with pytest.raises(UserError, match="spec.aoi.geometry: the AOI is empty"):
        check_geometry(Polygon(), "spec.aoi.geometry")
    with pytest.raises(UserError, match="not longitude/latitude"):
        check_geometry(box(500000, 5800000, 501000, 5801000), "spec.aoi.geometry")
    with pytest.raises(UserError, match="has no area"):
        load_aoi(Aoi(geometry={"type": "Point", "coordinates": [1, 2]}))
    with pytest.raises(UserError, match="remove the 'crs' member"):
        load_aoi(Aoi(geometry={"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]],
                               "crs": {"type": "name", "properties": {"name": "EPSG:3857"}}}))  # fmt: skip
    (row,) = load_aoi(Aoi(bbox=[10, 50, 11, 51]))
    assert row.key == "aoi" and row.geometry.bounds == (10, 50, 11, 51)


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_aoi_file_rows_and_crs(tmp_path) -> None:
    import geopandas

    frame = geopandas.GeoDataFrame({"name": ["north field", "south/field"]},
                                   geometry=[box(500000, 5800000, 501000, 5801000), box(500000, 5790000, 501000, 5791000)],
                                   crs="EPSG:32633")  # fmt: skip
    frame.to_parquet(tmp_path / "aoi.parquet")
    rows = load_aoi(Aoi(uri=str(tmp_path / "aoi.parquet")))
    assert [r.key for r in rows] == ["north-field", "south-field"]
    assert 14.9 < rows[0].geometry.centroid.x < 15.1  # transformed to lon/lat
    frame.set_crs(None, allow_override=True).to_file(tmp_path / "nocrs.geojson", driver="GeoJSON")
    with pytest.raises(UserError, match="spec.aoi.uri"):
        load_aoi(Aoi(uri=str(tmp_path / "nocrs.geojson")))
    with pytest.raises(UserError, match="spec.aoi.uri: .* does not exist"):
        load_aoi(Aoi(uri=str(tmp_path / "missing.parquet")))


# -------------------------------------------------------------------------------- reads


def test_gdal_options_translate_the_s3_endpoint() -> None:
    opts = reads.gdal_options({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"})
    assert opts["AWS_S3_ENDPOINT"] == "127.0.0.1:9000" and opts["AWS_HTTPS"] == "NO"
    assert opts["AWS_VIRTUAL_HOSTING"] == "FALSE"
    assert "GDAL_HTTP_MAX_RETRY" not in reads.gdal_options({"GDAL_HTTP_MAX_RETRY": "9"})  # the user's setting wins
    assert "AWS_S3_ENDPOINT" not in reads.gdal_options({})


def test_alignment_and_overview_choice() -> None:
    grid = GeoGrid("EPSG:32633", (10.0, 0.0, 1000.0, 0.0, -10.0, 2000.0), (4, 4))
    assert reads.aligned_offset((10.0, 0.0, 900.0, 0.0, -10.0, 2100.0), grid) == (10, 10)
    assert reads.aligned_offset((10.0, 0.0, 905.0, 0.0, -10.0, 2100.0), grid) is None  # half a pixel off
    assert reads.aligned_offset((20.0, 0.0, 900.0, 0.0, -20.0, 2100.0), grid) is None
    assert reads.overview_level(10.0, 10.0, [2, 4, 8]) is None
    assert reads.overview_level(10.0, 45.0, [2, 4, 8]) == 1  # ×4 = 40 m ≤ 45 m < 80 m
    assert reads.overview_level(10.0, 1000.0, [2, 4, 8]) == 2


def test_retries_only_transient_errors() -> None:
    from rasterio.errors import RasterioIOError

    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise RasterioIOError("HTTP response code: 503")
        return 7

    assert reads.with_retries(flaky, base_delay_s=0) == 7 and len(calls) == 3
    with pytest.raises(RasterioIOError):
        reads.with_retries(lambda: (_ for _ in ()).throw(RasterioIOError("x.tif: No such file or directory")),
                           base_delay_s=0)  # fmt: skip


# ----------------------------------------------------------------- local catalog numerics


def test_ledaps_to_collection2_round_trip() -> None:
    sr = np.array([-9999, -2000, 0, 523, 10000, 16000], dtype=np.int16)
    dn = localstac.ledaps_to_c2_dn(sr)
    assert dn[0] == 0 and dn.dtype == np.uint16
    back = composite.landsat_sr_scale(dn)
    assert np.isnan(back[0])
    np.testing.assert_allclose(back[2:], sr[2:] * 1e-4, atol=composite.LANDSAT_SR_SCALE / 2 + 1e-6)
    assert dn[1] == 1  # reflectance −0.2 would be DN 0 = fill: clipped to 1


def test_fmask_classes_become_qa_pixel_bits_the_recipe_masks() -> None:
    fmask = np.array([0, 1, 2, 3, 4, 255, 7], dtype=np.uint8)
    valid = composite.qa_pixel_valid(localstac.fmask_to_qa_pixel(fmask))
    # clear land, water and snow are observations; shadow, cloud, fill (and unknown) are not
    assert valid.tolist() == [True, True, False, True, False, False, False]


def test_derived_scl() -> None:
    blue = np.array([0, 4000, 500, 500, 800], dtype=np.uint16)
    green = np.array([0, 4000, 900, 600, 800], dtype=np.uint16)
    nir = np.array([0, 4000, 300, 3000, 1000], dtype=np.uint16)
    assert localstac.derive_scl(blue, green, nir).tolist() == [0, 9, 6, 4, 5]
