"""What a job gets from its caller (local runner, Ray Jobs API, KubeRay) and what it returns."""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from rasterkube import staging, storage
from rasterkube.api import RESOURCE_MODELS, Resource
from rasterkube.constants import Kind
from rasterkube.errors import UserError
from rasterkube.runtime.progress import NullReporter, Reporter, ScaledReporter


@dataclass(frozen=True)
class JobRequest:
    """A resource with its refs resolved to URIs: the contract between control plane and job."""

    resource: dict[str, Any]
    output_uri: str
    source_uri: str | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def kind(self) -> Kind:
        return Kind(self.resource["kind"])

    def parsed(self) -> Resource[Any]:
        return RESOURCE_MODELS[self.kind].model_validate(self.resource)

    def to_json(self) -> str:
        return json.dumps(
            {"resource": self.resource, "outputUri": self.output_uri, "sourceUri": self.source_uri, "runId": self.run_id}
        )

    @classmethod
    def from_json(cls, text: str) -> JobRequest:
        data = json.loads(text)
        return cls(
            resource=data["resource"],
            output_uri=data["outputUri"],
            source_uri=data.get("sourceUri"),
            run_id=data.get("runId") or uuid.uuid4().hex[:12],
        )

    @classmethod
    def load(cls, spec: str) -> JobRequest:
        """``spec`` is inline JSON, a local path or a URI of a JSON file."""
        text = spec
        if not spec.lstrip().startswith("{"):
            try:
                with fsspec.open(spec, "r", **storage.storage_options(spec)) as fh:
                    text = fh.read()
            except FileNotFoundError:
                raise UserError(f"--spec: {spec} does not exist (give inline JSON, a path or a URI)") from None
        try:
            return cls.from_json(text)
        except (json.JSONDecodeError, KeyError) as exc:
            raise UserError(f"--spec: not a job request ({exc}); expected resource, outputUri, sourceUri") from None


@dataclass(frozen=True)
class JobResult:
    uri: str
    summary: dict[str, Any]
    #: What the run cost (:class:`rasterkube.runtime.usage.Usage` as a dict), set by run_job.
    usage: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def raster_summary(out: Any, blocks: int, blocks_reused: int, **extra: Any) -> dict[str, Any]:
    """The status summary of a raster output (a :class:`rasterkube.geozarr.StoreInfo`);
    ``blocksReused``: blocks an interrupted run of the same work had finished."""
    return {
        "shape": list(out.shape),
        "bands": list(out.bands),
        "times": [str(t) for t in out.times.astype("datetime64[D]")],
        "crs": out.grid.crs,
        "blocks": blocks,
        "blocksReused": blocks_reused,
        **extra,
    }


def open_stage(resource: Resource[Any], final_uri: str, **inputs: str | None) -> staging.Stage:
    """The staging store of this run of ``resource`` (resumed when an interrupted run of the
    same resource, generation, spec and ``inputs`` left one): see :mod:`rasterkube.staging`."""
    return staging.open_stage(final_uri, staging.stage_key(resource, inputs))


def source_version(request: JobRequest) -> str | None:
    """This commit of the job's source store, as a stage-key input: blocks computed from an
    earlier commit of the source are never reused."""
    from rasterkube import geozarr

    return geozarr.store_version(request.source_uri) if request.source_uri else None


def commit_store(
    stage: staging.Stage,
    final_uri: str,
    reporter: Reporter,
    *,
    multiscales: bool,
    pyramid_percent: tuple[float, float],
    commit_percent: float | None,
    item: dict[str, Any],
    num_cpus: float = 1.0,
    max_in_flight: int | None = None,
) -> list[Any] | None:
    """Finish a raster output staged at ``stage``: its ledger removed (the blocks are done),
    the pyramid if asked for, its STAC ``item`` (:mod:`rasterkube.provenance`), consolidated
    metadata, commit. The pyramid and the item are written into the staging store, so the
    commit publishes them with the data.

    Returns the pyramid's level grids (None without multiscales). ``commit_percent=None``
    leaves the commit's progress to the caller (a Mosaic commits one store per AOI row)."""
    from rasterkube import geozarr, multiscale, provenance

    tmp_uri = stage.uri
    stage.seal()
    levels = None
    if multiscales:
        levels = multiscale.build(
            tmp_uri, reporter=ScaledReporter(reporter, *pyramid_percent), num_cpus=num_cpus, max_in_flight=max_in_flight
        )
    if commit_percent is not None:
        reporter.progress(commit_percent, "committing output")
    provenance.write_into_store(tmp_uri, item)
    geozarr.finalize(tmp_uri)
    storage.commit(tmp_uri, final_uri)
    if commit_percent is not None:
        reporter.progress(100, "output committed")
    return levels


@dataclass(frozen=True)
class JobContext:
    request: JobRequest
    reporter: Reporter = field(default_factory=NullReporter)
    max_in_flight: int | None = None
