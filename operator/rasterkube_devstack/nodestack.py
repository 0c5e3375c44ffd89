"""``rasterkube dev up`` with a real node: the cluster a platform engineer would install into.

``up(directory)`` starts, in this order (independent steps overlap):

1. the real node (:mod:`.node`): control plane, containerd, kubelet, kube-proxy, scheduler,
   controller-manager and CoreDNS in the stack's own network namespace;
2. the rasterkube CRDs and KubeRay's CRDs;
3. the S3 server (:mod:`.s3`, versitygw) inside the namespace on the node address — pods reach
   it there — with a loopback port forwarded to it, seeded with the sample data and models;
4. the images: the rasterkube image built from the project's wheel (:mod:`.rasterkube_image`)
   and the KubeRay operator image, imported into containerd;
5. the KubeRay operator as a Deployment in ``kuberay-system`` (same version as its CRDs);
6. the S3 credentials as the Secret ``rasterkube-s3`` (in ``default`` and ``rasterkube-system``)
   and ``values.yaml``, the Helm values for this cluster.

The operator itself is *not* started: ``helm install ... -f $RASTERKUBE_HELM_VALUES`` installs
it, as on any cluster. ``env.sh`` exports KUBECONFIG, the S3 variables (loopback endpoint),
the storage root, the values file and PATH with kubectl and helm.

``down(directory)`` stops everything and leaves no process, mount, cgroup or namespace behind.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rasterkube_devstack import binaries, images, kuberay, node, rasterkube_image, s3

BUCKET = s3.DEFAULT_BUCKET
STORAGE_ROOT = f"s3://{BUCKET}/data"
SAMPLE_URI = f"s3://{BUCKET}/samples/landsat-annual.zarr"
SAMPLE_STAC_URI = f"s3://{BUCKET}/samples/stac"
MODELS_URI = f"s3://{BUCKET}/models"
STATE_FILE = "stack.json"
ENV_FILE = "env.sh"
VALUES_FILE = "values.yaml"
BIN_DIR = "bin"
MODE = "node"
OPERATOR_NAMESPACE = "rasterkube-system"
#: Namespaces that get the S3 credentials Secret (the operator's and the examples').
SECRET_NAMESPACES = ("default", OPERATOR_NAMESPACE)
S3_SECRET = "rasterkube-s3"
ENV_STORAGE_ROOT = "RASTERKUBE_STORAGE_ROOT"
ENV_HELM_VALUES = "RASTERKUBE_HELM_VALUES"
ENV_IMAGE = "RASTERKUBE_IMAGE"
ENV_S3_IN_CLUSTER = "RASTERKUBE_S3_ENDPOINT_IN_CLUSTER"
KUBERAY_READY_TIMEOUT_S = 300.0
SEED_TIMEOUT_S = 900.0
POLL_INTERVAL_S = 1.0
#: Small requests: the node has 2 CPUs shared by the control plane, the operators and Ray.
DEV_HEAD_RESOURCES = {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}}
DEV_MAX_RUNNING_JOBS = 1
DEV_OPERATOR_RESOURCES = {"requests": {"cpu": "50m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}}


class NodeStackError(RuntimeError):
    """The node stack could not be started (the message names the log to read)."""


@dataclass
class NodeStackInfo:
    """Where everything of a running node stack is; ``env()`` is what ``env.sh`` exports."""

    directory: Path
    kubeconfig: Path
    apiserver: str
    s3_endpoint: str  # loopback URL of this machine
    s3_endpoint_in_cluster: str  # what pods use
    image: str
    values_file: Path
    storage_root: str = STORAGE_ROOT
    sample_uri: str | None = None
    mode: str = MODE
    timings: dict[str, float] = field(default_factory=dict)
    image_bytes: int = 0
    already_running: bool = False

    @property
    def env_file(self) -> Path:
        return self.directory / ENV_FILE

    def env(self) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.kubeconfig),
            **s3.credentials_env(self.s3_endpoint),
            ENV_STORAGE_ROOT: self.storage_root,
            ENV_HELM_VALUES: str(self.values_file),
            ENV_IMAGE: self.image,
            ENV_S3_IN_CLUSTER: self.s3_endpoint_in_cluster,
        }

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeStackInfo:
        kwargs = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("directory", "kubeconfig", "values_file"):
            kwargs[key] = Path(str(kwargs[key]))
        return cls(**kwargs)


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def read_state(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(directory) / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_node_stack(directory: Path) -> bool:
    state = read_state(directory)
    return bool(state and state.get("mode") == MODE) or node.NodeLayout.of(Path(directory) / "node").netns.exists()


def load(directory: Path) -> NodeStackInfo:
    state = read_state(Path(directory).resolve())
    if not state or state.get("mode") != MODE:
        raise NodeStackError(f"no node stack recorded in {directory}; run `rasterkube dev up --dir {directory}`")
    return NodeStackInfo.from_json(state)


def helm_values(image: str, s3_endpoint_in_cluster: str) -> dict[str, Any]:
    """Helm values for this cluster: the local image, the kuberay backend, the dev S3, small pods."""
    repository, _, tag = image.rpartition(":")
    return {
        "backend": "kuberay",
        # Imported into containerd, never pulled: there is no registry to pull from.
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "storage": {
            "root": STORAGE_ROOT,
            "s3": {"endpoint": s3_endpoint_in_cluster, "credentialsSecret": {"name": S3_SECRET}},
        },
        "kuberay": {"rayVersion": _ray_version(), "headGroup": {"resources": DEV_HEAD_RESOURCES}},
        "resources": DEV_OPERATOR_RESOURCES,
        # One Ray cluster at a time: a head, a 1-CPU worker and the submitter fill the 2-CPU node;
        # further resources wait in the operator's queue (phase Pending, reason Queued).
        "maxRunningJobs": DEV_MAX_RUNNING_JOBS,
    }


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def _secret(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": S3_SECRET, "namespace": namespace},
        "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": s3.DEV_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": s3.DEV_SECRET_ACCESS_KEY},
    }


def seed_script() -> str:
    """The sample store, the static STAC catalog and the demo models, written to the stack's S3."""
    return (
        "import sys\n"
        "from rasterkube import storage\n"
        "from rasterkube.models import DEMO_MODELS\n"
        "from rasterkube.samples import build_landsat_annual_store\n"
        "from rasterkube.mosaic.localstac import build_sample_catalogs\n"
        f"fs, _ = storage.filesystem({MODELS_URI!r})\n"
        "for m in DEMO_MODELS.values():\n"
        f"    fs.put_file(str(m.path), {MODELS_URI!r} + '/' + m.file)\n"
        f"print(build_landsat_annual_store({SAMPLE_URI!r}), flush=True)\n"
        f"print(build_sample_catalogs({SAMPLE_STAC_URI!r}), flush=True)\n"
    )


