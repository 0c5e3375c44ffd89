"""The Prediction job: patch-batched inference over a raster, hosted by Ray Serve.

Orchestration and I/O only. Each block task reads its block with a ``clipSize`` halo, pads,
cuts patches (:mod:`rasterkube.predict.windows`), sends them in batches of ``maxBatchSize`` to
the model deployment (:mod:`rasterkube.predict.serving`), merges the predictions back and
writes the block. Blocks are chunk-aligned, so tasks never share an output chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import numpy as np
import ray

from rasterkube import geozarr, provenance
from rasterkube.api import Prediction, PredictionSpec
from rasterkube.api.kinds import DeviceKind, MergeMode
from rasterkube.constants import DATA_VAR
from rasterkube.errors import UserError
from rasterkube.grid import Window
from rasterkube.jobs.context import (
    JobContext,
    JobRequest,
    JobResult,
    commit_store,
    open_stage,
    raster_summary,
    source_version,
)
from rasterkube.predict import actors, models, serving, stages, windows
from rasterkube.runtime import executor
from rasterkube.runtime.blocks import plan_blocks
from rasterkube.runtime.executor import run_blocks
from rasterkube.runtime.progress import Reporter, ScaledReporter

# Block tasks reserve no CPU: they mostly wait for the model replicas, which hold the CPUs
# (and GPUs) that inference needs. A reservation would let the idle replicas of a shared
# deployment starve them (a hang); their number is bounded by run_blocks' in-flight limit.
TASK_CPUS: Final = 0.0
PAD_MODE: Final = "reflect"
EMBEDDED_IDLE_S: Final = 5.0
BYTES_F32: Final = 4
# Refuse settings whose buffers alone would take more than this share of a worker's memory:
# the model's activations, Ray and Python need the rest.
MEMORY_SHARE: Final = 0.5
# Input plus output of one batch; activations of a conv net are several times larger.
MAX_BATCH_IO_BYTES: Final = 1 << 30
DEPLOY_PERCENT: Final = 5
MULTISCALE_PERCENT: Final = 88
BLOCKS_PERCENT: Final = 95
COMMIT_PERCENT: Final = 97


@dataclass(frozen=True)
class Prepared:
    """What preflight learned; ``run`` uses it without fetching or loading again."""

    info: geozarr.StoreInfo
    feature_indices: tuple[int, ...]
    fetched: models.FetchedModel
    signature: models.Signature
    plan: actors.ActorPlan


@dataclass(frozen=True)
class BlockParams:
    """Everything a block task needs; put in the Ray object store once."""

    source: geozarr.SourceLayout
    feature_indices: tuple[int, ...]
    image_shape: tuple[int, int]
    patch_size: int
    clip_size: int
    merge_mode: str
    max_batch_size: int
    time_stacked: bool
    out_channels: int
    app: str
    out_uri: str
    run: str = ""  # names this run's stage timings (stages.record)


def block_buffer_bytes(spec: PredictionSpec, block_side: int, n_inputs: int, in_channels: int, out_channels: int) -> int:
    """Peak bytes a block task holds: input with halo, patches and predictions of every input."""
    p, c = spec.patch_size, spec.clip_size
    stride = p - 2 * c
    side = block_side + 2 * c
    n_patches = (-(-block_side // stride)) ** 2
    read = n_inputs * in_channels * side * side * BYTES_F32
    patches = n_patches * in_channels * p * p * BYTES_F32
    preds = n_inputs * n_patches * out_channels * p * p * BYTES_F32
    merged = out_channels * side * side * 8  # float64 accumulator of weightedAverage
    return read + patches + preds + merged


def check_memory(spec: PredictionSpec, chunk: int, plan: actors.ActorPlan, n_times: int, out_channels: int) -> None:
    """Refuse out-of-memory-prone settings before anything runs."""
    batch_io = spec.max_batch_size * (plan.in_channels + out_channels) * spec.patch_size**2 * BYTES_F32
    if batch_io > MAX_BATCH_IO_BYTES:
        fits = max(1, MAX_BATCH_IO_BYTES // ((plan.in_channels + out_channels) * spec.patch_size**2 * BYTES_F32))
        raise UserError(
            f"spec.maxBatchSize: a batch of {spec.max_batch_size} patches of {spec.patch_size} px with "
            f"{plan.in_channels} channels in and {out_channels} out holds {batch_io / 2**30:.1f} GiB before the "
            f"model's activations; use maxBatchSize {fits} or less"
        )
    limit = spec.resources.memory_bytes * MEMORY_SHARE
    n_inputs = 1 if plan.time_stacked else n_times
    need = block_buffer_bytes(spec, chunk * spec.xy_block_multiplier, n_inputs, plan.in_channels, out_channels)
    if need > limit:
        raise UserError(
            f"spec.xyBlockMultiplier: a block of {spec.xy_block_multiplier}x{chunk} px needs about "
            f"{need / 2**30:.1f} GiB of buffers, more than half of resources.memory ({spec.resources.memory}); "
            "lower xyBlockMultiplier or raise resources.memory"
        )


def preflight(resource: Prediction, request: JobRequest) -> Prepared:
    """All checks that need the source store and the model; nothing is written."""
    spec, source_uri = resource.spec, request.source_uri
    if source_uri is None:
        raise UserError("spec.source: no store to read (refs must be resolved before the job runs)")
    try:
        info = geozarr.describe(source_uri, DATA_VAR)
        feature_idx = info.band_indices(spec.model.features, field_name="model.features")
    except geozarr.StoreError as exc:
        raise exc.in_spec(spec.source.field_path) from None
    if spec.device == DeviceKind.CUDA and spec.serving.gpus_per_replica <= 0:
        raise UserError("spec.serving.gpusPerReplica: device cuda needs GPUs; set gpusPerReplica (e.g. 1 or 0.5)")
    fetched = models.fetch(spec.model.uri)
    n_feat, n_times = len(spec.model.features), len(info.times)
    # TorchScript carries no shapes: probe it with the channels the actor will feed it.
    probe = n_feat * n_times if spec.model.actor == actors.Actor.CHANGE_DETECTION else n_feat
    loaded = models.load(fetched.path, spec.model.uri, probe_channels=probe, probe_patch=spec.patch_size)
    sig = loaded.signature
    plan = actors.plan(spec.model.actor, n_feat, n_times, sig.in_channels)
    actors.check_labels(spec.model.labels, sig.out_channels)
    if sig.patch is not None and sig.patch != spec.patch_size:
        raise UserError(
            f"spec.patchSize: the model was exported for {sig.patch}x{sig.patch} px inputs; set patchSize: {sig.patch}"
        )
    check_memory(spec, info.chunks[2], plan, n_times, sig.out_channels)
    return Prepared(info, tuple(feature_idx), fetched, sig, plan)


def _model_inputs(x: np.ndarray, time_stacked: bool) -> list[np.ndarray]:
    """``(T, C, h, w)`` read → the ``(C', h, w)`` images the model sees, one per output step."""
    if time_stacked:
        return [windows.stack_time_major(x)]
    return [x[t] for t in range(x.shape[0])]


def predict_block(block: Window, p: BlockParams) -> int:
    """Predict one output block (a Ray task). Returns the number of patches predicted."""
    times = stages.StageTimes()
    halo = windows.halo_block(block, p.clip_size, p.image_shape)
    with times.timed(stages.READ):
        x = geozarr.read_block(p.source, halo.read, p.feature_indices).astype(np.float32, copy=False)
    origins = windows.patch_origins(*block.shape, p.patch_size, p.clip_size)
    inner = halo.block_in_read.slices
    predictor = serving.ServePredictor(p.app)
    pending = []
    for image in _model_inputs(x, p.time_stacked):
        with times.timed(stages.CUT):
            valid = windows.valid_pixels(image[(slice(None), *inner)])
            padded = windows.pad_halo(windows.fill_invalid(image), halo, PAD_MODE, patch_size=p.patch_size)
            patches = windows.cut_patches(padded, origins, p.patch_size)
        # Every batch of every input in flight before the first result is awaited: the
        # replica's queue stays full while this task waits.
        with times.timed(stages.SEND):
            responses = [predictor.submit(patches[i : i + p.max_batch_size]) for i in range(0, len(patches), p.max_batch_size)]
        pending.append((valid, responses))
    out_shape = (p.out_channels, *block.shape)
    outs = []
    for valid, responses in pending:
        with times.timed(stages.RECEIVE):
            results = [predictor.result(r) for r in responses]
        with times.timed(stages.MERGE):
            preds = np.concatenate(results)
            if p.merge_mode == MergeMode.CLIP:
                merged = windows.merge_clip(preds, origins, out_shape, p.clip_size)
            else:
                merged = windows.merge_weighted(preds, origins, out_shape, p.patch_size, p.clip_size)
            outs.append(windows.with_nodata(merged, valid).astype(np.float32, copy=False))
    with times.timed(stages.WRITE):
        geozarr.write_region(p.out_uri, DATA_VAR, block, np.stack(outs))
    _record(times, predictor, block, len(origins) * len(outs), p.run)
    return len(origins) * len(outs)


def _record(times: stages.StageTimes, predictor: serving.ServePredictor, block: Window, patches: int, run: str) -> None:
    times.add(stages.MODEL, predictor.model_cpu_s, predictor.model_wall_s)
    times.count("patches", patches)
    times.count("pixels", block.shape[0] * block.shape[1])
    times.count("blocks", 1)
    stages.record(times, run)


def idle_timeout(requested_s: float, embedded_ray: bool) -> float:
    """Seconds an idle shared deployment keeps its replicas.

    An embedded Ray (``rasterkube run``, the demo) lives only as long as its process, so no later
    run can reuse the replicas; the other resources of the same run need their CPUs instead.
    """
    return min(float(requested_s), EMBEDDED_IDLE_S) if embedded_ray else float(requested_s)


def cluster_cpus() -> tuple[float, float]:
    """(CPUs of the Ray cluster, CPUs of its largest alive node) now."""
    nodes = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return float(ray.cluster_resources().get("CPU", 0.0)), float(max(nodes, default=0.0))


def serve_config(spec: PredictionSpec, prepared: Prepared, cpus: tuple[float, float]) -> serving.ServeConfig:
    """The deployment's settings; ``cpus`` (:func:`cluster_cpus`) sizes an unset cpusPerReplica."""
    fetched = prepared.fetched
    sv = spec.serving
    # A local file is handed to replicas by absolute path; remote ones by URI (fetched there).
    uri = spec.model.uri if models.is_remote(models.resolve_uri(spec.model.uri)) else str(fetched.path)
    return serving.ServeConfig(
        model_uri=uri,
        model_sha256=fetched.sha256,
        softmax=actors.applies_softmax(spec.model.actor),
        device=str(spec.device),
        max_batch_size=spec.max_batch_size,
        replicas=spec.serving.replicas,
        max_replicas=spec.serving.max_replicas,
        cpus_per_replica=serving.replica_cpus(sv.cpus_per_replica, sv.replicas, sv.max_replicas, sv.gpus_per_replica, *cpus),
        gpus_per_replica=spec.serving.gpus_per_replica,
        idle_timeout_s=idle_timeout(spec.serving.idle_timeout_seconds, executor.embedded()),
        probe_channels=prepared.plan.in_channels if prepared.signature.format == models.FORMAT_TORCHSCRIPT else None,
    )


def lineage(spec: PredictionSpec, prepared: Prepared, source_uri: str) -> str:
    """processing:lineage: the model (by content) and the input, in a sentence."""
    return (f"{spec.model.actor} model {spec.model.uri} (sha256 {prepared.fetched.sha256}) applied to "
            f"{', '.join(spec.model.features)} of {source_uri} in {spec.patch_size} px patches ({spec.merge_mode} merge)")  # fmt: skip


def run(resource: Prediction, ctx: JobContext, reporter: Reporter, prepared: Prepared) -> JobResult:
    spec, request = resource.spec, ctx.request
    assert request.source_uri is not None
    info, plan, sig = prepared.info, prepared.plan, prepared.signature
    out_times, extra_coords = actors.output_times(plan, info.times)
    stage = open_stage(resource, request.output_uri, source=source_version(request), model=prepared.fetched.sha256)
    config = serve_config(spec, prepared, cluster_cpus())
    app = config.app_name(spec.serving.share_deployment, request.run_id)
    try:
        out = geozarr.create(
            stage.uri,
            info.grid,
            out_times,
            spec.model.labels,
            dtype="float32",
            chunk_size=info.chunks[2],
            attrs={
                "rasterkube:kind": resource.kind,
                "rasterkube:source": request.source_uri,
                "rasterkube:model": spec.model.uri,
                "rasterkube:model_sha256": prepared.fetched.sha256,
                "rasterkube:actor": str(spec.model.actor),
                "rasterkube:features": list(spec.model.features),
            },
            extra_coords=extra_coords,
            write=not stage.resumed,
        )
        stage.begin()
        serving.check_capacity(config, TASK_CPUS, ray.cluster_resources())
        reporter.progress(1, f"deploying model {prepared.fetched.short_id} on Ray Serve ({app})")
        share = spec.serving.share_deployment
        reused = serving.deploy(config, app, share, on_wait=lambda msg, why: reporter.progress(2, msg, reason=why))
        reporter.progress(DEPLOY_PERCENT, "reusing running deployment" if reused else "model deployed")
        assert info.layout is not None
        params = BlockParams(
            source=info.layout,
            feature_indices=prepared.feature_indices,
            image_shape=info.grid.shape,
            patch_size=spec.patch_size,
            clip_size=spec.clip_size,
            merge_mode=str(spec.merge_mode),
            max_batch_size=spec.max_batch_size,
            time_stacked=plan.time_stacked,
            out_channels=sig.out_channels,
            app=app,
            out_uri=stage.uri,
            run=request.run_id,
        )
        blocks = plan_blocks(info.grid.shape, out.chunks[2:], spec.xy_block_multiplier)
        item = provenance.validated(provenance.raster_item(
            provenance.from_source_store(resource, request, lineage(spec, prepared, request.source_uri),
                                         model_uri=spec.model.uri, model_sha256=prepared.fetched.sha256),  # fmt: skip
            provenance.item_id(resource.kind, resource.namespace, resource.name),
            # A change-detection step spans its whole input series: the item's interval too.
            provenance.RasterOutput(info.grid, out.times, out.bands, str(out.dtype), title="model predictions",
                                    end=info.times.max() if plan.time_stacked else None),  # fmt: skip
        ))
        block_phase = time.perf_counter()
        patches = run_blocks(
            predict_block,
            blocks,
            params,
            num_cpus=TASK_CPUS,
            max_in_flight=ctx.max_in_flight,
            reporter=ScaledReporter(
                reporter, DEPLOY_PERCENT, MULTISCALE_PERCENT if spec.output.multiscales else BLOCKS_PERCENT
            ),
            message="predicting blocks",
            ledger=stage.ledger,
            finished=stage.finished,
        )
        block_phase = time.perf_counter() - block_phase
        levels = commit_store(
            stage,
            request.output_uri,
            reporter,
            multiscales=spec.output.multiscales,
            pyramid_percent=(MULTISCALE_PERCENT, BLOCKS_PERCENT),
            commit_percent=COMMIT_PERCENT,
            item=item,
            max_in_flight=ctx.max_in_flight,
        )
    except UserError:
        stage.discard()  # the same spec would fail the same way: nothing to resume
        raise
    # Any other failure (a fault, an interrupt) keeps the staging: the next run resumes it.
    finally:
        if not spec.serving.share_deployment:
            serving.delete(app)  # a per-run deployment ends with its run
    summary = raster_summary(out, len(blocks), stage.reused(blocks), patches=int(sum(patches)), deployment=app, deploymentReused=reused)
    timings = stages.collect(request.run_id)
    if timings is not None:
        timings.count(stages.BLOCK_PHASE_S, block_phase)
        summary["stages"] = timings.to_dict()
    if levels is not None:
        summary["multiscales"] = [list(g.shape) for g in levels]
    return JobResult(uri=request.output_uri, summary=summary)
