"""The Vectorization job on real Ray: GeoParquet 1.1 out, seamless blocks, errors, real data."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from scipy import ndimage

from helpers.stores import UTM33, grid, write_store
from rasterkube import geozarr, provenance
from rasterkube.errors import UserError
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest
from rasterkube.runtime.progress import CallbackReporter
from rasterkube.vectorize import polygons as P
from rasterkube.vectorize import service

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def request(source: str, out_uri: str, kind: str = "Vectorization", **spec) -> JobRequest:
    resource = {
        "apiVersion": "rasterkube.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "v"},
        "spec": {"source": {"uri": source}, **spec},
    }
    return JobRequest(resource=resource, output_uri=out_uri, source_uri=source)


def blob_series(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(t, 2, h, w): band 0 smooth blobs, band 1 the negated field."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(t, h, w)), (0, 2.5, 2.5))
    field = ((field - field.mean()) / field.std()).astype(np.float32)
    field[:, :3, :3] = np.nan
    return np.stack([field, -field], axis=1)


@pytest.fixture()
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "BLOCK_SIDE", 16)  # many blocks on a small store


def test_job_writes_geoparquet_equal_to_whole_raster(tmp_path: Path, small_blocks: None) -> None:
    data = blob_series(2, 53, 45, seed=1)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=8, bands=["p:water", "p:land"])
    out = str(tmp_path / "features.parquet")
    seen: list[int] = []
    result = run_job(request(src, out, features=["p:water", "p:land"], threshold=0.4, connectivity=8),
                     CallbackReporter(lambda pct, msg: seen.append(pct)), max_in_flight=2)  # fmt: skip
    assert result.summary["blocks"] == 4 * 3
    gdf = gpd.read_parquet(out)
    assert gdf.crs.to_epsg() == 4326
    assert list(gdf.columns) == ["label", "time", "score_mean", "score_min", "score_max", "score_std",
                                 "pixel_count", "area_m2", "geometry"]  # fmt: skip
    assert result.summary["feature_count"] == len(gdf) > 20
    assert result.summary["label_counts"] == gdf["label"].value_counts().to_dict()
    assert result.summary["crs"] == "EPSG:4326"
    assert seen[-1] == 100 and seen == sorted(seen)
    g = grid(53, 45)
    for t, year in enumerate((2017, 2018)):
        for b, label in enumerate(["p:water", "p:land"]):
            rows = gdf[(gdf["label"] == label) & (gdf["time"] == np.datetime64(f"{year}-01-01"))]
            want = P.polygonize(data[t, b], 0.4, 8, g.transform)  # one block: whole raster
            assert len(rows) == len(want)
            native = gpd.GeoSeries(rows.geometry.values, crs="EPSG:4326").to_crs(UTM33)
            assert rows["pixel_count"].sum() == want.moments.count.sum()
            np.testing.assert_allclose(np.sort(rows["score_mean"]), np.sort(want.moments.mean), rtol=1e-12)
            np.testing.assert_allclose(native.area.sum(), want.moments.count.sum() * 100.0, rtol=1e-6)
    # EPSG:4326 round trip: back in UTM the features lie on the grid, touching its edges
    back = gdf.to_crs(UTM33).total_bounds
    np.testing.assert_allclose(back, g.bbox, atol=1e-3)


def test_geoparquet_1_1_bbox_covering_and_hilbert_order(tmp_path: Path) -> None:
    src = write_store(str(tmp_path / "src.zarr"), blob_series(1, 40, 40, seed=2), chunk=8, bands=["a", "b"])
    out = str(tmp_path / "f.parquet")
    run_job(request(src, out, features=["a"], threshold=0.5))
    meta = json.loads(pq.read_schema(out).metadata[b"geo"])
    assert meta["version"] == "1.1.0"
    geom = meta["columns"]["geometry"]
    assert geom["covering"] == {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
    assert "bbox" in pq.read_schema(out).names
    gdf = gpd.read_parquet(out)
    h = gdf.geometry.hilbert_distance().to_numpy()
    assert len(gdf) > 5 and (np.diff(h) >= 0).all()


def test_empty_result_is_a_valid_geoparquet(tmp_path: Path) -> None:
    src = write_store(str(tmp_path / "src.zarr"), blob_series(2, 20, 20), chunk=8, bands=["a", "b"])
    out = str(tmp_path / "empty.parquet")
    result = run_job(request(src, out, features=["a"], threshold=1e9))
    assert result.summary["feature_count"] == 0 and result.summary["label_counts"] == {"a": 0}
    assert result.summary["bounds"] is None
    gdf = gpd.read_parquet(out)
    assert len(gdf) == 0 and gdf.crs.to_epsg() == 4326 and "score_mean" in gdf.columns
    assert json.loads(pq.read_schema(out).metadata[b"geo"])["version"] == "1.1.0"


def test_native_crs_min_area_and_no_stats(tmp_path: Path) -> None:
    data = blob_series(1, 30, 30, seed=3)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=8, bands=["a", "b"])
    out = str(tmp_path / "f.parquet")
    run_job(request(src, out, features=["a"], threshold=0.3, minArea=2000, stats=False, output={"crs": UTM33}))
    gdf = gpd.read_parquet(out)
    assert gdf.crs.to_string() == UTM33
    assert list(gdf.columns) == ["label", "time", "score_mean", "geometry"]
    assert len(gdf) > 0 and (gdf.area >= 2000).all()
    every = P.polygonize(data[0, 0], 0.3, 4, grid(30, 30).transform)
    assert len(gdf) == (every.moments.count * 100.0 >= 2000).sum() < len(every)


@pytest.mark.parametrize("simplify", [0.0, 15.0])
def test_merges_started_while_blocks_run_give_the_same_file(tmp_path: Path, small_blocks: None,
                                                           monkeypatch: pytest.MonkeyPatch, simplify: float) -> None:  # fmt: skip
    """Merge tasks started as soon as groups are complete (every ready group at once) write
    the same rows in the same order as merging everything after the last block, and both
    equal the whole raster — with minArea dropping some merged components."""
    data = blob_series(1, 120, 110, seed=7)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=8, bands=["a", "b"])
    spec = {"features": ["a"], "threshold": 0.8, "minArea": 500, "simplifyTolerance": simplify,
            "output": {"crs": UTM33}}  # fmt: skip
    submitted: list[int] = []

    class CountingTaskGroup(service.TaskGroup):
        def submit(self, item: P.Groups) -> None:
            submitted.append(item.n_groups)
            super().submit(item)

    monkeypatch.setattr(service, "TaskGroup", CountingTaskGroup)
    tables, tasks = [], []
    for vertices, name in ((10**12, "late"), (1, "early")):
        monkeypatch.setattr(service, "MERGE_TASK_VERTICES", vertices)
        out = str(tmp_path / f"{name}.parquet")
        submitted.clear()
        run_job(request(src, out, **spec), max_in_flight=2)
        tables.append(pq.read_table(out))
        tasks.append(len(submitted))
    assert tasks[0] <= 2 < 4 <= tasks[1]  # late: one run split over the workers; early: a task per ready batch
    assert tables[0].equals(tables[1])
    every = P.polygonize(data[0, 0], 0.8, 4, grid(120, 110).transform)
    big = every.moments.count * 100.0 >= 500
    assert big.sum() > 10 and tables[0].num_rows > 10
    if not simplify:  # (simplified shapes have other areas, so minArea may keep others)
        assert tables[0].num_rows == big.sum() < len(every)
        got = shapely.normalize(shapely.from_wkb(tables[1].column("geometry").to_numpy(zero_copy_only=False)))
        kept = every.geometry[big]
        assert sorted(shapely.to_wkb(got)) == sorted(shapely.to_wkb(kept))


def test_rerun_replaces_output_atomically(tmp_path: Path) -> None:
    src = write_store(str(tmp_path / "src.zarr"), blob_series(1, 20, 20), chunk=8, bands=["a", "b"])
    out = tmp_path / "out" / "f.parquet"
    run_job(request(src, str(out), features=["a"], threshold=0.0))
    first = len(gpd.read_parquet(out))
    run_job(request(src, str(out), features=["a"], threshold=1e9))
    assert first > 0 and len(gpd.read_parquet(out)) == 0
    # no temporary left behind; the item beside the file is the second run's
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.parquet", "f.parquet.stac-item.json"]
    assert provenance.read(str(out) + ".stac-item.json")["properties"]["rasterkube:feature_count"] == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"features": ["nope"]}, "spec.features: 'nope' not in"),
        ({"features": ["a"], "output": {"crs": "EPSG:99999999"}}, "spec.output.crs: 'EPSG:99999999' is not a CRS"),
    ],
)
def test_bad_requests_write_nothing(tmp_path: Path, spec: dict, message: str) -> None:
    src = write_store(str(tmp_path / "src.zarr"), blob_series(1, 16, 16), chunk=8, bands=["a", "b"])
    with pytest.raises(UserError) as err:
        run_job(request(src, str(tmp_path / "f.parquet"), **spec))
    assert message in str(err.value)
    if "features" in message:
        assert "its bands are a, b" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.zarr"]


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"spec.source.uri: .*missing.zarr does not exist"):
        run_job(request(str(tmp_path / "missing.zarr"), str(tmp_path / "f.parquet"), features=["a"]))
    assert not (tmp_path / "f.parquet").exists()


def test_real_landsat_change_polygons(tmp_path: Path, landsat_store: str) -> None:
    """ChangeScore robust z-scores of the real Landsat sample, thresholded at z > 3."""
    scores = str(tmp_path / "change.zarr")
    run_job(request(landsat_store, scores, kind="ChangeScore", methods=["looMedoid"], distance="euclidean",
                    robustTimeZScore=True))  # fmt: skip
    band = "loo_medoid_euclidean_distance_robust_time_zscore"
    out = str(tmp_path / "change.parquet")
    result = run_job(request(scores, out, features=[band], threshold=3.0, connectivity=8))
    gdf = gpd.read_parquet(out)
    z = geozarr.open_dataset(scores)["variables"].sel(band=band)
    years = [str(t)[:4] for t in z.time.values]
    assert result.summary["label_counts"] == {band: len(gdf)} and len(gdf) > 10
    assert (gdf["score_min"] > 3).all() and (gdf["score_max"] >= gdf["score_mean"]).all()
    # every changed pixel is in exactly one polygon, per year
    per_year = gdf.groupby(gdf["time"].dt.year)["pixel_count"].sum()
    for year, changed in zip(years, (z.values > 3).sum(axis=(1, 2)), strict=True):
        assert per_year.get(int(year), 0) == changed
    assert per_year[2013] > per_year[2009]  # the scene's change signal (see the ChangeScore test)
    info = geozarr.describe(scores)
    x0, y0, x1, y1 = gdf.to_crs(info.grid.crs).total_bounds
    gx0, gy0, gx1, gy1 = info.grid.bbox
    assert gx0 - 1e-3 <= x0 < x1 <= gx1 + 1e-3 and gy0 - 1e-3 <= y0 < y1 <= gy1 + 1e-3
    assert shapely.is_valid(gdf.geometry.values).all()


def test_source_and_output_on_s3(s3: str, small_blocks: None) -> None:
    from rasterkube import storage

    data = blob_series(1, 24, 24, seed=4)
    src = write_store("s3://rasterkube/vec/src.zarr", data, chunk=8, bands=["a", "b"])
    out = "s3://rasterkube/vec/features.parquet"
    result = run_job(request(src, out, features=["a"], threshold=0.3))
    fs, path = storage.filesystem(out)
    with fs.open(path, "rb") as fh:
        gdf = gpd.read_parquet(fh)
    assert len(gdf) == result.summary["feature_count"] == len(P.polygonize(data[0, 0], 0.3, 4, grid(24, 24).transform))
    assert not [k for k in fs.ls("rasterkube/vec") if ".tmp-" in k]


def test_centerlines_column(tmp_path: Path, small_blocks: None) -> None:
    data = blob_series(1, 40, 36, seed=5)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=8, bands=["a", "b"])
    out = str(tmp_path / "f.parquet")
    run_job(request(src, out, features=["a"], threshold=0.3, medialSkeletonize=True, connectivity=8))
    gdf = gpd.read_parquet(out)
    meta = json.loads(pq.read_schema(out).metadata[b"geo"])
    assert meta["primary_column"] == "geometry" and "centerline" in meta["columns"]
    assert gdf["centerline"].crs.to_epsg() == 4326
    lines = gdf["centerline"].dropna()
    assert len(lines) > 5 and set(lines.geom_type) <= {"LineString", "MultiLineString"}
    # the same lines as one block over the whole raster, reprojected the same way
    want = P.finish(P.polygonize(data[0, 0], 0.3, 8, grid(40, 36).transform, centerlines=True),
                    P.Finish(UTM33, "EPSG:4326"))  # fmt: skip
    by_polygon = dict(zip(shapely.to_wkb(want.geometry), want.centerline, strict=True))
    for poly, line in zip(gdf.geometry.values, gdf["centerline"].values, strict=True):
        expected = by_polygon[shapely.to_wkb(poly)]
        assert (line is None and expected is None) or shapely.equals_exact(line, expected, 0)


def test_pmtiles_archive_next_to_the_geoparquet(tmp_path: Path) -> None:
    import gzip

    mapbox_vector_tile = pytest.importorskip("mapbox_vector_tile", reason="the rasterkube[pmtiles] extra")
    from pmtiles.reader import MmapSource, Reader
    from pmtiles.tile import TileType

    data = blob_series(1, 48, 48, seed=6)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=16, bands=["a", "b"])
    out = tmp_path / "f.parquet"
    result = run_job(request(src, str(out), features=["a"], threshold=0.3, output={"pmtiles": True}))
    archive = tmp_path / "f.pmtiles"
    assert result.summary["pmtiles"]["uri"] == str(archive) and result.summary["pmtiles"]["tiles"] > 0
    gdf = gpd.read_parquet(out)
    with archive.open("rb") as fh:
        reader = Reader(MmapSource(fh))
        header = reader.header()
        assert header["tile_type"] == TileType.MVT and header["max_zoom"] == 14  # 10 m pixels
        lon0, lat0, lon1, lat1 = gdf.total_bounds
        assert header["min_lon_e7"] / 1e7 == pytest.approx(lon0, abs=1e-6)
        assert header["max_lat_e7"] / 1e7 == pytest.approx(lat1, abs=1e-6)
        layer = reader.metadata()["vector_layers"][0]
        assert layer["id"] == "features" and layer["fields"]["score_mean"] == "Number"
        # at the lowest zoom one tile holds every feature, with its attributes
        z = header["min_zoom"]
        n = 2**z
        x = int((lon0 + lon1) / 2 / 360 * n + n / 2)
        lat = np.radians((lat0 + lat1) / 2)
        y = int((1 - np.log(np.tan(lat) + 1 / np.cos(lat)) / np.pi) / 2 * n)
        tile = mapbox_vector_tile.decode(gzip.decompress(reader.get(z, x, y)))
        features = tile["features"]["features"]
        assert len(features) == len(gdf)
        assert sorted(f["properties"]["pixel_count"] for f in features) == sorted(gdf["pixel_count"])
        assert {f["properties"]["label"] for f in features} == {"a"}


def test_pmtiles_of_an_empty_result(tmp_path: Path) -> None:
    pytest.importorskip("mapbox_vector_tile", reason="the rasterkube[pmtiles] extra")
    from pmtiles.reader import MmapSource, Reader

    src = write_store(str(tmp_path / "src.zarr"), blob_series(1, 16, 16), chunk=8, bands=["a", "b"])
    result = run_job(request(src, str(tmp_path / "f.parquet"), features=["a"], threshold=1e9, output={"pmtiles": True}))
    assert result.summary["feature_count"] == 0 and result.summary["pmtiles"]["tiles"] == 0
    with (tmp_path / "f.pmtiles").open("rb") as fh:
        assert Reader(MmapSource(fh)).header()["max_zoom"] == 0


def test_pmtiles_without_the_extra_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "pmtiles_available", lambda: False)
    src = write_store(str(tmp_path / "src.zarr"), blob_series(1, 16, 16), chunk=8, bands=["a", "b"])
    with pytest.raises(UserError, match=r"spec.output.pmtiles: needs the optional packages .*rasterkube\[pmtiles\]"):
        run_job(request(src, str(tmp_path / "f.parquet"), features=["a"], output={"pmtiles": True}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.zarr"]


def test_integer_store_fill_value_is_nodata(tmp_path: Path, small_blocks: None) -> None:
    """uint8 scores with 255 as fill value, part of the store never written (reads as fill):
    none of it is foreground, and the statistics never see it."""
    from rasterkube import storage
    from rasterkube.grid import Window

    rng = np.random.default_rng(11)
    h, w = 48, 40
    field = ndimage.gaussian_filter(rng.normal(size=(h, w)), 2.5)
    scores = np.clip((field - field.min()) / np.ptp(field) * 254, 0, 254).astype(np.uint8)
    scores[rng.random((h, w)) < 0.02] = 255  # scattered nodata in the written part
    uri = str(tmp_path / "src.zarr")
    tmp = storage.temporary_uri(uri)
    geozarr.create(tmp, grid(h, w), np.array(["2020-01-01"], dtype="datetime64[s]"), ["p"], dtype="uint8",
                   chunk_size=8, fill_value=255)  # fmt: skip
    geozarr.write_region(tmp, "variables", Window(0, 32, 0, w), scores[None, None, :32])  # rows 32+ stay unwritten
    geozarr.finalize(tmp)
    storage.commit(tmp, uri)
    assert geozarr.describe(uri).nodata == 255.0  # rasterkube's own integer store: its fill value
    out = str(tmp_path / "f.parquet")
    result = run_job(request(uri, out, features=["p"], threshold=170, output={"crs": UTM33}))
    gdf = gpd.read_parquet(out)
    expected = np.where(np.arange(h)[:, None] < 32, scores, 255).astype(np.uint8)
    want = P.polygonize(expected, 170, 4, grid(h, w).transform, nodata=255)
    assert result.summary["feature_count"] == len(gdf) == len(want) > 3
    assert gdf["score_max"].max() < 255 and gdf["pixel_count"].sum() == ((expected > 170) & (expected != 255)).sum()
    assert gdf.total_bounds[1] > grid(h, w).bbox[1] + 16 * 10 - 1e-6  # nothing in the unwritten rows


@pytest.mark.parametrize(
    ("dtype", "threshold", "message"),
    [("uint8", 255, r"spec.threshold: 255 is not below the largest uint8 value \(255\)"),
     ("int16", 1e6, "spec.threshold: 1e\\+06 is not below the largest int16 value"),
     ("float32", float("inf"), "spec.threshold: inf is not below the largest float32 value"),
     ("float32", float("nan"), "spec.threshold: must be a number, not NaN")],
)  # fmt: skip
def test_threshold_no_value_can_exceed_is_an_error(tmp_path: Path, dtype: str, threshold: float, message: str) -> None:
    src = write_store(str(tmp_path / "src.zarr"), np.ones((1, 1, 16, 16), dtype=dtype), chunk=8, bands=["a"])
    with pytest.raises(UserError, match=message):
        run_job(request(src, str(tmp_path / "f.parquet"), features=["a"], threshold=threshold))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.zarr"]


def test_threshold_above_the_data_is_an_honest_empty_result(tmp_path: Path) -> None:
    data = blob_series(1, 20, 20)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=8, bands=["a", "b"])
    result = run_job(request(src, str(tmp_path / "f.parquet"), features=["a", "b"], threshold=50.0))
    assert result.summary["feature_count"] == 0
    top = np.nanmax(data[0, 0])
    assert result.summary["note"].startswith("0 features; 'a': no pixel above the threshold 50 (largest value")
    assert f"{top:g}" in result.summary["note"]
    result = run_job(request(src, str(tmp_path / "g.parquet"), features=["a"], threshold=0.0, minArea=1e9))
    assert result.summary["feature_count"] == 0 and "smaller than minArea" in result.summary["note"]


def test_simplified_polygons_do_not_overlap(tmp_path: Path, small_blocks: None) -> None:
    rng = np.random.default_rng(12)
    field = ndimage.gaussian_filter(rng.normal(size=(1, 1, 96, 96)), (0, 0, 2.5, 2.5)) + rng.normal(
        scale=0.15, size=(1, 1, 96, 96))  # fmt: skip
    src = write_store(str(tmp_path / "src.zarr"), (field / field.std()).astype(np.float32), chunk=8, bands=["a"])
    out = str(tmp_path / "f.parquet")
    run_job(request(src, out, features=["a"], threshold=0.3, simplifyTolerance=20.0, output={"crs": UTM33}))
    geoms = gpd.read_parquet(out).geometry.values
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    keep = a < b
    assert keep.sum() > 10  # diagonal neighbours still touch…
    assert (shapely.area(shapely.intersection(geoms[a[keep]], geoms[b[keep]])) < 1e-6).all()  # …and never overlap
    assert shapely.is_valid(geoms).all()
