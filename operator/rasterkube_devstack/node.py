"""A real single-node Kubernetes cluster in a network namespace, without Docker (DESIGN §4).

``Node(directory).start()`` brings up, inside a network namespace of its own
(``rk-node-<id>``, :mod:`.netns`):

* etcd and kube-apiserver (:class:`.controlplane.ControlPlane` with the node's identities),
  reachable from this machine through a loopback port (:mod:`.forward`);
* containerd (Debian's package) with runc, overlayfs and the CNI bridge plugin;
* kube-controller-manager, kube-scheduler, kubelet and kube-proxy, built from the Go module
  proxy at the API server's version (:mod:`.binaries`);
* CoreDNS as a Deployment in ``kube-system`` (no upstream forwarding: cluster names only).

The network rule: nothing started here can reach any address outside loopback and this
namespace. The namespace has no default route and no NAT; pods get addresses on a bridge
inside it; the node address sits on a veth pair whose both ends are inside (kubelet refuses
a loopback node IP, and this kernel has no ``dummy`` links); the service range is routed to
that veth so that processes on the node's network reach ClusterIPs.

What else the node needs, and why:

* containerd: ``restrict_oom_score_adj`` (root here lacks CAP_SYS_RESOURCE: without it every
  sandbox fails with "can't get final child's PID from pipe"), cgroupfs (no systemd), a
  locally built pause image, pod network namespaces under its state directory.
* kubelet: ``cgroupDriver: cgroupfs``, ``failSwapOn: false``, ``failCgroupV1: false``; pods
  under a cgroup root of their own (``/rasterkube-<id>``) so that ``stop()`` finds every pod
  process and cgroup. kubelet wants to set machine-wide kernel settings (``vm.overcommit_memory``,
  ``kernel.panic``, ``kernel.panic_on_oops``...); on a shared machine it must not, so it runs in
  a mount namespace of its own where those files read as the values it expects (its pod
  volume mounts still reach containerd: its root directory is a shared mount).
* processes are started with ``nsenter --net`` (not ``ip netns exec``, which remounts /sys and
  hides the cgroup mounts).

``stop()`` (from any process: it only needs the directory) stops everything in reverse
order, kills what is left in the pod cgroups, removes containerd's records of the pods,
unmounts everything under the node's directories, removes the cgroups and the namespace,
and leaves no process, mount, cgroup or namespace behind.

Images come from :mod:`.images`: containerd's image store (``cache_dir()/containerd``) is
kept between runs so that images are imported once per content; one node at a time uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rasterkube_devstack import binaries, debian, images, netns, processes
from rasterkube_devstack.controlplane import SERVICE_CLUSTER_IP_RANGE, ControlPlane, _tail

log = logging.getLogger(__name__)

NODE_NAME = "rasterkube-node"
#: Pinned versions of what the node runs (the Go builds are in binaries).
KUBERNETES_VERSION = binaries.KUBERNETES_VERSION
CLUSTER_DOMAIN = "cluster.local"

# Network inside the namespace (private to it: other namespaces may reuse the numbers).
NODE_IP = "10.254.0.1"
NODE_PREFIX = 24
NODE_IF, NODE_PEER_IF = "rk-node0", "rk-node1"
POD_BRIDGE = "rk-pods0"
POD_CIDR = "10.244.0.0/24"
POD_GATEWAY = "10.244.0.1"
CLUSTER_CIDR = "10.244.0.0/16"
CLUSTER_DNS_IP = "10.0.0.10"
#: Where everything of node ``<id>`` lives on this machine (short: unix sockets live here).
RUN_ROOT = Path("/run/rasterkube")
DATA_ROOT = Path("/var/lib/rasterkube")
NETNS_PREFIX = "rk-node-"
CGROUP_PREFIX = "rasterkube-"
CNI_BIN_DIR = Path("/usr/lib/cni")
PAUSE_REPOSITORY = f"{images.LOCAL_REGISTRY}/pause"
COREDNS_REPOSITORY = f"{images.LOCAL_REGISTRY}/coredns"

# Components (names of pid and log files).
CONTAINERD = "containerd"
KUBELET = "kubelet"
KUBE_PROXY = "kube-proxy"
SCHEDULER = "kube-scheduler"
CONTROLLER_MANAGER = "kube-controller-manager"
#: Stop order: the consumers of the API first, containerd after the kubelet.
STOP_ORDER = (KUBE_PROXY, SCHEDULER, CONTROLLER_MANAGER, KUBELET, CONTAINERD)

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.5
KUBECTL_TIMEOUT_S = 120
#: The values kubelet insists on for machine-wide settings (pkg/kubelet/cm: setupKernelTunables);
#: kubelet sees these in its own mount namespace and leaves the machine's alone.
KUBELET_KERNEL_TUNABLES = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
#: kubelet writes a symlink per container to /var/log/containers (a fixed path); in its mount
#: namespace /var/log is a small tmpfs of its own, so nothing is left on the machine.
KUBELET_PRIVATE_LOG_DIR = Path("/var/log")


class NodeError(RuntimeError):
    """The node could not be started or stopped (the message names the log to read)."""


def node_id(directory: Path) -> str:
    """Short id of the node rooted at ``directory`` (names of its namespace, cgroup, dirs)."""
    return hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:8]


def unavailable_reason() -> str | None:
    """Why a node cannot run here (None when it can)."""
    reason = netns.unavailable_reason()
    if reason:
        return reason
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup filesystem at /sys/fs/cgroup"
    return None


# --------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeLayout:
    """Paths of one node. Config and logs under the stack directory, runtime state short."""

    directory: Path  # <stack dir>/node
    id: str

    @classmethod
    def of(cls, directory: Path) -> NodeLayout:
        directory = Path(directory).resolve()
        return cls(directory, node_id(directory))

    @property
    def netns(self) -> netns.Namespace:
        return netns.Namespace(f"{NETNS_PREFIX}{self.id}")

    @property
    def cgroup(self) -> str:
        return f"{CGROUP_PREFIX}{self.id}"

    @property
    def run(self) -> Path:
        return RUN_ROOT / self.id

    @property
    def data(self) -> Path:
        return DATA_ROOT / self.id

    @property
    def containerd_socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def containerd_state(self) -> Path:
        return self.run / "containerd"

    @property
    def kubelet_root(self) -> Path:
        return self.data / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return self.data / "pod-logs"

    @property
    def cni_conf(self) -> Path:
        return self.directory / "cni"

    @property
    def cni_data(self) -> Path:
        return self.data / "cni"

    @property
    def tunables(self) -> Path:
        return self.data / "kernel-tunables"

    @property
    def config(self) -> Path:
        return self.directory / "config"

    @property
    def k8s(self) -> Path:
        return self.directory.parent / "k8s"

    @property
    def state_file(self) -> Path:
        return self.directory / "node.json"

    def pid(self, component: str) -> Path:
        return self.directory / "pids" / f"{component}.pid"

    def log(self, component: str) -> Path:
        return self.directory / "logs" / f"{component}.log"

    def owned_paths(self) -> tuple[Path, ...]:
        """Everything under which this node mounts things."""
        return (self.run, self.data)


def containerd_root() -> Path:
    """containerd's image store, kept between nodes (one node at a time uses it)."""
    return binaries.cache_dir() / "containerd" / "root"


