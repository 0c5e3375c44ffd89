"""The generated CRDs on a real kube-apiserver: accepted, and their CEL rules reject bad input."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from rasterkube_devstack import binaries
from rasterkube_devstack.controlplane import ControlPlane

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kubectl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with ControlPlane(tmp_path_factory.mktemp("cp")) as cp:
        cmd = [str(binaries.ensure_kubectl()), "--kubeconfig", str(cp.kubeconfig)]
        subprocess.run([*cmd, "apply", "--server-side", "-f", str(REPO / "crds")], check=True, capture_output=True)
        subprocess.run([*cmd, "wait", "--for=condition=Established", "--timeout=60s", "crd", "-l",
                        "app.kubernetes.io/part-of=rasterkube"], check=True, capture_output=True)  # fmt: skip
        yield cmd


def apply(kubectl: list[str], doc: dict | str) -> subprocess.CompletedProcess[str]:
    # JSON: PyYAML would write the selector's y key bare, which go-yaml reads as true
    text = doc if isinstance(doc, str) else json.dumps(doc)
    return subprocess.run([*kubectl, "apply", "-f", "-"], input=text, capture_output=True, text=True)


def cr(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "rasterkube.dev/v1alpha1", "kind": kind, "metadata": {"name": name, "namespace": "default"},
            "spec": spec}  # fmt: skip


def test_all_crds_established_with_categories(kubectl: list[str]) -> None:
    out = subprocess.run([*kubectl, "api-resources", "--categories=rasterkube", "-o", "name"], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    assert sorted(out) == sorted(f"{p}.rasterkube.dev" for p in ("mosaics", "predictions", "changescores",
                                                                 "vectorizations"))  # fmt: skip


def test_valid_resources_accepted_and_defaulted(kubectl: list[str]) -> None:
    ok = apply(kubectl, cr("ChangeScore", "ok", {"source": {"uri": "s3://b/x.zarr"}, "selector": {"x": [0, 4], "y": [1, 3]}}))
    assert ok.returncode == 0, ok.stderr
    got = yaml.safe_load(subprocess.run([*kubectl, "get", "changescore", "ok", "-o", "yaml"], capture_output=True,
                                        text=True, check=True).stdout)  # fmt: skip
    assert got["spec"]["selector"]["y"] == [1, 3]
    assert got["spec"]["distance"] == "cosine" and got["spec"]["resources"]["cpus"] == 1
    vec = apply(kubectl, cr("Vectorization", "v", {"source": {"changeScoreRef": {"name": "ok"}}, "features": ["a"]}))
    assert vec.returncode == 0, vec.stderr
    model = {"uri": "m.pt2", "features": ["a"], "labels": ["b"]}
    fp16 = apply(kubectl, cr("Prediction", "fp16", {"source": {"mosaicRef": {"name": "m"}}, "model": model,
                                                    "precision": "fp16", "compile": True,
                                                    "serving": {"gpusPerReplica": 1}, "resources": {"gpus": 1}}))
    assert fp16.returncode == 0, fp16.stderr
    pred = apply(kubectl, cr("Prediction", "plain", {"source": {"mosaicRef": {"name": "m"}}, "model": model}))
    assert pred.returncode == 0, pred.stderr
    got = yaml.safe_load(subprocess.run([*kubectl, "get", "prediction", "plain", "-o", "yaml"], capture_output=True,
                                        text=True, check=True).stdout)  # fmt: skip
    assert got["spec"]["precision"] == "fp32" and got["spec"]["compile"] is False


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("ChangeScore", {"source": {}}, "source: set exactly one of mosaicRef, predictionRef, changeScoreRef or uri"),
        ("ChangeScore", {"source": {"changeScoreRef": {"name": "a"}}}, "source: a ChangeScore reads from"),
        ("ChangeScore", {"source": {"uri": "a"}, "distance": "manhattan"}, "Unsupported value: \"manhattan\""),
        ("ChangeScore", {"source": {"uri": "a"}, "selector": {"x": [5, 1]}}, "selector.x: must be [start, stop)"),
        ("Prediction", {"source": {"mosaicRef": {"name": "m"}}, "patchSize": 64, "clipSize": 32,
                        "model": {"uri": "m.pt2", "features": ["a"], "labels": ["b"]}},
         "clipSize: must be less than patchSize/2"),
        ("Prediction", {"source": {"mosaicRef": {"name": "m"}}, "serving": {"gpusPerReplica": 0.5, "maxReplicas": 1,
                                                                           "replicas": 2},
                        "model": {"uri": "m.pt2", "features": ["a"], "labels": ["b"]}},
         "resources.gpus: serving.gpusPerReplica needs GPU workers"),
        ("Prediction", {"source": {"mosaicRef": {"name": "m"}}, "serving": {"maxReplicas": 1, "replicas": 2},
                        "model": {"uri": "m.pt2", "features": ["a"], "labels": ["b"]}},
         "serving.maxReplicas: must be at least replicas"),
        ("Prediction", {"source": {"mosaicRef": {"name": "m"}}, "precision": "fp16", "device": "cpu",
                        "serving": {"gpusPerReplica": 1}, "resources": {"gpus": 1},
                        "model": {"uri": "m.pt2", "features": ["a"], "labels": ["b"]}},
         "precision: fp16 runs on CUDA GPUs only"),
        ("Prediction", {"source": {"mosaicRef": {"name": "m"}}, "precision": "fp16",
                        "model": {"uri": "m.pt2", "features": ["a"], "labels": ["b"]}},
         "precision: fp16 runs on CUDA GPUs only"),
        ("Prediction", {"source": {"mosaicRef": {"name": "m"}}, "precision": "int8",
                        "model": {"uri": "m.pt2", "features": ["a"], "labels": ["b"]}},
         "Unsupported value: \"int8\""),
        ("Vectorization", {"source": {"uri": "a"}, "features": ["a"], "connectivity": 6}, "connectivity: must be 4 or 8"),
        ("Mosaic", {"dataset": "sentinel-2-l2a", "aoi": {"bbox": [1, 0, 0, 1]},
                    "time": {"start": "2020-01-01", "end": "2021-01-01"}}, "aoi.bbox: must be"),
    ],
)
def test_api_server_rejects_with_schema_message(kubectl: list[str], kind: str, spec: dict, message: str) -> None:
    proc = apply(kubectl, cr(kind, "bad", spec))
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_bare_y_key_is_the_yaml_11_trap_documented_on_the_field(kubectl: list[str]) -> None:
    manifest = ("apiVersion: rasterkube.dev/v1alpha1\nkind: ChangeScore\nmetadata: {name: trap}\nspec:\n"
                "  source: {uri: a}\n  selector: {x: [0, 1], %s: [0, 1]}\n")  # fmt: skip
    assert 'unknown field "spec.selector.true"' in apply(kubectl, manifest % "y").stderr
    assert apply(kubectl, manifest % '"y"').returncode == 0
    explain = subprocess.run([*kubectl, "explain", "changescore.spec.selector.y"], capture_output=True, text=True)
    assert "Quote the key" in explain.stdout
