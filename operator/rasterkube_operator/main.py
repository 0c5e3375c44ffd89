"""``rasterkube operator``: run the kopf operator (wraps ``kopf run``)."""

from __future__ import annotations

import logging
import os
import kopf

from rasterkube.constants import ENV_STORAGE_ROOT
from rasterkube.errors import UserError
from rasterkube_operator import metrics, reconcile
from rasterkube_operator.backends.base import Backend, BackendName
from rasterkube_operator.config import OperatorConfig
from rasterkube_operator.handlers import register_all

log = logging.getLogger("rasterkube.operator")
FINALIZER = "rasterkube.dev/finalizer"
ANNOTATION_PREFIX = "rasterkube.dev"


def make_backend(cfg: OperatorConfig) -> Backend:
    if cfg.backend == BackendName.RAY:
        if not cfg.ray_address:
            raise UserError("--ray-address: the ray backend needs the Ray dashboard address, e.g. http://ray-head:8265")
        from rasterkube_operator.backends.ray_jobs import RayJobsBackend

        return RayJobsBackend(cfg.ray_address)
    from rasterkube_operator.backends.kuberay import KubeRayBackend
    from rasterkube_operator.backends.kuberay_manifests import KubeRaySettings
    from rasterkube_operator.kube import api_client

    return KubeRayBackend(api_client(), KubeRaySettings.from_env())


def build_registry(cfg: OperatorConfig) -> kopf.OperatorRegistry:
    from rasterkube_operator.kube import KubeClient

    deps = reconcile.Deps(
        backend=make_backend(cfg),
        kube=KubeClient(),
        storage_root=cfg.storage_root,
        job_env=reconcile.job_env_from({**os.environ, ENV_STORAGE_ROOT: cfg.storage_root}),
        metrics=metrics.PrometheusMetrics(),
        slots=reconcile.JobSlots(cfg.max_running_jobs),
    )
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: object) -> None:
        # Our CRD status schema has no room for kopf's bookkeeping: keep it in annotations.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=ANNOTATION_PREFIX)
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.WARNING  # our own events carry the story
        settings.execution.max_workers = 16
        settings.watching.server_timeout = 300

    @kopf.on.login(registry=registry)
    def login(**kwargs: object) -> kopf.ConnectionInfo | None:
        # The same credentials as our own client: in-cluster service account or KUBECONFIG.
        return kopf.login_via_client(**kwargs)  # type: ignore[arg-type]

    register_all(registry, lambda: deps, cfg.poll_interval_s)
    return registry


def run(cfg: OperatorConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics.serve(cfg.metrics_port, cfg.listen_host)
    registry = build_registry(cfg)
    log.info("rasterkube operator: backend=%s storage=%s namespaces=%s", cfg.backend.value, cfg.storage_root,
             cfg.namespaces or "all")  # fmt: skip
    kopf.run(
        registry=registry,
        standalone=True,  # one replica (Recreate): no peering objects needed
        clusterwide=not cfg.namespaces,
        namespaces=cfg.namespaces,
        liveness_endpoint=f"http://{cfg.listen_host}:{cfg.health_port}/healthz",
    )
