"""How much work a resource is, counted without running it (issue 16.3). Pure functions.

Every count follows the job's own split (DESIGN §4): blocks of ``xyBlockMultiplier`` × zarr
chunks (:func:`rasterkube.runtime.blocks.plan_blocks`), a ``clipSize`` halo for inference,
chunk-aligned writes, one ledger marker per block (:mod:`rasterkube.staging`). Block spans
are separable — a block is a row span × a column span — so every sum over blocks is a
product of two sums over one axis, and a continent costs as little to count as a tile.

Bytes are *uncompressed* (zarr compresses chunks: what reaches the store is at most this).
Object-store requests count one GET per source chunk a block reads, one PUT per output chunk
it writes, one PUT per ledger marker, and a COPY and a DELETE per output object when the
staging is committed to an object store (:func:`rasterkube.storage.commit`), plus the
metadata requests (zarr metadata read when a task opens its arrays, existence checks, the
ledger's listing and removal, the STAC item, consolidation): those were not derived one by
one but measured — a ChangeScore on an S3 server, 9 and 30 blocks (tests/integration/test_plan.py
checks another size) — as :data:`METADATA_REQUESTS_PER_JOB` + :data:`METADATA_REQUESTS_PER_BLOCK`
per block.

Cost terms (``Work.terms``) are the quantities a job's CPU time scales with, in the units the
calibration (:mod:`rasterkube.planning.calibration`) was fitted in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from rasterkube.constants import Kind
from rasterkube.grid import GeoGrid, Window

MPX: Final = 1e6
BYTES_F32: Final = 4
BYTES_F64: Final = 8
COUNT_ITEMSIZE: Final = 2  # a Mosaic's per-window count of observations (uint16)
DN_ITEMSIZE: Final = 2  # COG digital numbers of the recipes' assets (uint16)
#: Requests per output object when a staging store is committed to an object store.
COMMIT_REQUESTS_PER_OBJECT: Final = 2  # COPY, DELETE
#: Metadata requests beyond the chunks (measured; see the module docstring).
METADATA_REQUESTS_PER_JOB: Final = 125
METADATA_REQUESTS_PER_BLOCK: Final = 12

# Cost-term names (calibration keys).
# Every ChangeScore reads its bands (Mpx · time · band); difference computed on its own adds as
# much again (with looMedoid it is the pairwise matrix's sub-diagonal: free); each robust
# z-score band is a median and a MAD through time per pixel (Mpx · time).
TERM_READ: Final = "read"
TERM_DIFFERENCE: Final = "difference"
TERM_ZSCORE: Final = "zscore"
TERM_LOO_MEDOID: Final = "looMedoid"  # Mpx · time² · band (a T×T distance matrix per pixel)
TERM_CLUSTER: Final = "clusterTransition"  # Mpx · time · band · k
TERM_CLUSTER_FIT: Final = "clusterFit"  # 1 per job: clusters fitted on a fixed-size sample
TERM_POLYGONIZE: Final = "polygonize"  # Mpx · time · feature
TERM_COMPOSITE: Final = "composite"  # Mpx · scene · asset (scene pixels read and composited)
TERM_PATCHES_PREFIX: Final = "patchMpx:"  # + model sha256: Mpx of patches through the model
TERM_UNITS: Final = {
    TERM_READ: "Mpx·time·band",
    TERM_DIFFERENCE: "Mpx·time·band",
    TERM_ZSCORE: "Mpx·time·z-scored band",
    TERM_LOO_MEDOID: "Mpx·time²·band",
    TERM_CLUSTER: "Mpx·time·band·k",
    TERM_CLUSTER_FIT: "job",
    TERM_POLYGONIZE: "Mpx·time·feature",
    TERM_COMPOSITE: "Mpx·scene·asset",
    TERM_PATCHES_PREFIX: "Mpx of patches",
}


#: How a robust z-score band's name ends (:func:`rasterkube.change.scores.score_name`).
ZSCORE_SUFFIX: Final = "_robust_time_zscore"


def patch_term(model_sha256: str) -> str:
    return f"{TERM_PATCHES_PREFIX}{model_sha256}"


@dataclass(frozen=True)
class Raster:
    """What planning knows of a raster: an existing source or a planned output."""

    times: int
    bands: tuple[str, ...]
    shape: tuple[int, int]
    chunk: tuple[int, int]
    itemsize: int = BYTES_F32
    #: Its grid, where known (a source store, a Mosaic's planned grid): what a consumer's
    #: selector or bbox is resolved on.
    grid: GeoGrid | None = None

    @property
    def pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bytes(self) -> int:
        return self.times * len(self.bands) * self.pixels * self.itemsize


@dataclass(frozen=True)
class Work:
    """The counts of one resource's run (one Mosaic AOI row, or a whole raster job)."""

    kind: Kind
    blocks: int
    bytes_read: int
    #: None where the output's size depends on the data (a Vectorization's polygons).
    bytes_written: int | None
    chunk_reads: int
    chunk_writes: int
    ledger_markers: int
    #: Objects the commit copies (and deletes) on an object store.
    committed_objects: int
    #: Largest buffers one block task holds (the worker's base memory comes on top).
    block_buffer_bytes: int
    terms: Mapping[str, float]
    patches: int = 0
    output: Raster | None = None
    notes: tuple[str, ...] = ()

    @property
    def metadata_requests(self) -> int:
        return METADATA_REQUESTS_PER_JOB + METADATA_REQUESTS_PER_BLOCK * self.blocks

    @property
    def object_store_requests(self) -> int:
        return (
            self.chunk_reads
            + self.chunk_writes
            + self.ledger_markers
            + COMMIT_REQUESTS_PER_OBJECT * self.committed_objects
            + self.metadata_requests
        )

    def __add__(self, other: Work) -> Work:
        """Two rows of one Mosaic: counts add, the buffers are the larger."""
        terms = dict(self.terms)
        for k, v in other.terms.items():
            terms[k] = terms.get(k, 0.0) + v
        written = None if self.bytes_written is None or other.bytes_written is None else self.bytes_written + other.bytes_written
        return Work(
            kind=self.kind,
            blocks=self.blocks + other.blocks,
            bytes_read=self.bytes_read + other.bytes_read,
            bytes_written=written,
            chunk_reads=self.chunk_reads + other.chunk_reads,
            chunk_writes=self.chunk_writes + other.chunk_writes,
            ledger_markers=self.ledger_markers + other.ledger_markers,
            committed_objects=self.committed_objects + other.committed_objects,
            block_buffer_bytes=max(self.block_buffer_bytes, other.block_buffer_bytes),
            terms=terms,
            patches=self.patches + other.patches,
            output=self.output,
            notes=tuple(dict.fromkeys([*self.notes, *other.notes])),
        )


