"""The kuberay backend against a real kube-apiserver with the real KubeRay CRDs.

The KubeRay CRDs are the ones KubeRay v<KUBERAY_VERSION> ships (copied from
its Go module); the API server validates every RayJob against their schema
and *prunes* unknown fields, so comparing what the backend sent with what the
server stored catches a misspelt field name. There is no KubeRay operator
(no kubelets could ever run its pods): the tests write the RayJob status the
way KubeRay would and check what ``backend.status()`` makes of it.

Nothing is skipped: a missing binary or CRD is built/downloaded (first run)
or the test fails. With a warm cache the module takes well under a minute.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from rasterkube_operator.backends.base import JobSpec, JobState, Owner, job_entrypoint, job_id
from rasterkube_operator.backends.kuberay import KubeRayBackend, KubeRayError
from rasterkube_operator.backends.kuberay_manifests import (
    CLUSTER_SELECTOR_NAME_KEY,
    GPU_RESOURCE,
    LABEL_JOB_ID,
    RAY_GROUP,
    RAY_VERSION_API,
    RAYJOB_PLURAL,
    KubeRaySettings,
    build_rayjob,
    rayjob_name,
)
from rasterkube_devstack import binaries
from rasterkube_devstack.controlplane import ControlPlane
from rasterkube_devstack.kuberay import CRD_FILES, KUBERAY_VERSION, ensure_kuberay_crds

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KUBECTL_TIMEOUT_S = 120
NAMESPACE = "kuberay-e2e"
GROUP = "rasterkube.dev"
VERSION = "v1alpha1"

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_SETTINGS = KubeRaySettings(
    image="registry.example/rasterkube:0.1.0",
    gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
    gpu_tolerations=[GPU_TOLERATION],
    service_account="ray-jobs",
    image_pull_secrets=["regcred"],
    s3_credentials_secret="s3-creds",
    ttl_seconds_after_finished=120,
    active_deadline_seconds=7200,
)
GPU_RESOURCES = {
    "cpus": 1.5,
    "gpus": 1,
    "memory": "12Gi",
    "workers": 2,
    "nodeSelector": {"pool": "gpu"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "eo", "effect": "NoExecute", "tolerationSeconds": 30}
    ],
}
JOB_ENV = {"AWS_ENDPOINT_URL": "http://minio.storage:9000", "RASTERKUBE_STORAGE_ROOT": "s3://rasterkube"}


def kubectl(plane: ControlPlane, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [str(binaries.ensure_kubectl()), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=plane.env(),
        timeout=KUBECTL_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    binaries.ensure_etcd()
    binaries.ensure_kube_apiserver()
    binaries.ensure_kubectl()
    ensure_kuberay_crds()
    with ControlPlane(tmp_path_factory.mktemp("kuberay-plane")) as control_plane:
        yield control_plane


@pytest.fixture(scope="module")
def crds(plane: ControlPlane) -> list[str]:
    """The real KubeRay CRDs plus the rasterkube ChangeScore CRD (the owner kind), Established."""
    # Server-side apply: the KubeRay CRDs are too big for client-side apply's last-applied annotation.
    apply = ["apply", "--server-side", "--field-manager=rasterkube-tests"]
    kubectl(plane, *apply, *(arg for path in ensure_kuberay_crds() for arg in ("-f", str(path))))
    # Sent as JSON: crds/*.yaml is written by PyYAML (YAML 1.2-ish), but kubectl reads YAML 1.1,
    # where an unquoted key `y` (ChangeScore spec.selector.y) means `true`.
    owner_crd = yaml.safe_load((REPO / "crds" / f"{GROUP}_changescores.yaml").read_text())
    kubectl(plane, *apply, "-f", "-", stdin=json.dumps(owner_crd))
    names = [*CRD_FILES.values(), owner_crd["metadata"]["name"]]
    kubectl(plane, "wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))
    kubectl(plane, "create", "namespace", NAMESPACE)
    return names


@pytest.fixture(scope="module")
def api(plane: ControlPlane, crds: list[str]) -> Iterator[client.ApiClient]:
    api_client = config.new_client_from_config(config_file=str(plane.kubeconfig))
    yield api_client
    api_client.close()


@pytest.fixture(scope="module")
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def make_owner(custom: client.CustomObjectsApi, name: str) -> Owner:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ChangeScore",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"source": {"uri": "s3://b/x.zarr"}},
    }
    created = custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "changescores", body)
    meta = created["metadata"]
    return Owner(f"{GROUP}/{VERSION}", "ChangeScore", meta["name"], NAMESPACE, meta["uid"], meta["generation"])


def make_spec(owner: Owner, resources: dict[str, Any], generation: int | None = None) -> JobSpec:
    gen = owner.generation if generation is None else generation
    return JobSpec(
        job_id=job_id(owner.kind, owner.name, owner.uid, gen),
        owner=owner,
        entrypoint=job_entrypoint("ChangeScore", json.dumps({"source": {"uri": "s3://b/x.zarr"}})),
        resources=resources,
        env=JOB_ENV,
        metadata={"rasterkube.dev/owner": f"{owner.kind}/{owner.name}"},
    )


def get_rayjob(custom: client.CustomObjectsApi, name: str) -> dict[str, Any]:
    got: dict[str, Any] = custom.get_namespaced_custom_object(
        RAY_GROUP, RAY_VERSION_API, NAMESPACE, RAYJOB_PLURAL, name
    )
    return got


def pruned_fields(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Paths of everything in ``sent`` that is missing or different in ``stored``."""
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return [f"{path or '.'}: sent an object, stored {stored!r}"]
        problems: list[str] = []
        for key, value in sent.items():
            if key not in stored:
                problems.append(f"{path}.{key}: pruned by the API server (not in the KubeRay schema?)")
            else:
                problems += pruned_fields(value, stored[key], f"{path}.{key}")
        return problems
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) != len(sent):
            return [f"{path}: sent {len(sent)} items, stored {stored!r}"]
        return [
            p for i, (a, b) in enumerate(zip(sent, stored, strict=True)) for p in pruned_fields(a, b, f"{path}[{i}]")
        ]
    return [] if sent == stored else [f"{path}: sent {sent!r}, stored {stored!r}"]


