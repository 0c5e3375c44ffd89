"""What a store says → how rasterkube reads it: the pure rules of rasterkube.storelayout."""

from __future__ import annotations

import numpy as np
import pytest

from rasterkube import storelayout as L
from rasterkube.grid import GeoGrid

UTM = "EPSG:32633"
TRANSFORM = (10.0, 0.0, 400_000.0, 0.0, -10.0, 5_600_000.0)
SHAPE = (4, 6)
GRID = GeoGrid(UTM, TRANSFORM, SHAPE)


def wkt(code: str) -> str:
    from pyproj import CRS

    return CRS.from_user_input(code).to_wkt()


# -------------------------------------------------------------------------------- dims


@pytest.mark.parametrize(
    ("dims", "want"),
    [
        (("time", "band", "y", "x"), {"time": "time", "band": "band", "y": "y", "x": "x"}),
        (("time", "y", "x", "band"), {"time": "time", "band": "band", "y": "y", "x": "x"}),
        (("latitude", "longitude"), {"y": "latitude", "x": "longitude"}),
        (("Time", "bands", "lat", "lon"), {"time": "Time", "band": "bands", "y": "lat", "x": "lon"}),
        (("channel", "y", "x"), {"band": "channel", "y": "y", "x": "x"}),
    ],
)
def test_canonical_axes_reads_usual_names_in_any_order(dims: tuple[str, ...], want: dict[str, str]) -> None:
    assert L.canonical_axes(dims) == want


def test_spatial_dimensions_attribute_names_other_spatial_dims() -> None:
    assert L.canonical_axes(("time", "northing", "easting"), ["northing", "easting"]) == {
        "time": "time", "y": "northing", "x": "easting"}  # fmt: skip


@pytest.mark.parametrize(
    ("dims", "match"),
    [
        (("member", "y", "x"), r"dims 'member' .* not ones rasterkube reads"),
        (("row", "col"), r"dims 'row', 'col'"),
        (("time", "y"), r"no x dim"),
        (("y", "x", "lat"), r"dims 'lat'"),  # two y dims
    ],
)
def test_canonical_axes_refuses_what_it_cannot_map(dims: tuple[str, ...], match: str) -> None:
    with pytest.raises(L.LayoutError, match=match):
        L.canonical_axes(dims)


# ------------------------------------------------------------------------------- bands


def test_choose_arrays() -> None:
    store = {"variables": ("time", "band", "y", "x"), "count": ("time", "y", "x")}
    assert L.choose_arrays("variables", store) == ["variables"]
    # The only raster: whatever its name.
    assert L.choose_arrays("variables", {"reflectance": ("band", "y", "x"), "crs": ()}) == ["reflectance"]
    # odc-stac: one variable per band, alphabetical order.
    per_band = {"red": ("time", "y", "x"), "nir08": ("time", "y", "x"), "blue": ("time", "y", "x")}
    assert L.choose_arrays("variables", per_band) == ["blue", "nir08", "red"]


@pytest.mark.parametrize(
    ("data_var", "store", "match", "field"),
    [
        ("scores", {"variables": ("time", "band", "y", "x")}, r"'scores' is not a variable", "dataVar"),
        ("variables", {"a": ("time", "band", "y", "x"), "b": ("time", "band", "y", "x")},
         r"several rasters with a band dim \(a, b\)", "dataVar"),
        ("variables", {"a": ("time", "y", "x"), "b": ("y", "x")}, r"one variable per band but they differ in dims",
         "source"),
        ("variables", {"lat_bnds": ("lat", "nv")}, r"'variables' is not a variable", "source"),
    ],
)  # fmt: skip
def test_choose_arrays_refuses_ambiguous_stores(data_var: str, store: dict, match: str, field: str) -> None:
    with pytest.raises(L.LayoutError, match=match) as err:
        L.choose_arrays(data_var, store)
    assert err.value.field == field


def test_band_labels() -> None:
    assert L.band_labels(np.array([1, 2, 3]), 3) == ("1", "2", "3")  # rioxarray's band numbers
    assert L.band_labels(np.array(["red", "nir"]), 2) == ("red", "nir")
    assert L.band_labels(None, 2) == ("1", "2")  # GDAL's numbering without a coordinate
    with pytest.raises(L.LayoutError, match="repeated labels"):
        L.band_labels(np.array(["a", "a"]), 2)


