"""The chart installed for real: the operator Deployment Ready through its probes, non-root with a
read-only root filesystem, and acting with its own ServiceAccount's RBAC (a missing verb fails)."""

from __future__ import annotations

import json
import time

from conftest import OPERATOR_NAMESPACE, RELEASE, Cluster

SERVICE_ACCOUNT = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}"
#: What the operator does, per (verb, resource) — `kubectl auth can-i` as its ServiceAccount.
NEEDED = [
    ("watch", "changescores.rasterkube.dev"), ("patch", "changescores.rasterkube.dev/status"),
    ("patch", "mosaics.rasterkube.dev"), ("create", "events"), ("list", "customresourcedefinitions"),
    ("create", "rayjobs.ray.io"), ("delete", "rayjobs.ray.io"), ("get", "rayclusters.ray.io"), ("list", "pods"),
]  # fmt: skip
#: What it must not be able to do (it is not an admin).
NOT_GRANTED = [("get", "secrets"), ("delete", "pods"), ("create", "rayclusters.ray.io"), ("delete", "nodes"),
               ("create", "clusterrolebindings")]  # fmt: skip


def _operator_pod(cluster: Cluster) -> dict:
    (pod,) = [p for p in cluster.items("pods", OPERATOR_NAMESPACE, "app.kubernetes.io/component=operator")
              if not p["metadata"].get("deletionTimestamp")]  # fmt: skip
    return pod


def test_operator_deployment_is_ready_through_its_probes_non_root_read_only(operator: Cluster) -> None:
    deployment = operator.get("deployment", RELEASE, OPERATOR_NAMESPACE)
    assert deployment and deployment["status"].get("readyReplicas") == 1
    pod = _operator_pod(operator)
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"]
    assert ready == "True"
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["image"] == operator.info.image
    assert pod["spec"]["serviceAccountName"] == RELEASE
    exec_ = ["-n", OPERATOR_NAMESPACE, "exec", pod["metadata"]["name"], "--", "python", "-c"]
    probe = ("import os, sys; print(os.getuid(), os.getgid());"
             "\ntry:\n open('/opt/rasterkube/x', 'w')\n print('writable')\nexcept OSError as e:\n print('read-only', e.errno)")  # fmt: skip
    out = operator.kubectl(*exec_, probe).stdout.split()
    assert out[:2] == ["10001", "10001"] and out[2] == "read-only"


def test_operator_has_exactly_its_service_accounts_rights(operator: Cluster) -> None:
    for verb, resource in NEEDED:
        proc = operator.kubectl("auth", "can-i", verb, resource, f"--as={SERVICE_ACCOUNT}", "-A", check=False)
        assert proc.stdout.strip() == "yes", (verb, resource, proc.stdout, proc.stderr)
    for verb, resource in NOT_GRANTED:
        proc = operator.kubectl("auth", "can-i", verb, resource, f"--as={SERVICE_ACCOUNT}", "-A", check=False)
        assert proc.stdout.strip() == "no", (verb, resource)


def test_a_missing_verb_in_the_chart_fails_visibly(operator: Cluster) -> None:
    """The operator runs with the chart's RBAC, not as an admin: without `patch` on the status
    subresource it cannot report anything, and says why in its log."""
    role = operator.get("clusterrole", RELEASE)
    assert role is not None
    crippled = json.loads(json.dumps(role))
    for rule in crippled["rules"]:
        if any(r.endswith("/status") for r in rule.get("resources", [])):
            rule["verbs"] = [v for v in rule["verbs"] if v not in ("patch", "update")]
    for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
        crippled["metadata"].pop(key, None)
    name = "rbac-probe"
    source = "s3://rasterkube/samples/landsat-annual.zarr"
    doc = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore", "metadata": {"name": name},
           "spec": {"source": {"uri": source}, "methods": ["difference"]}}  # fmt: skip
    operator.kubectl("replace", "-f", "-", input=json.dumps(crippled))
    try:
        operator.kubectl("apply", "-f", "-", input=json.dumps(doc))
        time.sleep(20)  # several reconciles (the operator polls every 2 s)
        assert not (operator.get("changescore", name) or {}).get("status"), "status written without the verb"
        assert "403" in operator.operator_logs() or "forbidden" in operator.operator_logs().lower()
    finally:
        restored = json.loads(json.dumps(role))
        for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
            restored["metadata"].pop(key, None)
        operator.kubectl("replace", "-f", "-", input=json.dumps(restored))
    # with the verb back, the same operator (no restart) reports it
    operator.wait("the status once the verb is back", lambda: (operator.get("changescore", name) or {}).get("status"),
                  120)  # fmt: skip
    operator.kubectl("delete", "changescore", name, "--wait=true", "--timeout=120s")
