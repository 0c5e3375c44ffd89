"""Ray Serve hosting of a model: one deployment per model, batches of patches in, numpy out.

Workers send whole batches of patches (``(n, C, P, P)`` float32 numpy, ``n <= maxBatchSize``)
through a :class:`~ray.serve.handle.DeploymentHandle` — never HTTP, never one request per
patch. ``@serve.batch`` with a ``batch_size_fn`` counting *patches* merges small requests
(blocks at the image edge, the last batch of a block) from several workers until a model call
holds ``maxBatchSize`` patches. No HTTP proxy is started: the deployment is only reachable
through handles (nothing listens on a port).

Threads: Ray sets ``OMP_NUM_THREADS=1`` in workers; the replica sets torch's intra-op threads
to its CPU reservation on purpose (DESIGN §4), so a 1-CPU replica uses one core, a 4-CPU
replica four.

Sharing: the application name is derived from the model's content hash and everything that
changes how it is served, so a later Prediction of the same model and serving settings reuses
the running replicas (``serving.shareDeployment``); otherwise the app is named after the run
and deleted when the run ends.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol

import numpy as np

from rasterkube.api.kinds import DeviceKind
from rasterkube.constants import Reason
from rasterkube.errors import SchedulingTimeout, UserError
from rasterkube.runtime import scheduling
from rasterkube.runtime.executor import carried_env

APP_PREFIX: Final = "rasterkube-model"
DEPLOYMENT: Final = "ModelServer"
BATCH_WAIT_S: Final = 0.005  # long enough to merge concurrent small requests, short against a model call
HANDLE_TIMEOUT_S: Final = 600.0
RUNNING: Final = "RUNNING"
DEPLOY_FAILED: Final = "DEPLOY_FAILED"
DEPLOY_TIMEOUT_S: Final = 900.0
POLL_S: Final = 2.0
#: What a replica is called in messages.
MODEL_REPLICA: Final = "model replica"
#: CPUs of a GPU replica when serving.cpusPerReplica is unset (it feeds its GPU).
GPU_REPLICA_CPUS: Final = 1.0
#: The least CPU a sized replica asks for.
MIN_REPLICA_CPUS: Final = 0.01
#: The replica method block tasks call: predictions with the model time they took.
TIMED_METHOD: Final = "timed"

#: (wall, CPU) seconds of the model call(s) behind one request.
ModelTime = tuple[float, float]


@dataclass(frozen=True)
class ServeConfig:
    """Everything that identifies a deployment; equal configs share one."""

    model_uri: str
    model_sha256: str
    softmax: bool
    device: str
    max_batch_size: int
    replicas: int
    max_replicas: int | None
    cpus_per_replica: float
    gpus_per_replica: float
    idle_timeout_s: float = 120.0
    probe_channels: int | None = None
    #: spec.precision: fp32, bf16 or fp16 (autocast on the replica).
    precision: str = "fp32"
    #: spec.compile: torch.compile once per replica.
    compile: bool = False
    #: (channels, patch, patch) of the batches, for the compiled model's warm-up call; None
    #: without compile (a shared uncompiled deployment serves any patch size).
    warmup_input: tuple[int, int, int] | None = None

    def key(self) -> str:
        # The URI is not part of the identity (the content is): a model moved to S3 stays shared.
        ident = {k: v for k, v in asdict(self).items() if k != "model_uri"}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]

    def app_name(self, share: bool, run_id: str) -> str:
        suffix = self.key() if share else f"run-{run_id}"
        return f"{APP_PREFIX}-{self.model_sha256[:12]}-{suffix}"


def pick_device(requested: str, cuda_available: bool) -> str:
    """``auto`` → ``cuda`` when a GPU is visible to the replica, else ``cpu``."""
    if requested == DeviceKind.AUTO:
        return "cuda" if cuda_available else "cpu"
    return str(requested)


def replica_cpus(
    requested: float | None,
    replicas: int,
    max_replicas: int | None,
    gpus_per_replica: float,
    cluster_cpus: float,
    node_cpus: float,
) -> float:
    """``serving.cpusPerReplica``, or when unset what the Ray cluster can give each replica.

    Block tasks reserve no CPU (they wait for the model most of the time), so on CPU a
    replica gets its share of the cluster's CPUs — all of them for one replica — whole cores
    (torch threads), at most the largest node's (a replica runs on one node). A GPU replica
    gets one CPU to feed its GPU: the rest of the CPUs belong to the block tasks that read,
    cut, merge and write for it.
    """
    if requested is not None:
        return float(requested)
    if gpus_per_replica > 0:
        return GPU_REPLICA_CPUS
    share = min(cluster_cpus / max(replicas, max_replicas or replicas), node_cpus)
    # Less than a core each (more replicas than CPUs): the fraction, so that they all fit.
    return float(math.floor(share)) if share >= 1 else max(math.floor(share * 100) / 100, MIN_REPLICA_CPUS)


def torch_threads(cpus: float) -> int:
    return max(1, math.floor(cpus))


def patch_count(requests: list[Any]) -> int:
    """Serve batch size in patches, not requests (``batch_size_fn``)."""
    return sum(len(r) for r in requests)


class Predictor(Protocol):
    """What a block task calls: a batch of patches in, predictions out."""

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    """The model on one device; shared by the replica and the in-process baseline.

    Precision, compilation and the CUDA feed are :mod:`rasterkube.predict.inference`'s."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        from rasterkube.predict import inference, models

        torch.set_num_threads(torch_threads(config.cpus_per_replica))
        # Batches arrive zero-copy from Ray's object store, hence read-only; the model never
        # writes to its input, so torch's warning about non-writable arrays does not apply.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.device = pick_device(config.device, torch.cuda.is_available())
        # Before loading anything: fp16 on a replica that got no GPU is refused, not emulated.
        inference.check_precision(config.precision, self.device)
        if config.compile:
            inference.check_toolchain(self.device, f"the {MODEL_REPLICA}'s machine")
        fetched = models.fetch(config.model_uri)
        if fetched.sha256 != config.model_sha256:
            raise RuntimeError(
                f"{config.model_uri} changed since the job started (sha256 {fetched.sha256[:12]} != "
                f"{config.model_sha256[:12]}); run the Prediction again"
            )
        loaded = models.load(fetched.path, config.model_uri, probe_channels=config.probe_channels)
        if config.compile and loaded.signature.format != models.FORMAT_PT2:
            raise inference.CompileError(inference.COMPILE_TORCHSCRIPT)
        self.module = inference.served(loaded.model, loaded.transforms, config.softmax).to(self.device)
        self.autocast = inference.autocast_dtype(config.precision)
        self.max_batch_size = config.max_batch_size
        self.compiled = config.compile
        self.forward: Callable[[Any], Any] = self.module
        self.feed = inference.CudaFeed(self.device) if self.device == inference.CUDA else None
        if config.compile:
            inference.use_inductor_cache()
            # Static shapes: every batch is padded to maxBatchSize, so one graph serves all.
            self.forward = torch.compile(self.module, dynamic=False)
            if config.warmup_input is not None:  # compile now, not on the first real batch
                self.predict(np.zeros((self.max_batch_size, *config.warmup_input), dtype=np.float32))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from rasterkube.predict import inference

        with torch.inference_mode(), inference.autocast(self.device, self.autocast):
            if self.feed is not None:
                return self.feed.run(batch, self.max_batch_size, self.compiled, self.forward)
            outs = [
                self.forward(torch.from_numpy(x))[: sl.stop - sl.start].numpy()
                for sl, x in inference.iter_cpu_batches(batch, self.max_batch_size, pad=self.compiled)
            ]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)


