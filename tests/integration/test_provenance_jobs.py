"""Provenance of every kind on real Ray: the STAC item beside each output (validated against
the shipped schemas, naming the spec hash, the model's sha256, the sources), the Mosaic
index collection, the order of commits for files, and `rasterkube catalog` over the outputs
(local and S3)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest

from helpers.stores import random_series, write_store
from helpers.torchmodels import ConvNet, export_pt2
from rasterkube import catalog, cli, geozarr, provenance, stacschema, storage
from rasterkube.api import RESOURCE_MODELS
from rasterkube.constants import Kind
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest
from rasterkube.mosaic import localstac

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

META = {"name": "r", "namespace": "team-a", "generation": 4, "uid": "5d1c-uid"}


def request(kind: Kind, output: str, spec: dict[str, Any], source: str | None = None, name: str = "r") -> JobRequest:
    if source is not None:
        spec = {"source": {"uri": source}, **spec}
    resource = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": kind.value, "metadata": {**META, "name": name},
                "spec": spec}  # fmt: skip
    return JobRequest(resource=resource, output_uri=output, source_uri=source)


def spec_hash(req: JobRequest) -> str:
    return str(RESOURCE_MODELS[req.kind].model_validate(req.resource).spec_hash)


def check_common(item: dict[str, Any], req: JobRequest) -> dict[str, Any]:
    """Valid, and naming the resource, its generation, spec hash and run."""
    stacschema.validate(item)
    props = item["properties"]
    assert props["rasterkube:kind"] == req.kind.value and props["rasterkube:name"] == req.resource["metadata"]["name"]
    assert props["rasterkube:namespace"] == "team-a" and props["rasterkube:generation"] == 4
    assert props["rasterkube:uid"] == "5d1c-uid" and props["rasterkube:run_id"] == req.run_id
    assert props["rasterkube:spec_hash"] == spec_hash(req)
    assert props["processing:software"] == {"rasterkube": provenance.software_version()}
    assert props["processing:expression"]["expression"]["source" if req.source_uri else "dataset"]
    return props


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_pt2(ConvNet(2, 2, layers=2, seed=4), tmp_path_factory.mktemp("model") / "net.pt2", 2, None)


def test_raster_and_vector_outputs_carry_their_provenance(tmp_path: Path, model: Path) -> None:
    root = tmp_path / "root"
    src = write_store(str(root / "src.zarr"), random_series(3, 2, 48, 40, seed=5), chunk=16, bands=["a", "b"])

    # ChangeScore, with a pyramid: the item is at the store's root beside the levels.
    cs_req = request(Kind.CHANGE_SCORE, str(root / "cs.zarr"), {"methods": ["difference"], "output": {"multiscales": True}},
                     src, name="cs")  # fmt: skip
    run_job(cs_req)
    cs_item = provenance.read(provenance.store_item_uri(str(root / "cs.zarr")))
    props = check_common(cs_item, cs_req)
    assert props["rasterkube:sources"] == [src] and cs_item["links"] == []  # a plain store: no item to link
    info = geozarr.describe(str(root / "cs.zarr"))
    assert props["proj:transform"] == list(info.grid.transform) and props["proj:shape"] == list(info.grid.shape)
    assert [b["name"] for b in cs_item["assets"]["data"]["bands"]] == list(info.bands)
    assert props["start_datetime"][:10] == "2017-01-01" and props["end_datetime"][:10] == "2019-01-01"
    assert geozarr.level0_group(dict(geozarr.open_group(str(root / "cs.zarr")).attrs)) == "0"

    # Prediction: the model by content.
    pr_req = request(Kind.PREDICTION, str(root / "pred.zarr"),
                     {"model": {"uri": str(model), "features": ["a", "b"], "labels": ["p", "q"]}, "patchSize": 16,
                      "clipSize": 2, "serving": {"shareDeployment": False}}, src, name="pred")  # fmt: skip
    run_job(pr_req)
    pr_item = provenance.read(provenance.store_item_uri(str(root / "pred.zarr")))
    props = check_common(pr_item, pr_req)
    assert props["rasterkube:model_sha256"] == storage.sha256_file(model)
    assert props["rasterkube:model_uri"] == str(model) and storage.sha256_file(model) in props["processing:lineage"]

    # Vectorization of the scores: the item beside the file links the ChangeScore's item.
    out = str(root / "vec" / "v.parquet")
    band = geozarr.describe(str(root / "cs.zarr")).bands[0]
    vec_req = request(Kind.VECTORIZATION, out, {"features": [band], "threshold": 0.5, "output": {"pmtiles": True}},
                      str(root / "cs.zarr"), name="vec")  # fmt: skip
    result = run_job(vec_req)
    vec_item = provenance.read(out + ".stac-item.json")
    props = check_common(vec_item, vec_req)
    assert vec_item["links"] == [{"rel": "derived_from", "href": str(root / "cs.zarr" / "stac-item.json"),
                                  "type": "application/geo+json"}]  # fmt: skip
    assert props["rasterkube:feature_count"] == result.summary["feature_count"] > 0
    assert set(vec_item["assets"]) == {"data", "pmtiles"}
    parsed = pystac.Item.from_file(out + ".stac-item.json")
    assert parsed.assets["data"].get_absolute_href() == out
    assert parsed.assets["pmtiles"].get_absolute_href() == result.summary["pmtiles"]["uri"]
    assert vec_item["bbox"] == cs_item["bbox"]  # the area analysed

    # The catalog of the root links all three items and validates, items included.
    assert cli.main(["catalog", str(root)]) == 0
    cat_uri = str(root / "catalog.json")
    cat = pystac.Catalog.from_file(cat_uri)
    assert sorted(i.id for i in cat.get_items()) == ["changescore-team-a-cs", "prediction-team-a-pred",
                                                     "vectorization-team-a-vec"]  # fmt: skip
    validate_tree(cat_uri)


def validate_tree(catalog_uri: str) -> None:
    """pystac's walk of a catalog, its children and items, against the shipped schemas."""
    previous = pystac.validation.RegisteredValidator._validator
    pystac.validation.set_validator(stacschema.validator())
    try:
        pystac.validation.validate_all_dict(provenance.read(catalog_uri), catalog_uri)
    finally:
        pystac.validation.RegisteredValidator._validator = previous


