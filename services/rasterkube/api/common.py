"""Typed building blocks shared by the four resource kinds (DESIGN §2).

The models are the single source of truth for the API: they validate manifests in the
local runner and the jobs, and :mod:`rasterkube.crdgen` turns them into the CRD schemas.
Every field carries a description because that text is what ``kubectl explain`` shows.
"""

from __future__ import annotations

import hashlib
import json
import re

from enum import StrEnum
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from rasterkube.constants import API_VERSION, DEFAULT_SCHEDULING_TIMEOUT_S, Kind, Phase

# Kubernetes object names (RFC 1123 subdomain) — RE2-compatible so the API server can use it.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# URIs we can read or write: local paths, s3://, https://, http://, file://, hf:// (models).
URI_DESCRIPTION = "A local path, file://, s3://, http(s)://"

# Marker in json_schema_extra: the CRD generator copies these CEL rules verbatim.
CEL = "x-kubernetes-validations"


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One CEL validation rule for the CRD; the API server returns ``message`` on failure."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, snake_case in Python, no unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The manifest form: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ObjectRef(ApiModel):
    """A reference to another rasterkube resource in the same namespace."""

    name: str = Field(
        description="Name of the referenced resource in the same namespace.",
        min_length=1,
        max_length=253,
        pattern=NAME_PATTERN,
    )


class SourceField(StrEnum):
    MOSAIC_REF = "mosaicRef"
    PREDICTION_REF = "predictionRef"
    CHANGE_SCORE_REF = "changeScoreRef"
    URI = "uri"


# Which kind each ref field points at.
REF_KINDS: dict[SourceField, Kind] = {
    SourceField.MOSAIC_REF: Kind.MOSAIC,
    SourceField.PREDICTION_REF: Kind.PREDICTION,
    SourceField.CHANGE_SCORE_REF: Kind.CHANGE_SCORE,
}


def exactly_one_cel(fields: list[str], what: str) -> dict[str, str]:
    present = ", ".join(f"has(self.{f})" for f in fields)
    names = ", ".join(fields[:-1]) + f" or {fields[-1]}"
    return cel(f"[{present}].filter(x, x).size() == 1", f"{what}: set exactly one of {names}")


SOURCE_FIELDS = [f.value for f in SourceField]


