"""The reconciler's decisions, with fakes for Kubernetes and the backend (pure logic)."""

from __future__ import annotations

import copy
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers.stores import random_series, write_store
from rasterkube import staging
from rasterkube.constants import Kind
from rasterkube.jobs.context import JobRequest
from rasterkube_operator import reconcile
from rasterkube_operator.backends.base import BackendName, JobSpec, JobState, JobStatus, Owner, job_id
from rasterkube_operator.status import build_status, changed

UID = "6f1c2b9e-aaaa-bbbb-cccc-000000000001"


class FakeBackend:
    name = BackendName.RAY

    def __init__(self) -> None:
        self.jobs: dict[str, JobStatus] = {}
        self.submitted: list[JobSpec] = []
        self.stopped: list[str] = []

    def submit(self, spec: JobSpec) -> str:
        self.submitted.append(spec)
        self.jobs.setdefault(spec.job_id, JobStatus(JobState.PENDING))
        return f"http://ray/#/jobs/{spec.job_id}"

    def status(self, job_id: str, owner: Owner) -> JobStatus:
        return self.jobs.get(job_id, JobStatus(JobState.MISSING))

    def stop(self, job_id: str, owner: Owner) -> None:
        self.stopped.append(job_id)


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[Kind, str, str], dict[str, Any]] = {}
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get((kind, namespace, name)))

    def patch_status(self, kind: Kind, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.patches.append(status)
        self.objects[(kind, namespace, name)]["status"] = copy.deepcopy(status)

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.objects[(Kind(obj["kind"]), "default", obj["metadata"]["name"])] = obj
        return obj


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def change_score(name: str = "cs", source: dict | None = None, generation: int = 1, uid: str = UID, **spec) -> dict:
    return {
        "apiVersion": "rasterkube.dev/v1alpha1",
        "kind": "ChangeScore",
        "metadata": {"name": name, "namespace": "default", "uid": uid, "generation": generation},
        "spec": {"source": source or {"uri": "s3://bucket/src.zarr"}, "distance": "euclidean", **spec},
    }


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    backend, kube = FakeBackend(), FakeKube()
    deps = reconcile.Deps(backend=backend, kube=kube, storage_root=str(tmp_path / "root"), clock=Clock())
    src = write_store(str(tmp_path / "src.zarr"), random_series(3, 2, 8, 8))
    return backend, kube, deps, src


def step(kube: FakeKube, deps: reconcile.Deps, name: str = "cs", kind: Kind = Kind.CHANGE_SCORE) -> dict[str, Any]:
    obj = kube.get(kind, "default", name)
    assert obj is not None
    reconcile.apply(obj, reconcile.reconcile(obj, deps), deps)
    return kube.get(kind, "default", name)["status"]  # type: ignore[index]


def test_job_id_recorded_before_submission_then_submitted_once(env) -> None:
    backend, kube, deps, src = env
    kube.add(change_score(source={"uri": src}))
    status = step(kube, deps)
    jid = job_id(Kind.CHANGE_SCORE, "cs", UID, 1)
    assert status["phase"] == "Pending" and status["job"] == {"backend": "ray", "id": jid}
    assert backend.submitted == [], "nothing is submitted before the id is in status"
    status = step(kube, deps)
    assert [s.job_id for s in backend.submitted] == [jid]
    assert status["phase"] == "Running" and status["job"]["dashboardUrl"].endswith(jid)
    assert "python -m rasterkube.jobs changescore --spec" in backend.submitted[0].entrypoint
    # a restarted operator sees the recorded id, finds the job, and does not submit again
    backend.jobs[jid] = JobStatus(JobState.RUNNING, progress={"percent": 40, "message": "scoring blocks: 2/5"})
    status = step(kube, deps)
    assert len(backend.submitted) == 1
    assert status["progress"] == {"percent": 40, "message": "scoring blocks: 2/5"}
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Reconciling"]["status"] == "True" and conditions["Ready"]["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])


def test_success_sets_outputs_ready_and_writes_only_on_change(env) -> None:
    backend, kube, deps, src = env
    kube.add(change_score(source={"uri": src}))
    step(kube, deps), step(kube, deps)
    jid = backend.submitted[0].job_id
    backend.jobs[jid] = JobStatus(JobState.SUCCEEDED, result={"ok": True, "uri": "s3://out", "summary": {"shape": [3]}})
    status = step(kube, deps)
    assert status["phase"] == "Succeeded" and status["outputs"] == {"uri": "s3://out", "summary": {"shape": [3]}}
    assert status["completionTime"] and status["progress"]["percent"] == 100
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}
    patches = len(kube.patches)
    assert reconcile.reconcile(kube.get(Kind.CHANGE_SCORE, "default", "cs"), deps) is None  # settled
    step(kube, deps)
    assert len(kube.patches) == patches
    assert [e[1] for e in kube.events] == ["JobSubmitted", "JobSubmitted", "Succeeded"]


