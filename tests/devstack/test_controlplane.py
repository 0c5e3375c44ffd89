"""End-to-end check of the Docker-free control plane with the real binaries.

Nothing here is skipped: if a binary cannot be built/extracted the test
fails. The first run builds kube-apiserver and etcd from source (tens of
minutes on 2 cores); with a warm cache (``$RASTERKUBE_CACHE`` or
``~/.cache/rasterkube``) the whole module runs in well under a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import rasterkube_operator
import yaml
from rasterkube_devstack import binaries
from rasterkube_devstack.controlplane import COMPONENTS, ControlPlane

pytestmark = [pytest.mark.slow, pytest.mark.integration]

KUBECTL_TIMEOUT_S = 60
GROUP = "devstack.rasterkube.io"
CRD_NAME = f"widgets.{GROUP}"
NAMESPACE = "devstack-e2e"
CRD_NAMESPACE = "devstack-e2e-crd"
CEL_MESSAGE = "minReplicas must not exceed maxReplicas"

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": CRD_NAME},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["minReplicas", "maxReplicas"],
                                "properties": {
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                },
                                "x-kubernetes-validations": [
                                    {"rule": "self.minReplicas <= self.maxReplicas", "message": CEL_MESSAGE}
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str, min_replicas: int, max_replicas: int) -> dict[str, object]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": CRD_NAMESPACE},
        "spec": {"minReplicas": min_replicas, "maxReplicas": max_replicas},
    }


def run_tool(
    binary: Path, args: Sequence[str], plane: ControlPlane, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(binary), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=plane.env(),
        timeout=KUBECTL_TIMEOUT_S,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{binary.name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def kubectl_apply(
    kubectl: Path, plane: ControlPlane, obj: object, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run_tool(kubectl, ["apply", "-f", "-"], plane, stdin=yaml.safe_dump(obj), check=check)


@pytest.fixture(scope="module")
def kubectl() -> Path:
    return binaries.ensure_kubectl()


@pytest.fixture(scope="module")
def helm() -> Path:
    return binaries.ensure_helm()


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    # Build/fetch first so the build time is not counted as startup time.
    binaries.ensure_etcd()
    binaries.ensure_kube_apiserver()
    control_plane = ControlPlane(tmp_path_factory.mktemp("controlplane"))
    with control_plane:
        yield control_plane


def test_binaries_are_pinned_versions(kubectl: Path, helm: Path) -> None:
    apiserver = binaries.ensure_kube_apiserver()
    etcd = binaries.ensure_etcd()
    version = subprocess.run([str(apiserver), "--version"], capture_output=True, text=True, check=True)
    assert f"v{binaries.KUBERNETES_VERSION}" in version.stdout
    version = subprocess.run([str(etcd), "--version"], capture_output=True, text=True, check=True)
    assert f"etcd Version: {binaries.ETCD_VERSION}" in version.stdout
    # Second call is a cache hit returning the very same file.
    assert binaries.ensure_kubectl() == kubectl
    assert kubectl.name == f"kubectl-{binaries.KUBECTL_VERSION}"
    assert helm.name == f"helm-{binaries.HELM_VERSION}"


def test_kubeconfig_and_server_version(plane: ControlPlane, kubectl: Path) -> None:
    assert plane.startup_seconds is not None and plane.startup_seconds < 60
    out = run_tool(kubectl, ["version", "-o", "json"], plane).stdout
    assert json.loads(out)["serverVersion"]["gitVersion"] == f"v{binaries.KUBERNETES_VERSION}"
    # TLS is verified against our CA (no insecure-skip-tls-verify).
    config = yaml.safe_load(plane.kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    assert cluster["certificate-authority-data"] and "insecure-skip-tls-verify" not in cluster
    assert cluster["server"].startswith("https://127.0.0.1:")
    run_tool(kubectl, ["get", "namespace", "default"], plane)


def test_namespace_and_core_objects(plane: ControlPlane, kubectl: Path) -> None:
    run_tool(kubectl, ["create", "namespace", NAMESPACE], plane)
    ns = ["-n", NAMESPACE]
    run_tool(kubectl, ["create", "configmap", "cm", "--from-literal=a=b", *ns], plane)
    run_tool(kubectl, ["create", "secret", "generic", "s", "--from-literal=password=x", *ns], plane)
    run_tool(kubectl, ["create", "deployment", "web", "--image=registry.k8s.io/pause:3.10", *ns], plane)
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "leader", "namespace": NAMESPACE},
        "spec": {"holderIdentity": "me", "leaseDurationSeconds": 15},
    }
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "web.1", "namespace": NAMESPACE},
        "involvedObject": {"kind": "Deployment", "name": "web", "namespace": NAMESPACE},
        "reason": "Testing",
        "message": "hello",
        "type": "Normal",
    }
    # Pods are accepted because the ServiceAccount admission plugin is off
    # (no controller-manager creates the default ServiceAccount).
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": NAMESPACE},
        "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]},
    }
    for obj in (lease, event, pod):
        kubectl_apply(kubectl, plane, obj)
    out = run_tool(kubectl, ["get", "cm,secret,deploy,lease,event,pod", "-o", "name", *ns], plane).stdout
    for expected in ("configmap/cm", "secret/s", "deployment.apps/web", "lease", "event", "pod/p"):
        assert expected in out


def test_crd_with_cel_validation(plane: ControlPlane, kubectl: Path) -> None:
    run_tool(kubectl, ["create", "namespace", CRD_NAMESPACE], plane)
    kubectl_apply(kubectl, plane, CRD)
    run_tool(kubectl, ["wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s"], plane)

    kubectl_apply(kubectl, plane, widget("ok", 1, 3))
    got = json.loads(run_tool(kubectl, ["get", "widget", "ok", "-n", CRD_NAMESPACE, "-o", "json"], plane).stdout)
    assert got["spec"] == {"minReplicas": 1, "maxReplicas": 3}

    rejected = kubectl_apply(kubectl, plane, widget("bad", 5, 2), check=False)
    assert rejected.returncode != 0
    assert CEL_MESSAGE in rejected.stderr
    missing = run_tool(kubectl, ["get", "widget", "bad", "-n", CRD_NAMESPACE], plane, check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


def test_helm_runs_against_cluster(plane: ControlPlane, helm: Path) -> None:
    version = run_tool(helm, ["version"], plane).stdout
    assert f"v{binaries.HELM_VERSION}" in version
    # Talks to the apiserver (lists release Secrets) using the kubeconfig.
    run_tool(helm, ["list", "--all-namespaces"], plane)


def test_stop_from_another_process(plane: ControlPlane) -> None:
    pids = plane.pids()
    assert set(pids) == set(COMPONENTS)
    assert all(_alive(pid) for pid in pids.values())

    # A fresh interpreter that only knows the directory must be able to stop it.
    package_root = Path(rasterkube_operator.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from pathlib import Path; from rasterkube_devstack.controlplane import stop; stop(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(plane.directory)], env=env, check=True, timeout=120)

    assert not any(_alive(pid) for pid in pids.values())
    assert not plane.is_running()
    assert plane.pids() == {}
    plane.stop()  # idempotent; reaps our (already dead) children
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for this test process to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
