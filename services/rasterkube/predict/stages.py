"""Stage timings of the Prediction pipeline (issue 15): where the core-seconds go.

Each block task times its stages (read, pad/cut, transfer to the replica, waiting for and
receiving predictions, merge, write) and each model call its replica time; all of it is cheap
(two clock reads per stage) and always on. The records leave the workers only when
``RASTERKUBE_STAGE_TIMES`` names a directory (a debug side channel the benchmarks use): each
block task writes one small JSON file there, and the job adds their sum to its summary.

CPU is ``time.process_time`` (all threads of the process: zarr decodes and torch computes in
threads of their own), wall is ``time.perf_counter``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

ENV_STAGE_TIMES: Final = "RASTERKUBE_STAGE_TIMES"

READ: Final = "read"
CUT: Final = "padCut"
SEND: Final = "transferToReplica"
RECEIVE: Final = "transferBack"  # this task's CPU while it waits for and decodes predictions
MODEL: Final = "model"  # the replica's model calls, this task's share of them
MERGE: Final = "merge"
WRITE: Final = "write"
#: Wall seconds of the whole block phase (the driver's ``run_blocks``), in ``counts``.
BLOCK_PHASE_S: Final = "blockPhaseSeconds"
#: A block task's CPU outside its timed stages: Serve's router threads, which encode the
#: requests and decode the replies in the background (transfer, both ways).
UNTIMED: Final = "taskUntimed"
STAGES: Final = (READ, CUT, SEND, MODEL, RECEIVE, MERGE, WRITE, UNTIMED)


@dataclass
class StageTimes:
    """CPU and wall seconds per stage, plus counters (patches, pixels, model calls)."""

    cpu: dict[str, float] = field(default_factory=dict)
    wall: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    _open: list[tuple[str, tuple[float, float]]] = field(default_factory=list, repr=False, compare=False)

    def add(self, stage: str, cpu_s: float, wall_s: float) -> None:
        self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu_s
        self.wall[stage] = self.wall.get(stage, 0.0) + wall_s

    def count(self, name: str, n: float) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + n

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Time ``stage``; a stage timed inside another pauses the outer one (no double count)."""
        now = (time.process_time(), time.perf_counter())
        if self._open:
            outer, (cpu, wall) = self._open[-1]
            self.add(outer, now[0] - cpu, now[1] - wall)
        self._open.append((stage, now))
        try:
            yield
        finally:
            _, (cpu, wall) = self._open.pop()
            end = (time.process_time(), time.perf_counter())
            self.add(stage, end[0] - cpu, end[1] - wall)
            if self._open:
                self._open[-1] = (self._open[-1][0], end)

    def merge(self, other: StageTimes) -> StageTimes:
        for stage in other.cpu:
            self.add(stage, other.cpu[stage], other.wall.get(stage, 0.0))
        for name, n in other.counts.items():
            self.count(name, n)
        return self

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {"cpu": dict(self.cpu), "wall": dict(self.wall), "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, float]]) -> StageTimes:
        return cls(dict(data.get("cpu", {})), dict(data.get("wall", {})), dict(data.get("counts", {})))


def per_megapixel(times: StageTimes, megapixels: float) -> dict[str, float]:
    """Core-seconds per megapixel of output, per stage, in pipeline order."""
    if megapixels <= 0:
        raise ValueError(f"megapixels must be positive, got {megapixels}")
    return {s: times.cpu[s] / megapixels for s in STAGES if s in times.cpu}


def side_channel() -> Path | None:
    """The directory block tasks write their timings to, or None (the default: nothing written)."""
    value = os.environ.get(ENV_STAGE_TIMES)
    return Path(value) if value else None


def record(times: StageTimes, run: str) -> None:
    """Write one block task's timings to the side channel, if one is set."""
    root = side_channel()
    if root is None:
        return
    folder = root / run
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{uuid.uuid4().hex}.json").write_text(json.dumps(times.to_dict()))


def collect(run: str) -> StageTimes | None:
    """The sum of every block task's timings of ``run`` (None without a side channel)."""
    root = side_channel()
    if root is None:
        return None
    total = StageTimes()
    for path in sorted((root / run).glob("*.json")):
        total.merge(StageTimes.from_dict(json.loads(path.read_text())))
    return total
