"""Why Ray cannot run a job's tasks (issue 16.5), decided over made-up clusters (pure logic)."""

from __future__ import annotations

import io
import json

import pytest

from rasterkube.constants import PROGRESS_PREFIX
from rasterkube.errors import SchedulingTimeout, UserError
from rasterkube.runtime import scheduling
from rasterkube.runtime.progress import LogReporter
from rasterkube.runtime.scheduling import ClusterSnapshot, NodeResources, Watch, demand_of, why_waiting

GIB = 2**30


def node(name: str, cpu: float = 0, gpu: float = 0, mem_gib: float = 16, free_cpu: float | None = None,
         free_gpu: float | None = None) -> NodeResources:  # fmt: skip
    total = {"CPU": cpu, "GPU": gpu, "memory": mem_gib * GIB, "object_store_memory": 4 * GIB}
    total = {k: v for k, v in total.items() if v}
    free = dict(total)
    if free_cpu is not None:
        free["CPU"] = free_cpu
    if free_gpu is not None:
        free["GPU"] = free_gpu
    return NodeResources(name, total, free)


def test_demand_leaves_out_what_is_not_asked_for() -> None:
    assert demand_of(1.0) == {"CPU": 1.0}
    assert demand_of(0.0) == {}
    assert demand_of(2, 1, 8 * GIB) == {"CPU": 2.0, "GPU": 1.0, "memory": 8.0 * GIB}


def test_no_cpu_anywhere_is_infeasible_and_names_both_sides() -> None:
    # The user's case: the head offers no CPU and the workers never joined.
    cluster = ClusterSnapshot((node("10.0.0.1", cpu=0),), pending=(({"CPU": 1.0}, 2),))
    wait = why_waiting(demand_of(1), "block task", cluster, in_flight=2)
    assert wait is not None and wait.infeasible
    assert wait.message.startswith("waiting for resources: 1 CPU per block task; the Ray cluster offers 0 CPU")
    assert "no node has 1 CPU" in wait.message and "10.0.0.1: 0 CPU" in wait.message


def test_no_alive_node_is_infeasible() -> None:
    wait = why_waiting(demand_of(1), "block task", ClusterSnapshot(()))
    assert wait is not None and wait.infeasible and "no alive node" in wait.message


def test_gpu_on_a_cpu_only_cluster_is_infeasible() -> None:
    cluster = ClusterSnapshot((node("a", cpu=8), node("b", cpu=8)))
    wait = why_waiting(demand_of(1, 1), "model replica", cluster)
    assert wait is not None and wait.infeasible
    assert "1 CPU, 1 GPU per model replica" in wait.message
    assert "offers 16 CPU, 0 GPU (no node has 1 GPU)" in wait.message


def test_memory_no_single_node_has_is_infeasible() -> None:
    cluster = ClusterSnapshot((node("a", cpu=4, mem_gib=16), node("b", cpu=4, mem_gib=16)))
    wait = why_waiting(demand_of(1, memory=24 * GIB), "block task", cluster)
    assert wait is not None and wait.infeasible
    assert "24 GiB memory per block task" in wait.message and "no node has 24 GiB memory" in wait.message
    assert "32 GiB memory" in wait.message  # the cluster's total, which no one node has


def test_a_demand_split_across_nodes_is_infeasible() -> None:
    # One node has the GPU, another the CPUs: a task needs both on one node.
    cluster = ClusterSnapshot((node("gpu", cpu=1, gpu=1), node("cpu", cpu=16)))
    wait = why_waiting(demand_of(4, 1), "block task", cluster)
    assert wait is not None and wait.infeasible and "no single node has all of it" in wait.message


def test_a_node_that_fits_and_is_free_means_no_wait() -> None:
    cluster = ClusterSnapshot((node("a", cpu=0), node("b", cpu=2, free_cpu=1)), pending=(({"CPU": 1.0}, 3),))
    assert why_waiting(demand_of(1), "block task", cluster, in_flight=3) is None


def test_asking_for_nothing_never_waits() -> None:
    assert why_waiting({}, "block task", ClusterSnapshot(())) is None


def test_busy_cluster_waits_only_when_none_of_ours_can_be_running() -> None:
    busy = (node("a", cpu=2, free_cpu=0),)
    # 4 in flight, 2 of this shape pending: two of ours hold the CPUs — the job moves.
    assert why_waiting(demand_of(1), "block task", ClusterSnapshot(busy, (({"CPU": 1.0}, 2),)), in_flight=4) is None
    # All 4 of ours pending (another job holds the CPUs): waiting, not infeasible.
    wait = why_waiting(demand_of(1), "block task", ClusterSnapshot(busy, (({"CPU": 1.0}, 4),)), in_flight=4)
    assert wait is not None and not wait.infeasible
    assert "all in use by other work" in wait.message and "2 CPU, 0 CPU free" in wait.message
    # Pending requests of another shape are not ours.
    other = ClusterSnapshot(busy, (({"CPU": 2.0}, 9),))
    assert why_waiting(demand_of(1), "block task", other, in_flight=4) is None


