"""Status computed in memory (DESIGN §2, §6): kstatus conditions from the phase.

Pure functions: the reconciler builds the whole new status, compares it with the old one and
writes it once, only when it changed. Conditions follow kstatus so `kubectl wait`, Argo CD and
Flux understand them: Ready=True only when Succeeded; Reconciling=True while work is under
way; Stalled=True when it failed and will not recover without a change to the spec.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rasterkube.constants import ConditionType, Phase, Reason

TRUE, FALSE = "True", "False"


def now_rfc3339(clock: datetime | None = None) -> str:
    return (clock or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Observation:
    """What one reconcile concluded: the phase, why, and the details to show."""

    phase: Phase
    reason: Reason
    message: str
    progress: dict[str, Any] | None = None
    outputs: dict[str, Any] | None = None
    job: dict[str, Any] | None = None
    start_time: str | None = None
    completion_time: str | None = None
    #: What the run cost (rasterkube.runtime.usage.Usage.to_dict()), from the job's result.
    usage: dict[str, Any] | None = None


def _condition(
    ctype: ConditionType, status: str, reason: Reason, message: str, generation: int, previous: list[dict[str, Any]], now: str
) -> dict[str, Any]:
    old = next((c for c in previous if c.get("type") == ctype), None)
    # lastTransitionTime moves only when the condition's status flips.
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now
    return {
        "type": ctype.value,
        "status": status,
        "reason": reason.value,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def conditions_for(obs: Observation, generation: int, previous: list[dict[str, Any]], now: str) -> list[dict[str, Any]]:
    ready = obs.phase == Phase.SUCCEEDED
    stalled = obs.phase == Phase.FAILED
    reconciling = not ready and not stalled
    return [
        _condition(ConditionType.READY, TRUE if ready else FALSE, obs.reason, obs.message, generation, previous, now),
        _condition(
            ConditionType.RECONCILING, TRUE if reconciling else FALSE, obs.reason, obs.message, generation, previous, now
        ),
        _condition(ConditionType.STALLED, TRUE if stalled else FALSE, obs.reason, obs.message, generation, previous, now),
    ]


def build_status(old: dict[str, Any], obs: Observation, generation: int, now: str) -> dict[str, Any]:
    """The complete new status for ``obs``; fields the observation leaves out are carried over."""
    new = copy.deepcopy(old) if old else {}
    new.pop("kopf", None)
    new["observedGeneration"] = generation
    new["phase"] = obs.phase.value
    new["conditions"] = conditions_for(obs, generation, old.get("conditions", []) if old else [], now)
    progress = obs.progress or {"percent": 100 if obs.phase == Phase.SUCCEEDED else 0, "message": obs.message}
    new["progress"] = {"percent": int(progress.get("percent", 0)), "message": str(progress.get("message", ""))[:200]}
    for key, value in (
        ("outputs", obs.outputs),
        ("job", obs.job),
        ("startTime", obs.start_time),
        ("completionTime", obs.completion_time),
        ("usage", obs.usage),
    ):
        if value is not None:
            new[key] = value
    if obs.phase not in (Phase.SUCCEEDED, Phase.FAILED):
        new.pop("completionTime", None)
    if obs.job is not None and obs.usage is None and (old or {}).get("job", {}).get("id") != obs.job.get("id"):
        new.pop("usage", None)  # a new run (spec changed): the last run's cost is not this one's
    return new


def changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when a write is needed. Timestamps alone never force a write."""
    return _strip_times(old or {}) != _strip_times(new)


def _strip_times(status: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in status.items() if k != "kopf"}
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions", [])
    ]
    return out
