"""Manifest parsing, validation messages and ref resolution (no Ray, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rasterkube.manifests import ManifestError, load
from rasterkube.runner import default_output_uri, plan

HEADER = "apiVersion: rasterkube.dev/v1alpha1\n"


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def cs(name: str, source: str) -> str:
    return f"{HEADER}kind: ChangeScore\nmetadata: {{name: {name}}}\nspec:\n  source: {source}\n"


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ManifestError) as err:
        load([write(tmp_path, text)])
    return err.value.problems


def test_multi_document_and_list(tmp_path: Path) -> None:
    text = cs("a", "{uri: x.zarr}") + "---\n" + cs("b", "{uri: y.zarr}") + "---\n"
    loaded = load([write(tmp_path, text)])
    assert [item.resource.name for item in loaded] == ["a", "b"]
    listed = write(tmp_path, "kind: List\nitems:\n- " + cs("c", "{uri: z}").replace("\n", "\n  ").rstrip() + "\n", "l.yaml")
    assert [i.resource.name for i in load([listed])] == ["c"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: [\n", "not valid YAML at line 2"),
        ("- a\n- b\n", "must be a mapping"),
        (HEADER + "kind: Cluster\nmetadata: {name: a}\n", "kind: 'Cluster' is not a rasterkube kind; use one of Mosaic"),
        ("apiVersion: v1\nkind: ChangeScore\nmetadata: {name: a}\nspec: {source: {uri: a}}\n", "apiVersion: 'v1' must be"),
        (cs("a", "{uri: a}") + "  distance: manhattan\n", "spec.distance: 'manhattan' is not allowed: input should be"),
        (cs("a", "{uri: a}") + "  robustTimeZScore: maybe\n", "spec.robustTimeZScore: input should be a valid boolean"),
        (cs("a", "{uri: a}") + "  xyBlockMultiplier: many\n", "spec.xyBlockMultiplier: input should be a valid integer"),
        (cs("a", "{}"), "spec.source: set exactly one of mosaicRef, predictionRef, changeScoreRef or uri"),
        (HEADER + "kind: ChangeScore\nmetadata: {name: a}\nspec: {}\n", "spec.source: required field is missing"),
        (cs("a", "{uri: a}") + "  colour: red\n", "spec.colour: unknown field"),
        (cs("Bad_Name", "{uri: a}"), "metadata.name: string should match pattern"),
    ],
)
def test_invalid_manifests_name_the_field(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(expected in p for p in found), found
    assert all("Traceback" not in p for p in found)


def test_all_problems_reported_together(tmp_path: Path) -> None:
    text = cs("a", "{}") + "---\n" + cs("b", "{uri: a}") + "  distance: nope\n"
    found = problems(tmp_path, text)
    assert len(found) == 2 and "#1" in found[0] and "#2" in found[1]


def test_duplicate_names(tmp_path: Path) -> None:
    found = problems(tmp_path, cs("a", "{uri: a}") + "---\n" + cs("a", "{uri: b}"))
    assert "names must be unique" in found[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such file"):
        load([tmp_path / "nope.yaml"])


def test_ref_to_nothing(tmp_path: Path) -> None:
    loaded = load([write(tmp_path, cs("a", "{mosaicRef: {name: ghost}}"))])
    with pytest.raises(ManifestError, match=r"spec.source.mosaicRef.name: no Mosaic named 'ghost'"):
        plan(loaded, str(tmp_path / "root"))


def test_refs_ordered_and_resolved_to_outputs(tmp_path: Path) -> None:
    pred = (HEADER + "kind: Prediction\nmetadata: {name: emb}\nspec:\n  source: {uri: in.zarr}\n"
            "  model: {uri: m.pt2, features: [a], labels: [e0]}\n")  # fmt: skip
    # consumer first in the file: the plan still runs the producer first
    loaded = load([write(tmp_path, cs("chg", "{predictionRef: {name: emb}}") + "---\n" + pred)])
    order = plan(loaded, str(tmp_path / "root"))
    assert [p.item.resource.name for p in order] == ["emb", "chg"]
    assert order[1].source_uri == default_output_uri(str(tmp_path / "root"), "default", "Prediction", "emb")
    assert order[1].source_uri.endswith("root/default/prediction/emb")


def test_ref_to_committed_output_of_earlier_run(tmp_path: Path) -> None:
    root = tmp_path / "root"
    produced = Path(default_output_uri(str(root), "default", "Mosaic", "m"))
    produced.mkdir(parents=True)
    (produced / "zarr.json").write_text("{}", encoding="utf-8")
    order = plan(load([write(tmp_path, cs("a", "{mosaicRef: {name: m}}"))]), str(root))
    assert order[0].source_uri == str(produced)


def test_every_shipped_example_is_valid() -> None:
    examples = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))
    assert examples
    for path in examples:
        assert load([path]), path
