"""Progress reporting: jobs print lines the operator parses from Ray job logs."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol, TextIO

from rasterkube.constants import PROGRESS_PREFIX, RESULT_PREFIX


class Reporter(Protocol):
    def progress(self, percent: float, message: str) -> None: ...


class LogReporter:
    """Writes ``RASTERKUBE_PROGRESS {"percent": .., "message": ..}`` lines, throttled."""

    def __init__(self, stream: TextIO | None = None, min_interval_s: float = 1.0) -> None:
        self._stream = stream or sys.stdout
        self._min_interval = min_interval_s
        self._last = (-1.0, -1)

    def progress(self, percent: float, message: str) -> None:
        pct = int(max(0.0, min(100.0, percent)))
        now = time.monotonic()
        if pct < 100 and pct == self._last[1]:
            return
        if pct < 100 and now - self._last[0] < self._min_interval:
            return
        self._last = (now, pct)
        print(PROGRESS_PREFIX + json.dumps({"percent": pct, "message": message}), file=self._stream, flush=True)


class ScaledReporter:
    """Maps a step's 0–100 onto [lo, hi] of the whole job, so progress never goes back."""

    def __init__(self, inner: Reporter, lo: float, hi: float) -> None:
        self._inner, self._lo, self._hi = inner, lo, hi

    def progress(self, percent: float, message: str) -> None:
        self._inner.progress(self._lo + (self._hi - self._lo) * percent / 100.0, message)


class NullReporter:
    def progress(self, percent: float, message: str) -> None:
        return None


class CallbackReporter:
    def __init__(self, callback: Any) -> None:
        self._callback = callback

    def progress(self, percent: float, message: str) -> None:
        self._callback(int(max(0.0, min(100.0, percent))), message)


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
