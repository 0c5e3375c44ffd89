"""Vectorization: throughput on 2 Ray workers vs ONE rasterio.features.shapes call, and peak
memory at two AOI sizes (4× the area).

Throughput: a smooth random field (blobs of all sizes, with holes, crossing every block edge)
of side --side, stored as GeoZarr. The baseline is a single whole-raster
``rasterio.features.shapes`` call on the in-memory foreground mask, with the GeoJSON turned
into shapely polygons (no statistics, no file written). The job is the real Vectorization job
(``rasterkube.jobs.run_job`` on an embedded Ray with 2 CPUs, warm): read blockwise from zarr,
label, per-polygon statistics, polygonize, merge across block edges, write GeoParquet in the
grid's CRS. Both produce the same polygons — the polygon count is asserted equal, and the
unit tests prove the geometries identical. DESIGN §5 target: ≥ 1.5×.

The machine is shared: ``machine_check`` (before and after) runs the same polygonization
work in one and in two processes at once; its ``two_process_speedup`` is what 2 workers can
get at all right now (≈1.0 when others keep a core busy), so read the job's speedup with it;
per pair the steal time (CPU the hypervisor gave to other VMs) and the machine's busy CPU
seconds for each side (the work each does, whatever the neighbours do) are reported too.

Memory: the job entrypoint (``python -m rasterkube.jobs vectorization``, its own embedded Ray)
on stores of side S and 2·S, RSS of the whole process tree sampled every 50 ms, as in
bench_changescore_memory.py. Target: 4× the area → ≤ 1.25× peak RSS.
Prints one JSON object (and writes it with --json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine_cpu, run_job_process  # noqa: E402
from helpers.stores import grid, write_store  # noqa: E402

THRESHOLD = 0.5
BAND = "score"


def make_field(side: int, seed: int = 0) -> np.ndarray:
    """Blobs: a low-pass random field built in tiles (so big AOIs do not need a big FFT)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.uniform_filter(rng.normal(size=(side, side)).astype(np.float32), 9, mode="wrap")
    field = ndimage.uniform_filter(field, 9, mode="wrap")
    return (field / field.std()).astype(np.float32)


def make_store(uri: str, side: int, chunk: int) -> np.ndarray:
    data = make_field(side, seed=side)
    write_store(uri, data[None, None], chunk=chunk, bands=[BAND])
    return data


def resource(src: str) -> dict:
    return {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "Vectorization", "metadata": {"name": "bench"},
            "spec": {"source": {"uri": src}, "features": [BAND], "threshold": THRESHOLD, "connectivity": 4,
                     "output": {"crs": grid(1, 1).crs}}}  # fmt: skip


def baseline(data: np.ndarray) -> tuple[float, int]:
    import rasterio.features
    import shapely
    from affine import Affine

    start = time.perf_counter()
    mask = data > THRESHOLD
    geoms = [shapely.geometry.shape(g) for g, _ in rasterio.features.shapes(
        mask.astype(np.uint8), mask=mask, connectivity=4, transform=Affine(*grid(*data.shape).transform))]  # fmt: skip
    return time.perf_counter() - start, len(geoms)


def throughput(tmp: str, side: int, chunk: int, repeats: int) -> dict:
    import ray

    from rasterkube.jobs import run_job
    from rasterkube.jobs.context import JobRequest
    from rasterkube.runtime.executor import ensure_ray
    from rasterkube.runtime.progress import CallbackReporter

    load = os.getloadavg()[0]  # other processes on the machine skew wall-clock ratios
    src = str(Path(tmp) / "tp.zarr")
    data = make_store(src, side, chunk)
    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=2)
    req = JobRequest(resource=resource(src), output_uri=str(Path(tmp) / "tp.parquet"), source_uri=src)
    run_job(req)  # warm the workers
    job_s, base_s, phases = [], [], []
    job_cpu, base_cpu, steal = [], [], []
    count = base_count = 0
    for _ in range(repeats):
        marks: dict[str, float] = {}
        reporter = CallbackReporter(lambda pct, msg: marks.setdefault(msg.split()[0], time.perf_counter()))
        cpu0 = machine_cpu()
        start = time.perf_counter()
        count = run_job(req, reporter).summary["feature_count"]
        end = time.perf_counter()
        cpu1 = machine_cpu()
        job_s.append(end - start)
        # progress messages: "polygonizing blocks" … "merging …" (90 %) … "writing …" (95 %) … "wrote …"
        phases.append({"blocks": marks["merging"] - start, "merge": marks["writing"] - marks["merging"],
                       "write": end - marks["writing"]})  # fmt: skip
        seconds, base_count = baseline(data)
        cpu2 = machine_cpu()
        base_s.append(seconds)
        job_cpu.append(cpu1[0] - cpu0[0])
        base_cpu.append(cpu2[0] - cpu1[0])
        steal.append(cpu2[1] - cpu0[1])
    ray.shutdown()
    assert count == base_count, f"different polygon counts: job {count}, shapes {base_count}"
    job, base = min(job_s), min(base_s)
    paired = float(np.median(np.asarray(base_s) / np.asarray(job_s)))
    phase = {k: round(v, 3) for k, v in phases[int(np.argmin(job_s))].items()}
    return {"side": side, "pixels": side * side, "polygons": count, "job_seconds": round(job, 3),
            "shapes_seconds": round(base, 3), "job_mpix_per_s": round(side * side / job / 1e6, 2),
            "shapes_mpix_per_s": round(side * side / base / 1e6, 2), "speedup": round(base / job, 3),
            "target_speedup": 1.5, "job_phases_seconds": phase,
            # Each repeat times the job and the baseline back to back: on a machine with noisy
            # neighbours the median of these paired ratios is steadier than best / best.
            "paired_speedups": [round(b / j, 3) for b, j in zip(base_s, job_s, strict=True)],
            "paired_speedup_median": round(paired, 3),
            # Judged on the paired median: best-of-N on each side pits the baseline's quietest
            # moment for one core against the job's for two, and on a VM with neighbours those
            # are seldom the same moment.
            "meets_target": paired >= 1.5,
            # CPU seconds the whole machine was busy (everything on it: the job's driver, Ray,
            # its workers; the baseline's one process), medians: the work each side does,
            # whatever the neighbours do. 2 × shapes / job is what two free cores would give.
            "job_cpu_seconds": round(float(np.median(job_cpu)), 3),
            "shapes_cpu_seconds": round(float(np.median(base_cpu)), 3),
            "two_core_bound": round(2 * float(np.median(base_cpu)) / float(np.median(job_cpu)), 3),
            "steal_seconds_per_pair": [round(s, 3) for s in steal],
            "load_average_1m_before": round(load, 2)}  # fmt: skip


