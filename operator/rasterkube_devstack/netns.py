"""Network namespaces that the dev stack and the tests create for themselves.

The network rule of this project: processes talk only to loopback or to addresses inside
namespaces our own code created. A real node (kubelet refuses a loopback node IP) and a
multi-node Ray cluster (each node needs an address of its own) therefore live in namespaces
made here: a namespace per host, joined by veth pairs or a bridge, no default route, so
nothing in them can reach any other address.

Processes are started inside with ``nsenter --net=/run/netns/NAME`` rather than
``ip netns exec``: the latter also remounts /sys, which hides the cgroup mounts that
containerd and kubelet need. Thin wrappers over iproute2; every name we create starts with a
prefix of the caller's, so ``cleanup(prefix)`` removes exactly ours.

This process itself can open sockets inside a namespace (:meth:`Namespace.socket`,
:meth:`Namespace.connect`) and read or write its ``/proc/sys/net`` settings
(:meth:`Namespace.sysctl`) without starting a process: a short-lived thread joins the
namespace with ``setns(2)``, and what it opens stays in that namespace. That is how the
dev stack probes servers in its node namespace and forwards loopback ports into it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

NETNS_DIR: Final = Path("/run/netns")
IP: Final = "ip"
NSENTER: Final = "nsenter"
#: Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
MAX_IFNAME: Final = 15
COMMAND_TIMEOUT_S: Final = 30
#: setns(2) flag for network namespaces (<sched.h>); Python 3.12 has os.setns, 3.11 has not.
CLONE_NEWNET: Final = 0x40000000
SYSCTL_NET: Final = Path("/proc/sys/net")

_T = TypeVar("_T")


class NetnsError(RuntimeError):
    """A namespace operation failed; the message has the command and its output."""


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None when they can): root and iproute2/nsenter."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or use a machine where you are)"
    missing = [tool for tool in (IP, NSENTER) if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install the Debian packages iproute2 and util-linux)"
    return None


def _run(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _check_ifname(name: str) -> str:
    if not 0 < len(name.encode()) <= MAX_IFNAME:
        raise ValueError(f"interface name {name!r} must be 1..{MAX_IFNAME} bytes long")
    return name


@dataclass(frozen=True)
class Namespace:
    """A named network namespace (``/run/netns/<name>``)."""

    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def exists(self) -> bool:
        """A live namespace: its file is a mount of the namespace. On machines whose /run is
        not a tmpfs, a reboot (or a restored disk snapshot) leaves ``/run/netns/NAME`` behind
        as a plain file that is no namespace at all (see :meth:`stale`)."""
        return os.path.ismount(self.path)

    def stale(self) -> bool:
        """The namespace's file is there but nothing is mounted on it (left by a reboot)."""
        return self.path.exists() and not self.exists()

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace's network (mounts and cgroups stay the host's)."""
        return [NSENTER, f"--net={self.path}", "--", *argv]

    def ip(self, *args: str) -> str:
        return _run([IP, "-n", self.name, *args])

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one."""
        out = _run([IP, "netns", "pids", self.name]) if self.exists() else ""
        return [int(p) for p in out.split()]

    def add_address(self, ifname: str, cidr: str) -> None:
        self.ip("addr", "add", cidr, "dev", _check_ifname(ifname))

    def up(self, ifname: str) -> None:
        self.ip("link", "set", _check_ifname(ifname), "up")

    def add_route(self, destination: str, ifname: str, source: str | None = None) -> None:
        self.ip("route", "add", destination, "dev", ifname, *(("src", source) if source else ()))

    def add_bridge(self, ifname: str) -> None:
        self.ip("link", "add", _check_ifname(ifname), "type", "bridge")
        self.up(ifname)

    def attach(self, ifname: str, bridge: str) -> None:
        self.ip("link", "set", _check_ifname(ifname), "master", _check_ifname(bridge))

    def run_inside(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on a thread that has joined this namespace (sockets it makes stay there)."""
        return run_in_namespace(self.path, fn)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket that lives in this namespace (connect/bind it from any thread)."""
        return self.run_inside(lambda: socket.socket(family, type))

    def connect(self, address: tuple[str, int], timeout_s: float = 5.0) -> socket.socket:
        """A TCP connection to ``address`` as seen from inside this namespace."""
        sock = self.socket()
        sock.settimeout(timeout_s)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def sysctl(self, key: str, value: str | None = None) -> str:
        """Read (and with ``value`` first write) ``net.*`` setting ``key`` of this namespace.

        Only ``net.`` keys: they are the per-namespace ones (``/proc/sys/net`` shows the
        namespace of whoever opens it); anything else would change the whole machine.
        """
        if not key.startswith("net."):
            raise ValueError(f"{key!r}: only net.* settings belong to a network namespace")
        path = SYSCTL_NET.parent / key.replace(".", "/")

        def access() -> str:
            if value is not None:
                path.write_text(f"{value}\n")
            return path.read_text().strip()

        return self.run_inside(access)


def _libc_setns(fd: int, nstype: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in_namespace(path: Path, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on a new thread that joined the network namespace at ``path``.

    setns(CLONE_NEWNET) changes only the calling thread, so the rest of the process stays
    where it is; the thread ends with ``fn``.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _libc_setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 — re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{path.name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def create(name: str) -> Namespace:
    """A new namespace with loopback up; an existing one of that name is an error (stale
    state is removed by :func:`delete` or :func:`cleanup`, never silently reused)."""
    reason = unavailable_reason()
    if reason:
        raise NetnsError(reason)
    if Namespace(name).stale():
        Namespace(name).path.unlink()  # a file left by a reboot: no namespace, nothing to reuse
    _run([IP, "netns", "add", name])
    ns = Namespace(name)
    ns.up("lo")
    return ns


def veth_pair(a: Namespace, a_if: str, b: Namespace, b_if: str) -> None:
    """A veth pair with one end in each namespace (``a`` and ``b`` may be the same: a node's
    address needs a non-loopback device to live on, and this kernel has no ``dummy`` links)."""
    _run([IP, "-n", a.name, "link", "add", _check_ifname(a_if), "type", "veth", "peer", "name",
          _check_ifname(b_if), "netns", b.name])  # fmt: skip
    a.up(a_if)
    b.up(b_if)


def delete(ns: Namespace, grace_s: float = 5.0) -> None:
    """Stop every process left inside (TERM, then KILL) and remove the namespace."""
    if ns.stale():
        ns.path.unlink(missing_ok=True)
        return
    if not ns.exists():
        return
    pids = ns.pids()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.05)
        if not pids:
            break
    _run([IP, "netns", "delete", ns.name])


def ours(prefix: str) -> list[Namespace]:
    """The namespaces whose names start with ``prefix``."""
    if not NETNS_DIR.is_dir():
        return []
    return [Namespace(p.name) for p in sorted(NETNS_DIR.iterdir()) if p.name.startswith(prefix)]


def cleanup(prefix: str) -> list[str]:
    """Delete every namespace named ``prefix*`` (what a killed run left); returns their names."""
    gone = []
    for ns in ours(prefix):
        delete(ns)
        gone.append(ns.name)
    return gone
