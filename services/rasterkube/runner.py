"""``rasterkube run``: run manifests on Ray without Kubernetes, refs resolved in dependency order."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rasterkube import storage
from rasterkube.api import Resource
from rasterkube.constants import DEFAULT_STORAGE_ROOT, ENV_STORAGE_ROOT, Kind, Phase
from rasterkube.errors import UserError
from rasterkube.jobs import run_job, service_for
from rasterkube.jobs.context import JobRequest
from rasterkube.manifests import Loaded, ManifestError
from rasterkube.runtime.progress import CallbackReporter, NullReporter, Reporter

log = logging.getLogger(__name__)


def storage_root(explicit: str | None = None) -> str:
    return explicit or os.environ.get(ENV_STORAGE_ROOT) or DEFAULT_STORAGE_ROOT


def default_output_uri(root: str, namespace: str, kind: Kind | str, name: str) -> str:
    """``<storage root>/<namespace>/<kind>/<name>`` (DESIGN §2)."""
    return storage.join(storage.normalize(root), namespace, Kind(kind).singular, name)


def output_uri(resource: Resource[Any], root: str) -> str:
    """``spec.output.uri``, or the default under the storage root (runner and operator alike)."""
    spec_uri = resource.spec.output.uri
    if spec_uri:
        return storage.normalize(spec_uri)
    return default_output_uri(root, resource.namespace, resource.kind, resource.name)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Planned:
    item: Loaded
    output_uri: str
    source_uri: str | None = None
    depends_on: tuple[Kind, str, str] | None = None


@dataclass
class Outcome:
    kind: str
    name: str
    namespace: str
    phase: str = Phase.PENDING
    outputs: dict[str, Any] = field(default_factory=dict)
    start_time: str | None = None
    completion_time: str | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "name": self.name,
            "namespace": self.namespace,
            "phase": self.phase,
            "outputs": self.outputs,
            "startTime": self.start_time,
            "completionTime": self.completion_time,
        }
        if self.usage is not None:
            out["usage"] = self.usage
        if self.error:
            out["error"] = self.error
        return out


def plan(items: Sequence[Loaded], root: str) -> list[Planned]:
    """Resolve refs and order resources so every source runs before its consumers."""
    by_key = {it.key: it for it in items}
    planned = {it.key: Planned(it, output_uri(it.resource, root)) for it in items}
    problems = []
    for key, p in planned.items():
        source = getattr(p.item.resource.spec, "source", None)
        if source is None:
            continue
        ref = source.ref
        if ref is None:
            p.source_uri = storage.normalize(source.uri)
            _recover_local(p.source_uri)
            continue
        ref_kind, ref_name = ref
        target = (ref_kind, key[1], ref_name)
        field_name = source.set_fields()[0].value
        if target in by_key:
            p.depends_on = target
            p.source_uri = planned[target].output_uri
            continue
        existing = default_output_uri(root, key[1], ref_kind, ref_name)
        _recover_local(existing)
        if storage.is_committed(existing):
            p.source_uri = existing  # produced by an earlier run
            continue
        problems.append(
            f"{p.item.origin}: {p.item.label}: spec.source.{field_name}.name: no {ref_kind.value} named "
            f"{ref_name!r} in these manifests and no committed output at {existing}; add its manifest "
            "with another -f, or point spec.source.uri at an existing store"
        )
    if problems:
        raise ManifestError(problems)
    return _topological(planned)


def _recover_local(uri: str) -> None:
    """A source an earlier run was committing when it was killed: finish that commit first."""
    if "://" not in uri:
        storage.recover(uri)


def _topological(planned: dict[tuple[Kind, str, str], Planned]) -> list[Planned]:
    order: list[Planned] = []
    state: dict[tuple[Kind, str, str], str] = {}

    def visit(key: tuple[Kind, str, str], chain: list[str]) -> None:
        if state.get(key) == "done":
            return
        p = planned[key]
        if state.get(key) == "visiting":
            raise ManifestError([f"spec.source: refs form a cycle: {' -> '.join([*chain, p.item.label])}"])
        state[key] = "visiting"
        if p.depends_on is not None:
            visit(p.depends_on, [*chain, p.item.label])
        state[key] = "done"
        order.append(p)

    for key in planned:
        visit(key, [])
    return order


#: ``(planned, percent, message, reason)``: reason is a constants.Reason value while the job is
#: held up (e.g. Unschedulable), else None.
ProgressCallback = Callable[[Planned, int, str, str | None], None]


def _request(p: Planned) -> JobRequest:
    return JobRequest(
        resource=p.item.resource.model_dump(by_alias=True, exclude_none=True, mode="json"),
        output_uri=p.output_uri,
        source_uri=p.source_uri,
    )


def run_planned(
    order: Sequence[Planned], on_progress: ProgressCallback | None = None, max_in_flight: int | None = None
) -> list[Outcome]:
    """Run each resource in order; a failed source fails its consumers without running them."""
    requests = {p.item.key: _request(p) for p in order}
    prepared: dict[tuple[Kind, str, str], object] = {}
    written: set[str] = set()
    # Before anything runs or is written: every kind has a service, and every resource whose
    # source already exists passes the checks that need it (bands, dataVar, selector, ...).
    for p in order:
        service = service_for(Kind(p.item.resource.kind))
        if p.depends_on is None:
            try:
                prepared[p.item.key] = service.preflight(p.item.resource, requests[p.item.key])
            except UserError as exc:
                raise UserError(f"{p.item.origin}: {p.item.label}: {exc}") from None
    results: dict[tuple[Kind, str, str], Outcome] = {}
    for p in order:
        res = p.item.resource
        outcome = Outcome(kind=res.kind, name=res.name, namespace=res.namespace)
        results[p.item.key] = outcome
        if p.depends_on is not None and results[p.depends_on].phase != Phase.SUCCEEDED:
            outcome.phase = Phase.FAILED
            outcome.error = f"source {p.depends_on[0].value}/{p.depends_on[2]} did not succeed"
            continue
        reporter: Reporter = (
            CallbackReporter(lambda pct, msg, reason, p=p: on_progress(p, pct, msg, reason), with_reason=True)
            if on_progress
            else NullReporter()
        )
        request = requests[p.item.key]
        outcome.start_time = now()
        outcome.phase = Phase.RUNNING
        try:
            # Checked before the run started, unless an earlier resource of this run has since
            # rewritten its source (a `uri` naming another resource's output, not a ref).
            earlier = prepared.get(p.item.key) if request.source_uri not in written else None
            result = run_job(request, reporter, max_in_flight=max_in_flight, prepared=earlier)
        except UserError as exc:
            outcome.phase, outcome.error = Phase.FAILED, f"{p.item.label}: {exc}"
        except Exception as exc:  # a fault, not bad input: keep the trace in the log, report the rest
            log.exception("%s failed", p.item.label)
            outcome.phase, outcome.error = Phase.FAILED, f"{p.item.label}: {type(exc).__name__}: {exc}"
        else:
            outcome.phase = Phase.SUCCEEDED
            outcome.outputs = {"uri": result.uri, "summary": result.summary}
            outcome.usage = result.usage
            written.add(result.uri)
        outcome.completion_time = now()
    return [results[p.item.key] for p in order]
