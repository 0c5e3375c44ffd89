"""Spec models of the four kinds (DESIGN §2). Field names are the user-facing contract."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rasterkube.api.common import (
    CEL,
    ApiModel,
    RasterOutput,
    Resource,
    Resources,
    Source,
    SourceField,
    VectorOutput,
    cel,
    exactly_one_cel,
)
from rasterkube.constants import DATA_VAR, Kind

# RE2- and Python-compatible; emptiness ("P" alone) is rejected by a validator and a CEL rule.
ISO_DURATION_PATTERN = r"^P([0-9]+Y)?([0-9]+M)?([0-9]+W)?([0-9]+D)?(T([0-9]+H)?([0-9]+M)?([0-9]+S)?)?$"
DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9:.]+(Z|[+-][0-9]{2}:[0-9]{2})?)?$"
BAND = Annotated[str, Field(min_length=1, max_length=128)]


def _source_kinds_cel(allowed: set[SourceField], kind: Kind) -> list[dict[str, str]]:
    """The CEL rule forbidding source fields this kind cannot read (none if all are allowed)."""
    forbidden = [f.value for f in SourceField if f not in allowed]
    if not forbidden:
        return []
    rule = " && ".join(f"!has(self.source.{f})" for f in forbidden)
    names = ", ".join(sorted(f.value for f in allowed))
    return [cel(rule, f"source: a {kind.value} reads from {names}")]


def _check_source_kinds(source: Source, allowed: set[SourceField], kind: Kind) -> None:
    (field,) = source.set_fields()
    if field not in allowed:
        names = ", ".join(sorted(f.value for f in allowed))
        raise ValueError(f"source.{field.value} is not accepted by a {kind.value}; use one of {names}")


# ----------------------------------------------------------------------------------- Mosaic


class Dataset(StrEnum):
    """Compositing recipes."""

    SENTINEL_2_L2A = "sentinel-2-l2a"
    SENTINEL_2_L2A_BEST = "sentinel-2-l2a-best"
    LANDSAT_C2_L2 = "landsat-c2-l2"


class StacSource(ApiModel):
    """Point a recipe at another STAC API or a static catalog."""

    model_config = ConfigDict(json_schema_extra={CEL: [exactly_one_cel(["api", "catalog"], "stac")]})

    api: str | None = Field(None, min_length=1, description="URL of a STAC API (searched with pystac-client).")
    catalog: str | None = Field(None, min_length=1, description="URI of a static STAC catalog.json (local or s3://).")
    collection: str | None = Field(None, min_length=1, description="Collection id; default: the recipe's collection.")

    @model_validator(mode="after")
    def _one(self) -> StacSource:
        if (self.api is None) == (self.catalog is None):
            raise ValueError("set exactly one of api or catalog")
        return self


class Aoi(ApiModel):
    """Area of interest."""

    model_config = ConfigDict(
        json_schema_extra={
            CEL: [
                exactly_one_cel(["geometry", "bbox", "uri"], "aoi"),
                cel(
                    "!has(self.bbox) || (self.bbox[0] < self.bbox[2] && self.bbox[1] < self.bbox[3])",
                    "aoi.bbox: must be [minLon, minLat, maxLon, maxLat] with min < max",
                ),
            ]
        }
    )

    geometry: dict[str, Any] | None = Field(
        None,
        description="A GeoJSON geometry (Polygon or MultiPolygon) in EPSG:4326.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    bbox: list[float] | None = Field(
        None, min_length=4, max_length=4, description="[minLon, minLat, maxLon, maxLat] in EPSG:4326."
    )
    uri: str | None = Field(
        None,
        min_length=1,
        description="GeoParquet or GeoJSON file; one mosaic per row, plus a mosaic index (GeoParquet).",
    )

    @model_validator(mode="after")
    def _one(self) -> Aoi:
        if sum(v is not None for v in (self.geometry, self.bbox, self.uri)) != 1:
            raise ValueError("set exactly one of geometry, bbox or uri")
        if self.bbox is not None and not (self.bbox[0] < self.bbox[2] and self.bbox[1] < self.bbox[3]):
            raise ValueError("bbox must be [minLon, minLat, maxLon, maxLat] with min < max")
        return self


class TimeRange(ApiModel):
    """Time range and compositing window."""

    model_config = ConfigDict(
        json_schema_extra={
            CEL: [
                cel("self.start < self.end", "time: end must be after start"),
                cel("!has(self.window) || self.window != 'P'", "time.window: give a duration such as P1Y"),
            ]
        }
    )

    start: str = Field(pattern=DATE_PATTERN, description="First day (inclusive), e.g. 2020-01-01.")
    end: str = Field(pattern=DATE_PATTERN, description="Last day (exclusive), e.g. 2024-01-01.")
    window: str | None = Field(
        None,
        pattern=ISO_DURATION_PATTERN,
        description="ISO-8601 duration of each composite, e.g. P1Y (one per year) or P3M. Default: one composite.",
    )

    @model_validator(mode="after")
    def _order(self) -> TimeRange:
        if not self.start < self.end:
            raise ValueError("end must be after start")
        if self.window == "P":
            raise ValueError("window: give a duration such as P1Y")
        return self


class MosaicSpec(ApiModel):
    """A cloud-masked temporal composite of Sentinel-2 or Landsat from STAC into GeoZarr."""

    dataset: Dataset = Field(description="Recipe: sentinel-2-l2a (median), sentinel-2-l2a-best, landsat-c2-l2 (median).")
    stac: StacSource | None = Field(None, description="Another STAC API or static catalog for the recipe.")
    aoi: Aoi = Field(description="Area of interest.")
    time: TimeRange = Field(description="Time range and compositing window.")
    bands: list[BAND] | None = Field(None, min_length=1, description="Bands to composite; default: the recipe's bands.")
    crs: str | None = Field(None, min_length=1, description="Output CRS, e.g. EPSG:32633. Default: native UTM zone.")
    resolution: float | None = Field(None, gt=0, description="Pixel size in CRS units. Default: the dataset's native.")
    max_cloud_cover: float = Field(75.0, ge=0, le=100, description="Skip scenes with more cloud cover (percent).")
    chunk_size: int = Field(512, ge=64, le=4096, description="Zarr chunk size in pixels (y and x).")
    output: RasterOutput = Field(default_factory=RasterOutput, description="Where the mosaic is written.")
    resources: Resources = Field(default_factory=Resources, description="Compute for the job.")


class Mosaic(Resource[MosaicSpec]):
    KIND = Kind.MOSAIC
    kind: str = Kind.MOSAIC.value


# ------------------------------------------------------------------------------- Prediction


class Actor(StrEnum):
    SEMANTIC_SEGMENTATION = "semanticSegmentation"
    CHANGE_DETECTION = "changeDetection"
    REGRESSION = "regression"
    EMBEDDING = "embedding"


class MergeMode(StrEnum):
    CLIP = "clip"
    WEIGHTED_AVERAGE = "weightedAverage"


class DeviceKind(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(StrEnum):
    """Arithmetic the model runs in on the replica (autocast); outputs are float32 either way."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