def stored_digests() -> set[str]:
    """Digests of the blobs in containerd's image store (readable while it does not run)."""
    blobs = containerd_root() / "io.containerd.content.v1.content" / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in blobs.iterdir()} if blobs.is_dir() else set()


def _owner_file() -> Path:
    return binaries.cache_dir() / "containerd" / "owner.json"


# --------------------------------------------------------------------------
# Configuration files (pure)
# --------------------------------------------------------------------------


def containerd_config(layout: NodeLayout, sandbox_image: str) -> str:
    """containerd 1.6 config (version 2) for the node."""
    cri = {
        "sandbox_image": sandbox_image,
        # Root here lacks CAP_SYS_RESOURCE: lowering oom_score_adj fails every sandbox.
        "restrict_oom_score_adj": True,
        "disable_apparmor": True,
        "enable_selinux": False,
        # Pods may bind ports < 1024 as non-root (CoreDNS on 53).
        "enable_unprivileged_ports": True,
        "enable_unprivileged_icmp": True,
        # Pod network namespaces under our state dir, not /var/run/netns (shared with `ip netns`).
        "netns_mounts_under_state_dir": True,
        "containerd": {
            "snapshotter": "overlayfs",
            "default_runtime_name": "runc",
            "runtimes": {
                "runc": {
                    "runtime_type": "io.containerd.runc.v2",
                    # cgroup v1 hybrid without systemd: cgroupfs (matches kubelet's cgroupDriver).
                    "options": {"SystemdCgroup": False},
                }
            },
        },
        "cni": {"bin_dir": str(CNI_BIN_DIR), "conf_dir": str(layout.cni_conf), "max_conf_num": 1},
    }
    config = {
        "version": 2,
        "root": str(containerd_root()),
        "state": str(layout.containerd_state),
        "disabled_plugins": [
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.internal.v1.tracing",
        ],
        "grpc": {"address": str(layout.containerd_socket)},
        "ttrpc": {"address": f"{layout.containerd_socket}.ttrpc"},
        "metrics": {"address": ""},
        "plugins": {
            "io.containerd.grpc.v1.cri": cri,
            "io.containerd.internal.v1.opt": {"path": str(layout.data / "opt")},
        },
    }
    return _toml(config)


