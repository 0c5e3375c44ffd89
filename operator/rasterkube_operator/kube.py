"""The Kubernetes side of the reconciler, through the official client."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from rasterkube.constants import GROUP, VERSION, Kind

log = logging.getLogger(__name__)
COMPONENT = "rasterkube-operator"
REQUEST_TIMEOUT_S = 30


def api_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class KubeClient:
    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or api_client()
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
                GROUP, VERSION, namespace, kind.plural, name, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_status(self, kind: Kind, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, kind.plural, name, {"status": status}, _request_timeout=REQUEST_TIMEOUT_S
        )

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        now = datetime.now(UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta.get("namespace", "default")),
            involved_object=client.V1ObjectReference(
                api_version=obj.get("apiVersion"), kind=obj.get("kind"), name=meta["name"],
                namespace=meta.get("namespace", "default"), uid=meta.get("uid"),
            ),  # fmt: skip
            reason=reason,
            message=message,
            type=type_,
            source=client.V1EventSource(component=COMPONENT),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self.core.create_namespaced_event(meta.get("namespace", "default"), body, _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:  # events are best effort; never fail a reconcile on them
            log.warning("could not post event %s for %s: %s", reason, meta["name"], exc.reason)
