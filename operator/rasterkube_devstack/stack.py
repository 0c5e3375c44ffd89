"""``rasterkube dev up|down``: the whole Docker-free dev stack on loopback (DESIGN §4 "Dev stack").

``up(directory)`` starts, in this order (independent steps overlap):

1. the cached binaries (kube-apiserver, etcd, kubectl, helm; KubeRay CRDs);
2. a real control plane (etcd + kube-apiserver, :mod:`.controlplane`) in ``directory/k8s``,
   then the rasterkube CRDs (rendered by :mod:`rasterkube.crdgen`, so an installed package
   works without the repository) and the real KubeRay CRDs, applied server-side with
   kubectl and waited for ``Established``;
3. an S3 server (versitygw, :mod:`.s3`) with the bucket ``rasterkube``, seeded with
   the real sample store ``s3://rasterkube/samples/landsat-annual.zarr`` and a static STAC
   catalog of the sample scenes as COGs, ``s3://rasterkube/samples/stac/catalog.json``;
4. a Ray head (``ray start --head``) on loopback with token auth, started *with* the S3
   environment so job drivers and workers inherit it (credentials never go into job
   submissions), and with this interpreter's ``bin`` first on PATH so ``python`` in a job
   entrypoint is the one that has rasterkube installed;
5. the operator: ``rasterkube operator --backend ray --ray-address <dashboard URL>
   --storage-root s3://rasterkube/data --metrics-port P --health-port P``, waited for on
   ``/healthz``.

Then it writes ``directory/env.sh`` (``source`` it to use kubectl, ``rasterkube run`` and
``ray job`` against the stack) and ``directory/stack.json`` (ports, pids, timings).

Every process runs detached in its own session, with its output in ``directory/logs`` and
a pid file in ``directory/pids``; ``down(directory)`` stops them from any process, by pid
(never by name: ``ray stop`` would kill every Ray on the machine). All ports are picked
free at start time and everything binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rasterkube_devstack import binaries, processes, s3
from rasterkube_devstack.controlplane import ControlPlane, _free_port, _http, _tail
from rasterkube_devstack.kuberay import CRD_FILES as KUBERAY_CRD_FILES
from rasterkube_devstack.kuberay import ensure_kuberay_crds

LOOPBACK = "127.0.0.1"
DEFAULT_DIR = ".rasterkube-dev"
BUCKET = s3.DEFAULT_BUCKET
STORAGE_ROOT = f"s3://{BUCKET}/data"
SAMPLE_URI = f"s3://{BUCKET}/samples/landsat-annual.zarr"
#: Static STAC catalog of the sample scenes (COGs) that examples/mosaic-landsat.yaml searches.
#: The demo models are seeded too, under ``s3://rasterkube/models/`` (see SEED_SCRIPT).
SAMPLE_STAC_URI = f"s3://{BUCKET}/samples/stac"

STATE_FILE = "stack.json"
ENV_FILE = "env.sh"
K8S_DIR = "k8s"
CRD_DIR = "crds"
BIN_DIR = "bin"
RAY = "ray-head"
OPERATOR = "operator"
SEED = "seed-samples"
S3 = s3.NAME

RAY_START_TIMEOUT_S = 180.0
RAY_READY_TIMEOUT_S = 90.0
RAY_STOP_TIMEOUT_S = 5.0
OPERATOR_READY_TIMEOUT_S = 120.0
OPERATOR_STOP_TIMEOUT_S = 15.0
SEED_TIMEOUT_S = 600.0
KUBECTL_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 0.2
#: AF_UNIX socket paths are limited to 107 bytes; Ray appends ~63 characters
#: (``/session_<date>_<time>_<us>_<pid>/sockets/plasma_store``) to its temp dir.
MAX_RAY_TEMP_DIR_CHARS = 40
RAY_TEMP_PREFIX = "rk-ray-"

#: Environment that every Ray process and the operator need on a single machine.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
ENV_STORAGE_ROOT = "RASTERKUBE_STORAGE_ROOT"
ENV_RAY_DASHBOARD = "RASTERKUBE_RAY_DASHBOARD"

#: Builds the real sample store; run in a child process with the S3 environment.
#: The demo models (rasterkube.models), for the Prediction examples.
MODELS_URI = f"s3://{BUCKET}/models"
SEED_SCRIPT = (
    "import sys\n"
    "from rasterkube import storage\n"
    "from rasterkube.models import DEMO_MODELS\n"
    "from rasterkube.samples import build_landsat_annual_store\n"
    "from rasterkube.mosaic.localstac import build_sample_catalogs\n"
    "fs, _ = storage.filesystem(" + repr(MODELS_URI) + ")\n"
    "for m in DEMO_MODELS.values():\n"
    "    fs.put_file(str(m.path), " + repr(MODELS_URI) + " + '/' + m.file)\n"
    "print(build_landsat_annual_store(sys.argv[1]), flush=True)\n"
    f"print(build_sample_catalogs({SAMPLE_STAC_URI!r}), flush=True)\n"
)


class StackError(RuntimeError):
    """The dev stack could not be started (message names the log to read)."""


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------


@dataclass
class StackInfo:
    """Where everything of a running dev stack is; ``env()`` is what ``env.sh`` exports."""

    directory: Path
    kubeconfig: Path
    apiserver: str
    s3_endpoint: str
    ray_address: str  # 127.0.0.1:<GCS port> (RAY_ADDRESS)
    ray_dashboard: str  # http://127.0.0.1:<dashboard port> (Jobs API)
    ray_temp_dir: Path
    storage_root: str = STORAGE_ROOT
    sample_uri: str | None = None
    operator_health: str | None = None  # http://127.0.0.1:<health port>/healthz
    operator_metrics: str | None = None  # http://127.0.0.1:<metrics port>/metrics
    namespaces: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    already_running: bool = False

    @property
    def env_file(self) -> Path:
        return self.directory / ENV_FILE

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    def env(self) -> dict[str, str]:
        """The variables of ``env.sh`` (without PATH)."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            **s3.credentials_env(self.s3_endpoint),
            "RAY_ADDRESS": self.ray_address,
            **RAY_ENV,
            ENV_RAY_DASHBOARD: self.ray_dashboard,
            ENV_STORAGE_ROOT: self.storage_root,
        }

    def pids(self) -> dict[str, list[int]]:
        """Live pids per component (control plane components included)."""
        return running_pids(self.directory)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> StackInfo:
        kwargs = dict(data)
        for key in ("directory", "kubeconfig", "ray_temp_dir"):
            kwargs[key] = Path(str(kwargs[key]))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in kwargs.items() if k in known})  # type: ignore[arg-type]


