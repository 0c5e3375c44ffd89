"""Vectorization: throughput on 2 Ray workers vs ONE whole-raster rasterio.features.shapes
call with the same output, and peak memory at two AOI sizes (4× the area).

Throughput: a smooth random field (blobs of all sizes, with holes, crossing every block edge)
of side --side, stored as GeoZarr. The job is the real Vectorization job
(``rasterkube.jobs.run_job`` on an embedded Ray with 2 CPUs, warm): read blockwise from zarr,
label, per-polygon statistics, polygonize, merge across block edges, write GeoParquet in the
grid's CRS. Two baselines, each in this process, timed right after the job (a *pair*):

- ``serial`` — the same output with one whole-raster call: read the whole raster from the
  store, one ``rasterio.features.shapes`` call over it (through the same numerics, as one
  block with no seams: labels, statistics), the same GeoParquet written. Its table is
  asserted equal to the job's (same polygons bit for bit, same statistics), so both make the
  same work product. The target (DESIGN §5, the issue: ≥ 1.5×) is judged on this one.
- ``shapes_only`` — just ``rasterio.features.shapes`` on the in-memory mask and the GeoJSON
  turned into shapely polygons: no store read, no statistics, no file. A lower bound on any
  whole-raster implementation; reported so the job's overheads stay visible.

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
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine_cpu, run_job_process  # noqa: E402
from helpers.stores import grid, write_store  # noqa: E402

from rasterkube.grid import Window  # noqa: E402

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


def shapes_only(data: np.ndarray) -> tuple[float, int]:
    """One whole-raster ``shapes`` call on the in-memory mask + shapely polygons (no stats, no file)."""
    import rasterio.features
    import shapely
    from affine import Affine

    start = time.perf_counter()
    mask = data > THRESHOLD
    geoms = [shapely.geometry.shape(g) for g, _ in rasterio.features.shapes(
        mask.astype(np.uint8), mask=mask, connectivity=4, transform=Affine(*grid(*data.shape).transform))]  # fmt: skip
    return time.perf_counter() - start, len(geoms)


def serial(src: str, out: str) -> tuple[float, Any]:
    """The job's output with ONE whole-raster ``shapes`` call, no Ray, no blocks: read the
    raster, polygonize it as a single block (nothing to merge), statistics, GeoParquet."""
    from rasterkube import geozarr
    from rasterkube.constants import DATA_VAR
    from rasterkube.vectorize import polygons as P
    from rasterkube.vectorize import service

    start = time.perf_counter()
    info = geozarr.describe(src, DATA_VAR)
    g = info.grid
    whole = Window(0, g.shape[0], 0, g.shape[1])
    values = geozarr.read_region(src, DATA_VAR, whole, [0])[0, 0]
    r = P.polygonize_block(values, THRESHOLD, 4, (whole.y0, whole.y1, whole.x0, whole.x1), g.shape, g.transform)
    assert not len(r.pieces), "one block over the whole raster has no seams"
    rows = P.Rows.of(P.finish(r.final, P.Finish(g.crs, g.crs)))
    table = service.feature_table([(BAND, info.times[0], rows)], g.crs, stats=True)
    service.write_geoparquet(table, out, "bench")
    return time.perf_counter() - start, table


def same_table(job_path: str, table: Any) -> None:
    """The job's file and the serial table hold the same features: geometries bit for bit,
    statistics equal up to float rounding (merged components combine the pieces' moments)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    job = pq.read_table(job_path)
    assert job.num_rows == table.num_rows, f"job {job.num_rows} rows, serial {table.num_rows}"
    a = job.take(pc.sort_indices(job, [("geometry", "ascending")]))
    b = table.take(pc.sort_indices(table, [("geometry", "ascending")]))
    assert a.column("geometry").equals(b.column("geometry")), "different polygons"
    for name in ("score_mean", "score_min", "score_max", "score_std", "area_m2", "pixel_count"):
        np.testing.assert_allclose(a.column(name).to_numpy(), b.column(name).to_numpy(), rtol=1e-9, atol=1e-9,
                                   err_msg=name)  # fmt: skip


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
    out, serial_out = str(Path(tmp) / "tp.parquet"), str(Path(tmp) / "serial.parquet")
    req = JobRequest(resource=resource(src), output_uri=out, source_uri=src)
    run_job(req)  # warm the workers
    same_table(out, serial(src, serial_out)[1])
    seconds: dict[str, list[float]] = {"job": [], "serial": [], "shapes_only": []}
    cpu: dict[str, list[float]] = {k: [] for k in seconds}
    phases, steal = [], []
    count = base_count = 0
    for _ in range(repeats):
        marks: dict[str, float] = {}
        reporter = CallbackReporter(lambda pct, msg: marks.setdefault(msg.split()[0], time.perf_counter()))
        cpu0 = machine_cpu()
        start = time.perf_counter()
        count = run_job(req, reporter).summary["feature_count"]
        end = time.perf_counter()
        cpu1 = machine_cpu()
        seconds["job"].append(end - start)
        # progress messages: "polygonizing blocks" … "merging …" (90 %) … "writing …" (95 %) … "wrote …"
        phases.append({"blocks": marks["merging"] - start, "merge": marks["writing"] - marks["merging"],
                       "write": end - marks["writing"]})  # fmt: skip
        seconds["serial"].append(serial(src, serial_out)[0])
        cpu2 = machine_cpu()
        took, base_count = shapes_only(data)
        seconds["shapes_only"].append(took)
        cpu3 = machine_cpu()
        for k, (a, b) in zip(seconds, ((cpu0, cpu1), (cpu1, cpu2), (cpu2, cpu3)), strict=True):
            cpu[k].append(b[0] - a[0])
        steal.append(cpu3[1] - cpu0[1])
    ray.shutdown()
    assert count == base_count, f"different polygon counts: job {count}, shapes {base_count}"
    job = np.asarray(seconds["job"])
    job_cpu = float(np.median(cpu["job"]))

    def versus(name: str) -> dict:
        base = np.asarray(seconds[name])
        paired = float(np.median(base / job))
        base_cpu = float(np.median(cpu[name]))
        return {"seconds": round(float(base.min()), 3), "mpix_per_s": round(side * side / base.min() / 1e6, 2),
                "speedup": round(float(base.min() / job.min()), 3),
                # Each repeat times the job and the baselines back to back: on a machine with
                # noisy neighbours the median of these paired ratios is steadier than best / best.
                "paired_speedups": [round(float(r), 3) for r in base / job],
                "paired_speedup_median": round(paired, 3),
                # CPU seconds the whole machine was busy (everything on it: the job's driver,
                # Ray, its workers; the baseline's one process), medians: the work each side
                # does, whatever the neighbours do. 2 × baseline / job is what two free cores give.
                "cpu_seconds": round(base_cpu, 3), "two_core_bound": round(2 * base_cpu / job_cpu, 3)}  # fmt: skip

    vs_serial, vs_shapes = versus("serial"), versus("shapes_only")
    phase = {k: round(v, 3) for k, v in phases[int(np.argmin(job))].items()}
    return {"side": side, "pixels": side * side, "polygons": count, "job_seconds": round(float(job.min()), 3),
            "job_mpix_per_s": round(side * side / job.min() / 1e6, 2), "job_cpu_seconds": round(job_cpu, 3),
            "job_phases_seconds": phase, "target_speedup": 1.5,
            # Judged on the paired median against the same output: best-of-N on each side pits
            # the baseline's quietest moment for one core against the job's for two, and on a
            # VM with neighbours those are seldom the same moment.
            "meets_target": vs_serial["paired_speedup_median"] >= 1.5,
            "serial": vs_serial, "shapes_only": vs_shapes,
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
        "throughput": {**tp, "measured": (
            "seconds: best of repeats; speedup: best / best; paired: per repeat; job = run_job on warm embedded Ray "
            "(2 CPUs) incl. zarr read, stats, merge and GeoParquet write; serial = the same table from one "
            "whole-raster shapes call (read, stats, write); shapes_only = one call on the in-memory mask + shapely")},
        "memory": {**memory, "area_ratio": 4.0, "peak_rss_ratio": round(ratio, 3), "target_peak_rss_ratio": 1.25,
                   "meets_target": bool(ratio <= 1.25) if memory else None,
                   "measured": "RSS of the job process tree (driver + embedded Ray), sampled every 50 ms"},
    }  # fmt: skip
    emit(report, args.json)


if __name__ == "__main__":
    main()
