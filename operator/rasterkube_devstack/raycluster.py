"""A multi-node Ray cluster on one machine: every Ray node in a network namespace of its own.

Why namespaces: Ray 2.60 refuses a second node unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``,
and with it every Ray process listens on all interfaces and advertises the machine's network
address — traffic this project must not make (its network rule). Inside a namespace we create,
"all interfaces" are that namespace's loopback and one veth, the advertised address is the
namespace's own, and no namespace has a route out. The hosts hang off one bridge in a hub
namespace::

    hub: bridge br0 ─┬─ head     10.253.0.10   ray start --head
                     ├─ worker-1 10.253.0.11   ray start --address=head
                     ├─ worker-2 10.253.0.12
                     └─ s3       10.253.0.20   versitygw (forwarded to a loopback port)

Drivers (``rasterkube run`` with ``RAY_ADDRESS``) run in the head's namespace, as the
entrypoint of a Ray job does: a Ray driver must be on a node of its cluster.

Each node has its own ``--temp-dir`` (sockets, logs, spilled objects) so nothing is shared
between nodes but the S3 server — as on separate machines. Killing every process in a node's
namespace is what losing that machine looks like to the rest (:meth:`RayCluster.kill`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rasterkube_devstack import netns, processes
from rasterkube_devstack import s3 as devstack_s3

SUBNET: Final = "10.253.0"
PREFIX_LEN: Final = 24
HEAD_PORT: Final = 6379
BRIDGE: Final = "br0"
HOST_IF: Final = "eth0"
HEAD: Final = "head"
S3: Final = "s3"
#: The host part of each fixed role's address; workers count up from WORKER_BASE.
HOSTS: Final = {HEAD: 10, S3: 20}
WORKER_BASE: Final = 11
ENABLE_CLUSTER_ENV: Final = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV: Final = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV: Final = "RAY_AUTH_TOKEN"
READY_TIMEOUT_S: Final = 120.0
STOP_TIMEOUT_S: Final = 20.0
#: Small object stores: three nodes share this machine's /dev/shm.
OBJECT_STORE_BYTES: Final = 300 * 1024 * 1024


class RayClusterError(RuntimeError):
    """The cluster did not come up (the message has the node's log tail)."""


@dataclass(frozen=True)
class Host:
    role: str
    ip: str
    ns: netns.Namespace


def worker_role(i: int) -> str:
    return f"worker-{i}"


def address_of(role: str) -> str:
    """The fixed address of ``role`` (``worker-N`` count up from :data:`WORKER_BASE`)."""
    if role.startswith("worker-"):
        return f"{SUBNET}.{WORKER_BASE + int(role.split('-', 1)[1]) - 1}"
    return f"{SUBNET}.{HOSTS[role]}"


def ray_start_command(ray: str, role: str, temp_dir: Path, num_cpus: int, head_address: str) -> list[str]:
    """``ray start`` of one node, in the foreground (``--block``) so its session is the node."""
    common = [f"--node-ip-address={address_of(role)}", f"--num-cpus={num_cpus}", "--num-gpus=0",
              f"--temp-dir={temp_dir}", f"--object-store-memory={OBJECT_STORE_BYTES}",
              "--disable-usage-stats", "--block"]  # fmt: skip
    if role == HEAD:
        return [ray, "start", "--head", f"--port={HEAD_PORT}", "--include-dashboard=false", *common]
    return [ray, "start", f"--address={head_address}", *common]


class RayCluster:
    """A head and ``workers`` worker nodes and an S3 server, with their files under ``directory``.

    ``prefix`` names every namespace it creates (so :func:`netns.cleanup` finds what a killed
    run left); ``env`` goes to every Ray node (e.g. S3 credentials for the tasks)."""

    def __init__(self, directory: Path, prefix: str, *, workers: int = 2, cpus_per_node: int = 1,
                 env: Mapping[str, str] | None = None) -> None:  # fmt: skip
        if len(prefix) > 8:
            raise ValueError("prefix: at most 8 characters (namespace and interface names are short)")
        self.directory = Path(directory).resolve()
        self.prefix = prefix
        self.workers = workers
        self.cpus_per_node = cpus_per_node
        self.extra_env = dict(env or {})
        self.hosts: dict[str, Host] = {}
        # Ray 2.60 turns token authentication on for a new head; a token of this cluster's own
        # (not ~/.ray/auth_token, shared with whatever else runs here) for its nodes and drivers.
        self.auth_token = secrets.token_hex(32)
        self.s3 = devstack_s3.S3Server(self.directory / "s3", netns=netns.Namespace(f"{prefix}{S3}"),
                                       address=address_of(S3))  # fmt: skip

    # -- addresses ------------------------------------------------------------

    @property
    def head_address(self) -> str:
        return f"{address_of(HEAD)}:{HEAD_PORT}"

    @property
    def node_roles(self) -> list[str]:
        return [HEAD, *(worker_role(i) for i in range(1, self.workers + 1))]

    def pid_file(self, role: str) -> Path:
        return self.directory / "pids" / f"{role}.pid"

    def temp_dir(self, role: str) -> Path:
        # Short: Ray's unix socket paths must fit in 107 bytes.
        return Path("/tmp") / f"{self.prefix}-{role}"

    def s3_env(self, inside: bool) -> dict[str, str]:
        """S3 credentials and endpoint, as seen from inside the namespaces or from this machine."""
        endpoint = self.s3.inner_endpoint if inside else self.s3.endpoint
        assert endpoint is not None, "the S3 server is not running"
        return devstack_s3.credentials_env(endpoint, self.s3.access_key, self.s3.secret_key)

    def auth_env(self) -> dict[str, str]:
        return {AUTH_MODE_ENV: "token", AUTH_TOKEN_ENV: self.auth_token}

    def driver_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, **self.s3_env(inside=True), "RAY_ADDRESS": self.head_address,
               "RAY_USAGE_STATS_ENABLED": "0", **self.auth_env(), **(extra or {})}  # fmt: skip
        env.pop(ENABLE_CLUSTER_ENV, None)  # a driver of a multi-node cluster: Ray's Linux default (on)
        return env

    def node_env(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env, **self.s3_env(inside=True)}
        env.update({ENABLE_CLUSTER_ENV: "1", "RAY_USAGE_STATS_ENABLED": "0", **self.auth_env()})
        env.pop("RAY_ADDRESS", None)
        return env

    # -- lifecycle ------------------------------------------------------------

    def start(self, *, buckets: Sequence[str] = (devstack_s3.DEFAULT_BUCKET,)) -> None:
        reason = netns.unavailable_reason()
        if reason:
            raise RayClusterError(f"a multi-node Ray cluster cannot run here: {reason}")
        netns.cleanup(self.prefix)  # what a killed earlier run of this prefix left
        try:
            self._network()
            self.s3.start(buckets=buckets)
            for role in self.node_roles:
                self._start_node(role)
                if role == HEAD:
                    self._wait_nodes(1)
            self._wait_nodes(len(self.node_roles))
        except BaseException:
            self.stop()
            raise

    def _network(self) -> None:
        hub = netns.create(f"{self.prefix}hub")
        hub.add_bridge(BRIDGE)
        for index, role in enumerate([*self.node_roles, S3]):
            ns = netns.create(f"{self.prefix}{role.replace('worker-', 'w')}" if role != S3 else f"{self.prefix}{S3}")
            port = f"p{index}"
            netns.veth_pair(ns, HOST_IF, hub, port)
            hub.attach(port, BRIDGE)
            ns.add_address(HOST_IF, f"{address_of(role)}/{PREFIX_LEN}")
            self.hosts[role] = Host(role, address_of(role), ns)

    def _start_node(self, role: str) -> None:
        temp = self.temp_dir(role)
        shutil.rmtree(temp, ignore_errors=True)
        ray = str(Path(sys.executable).with_name("ray"))
        argv = self.hosts[role].ns.command(ray_start_command(ray, role, temp, self.cpus_per_node, self.head_address))
        processes.start_detached(argv, pid_file=self.pid_file(role), log_file=self.directory / "logs" / f"{role}.log",
                                 env=self.node_env())  # fmt: skip

    def run_in(self, role: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
               timeout_s: float = 600, check: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``argv`` inside ``role``'s namespace (a driver: ``role=HEAD``), S3 and RAY_ADDRESS set."""
        return subprocess.run(self.hosts[role].ns.command(list(argv)), capture_output=True, text=True,
                              env=self.driver_env(env),
                              timeout=timeout_s, check=check)  # fmt: skip

    def popen_in(self, role: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 log: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
        return subprocess.Popen(self.hosts[role].ns.command(list(argv)), stdout=out, stderr=subprocess.STDOUT,
                                env=self.driver_env(env))  # fmt: skip

    def alive_nodes(self) -> list[str]:
        """Node IPs Ray's GCS reports alive (asked by a driver on the head)."""
        probe = ("import ray\nray.init(address='auto', logging_level='ERROR')\n"
                 "print(' '.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")  # fmt: skip
        proc = self.run_in(HEAD, [sys.executable, "-c", probe], timeout_s=60)
        return proc.stdout.split() if proc.returncode == 0 else []

    def _wait_nodes(self, count: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for role in self.node_roles:
                record = processes.read_record(self.pid_file(role))
                if record and not processes.is_running(self.pid_file(role)):
                    raise RayClusterError(f"Ray node {role} exited:\n{self.log_tail(role)}")
            if len(self.alive_nodes()) >= count:
                return
            time.sleep(1.0)
        raise RayClusterError(f"{count} Ray nodes not alive after {READY_TIMEOUT_S:.0f}s:\n{self.log_tail(HEAD)}")

    def log_tail(self, role: str, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.directory / "logs" / f"{role}.log").read_text().splitlines()[-lines:])
        return ""

    def kill(self, role: str) -> list[int]:
        """SIGKILL every process of ``role``'s node at once: the machine is gone, nothing exits cleanly."""
        pids = self.hosts[role].ns.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def restart_nodes(self) -> None:
        """Every Ray node stopped (what is left of them killed) and started again: a new cluster
        on the same addresses and the same S3, as after a head lost and brought back."""
        for role in reversed(self.node_roles):
            processes.stop_detached(self.pid_file(role), timeout_s=STOP_TIMEOUT_S)
            self.kill(role)
        for role in self.node_roles:
            self._start_node(role)
            if role == HEAD:
                self._wait_nodes(1)
        self._wait_nodes(len(self.node_roles))

    def stop(self) -> None:
        """Stop every node, the S3 server and remove the namespaces and temp dirs (idempotent)."""
        for role in reversed(self.node_roles):
            processes.stop_detached(self.pid_file(role), timeout_s=STOP_TIMEOUT_S)
        self.s3.stop(remove_data=True)
        netns.cleanup(self.prefix)  # also kills what is left inside (Ray workers of a node)
        for role in self.node_roles:
            shutil.rmtree(self.temp_dir(role), ignore_errors=True)
