"""A real S3 server for the dev stack and the tests: versitygw, as a detached process.

``S3Server(directory).start()`` runs the Versity S3 Gateway (``versitygw``, built from the Go
module proxy by :mod:`.binaries`) with its posix backend: every bucket is a directory under
``directory/s3-data`` and every object a file in it (metadata in extended attributes). It
listens on a free loopback port, or — with ``netns=`` — on an address inside a network
namespace (the real node's, so that pods reach it) with a loopback port of this machine
forwarded to it (:mod:`.forward`) for the tests and the developer. The process is recorded in
``directory/pids/<name>.pid`` (:mod:`.processes`), so ``S3Server(directory).stop()`` works from
any later process. Data stays on disk until the directory is removed.

Why versitygw: one static binary that builds in a minute, a real S3 implementation (SigV4,
multipart uploads, conditional writes, ranged reads, listings with delimiters) rather than a
mock, Apache-2.0, and objects as plain files that a person can inspect. MinIO would serve too
but is AGPL with a much larger build; SeaweedFS needs a master, a volume server and a filer.

The credentials below are **for the local dev server only** — they exist because every S3
client insists on having some. Never use them for a real store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from rasterkube_devstack import binaries, netns, processes
from rasterkube_devstack.controlplane import _free_port, _http, _tail
from rasterkube_devstack.processes import is_running, read_record, start_detached, stop_detached

LOOPBACK = "127.0.0.1"

# --------------------------------------------------------------------------
# Dev-only credentials (never use these elsewhere)
# --------------------------------------------------------------------------

DEV_ACCESS_KEY_ID = "rasterkube-dev-only"
DEV_SECRET_ACCESS_KEY = "rasterkube-dev-only-not-a-secret"
DEV_REGION = "us-east-1"
DEFAULT_BUCKET = "rasterkube"

NAME = "s3"
#: versitygw's port inside a namespace of our own (nothing else binds there).
NETNS_PORT = 9000
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.1
PORT_ATTEMPTS = 3


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


def versitygw_command(exe: Path, listen: str, data_dir: Path) -> list[str]:
    """The gateway's command line: posix backend on ``data_dir``, listening on ``listen`` (HOST:PORT).

    The credentials go in through the environment (:func:`versitygw_env`), not argv, where
    every process listing would show them.
    """
    return [str(exe), "--port", listen, "--region", DEV_REGION, "--quiet", "posix", str(data_dir)]


def versitygw_env(access_key: str, secret_key: str) -> dict[str, str]:
    # The server needs no AWS_* of its own; keep any real ones out of its environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(ROOT_ACCESS_KEY_ID=access_key, ROOT_SECRET_ACCESS_KEY=secret_key)
    return env


def answers(endpoint: str, ns: netns.Namespace | None = None) -> bool:
    """The server answers HTTP (an anonymous request is refused: 403 means it is up)."""
    try:
        status, _ = _http(endpoint + "/", ns=ns)
    except OSError:
        return False
    return status in (200, 403)


def wait_ready(endpoint: str, proc: subprocess.Popen[bytes] | None, log_path: Path, timeout_s: float,
               ns: netns.Namespace | None = None) -> None:  # fmt: skip
    """Poll until the server answers; fail fast with the log tail if it exits."""
    deadline = time.monotonic() + timeout_s
    while not answers(endpoint, ns):
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
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            pass


class S3Server:
    """versitygw rooted at ``directory`` (``pids/<name>.pid``, ``logs/<name>.log``, ``<name>-data/``).

    ``stop()``, ``is_running()`` and ``endpoint`` only need the directory, so another process
    can manage a server started elsewhere. ``netns``/``address``: serve inside that network
    namespace on ``address`` (``inner_endpoint``), forwarded to a loopback port (``endpoint``).
    """

    def __init__(self, directory: Path, name: str = NAME, *, netns: netns.Namespace | None = None,
                 address: str = LOOPBACK, access_key: str = DEV_ACCESS_KEY_ID,
                 secret_key: str = DEV_SECRET_ACCESS_KEY) -> None:  # fmt: skip
        self.directory = Path(directory).resolve()
        self.name = name
        self.pid_file = self.directory / "pids" / f"{name}.pid"
        self.log_file = self.directory / "logs" / f"{name}.log"
        self.forward_pid_file = self.directory / "pids" / f"{name}-forward.pid"
        self.data_dir = self.directory / f"{name}-data"
        self.access_key, self.secret_key = access_key, secret_key
        self._netns = netns
        self._address = address

    @property
    def endpoint(self) -> str | None:
        """The URL this machine reaches the server at (loopback)."""
        record = read_record(self.pid_file)
        return str(record["endpoint"]) if record and "endpoint" in record else None

    @property
    def inner_endpoint(self) -> str | None:
        """The URL inside the server's namespace (= ``endpoint`` without a namespace)."""
        record = read_record(self.pid_file)
        return str(record.get("inner_endpoint") or record["endpoint"]) if record and "endpoint" in record else None

    def env(self) -> dict[str, str]:
        endpoint = self.endpoint
        if endpoint is None:
            raise S3ServerError(f"no S3 server recorded in {self.pid_file}")
        return credentials_env(endpoint, self.access_key, self.secret_key)

    def is_running(self) -> bool:
        return is_running(self.pid_file)

    def pids(self) -> list[int]:
        return processes.recorded_pids(self.pid_file) + processes.recorded_pids(self.forward_pid_file)

    def start(self, *, buckets: Sequence[str] = (DEFAULT_BUCKET,), timeout_s: float = READY_TIMEOUT_S) -> str:
        """Start the server, wait until it answers, create ``buckets``; returns the loopback endpoint URL."""
        if self.is_running():
            raise S3ServerError(
                f"an S3 server is already running in {self.directory} ({self.endpoint}); stop() it first"
            )
        exe = binaries.ensure_versitygw()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = versitygw_env(self.access_key, self.secret_key)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = NETNS_PORT if self._netns is not None else _free_port()
            inner = f"http://{self._address}:{port}"
            argv = versitygw_command(exe, f"{self._address}:{port}", self.data_dir)
            if self._netns is not None:
                argv = self._netns.command(argv)
            proc = start_detached(argv, pid_file=self.pid_file, log_file=self.log_file, env=env,
                                  extra={"port": port, "endpoint": inner, "inner_endpoint": inner})  # fmt: skip
            try:
                wait_ready(inner, proc, self.log_file, timeout_s, self._netns)
                break
            except _Exited:
                self.pid_file.unlink(missing_ok=True)
                if "address already in use" not in _tail(self.log_file).lower() or attempt == PORT_ATTEMPTS:
                    raise
            except BaseException:
                self.stop()
                raise
        try:
            endpoint = self._start_forwarder(port) if self._netns is not None else inner
            record = read_record(self.pid_file) or {}
            record.update(endpoint=endpoint)
            tmp = self.pid_file.with_name(f".{self.pid_file.name}.tmp")
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, self.pid_file)
            create_buckets(endpoint, buckets, self.access_key, self.secret_key)
        except BaseException:
            self.stop()
            raise
        return endpoint

    def _start_forwarder(self, port: int) -> str:
        assert self._netns is not None
        port_file = self.forward_pid_file.with_suffix(".port")
        port_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "rasterkube_devstack.forward", "--netns", self._netns.name,
                "--listen", f"{LOOPBACK}:0", "--target", f"{self._address}:{port}", "--port-file", str(port_file)]  # fmt: skip
        log_file = self.log_file.with_name(f"{self.name}-forward.log")
        proc = start_detached(argv, pid_file=self.forward_pid_file, log_file=log_file, env=dict(os.environ))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise S3ServerError(f"the S3 forwarder did not start:\n{_tail(log_file)}")
            time.sleep(POLL_INTERVAL_S)
        return f"http://{LOOPBACK}:{int(port_file.read_text())}"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, *, remove_data: bool = False) -> bool:
        """Stop the server (idempotent; works from any process). True if it was running."""
        forwarded = stop_detached(self.forward_pid_file, timeout_s=timeout_s)
        was = stop_detached(self.pid_file, timeout_s=timeout_s)
        self.forward_pid_file.with_suffix(".port").unlink(missing_ok=True)
        if remove_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return was or forwarded