def test_failure_is_stalled_with_the_jobs_message(env) -> None:
    backend, kube, deps, src = env
    kube.add(change_score(source={"uri": src}))
    step(kube, deps), step(kube, deps)
    backend.jobs[backend.submitted[0].job_id] = JobStatus(JobState.FAILED, "exit 1", result={"ok": False, "error": "boom"})
    status = step(kube, deps)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Failed" and conditions["Stalled"]["status"] == "True"
    assert conditions["Stalled"]["reason"] == "JobFailed" and conditions["Stalled"]["message"] == "boom"
    assert kube.events[-1][0] == "Warning"


def test_a_job_ray_cannot_place_says_why_in_status_then_fails_with_it(env) -> None:
    backend, kube, deps, src = env
    kube.add(change_score(source={"uri": src}))
    step(kube, deps), step(kube, deps)
    jid = backend.submitted[0].job_id
    wait = "waiting for resources: 1 CPU per block task; the Ray cluster offers 0 CPU (no node has 1 CPU)"
    backend.jobs[jid] = JobStatus(JobState.RUNNING, progress={"percent": 0, "message": wait, "reason": "Unschedulable"})
    status = step(kube, deps)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Running" and status["progress"] == {"percent": 0, "message": wait}
    assert conditions["Reconciling"]["status"] == "True"
    assert conditions["Reconciling"]["reason"] == "Unschedulable" and conditions["Reconciling"]["message"] == wait
    assert kube.events[-1][1] == "Unschedulable"
    # the wait ends: back to the job's own progress and reason
    backend.jobs[jid] = JobStatus(JobState.RUNNING, progress={"percent": 50, "message": "scoring blocks: 1/2"})
    status = step(kube, deps)
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Reconciling"] == "JobRunning"
    error = "the block tasks could not be scheduled within 60 s (spec.resources.schedulingTimeoutSeconds): ..."
    backend.jobs[jid] = JobStatus(JobState.FAILED, "exit 2", result={"ok": False, "error": error, "reason": "Unschedulable"})
    status = step(kube, deps)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Failed" and conditions["Stalled"]["status"] == "True"
    assert conditions["Stalled"]["reason"] == "Unschedulable" and conditions["Stalled"]["message"] == error
    # a reason this operator does not know (from a newer job) is ignored, not a crash
    assert reconcile._reason({"reason": "SomethingNew"}) is None and reconcile._reason(None) is None


def test_waits_for_ref_then_reads_its_output(env) -> None:
    backend, kube, deps, src = env
    kube.add(change_score(source={"mosaicRef": {"name": "m"}}))
    status = step(kube, deps)
    assert status["phase"] == "Waiting" and "does not exist" in status["progress"]["message"]
    mosaic = kube.add({"apiVersion": "rasterkube.dev/v1alpha1", "kind": "Mosaic",
                       "metadata": {"name": "m", "namespace": "default", "uid": "u2", "generation": 1},
                       "spec": {"dataset": "landsat-c2-l2", "aoi": {"bbox": [0, 0, 1, 1]},
                                "time": {"start": "2020-01-01", "end": "2021-01-01"}},
                       "status": {"phase": "Running"}})  # fmt: skip
    status = step(kube, deps)
    assert status["phase"] == "Waiting" and "(it is Running)" in status["progress"]["message"]
    mosaic["status"] = {"phase": "Succeeded", "outputs": {"uri": src}}
    status = step(kube, deps)
    assert status["phase"] == "Pending"
    step(kube, deps)
    assert f'"sourceUri": "{src}"' in backend.submitted[0].entrypoint


def test_spec_change_stops_old_job_and_runs_new_generation(env) -> None:
    backend, kube, deps, src = env
    obj = kube.add(change_score(source={"uri": src}))
    step(kube, deps), step(kube, deps)
    old = backend.submitted[0].job_id
    backend.jobs[old] = JobStatus(JobState.RUNNING)
    obj["metadata"]["generation"] = 2
    obj["spec"]["methods"] = ["difference"]
    status = step(kube, deps)
    assert backend.stopped == [old]
    assert status["job"]["id"] == job_id(Kind.CHANGE_SCORE, "cs", UID, 2) != old
    assert status["observedGeneration"] == 2


def _submitted_request(spec: JobSpec) -> JobRequest:
    return JobRequest.from_json(shlex.split(spec.entrypoint)[-1])