# fp16 autocast is a CUDA feature (CPU kernels for it are few and slow): the replica must get
# a GPU, which it does only with device auto/cuda and serving.gpusPerReplica > 0.
FP16_NEEDS_GPU = (
    "precision: fp16 runs on CUDA GPUs only; use bf16 or fp32 on CPU, or give the replicas a GPU "
    "(device auto or cuda with serving.gpusPerReplica > 0)"
)


class ModelSpec(ApiModel):
    """The model and how its inputs and outputs map to bands."""

    uri: str = Field(
        min_length=1,
        description="A .pt2 (torch.export) or TorchScript file: local path, s3://, https:// or hf://org/repo/file.",
    )
    actor: Actor = Field(
        Actor.SEMANTIC_SEGMENTATION,
        description=(
            "semanticSegmentation (softmax probabilities), changeDetection (time-stacked channels in), "
            "regression (raw values) or embedding (per-pixel vectors)."
        ),
    )
    features: list[BAND] = Field(min_length=1, description="Source band labels in the model's input order.")
    labels: list[BAND] = Field(min_length=1, description="Output band labels, one per output channel.")


class Serving(ApiModel):
    """How Ray Serve hosts the model."""

    model_config = ConfigDict(
        json_schema_extra={
            CEL: [
                cel(
                    "!has(self.maxReplicas) || self.maxReplicas >= self.replicas",
                    "serving.maxReplicas: must be at least replicas",
                )
            ]
        }
    )

    replicas: int = Field(1, ge=1, le=512, description="Model replicas (the minimum when maxReplicas is set).")
    max_replicas: int | None = Field(
        None, ge=1, le=512, description="Autoscale between replicas and maxReplicas on queued requests."
    )
    cpus_per_replica: float | None = Field(
        None,
        gt=0,
        description=(
            "CPUs per replica; torch uses this many threads (Ray would otherwise set 1). Unset: sized when the run "
            "starts, the Ray cluster's CPUs shared by the replicas (whole cores, at most one node's), or 1 for "
            "a GPU replica."
        ),
    )
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica; fractions share a GPU.")
    share_deployment: bool = Field(
        True, description="Reuse a running deployment of the same model and serving settings; else one per run."
    )
    idle_timeout_seconds: int = Field(
        120,
        ge=0,
        le=86400,
        description=(
            "A shared deployment scales to zero replicas after this many seconds without requests, giving its "
            "CPUs/GPUs back (0: keep its replicas running)."
        ),
    )

    @model_validator(mode="after")
    def _replicas(self) -> Serving:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"maxReplicas ({self.max_replicas}) must be at least replicas ({self.replicas})")
        return self


