"""One job entrypoint per kind: ``python -m rasterkube.jobs <kind> --spec <json|path|uri>``.

The same :func:`run_job` runs under ``rasterkube run`` (in-process driver on local Ray or
RAY_ADDRESS), under the Ray Jobs API and under KubeRay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol, cast

from rasterkube.constants import Kind
from rasterkube.errors import ServiceUnavailable
from rasterkube.jobs.context import JobContext, JobRequest, JobResult
from rasterkube.runtime import headwatch, scheduling, usage
from rasterkube.runtime.executor import ensure_ray
from rasterkube.runtime.progress import NullReporter, Reporter



class Service(Protocol):
    """What every service module provides."""

    def preflight(self, resource: Any, request: JobRequest) -> object:
        """Every check that needs the source; raises UserError; writes nothing. What it learns
        (store layout, loaded model signature, STAC search results) is handed to ``run``."""

    def run(self, resource: Any, ctx: JobContext, reporter: Reporter, prepared: Any) -> JobResult: ...


def _change_score() -> ModuleType:
    from rasterkube.change import service

    return service


def _prediction() -> ModuleType:
    from rasterkube.predict import service

    return service


def _mosaic() -> ModuleType:
    from rasterkube.mosaic import service

    return service


def _vectorization() -> ModuleType:
    from rasterkube.vectorize import service

    return service


# Imported lazily so a job only loads what its kind needs (torch, rasterio, ...).
SERVICES: dict[Kind, Callable[[], ModuleType]] = {
    Kind.PREDICTION: _prediction,
    Kind.CHANGE_SCORE: _change_score,
    Kind.MOSAIC: _mosaic,
    Kind.VECTORIZATION: _vectorization,
}


def service_for(kind: Kind) -> Service:
    try:
        return cast(Service, SERVICES[kind]())
    except KeyError:
        available = ", ".join(k.value for k in SERVICES)
        raise ServiceUnavailable(
            f"kind: the {kind.value} service is not available in this version of rasterkube "
            f"(available: {available})"
        ) from None


def run_job(
    request: JobRequest,
    reporter: Reporter | None = None,
    max_in_flight: int | None = None,
    prepared: object | None = None,
) -> JobResult:
    """Validate the request, make sure Ray is up, run the kind's service.

    ``prepared``: the service's preflight result when the caller already checked the request
    (``rasterkube run`` checks every resource before the first one runs), so sources are
    described, models loaded and catalogs searched once."""
    resource = request.parsed()
    service = service_for(request.kind)
    if prepared is None:
        prepared = service.preflight(resource, request)  # before Ray starts and before anything is written
    ensure_ray()
    ctx = JobContext(request=request, reporter=reporter or NullReporter(), max_in_flight=max_in_flight)
    # Every wait for Ray to place this job's tasks or replicas ends at the resource's bound.
    # Usage is measured from here (Ray up, source checked) to the commit.
    # A lost cluster head is reported (and ends this driver) while the job runs: headwatch.
    with (scheduling.bound(resource.spec.resources.scheduling_timeout_seconds), usage.measure_job() as used,
          headwatch.watching()):  # fmt: skip
        result = service.run(resource, ctx, ctx.reporter, prepared)
    return dataclasses.replace(result, usage=used.usage.to_dict())


__all__ = ["JobContext", "JobRequest", "JobResult", "run_job", "service_for"]
