"""The operator with the kuberay backend on the dev stack: it creates RayJobs that the real
KubeRay CRDs accept, and follows RayJob status (as KubeRay writes it) into our status.

There are no kubelets here, so nothing runs the RayJob's pods: the test writes the RayJob
status subresource the way the KubeRay operator would.
"""

from __future__ import annotations

import datetime

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from helpers.kube import get, kubectl, wait_for
from helpers.s3server import free_port
from rasterkube_devstack import stack as devstack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NAMESPACE = "default"


@pytest.fixture(scope="module")
def kuberay_operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack.StackInfo]:
    directory = tmp_path_factory.mktemp("kuberay-stack")
    info = devstack.up(directory, with_operator=False, verbose=False)
    health = free_port()
    env = {**devstack.operator_env(info), "RASTERKUBE_RAY_IMAGE": "rasterkube/rasterkube:test",
           "RASTERKUBE_GPU_NODE_SELECTOR": json.dumps({"pool": "gpu"}),
           "RASTERKUBE_GPU_TOLERATIONS": json.dumps([{"key": "nvidia.com/gpu", "operator": "Exists",
                                                       "effect": "NoSchedule"}])}  # fmt: skip
    cmd = [sys.executable, "-m", "rasterkube.cli", "operator", "--backend", "kuberay", "--storage-root",
           info.storage_root, "--metrics-port", "0", "--health-port", str(health), "--listen-host", "127.0.0.1"]  # fmt: skip
    with open(directory / "kuberay-operator.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=1)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (directory / "kuberay-operator.log").read_text()
                time.sleep(0.3)
        yield info
    finally:
        proc.terminate()
        proc.wait(30)
        devstack.down(directory, verbose=False)


def apply_change_score(info, name: str, gpus: int = 0) -> dict[str, Any]:
    doc = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore",
           "metadata": {"name": name, "namespace": NAMESPACE},
           "spec": {"source": {"uri": info.sample_uri}, "resources": {"gpus": gpus, "workers": 2}}}  # fmt: skip
    kubectl(info, "apply", "-f", "-", input=json.dumps(doc))
    cr = wait_for(info, "changescore", name, lambda o: bool(((o.get("status") or {}).get("job") or {}).get("id")))
    return cr


def set_rayjob_status(info, name: str, status: dict[str, Any]) -> None:
    kubectl(info, "patch", "rayjob", name, "-n", NAMESPACE, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))  # fmt: skip


def reason_is(reason: str):
    def check(o: dict[str, Any]) -> bool:
        conditions = (o.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["reason"] == reason for c in conditions)

    return check


def phase_is(phase: str):
    return lambda o: (o.get("status") or {}).get("phase") == phase


def test_rayjob_created_and_status_followed_to_success(kuberay_operator: devstack.StackInfo) -> None:
    info = kuberay_operator
    cr = apply_change_score(info, "kr-ok", gpus=1)
    jid = cr["status"]["job"]["id"]
    assert cr["status"]["job"]["backend"] == "kuberay"
    rayjob = wait_for(info, "rayjob", jid, lambda o: True)
    owner = rayjob["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("ChangeScore", "kr-ok", cr["metadata"]["uid"])
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("python -m rasterkube.jobs changescore --spec")
    assert spec["shutdownAfterJobFinishes"] is True
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    pod = worker["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert worker["replicas"] == 2
    # KubeRay's lifecycle, written as KubeRay writes it
    # A start time of now: an old one would (rightly) read as a cluster stuck in Initializing.
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    set_rayjob_status(info, jid, {"jobDeploymentStatus": "Initializing", "startTime": now})
    set_rayjob_status(info, jid, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING",
                                  "dashboardURL": "raycluster-head-svc.default:8265"})  # fmt: skip
    running = wait_for(info, "changescore", "kr-ok", reason_is("JobRunning"))
    assert running["status"]["phase"] == "Running"
    assert running["status"]["job"]["dashboardUrl"] == "http://raycluster-head-svc.default:8265"
    set_rayjob_status(info, jid, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    done = wait_for(info, "changescore", "kr-ok", phase_is("Succeeded"))
    assert {c["type"]: c["status"] for c in done["status"]["conditions"]}["Ready"] == "True"
    assert done["status"]["outputs"]["uri"] == "s3://rasterkube/data/default/changescore/kr-ok"


def test_contradictory_running_and_failed_is_failed(kuberay_operator: devstack.StackInfo) -> None:
    info = kuberay_operator
    jid = apply_change_score(info, "kr-deadline")["status"]["job"]["id"]
    wait_for(info, "rayjob", jid, lambda o: True)
    set_rayjob_status(info, jid, {"jobDeploymentStatus": "Failed", "jobStatus": "RUNNING",
                                  "reason": "DeadlineExceeded", "message": "activeDeadlineSeconds exceeded"})  # fmt: skip
    failed = wait_for(info, "changescore", "kr-deadline", phase_is("Failed"))
    stalled = {c["type"]: c for c in failed["status"]["conditions"]}["Stalled"]
    assert stalled["status"] == "True" and "DeadlineExceeded" in stalled["message"]


def test_delete_removes_the_running_rayjob(kuberay_operator: devstack.StackInfo) -> None:
    info = kuberay_operator
    jid = apply_change_score(info, "kr-delete")["status"]["job"]["id"]
    wait_for(info, "rayjob", jid, lambda o: True)
    set_rayjob_status(info, jid, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    wait_for(info, "changescore", "kr-delete", reason_is("JobRunning"))
    kubectl(info, "delete", "changescore", "kr-delete", "--wait=true", "--timeout=60s")
    # KubeRay puts its own finalizer on RayJobs; without its controller the object stays
    # "being deleted" — which is what our delete asked for.
    gone_or_deleting = wait_for(info, "rayjob", jid, lambda o: bool(o["metadata"].get("deletionTimestamp")), 30) \
        if get(info, "rayjob", jid) else None
    assert gone_or_deleting is None or gone_or_deleting["metadata"]["deletionTimestamp"]