def patch_status(custom: client.CustomObjectsApi, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """Write .status the way the KubeRay operator does (status subresource, merge patch)."""
    patched: dict[str, Any] = custom.patch_namespaced_custom_object_status(
        RAY_GROUP, RAY_VERSION_API, NAMESPACE, RAYJOB_PLURAL, name, {"status": status}
    )
    assert not pruned_fields(status, patched.get("status")), pruned_fields(status, patched.get("status"))
    return patched


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_crds_are_the_pinned_kuberay_release(crds: list[str], plane: ControlPlane) -> None:
    for name in CRD_FILES.values():
        crd = json.loads(kubectl(plane, "get", "crd", name, "-o", "json"))
        assert {v["name"] for v in crd["spec"]["versions"] if v["served"]} >= {"v1"}
    source = json.loads((ensure_kuberay_crds()[0].parent / "SOURCE.json").read_text())
    assert source["Version"] == f"v{KUBERAY_VERSION}" and source["Sum"].startswith("h1:")
    assert ensure_kuberay_crds() == ensure_kuberay_crds()  # cache hit, same paths


def test_submit_gpu_cluster_is_idempotent_and_nothing_is_pruned(
    custom: client.CustomObjectsApi, api: client.ApiClient
) -> None:
    owner = make_owner(custom, "lake-gpu")
    spec = make_spec(owner, GPU_RESOURCES)
    backend = KubeRayBackend(api, GPU_SETTINGS)
    assert backend.submit(spec) == ""
    assert backend.submit(spec) == ""  # same job id: the same RayJob, no error, no second object

    listed = custom.list_namespaced_custom_object(
        RAY_GROUP, RAY_VERSION_API, NAMESPACE, RAYJOB_PLURAL, label_selector=f"{LABEL_JOB_ID}={spec.job_id}"
    )
    assert [item["metadata"]["name"] for item in listed["items"]] == [rayjob_name(spec.job_id)]

    sent = build_rayjob(spec, GPU_SETTINGS)
    stored = get_rayjob(custom, rayjob_name(spec.job_id))
    assert pruned_fields(sent, stored) == []
    # Spot checks on what matters most, as stored by the server.
    ref = stored["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"], ref["blockOwnerDeletion"]) == (
        "ChangeScore", "lake-gpu", owner.uid, True, True,
    )  # fmt: skip
    cluster = stored["spec"]["rayClusterSpec"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"][GPU_RESOURCE] == 1
    assert worker["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4", "pool": "gpu"}
    assert worker["tolerations"][0] == GPU_TOLERATION
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert stored["spec"]["shutdownAfterJobFinishes"] is True and "clusterSelector" not in stored["spec"]
    # Defaults the CRD adds, i.e. the schema really was applied.
    assert stored["spec"]["submissionMode"] == "K8sJobMode"


def test_submit_cluster_selector_mode(custom: client.CustomObjectsApi, api: client.ApiClient) -> None:
    settings = KubeRaySettings(cluster_selector={CLUSTER_SELECTOR_NAME_KEY: "shared-gpu"})
    owner = make_owner(custom, "lake-shared")
    spec = make_spec(owner, GPU_RESOURCES)
    backend = KubeRayBackend(api, settings)
    backend.submit(spec)
    backend.submit(spec)
    sent = build_rayjob(spec, settings)
    stored = get_rayjob(custom, rayjob_name(spec.job_id))
    assert pruned_fields(sent, stored) == []
    assert stored["spec"]["clusterSelector"] == {CLUSTER_SELECTOR_NAME_KEY: "shared-gpu"}
    assert "rayClusterSpec" not in stored["spec"]
    assert stored["spec"]["shutdownAfterJobFinishes"] is False
    assert stored["spec"].get("ttlSecondsAfterFinished", 0) == 0  # KubeRay rejects a TTL without shutdown
    assert stored["metadata"]["ownerReferences"][0]["uid"] == owner.uid


def test_long_names_are_accepted(custom: client.CustomObjectsApi, api: client.ApiClient) -> None:
    owner = make_owner(custom, "a-rather-long-change-score-name-for-the-northern-lakes-2025")
    spec = make_spec(owner, {})
    backend = KubeRayBackend(api, KubeRaySettings())
    backend.submit(spec)
    stored = get_rayjob(custom, rayjob_name(spec.job_id))
    assert len(stored["metadata"]["name"]) <= 47
    assert pruned_fields(build_rayjob(spec, KubeRaySettings()), stored) == []
    assert backend.status(spec.job_id, owner).state == JobState.PENDING


def test_the_round_trip_check_catches_a_typo(custom: client.CustomObjectsApi, api: client.ApiClient) -> None:
    """Guard for the guard: a misspelt field is pruned by the server and reported."""
    owner = make_owner(custom, "lake-typo")
    body = build_rayjob(make_spec(owner, {}), KubeRaySettings())
    body["metadata"]["name"] = "typo-check"
    body["spec"]["shutdownAfterJobFinish"] = True  # missing "es"
    body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplica"] = 1  # missing "s"
    custom.create_namespaced_custom_object(RAY_GROUP, RAY_VERSION_API, NAMESPACE, RAYJOB_PLURAL, body)
    problems = pruned_fields(body, get_rayjob(custom, "typo-check"))
    assert len(problems) == 2
    assert any("shutdownAfterJobFinish:" in p for p in problems)
    assert any("minReplica:" in p for p in problems)


def test_status_follows_kuberay_to_success(custom: client.CustomObjectsApi, api: client.ApiClient) -> None:
    owner = make_owner(custom, "lake-success")
    spec = make_spec(owner, {"cpus": 2, "workers": 1})
    backend = KubeRayBackend(api, KubeRaySettings())
    backend.submit(spec)
    name = rayjob_name(spec.job_id)
    assert backend.status(spec.job_id, owner).state == JobState.PENDING  # no status yet

    now = datetime.now(UTC)
    patch_status(custom, name, {"jobDeploymentStatus": "Initializing", "jobStatus": "", "startTime": rfc3339(now)})
    assert backend.status(spec.job_id, owner).state == JobState.PENDING

    dashboard = f"{name}-raycluster-x7k2p-head-svc.{NAMESPACE}.svc.cluster.local:8265"
    patch_status(
        custom,
        name,
        {
            "jobDeploymentStatus": "Running",
            "jobStatus": "RUNNING",
            "jobId": f"{name}-abcde",
            "rayClusterName": f"{name}-raycluster-x7k2p",
            "dashboardURL": dashboard,
            "rayJobInfo": {"startTime": rfc3339(now)},
        },
    )
    running = backend.status(spec.job_id, owner)
    assert running.state == JobState.RUNNING
    assert running.dashboard_url == f"http://{dashboard}"
    assert backend.submit(spec) == f"http://{dashboard}"  # resubmit: same job, its dashboard

    patch_status(
        custom,
        name,
        {
            "jobDeploymentStatus": "Complete",
            "jobStatus": "SUCCEEDED",
            "message": "Job finished successfully.",
            "endTime": rfc3339(now + timedelta(minutes=3)),
            "succeeded": 1,
        },
    )
    done = backend.status(spec.job_id, owner)
    assert done.state == JobState.SUCCEEDED and "finished successfully" in done.message


def test_status_running_but_deployment_failed(custom: client.CustomObjectsApi, api: client.ApiClient) -> None:
    owner = make_owner(custom, "lake-deadline")
    spec = make_spec(owner, {})
    backend = KubeRayBackend(api, KubeRaySettings(active_deadline_seconds=60))
    backend.submit(spec)
    name = rayjob_name(spec.job_id)
    patch_status(custom, name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    assert backend.status(spec.job_id, owner).state == JobState.RUNNING
    message = "The RayJob has passed the activeDeadlineSeconds. StartTime: 2026-01-01. ActiveDeadlineSeconds: 60"
    patch_status(
        custom,
        name,
        {
            "jobDeploymentStatus": "Failed",
            "jobStatus": "RUNNING",
            "reason": "DeadlineExceeded",
            "message": message,
            "failed": 1,
        },
    )
    failed = backend.status(spec.job_id, owner)
    assert failed.state == JobState.FAILED
    assert "DeadlineExceeded" in failed.message and "activeDeadlineSeconds" in failed.message


def test_status_stuck_initializing(custom: client.CustomObjectsApi, api: client.ApiClient) -> None:
    owner = make_owner(custom, "lake-stuck")
    spec = make_spec(owner, {"gpus": 1})
    backend = KubeRayBackend(api, KubeRaySettings(initializing_timeout_s=600))
    backend.submit(spec)
    long_ago = datetime.now(UTC) - timedelta(minutes=11)
    patch_status(
        custom, rayjob_name(spec.job_id), {"jobDeploymentStatus": "Initializing", "startTime": rfc3339(long_ago)}
    )
    stuck = backend.status(spec.job_id, owner)
    assert stuck.state == JobState.FAILED and "Ray cluster did not start" in stuck.message


def test_stop_deletes_and_missing_is_missing(custom: client.CustomObjectsApi, api: client.ApiClient) -> None:
    owner = make_owner(custom, "lake-stop")
    spec = make_spec(owner, {})
    backend = KubeRayBackend(api, KubeRaySettings())
    backend.submit(spec)
    patch_status(custom, rayjob_name(spec.job_id), {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    backend.stop(spec.job_id, owner)
    # No KubeRay operator, hence no finalizer: the delete is immediate.
    with pytest.raises(client.ApiException) as err:
        get_rayjob(custom, rayjob_name(spec.job_id))
    assert err.value.status == 404
    gone = backend.status(spec.job_id, owner)
    assert gone.state == JobState.MISSING and rayjob_name(spec.job_id) in gone.message
    backend.stop(spec.job_id, owner)  # already gone: fine
    never = make_spec(owner, {}, generation=99)
    assert backend.status(never.job_id, owner).state == JobState.MISSING
    # After the stop the same job id can be submitted again.
    backend.submit(spec)
    assert backend.status(spec.job_id, owner).state == JobState.PENDING


def test_submit_while_being_deleted_and_errors_are_clear(
    custom: client.CustomObjectsApi, api: client.ApiClient
) -> None:
    owner = make_owner(custom, "lake-terminating")
    spec = make_spec(owner, {})
    backend = KubeRayBackend(api, KubeRaySettings())
    backend.submit(spec)
    name = rayjob_name(spec.job_id)
    # Hold the object in Terminating, as KubeRay's own finalizer does while it stops the Ray job.
    custom.patch_namespaced_custom_object(
        RAY_GROUP, RAY_VERSION_API, NAMESPACE, RAYJOB_PLURAL, name, {"metadata": {"finalizers": ["test/hold"]}}
    )
    backend.stop(spec.job_id, owner)
    assert backend.status(spec.job_id, owner).state == JobState.STOPPED
    with pytest.raises(KubeRayError, match="still being deleted"):
        backend.submit(spec)
    custom.patch_namespaced_custom_object(
        RAY_GROUP, RAY_VERSION_API, NAMESPACE, RAYJOB_PLURAL, name, {"metadata": {"finalizers": None}}
    )
    assert backend.status(spec.job_id, owner).state == JobState.MISSING

    elsewhere = Owner(owner.api_version, owner.kind, owner.name, "no-such-namespace", owner.uid, owner.generation)
    with pytest.raises(KubeRayError, match="does the namespace exist"):
        backend.submit(make_spec(elsewhere, {}))