PREDICTION_SOURCES = {SourceField.MOSAIC_REF, SourceField.URI}


class PredictionSpec(ApiModel):
    """Patch-batched PyTorch inference over a raster, hosted by Ray Serve."""

    model_config = ConfigDict(
        json_schema_extra={
            CEL: [
                cel("self.clipSize * 2 < self.patchSize", "clipSize: must be less than patchSize/2"),
                cel(
                    "!has(self.serving) || !has(self.serving.gpusPerReplica) || self.serving.gpusPerReplica == 0.0"
                    " || (has(self.resources) && has(self.resources.gpus) && self.resources.gpus > 0.0)",
                    "resources.gpus: serving.gpusPerReplica needs GPU workers; set resources.gpus (e.g. 1)",
                ),
                cel(
                    "!has(self.precision) || self.precision != 'fp16' || ((!has(self.device) || self.device != 'cpu')"
                    " && has(self.serving) && has(self.serving.gpusPerReplica) && self.serving.gpusPerReplica > 0.0)",
                    FP16_NEEDS_GPU,
                ),
                *_source_kinds_cel(PREDICTION_SOURCES, Kind.PREDICTION),
            ]
        }
    )

    source: Source = Field(description="The input raster.")
    model: ModelSpec = Field(description="The model.")
    patch_size: int = Field(256, ge=8, le=4096, description="Model input size in pixels (square patches).")
    clip_size: int = Field(32, ge=0, description="Pixels cut from each patch edge before merging; < patchSize/2.")
    merge_mode: MergeMode = Field(MergeMode.CLIP, description="clip (keep patch centres) or weightedAverage (blend).")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Patches per model call (Ray Serve batch).")
    xy_block_multiplier: int = Field(4, ge=1, le=64, description="Zarr chunks per block side scheduled as one task.")
    device: DeviceKind = Field(DeviceKind.AUTO, description="auto (CUDA when present), cpu or cuda.")
    serving: Serving = Field(default_factory=Serving, description="Ray Serve hosting.")
    # After device and serving: its validator reads them.
    precision: Precision = Field(
        Precision.FP32,
        description=(
            "Arithmetic of the model on the replica (torch autocast): fp32, bf16 (CPU or GPU; fast on CPUs with "
            "AVX512-BF16/AMX and on GPUs) or fp16 (CUDA only). Outputs are float32; bf16 results are within 3e-2 "
            "of the fp32 output's largest magnitude in rasterkube's tests."
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "torch.compile the model once per replica (a warm-up call at start, then cached on disk): faster "
            "inference after a start that takes seconds to minutes. torch.export (.pt2) models only; needs a "
            "C++ compiler on CPU replicas (a C compiler on GPU ones)."
        ),
    )
    output: RasterOutput = Field(default_factory=RasterOutput, description="Where predictions are written.")
    resources: Resources = Field(default_factory=Resources, description="Compute for the job.")

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: Precision, info: ValidationInfo) -> Precision:
        if v != Precision.FP16 or not {"device", "serving"} <= info.data.keys():
            return v  # (an invalid device or serving is reported on its own)
        if info.data["device"] == DeviceKind.CPU or info.data["serving"].gpus_per_replica <= 0:
            raise ValueError(FP16_NEEDS_GPU.removeprefix("precision: "))
        return v

    @model_validator(mode="after")
    def _rules(self) -> PredictionSpec:
        if self.clip_size * 2 >= self.patch_size:
            raise ValueError(f"clipSize ({self.clip_size}) must be less than patchSize/2 ({self.patch_size / 2:g})")
        _check_source_kinds(self.source, PREDICTION_SOURCES, Kind.PREDICTION)
        if self.serving.gpus_per_replica > 0 and self.resources.gpus <= 0:
            # KubeRay sizes the job's workers from resources: replicas asking for GPUs on
            # GPU-less workers would never start.
            raise ValueError(
                "resources.gpus: serving.gpusPerReplica needs GPU workers; set resources.gpus (e.g. 1)"
            )
        return self


