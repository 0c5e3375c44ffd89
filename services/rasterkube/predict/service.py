"""The Prediction job: patch-batched inference over a raster, hosted by Ray Serve.

Orchestration and I/O only. Each block task reads its block with a ``clipSize`` halo, pads,
cuts patches (:mod:`rasterkube.predict.windows`), sends them in batches of ``maxBatchSize`` to
the model deployment (:mod:`rasterkube.predict.serving`), merges the predictions back and
writes the block. Blocks are chunk-aligned, so tasks never share an output chunk.

Hosting stays Ray Serve for every Prediction, shared or not. Running the model inside the
block workers (Ray actors holding it, as Ray Data does) could only save what Serve costs
between a block task and its replica, and that was measured small (bench/bench_pipeline.py,
4096² px light-model case: request/reply transfer on both sides plus the replica's own
overhead 0.035 core-s/Mpx against 1.46 for the model, replica busy 96 % of the block phase),
while Serve gives sharing between runs, fractional GPUs and autoscaling for free.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

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
from rasterkube.predict import actors, inference, models, serving, stages, windows
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
#: Batches a block task keeps at the model before it waits for the oldest: enough to cover
#: reading and cutting its next strip, few enough that its buffers stay a few batches.
MAX_BATCHES_IN_FLIGHT: Final = 8


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
    chunk: int = 0  # rows of a strip (the store's chunk rows); 0: the whole block at once
    run: str = ""  # names this run's stage timings (stages.record)


def block_buffer_bytes(spec: PredictionSpec, block_side: int, n_inputs: int, in_channels: int, out_channels: int) -> int:
    """Peak bytes a block task holds (:class:`_BlockPipeline`): the padded input frame of every
    input, the batches in flight with their predictions, and the output (or the float64 sums
    of weightedAverage). Patches are not held: they go to the model a batch at a time."""
    p, c = spec.patch_size, spec.clip_size
    side = block_side + 2 * c
    frame = n_inputs * in_channels * side * side * BYTES_F32
    batches = (MAX_BATCHES_IN_FLIGHT + 1) * spec.max_batch_size * (in_channels + out_channels) * p * p * BYTES_F32
    if spec.merge_mode == MergeMode.CLIP:
        merged = n_inputs * out_channels * block_side * block_side * BYTES_F32
    else:
        merged = (n_inputs * out_channels + 1) * side * side * 8
    return frame + batches + merged


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
    if spec.compile:
        check_compile(spec, sig)
    return Prepared(info, tuple(feature_idx), fetched, sig, plan)


def check_compile(spec: PredictionSpec, sig: models.Signature) -> None:
    """spec.compile needs an exported program and a compiler. The compiler is looked for here,
    on the job's driver: the chart runs the driver and the replicas in one image (a replica
    checks again where it compiles, for clusters where they differ)."""
    if sig.format != models.FORMAT_PT2:
        raise inference.CompileError(inference.COMPILE_TORCHSCRIPT)
    # A replica on device auto with GPUs asked for compiles for CUDA; otherwise for the CPU.
    on_gpu = spec.device == DeviceKind.CUDA or (spec.device == DeviceKind.AUTO and spec.serving.gpus_per_replica > 0)
    inference.check_toolchain(inference.CUDA if on_gpu else inference.CPU, "the job's machine")


def _model_inputs(x: np.ndarray, time_stacked: bool) -> np.ndarray:
    """``(T, C, h, w)`` read → ``(n, C', h, w)``: the images the model sees, one per output step."""
    return windows.stack_time_major(x)[None] if time_stacked else x


class _BlockPipeline:
    """One block streamed through the model (issue 15): the block is read strip by strip (its
    chunk rows); a patch row is cut straight into the batch buffer as soon as its rows are
    in, each full batch goes to the replica at once (through the object store), results are
    merged as they come back and every chunk row of output is written as soon as it is final.
    So the replica gets its first batch after one strip, not the whole block, and reading,
    cutting, merging and writing overlap with inference; no patch array, no list of
    predictions, no concatenation is held. Outputs equal those of cutting the whole padded
    block at once (same frame, same patch grid, same merge order)."""

    def __init__(self, block: Window, p: BlockParams, times: stages.StageTimes) -> None:
        self.block, self.p, self.times = block, p, times
        self.halo = windows.halo_block(block, p.clip_size, p.image_shape)
        self.origins = windows.patch_origins(*block.shape, p.patch_size, p.clip_size)
        self.rows = sorted({y for y, _ in self.origins})
        self.by_row: dict[int, list[int]] = {}
        for index, (y, _) in enumerate(self.origins):
            self.by_row.setdefault(y, []).append(index)
        hp, wp = self.halo.padded_shape
        # A block smaller than one patch is padded whole (enlarged to the patch size).
        whole = min(hp, wp) < p.patch_size
        self.strips = [(0, self.halo.read.shape[0])] if whole else windows.strip_rows(self.halo, p.chunk)
        step = p.chunk or block.shape[0]
        self.out_strips = [(a, min(a + step, block.shape[0])) for a in range(0, block.shape[0], step)]
        self.weighted = p.merge_mode != MergeMode.CLIP
        self.window = windows.blend_window(p.patch_size, p.clip_size) if self.weighted else None
        self.predictor = serving.ServePredictor(p.app)
        self.in_flight: deque[tuple[Any, list[tuple[int, int]]]] = deque()
        self.cut_rows = 0  # patch rows (of self.rows) cut whole, every input
        self.merged_rows = 0  # patch rows fully merged, every input
        self.left = {y: 0 for y in self.rows}  # patches of a row not merged yet
        self.written = 0  # output strips written
        self.batch: np.ndarray | None = None
        self.slots: list[tuple[int, int]] = []

    def run(self) -> int:
        p, halo = self.p, self.halo
        top = halo.pad[0][0]
        ready, top_padded = 0, False
        for number, (a, b) in enumerate(self.strips):
            last = number == len(self.strips) - 1
            with self.times.timed(stages.READ):
                window = Window(halo.read.y0 + a, halo.read.y0 + b, halo.read.x0, halo.read.x1)
                x = _model_inputs(geozarr.read_block(p.source, window, p.feature_indices).astype(np.float32, copy=False), p.time_stacked)
            with self.times.timed(stages.CUT):
                if number == 0:
                    self._allocate(x)
                # One finiteness pass gives the nodata mask, and a copy with NaN filled only
                # where there is NaN (most strips have none).
                finite = np.isfinite(x)
                self._valid(finite, a, b)
                filled = x if finite.all() else windows.fill_invalid(x)
                for i in range(len(filled)):
                    if len(self.strips) == 1:
                        self.frame[i] = windows.pad_halo(filled[i], halo, PAD_MODE, patch_size=p.patch_size)
                    else:
                        self.frame[i][:, top + a : top + b] = windows.pad_frame_cols(filled[i], halo, PAD_MODE)
                if len(self.strips) > 1 and not top_padded and b >= windows.frame_top_rows(halo):
                    top_padded = True
                    for f in self.frame:
                        windows.pad_frame_top(f, halo, PAD_MODE)
                if last and len(self.strips) > 1:
                    for f in self.frame:
                        windows.pad_frame_bottom(f, halo, PAD_MODE)
                ready = self.frame.shape[2] if last else (top + b if top_padded else 0)
            while self.cut_rows < len(self.rows) and self.rows[self.cut_rows] + p.patch_size <= ready:
                self._cut_row(self.rows[self.cut_rows])
                self.cut_rows += 1
        if self.slots:
            self._submit()  # the block's last, partial batch: Serve merges it with other blocks'
        while self.in_flight:
            self._harvest()
        if self.written != len(self.out_strips):
            raise RuntimeError(f"block {self.block}: {len(self.out_strips) - self.written} output rows never final")
        return len(self.origins) * len(self.frame)

    def _allocate(self, x: np.ndarray) -> None:
        p = self.p
        n, c = x.shape[:2]
        hp, wp = self.halo.padded_shape
        hp, wp = max(hp, p.patch_size), max(wp, p.patch_size)
        self.frame = np.empty((n, c, hp, wp), dtype=np.float32)
        self.valid = np.empty((n, *self.block.shape), dtype=bool)
        if self.weighted:
            self.acc = np.zeros((n, p.out_channels, hp, wp), dtype=np.float64)
            self.weight = np.zeros((hp, wp), dtype=np.float64)
        else:
            self.out = np.empty((n, p.out_channels, *self.block.shape), dtype=np.float32)

    def _valid(self, finite: np.ndarray, a: int, b: int) -> None:
        """Valid pixels (every band finite, as windows.valid_pixels) of the block rows in read rows [a, b)."""
        inner = self.halo.block_in_read
        r0, r1 = max(a, inner.y0), min(b, inner.y1)
        if r1 > r0:
            rows = finite[:, :, r0 - a : r1 - a, inner.x0 : inner.x1]
            self.valid[:, r0 - inner.y0 : r1 - inner.y0] = rows.all(axis=1)

    def _cut_row(self, y: int) -> None:
        p = self.p
        with self.times.timed(stages.CUT):
            for i in range(len(self.frame)):
                for index in self.by_row[y]:
                    if self.batch is None:
                        self.batch = np.empty((p.max_batch_size, *self.frame.shape[1:2], p.patch_size, p.patch_size), dtype=np.float32)
                    _, x0 = self.origins[index]
                    self.batch[len(self.slots)] = self.frame[i, :, y : y + p.patch_size, x0 : x0 + p.patch_size]
                    self.slots.append((i, index))
                    self.left[y] += 1
                    if len(self.slots) == p.max_batch_size:
                        self._submit()

    def _submit(self) -> None:
        assert self.batch is not None
        with self.times.timed(stages.SEND):
            # Into the object store once; the replica maps it from there (no copy into the
            # request), and the buffer is free for the next batch at once.
            ref = ray.put(self.batch[: len(self.slots)])
            self.in_flight.append((self.predictor.submit(ref), self.slots))
        self.slots = []
        while len(self.in_flight) > MAX_BATCHES_IN_FLIGHT:
            self._harvest()

    def _harvest(self) -> None:
        response, slots = self.in_flight.popleft()
        with self.times.timed(stages.RECEIVE):
            preds = self.predictor.result(response)
        p = self.p
        with self.times.timed(stages.MERGE):
            stride = p.patch_size - 2 * p.clip_size
            for (i, index), pred in zip(slots, preds, strict=True):
                y, x0 = self.origins[index]
                if self.weighted:
                    windows.accumulate_weighted(self.acc[i], self.weight if i == 0 else None, pred, y, x0, self.window)
                else:
                    windows.place_clip(self.out[i], pred, y, x0, p.clip_size, stride)
                self.left[y] -= 1
            # A row is final once it is cut whole and all of it came back.
            while self.merged_rows < self.cut_rows and self.left[self.rows[self.merged_rows]] == 0:
                self.merged_rows += 1
        self._write_final()

    def _write_final(self) -> None:
        """Write every output chunk row no patch still to merge can touch."""
        p = self.p
        lead = p.clip_size if self.weighted else 0  # a weighted patch reaches clipSize above its centre
        while self.written < len(self.out_strips):
            a, b = self.out_strips[self.written]
            if self.merged_rows < len(self.rows) and self.rows[self.merged_rows] - lead < b:
                return
            with self.times.timed(stages.MERGE):
                outs = []
                for i in range(len(self.frame)):
                    if self.weighted:
                        rows = windows.normalise_weighted(self.acc[i], self.weight, p.clip_size, self.block.shape, a, b)
                    else:
                        rows = self.out[i][:, a:b]
                    outs.append(windows.with_nodata(rows, self.valid[i, a:b]).astype(np.float32, copy=False))
            with self.times.timed(stages.WRITE):
                window = Window(self.block.y0 + a, self.block.y0 + b, self.block.x0, self.block.x1)
                geozarr.write_region(p.out_uri, DATA_VAR, window, np.stack(outs))
            self.written += 1


def predict_block(block: Window, p: BlockParams) -> int:
    """Predict one output block (a Ray task). Returns the number of patches predicted."""
    times = stages.StageTimes()
    cpu = time.process_time()
    pipeline = _BlockPipeline(block, p, times)
    patches = pipeline.run()
    # The rest of this task's CPU ran in Serve's router threads: encoding requests, decoding replies.
    times.add(stages.UNTIMED, time.process_time() - cpu - sum(times.cpu.values()), 0.0)
    times.add(stages.MODEL, pipeline.predictor.model_cpu_s, pipeline.predictor.model_wall_s)
    times.count("patches", patches)
    times.count("pixels", block.shape[0] * block.shape[1])
    times.count("blocks", 1)
    stages.record(times, p.run)
    return patches


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
        precision=str(spec.precision),
        compile=spec.compile,
        warmup_input=(prepared.plan.in_channels, spec.patch_size, spec.patch_size) if spec.compile else None,
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
            chunk=info.chunks[2],
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
