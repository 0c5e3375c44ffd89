"""Usage after running (issue 16.4): arithmetic, measurement, status, metrics and the client's sum."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from rasterkube.client import Client
from rasterkube.constants import Kind
from rasterkube.runtime import usage
from rasterkube.runtime.usage import Usage
from rasterkube_operator import metrics, reconcile
from rasterkube_operator.backends.base import JobState, JobStatus, job_id

from test_reconcile import UID, Clock, FakeBackend, FakeKube, change_score, step  # noqa: I001

A = Usage(cpu_seconds=1.5, gpu_seconds=2.0, peak_memory_bytes=100, bytes_read=10, bytes_written=20,
          object_store_requests=3, wall_seconds=4.0)  # fmt: skip
B = Usage(cpu_seconds=0.5, gpu_seconds=0.0, peak_memory_bytes=300, bytes_read=1, bytes_written=2,
          object_store_requests=1, wall_seconds=1.0)  # fmt: skip


def test_costs_add_and_the_peak_is_the_larger() -> None:
    s = A + B
    assert s == Usage(2.0, 2.0, 300, 11, 22, 4, 5.0)
    assert usage.total([A, B, Usage()]) == s


def test_dict_round_trip_is_camel_case() -> None:
    d = A.to_dict()
    assert d == {"cpuSeconds": 1.5, "gpuSeconds": 2.0, "peakMemoryBytes": 100, "bytesRead": 10, "bytesWritten": 20,
                 "objectStoreRequests": 3, "wallSeconds": 4.0}  # fmt: skip
    assert Usage.from_dict(d) == A
    assert Usage.from_dict(None) == Usage() and Usage.from_dict({"cpuSeconds": 1}).cpu_seconds == 1.0


def _burn(seconds: float) -> bytearray:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return bytearray(64 * 2**20)  # 64 MiB resident while the task runs


def test_a_measured_task_reports_its_cpu_memory_and_gpu_reservation() -> None:
    result, used = usage.measured(_burn, gpus=0.5)(0.2)
    assert len(result) == 64 * 2**20
    assert 0.15 <= used.cpu_seconds < 2.0
    assert used.wall_seconds >= used.cpu_seconds * 0.5
    assert used.gpu_seconds == pytest.approx(0.5 * used.wall_seconds)
    assert used.peak_memory_bytes >= 64 * 2**20


def test_measure_job_sums_tasks_and_adds_the_driver_and_its_wall_time() -> None:
    with usage.measure_job() as acc:
        usage.record(A)
        usage.record(B)
        _burn(0.1)
    got = acc.usage
    assert got.cpu_seconds >= A.cpu_seconds + B.cpu_seconds + 0.09
    assert got.gpu_seconds == 2.0 and got.bytes_read >= 11 and got.object_store_requests >= 4
    assert got.peak_memory_bytes >= 64 * 2**20, "the driver's own peak counts"
    assert 0.1 <= got.wall_seconds < A.wall_seconds + B.wall_seconds, "wall time is the job's, not a sum of tasks"
    usage.record(A)  # outside a job: nowhere to go, no error
    assert acc.usage == got


class RecordingMetrics(reconcile.NoMetrics):
    def __init__(self) -> None:
        self.calls: list[tuple[Kind, str, Usage]] = []

    def used(self, kind: Kind, namespace: str, used: Usage) -> None:
        self.calls.append((kind, namespace, used))


def test_operator_puts_the_jobs_usage_in_status_and_counts_it_once(tmp_path: Path) -> None:
    from helpers.stores import random_series, write_store

    backend, kube, recorded = FakeBackend(), FakeKube(), RecordingMetrics()
    deps = reconcile.Deps(backend=backend, kube=kube, storage_root=str(tmp_path / "root"), clock=Clock(),
                          metrics=recorded)  # fmt: skip
    src = write_store(str(tmp_path / "src.zarr"), random_series(3, 2, 8, 8))
    obj = kube.add(change_score(source={"uri": src}))
    step(kube, deps), step(kube, deps)
    jid = job_id(Kind.CHANGE_SCORE, "cs", UID, 1)
    backend.jobs[jid] = JobStatus(JobState.SUCCEEDED, result={"ok": True, "uri": "s3://out", "summary": {},
                                                               "usage": A.to_dict()})  # fmt: skip
    status = step(kube, deps)
    assert status["usage"] == A.to_dict()
    step(kube, deps), step(kube, deps)  # settled: nothing counted again
    assert recorded.calls == [(Kind.CHANGE_SCORE, "default", A)]
    # a new generation: the old run's cost leaves status until the new run reports its own
    obj["metadata"]["generation"] = 2
    status = step(kube, deps)
    assert status["phase"] == "Pending" and "usage" not in status


def _sample(name: str, labels: dict[str, str]) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_prometheus_usage_counters_per_kind_and_namespace() -> None:
    labels = {"kind": "ChangeScore", "namespace": "usage-test"}
    before = _sample("rasterkube_usage_cpu_seconds_total", labels)
    metrics.PrometheusMetrics().used(Kind.CHANGE_SCORE, "usage-test", A)
    metrics.PrometheusMetrics().used(Kind.CHANGE_SCORE, "usage-test", B)
    assert _sample("rasterkube_usage_cpu_seconds_total", labels) == before + 2.0
    assert _sample("rasterkube_usage_object_store_requests_total", labels) >= 4
    assert _sample("rasterkube_usage_read_bytes_total", labels) >= 11
    assert _sample("rasterkube_usage_written_bytes_total", labels) >= 22
    assert _sample("rasterkube_usage_gpu_seconds_total", labels) >= 2.0
    assert _sample("rasterkube_usage_wall_seconds_total", labels) >= 5.0
    assert _sample("rasterkube_usage_peak_memory_bytes_count", labels) >= 2
    other = {"kind": "ChangeScore", "namespace": "elsewhere"}
    assert _sample("rasterkube_usage_cpu_seconds_total", other) == 0.0


class FakeCustomObjects:
    def __init__(self, items: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
        self.items = items

    def list_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, **kw: Any) -> Any:
        return {"items": self.items.get((namespace, plural), [])}


def test_client_sums_status_usage_by_kind_and_namespace() -> None:
    items = {
        ("default", Kind.CHANGE_SCORE.plural): [{"status": {"usage": A.to_dict()}}, {"status": {"phase": "Running"}}],
        ("default", Kind.MOSAIC.plural): [{"status": {"usage": B.to_dict()}}],
        ("other", Kind.MOSAIC.plural): [{"status": {"usage": A.to_dict()}}],
    }
    client = Client(api=FakeCustomObjects(items))  # type: ignore[arg-type]
    assert client.usage() == A + B
    assert client.usage("ChangeScore") == A
    assert client.usage(Kind.MOSAIC, namespace="other") == A
    assert Client(namespace="empty", api=FakeCustomObjects(items)).usage() == Usage()  # type: ignore[arg-type]
