"""Cluster mode: custom resources through the Kubernetes API; the operator does the rest."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Protocol

from rasterkube.constants import GROUP, VERSION, ConditionType, Kind, Phase, Reason
from rasterkube.errors import ResourceFailed, ResourceNotFound, UserError, WaitTimeout

REQUEST_TIMEOUT_S = 30
#: ``(percent, message, reason)``: reason set while the job is held up (e.g. Unschedulable).
ProgressFn = Callable[[int, str, str | None], None]


class CustomObjects(Protocol):
    """The part of ``kubernetes.client.CustomObjectsApi`` the client uses (swappable in tests)."""

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                        body: dict[str, Any], **kw: Any) -> Any: ...  # fmt: skip

    def replace_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                         body: dict[str, Any], **kw: Any) -> Any: ...  # fmt: skip

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                     **kw: Any) -> Any: ...  # fmt: skip

    def delete_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                        **kw: Any) -> Any: ...  # fmt: skip

    def list_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                      **kw: Any) -> Any: ...  # fmt: skip


def custom_objects_api(kubeconfig: str | None = None, context: str | None = None) -> CustomObjects:
    """A CustomObjectsApi for ``kubeconfig`` (default: KUBECONFIG or ~/.kube/config), or the
    in-cluster service account when there is no kubeconfig (a notebook running in a pod)."""
    from kubernetes import client, config

    try:
        api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, FileNotFoundError, TypeError) as exc:
        if kubeconfig is not None:
            raise UserError(f"kubeconfig: cannot load {kubeconfig} ({exc}); check the path and the context") from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise UserError(
                "kubeconfig: no Kubernetes configuration found (KUBECONFIG, ~/.kube/config or in-cluster); pass "
                "Client(kubeconfig=...), `source .rasterkube-dev/env.sh` after `rasterkube dev up`, or use "
                "Client(local=True) to run without a cluster"
            ) from None
        api_client = client.ApiClient()
    return client.CustomObjectsApi(api_client)  # type: ignore[return-value]


def _api_message(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(exc, "reason", exc))


class ClusterBackend:
    def __init__(self, namespace: str, api: CustomObjects | None = None, kubeconfig: str | None = None,
                 context: str | None = None, poll_interval_s: float = 1.0) -> None:  # fmt: skip
        self.namespace = namespace
        self.api = api if api is not None else custom_objects_api(kubeconfig, context)
        self.poll_interval_s = poll_interval_s

    def _call(self, label: str, fn: Callable[[], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn()
        except ApiException as exc:
            message = _api_message(exc)
            if exc.status == 404 and "the server could not find the requested resource" in message:
                raise UserError(
                    f"{label}: the rasterkube CRDs are not installed in this cluster; install the chart "
                    "(helm install rasterkube charts/rasterkube) or start the dev stack (rasterkube dev up)"
                ) from None
            if exc.status == 422:
                raise UserError(f"{label}: the API server rejected it: {message}") from None
            if exc.status in (401, 403):
                raise UserError(f"{label}: not allowed ({exc.status}): {message}; check your credentials and RBAC") from None
            raise
        except HTTPError as exc:
            raise UserError(f"{label}: cannot reach the Kubernetes API server ({type(exc).__name__}: {exc})") from None

    # ------------------------------------------------------------------ objects
    def get(self, kind: Kind, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call(f"{kind.value}/{name}", lambda: self.api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, kind.plural, name, _request_timeout=REQUEST_TIMEOUT_S))  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def exists(self, kind: Kind, name: str) -> bool:
        return self.get(kind, name) is not None

    def list(self, kind: Kind, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every ``kind`` resource of ``namespace`` (default: this backend's)."""
        ns = namespace or self.namespace
        found = self._call(f"{kind.value} in namespace {ns}", lambda: self.api.list_namespaced_custom_object(
            GROUP, VERSION, ns, kind.plural, _request_timeout=REQUEST_TIMEOUT_S))  # fmt: skip
        return list((found or {}).get("items") or [])

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the resource, or replace its spec if one of that name exists (a changed spec
        is a new generation: the operator runs it again; an unchanged one keeps its result)."""
        from kubernetes.client.exceptions import ApiException

        kind = Kind(manifest["kind"])
        name = manifest["metadata"]["name"]
        label = f"{kind.value}/{name}"
        try:
            return self._call(label, lambda: self.api.create_namespaced_custom_object(  # type: ignore[no-any-return]
                GROUP, VERSION, self.namespace, kind.plural, manifest, _request_timeout=REQUEST_TIMEOUT_S))  # fmt: skip
        except ApiException as exc:
            if exc.status != 409:
                raise
        for _ in range(5):  # replace; retry when someone else wrote in between
            existing = self.get(kind, name)
            if existing is None:
                return self.apply(manifest)
            meta = existing["metadata"]
            body = {
                **manifest,
                "metadata": {
                    **manifest["metadata"],
                    "resourceVersion": meta["resourceVersion"],
                    "labels": {**(meta.get("labels") or {}), **(manifest["metadata"].get("labels") or {})},
                },
            }
            try:
                return self._call(label, lambda body=body: self.api.replace_namespaced_custom_object(  # type: ignore[no-any-return]
                    GROUP, VERSION, self.namespace, kind.plural, name, body, _request_timeout=REQUEST_TIMEOUT_S))  # fmt: skip
            except ApiException as exc:
                if exc.status != 409:
                    raise
        raise UserError(f"{label}: could not replace it: it keeps changing; try again")

    def delete(self, kind: Kind, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self._call(f"{kind.value}/{name}", lambda: self.api.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, kind.plural, name, _request_timeout=REQUEST_TIMEOUT_S))  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # ------------------------------------------------------------------ waiting
    def wait(self, kind: Kind, name: str, timeout: float | None, on_progress: ProgressFn,
             generation: int | None = None) -> dict[str, Any]:  # fmt: skip
        """Poll the status until this generation succeeded; raise when it failed or stalled."""
        label = f"{kind.value}/{name}"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            obj = self.get(kind, name)
            if obj is None:
                raise ResourceNotFound(f"{label}: not found in namespace {self.namespace!r} (deleted?)")
            status = obj.get("status") or {}
            gen = generation or (obj.get("metadata") or {}).get("generation")
            current = gen is None or (status.get("observedGeneration") or 0) >= gen
            phase = status.get("phase") if current else None
            progress = status.get("progress") or {}
            if not current:
                on_progress(0, "waiting for the operator to pick it up", None)
            elif phase == Phase.SUCCEEDED:
                on_progress(100, str(progress.get("message") or "succeeded"), None)
                return obj
            elif phase == Phase.FAILED or _condition_true(status, ConditionType.STALLED):
                raise ResourceFailed(kind.value, name, _failure_message(status), status)
            else:
                message = str(progress.get("message") or "")
                shown = message if phase == Phase.RUNNING else f"{phase or Phase.PENDING}: {message}".rstrip(": ")
                on_progress(int(progress.get("percent") or 0), shown, _held_up(status))
                if phase == Phase.WAITING:
                    self._raise_if_source_failed(obj)
            if deadline is not None and time.monotonic() >= deadline:
                where = f"phase {phase}, {progress.get('percent', 0)}%: {progress.get('message', '')}" if current else "not picked up by the operator"
                raise WaitTimeout(
                    f"{label}: not finished after {timeout:g}s ({where}); it keeps running: wait again with "
                    "client.wait(result), or check `kubectl describe` and the operator's logs"
                )
            time.sleep(self.poll_interval_s)

    def _raise_if_source_failed(self, obj: dict[str, Any]) -> None:
        """A resource waits for its ref forever when the ref failed; the client says so instead."""
        from rasterkube.api.common import REF_KINDS, SourceField

        source = (obj.get("spec") or {}).get("source") or {}
        for field, kind in REF_KINDS.items():
            ref = source.get(SourceField(field).value)
            if not ref:
                continue
            target = self.get(kind, ref.get("name", ""))
            status = (target or {}).get("status") or {}
            gen = ((target or {}).get("metadata") or {}).get("generation")
            if status.get("phase") == Phase.FAILED and (gen is None or (status.get("observedGeneration") or 0) >= gen):
                raise ResourceFailed(
                    obj["kind"], obj["metadata"]["name"],
                    f"its source {kind.value}/{ref['name']} failed: {_failure_message(status)}", obj.get("status") or {},
                )  # fmt: skip


def _held_up(status: dict[str, Any]) -> str | None:
    """The reason a running resource is held up (Unschedulable: its pods or Ray tasks cannot be
    placed), from its Reconciling condition; None while it simply works."""
    for c in status.get("conditions") or []:
        if c.get("type") == ConditionType.RECONCILING.value and c.get("reason") == Reason.UNSCHEDULABLE.value:
            return Reason.UNSCHEDULABLE.value
    return None


def _condition_true(status: dict[str, Any], ctype: ConditionType) -> bool:
    return any(c.get("type") == ctype.value and c.get("status") == "True" for c in status.get("conditions") or [])


def _failure_message(status: dict[str, Any]) -> str:
    for c in status.get("conditions") or []:
        if c.get("type") == ConditionType.STALLED.value and c.get("message"):
            return str(c["message"])
    return str((status.get("progress") or {}).get("message") or "no message in status; see `kubectl describe`")