def _toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """The small TOML subset containerd's config needs (tables, strings, bools, ints, lists)."""
    scalars, tables = [], []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            scalars.append(f"{key} = {_toml_value(value)}")
    out = ""
    if scalars:
        out += (f"[{prefix}]\n" if prefix else "") + "\n".join(scalars) + "\n\n"
    for key, value in tables:
        name = f'{prefix}."{key}"' if "." in key else (f"{prefix}.{key}" if prefix else key)
        out += _toml(value, name)
    return out


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def cni_config(layout: NodeLayout) -> dict[str, Any]:
    """The pod network: a bridge inside the node namespace, host-local addresses, no masquerade."""
    return {
        "cniVersion": "1.0.0",
        "name": "rasterkube",
        "plugins": [
            {
                "type": "bridge",
                "bridge": POD_BRIDGE,
                "isGateway": True,
                "ipMasq": False,  # no NAT: there is nothing outside the namespace to reach
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(layout.cni_data),
                },
            }
        ],
    }


def kubelet_config(layout: NodeLayout, ca_cert: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "imageServiceEndpoint": f"unix://{layout.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{layout.cgroup}",
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "failSwapOn": False,
        "failCgroupV1": False,
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [CLUSTER_DNS_IP],
        # No host resolver for pods: names outside the cluster do not resolve (network rule).
        "resolvConf": "",
        "podLogsDir": str(layout.pod_logs),
        "maxPods": 32,
        "serializeImagePulls": False,
        # The disk is shared with other work: evict only when it is really full, and never
        # garbage-collect images (they are imported, not pulled: nothing could bring them back).
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%", "imagefs.inodesFree": "1%"},  # fmt: skip
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "shutdownGracePeriod": "0s",
    }


def kube_proxy_config(kubeconfig: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": CLUSTER_CIDR,
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # conntrack limits are machine-wide: leave them alone.
        "conntrack": {"maxPerCore": 0, "min": 0},
        # Pod -> ClusterIP -> pod on the same bridge: replies must come back through the
        # node, whether or not bridged traffic passes iptables here.
        "iptables": {"masqueradeAll": True},
    }


def controller_manager_args(plane: ControlPlane, kubeconfig: Path) -> list[str]:
    pki = plane.directory / "pki"
    return [
        f"--kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        "--secure-port=10257",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki / 'service-account.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        f"--cluster-cidr={CLUSTER_CIDR}",
        "--allocate-node-cidrs=false",
        "--v=1",
    ]


def scheduler_args(kubeconfig: Path) -> list[str]:
    return [f"--kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", "--secure-port=10259", "--leader-elect=false",
            "--v=1"]  # fmt: skip


