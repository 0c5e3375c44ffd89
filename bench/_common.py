"""Shared by the benchmarks: peak RSS of a process tree, and the JSON report."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psutil


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and all its descendants (Ray workers, raylet, job drivers)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRss:
    """Samples a process tree's RSS in a background thread; ``peak`` is in bytes."""

    def __init__(self, pid: int, interval_s: float = 0.05, tree: bool = True) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval_s
        self._tree = tree
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = tree_rss(self._proc) if self._tree else self._proc.memory_info().rss
            except psutil.Error:
                rss = 0
            self.peak = max(self.peak, rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far: busy is user + nice + system +
    irq + softirq over all cores; steal is time the hypervisor gave our vCPUs to others (a
    shared VM's noise, made visible)."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return busy, getattr(t, "steal", 0.0)


def emit(report: dict[str, Any], json_path: str | None) -> None:
    """Print the report as JSON, and write it to ``json_path`` if given."""
    text = json.dumps(report, indent=2)
    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text)


def run_job_process(kind: str, request: dict[str, Any]) -> tuple[float, float]:
    """Run ``python -m rasterkube.jobs <kind>`` on an embedded Ray; (peak RSS MiB, seconds).

    The job's output goes to a file, not a pipe: a pipe nobody reads while we wait would
    block a chatty job once its buffer is full."""
    import os
    import subprocess
    import sys
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single-machine Ray on loopback
    command = [sys.executable, "-m", "rasterkube.jobs", kind, "--spec", json.dumps(request)]
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        with PeakRss(proc.pid) as rss:
            proc.wait()
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            out.seek(0)
            raise SystemExit(f"{kind} job failed ({proc.returncode}): {out.read().decode()[-2000:]}")
    return rss.peak_mib, seconds