@pytest.mark.parametrize(
    ("wanted", "chunk", "want"),
    [
        ([3, 0], 4, (slice(0, 4), [3, 0])),  # one chunk holds every band: read the span, pick
        ([0, 1, 2], 4, (slice(0, 3), None)),  # already in order: nothing to pick
        ([2], 1, (slice(2, 3), None)),
        ([3, 0], 1, ([3, 0], None)),  # one band per chunk: only those two chunks
        ([1, 2], 2, (slice(1, 3), None)),  # two chunks either way
        ([0, 5], 2, ([0, 5], None)),  # the span would read the chunk of bands 2-3 for nothing
        ([4, 5], 2, (slice(4, 6), None)),
    ],
)
def test_band_selection_reads_a_span_unless_it_touches_more_chunks(wanted: list[int], chunk: int, want: tuple) -> None:
    assert L.band_selection(wanted, chunk) == want


# -------------------------------------------------------------------------------- grid


def test_crs_string_prefers_an_exact_code_else_wkt() -> None:
    assert L.crs_string(wkt(UTM)) == UTM
    assert L.crs_string("EPSG:4326") == "EPSG:4326"
    custom = "+proj=laea +lat_0=52 +lon_0=10 +x_0=4321000 +y_0=3210000 +ellps=GRS80 +units=m +no_defs"
    got = L.crs_string(custom)
    assert got.startswith("PROJCRS") and "Lambert Azimuthal Equal Area" in got


def test_grid_from_proj_attributes() -> None:
    attrs = {"proj:code": UTM, "spatial:transform": list(TRANSFORM), "spatial:shape": list(SHAPE)}
    assert L.grid_from_metadata(attrs, None, SHAPE, GRID.y_coords(), GRID.x_coords()) == GRID
    assert L.grid_from_metadata(attrs, None, SHAPE, None, None) == GRID  # no coordinates needed


def test_grid_from_rioxarray_grid_mapping() -> None:
    gm = {"crs_wkt": wkt(UTM), "spatial_ref": wkt(UTM), "GeoTransform": "400000.0 10.0 0.0 5600000.0 0.0 -10.0"}
    assert L.grid_from_metadata({}, gm, SHAPE, GRID.y_coords(), GRID.x_coords()) == GRID
    # GDAL's spatial_ref alone (older writers), transform from the coordinates.
    assert L.grid_from_metadata({}, {"spatial_ref": wkt(UTM)}, SHAPE, GRID.y_coords(), GRID.x_coords()) == GRID


def test_grid_from_cf_projection_parameters() -> None:
    from pyproj import CRS

    cf = CRS.from_user_input(UTM).to_cf()
    cf.pop("crs_wkt")
    grid = L.grid_from_metadata({}, cf, SHAPE, GRID.y_coords(), GRID.x_coords())
    assert CRS.from_user_input(grid.crs) == CRS.from_user_input(UTM)
    assert grid.transform == TRANSFORM


def test_transform_from_coordinates_south_up_and_float32_coords() -> None:
    ys = np.float32(52.0) + np.float32(0.25) * (np.arange(8, dtype=np.float32) + np.float32(0.5))  # south-up
    xs = (13.0 + 0.25 * (np.arange(5) + 0.5)).astype(np.float32)
    grid = L.grid_from_metadata({"proj:code": "EPSG:4326"}, None, (8, 5), ys, xs)
    assert grid.transform == (0.25, 0.0, 13.0, 0.0, 0.25, 52.0)