def kubelet_args(layout: NodeLayout, config: Path, kubeconfig: Path) -> list[str]:
    return [f"--config={config}", f"--kubeconfig={kubeconfig}", f"--root-dir={layout.kubelet_root}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}",
            "--node-labels=rasterkube.dev/dev-node=true", "--v=1"]  # fmt: skip


def kubelet_wrapper(layout: NodeLayout, argv: Sequence[str]) -> list[str]:
    """``argv`` (the kubelet) in a mount namespace of its own and the node's network namespace.

    In that mount namespace the machine-wide kernel settings read as what kubelet wants, and
    /var/log is a tmpfs of its own (for the symlinks kubelet puts in /var/log/containers). Its root directory is a shared mount
    (see :meth:`Node._share_kubelet_root`), so the volumes it mounts reach containerd.
    """
    binds = [(layout.tunables / name.replace("/", "."), Path("/proc/sys") / name) for name in KUBELET_KERNEL_TUNABLES]
    script = "set -e\n" + "".join(f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}\n"
                                   for src, dst in binds)  # fmt: skip
    script += f"mount -t tmpfs -o size=16m,mode=0755 rasterkube-kubelet-logs {KUBELET_PRIVATE_LOG_DIR}\n"
    script += 'exec "$@"\n'
    inner = layout.netns.command(argv)
    # --propagation unchanged: the copy of the shared kubelet root stays a peer of the machine's.
    return ["unshare", "--mount", "--propagation", "unchanged", "--", "sh", "-c", script, "kubelet", *inner]


# --------------------------------------------------------------------------
# In-cluster add-ons (pure)
# --------------------------------------------------------------------------

COREFILE = f""".:53 {{
    errors
    health :8080
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    cache 30
    loop
    loadbalance
}}
"""


def coredns_manifests(image: str) -> list[dict[str, Any]]:
    """CoreDNS in kube-system: cluster names only (no ``forward``: nothing outside to ask)."""
    labels = {"k8s-app": "kube-dns"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": "kube-system"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                 "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],  # fmt: skip
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"},
         "data": {"Corefile": COREFILE}},  # fmt: skip
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "priorityClassName": "system-cluster-critical",
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532},
                        "containers": [
                            {
                                "name": "coredns",
                                "image": image,
                                "imagePullPolicy": "Never",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                ],
                                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                                              "limits": {"memory": "128Mi"}},  # fmt: skip
                                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                                "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
                                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                    "capabilities": {"drop": ["ALL"]}},  # fmt: skip
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "selector": labels,
                "clusterIP": CLUSTER_DNS_IP,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        },
    ]


def pause_image() -> images.Image:
    return images.single_file_image(PAUSE_REPOSITORY, binaries.PAUSE_VERSION, binaries.ensure_pause(), "/pause",
                                    images.ImageConfig(entrypoint=["/pause"], user="65535:65535"))  # fmt: skip


def coredns_image() -> images.Image:
    return images.single_file_image(COREDNS_REPOSITORY, binaries.COREDNS_VERSION, binaries.ensure_coredns(),
                                    "/coredns", images.ImageConfig(entrypoint=["/coredns"]))  # fmt: skip


# --------------------------------------------------------------------------
# Machine resources: cgroups and mounts
# --------------------------------------------------------------------------


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount, in mount order."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        point = left.split()[4]
        # mountinfo escapes space, tab, newline and backslash as octal
        point = point.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")
        found.append((point, right.split()[0]))
    return found


def mounts_under(paths: Iterable[Path]) -> list[str]:
    """Mount points at or below any of ``paths``, deepest last."""
    roots = [str(p) for p in paths]
    return [point for point, _ in _mountinfo() if any(point == r or point.startswith(r + "/") for r in roots)]