def test_mosaic_items_name_their_scenes_and_the_index_has_a_collection(tmp_path: Path) -> None:
    import geopandas
    from shapely.geometry import box

    origin = (500_000.0, 5_800_000.0)
    s2 = localstac.synthetic_scenes(tmp_path / "s2", n_scenes=4, shape=(64, 64), origin=origin, start="2021-01-05",
                                    step_days=30, seed=2)  # fmt: skip
    scenes = {i.id: i.get_self_href() for i in pystac.Catalog.from_file(str(s2.catalog)).get_items(recursive=True)}
    x0, y1 = origin
    frame = geopandas.GeoDataFrame({"id": ["west", "east"]}, crs="EPSG:32633",
                                   geometry=[box(x0 + 50, y1 - 300, x0 + 250, y1 - 100),
                                             box(x0 + 350, y1 - 600, x0 + 600, y1 - 400)])  # fmt: skip
    frame.to_file(tmp_path / "aoi.geojson", driver="GeoJSON")
    out = str(tmp_path / "root" / "index")
    spec = {"dataset": "sentinel-2-l2a", "stac": {"catalog": str(s2.catalog)}, "aoi": {"uri": str(tmp_path / "aoi.geojson")},
            "time": {"start": "2021-01-01", "end": "2021-05-01", "window": "P2M"}, "maxCloudCover": 100, "chunkSize": 64}  # fmt: skip
    req = request(Kind.MOSAIC, out, spec)
    run_job(req)

    coll_uri = os.path.join(out, "collection.json")
    coll = provenance.read(coll_uri)
    stacschema.validate(coll)
    assert coll["id"] == "mosaic-team-a-r" and coll["rasterkube:spec_hash"] == spec_hash(req)
    assert coll["assets"]["index"]["href"] == "./index.parquet" and os.path.exists(os.path.join(out, "index.parquet"))
    hrefs = [link["href"] for link in coll["links"] if link["rel"] == "item"]
    assert hrefs == ["./west.zarr/stac-item.json", "./east.zarr/stac-item.json"]
    for key, href in zip(("west", "east"), hrefs, strict=True):
        item = provenance.read(os.path.join(out, href))
        props = check_common(item, req)
        assert item["id"] == f"mosaic-team-a-r-{key}" and item["collection"] == coll["id"]
        assert props["rasterkube:row"] == key and props["rasterkube:sources"] == [str(s2.catalog)]
        assert set(props["rasterkube:source_items"]) <= set(scenes) and props["rasterkube:source_items"]
        derived = [link["href"] for link in item["links"] if link["rel"] == "derived_from"]
        assert derived == [scenes[i] for i in props["rasterkube:source_items"]]
        # two P2M windows from 2021-01-01: the second ends (inclusive) the second before May
        assert props["start_datetime"] == "2021-01-01T00:00:00Z" and props["end_datetime"] == "2021-04-30T23:59:59Z"
        grid = geozarr.describe(os.path.join(out, f"{key}.zarr")).grid
        assert props["proj:transform"] == list(grid.transform)

    # The catalog links the collection (which links its items), not the row items again.
    report = catalog.build(str(tmp_path / "root"))
    assert (report.items, report.collections, report.invalid, report.without_provenance) == (0, 1, [], [])
    cat = pystac.Catalog.from_file(report.catalog)
    assert [c.id for c in cat.get_children()] == ["mosaic-team-a-r"]
    assert sorted(i.id for i in cat.get_items(recursive=True)) == ["mosaic-team-a-r-east", "mosaic-team-a-r-west"]
    validate_tree(report.catalog)


