"""Detached processes with pid files: how the dev stack runs its servers.

Every process is started in a new session (``start_new_session=True``), so it and everything
it spawns share one session id = the leader's pid, even after the leader exited (``ray
start`` does). The pid file records the leader's pid and its start time (field 22 of
/proc/<pid>/stat), which guards against pid reuse. Stopping signals every process of the
session plus every descendant of those (Ray job drivers and containerd shims call setsid
themselves), and never anything found by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.1

def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rsplit(")", 1)[1].split()


def start_ticks(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None  # field 22 overall: starttime in clock ticks


def _alive(fields: list[str] | None) -> bool:
    return fields is not None and fields[0] not in ("Z", "X")


def is_alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    return _alive(_stat(pid))


def start_detached(
    argv: Sequence[str],
    *,
    pid_file: Path,
    log_file: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
    extra: Mapping[str, object] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, output to ``log_file``, record it in ``pid_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    record = {"pid": proc.pid, "start_ticks": start_ticks(proc.pid), "argv": list(argv), **(extra or {})}
    tmp = pid_file.with_name(f".{pid_file.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, pid_file)
    return proc


def read_record(pid_file: Path) -> dict[str, object] | None:
    try:
        data = json.loads(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def session_processes(leader: int, leader_ticks: int | None) -> list[tuple[int, int]]:
    """(pid, start ticks) of the live processes of ``leader``'s session and their descendants.

    Returns nothing when ``leader``'s pid now belongs to another process (pid reuse: the
    kernel never reuses a pid while a session of that id has members, so then ours has none).
    """
    leader_fields = _stat(leader)
    if leader_fields is not None and leader_ticks is not None and int(leader_fields[19]) != leader_ticks:
        return []
    table: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                table[int(entry)] = fields
    # fields: [state, ppid, pgrp, session, ...]
    members = {pid for pid, f in table.items() if int(f[3]) == leader}
    children: dict[int, list[int]] = {}
    for pid, f in table.items():
        children.setdefault(int(f[1]), []).append(pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in members:
                members.add(child)
                stack.append(child)
    return sorted((pid, int(table[pid][19])) for pid in members if _alive(table[pid]))


def _record_processes(record: Mapping[str, object]) -> list[tuple[int, int]]:
    ticks = record.get("start_ticks")
    pid = record["pid"]
    assert isinstance(pid, int)
    return session_processes(pid, ticks if isinstance(ticks, int) else None)


def is_running(pid_file: Path) -> bool:
    record = read_record(pid_file)
    return bool(record and _record_processes(record))


def _still_alive(procs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    left = []
    for pid, ticks in procs:
        fields = _stat(pid)
        if _alive(fields) and fields is not None and int(fields[19]) == ticks:
            left.append((pid, ticks))
    return left


def _signal_all(procs: Iterable[tuple[int, int]], sig: signal.Signals) -> None:
    for pid, _ in _still_alive(procs):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_all_gone(procs: list[tuple[int, int]], timeout_s: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout_s
    left = _still_alive(procs)
    while left and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        left = _still_alive(left)
    return left


def stop_detached(pid_file: Path, *, sig: signal.Signals = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Signal the recorded session with ``sig``, SIGKILL what is left after ``timeout_s``.

    Removes the pid file. Returns True if something was running. Idempotent.
    """
    record = read_record(pid_file)
    if record is None:
        pid_file.unlink(missing_ok=True)
        return False
    procs = _record_processes(record)
    if procs:
        _signal_all(procs, sig)
        left = _wait_all_gone(procs, timeout_s if sig != signal.SIGKILL else STOP_TIMEOUT_S)
        # Anything spawned meanwhile, plus what ignored ``sig``.
        left = sorted(set(left) | set(_record_processes(record)))
        if left:
            _signal_all(left, signal.SIGKILL)
            left = _wait_all_gone(left, STOP_TIMEOUT_S)
        if left:
            raise RuntimeError(f"processes {[p for p, _ in left]} of {pid_file} survived SIGKILL")
    pid_file.unlink(missing_ok=True)
    return bool(procs)


def recorded_pids(pid_file: Path) -> list[int]:
    """Live pids of the session recorded in ``pid_file`` (empty if none)."""
    record = read_record(pid_file)
    return [pid for pid, _ in _record_processes(record)] if record else []
