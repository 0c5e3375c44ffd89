"""kopf wiring shared by the per-kind handler modules.

Level-triggered: every watch event and a periodic timer call the same reconcile; a lock per
object serialises them, and the object is re-read before acting so a stale event body never
drives a decision.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import kopf

from rasterkube.constants import GROUP, TERMINAL_PHASES, VERSION, Kind
from rasterkube_operator import reconcile

log = logging.getLogger(__name__)
DEFAULT_POLL_INTERVAL_S = 2.0

_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


def _settled(body: dict[str, Any]) -> bool:
    status = body.get("status") or {}
    return status.get("observedGeneration") == body["metadata"].get("generation") and status.get("phase") in TERMINAL_PHASES


def run_once(kind: Kind, body: dict[str, Any], deps: reconcile.Deps) -> None:
    if _settled(body):
        return
    meta = body["metadata"]
    with _locks[meta["uid"]]:
        fresh = deps.kube.get(kind, meta.get("namespace", "default"), meta["name"])
        if fresh is None or fresh["metadata"].get("deletionTimestamp"):
            return
        try:
            reconcile.apply(fresh, reconcile.reconcile(fresh, deps), deps)
        except Exception:  # noqa: BLE001 — a fault (API, Ray down): log, count, retry on the next tick
            log.exception("%s %s/%s: reconcile failed; retrying", kind.value, meta.get("namespace"), meta["name"])
            error = getattr(deps.metrics, "error", None)
            if error:
                error(kind)


def register(kind: Kind, registry: kopf.OperatorRegistry, deps: Callable[[], reconcile.Deps],
             poll_interval_s: float = DEFAULT_POLL_INTERVAL_S) -> None:  # fmt: skip
    """Install the event, timer and delete handlers of ``kind`` into ``registry``."""

    @kopf.on.event(GROUP, VERSION, kind.plural, registry=registry, id=f"{kind.singular}-event")
    def on_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
        if event.get("type") != "DELETED":
            run_once(kind, dict(body), deps())

    @kopf.timer(GROUP, VERSION, kind.plural, registry=registry, interval=poll_interval_s, sharp=False,
                id=f"{kind.singular}-poll")  # fmt: skip
    def poll(body: kopf.Body, **_: Any) -> None:
        run_once(kind, dict(body), deps())

    @kopf.on.delete(GROUP, VERSION, kind.plural, registry=registry, id=f"{kind.singular}-delete")
    def on_delete(body: kopf.Body, **_: Any) -> None:
        reconcile.on_delete(dict(body), deps())
