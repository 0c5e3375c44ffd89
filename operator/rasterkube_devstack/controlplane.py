"""A real, Docker-free Kubernetes control plane: etcd + kube-apiserver.

``ControlPlane(directory).start()`` launches a single-member etcd and a
kube-apiserver on free 127.0.0.1 ports, with a private CA, TLS serving cert,
service-account signing key, RBAC and a static admin token, and writes
``directory/kubeconfig`` for kubectl/helm/the kubernetes client.

Layout under ``directory``::

    kubeconfig            admin kubeconfig (token auth, CA-verified TLS)
    controlplane.json     server URL, etcd URL, ports (for other processes)
    pki/                  CA, serving cert, service-account keys, token file
    apiserver-certs/      --cert-dir (unused because we pass our own cert)
    etcd-data/            etcd data (wiped on every start())
    logs/<component>.log  stdout+stderr of each process
    pids/<component>.pid  JSON {pid, exe}; lets stop() work from any process

With ``netns=`` (the real node, :mod:`rasterkube_devstack.node`) etcd and the API server
run inside that network namespace instead, the API server on the node address (``address``)
at port 6443 with the Node authorizer, ServiceAccount admission and a lease-reconciled
``kubernetes`` Service; a forwarder (:mod:`.forward`) gives this machine's loopback a port
for kubectl. Each node component then has its own identity (a static token, one kubeconfig
each under ``kubeconfigs/``) and the API server its client certificate for kubelets. The
limitations below are those of the API-only control plane.

Limitations of the API-only control plane (there is no kube-controller-manager, scheduler or
kubelet):

* Deployments/ReplicaSets/Jobs are stored but never get Pods; Pods stay
  Pending forever.
* Namespace *deletion* never finishes (the namespace controller that empties
  and finalizes Terminating namespaces does not run); tests should use fresh
  namespaces instead of deleting them.
* No garbage collection of ownerReferences, no ServiceAccount/token
  controllers. The ``ServiceAccount`` admission plugin is therefore disabled,
  otherwise every Pod would be rejected because the ``default``
  ServiceAccount is never created.
* Creating Namespaces, CRDs (incl. CEL ``x-kubernetes-validations``), custom
  resources, Secrets, ConfigMaps, Events, Leases and Deployments works.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rasterkube_devstack import binaries, netns, processes

LOOPBACK = "127.0.0.1"
ETCD = "etcd"
APISERVER = "kube-apiserver"
#: The loopback port of this machine that leads to an API server inside a namespace.
APISERVER_FORWARD = "kube-apiserver-forward"
#: Stop order: apiserver first so it does not spam errors about a dead etcd.
COMPONENTS = (APISERVER, ETCD)
#: Fixed ports inside a namespace of our own (no one else binds there).
NETNS_APISERVER_PORT = 6443
NETNS_ETCD_CLIENT_PORT = 2379
NETNS_ETCD_PEER_PORT = 2380
#: Identities of the node components (static tokens): the names Kubernetes' bootstrap RBAC
#: and the Node authorizer know. The kubelet's is system:node:<node name> in system:nodes.
COMPONENT_USERS = {
    "kube-controller-manager": ("system:kube-controller-manager", ()),
    "kube-scheduler": ("system:kube-scheduler", ()),
    "kube-proxy": ("system:kube-proxy", ()),
}
NODES_GROUP = "system:nodes"
KUBELET_CLIENT_CN = "kube-apiserver-kubelet-client"

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
#: First IP of the service range: the in-cluster "kubernetes" Service IP.
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVING_CERT_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
ADMIN_USER = "rasterkube-admin"
ADMIN_UID = "rasterkube-admin"
#: Hard-wired superuser group of the RBAC authorizer: no bindings needed.
ADMIN_GROUP = "system:masters"
#: Pods need the default ServiceAccount, which only the (absent)
#: controller-manager creates; see the module docstring.
DISABLED_ADMISSION_PLUGINS = ("ServiceAccount",)
ETCD_MEMBER_NAME = "rasterkube-devstack"
KUBECONFIG_NAME = "rasterkube-devstack"
CERT_VALIDITY = dt.timedelta(days=365)

ETCD_READY_TIMEOUT_S = 30.0
APISERVER_READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.2
DEFAULT_NAMESPACE = "default"
DEFAULT_NAMESPACE_GRACE_S = 10.0
HTTP_TIMEOUT_S = 5.0
LOG_TAIL_CHARS = 6000
#: Free ports are probed then released, so another process may grab one
#: before our child binds it; retry the launch on "address already in use".
PORT_ATTEMPTS = 3
ADDRESS_IN_USE = "address already in use"


class ControlPlaneError(RuntimeError):
    """The control plane failed to start (message includes the log tail)."""


# --------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    root: Path

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def state(self) -> Path:
        return self.root / "controlplane.json"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def serving_cert(self) -> Path:
        return self.pki / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.pki / "apiserver.key"

    @property
    def sa_private_key(self) -> Path:
        return self.pki / "service-account.key"

    @property
    def sa_public_key(self) -> Path:
        return self.pki / "service-account.pub"

    @property
    def token_file(self) -> Path:
        return self.pki / "tokens.csv"

    @property
    def kubelet_client_cert(self) -> Path:
        return self.pki / "apiserver-kubelet-client.crt"

    @property
    def kubelet_client_key(self) -> Path:
        return self.pki / "apiserver-kubelet-client.key"

    def component_kubeconfig(self, component: str) -> Path:
        return self.root / "kubeconfigs" / f"{component}.kubeconfig"

    @property
    def forward_port_file(self) -> Path:
        return self.root / "pids" / f"{APISERVER_FORWARD}.port"

    @property
    def cert_dir(self) -> Path:
        return self.root / "apiserver-certs"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd-data"

    def log(self, component: str) -> Path:
        return self.root / "logs" / f"{component}.log"

    def pid(self, component: str) -> Path:
        return self.root / "pids" / f"{component}.pid"


# --------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pki:
    ca_pem: bytes
    token: str
    #: component -> (user, token) for the node components (empty without a node)
    components: dict[str, tuple[str, str]]


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(data)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rasterkube-devstack-ca")])
    cert = (
        _cert_builder("rasterkube-devstack-ca", name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _make_serving_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, extra_ips: Sequence[str] = ()
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in SERVING_CERT_DNS_NAMES]
    ips = dict.fromkeys((LOOPBACK, KUBERNETES_SERVICE_IP, *extra_ips))
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        _cert_builder(APISERVER, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _make_client_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, organization: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A client certificate (CN = user, O = group) signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write_pki(layout: _Layout, extra_ips: Sequence[str] = (), node_name: str | None = None) -> _Pki:
    """Fresh CA, serving cert, SA key pair and tokens for this start().

    With ``node_name`` also the identities of the node components (tokens) and the API
    server's client certificate for talking to the kubelet.
    """
    ca_key, ca_cert = _make_ca()
    serving_key, serving_cert = _make_serving_cert(ca_key, ca_cert, extra_ips)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    layout.pki.mkdir(parents=True, exist_ok=True)
    layout.ca_cert.write_bytes(ca_pem)
    # Chain in the serving file so clients that only trust the CA verify it.
    layout.serving_cert.write_bytes(serving_cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    _write_private(layout.serving_key, _key_pem(serving_key))

    # RSA because RS256 is what every JWT consumer of SA tokens supports.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_private(layout.sa_private_key, _key_pem(sa_key))
    layout.sa_public_key.write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    token = secrets.token_urlsafe(32)
    # Static token file format: token,user,uid,"group1,group2"
    lines = [f'{token},{ADMIN_USER},{ADMIN_UID},"{ADMIN_GROUP}"']
    components: dict[str, tuple[str, str]] = {}
    if node_name is not None:
        users = {**COMPONENT_USERS, "kubelet": (f"system:node:{node_name}", (NODES_GROUP,))}
        for component, (user, groups) in users.items():
            component_token = secrets.token_urlsafe(32)
            components[component] = (user, component_token)
            lines.append(f'{component_token},{user},{user}' + (f',"{",".join(groups)}"' if groups else ""))
        # The API server authenticates to kubelets (logs, exec, port-forward) with this.
        client_key, client_cert = _make_client_cert(ca_key, ca_cert, KUBELET_CLIENT_CN, ADMIN_GROUP)
        layout.kubelet_client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
        _write_private(layout.kubelet_client_key, _key_pem(client_key))
    _write_private(layout.token_file, ("\n".join(lines) + "\n").encode())
    return _Pki(ca_pem=ca_pem, token=token, components=components)


# --------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, limit: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    return text if len(text) <= limit else "…" + text[-limit:]


def _spawn(
    component: str, exe: Path, args: Sequence[str], layout: _Layout, ns: netns.Namespace | None = None
) -> subprocess.Popen[bytes]:
    log_path = layout.log(component)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [str(exe), *args]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            ns.command(argv) if ns is not None else argv,  # nsenter execs exe: same pid
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Own session/process group: not killed by the caller's Ctrl-C and
            # stoppable as a group from another process.
            start_new_session=True,
            close_fds=True,
        )
    pid_path = layout.pid(component)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.write_text(json.dumps({"pid": proc.pid, "exe": str(exe)}))
    return proc


def _read_pid(pid_path: Path) -> tuple[int, str] | None:
    try:
        data = json.loads(pid_path.read_text())
        return int(data["pid"]), str(data["exe"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _is_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie awaiting its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # Field 3 (after the parenthesised comm, which may contain spaces) is the state.
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _is_our_process(pid: int, exe: str) -> bool:
    """Guard against pid reuse: only signal a pid still running our binary."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return argv0 == exe and not _is_gone(pid)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # pid == pgid thanks to start_new_session=True
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _wait_gone(pid: int, timeout_s: float, child: subprocess.Popen[bytes] | None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            return True  # reaped
        if child is None and _is_gone(pid):
            return True
        time.sleep(POLL_INTERVAL_S)
    return False


def _stop_component(pid_path: Path, child: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """SIGTERM the process group, wait, then SIGKILL; remove the pid file."""
    record = _read_pid(pid_path)
    if record is not None:
        pid, exe = record
        if _is_our_process(pid, exe):
            _signal_group(pid, signal.SIGTERM)
            if not _wait_gone(pid, timeout_s, child):
                _signal_group(pid, signal.SIGKILL)
                _wait_gone(pid, timeout_s, child)
    if child is not None and child.poll() is None:
        child.kill()  # pid file missing/overwritten but we still own the child
    if child is not None:
        child.wait(timeout=timeout_s)  # reap so no zombie lingers
    pid_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# HTTP readiness probes
# --------------------------------------------------------------------------


def _opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    # Empty ProxyHandler: never route loopback probes through $HTTPS_PROXY
    # (urllib, unlike Go, does not exempt 127.0.0.1 unless NO_PROXY says so).
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))


