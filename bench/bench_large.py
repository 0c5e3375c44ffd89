"""Large areas stay flat (issue 16.6, DESIGN §5): ChangeScore, Vectorization and Prediction
(a tiny model) at a small and a large AOI side (default 4096² and 16384² px: 16× the area,
about 2.2 Sentinel-2 tiles at 10 m), peak memory and time of the whole job.

Each job is the real entrypoint (``python -m rasterkube.jobs <kind>``, its own embedded Ray
on all cores) in a subprocess; the RSS of its whole process tree (driver, raylet, GCS, Ray
workers) is sampled every 50 ms (bench/_common.py), with the peak's breakdown by process.
Targets: peak RSS at the large side ≤ 1.25× the small one; time ≈ linear in area (seconds
per Mpx about equal at both sides).

Inputs are kept small in bands and time steps so the large runs take minutes on 2 cores, and
are written chunk by chunk: a smooth random field (cubic B-spline of white noise on a coarse
lattice, so blobs of all shapes cross every block edge) evaluated tile by tile — never a whole
raster in this process, whose memory is not measured but shares the machine. Every input and
output lives in a temporary directory (``--tmp``) removed after each kind.

Times are reported twice: ``seconds`` (the process, with Python and Ray start) and
``job_seconds`` (the job's own ``usage.wallSeconds``: from Ray up to the commit); Mpx/s and
seconds per Mpx use the latter. On a shared machine other work takes cores too, so the load
average is recorded with each run, and ``cpu_seconds`` (``usage.cpuSeconds``: the job's
tasks and driver) measures the work itself: linear in area means ``cpu_ratio_per_area`` ≈ 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, run_job_measured  # noqa: E402

KINDS = ("changescore", "vectorization", "prediction")
CRS = "EPSG:32633"
RES = 10.0
#: Coarse lattice spacing in px of the smooth field: blobs a few to tens of pixels across.
FIELD_STEP = 8
#: Std of a 2-D cubic B-spline of unit white noise, averaged over phase: the product of the
#: 1-D variances ∫B² = 151/315 is the variance, so its square root squared is the std.
BSPLINE_STD = 151 / 315
#: Side of the tiles the inputs are generated and written in (whole chunks).
WRITE_TILE = 1024
TARGET_PEAK_RATIO = 1.25

CHANGE_TIMES, CHANGE_BANDS = 3, 2
VECTOR_THRESHOLD = 0.5
PREDICT_BANDS, PREDICT_CLASSES, PREDICT_PATCH = 4, 2, 256


def bspline3(t: np.ndarray) -> np.ndarray:
    """The cubic B-spline kernel (support [-2, 2], C² smooth)."""
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def spline_taps(start: int, stop: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """For pixels [start, stop): the first of the 4 coarse nodes each one depends on, and
    their weights (pixels × 4). Node j sits at pixel centre j·step."""
    u = (np.arange(start, stop) + 0.5) / step
    first = np.floor(u).astype(np.int64) - 1
    weights = bspline3(u[:, None] - (first[:, None] + np.arange(4)[None, :])).astype(np.float32)
    return first, weights


class SmoothField:
    """A smooth random field of side ``side``, evaluated tile by tile as a separable cubic
    B-spline of white noise on a coarse lattice (4 taps per axis). Values are about N(0, 1)."""

    #: Lattice nodes of margin before node 0 (the taps of pixel 0 reach node -1).
    MARGIN = 2

    def __init__(self, side: int, seed: int, step: int = FIELD_STEP) -> None:
        self.step = step
        n = side // step + 2 * self.MARGIN + 1
        self.coarse = np.random.default_rng(seed).normal(size=(n, n)).astype(np.float32) / BSPLINE_STD

    def tile(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        fy, wy = spline_taps(y0, y1, self.step)
        fx, wx = spline_taps(x0, x1, self.step)
        m = self.MARGIN
        rows = sum(wy[:, k, None] * self.coarse[fy + k + m] for k in range(4))  # (h, lattice columns)
        return sum(wx[None, :, k] * rows[:, fx + k + m] for k in range(4))


def tiles(side: int, tile: int = WRITE_TILE) -> Iterator[tuple[int, int, int, int]]:
    for y0 in range(0, side, tile):
        for x0 in range(0, side, tile):
            yield y0, min(y0 + tile, side), x0, min(x0 + tile, side)


def write_field_store(uri: str, side: int, times: int, bands: list[str], chunk: int, seed: int,
                      value: Callable[[list[np.ndarray]], np.ndarray] | None = None) -> None:  # fmt: skip
    """Commit a (times, bands, side, side) float32 GeoZarr store of smooth fields, one tile at a
    time. Every (time, band) is its own field; ``value`` may combine them per tile."""
    from rasterkube import geozarr, storage
    from rasterkube.grid import GeoGrid, Window

    grid = GeoGrid(CRS, (RES, 0.0, 400000.0, 0.0, -RES, 5600000.0), (side, side))
    stamps = np.array([f"{2017 + i}-01-01" for i in range(times)], dtype="datetime64[s]")
    tmp = storage.temporary_uri(uri)
    geozarr.create(tmp, grid, stamps, bands, dtype="float32", chunk_size=chunk)
    fields = [SmoothField(side, seed * 1000 + i) for i in range(times * len(bands))]
    for y0, y1, x0, x1 in tiles(side, max(chunk, WRITE_TILE // chunk * chunk)):
        data = np.stack([f.tile(y0, y1, x0, x1) for f in fields]).reshape(times, len(bands), y1 - y0, x1 - x0)
        geozarr.write_region(tmp, "variables", Window(y0, y1, x0, x1), data)
    geozarr.finalize(tmp)
    storage.commit(tmp, uri)


# --- one kind each: its input, its resource ----------------------------------------------------


def changescore(tmp: Path, side: int, chunk: int) -> dict[str, Any]:
    src = str(tmp / "series.zarr")
    write_field_store(src, side, CHANGE_TIMES, [f"b{i}" for i in range(CHANGE_BANDS)], chunk, seed=side)
    resource = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore", "metadata": {"name": "bench"},
                "spec": {"source": {"uri": src}, "methods": ["looMedoid"], "distance": "euclidean",
                         "robustTimeZScore": True}}  # fmt: skip
    return {"resource": resource, "outputUri": str(tmp / "scores.zarr"), "sourceUri": src}


def vectorization(tmp: Path, side: int, chunk: int) -> dict[str, Any]:
    src = str(tmp / "score.zarr")
    write_field_store(src, side, 1, ["score"], chunk, seed=side)
    resource = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "Vectorization", "metadata": {"name": "bench"},
                "spec": {"source": {"uri": src}, "features": ["score"], "threshold": VECTOR_THRESHOLD,
                         "connectivity": 4, "output": {"crs": CRS}}}  # fmt: skip
    return {"resource": resource, "outputUri": str(tmp / "polygons.parquet"), "sourceUri": src}


def tiny_net() -> Any:
    """One 3×3 convolution, few channels: the pipeline, not the model, is measured."""
    import torch

    return torch.nn.Conv2d(PREDICT_BANDS, PREDICT_CLASSES, 3, padding=1)


def prediction(tmp: Path, side: int, chunk: int) -> dict[str, Any]:
    from bench_predict import export_model

    src = str(tmp / "bands.zarr")
    write_field_store(src, side, 1, [f"b{i}" for i in range(PREDICT_BANDS)], chunk, seed=side)
    model = export_model(tmp / "tiny.pt2", PREDICT_BANDS, PREDICT_CLASSES, PREDICT_PATCH, tiny_net())
    resource = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "Prediction", "metadata": {"name": "bench"},
                "spec": {"source": {"uri": src},
                         "model": {"uri": str(model), "features": [f"b{i}" for i in range(PREDICT_BANDS)],
                                   "labels": [f"c{i}" for i in range(PREDICT_CLASSES)]},
                         "patchSize": PREDICT_PATCH, "serving": {"cpusPerReplica": 1}}}  # fmt: skip
    return {"resource": resource, "outputUri": str(tmp / "pred.zarr"), "sourceUri": src}


MAKERS: dict[str, Callable[[Path, int, int], dict[str, Any]]] = {
    "changescore": changescore, "vectorization": vectorization, "prediction": prediction}  # fmt: skip
WORKLOADS = {
    "changescore": f"{CHANGE_TIMES} time steps × {CHANGE_BANDS} float32 bands; looMedoid, euclidean, robust z-score",
    "vectorization": f"1 float32 band, threshold {VECTOR_THRESHOLD}, 4-connected, GeoParquet",
    "prediction": f"{PREDICT_BANDS} float32 bands → {PREDICT_CLASSES} classes; one 3×3 conv (torch.export), "
                  f"{PREDICT_PATCH} px patches, 1 CPU replica",
}  # fmt: skip


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(kind: str, side: int, chunk: int, tmp_root: str, nice: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"rk-large-{kind}-{side}-", dir=tmp_root))
    try:
        start = time.perf_counter()
        request = MAKERS[kind](tmp, side, chunk)
        made = time.perf_counter() - start
        load = os.getloadavg()
        run = run_job_measured(kind, request, breakdown=True, nice=nice)
        usage = run.result.get("usage") or {}
        job_s = float(usage.get("wallSeconds") or run.seconds)
        cpu_s = float(usage.get("cpuSeconds") or 0.0)
        mpx = side * side / 1e6
        summary = run.result.get("summary", {})
        return {
            "side": side, "mpx": round(mpx, 2), "peak_rss_mib": run.peak_rss_mib, "peak_pss_mib": run.peak_pss_mib,
            "seconds": round(run.seconds, 2), "job_seconds": round(job_s, 2),
            "mpx_per_s": round(mpx / job_s, 3), "seconds_per_mpx": round(job_s / mpx, 4),
            "cpu_seconds": round(cpu_s, 2), "cpu_seconds_per_mpx": round(cpu_s / mpx, 4),
            "blocks": summary.get("blocks"), "features": summary.get("feature_count"),
            "patches": summary.get("patches"),
            "input_mib": round(du(Path(request["sourceUri"])) / 2**20, 1),
            "input_seconds": round(made, 1),
            "usage": run.result.get("usage"), "peak_by_process_mib": run.breakdown,
            "load_average_before": [round(v, 2) for v in load],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        }  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=4096, help="side of the small AOI in px")
    parser.add_argument("--large", type=int, default=16384, help="side of the large AOI in px")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--chunk", type=int, default=512, help="zarr chunk side of the inputs")
    parser.add_argument("--tmp", default="/var/tmp", help="where inputs and outputs are written (removed after)")
    parser.add_argument("--nice", type=int, default=0, help="run the jobs at this niceness")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {', '.join(unknown)}; use some of {', '.join(KINDS)}")
    area_ratio = (args.large / args.small) ** 2
    report: dict[str, Any] = {
        "benchmark": "large", "small_side": args.small, "large_side": args.large, "area_ratio": area_ratio,
        "chunk": args.chunk, "cpus": os.cpu_count(), "target_peak_rss_ratio": TARGET_PEAK_RATIO,
        "measured": "peak summed RSS and summed PSS of the job's process tree (driver + embedded Ray), sampled every 50 ms; job_seconds = the "
                    "job's usage.wallSeconds (Ray up → commit); seconds includes Python and Ray start",
        "kinds": {},
    }  # fmt: skip
    for kind in kinds:
        small = measure(kind, args.small, args.chunk, args.tmp, args.nice)
        large = measure(kind, args.large, args.chunk, args.tmp, args.nice)
        peak_ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
        time_ratio = large["job_seconds"] / small["job_seconds"]
        report["kinds"][kind] = {
            "workload": WORKLOADS[kind], "small": small, "large": large,
            "peak_rss_ratio": round(peak_ratio, 3), "meets_memory_target": peak_ratio <= TARGET_PEAK_RATIO,
            # Summed RSS counts the object store's shared pages once per worker that touched
            # them; summed PSS counts them once: what the job really holds.
            "peak_pss_ratio": round(large["peak_pss_mib"] / small["peak_pss_mib"], 3),
            "time_ratio": round(time_ratio, 3),
            # 1.0 = exactly linear in area; > 1 superlinear.
            "time_ratio_per_area": round(time_ratio / area_ratio, 3),
            # The same for the CPU-seconds the job's tasks and driver used (usage.cpuSeconds):
            # the work done, whatever else the machine runs meanwhile.
            "cpu_ratio_per_area": round(large["cpu_seconds"] / max(small["cpu_seconds"], 1e-9) / area_ratio, 3),
        }  # fmt: skip
        emit(report, args.json)  # after every kind: a long run keeps what it measured
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    emit(report, args.json)


if __name__ == "__main__":
    main()