def _deployment_class() -> Any:
    from ray import serve

    class ModelServer:
        def __init__(self, config: ServeConfig) -> None:
            self.runner = TorchRunner(config)
            self.predict_batch.set_max_batch_size(config.max_batch_size)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=BATCH_WAIT_S, batch_size_fn=patch_count)
        async def predict_batch(self, batches: list[np.ndarray]) -> list[tuple[np.ndarray, ModelTime]]:
            sizes = [len(b) for b in batches]
            cpu, wall = time.process_time(), time.perf_counter()
            out = self.runner.predict(batches[0] if len(batches) == 1 else np.concatenate(batches))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            # A model call merged from several requests: each is charged its share of patches.
            total = sum(sizes)
            parts = np.split(out, np.cumsum(sizes)[:-1])
            return [(part, (wall * n / total, cpu * n / total)) for part, n in zip(parts, sizes, strict=True)]

        async def __call__(self, batch: np.ndarray) -> np.ndarray:
            out, _ = await self.predict_batch(batch)
            return out

        async def timed(self, batch: Any) -> tuple[np.ndarray, ModelTime]:
            """Predictions and this request's share of the model call's (wall, CPU) seconds.

            ``batch`` may be an object ref (block tasks put batches in the object store): it
            is mapped from there, read-only, without a copy."""
            import ray

            if isinstance(batch, ray.ObjectRef):
                batch = await batch
            return await self.predict_batch(batch)

        def device(self) -> str:
            return self.runner.device

    return serve.deployment(ModelServer, name=DEPLOYMENT)