def unmount_all(paths: Iterable[Path]) -> list[str]:
    """Unmount everything at or below ``paths`` (deepest first, lazily if busy)."""
    done = []
    for _ in range(5):  # a lazy unmount can reveal a mount stacked beneath
        points = mounts_under(paths)
        if not points:
            break
        for point in reversed(points):
            proc = subprocess.run(["umount", point], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                subprocess.run(["umount", "--lazy", point], capture_output=True, text=True, check=False)
            done.append(point)
    return done


def cgroup_hierarchies() -> list[Path]:
    """Mount points of the cgroup (v1) and cgroup2 hierarchies."""
    return [Path(point) for point, fstype in _mountinfo() if fstype in ("cgroup", "cgroup2")]


def cgroup_dirs(name: str) -> list[Path]:
    """The directories of cgroup ``/name`` in every hierarchy where it exists."""
    return [h / name for h in cgroup_hierarchies() if (h / name).is_dir()]


def create_cgroup(name: str, cpus: int | None = None) -> None:
    """``/name`` in every hierarchy (cpuset gets its parent's cpus and mems).

    Its CPU weight is that of ``cpus`` CPUs' worth of busy processes (default: all of this
    machine's): the node is one group among this machine's processes, and with the default
    weight all its pods together would count as a single process.
    """
    cpus = cpus or os.cpu_count() or 1
    for hierarchy in cgroup_hierarchies():
        path = hierarchy / name
        path.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (path / knob).exists() and not (path / knob).read_text().strip():
                (path / knob).write_text((hierarchy / knob).read_text())
        if (path / "cpu.shares").exists():  # cgroup v1: 1024 per CPU (kubelet's scale too)
            (path / "cpu.shares").write_text(str(1024 * cpus))
        elif (path / "cpu.weight").exists():  # cgroup v2: 100 is one process's default
            (path / "cpu.weight").write_text(str(min(10000, 100 * cpus)))


def cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for top in cgroup_dirs(name):
        for dirpath, _, filenames in os.walk(top):
            if "cgroup.procs" in filenames:
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def kill_cgroup(name: str, timeout_s: float = STOP_TIMEOUT_S) -> set[int]:
    """SIGKILL every process in cgroup ``/name`` and below until none is left."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while pids := cgroup_pids(name):
        for pid in pids - killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= pids
        if time.monotonic() > deadline:
            raise NodeError(f"processes {sorted(pids)} in cgroup /{name} survived SIGKILL")
        time.sleep(0.1)
    return killed


def remove_cgroup(name: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """rmdir cgroup ``/name`` and its children in every hierarchy (deepest first)."""
    deadline = time.monotonic() + timeout_s
    while dirs := cgroup_dirs(name):
        for top in dirs:
            for dirpath, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        if time.monotonic() > deadline:
            raise NodeError(f"cgroup /{name} could not be removed: {cgroup_dirs(name)}")
        if cgroup_dirs(name):
            time.sleep(0.1)


# --------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------


@dataclass
class NodeInfo:
    """Where a running node is (``node.json``)."""

    name: str
    id: str
    netns: str
    node_ip: str
    kubeconfig: str
    server: str
    containerd_socket: str
    images: dict[str, str] = field(default_factory=dict)
    packages: dict[str, str | None] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class Node:
    """One real node (and its control plane) rooted at ``directory`` (see the module docstring).

    ``directory`` is the dev stack's directory: the control plane lives in ``k8s/`` as in
    the API-only stack, the node's files in ``node/``.
    """

    def __init__(self, directory: Path, *, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.directory = Path(directory).resolve()
        self.layout = NodeLayout.of(self.directory / "node")
        self.plane = ControlPlane(self.directory / "k8s", netns=self.layout.netns, address=NODE_IP,
                                  node_name=NODE_NAME)  # fmt: skip
        self.ready_timeout_s = ready_timeout_s
        self.timings: dict[str, float] = {}
        self._images: dict[str, str] = {}

    # -- public --------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    @property
    def containerd(self) -> images.Containerd:
        return images.Containerd(self.layout.containerd_socket)

    def info(self) -> NodeInfo:
        data = json.loads(self.layout.state_file.read_text())
        return NodeInfo(**data)

    def is_running(self) -> bool:
        return self.layout.netns.exists() or any(processes.is_running(self.layout.pid(c)) for c in STOP_ORDER)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout_s: float = KUBECTL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:  # fmt: skip
        cmd = [str(binaries.ensure_kubectl()), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout_s, check=False)
        if check and proc.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
        return proc

    def apply(self, manifests: Sequence[Mapping[str, Any]]) -> None:
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=rasterkube-dev", "-f", "-",
                     input=yaml.safe_dump_all(list(manifests), sort_keys=False))  # fmt: skip

    def start(self, *, verbose: bool = False) -> NodeInfo:
        """Bring the node up (see the module docstring); on failure everything is stopped again."""
        reason = unavailable_reason()
        if reason:
            raise NodeError(f"a real node cannot run here: {reason}")
        if self.is_running():
            raise NodeError(f"a node of {self.directory} is already running; stop it first (`rasterkube dev down`)")
        started = time.monotonic()
        self._timed("packages", lambda: debian.ensure(debian.NODE_PACKAGES))
        self._timed("binaries", self._ensure_binaries)
        self._claim_containerd_root()
        try:
            self._up(verbose)
        except BaseException:
            _say(verbose, f"the node failed to start; stopping what was started (logs in {self.layout.directory / 'logs'})")
            with contextlib.suppress(Exception):
                self.stop()
            raise
        self.timings["total"] = round(time.monotonic() - started, 2)
        info = NodeInfo(
            name=NODE_NAME, id=self.layout.id, netns=self.layout.netns.name, node_ip=NODE_IP,
            kubeconfig=str(self.kubeconfig), server=self.plane.server,
            containerd_socket=str(self.layout.containerd_socket), images=self._images,
            packages=debian.versions(("containerd", "runc", "containernetworking-plugins", "iptables")),
            timings=self.timings,
        )  # fmt: skip
        self.layout.state_file.write_text(json.dumps(asdict(info), indent=2) + "\n")
        return info

    def stop(self) -> dict[str, bool]:
        """Stop everything and remove every trace on the machine (idempotent, any process)."""
        layout = self.layout
        stopped: dict[str, bool] = {}
        for component in STOP_ORDER:
            if component == CONTAINERD:
                # The pods first, while containerd can still forget them.
                kill_cgroup(layout.cgroup)
                self._forget_containers()
            stopped[component] = processes.stop_detached(layout.pid(component), timeout_s=STOP_TIMEOUT_S)
        kill_cgroup(layout.cgroup)  # a container that raced the kubelet's stop
        was_plane = self.plane.is_running()
        self.plane.stop()
        stopped["control-plane"] = was_plane
        unmount_all(layout.owned_paths())
        remove_cgroup(layout.cgroup)
        if layout.netns.exists():
            netns.delete(layout.netns)
            stopped["netns"] = True
        for path in layout.owned_paths():
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # /run/rasterkube, /var/lib/rasterkube when no other node uses them
        self._release_containerd_root()
        with contextlib.suppress(FileNotFoundError):
            state = json.loads(layout.state_file.read_text())
            state["stopped"] = True
            layout.state_file.write_text(json.dumps(state, indent=2) + "\n")
        return stopped

    def leftovers(self) -> dict[str, list[str]]:
        """What of this node is still on the machine (empty lists after ``stop()``)."""
        layout = self.layout
        pids = [str(p) for c in STOP_ORDER for p in processes.recorded_pids(layout.pid(c))]
        return {
            "processes": pids + [str(p) for p in cgroup_pids(layout.cgroup)],
            "mounts": mounts_under(layout.owned_paths()),
            "cgroups": [str(p) for p in cgroup_dirs(layout.cgroup)],
            "netns": [ns.name for ns in netns.ours(layout.netns.name)],
            "dirs": [str(p) for p in layout.owned_paths() if p.exists()],
        }

    # -- steps ---------------------------------------------------------------

    def _timed(self, name: str, fn: Callable[[], object]) -> object:
        t0 = time.monotonic()
        result = fn()
        self.timings[name] = round(time.monotonic() - t0, 2)
        return result

    def _ensure_binaries(self) -> dict[str, Path]:
        found = dict(binaries.ensure_node_components())
        found["coredns"] = binaries.ensure_coredns()
        found["pause"] = binaries.ensure_pause()
        found["kubectl"] = binaries.ensure_kubectl()
        return found

    def _up(self, verbose: bool) -> None:
        layout = self.layout
        exe = binaries.ensure_node_components()
        for path in (layout.run, layout.data, layout.pod_logs, layout.cni_data,
                     layout.kubelet_root, layout.tunables, layout.config, layout.cni_conf):  # fmt: skip
            path.mkdir(parents=True, exist_ok=True)
        self._timed("network", self._network)
        _say(verbose, f"  network namespace {layout.netns.name}: node {NODE_IP}, pods {POD_CIDR}")
        self._timed("control_plane", self.plane.start)
        _say(verbose, f"  control plane ready ({self.timings['control_plane']:.1f}s): {self.plane.server}")
        self._timed("containerd", self._start_containerd)
        self._images = {"pause": pause_image().name, "coredns": coredns_image().name}
        self._timed("images", lambda: [images.import_image(self.containerd, img) for img in (pause_image(), coredns_image())])
        (layout.cni_conf / "10-rasterkube.conflist").write_text(json.dumps(cni_config(layout), indent=2))
        self._write_config_files()
        create_cgroup(layout.cgroup)
        kubeconfig = self.plane.component_kubeconfig
        self._spawn(CONTROLLER_MANAGER, [str(exe[CONTROLLER_MANAGER]), *controller_manager_args(self.plane, kubeconfig(CONTROLLER_MANAGER))])
        self._spawn(SCHEDULER, [str(exe[SCHEDULER]), *scheduler_args(kubeconfig(SCHEDULER))])
        self._share_kubelet_root()
        kubelet_argv = [str(exe[KUBELET]), *kubelet_args(layout, layout.config / "kubelet.yaml", kubeconfig(KUBELET))]
        self._spawn(KUBELET, kubelet_wrapper(layout, kubelet_argv), in_netns=False)
        self._spawn(KUBE_PROXY, [str(exe[KUBE_PROXY]), f"--config={layout.config / 'kube-proxy.yaml'}"])
        self._timed("node_ready", self._wait_node_ready)
        _say(verbose, f"  node {NODE_NAME} Ready ({self.timings['node_ready']:.1f}s)")
        self._timed("coredns", self._start_coredns)
        _say(verbose, f"  CoreDNS ready ({self.timings['coredns']:.1f}s) at {CLUSTER_DNS_IP}")

    def _network(self) -> None:
        layout = self.layout
        ns = netns.create(layout.netns.name)
        netns.veth_pair(ns, NODE_IF, ns, NODE_PEER_IF)
        ns.add_address(NODE_IF, f"{NODE_IP}/{NODE_PREFIX}")
        # Processes on the node's network (kubelet, port-forwards) reach ClusterIPs: kube-proxy's
        # DNAT happens after routing, which needs a route for the service range.
        ns.add_route(SERVICE_CLUSTER_IP_RANGE, NODE_IF, NODE_IP)
        ns.sysctl("net.ipv4.ip_forward", "1")  # pod -> ClusterIP -> pod through the node
        with contextlib.suppress(OSError):  # per-namespace where br_netfilter is built in
            ns.sysctl("net.bridge.bridge-nf-call-iptables", "1")

    def _spawn(self, component: str, argv: Sequence[str], *, in_netns: bool = True) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PATH": f"/usr/sbin:/usr/bin:/sbin:/bin:{os.environ.get('PATH', '')}"}
        full = self.layout.netns.command(argv) if in_netns else list(argv)
        return processes.start_detached(full, pid_file=self.layout.pid(component), log_file=self.layout.log(component),
                                        env=env)  # fmt: skip

    def _wait(self, what: str, component: str | None, check: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if component and not processes.is_running(self.layout.pid(component)):
                raise NodeError(f"{component} exited while {what}.\n--- {self.layout.log(component)} ---\n"
                                f"{_tail(self.layout.log(component))}")  # fmt: skip
            if time.monotonic() > deadline:
                log_hint = f"\n--- {self.layout.log(component)} ---\n{_tail(self.layout.log(component))}" if component else ""
                raise NodeError(f"timed out after {timeout_s:.0f}s {what}{log_hint}")
            time.sleep(POLL_INTERVAL_S)

    def _start_containerd(self) -> None:
        layout = self.layout
        config = layout.config / "containerd.toml"
        config.write_text(containerd_config(layout, pause_image().name))
        self._spawn(CONTAINERD, ["containerd", f"--config={config}"])

        def answers() -> bool:
            try:
                self.containerd.ctr("version", timeout_s=10)
            except (images.ImageError, subprocess.TimeoutExpired):
                return False
            return True

        self._wait("waiting for containerd", CONTAINERD, answers, 60)
        self._forget_containers()  # what a crashed earlier node left in the shared image store

    def _forget_containers(self) -> None:
        """Remove every container (and its snapshot) from containerd's records; images stay."""
        if not self.layout.containerd_socket.exists() or not processes.is_running(self.layout.pid(CONTAINERD)):
            return
        ctr = self.containerd
        with contextlib.suppress(images.ImageError, subprocess.TimeoutExpired):
            for task_id in _first_column(ctr.ctr("tasks", "list", "--quiet")):
                with contextlib.suppress(images.ImageError):
                    ctr.ctr("tasks", "delete", "--force", task_id)
            for container_id in _first_column(ctr.ctr("containers", "list", "--quiet")):
                with contextlib.suppress(images.ImageError):
                    ctr.ctr("containers", "delete", container_id)

    def _write_config_files(self) -> None:
        layout = self.layout
        (layout.config / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(layout, self.plane.ca_cert)))
        proxy = kube_proxy_config(self.plane.component_kubeconfig(KUBE_PROXY))
        (layout.config / "kube-proxy.yaml").write_text(yaml.safe_dump(proxy))
        for name, value in KUBELET_KERNEL_TUNABLES.items():
            (layout.tunables / name.replace("/", ".")).write_text(value + "\n")

    def _share_kubelet_root(self) -> None:
        """Make the kubelet's root directory a shared mount (its volume mounts must reach containerd)."""
        root = str(self.layout.kubelet_root)
        if root not in mounts_under([self.layout.kubelet_root]):
            subprocess.run(["mount", "--bind", root, root], check=True, capture_output=True)
        subprocess.run(["mount", "--make-rshared", root], check=True, capture_output=True)

    def _wait_node_ready(self) -> None:
        def ready() -> bool:
            proc = self.kubectl("get", "node", NODE_NAME, "-o",
                                'jsonpath={.status.conditions[?(@.type=="Ready")].status}', check=False)  # fmt: skip
            return proc.returncode == 0 and proc.stdout.strip() == "True"

        self._wait(f"waiting for node {NODE_NAME} to be Ready", KUBELET, ready, self.ready_timeout_s)

    def _start_coredns(self) -> None:
        self.apply(coredns_manifests(coredns_image().name))

        def ready() -> bool:
            proc = self.kubectl("-n", "kube-system", "get", "deployment", "coredns", "-o",
                                "jsonpath={.status.readyReplicas}", check=False)  # fmt: skip
            return proc.returncode == 0 and proc.stdout.strip() == "1"

        self._wait("waiting for CoreDNS", KUBELET, ready, self.ready_timeout_s)

    # -- the shared image store ---------------------------------------------

    def _claim_containerd_root(self) -> None:
        """One node at a time may use containerd's image store; say which one has it."""
        owner = _owner_file()
        owner.parent.mkdir(parents=True, exist_ok=True)
        with binaries._file_lock("containerd-root"):
            try:
                current = json.loads(owner.read_text())
            except (FileNotFoundError, ValueError):
                current = None
            if current and current.get("directory") != str(self.directory):
                other = NodeLayout.of(Path(current["directory"]) / "node")
                if netns.Namespace(other.netns.name).exists() or processes.is_running(other.pid(CONTAINERD)):
                    raise NodeError(
                        f"another rasterkube node (of {current['directory']}) is running and uses the image store "
                        f"{containerd_root()}; stop it first: rasterkube dev down --dir {current['directory']}"
                    )
            owner.write_text(json.dumps({"directory": str(self.directory), "pid": os.getpid()}) + "\n")

    def _release_containerd_root(self) -> None:
        owner = _owner_file()
        with binaries._file_lock("containerd-root"):
            with contextlib.suppress(FileNotFoundError, ValueError):
                if json.loads(owner.read_text()).get("directory") == str(self.directory):
                    owner.unlink()


def _first_column(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)
