"""Pure mapping between rasterkube jobs and KubeRay ``RayJob`` objects (ray.io/v1).

No I/O here: :func:`build_rayjob` turns a :class:`JobSpec` into the RayJob
manifest, :func:`map_rayjob_status` turns a RayJob read back from the API
server into a backend-neutral :class:`JobStatus`, and :class:`KubeRaySettings`
holds the operator-wide knobs (read once from the environment the Helm chart
sets). Field names follow the KubeRay v1.5 CRDs (``ray.io_rayjobs.yaml``);
the devstack tests create these objects on a real API server with the real
CRDs and check that no field is pruned.

Two RayJob modes:

* **per-job cluster** (default): ``spec.rayClusterSpec`` describes a head (no
  CPUs for tasks, so work lands on workers) and one worker group sized from
  the resource's ``spec.resources``; KubeRay deletes the cluster
  ``ttlSecondsAfterFinished`` after the job ends (``shutdownAfterJobFinishes``).
* **shared cluster**: ``settings.cluster_selector`` (must name the cluster with
  the ``ray.io/cluster`` key) runs the job on an existing long-lived RayCluster;
  KubeRay then forbids ``shutdownAfterJobFinishes`` and a TTL.

Credentials never land in the RayJob: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN`` are dropped from the job
environment; the Ray pods get them through ``secretKeyRef`` when
``settings.s3_credentials_secret`` is set (the Helm chart passes the Secret's
*name*), otherwise they use ambient credentials (IRSA / workload identity).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml
from pydantic import ValidationError
from rasterkube.api.common import Resources
from rasterkube.constants import Reason

from rasterkube_operator.backends.base import JobSpec, JobState, JobStatus

RAY_GROUP = "ray.io"
RAY_VERSION_API = "v1"
RAYJOB_API_VERSION = f"{RAY_GROUP}/{RAY_VERSION_API}"
RAYJOB_KIND = "RayJob"
RAYJOB_PLURAL = "rayjobs"

#: KubeRay's ``MaxRayJobNameLength``: 53 (RayCluster name limit) minus the
#: 6 characters of the generated cluster-name suffix. Longer names fail with
#: ValidationFailed, so longer job ids are shortened deterministically.
MAX_RAYJOB_NAME_LENGTH = 47
MAX_LABEL_VALUE_LENGTH = 63
#: Key of ``spec.clusterSelector`` that KubeRay requires (the RayCluster name).
CLUSTER_SELECTOR_NAME_KEY = "ray.io/cluster"

SUBMISSION_MODE = "K8sJobMode"
WORKER_GROUP = "workers"
HEAD_CONTAINER = "ray-head"
WORKER_CONTAINER = "ray-worker"
#: KubeRay's name for the container of the submitter Job (utils.SubmitterContainerName).
SUBMITTER_CONTAINER = "ray-job-submitter"
GPU_RESOURCE = "nvidia.com/gpu"

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "rasterkube"
LABEL_KIND = "rasterkube.dev/kind"
LABEL_NAME = "rasterkube.dev/name"
LABEL_JOB_ID = "rasterkube.dev/job-id"

#: Never copied into the RayJob (readable by anyone who can get RayJobs).
CREDENTIAL_ENV_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})

DEFAULT_IMAGE = "ghcr.io/rasterkube/rasterkube:0.1.0"
DEFAULT_RAY_VERSION = "2.60.0"
DEFAULT_TTL_SECONDS_AFTER_FINISHED = 300
DEFAULT_ACTIVE_DEADLINE_SECONDS = 86400
DEFAULT_INITIALIZING_TIMEOUT_S = 600
#: How long a Ray pod may stay unschedulable (e.g. GPUs no node has) before the job fails.
DEFAULT_UNSCHEDULABLE_TIMEOUT_S = 300
#: UID of the ``rasterkube`` user in the image (the chart runs the operator as it too).
DEFAULT_RUN_AS_USER = 10001
DEFAULT_S3_ACCESS_KEY_ID_KEY = "AWS_ACCESS_KEY_ID"
DEFAULT_S3_SECRET_ACCESS_KEY_KEY = "AWS_SECRET_ACCESS_KEY"


def _default_head_resources() -> dict[str, Any]:
    # Same defaults as the chart's kuberay.headGroup.resources: the head runs the job driver.
    return {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}


def _default_submitter_resources() -> dict[str, Any]:
    # The submitter pod only runs `ray job submit` and follows the logs: KubeRay's own default
    # asks for half a CPU, which a small node pool (or the 2-CPU dev node) misses for Ray.
    return {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------

ENV_IMAGE = "RASTERKUBE_RAY_IMAGE"
ENV_RAY_VERSION = "RASTERKUBE_RAY_VERSION"
#: Name the Helm chart uses for the same setting; accepted as well.
ENV_RAY_VERSION_CHART = "RASTERKUBE_KUBERAY_RAY_VERSION"
ENV_CLUSTER_SELECTOR = "RASTERKUBE_KUBERAY_CLUSTER_SELECTOR"
ENV_GPU_NODE_SELECTOR = "RASTERKUBE_GPU_NODE_SELECTOR"
ENV_GPU_TOLERATIONS = "RASTERKUBE_GPU_TOLERATIONS"
ENV_TTL = "RASTERKUBE_KUBERAY_TTL_SECONDS"
ENV_ACTIVE_DEADLINE = "RASTERKUBE_KUBERAY_ACTIVE_DEADLINE_SECONDS"
ENV_INITIALIZING_TIMEOUT = "RASTERKUBE_KUBERAY_INITIALIZING_TIMEOUT_SECONDS"
ENV_UNSCHEDULABLE_TIMEOUT = "RASTERKUBE_KUBERAY_UNSCHEDULABLE_TIMEOUT_SECONDS"
#: Set in every pod by Kubernetes: the operator runs inside the cluster, where the Ray
#: dashboards (cluster-internal service names) are reachable.
ENV_IN_CLUSTER = "KUBERNETES_SERVICE_HOST"
ENV_SERVICE_ACCOUNT = "RASTERKUBE_KUBERAY_SERVICE_ACCOUNT"
ENV_HEAD_RESOURCES = "RASTERKUBE_KUBERAY_HEAD_RESOURCES"
ENV_SUBMITTER_RESOURCES = "RASTERKUBE_KUBERAY_SUBMITTER_RESOURCES"
ENV_IMAGE_PULL_SECRETS = "RASTERKUBE_KUBERAY_IMAGE_PULL_SECRETS"
ENV_S3_SECRET = "RASTERKUBE_S3_CREDENTIALS_SECRET"
ENV_S3_ACCESS_KEY_ID_KEY = "RASTERKUBE_S3_ACCESS_KEY_ID_KEY"
ENV_S3_SECRET_ACCESS_KEY_KEY = "RASTERKUBE_S3_SECRET_ACCESS_KEY_KEY"

_TOLERATION_FIELDS = ("key", "operator", "value", "effect", "tolerationSeconds")


class KubeRaySettingsError(ValueError):
    """A kuberay backend setting (environment variable) is invalid; the message names it."""


@dataclass(frozen=True)
class KubeRaySettings:
    """Operator-wide settings of the kuberay backend (see :meth:`from_env`)."""

    image: str = DEFAULT_IMAGE
    ray_version: str = DEFAULT_RAY_VERSION
    #: Labels of an existing RayCluster to run on (must include ``ray.io/cluster``);
    #: ``None``: a RayCluster per job.
    cluster_selector: dict[str, str] | None = None
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    #: Kubernetes tolerations (wire form) added to GPU worker pods.
    gpu_tolerations: list[dict[str, Any]] = field(default_factory=list)
    ttl_seconds_after_finished: int = DEFAULT_TTL_SECONDS_AFTER_FINISHED
    active_deadline_seconds: int = DEFAULT_ACTIVE_DEADLINE_SECONDS
    #: A RayJob stuck in ``Initializing`` this long is reported FAILED.
    initializing_timeout_s: int = DEFAULT_INITIALIZING_TIMEOUT_S
    #: A Ray pod the scheduler cannot place this long fails the job (reason Unschedulable).
    unschedulable_timeout_s: int = DEFAULT_UNSCHEDULABLE_TIMEOUT_S
    #: Read progress and results from the Ray dashboard of the job's cluster (only reachable
    #: from inside the cluster; default: when running in a pod).
    read_dashboard: bool = False
    service_account: str | None = None
    head_resources: dict[str, Any] = field(default_factory=_default_head_resources)
    submitter_resources: dict[str, Any] = field(default_factory=_default_submitter_resources)
    image_pull_secrets: list[str] = field(default_factory=list)
    s3_credentials_secret: str | None = None
    s3_access_key_id_key: str = DEFAULT_S3_ACCESS_KEY_ID_KEY
    s3_secret_access_key_key: str = DEFAULT_S3_SECRET_ACCESS_KEY_KEY
    run_as_user: int = DEFAULT_RUN_AS_USER

    def __post_init__(self) -> None:
        if self.cluster_selector is not None and not self.cluster_selector.get(CLUSTER_SELECTOR_NAME_KEY):
            raise KubeRaySettingsError(
                f"cluster_selector {self.cluster_selector!r} must contain {CLUSTER_SELECTOR_NAME_KEY!r} "
                "with the name of the RayCluster to run on (KubeRay finds the cluster by that key)"
            )
        for name in ("active_deadline_seconds", "initializing_timeout_s", "unschedulable_timeout_s"):
            if getattr(self, name) <= 0:
                raise KubeRaySettingsError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ttl_seconds_after_finished < 0:
            raise KubeRaySettingsError(
                f"ttl_seconds_after_finished must be >= 0, got {self.ttl_seconds_after_finished}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KubeRaySettings:
        """Read the settings from ``environ`` (default ``os.environ``); unset → defaults.

        Raises :class:`KubeRaySettingsError` naming the variable on bad JSON or values.
        """
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        if image := env.get(ENV_IMAGE, "").strip():
            kwargs["image"] = image
        version, chart_version = env.get(ENV_RAY_VERSION, "").strip(), env.get(ENV_RAY_VERSION_CHART, "").strip()
        if version and chart_version and version != chart_version:
            raise KubeRaySettingsError(
                f"{ENV_RAY_VERSION}={version!r} and {ENV_RAY_VERSION_CHART}={chart_version!r} disagree; set one"
            )
        if version or chart_version:
            kwargs["ray_version"] = version or chart_version
        selector = _json_str_map(env, ENV_CLUSTER_SELECTOR)
        if selector:  # "{}" (the chart default) means: a cluster per job
            if not selector.get(CLUSTER_SELECTOR_NAME_KEY):
                raise KubeRaySettingsError(
                    f"{ENV_CLUSTER_SELECTOR} must contain {CLUSTER_SELECTOR_NAME_KEY!r} (the RayCluster name), "
                    f'e.g. {{"{CLUSTER_SELECTOR_NAME_KEY}": "shared"}}; got {selector!r}'
                )
            kwargs["cluster_selector"] = selector
        if (gpu_selector := _json_str_map(env, ENV_GPU_NODE_SELECTOR)) is not None:
            kwargs["gpu_node_selector"] = gpu_selector
        if (tolerations := _json_tolerations(env, ENV_GPU_TOLERATIONS)) is not None:
            kwargs["gpu_tolerations"] = tolerations
        for var, name, minimum in (
            (ENV_TTL, "ttl_seconds_after_finished", 0),
            (ENV_ACTIVE_DEADLINE, "active_deadline_seconds", 1),
            (ENV_INITIALIZING_TIMEOUT, "initializing_timeout_s", 1),
            (ENV_UNSCHEDULABLE_TIMEOUT, "unschedulable_timeout_s", 1),
        ):
            if (number := _int(env, var, minimum)) is not None:
                kwargs[name] = number
        if account := env.get(ENV_SERVICE_ACCOUNT, "").strip():
            kwargs["service_account"] = account
        for var, name in ((ENV_HEAD_RESOURCES, "head_resources"), (ENV_SUBMITTER_RESOURCES, "submitter_resources")):
            if (value := _json_value(env, var)) is not None:
                if not isinstance(value, dict) or set(value) - {"requests", "limits", "claims"}:
                    raise KubeRaySettingsError(
                        f"{var} must be a JSON object with 'requests'/'limits' (a Kubernetes "
                        f"ResourceRequirements), got {value!r}"
                    )
                kwargs[name] = value
        if (secrets := _json_value(env, ENV_IMAGE_PULL_SECRETS)) is not None:
            kwargs["image_pull_secrets"] = _pull_secret_names(secrets)
        if secret := env.get(ENV_S3_SECRET, "").strip():
            kwargs["s3_credentials_secret"] = secret
            kwargs["s3_access_key_id_key"] = (
                env.get(ENV_S3_ACCESS_KEY_ID_KEY, "").strip() or DEFAULT_S3_ACCESS_KEY_ID_KEY
            )
            kwargs["s3_secret_access_key_key"] = (
                env.get(ENV_S3_SECRET_ACCESS_KEY_KEY, "").strip() or DEFAULT_S3_SECRET_ACCESS_KEY_KEY
            )
        kwargs["read_dashboard"] = bool(env.get(ENV_IN_CLUSTER))
        return cls(**kwargs)


def _json_value(env: Mapping[str, str], var: str) -> Any:
    raw = env.get(var, "").strip()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise KubeRaySettingsError(f"{var} is not valid JSON ({exc.msg} at position {exc.pos}): {raw!r}") from None


def _json_str_map(env: Mapping[str, str], var: str) -> dict[str, str] | None:
    value = _json_value(env, var)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise KubeRaySettingsError(f'{var} must be a JSON object of strings, e.g. {{"key": "value"}}; got {value!r}')
    return value


def _json_tolerations(env: Mapping[str, str], var: str) -> list[dict[str, Any]] | None:
    value = _json_value(env, var)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise KubeRaySettingsError(
            f'{var} must be a JSON list of tolerations, e.g. [{{"key": "nvidia.com/gpu", "operator": "Exists", '
            f'"effect": "NoSchedule"}}]; got {value!r}'
        )
    for item in value:
        unknown = set(item) - set(_TOLERATION_FIELDS)
        if unknown:
            raise KubeRaySettingsError(
                f"{var}: unknown toleration field(s) {sorted(unknown)} in {item!r}; allowed: {list(_TOLERATION_FIELDS)}"
            )
    return [dict(item) for item in value]


def _pull_secret_names(value: Any) -> list[str]:
    """Accept ``["name"]`` or the chart's ``[{"name": "..."}]``."""
    names: list[str] = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str) and item:
                names.append(item)
            elif isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]:
                names.append(item["name"])
            else:
                break
        else:
            return names
    raise KubeRaySettingsError(
        f'{ENV_IMAGE_PULL_SECRETS} must be a JSON list of names or of {{"name": ...}} objects; got {value!r}'
    )


