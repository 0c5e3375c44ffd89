"""End to end on the dev stack: real kube-apiserver + etcd, real Ray, real S3 server, the
operator as a real process, driven with the real kubectl and helm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers.kube import get, kubectl, status_is
from helpers.kube import wait_for as wait_for_object
from helpers.stores import random_series, write_store
from rasterkube import geozarr, storage
from rasterkube_devstack import binaries
from rasterkube_devstack import stack as devstack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("Succeeded", "Failed")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack.StackInfo]:
    directory = tmp_path_factory.mktemp("devstack")
    info = devstack.up(directory, verbose=False)
    saved = dict(os.environ)
    os.environ.update(info.env())  # this process reads the outputs from the same S3 server
    try:
        yield info
    finally:
        os.environ.clear()
        os.environ.update(saved)
        devstack.down(directory, verbose=False)


def wait_for(info, kind: str, name: str, predicate, timeout: float = 180) -> dict[str, Any]:
    """Wait on the object's status."""
    return wait_for_object(info, kind, name, status_is(predicate), timeout)


def manifest(name: str, source_uri: str, **spec: Any) -> str:
    return json.dumps({
        "apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"source": {"uri": source_uri}, "distance": "euclidean", **spec},
    })  # fmt: skip


def ray_client(info: devstack.StackInfo):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(info.ray_dashboard)


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Many small blocks (256 tasks): a job that runs long enough to be interrupted."""
    uri = str(tmp_path_factory.mktemp("slow") / "slow.zarr")
    return write_store(uri, random_series(5, 4, 256, 256, seed=11), chunk=16)


def test_chart_installs_with_server_side_dry_run(stack: devstack.StackInfo) -> None:
    helm = str(binaries.ensure_helm())
    rendered = subprocess.run([helm, "template", "rasterkube", str(REPO / "charts" / "rasterkube"),
                               "--namespace", "rasterkube-system"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    kubectl(stack, "create", "namespace", "rasterkube-system", check=False)
    proc = kubectl(stack, "apply", "--dry-run=server", "-n", "rasterkube-system", "-f", "-", input=rendered)
    assert "deployment.apps/rasterkube" in proc.stdout and "(server dry run)" in proc.stdout


def example_resources() -> list[tuple[str, str]]:
    """(kind, name) of every resource in examples/ (what `kubectl apply -f examples/` creates)."""
    out = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((doc["kind"].lower(), doc["metadata"]["name"]))
    return out


def test_every_example_succeeds_with_outputs_in_s3(stack: devstack.StackInfo) -> None:
    resources = example_resources()
    assert ("vectorization", "landsat-change-polygons") in resources
    start = time.monotonic()
    kubectl(stack, "apply", "-f", str(REPO / "examples"))
    first = wait_for(stack, "changescore", "landsat-change", lambda s: bool((s.get("job") or {}).get("id")), 60)
    apply_to_job_id_s = time.monotonic() - start
    done = {(k, n): wait_for(stack, k, n, lambda s: s.get("phase") in TERMINAL, 300) for k, n in resources}
    for (kind, name), obj in done.items():
        status = obj["status"]
        assert status["phase"] == "Succeeded", status
        ready = {c["type"]: c for c in status["conditions"]}["Ready"]
        assert ready["status"] == "True" and ready["observedGeneration"] == obj["metadata"]["generation"]
        uri = status["outputs"]["uri"]
        assert uri.startswith(f"s3://rasterkube/data/default/{kind}/{name}")
        assert status["job"]["dashboardUrl"].startswith(stack.ray_dashboard)
    scores = {n: o for (k, n), o in done.items() if k == "changescore"}
    for obj in scores.values():
        assert storage.is_committed(obj["status"]["outputs"]["uri"])
    assert geozarr.describe(scores["landsat-change-window"]["status"]["outputs"]["uri"]).shape == (6, 1, 40, 40)
    assert scores["landsat-change"]["status"]["outputs"]["summary"]["bands"][-1].endswith("_robust_time_zscore")
    mosaic = done[("mosaic", "landsat-mosaic")]["status"]["outputs"]  # STAC catalog of COGs in S3 → store in S3
    assert storage.is_committed(mosaic["uri"]) and geozarr.describe(mosaic["uri"]).shape[:2] == (6, 3)
    assert mosaic["summary"]["dataset"] == "landsat-c2-l2" and mosaic["summary"]["scenes"] > 80
    polygons = done[("vectorization", "landsat-change-polygons")]["status"]["outputs"]
    assert polygons["summary"]["feature_count"] > 0
    import geopandas

    frame = geopandas.read_parquet(polygons["uri"], storage_options=storage.storage_options(polygons["uri"]))
    assert len(frame) == polygons["summary"]["feature_count"] and frame.crs.to_epsg() == 4326
    # Mosaic → Prediction (changeDetection, model from S3 on Ray Serve) → Vectorization.
    prediction = done[("prediction", "landsat-change-model")]["status"]["outputs"]
    pred_info = geozarr.describe(prediction["uri"])
    assert pred_info.bands == ("no_change", "change") and pred_info.shape[0] == 1, "one time step: the window start"
    assert prediction["summary"]["patches"] > 0 and prediction["summary"]["deployment"].startswith("rasterkube-model-")
    change_polygons = done[("vectorization", "landsat-change-model-polygons")]["status"]["outputs"]
    assert change_polygons["summary"]["feature_count"] > 0
    table = kubectl(stack, "get", "rasterkube").stdout
    assert "Succeeded" in table and "PROGRESS" in table
    reasons = kubectl(stack, "get", "events", "--field-selector", "involvedObject.name=landsat-change",
                      "-o", "jsonpath={.items[*].reason}").stdout.split()  # fmt: skip
    assert "JobSubmitted" in reasons and "Succeeded" in reasons
    job = ray_client(stack).get_job_info(first["status"]["job"]["id"])
    assert job.metadata["rasterkube.dev/name"] == "landsat-change" and job.metadata["rasterkube.dev/kind"] == "ChangeScore"
    print(f"\napply → job id in status: {apply_to_job_id_s:.1f}s")


def test_spec_change_reruns(stack: devstack.StackInfo) -> None:
    name = "rerun"
    kubectl(stack, "apply", "-f", "-", input=manifest(name, stack.sample_uri or "", methods=["looMedoid"]))
    first = wait_for(stack, "changescore", name, lambda s: s.get("phase") in TERMINAL)
    kubectl(stack, "patch", "changescore", name, "--type=merge", "-p", '{"spec": {"methods": ["difference"]}}')
    second = wait_for(stack, "changescore", name, lambda s: s.get("observedGeneration") == 2 and s.get("phase") in TERMINAL)
    assert second["status"]["phase"] == "Succeeded"
    assert second["status"]["job"]["id"] != first["status"]["job"]["id"]
    assert second["status"]["outputs"]["summary"]["bands"] == ["difference_euclidean_distance"]


def test_ref_waits_for_its_source(stack: devstack.StackInfo) -> None:
    text = json.dumps({"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore",
                       "metadata": {"name": "waits", "namespace": "default"},
                       "spec": {"source": {"predictionRef": {"name": "not-yet"}}}})  # fmt: skip
    kubectl(stack, "apply", "-f", "-", input=text)
    obj = wait_for(stack, "changescore", "waits", lambda s: s.get("phase") == "Waiting", 60)
    assert "Prediction 'not-yet'" in obj["status"]["progress"]["message"]


def test_invalid_manifest_rejected_by_the_api_server(stack: devstack.StackInfo) -> None:
    proc = kubectl(stack, "apply", "-f", "-", input=manifest("bad", "s3://x", distance="manhattan"), check=False)
    assert proc.returncode != 0 and 'Unsupported value: "manhattan"' in proc.stderr


def _running_with_progress(status: dict[str, Any]) -> bool:
    return status.get("phase") == "Running" and (status.get("progress") or {}).get("percent", 0) > 0


def test_delete_during_run_stops_the_ray_job(stack: devstack.StackInfo, slow_source: str) -> None:
    name = "deleted-mid-run"
    kubectl(stack, "apply", "-f", "-", input=manifest(name, slow_source, methods=["looMedoid"], xyBlockMultiplier=1))
    obj = wait_for(stack, "changescore", name, _running_with_progress, 120)
    jid = obj["status"]["job"]["id"]
    assert "rasterkube.dev/finalizer" in obj["metadata"]["finalizers"]
    kubectl(stack, "delete", "changescore", name, "--wait=true", "--timeout=60s")
    assert get(stack, "changescore", name) is None
    client = ray_client(stack)
    deadline = time.monotonic() + 60
    while str(client.get_job_status(jid)) not in ("STOPPED", "JobStatus.STOPPED") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert str(client.get_job_status(jid)).endswith("STOPPED")
    assert not storage.is_committed(f"s3://rasterkube/data/default/changescore/{name}")


def test_operator_killed_mid_run_resumes_without_duplicate(stack: devstack.StackInfo, slow_source: str) -> None:
    name = "survives-restart"
    kubectl(stack, "apply", "-f", "-", input=manifest(name, slow_source, methods=["looMedoid"], xyBlockMultiplier=1))
    obj = wait_for(stack, "changescore", name, _running_with_progress, 120)
    jid = obj["status"]["job"]["id"]
    assert devstack.stop_operator(stack.directory, signal.SIGKILL)
    time.sleep(2)
    devstack.start_operator(stack.directory, verbose=False)
    done = wait_for(stack, "changescore", name, lambda s: s.get("phase") in TERMINAL, 240)
    assert done["status"]["phase"] == "Succeeded" and done["status"]["job"]["id"] == jid
    jobs = [j for j in ray_client(stack).list_jobs() if (j.metadata or {}).get("rasterkube.dev/name") == name]
    assert [j.submission_id for j in jobs] == [jid], "exactly one Ray job for the resource"
