"""A real S3-compatible server process (moto in server mode) on a free loopback port.

The command line, readiness probe and bucket creation are the dev stack's
(:mod:`rasterkube_devstack.s3`); here the server is a plain child process that the
test session stops itself.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
def s3_server(log_path: str) -> Iterator[str]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(devstack_s3.moto_command(port), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)  # fmt: skip
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