class Source(ApiModel):
    """Where the input raster comes from: another resource (waits until it succeeds) or a store."""

    model_config = ConfigDict(json_schema_extra={CEL: [exactly_one_cel(SOURCE_FIELDS, "source")]})

    mosaic_ref: ObjectRef | None = Field(None, description="Read the output of this Mosaic; waits until it has succeeded.")
    prediction_ref: ObjectRef | None = Field(
        None, description="Read the output of this Prediction; waits until it has succeeded."
    )
    change_score_ref: ObjectRef | None = Field(
        None, description="Read the output of this ChangeScore; waits until it has succeeded."
    )
    uri: str | None = Field(None, min_length=1, description=f"An existing GeoZarr store. {URI_DESCRIPTION}.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        if len(self.set_fields()) != 1:
            raise ValueError("set exactly one of mosaicRef, predictionRef, changeScoreRef or uri")
        return self

    def set_fields(self) -> list[SourceField]:
        return [f for f, attr in _PY_NAMES.items() if getattr(self, attr) is not None]

    @property
    def field_path(self) -> str:
        """``source.uri``, ``source.mosaicRef``, …: where a source problem is reported."""
        return f"source.{self.set_fields()[0].value}"

    @property
    def ref(self) -> tuple[Kind, str] | None:
        """(kind, name) of the referenced resource, or None for a plain URI."""
        (field,) = self.set_fields()
        if field is SourceField.URI:
            return None
        ref: ObjectRef = getattr(self, _PY_NAMES[field])
        return REF_KINDS[field], ref.name


_PY_NAMES = {
    SourceField.MOSAIC_REF: "mosaic_ref",
    SourceField.PREDICTION_REF: "prediction_ref",
    SourceField.CHANGE_SCORE_REF: "change_score_ref",
    SourceField.URI: "uri",
}


class RasterOutput(ApiModel):
    """Where a raster result (a GeoZarr store) is written."""

    uri: str | None = Field(
        None,
        min_length=1,
        description=(
            "Output GeoZarr store. Default: <storage root>/<namespace>/<kind>/<name>. "
            f"{URI_DESCRIPTION}. Written under a temporary prefix and committed at the end."
        ),
    )
    multiscales: bool = Field(False, description="Also write a multiscale pyramid (×2 levels) for map viewing.")


class VectorOutput(ApiModel):
    """Where vector features (GeoParquet) are written."""

    uri: str | None = Field(
        None,
        min_length=1,
        description=(
            "Output GeoParquet location. Default: <storage root>/<namespace>/<kind>/<name>. "
            f"{URI_DESCRIPTION}."
        ),
    )
    crs: str = Field("EPSG:4326", min_length=1, description="CRS of the output geometries, e.g. EPSG:4326.")
    pmtiles: bool = Field(False, description="Also write a PMTiles archive for map viewing.")


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """A Kubernetes toleration for the Ray worker pods (e.g. for a tainted GPU node pool)."""

    key: str | None = Field(None, description="Taint key the toleration applies to; empty matches all keys.")
    operator: TolerationOperator = Field(TolerationOperator.EQUAL, description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value to match when operator is Equal.")
    effect: TaintEffect | None = Field(None, description="Taint effect to match; empty matches all effects.")
    toleration_seconds: int | None = Field(
        None, ge=0, description="How long a NoExecute taint is tolerated before eviction."
    )


QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[mkM]|e[0-9]+)?$"
_QUANTITY_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "m": 1e-3,
}  # fmt: skip


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``4Gi``, ``512M``, ``1e9``) in bytes."""
    number = re.match(r"^[0-9]+(\.[0-9]+)?(e[0-9]+)?", quantity)
    if number is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    suffix = quantity[number.end() :]
    return int(float(number.group(0)) * _QUANTITY_SUFFIXES.get(suffix, 1))


class Resources(ApiModel):
    """Compute for the Ray job that runs this resource."""

    cpus: float = Field(1.0, gt=0, description="CPUs per Ray worker (and per task).")
    gpus: float = Field(0.0, ge=0, description="GPUs per Ray worker; > 0 schedules workers on the GPU node pool.")
    memory: str = Field("4Gi", pattern=QUANTITY_PATTERN, description="Memory per Ray worker (Kubernetes quantity).")
    workers: int = Field(1, ge=1, le=1000, description="Number of Ray workers.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the Ray workers must match (e.g. the GPU node pool)."
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations for the Ray worker pods.")
    scheduling_timeout_seconds: int = Field(
        DEFAULT_SCHEDULING_TIMEOUT_S,
        ge=1,
        le=7 * 86400,
        description=(
            "How long the job may wait for Ray to place its tasks or model replicas when no node offers what they "
            "ask for (CPUs, GPUs, memory) or none has it free; status says what it waits for meanwhile, and the "
            "job fails with that reason after this many seconds. Raise it when an autoscaler adds nodes slowly."
        ),
    )

    @property
    def memory_bytes(self) -> int:
        return quantity_bytes(self.memory)


class Condition(ApiModel):
    """A kstatus condition (Ready, Reconciling, Stalled)."""

    model_config = ConfigDict(frozen=False)

    type: str = Field(description="Condition type: Ready, Reconciling or Stalled.")
    status: str = Field(description="True, False or Unknown.")
    reason: str = Field(description="Machine-readable reason in CamelCase.")
    message: str = Field("", description="Human-readable explanation.")
    observed_generation: int | None = Field(None, description="The .metadata.generation this condition is about.")
    last_transition_time: str | None = Field(None, description="When the status last changed (RFC 3339).")


class Progress(ApiModel):
    model_config = ConfigDict(frozen=False)

    percent: int = Field(0, ge=0, le=100, description="Completion in percent.")
    message: str = Field("", description="What the job is doing now.")


class JobInfo(ApiModel):
    model_config = ConfigDict(frozen=False)

    backend: str | None = Field(None, description="Backend that runs the job: local, ray or kuberay.")
    id: str | None = Field(None, description="Ray job submission id (deterministic from uid and generation).")
    dashboard_url: str | None = Field(None, description="Link to the job in the Ray dashboard.")


class Outputs(ApiModel):
    model_config = ConfigDict(frozen=False, extra="allow", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    uri: str | None = Field(None, description="URI of the committed output.")
    summary: dict[str, Any] = Field(
        default_factory=dict,
        description="Summary of the output: shape, bands, times or feature counts.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class UsageStatus(ApiModel):
    """What the last successful run cost, measured by the job (rasterkube.runtime.usage)."""

    model_config = ConfigDict(frozen=False)

    cpu_seconds: float = Field(0.0, ge=0, description="CPU-seconds of the job's driver and block tasks.")
    gpu_seconds: float = Field(0.0, ge=0, description="GPU-seconds Ray reserved for the job's block tasks.")
    peak_memory_bytes: int = Field(0, ge=0, description="Largest resident memory of one process (driver or worker).")
    bytes_read: int = Field(0, ge=0, description="Bytes read from the object store.")
    bytes_written: int = Field(0, ge=0, description="Bytes written to the object store.")
    object_store_requests: int = Field(0, ge=0, description="Requests made to the object store.")
    wall_seconds: float = Field(0.0, ge=0, description="Wall time from the job's start to its commit.")


class Status(ApiModel):
    """Observed state, written by the operator (or the local runner)."""

    model_config = ConfigDict(frozen=False)

    conditions: list[Condition] = Field(default_factory=list, description="kstatus conditions.")
    observed_generation: int | None = Field(None, description="The generation last acted upon.")
    phase: Phase = Field(Phase.PENDING, description="Pending, Waiting, Running, Succeeded or Failed.")
    progress: Progress = Field(default_factory=Progress, description="Progress of the current run.")
    outputs: Outputs | None = Field(None, description="Where the results are and what they hold.")
    job: JobInfo | None = Field(None, description="The Ray job that runs this resource.")
    start_time: str | None = Field(None, description="When the current run started (RFC 3339).")
    completion_time: str | None = Field(None, description="When the current run ended (RFC 3339).")
    usage: UsageStatus | None = Field(None, description="What the last successful run cost (measured).")


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata rasterkube reads; everything else passes through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str = Field(min_length=1, max_length=253, pattern=NAME_PATTERN)
    namespace: str = Field("default", min_length=1, max_length=63, pattern=NAME_PATTERN)
    uid: str | None = None
    generation: int | None = None


SpecT = TypeVar("SpecT", bound=ApiModel)


class Resource(BaseModel, Generic[SpecT]):
    """A whole custom resource: apiVersion, kind, metadata, spec and status."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)

    KIND: ClassVar[Kind]
    api_version: str = Field(API_VERSION)
    kind: str
    metadata: ObjectMeta
    spec: SpecT
    status: Status | None = None

    @model_validator(mode="after")
    def _check_header(self) -> Resource[SpecT]:
        if self.api_version != API_VERSION:
            raise ValueError(f"apiVersion must be {API_VERSION}, got {self.api_version!r}")
        if self.kind != self.KIND.value:
            raise ValueError(f"kind must be {self.KIND.value}, got {self.kind!r}")
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def spec_hash(self) -> str:
        """sha256 of the spec in canonical JSON (defaults filled in, unset fields left out, keys
        sorted): equal for manifests that ask for the same work however they are written, and
        different for any change. Provenance records it; resumed runs key finished blocks by it."""
        text = json.dumps(self.spec.to_wire(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()
