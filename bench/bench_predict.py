"""Inference throughput: Ray Serve vs a plain in-process torch loop, whole Prediction vs model
only, and scaling with replicas (DESIGN §5), in one run, JSON out.

* ``inprocess``: the model in this process, torch threads = the replica's CPUs, batches of
  ``--batch`` patches — the baseline.
* ``serve``: the same patches and batches sent through a DeploymentHandle to one replica with
  ``--cpus`` CPUs (all batches in flight, as block tasks send them). Target ≥ 0.9×.
* ``prediction``: a whole Prediction job (read with halo, pad, cut, infer on the same deployment,
  merge, write, commit) over a store; patches/s against ``inprocess``. Target ≥ 0.7×.
* ``replicas``: the serve measurement with 1 and 2 replicas (needs 2 × --cpus CPUs).

On a GPU machine pass ``--device cuda --gpus 1``: the same measurements on the GPU.
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
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


class SmallUNetHead(torch.nn.Module):
    """A small fully-convolutional segmentation net (4 conv layers, 32 channels)."""

    def __init__(self, in_channels: int, classes: int, width: int = 32) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, classes, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def export_model(path: Path, channels: int, classes: int, patch: int, net: torch.nn.Module | None = None) -> Path:
    """``net`` (default: a :class:`SmallUNetHead`) exported with torch.export, dynamic batch."""
    torch.manual_seed(0)
    example = (torch.randn(2, channels, patch, patch),)
    net = net if net is not None else SmallUNetHead(channels, classes)
    ep = torch.export.export(net.eval(), example,
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))  # fmt: skip
    torch.export.save(ep, str(path))
    return path


def config_for(model: Path, args: argparse.Namespace, replicas: int) -> Any:
    from rasterkube.predict import models, serving

    return serving.ServeConfig(
        model_uri=str(model), model_sha256=models.fetch(str(model)).sha256, softmax=True, device=args.device,
        max_batch_size=args.batch, replicas=replicas, max_replicas=None, cpus_per_replica=args.cpus,
        gpus_per_replica=args.gpus,
    )  # fmt: skip


def timed(fn: Any, repeats: int) -> float:
    """Best of ``repeats`` (after one warm-up call): the least disturbed measurement."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_serve(config: Any, batches: list[np.ndarray], repeats: int) -> float:
    from rasterkube.predict import serving

    app = config.app_name(False, f"bench-{config.replicas}")
    serving.deploy(config, app, share=False)
    try:
        predictor = serving.ServePredictor(app)
        return timed(lambda: predictor.predict_many(batches), repeats)
    finally:
        serving.delete(app)


def bench_prediction(model: Path, args: argparse.Namespace, tmp: Path) -> tuple[float, int, float]:
    """(seconds warm, patches, seconds cold incl. deployment) of a whole Prediction job."""
    from rasterkube import geozarr, storage
    from rasterkube.grid import GeoGrid, Window
    from rasterkube.jobs import run_job
    from rasterkube.jobs.context import JobRequest

    side = args.side
    src = str(tmp / "src.zarr")
    grid = GeoGrid("EPSG:32633", (10.0, 0.0, 400000.0, 0.0, -10.0, 5600000.0), (side, side))
    t = storage.temporary_uri(src)
    geozarr.create(t, grid, np.array(["2020-01-01"], dtype="datetime64[s]"), [f"b{i}" for i in range(args.channels)],
                   chunk_size=args.chunk)  # fmt: skip
    rng = np.random.default_rng(0)
    geozarr.write_region(t, "variables", Window(0, side, 0, side),
                         rng.random((1, args.channels, side, side), dtype=np.float32))  # fmt: skip
    geozarr.finalize(t)
    storage.commit(t, src)
    resource = {
        "apiVersion": "rasterkube.dev/v1alpha1", "kind": "Prediction", "metadata": {"name": "bench"},
        "spec": {"source": {"uri": src},
                 "model": {"uri": str(model), "features": [f"b{i}" for i in range(args.channels)],
                           "labels": [f"c{i}" for i in range(args.classes)]},
                 "patchSize": args.patch, "clipSize": args.clip, "maxBatchSize": args.batch,
                 "xyBlockMultiplier": args.multiplier, "device": args.device,
                 "serving": {"cpusPerReplica": args.cpus, "gpusPerReplica": args.gpus, "shareDeployment": True},
                 "resources": {"gpus": args.gpus}},
    }  # fmt: skip
    out = str(tmp / "pred.zarr")
    start = time.perf_counter()
    result = run_job(JobRequest(resource=resource, output_uri=out, source_uri=src))
    cold = time.perf_counter() - start
    warm = float("inf")
    for _ in range(args.repeats):
        storage.remove(out)
        start = time.perf_counter()
        result = run_job(JobRequest(resource=resource, output_uri=out, source_uri=src))
        warm = min(warm, time.perf_counter() - start)
    from rasterkube.predict import serving

    serving.delete(result.summary["deployment"])
    return warm, int(result.summary["patches"]), cold


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the report here too")
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--clip", type=int, default=8)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica (= torch threads)")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--side", type=int, default=1024, help="store side in pixels for the whole Prediction")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--multiplier", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from rasterkube.predict import serving
    from rasterkube.runtime.executor import ensure_ray

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = export_model(tmp / "bench.pt2", args.channels, args.classes, args.patch)
        rng = np.random.default_rng(1)
        patches = rng.random((args.patches, args.channels, args.patch, args.patch), dtype=np.float32)
        batches = [patches[i : i + args.batch] for i in range(0, len(patches), args.batch)]

        runner = serving.TorchRunner(config_for(model, args, 1))  # threads = the replica's CPUs
        inproc_s = timed(lambda: [runner.predict(b) for b in batches], args.repeats)
        inproc = args.patches / inproc_s

        ensure_ray(num_cpus=args.ray_cpus)
        serve_s = bench_serve(config_for(model, args, 1), batches, args.repeats)
        serve = args.patches / serve_s
        report: dict[str, Any] = {
            "benchmark": "predict",
            "device": args.device,
            "torch": torch.__version__,
            "model": "4 conv layers, 32 channels",
            "patch": args.patch, "batch": args.batch, "cpus_per_replica": args.cpus, "patches": args.patches,
            "inprocess_patches_per_s": round(inproc, 1),
            "serve_patches_per_s": round(serve, 1),
            "serve_vs_inprocess": round(serve / inproc, 3),
            "serve_target": 0.9,
        }  # fmt: skip
        if args.gpus > 0 or args.ray_cpus >= 2 * args.cpus:  # room for two replicas
            two = args.patches / bench_serve(config_for(model, args, 2), batches, args.repeats)
            report["serve_2_replicas_patches_per_s"] = round(two, 1)
            report["replica_scaling_2_vs_1"] = round(two / serve, 3)
        warm, n_patches, cold = bench_prediction(model, args, tmp)
        whole = n_patches / warm
        report.update({
            "prediction_store_side": args.side, "prediction_patches": n_patches,
            "prediction_seconds": round(warm, 2), "prediction_seconds_cold_incl_deploy": round(cold, 2),
            "prediction_patches_per_s": round(whole, 1),
            "prediction_vs_model_only": round(whole / inproc, 3),
            "prediction_target": 0.7,
        })  # fmt: skip
        if args.device == "cuda":
            report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
