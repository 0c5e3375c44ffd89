"""Resumable jobs (rasterkube.staging): a run killed half way continues from its finished
blocks, and its output equals an uninterrupted run's byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import yaml

from helpers.stores import random_series, write_store
from rasterkube import geozarr, staging, storage
from rasterkube.api import ChangeScore
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest
from rasterkube.provenance import ITEM_FILE
from rasterkube.runtime.progress import CallbackReporter

pytestmark = pytest.mark.integration

RASTERKUBE = str(Path(sys.executable).with_name("rasterkube"))
NAME = "resume"
# 8 × 8 blocks of one 16 px chunk: enough blocks to stop a run between them.
SHAPE = (8, 4, 128, 128)
CHUNK = 16
N_BLOCKS = (SHAPE[2] // CHUNK) * (SHAPE[3] // CHUNK)


def manifest(source: str, **spec: Any) -> dict[str, Any]:
    body = {"source": {"uri": source}, "methods": ["difference", "looMedoid"], "distance": "euclidean",
            "robustTimeZScore": True, "xyBlockMultiplier": 1, **spec}  # fmt: skip
    return {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore", "metadata": {"name": NAME}, "spec": body}


def write_manifest(path: Path, doc: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def run_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def cli_run(manifest_path: str, root: Path, timeout: int = 300) -> dict[str, Any]:
    proc = subprocess.run([RASTERKUBE, "run", "-q", "-f", manifest_path, "--storage-root", str(root)],
                          env=run_env(), capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (outcome,) = json.loads(proc.stdout)
    return dict(outcome)


def output_dir(root: Path) -> Path:
    return root / "default" / "changescore" / NAME


def stagings(root: Path) -> list[Path]:
    parent = output_dir(root).parent
    # Not the lock file beside a staging (it says whether a live run owns it: rasterkube.locks).
    found = sorted(parent.glob(f".{NAME}{storage.STAGE_MARKER}*")) if parent.exists() else []
    return [p for p in found if not p.name.endswith(".lock")]


def ledger_count(root: Path) -> int:
    total = 0
    for stage in stagings(root):
        blocks = stage / staging.LEDGER_DIR / staging.BLOCKS_DIR
        total += len(os.listdir(blocks)) if blocks.is_dir() else 0
    return total


def cli_run_killed_at_half(manifest_path: str, root: Path, timeout_s: float = 300) -> int:
    """Start `rasterkube run`, SIGKILL it (its whole process group: driver and embedded Ray)
    once the ledger holds at least half the blocks; returns how many it held."""
    proc = subprocess.Popen([RASTERKUBE, "run", "-q", "-f", manifest_path, "--storage-root", str(root)],
                            env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        while (done := ledger_count(root)) < N_BLOCKS // 2:
            assert proc.poll() is None, "the run ended before half its blocks were ledgered"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return done


def store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_killed_run_resumes_and_equals_an_uninterrupted_run(tmp_path: Path, ray_session: None) -> None:
    src = write_store(str(tmp_path / "src.zarr"), random_series(*SHAPE, seed=11), chunk=CHUNK)
    spec_path = write_manifest(tmp_path / "cs.yaml", manifest(src))
    # The uninterrupted run: the same spec, in this process (a CLI run costs a Ray start).
    full = run_job(request(src, str(tmp_path / "full.zarr")))
    assert full.summary["blocks"] == N_BLOCKS and full.summary["blocksReused"] == 0
    want = store_files(tmp_path / "full.zarr")

    root = tmp_path / "root"
    ledgered = cli_run_killed_at_half(spec_path, root)
    assert not output_dir(root).exists()  # nothing looks complete before the commit
    assert len(stagings(root)) == 1 and ledger_count(root) >= ledgered

    resumed = cli_run(spec_path, root)
    reused = resumed["outputs"]["summary"]["blocksReused"]
    assert N_BLOCKS // 2 <= reused <= N_BLOCKS
    got = store_files(output_dir(root))
    assert got.keys() == want.keys() and len(got) > N_BLOCKS  # every chunk file, and the metadata
    # The data and its metadata byte for byte; the STAC item records each run (its id, time).
    assert [k for k in got if got[k] != want[k] and k != ITEM_FILE] == []
    got_item, want_item = (json.loads(files[ITEM_FILE])["properties"] for files in (got, want))
    assert got_item["rasterkube:spec_hash"] == want_item["rasterkube:spec_hash"]
    assert stagings(root) == []  # removed by the commit


class Interrupted(Exception):
    """Stands for a fault that ends the driver (not bad input: the staging is kept)."""


def request(src: str, out: str, **spec: Any) -> JobRequest:
    doc = manifest(src, **spec)
    ChangeScore.model_validate(doc)
    return JobRequest(resource=doc, output_uri=out, source_uri=src)


def _stop_at(blocks: int) -> CallbackReporter:
    def progress(_pct: float, message: str) -> None:
        if message.startswith("scoring blocks: ") and int(message.split(": ")[1].split("/")[0]) >= blocks:
            raise Interrupted(message)

    return CallbackReporter(progress)


def test_resume_on_s3_and_a_new_source_commit_starts_over(s3: str, ray_session: None) -> None:
    """The ledger on an object store (markers are PUTs, read back with LIST); a source
    committed again since the interrupted run is another input: nothing is reused."""
    shape = (4, 2, 64, 64)
    src = write_store("s3://rasterkube/resume/src.zarr", random_series(*shape, seed=12), chunk=CHUNK)
    n_blocks = (shape[2] // CHUNK) * (shape[3] // CHUNK)
    full = run_job(request(src, "s3://rasterkube/resume/full.zarr"))
    out = "s3://rasterkube/resume/out.zarr"
    with pytest.raises(Interrupted):
        run_job(request(src, out), _stop_at(n_blocks // 2), max_in_flight=1)
    assert not storage.exists(out)
    resumed = run_job(request(src, out))
    assert n_blocks // 2 <= resumed.summary["blocksReused"] < n_blocks
    assert full.summary["blocksReused"] == 0
    a, b = (geozarr.open_dataset(u)["variables"].values for u in ("s3://rasterkube/resume/full.zarr", out))
    np.testing.assert_array_equal(a, b)
    fs, path = storage.filesystem("s3://rasterkube/resume")
    assert not [k for k in fs.ls(path, refresh=True) if storage.STAGE_MARKER in k]

    with pytest.raises(Interrupted):
        run_job(request(src, out), _stop_at(n_blocks // 2), max_in_flight=1)
    write_store(src, random_series(*shape, seed=13), chunk=CHUNK)  # the source is committed again
    again = run_job(request(src, out))
    assert again.summary["blocksReused"] == 0
    assert not np.array_equal(geozarr.open_dataset(out)["variables"].values, b, equal_nan=True)


def test_a_changed_spec_reuses_nothing_and_removes_the_old_staging(tmp_path: Path, ray_session: None) -> None:
    src = write_store(str(tmp_path / "src.zarr"), random_series(4, 2, 64, 64, seed=14), chunk=CHUNK)
    out = str(tmp_path / "out.zarr")
    with pytest.raises(Interrupted):
        run_job(request(src, out), _stop_at(8), max_in_flight=1)
    (old,) = [p for p in tmp_path.iterdir() if storage.STAGE_MARKER in p.name and not p.name.endswith(".lock")]
    changed = run_job(request(src, out, robustTimeZScore=False))
    assert changed.summary["blocksReused"] == 0
    assert changed.summary["bands"] == ["difference_euclidean_distance", "loo_medoid_euclidean_distance"]
    assert not old.exists() and not [p for p in tmp_path.iterdir() if storage.STAGE_MARKER in p.name]


def _square_and_touch(item: int, calls_dir: str) -> int:
    Path(calls_dir, str(item)).touch()
    return item * item


def test_run_blocks_skips_finished_items_and_ledgers_the_others(tmp_path: Path, ray_session: None) -> None:
    from rasterkube.runtime.executor import run_blocks

    class Ledger:  # the protocol run_blocks needs; records to disk, since tasks run elsewhere
        def __init__(self, where: Path) -> None:
            self.where = str(where)

        def record(self, item: int, result: int) -> None:
            Path(self.where, f"{item}.{result}").touch()

    calls, ledgered = tmp_path / "calls", tmp_path / "ledger"
    calls.mkdir(), ledgered.mkdir()
    messages: list[str] = []
    # Ray's workers cannot import this test module: send its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        results = run_blocks(_square_and_touch, list(range(6)), str(calls), ledger=Ledger(ledgered),
                             finished={1: 100, 4: 400}, reporter=CallbackReporter(lambda _p, m: messages.append(m)),
                             message="blocks")  # fmt: skip
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert results == [0, 100, 4, 9, 400, 25]  # recorded results of the finished ones, in item order
    assert sorted(int(p.name) for p in calls.iterdir()) == [0, 2, 3, 5]
    assert sorted(p.name for p in ledgered.iterdir()) == ["0.0", "2.4", "3.9", "5.25"]
    assert messages[0] == "blocks: 2/6 (2 reused)" and messages[-1] == "blocks: 6/6 (2 reused)"