class Prediction(Resource[PredictionSpec]):
    KIND = Kind.PREDICTION
    kind: str = Kind.PREDICTION.value


# ------------------------------------------------------------------------------ ChangeScore


class ChangeMethod(StrEnum):
    DIFFERENCE = "difference"
    LOO_MEDOID = "looMedoid"
    CLUSTER_TRANSITION = "clusterTransition"


class Distance(StrEnum):
    EUCLIDEAN = "euclidean"
    COSINE = "cosine"
    ALPHA_EARTH_COSINE = "alphaEarthCosine"


class ClusteringMethod(StrEnum):
    KMEANS = "kmeans"
    SPECTRAL = "spectral"


class Clustering(ApiModel):
    k: int = Field(5, ge=2, le=64, description="Number of clusters.")
    method: ClusteringMethod = Field(ClusteringMethod.KMEANS, description="kmeans or spectral.")


class Selector(ApiModel):
    """A window of the source: pixel index ranges, or a bounding box."""

    model_config = ConfigDict(
        json_schema_extra={
            CEL: [
                cel("!(has(self.bbox) && (has(self.x) || has(self.y)))", "selector: use either bbox or x/y ranges"),
                cel("!has(self.x) || self.x[0] < self.x[1]", "selector.x: must be [start, stop) with start < stop"),
                cel("!has(self.y) || self.y[0] < self.y[1]", "selector.y: must be [start, stop) with start < stop"),
            ]
        }
    )

    x: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=2, max_length=2, description="Column index range [start, stop)."
    )
    y: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description='Row index range [start, stop). Quote the key ("y":) in YAML: YAML 1.1 reads a bare y as true.',
    )
    bbox: list[float] | None = Field(
        None, min_length=4, max_length=4, description="[minx, miny, maxx, maxy] in bboxCrs."
    )
    bbox_crs: str = Field("EPSG:4326", min_length=1, description="CRS of bbox.")

    @model_validator(mode="after")
    def _rules(self) -> Selector:
        if self.bbox is not None and (self.x is not None or self.y is not None):
            raise ValueError("use either bbox or x/y ranges")
        for axis in ("x", "y"):
            rng = getattr(self, axis)
            if rng is not None and not rng[0] < rng[1]:
                raise ValueError(f"{axis} must be [start, stop) with start < stop")
        if self.bbox is not None and not (self.bbox[0] < self.bbox[2] and self.bbox[1] < self.bbox[3]):
            raise ValueError("bbox must be [minx, miny, maxx, maxy] with min < max")
        return self


CHANGE_SOURCES = {SourceField.MOSAIC_REF, SourceField.PREDICTION_REF, SourceField.URI}


