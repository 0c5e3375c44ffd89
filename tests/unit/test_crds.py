"""The CRDs are generated from the models, structural, documented, and committed unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from rasterkube import crdgen
from rasterkube.constants import CATEGORY, Kind

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"$ref", "anyOf", "oneOf", "allOf", "$defs", "title", "const"}


@pytest.mark.parametrize("directory", ["crds", "charts/rasterkube/crds"])
@pytest.mark.parametrize("kind", list(Kind))
def test_committed_crds_match_models(directory: str, kind: Kind) -> None:
    path = REPO / directory / crdgen.crd_filename(kind)
    assert path.exists(), f"{path} missing: run `rasterkube crds`"
    assert path.read_text(encoding="utf-8") == crdgen.render(kind), f"{path} drifted: run `rasterkube crds`"


def walk(node: dict[str, Any], path: str, problems: list[str]) -> None:
    bad = FORBIDDEN & node.keys()
    if bad:
        problems.append(f"{path}: non-structural keys {sorted(bad)}")
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    if node.get("exclusiveMinimum") not in (None, True, False):
        problems.append(f"{path}: exclusiveMinimum must be boolean")
    for name, child in node.get("properties", {}).items():
        if not child.get("description"):
            problems.append(f"{path}.{name}: no description")
        walk(child, f"{path}.{name}", problems)
    if "items" in node:
        walk(node["items"], f"{path}[]", problems)


@pytest.mark.parametrize("kind", list(Kind))
def test_schema_is_structural_and_documented(kind: Kind) -> None:
    crd = crdgen.crd_for(kind)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    problems: list[str] = []
    walk(schema["properties"]["spec"], "spec", problems)
    walk(schema["properties"]["status"], "status", problems)
    assert problems == []


@pytest.mark.parametrize("kind", list(Kind))
def test_crd_names_columns_and_status(kind: Kind) -> None:
    crd = crdgen.crd_for(kind)
    names = crd["spec"]["names"]
    assert names["categories"] == [CATEGORY]
    assert names["shortNames"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Progress"] == ".status.progress.percent"
    assert columns["Output"] == ".status.outputs.uri"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"conditions", "observedGeneration", "phase", "progress", "outputs", "job", "startTime",
            "completionTime"} <= status.keys()  # fmt: skip
    assert status["phase"]["enum"] == ["Pending", "Waiting", "Running", "Succeeded", "Failed"]


def test_cel_rules_and_enums_reach_the_crd() -> None:
    spec = crdgen.crd_for(Kind.PREDICTION)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert "self.clipSize * 2 < self.patchSize" in rules
    source_rules = [r["rule"] for r in spec["properties"]["source"]["x-kubernetes-validations"]]
    assert any("filter(x, x).size() == 1" in r for r in source_rules)
    assert spec["properties"]["mergeMode"]["enum"] == ["clip", "weightedAverage"]
    assert spec["properties"]["precision"]["enum"] == ["fp32", "bf16", "fp16"]
    assert spec["properties"]["precision"]["default"] == "fp32" and spec["properties"]["compile"]["default"] is False
    # pydantic's rule on precision, as CEL (the API server's test is tests/devstack/test_crds_apiserver.py)
    assert any("self.precision != 'fp16'" in r and "gpusPerReplica > 0.0" in r for r in rules)
    assert spec["properties"]["patchSize"]["default"] == 256
    # nested defaults are materialised by the API server only when the parent defaults to {}
    assert spec["properties"]["serving"]["default"] == {}
    cpus = spec["properties"]["resources"]["properties"]["cpus"]
    assert cpus["minimum"] == 0 and cpus["exclusiveMinimum"] is True


def test_files_are_valid_yaml_documents() -> None:
    for kind in Kind:
        doc = yaml.safe_load(crdgen.render(kind))
        assert doc["metadata"]["name"] == f"{kind.plural}.rasterkube.dev"


def test_cli_check_detects_drift(tmp_path: Path) -> None:
    from rasterkube.cli import main

    assert main(["crds", "--out", str(tmp_path / "a"), "--copy", str(tmp_path / "b")]) == 0
    assert main(["crds", "--check", "--out", str(tmp_path / "a"), "--copy", str(tmp_path / "b")]) == 0
    (tmp_path / "b" / crdgen.crd_filename(Kind.MOSAIC)).write_text("drift", encoding="utf-8")
    assert main(["crds", "--check", "--out", str(tmp_path / "a"), "--copy", str(tmp_path / "b")]) == 1


def _all_rules(node: Any) -> list[dict[str, str]]:
    found: list[dict[str, str]] = []
    if isinstance(node, dict):
        found.extend(node.get("x-kubernetes-validations", []))
        for value in node.values():
            found.extend(_all_rules(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_all_rules(value))
    return found


@pytest.mark.parametrize("kind", list(Kind))
def test_no_empty_cel_rules(kind: Kind) -> None:
    rules = _all_rules(crdgen.crd_for(kind))
    assert rules and all(r["rule"].strip() and r["message"].strip() for r in rules)


@pytest.mark.parametrize("kind", list(Kind))
def test_yaml_11_boolean_words_are_quoted(kind: Kind) -> None:
    """go-yaml (kubectl, Helm, Argo CD, Flux) reads bare y/n/yes/no/on/off as booleans."""
    import re

    bare = re.compile(r"^\s*(?:- )?(y|Y|n|N|yes|no|on|off|true|false)\s*:", re.MULTILINE)
    assert not bare.findall(crdgen.render(kind))
