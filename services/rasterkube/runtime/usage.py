"""What a run cost, measured (issue 16.4): CPU and GPU seconds, peak memory, object-store
traffic and wall time.

Measured where the work happens, never estimated:

- every block task (:mod:`rasterkube.runtime.executor`) measures its own worker process —
  CPU time from ``getrusage`` deltas (a Ray worker runs one task at a time, so the process's
  delta is the task's, including the threads it starts, e.g. s3fs's I/O loop), peak resident
  memory from the kernel's high-water mark (reset at the task's start where Linux allows, so a
  reused worker does not report an earlier job's peak), object-store requests and bytes from
  a counting layer under s3fs, and GPU-seconds as the GPUs Ray reserved for the task times
  its duration (what the cluster could not give anyone else);
- the job driver measures itself the same way from the job's start to its commit, which
  also gives the wall time.

Usage of a task attempt that failed and was retried by Ray is not counted (its result, and
its measurement, never reach the driver). Model replicas of Ray Serve (Prediction) serve
many jobs at once and are not attributed to one; the block tasks that cut, send and blend
the patches are.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

#: Writing this to /proc/self/clear_refs resets the process's peak RSS (VmHWM) — Linux ≥ 4.0.
_CLEAR_PEAK = "5"
_PROC_STATUS = "/proc/self/status"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"
_KIB = 1024

#: s3fs calls that move object data: the request's body is written, the response's is read.
_WRITE_CALLS = ("put_object", "upload_part")
_READ_CALLS = ("get_object",)


@dataclass(frozen=True)
class Usage:
    """The cost of one task, one job or a sum of jobs. Field names are the status's
    (camelCase in :meth:`to_dict`)."""

    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    #: The largest resident set of any one process of the run (driver or a task's worker):
    #: what one Ray worker needs, not the sum over the cluster.
    peak_memory_bytes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    object_store_requests: int = 0
    wall_seconds: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        """Costs add up; the peak is the larger one. Wall time adds too: the sum of two runs
        took both their times (a job's own wall time is set once, by :func:`measure_job`)."""
        return Usage(
            cpu_seconds=self.cpu_seconds + other.cpu_seconds,
            gpu_seconds=self.gpu_seconds + other.gpu_seconds,
            peak_memory_bytes=max(self.peak_memory_bytes, other.peak_memory_bytes),
            bytes_read=self.bytes_read + other.bytes_read,
            bytes_written=self.bytes_written + other.bytes_written,
            object_store_requests=self.object_store_requests + other.object_store_requests,
            wall_seconds=self.wall_seconds + other.wall_seconds,
        )

    def to_dict(self) -> dict[str, float | int]:
        return {_camel(k): _rounded(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Usage:
        """From :meth:`to_dict`'s form; unknown keys are ignored, missing ones are 0."""
        data = data or {}
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = data.get(_camel(f.name), 0) or 0
            values[f.name] = int(raw) if f.type in ("int", int) else float(raw)
        return cls(**values)


def total(usages: Iterator[Usage] | list[Usage]) -> Usage:
    out = Usage()
    for u in usages:
        out = out + u
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _rounded(value: float | int) -> float | int:
    return round(value, 3) if isinstance(value, float) else value


# --- object-store traffic: a counting layer under s3fs -------------------------------------


class _Counter:
    """Process-wide object-store counters; s3fs calls from its own I/O thread, so locked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0

    def add(self, requests: int = 0, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_read += read
            self.bytes_written += written

    def snapshot(self) -> tuple[int, int, int]:
        with self._lock:
            return self.requests, self.bytes_read, self.bytes_written


COUNTER = _Counter()
_installed = False
_install_lock = threading.Lock()


def _body_size(body: Any) -> int:
    if body is None:
        return 0
    try:
        return len(body)
    except TypeError:  # a file-like body: its size is what is left to send
        return 0


def count_object_store() -> None:
    """Count every request s3fs makes in this process (once per process). All S3 traffic of
    rasterkube goes through s3fs's ``_call_s3``; the counter wraps it rather than asking
    each caller to count."""
    global _installed
    with _install_lock:
        if _installed:
            return
        try:
            import s3fs
        except ImportError:  # no object store support installed: nothing to count
            _installed = True
            return
        original = s3fs.S3FileSystem._call_s3

        async def _counted_call_s3(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
            written = _body_size(kwargs.get("Body")) if method in _WRITE_CALLS else 0
            try:
                out = await original(self, method, *args, **kwargs)
            except BaseException:
                COUNTER.add(requests=1)  # a failed request was still made (and may be billed)
                raise
            read = int(out.get("ContentLength") or 0) if method in _READ_CALLS and isinstance(out, dict) else 0
            COUNTER.add(requests=1, read=read, written=written)
            return out

        s3fs.S3FileSystem._call_s3 = _counted_call_s3
        _installed = True


# --- process counters -----------------------------------------------------------------------


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def reset_peak_memory() -> bool:
    """Reset this process's peak RSS so the next reading is this task's; False where the
    kernel does not allow it (the peak is then the process's lifetime peak)."""
    try:
        with open(_PROC_CLEAR_REFS, "w") as fh:
            fh.write(_CLEAR_PEAK)
        return True
    except OSError:
        return False


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open(_PROC_STATUS) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * _KIB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KIB  # KiB on Linux


@dataclass(frozen=True)
class _Start:
    cpu: float
    wall: float
    store: tuple[int, int, int]


def _start() -> _Start:
    count_object_store()
    reset_peak_memory()
    return _Start(cpu=_cpu_seconds(), wall=time.monotonic(), store=COUNTER.snapshot())


def _since(start: _Start, gpus: float = 0.0) -> Usage:
    requests, read, written = COUNTER.snapshot()
    wall = time.monotonic() - start.wall
    return Usage(
        cpu_seconds=max(0.0, _cpu_seconds() - start.cpu),
        gpu_seconds=gpus * wall,
        peak_memory_bytes=peak_memory_bytes(),
        bytes_read=read - start.store[1],
        bytes_written=written - start.store[2],
        object_store_requests=requests - start.store[0],
        wall_seconds=wall,
    )


@functools.lru_cache(maxsize=128)
def measured(task: Callable[..., Any], gpus: float = 0.0) -> Callable[..., tuple[Any, Usage]]:
    """``task`` as a function that returns ``(result, usage of this call)``; ``gpus``: what
    Ray reserved for it. Cached: the same function for the same task, so the executor's cache
    of remote functions (one pickling per task) keeps working."""

    @functools.wraps(task)
    def run_measured(*args: Any, **kwargs: Any) -> tuple[Any, Usage]:
        start = _start()
        result = task(*args, **kwargs)
        return result, _since(start, gpus)

    return run_measured


# --- the job's accumulator ------------------------------------------------------------------


class Accumulator:
    """The usage of one job as its tasks report it; thread-safe (a TaskGroup may gather
    results while run_blocks does)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usage = Usage()

    def add(self, usage: Usage) -> None:
        with self._lock:
            self._usage = self._usage + usage

    @property
    def usage(self) -> Usage:
        with self._lock:
            return self._usage

    def finish(self, driver: Usage) -> None:
        """Add the driver's own cost; the job's wall time is the driver's, not a sum over tasks."""
        with self._lock:
            tasks = self._usage
            self._usage = Usage(
                cpu_seconds=tasks.cpu_seconds + driver.cpu_seconds,
                gpu_seconds=tasks.gpu_seconds + driver.gpu_seconds,
                peak_memory_bytes=max(tasks.peak_memory_bytes, driver.peak_memory_bytes),
                bytes_read=tasks.bytes_read + driver.bytes_read,
                bytes_written=tasks.bytes_written + driver.bytes_written,
                object_store_requests=tasks.object_store_requests + driver.object_store_requests,
                wall_seconds=driver.wall_seconds,
            )


_current: contextvars.ContextVar[Accumulator | None] = contextvars.ContextVar("rasterkube_usage", default=None)


def record(usage: Usage) -> None:
    """Add a task's usage to the job being measured (nothing when none is)."""
    acc = _current.get()
    if acc is not None:
        acc.add(usage)


@contextlib.contextmanager
def measure_job() -> Iterator[Accumulator]:
    """Measure a job run in this block: its tasks report into the accumulator, and on a
    normal exit the driver's own cost is added and the wall time set. Read ``.usage`` after
    the block."""
    acc = Accumulator()
    token = _current.set(acc)
    start = _start()
    try:
        yield acc
    finally:
        _current.reset(token)
    acc.finish(_since(start))