def _int(env: Mapping[str, str], var: str, minimum: int) -> int | None:
    raw = env.get(var, "").strip()
    if not raw:
        return None
    try:
        number = int(raw)
    except ValueError:
        raise KubeRaySettingsError(f"{var} must be an integer number of seconds, got {raw!r}") from None
    if number < minimum:
        raise KubeRaySettingsError(f"{var} must be >= {minimum}, got {number}")
    return number


# --------------------------------------------------------------------------
# Names and labels
# --------------------------------------------------------------------------

_NOT_DNS = re.compile(r"[^a-z0-9-]")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def rayjob_name(job_id: str) -> str:
    """The RayJob name for ``job_id``: the id itself when KubeRay accepts it.

    KubeRay requires a DNS-1035 label of at most 47 characters (it appends a
    suffix for the RayCluster). Longer or odd ids are shortened to a prefix
    plus a hash of the whole id, so the mapping stays deterministic and unique.
    """
    if len(job_id) <= MAX_RAYJOB_NAME_LENGTH and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job_id):
        return job_id
    cleaned = _NOT_DNS.sub("-", job_id.lower()).strip("-")
    if not cleaned[:1].isalpha():
        cleaned = "r-" + cleaned
    prefix = cleaned[: MAX_RAYJOB_NAME_LENGTH - 9].rstrip("-")
    return f"{prefix}-{_short_hash(job_id)}"


