"""The reconciler: one level-triggered function per object, shared by the four kinds.

Each call looks at the object as it is now, decides one step, and returns the observation
the status is computed from (DESIGN §4, §6):

1. invalid spec (checks the CRD schema cannot express) → Failed + Stalled;
2. a ref whose target has not succeeded → Waiting;
3. no job for this generation yet → record the deterministic job id in status (and nothing
   else), so a restarted operator finds it instead of submitting twice;
4. a recorded job the backend does not know → submit it (idempotent for that id);
5. a known job → mirror its state, progress and outputs.

A spec change is a new generation, hence a new job id: the old generation's job is stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from rasterkube import geozarr
from rasterkube.api import RESOURCE_MODELS, Resource
from rasterkube.constants import API_VERSION, ENV_STORAGE_ROOT, TERMINAL_PHASES, Kind, Phase, Reason
from rasterkube.errors import UserError
from rasterkube.jobs import service_for
from rasterkube.jobs.context import JobRequest
from rasterkube.manifests import format_validation_error
from rasterkube.runner import output_uri
from rasterkube.runtime.usage import Usage
from rasterkube.storage import normalize
from rasterkube_operator.backends.base import Backend, JobSpec, JobState, JobStatus, Owner, job_entrypoint, job_id
from rasterkube_operator.status import Observation, build_status, changed, now_rfc3339

log = logging.getLogger(__name__)

EVENT_NORMAL, EVENT_WARNING = "Normal", "Warning"
# Environment passed to jobs: endpoints and roots, never credentials (the Ray cluster has its own).
JOB_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", ENV_STORAGE_ROOT)


class Kube(Protocol):
    """The Kubernetes calls the reconciler makes."""

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None: ...

    def patch_status(self, kind: Kind, namespace: str, name: str, status: dict[str, Any]) -> None: ...

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None: ...


class Metrics(Protocol):
    def reconciled(self, kind: Kind, result: str) -> None: ...

    def submitted(self, kind: Kind) -> None: ...

    def finished(self, kind: Kind, phase: Phase, seconds: float | None) -> None: ...

    def used(self, kind: Kind, namespace: str, usage: Usage) -> None: ...


class NoMetrics:
    def reconciled(self, kind: Kind, result: str) -> None: ...

    def submitted(self, kind: Kind) -> None: ...

    def finished(self, kind: Kind, phase: Phase, seconds: float | None) -> None: ...

    def used(self, kind: Kind, namespace: str, usage: Usage) -> None: ...


class JobSlots:
    """Admission control: at most ``limit`` jobs running at once (0 = no limit).

    In memory: after an operator restart the set refills as reconciles observe the jobs that
    are still running, within one poll interval."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def try_acquire(self, job_id: str) -> bool:
        with self._lock:
            if self.limit and job_id not in self._active and len(self._active) >= self.limit:
                return False
            self._active.add(job_id)
            return True

    def hold(self, job_id: str) -> None:
        with self._lock:
            self._active.add(job_id)

    def release(self, job_id: str) -> None:
        with self._lock:
            self._active.discard(job_id)

    @property
    def running(self) -> int:
        return len(self._active)


@dataclass
class Deps:
    backend: Backend
    kube: Kube
    storage_root: str
    job_env: dict[str, str] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=NoMetrics)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    slots: JobSlots = field(default_factory=JobSlots)


def owner_of(obj: dict[str, Any]) -> Owner:
    meta = obj["metadata"]
    return Owner(
        api_version=obj.get("apiVersion", API_VERSION),
        kind=obj["kind"],
        name=meta["name"],
        namespace=meta.get("namespace", "default"),
        uid=meta["uid"],
        generation=int(meta.get("generation", 1)),
    )


def _parse(obj: dict[str, Any]) -> Resource[Any]:
    meta = obj["metadata"]
    doc = {
        "apiVersion": obj.get("apiVersion", API_VERSION),
        "kind": obj["kind"],
        # uid and generation travel to the job: its staging store is keyed by them
        # (rasterkube.staging), so a retried or resubmitted job resumes, a new generation not.
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace", "default"),
                     **{k: meta[k] for k in ("uid", "generation") if meta.get(k) is not None}},
        "spec": obj.get("spec", {}),
    }
    return RESOURCE_MODELS[Kind(obj["kind"])].model_validate(doc)


@dataclass(frozen=True)
class Waiting:
    message: str


