"""Following a resource through its RayJob and Ray pods on the node (shared by the node tests)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from rasterkube_operator.backends.kuberay_manifests import LABEL_NAME, RAY_CLUSTER_LABEL, rayjob_name

from conftest import Cluster

TERMINAL = ("Succeeded", "Failed")
NODE_TYPE_LABEL = "ray.io/node-type"


@dataclass
class Trace:
    """What happened to one resource, in seconds since it was applied."""

    kind: str
    name: str
    applied: float = field(default_factory=time.monotonic)
    rayjob: float | None = None
    head_running: float | None = None
    workers_running: float | None = None
    done: float | None = None
    phase: str | None = None
    obj: dict[str, Any] = field(default_factory=dict)
    rayjobs_seen: set[str] = field(default_factory=set)

    def seconds(self) -> dict[str, float | None]:
        def since(t: float | None) -> float | None:
            return None if t is None else round(t - self.applied, 1)

        return {"rayjob": since(self.rayjob), "ray_pods_running": since(self.workers_running),
                "head_running": since(self.head_running), "done": since(self.done)}  # fmt: skip


def ray_pods(cluster: Cluster, rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    name = (rayjob.get("status") or {}).get("rayClusterName")
    return cluster.items("pods", rayjob["metadata"]["namespace"], f"{RAY_CLUSTER_LABEL}={name}") if name else []


def current_rayjob(cluster: Cluster, obj: dict[str, Any]) -> dict[str, Any] | None:
    job_id = ((obj.get("status") or {}).get("job") or {}).get("id")
    return cluster.get("rayjob", rayjob_name(job_id), obj["metadata"]["namespace"]) if job_id else None


def observe(cluster: Cluster, trace: Trace, namespace: str = "default") -> None:
    """One look at the resource, its RayJob and the Ray pods; updates ``trace``."""
    obj = cluster.get(trace.kind, trace.name, namespace)
    if obj is None:
        return
    trace.obj = obj
    now = time.monotonic()
    rayjob = current_rayjob(cluster, obj)
    if rayjob is not None:
        trace.rayjobs_seen.add(rayjob["metadata"]["name"])
        trace.rayjob = trace.rayjob or now
        pods = ray_pods(cluster, rayjob)
        running = {p["metadata"]["labels"].get(NODE_TYPE_LABEL) for p in pods if p["status"].get("phase") == "Running"}
        if "head" in running and trace.head_running is None:
            trace.head_running = now
        if {"head", "worker"} <= running and trace.workers_running is None:
            trace.workers_running = now
    phase = (obj.get("status") or {}).get("phase")
    generation = obj["metadata"].get("generation")
    if phase in TERMINAL and (obj.get("status") or {}).get("observedGeneration") == generation:
        trace.phase = phase
        trace.done = trace.done or now


def follow(cluster: Cluster, traces: list[Trace], timeout_s: float, namespace: str = "default",
           on_pods: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None) -> list[Trace]:  # fmt: skip
    """Observe every ``trace`` until all are terminal (fails with their states after ``timeout_s``).

    ``on_pods(rayjob, pods)`` is called for every look at a running job's Ray pods."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for trace in traces:
            if trace.done is None:
                observe(cluster, trace, namespace)
                if on_pods is not None and trace.obj and (rayjob := current_rayjob(cluster, trace.obj)):
                    pods = ray_pods(cluster, rayjob)
                    if pods:
                        on_pods(rayjob, pods)
        if all(t.done is not None for t in traces):
            return traces
        time.sleep(2)
    states = {f"{t.kind}/{t.name}": (t.obj.get("status") or {}) for t in traces if t.done is None}
    raise AssertionError(f"not finished after {timeout_s:.0f}s: {json.dumps(states)[:4000]}\n"
                         f"--- operator log ---\n{cluster.operator_logs()[-3000:]}")  # fmt: skip


def rayjobs_of(cluster: Cluster, name: str, namespace: str = "default") -> list[dict[str, Any]]:
    return cluster.items("rayjobs", namespace, f"{LABEL_NAME}={name}")