class ChangeScoreSpec(ApiModel):
    """Per-pixel temporal change scores over a raster time series."""

    model_config = ConfigDict(json_schema_extra={CEL: _source_kinds_cel(CHANGE_SOURCES, Kind.CHANGE_SCORE)})

    source: Source = Field(description="The input time series (a Mosaic, an embedding Prediction or a store).")
    data_var: str = Field(DATA_VAR, min_length=1, description="Data variable of the source store.")
    bands: list[BAND] | None = Field(
        None, min_length=1, description="Bands of dataVar to compare; default: all bands."
    )
    methods: list[ChangeMethod] = Field(
        [ChangeMethod.LOO_MEDOID],
        min_length=1,
        max_length=len(ChangeMethod),
        description="difference (to the previous step), looMedoid (to the medoid of the other steps), clusterTransition.",
    )
    distance: Distance = Field(
        Distance.COSINE, description="euclidean, cosine, or alphaEarthCosine (de-quantized int8 AlphaEarth embeddings)."
    )
    robust_time_zscore: bool = Field(
        False,
        alias="robustTimeZScore",
        description="Also write robust z-scores of each score through time: (x − median) / (1.4826·MAD)."
    )
    selector: Selector | None = Field(None, description="Only score this window of the source.")
    clustering: Clustering = Field(default_factory=Clustering, description="Settings of clusterTransition.")
    xy_block_multiplier: int = Field(4, ge=1, le=64, description="Zarr chunks per block side scheduled as one task.")
    output: RasterOutput = Field(default_factory=RasterOutput, description="Where scores are written.")
    resources: Resources = Field(default_factory=Resources, description="Compute for the job.")

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[ChangeMethod]) -> list[ChangeMethod]:
        if len(set(v)) != len(v):
            raise ValueError("list each method once")
        return v

    @model_validator(mode="after")
    def _rules(self) -> ChangeScoreSpec:
        _check_source_kinds(self.source, CHANGE_SOURCES, Kind.CHANGE_SCORE)
        return self


class ChangeScore(Resource[ChangeScoreSpec]):
    KIND = Kind.CHANGE_SCORE
    kind: str = Kind.CHANGE_SCORE.value


# ---------------------------------------------------------------------------- Vectorization


class VectorizeMethod(StrEnum):
    RASTERIO = "rasterio"


VECTORIZE_SOURCES = {SourceField.PREDICTION_REF, SourceField.CHANGE_SCORE_REF, SourceField.MOSAIC_REF, SourceField.URI}


class VectorizationSpec(ApiModel):
    """Thresholded rasters to polygons with statistics, as GeoParquet."""

    model_config = ConfigDict(
        json_schema_extra={
            CEL: [
                cel("self.connectivity == 4 || self.connectivity == 8", "connectivity: must be 4 or 8"),
                *_source_kinds_cel(VECTORIZE_SOURCES, Kind.VECTORIZATION),
            ]
        }
    )

    source: Source = Field(description="The raster to vectorize (a Prediction, a ChangeScore, a Mosaic or a store).")
    features: list[BAND] = Field(min_length=1, description="Bands to vectorize, each on its own (the label column).")
    threshold: float = Field(0.5, description="Pixels with values above the threshold become foreground.")
    method: VectorizeMethod = Field(VectorizeMethod.RASTERIO, description="Polygonizer: rasterio.")
    stats: bool = Field(True, description="Per-polygon statistics: score_mean/min/max/std, area_m2, pixel_count.")
    medial_skeletonize: bool = Field(False, description="Also output centre lines of the polygons (LineStrings).")
    simplify_tolerance: float = Field(0.0, ge=0, description="Topology-preserving simplification, in CRS units.")
    min_area: float = Field(0.0, ge=0, description="Drop polygons smaller than this area in m².")
    connectivity: int = Field(4, description="Pixel connectivity: 4 or 8.")
    output: VectorOutput = Field(default_factory=VectorOutput, description="Where features are written.")
    resources: Resources = Field(default_factory=Resources, description="Compute for the job.")

    @field_validator("connectivity")
    @classmethod
    def _conn(cls, v: int) -> int:
        if v not in (4, 8):
            raise ValueError("must be 4 or 8")
        return v

    @model_validator(mode="after")
    def _rules(self) -> VectorizationSpec:
        _check_source_kinds(self.source, VECTORIZE_SOURCES, Kind.VECTORIZATION)
        return self


class Vectorization(Resource[VectorizationSpec]):
    KIND = Kind.VECTORIZATION
    kind: str = Kind.VECTORIZATION.value


RESOURCE_MODELS: dict[Kind, type[Resource[Any]]] = {
    Kind.MOSAIC: Mosaic,
    Kind.PREDICTION: Prediction,
    Kind.CHANGE_SCORE: ChangeScore,
    Kind.VECTORIZATION: Vectorization,
}

SHORT_NAMES: dict[Kind, list[str]] = {
    Kind.MOSAIC: ["mos"],
    Kind.PREDICTION: ["pred"],
    Kind.CHANGE_SCORE: ["cs", "chg"],
    Kind.VECTORIZATION: ["vec"],
}

