"""Errors that are the user's to fix: shown as one clear message, never as a traceback."""

from __future__ import annotations

from typing import ClassVar

from rasterkube.constants import Reason


class UserError(ValueError):
    """Bad input: the message names the field and says what to do."""


class ServiceUnavailable(UserError):
    """The kind has no service in this version."""


class ResourceNotFound(UserError, LookupError):
    """No resource (or no output) of that kind and name."""


class ResourceFailed(RuntimeError):
    """A resource's run failed (phase Failed, condition Stalled); the message is its status message."""

    def __init__(self, kind: str, name: str, message: str, status: dict[str, object] | None = None) -> None:
        super().__init__(f"{kind}/{name} failed: {message}")
        self.kind, self.name, self.status = kind, name, status or {}


class WaitTimeout(TimeoutError):
    """A resource did not finish in the time given; it keeps running."""


class SchedulingTimeout(UserError):
    """Ray could not place a job's tasks (or model replicas) within the resource's
    ``spec.resources.schedulingTimeoutSeconds``: the message names what they ask for and
    what the cluster offers. The user's to fix (ask for less, add nodes, wait longer), so it
    is reported like bad input — one message, no traceback — with its own status reason."""

    #: The status reason: the same the kuberay backend gives pods the Kubernetes scheduler
    #: cannot place.
    reason: ClassVar[Reason] = Reason.UNSCHEDULABLE