def _options(config: ServeConfig, share: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {
        # One log line per request would drown the job's log (thousands of batches).
        "logging_config": {"enable_access_log": False},
        "ray_actor_options": {
            "num_cpus": config.cpus_per_replica,
            "num_gpus": config.gpus_per_replica,
            # Replicas are started by Serve's controller, not by the job: give them the job's
            # storage settings (S3 endpoint, credentials) explicitly, as block tasks get them.
            "runtime_env": {"env_vars": carried_env()},
        },
        # Enough requests queued at a replica to fill the next batch while one runs.
        "max_ongoing_requests": max(8, 4 * config.max_batch_size),
    }
    autoscale = config.max_replicas is not None and config.max_replicas > config.replicas
    if not (share or autoscale):
        opts["num_replicas"] = config.replicas
        return opts
    opts["autoscaling_config"] = {
        # A shared deployment outlives its run: between runs it scales to zero replicas so
        # that its CPUs/GPUs go back to the cluster (a kept replica could starve the block
        # tasks of the next run), and back up when a run sends requests again.
        "min_replicas": 0 if share and config.idle_timeout_s > 0 else config.replicas,
        "initial_replicas": config.replicas,
        "max_replicas": max(config.replicas, config.max_replicas or config.replicas),
        # Workers keep many batches in flight, so this scales to max_replicas under load.
        "target_ongoing_requests": 2,
        "upscale_delay_s": 3.0,
        "downscale_delay_s": max(config.idle_timeout_s, 30.0),
        "downscale_to_zero_delay_s": max(config.idle_timeout_s, 1.0),
    }
    return opts


def ensure_serve() -> None:
    """Start Serve's controller if this cluster has none, with no HTTP proxy."""
    from ray import serve
    from ray.serve.config import ProxyLocation

    serve.start(proxy_location=ProxyLocation.Disabled)


def app_status(app: str) -> tuple[str | None, str]:
    """(status name or None when absent, message) of a Serve application."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return None, ""
    return str(getattr(status.status, "value", status.status)), status.message or ""


def check_capacity(config: ServeConfig, task_cpus: float, cluster: dict[str, float]) -> None:
    """Refuse a deployment whose replicas (plus a block task) cannot fit the cluster at all."""
    cpus = cluster.get("CPU", 0.0)
    need = config.replicas * config.cpus_per_replica + task_cpus
    if need > cpus:
        raise UserError(
            f"spec.serving.cpusPerReplica: {config.replicas} replica(s) x {config.cpus_per_replica:g} CPU plus "
            f"{task_cpus:g} CPU per block task need {need:g} CPUs, the Ray cluster has {cpus:g}; lower "
            "serving.cpusPerReplica or serving.replicas, or add workers"
        )


def replica_demand(config: ServeConfig) -> dict[str, float]:
    """What Ray must find on one node for each replica."""
    return scheduling.demand_of(config.cpus_per_replica, config.gpus_per_replica)


def deploy(
    config: ServeConfig,
    app: str,
    share: bool,
    timeout_s: float = DEPLOY_TIMEOUT_S,
    on_wait: Callable[[str, str | None], None] | None = None,
) -> bool:
    """Deploy ``app`` unless it is already running; True when an existing one is reused.

    Waits for the replicas at most ``timeout_s`` (a GPU node pool may need minutes to scale
    up), reporting Serve's own message meanwhile — or, while Ray cannot place a replica (no
    node offers what it asks for, or none has it free), that reason (``on_wait``'s second
    argument is then ``Unschedulable``) and fails with it after the job's scheduling bound
    (:class:`~rasterkube.errors.SchedulingTimeout`), instead of hanging.
    """
    from ray import serve

    ensure_serve()
    status, _ = app_status(app)
    if status == RUNNING:
        return True
    target = _deployment_class().options(**_options(config, share)).bind(config)
    watch = scheduling.Watch(replica_demand(config), MODEL_REPLICA)  # on_wait reports below, every poll
    # Not serve.run: it waits for RUNNING in a loop of its own that never ends when the app is
    # deleted meanwhile (our timeouts delete it); this loop watches the app itself.
    serve.run_many([serve.RunTarget(target, name=app, route_prefix=None)], wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    while True:
        status, message = app_status(app)
        if status == RUNNING:
            return False
        if status == DEPLOY_FAILED:
            failure = deploy_failure(message, deployment_messages(app))
            delete(app)
            raise failure
        try:
            # One replica Ray cannot place holds the whole deployment back.
            wait = watch.check(in_flight=1)
        except SchedulingTimeout:
            delete(app)
            raise
        if time.monotonic() > deadline:
            delete(app)
            raise RuntimeError(
                f"the model's replicas did not start within {timeout_s:.0f} s ({message or status}); check that "
                "the cluster has the CPUs/GPUs that spec.serving asks for"
            )
        if on_wait is not None:
            if wait is not None:
                on_wait(wait.message, Reason.UNSCHEDULABLE.value)
            else:
                on_wait(message or f"waiting for replicas ({status})", None)
        time.sleep(POLL_S)


# The last line of a replica's traceback when it raised one of our user errors (bad precision
# for the device, compile without a compiler, a model it cannot fetch): the message names the
# field and the fix, so it is the whole story.
_REPLICA_USER_ERROR: Final = re.compile(r"^rasterkube\.[\w.]+: (spec\..+)$", re.MULTILINE)


def deployment_messages(app: str) -> list[str]:
    """Serve's per-deployment messages of ``app`` (a failed replica's traceback is there; the
    application's own message only says which deployments failed)."""
    from ray import serve

    status = serve.status().applications.get(app)
    return [] if status is None else [d.message for d in status.deployments.values() if d.message]


