"""Model-only throughput of spec.precision and spec.compile: fp32 vs bf16 vs compile vs
compile+bf16 (and fp16 on CUDA), through the replica's own code (``TorchRunner``), in one run,
JSON out.

Two models:
* ``light``: the issue's light model — 3 convolutions 8→32→32→3 (3×3), 256 px patches;
* ``predict``: ``bench_predict.py``'s model — 4 convolutions, 32 channels, 4 → 2, 128 px.

Each variant runs the same patches in batches of ``--batch`` (as Ray Serve hands them to a
replica); throughput is the best of ``--repeats`` timed passes after the warm-up (a compiled
variant compiles at construction, which is timed on its own as ``start_s``). ``max_abs_diff``
is against the fp32 output of the same patches. ``--request-batches N`` also times requests of
N model batches at once (on CUDA the copy of the next batch then overlaps the current compute).

On a GPU machine: ``--device cuda`` (adds fp16 and samples GPU utilisation with nvidia-smi
while the timed passes run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit
from bench_predict import SmallUNetHead

CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")


class LightNet(torch.nn.Module):
    """The issue's light model: 3×3 convolutions 8 → 32 → 32 → 3."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 3, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


MODELS = {
    "light": {"net": LightNet, "channels": 8, "patch": 256, "desc": "3 conv 8→32→32→3, 256 px"},
    "predict": {"net": lambda: SmallUNetHead(4, 2), "channels": 4, "patch": 128,
                "desc": "4 conv, 32 channels, 4→2, 128 px (bench_predict.py)"},
}  # fmt: skip


