#!/usr/bin/env python
"""Benchmark the leave-one-out medoid change score on an AlphaEarth-shaped workload.

    python bench/bench_loo_medoid.py [--pixels N] [--repeat R] [--json out.json]

Workload: T=9 annual AlphaEarth Foundations embeddings of B=64 bands per pixel,
metric ``alphaEarthCosine``, given both as int8 codes (signed-square quantized,
as distributed) and as float32 de-quantized values.  Synthetic data: each pixel
drifts around a random unit direction, and a fraction of pixels switch to a new
direction in a random year (a "change").  All steps are valid, so the baseline
needs no missing-data handling.

``rasterkube.change.scores.loo_medoid`` is timed against the obvious vectorized
numpy implementation (below): for each left-out step t, stack the other T-1
steps, broadcast their full (T-1, T-1, B, pixels) pairwise products in chunks,
take the arg-min of the distance sums, then the distance to that medoid.  Both
use the same tie rule; their results are asserted equal (allclose) in the run.

Everything runs on one thread, so pixels/s is per core.  One JSON object goes
to stdout (and to --json).
"""

from __future__ import annotations

import os

# Pin every BLAS/OpenMP pool to one thread before numpy loads them: the figures
# are per core.  (Elementwise numpy is single-threaded anyway.)
_THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
for _var in _THREAD_ENV_VARS:
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

try:
    from rasterkube.change import scores
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))
    from rasterkube.change import scores

N_TIME = 9  # years of AlphaEarth annual embeddings
N_BAND = 64  # AlphaEarth embedding dimensions
METRIC = scores.METRIC_ALPHA_EARTH_COSINE
DEFAULT_PIXELS = 100_000
DEFAULT_REPEAT = 3
DEFAULT_SEED = 0
CHANGE_FRACTION = 0.15  # pixels whose direction switches in some year
DRIFT = 0.15  # per-year noise around a pixel's direction (per band, before renormalizing)
BASELINE_CHUNK_PIXELS = 128  # (T-1)² · B · 128 float64 = 4 MiB of products per chunk
RESULT_RTOL, RESULT_ATOL = 1e-5, 1e-7  # float32 outputs; cosine via 1 - dot vs ½‖â - b̂‖²
ALPHA_EARTH_MAX_CODE = 127  # -128 is nodata


# ----------------------------------------------------------------------- workload


