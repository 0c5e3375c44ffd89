"""Progress reporting: jobs print lines the operator parses from Ray job logs."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Protocol, TextIO

from rasterkube.constants import PROGRESS_PREFIX, RESULT_PREFIX


class Reporter(Protocol):
    def progress(self, percent: float, message: str, reason: str | None = None) -> None:
        """``reason``: a constant (rasterkube.constants.Reason value) when the job is held up
        rather than working, e.g. ``Unschedulable`` while Ray cannot place its tasks; the
        operator puts it on the status conditions, the CLI always shows such a message."""


class LogReporter:
    """Writes ``RASTERKUBE_PROGRESS {"percent": .., "message": .., "reason": ..}`` lines,
    throttled: one per percent step and interval — except that a message with a reason, or
    the first after one, is never held back (a wait must be seen when it starts and ends)."""

    def __init__(self, stream: TextIO | None = None, min_interval_s: float = 1.0) -> None:
        self._stream = stream or sys.stdout
        self._min_interval = min_interval_s
        self._last: tuple[float, int, str, str | None] = (-math.inf, -1, "", None)

    def progress(self, percent: float, message: str, reason: str | None = None) -> None:
        pct = int(max(0.0, min(100.0, percent)))
        now = time.monotonic()
        last_time, last_pct, last_message, last_reason = self._last
        if reason is not None or last_reason is not None:
            if (pct, message, reason) == (last_pct, last_message, last_reason):
                return
        elif pct < 100 and (pct == last_pct or now - last_time < self._min_interval):
            return
        self._last = (now, pct, message, reason)
        payload: dict[str, Any] = {"percent": pct, "message": message}
        if reason is not None:
            payload["reason"] = reason
        print(PROGRESS_PREFIX + json.dumps(payload), file=self._stream, flush=True)


class ScaledReporter:
    """Maps a step's 0–100 onto [lo, hi] of the whole job, so progress never goes back."""

    def __init__(self, inner: Reporter, lo: float, hi: float) -> None:
        self._inner, self._lo, self._hi = inner, lo, hi

    def progress(self, percent: float, message: str, reason: str | None = None) -> None:
        self._inner.progress(self._lo + (self._hi - self._lo) * percent / 100.0, message, reason=reason)


class NullReporter:
    def progress(self, percent: float, message: str, reason: str | None = None) -> None:
        return None


class CallbackReporter:
    """Calls ``callback(percent, message)``; with ``with_reason`` ``callback(percent, message,
    reason)``."""

    def __init__(self, callback: Any, with_reason: bool = False) -> None:
        self._callback = callback
        self._with_reason = with_reason

    def progress(self, percent: float, message: str, reason: str | None = None) -> None:
        pct = int(max(0.0, min(100.0, percent)))
        if self._with_reason:
            self._callback(pct, message, reason)
        else:
            self._callback(pct, message)


def parse_line(line: str) -> tuple[str, dict[str, Any]] | None:
    """('progress'|'result', payload) for one log line, or None for any other line."""
    for prefix, key in ((PROGRESS_PREFIX, "progress"), (RESULT_PREFIX, "result")):
        if line.startswith(prefix):
            try:
                return key, json.loads(line[len(prefix) :])
            except json.JSONDecodeError:
                return None
    return None


def last_progress(log: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The last progress payload and the result payload found in a job log."""
    progress = result = None
    for line in log.splitlines():
        parsed = parse_line(line.strip())
        if parsed is None:
            continue
        if parsed[0] == "progress":
            progress = parsed[1]
        else:
            result = parsed[1]
    return progress, result