def label_value(value: str) -> str:
    """``value`` if it is a valid label value, else a valid prefix plus a hash of it."""
    if len(value) <= MAX_LABEL_VALUE_LENGTH and _LABEL_VALUE.match(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[: MAX_LABEL_VALUE_LENGTH - 9]
    cleaned = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)
    return f"{cleaned}-{_short_hash(value)}" if cleaned else _short_hash(value)


def rayjob_labels(spec: JobSpec) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_KIND: label_value(spec.owner.kind),
        LABEL_NAME: label_value(spec.owner.name),
        LABEL_JOB_ID: label_value(spec.job_id),
    }


# --------------------------------------------------------------------------
# RayJob builder
# --------------------------------------------------------------------------


def cpu_quantity(cpus: float) -> str:
    """1.0 → "1", 0.5 → "500m" (Kubernetes quantity; rounded up to whole millicores)."""
    if float(cpus).is_integer():
        return str(int(cpus))
    return f"{math.ceil(cpus * 1000 - 1e-9)}m"


def _parse_resources(raw: Mapping[str, Any]) -> Resources:
    try:
        return Resources.model_validate(dict(raw or {}))
    except ValidationError as exc:
        raise ValueError(f"spec.resources is invalid: {exc}") from exc


def _tolerations(settings: KubeRaySettings, resources: Resources, gpus: bool) -> list[dict[str, Any]]:
    """GPU-pool tolerations (when the job wants GPUs) then the resource's own, without duplicates."""
    wanted = [*(settings.gpu_tolerations if gpus else []), *resources_tolerations(resources)]
    result: list[dict[str, Any]] = []
    for item in wanted:
        toleration = {k: item[k] for k in _TOLERATION_FIELDS if item.get(k) is not None}
        if toleration not in result:
            result.append(toleration)
    return result