class _NamespaceHTTPConnection(http.client.HTTPConnection):
    """HTTP to an address inside a network namespace (the socket is made there)."""

    def __init__(self, ns: netns.Namespace, host: str, port: int | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ns = ns

    def connect(self) -> None:
        self.sock = self._ns.connect((self.host, self.port), self.timeout)


class _NamespaceHTTPSConnection(http.client.HTTPSConnection):
    def __init__(
        self, ns: netns.Namespace, host: str, port: int | None, timeout: float, context: ssl.SSLContext | None
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._ns = ns

    def connect(self) -> None:
        sock = self._ns.connect((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def _http_in_namespace(
    ns: netns.Namespace, url: str, context: ssl.SSLContext | None, headers: dict[str, str], method: str,
    data: bytes | None,
) -> tuple[int, str]:  # fmt: skip
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or LOOPBACK, parsed.port
    conn: http.client.HTTPConnection = (
        _NamespaceHTTPSConnection(ns, host, port, HTTP_TIMEOUT_S, context)
        if parsed.scheme == "https"
        else _NamespaceHTTPConnection(ns, host, port, HTTP_TIMEOUT_S)
    )
    try:
        conn.request(method, parsed.path + (f"?{parsed.query}" if parsed.query else ""), body=data, headers=headers)
        response = conn.getresponse()
        return int(response.status), response.read().decode(errors="replace")
    finally:
        conn.close()


def _http(
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    token: str | None = None,
    method: str = "GET",
    body: Mapping[str, object] | None = None,
    ns: netns.Namespace | None = None,
) -> tuple[int, str]:
    """Tiny stdlib HTTP client: returns (status, body) for any HTTP status.

    With ``ns`` the URL is an address inside that network namespace."""
    data = json.dumps(body).encode() if body is not None else None
    if ns is not None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if data is not None:
            headers["Content-Type"] = "application/json"
        return _http_in_namespace(ns, url, context, headers, method, data)
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _opener(context).open(request, timeout=HTTP_TIMEOUT_S) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def _wait_until(
    component: str,
    probe: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    timeout_s: float,
    log_path: Path,
) -> None:
    """Poll ``probe`` until true; fail fast (with log tail) if the process exits."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _ProcessExited(component, proc.returncode, _tail(log_path))
        try:
            if probe():
                return
        except (OSError, ValueError, urllib.error.URLError) as exc:  # not listening / half up
            last_error = repr(exc)
        time.sleep(POLL_INTERVAL_S)
    raise ControlPlaneError(
        f"{component} did not become ready within {timeout_s:.0f}s (last probe error: {last_error or 'none'}).\n"
        f"--- {log_path} (tail) ---\n{_tail(log_path)}"
    )


class _ProcessExited(ControlPlaneError):
    def __init__(self, component: str, code: int, log_tail: str) -> None:
        super().__init__(f"{component} exited with code {code} during startup.\n--- log (tail) ---\n{log_tail}")
        self.log_tail = log_tail


# --------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------


def etcd_args(data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    client_url = f"http://{LOOPBACK}:{client_port}"
    peer_url = f"http://{LOOPBACK}:{peer_port}"
    return [
        f"--name={ETCD_MEMBER_NAME}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster={ETCD_MEMBER_NAME}={peer_url}",
        "--initial-cluster-state=new",
        # Throwaway dev data: fsync dominates write latency on CI disks.
        "--unsafe-no-fsync=true",
        "--log-level=warn",
    ]


def apiserver_args(
    layout: _Layout, etcd_url: str, secure_port: int, address: str = LOOPBACK, node: bool = False
) -> list[str]:
    """The API server's flags; ``node``: for a control plane with a real node (see the module docstring)."""
    args = [
        f"--etcd-servers={etcd_url}",
        f"--bind-address={address}",
        f"--advertise-address={address}",
        f"--secure-port={secure_port}",
        f"--cert-dir={layout.cert_dir}",
        f"--tls-cert-file={layout.serving_cert}",
        f"--tls-private-key-file={layout.serving_key}",
        f"--token-auth-file={layout.token_file}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={layout.sa_public_key}",
        f"--service-account-signing-key-file={layout.sa_private_key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--allow-privileged=true",
        "--profiling=false",
    ]
    if node:
        return args + [
            # Kubelets get exactly their own node's objects (Node authorizer + NodeRestriction).
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--client-ca-file={layout.ca_cert}",
            f"--kubelet-client-certificate={layout.kubelet_client_cert}",
            f"--kubelet-client-key={layout.kubelet_client_key}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
    return args + [
        "--authorization-mode=RBAC",
        f"--disable-admission-plugins={','.join(DISABLED_ADMISSION_PLUGINS)}",
        # The "kubernetes" Service would otherwise get a 127.0.0.1 endpoint,
        # which Endpoints validation rejects (log spam every 10 s); nothing
        # in-cluster could reach it anyway.
        "--endpoint-reconciler-type=none",
    ]


# --------------------------------------------------------------------------
# Kubeconfig
# --------------------------------------------------------------------------


def _kubeconfig(server: str, ca_pem: bytes, token: str, user: str = ADMIN_USER) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": KUBECONFIG_NAME,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": KUBECONFIG_NAME,
                "context": {"cluster": KUBECONFIG_NAME, "user": user, "namespace": DEFAULT_NAMESPACE},
            }
        ],
        "current-context": KUBECONFIG_NAME,
        "preferences": {},
    }


# --------------------------------------------------------------------------
# ControlPlane
# --------------------------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver rooted at ``directory``; see the module docstring.

    ``stop()`` only needs the directory, so ``ControlPlane(d).stop()`` from a
    different process cleans up a control plane started elsewhere (also one that ran in
    a namespace: the forwarder's pid file is in the same place).

    ``netns``/``address``/``node_name``: run inside that network namespace, serve on
    ``address`` and create the identities of a node named ``node_name``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        ready_timeout_s: float = APISERVER_READY_TIMEOUT_S,
        extra_apiserver_args: Sequence[str] = (),
        netns: netns.Namespace | None = None,
        address: str = LOOPBACK,
        node_name: str | None = None,
    ) -> None:
        self.directory = Path(directory).resolve()
        self._layout = _Layout(self.directory)
        self._ready_timeout_s = ready_timeout_s
        self._extra_apiserver_args = tuple(extra_apiserver_args)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._netns = netns
        self._address = address
        self._node_name = node_name
        self.startup_seconds: float | None = None

    # -- public API -------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self._layout.kubeconfig

    @property
    def ca_cert(self) -> Path:
        return self._layout.ca_cert

    def component_kubeconfig(self, component: str) -> Path:
        """Kubeconfig of a node component (``kubelet``, ``kube-proxy``, ...), in-namespace server."""
        return self._layout.component_kubeconfig(component)

    @property
    def state(self) -> Mapping[str, object]:
        """Contents of controlplane.json (server, etcd URL, ports, pids)."""
        state: dict[str, object] = json.loads(self._layout.state.read_text())
        return state

    @property
    def server(self) -> str:
        return str(self.state["server"])

    @property
    def inner_server(self) -> str:
        """The API server's URL as seen inside its namespace (= ``server`` without one)."""
        return str(self.state.get("inner_server") or self.state["server"])

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG pointing at this control plane."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def pids(self) -> dict[str, int]:
        """Pids recorded in the pid files (components that were started)."""
        found = {c: _read_pid(self._layout.pid(c)) for c in COMPONENTS}
        pids = {c: rec[0] for c, rec in found.items() if rec is not None}
        forward = processes.read_record(self._layout.pid(APISERVER_FORWARD))
        if forward is not None:
            pids[APISERVER_FORWARD] = int(forward["pid"])  # type: ignore[call-overload]
        return pids

    def is_running(self) -> bool:
        records = [_read_pid(self._layout.pid(c)) for c in COMPONENTS]
        return any(rec is not None and _is_our_process(*rec) for rec in records) or processes.is_running(
            self._layout.pid(APISERVER_FORWARD)
        )

    def start(self) -> Self:
        """Start etcd and kube-apiserver and wait until /readyz is ok."""
        if self.is_running():
            raise ControlPlaneError(f"a control plane is already running in {self.directory}; stop() it first")
        started = time.monotonic()
        etcd_exe, apiserver_exe = binaries.ensure_etcd(), binaries.ensure_kube_apiserver()
        ensured = time.monotonic()
        extra_ips = [self._address] if self._address != LOOPBACK else []
        try:
            pki = _write_pki(self._layout, extra_ips, self._node_name)
            etcd_url, etcd_ports = self._start_etcd(etcd_exe)
            inner, secure_port = self._start_apiserver(apiserver_exe, etcd_url, pki)
            server = self._start_forwarder(secure_port) if self._netns is not None else inner
            self._ensure_default_namespace(inner, pki)
        except BaseException:
            self.stop()
            raise
        self.kubeconfig.write_text(yaml.safe_dump(_kubeconfig(server, pki.ca_pem, pki.token), sort_keys=False))
        self.kubeconfig.chmod(0o600)
        for component, (user, token) in pki.components.items():
            path = self._layout.component_kubeconfig(component)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(yaml.safe_dump(_kubeconfig(inner, pki.ca_pem, token, user), sort_keys=False))
        self.startup_seconds = time.monotonic() - ensured
        self._layout.state.write_text(
            json.dumps(
                {
                    "server": server,
                    "inner_server": inner,
                    "netns": self._netns.name if self._netns is not None else None,
                    "etcd_url": etcd_url,
                    "apiserver_secure_port": secure_port,
                    "etcd_client_port": etcd_ports[0],
                    "etcd_peer_port": etcd_ports[1],
                    "kubeconfig": str(self.kubeconfig),
                    "pids": self.pids(),
                    "startup_seconds": round(self.startup_seconds, 2),
                    "ensure_binaries_seconds": round(ensured - started, 2),
                },
                indent=2,
            )
        )
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop both components and the forwarder (idempotent; works from any process)."""
        processes.stop_detached(self._layout.pid(APISERVER_FORWARD), timeout_s=timeout_s)
        self._layout.forward_port_file.unlink(missing_ok=True)
        for component in COMPONENTS:
            _stop_component(self._layout.pid(component), self._children.pop(component, None), timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals --------------------------------------------------------

    def _launch(
        self,
        component: str,
        exe: Path,
        make_args: Callable[[], tuple[list[str], Callable[[], bool]]],
        timeout_s: float,
    ) -> None:
        """Spawn ``component`` and wait for its probe, retrying on port races."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            args, probe = make_args()
            proc = _spawn(component, exe, args, self._layout, self._netns)
            self._children[component] = proc
            try:
                _wait_until(component, probe, proc, timeout_s, self._layout.log(component))
                return
            except _ProcessExited as exc:
                self._children.pop(component, None)
                self._layout.pid(component).unlink(missing_ok=True)
                if ADDRESS_IN_USE not in exc.log_tail or attempt == PORT_ATTEMPTS:
                    raise

    def _ports(self, *fixed: int) -> list[int]:
        """Fixed ports inside our own namespace; free loopback ports otherwise."""
        return list(fixed) if self._netns is not None else [_free_port() for _ in fixed]

    def _start_etcd(self, exe: Path) -> tuple[str, tuple[int, int]]:
        # Fresh data each start: stale member/peer URLs from a previous run
        # (different ports) would otherwise confuse a single-node etcd.
        shutil.rmtree(self._layout.etcd_data, ignore_errors=True)
        chosen: dict[str, int] = {}

        def make_args() -> tuple[list[str], Callable[[], bool]]:
            chosen["client"], chosen["peer"] = self._ports(NETNS_ETCD_CLIENT_PORT, NETNS_ETCD_PEER_PORT)
            url = f"http://{LOOPBACK}:{chosen['client']}"

            def probe() -> bool:
                status, body = _http(f"{url}/health", ns=self._netns)
                return status == 200 and json.loads(body).get("health") == "true"

            return etcd_args(self._layout.etcd_data, chosen["client"], chosen["peer"]), probe

        self._launch(ETCD, exe, make_args, ETCD_READY_TIMEOUT_S)
        return f"http://{LOOPBACK}:{chosen['client']}", (chosen["client"], chosen["peer"])

    def _start_apiserver(self, exe: Path, etcd_url: str, pki: _Pki) -> tuple[str, int]:
        context = ssl.create_default_context(cadata=pki.ca_pem.decode())
        chosen: dict[str, int] = {}

        def make_args() -> tuple[list[str], Callable[[], bool]]:
            (chosen["port"],) = self._ports(NETNS_APISERVER_PORT)
            url = f"https://{self._address}:{chosen['port']}"

            def probe() -> bool:
                status, body = _http(f"{url}/readyz", context=context, token=pki.token, ns=self._netns)
                return status == 200 and body.strip() == "ok"

            args = apiserver_args(self._layout, etcd_url, chosen["port"], self._address, self._node_name is not None)
            return args + list(self._extra_apiserver_args), probe

        self._layout.cert_dir.mkdir(parents=True, exist_ok=True)
        self._launch(APISERVER, exe, make_args, self._ready_timeout_s)
        return f"https://{self._address}:{chosen['port']}", chosen["port"]

    def _start_forwarder(self, secure_port: int) -> str:
        """A loopback port here that leads to the API server in the namespace; returns its URL."""
        assert self._netns is not None
        port_file = self._layout.forward_port_file
        port_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "rasterkube_devstack.forward", "--netns", self._netns.name,
                "--listen", f"{LOOPBACK}:0", "--target", f"{self._address}:{secure_port}",
                "--port-file", str(port_file)]  # fmt: skip
        log_path = self._layout.log(APISERVER_FORWARD)
        proc = processes.start_detached(argv, pid_file=self._layout.pid(APISERVER_FORWARD), log_file=log_path,
                                        env=dict(os.environ))  # fmt: skip
        deadline = time.monotonic() + ETCD_READY_TIMEOUT_S
        while not port_file.exists():
            if proc.poll() is not None:
                raise ControlPlaneError(f"the API server forwarder exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"the API server forwarder did not start:\n{_tail(log_path)}")
            time.sleep(POLL_INTERVAL_S)
        return f"https://{LOOPBACK}:{int(port_file.read_text())}"

    def _ensure_default_namespace(self, server: str, pki: _Pki) -> None:
        """Make sure the ``default`` namespace exists.

        The apiserver's bootstrap controller normally creates it right after
        /readyz; if it has not appeared after a grace period we create it
        ourselves (a 409 from racing the controller is fine).
        """
        context = ssl.create_default_context(cadata=pki.ca_pem.decode())
        url = f"{server}/api/v1/namespaces"
        deadline = time.monotonic() + DEFAULT_NAMESPACE_GRACE_S
        while time.monotonic() < deadline:
            status, _ = _http(f"{url}/{DEFAULT_NAMESPACE}", context=context, token=pki.token, ns=self._netns)
            if status == 200:
                return
            time.sleep(POLL_INTERVAL_S)
        manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEFAULT_NAMESPACE}}
        status, body = _http(url, context=context, token=pki.token, method="POST", body=manifest, ns=self._netns)
        if status not in (200, 201, 409):
            raise ControlPlaneError(
                f"creating namespace {DEFAULT_NAMESPACE!r} failed: HTTP {status}: {body}\n"
                f"--- apiserver log (tail) ---\n{_tail(self._layout.log(APISERVER))}"
            )


def stop(directory: Path) -> None:
    """Stop a control plane started (possibly by another process) in ``directory``."""
    ControlPlane(directory).stop()


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m rasterkube_devstack.controlplane {start,stop} DIR``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("directory", type=Path)
    ns = parser.parse_args(argv)
    plane = ControlPlane(ns.directory)
    if ns.action == "start":
        plane.start()
        print(json.dumps(dict(plane.state), indent=2))
    else:
        plane.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