def resolve_source(resource: Resource[Any], kube: Kube, storage_root: str) -> str | Waiting | None:
    """The source URI, a reason to wait, or None for kinds without a source."""
    source = getattr(resource.spec, "source", None)
    if source is None:
        return None
    ref = source.ref
    if ref is None:
        return normalize(source.uri)
    kind, name = ref
    target = kube.get(kind, resource.namespace, name)
    if target is None:
        return Waiting(f"waiting for {kind.value} {name!r}, which does not exist (yet)")
    phase = (target.get("status") or {}).get("phase", Phase.PENDING)
    if phase != Phase.SUCCEEDED:
        extra = "; it failed — fix it and this resource continues" if phase == Phase.FAILED else ""
        return Waiting(f"waiting for {kind.value} {name!r} to succeed (it is {phase}){extra}")
    uri = ((target.get("status") or {}).get("outputs") or {}).get("uri")
    return uri or output_uri(_parse(target), storage_root)


def _request(resource: Resource[Any], source_uri: str | None, deps: Deps, jid: str) -> JobRequest:
    return JobRequest(
        resource=resource.model_dump(by_alias=True, exclude_none=True, mode="json"),
        output_uri=output_uri(resource, deps.storage_root),
        source_uri=source_uri,
        run_id=jid,
    )


def _job_spec(resource: Resource[Any], request: JobRequest, owner: Owner, deps: Deps) -> JobSpec:
    return JobSpec(
        job_id=request.run_id,
        owner=owner,
        entrypoint=job_entrypoint(resource.kind, request.to_json()),
        resources=resource.spec.resources.to_wire(),
        env=dict(deps.job_env),
        metadata={"rasterkube.dev/kind": resource.kind, "rasterkube.dev/namespace": resource.namespace,
                  "rasterkube.dev/name": resource.name, "rasterkube.dev/generation": str(owner.generation)},  # fmt: skip
    )


def reconcile(obj: dict[str, Any], deps: Deps) -> Observation | None:
    """Decide one step for ``obj``; None when there is nothing to do."""
    status = obj.get("status") or {}
    owner = owner_of(obj)
    kind = Kind(owner.kind)
    if status.get("observedGeneration") == owner.generation and status.get("phase") in TERMINAL_PHASES:
        return None
    now = now_rfc3339(deps.clock())
    try:
        resource = _parse(obj)
    except ValidationError as exc:
        return Observation(Phase.FAILED, Reason.INVALID_SPEC, format_validation_error(exc, "spec"), completion_time=now)
    jid = job_id(kind, owner.name, owner.uid, owner.generation)
    job = dict(status.get("job") or {})
    previous_id = job.get("id")
    if previous_id and previous_id != jid and status.get("phase") not in TERMINAL_PHASES:
        log.info("%s/%s: spec changed, stopping job %s", kind.value, owner.name, previous_id)
        deps.backend.stop(previous_id, owner)

    source = resolve_source(resource, deps.kube, deps.storage_root)
    if isinstance(source, Waiting):
        if previous_id == jid:  # already submitted for this generation: keep following the job
            source = None
        else:
            return Observation(Phase.WAITING, Reason.WAITING_FOR_SOURCE, source.message)
    request = _request(resource, source, deps, jid)

    if previous_id != jid:
        try:
            service_for(kind).preflight(resource, request)
        except UserError as exc:
            return Observation(Phase.FAILED, Reason.INVALID_SPEC, str(exc), completion_time=now)
        # Step 3: the id goes into status before anything is submitted.
        job = {"backend": deps.backend.name.value, "id": jid}
        return Observation(Phase.PENDING, Reason.JOB_SUBMITTED, f"submitting job {jid}", job=job, start_time=now)

    state = deps.backend.status(jid, owner)
    if state.state == JobState.MISSING:
        if source is None and getattr(resource.spec, "source", None) is not None:
            # recorded but never submitted, and the source has gone away meanwhile
            return Observation(Phase.WAITING, Reason.WAITING_FOR_SOURCE, "source is no longer available")
        if not deps.slots.try_acquire(jid):
            message = f"queued: {deps.slots.running} jobs running (limit {deps.slots.limit})"
            return Observation(Phase.PENDING, Reason.QUEUED, message, job=_clean(job))
        try:
            url = deps.backend.submit(_job_spec(resource, request, owner, deps))
        except BaseException:
            deps.slots.release(jid)
            raise
        deps.metrics.submitted(kind)
        job["dashboardUrl"] = url or job.get("dashboardUrl")
        return Observation(
            Phase.RUNNING, Reason.JOB_SUBMITTED, f"job {jid} submitted", job=_clean(job),
            progress={"percent": 0, "message": "job submitted"},
        )  # fmt: skip
    return _observe(kind, request, state, job, status, deps, now)


def _clean(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if v is not None}