def resources_tolerations(resources: Resources) -> list[dict[str, Any]]:
    """``spec.resources.tolerations`` in Kubernetes form (the wire names are Kubernetes' names)."""
    return [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in resources.tolerations]


def _security_context(settings: KubeRaySettings) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_env(spec: JobSpec, settings: KubeRaySettings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(job_env(spec).items())]
    if settings.s3_credentials_secret:
        for name, key in (
            ("AWS_ACCESS_KEY_ID", settings.s3_access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", settings.s3_secret_access_key_key),
        ):
            env.append(
                {"name": name, "valueFrom": {"secretKeyRef": {"name": settings.s3_credentials_secret, "key": key}}}
            )
    return env


def job_env(spec: JobSpec) -> dict[str, str]:
    """The job environment as it goes into the RayJob: without credential values."""
    return {k: str(v) for k, v in spec.env.items() if k not in CREDENTIAL_ENV_VARS}


def _shm_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    # Ray's object store lives in /dev/shm; a container's default is 64 MiB.
    return {"name": "dshm", "emptyDir": {"medium": "Memory"}}, {"name": "dshm", "mountPath": "/dev/shm"}


def _pod_template(
    spec: JobSpec,
    settings: KubeRaySettings,
    container: dict[str, Any],
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    volume, mount = _shm_volume()
    container = {
        **container,
        "image": settings.image,
        "env": _container_env(spec, settings),
        "securityContext": _security_context(settings),
        "volumeMounts": [mount],
    }
    pod: dict[str, Any] = {"containers": [container], "volumes": [volume]}
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    if node_selector:
        pod["nodeSelector"] = node_selector
    if tolerations:
        pod["tolerations"] = tolerations
    return {"metadata": {"labels": rayjob_labels(spec)}, "spec": pod}


def build_ray_cluster_spec(spec: JobSpec, settings: KubeRaySettings) -> dict[str, Any]:
    """``spec.rayClusterSpec``: a CPU-less head plus one fixed-size worker group."""
    resources = _parse_resources(spec.resources)
    gpus = math.ceil(resources.gpus) if resources.gpus > 0 else 0
    limits: dict[str, Any] = {"cpu": cpu_quantity(resources.cpus), "memory": resources.memory}
    if gpus:
        limits[GPU_RESOURCE] = gpus
    worker_resources = {"requests": {"cpu": limits["cpu"], "memory": resources.memory}, "limits": limits}
    node_selector = {**(settings.gpu_node_selector if gpus else {}), **resources.node_selector}
    worker_start_params = {"num-gpus": str(gpus)} if gpus else {}
    head = _pod_template(
        spec,
        settings,
        {"name": HEAD_CONTAINER, "resources": copy.deepcopy(settings.head_resources)},
    )
    worker = _pod_template(
        spec,
        settings,
        {"name": WORKER_CONTAINER, "resources": worker_resources},
        node_selector=node_selector,
        tolerations=_tolerations(settings, resources, gpus=bool(gpus)),
    )
    return {
        "rayVersion": settings.ray_version,
        "headGroupSpec": {
            # num-cpus 0: no tasks on the head; it runs the driver and the GCS only.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": head,
        },
        "workerGroupSpecs": [
            {
                "groupName": WORKER_GROUP,
                "replicas": resources.workers,
                "minReplicas": resources.workers,
                "maxReplicas": resources.workers,
                "rayStartParams": worker_start_params,
                "template": worker,
            }
        ],
    }


def build_submitter_template(spec: JobSpec, settings: KubeRaySettings) -> dict[str, Any]:
    """The pod of KubeRay's submitter Job: our image (it has the ``ray`` CLI), small requests.

    KubeRay fills in the ``ray job submit`` command; an explicit template must name the image.
    """
    container = {
        "name": SUBMITTER_CONTAINER,
        "image": settings.image,
        "resources": copy.deepcopy(settings.submitter_resources),
        "securityContext": _security_context(settings),
    }
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    return {"metadata": {"labels": rayjob_labels(spec)}, "spec": pod}


def build_rayjob(spec: JobSpec, settings: KubeRaySettings) -> dict[str, Any]:
    """The ray.io/v1 RayJob that runs ``spec`` (see the module docstring for the two modes)."""
    owner = spec.owner
    env = job_env(spec)
    rayjob_spec: dict[str, Any] = {
        "entrypoint": spec.entrypoint,
        "submissionMode": SUBMISSION_MODE,
        "activeDeadlineSeconds": settings.active_deadline_seconds,
        "backoffLimit": 0,  # a re-run is the operator's decision (new generation → new job id)
    }
    if env:
        rayjob_spec["runtimeEnvYAML"] = yaml.safe_dump({"env_vars": env}, sort_keys=True)
    if spec.metadata:
        rayjob_spec["metadata"] = {k: str(v) for k, v in spec.metadata.items()}
    if settings.cluster_selector:
        # KubeRay rejects shutdownAfterJobFinishes/TTL here: the cluster is not ours to delete.
        rayjob_spec["clusterSelector"] = dict(settings.cluster_selector)
        rayjob_spec["shutdownAfterJobFinishes"] = False
    else:
        rayjob_spec["shutdownAfterJobFinishes"] = True
        rayjob_spec["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
        rayjob_spec["rayClusterSpec"] = build_ray_cluster_spec(spec, settings)
    rayjob_spec["submitterPodTemplate"] = build_submitter_template(spec, settings)
    return {
        "apiVersion": RAYJOB_API_VERSION,
        "kind": RAYJOB_KIND,
        "metadata": {
            "name": rayjob_name(spec.job_id),
            "namespace": owner.namespace,
            "labels": rayjob_labels(spec),
            "ownerReferences": [
                {
                    "apiVersion": owner.api_version,
                    "kind": owner.kind,
                    "name": owner.name,
                    "uid": owner.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": rayjob_spec,
    }


# --------------------------------------------------------------------------
# Status mapping
# --------------------------------------------------------------------------

# RayJob .status.jobStatus (Ray's JobStatus) and .status.jobDeploymentStatus values.
RAY_PENDING, RAY_RUNNING, RAY_STOPPED, RAY_SUCCEEDED, RAY_FAILED = (
    "PENDING",
    "RUNNING",
    "STOPPED",
    "SUCCEEDED",
    "FAILED",
)
DEPLOY_NEW = ""
DEPLOY_INITIALIZING = "Initializing"
DEPLOY_RUNNING = "Running"
DEPLOY_COMPLETE = "Complete"
DEPLOY_FAILED = "Failed"
DEPLOY_VALIDATION_FAILED = "ValidationFailed"
DEPLOY_SUSPENDING = "Suspending"
DEPLOY_SUSPENDED = "Suspended"
DEPLOY_RETRYING = "Retrying"
DEPLOY_WAITING = "Waiting"

KUBERAY_DEADLINE_EXCEEDED = "DeadlineExceeded"
#: Extra words for KubeRay's .status.reason values (JobFailedReason).
_REASON_HINTS = {
    "DeadlineExceeded": "the RayJob ran longer than its activeDeadlineSeconds",
    "SubmissionFailed": "submitting the Ray job failed",
    "JobDeploymentStatusTransitionGracePeriodExceeded": "KubeRay gave up waiting for the job to settle",
    "ValidationFailed": "KubeRay rejected the RayJob spec",
}


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _dashboard_url(status: Mapping[str, Any]) -> str | None:
    url = status.get("dashboardURL")
    if not isinstance(url, str) or not url.strip():
        return None
    url = url.strip()
    return url if "://" in url else f"http://{url}"


def _detail(status: Mapping[str, Any]) -> str:
    """``reason: message`` from the RayJob status (either part may be missing)."""
    reason, message = str(status.get("reason") or ""), str(status.get("message") or "").strip()
    hint = _REASON_HINTS.get(reason, "")
    head = f"{reason} ({hint})" if reason and hint else reason
    return ": ".join(part for part in (head, message) if part)


def _with(text: str, detail: str) -> str:
    return f"{text} — {detail}" if detail else text


def map_rayjob_status(rayjob: Mapping[str, Any], now: datetime, settings: KubeRaySettings) -> JobStatus:
    """Map a RayJob (as read from the API server) onto a :class:`JobStatus`.

    ``jobStatus`` is Ray's own job state; ``jobDeploymentStatus`` is KubeRay's
    view of the whole RayJob (cluster + submitter + job). KubeRay can report
    them in contradiction (e.g. the active deadline fails the deployment while
    the Ray job still says RUNNING), so the first matching row wins:

    ====================================  ================  ===========  ==============================================
    jobDeploymentStatus                   jobStatus         → JobState   message
    ====================================  ================  ===========  ==============================================
    (no status / "" New)                  ""                PENDING      waiting for the KubeRay operator (after
                                                                         initializing_timeout_s: asks whether KubeRay
                                                                         is installed; stays PENDING); STOPPED if
                                                                         metadata.deletionTimestamp is set
    ValidationFailed                      any               FAILED       KubeRay rejected the spec + reason/message
    Retrying                              any               PENDING      a new attempt (fresh cluster) is starting
    Suspending / Suspended                any               PENDING      suspended (e.g. queued by Kueue)
    any (not the above)                   SUCCEEDED         SUCCEEDED    with a Failed deployment: "the Ray job itself
                                                                         succeeded" + KubeRay's reason/message
    any                                   STOPPED           STOPPED      stopped + reason/message
    any                                   FAILED            FAILED       reason/message
    Failed                                RUNNING/PENDING/  FAILED       reason/message, e.g. DeadlineExceeded (the
                                          ""                             Ray job never reported a final state)
    Complete                              RUNNING/PENDING/  FAILED       contradictory: outcome unknown
                                          ""
    (metadata.deletionTimestamp set)      non-terminal      STOPPED      being deleted (stop())
    Initializing                          any (non-final)   PENDING      Ray cluster starting; FAILED once
                                                                         now - (status.startTime or
                                                                         metadata.creationTimestamp) exceeds
                                                                         initializing_timeout_s: the Ray cluster did
                                                                         not start (images, GPU node pool, quotas)
    Running / Waiting                     RUNNING           RUNNING
    Running / Waiting                     PENDING / ""      PENDING      cluster up, job not started yet
    anything else (unknown value)         RUNNING           RUNNING
    anything else (unknown value)         other             PENDING      names the unknown value
    ====================================  ================  ===========  ==============================================

    ``dashboard_url`` is ``.status.dashboardURL`` (``http://`` added when it
    has no scheme); ``progress`` and ``result`` stay ``None`` (KubeRay does
    not expose them on the RayJob).
    """
    status: Mapping[str, Any] = rayjob.get("status") or {}
    metadata: Mapping[str, Any] = rayjob.get("metadata") or {}
    spec: Mapping[str, Any] = rayjob.get("spec") or {}
    deployment = str(status.get("jobDeploymentStatus") or "")
    job = str(status.get("jobStatus") or "")
    detail = _detail(status)
    url = _dashboard_url(status)
    now = now if now.tzinfo else now.replace(tzinfo=UTC)

    def result(state: JobState, message: str, reason: str | None = None) -> JobStatus:
        return JobStatus(state=state, message=message, dashboard_url=url, reason=reason)

    created = _parse_time(metadata.get("creationTimestamp"))
    if deployment == DEPLOY_NEW and job == "":
        if metadata.get("deletionTimestamp"):
            return result(JobState.STOPPED, "RayJob is being deleted before KubeRay started it")
        waited = (now - created).total_seconds() if created else 0.0
        if waited > settings.initializing_timeout_s:
            return result(
                JobState.PENDING,
                f"RayJob not picked up by the KubeRay operator after {waited:.0f}s: is the KubeRay operator "
                "installed and watching this namespace?",
            )
        return result(JobState.PENDING, "RayJob created; waiting for the KubeRay operator")
    if deployment == DEPLOY_VALIDATION_FAILED:
        return result(
            JobState.FAILED, _with("KubeRay rejected the RayJob (ValidationFailed)", str(status.get("message") or ""))
        )
    if str(status.get("reason") or "") == KUBERAY_DEADLINE_EXCEEDED and job != RAY_SUCCEEDED:
        # KubeRay stops the Ray job at the deadline; whatever Ray says then, the cause is the deadline.
        limit = spec.get("activeDeadlineSeconds")
        bound = f"activeDeadlineSeconds ({limit}s)" if limit else "activeDeadlineSeconds"
        state_word = f"the Ray job was {job}" if job else "the Ray job had not started"
        return result(
            JobState.FAILED,
            _with(f"the RayJob ran longer than its {bound} and was stopped ({state_word})", detail),
            Reason.DEADLINE_EXCEEDED.value,
        )
    if deployment == DEPLOY_RETRYING:
        return result(
            JobState.PENDING, _with("the previous attempt failed; KubeRay is retrying with a new Ray cluster", detail)
        )
    if deployment in (DEPLOY_SUSPENDING, DEPLOY_SUSPENDED):
        return result(JobState.PENDING, f"RayJob is {deployment.lower()} (e.g. queued by Kueue)")

    # Ray's job status is final once terminal: trust it over KubeRay's deployment status.
    if job == RAY_SUCCEEDED:
        if deployment == DEPLOY_FAILED:
            return result(
                JobState.SUCCEEDED,
                _with("the Ray job itself succeeded, but KubeRay marked the RayJob deployment Failed", detail),
            )
        return result(JobState.SUCCEEDED, _with("Ray job succeeded", str(status.get("message") or "")))
    if job == RAY_STOPPED:
        return result(JobState.STOPPED, _with("Ray job was stopped", detail))
    if job == RAY_FAILED:
        return result(JobState.FAILED, _with("Ray job failed", detail))
    if deployment == DEPLOY_FAILED:
        state_word = f"the Ray job was still {job}" if job else "the Ray job never started"
        return result(JobState.FAILED, _with(f"KubeRay marked the RayJob Failed ({state_word})", detail))
    if deployment == DEPLOY_COMPLETE:
        return result(
            JobState.FAILED,
            _with(
                f"KubeRay marked the RayJob Complete but the Ray job status is {job or 'empty'}: outcome unknown",
                detail,
            ),
        )
    if metadata.get("deletionTimestamp"):
        return result(JobState.STOPPED, "RayJob is being deleted (the Ray job is being stopped)")
    if deployment == DEPLOY_INITIALIZING:
        started = _parse_time(status.get("startTime")) or created
        waited = (now - started).total_seconds() if started else 0.0
        if waited > settings.initializing_timeout_s:
            return result(JobState.FAILED, _initializing_timeout_message(spec, status, waited, settings))
        return result(JobState.PENDING, "Ray cluster is starting")
    if job == RAY_RUNNING:
        return result(JobState.RUNNING, _with("Ray job is running", str(status.get("message") or "")))
    if deployment in (DEPLOY_RUNNING, DEPLOY_WAITING):
        return result(JobState.PENDING, "Ray cluster is up; the Ray job has not started yet")
    return result(JobState.PENDING, f"unknown RayJob state (jobDeploymentStatus={deployment!r}, jobStatus={job!r})")


def _initializing_timeout_message(
    spec: Mapping[str, Any], status: Mapping[str, Any], waited: float, settings: KubeRaySettings
) -> str:
    selector = spec.get("clusterSelector") or {}
    if selector:
        where = (
            f"the RayCluster {selector.get(CLUSTER_SELECTOR_NAME_KEY, '?')!r} selected by clusterSelector was not "
            "found or is not ready"
        )
    else:
        cluster = status.get("rayClusterName")
        where = (
            "check that the Ray image can be pulled, the GPU node pool has capacity and resource quotas allow "
            f"the pods{f' (RayCluster {cluster})' if cluster else ''}"
        )
    return (
        f"the Ray cluster did not start: RayJob stuck in Initializing for {waited:.0f}s "
        f"(limit {settings.initializing_timeout_s}s); {where}"
    )


# --------------------------------------------------------------------------
# Pods the scheduler cannot place
# --------------------------------------------------------------------------

#: The Ray cluster's pods carry this label (KubeRay's utils.RayClusterLabelKey).
RAY_CLUSTER_LABEL = "ray.io/cluster"
POD_SCHEDULED = "PodScheduled"
UNSCHEDULABLE = "Unschedulable"


@dataclass(frozen=True)
class Unschedulable:
    """A Ray pod the scheduler has not placed, since when, and what it said."""

    pod: str
    since: datetime | None
    message: str
    gpus: int
    #: resource name -> requested quantity (summed over the pod's containers; limits count
    #: for extended resources such as GPUs, which have no separate request)
    requests: dict[str, str] = field(default_factory=dict)


def unschedulable_pods(pods: list[Mapping[str, Any]]) -> list[Unschedulable]:
    """The pending pods whose PodScheduled condition is False with reason Unschedulable."""
    found = []
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Pending":
            continue
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if condition.get("type") == POD_SCHEDULED and condition.get("status") == "False" \
                    and condition.get("reason") == UNSCHEDULABLE:  # fmt: skip
                containers = (pod.get("spec") or {}).get("containers") or []
                gpus = sum(int(str((c.get("resources") or {}).get("limits", {}).get(GPU_RESOURCE, 0)) or 0)
                           for c in containers)  # fmt: skip
                found.append(Unschedulable(
                    pod=str((pod.get("metadata") or {}).get("name")),
                    since=_parse_time(condition.get("lastTransitionTime")),
                    message=str(condition.get("message") or "").strip(),
                    gpus=gpus,
                    requests=_pod_requests(containers),
                ))  # fmt: skip
    return found


def _pod_requests(containers: list[Mapping[str, Any]]) -> dict[str, str]:
    total: dict[str, float] = {}
    for container in containers:
        resources = container.get("resources") or {}
        wanted = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        for name, quantity in wanted.items():
            total[name] = total.get(name, 0.0) + quantity_value(str(quantity))
    return {name: f"{value:g}" for name, value in total.items()}


def quantity_value(quantity: str) -> float:
    """A Kubernetes quantity as a number (cores, bytes, devices): "500m" -> 0.5, "4Gi" -> 4 * 2**30."""
    from rasterkube.api.common import quantity_bytes

    if quantity.endswith("m") and quantity[:-1].replace(".", "", 1).isdigit():
        return float(quantity[:-1]) / 1000
    try:
        return float(quantity)
    except ValueError:
        return float(quantity_bytes(quantity))


def never_fits(problem: Unschedulable, nodes: list[Mapping[str, Any]]) -> list[str]:
    """The requested resources of ``problem`` that no node has as much of (allocatable), even empty.

    Empty: the pod waits for capacity that exists (other pods hold it); it may still come."""
    missing = []
    for name, wanted in problem.requests.items():
        largest = max((quantity_value(str(((n.get("status") or {}).get("allocatable") or {}).get(name, "0")))
                       for n in nodes), default=0.0)  # fmt: skip
        if float(wanted) > largest:
            missing.append(f"{name} (asks {wanted}, the largest node has {largest:g})")
    return missing


def unschedulable_status(problems: list[Unschedulable], now: datetime, settings: KubeRaySettings,
                         url: str | None = None, nodes: list[Mapping[str, Any]] | None = None) -> JobStatus:  # fmt: skip
    """PENDING (reason Unschedulable) naming what cannot be placed.

    FAILED after ``settings.unschedulable_timeout_s`` only when no node could ever take the
    pod (``nodes`` known and too small, e.g. no GPUs at all); a pod that waits for capacity
    other pods hold keeps waiting (the initializing bound still applies)."""
    permanent = {p.pod: never_fits(p, nodes) for p in problems} if nodes is not None else {}
    first = min(problems, key=lambda p: (not permanent.get(p.pod), p.since or now))
    waited = (now - first.since).total_seconds() if first.since else 0.0
    what = f"Ray pod {first.pod} cannot be scheduled"
    if first.gpus:
        what += (
            f": it asks for {first.gpus} {GPU_RESOURCE} (spec.resources.gpus)"
            + (f" on the GPU node pool {settings.gpu_node_selector}" if settings.gpu_node_selector else "")
        )
    if permanent.get(first.pod):
        what += f"; no node has enough {', '.join(permanent[first.pod])}"
    message = f"{what} — scheduler: {first.message}" if first.message else what
    if not permanent.get(first.pod):
        return JobStatus(state=JobState.PENDING, message=f"{message} (waiting {waited:.0f}s for capacity)",
                         dashboard_url=url, reason=Reason.UNSCHEDULABLE.value)  # fmt: skip
    if waited > settings.unschedulable_timeout_s:
        return JobStatus(
            state=JobState.FAILED, dashboard_url=url, reason=Reason.UNSCHEDULABLE.value,
            message=f"{message}; gave up after {waited:.0f}s (limit {settings.unschedulable_timeout_s}s). "
            "Add nodes that fit, or lower spec.resources",
        )  # fmt: skip
    return JobStatus(state=JobState.PENDING, message=f"{message} (waiting {waited:.0f}s of "
                     f"{settings.unschedulable_timeout_s}s)", dashboard_url=url, reason=Reason.UNSCHEDULABLE.value)  # fmt: skip