# ---------------------------------------------------------------------------- one axis


def axis_spans(length: int, step: int) -> list[tuple[int, int]]:
    """The [start, end) spans of blocks of ``step`` px along an axis of ``length`` px
    (as :func:`rasterkube.runtime.blocks.plan_blocks` cuts it)."""
    if length < 1 or step < 1:
        raise ValueError("length and step must be positive")
    return [(s, min(s + step, length)) for s in range(0, length, step)]


def chunks_touched(start: int, end: int, chunk: int) -> int:
    """Chunks of ``chunk`` px (aligned at 0) that the span [start, end) overlaps."""
    return (end - 1) // chunk - start // chunk + 1


def halo_span(start: int, end: int, clip: int, length: int) -> tuple[int, int]:
    """The read span of a block span with a ``clip`` px halo, clipped to the image
    (:func:`rasterkube.predict.windows.halo_block`)."""
    return max(start - clip, 0), min(end + clip, length)


def patch_origins_along(length: int, patch: int, clip: int) -> int:
    """Patch origins along an axis of ``length`` px (:func:`rasterkube.predict.windows.patch_origins`)."""
    stride = patch - 2 * clip
    if stride < 1:
        raise ValueError("clipSize must be less than half of patchSize")
    last = max(length - stride, 0)
    return len(range(0, last, stride)) + 1


def default_chunk(n_bands: int, itemsize: int, chunk_size: int, shape: tuple[int, int], max_chunk_bytes: int) -> tuple[int, int]:
    """The spatial chunk :func:`rasterkube.geozarr.create` gives a new store."""
    spatial = chunk_size
    while spatial > 64 and n_bands * spatial * spatial * itemsize > max_chunk_bytes:
        spatial //= 2
    return min(spatial, shape[0]), min(spatial, shape[1])


