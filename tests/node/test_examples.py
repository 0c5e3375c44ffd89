"""`kubectl apply -f examples/` on the real node, as the README says: every resource runs as a
KubeRay RayJob on real Ray head and worker pods (the chain Mosaic → Prediction with Ray Serve in
the job's cluster → Vectorization, and the ChangeScores), S3 credentials from a Secret by
reference, outputs in the S3 server, status and progress on the resources."""

from __future__ import annotations

import json
import yaml

from rasterkube import geozarr
from rasterkube_operator.backends.kuberay_manifests import CREDENTIAL_ENV_VARS

from conftest import REPO, Cluster
from jobs import Trace, current_rayjob, follow, ray_pods

EXAMPLES = REPO / "examples"
TIMEOUT_S = 60 * 60


def _example_resources() -> list[tuple[str, str]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((doc["kind"].lower(), doc["metadata"]["name"]))
    return found


def test_kubectl_apply_examples_runs_everything_on_ray_pods(operator: Cluster) -> None:
    resources = _example_resources()
    assert {kind for kind, _ in resources} == {"mosaic", "prediction", "changescore", "vectorization"}
    operator.kubectl("apply", "-f", str(EXAMPLES))
    traces = [Trace(kind, name) for kind, name in resources]
    pods_checked: list[str] = []

    def credentials_by_reference(rayjob: dict, pods: list[dict]) -> None:
        _assert_credentials_by_reference(rayjob, pods)
        pods_checked.extend(p["metadata"]["name"] for p in pods)

    follow(operator, traces, TIMEOUT_S, on_pods=credentials_by_reference)
    for trace in traces:
        operator.record(f"{trace.kind}/{trace.name}", {"phase": trace.phase, **trace.seconds()})
    assert pods_checked, "no Ray pod was seen while the jobs ran"
    failed = {f"{t.kind}/{t.name}": (t.obj.get("status") or {}).get("conditions") for t in traces if t.phase != "Succeeded"}
    assert not failed, json.dumps(failed, indent=1)[:4000]
    for trace in traces:
        status = trace.obj["status"]
        assert status["progress"]["percent"] == 100
        assert status["job"]["backend"] == "kuberay" and status["job"].get("dashboardUrl", "").startswith("http://")
        assert trace.workers_running is not None, f"{trace.kind}/{trace.name}: no Ray head+worker pods seen Running"
        uri = status["outputs"]["uri"]
        assert uri.startswith("s3://rasterkube/data/default/"), uri
        if trace.kind != "vectorization":
            info = geozarr.describe(uri)  # the committed store, read back from the S3 server
            assert info.shape[-1] > 0 and info.shape[-2] > 0
    prediction = next(t for t in traces if t.kind == "prediction")
    assert geozarr.describe(prediction.obj["status"]["outputs"]["uri"]).bands == ("no_change", "change")


def _assert_credentials_by_reference(rayjob: dict, pods: list[dict]) -> None:
    text = json.dumps(rayjob)
    assert "rasterkube-dev-only-not-a-secret" not in text, "a credential value in the RayJob"
    for pod in pods:
        env = {e["name"]: e for c in pod["spec"]["containers"] for e in c.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert name in CREDENTIAL_ENV_VARS
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "rasterkube-s3", env
