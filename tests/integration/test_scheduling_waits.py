"""Never wait silently (issue 16.5): on a real Ray whose nodes cannot run a job's tasks or
model replicas, the job says what it waits for at once and fails with that reason after
``spec.resources.schedulingTimeoutSeconds``; nothing looks complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.rayhead import ray_head
from helpers.stores import random_series, write_store
from rasterkube import storage
from rasterkube.constants import PROGRESS_PREFIX, RESULT_PREFIX
from rasterkube.errors import SchedulingTimeout
from rasterkube.runtime import scheduling
from rasterkube.runtime.executor import run_blocks
from rasterkube.runtime.progress import CallbackReporter

pytestmark = pytest.mark.integration

RASTERKUBE = str(Path(sys.executable).with_name("rasterkube"))
BOUND_S = 6
NO_CPU = "waiting for resources: 1 CPU per block task; the Ray cluster offers 0 CPU (no node has 1 CPU); nodes: 127.0.0.1"


def change_score(source: str, out: str, bound: int = BOUND_S) -> dict:
    return {
        "apiVersion": "rasterkube.dev/v1alpha1",
        "kind": "ChangeScore",
        "metadata": {"name": "stuck"},
        "spec": {
            "source": {"uri": source},
            "methods": ["difference"],
            "distance": "euclidean",
            "output": {"uri": out},
            "resources": {"schedulingTimeoutSeconds": bound},
        },
    }


@pytest.fixture(scope="module")
def no_cpu_head(tmp_path_factory: pytest.TempPathFactory):
    """A Ray cluster whose only node offers no CPU: the workers that would have them never joined."""
    with ray_head(tmp_path_factory.mktemp("ray0", numbered=True), num_cpus=0) as env:
        yield {k: v for k, v in env.items() if k != "DASHBOARD"}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_store(str(tmp_path_factory.mktemp("src") / "series.zarr"), random_series(3, 2, 32, 32))


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **extra}


def test_job_on_a_cluster_without_cpus_says_why_at_once_and_fails_after_the_bound(
    no_cpu_head: dict[str, str], source: str, tmp_path: Path
) -> None:
    """The job entrypoint the operator runs: its progress lines (which become status) carry the
    reason within seconds; its result names what was asked and what the cluster has."""
    out = str(tmp_path / "scores.zarr")
    request = {"resource": change_score(source, out), "outputUri": out, "sourceUri": source, "runId": "stuck1"}
    cmd = [sys.executable, "-m", "rasterkube.jobs", "changescore", "--spec", json.dumps(request)]
    proc = subprocess.Popen(cmd, env=_env(no_cpu_head), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[tuple[float, str]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append((time.monotonic(), line.strip()))
        proc.wait(timeout=120)
    finally:
        proc.kill()
    stderr = proc.stderr.read() if proc.stderr else ""
    progress = [(t, json.loads(s.removeprefix(PROGRESS_PREFIX))) for t, s in seen if s.startswith(PROGRESS_PREFIX)]
    results = [json.loads(s.removeprefix(RESULT_PREFIX)) for _, s in seen if s.startswith(RESULT_PREFIX)]
    assert proc.returncode == 2, stderr
    started = next(t for t, p in progress if p["message"].startswith("scoring blocks: 0/"))
    waits = [(t, p) for t, p in progress if p.get("reason") == "Unschedulable"]
    assert waits, progress
    waited_at, wait = waits[0]
    assert wait["message"].startswith(NO_CPU), wait
    assert waited_at - started < 10, "the wait is reported within seconds"
    (result,) = results
    assert result["ok"] is False and result["reason"] == "Unschedulable"
    assert result["error"].startswith(f"the block tasks could not be scheduled within {BOUND_S} s "
                                      "(spec.resources.schedulingTimeoutSeconds): 1 CPU per block task; "
                                      "the Ray cluster offers 0 CPU")  # fmt: skip
    assert seen[-1][0] - started < BOUND_S + 20, "it fails soon after the bound"
    assert "Traceback" not in stderr
    assert not storage.exists(out), "nothing that looks complete"


def test_cli_shows_the_wait_and_fails_with_its_reason(no_cpu_head: dict[str, str], source: str, tmp_path: Path) -> None:
    out = str(tmp_path / "scores.zarr")
    manifest = tmp_path / "cs.yaml"
    manifest.write_text(yaml.safe_dump(change_score(source, out, bound=3)))
    proc = subprocess.run([RASTERKUBE, "run", "-f", str(manifest)], env=_env(no_cpu_head), capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    (summary,) = json.loads(proc.stdout)
    assert summary["phase"] == "Failed" and "could not be scheduled within 3 s" in summary["error"]
    assert f"ChangeScore/stuck:   0% {NO_CPU}" in proc.stderr  # a line of its own, even when not a terminal
    assert "error: ChangeScore/stuck: the block tasks could not be scheduled within 3 s" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not storage.exists(out)


def _square_task():  # type: ignore[no-untyped-def]
    """A task function the workers get by value (they cannot import this test module)."""

    def square(x: int) -> int:
        return x * x

    return square


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"num_gpus": 1.0}, "1 CPU, 1 GPU per block task; the Ray cluster offers 2 CPU, 0 GPU (no node has 1 GPU)"),
        ({"memory": 2**40}, "1 CPU, 1024 GiB memory per block task; the Ray cluster offers 2 CPU, "),
    ],
    ids=["gpu", "memory"],
)
def test_requests_no_node_can_meet_are_infeasible(options: dict, expected: str) -> None:
    """A GPU on a CPU-only Ray, more memory than any node has: said at once, failed at the bound."""
    seen: list[tuple[int, str, str | None]] = []
    reporter = CallbackReporter(lambda pct, msg, reason: seen.append((pct, msg, reason)), with_reason=True)
    square = _square_task()
    start = time.monotonic()
    with scheduling.bound(3), pytest.raises(SchedulingTimeout) as err:
        run_blocks(square, [1, 2, 3], num_cpus=1.0, reporter=reporter, message="squaring", **options)
    assert time.monotonic() - start < 15
    waits = [msg for _, msg, reason in seen if reason == "Unschedulable"]
    assert waits and waits[0].startswith(f"waiting for resources: {expected}"), seen
    assert expected in str(err.value)
    # the cluster is free again: the same work without the impossible request runs
    assert run_blocks(square, [1, 2, 3], num_cpus=1.0) == [1, 4, 9]


@pytest.mark.usefixtures("ray_session")
def test_tasks_behind_other_work_say_so_and_fail_after_the_bound() -> None:
    """Every CPU held by other work: the tasks are feasible but wait — said, and bounded."""
    import ray

    @ray.remote(num_cpus=1)
    def hold(seconds: float) -> None:
        time.sleep(seconds)

    square = _square_task()
    holders = [hold.remote(60) for _ in range(2)]  # the session's Ray has 2 CPUs
    try:
        seen: list[tuple[int, str, str | None]] = []
        reporter = CallbackReporter(lambda pct, msg, reason: seen.append((pct, msg, reason)), with_reason=True)
        with scheduling.bound(4), pytest.raises(SchedulingTimeout) as err:
            run_blocks(square, [1, 2], num_cpus=1.0, max_in_flight=2, reporter=reporter)
    finally:
        for ref in holders:
            ray.cancel(ref, force=True)
    waits = [msg for _, msg, reason in seen if reason == "Unschedulable"]
    assert waits and "1 CPU per block task; all in use by other work (the Ray cluster offers 2 CPU, 0 CPU free)" in waits[0]
    assert "wait for the other work to end" in str(err.value)
    assert run_blocks(square, [4], num_cpus=1.0) == [16]


@pytest.mark.usefixtures("ray_session")
def test_a_model_replica_no_node_can_place_fails_with_the_reason() -> None:
    """Serve replicas asking for a GPU on a CPU-only Ray: the reason, not 15 minutes of Serve's
    "Deploying", and the deployment is removed."""
    from rasterkube.predict import serving

    config = serving.ServeConfig(
        model_uri="never-loaded.pt2", model_sha256="0" * 64, softmax=True, device="cuda", max_batch_size=4,
        replicas=1, max_replicas=None, cpus_per_replica=1.0, gpus_per_replica=1.0,
    )  # fmt: skip
    app = config.app_name(False, "gpu-wait")
    seen: list[tuple[str, str | None]] = []
    with scheduling.bound(4), pytest.raises(SchedulingTimeout) as err:
        serving.deploy(config, app, share=False, on_wait=lambda msg, reason: seen.append((msg, reason)))
    expected = "1 CPU, 1 GPU per model replica; the Ray cluster offers 2 CPU, 0 GPU (no node has 1 GPU)"
    assert any(reason == "Unschedulable" and msg.startswith(f"waiting for resources: {expected}") for msg, reason in seen), seen
    assert str(err.value).startswith(f"the model replicas could not be scheduled within 4 s") and expected in str(err.value)
    assert serving.app_status(app)[0] is None, "the deployment that could not start is gone"
