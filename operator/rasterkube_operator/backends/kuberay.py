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

Progress and the job's result payload are not read in this version: KubeRay
does not copy them onto the RayJob, and the per-job cluster (with its
dashboard and logs) is deleted ``ttlSecondsAfterFinished`` after the job ends.
A later version will read progress from the Ray dashboard's Jobs API
(``status.dashboardURL``) while the job runs; ``JobStatus.progress`` and
``JobStatus.result`` are ``None`` until then.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from rasterkube_operator.backends.base import BackendName, JobSpec, JobState, JobStatus, Owner
from rasterkube_operator.backends.kuberay_manifests import (
    RAY_GROUP,
    RAY_VERSION_API,
    RAYJOB_PLURAL,
    KubeRaySettings,
    build_rayjob,
    map_rayjob_status,
    rayjob_name,
)

HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409
HTTP_FORBIDDEN = 403
#: Per API call; a hung connection must not stall the operator's reconcile loop.
DEFAULT_REQUEST_TIMEOUT_S = 30.0


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
        return map_rayjob_status(rayjob, datetime.now(UTC), self.settings)

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
