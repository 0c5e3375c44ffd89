"""Prometheus metrics of the operator."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

from rasterkube.constants import Kind, Phase

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

    def error(self, kind: Kind) -> None:
        ERRORS.labels(kind.value).inc()


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Expose /metrics; port 0 turns metrics off."""
    if port:
        start_http_server(port, addr=host)