def _shapes_work(mask: np.ndarray) -> float:
    import rasterio.features

    start = time.perf_counter()
    for _ in rasterio.features.shapes(mask.view(np.uint8), mask=mask, connectivity=4):
        pass
    return time.perf_counter() - start


def parallel_check(side: int = 1024, rounds: int = 4) -> dict:
    """How much of 2 cores the machine gives right now: the same polygonization work in one
    process, then in two processes at once (2.0 = two free cores; ~1.0 = others use one).
    The job's speedup can only reach what this allows; reported next to it."""
    from concurrent.futures import ProcessPoolExecutor

    mask = make_field(side, seed=1) > THRESHOLD
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_shapes_work, [mask, mask]))  # start both
        best = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            _shapes_work(mask)
            _shapes_work(mask)
            serial = time.perf_counter() - start
            start = time.perf_counter()
            list(pool.map(_shapes_work, [mask, mask]))
            best = max(best, serial / (time.perf_counter() - start))
    return {"two_process_speedup": round(best, 2), "load_average_1m": round(os.getloadavg()[0], 2)}


def job_memory(src: str, out: str) -> dict[str, float]:
    request = {"resource": resource(src), "outputUri": out, "sourceUri": src}
    load = os.getloadavg()[0]
    peak_mib, seconds = run_job_process("vectorization", request)
    return {"peak_rss_mib": peak_mib, "seconds": round(seconds, 2),
            "load_average_1m_before": round(load, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", type=int, default=4096, help="throughput raster side in pixels")
    parser.add_argument("--mem-side", type=int, default=2048, help="side of the small memory AOI (large = 2×)")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7, help="job/baseline pairs (the ratio is their median)")
    parser.add_argument("--block-side", type=int, default=None,
                        help="override the job's target block side (service.BLOCK_SIDE) in the throughput run")
    parser.add_argument("--no-memory", action="store_true", help="throughput only")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    from rasterkube.vectorize import service

    if args.block_side:
        service.BLOCK_SIDE = args.block_side
    with tempfile.TemporaryDirectory() as tmp:
        check_before = parallel_check()
        tp = throughput(tmp, args.side, args.chunk, args.repeats)
        tp["machine_check"] = {"before": check_before, "after": parallel_check()}
        memory: dict = {}
        for label, side in () if args.no_memory else (("small", args.mem_side), ("large", 2 * args.mem_side)):
            src = str(Path(tmp) / f"mem-{side}.zarr")
            make_store(src, side, args.chunk)
            measured = job_memory(src, str(Path(tmp) / f"m{side}.parquet"))
            memory[label] = {"side": side, "pixels": side * side, **measured}
    ratio = memory["large"]["peak_rss_mib"] / memory["small"]["peak_rss_mib"] if memory else float("nan")
    report = {
        "benchmark": "vectorize",
        "workload": {"threshold": THRESHOLD, "connectivity": 4, "chunk": args.chunk, "dtype": "float32",
                     "block_side": service.BLOCK_SIDE,
                     "field": "smoothed random field (blobs with holes)"},  # fmt: skip
        "throughput": {**tp, "measured": "seconds: best of repeats; speedup: best / best; paired: per repeat; job = run_job on warm embedded Ray (2 CPUs) incl. "
                                          "zarr read, stats, merge and GeoParquet write; shapes = one call + shapely"},
        "memory": {**memory, "area_ratio": 4.0, "peak_rss_ratio": round(ratio, 3), "target_peak_rss_ratio": 1.25,
                   "meets_target": ratio <= 1.25,
                   "measured": "RSS of the job process tree (driver + embedded Ray), sampled every 50 ms"},
    }  # fmt: skip
    emit(report, args.json)


if __name__ == "__main__":
    main()
