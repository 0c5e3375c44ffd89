"""Mosaic compositing: throughput and peak memory vs odc-stac + dask on the same local COGs.

Data: --scenes synthetic Sentinel-2 L2A-layout scenes (4 reflectance bands + SCL, random
reflectance, rectangular clouds of all SCL cloud classes, nodata holes) of --side² pixels,
written as COGs with a static STAC catalog (:func:`rasterkube.mosaic.localstac.synthetic_scenes`).
One composite: the masked median of every scene, plus the count of valid observations.

Candidates, each in its own process (peak RSS of the whole process tree, sampled every 50 ms),
all on the same grid (the scenes' own, 10 m, EPSG:32633) with nearest resampling:

* ``odc-stac``: ``odc.stac.load`` of the items with dask chunks of --chunk pixels, SCL masking,
  scaling, ``.median("time")`` (time rechunked to one chunk, as a dask median needs) and the
  count, computed with the threaded scheduler on 2 threads — the usual odc-stac recipe.
* ``rasterkube engine``: the Mosaic job's own block function (:func:`composite_block`: windowed
  COG reads, masks, scaling, sort-based median, count, zarr writes) over the same blocks on a
  2-thread pool in one plain process — the like-for-like comparison with odc-stac's process.
* ``rasterkube job``: the whole Mosaic job (:func:`rasterkube.jobs.run_job`: STAC search,
  store creation, Ray tasks, atomic commit) on an embedded Ray with 2 CPUs, timed on its
  second run (Ray and its worker processes warm, as on a long-running cluster; the first
  run is reported too); its memory includes Ray's own processes (GCS, raylet, workers).

Throughput in Mpixel·observations/s = side² × scenes / seconds / 1e6. The medians of all
candidates are compared (max |difference| reported; they agree to float32 rounding).
Memory flat in AOI size: the job entrypoint (``python -m rasterkube.jobs mosaic``, its own
embedded Ray) on a quarter of the scenes' area and on all of it (4× the area).
DESIGN §5 targets: ≥ 1.0× odc-stac with lower peak memory; 4× the area → ≤ 1.25× peak RSS.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRss, emit, run_job_process

BANDS = ("blue", "green", "red", "nir")
THREADS = 2
ORIGIN = (500_000.0, 5_800_000.0)


def spec(catalog: str, side: int, chunk: int) -> dict[str, Any]:
    """The job spec whose grid is the top-left ``side``² pixels of the scenes."""
    from rasterio.warp import transform_geom
    from shapely.geometry import box, mapping

    x0, y1 = ORIGIN
    # The AOI is the scene footprint shrunk by 3 m as a densified lon/lat polygon, so the grid
    # (snapped outwards to 10 m) is exactly the scenes' own; a lon/lat bbox would grow it.
    square = box(x0 + 3, y1 - 10 * side + 3, x0 + 10 * side - 3, y1 - 3).segmentize(10 * side / 256)
    aoi = transform_geom("EPSG:32633", "EPSG:4326", mapping(square), precision=-1)
    return {"dataset": "sentinel-2-l2a", "stac": {"catalog": catalog}, "aoi": {"geometry": aoi},
            "time": {"start": "2021-01-01", "end": "2022-01-01"}, "bands": list(BANDS), "crs": "EPSG:32633",
            "resolution": 10.0, "maxCloudCover": 100, "chunkSize": chunk}  # fmt: skip


def request(catalog: str, side: int, chunk: int, out: str) -> Any:
    from rasterkube.jobs.context import JobRequest

    resource = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "Mosaic", "metadata": {"name": "bench"},
                "spec": spec(catalog, side, chunk)}  # fmt: skip
    return JobRequest(resource=resource, output_uri=out)


# ---------------------------------------------------------------------------- workers


def work_engine(catalog: str, side: int, chunk: int, out: str) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from rasterkube import geozarr
    from rasterkube.api.kinds import Mosaic
    from rasterkube.mosaic import service
    from rasterkube.runtime.blocks import plan_blocks

    req = request(catalog, side, chunk, out)
    start = time.perf_counter()
    plan = service.preflight(Mosaic.model_validate(req.resource), req)
    (row,) = plan.rows
    info = geozarr.create(out, row.grid, np.array([plan.windows[0][0]], dtype="datetime64[s]"),
                          [plan.recipe.label(b) for b in plan.band_ids], chunk_size=chunk)  # fmt: skip
    geozarr.add_variable(out, service.COUNT_VAR, info, n_bands=None, dtype="uint16", fill_value=0)
    params = service.BlockParams(
        dataset=plan.recipe.dataset, grid=row.grid, scenes=row.scenes,
        footprints=tuple(service.footprint_in(s, row.grid.crs) for s in row.scenes),
        band_assets=tuple(plan.recipe.assets[b] for b in plan.band_ids), windows=plan.windows,
        out_uri=out, data_var=info.data_var,
    )  # fmt: skip
    blocks = plan_blocks(row.grid.shape, info.chunks[2:], 1)
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda b: service.composite_block(b, params), blocks))
    geozarr.finalize(out)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "scenes": len(row.scenes), "shape": list(row.grid.shape)}


def work_job(catalog: str, side: int, chunk: int, out: str) -> dict[str, Any]:
    from rasterkube.jobs import run_job
    from rasterkube.runtime.executor import ensure_ray

    ensure_ray(num_cpus=THREADS)
    # Warm-up run: Ray starts its worker processes and they import rasterio/zarr once per
    # cluster; a long-running cluster (the dev stack, KubeRay) pays that once, not per job.
    first = time.perf_counter()
    run_job(request(catalog, side, chunk, out))
    cold = time.perf_counter() - first
    start = time.perf_counter()
    result = run_job(request(catalog, side, chunk, out))
    return {"seconds": time.perf_counter() - start, "cold_seconds": cold, "scenes": result.summary["scenes"]}


def work_odc(catalog: str, side: int, chunk: int, out: str) -> dict[str, Any]:
    import dask
    import odc.stac
    import pystac
    import xarray as xr
    from affine import Affine
    from odc.geo.geobox import GeoBox
    from rasterkube.mosaic.composite import SCL_VALID

    start = time.perf_counter()
    items = list(pystac.Catalog.from_file(catalog).get_items(recursive=True))
    x0, y1 = ORIGIN
    geobox = GeoBox((side, side), Affine(10.0, 0.0, x0, 0.0, -10.0, y1), "EPSG:32633")
    ds = odc.stac.load(items, bands=[*BANDS, "scl"], geobox=geobox, chunks={"x": chunk, "y": chunk},
                       resampling="nearest")  # fmt: skip
    valid = ds["scl"].isin(sorted(SCL_VALID))
    refl = xr.concat([ds[b] for b in BANDS], dim="band")
    # baseline 05.00 (the synthetic items): reflectance = (DN − 1000) / 10 000, DN 0 = nodata
    ok = valid & (refl != 0).all("band")
    masked = ((refl.astype("float32") - 1000.0) / 10_000.0).where(ok)
    median = masked.chunk({"time": -1}).median("time", skipna=True)
    count = ok.sum("time").astype("uint16")
    with dask.config.set(scheduler="threads", num_workers=THREADS), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median_np, count_np = dask.compute(median, count)
    seconds = time.perf_counter() - start
    np.save(out + ".median.npy", median_np.values)
    np.save(out + ".count.npy", count_np.values)
    return {"seconds": seconds, "scenes": len(items)}


WORKERS = {"engine": work_engine, "job": work_job, "odc": work_odc}


def run_worker(name: str, catalog: str, side: int, chunk: int, out: str) -> dict[str, Any]:
    """Run one candidate in a fresh process; its result plus the peak RSS of its tree."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    cmd = [sys.executable, __file__, "--worker", name, "--catalog", catalog, "--side", str(side),
           "--chunk", str(chunk), "--out", out]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        with PeakRss(proc.pid) as rss:
            proc.wait()
        log.seek(0)
        text = log.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{text[-3000:]}")
    result = json.loads(next(line for line in text.splitlines()[::-1] if line.startswith("{")))
    return {**result, "peak_rss_mib": rss.peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--catalog", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.catalog, args.side, args.chunk, args.out)), flush=True)
        return

    from rasterkube import geozarr
    from rasterkube.mosaic.localstac import synthetic_scenes

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        truth = synthetic_scenes(Path(tmp) / "stac", n_scenes=args.scenes, shape=(args.side, args.side),
                                 origin=ORIGIN, start="2021-01-05", step_days=14, seed=1)  # fmt: skip
        del truth
        prepare_s = time.perf_counter() - t0
        catalog = str(Path(tmp) / "stac" / "catalog.json")
        odc = run_worker("odc", catalog, args.side, args.chunk, str(Path(tmp) / "odc"))
        engine = run_worker("engine", catalog, args.side, args.chunk, str(Path(tmp) / "engine.zarr"))
        job = run_worker("job", catalog, args.side, args.chunk, str(Path(tmp) / "job.zarr"))
        # Memory flat in AOI size: the job entrypoint (own embedded Ray) on a quarter of the
        # area and on all of it, peak RSS of the whole process tree. Chunks of a quarter of
        # the small side, so both runs have more blocks than CPUs (equal parallelism).
        memory = {}
        for label, side in (("quarter_area", args.side // 2), ("full_area", args.side)):
            req = request(catalog, side, args.side // 8, str(Path(tmp) / f"mem-{label}.zarr"))
            memory[label] = run_job_process("mosaic", json.loads(req.to_json()))[0]
        want = np.load(str(Path(tmp) / "odc") + ".median.npy")
        want_count = np.load(str(Path(tmp) / "odc") + ".count.npy")
        diffs = {}
        for name in ("engine", "job"):
            ds = geozarr.open_dataset(str(Path(tmp) / f"{name}.zarr"))
            got = ds["variables"].values[0]
            assert got.shape == want.shape, (got.shape, want.shape)
            assert np.array_equal(np.isnan(got), np.isnan(want)), f"{name}: NaN patterns differ from odc-stac"
            assert np.array_equal(ds["count"].values[0], want_count), f"{name}: counts differ from odc-stac"
            diffs[name] = float(np.nanmax(np.abs(got - want)))
    mpix_obs = args.side * args.side * args.scenes / 1e6

    def entry(r: dict[str, Any], rss_key: str = "peak_rss_mib") -> dict[str, Any]:
        return {"seconds": round(r["seconds"], 2), "mpix_obs_per_s": round(mpix_obs / r["seconds"], 2),
                rss_key: r["peak_rss_mib"]}  # fmt: skip

    report = {
        "benchmark": "mosaic_median_vs_odc_stac",
        "scenes": args.scenes,
        "side_px": args.side,
        "bands": len(BANDS),
        "chunk": args.chunk,
        "threads": THREADS,
        "cpus": os.cpu_count(),
        "prepare_cogs_s": round(prepare_s, 1),
        "mpixel_observations": mpix_obs,
        "odc_stac": entry(odc),
        "rasterkube_engine": entry(engine),
        "rasterkube_job_on_ray": {
            **entry(job, rss_key="peak_rss_mib_incl_ray"),
            "first_run_seconds": round(job["cold_seconds"], 2),
        },
        "speedup_engine_vs_odc": round(odc["seconds"] / engine["seconds"], 2),
        "speedup_job_vs_odc": round(odc["seconds"] / job["seconds"], 2),
        "peak_rss_ratio_engine_vs_odc": round(engine["peak_rss_mib"] / odc["peak_rss_mib"], 2),
        "max_abs_diff_vs_odc": diffs,
        "job_peak_rss_mib": memory,
        "job_peak_rss_ratio_4x_area": round(memory["full_area"] / memory["quarter_area"], 2),
        "target": "speedup >= 1.0 with lower peak memory; 4x the area -> <= 1.25x peak RSS (DESIGN §5)",
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
