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

Limitations (by design: there is no kube-controller-manager, scheduler or
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
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
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

from rasterkube_devstack import binaries

LOOPBACK = "127.0.0.1"
ETCD = "etcd"
APISERVER = "kube-apiserver"
#: Stop order: apiserver first so it does not spam errors about a dead etcd.
COMPONENTS = (APISERVER, ETCD)

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
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in SERVING_CERT_DNS_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in (LOOPBACK, KUBERNETES_SERVICE_IP)]
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


def _write_pki(layout: _Layout) -> _Pki:
    """Fresh CA, serving cert, SA key pair and admin token for this start()."""
    ca_key, ca_cert = _make_ca()
    serving_key, serving_cert = _make_serving_cert(ca_key, ca_cert)
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
    _write_private(layout.token_file, f'{token},{ADMIN_USER},{ADMIN_UID},"{ADMIN_GROUP}"\n'.encode())
    return _Pki(ca_pem=ca_pem, token=token)


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


def _spawn(component: str, exe: Path, args: Sequence[str], layout: _Layout) -> subprocess.Popen[bytes]:
    log_path = layout.log(component)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [str(exe), *args],
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


def _http(
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    token: str | None = None,
    method: str = "GET",
    body: Mapping[str, object] | None = None,
) -> tuple[int, str]:
    """Tiny stdlib HTTP client: returns (status, body) for any HTTP status."""
    data = json.dumps(body).encode() if body is not None else None
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


def apiserver_args(layout: _Layout, etcd_url: str, secure_port: int) -> list[str]:
    return [
        f"--etcd-servers={etcd_url}",
        f"--bind-address={LOOPBACK}",
        f"--advertise-address={LOOPBACK}",
        f"--secure-port={secure_port}",
        f"--cert-dir={layout.cert_dir}",
        f"--tls-cert-file={layout.serving_cert}",
        f"--tls-private-key-file={layout.serving_key}",
        f"--token-auth-file={layout.token_file}",
        "--authorization-mode=RBAC",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={layout.sa_public_key}",
        f"--service-account-signing-key-file={layout.sa_private_key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        f"--disable-admission-plugins={','.join(DISABLED_ADMISSION_PLUGINS)}",
        "--allow-privileged=true",
        # The "kubernetes" Service would otherwise get a 127.0.0.1 endpoint,
        # which Endpoints validation rejects (log spam every 10 s); nothing
        # in-cluster could reach it anyway.
        "--endpoint-reconciler-type=none",
        "--profiling=false",
    ]


# --------------------------------------------------------------------------
# Kubeconfig
# --------------------------------------------------------------------------


