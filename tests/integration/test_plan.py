"""``rasterkube plan`` against real runs (issue 16.3): the plan of a manifest file, made before
anything exists, agrees with what ``rasterkube run`` then does and measures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.stores import random_series, write_store
from rasterkube import manifests, runner
from rasterkube.planning import calibration, inputs
from rasterkube.runtime.usage import Usage

pytestmark = pytest.mark.integration

API = "rasterkube.dev/v1alpha1"
REPO = Path(__file__).resolve().parents[2]
RASTERKUBE = str(Path(sys.executable).with_name("rasterkube"))


def _chain(src: str, out: str) -> list[dict]:
    """A ChangeScore and a Vectorization of it (through changeScoreRef): the second is planned
    on the first one's *planned* output."""
    return [
        {"apiVersion": API, "kind": "ChangeScore", "metadata": {"name": "scores"},
         "spec": {"source": {"uri": src}, "methods": ["difference", "looMedoid"], "xyBlockMultiplier": 2,
                  "output": {"uri": f"{out}/scores.zarr"}}},
        {"apiVersion": API, "kind": "Vectorization", "metadata": {"name": "polygons"},
         "spec": {"source": {"changeScoreRef": {"name": "scores"}}, "features": ["loo_medoid_cosine_distance"],
                  "threshold": 0.5, "output": {"uri": f"{out}/polygons.parquet"}}},
    ]  # fmt: skip


@pytest.mark.usefixtures("ray_session")
def test_plan_agrees_with_a_run_on_s3(s3: str, tmp_path: Path) -> None:
    # 4 times × 3 bands, 128×112 px in 16 px chunks: ChangeScore blocks of 32 px → 4 × 4 (the
    # metadata requests per block and per job were measured at 9 and 30 blocks, not here)
    src = write_store("s3://rasterkube/plan/src.zarr", random_series(4, 3, 128, 112, seed=5), chunk=16)
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump_all(_chain(src, "s3://rasterkube/plan")))
    loaded = manifests.load([str(path)])
    root = str(tmp_path / "root")
    scores, polygons = inputs.plan_manifests(loaded, root, calibration.load())  # before anything is written
    assert scores.work.blocks == 16 and polygons.work.blocks == 1
    cs, vec = runner.run_planned(runner.plan(loaded, root))
    assert cs.phase == vec.phase == "Succeeded", (cs.error, vec.error)
    assert scores.work.blocks == cs.outputs["summary"]["blocks"]
    assert polygons.work.blocks == vec.outputs["summary"]["blocks"]
    assert scores.work.output is not None
    assert list(cs.outputs["summary"]["shape"]) == [scores.work.output.times, len(scores.work.output.bands),
                                                     *scores.work.output.shape]  # fmt: skip
    used = Usage.from_dict(cs.usage)
    print(f"planned vs measured: written {scores.work.bytes_written} / {used.bytes_written}, read "
          f"{scores.work.bytes_read} / {used.bytes_read}, requests {scores.work.object_store_requests} / "
          f"{used.object_store_requests}, core-s {scores.core_seconds:.2f} / {used.cpu_seconds:.2f}")  # fmt: skip
    # Written: the chunks (zstd-compressed random floats shrink little; NaN difference of
    # the first step compresses well), plus metadata and the STAC item (a few kB).
    assert scores.work.bytes_written is not None
    assert 0.5 * scores.work.bytes_written <= used.bytes_written <= 1.1 * scores.work.bytes_written + 64 * 2**10, (
        used.bytes_written, scores.work.bytes_written)  # fmt: skip
    # Read: each block's chunks once (uncompressed in the plan), plus metadata.
    assert 0.5 * scores.work.bytes_read <= used.bytes_read <= 1.1 * scores.work.bytes_read + 64 * 2**10, (
        used.bytes_read, scores.work.bytes_read)  # fmt: skip
    # Requests: chunks, markers and commit counted; metadata as measured on other sizes.
    planned = scores.work.object_store_requests
    assert abs(used.object_store_requests / planned - 1) <= 0.1, (used.object_store_requests, planned)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([RASTERKUBE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_plans_a_chain_and_refuses_bad_input(tmp_path: Path) -> None:
    src = write_store(str(tmp_path / "src.zarr"), random_series(3, 2, 64, 48, seed=2), chunk=16)
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump_all(_chain(src, str(tmp_path / "out"))))
    proc = _run(["plan", "-f", str(path)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for text in ("calibration: shipped calibration.json", "ChangeScore/scores", "Vectorization/polygons",
                 "core-hours", "object store"):  # fmt: skip
        assert text in proc.stdout
    assert not (tmp_path / "out").exists(), "plan writes nothing"
    as_json = _run(["plan", "-f", str(path), "--json", "--workers", "4", "--cpus-per-worker", "2"], tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    import json

    first, second = json.loads(as_json.stdout)
    assert first["blocks"] == 4 and first["sizing"]["workers"] == 4 and first["sizing"]["from"] == "command line"
    assert second["kind"] == "Vectorization" and first["calibration"] == second["calibration"]

    missing = _run(["plan", "-f", str(tmp_path / "nope.yaml")], tmp_path)
    assert missing.returncode == 2 and "nope.yaml: no such file" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**_chain(src, "x")[0], "spec": {"source": {"uri": src}, "methods": ["nope"]}}))
    invalid = _run(["plan", "-f", str(bad)], tmp_path)
    assert invalid.returncode == 2 and "spec.methods" in invalid.stderr
    gone = tmp_path / "gone.yaml"
    gone.write_text(yaml.safe_dump(_chain(str(tmp_path / "missing.zarr"), "x")[0]))
    no_source = _run(["plan", "-f", str(gone)], tmp_path)
    assert no_source.returncode == 2 and "spec.source.uri" in no_source.stderr and "missing.zarr" in no_source.stderr
    no_cal = _run(["plan", "-f", str(path), "--calibration", str(tmp_path / "cal.json")], tmp_path)
    assert no_cal.returncode == 2 and "--calibration" in no_cal.stderr
    for proc in (missing, invalid, no_source, no_cal):
        assert "Traceback" not in proc.stderr


def test_client_plans_files_and_dicts(tmp_path: Path) -> None:
    import rasterkube
    from rasterkube.errors import UserError

    src = write_store(str(tmp_path / "src.zarr"), random_series(3, 2, 64, 48, seed=2), chunk=16)
    client = rasterkube.Client(namespace="team", local=True, storage_root=str(tmp_path / "root"), progress=False)
    scores, polygons = client.plan(*_chain(src, str(tmp_path / "out")), workers=2, cpus_per_worker=4)
    assert (scores.namespace, scores.work.blocks, polygons.work.blocks) == ("team", 4, 1)
    assert scores.sizing.cpus == 8 and scores.to_dict()["sizing"]["from"] == "command line"
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump_all(_chain(src, str(tmp_path / "out"))))
    assert [e.work.blocks for e in client.plan(path)] == [4, 1]
    with pytest.raises(UserError, match="spec.features"):
        client.plan({**_chain(src, "x")[1], "spec": {**_chain(src, "x")[1]["spec"], "source": {"uri": src}}})
    assert not (tmp_path / "out").exists() and not (tmp_path / "root").exists()
