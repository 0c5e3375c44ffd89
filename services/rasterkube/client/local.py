"""Local mode: run a resource in this process on Ray, through the same code as ``rasterkube run``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rasterkube import runner, storage
from rasterkube.api import Resource
from rasterkube.client.results import INDEX_FILE, Result
from rasterkube.constants import Kind, Phase
from rasterkube.errors import ResourceFailed, UserError
from rasterkube.manifests import Loaded

#: ``(percent, message, reason)``: reason set while the job is held up (e.g. Unschedulable).
ProgressFn = Callable[[int, str, str | None], None]


class LocalBackend:
    """Runs resources with :func:`rasterkube.runner.run_planned` (embedded Ray, or RAY_ADDRESS).

    Refs (``mosaicRef`` …) resolve to the output of a resource this backend ran, else to a
    committed output at the default location under the storage root (an earlier session)."""

    def __init__(self, namespace: str, storage_root: str | None = None) -> None:
        self.namespace = namespace
        self.root = storage.normalize(runner.storage_root(storage_root))
        self.runs: dict[tuple[Kind, str], Result] = {}

    # ------------------------------------------------------------------ lookups
    def default_output(self, kind: Kind, name: str) -> str:
        return runner.default_output_uri(self.root, self.namespace, kind, name)

    def output_of(self, kind: Kind, name: str) -> str | None:
        """The committed output of ``kind/name``: from this session's runs, else the default location."""
        known = self.runs.get((kind, name))
        if known is not None and known.succeeded and known.uri:
            return known.uri
        uri = self.default_output(kind, name)
        return uri if _has_output(kind, uri) else None

    def get(self, kind: Kind, name: str) -> Result | None:
        known = self.runs.get((kind, name))
        if known is not None:
            return known
        uri = self.output_of(kind, name)
        if uri is None:
            return None
        status = {"phase": Phase.SUCCEEDED.value, "progress": {"percent": 100, "message": "output found"},
                  "outputs": {"uri": uri, "summary": {}}}  # fmt: skip
        return Result(kind.value, name, self.namespace, status)

    def exists(self, kind: Kind, name: str) -> bool:
        return (kind, name) in self.runs or self.output_of(kind, name) is not None

    def forget(self, kind: Kind, name: str) -> Result | None:
        return self.runs.pop((kind, name), None)

    # ------------------------------------------------------------------ run
    def _source_uri(self, resource: Resource[Any], origin: str) -> str | None:
        source = getattr(resource.spec, "source", None)
        if source is None:
            return None
        ref = source.ref
        if ref is None:
            return storage.normalize(source.uri)
        kind, name = ref
        uri = self.output_of(kind, name)
        if uri is None:
            raise UserError(
                f"{origin}: {resource.kind}/{resource.name}: spec.{source.field_path}.name: no {kind.value} "
                f"named {name!r} has succeeded in this session and there is no committed output at "
                f"{self.default_output(kind, name)}; run it first, or pass its result or a store URI"
            )
        return uri

    def run(self, resource: Resource[Any], manifest: dict[str, Any], origin: str, on_progress: ProgressFn) -> Result:
        """Run to the end; UserError before anything is written, ResourceFailed if the run failed."""
        kind = Kind(resource.kind)
        planned = runner.Planned(
            Loaded(resource, origin), runner.output_uri(resource, self.root), self._source_uri(resource, origin)
        )
        (outcome,) = runner.run_planned([planned], on_progress=lambda _p, pct, msg, reason: on_progress(pct, msg, reason))
        failed = outcome.phase != Phase.SUCCEEDED
        message = (outcome.error or "").removeprefix(f"{resource.kind}/{resource.name}: ")
        status: dict[str, Any] = {
            "phase": outcome.phase,
            "progress": {"percent": 0 if failed else 100, "message": message if failed else "done"},
            "outputs": outcome.outputs or None,
            "job": {"backend": "local"},
            "startTime": outcome.start_time,
            "completionTime": outcome.completion_time,
            "usage": outcome.usage,
        }
        result = Result(kind.value, resource.name, self.namespace, {k: v for k, v in status.items() if v is not None},
                        manifest)  # fmt: skip
        self.runs[(kind, resource.name)] = result
        if failed:
            raise ResourceFailed(resource.kind, resource.name, message, result.status)
        return result


def _has_output(kind: Kind, uri: str) -> bool:
    if kind == Kind.VECTORIZATION:
        return storage.exists(uri)
    if storage.is_committed(uri):
        return True
    return kind == Kind.MOSAIC and storage.exists(storage.join(uri, INDEX_FILE))
