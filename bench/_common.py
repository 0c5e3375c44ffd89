"""Shared by the benchmarks: peak RSS of a process tree, and the JSON report."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
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


RAY_WORKER_SCRIPTS = ("default_worker.py", "setup_worker.py")
RAY_AGENT_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def process_label(proc: psutil.Process, root: int) -> str:
    """What a process of a job's tree is: ``driver`` (the job's own process), ``worker`` (a Ray
    worker, whatever task it runs), or the program's name (raylet, gcs_server, Ray's Python
    helpers by script: log_monitor.py, dashboard agents ...)."""
    if proc.pid == root:
        return "driver"
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "gone"
    # A Ray worker is "ray::<task>" once it runs, and setup_worker.py → default_worker.py
    # while it starts (with a runtime_env).
    if cmd and cmd[0] in RAY_AGENT_TITLES:  # Ray's per-node agents title themselves like workers
        return cmd[0].removeprefix("ray::")
    if cmd and (cmd[0].startswith("ray::") or any(a.endswith(RAY_WORKER_SCRIPTS) for a in cmd)):
        return "worker"
    if cmd and "python" in Path(cmd[0]).name:
        script = next((a for a in cmd[1:] if a.endswith(".py")), None)
        if script:
            return Path(script).name
        if "-m" in cmd[:-1]:
            return cmd[cmd.index("-m") + 1]
    return Path(cmd[0]).name if cmd else proc.name()


class Sampler:
    """Calls ``_tick`` every ``interval_s`` in a background thread while used as a context."""

    def __init__(self, interval_s: float) -> None:
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tick(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self._tick()
            time.sleep(self._interval)

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class PeakRss(Sampler):
    """Samples a process tree's RSS in a background thread; ``peak`` is in bytes.

    With ``breakdown=True`` it also keeps, per kind of process (:func:`process_label`), the RSS
    at the moment of the tree's peak (``at_peak``) and the largest RSS any one such process had
    (``largest``): which process holds the memory when it is highest."""

    def __init__(self, pid: int, interval_s: float = 0.05, tree: bool = True, breakdown: bool = False) -> None:
        super().__init__(interval_s)
        self._proc = psutil.Process(pid)
        self._tree = tree
        self._breakdown = breakdown
        self._labels: dict[int, str] = {}
        self.peak = 0
        # PSS (proportional set size) splits a shared page among the processes that map it:
        # Ray's object store is one shared mapping that every worker touches, so summed RSS
        # counts its pages once per worker; summed PSS is what the tree really occupies.
        self.peak_pss = 0
        self.at_peak: dict[str, int] = {}
        self.count_at_peak: dict[str, int] = {}
        self.largest: dict[str, int] = {}

    def _sample(self) -> int:
        if not self._tree:
            return self._proc.memory_info().rss
        if not self._breakdown:
            return tree_rss(self._proc)
        by_label: dict[str, int] = {}
        count: dict[str, int] = {}
        pss = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                full = p.memory_full_info()  # smaps_rollup: RSS and PSS in one read
            except psutil.Error:
                continue
            rss = full.rss
            pss += full.pss
            # A Ray worker renames itself per task (ray::IDLE, ray::score_block): once seen as
            # one it stays "worker". Anything else is labelled afresh: Ray starts its helpers
            # with fork + exec (Popen with a preexec_fn), and a process first seen in between
            # has the driver's command line (or, exiting, none: "python") — a label that stuck
            # to the dashboard or a raylet for the whole run.
            label = self._labels.get(p.pid) or process_label(p, self._proc.pid)
            if label == "worker":
                self._labels[p.pid] = label
            by_label[label] = by_label.get(label, 0) + rss
            count[label] = count.get(label, 0) + 1
            self.largest[label] = max(self.largest.get(label, 0), rss)
        self.peak_pss = max(self.peak_pss, pss)
        total = sum(by_label.values())
        if total > self.peak:
            self.at_peak, self.count_at_peak = by_label, count
        return total

    def _tick(self) -> None:
        try:
            rss = self._sample()
        except psutil.Error:
            rss = 0
        self.peak = max(self.peak, rss)

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)

    @property
    def peak_pss_mib(self) -> float:
        """Peak summed PSS (with ``breakdown`` only; 0 otherwise)."""
        return round(self.peak_pss / 2**20, 1)

    def breakdown_mib(self) -> dict[str, dict[str, float]]:
        """``at_peak`` and ``largest`` in MiB, largest first, and how many processes of each
        kind there were at the peak."""

        def mib(d: dict[str, int]) -> dict[str, float]:
            return {k: round(v / 2**20, 1) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}

        return {"at_peak": mib(self.at_peak), "largest_process": mib(self.largest),
                "processes_at_peak": dict(sorted(self.count_at_peak.items()))}  # fmt: skip


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


@dataclass
class JobRun:
    """A job run in its own process: the tree's peak RSS, wall seconds (Python and Ray start
    included), the job's result line (``usage.wallSeconds``: from Ray up to the commit) and,
    when asked for, the peak's breakdown by process (:class:`PeakRss`)."""

    peak_rss_mib: float
    seconds: float
    result: dict[str, Any]
    breakdown: dict[str, dict[str, float]] | None = None
    #: Peak summed PSS of the tree (with ``breakdown``): shared pages counted once.
    peak_pss_mib: float | None = None


def run_job_measured(kind: str, request: dict[str, Any], breakdown: bool = False,
                     nice: int = 0) -> JobRun:  # fmt: skip
    """Run ``python -m rasterkube.jobs <kind>`` on an embedded Ray, sampling its tree's RSS.

    The job's output goes to a file, not a pipe: a pipe nobody reads while we wait would
    block a chatty job once its buffer is full. ``nice`` lowers the job's priority (its Ray
    processes inherit it) on a machine shared with interactive work."""
    import os
    import subprocess
    import sys
    import tempfile

    from rasterkube.constants import RESULT_PREFIX

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single-machine Ray on loopback
    command = [sys.executable, "-m", "rasterkube.jobs", kind, "--spec", json.dumps(request)]
    if nice:
        command = ["nice", "-n", str(nice), *command]
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        # nice execs the job in the same process: its pid is the tree's root either way.
        with PeakRss(proc.pid, breakdown=breakdown) as rss:
            proc.wait()
        seconds = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{kind} job failed ({proc.returncode}): {text[-2000:]}")
    lines = [line for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else {}
    return JobRun(rss.peak_mib, seconds, result, rss.breakdown_mib() if breakdown else None,
                  rss.peak_pss_mib if breakdown else None)


def run_job_process(kind: str, request: dict[str, Any]) -> tuple[float, float]:
    """Run ``python -m rasterkube.jobs <kind>`` on an embedded Ray; (peak RSS MiB, seconds)."""
    run = run_job_measured(kind, request)
    return run.peak_rss_mib, run.seconds