@pytest.mark.parametrize(
    ("attrs", "gm", "ys", "xs", "match"),
    [
        ({}, None, GRID.y_coords(), GRID.x_coords(), r"declares no CRS.*rio\.write_crs"),
        ({"proj:code": "EPSG:0"}, None, GRID.y_coords(), GRID.x_coords(), r"proj:code is not a CRS pyproj knows"),
        ({"proj:code": UTM}, None, None, None, r"declares no transform.*write_transform"),
        ({"proj:code": UTM}, None, GRID.y_coords(), GRID.x_coords() + [0, 0, 0, 3, 3, 3],
         r"x coordinate is not regularly spaced"),
        ({"proj:code": UTM, "spatial:transform": [20, 0, 400000, 0, -20, 5600000]}, None, GRID.y_coords(),
         GRID.x_coords(), r"spatial:transform .* disagrees with its x/y coordinates"),
        ({"proj:code": UTM, "spatial:transform": list(TRANSFORM), "spatial:shape": [5, 6]}, None, None, None,
         r"spatial:shape \[5, 6\] is not the data's \(y, x\) shape \[4, 6\]"),
        ({}, {"crs_wkt": wkt(UTM), "GeoTransform": "1 2 3"}, None, None, r"GeoTransform '1 2 3' is not six numbers"),
        ({"proj:code": UTM}, {"GeoTransform": "400000 10 1 5600000 0 -10"}, None, None, r"rotated grids"),
    ],
)  # fmt: skip
def test_grid_refusals_say_what_to_add(attrs: dict, gm: dict | None, ys, xs, match: str) -> None:
    with pytest.raises(L.LayoutError, match=match):
        L.grid_from_metadata(attrs, gm, SHAPE, ys, xs)


def test_geotransform_round_trip_with_cf_grid_mapping_of_outputs() -> None:
    attrs = GRID.cf_grid_mapping()
    assert L.parse_geotransform(attrs["GeoTransform"]) == TRANSFORM
    assert L.grid_from_metadata({}, attrs, SHAPE, None, None) == GRID


def test_proj_attrs_for_a_crs_without_code() -> None:
    custom = L.crs_string("+proj=laea +lat_0=52 +lon_0=10 +x_0=4321000 +y_0=3210000 +ellps=GRS80 +units=m +no_defs")
    grid = GeoGrid(custom, TRANSFORM, SHAPE)
    attrs = grid.to_attrs()
    assert "proj:code" not in attrs and attrs["proj:wkt2"] == custom
    assert GeoGrid.from_attrs(attrs) == grid
    assert GeoGrid(UTM, TRANSFORM, SHAPE).to_attrs()["proj:code"] == UTM


# ------------------------------------------------------------------------------ nodata


@pytest.mark.parametrize(
    ("attrs", "dtype", "want"),
    [
        ({"_FillValue": np.float32(np.nan)}, "float32", ()),  # NaN is missing already: raw fast path
        ({"_FillValue": -9999.0}, "float32", (("_FillValue", -9999.0),)),
        ({"_FillValue": np.int16(-32768), "scale_factor": 1e-4, "add_offset": 0.5}, "int16",
         (("_FillValue", -32768), ("add_offset", 0.5), ("scale_factor", 1e-4))),
        ({"nodata": 0}, "uint16", (("_FillValue", 0),)),  # odc-stac's attribute, read as _FillValue
        ({"nodata": 0, "_FillValue": 1}, "uint16", (("_FillValue", 1),)),
        ({"units": "m", "long_name": "height"}, "float32", ()),
        ({"missing_value": np.nan, "_Unsigned": "true"}, "float32", (("_Unsigned", "true"),)),
    ],
)  # fmt: skip
def test_cf_decoding(attrs: dict, dtype: str, want: tuple) -> None:
    assert L.cf_decoding(attrs, np.dtype(dtype)) == want


def test_native_is_one_plain_time_band_y_x_array() -> None:
    assert L.is_native(("time", "band", "y", "x"), (), 1)
    assert not L.is_native(("time", "band", "y", "x"), (("_FillValue", 0),), 1)
    assert not L.is_native(("time", "y", "x", "band"), (), 1)
    assert not L.is_native(("time", "y", "x"), (), 2)


def test_plan_chunks_caps_big_chunks() -> None:
    axes = {"time": "t", "y": "lat", "x": "lon"}
    assert L.plan_chunks({"t": 1, "lat": 4000, "lon": 100}, axes, 5) == (1, 5, L.MAX_PLAN_CHUNK, 100)
