"""The one interface every backend implements (DESIGN §4: systems behind small protocols)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from rasterkube.constants import Kind


class BackendName(StrEnum):
    RAY = "ray"
    KUBERAY = "kuberay"


class JobState(StrEnum):
    """Backend-neutral job state; each backend maps its own states onto these."""

    PENDING = "PENDING"  # accepted, not running yet (cluster starting, queued)
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"  # stopped on request (delete, spec change)
    MISSING = "MISSING"  # the backend does not know this job id


TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED})


@dataclass(frozen=True)
class Owner:
    """The custom resource a job belongs to (owner reference for Kubernetes children)."""

    api_version: str
    kind: str
    name: str
    namespace: str
    uid: str
    generation: int


@dataclass(frozen=True)
class JobSpec:
    """Everything a backend needs to start one run of a resource."""

    job_id: str
    owner: Owner
    entrypoint: str
    resources: dict[str, Any]  # the resource's spec.resources (wire form)
    env: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    message: str = ""
    progress: dict[str, Any] | None = None  # {"percent": int, "message": str}
    result: dict[str, Any] | None = None  # the job's RASTERKUBE_RESULT payload
    dashboard_url: str | None = None
    #: A constant reason (rasterkube.constants.Reason value) when the backend knows why a job
    #: waits or failed better than "running"/"failed" (Unschedulable, DeadlineExceeded).
    reason: str | None = None


class Backend(Protocol):
    name: BackendName

    def submit(self, spec: JobSpec) -> str:
        """Start the job; idempotent for the same job id. Returns the dashboard URL (or '')."""

    def status(self, job_id: str, owner: Owner) -> JobStatus: ...

    def stop(self, job_id: str, owner: Owner) -> None:
        """Stop a running job; no error if it is gone or finished."""


_ID_SAFE = re.compile(r"[^a-z0-9-]")


def job_id(kind: Kind | str, name: str, uid: str, generation: int) -> str:
    """Deterministic from uid + generation, so an operator restart finds the same job.

    Valid as a Ray submission id and as a KubeRay RayJob name: ≤ 47 characters (KubeRay
    appends 6 for the cluster name), starting with a letter.
    """
    base = _ID_SAFE.sub("-", f"{Kind(kind).singular[:4]}-{name}".lower())[:30].rstrip("-")
    return f"{base}-{uid.replace('-', '')[:8]}-g{generation}"


def job_entrypoint(kind: Kind | str, request_json: str) -> str:
    """The shell command Ray runs: the same job module ``rasterkube run`` uses."""
    return f"python -m rasterkube.jobs {Kind(kind).singular} --spec {shlex.quote(request_json)}"
