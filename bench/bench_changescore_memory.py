"""ChangeScore job: peak memory and throughput at two AOI sizes (4× the area).

Builds AlphaEarth-shaped stores (9 years × 64 int8 bands) of side S and 2·S, runs the real
job entrypoint (``python -m rasterkube.jobs changescore``, embedded Ray) on each, and samples
the RSS of the whole process tree (driver, raylet, workers) every 50 ms. DESIGN §5 target:
4× the area → ≤ 1.25× peak RSS. Prints one JSON object (and writes it with --json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, run_job_process  # noqa: E402
from helpers.stores import write_store  # noqa: E402

YEARS, BANDS = 9, 64


def make_store(uri: str, side: int, chunk: int) -> None:
    rng = np.random.default_rng(side)
    base = rng.integers(-127, 128, size=(1, BANDS, side, side), dtype=np.int16)
    noise = rng.integers(-8, 9, size=(YEARS, BANDS, side, side), dtype=np.int16)
    data = np.clip(base + noise, -127, 127).astype(np.int8)
    write_store(uri, data, chunk=chunk, bands=[f"A{i:02d}" for i in range(BANDS)], start_year=2017)


def run_job(src: str, out: str, multiplier: int) -> dict[str, float]:
    request = {
        "resource": {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore", "metadata": {"name": "bench"},
                     "spec": {"source": {"uri": src}, "methods": ["looMedoid"], "distance": "alphaEarthCosine",
                              "robustTimeZScore": True, "xyBlockMultiplier": multiplier}},
        "outputUri": out,
        "sourceUri": src,
    }  # fmt: skip
    peak_mib, seconds = run_job_process("changescore", request)
    return {"peak_rss_mib": peak_mib, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", type=int, default=384, help="side of the small AOI in pixels (large = 2×)")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--multiplier", type=int, default=1)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, side in (("small", args.side), ("large", 2 * args.side)):
            src = str(Path(tmp) / f"aef-{side}.zarr")
            make_store(src, side, args.chunk)
            r = run_job(src, str(Path(tmp) / f"scores-{side}.zarr"), args.multiplier)
            r.update(side=side, pixels=side * side, blocks=(-(-side // (args.chunk * args.multiplier))) ** 2)
            r["pixels_per_s"] = side * side / r["seconds"]
            results[label] = r
    ratio = results["large"]["peak_rss_mib"] / results["small"]["peak_rss_mib"]
    report = {
        "benchmark": "changescore_memory",
        "workload": {"years": YEARS, "bands": BANDS, "dtype": "int8", "distance": "alphaEarthCosine",
                     "methods": ["looMedoid"], "robustTimeZScore": True, "chunk": args.chunk,
                     "xyBlockMultiplier": args.multiplier},  # fmt: skip
        "measured": "RSS of the job process tree (driver + embedded Ray), sampled every 50 ms; seconds include Ray start",
        "small": results["small"],
        "large": results["large"],
        "area_ratio": 4.0,
        "peak_rss_ratio": round(ratio, 3),
        "target_peak_rss_ratio": 1.25,
        "meets_target": ratio <= 1.25,
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
