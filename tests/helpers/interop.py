"""An interop corpus: raster stores written the way other tools write them.

Each :class:`Case` is a store at ``uri`` written by the tool users have (xarray ``to_zarr`` in
zarr v2/v3 with and without encodings, rioxarray, odc-stac's ``load(...).to_zarr()``, other
dim names and orders, odd chunks) from a known truth, plus what rasterkube should read from
it — the decoded values in (time, band, y, x) order, the band labels, the grid and the times
— computed from the truth with numpy, not by the reader under test. :func:`write_reference`
writes that same data as rasterkube writes stores, so a job's outputs on the two can be
compared. :data:`REFUSED` are stores that say too little, with what the refusal must say.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from scipy import ndimage

from rasterkube import geozarr, storage
from rasterkube.grid import GeoGrid, Window

UTM33 = "EPSG:32633"
BANDS = ("B02", "B03", "B04")
TIMES = np.array(["2019-01-01", "2020-01-01", "2021-01-01"], dtype="datetime64[s]")
SHAPE = (40, 52)
UTM_GRID = GeoGrid(UTM33, (10.0, 0.0, 400_000.0, 0.0, -10.0, 5_600_000.0), SHAPE)
# A lat/lon grid whose coordinates are exact in binary (1/64°), so coordinates round-trip.
LONLAT_GRID = GeoGrid("EPSG:4326", (1 / 64, 0.0, 13.0, 0.0, -1 / 64, 52.5), SHAPE)
# CF packing of the int16 cases.
SCALE, OFFSET, INT16_FILL = 1e-4, 0.5, -32768
# Digital numbers of the uint16 case: DN = round(value * DN_SCALE + DN_OFFSET), 0 = nodata.
DN_SCALE, DN_OFFSET, DN_NODATA = 1000.0, 10_000.0, 0
DEFAULT_CHUNK = 16


def truth(seed: int = 0) -> np.ndarray:
    """(time, band, y, x) float32: smooth fields (polygons when thresholded) with NaN holes."""
    rng = np.random.default_rng(seed)
    t, b = len(TIMES), len(BANDS)
    field = ndimage.gaussian_filter(rng.normal(size=(t, b, *SHAPE)), (0, 0, 2.0, 2.0))
    field = (field - field.mean()) / field.std()
    field += np.linspace(0.0, 0.8, t)[:, None, None, None]  # a drift through time: change scores vary
    field = field.astype(np.float32)
    holes = rng.random((t, 1, *SHAPE)) < 0.03
    field = np.where(holes, np.float32(np.nan), field)
    field[:, :, :2, :3] = np.nan  # a corner with no data at all
    field[1, 2, 10:12, 20:23] = np.nan  # one band missing where the others are not
    return field


@dataclass(frozen=True)
class Case:
    """A store another tool wrote, and what rasterkube must read from it."""

    name: str
    uri: str
    bands: tuple[str, ...]
    values: np.ndarray  # (time, band, y, x), decoded: what the store's values mean
    grid: GeoGrid
    times: np.ndarray  # datetime64[s]; one NaT for a store without time

    @property
    def has_time(self) -> bool:
        return not np.isnat(self.times).any()


def write_reference(case: Case, uri: str, chunk: int = DEFAULT_CHUNK) -> str:
    """The case's data as rasterkube writes a store (geozarr.create, one commit)."""
    t, b, h, w = case.values.shape
    tmp = storage.temporary_uri(uri)
    geozarr.create(tmp, case.grid, case.times, list(case.bands), dtype=case.values.dtype, chunk_size=chunk)
    geozarr.write_region(tmp, "variables", Window(0, h, 0, w), case.values)
    geozarr.finalize(tmp)
    storage.commit(tmp, uri)
    return uri


# -------------------------------------------------------------------------------- writers


def _coords(grid: GeoGrid, y: str = "y", x: str = "x") -> dict[str, Any]:
    return {y: grid.y_coords(), x: grid.x_coords()}


def _proj_attrs(grid: GeoGrid) -> dict[str, Any]:
    """proj:/spatial: attributes as a user sets them by hand (the issue's crash report)."""
    return {"proj:code": grid.crs, "spatial:transform": list(grid.transform), "spatial:shape": list(grid.shape)}