def _pid_file(directory: Path, name: str) -> Path:
    return directory / "pids" / f"{name}.pid"


def _log_file(directory: Path, name: str) -> Path:
    return directory / "logs" / f"{name}.log"


def _read_state(directory: Path) -> dict[str, object] | None:
    try:
        data = json.loads((directory / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(directory: Path, state: Mapping[str, object]) -> None:
    tmp = directory / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
    os.replace(tmp, directory / STATE_FILE)


def load(directory: Path) -> StackInfo:
    """The StackInfo of the stack recorded in ``directory`` (running or not)."""
    directory = Path(directory).resolve()
    state = _read_state(directory)
    if state is None or "ray_address" not in state:
        raise StackError(f"no dev stack recorded in {directory}; run `rasterkube dev up --dir {directory}`")
    return StackInfo.from_json(state)


def running_pids(directory: Path) -> dict[str, list[int]]:
    """Live pids per component of the stack in ``directory`` (Ray: every process of its session)."""
    directory = Path(directory).resolve()
    found = {name: processes.recorded_pids(_pid_file(directory, name)) for name in (OPERATOR, RAY, S3)}
    for name, pid in ControlPlane(directory / K8S_DIR).pids().items():
        found[name] = [pid] if processes.is_alive(pid) else []
    return found


def _core_running(directory: Path) -> dict[str, bool]:
    return {
        "control plane": ControlPlane(directory / K8S_DIR).is_running(),
        "S3": processes.is_running(_pid_file(directory, S3)),
        "Ray": processes.is_running(_pid_file(directory, RAY)),
    }


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _base_env() -> dict[str, str]:
    """os.environ with this interpreter's bin first on PATH and no stray Ray address."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = os.pathsep.join([str(_venv_bin()), env.get("PATH", "")])
    return env


def _ray_token() -> str | None:
    """The token Ray's clients use: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _http_ok(url: str, token: str | None = None) -> bool:
    try:
        status, _ = _http(url, token=token)
    except OSError:
        return False
    return status == 200


def port_open(port: int, host: str = LOOPBACK) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _ray_temp_dir(directory: Path) -> Path:
    """``directory/ray`` if short enough for Ray's unix sockets, else a short dir in /tmp."""
    preferred = directory / "ray"
    if len(str(preferred)) <= MAX_RAY_TEMP_DIR_CHARS:
        return preferred
    base = "/tmp" if Path("/tmp").is_dir() else None
    short = Path(tempfile.mkdtemp(prefix=RAY_TEMP_PREFIX, dir=base))
    link = preferred
    if link.is_symlink() or link.exists():
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            shutil.rmtree(link, ignore_errors=True)
    link.symlink_to(short, target_is_directory=True)  # find Ray's logs from the stack dir
    return short


def _run(cmd: Sequence[str], *, env: Mapping[str, str], what: str, timeout_s: float = KUBECTL_TIMEOUT_S) -> str:
    proc = subprocess.run(list(cmd), env=dict(env), capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
        raise StackError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{output}")
    return proc.stdout


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


def _render_crds(directory: Path) -> list[Path]:
    """The rasterkube CRDs from the API models (what `rasterkube crds` writes to crds/)."""
    from rasterkube import crdgen
    from rasterkube.constants import Kind

    out = directory / CRD_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in Kind:
        path = out / crdgen.crd_filename(kind)
        path.write_text(crdgen.render(kind), encoding="utf-8")
        paths.append(path)
    return paths


def rasterkube_crd_names() -> list[str]:
    from rasterkube.constants import GROUP, Kind

    return [f"{kind.plural}.{GROUP}" for kind in Kind]


def _install_crds(directory: Path, kubectl: Path, kubeconfig: Path, kuberay_crds: Sequence[Path]) -> None:
    files = [*_render_crds(directory), *kuberay_crds]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    cmd = [str(kubectl), "apply", "--server-side", "--force-conflicts", "--field-manager=rasterkube-dev"]
    for path in files:
        cmd += ["-f", str(path)]
    _run(cmd, env=env, what="installing the CRDs")
    names = [*rasterkube_crd_names(), *KUBERAY_CRD_FILES.values()]
    wait = [str(kubectl), "wait", "--for=condition=Established", f"--timeout={int(KUBECTL_TIMEOUT_S)}s"]
    _run([*wait, *(f"crd/{n}" for n in names)], env=env, what="waiting for the CRDs", timeout_s=KUBECTL_TIMEOUT_S + 10)


def _link_tools(directory: Path, tools: Mapping[str, Path]) -> Path:
    """``directory/bin/{kubectl,helm}`` → the cached binaries (env.sh puts it on PATH)."""
    bin_dir = directory / BIN_DIR
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in tools.items():
        link = bin_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return bin_dir


def _start_ray_head(directory: Path, s3_env: Mapping[str, str], num_cpus: int) -> dict[str, object]:
    """``ray start --head`` detached in its own session; waits until the Jobs API answers."""
    ray_exe = _venv_bin() / "ray"
    if not ray_exe.exists():
        found = shutil.which("ray")
        if not found:
            raise StackError(f"no `ray` executable next to {sys.executable} or on PATH")
        ray_exe = Path(found)
    temp_dir = _ray_temp_dir(directory)
    env = {**_base_env(), **s3_env, **RAY_ENV}
    pid_file, log_file = _pid_file(directory, RAY), _log_file(directory, RAY)
    last_error = ""
    for _attempt in range(2):  # free ports are probed then released: retry once on a race
        ports = {
            "port": _free_port(),
            "dashboard-port": _free_port(),
            "ray-client-server-port": _free_port(),
            "dashboard-agent-listen-port": _free_port(),
            "dashboard-agent-grpc-port": _free_port(),
            "runtime-env-agent-port": _free_port(),
            "metrics-export-port": _free_port(),
            "node-manager-port": _free_port(),
            "object-manager-port": _free_port(),
        }
        argv = [str(ray_exe), "start", "--head", f"--node-ip-address={LOOPBACK}", f"--dashboard-host={LOOPBACK}",
                f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                *(f"--{k}={v}" for k, v in ports.items())]  # fmt: skip
        proc = processes.start_detached(argv, pid_file=pid_file, log_file=log_file, env=env,
                                 extra={"ports": ports, "temp_dir": str(temp_dir)})  # fmt: skip
        try:
            rc = proc.wait(timeout=RAY_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        if rc == 0:
            break
        last_error = f"`ray start` {'timed out' if rc is None else f'exited {rc}'}"
        processes.stop_detached(pid_file, timeout_s=RAY_STOP_TIMEOUT_S)
    else:
        raise StackError(f"{last_error}.\n--- {log_file} ---\n{_tail(log_file)}")
    dashboard = f"http://{LOOPBACK}:{ports['dashboard-port']}"
    token = _ray_token()
    deadline = time.monotonic() + RAY_READY_TIMEOUT_S
    # The job module runs in a dashboard subprocess that comes up after `ray start` returns.
    while not _http_ok(f"{dashboard}/api/jobs/", token):
        if time.monotonic() > deadline:
            raise StackError(f"the Ray Jobs API at {dashboard} did not answer within {RAY_READY_TIMEOUT_S:.0f}s; "
                             f"see {log_file} and {temp_dir}/session_latest/logs")  # fmt: skip
        if not processes.is_running(pid_file):
            raise StackError(f"the Ray head exited; see {log_file} and {temp_dir}/session_latest/logs")
        time.sleep(POLL_INTERVAL_S)
    return {"ports": ports, "address": f"{LOOPBACK}:{ports['port']}", "dashboard": dashboard, "temp_dir": temp_dir}


def _start_seeding(directory: Path, s3_env: Mapping[str, str], uri: str) -> subprocess.Popen[bytes]:
    log_file = _log_file(directory, SEED)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as log:
        return subprocess.Popen([sys.executable, "-c", SEED_SCRIPT, uri], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env={**_base_env(), **s3_env}, cwd=directory)  # fmt: skip


def _wait_seeding(directory: Path, proc: subprocess.Popen[bytes]) -> None:
    try:
        rc = proc.wait(timeout=SEED_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    if rc != 0:
        log_file = _log_file(directory, SEED)
        raise StackError(f"seeding the sample store failed ({'timed out' if rc is None else f'exit {rc}'}).\n"
                         f"--- {log_file} ---\n{_tail(log_file)}")  # fmt: skip


def operator_command(info: StackInfo, metrics_port: int, health_port: int) -> list[str]:
    """The operator's command line (the contract in the brief; `python -m rasterkube.cli` = `rasterkube`)."""
    argv = [sys.executable, "-m", "rasterkube.cli", "operator", "--backend", "ray",
            "--ray-address", info.ray_dashboard, "--storage-root", info.storage_root,
            "--metrics-port", str(metrics_port), "--health-port", str(health_port),
            # its default is 0.0.0.0 (right in a pod); the dev stack stays on loopback
            "--listen-host", LOOPBACK]  # fmt: skip
    for namespace in info.namespaces:
        argv += ["--namespace", namespace]
    return argv


ENV_MAX_RUNNING_JOBS = "RASTERKUBE_MAX_RUNNING_JOBS"
DEV_MAX_RUNNING_JOBS = 4


def operator_env(info: StackInfo) -> dict[str, str]:
    env = _base_env()
    env.update(
        {
            "KUBECONFIG": str(info.kubeconfig),
            **s3.credentials_env(info.s3_endpoint),
            **RAY_ENV,
            ENV_STORAGE_ROOT: info.storage_root,
        }
    )
    # Each Ray job driver is a Python process of a few hundred MiB: on a laptop-sized dev
    # stack, admit a few jobs at a time and queue the rest (status reason Queued).
    env.setdefault(ENV_MAX_RUNNING_JOBS, str(DEV_MAX_RUNNING_JOBS))
    return env


def operator_running(directory: Path) -> bool:
    return processes.is_running(_pid_file(Path(directory).resolve(), OPERATOR))


def start_operator(
    directory: Path, *, timeout_s: float = OPERATOR_READY_TIMEOUT_S, verbose: bool = False
) -> StackInfo:
    """(Re)start only the operator of the stack in ``directory`` and wait for its /healthz.

    Reuses the previous metrics/health ports when they are free, so URLs stay stable across
    restarts. A running operator is left alone.
    """
    directory = Path(directory).resolve()
    info = load(directory)
    pid_file, log_file = _pid_file(directory, OPERATOR), _log_file(directory, OPERATOR)
    if processes.is_running(pid_file) and info.operator_health and _http_ok(info.operator_health):
        _say(verbose, f"operator already running: {info.operator_health}")
        return info
    missing = [name for name, alive in _core_running(directory).items() if not alive]
    if missing:
        raise StackError(
            f"the dev stack in {directory} is not running ({', '.join(missing)} down); run `rasterkube dev up`"
        )
    processes.stop_detached(pid_file, timeout_s=OPERATOR_STOP_TIMEOUT_S)  # a hung one, or a stale pid file
    previous = _read_state(directory) or {}
    old_ports = previous.get("operator_ports")
    old = old_ports if isinstance(old_ports, dict) else {}
    metrics_port, health_port = int(old.get("metrics") or 0), int(old.get("health") or 0)
    if not (metrics_port and _port_free(metrics_port)):
        metrics_port = _free_port()
    if not (health_port and health_port != metrics_port and _port_free(health_port)):
        health_port = _free_port()
    started = time.monotonic()
    proc = processes.start_detached(operator_command(info, metrics_port, health_port), pid_file=pid_file,
                             log_file=log_file, env=operator_env(info), cwd=directory,
                             extra={"metrics_port": metrics_port, "health_port": health_port})  # fmt: skip
    health = f"http://{LOOPBACK}:{health_port}/healthz"
    deadline = time.monotonic() + timeout_s
    while not _http_ok(health):
        if proc.poll() is not None:
            processes.stop_detached(pid_file)
            raise StackError(f"the operator exited with code {proc.returncode} during startup.\n"
                             f"--- {log_file} ---\n{_tail(log_file)}")  # fmt: skip
        if time.monotonic() > deadline:
            processes.stop_detached(pid_file)
            raise StackError(f"the operator's {health} did not answer within {timeout_s:.0f}s.\n"
                             f"--- {log_file} ---\n{_tail(log_file)}")  # fmt: skip
        time.sleep(POLL_INTERVAL_S)
    info.operator_health = health
    info.operator_metrics = f"http://{LOOPBACK}:{metrics_port}/metrics"
    info.timings["operator"] = round(time.monotonic() - started, 2)
    state = {**previous, **info.to_json(), "operator_ports": {"metrics": metrics_port, "health": health_port}}
    state.pop("already_running", None)
    _write_state(directory, state)
    _say(verbose, f"operator ready in {info.timings['operator']:.1f}s: {health}")
    return info


def stop_operator(
    directory: Path, sig: signal.Signals = signal.SIGTERM, timeout_s: float = OPERATOR_STOP_TIMEOUT_S
) -> bool:
    """Stop only the operator (SIGTERM: graceful; SIGKILL: a crash). True if one was running."""
    directory = Path(directory).resolve()
    stopped = processes.stop_detached(_pid_file(directory, OPERATOR), sig=sig, timeout_s=timeout_s)
    state = _read_state(directory)
    if state is not None:
        state.update(operator_health=None, operator_metrics=None)
        _write_state(directory, state)
    return stopped


def restart_operator(directory: Path, sig: signal.Signals = signal.SIGTERM) -> StackInfo:
    stop_operator(directory, sig)
    return start_operator(directory)


# --------------------------------------------------------------------------
# env.sh and the usage text
# --------------------------------------------------------------------------


def write_env_file(info: StackInfo) -> Path:
    lines = [
        "# rasterkube dev stack — generated by `rasterkube dev up`; source it: . " + shlex.quote(str(info.env_file)),
        "# The AWS_* credentials are dev-only placeholders for the local S3 server (versitygw).",
    ]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in info.env().items()]
    bin_dir = shlex.quote(str(info.directory / BIN_DIR))
    lines.append(f'export PATH={bin_dir}:"$PATH"  # kubectl, helm')
    info.env_file.write_text("\n".join(lines) + "\n")
    return info.env_file


def usage(info: StackInfo) -> str:
    d = info.directory
    operator = (
        f"  operator    {info.operator_health}   metrics {info.operator_metrics}   log {d / 'logs' / 'operator.log'}"
        if info.operator_health
        else "  operator    not running (start it: rasterkube dev up --dir " + shlex.quote(str(d)) + ")"
    )
    head = "is already running" if info.already_running else f"is up ({info.timings.get('total', 0):.1f}s)"
    return "\n".join(
        [
            f"rasterkube dev stack {head} in {d}",
            f"  Kubernetes  {info.apiserver}   KUBECONFIG={info.kubeconfig}",
            f"  S3          {info.s3_endpoint}   bucket {BUCKET}; storage root {info.storage_root}",
            f"              sample store {info.sample_uri or '(not seeded)'}",
            f"              sample STAC catalog {SAMPLE_STAC_URI + '/catalog.json' if info.sample_uri else '(not seeded)'}",
            f"  Ray         RAY_ADDRESS={info.ray_address}   dashboard {info.ray_dashboard}",
            operator,
            f"  logs        {d / 'logs'}, {d / K8S_DIR / 'logs'}, {info.ray_temp_dir}/session_latest/logs",
            "",
            "Use it:",
            f"  source {shlex.quote(str(info.env_file))}",
            "  kubectl apply -f examples/",
            "  kubectl get rasterkube",
            "  rasterkube run -f examples/changescore-landsat.yaml   # on the stack's Ray (RAY_ADDRESS)",
            f"  Ray dashboard: {info.ray_dashboard}",
            "",
            f"Stop it: rasterkube dev down --dir {shlex.quote(str(d))}",
        ]
    )


# --------------------------------------------------------------------------
# up / down
# --------------------------------------------------------------------------


def up(
    directory: Path,
    *,
    with_operator: bool = True,
    seed_samples: bool = True,
    namespaces: Sequence[str] = (),
    ray_cpus: int | None = None,
    verbose: bool = True,
) -> StackInfo:
    """Start the dev stack in ``directory`` (see the module docstring); returns where it is.

    On a running stack it says so and returns its info (starting the operator if it was
    asked for and is not running); a partly running stack is stopped and started afresh.
    On failure everything started so far is stopped again.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    core = _core_running(directory)
    if all(core.values()) and _read_state(directory) is not None:
        info = load(directory)
        info.already_running = True
        if with_operator and not operator_running(directory):
            info = start_operator(directory, verbose=verbose)
            info.already_running = True
        write_env_file(info)
        _say(verbose, f"the dev stack in {directory} is already running")
        return info
    if any(core.values()) or operator_running(directory):
        parts = ", ".join(name for name, alive in core.items() if alive) or "operator"
        _say(verbose, f"found a partly running dev stack in {directory} ({parts}); stopping it first")
        down(directory, verbose=False)

    timings: dict[str, float] = {}
    started = time.monotonic()
    (directory / ENV_FILE).unlink(missing_ok=True)
    (directory / STATE_FILE).unlink(missing_ok=True)
    try:
        return _up(directory, timings, started, with_operator=with_operator, seed_samples=seed_samples,
                   namespaces=list(namespaces), ray_cpus=ray_cpus or os.cpu_count() or 1, verbose=verbose)  # fmt: skip
    except BaseException:
        _say(verbose, f"dev stack failed to start; stopping what was started (logs stay in {directory / 'logs'})")
        try:
            down(directory, verbose=False)
        except Exception as exc:  # keep the original error; say what could not be cleaned up
            _say(True, f"warning: stopping the partly started stack failed: {exc}")
        raise


def _timed(timings: dict[str, float], name: str, fn: Callable[[], object]) -> object:
    t0 = time.monotonic()
    result = fn()
    timings[name] = round(time.monotonic() - t0, 2)
    return result


def _up(
    directory: Path,
    timings: dict[str, float],
    started: float,
    *,
    with_operator: bool,
    seed_samples: bool,
    namespaces: list[str],
    ray_cpus: int,
    verbose: bool,
) -> StackInfo:
    _say(verbose, f"dev stack in {directory}: checking binaries (the first run builds them: minutes)")
    t0 = time.monotonic()
    tools = {"kubectl": binaries.ensure_kubectl(), "helm": binaries.ensure_helm()}
    binaries.ensure_etcd()
    binaries.ensure_kube_apiserver()
    kuberay_crds = ensure_kuberay_crds()
    _link_tools(directory, tools)
    timings["binaries"] = round(time.monotonic() - t0, 2)

    plane = ControlPlane(directory / K8S_DIR)
    stop_plane = threading.Event()

    def control_plane_and_crds() -> None:
        _timed(timings, "control_plane", plane.start)
        _say(verbose, f"  control plane ready ({timings['control_plane']:.1f}s): {plane.server}")
        if stop_plane.is_set():
            return
        _timed(timings, "crds", lambda: _install_crds(directory, tools["kubectl"], plane.kubeconfig, kuberay_crds))
        _say(verbose, f"  CRDs established ({timings['crds']:.1f}s)")

    # The control plane (Go binaries) and the S3 server + Ray head (Python) start side by side.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="devstack-k8s") as pool:
        k8s = pool.submit(control_plane_and_crds)
        try:
            server = s3.S3Server(directory)
            endpoint = str(_timed(timings, "s3", lambda: server.start(buckets=[BUCKET])))
            s3_env = s3.credentials_env(endpoint)
            _say(verbose, f"  S3 server ready ({timings['s3']:.1f}s): {endpoint}, bucket {BUCKET}")
            seed_started = time.monotonic()
            seeding = _start_seeding(directory, s3_env, SAMPLE_URI) if seed_samples else None
            ray = _timed(timings, "ray_head", lambda: _start_ray_head(directory, s3_env, ray_cpus))
            assert isinstance(ray, dict)
            _say(verbose, f"  Ray head ready ({timings['ray_head']:.1f}s): {ray['address']}, {ray['dashboard']}")
            if seeding is not None:
                _wait_seeding(directory, seeding)
                timings["samples"] = round(time.monotonic() - seed_started, 2)
                _say(verbose, f"  sample store seeded ({timings['samples']:.1f}s): {SAMPLE_URI}")
            k8s.result()
        except BaseException:
            stop_plane.set()
            k8s.exception()  # wait for the thread before tearing down
            raise

    info = StackInfo(
        directory=directory,
        kubeconfig=plane.kubeconfig,
        apiserver=plane.server,
        s3_endpoint=endpoint,
        ray_address=str(ray["address"]),
        ray_dashboard=str(ray["dashboard"]),
        ray_temp_dir=Path(str(ray["temp_dir"])),
        sample_uri=SAMPLE_URI if seed_samples else None,
        namespaces=namespaces,
        timings=timings,
    )
    _write_state(directory, {**info.to_json(), "ray_ports": ray["ports"]})
    if with_operator:
        info = start_operator(directory, verbose=verbose)
        timings["operator"] = info.timings["operator"]
    timings["total"] = round(time.monotonic() - started, 2)
    info.timings = timings
    state = _read_state(directory) or {}
    state.update(info.to_json())
    state.pop("already_running", None)
    _write_state(directory, state)
    write_env_file(info)
    return info


def down(directory: Path, *, verbose: bool = True) -> dict[str, bool]:
    """Stop everything of the stack in ``directory`` (from any process; idempotent).

    Returns which components were running. Logs stay; pid files, env.sh and Ray's temp
    dir (when it lives outside ``directory``) are removed.
    """
    directory = Path(directory).resolve()
    from rasterkube_devstack import nodestack

    if nodestack.is_node_stack(directory):
        return nodestack.down(directory, verbose=verbose)
    state = _read_state(directory) or {}
    ray_record = processes.read_record(_pid_file(directory, RAY)) or {}
    temp = state.get("ray_temp_dir") or ray_record.get("temp_dir")  # the latter if up() failed early
    # The operator first (it talks to the others), then the rest side by side: Ray's
    # gcs_server and raylet take seconds to honour SIGTERM.
    stopped = {OPERATOR: processes.stop_detached(_pid_file(directory, OPERATOR), timeout_s=OPERATOR_STOP_TIMEOUT_S)}
    plane = ControlPlane(directory / K8S_DIR)

    def stop_plane() -> bool:
        was = plane.is_running()
        plane.stop()
        return was

    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="devstack-down") as pool:
        futures = {
            RAY: pool.submit(processes.stop_detached, _pid_file(directory, RAY), timeout_s=RAY_STOP_TIMEOUT_S),
            S3: pool.submit(processes.stop_detached, _pid_file(directory, S3)),
            "control-plane": pool.submit(stop_plane),
        }
        stopped.update({name: future.result() for name, future in futures.items()})
    if (
        isinstance(temp, str)
        and Path(temp).name.startswith(RAY_TEMP_PREFIX)  # only the short dir _ray_temp_dir made
        and not Path(temp).resolve().is_relative_to(directory)
    ):
        shutil.rmtree(temp, ignore_errors=True)
        if (directory / "ray").is_symlink():
            (directory / "ray").unlink()
    (directory / ENV_FILE).unlink(missing_ok=True)
    if state:
        state.update(operator_health=None, operator_metrics=None, stopped=True)
        _write_state(directory, state)
    running = [name for name, was in stopped.items() if was]
    _say(verbose, f"stopped {', '.join(running)} in {directory}" if running else f"nothing was running in {directory}")
    return stopped