def _kubeconfig(server: str, ca_pem: bytes, token: str) -> dict[str, object]:
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
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [
            {
                "name": KUBECONFIG_NAME,
                "context": {"cluster": KUBECONFIG_NAME, "user": ADMIN_USER, "namespace": DEFAULT_NAMESPACE},
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
    different process cleans up a control plane started elsewhere.
    """

    def __init__(
        self,
        directory: Path,
        *,
        ready_timeout_s: float = APISERVER_READY_TIMEOUT_S,
        extra_apiserver_args: Sequence[str] = (),
    ) -> None:
        self.directory = Path(directory).resolve()
        self._layout = _Layout(self.directory)
        self._ready_timeout_s = ready_timeout_s
        self._extra_apiserver_args = tuple(extra_apiserver_args)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self.startup_seconds: float | None = None

    # -- public API -------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self._layout.kubeconfig

    @property
    def state(self) -> Mapping[str, object]:
        """Contents of controlplane.json (server, etcd URL, ports, pids)."""
        state: dict[str, object] = json.loads(self._layout.state.read_text())
        return state

    @property
    def server(self) -> str:
        return str(self.state["server"])

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG pointing at this control plane."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def pids(self) -> dict[str, int]:
        """Pids recorded in the pid files (components that were started)."""
        found = {c: _read_pid(self._layout.pid(c)) for c in COMPONENTS}
        return {c: rec[0] for c, rec in found.items() if rec is not None}

    def is_running(self) -> bool:
        records = [_read_pid(self._layout.pid(c)) for c in COMPONENTS]
        return any(rec is not None and _is_our_process(*rec) for rec in records)

    def start(self) -> Self:
        """Start etcd and kube-apiserver and wait until /readyz is ok."""
        if self.is_running():
            raise ControlPlaneError(f"a control plane is already running in {self.directory}; stop() it first")
        started = time.monotonic()
        etcd_exe, apiserver_exe = binaries.ensure_etcd(), binaries.ensure_kube_apiserver()
        ensured = time.monotonic()
        try:
            pki = _write_pki(self._layout)
            etcd_url, etcd_ports = self._start_etcd(etcd_exe)
            server, secure_port = self._start_apiserver(apiserver_exe, etcd_url, pki)
            self._ensure_default_namespace(server, pki)
        except BaseException:
            self.stop()
            raise
        self.kubeconfig.write_text(yaml.safe_dump(_kubeconfig(server, pki.ca_pem, pki.token), sort_keys=False))
        self.kubeconfig.chmod(0o600)
        self.startup_seconds = time.monotonic() - ensured
        self._layout.state.write_text(
            json.dumps(
                {
                    "server": server,
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
        """Stop both components (idempotent; works from any process)."""
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
            proc = _spawn(component, exe, args, self._layout)
            self._children[component] = proc
            try:
                _wait_until(component, probe, proc, timeout_s, self._layout.log(component))
                return
            except _ProcessExited as exc:
                self._children.pop(component, None)
                self._layout.pid(component).unlink(missing_ok=True)
                if ADDRESS_IN_USE not in exc.log_tail or attempt == PORT_ATTEMPTS:
                    raise

    def _start_etcd(self, exe: Path) -> tuple[str, tuple[int, int]]:
        # Fresh data each start: stale member/peer URLs from a previous run
        # (different ports) would otherwise confuse a single-node etcd.
        shutil.rmtree(self._layout.etcd_data, ignore_errors=True)
        chosen: dict[str, int] = {}

        def make_args() -> tuple[list[str], Callable[[], bool]]:
            chosen.update(client=_free_port(), peer=_free_port())
            url = f"http://{LOOPBACK}:{chosen['client']}"

            def probe() -> bool:
                status, body = _http(f"{url}/health")
                return status == 200 and json.loads(body).get("health") == "true"

            return etcd_args(self._layout.etcd_data, chosen["client"], chosen["peer"]), probe

        self._launch(ETCD, exe, make_args, ETCD_READY_TIMEOUT_S)
        return f"http://{LOOPBACK}:{chosen['client']}", (chosen["client"], chosen["peer"])

    def _start_apiserver(self, exe: Path, etcd_url: str, pki: _Pki) -> tuple[str, int]:
        context = ssl.create_default_context(cadata=pki.ca_pem.decode())
        chosen: dict[str, int] = {}

        def make_args() -> tuple[list[str], Callable[[], bool]]:
            chosen["port"] = _free_port()
            url = f"https://{LOOPBACK}:{chosen['port']}"

            def probe() -> bool:
                status, body = _http(f"{url}/readyz", context=context, token=pki.token)
                return status == 200 and body.strip() == "ok"

            args = apiserver_args(self._layout, etcd_url, chosen["port"]) + list(self._extra_apiserver_args)
            return args, probe

        self._layout.cert_dir.mkdir(parents=True, exist_ok=True)
        self._launch(APISERVER, exe, make_args, self._ready_timeout_s)
        return f"https://{LOOPBACK}:{chosen['port']}", chosen["port"]

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
            status, _ = _http(f"{url}/{DEFAULT_NAMESPACE}", context=context, token=pki.token)
            if status == 200:
                return
            time.sleep(POLL_INTERVAL_S)
        manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEFAULT_NAMESPACE}}
        status, body = _http(url, context=context, token=pki.token, method="POST", body=manifest)
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
