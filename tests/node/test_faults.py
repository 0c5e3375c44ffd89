"""Faults on the real node, modelled on KubeRay's own RayJob e2e suite (ray-operator/test/e2erayjob):
the Ray head pod deleted mid-job, a worker pod deleted mid-job, the operator pod deleted mid-run,
GPUs asked for on a node without any, activeDeadlineSeconds exceeded, and deletion through
ownerReferences (the real garbage collector runs here). Each ends Succeeded or with a clear
reason — never with an output that looks complete but is not."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rasterkube import geozarr, storage
from rasterkube.constants import Reason
from rasterkube_operator.backends.kuberay_manifests import GPU_RESOURCE, rayjob_name

from conftest import OPERATOR_NAMESPACE, RELEASE, SUITE_VALUES, CHART, Cluster
from helpers.stores import random_series, write_store
from jobs import Trace, current_rayjob, follow, observe, ray_pods, rayjobs_of

SOURCE = "s3://rasterkube/tests/faults/series.zarr"
OUTPUT = "s3://rasterkube/data/default/changescore/{name}"
JOB_TIMEOUT_S = 15 * 60


@pytest.fixture(scope="module")
def source(operator: Cluster) -> str:
    """Many small blocks: a ChangeScore that runs long enough on the node to be interrupted."""
    if not storage.is_committed(SOURCE):
        write_store(SOURCE, random_series(5, 4, 512, 512, seed=21), chunk=16)
    return SOURCE


def apply_changescore(cluster: Cluster, name: str, source: str, **spec: Any) -> Trace:
    doc = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"source": {"uri": source}, "methods": ["looMedoid"], "distance": "euclidean",
                    "xyBlockMultiplier": 1, **spec}}  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    return Trace("changescore", name)


def wait_running(cluster: Cluster, trace: Trace, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    """Until the Ray job runs (RayJob jobStatus RUNNING) on head and worker pods; returns the RayJob."""

    def check() -> dict[str, Any] | None:
        observe(cluster, trace)
        rayjob = current_rayjob(cluster, trace.obj) if trace.obj else None
        running = rayjob and (rayjob.get("status") or {}).get("jobStatus") == "RUNNING"
        return rayjob if running and trace.workers_running else None

    return cluster.wait(f"{trace.name} to run on Ray pods", check, timeout_s, poll_s=1)


def ready_reason(obj: dict[str, Any]) -> tuple[str, str]:
    ready = {c["type"]: c for c in obj["status"]["conditions"]}["Ready"]
    return ready["reason"], ready["message"]


def cleanup(cluster: Cluster, name: str) -> None:
    cluster.kubectl("delete", "changescore", name, "--ignore-not-found", "--wait=true", "--timeout=180s")


def _pod(cluster: Cluster, rayjob: dict[str, Any], node_type: str) -> str:
    (pod,) = [p for p in ray_pods(cluster, rayjob) if p["metadata"]["labels"].get("ray.io/node-type") == node_type]
    return str(pod["metadata"]["name"])


def test_head_pod_deleted_mid_job_fails_with_a_reason_and_no_output(operator: Cluster, source: str) -> None:
    name = "fault-head"
    trace = apply_changescore(operator, name, source)
    rayjob = wait_running(operator, trace)
    operator.kubectl("delete", "pod", _pod(operator, rayjob, "head"), "--wait=false")
    follow(operator, [trace], JOB_TIMEOUT_S)
    # KubeRay fails the RayJob (SubmissionFailed / JobDeploymentStatusTransitionGracePeriodExceeded);
    # the job might also finish if Ray recovered in time — then its output must be whole.
    if trace.phase == "Succeeded":
        assert geozarr.describe(OUTPUT.format(name=name)).shape[-1] == 512
    else:
        reason, message = ready_reason(trace.obj)
        assert reason == Reason.JOB_FAILED and message, trace.obj["status"]
        assert not storage.is_committed(OUTPUT.format(name=name)), "a failed job left a store that looks complete"
    cleanup(operator, name)


def test_worker_pod_deleted_mid_job_is_retried_to_a_complete_output(operator: Cluster, source: str) -> None:
    name = "fault-worker"
    trace = apply_changescore(operator, name, source)
    rayjob = wait_running(operator, trace)
    operator.kubectl("delete", "pod", _pod(operator, rayjob, "worker"), "--wait=false")
    follow(operator, [trace], JOB_TIMEOUT_S)
    assert trace.phase == "Succeeded", trace.obj["status"]  # KubeRay recreates the worker; Ray retries tasks
    info = geozarr.describe(OUTPUT.format(name=name))
    assert info.shape[-2:] == (512, 512)
    assert len(trace.rayjobs_seen) == 1
    cleanup(operator, name)


def test_operator_pod_deleted_mid_run_gives_one_rayjob_and_one_output(operator: Cluster, source: str) -> None:
    name = "fault-operator"
    trace = apply_changescore(operator, name, source)
    wait_running(operator, trace)
    (pod,) = [p["metadata"]["name"] for p in operator.items("pods", OPERATOR_NAMESPACE, "app.kubernetes.io/component=operator")]
    operator.kubectl("-n", OPERATOR_NAMESPACE, "delete", "pod", pod, "--wait=false")
    operator.wait("a new operator pod Ready", lambda: [
        p for p in operator.items("pods", OPERATOR_NAMESPACE, "app.kubernetes.io/component=operator")
        if p["metadata"]["name"] != pod and p["status"].get("containerStatuses", [{}])[0].get("ready")], 300)  # fmt: skip
    follow(operator, [trace], JOB_TIMEOUT_S)
    assert trace.phase == "Succeeded", trace.obj["status"]
    assert len(rayjobs_of(operator, name)) == 1 and len(trace.rayjobs_seen) == 1, "exactly one RayJob"
    assert storage.is_committed(OUTPUT.format(name=name))
    cleanup(operator, name)


def test_gpus_on_a_node_without_any_are_reported_then_fail_within_the_bound(operator: Cluster, source: str) -> None:
    name = "fault-gpu"
    trace = apply_changescore(operator, name, source, resources={"gpus": 1, "workers": 1})
    started = time.monotonic()

    def says_unschedulable() -> dict[str, Any] | None:
        obj = operator.get("changescore", name) or {}
        conditions = {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}
        reconciling = conditions.get("Reconciling") or {}
        return obj if reconciling.get("reason") == Reason.UNSCHEDULABLE else None

    waiting = operator.wait("the status to name the unschedulable GPU request", says_unschedulable, 300)
    message = {c["type"]: c for c in waiting["status"]["conditions"]}["Reconciling"]["message"]
    assert GPU_RESOURCE in message and "spec.resources.gpus" in message, message
    operator.record("gpu_unschedulable_reported_seconds", round(time.monotonic() - started, 1))
    bound = int(SUITE_VALUES["kuberay.unschedulableTimeoutSeconds"])
    follow(operator, [trace], bound + 180)
    assert trace.phase == "Failed"
    reason, message = ready_reason(trace.obj)
    assert reason == Reason.UNSCHEDULABLE and GPU_RESOURCE in message and "gave up" in message
    job_id = trace.obj["status"]["job"]["id"]
    operator.wait("the RayJob of the given-up job to be deleted", lambda: operator.get("rayjob", rayjob_name(job_id))
                  is None, 180)  # fmt: skip
    assert not storage.is_committed(OUTPUT.format(name=name))
    cleanup(operator, name)


@pytest.fixture()
def short_deadline(operator: Cluster) -> Iterator[int]:
    """The operator re-installed with a 30 s activeDeadlineSeconds, put back afterwards."""
    deadline = 30
    sets = [arg for key, value in SUITE_VALUES.items() for arg in ("--set", f"{key}={value}")]
    base = ["upgrade", RELEASE, str(CHART), "-n", OPERATOR_NAMESPACE, "-f", str(operator.info.values_file), *sets]
    operator.helm(*base, "--set", f"kuberay.activeDeadlineSeconds={deadline}", "--wait", "--timeout", "5m")
    try:
        yield deadline
    finally:
        operator.helm(*base, "--wait", "--timeout", "5m")


def test_active_deadline_exceeded_fails_with_the_reason_and_no_output(operator: Cluster, source: str,
                                                                       short_deadline: int) -> None:  # fmt: skip
    name = "fault-deadline"
    trace = apply_changescore(operator, name, source)
    follow(operator, [trace], JOB_TIMEOUT_S)
    assert trace.phase == "Failed", trace.obj["status"]
    reason, message = ready_reason(trace.obj)
    assert reason == Reason.DEADLINE_EXCEEDED and "activeDeadlineSeconds" in message, message
    assert not storage.is_committed(OUTPUT.format(name=name))
    cleanup(operator, name)


def test_deleting_a_resource_removes_its_rayjob_and_raycluster(operator: Cluster, source: str) -> None:
    # A finished resource: its RayJob outlives the Ray cluster (KubeRay keeps it); deleting the
    # resource removes it through the ownerReference alone (nothing to stop: the garbage collector).
    done = apply_changescore(operator, "gc-finished", "s3://rasterkube/samples/landsat-annual.zarr",
                             methods=["difference"])  # fmt: skip
    follow(operator, [done], JOB_TIMEOUT_S)
    assert done.phase == "Succeeded", done.obj["status"]
    finished_job = rayjob_name(done.obj["status"]["job"]["id"])
    assert operator.get("rayjob", finished_job) is not None
    operator.kubectl("delete", "changescore", "gc-finished", "--wait=true", "--timeout=120s")
    operator.wait("the finished RayJob to be collected", lambda: operator.get("rayjob", finished_job) is None, 180)

    # A running one: the finalizer stops the job, the collector removes RayCluster and pods.
    name = "fault-delete"
    trace = apply_changescore(operator, name, source)
    rayjob = wait_running(operator, trace)
    cluster_name = rayjob["status"]["rayClusterName"]
    operator.kubectl("delete", "changescore", name, "--wait=true", "--timeout=180s")
    operator.wait("the RayJob, RayCluster and Ray pods to be gone", lambda: (
        operator.get("rayjob", rayjob["metadata"]["name"]) is None
        and operator.get("raycluster", cluster_name) is None
        and not operator.items("pods", "default", f"ray.io/cluster={cluster_name}")), 300)  # fmt: skip
    assert not storage.is_committed(OUTPUT.format(name=name))