def _seeded(endpoint: str) -> bool:
    """The S3 data (kept in the stack directory between runs) already has the samples and models."""
    from rasterkube import storage
    from rasterkube.models import DEMO_MODELS

    env = s3.credentials_env(endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fs, _ = storage.filesystem(MODELS_URI)
        fs.invalidate_cache()
        return (storage.is_committed(SAMPLE_URI) and fs.exists(f"{SAMPLE_STAC_URI}/catalog.json")
                and all(fs.exists(f"{MODELS_URI}/{m.file}") for m in DEMO_MODELS.values()))  # fmt: skip
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _seed(directory: Path, endpoint: str) -> None:
    if _seeded(endpoint):
        return
    log_file = directory / "logs" / "seed-samples.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **s3.credentials_env(endpoint)}
    with open(log_file, "wb") as log:
        proc = subprocess.run([sys.executable, "-c", seed_script()], stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=directory, timeout=SEED_TIMEOUT_S, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise NodeStackError(f"seeding the samples failed (exit {proc.returncode}); see {log_file}")


def _link_tools(directory: Path) -> None:
    bin_dir = directory / BIN_DIR
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("kubectl", binaries.ensure_kubectl()), ("helm", binaries.ensure_helm())):
        link = bin_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)


def _crd_files(directory: Path) -> list[Path]:
    """The rasterkube CRDs (rendered as the API-only stack does) and KubeRay's."""
    from rasterkube_devstack.stack import _render_crds

    return [*_render_crds(directory), *kuberay.ensure_kuberay_crds()]