def _to_zarr(ds: xr.Dataset, path: Path, **kw: Any) -> str:
    shutil.rmtree(path, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr v3: "unstable" string dtype, consolidated metadata
        ds.to_zarr(path, **kw)
    return str(path)


def _series(values: np.ndarray, grid: GeoGrid = UTM_GRID, name: str = "variables", y: str = "y",
            x: str = "x") -> xr.Dataset:  # fmt: skip
    return xr.Dataset({name: (("time", "band", y, x), values)},
                      coords={"time": TIMES.astype("datetime64[ns]"), "band": list(BANDS), **_coords(grid, y, x)})  # fmt: skip


def xarray_v3_nan(root: Path) -> Case:
    """The issue's crash: float32 with NaN, plain ``to_zarr`` (zarr v3: ``_FillValue`` is
    written base64-encoded), proj:/spatial: attributes set by hand."""
    v = truth()
    ds = _series(v).assign_attrs(_proj_attrs(UTM_GRID))
    return Case("xarray-v3-nan", _to_zarr(ds, root / "xarray-v3-nan.zarr"), BANDS, v, UTM_GRID, TIMES)


def xarray_v2_nan(root: Path) -> Case:
    v = truth()
    ds = _series(v).assign_attrs(_proj_attrs(UTM_GRID))
    return Case("xarray-v2-nan", _to_zarr(ds, root / "xarray-v2-nan.zarr", zarr_format=2), BANDS, v, UTM_GRID, TIMES)


def xarray_v3_fill(root: Path) -> Case:
    """float32 with an explicit ``_FillValue`` of -9999 (NaN written as -9999 on disk)."""
    v = truth()
    ds = _series(v).assign_attrs(_proj_attrs(UTM_GRID))
    uri = _to_zarr(ds, root / "xarray-v3-fill.zarr", encoding={"variables": {"_FillValue": -9999.0}})
    return Case("xarray-v3-fill", uri, BANDS, v, UTM_GRID, TIMES)


def _packed(zarr_format: int, root: Path) -> Case:
    """int16 with CF scale_factor/add_offset and a _FillValue (xarray's packing)."""
    v = truth()
    ints = np.where(np.isnan(v), INT16_FILL, np.round((np.nan_to_num(v) - OFFSET) / SCALE)).astype(np.int16)
    decoded = np.where(ints == INT16_FILL, np.nan, ints.astype(np.float64) * SCALE + OFFSET)  # CF, by hand
    ds = _series(decoded).assign_attrs(_proj_attrs(UTM_GRID))
    enc = {"variables": {"dtype": "int16", "scale_factor": SCALE, "add_offset": OFFSET, "_FillValue": INT16_FILL}}
    uri = _to_zarr(ds, root / f"xarray-v{zarr_format}-int16-packed.zarr", zarr_format=zarr_format, encoding=enc)
    return Case(f"xarray-v{zarr_format}-int16-packed", uri, BANDS, decoded, UTM_GRID, TIMES)


def xarray_v2_packed(root: Path) -> Case:
    return _packed(2, root)


def xarray_v3_packed(root: Path) -> Case:
    return _packed(3, root)


def _dn(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint16 DNs (0 = nodata) of ``v`` and the float32 values they mean (NaN for nodata)."""
    dn = np.where(np.isnan(v), DN_NODATA, np.round(np.nan_to_num(v) * DN_SCALE + DN_OFFSET)).astype(np.uint16)
    return dn, np.where(dn == DN_NODATA, np.float32(np.nan), dn.astype(np.float32))


def xarray_v3_uint16_fill(root: Path) -> Case:
    """Integer data with a nodata value: uint16 DNs, ``_FillValue`` 0 as an encoding."""
    dn, meaning = _dn(truth())
    ds = _series(dn).assign_attrs(_proj_attrs(UTM_GRID))
    uri = _to_zarr(ds, root / "xarray-v3-uint16-fill.zarr", encoding={"variables": {"_FillValue": DN_NODATA}})
    return Case("xarray-v3-uint16-fill", uri, BANDS, meaning, UTM_GRID, TIMES)


def xarray_v2_uint16_nodata_attr(root: Path) -> Case:
    """Integer data with a ``nodata`` attribute (as odc-stac and GDAL-minded writers mark it), v2."""
    dn, meaning = _dn(truth())
    ds = _series(dn).assign_attrs(_proj_attrs(UTM_GRID))
    ds["variables"].attrs["nodata"] = DN_NODATA
    uri = _to_zarr(ds, root / "xarray-v2-uint16-nodata.zarr", zarr_format=2)
    return Case("xarray-v2-uint16-nodata", uri, BANDS, meaning, UTM_GRID, TIMES)


def _rio(ds: xr.Dataset, grid: GeoGrid) -> xr.Dataset:
    import rioxarray  # noqa: F401 — registers .rio
    from affine import Affine

    return ds.rio.write_crs(grid.crs).rio.write_transform(Affine(*grid.transform)).rio.write_coordinate_system()


def rioxarray_series(root: Path) -> Case:
    """rioxarray's conventions only: a ``spatial_ref`` coordinate (crs_wkt, spatial_ref,
    GeoTransform), ``grid_mapping`` on the variable, NaN nodata; no proj:/spatial: attributes."""
    v = truth()
    ds = _rio(_series(v, name="reflectance"), UTM_GRID)
    ds["reflectance"] = ds["reflectance"].rio.write_nodata(np.nan, encoded=True)
    return Case("rioxarray-series", _to_zarr(ds, root / "rioxarray-series.zarr"), BANDS, v, UTM_GRID, TIMES)


def rioxarray_image(root: Path) -> Case:
    """One (band, y, x) image as rioxarray holds a GeoTIFF: integer band numbers, no time,
    -9999 nodata (encoded), zarr v2."""
    v = truth()[1]
    da = xr.DataArray(np.where(np.isnan(v), np.float32(-9999), v), dims=("band", "y", "x"),
                      coords={"band": [1, 2, 3], **_coords(UTM_GRID)})  # fmt: skip
    da = _rio(da.to_dataset(name="image"), UTM_GRID)["image"].rio.write_nodata(-9999.0, encoded=False)
    uri = _to_zarr(da.to_dataset(), root / "rioxarray-image.zarr", zarr_format=2)
    nat = np.array(["NaT"], dtype="datetime64[s]")
    return Case("rioxarray-image", uri, ("1", "2", "3"), v[None], UTM_GRID, nat)


def latitude_longitude(root: Path) -> Case:
    """EPSG:4326 with ``latitude``/``longitude`` dims (north-up) and the CRS from rioxarray."""
    v = truth()
    ds = _rio(_series(v, LONLAT_GRID, y="latitude", x="longitude"), LONLAT_GRID)
    return Case("latitude-longitude", _to_zarr(ds, root / "latitude-longitude.zarr"), BANDS, v, LONLAT_GRID, TIMES)


def lat_lon_south_up(root: Path) -> Case:
    """``lat``/``lon`` dims with latitude increasing (south-up rows), the CRS as proj:code."""
    v = truth()
    a, b, c, d, e, f = LONLAT_GRID.transform
    south_up = GeoGrid(LONLAT_GRID.crs, (a, b, c, d, -e, f + e * SHAPE[0]), SHAPE)
    ds = _series(v, south_up, y="lat", x="lon").assign_attrs({"proj:code": "EPSG:4326"})
    return Case("lat-lon-south-up", _to_zarr(ds, root / "lat-lon-south-up.zarr"), BANDS, v, south_up, TIMES)


def band_last(root: Path) -> Case:
    """(time, y, x, band), as channels-last arrays are often stored."""
    v = truth()
    ds = _series(v).transpose("time", "y", "x", "band").assign_attrs(_proj_attrs(UTM_GRID))
    return Case("band-last", _to_zarr(ds, root / "band-last.zarr"), BANDS, v, UTM_GRID, TIMES)


def odd_chunks(root: Path) -> Case:
    """Chunks that share no edge with any job's blocks (7×11, one band per chunk)."""
    v = truth()
    ds = _series(v).assign_attrs(_proj_attrs(UTM_GRID))
    enc = {"variables": {"chunks": (2, 1, 7, 11)}}
    return Case("odd-chunks", _to_zarr(ds, root / "odd-chunks.zarr", encoding=enc), BANDS, v, UTM_GRID, TIMES)


def odc_stac(root: Path) -> Case:
    """``odc.stac.load(items, ...).to_zarr()`` on a local static catalog of COGs: one uint16
    variable per band with a ``nodata`` attribute, a ``time`` dim, a ``spatial_ref``
    coordinate. Bands read in alphabetical order of the variable names."""
    import odc.stac
    import pystac

    from rasterkube.mosaic import localstac

    scenes = localstac.synthetic_scenes(root / "odc-stac-catalog", "landsat-c2-l2", n_scenes=3, shape=SHAPE,
                                        step_days=31, seed=3)  # fmt: skip
    items = list(pystac.Catalog.from_file(str(scenes.catalog)).get_all_items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = odc.stac.load(items, bands=["red", "nir08"], crs=scenes.crs, resolution=30)
    bands = ("nir08", "red")
    dn = np.stack([ds[b].values for b in bands], axis=1)
    nodata = [ds[b].attrs["nodata"] for b in bands]
    meaning = np.where(dn == np.array(nodata)[None, :, None, None], np.float32(np.nan), dn.astype(np.float32))
    geobox = ds.odc.geobox
    grid = GeoGrid(scenes.crs, tuple(geobox.affine)[:6], tuple(geobox.shape))  # type: ignore[arg-type]
    times = ds["time"].values.astype("datetime64[s]")
    return Case("odc-stac", _to_zarr(ds, root / "odc-stac.zarr"), bands, meaning, grid, times)


#: Every accepted kind, by name.
ACCEPTED: dict[str, Callable[[Path], Case]] = {
    "xarray-v3-nan": xarray_v3_nan,
    "xarray-v2-nan": xarray_v2_nan,
    "xarray-v3-fill": xarray_v3_fill,
    "xarray-v2-int16-packed": xarray_v2_packed,
    "xarray-v3-int16-packed": xarray_v3_packed,
    "xarray-v3-uint16-fill": xarray_v3_uint16_fill,
    "xarray-v2-uint16-nodata": xarray_v2_uint16_nodata_attr,
    "rioxarray-series": rioxarray_series,
    "rioxarray-image": rioxarray_image,
    "latitude-longitude": latitude_longitude,
    "lat-lon-south-up": lat_lon_south_up,
    "band-last": band_last,
    "odd-chunks": odd_chunks,
    "odc-stac": odc_stac,
}


# ------------------------------------------------------------------------------- refused


def no_crs(root: Path) -> str:
    """x/y coordinates but no CRS anywhere."""
    return _to_zarr(_series(truth()), root / "no-crs.zarr")


def irregular_x(root: Path) -> str:
    ds = _series(truth()).assign_attrs({"proj:code": UTM33})
    x = ds["x"].values.copy()
    x[10:] += 3.0  # a jump: not a regular grid
    return _to_zarr(ds.assign_coords(x=x), root / "irregular-x.zarr")


def extra_dim(root: Path) -> str:
    """An ensemble dim rasterkube has no axis for."""
    v = truth()
    da = xr.DataArray(np.stack([v, v]), dims=("member", "time", "band", "y", "x"),
                      coords={"time": TIMES.astype("datetime64[ns]"), "band": list(BANDS), **_coords(UTM_GRID)})  # fmt: skip
    return _to_zarr(da.to_dataset(name="variables").assign_attrs(_proj_attrs(UTM_GRID)), root / "extra-dim.zarr")


def two_band_arrays(root: Path) -> str:
    """No ``variables`` and two (time, band, y, x) arrays: which one is meant?"""
    v = truth()
    ds = _series(v, name="surface").assign(toa=(("time", "band", "y", "x"), v)).assign_attrs(_proj_attrs(UTM_GRID))
    return _to_zarr(ds, root / "two-band-arrays.zarr")


def time_without_dates(root: Path) -> str:
    ds = _series(truth()).assign_attrs(_proj_attrs(UTM_GRID)).drop_vars("time")
    return _to_zarr(ds, root / "time-without-dates.zarr")


def wrong_spatial_transform(root: Path) -> str:
    """proj:/spatial: attributes set by hand that disagree with the coordinates (a 20 m pixel)."""
    attrs = _proj_attrs(UTM_GRID)
    attrs["spatial:transform"] = [20.0, 0.0, 400_000.0, 0.0, -20.0, 5_600_000.0]
    return _to_zarr(_series(truth()).assign_attrs(attrs), root / "wrong-transform.zarr")


def text_values(root: Path) -> str:
    """Strings where numbers should be."""
    ds = _series(truth()).assign_attrs(_proj_attrs(UTM_GRID))
    ds["variables"] = ds["variables"].astype(str)
    return _to_zarr(ds, root / "text-values.zarr")


#: Stores that say too little: writer → (pattern the message must match, what it must tell).
REFUSED: dict[str, tuple[Callable[[Path], str], str]] = {
    "no-crs": (no_crs, r"declares no CRS.*rio\.write_crs"),
    "irregular-x": (irregular_x, r"x coordinate is not regularly spaced.*reproject"),
    "extra-dim": (extra_dim, r"dims 'member' .* not ones rasterkube reads.*isel"),
    "two-band-arrays": (two_band_arrays, r"several rasters with a band dim \(surface, toa\).*dataVar"),
    "time-without-dates": (time_without_dates, r"'time' dim has no coordinate.*assign_coords"),
    "wrong-transform": (wrong_spatial_transform, r"spatial:transform .* disagrees with its x/y coordinates"),
    "text-values": (text_values, r"'variables' holds .* values; rasterkube reads numbers"),
}


# ------------------------------------------------------------------ Mosaic inputs (COGs)


def rioxarray_cog_catalog(root: Path, scenes: Any) -> Path:
    """The scenes of a ``localstac.SyntheticTruth`` written again the way a user with rioxarray
    and pystac would: each asset a COG from ``rio.to_raster(driver="COG")`` (nodata in the
    GDAL tag), items and catalog made with pystac (projection extension, cloud cover, no
    raster:bands). Returns the catalog path."""
    import datetime as dt

    import pystac
    import rioxarray  # noqa: F401 — registers .rio
    from affine import Affine
    from pystac.extensions.projection import ProjectionExtension
    from rasterio.warp import transform_geom
    from shapely.geometry import box, mapping, shape

    from rasterkube.mosaic import localstac

    source = {i.id: i for i in pystac.Catalog.from_file(str(scenes.catalog)).get_items(recursive=True)}
    h, w = scenes.dn.shape[-2:]
    grid = GeoGrid(scenes.crs, tuple(scenes.transform[:6]), (h, w))  # type: ignore[arg-type]
    footprint = transform_geom(scenes.crs, "EPSG:4326", mapping(box(*grid.bbox)))
    catalog = pystac.Catalog(id="rioxarray-scenes", description="COGs written by rioxarray")
    collection = pystac.Collection(id=scenes.collection, description="rioxarray COGs", license="CC0-1.0",
                                   extent=pystac.Extent(pystac.SpatialExtent([list(shape(footprint).bounds)]),
                                                        pystac.TemporalExtent([[None, None]])))  # fmt: skip
    catalog.add_child(collection)
    mask_key, mask_nodata = ("qa_pixel", localstac.QA_FILL_VALUE) if "qa_pixel" in next(iter(source.values())).assets \
        else ("scl", localstac.SCL_NODATA)  # fmt: skip
    for i, item_id in enumerate(sorted(source)):
        when = scenes.times[i].astype(dt.datetime).replace(tzinfo=dt.UTC)
        item = pystac.Item(id=f"rio-{item_id}", geometry=footprint, bbox=list(shape(footprint).bounds), datetime=when,
                           properties={"eo:cloud_cover": source[item_id].properties["eo:cloud_cover"],
                                       **dict(scenes.properties)})  # fmt: skip
        ProjectionExtension.ext(item, add_if_missing=True).apply(epsg=int(scenes.crs.split(":")[1]),
                                                                  shape=[h, w], transform=list(grid.transform))  # fmt: skip
        arrays = {key: (scenes.dn[i, b], 0) for b, key in enumerate(scenes.bands)}
        arrays[mask_key] = (scenes.mask[i], mask_nodata)
        for key, (values, nodata) in arrays.items():
            path = root / "cogs" / f"{item.id}_{key}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            da = xr.DataArray(values, dims=("y", "x"), coords=_coords(grid))
            da = da.rio.write_crs(scenes.crs).rio.write_transform(Affine(*grid.transform))
            da.rio.write_nodata(nodata, encoded=False).rio.to_raster(path, driver="COG")
            item.add_asset(key, pystac.Asset(href=str(path), media_type=pystac.MediaType.COG, roles=["data"]))
        collection.add_item(item)
    catalog.normalize_hrefs(str(root / "stac"))
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "stac" / "catalog.json"
