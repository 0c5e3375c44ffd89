"""The staging key and the block ledger of resumable jobs (rasterkube.staging), on local disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rasterkube import staging, storage
from rasterkube.api import ChangeScore
from rasterkube.grid import Window


def resource(meta: dict[str, Any] | None = None, **spec: Any) -> ChangeScore:
    return ChangeScore.model_validate({
        "apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore",
        "metadata": {"name": "cs", **(meta or {})},
        "spec": {"source": {"uri": "s3://b/src.zarr"}, "methods": ["looMedoid"], **spec},
    })  # fmt: skip


def test_marker_names_round_trip_and_other_names_are_ignored() -> None:
    block = Window(16, 32, 48, 64)
    assert staging.parse_marker(staging.marker_name(block, 1234)) == (block, 1234)
    names = [f"s3://b/x/{staging.marker_name(block, 7)}", "s3://b/x/stage.json", "s3://b/x/1-2-3.4", "tmp-1-2-3-4.x"]
    assert staging.results_from_markers(names) == {block: 7}


def test_stage_key_is_the_same_for_the_same_work_and_differs_for_any_change() -> None:
    inputs = {"source": "zarr.json:size=10|mtime=1.0"}
    key = staging.stage_key(resource(), inputs)
    assert key.resource == "default/cs" and key.generation is None  # no Kubernetes: namespace/name
    assert staging.stage_key(resource(), dict(inputs)).digest == key.digest
    assert staging.stage_key(resource(dataVar="variables"), inputs).digest == key.digest  # a default spelled out
    others = [
        staging.stage_key(resource(robustTimeZScore=True), inputs),  # another spec
        staging.stage_key(resource(), {"source": "zarr.json:size=10|mtime=2.0"}),  # the source committed again
        staging.stage_key(resource({"uid": "u-1", "generation": 1}), inputs),
        staging.stage_key(resource({"uid": "u-1", "generation": 2}), inputs),  # a new generation
        staging.stage_key(resource({"uid": "u-2", "generation": 1}), inputs),  # recreated: another uid
        staging.stage_key(resource({"namespace": "other"}), inputs),
    ]
    digests = {key.digest, *(k.digest for k in others)}
    assert len(digests) == 1 + len(others)
    assert all(len(d) == staging.KEY_CHARS for d in digests)


def _write_store_metadata(uri: str) -> None:
    os.makedirs(uri, exist_ok=True)
    Path(uri, storage.ROOT_METADATA).write_text("{}")


def test_open_stage_resumes_only_the_same_key_and_removes_stale_stagings(tmp_path: Path) -> None:
    final = str(tmp_path / "out.zarr")
    key = staging.stage_key(resource(), {"source": "v1"})
    fresh = staging.open_stage(final, key)
    assert not fresh.resumed and fresh.finished == {}
    assert fresh.uri == str(tmp_path / f".out.zarr{storage.STAGE_MARKER}{key.digest}")
    _write_store_metadata(fresh.uri)
    fresh.begin()
    a, b = Window(0, 8, 0, 8), Window(0, 8, 8, 16)
    fresh.ledger.record(a, 64)
    fresh.ledger.record(b, 60)

    again = staging.open_stage(final, key)
    assert again.resumed and again.uri == fresh.uri and again.finished == {a: 64, b: 60}
    assert again.reused([a, b, Window(8, 16, 0, 8)]) == 2

    other = staging.open_stage(final, staging.stage_key(resource(), {"source": "v2"}))
    assert not other.resumed and other.uri != fresh.uri
    assert not os.path.exists(fresh.uri)  # the old key's blocks are gone, never reused
    # A fresh staging is created by the job; its lock file says a live run (this one) owns it.
    assert [p.name for p in tmp_path.iterdir()] == [f"{Path(other.uri).name}.lock"]


def test_a_staging_without_its_ledger_is_not_resumed(tmp_path: Path) -> None:
    """Killed before the ledger was opened (store half created), or after it was sealed
    (pyramid or commit under way): the staging is emptied and the run starts over."""
    final = str(tmp_path / "out.zarr")
    key = staging.stage_key(resource(), {})
    stage = staging.open_stage(final, key)
    _write_store_metadata(stage.uri)
    assert not staging.open_stage(final, key).resumed and not os.path.exists(stage.uri)

    _write_store_metadata(stage.uri)
    stage.begin()
    stage.ledger.record(Window(0, 1, 0, 1), 1)
    stage.seal()
    assert not os.path.exists(os.path.join(stage.uri, staging.LEDGER_DIR))
    assert not staging.open_stage(final, key).resumed


def test_a_ledger_of_another_key_is_not_trusted(tmp_path: Path) -> None:
    final = str(tmp_path / "out.zarr")
    key = staging.stage_key(resource(), {})
    stage = staging.open_stage(final, key)
    _write_store_metadata(stage.uri)
    stage.begin()
    Path(stage.stage_file).write_text('{"resource": "someone/else"}')
    assert not staging.open_stage(final, key).resumed


def test_object_version_changes_when_the_object_is_written_again(tmp_path: Path) -> None:
    path = tmp_path / "zarr.json"
    assert storage.object_version(str(path)) is None
    path.write_text("{}")
    first = storage.object_version(str(path))
    os.utime(path, (1, 1))  # same bytes, written again later (another commit)
    assert first is not None and storage.object_version(str(path)) not in (None, first)