def deploy_failure(app_message: str, deployment_messages: list[str]) -> Exception:
    """What a failed deployment means to the user: a replica's user error as a :class:`UserError`
    (nothing to retry: the run's staging is discarded), anything else as a fault with the
    replica's last traceback line."""
    text = "\n".join(deployment_messages)
    found = _REPLICA_USER_ERROR.findall(text)
    if found:
        return UserError(found[-1])
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return RuntimeError(f"Ray Serve could not deploy the model: {lines[-1] if lines else app_message}")


def delete(app: str) -> None:
    """Delete ``app`` if it exists (a run that failed before deploying has none)."""
    from ray import serve

    if app in serve.status().applications:
        serve.delete(app, _blocking=True)


class ServePredictor:
    """A :class:`Predictor` over a deployment handle; usable inside Ray tasks.

    Requests go to the replica's ``timed`` method: ``model_wall_s`` / ``model_cpu_s`` add up
    the model time of every result received (the replica's side of the stage timings)."""

    def __init__(self, app: str) -> None:
        from ray import serve

        self.handle = serve.get_deployment_handle(DEPLOYMENT, app_name=app).options(method_name=TIMED_METHOD)
        self.model_wall_s = 0.0
        self.model_cpu_s = 0.0

    def submit(self, batch: Any) -> Any:
        return self.handle.remote(batch)

    def result(self, response: Any) -> np.ndarray:
        out, (wall, cpu) = response.result(timeout_s=HANDLE_TIMEOUT_S)
        self.model_wall_s += wall
        self.model_cpu_s += cpu
        return out

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.result(self.submit(batch))

    def predict_many(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """All batches in flight at once (the replica queues them), results in order."""
        responses = [self.submit(b) for b in batches]
        return [self.result(r) for r in responses]