def _observe(
    kind: Kind, request: JobRequest, state: JobStatus, job: dict[str, Any], status: dict[str, Any], deps: Deps, now: str
) -> Observation:
    if state.dashboard_url:
        job["dashboardUrl"] = state.dashboard_url
    job = _clean(job)
    if state.state in (JobState.PENDING, JobState.RUNNING):
        deps.slots.hold(request.run_id)
        progress = state.progress or {"percent": 0, "message": state.message or state.state.value.lower()}
        reason = Reason.JOB_RUNNING if state.state == JobState.RUNNING else Reason.JOB_SUBMITTED
        message = progress.get("message", "")
        if state.reason:  # the backend knows better why it waits (e.g. pods Unschedulable)
            reason, message = Reason(state.reason), state.message
        elif (held := _reason(progress)) is not None:  # the job is held up (Ray cannot place its tasks)
            reason = held
        return Observation(Phase.RUNNING, reason, message, progress=progress, job=job)
    deps.slots.release(request.run_id)
    duration = _seconds_since(status.get("startTime"), deps.clock())
    if state.state == JobState.SUCCEEDED:
        result = state.result or {}
        if result.get("ok") is False:  # the job printed a user error but exited 0 — never expected
            return Observation(Phase.FAILED, Reason.JOB_FAILED, str(result.get("error")), job=job, completion_time=now)
        outputs = {"uri": result.get("uri") or request.output_uri, "summary": result.get("summary") or _summary(request)}
        deps.metrics.finished(kind, Phase.SUCCEEDED, duration)
        # Backends without the job's result line (no logs) have no usage to report: none is
        # invented. Counted once: this branch runs once per generation (then the phase is terminal).
        usage = Usage.from_dict(result["usage"]).to_dict() if result.get("usage") else None
        if usage is not None:
            deps.metrics.used(kind, request.parsed().namespace, Usage.from_dict(usage))
        return Observation(
            Phase.SUCCEEDED, Reason.SUCCEEDED, f"output committed at {outputs['uri']}", outputs=outputs, job=job,
            completion_time=now, progress={"percent": 100, "message": "done"}, usage=usage,
        )  # fmt: skip
    deps.metrics.finished(kind, Phase.FAILED, duration)
    if state.state == JobState.STOPPED:
        return Observation(Phase.FAILED, Reason.JOB_STOPPED, state.message or "job was stopped", job=job,
                           completion_time=now)  # fmt: skip
    error = (state.result or {}).get("error") or state.message or "job failed"
    reason = Reason(state.reason) if state.reason else _reason(state.result) or Reason.JOB_FAILED
    return Observation(Phase.FAILED, reason, error, job=job, completion_time=now)


def _reason(payload: dict[str, Any] | None) -> Reason | None:
    """The constant reason a job's progress or result line carries (e.g. Unschedulable), if
    it is one this operator knows."""
    value = (payload or {}).get("reason")
    try:
        return Reason(value) if value else None
    except ValueError:
        return None


def _summary(request: JobRequest) -> dict[str, Any]:
    """Outputs summary read back from the committed store (backends without job logs)."""
    try:
        info = geozarr.describe(request.output_uri)
    except UserError:
        return {}
    return {"shape": list(info.shape), "bands": list(info.bands), "crs": info.grid.crs,
            "times": [str(t) for t in info.times.astype("datetime64[D]")]}  # fmt: skip


def _seconds_since(start: str | None, now: datetime) -> float | None:
    if not start:
        return None
    try:
        return (now - datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)).total_seconds()
    except ValueError:
        return None


def apply(obj: dict[str, Any], obs: Observation | None, deps: Deps) -> bool:
    """Write the status once if it changed, and an event when the phase or reason moved."""
    owner = owner_of(obj)
    kind = Kind(owner.kind)
    if obs is None:
        deps.metrics.reconciled(kind, "noop")
        return False
    old = obj.get("status") or {}
    new = build_status(old, obs, owner.generation, now_rfc3339(deps.clock()))
    if not changed(old, new):
        deps.metrics.reconciled(kind, "unchanged")
        return False
    deps.kube.patch_status(kind, owner.namespace, owner.name, new)
    deps.metrics.reconciled(kind, "updated")
    old_ready = next((c for c in old.get("conditions", []) if c.get("type") == "Ready"), {})
    if old.get("phase") != new["phase"] or old_ready.get("reason") != obs.reason.value:
        type_ = EVENT_WARNING if obs.phase == Phase.FAILED else EVENT_NORMAL
        deps.kube.event(obj, type_, obs.reason.value, obs.message[:1000])
    return True


def on_delete(obj: dict[str, Any], deps: Deps) -> None:
    """Finalizer: stop the job of a resource deleted while it runs."""
    status = obj.get("status") or {}
    jid = (status.get("job") or {}).get("id")
    if jid and status.get("phase") not in TERMINAL_PHASES:
        deps.backend.stop(jid, owner_of(obj))
        deps.slots.release(jid)
        deps.kube.event(obj, EVENT_NORMAL, Reason.JOB_STOPPED.value, f"stopped job {jid}: resource deleted")


def job_env_from(environ: dict[str, str]) -> dict[str, str]:
    return {k: environ[k] for k in JOB_ENV_KEYS if environ.get(k)}
