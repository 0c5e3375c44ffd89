"""The kuberay backend's pure parts: RayJob builder, status mapping, settings (no API server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from rasterkube_operator.backends.base import JobSpec, JobState, Owner, job_entrypoint, job_id
from rasterkube_operator.backends.kuberay_manifests import (
    CLUSTER_SELECTOR_NAME_KEY,
    GPU_RESOURCE,
    MAX_RAYJOB_NAME_LENGTH,
    KubeRaySettings,
    KubeRaySettingsError,
    build_rayjob,
    cpu_quantity,
    label_value,
    map_rayjob_status,
    rayjob_name,
)

OWNER = Owner(
    api_version="rasterkube.dev/v1alpha1",
    kind="ChangeScore",
    name="lake-change",
    namespace="team-a",
    uid="0f8fad5b-d9cb-469f-a165-70867728950e",
    generation=3,
)
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def make_spec(resources: dict[str, Any] | None = None, **kwargs: Any) -> JobSpec:
    return JobSpec(
        job_id=job_id(OWNER.kind, OWNER.name, OWNER.uid, OWNER.generation),
        owner=OWNER,
        entrypoint=job_entrypoint("ChangeScore", '{"source": {"uri": "s3://b/x.zarr"}}'),
        resources=resources or {},
        **kwargs,
    )


def gpu_settings(**kwargs: Any) -> KubeRaySettings:
    return KubeRaySettings(
        image="registry.example/rasterkube:1.2.3",
        ray_version="2.60.0",
        gpu_node_selector={"pool": "gpu", "accelerator": "nvidia-l4"},
        gpu_tolerations=[GPU_TOLERATION],
        **kwargs,
    )


def worker_group(rayjob: dict[str, Any]) -> dict[str, Any]:
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert len(groups) == 1
    return groups[0]


def worker_pod(rayjob: dict[str, Any]) -> dict[str, Any]:
    return worker_group(rayjob)["template"]["spec"]


def head_pod(rayjob: dict[str, Any]) -> dict[str, Any]:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


# --------------------------------------------------------------------------
# build_rayjob
# --------------------------------------------------------------------------


def test_metadata_labels_and_owner_reference() -> None:
    spec = make_spec(metadata={"rasterkube.dev/generation": "3"})
    rayjob = build_rayjob(spec, KubeRaySettings())
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    meta = rayjob["metadata"]
    assert meta["name"] == spec.job_id and meta["namespace"] == "team-a"
    assert meta["labels"] == {
        "app.kubernetes.io/managed-by": "rasterkube",
        "rasterkube.dev/kind": "ChangeScore",
        "rasterkube.dev/name": "lake-change",
        "rasterkube.dev/job-id": spec.job_id,
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "rasterkube.dev/v1alpha1",
            "kind": "ChangeScore",
            "name": "lake-change",
            "uid": OWNER.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert rayjob["spec"]["metadata"] == {"rasterkube.dev/generation": "3"}


def test_job_fields_defaults() -> None:
    spec = make_spec(env={"AWS_ENDPOINT_URL": "http://s3:9000", "RASTERKUBE_STORAGE_ROOT": "s3://b"})
    job = build_rayjob(spec, KubeRaySettings())["spec"]
    assert job["entrypoint"] == spec.entrypoint
    assert job["submissionMode"] == "K8sJobMode"
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] == 300
    assert job["activeDeadlineSeconds"] == 86400
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {
        "env_vars": {"AWS_ENDPOINT_URL": "http://s3:9000", "RASTERKUBE_STORAGE_ROOT": "s3://b"}
    }
    assert "clusterSelector" not in job


def test_env_on_head_and_workers_and_credentials_never_inline() -> None:
    env = {"AWS_ENDPOINT_URL": "http://s3:9000", "AWS_SECRET_ACCESS_KEY": "hunter2", "AWS_ACCESS_KEY_ID": "me"}
    settings = KubeRaySettings(
        s3_credentials_secret="s3-creds", s3_access_key_id_key="id", s3_secret_access_key_key="key"
    )
    rayjob = build_rayjob(make_spec(env=env), settings)
    assert "hunter2" not in yaml.safe_dump(rayjob)
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]) == {"env_vars": {"AWS_ENDPOINT_URL": "http://s3:9000"}}
    for pod in (head_pod(rayjob), worker_pod(rayjob)):
        container_env = pod["containers"][0]["env"]
        assert {"name": "AWS_ENDPOINT_URL", "value": "http://s3:9000"} in container_env
        assert {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "key"}},
        } in container_env
        assert {
            "name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "id"}},
        } in container_env


def test_no_env_no_runtime_env() -> None:
    assert "runtimeEnvYAML" not in build_rayjob(make_spec(), KubeRaySettings())["spec"]


def test_cpu_only_worker_group() -> None:
    rayjob = build_rayjob(make_spec({"cpus": 2, "memory": "8Gi", "workers": 3}), gpu_settings())
    group = worker_group(rayjob)
    assert group["groupName"] == "workers"
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (3, 3, 3)
    assert group["rayStartParams"] == {}
    container = worker_pod(rayjob)["containers"][0]
    assert container["image"] == "registry.example/rasterkube:1.2.3"
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"cpu": "2", "memory": "8Gi"},
    }
    # No GPUs: neither the GPU pool's selector nor its tolerations.
    assert "nodeSelector" not in worker_pod(rayjob)
    assert "tolerations" not in worker_pod(rayjob)


def test_gpu_worker_group() -> None:
    resources = {
        "cpus": 0.5,
        "gpus": 1.5,
        "memory": "16Gi",
        "workers": 2,
        "nodeSelector": {"pool": "gpu-big", "zone": "eu-1a"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "eo", "effect": "NoExecute", "tolerationSeconds": 60},
            GPU_TOLERATION,  # duplicate of the GPU pool's: listed once
        ],
    }
    rayjob = build_rayjob(make_spec(resources), gpu_settings())
    pod = worker_pod(rayjob)
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "500m", "memory": "16Gi", GPU_RESOURCE: 2}  # ceil(1.5)
    assert isinstance(limits[GPU_RESOURCE], int)
    assert GPU_RESOURCE not in pod["containers"][0]["resources"]["requests"]
    assert worker_group(rayjob)["rayStartParams"] == {"num-gpus": "2"}
    # The resource's own selector wins on conflicting keys.
    assert pod["nodeSelector"] == {"pool": "gpu-big", "accelerator": "nvidia-l4", "zone": "eu-1a"}
    assert pod["tolerations"] == [
        GPU_TOLERATION,
        {"key": "dedicated", "operator": "Equal", "value": "eo", "effect": "NoExecute", "tolerationSeconds": 60},
    ]


def test_fractional_gpu_rounds_up_and_selector_without_resource_selector() -> None:
    pod = worker_pod(build_rayjob(make_spec({"gpus": 0.25}), gpu_settings()))
    assert pod["containers"][0]["resources"]["limits"][GPU_RESOURCE] == 1
    assert pod["nodeSelector"] == {"pool": "gpu", "accelerator": "nvidia-l4"}
    assert pod["tolerations"] == [GPU_TOLERATION]


def test_resource_tolerations_without_gpus_and_default_operator() -> None:
    pod = worker_pod(build_rayjob(make_spec({"tolerations": [{"key": "spot", "value": "yes"}]}), gpu_settings()))
    assert pod["tolerations"] == [{"key": "spot", "operator": "Equal", "value": "yes"}]


def test_head_group() -> None:
    settings = KubeRaySettings(
        service_account="ray-jobs",
        image_pull_secrets=["regcred"],
        head_resources={"requests": {"cpu": "2", "memory": "6Gi"}, "limits": {"memory": "6Gi"}},
    )
    rayjob = build_rayjob(make_spec({"gpus": 1}), settings)
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == settings.ray_version
    assert cluster["headGroupSpec"]["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    head = head_pod(rayjob)
    container = head["containers"][0]
    assert container["image"] == settings.image
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "6Gi"}, "limits": {"memory": "6Gi"}}
    assert GPU_RESOURCE not in str(container["resources"]) and "nodeSelector" not in head
    for pod in (head, worker_pod(rayjob)):
        assert pod["serviceAccountName"] == "ray-jobs"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        security = pod["containers"][0]["securityContext"]
        assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False
        assert security["runAsUser"] > 0


def test_cluster_selector_mode() -> None:
    settings = gpu_settings(cluster_selector={CLUSTER_SELECTOR_NAME_KEY: "shared-gpu"})
    job = build_rayjob(make_spec({"gpus": 1}, env={"A": "b"}), settings)["spec"]
    assert job["clusterSelector"] == {CLUSTER_SELECTOR_NAME_KEY: "shared-gpu"}
    assert "rayClusterSpec" not in job
    # KubeRay: shutdownAfterJobFinishes=false in this mode and then no TTL.
    assert job["shutdownAfterJobFinishes"] is False
    assert "ttlSecondsAfterFinished" not in job
    assert job["activeDeadlineSeconds"] == 86400
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"env_vars": {"A": "b"}}


def test_cluster_selector_needs_cluster_name() -> None:
    with pytest.raises(KubeRaySettingsError, match=r"ray\.io/cluster"):
        KubeRaySettings(cluster_selector={"team": "a"})


def test_invalid_resources_are_reported() -> None:
    with pytest.raises(ValueError, match=r"spec\.resources"):
        build_rayjob(make_spec({"gpus": -1}), KubeRaySettings())


def test_names_fit_kuberay_limits() -> None:
    # job ids fit KubeRay's limit themselves (even with a large generation) ...
    fitted = job_id("ChangeScore", "a-very-long-resource-name-that-goes-on-and-on", OWNER.uid, 123456)
    assert len(fitted) <= MAX_RAYJOB_NAME_LENGTH and rayjob_name(fitted) == fitted
    # ... and rayjob_name still shortens any longer id deterministically
    long_id = "chan-a-very-long-resource-name-that-goes-on-and-on-0f8fad5b-g12"
    assert len(long_id) > MAX_RAYJOB_NAME_LENGTH
    name = rayjob_name(long_id)
    assert len(name) <= MAX_RAYJOB_NAME_LENGTH and name[0].isalpha() and name == rayjob_name(long_id)
    assert rayjob_name(long_id.replace("g12", "g13")) != name
    short = job_id("Mosaic", "m", OWNER.uid, 1)
    assert rayjob_name(short) == short
    spec = JobSpec(job_id=long_id, owner=OWNER, entrypoint="x", resources={})
    assert build_rayjob(spec, KubeRaySettings())["metadata"]["name"] == name
    assert label_value("x" * 100) != "x" * 100 and len(label_value("x" * 100)) <= 63
    assert label_value("lake-change") == "lake-change"


@pytest.mark.parametrize(("cpus", "quantity"), [(1, "1"), (2.0, "2"), (0.5, "500m"), (1.25, "1250m"), (0.0001, "1m")])
def test_cpu_quantity(cpus: float, quantity: str) -> None:
    assert cpu_quantity(cpus) == quantity


# --------------------------------------------------------------------------
# map_rayjob_status
# --------------------------------------------------------------------------

SETTINGS = KubeRaySettings(initializing_timeout_s=600)


def rayjob(
    deployment: str | None = None,
    job: str | None = None,
    *,
    reason: str = "",
    message: str = "",
    start: datetime | None = None,
    created: datetime = NOW - timedelta(seconds=30),
    dashboard: str = "",
    deleting: bool = False,
    cluster_selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": "j", "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ")},
        "spec": {"entrypoint": "x"},
    }
    if deleting:
        obj["metadata"]["deletionTimestamp"] = NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
    if cluster_selector:
        obj["spec"]["clusterSelector"] = cluster_selector
    if deployment is None and job is None:
        return obj
    status: dict[str, Any] = {"jobDeploymentStatus": deployment or "", "jobStatus": job or ""}
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    if start:
        status["startTime"] = start.strftime("%Y-%m-%dT%H:%M:%SZ")
    if dashboard:
        status["dashboardURL"] = dashboard
    obj["status"] = status
    return obj


DEADLINE_MESSAGE = "The RayJob has passed the activeDeadlineSeconds. StartTime: x. ActiveDeadlineSeconds: 60"


@pytest.mark.parametrize(
    ("obj", "state", "words"),
    [
        pytest.param(rayjob(), JobState.PENDING, ["KubeRay operator"], id="no-status"),
        pytest.param(rayjob("", ""), JobState.PENDING, ["KubeRay operator"], id="new"),
        pytest.param(rayjob("Initializing", ""), JobState.PENDING, ["starting"], id="initializing"),
        pytest.param(rayjob("Running", "PENDING"), JobState.PENDING, ["not started"], id="running-pending"),
        pytest.param(rayjob("Running", ""), JobState.PENDING, ["not started"], id="running-empty"),
        pytest.param(rayjob("Running", "RUNNING"), JobState.RUNNING, ["running"], id="running-running"),
        pytest.param(rayjob("Waiting", ""), JobState.PENDING, [], id="waiting"),
        pytest.param(rayjob("Complete", "SUCCEEDED"), JobState.SUCCEEDED, ["succeeded"], id="complete-succeeded"),
        pytest.param(
            rayjob("Complete", "FAILED", reason="AppFailed", message="Job entrypoint command failed with exit code 1"),
            JobState.FAILED,
            ["exit code 1", "AppFailed"],
            id="complete-failed",
        ),
        pytest.param(
            rayjob("Failed", "FAILED", reason="AppFailed", message="boom"),
            JobState.FAILED,
            ["boom"],
            id="failed-failed",
        ),
        pytest.param(rayjob("Complete", "STOPPED"), JobState.STOPPED, ["stopped"], id="complete-stopped"),
        pytest.param(rayjob("Running", "STOPPED"), JobState.STOPPED, ["stopped"], id="running-stopped"),
        pytest.param(
            rayjob("Failed", "RUNNING", reason="DeadlineExceeded", message=DEADLINE_MESSAGE),
            JobState.FAILED,
            ["DeadlineExceeded", "activeDeadlineSeconds", "RUNNING"],
            id="contradiction-running-but-deployment-failed",
        ),
        pytest.param(
            rayjob("Failed", "SUCCEEDED", reason="JobDeploymentStatusTransitionGracePeriodExceeded", message="late"),
            JobState.SUCCEEDED,
            ["the Ray job itself succeeded", "Failed", "late"],
            id="contradiction-succeeded-but-deployment-failed",
        ),
        pytest.param(
            rayjob("Running", "SUCCEEDED"), JobState.SUCCEEDED, ["succeeded"], id="succeeded-submitter-finishing"
        ),
        pytest.param(
            rayjob(
                "Failed",
                "",
                reason="SubmissionFailed",
                message="Job submission has failed. Reason: BackoffLimitExceeded",
            ),
            JobState.FAILED,
            ["SubmissionFailed", "BackoffLimitExceeded", "never started"],
            id="failed-before-start",
        ),
        pytest.param(
            rayjob("Complete", "RUNNING"), JobState.FAILED, ["outcome unknown"], id="contradiction-complete-running"
        ),
        pytest.param(
            rayjob("ValidationFailed", "", reason="ValidationFailed", message="RayJob name should be no more than 47"),
            JobState.FAILED,
            ["ValidationFailed", "no more than 47"],
            id="validation-failed",
        ),
        pytest.param(rayjob("Retrying", "FAILED"), JobState.PENDING, ["retrying"], id="retrying"),
        pytest.param(rayjob("Suspending", "RUNNING"), JobState.PENDING, ["suspending"], id="suspending"),
        pytest.param(rayjob("Suspended", ""), JobState.PENDING, ["suspended"], id="suspended"),
        pytest.param(rayjob("Running", "RUNNING", deleting=True), JobState.STOPPED, ["deleted"], id="deleting"),
        pytest.param(rayjob("Complete", "SUCCEEDED", deleting=True), JobState.SUCCEEDED, [], id="deleting-finished"),
        pytest.param(rayjob(deleting=True), JobState.STOPPED, ["deleted"], id="deleting-new"),
        pytest.param(rayjob("SomethingNew", "RUNNING"), JobState.RUNNING, [], id="unknown-deployment-running"),
        pytest.param(rayjob("SomethingNew", ""), JobState.PENDING, ["SomethingNew"], id="unknown-deployment"),
    ],
)
def test_status_mapping(obj: dict[str, Any], state: JobState, words: list[str]) -> None:
    status = map_rayjob_status(obj, NOW, SETTINGS)
    assert status.state == state, status.message
    for word in words:
        assert word.lower() in status.message.lower(), status.message
    assert status.progress is None and status.result is None


def test_initializing_timeout_from_start_time() -> None:
    started = NOW - timedelta(seconds=601)
    status = map_rayjob_status(rayjob("Initializing", "", start=started), NOW, SETTINGS)
    assert status.state == JobState.FAILED
    for word in ("Ray cluster did not start", "image", "GPU node pool", "quota", "601s"):
        assert word in status.message
    # Just under the limit: still starting.
    fresh = map_rayjob_status(rayjob("Initializing", "", start=NOW - timedelta(seconds=599)), NOW, SETTINGS)
    assert fresh.state == JobState.PENDING


def test_initializing_timeout_falls_back_to_creation_time() -> None:
    old = rayjob("Initializing", "", created=NOW - timedelta(hours=1))
    assert map_rayjob_status(old, NOW, SETTINGS).state == JobState.FAILED
    # startTime wins over creationTimestamp when both exist (a retry restarts the clock).
    restarted = rayjob("Initializing", "", created=NOW - timedelta(hours=1), start=NOW - timedelta(seconds=5))
    assert map_rayjob_status(restarted, NOW, SETTINGS).state == JobState.PENDING


def test_initializing_timeout_with_cluster_selector_names_the_cluster() -> None:
    obj = rayjob(
        "Initializing", "", start=NOW - timedelta(hours=1), cluster_selector={CLUSTER_SELECTOR_NAME_KEY: "shared"}
    )
    status = map_rayjob_status(obj, NOW, SETTINGS)
    assert status.state == JobState.FAILED
    assert "'shared'" in status.message and "clusterSelector" in status.message


def test_new_for_long_stays_pending_but_says_why() -> None:
    status = map_rayjob_status(rayjob(created=NOW - timedelta(hours=2)), NOW, SETTINGS)
    assert status.state == JobState.PENDING
    assert "installed" in status.message


def test_naive_now_is_utc() -> None:
    obj = rayjob("Initializing", "", start=NOW - timedelta(seconds=700))
    assert map_rayjob_status(obj, NOW.replace(tzinfo=None), SETTINGS).state == JobState.FAILED


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "j-raycluster-abcde-head-svc.team-a.svc.cluster.local:8265",
            "http://j-raycluster-abcde-head-svc.team-a.svc.cluster.local:8265",
        ),
        ("https://ray.example.com", "https://ray.example.com"),
        ("", None),
    ],
)
def test_dashboard_url(url: str, expected: str | None) -> None:
    assert map_rayjob_status(rayjob("Running", "RUNNING", dashboard=url), NOW, SETTINGS).dashboard_url == expected


# --------------------------------------------------------------------------
# KubeRaySettings.from_env
# --------------------------------------------------------------------------


def test_from_env_defaults() -> None:
    assert KubeRaySettings.from_env({}) == KubeRaySettings()
    defaults = KubeRaySettings()
    assert defaults.cluster_selector is None
    assert (defaults.ttl_seconds_after_finished, defaults.active_deadline_seconds) == (300, 86400)
    assert defaults.initializing_timeout_s == 600


def test_from_env_all() -> None:
    env = {
        "RASTERKUBE_RAY_IMAGE": "img:1",
        "RASTERKUBE_RAY_VERSION": "2.60.0",
        "RASTERKUBE_KUBERAY_CLUSTER_SELECTOR": '{"ray.io/cluster": "shared"}',
        "RASTERKUBE_GPU_NODE_SELECTOR": '{"pool": "gpu"}',
        "RASTERKUBE_GPU_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
        "RASTERKUBE_KUBERAY_TTL_SECONDS": "60",
        "RASTERKUBE_KUBERAY_ACTIVE_DEADLINE_SECONDS": "3600",
        "RASTERKUBE_KUBERAY_INITIALIZING_TIMEOUT_SECONDS": "120",
        "RASTERKUBE_KUBERAY_SERVICE_ACCOUNT": "ray",
        "RASTERKUBE_KUBERAY_HEAD_RESOURCES": '{"requests": {"cpu": "1"}}',
        "RASTERKUBE_KUBERAY_IMAGE_PULL_SECRETS": '[{"name": "regcred"}]',
        "RASTERKUBE_S3_CREDENTIALS_SECRET": "s3",
    }
    settings = KubeRaySettings.from_env(env)
    assert settings == KubeRaySettings(
        image="img:1",
        ray_version="2.60.0",
        cluster_selector={"ray.io/cluster": "shared"},
        gpu_node_selector={"pool": "gpu"},
        gpu_tolerations=[GPU_TOLERATION],
        ttl_seconds_after_finished=60,
        active_deadline_seconds=3600,
        initializing_timeout_s=120,
        service_account="ray",
        head_resources={"requests": {"cpu": "1"}},
        image_pull_secrets=["regcred"],
        s3_credentials_secret="s3",
    )


def test_from_env_chart_names_and_empty_selector() -> None:
    # The Helm chart passes RASTERKUBE_KUBERAY_RAY_VERSION and "{}" for "no shared cluster".
    env = {"RASTERKUBE_KUBERAY_RAY_VERSION": "2.61.0", "RASTERKUBE_KUBERAY_CLUSTER_SELECTOR": "{}"}
    settings = KubeRaySettings.from_env(env)
    assert settings.ray_version == "2.61.0" and settings.cluster_selector is None


@pytest.mark.parametrize(
    ("env", "words"),
    [
        (
            {"RASTERKUBE_KUBERAY_CLUSTER_SELECTOR": "{ray.io/cluster: x}"},
            ["RASTERKUBE_KUBERAY_CLUSTER_SELECTOR", "JSON"],
        ),
        (
            {"RASTERKUBE_KUBERAY_CLUSTER_SELECTOR": '{"team": "a"}'},
            ["RASTERKUBE_KUBERAY_CLUSTER_SELECTOR", "ray.io/cluster"],
        ),
        ({"RASTERKUBE_GPU_NODE_SELECTOR": "pool=gpu"}, ["RASTERKUBE_GPU_NODE_SELECTOR", "not valid JSON"]),
        ({"RASTERKUBE_GPU_NODE_SELECTOR": '["pool"]'}, ["RASTERKUBE_GPU_NODE_SELECTOR", "object of strings"]),
        ({"RASTERKUBE_GPU_NODE_SELECTOR": '{"n": 1}'}, ["RASTERKUBE_GPU_NODE_SELECTOR", "object of strings"]),
        ({"RASTERKUBE_GPU_TOLERATIONS": "[{"}, ["RASTERKUBE_GPU_TOLERATIONS", "not valid JSON"]),
        ({"RASTERKUBE_GPU_TOLERATIONS": '{"key": "a"}'}, ["RASTERKUBE_GPU_TOLERATIONS", "list"]),
        ({"RASTERKUBE_GPU_TOLERATIONS": '[{"kee": "a"}]'}, ["RASTERKUBE_GPU_TOLERATIONS", "kee"]),
        ({"RASTERKUBE_KUBERAY_TTL_SECONDS": "5m"}, ["RASTERKUBE_KUBERAY_TTL_SECONDS", "integer"]),
        ({"RASTERKUBE_KUBERAY_TTL_SECONDS": "-1"}, ["RASTERKUBE_KUBERAY_TTL_SECONDS", ">= 0"]),
        ({"RASTERKUBE_KUBERAY_ACTIVE_DEADLINE_SECONDS": "0"}, ["RASTERKUBE_KUBERAY_ACTIVE_DEADLINE_SECONDS", ">= 1"]),
        ({"RASTERKUBE_KUBERAY_INITIALIZING_TIMEOUT_SECONDS": "x"}, ["RASTERKUBE_KUBERAY_INITIALIZING_TIMEOUT_SECONDS"]),
        ({"RASTERKUBE_KUBERAY_HEAD_RESOURCES": '{"cpu": "1"}'}, ["RASTERKUBE_KUBERAY_HEAD_RESOURCES", "requests"]),
        ({"RASTERKUBE_KUBERAY_IMAGE_PULL_SECRETS": '"regcred"'}, ["RASTERKUBE_KUBERAY_IMAGE_PULL_SECRETS"]),
        (
            {"RASTERKUBE_RAY_VERSION": "2.60.0", "RASTERKUBE_KUBERAY_RAY_VERSION": "2.59.0"},
            ["RASTERKUBE_RAY_VERSION", "RASTERKUBE_KUBERAY_RAY_VERSION", "disagree"],
        ),
    ],
)
def test_from_env_errors_name_the_variable(env: dict[str, str], words: list[str]) -> None:
    with pytest.raises(KubeRaySettingsError) as err:
        KubeRaySettings.from_env(env)
    for word in words:
        assert word in str(err.value)


# ----------------------------------------------------------------------------- unschedulable Ray pods

UNSCHEDULABLE_SINCE = "2026-01-01T00:00:00Z"


def _pending_pod(name: str, message: str, limits: dict[str, Any], requests: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "ray-worker", "resources": {"limits": limits, "requests": requests}}]},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason":
                   "Unschedulable", "message": message, "lastTransitionTime": UNSCHEDULABLE_SINCE}]},
    }  # fmt: skip


def _node(cpu: str, memory: str, gpus: str | None = None) -> dict[str, Any]:
    allocatable = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": gpus} if gpus else {})}
    return {"status": {"allocatable": allocatable}}


def test_gpus_no_node_has_fail_after_the_bound_naming_the_request() -> None:
    from rasterkube_operator.backends.kuberay_manifests import unschedulable_pods, unschedulable_status

    message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    pods = [_pending_pod("w", message, {"nvidia.com/gpu": 1, "memory": "4Gi"}, {"cpu": "1", "memory": "4Gi"}),
            {"metadata": {"name": "head"}, "status": {"phase": "Running"}}]  # fmt: skip
    problems = unschedulable_pods(pods)
    assert [p.pod for p in problems] == ["w"] and problems[0].gpus == 1
    settings = KubeRaySettings(unschedulable_timeout_s=60)
    since = datetime(2026, 1, 1, tzinfo=UTC)
    nodes = [_node("2", "24Gi")]
    early = unschedulable_status(problems, since + timedelta(seconds=30), settings, nodes=nodes)
    assert early.state == JobState.PENDING and early.reason == "Unschedulable"
    assert "nvidia.com/gpu" in early.message and "spec.resources.gpus" in early.message
    late = unschedulable_status(problems, since + timedelta(seconds=61), settings, nodes=nodes)
    assert late.state == JobState.FAILED and late.reason == "Unschedulable" and "gave up after 61s" in late.message


def test_a_pod_waiting_for_capacity_that_exists_keeps_waiting() -> None:
    from rasterkube_operator.backends.kuberay_manifests import unschedulable_pods, unschedulable_status

    pods = [_pending_pod("w", "0/1 nodes are available: 1 Insufficient cpu.", {"memory": "4Gi"},
                         {"cpu": "1", "memory": "4Gi"})]  # fmt: skip
    since = datetime(2026, 1, 1, tzinfo=UTC)
    status = unschedulable_status(unschedulable_pods(pods), since + timedelta(hours=1),
                                  KubeRaySettings(unschedulable_timeout_s=60), nodes=[_node("2", "24Gi")])  # fmt: skip
    assert status.state == JobState.PENDING and "waiting 3600s for capacity" in status.message
    # the same pod where no node could ever fit it: gives up
    too_big = unschedulable_status(unschedulable_pods(pods), since + timedelta(hours=1),
                                   KubeRaySettings(unschedulable_timeout_s=60), nodes=[_node("500m", "24Gi")])  # fmt: skip
    assert too_big.state == JobState.FAILED and "cpu (asks 1, the largest node has 0.5)" in too_big.message
    # nodes unknown (no RBAC to list them): never gives up on its own
    unknown = unschedulable_status(unschedulable_pods(pods), since + timedelta(hours=1),
                                   KubeRaySettings(unschedulable_timeout_s=60), nodes=None)  # fmt: skip
    assert unknown.state == JobState.PENDING


def test_deadline_exceeded_is_its_own_reason() -> None:
    rayjob = {"metadata": {"name": "j"}, "spec": {"activeDeadlineSeconds": 30},
              "status": {"jobDeploymentStatus": "Failed", "jobStatus": "STOPPED", "reason": "DeadlineExceeded"}}  # fmt: skip
    status = map_rayjob_status(rayjob, datetime.now(UTC), KubeRaySettings())
    assert status.state == JobState.FAILED and status.reason == "DeadlineExceeded"
    assert "activeDeadlineSeconds (30s)" in status.message and "STOPPED" in status.message
