"""Notice a lost Ray head while a job runs on a cluster, and say so before Ray ends the process.

When a cluster's head dies, Ray's driver keeps retrying its GCS for
``gcs_rpc_server_reconnect_timeout_s`` (60 s) and then terminates the process from C++ with
a log line about the GCS: no Python exception reaches rasterkube, so without this the user
sees a progress bar stop and a Ray log line. A daemon thread probes the head's GCS port; once
it has been unreachable for ``grace_s`` it prints what happened, what was (not) written and
what to do, then exits with :data:`EXIT_HEAD_LOST`.

Nothing is lost by exiting: outputs are committed atomically (nothing half-written looks
complete) and finished blocks stay in the staging ledger, so the next run continues.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

EXIT_HEAD_LOST: Final = 3
PROBE_INTERVAL_S: Final = 2.0
PROBE_TIMEOUT_S: Final = 2.0
#: Shorter than Ray's own 60 s, long enough for a GCS restart (KubeRay's GCS fault tolerance).
GRACE_S: Final = 20.0


def head_lost_message(address: str, grace_s: float) -> str:
    return (
        f"rasterkube: lost the Ray cluster: its head ({address}) has not answered for {grace_s:.0f}s — the head "
        "node died or was stopped. The job did not finish and nothing that looks complete was written; run it "
        "again (once the cluster is back) and it continues from the blocks already finished."
    )


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return host.strip("[]"), int(port)


class HeadWatch:
    """Probes ``address`` (host:port of the GCS) every ``interval_s``; ``on_lost`` after ``grace_s`` down."""

    def __init__(self, address: str, *, grace_s: float = GRACE_S, interval_s: float = PROBE_INTERVAL_S,
                 on_lost: Callable[[str], None] | None = None,
                 probe: Callable[[str, int], bool] = _answers) -> None:  # fmt: skip
        self.address = address
        self.host, self.port = split_address(address)
        self.grace_s, self.interval_s = grace_s, interval_s
        self.on_lost = on_lost or _exit_head_lost
        self.probe = probe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rasterkube-headwatch", daemon=True)

    def start(self) -> HeadWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        down_since: float | None = None
        while not self._stop.wait(self.interval_s):
            if self.probe(self.host, self.port):
                down_since = None
                continue
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since >= self.grace_s:
                self.on_lost(head_lost_message(self.address, self.grace_s))
                return


def _exit_head_lost(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_HEAD_LOST)  # Ray's threads hold the GCS client: a normal exit would hang


@contextlib.contextmanager
def watching() -> Iterator[None]:
    """Watch the head for the duration of a job, when this process drives a Ray cluster it
    joined (RAY_ADDRESS); an embedded Ray dies with this process, so there is nothing to watch.
    Only while a job runs: between jobs (a notebook's client) the message would not be true."""
    import ray

    from rasterkube.runtime.executor import embedded

    if not ray.is_initialized() or embedded():
        yield
        return
    watch = HeadWatch(ray.get_runtime_context().gcs_address).start()
    try:
        yield
    finally:
        watch.stop()