def export(name: str, path: Path) -> Path:
    spec = MODELS[name]
    torch.manual_seed(0)
    net = spec["net"]().eval()
    example = (torch.randn(2, spec["channels"], spec["patch"], spec["patch"]),)
    ep = torch.export.export(net, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    torch.export.save(ep, str(path))
    return path


def cpu_flags() -> dict[str, bool]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return {f: f in have for f in CPU_FLAGS}


class GpuUtilisation:
    """Samples ``nvidia-smi``'s utilization.gpu (percent) in a thread; mean and max."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.samples: list[tuple[float, float]] = []  # (time.perf_counter(), percent)
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True)  # fmt: skip
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append((time.perf_counter(), float(out.stdout.split()[0])))
            time.sleep(self._interval)

    def __enter__(self) -> GpuUtilisation:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def summary(self, intervals: list[tuple[float, float]]) -> dict[str, Any] | None:
        """Mean and max of the samples taken inside ``intervals`` (one variant's passes)."""
        values = [v for t, v in self.samples if any(a <= t <= b for a, b in intervals)]
        if not values:
            return None
        return {"mean_percent": round(float(np.mean(values)), 1), "max_percent": max(values), "samples": len(values)}


def runner_for(model: Path, name: str, variant: dict[str, Any], args: argparse.Namespace) -> tuple[Any, float]:
    """(TorchRunner, seconds to start it: load, and compile with its warm-up call)."""
    from rasterkube.predict import models, serving

    spec = MODELS[name]
    config = serving.ServeConfig(
        model_uri=str(model), model_sha256=models.fetch(str(model)).sha256, softmax=True, device=args.device,
        max_batch_size=args.batch, replicas=1, max_replicas=None, cpus_per_replica=args.cpus,
        gpus_per_replica=1.0 if args.device == "cuda" else 0.0, precision=variant["precision"],
        compile=variant["compile"],
        warmup_input=(spec["channels"], spec["patch"], spec["patch"]) if variant["compile"] else None,
    )  # fmt: skip
    start = time.perf_counter()
    runner = serving.TorchRunner(config)
    return runner, time.perf_counter() - start


def interleaved_best(
    passes: dict[str, Any], repeats: int
) -> tuple[dict[str, float], dict[str, list[tuple[float, float]]]]:
    """Best seconds of each pass over ``repeats`` rounds that run every pass once, in turn (on a
    shared machine, load that comes and goes then hits all variants alike), and when each ran."""
    for fn in passes.values():
        fn()  # warm-up (allocator, oneDNN primitive cache, CUDA context)
    best = dict.fromkeys(passes, float("inf"))
    when: dict[str, list[tuple[float, float]]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, fn in passes.items():
            start = time.perf_counter()
            fn()
            end = time.perf_counter()
            best[name] = min(best[name], end - start)
            when[name].append((start, end))
    return best, when


def bench_model(name: str, model: Path, variants: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    spec = MODELS[name]
    rng = np.random.default_rng(1)
    patches = rng.random((args.batch * args.batches, spec["channels"], spec["patch"], spec["patch"]), dtype=np.float32)
    batches = [patches[i : i + args.batch] for i in range(0, len(patches), args.batch)]
    runners, rows = {}, {}
    for vname, variant in variants.items():
        runners[vname], start_s = runner_for(model, name, variant, args)
        rows[vname] = {"start_s": round(start_s, 2)}
    passes = {v: (lambda r=r: [r.predict(b) for b in batches]) for v, r in runners.items()}
    if args.request_batches > 1:
        step = args.batch * args.request_batches
        requests = [patches[i : i + step] for i in range(0, len(patches), step)]
        passes.update({f"{v}@request": (lambda r=r: [r.predict(q) for q in requests]) for v, r in runners.items()})
    with GpuUtilisation() as util:
        best, when = interleaved_best(passes, args.repeats)
    reference = np.concatenate([runners["fp32"].predict(b) for b in batches])
    for vname, runner in runners.items():
        out = np.concatenate([runner.predict(b) for b in batches])
        row = rows[vname]
        row.update({"seconds": round(best[vname], 3), "patches_per_s": round(len(patches) / best[vname], 1),
                    "vs_fp32": round(best["fp32"] / best[vname], 3),
                    "max_abs_diff_vs_fp32": float(np.abs(out - reference).max())})  # fmt: skip
        if f"{vname}@request" in best:
            row["multi_batch_request_patches_per_s"] = round(len(patches) / best[f"{vname}@request"], 1)
        if args.device == "cuda":
            row["gpu_utilisation"] = util.summary(when[vname])
            if f"{vname}@request" in when:
                row["gpu_utilisation_multi_batch_request"] = util.summary(when[f"{vname}@request"])
        print(f"{name} {vname}: {row}", file=sys.stderr, flush=True)
    return {"description": spec["desc"], "patches": len(patches), "variants": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the report here too")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="light,predict", help="comma-separated: light, predict")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4, help="model batches per timed pass")
    parser.add_argument("--request-batches", type=int, default=0, help="also time requests of this many batches")
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1), help="torch threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="", help="comma-separated subset (default: all for the device)")
    args = parser.parse_args()
    # Every runner of this process compiles the same forward code: room for all of them (the
    # default limit would send the later ones back to eager without a word).
    torch._dynamo.config.cache_size_limit = 64

    variants = {
        "fp32": {"precision": "fp32", "compile": False},
        "bf16": {"precision": "bf16", "compile": False},
        "compile": {"precision": "fp32", "compile": True},
        "compile+bf16": {"precision": "bf16", "compile": True},
    }
    if args.device == "cuda":
        variants["fp16"] = {"precision": "fp16", "compile": False}
        variants["compile+fp16"] = {"precision": "fp16", "compile": True}
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in {"fp32", *args.variants.split(",")}}
    report: dict[str, Any] = {
        "benchmark": "precision", "device": args.device, "torch": torch.__version__, "batch": args.batch,
        "torch_threads": int(args.cpus), "cpu_flags": cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "<rasterkube cache>/inductor"), "models": {},
    }  # fmt: skip
    if args.device == "cuda" and torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = export(name, Path(tmp) / f"{name}.pt2")
            report["models"][name] = bench_model(name, model, variants, args)
    report["bf16_faster_than_fp32"] = {n: m["variants"]["bf16"]["vs_fp32"] > 1.0 for n, m in report["models"].items()
                                       if "bf16" in m["variants"]}  # fmt: skip
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
