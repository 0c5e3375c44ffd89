"""Names shared by the library, the jobs and the operator: one place, no magic strings."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

GROUP: Final = "rasterkube.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
CATEGORY: Final = "rasterkube"


class Kind(StrEnum):
    MOSAIC = "Mosaic"
    PREDICTION = "Prediction"
    CHANGE_SCORE = "ChangeScore"
    VECTORIZATION = "Vectorization"

    @property
    def plural(self) -> str:
        return self.value.lower() + "s"

    @property
    def singular(self) -> str:
        return self.value.lower()


class Phase(StrEnum):
    PENDING = "Pending"
    WAITING = "Waiting"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TERMINAL_PHASES: Final = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class ConditionType(StrEnum):
    """kstatus condition types, understood by Argo CD, Flux and `kubectl wait`."""

    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"


class Reason(StrEnum):
    """Constant reasons for conditions and Kubernetes events."""

    CREATED = "Created"
    WAITING_FOR_SOURCE = "WaitingForSource"
    QUEUED = "Queued"
    JOB_SUBMITTED = "JobSubmitted"
    JOB_RUNNING = "JobRunning"
    JOB_SUCCEEDED = "JobSucceeded"
    JOB_FAILED = "JobFailed"
    JOB_STOPPED = "JobStopped"
    #: The job's pods cannot be placed on any node (e.g. GPUs asked for that no node has), or
    #: Ray cannot place its tasks or model replicas (no node offers what they ask for, or
    #: none has it free): while it waits, and when it failed after the wait's bound.
    UNSCHEDULABLE = "Unschedulable"
    #: The job ran longer than the backend's deadline (KubeRay activeDeadlineSeconds).
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    INVALID_SPEC = "InvalidSpec"
    SOURCE_FAILED = "SourceFailed"
    SUCCEEDED = "Succeeded"


# The data variable every raster store carries (DESIGN §3).
DATA_VAR: Final = "variables"
COUNT_VAR: Final = "count"
DIMS: Final = ("time", "band", "y", "x")

# Environment variables read by jobs and runners.
ENV_STORAGE_ROOT: Final = "RASTERKUBE_STORAGE_ROOT"
ENV_RAY_ADDRESS: Final = "RAY_ADDRESS"
DEFAULT_STORAGE_ROOT: Final = "./rasterkube-data"

#: Default of ``spec.resources.schedulingTimeoutSeconds``: long enough for an autoscaler to
#: add a node (minutes on a cloud), short against the 16 silent minutes a user once waited.
DEFAULT_SCHEDULING_TIMEOUT_S: Final = 600

# Lines a job prints so the operator (reading Ray job logs) can follow it.
PROGRESS_PREFIX: Final = "RASTERKUBE_PROGRESS "
RESULT_PREFIX: Final = "RASTERKUBE_RESULT "