def write_env_file(info: NodeStackInfo) -> Path:
    lines = [
        "# rasterkube dev stack (real node) — generated by `rasterkube dev up`; source it: . "
        + shlex.quote(str(info.env_file)),
        "# The AWS_* credentials are dev-only placeholders for the local S3 server (versitygw).",
    ]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in info.env().items()]
    lines.append(f'export PATH={shlex.quote(str(info.directory / BIN_DIR))}:"$PATH"  # kubectl, helm')
    info.env_file.write_text("\n".join(lines) + "\n")
    return info.env_file


def usage(info: NodeStackInfo) -> str:
    d = info.directory
    head = "is already running" if info.already_running else f"is up ({info.timings.get('total', 0):.1f}s)"
    return "\n".join(
        [
            f"rasterkube dev stack (a real node) {head} in {d}",
            f"  Kubernetes  {info.apiserver}   KUBECONFIG={info.kubeconfig}",
            f"  node        {node.NODE_NAME} ({node.NODE_IP} in network namespace "
            f"{node.NodeLayout.of(d / 'node').netns.name}); KubeRay operator in {kuberay.OPERATOR_NAMESPACE}",
            f"  S3          {info.s3_endpoint} (pods: {info.s3_endpoint_in_cluster}), bucket {BUCKET}; "
            f"Secret {S3_SECRET} in {', '.join(SECRET_NAMESPACES)}",
            f"              samples {info.sample_uri or '(not seeded)'}, {SAMPLE_STAC_URI}/catalog.json, {MODELS_URI}/",
            f"  image       {info.image} ({info.image_bytes / 1e9:.1f} GB compressed)",
            f"  logs        {d / 'logs'}, {d / 'node' / 'logs'}, {d / 'k8s' / 'logs'}",
            "",
            "Use it:",
            f"  source {shlex.quote(str(info.env_file))}",
            "  helm install rasterkube charts/rasterkube -n rasterkube-system --create-namespace "
            '-f "$RASTERKUBE_HELM_VALUES" --wait',
            "  kubectl apply -f examples/",
            "  kubectl get rasterkube -w",
            "  rasterkube dev dashboard changescore/landsat-change   # the job's Ray dashboard on loopback",
            "",
            f"Stop it: rasterkube dev down --dir {shlex.quote(str(d))}",
        ]
    )


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.monotonic()
    result = fn()
    timings[name] = round(time.monotonic() - t0, 2)
    return result