def test_a_failed_rerun_leaves_no_item_describing_another_runs_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The old item is removed before new files are committed, the new one after them: a run
    that fails in between leaves a file without an item, never an item that claims a missing
    file or describes another run's file."""
    import geopandas as gpd

    src = write_store(str(tmp_path / "src.zarr"), random_series(1, 1, 24, 24, seed=1), chunk=8, bands=["a"])
    out = str(tmp_path / "v.parquet")
    first = request(Kind.VECTORIZATION, out, {"features": ["a"], "threshold": 0.0}, src)
    run_job(first)
    assert provenance.read(out + ".stac-item.json")["properties"]["rasterkube:run_id"] == first.run_id
    n_first = len(gpd.read_parquet(out))

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("connection reset")

    # The new GeoParquet is committed, then writing its item fails.
    monkeypatch.setattr(provenance, "commit_json", fail)
    with pytest.raises(OSError, match="connection reset"):
        run_job(request(Kind.VECTORIZATION, out, {"features": ["a"], "threshold": 1e9}, src))
    assert len(gpd.read_parquet(out)) == 0 < n_first and not os.path.exists(out + ".stac-item.json")
    monkeypatch.undo()
    second = request(Kind.VECTORIZATION, out, {"features": ["a"], "threshold": 1e9}, src)
    run_job(second)
    item = provenance.read(out + ".stac-item.json")
    assert item["properties"]["rasterkube:run_id"] == second.run_id
    assert item["properties"]["rasterkube:spec_hash"] == spec_hash(second) != spec_hash(first)
    assert item["properties"]["rasterkube:feature_count"] == 0


def test_provenance_and_catalog_on_s3(s3: str) -> None:
    root = "s3://rasterkube/prov"
    src = write_store(f"{root}/src.zarr", random_series(3, 1, 24, 24, seed=7), chunk=8, bands=["a"])
    cs_req = request(Kind.CHANGE_SCORE, f"{root}/team-a/cs.zarr", {"methods": ["difference"]}, src, name="cs")
    run_job(cs_req)
    vec_req = request(Kind.VECTORIZATION, f"{root}/team-a/v.parquet",
                      {"features": [geozarr.describe(f"{root}/team-a/cs.zarr").bands[0]], "threshold": 0.2},
                      f"{root}/team-a/cs.zarr", name="vec")  # fmt: skip
    run_job(vec_req)
    check_common(provenance.read(f"{root}/team-a/cs.zarr/stac-item.json"), cs_req)
    vec_item = provenance.read(f"{root}/team-a/v.parquet.stac-item.json")
    check_common(vec_item, vec_req)
    assert vec_item["links"][0]["href"] == f"{root}/team-a/cs.zarr/stac-item.json"

    report = catalog.build(root)
    assert report.catalog == f"{root}/catalog.json" and report.items == 2 and not report.invalid
    assert report.without_provenance == [f"{root}/src.zarr"]
    doc = provenance.read(report.catalog)
    stacschema.validate(doc)
    assert sorted(link["href"] for link in doc["links"] if link["rel"] == "item") == [
        "./team-a/cs.zarr/stac-item.json", "./team-a/v.parquet.stac-item.json"]  # fmt: skip
    fs, _ = storage.filesystem(root)
    assert not [k for k in fs.find("rasterkube/prov") if ".tmp-" in k]
