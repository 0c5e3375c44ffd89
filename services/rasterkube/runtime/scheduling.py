"""Why Ray does not run a job's tasks: never wait silently (issue 16, point 5).

A task whose resource demand (CPUs, GPUs, memory) no alive node of the cluster has in total
waits forever unless a node that has it joins (an autoscaler, workers that failed to join);
one whose demand every node has in total but none has free waits for other work to end.
Either way the job must say what it waits for, and fail with that reason after the bound the
user set (``spec.resources.schedulingTimeoutSeconds``).

The functions that decide are pure, over :class:`ClusterSnapshot` values (unit-tested with
made-up clusters); :func:`snapshot` reads one from the GCS — the autoscaler's view of every
node's total and free resources and of the resource shapes waiting for placement — which
needs no dashboard (the embedded Ray has none).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from rasterkube.constants import DEFAULT_SCHEDULING_TIMEOUT_S
from rasterkube.errors import SchedulingTimeout

log = logging.getLogger(__name__)

# Ray's resource names.
CPU: Final = "CPU"
GPU: Final = "GPU"
MEMORY: Final = "memory"
#: The order resources are named in messages; others (custom resources) follow by name.
SHOWN_ORDER: Final = (CPU, GPU, MEMORY)
#: Ray compares resources in fixed point with 4 decimals.
EPSILON: Final = 1e-4
#: Nodes named in a message; a larger cluster is summarised ("and N more").
MAX_NODES_SHOWN: Final = 4

WAITING_PREFIX: Final = "waiting for resources"
TIMEOUT_FIELD: Final = "spec.resources.schedulingTimeoutSeconds"

Demand = Mapping[str, float]


@dataclass(frozen=True)
class NodeResources:
    """One alive Ray node: its name (IP address) and resources, total and free now."""

    name: str
    total: Mapping[str, float]
    available: Mapping[str, float]


@dataclass(frozen=True)
class ClusterSnapshot:
    """The alive nodes and the resource shapes Ray has not placed yet (all jobs'), with counts."""

    nodes: tuple[NodeResources, ...]
    pending: tuple[tuple[Mapping[str, float], int], ...] = ()


@dataclass(frozen=True)
class Wait:
    """Why tasks of one shape are not running: ``infeasible`` when no node has the demand in
    total (only a new node can help), else every node that has it is busy."""

    infeasible: bool
    message: str


def demand_of(num_cpus: float = 0.0, num_gpus: float = 0.0, memory: float | None = None) -> dict[str, float]:
    """Ray's resource demand of a task or actor with these options (zeros are no demand)."""
    demand = {CPU: float(num_cpus), GPU: float(num_gpus), MEMORY: float(memory or 0)}
    return {k: v for k, v in demand.items() if v > 0}


def fits(demand: Demand, resources: Mapping[str, float]) -> bool:
    return all(resources.get(k, 0.0) + EPSILON >= v for k, v in demand.items())


def same_shape(a: Demand, b: Mapping[str, float]) -> bool:
    keys = {k for k, v in a.items() if v > 0} | {k for k, v in b.items() if v > 0}
    return all(math.isclose(a.get(k, 0.0), b.get(k, 0.0), abs_tol=EPSILON) for k in keys)


def _ordered(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: (SHOWN_ORDER.index(k) if k in SHOWN_ORDER else len(SHOWN_ORDER), k))


def _number(key: str, value: float) -> str:
    return f"{value / 2**30:.4g}" if key == MEMORY else f"{value:g}"


def amount(key: str, value: float) -> str:
    """``2 CPU``, ``0.5 GPU``, ``8 GiB memory``."""
    return f"{_number(key, value)} {'GiB memory' if key == MEMORY else key}"


def describe(demand: Demand) -> str:
    return ", ".join(amount(k, demand[k]) for k in _ordered(list(demand))) or "nothing"


def _nodes(snapshot: ClusterSnapshot, keys: list[str], free: bool) -> str:
    if not snapshot.nodes:
        return "no alive node"
    shown = []
    for node in snapshot.nodes[:MAX_NODES_SHOWN]:
        parts = [amount(k, node.total.get(k, 0.0)) for k in keys]
        if free:
            parts = [f"{p} ({_number(k, node.available.get(k, 0.0))} free)" for p, k in zip(parts, keys)]
        shown.append(f"{node.name}: {', '.join(parts)}")
    more = len(snapshot.nodes) - MAX_NODES_SHOWN
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def pending_count(demand: Demand, snapshot: ClusterSnapshot) -> int:
    """How many tasks or actors of ``demand``'s shape (any job's) wait for placement."""
    return sum(count for shape, count in snapshot.pending if same_shape(demand, shape))


def why_waiting(demand: Demand, what: str, snapshot: ClusterSnapshot, in_flight: int = 1) -> Wait | None:
    """Why ``in_flight`` submitted tasks of ``demand`` (``what`` they are, e.g. "block task")
    do not run, or None when they may be running or are about to.

    Infeasible: no alive node has the demand in total. Busy: some node has it in total, none
    has it free, and at least ``in_flight`` requests of this shape wait for placement — so
    none of ours can be running (a count below that means some of ours hold resources and
    the job moves)."""
    if not demand:
        return None  # a task that asks for nothing always finds a node
    keys = _ordered(list(demand))
    wanted = f"{describe(demand)} per {what}"
    totals = {k: sum(n.total.get(k, 0.0) for n in snapshot.nodes) for k in keys}
    offered = ", ".join(amount(k, totals[k]) for k in keys)
    if not any(fits(demand, node.total) for node in snapshot.nodes):
        short = [amount(k, demand[k]) for k in keys if not any(fits({k: demand[k]}, n.total) for n in snapshot.nodes)]
        lacking = f" (no node has {' or '.join(short)})" if short else " (no single node has all of it)"
        return Wait(
            infeasible=True,
            message=f"{WAITING_PREFIX}: {wanted}; the Ray cluster offers {offered}{lacking}; "
            f"nodes: {_nodes(snapshot, keys, free=False)}",
        )
    if any(fits(demand, node.available) for node in snapshot.nodes):
        return None
    if pending_count(demand, snapshot) < max(1, in_flight):
        return None
    free = ", ".join(amount(k, sum(n.available.get(k, 0.0) for n in snapshot.nodes)) for k in keys)
    return Wait(
        infeasible=False,
        message=f"{WAITING_PREFIX}: {wanted}; all in use by other work (the Ray cluster offers {offered}, "
        f"{free} free); nodes: {_nodes(snapshot, keys, free=True)}",
    )


def timeout_message(what: str, wait: Wait, timeout_s: float) -> str:
    """The failure: what was asked, what the cluster has, and what to do."""
    reason = wait.message.removeprefix(f"{WAITING_PREFIX}: ")
    cure = (
        "ask for less, or add Ray nodes that have it"
        if wait.infeasible
        else "wait for the other work to end, ask for less, or add Ray nodes"
    )
    return (
        f"the {what}s could not be scheduled within {timeout_s:g} s ({TIMEOUT_FIELD}): {reason}. "
        f"To fix: {cure}, or raise {TIMEOUT_FIELD}"
    )


# ------------------------------------------------------------------ the bound of the current job

_timeout_s: contextvars.ContextVar[float] = contextvars.ContextVar("scheduling_timeout_s", default=DEFAULT_SCHEDULING_TIMEOUT_S)


@contextlib.contextmanager
def bound(timeout_s: float) -> Iterator[None]:
    """Use ``timeout_s`` for every wait of the tasks started inside (a job's setting)."""
    token = _timeout_s.set(timeout_s)
    try:
        yield
    finally:
        _timeout_s.reset(token)


def current_bound() -> float:
    return _timeout_s.get()


# ------------------------------------------------------------------ reading the cluster (I/O)


def snapshot() -> ClusterSnapshot | None:
    """The cluster as the GCS sees it now; None when it cannot be read (a job never fails
    because its watchdog could not look)."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_resource_state
    from ray.core.generated.autoscaler_pb2 import NodeStatus

    try:
        state = get_cluster_resource_state(ray._private.worker.global_worker.gcs_client)
    except Exception as exc:  # any RPC failure: no verdict this time
        log.debug("cannot read the cluster's resource state: %s", exc)
        return None
    nodes = tuple(
        NodeResources(
            name=node.node_ip_address or node.node_id.hex()[:12],
            total=dict(node.total_resources),
            available=dict(node.available_resources),
        )
        for node in state.node_states
        if node.status != NodeStatus.DEAD
    )
    pending = tuple((dict(r.request.resources_bundle), int(r.count)) for r in state.pending_resource_requests)
    return ClusterSnapshot(nodes=nodes, pending=pending)


#: Told the wait's message when a wait starts or its message changes, None when it is over.
Reporter = Callable[[str | None], None]


@dataclass
class Watch:
    """Follows one kind of submitted work that makes no progress.

    ``check`` is called when a poll saw nothing finish: it reports the reason (through
    ``report``) as soon as there is one, and raises :class:`SchedulingTimeout` once the same
    wait has lasted ``timeout_s``. ``progressed`` (something finished) ends any wait."""

    demand: Demand
    what: str
    report: Reporter | None = None
    timeout_s: float = field(default_factory=current_bound)
    look: Callable[[], ClusterSnapshot | None] = snapshot
    clock: Callable[[], float] = time.monotonic
    since: float | None = None
    wait: Wait | None = None

    def progressed(self) -> None:
        if self.wait is not None and self.report is not None:
            self.report(None)
        self.since, self.wait = None, None

    def check(self, in_flight: int = 1) -> Wait | None:
        if not self.demand or in_flight <= 0:
            return None
        seen = self.look()
        if seen is None:
            return self.wait
        wait = why_waiting(self.demand, self.what, seen, in_flight)
        if wait is None:
            self.progressed()
            return None
        now = self.clock()
        if self.since is None:
            self.since = now
        if self.report is not None and (self.wait is None or wait.message != self.wait.message):
            self.report(wait.message)
        self.wait = wait
        if now - self.since >= self.timeout_s:
            raise SchedulingTimeout(timeout_message(self.what, wait, self.timeout_s))
        return wait
