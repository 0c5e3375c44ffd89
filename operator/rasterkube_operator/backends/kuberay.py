"""The ``kuberay`` backend: one KubeRay ``RayJob`` (ray.io/v1) per rasterkube job.

The manifest and the status mapping are pure functions in
:mod:`rasterkube_operator.backends.kuberay_manifests`; this class only talks
to the API server (``CustomObjectsApi``):

* ``submit`` creates the RayJob (an existing one with the same name — same job
  id — is the same job: idempotent, so an operator restart never duplicates work);
* ``status`` reads it back and maps ``.status``; a missing RayJob is ``MISSING``;
* ``stop`` deletes it with ``propagationPolicy=Background``. KubeRay's finalizer
  stops the Ray job; owner references then remove the RayCluster and the
  submitter Job. A RayJob already gone is fine.

* progress and the job's result payload come from the job's log on the Ray dashboard of
  its cluster (the Jobs REST API at ``status.dashboardURL``, the job ``status.jobId``), the
  same lines the ``ray`` backend reads. KubeRay does not copy them onto the RayJob, and the
  dashboard is a cluster-internal address: only read when the operator runs in a pod
  (``settings.read_dashboard``); a dashboard that does not answer leaves them unset.
* a RayJob still starting whose pods the scheduler cannot place (GPUs no node has, too
  much memory...) is reported as such (reason ``Unschedulable``, the scheduler's message, the
  GPU request named) and fails after ``settings.unschedulable_timeout_s``; its RayJob is then
  deleted so that it holds nothing.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from rasterkube.runtime.progress import last_progress

from rasterkube_operator.backends.base import BackendName, JobSpec, JobState, JobStatus, Owner
from rasterkube_operator.backends.kuberay_manifests import (
    RAY_CLUSTER_LABEL,
    RAY_GROUP,
    RAY_VERSION_API,
    RAYJOB_PLURAL,
    KubeRaySettings,
    build_rayjob,
    map_rayjob_status,
    rayjob_name,
    unschedulable_pods,
    unschedulable_status,
)

log = logging.getLogger(__name__)

HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409
HTTP_FORBIDDEN = 403
#: Per API call; a hung connection must not stall the operator's reconcile loop.
DEFAULT_REQUEST_TIMEOUT_S = 30.0
#: Per call to a Ray dashboard (a cluster that is going away must not stall reconciles).
DASHBOARD_TIMEOUT_S = 5.0
#: Labels of the submitter Job's pod (Kubernetes sets it on every pod of a Job).
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
ERROR_TAIL_LINES = 3
ERROR_TAIL_CHARS = 600


class KubeRayError(RuntimeError):
    """The API server refused a RayJob operation; the message says which and why."""


class KubeRayBackend:
    """Runs jobs as KubeRay RayJobs through the Kubernetes API (see the module docstring)."""

    name = BackendName.KUBERAY

    def __init__(
        self,
        api_client: client.ApiClient,
        settings: KubeRaySettings | None = None,
        *,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self.settings = settings or KubeRaySettings()
        self._api = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._timeout = request_timeout_s

    # -- Backend protocol ---------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        """Create the RayJob for ``spec``; returns its dashboard URL once KubeRay has set one, else ''."""
        body = build_rayjob(spec, self.settings)
        namespace, name = spec.owner.namespace, body["metadata"]["name"]
        for _ in range(2):  # a second round only if the existing RayJob vanished in between
            try:
                self._api.create_namespaced_custom_object(
                    RAY_GROUP, RAY_VERSION_API, namespace, RAYJOB_PLURAL, body, _request_timeout=self._timeout
                )
                return ""
            except ApiException as exc:
                if exc.status != HTTP_CONFLICT:
                    raise self._error("creating", namespace, name, exc) from exc
            # Already there: the same job id, i.e. the same job (an earlier submit or another replica).
            existing = self._get(namespace, name)
            if existing is None:
                continue
            if (existing.get("metadata") or {}).get("deletionTimestamp"):
                raise KubeRayError(
                    f"RayJob {namespace}/{name} for job {spec.job_id} is still being deleted; "
                    "submit again once it is gone"
                )
            return map_rayjob_status(existing, datetime.now(UTC), self.settings).dashboard_url or ""
        raise KubeRayError(f"RayJob {namespace}/{name} kept appearing and disappearing while submitting; retry")

    def status(self, job_id: str, owner: Owner) -> JobStatus:
        name = rayjob_name(job_id)
        rayjob = self._get(owner.namespace, name)
        if rayjob is None:
            return JobStatus(state=JobState.MISSING, message=f"RayJob {owner.namespace}/{name} does not exist")
        now = datetime.now(UTC)
        mapped = map_rayjob_status(rayjob, now, self.settings)
        observed: dict[str, Any] = rayjob.get("status") or {}
        if mapped.state == JobState.PENDING:
            problems = unschedulable_pods(self._pods(owner.namespace, name, observed.get("rayClusterName")))
            if problems:
                verdict = unschedulable_status(problems, now, self.settings, mapped.dashboard_url, self._nodes())
                if verdict.state == JobState.FAILED:
                    self.stop(job_id, owner)  # it would hold its requests (and a quota) forever
                return verdict
        if self.settings.read_dashboard and mapped.dashboard_url and observed.get("jobId"):
            return self._with_job_log(mapped, str(observed["jobId"]))
        return mapped

    def stop(self, job_id: str, owner: Owner) -> None:
        name = rayjob_name(job_id)
        try:
            self._api.delete_namespaced_custom_object(
                RAY_GROUP,
                RAY_VERSION_API,
                owner.namespace,
                RAYJOB_PLURAL,
                name,
                propagation_policy="Background",
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status != HTTP_NOT_FOUND:
                raise self._error("deleting", owner.namespace, name, exc) from exc

    # -- helpers ------------------------------------------------------------

    def _pods(self, namespace: str, rayjob: str, cluster: str | None) -> list[dict[str, Any]]:
        """The Ray cluster's pods and the submitter's (as plain dicts, like the API's JSON)."""
        selectors = [f"{JOB_NAME_LABEL}={rayjob}"] + ([f"{RAY_CLUSTER_LABEL}={cluster}"] if cluster else [])
        pods: list[dict[str, Any]] = []
        for selector in selectors:
            try:
                listed = self._core.list_namespaced_pod(namespace, label_selector=selector,
                                                        _request_timeout=self._timeout)  # fmt: skip
            except ApiException as exc:
                if exc.status == HTTP_FORBIDDEN:
                    raise KubeRayError(f"listing pods in {namespace} failed: HTTP 403 (the operator's RBAC must "
                                       "allow get/list on pods to diagnose Ray pods that cannot start)") from exc  # fmt: skip
                raise
            pods += [self._core.api_client.sanitize_for_serialization(pod) for pod in listed.items]
        return pods

    def _nodes(self) -> list[dict[str, Any]] | None:
        """The nodes (for their allocatable resources), or None when the operator may not list them."""
        try:
            listed = self._core.list_node(_request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == HTTP_FORBIDDEN:
                log.warning("cannot list nodes (RBAC): unschedulable Ray pods are reported but never given up on")
                return None
            raise
        return [self._core.api_client.sanitize_for_serialization(n) for n in listed.items]

    def _with_job_log(self, mapped: JobStatus, ray_job_id: str) -> JobStatus:
        """``mapped`` plus progress/result (and a failed job's error) from the Ray job's log."""
        logs = self._job_log(mapped.dashboard_url or "", ray_job_id)
        if logs is None:
            return mapped
        progress, result = last_progress(logs)
        message = mapped.message
        if mapped.state == JobState.FAILED and not (result or {}).get("error"):
            lines = [line for line in logs.splitlines() if line.strip()]
            errors = [line.removeprefix("error: ") for line in lines if line.startswith("error:")]
            tail = errors[-1] if errors else "\n".join(lines[-ERROR_TAIL_LINES:])[-ERROR_TAIL_CHARS:]
            message = f"{message}: {tail}" if tail else message
        return JobStatus(state=mapped.state, message=message, progress=progress or mapped.progress,
                         result=result or mapped.result, dashboard_url=mapped.dashboard_url, reason=mapped.reason)  # fmt: skip

    @staticmethod
    def _job_log(dashboard_url: str, ray_job_id: str) -> str | None:
        """The job's log from the Ray Jobs REST API, or None when the dashboard does not answer."""
        url = f"{dashboard_url.rstrip('/')}/api/jobs/{urllib.parse.quote(ray_job_id)}/logs"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=DASHBOARD_TIMEOUT_S) as response:
                return str(json.loads(response.read().decode()).get("logs") or "")
        except (OSError, ValueError, urllib.error.URLError) as exc:
            log.debug("no job log from %s: %s", url, exc)
            return None

    def _get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            rayjob: dict[str, Any] = self._api.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION_API, namespace, RAYJOB_PLURAL, name, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == HTTP_NOT_FOUND:
                return None
            raise self._error("reading", namespace, name, exc) from exc
        return rayjob

    @staticmethod
    def _error(action: str, namespace: str, name: str, exc: ApiException) -> KubeRayError:
        hint = ""
        if exc.status == HTTP_NOT_FOUND:
            hint = " (does the namespace exist, and are the KubeRay CRDs (ray.io/v1 RayJob) installed?)"
        elif exc.status == HTTP_FORBIDDEN:
            hint = " (the operator's RBAC must allow rayjobs in the ray.io group)"
        return KubeRayError(
            f"{action} RayJob {namespace}/{name} failed: HTTP {exc.status} {exc.reason}{hint}: {exc.body}"
        )
