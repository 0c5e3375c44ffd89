"""The client's logic without a cluster: arguments → manifests (dry run), and cluster mode
against an in-memory CustomObjectsApi whose status a scripted 'operator' advances."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
import rasterkube
from kubernetes.client.exceptions import ApiException
from rasterkube.client.results import Result
from rasterkube.errors import ResourceFailed, UserError, WaitTimeout

BBOX = [-106.924, 40.281, -106.904, 40.296]


def dry() -> rasterkube.Client:
    return rasterkube.Client(dry_run=True)


def test_aoi_forms_and_conversions() -> None:
    from shapely.geometry import box, mapping

    client = dry()
    m = client.build_mosaics("m", "sentinel-2-l2a", box(*BBOX), dt.date(2021, 1, 1), dt.datetime(2022, 1, 1),
                             window="P3M", crs=32613, stac="https://earth-search.aws.element84.com/v1")  # fmt: skip
    spec = m.manifest["spec"]
    assert spec["aoi"]["geometry"]["type"] == "Polygon"
    assert spec["time"] == {"start": "2021-01-01", "end": "2022-01-01", "window": "P3M"}
    assert spec["crs"] == "EPSG:32613" and spec["stac"] == {"api": "https://earth-search.aws.element84.com/v1"}
    feature = {"type": "Feature", "properties": {}, "geometry": mapping(box(*BBOX))}
    from_feature = client.build_mosaics("m", "landsat-c2-l2", feature, "2020-01-01", "2021-01-01")
    assert from_feature.manifest["spec"]["aoi"]["geometry"]["type"] == "Polygon"
    assert client.build_mosaics("m", "landsat-c2-l2", "s3://b/aoi.parquet", "2020-01-01", "2021-01-01",
                                stac="s3://b/stac/catalog.json").manifest["spec"]["aoi"] == {"uri": "s3://b/aoi.parquet"}  # fmt: skip
    assert m.manifest["metadata"] == {"name": "m", "namespace": "default"}


def test_sources_and_snake_case_values() -> None:
    client = dry()
    mosaic = Result("Mosaic", "m", "default", {"phase": "Succeeded", "outputs": {"uri": "s3://b/m", "summary": {"dataset": "landsat-c2-l2"}}})
    p = client.predict_mosaic("p", mosaic, "hf://org/repo/model.pt2", "change_detection", ["a", "b"], ["change"],
                              merge_mode="weighted_average", gpus_per_replica=0.5)  # fmt: skip
    assert p.manifest["spec"]["source"] == {"mosaicRef": {"name": "m"}}
    assert p.manifest["spec"]["model"]["actor"] == "changeDetection"
    assert p.manifest["spec"]["mergeMode"] == "weightedAverage" and p.manifest["spec"]["serving"]["gpusPerReplica"] == 0.5
    assert p.manifest["spec"]["resources"]["gpus"] == 1, "GPU replicas get GPU workers"
    assert "precision" not in p.manifest["spec"] and "compile" not in p.manifest["spec"], "the spec's defaults"
    fast = client.predict_mosaic("p", mosaic, "m.pt2", "regression", "a", "b", precision="bf16", compile=True)
    assert fast.manifest["spec"]["precision"] == "bf16" and fast.manifest["spec"]["compile"] is True
    with pytest.raises(UserError, match=r"precision.*fp16 runs on CUDA GPUs only"):
        client.predict_mosaic("p", mosaic, "m.pt2", "regression", "a", "b", precision="fp16", device="cpu")
    other_ns = Result("Mosaic", "m", "elsewhere", {"outputs": {"uri": "s3://b/m", "summary": {"bands": []}}})
    assert client.predict_mosaic("p", other_ns, "m.pt2", "regression", "a", "b").manifest["spec"]["source"] == {"uri": "s3://b/m"}
    c = client.run_mosaics_change("c", ("Prediction", "emb"), methods="cluster_transition", distance="alpha_earth_cosine",
                                  clustering=4, selector={"x": [0, 10], "y": [0, 10]})  # fmt: skip
    assert c.manifest["spec"]["source"] == {"predictionRef": {"name": "emb"}}
    assert c.manifest["spec"]["methods"] == ["clusterTransition"] and c.manifest["spec"]["distance"] == "alphaEarthCosine"
    assert c.manifest["spec"]["clustering"] == {"k": 4}
    with pytest.raises(UserError, match=r"^vectorize_mosaic\(\): Vectorization/v: source: this reads a Prediction"):
        client.vectorize_mosaic("v", Result("Vectorization", "x", "default"), "f", 0.5)
    v = client.vectorize_mosaic("v", "s3://b/scores.zarr", ["f"], 0.5, min_area=100, crs="EPSG:3857")
    assert v.manifest["spec"]["output"] == {"crs": "EPSG:3857"} and v.manifest["spec"]["minArea"] == 100


# ------------------------------------------------------------------ cluster mode, fake API


class FakeApi:
    """CustomObjectsApi in memory; ``operator(obj, n)`` sets the status on the n-th get."""

    def __init__(self, operator: Callable[[dict[str, Any], int], None] | None = None) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.operator = operator or (lambda obj, n: None)
        self.gets = 0
        self.version = 0

    def _bump(self, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):  # type: ignore[no-untyped-def]
        if (plural, body["metadata"]["name"]) in self.objects:
            raise ApiException(status=409, reason="Conflict")
        obj = copy.deepcopy(body)
        obj["metadata"]["generation"] = 1
        self._bump(obj)
        self.objects[(plural, obj["metadata"]["name"])] = obj
        return copy.deepcopy(obj)

    def replace_namespaced_custom_object(self, group, version, namespace, plural, name, body, **kw):  # type: ignore[no-untyped-def]
        old = self.objects[(plural, name)]
        assert body["metadata"]["resourceVersion"] == old["metadata"]["resourceVersion"]
        obj = copy.deepcopy(body)
        obj["metadata"]["generation"] = old["metadata"]["generation"] + (body["spec"] != old["spec"])
        obj["status"] = old.get("status")
        self._bump(obj)
        self.objects[(plural, name)] = obj
        return copy.deepcopy(obj)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):  # type: ignore[no-untyped-def]
        if (plural, name) not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        obj = self.objects[(plural, name)]
        self.gets += 1
        self.operator(obj, self.gets)
        return copy.deepcopy(obj)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):  # type: ignore[no-untyped-def]
        if self.objects.pop((plural, name), None) is None:
            raise ApiException(status=404, reason="Not Found")


def status(obj: dict[str, Any], phase: str, percent: int = 0, message: str = "", **extra: Any) -> None:
    stalled = "True" if phase == "Failed" else "False"
    obj["status"] = {"observedGeneration": obj["metadata"]["generation"], "phase": phase,
                     "progress": {"percent": percent, "message": message},
                     "conditions": [{"type": "Stalled", "status": stalled, "message": message}], **extra}  # fmt: skip


def cluster(api: FakeApi) -> rasterkube.Client:
    return rasterkube.Client(api=api, progress=False, poll_interval=0.0)


def test_create_wait_and_replace() -> None:
    def operator(obj: dict[str, Any], n: int) -> None:
        if (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"] and n % 3:
            return
        if n % 3 == 1:
            status(obj, "Running", 40, "scoring blocks: 2/5")
        else:
            status(obj, "Succeeded", 100, "done", outputs={"uri": f"s3://b/cs/g{obj['metadata']['generation']}",
                                                           "summary": {"bands": ["x"]}})  # fmt: skip

    api = FakeApi(operator)
    client = cluster(api)
    first = client.run_mosaics_change("c", "s3://b/m.zarr")
    assert first.succeeded and first.uri == "s3://b/cs/g1" and first.summary == {"bands": ["x"]}
    again = client.run_mosaics_change("c", "s3://b/m.zarr", methods=["difference"])  # a new spec: generation 2
    assert again.uri == "s3://b/cs/g2" and api.objects[("changescores", "c")]["spec"]["methods"] == ["difference"]
    assert client.get("cs", "c").uri == "s3://b/cs/g2"
    assert client.delete("changescore", "c") and not client.delete("changescore", "c")


def test_failure_stalled_source_and_timeout() -> None:
    api = FakeApi(lambda obj, n: status(obj, "Failed", 0, "spec.bands: 'B99' is not a band of the source"))
    with pytest.raises(ResourceFailed, match=r"^ChangeScore/c failed: spec.bands: 'B99' is not a band"):
        cluster(api).run_mosaics_change("c", "s3://b/m.zarr", bands="B99")

    def waiting(obj: dict[str, Any], n: int) -> None:
        if obj["kind"] == "Mosaic":
            status(obj, "Failed", 0, "spec.time: no scenes")
        else:
            status(obj, "Waiting", 0, "waiting for Mosaic 'm' to succeed (it is Failed)")

    api = FakeApi(waiting)
    client = cluster(api)
    client.build_mosaics("m", "landsat-c2-l2", BBOX, "2008-01-01", "2009-01-01", wait=False)
    with pytest.raises(ResourceFailed, match="its source Mosaic/m failed: spec.time: no scenes"):
        client.run_mosaics_change("c", "m")  # a name that exists as a Mosaic → mosaicRef

    api = FakeApi(lambda obj, n: status(obj, "Running", 10, "reading"))
    pending = cluster(api).run_mosaics_change("c", "s3://b/m.zarr", wait=False)
    assert pending.phase in ("Pending", "Running")
    with pytest.raises(WaitTimeout, match="not finished after 0.05s"):
        cluster(api).wait(pending, timeout=0.05)


def test_api_errors_are_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RASTERKUBE_STORAGE_ROOT", raising=False)
    class Rejecting(FakeApi):
        def create_namespaced_custom_object(self, *a, **kw):  # type: ignore[no-untyped-def]
            raise ApiException(status=422, reason="Invalid")

    with pytest.raises(UserError, match="the API server rejected it"):
        cluster(Rejecting()).run_mosaics_change("c", "s3://b/m.zarr")
    with pytest.raises(UserError, match="GeoDataFrame is written as GeoParquet under the storage root"):
        import geopandas
        from shapely.geometry import box

        frame = geopandas.GeoDataFrame(geometry=[box(*BBOX)], crs="EPSG:4326")
        rasterkube.Client(api=FakeApi(), storage_root=None).build_mosaics("m", "landsat-c2-l2", frame, "2008-01-01",
                                                                          "2009-01-01")  # fmt: skip