def test_large_clusters_are_summarised() -> None:
    cluster = ClusterSnapshot(tuple(node(f"10.0.0.{i}", cpu=0) for i in range(10)))
    wait = why_waiting(demand_of(1), "block task", cluster)
    assert wait is not None and "and 6 more" in wait.message and "10.0.0.9" not in wait.message


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_watch_reports_at_once_then_fails_after_the_bound() -> None:
    seen: list[str | None] = []
    clock = FakeClock()
    cluster = ClusterSnapshot((node("127.0.0.1", cpu=0),))
    watch = Watch(demand_of(1), "block task", report=seen.append, timeout_s=30, look=lambda: cluster, clock=clock)
    assert watch.check(2) is not None
    assert len(seen) == 1 and seen[0] is not None and seen[0].startswith("waiting for resources: 1 CPU")
    clock.t = 29
    watch.check(2)
    assert len(seen) == 1, "the same wait is reported once"
    clock.t = 30
    with pytest.raises(SchedulingTimeout) as err:
        watch.check(2)
    assert isinstance(err.value, UserError) and err.value.reason == "Unschedulable"
    message = str(err.value)
    assert message.startswith("the block tasks could not be scheduled within 30 s (spec.resources.schedulingTimeoutSeconds)")
    assert "1 CPU per block task; the Ray cluster offers 0 CPU" in message and "raise spec.resources" in message


def test_progress_or_a_free_node_restarts_the_clock() -> None:
    seen: list[str | None] = []
    clock = FakeClock()
    state = {"cluster": ClusterSnapshot((node("a", cpu=0),))}
    watch = Watch(demand_of(1), "block task", report=seen.append, timeout_s=10, look=lambda: state["cluster"],
                  clock=clock)  # fmt: skip
    watch.check()
    clock.t = 9
    watch.progressed()  # a task finished
    assert seen[-1] is None, "the end of a wait is reported"
    clock.t = 15
    watch.check()  # a new wait starts at 15
    clock.t = 24
    watch.check()
    state["cluster"] = ClusterSnapshot((node("a", cpu=0), node("b", cpu=4)))  # a worker joined
    clock.t = 40
    assert watch.check() is None
    assert seen[-1] is None


def test_unreadable_cluster_state_never_fails_a_job() -> None:
    clock = FakeClock()
    watch = Watch(demand_of(1), "block task", timeout_s=1, look=lambda: None, clock=clock)
    clock.t = 100
    assert watch.check() is None


def test_bound_is_the_jobs_setting() -> None:
    assert scheduling.current_bound() == 600
    with scheduling.bound(5):
        assert Watch(demand_of(1), "block task").timeout_s == 5
    assert scheduling.current_bound() == 600


def test_log_reporter_never_holds_back_a_wait() -> None:
    out = io.StringIO()
    reporter = LogReporter(out, min_interval_s=3600)
    reporter.progress(0, "scoring blocks: 0/2")
    reporter.progress(0, "waiting for resources: 1 CPU per block task", reason="Unschedulable")
    reporter.progress(0, "waiting for resources: 1 CPU per block task", reason="Unschedulable")  # same: once
    reporter.progress(0, "scoring blocks: 0/2")  # the wait is over
    lines = [json.loads(line.removeprefix(PROGRESS_PREFIX)) for line in out.getvalue().splitlines()]
    assert lines == [
        {"percent": 0, "message": "scoring blocks: 0/2"},
        {"percent": 0, "message": "waiting for resources: 1 CPU per block task", "reason": "Unschedulable"},
        {"percent": 0, "message": "scoring blocks: 0/2"},
    ]


def test_text_bar_shows_a_wait_in_logs_once() -> None:
    from rasterkube.client.progress import progress_bar

    stream = io.StringIO()  # not a terminal: a line per 10 % step — and one per wait
    bar = progress_bar("ChangeScore/c", stream=stream)
    bar.update(0, "scoring blocks: 0/2")
    bar.update(0, "waiting for resources: 1 CPU per block task; the Ray cluster offers 0 CPU", "Unschedulable")
    bar.update(0, "waiting for resources: 1 CPU per block task; the Ray cluster offers 0 CPU", "Unschedulable")
    bar.update(50, "scoring blocks: 1/2")
    lines = stream.getvalue().splitlines()
    assert lines[1] == "ChangeScore/c   0% waiting for resources: 1 CPU per block task; the Ray cluster offers 0 CPU"
    assert len(lines) == 3 and lines[2].endswith("50% scoring blocks: 1/2")


def test_cluster_client_sees_a_held_up_resource() -> None:
    from rasterkube.client.cluster import _held_up

    held = {"conditions": [{"type": "Reconciling", "status": "True", "reason": "Unschedulable", "message": "..."}]}
    assert _held_up(held) == "Unschedulable"
    assert _held_up({"conditions": [{"type": "Reconciling", "status": "True", "reason": "JobRunning"}]}) is None
