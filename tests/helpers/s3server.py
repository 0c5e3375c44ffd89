"""A real S3 server process (versitygw, posix backend) on a free loopback port.

The command line, readiness probe and bucket creation are the dev stack's
(:mod:`rasterkube_devstack.s3`); here the server is a plain child process that the
test session stops itself (and that dies with it if the session is killed).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rasterkube_devstack import binaries
from rasterkube_devstack import s3 as devstack_s3

ACCESS_KEY = "rasterkube-test"
SECRET_KEY = "rasterkube-test-secret"


def _die_with_parent() -> None:
    """Runs in the child: SIGTERM it when the test process dies, even if killed outright
    (fixtures' teardown never runs then, and the server would be orphaned)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def s3_env(endpoint: str) -> dict[str, str]:
    return devstack_s3.credentials_env(endpoint, ACCESS_KEY, SECRET_KEY)


@contextmanager
def s3_server(log_path: str, data_dir: Path | None = None) -> Iterator[str]:
    """versitygw storing objects under ``data_dir`` (default: beside the log)."""
    data = data_dir or Path(log_path).with_name("s3-data")
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = devstack_s3.versitygw_command(binaries.ensure_versitygw(), f"127.0.0.1:{port}", data)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                env=devstack_s3.versitygw_env(ACCESS_KEY, SECRET_KEY))  # fmt: skip
    try:
        devstack_s3.wait_ready(endpoint, proc, Path(log_path), timeout_s=30)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def make_bucket(endpoint: str, bucket: str) -> None:
    devstack_s3.create_buckets(endpoint, [bucket], ACCESS_KEY, SECRET_KEY)