def synthetic_codes(n_pixel: int, seed: int) -> npt.NDArray[np.int8]:
    """(T, B, N) int8 AlphaEarth-like codes: unit vectors, signed-square quantized."""
    rng = np.random.default_rng(seed)

    def unit(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        normalized: npt.NDArray[np.float64] = a / np.linalg.norm(a, axis=-2, keepdims=True)
        return normalized

    direction = unit(rng.normal(size=(N_BAND, n_pixel)))
    new_direction = unit(rng.normal(size=(N_BAND, n_pixel)))
    change_year = np.where(rng.random(n_pixel) < CHANGE_FRACTION, rng.integers(1, N_TIME, n_pixel), N_TIME)
    years = np.arange(N_TIME)[:, None, None]
    centre = np.where(years >= change_year[None, None, :], new_direction[None], direction[None])
    vectors = unit(centre + DRIFT / np.sqrt(N_BAND) * rng.normal(size=(N_TIME, N_BAND, n_pixel)))
    # Inverse of v = sign(q) (q / 127.5)²; |v| <= 1 for unit vectors.
    codes = np.rint(np.sign(vectors) * np.sqrt(np.abs(vectors)) * scores.ALPHA_EARTH_SCALE)
    return np.clip(codes, -ALPHA_EARTH_MAX_CODE, ALPHA_EARTH_MAX_CODE).astype(np.int8)


# ----------------------------------------------------------------------- baseline


def baseline_loo_medoid(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Straightforward vectorized LOO medoid, O(T³·B·N): a fresh (T-1)² matrix per t.

    Same definition and tie rule as ``scores.loo_medoid``; assumes every step is
    valid and non-zero (true for the synthetic workload).
    """
    n_time, _, n_pixel = x.shape
    out = np.empty((n_time, n_pixel), dtype=np.float32)
    for start in range(0, n_pixel, BASELINE_CHUNK_PIXELS):
        pixels = slice(start, start + BASELINE_CHUNK_PIXELS)
        block = x[:, :, pixels]
        if block.dtype == np.int8:
            q = block.astype(np.float64)
            v = np.sign(q) * (q / scores.ALPHA_EARTH_SCALE) ** 2
        else:
            v = block.astype(np.float64)
        norms = np.sqrt((v * v).sum(axis=1))  # (T, c)
        for t in range(n_time):
            others = np.delete(np.arange(n_time), t)
            o, o_norm = v[others], norms[others]
            dot = (o[:, None] * o[None, :]).sum(axis=2)  # (T-1, T-1, B, c) -> (T-1, T-1, c)
            dist = 1.0 - dot / (o_norm[:, None] * o_norm[None, :])
            sums = dist.sum(axis=1)
            best = sums.min(axis=0)
            medoid = (sums <= best + scores.TIE_RTOL * best + scores.TIE_ATOL).argmax(axis=0)
            m = np.take_along_axis(o, medoid[None, None, :], axis=0)[0]
            m_norm = np.take_along_axis(o_norm, medoid[None, :], axis=0)[0]
            out[t, pixels] = 1.0 - (v[t] * m).sum(axis=0) / (norms[t] * m_norm)
    return out


# ------------------------------------------------------------------------ timing


@contextlib.contextmanager
def single_thread() -> Iterator[str]:
    """Limit native thread pools to 1; yields how it was done."""
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:
        yield "environment variables (" + ", ".join(_THREAD_ENV_VARS) + ")"
        return
    with threadpool_limits(limits=1):
        yield "threadpoolctl"


def best_time(
    fn: Callable[[npt.NDArray[Any]], npt.NDArray[np.float32]],
    x: npt.NDArray[Any],
    repeat: int,
) -> tuple[float, npt.NDArray[np.float32]]:
    """Minimum wall time over ``repeat`` runs (the least disturbed one), and the result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(x)
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def run_case(x: npt.NDArray[Any], repeat: int) -> dict[str, Any]:
    def ours(a: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        return scores.loo_medoid(a, METRIC)

    seconds, got = best_time(ours, x, repeat)
    baseline_seconds, expected = best_time(baseline_loo_medoid, x, max(1, repeat - 1))
    # Every step is valid, so NaN anywhere is a bug (and allclose would let NaN == NaN pass).
    if not (np.isfinite(got).all() and np.isfinite(expected).all()):
        raise AssertionError("LOO-medoid scores must be finite on a fully valid workload")
    np.testing.assert_allclose(got, expected, rtol=RESULT_RTOL, atol=RESULT_ATOL)
    n_pixel = x.shape[2]
    return {
        "dtype": str(x.dtype),
        "seconds": round(seconds, 4),
        "pixels_per_s_per_core": round(n_pixel / seconds),
        "baseline": {
            "seconds": round(baseline_seconds, 4),
            "pixels_per_s_per_core": round(n_pixel / baseline_seconds),
        },
        "speedup": round(baseline_seconds / seconds, 2),
        "max_abs_diff_vs_baseline": float(np.max(np.abs(got - expected))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pixels", type=int, default=DEFAULT_PIXELS, help="pixels per workload")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="timed runs (best is kept)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.pixels < 1 or args.repeat < 1:
        parser.error("--pixels and --repeat must be positive")

    codes = synthetic_codes(args.pixels, args.seed)
    workloads: dict[str, npt.NDArray[Any]] = {"int8": codes, "float32": scores.dequantize_alpha_earth(codes)}
    with single_thread() as thread_control:
        cases = {name: run_case(x, args.repeat) for name, x in workloads.items()}

    report = {
        "benchmark": "loo_medoid",
        "workload": {
            "time_steps": N_TIME,
            "bands": N_BAND,
            "metric": METRIC,
            "data": "synthetic AlphaEarth-like unit embeddings, signed-square int8 quantized",
            "change_fraction": CHANGE_FRACTION,
            "invalid_fraction": 0.0,
        },
        "pixels": args.pixels,
        "repeat": args.repeat,
        "threads": 1,
        "thread_control": thread_control,
        # Headline: the int8 case, as the data are distributed.
        "seconds": cases["int8"]["seconds"],
        "pixels_per_s_per_core": cases["int8"]["pixels_per_s_per_core"],
        "baseline": cases["int8"]["baseline"],
        "speedup": cases["int8"]["speedup"],
        "cases": cases,
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