def up(directory: Path, *, seed_samples: bool = True, verbose: bool = True) -> NodeStackInfo:
    """Start the node stack in ``directory`` (see the module docstring); on failure stop it again."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    state = read_state(directory)
    the_node = node.Node(directory)
    if state and state.get("mode") == MODE and not state.get("stopped") and the_node.is_running():
        info = NodeStackInfo.from_json(state)
        info.already_running = True
        write_env_file(info)
        return info
    if the_node.is_running():
        _say(verbose, f"found a partly running node in {directory}; stopping it first")
        down(directory, verbose=False)
    (directory / ENV_FILE).unlink(missing_ok=True)
    (directory / STATE_FILE).unlink(missing_ok=True)
    try:
        return _up(directory, the_node, seed_samples, verbose)
    except BaseException:
        _say(verbose, f"the dev stack failed to start; stopping what was started (logs stay in {directory})")
        try:
            down(directory, verbose=False)
        except Exception as exc:  # keep the original error
            _say(True, f"warning: stopping the partly started stack failed: {exc}")
        raise


def _up(directory: Path, the_node: node.Node, seed_samples: bool, verbose: bool) -> NodeStackInfo:
    timings: dict[str, float] = {}
    started = time.monotonic()
    _say(verbose, f"dev stack with a real node in {directory} (the first run builds binaries and the image: minutes)")
    _timed(timings, "tools", lambda: _link_tools(directory))

    # The image build (pip, tar, gzip) runs beside the node's bring-up. Layers containerd
    # already holds (from an earlier run) count as built.
    present = node.stored_digests()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-build") as pool:
        image_build = pool.submit(_timed, timings, "image_build", lambda: rasterkube_image.build(present=present))
        info_node = the_node.start(verbose=verbose)
        timings.update({f"node_{k}": v for k, v in info_node.timings.items()})
        _timed(timings, "crds", lambda: _install_crds(directory, the_node))
        _say(verbose, f"  CRDs established ({timings['crds']:.1f}s)")
        server = s3.S3Server(directory, netns=the_node.layout.netns, address=node.NODE_IP)
        endpoint = _timed(timings, "s3", lambda: server.start(buckets=[BUCKET]))
        inner = server.inner_endpoint or ""
        _say(verbose, f"  S3 ready ({timings['s3']:.1f}s): {endpoint} (pods: {inner})")
        if seed_samples:
            _timed(timings, "samples", lambda: _seed(directory, endpoint))
            _say(verbose, f"  samples seeded ({timings['samples']:.1f}s)")
        the_node.apply([_namespace(OPERATOR_NAMESPACE), *(_secret(ns) for ns in SECRET_NAMESPACES)])
        kuberay_image = kuberay.operator_image()
        _timed(timings, "kuberay_image", lambda: images.import_image(the_node.containerd, kuberay_image))
        _timed(timings, "kuberay_operator", lambda: _start_kuberay(the_node, kuberay_image.name))
        _say(verbose, f"  KubeRay operator {kuberay.KUBERAY_VERSION} ready ({timings['kuberay_operator']:.1f}s)")
        report = image_build.result()
    _say(verbose, f"  image {report.image.name} built ({timings['image_build']:.1f}s; cached layers: {report.cached})")
    timings["image_import"] = images.import_image(the_node.containerd, report.image)
    freed = images.release_blobs(report.image, the_node.containerd)  # one copy of the GBs is enough
    _say(verbose, f"  image imported into containerd ({timings['image_import']:.1f}s; "
                  f"{freed / 1e9:.1f} GB of cached layers now only in containerd)")  # fmt: skip
    values_file = directory / VALUES_FILE
    values_file.write_text(yaml.safe_dump(helm_values(report.image.name, inner), sort_keys=False))
    timings["total"] = round(time.monotonic() - started, 2)
    info = NodeStackInfo(
        directory=directory, kubeconfig=the_node.kubeconfig, apiserver=the_node.plane.server, s3_endpoint=endpoint,
        s3_endpoint_in_cluster=inner, image=report.image.name, values_file=values_file,
        sample_uri=SAMPLE_URI if seed_samples else None, timings=timings, image_bytes=report.image.size,
    )  # fmt: skip
    (directory / STATE_FILE).write_text(json.dumps({**info.to_json(), "image_build": report.seconds}, indent=2) + "\n")
    write_env_file(info)
    return info


def refresh_image(directory: Path, *, verbose: bool = True) -> NodeStackInfo:
    """Rebuild the rasterkube image from the checkout (only changed layers), import it and point
    ``values.yaml`` at it; then ``helm upgrade ... -f $RASTERKUBE_HELM_VALUES`` rolls it out."""
    directory = Path(directory).resolve()
    info = load(directory)
    the_node = node.Node(directory)
    if not the_node.is_running():
        raise NodeStackError(f"the node of {directory} is not running; run `rasterkube dev up --dir {directory}`")
    started = time.monotonic()
    report = rasterkube_image.build(present=the_node.containerd.content_digests())
    seconds = images.import_image(the_node.containerd, report.image)
    images.release_blobs(report.image, the_node.containerd)
    info.image, info.image_bytes = report.image.name, report.image.size
    info.values_file.write_text(yaml.safe_dump(helm_values(info.image, info.s3_endpoint_in_cluster), sort_keys=False))
    info.timings["image_refresh"] = round(time.monotonic() - started, 2)
    state = read_state(directory) or {}
    state.update(info.to_json())
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    write_env_file(info)
    _say(verbose, f"image {info.image} ready ({info.timings['image_refresh']:.1f}s, import {seconds:.1f}s; "
                  f"cached layers: {report.cached}); roll it out with:\n  helm upgrade rasterkube charts/rasterkube "
                  '-n rasterkube-system -f "$RASTERKUBE_HELM_VALUES" --wait')  # fmt: skip
    return info


def _namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def _install_crds(directory: Path, the_node: node.Node) -> None:
    files = _crd_files(directory)
    args = ["apply", "--server-side", "--force-conflicts", "--field-manager=rasterkube-dev"]
    for path in files:
        args += ["-f", str(path)]
    the_node.kubectl(*args)
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in files[:-3]] + list(kuberay.CRD_FILES.values())
    the_node.kubectl("wait", "--for=condition=Established", "--timeout=120s", *(f"crd/{n}" for n in names),
                     timeout_s=150)  # fmt: skip


def _start_kuberay(the_node: node.Node, image: str) -> None:
    manifests = kuberay.operator_manifests(binaries.ensure_kubectl(), image)
    the_node.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=rasterkube-dev", "-f", "-",
                     input=manifests)  # fmt: skip
    the_node.kubectl("-n", kuberay.OPERATOR_NAMESPACE, "rollout", "status", "deployment/kuberay-operator",
                     f"--timeout={int(KUBERAY_READY_TIMEOUT_S)}s", timeout_s=KUBERAY_READY_TIMEOUT_S + 30)  # fmt: skip


def down(directory: Path, *, verbose: bool = True) -> dict[str, bool]:
    """Stop the S3 server and the node (control plane included); idempotent, from any process."""
    directory = Path(directory).resolve()
    stopped = {"s3": s3.S3Server(directory).stop()}
    stopped.update(node.Node(directory).stop())
    (directory / ENV_FILE).unlink(missing_ok=True)
    state = read_state(directory)
    if state is not None:
        state["stopped"] = True
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    running = [name for name, was in stopped.items() if was]
    _say(verbose, f"stopped {', '.join(running)} in {directory}" if running else f"nothing was running in {directory}")
    return stopped


def dashboard_target(the_node: node.Node, kind: str, name: str, namespace: str = "default") -> tuple[str, str]:
    """(namespace, head service) of the Ray cluster that runs ``kind/name``'s current job."""
    proc = the_node.kubectl("get", kind, name, "-n", namespace, "-o", "json")
    obj = json.loads(proc.stdout)
    job_id = ((obj.get("status") or {}).get("job") or {}).get("id")
    if not job_id:
        raise NodeStackError(f"{kind}/{name} has no job yet (status.job.id is empty)")
    from rasterkube_operator.backends.kuberay_manifests import rayjob_name

    rayjob = json.loads(the_node.kubectl("get", "rayjob", rayjob_name(job_id), "-n", namespace, "-o", "json").stdout)
    cluster = (rayjob.get("status") or {}).get("rayClusterName")
    if not cluster:
        raise NodeStackError(f"RayJob {rayjob_name(job_id)} has no Ray cluster (yet, or any more)")
    return namespace, f"{cluster}-head-svc"

