"""A real S3-compatible server for the dev stack: moto in server mode, as a detached process.

``S3Server(directory).start()`` runs ``python -m moto.server -H 127.0.0.1 -p PORT`` on a free
loopback port in its own session, waits until it answers, creates the buckets and records
``{pid, start_ticks, argv, port, endpoint}`` in ``directory/pids/s3.pid`` so that
``S3Server(directory).stop()`` works from any later process. Data lives in the server's
memory: a restart starts empty.

The credentials below are **for the local dev server only** — moto accepts any key; they
exist because every S3 client insists on having some. Never use them for a real store.

The detached-process helpers at the bottom (``start_detached``, ``stop_detached``,
``session_processes``...) are shared with :mod:`rasterkube_devstack.stack`, which
runs the Ray head and the operator the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from rasterkube_devstack.controlplane import _free_port, _http, _tail

LOOPBACK = "127.0.0.1"

# --------------------------------------------------------------------------
# Dev-only credentials (moto accepts anything; never use these elsewhere)
# --------------------------------------------------------------------------

DEV_ACCESS_KEY_ID = "rasterkube-dev-only"
DEV_SECRET_ACCESS_KEY = "rasterkube-dev-only-not-a-secret"
DEV_REGION = "us-east-1"
DEFAULT_BUCKET = "rasterkube"

NAME = "s3"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.1
PORT_ATTEMPTS = 3
#: moto's management API; answers once the server is up (no credentials needed).
READY_PATH = "/moto-api/"


class S3ServerError(RuntimeError):
    """The S3 server could not be started (message includes the log tail)."""


def credentials_env(
    endpoint: str, access_key: str = DEV_ACCESS_KEY_ID, secret_key: str = DEV_SECRET_ACCESS_KEY
) -> dict[str, str]:
    """The ``AWS_*`` variables that point s3fs/botocore (and Ray workers) at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": DEV_REGION,
    }


def moto_command(port: int, python: str = sys.executable) -> list[str]:
    return [python, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]


def _check_moto_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("moto.server") is None:
        raise S3ServerError(
            "the dev S3 server needs moto in server mode: pip install 'moto[server]' "
            "(it is part of rasterkube's [test] extra)"
        )


def is_ready(endpoint: str) -> bool:
    try:
        status, _ = _http(endpoint + READY_PATH)
    except OSError:
        return False
    return status == 200


def wait_ready(endpoint: str, proc: subprocess.Popen[bytes] | None, log_path: Path, timeout_s: float) -> None:
    """Poll until the server answers; fail fast with the log tail if it exits."""
    deadline = time.monotonic() + timeout_s
    while not is_ready(endpoint):
        if proc is not None and proc.poll() is not None:
            raise _Exited(f"S3 server exited with code {proc.returncode}.\n--- {log_path} ---\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise S3ServerError(f"S3 server at {endpoint} not ready after {timeout_s:.0f}s.\n{_tail(log_path)}")
        time.sleep(POLL_INTERVAL_S)


class _Exited(S3ServerError):
    pass


def create_buckets(
    endpoint: str,
    buckets: Iterable[str],
    access_key: str = DEV_ACCESS_KEY_ID,
    secret_key: str = DEV_SECRET_ACCESS_KEY,
) -> None:
    """Create ``buckets`` (an existing bucket we own is fine) with botocore (a dependency of s3fs)."""
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=DEV_REGION,
        config=Config(proxies={}, retries={"max_attempts": 3}),
    )
    for bucket in buckets:
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass


class S3Server:
    """moto in server mode rooted at ``directory`` (``pids/s3.pid``, ``logs/s3.log``).

    ``stop()``, ``is_running()`` and ``endpoint`` only need the directory, so another
    process can manage a server started elsewhere.
    """

    def __init__(self, directory: Path, name: str = NAME) -> None:
        self.directory = Path(directory).resolve()
        self.name = name
        self.pid_file = self.directory / "pids" / f"{name}.pid"
        self.log_file = self.directory / "logs" / f"{name}.log"

    @property
    def endpoint(self) -> str | None:
        record = read_record(self.pid_file)
        return str(record["endpoint"]) if record and "endpoint" in record else None

    def env(self) -> dict[str, str]:
        endpoint = self.endpoint
        if endpoint is None:
            raise S3ServerError(f"no S3 server recorded in {self.pid_file}")
        return credentials_env(endpoint)

    def is_running(self) -> bool:
        return is_running(self.pid_file)

    def start(self, *, buckets: Sequence[str] = (DEFAULT_BUCKET,), timeout_s: float = READY_TIMEOUT_S) -> str:
        """Start the server, wait until it answers, create ``buckets``; returns the endpoint URL."""
        if self.is_running():
            raise S3ServerError(
                f"an S3 server is already running in {self.directory} ({self.endpoint}); stop() it first"
            )
        _check_moto_installed()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = _free_port()
            endpoint = f"http://{LOOPBACK}:{port}"
            # The server itself needs no credentials; keep any real ones out of its environment.
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            proc = start_detached(
                moto_command(port), pid_file=self.pid_file, log_file=self.log_file, env=env,
                extra={"port": port, "endpoint": endpoint},
            )  # fmt: skip
            try:
                wait_ready(endpoint, proc, self.log_file, timeout_s)
                break
            except _Exited:
                self.pid_file.unlink(missing_ok=True)
                if "address already in use" not in _tail(self.log_file).lower() or attempt == PORT_ATTEMPTS:
                    raise
            except BaseException:
                self.stop()
                raise
        try:
            create_buckets(endpoint, buckets)
        except BaseException:
            self.stop()
            raise
        return endpoint

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the server (idempotent; works from any process)."""
        stop_detached(self.pid_file, timeout_s=timeout_s)


# --------------------------------------------------------------------------
# Detached processes with pid files (shared with stack.py)
# --------------------------------------------------------------------------
#
# Every process is started in a new session (start_new_session=True), so it and everything
# it spawns share one session id = the leader's pid, even after the leader exited (``ray
# start`` does). The pid file records the leader's pid and its start time (field 22 of
# /proc/<pid>/stat), which guards against pid reuse. Stopping signals every process of the
# session plus every descendant of those (Ray job drivers call setsid themselves), and never
# anything found by name.


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
