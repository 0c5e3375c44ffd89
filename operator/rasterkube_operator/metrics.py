"""Prometheus metrics of the operator."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

from rasterkube.constants import Kind, Phase
from rasterkube.runtime.usage import Usage

RECONCILES = Counter("rasterkube_reconciles_total", "Reconcile calls by kind and result", ["kind", "result"])
SUBMITTED = Counter("rasterkube_jobs_submitted_total", "Ray jobs submitted", ["kind"])
FINISHED = Counter("rasterkube_jobs_finished_total", "Ray jobs that reached a terminal phase", ["kind", "phase"])
FAILURES = Counter("rasterkube_job_failures_total", "Ray jobs that failed or were stopped", ["kind"])
DURATION = Histogram(
    "rasterkube_job_duration_seconds",
    "From submission to a terminal phase",
    ["kind"],
    buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600),
)
ERRORS = Counter("rasterkube_reconcile_errors_total", "Reconciles that raised (retried)", ["kind"])

# What succeeded runs cost (status.usage), per kind and namespace: each run counted once.
_USAGE_LABELS = ["kind", "namespace"]
USAGE_CPU = Counter("rasterkube_usage_cpu_seconds_total", "CPU-seconds of succeeded runs", _USAGE_LABELS)
USAGE_GPU = Counter("rasterkube_usage_gpu_seconds_total", "GPU-seconds reserved by succeeded runs", _USAGE_LABELS)
USAGE_READ = Counter("rasterkube_usage_read_bytes_total", "Object-store bytes read by succeeded runs", _USAGE_LABELS)
USAGE_WRITTEN = Counter(
    "rasterkube_usage_written_bytes_total", "Object-store bytes written by succeeded runs", _USAGE_LABELS
)
USAGE_REQUESTS = Counter(
    "rasterkube_usage_object_store_requests_total", "Object-store requests of succeeded runs", _USAGE_LABELS
)
USAGE_WALL = Counter("rasterkube_usage_wall_seconds_total", "Wall time of succeeded runs", _USAGE_LABELS)
USAGE_PEAK = Histogram(
    "rasterkube_usage_peak_memory_bytes",
    "Peak resident memory of one process (driver or worker) per succeeded run",
    _USAGE_LABELS,
    buckets=tuple(2.0**p for p in range(26, 40)),  # 64 MiB … 512 GiB
)


class PrometheusMetrics:
    def reconciled(self, kind: Kind, result: str) -> None:
        RECONCILES.labels(kind.value, result).inc()

    def submitted(self, kind: Kind) -> None:
        SUBMITTED.labels(kind.value).inc()

    def finished(self, kind: Kind, phase: Phase, seconds: float | None) -> None:
        FINISHED.labels(kind.value, phase.value).inc()
        if phase != Phase.SUCCEEDED:
            FAILURES.labels(kind.value).inc()
        if seconds is not None:
            DURATION.labels(kind.value).observe(seconds)

    def used(self, kind: Kind, namespace: str, usage: Usage) -> None:
        labels = (kind.value, namespace)
        USAGE_CPU.labels(*labels).inc(usage.cpu_seconds)
        USAGE_GPU.labels(*labels).inc(usage.gpu_seconds)
        USAGE_READ.labels(*labels).inc(usage.bytes_read)
        USAGE_WRITTEN.labels(*labels).inc(usage.bytes_written)
        USAGE_REQUESTS.labels(*labels).inc(usage.object_store_requests)
        USAGE_WALL.labels(*labels).inc(usage.wall_seconds)
        USAGE_PEAK.labels(*labels).observe(usage.peak_memory_bytes)

    def error(self, kind: Kind) -> None:
        ERRORS.labels(kind.value).inc()


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Expose /metrics; port 0 turns metrics off."""
    if port:
        start_http_server(port, addr=host)