def test_job_request_carries_uid_and_generation_for_the_staging_key(env) -> None:
    """A resubmitted job (operator restart, RayJob retry) gets the same staging key and resumes;
    a new generation gets another and never reuses the old generation's blocks."""
    backend, kube, deps, src = env
    obj = kube.add(change_score(source={"uri": src}))
    step(kube, deps), step(kube, deps)
    first = _submitted_request(backend.submitted[0]).parsed()
    assert (first.metadata.uid, first.metadata.generation) == (UID, 1)
    key = staging.stage_key(first, {"source": "v"})
    assert key.resource == UID and key.generation == 1
    obj["metadata"]["generation"] = 2
    step(kube, deps), step(kube, deps)
    second = _submitted_request(backend.submitted[1]).parsed()
    assert second.metadata.generation == 2 and second.spec_hash == first.spec_hash
    assert staging.stage_key(second, {"source": "v"}).digest != key.digest


def test_checks_the_schema_cannot_express_stall_without_submitting(env) -> None:
    backend, kube, deps, src = env
    kube.add(change_score(source={"uri": src}, bands=["nir"]))
    status = step(kube, deps)
    assert status["phase"] == "Failed" and "spec.bands: 'nir' not in" in status["conditions"][2]["message"]
    assert backend.submitted == []
    kube.add(change_score(name="gone", source={"uri": "/nonexistent/x.zarr"}))
    assert "does not exist" in step(kube, deps, "gone")["progress"]["message"]


def _mosaic(catalog: str) -> dict:
    return {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "Mosaic",
            "metadata": {"name": "m", "namespace": "default", "uid": "u3", "generation": 1},
            "spec": {"dataset": "landsat-c2-l2", "stac": {"catalog": catalog}, "aoi": {"bbox": [0, 0, 1, 1]},
                     "time": {"start": "2020-01-01", "end": "2021-01-01"}}}  # fmt: skip


def test_kind_without_service_fails_clearly(env, monkeypatch) -> None:
    from rasterkube import jobs

    backend, kube, deps, _ = env
    monkeypatch.delitem(jobs.SERVICES, Kind.MOSAIC)
    kube.add(_mosaic("/nonexistent/catalog.json"))
    status = step(kube, deps, "m", Kind.MOSAIC)
    assert status["phase"] == "Failed" and "Mosaic service is not available" in status["progress"]["message"]


def test_mosaic_preflight_failure_is_stalled_without_submission(env) -> None:
    backend, kube, deps, _ = env
    kube.add(_mosaic("/nonexistent/catalog.json"))
    status = step(kube, deps, "m", Kind.MOSAIC)
    assert status["phase"] == "Failed" and "spec.stac.catalog: /nonexistent/catalog.json does not exist" in (
        status["progress"]["message"]
    )
    assert backend.submitted == []


def test_delete_stops_running_job_only(env) -> None:
    backend, kube, deps, src = env
    obj = change_score(source={"uri": src})
    obj["status"] = {"phase": "Running", "job": {"id": "j1"}}
    reconcile.on_delete(obj, deps)
    obj["status"] = {"phase": "Succeeded", "job": {"id": "j2"}}
    reconcile.on_delete(obj, deps)
    assert backend.stopped == ["j1"]


def test_transition_time_moves_only_when_status_flips() -> None:
    from rasterkube.constants import Phase, Reason
    from rasterkube_operator.status import Observation

    running = build_status({}, Observation(Phase.RUNNING, Reason.JOB_RUNNING, "a"), 1, "t1")
    again = build_status(running, Observation(Phase.RUNNING, Reason.JOB_RUNNING, "b"), 1, "t2")
    assert [c["lastTransitionTime"] for c in again["conditions"]] == ["t1", "t1", "t1"]
    done = build_status(again, Observation(Phase.SUCCEEDED, Reason.SUCCEEDED, "c"), 1, "t3")
    assert {c["type"]: c["lastTransitionTime"] for c in done["conditions"]} == {"Ready": "t3", "Reconciling": "t3",
                                                                               "Stalled": "t1"}  # fmt: skip
    assert not changed(again, build_status(again, Observation(Phase.RUNNING, Reason.JOB_RUNNING, "b"), 1, "t9"))


def test_admission_limit_queues_then_admits(env) -> None:
    backend, kube, deps, src = env
    deps.slots = reconcile.JobSlots(limit=1)
    kube.add(change_score("a", source={"uri": src}, uid="u-a"))
    kube.add(change_score("b", source={"uri": src}, uid="u-b"))
    for name in ("a", "b"):
        step(kube, deps, name)
    assert step(kube, deps, "a")["phase"] == "Running"
    queued = step(kube, deps, "b")
    assert queued["phase"] == "Pending" and queued["progress"]["message"] == "queued: 1 jobs running (limit 1)"
    assert {c["type"]: c["reason"] for c in queued["conditions"]}["Reconciling"] == "Queued"
    assert len(backend.submitted) == 1
    backend.jobs[backend.submitted[0].job_id] = JobStatus(JobState.SUCCEEDED, result={"ok": True, "uri": "u"})
    assert step(kube, deps, "a")["phase"] == "Succeeded"
    assert step(kube, deps, "b")["phase"] == "Running" and len(backend.submitted) == 2