@dataclass(frozen=True)
class Blocks:
    """Block spans of a grid, per axis."""

    ys: tuple[tuple[int, int], ...]
    xs: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, shape: tuple[int, int], chunk: tuple[int, int], multiplier: int) -> Blocks:
        return cls(tuple(axis_spans(shape[0], chunk[0] * multiplier)), tuple(axis_spans(shape[1], chunk[1] * multiplier)))

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def chunks(self, chunk: tuple[int, int], offset: tuple[int, int] = (0, 0)) -> int:
        """Chunks of a store chunked by ``chunk`` that all blocks touch, each block counted
        on its own (shifted by ``offset`` into the store: a selector window)."""
        ny = sum(chunks_touched(a + offset[0], b + offset[0], chunk[0]) for a, b in self.ys)
        nx = sum(chunks_touched(a + offset[1], b + offset[1], chunk[1]) for a, b in self.xs)
        return ny * nx

    @property
    def largest(self) -> int:
        return max(b - a for a, b in self.ys) * max(b - a for a, b in self.xs)


def _out_chunks(out: Raster) -> int:
    return Blocks.of(out.shape, out.chunk, 1).count


# ------------------------------------------------------------------------------- kinds


def change_score(
    source: Raster,
    window: tuple[int, int, int, int],
    n_bands: int,
    names: Sequence[str],
    methods: Sequence[str],
    k: int,
    multiplier: int,
    max_chunk_bytes: int,
    strip_pixels: int,
) -> Work:
    """A ChangeScore over ``window`` (y0, y1, x0, x1) of ``source``, ``n_bands`` bands read."""
    y0, y1, x0, x1 = window
    shape = (y1 - y0, x1 - x0)
    t = source.times
    grid = None if source.grid is None else source.grid.window(Window(y0, y1, x0, x1))
    out = Raster(t, tuple(names), shape, default_chunk(len(names), BYTES_F32, source.chunk[0], shape, max_chunk_bytes),
                 BYTES_F32, grid)  # fmt: skip
    blocks = Blocks.of(shape, out.chunk, multiplier)
    # A block is scored in full-width strips of at most strip_pixels (rows), each read on its
    # own: a strip that ends inside a chunk row reads that row again with the next strip.
    reads = 0
    for xa, xb in blocks.xs:
        rows = max(1, strip_pixels // (xb - xa))
        ny = sum(chunks_touched(s + y0, min(s + rows, yb) + y0, source.chunk[0])
                 for ya, yb in blocks.ys for s in range(ya, yb, rows))  # fmt: skip
        reads += ny * chunks_touched(xa + x0, xb + x0, source.chunk[1])
    reads *= t
    # A source chunk holds every band (rasterkube's layout): a read moves all of them.
    chunk_bytes = len(source.bands) * source.chunk[0] * source.chunk[1] * source.itemsize
    mpx = out.pixels / MPX
    terms = {TERM_READ: mpx * t * n_bands}
    if TERM_DIFFERENCE in methods and TERM_LOO_MEDOID not in methods:
        terms[TERM_DIFFERENCE] = mpx * t * n_bands
    z_bands = sum(1 for n in names if n.endswith(ZSCORE_SUFFIX))
    if z_bands:
        terms[TERM_ZSCORE] = mpx * t * z_bands
    if TERM_LOO_MEDOID in methods:
        terms[TERM_LOO_MEDOID] = mpx * t * t * n_bands
    if TERM_CLUSTER in methods:
        terms[TERM_CLUSTER] = mpx * t * n_bands * k
        # The driver samples at most SAMPLE_PIXELS per step, whatever the area.
        terms[TERM_CLUSTER_FIT] = 1.0
    strip = min(strip_pixels, blocks.largest)
    buffers = (
        t * n_bands * strip * BYTES_F64  # the strip read, as float64 for the distances
        + (t * t * strip * BYTES_F64 if TERM_LOO_MEDOID in methods else 0)  # T×T distances per pixel
        + 2 * t * len(names) * blocks.largest * BYTES_F32  # the block's scores, and their concatenation
    )
    chunks_out = _out_chunks(out)
    return Work(
        kind=Kind.CHANGE_SCORE,
        blocks=blocks.count,
        bytes_read=reads * chunk_bytes,
        bytes_written=out.bytes,
        chunk_reads=reads,
        chunk_writes=t * chunks_out,
        ledger_markers=blocks.count,
        committed_objects=t * chunks_out,
        block_buffer_bytes=buffers,
        terms=terms,
        output=out,
    )


def prediction(
    source: Raster,
    n_features: int,
    labels: Sequence[str],
    time_stacked: bool,
    patch: int,
    clip: int,
    multiplier: int,
    model_sha256: str,
    max_chunk_bytes: int,
    buffers: int,
) -> Work:
    """A Prediction of ``source``: blocks with a ``clip`` halo, cut into patches. ``buffers`` is
    what one block task holds (``predict.service.block_buffer_bytes``, the job's own estimate,
    which its memory check uses too)."""
    h, w = source.shape
    t_out = 1 if time_stacked else source.times
    blocks = Blocks.of(source.shape, source.chunk, multiplier)
    halo_y = [halo_span(a, b, clip, h) for a, b in blocks.ys]
    halo_x = [halo_span(a, b, clip, w) for a, b in blocks.xs]
    reads = source.times * sum(chunks_touched(a, b, source.chunk[0]) for a, b in halo_y) * sum(
        chunks_touched(a, b, source.chunk[1]) for a, b in halo_x
    )
    chunk_bytes = len(source.bands) * source.chunk[0] * source.chunk[1] * source.itemsize
    patches_per_input = sum(patch_origins_along(b - a, patch, clip) for a, b in blocks.ys) * sum(
        patch_origins_along(b - a, patch, clip) for a, b in blocks.xs
    )
    patches = patches_per_input * t_out
    out = Raster(t_out, tuple(labels), source.shape,
                 default_chunk(len(labels), BYTES_F32, source.chunk[0], source.shape, max_chunk_bytes),
                 BYTES_F32, source.grid)  # fmt: skip
    chunks_out = _out_chunks(out)
    return Work(
        kind=Kind.PREDICTION,
        blocks=blocks.count,
        bytes_read=reads * chunk_bytes,
        bytes_written=out.bytes,
        chunk_reads=reads,
        chunk_writes=t_out * chunks_out,
        ledger_markers=blocks.count,
        committed_objects=t_out * chunks_out,
        block_buffer_bytes=buffers,
        terms={patch_term(model_sha256): patches * patch * patch / MPX},
        patches=patches,
        output=out,
    )


def vectorization(source: Raster, n_features: int, block_side: int) -> Work:
    """A Vectorization: blocks of about ``block_side`` px, one GeoParquet written at the end."""
    multiplier = max(1, block_side // max(source.chunk))
    blocks = Blocks.of(source.shape, source.chunk, multiplier)
    reads = source.times * blocks.chunks(source.chunk)
    chunk_bytes = len(source.bands) * source.chunk[0] * source.chunk[1] * source.itemsize
    return Work(
        kind=Kind.VECTORIZATION,
        blocks=blocks.count,
        bytes_read=reads * chunk_bytes,
        bytes_written=None,
        chunk_reads=reads,
        chunk_writes=1,  # the GeoParquet file (a multipart upload when large)
        ledger_markers=0,  # not resumable by blocks: the merge needs every block's edges
        committed_objects=1,
        # The block read, and the label image, mask and pieces of one band at a time.
        block_buffer_bytes=source.times * n_features * blocks.largest * source.itemsize + 3 * blocks.largest * BYTES_F64,
        terms={TERM_POLYGONIZE: source.pixels * source.times * n_features / MPX},
        notes=("bytes written depend on the polygons found (not known before the run)",),
    )


@dataclass(frozen=True)
class Footprint:
    """A scene's bounds in the output grid's pixel coordinates (row0, row1, col0, col1), floats."""

    rows: tuple[float, float]
    cols: tuple[float, float]


def _overlap(span: tuple[int, int], lo_hi: tuple[float, float]) -> bool:
    return lo_hi[0] < span[1] and lo_hi[1] > span[0]


def mosaic_row(
    shape: tuple[int, int],
    chunk_size: int,
    n_windows: int,
    bands: Sequence[str],
    footprints: Sequence[Footprint],
    max_chunk_bytes: int,
    stack_budget_bytes: int,
    grid: GeoGrid | None = None,
) -> Work:
    """One output store of a Mosaic: a block per chunk (multiplier 1); every block reads the
    mask and the bands of each scene whose footprint meets it (cloud-free or not: a fully
    cloudy scene costs its mask read only, so this is an upper bound on the reads)."""
    out = Raster(n_windows, tuple(bands), shape, default_chunk(len(bands), BYTES_F32, chunk_size, shape, max_chunk_bytes),
                 BYTES_F32, grid)  # fmt: skip
    blocks = Blocks.of(shape, out.chunk, 1)
    assets = len(bands) + 1  # + the mask
    scene_pixels = 0
    scene_blocks = 0
    for fp in footprints:
        ys = [b - a for a, b in blocks.ys if _overlap((a, b), fp.rows)]
        xs = [b - a for a, b in blocks.xs if _overlap((a, b), fp.cols)]
        scene_pixels += sum(ys) * sum(xs)
        scene_blocks += len(ys) * len(xs)
    chunks_out = _out_chunks(out)
    objects = 2 * n_windows * chunks_out  # the values and the count of each window
    return Work(
        kind=Kind.MOSAIC,
        blocks=blocks.count,
        bytes_read=scene_pixels * assets * DN_ITEMSIZE,
        bytes_written=out.bytes + n_windows * out.pixels * COUNT_ITEMSIZE,
        # At least one ranged GET per asset of each scene a block reads (COG tiles are not
        # known without opening the files).
        chunk_reads=scene_blocks * assets,
        chunk_writes=objects,
        ledger_markers=blocks.count,
        committed_objects=objects,
        block_buffer_bytes=stack_budget_bytes + n_windows * blocks.largest * (len(bands) * BYTES_F32 + COUNT_ITEMSIZE),
        terms={TERM_COMPOSITE: scene_pixels * assets / MPX},
        output=out,
    )


@dataclass(frozen=True)
class Sizing:
    """The cluster a plan assumes."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus: float = 0.0
    #: Where it comes from: the resource's spec.resources, or the command line.
    source: str = "spec.resources"

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker


@dataclass(frozen=True)
class Estimate:
    """A resource's plan: its work, and what it costs on ``sizing`` by ``calibration``."""

    kind: Kind
    name: str
    namespace: str
    work: Work
    sizing: Sizing
    core_seconds: float
    wall_seconds: float
    gpu_seconds: float
    peak_memory_per_worker_bytes: int
    calibration: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def core_hours(self) -> float:
        return self.core_seconds / 3600

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600

    def to_dict(self) -> dict[str, object]:
        w = self.work
        out = w.output
        return {
            "kind": self.kind.value,
            "name": self.name,
            "namespace": self.namespace,
            "blocks": w.blocks,
            "patches": w.patches,
            "output": None if out is None else {"shape": [out.times, len(out.bands), *out.shape],
                                                 "chunk": list(out.chunk), "bands": list(out.bands)},  # fmt: skip
            "bytesRead": w.bytes_read,
            "bytesWritten": w.bytes_written,
            "objectStoreRequests": w.object_store_requests,
            "requests": {"chunkReads": w.chunk_reads, "chunkWrites": w.chunk_writes,
                         "ledgerMarkers": w.ledger_markers, "commit": COMMIT_REQUESTS_PER_OBJECT * w.committed_objects,
                         "metadata": w.metadata_requests},  # fmt: skip
            "peakMemoryPerWorkerBytes": self.peak_memory_per_worker_bytes,
            "coreHours": self.core_hours,
            "gpuHours": self.gpu_hours,
            "wallSeconds": self.wall_seconds,
            "work": dict(w.terms),
            "sizing": {"workers": self.sizing.workers, "cpusPerWorker": self.sizing.cpus_per_worker,
                       "gpus": self.sizing.gpus, "from": self.sizing.source},  # fmt: skip
            "calibration": self.calibration,
            "notes": list(dict.fromkeys([*w.notes, *self.notes])),
        }
