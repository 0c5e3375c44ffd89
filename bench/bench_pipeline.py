"""Whole Prediction against the model alone, stage by stage (issue 15, DESIGN §5), JSON out.

The light-model case: a ``--side``² px × 8 bands float32 GeoZarr (1024 px chunks, smooth
random values), a 3-layer conv net (8→32→32→3, 3×3) exported with torch.export (dynamic
batch), ``patchSize: 256``, ``clipSize: 16``, ``mergeMode: clip``, ``maxBatchSize: 16``,
``device: cpu``, ``serving.shareDeployment: true`` and otherwise default settings.

* ``model_only``: the same model in this process, torch threads = all cores, batches of 16,
  over the patches of the whole image's grid (361 for 4096²) — the baseline.
* ``prediction``: the whole Prediction job (``run_job``, as ``rasterkube run`` does) against an
  already running Ray cluster this bench starts (``ray start --head`` on 127.0.0.1 with the
  machine's CPUs), warmed by one run first; the stage table is the fastest run's.
* ``prediction_vs_model_only``: model-only seconds / Prediction seconds (same pixels), the
  median over pairs — each Prediction is paired with a model-only run just before it.
* ``stages``: core-seconds per megapixel of each stage, from the block tasks' and model calls'
  own timers (``RASTERKUBE_STAGE_TIMES``), the replica's CPU outside its model calls
  (``replicaOverhead``: decoding requests, encoding results, Serve), and the rest of the
  machine's busy CPU during the run (``other``: Ray's raylet/GCS/Serve controller, the driver,
  other tenants of a shared machine); ``replica_busy``: model wall time / block phase.

``--side 1024`` gives a quick run. Measurements on a shared machine are noisy: the report
carries the load average and every repeat's time.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, machine_cpu

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
LOOPBACK = "127.0.0.1"
BANDS = 8
CLASSES = 3
REPLICA_MARK = "ServeReplica"


class LightNet(torch.nn.Module):
    """Three 3×3 conv layers, 8→32→32→3: little compute per pixel, so the pipeline shows."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(BANDS, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, CLASSES, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def export_model(path: Path, patch: int) -> Path:
    torch.manual_seed(0)
    example = (torch.randn(2, BANDS, patch, patch),)
    ep = torch.export.export(LightNet().eval(), example, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    torch.export.save(ep, str(path))
    return path


def smooth_strip(rng: np.random.Generator, rows: int, side: int, y0: int) -> np.ndarray:
    """(1, BANDS, rows, side) smooth values: a few sine waves per band plus a little noise."""
    yy, xx = np.meshgrid(np.arange(y0, y0 + rows, dtype=np.float32), np.arange(side, dtype=np.float32), indexing="ij")
    out = np.empty((1, BANDS, rows, side), dtype=np.float32)
    for b in range(BANDS):
        fy, fx = 0.002 * (b + 1), 0.003 * (BANDS - b)
        out[0, b] = np.sin(fy * yy) * np.cos(fx * xx) + 0.05 * rng.standard_normal((rows, side), dtype=np.float32)
    return out


def make_source(uri: str, side: int, chunk: int) -> None:
    from rasterkube import geozarr, storage
    from rasterkube.grid import GeoGrid, Window

    grid = GeoGrid("EPSG:32633", (10.0, 0.0, 400000.0, 0.0, -10.0, 5600000.0), (side, side))
    t = storage.temporary_uri(uri)
    geozarr.create(t, grid, np.array(["2020-01-01"], dtype="datetime64[s]"), [f"b{i}" for i in range(BANDS)],
                   chunk_size=chunk)  # fmt: skip
    rng = np.random.default_rng(0)
    for y0 in range(0, side, chunk):  # one chunk row at a time: the source never sits in memory whole
        rows = min(chunk, side - y0)
        geozarr.write_region(t, "variables", Window(y0, y0 + rows, 0, side), smooth_strip(rng, rows, side, y0))
    geozarr.finalize(t)
    storage.commit(t, uri)


class ModelOnly:
    """The model alone on all cores over the whole image's patches (cut once, kept)."""

    def __init__(self, model: Path, src: str, args: argparse.Namespace) -> None:
        from rasterkube import geozarr
        from rasterkube.grid import Window
        from rasterkube.predict import models, serving, windows

        image = geozarr.read_region(src, "variables", Window(0, args.side, 0, args.side))[0]
        origins = windows.patch_origins(args.side, args.side, args.patch, args.clip)
        patches = windows.cut_patches(windows.pad_for_patches(image, args.clip, "reflect", patch_size=args.patch), origins, args.patch)
        del image
        config = serving.ServeConfig(
            model_uri=str(model), model_sha256=models.fetch(str(model)).sha256, softmax=False, device="cpu",
            max_batch_size=args.batch, replicas=1, max_replicas=None, cpus_per_replica=float(os.cpu_count() or 1),
            gpus_per_replica=0.0,
        )  # fmt: skip
        self.runner = serving.TorchRunner(config)
        self.batches = [patches[i : i + args.batch] for i in range(0, len(patches), args.batch)]
        self.patches = len(patches)
        for b in self.batches[:2]:
            self.runner.predict(b)  # warm-up

    def seconds(self) -> float:
        start = time.perf_counter()
        for b in self.batches:
            self.runner.predict(b)
        return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class RayHead:
    """``ray start --head --block`` on loopback in a session of its own; ended by that session
    only (never ``ray stop``, which would end every Ray of this user on the machine)."""

    def __init__(self, cpus: int) -> None:
        self.port = free_port()
        self.temp = tempfile.mkdtemp(prefix="rkb-", dir="/tmp")
        command = ["ray", "start", "--head", "--block", f"--port={self.port}", f"--node-ip-address={LOOPBACK}",
                   f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={self.temp}",
                   "--disable-usage-stats"]  # fmt: skip
        ray_bin = str(Path(sys.executable).parent / "ray")
        self.log = open(Path(self.temp) / "head.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([ray_bin, *command[1:]], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        self.address = f"{LOOPBACK}:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"ray start failed, see {self.temp}/head.log") from None
                time.sleep(0.5)
        raise SystemExit("ray head did not start within 120 s")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def replica_cpu(head_pid: int) -> float:
    """CPU seconds so far of the model replica processes of the Ray head's tree."""
    total = 0.0
    for p in psutil.Process(head_pid).children(recursive=True):
        try:
            if REPLICA_MARK in " ".join(p.cmdline()) or REPLICA_MARK in p.name():
                t = p.cpu_times()
                total += t.user + t.system + getattr(t, "children_user", 0.0)
        except psutil.Error:
            pass
    return total


def prediction(model: Path, src: str, out: str, args: argparse.Namespace, head: RayHead, alone: ModelOnly) -> dict[str, Any]:
    """Whole Predictions, each paired with a model-only measurement right before it: on a
    shared machine the load changes by the minute, a pair sees about the same."""
    from rasterkube import storage
    from rasterkube.jobs import run_job
    from rasterkube.jobs.context import JobRequest

    spec: dict[str, Any] = {
        "source": {"uri": src},
        "model": {"uri": str(model), "features": [f"b{i}" for i in range(BANDS)], "labels": [f"c{i}" for i in range(CLASSES)]},
        "patchSize": args.patch, "clipSize": args.clip, "mergeMode": "clip", "maxBatchSize": args.batch,
        "device": "cpu", "serving": {"shareDeployment": True},
    }  # fmt: skip
    if args.cpus_per_replica is not None:
        spec["serving"]["cpusPerReplica"] = args.cpus_per_replica
    if args.multiplier is not None:
        spec["xyBlockMultiplier"] = args.multiplier
    resource = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "Prediction", "metadata": {"name": "bench"}, "spec": spec}
    runs: list[dict[str, Any]] = []
    for i in range(args.repeats + 1):  # the first run deploys and warms the shared deployment
        model_s = alone.seconds() if i else 0.0
        storage.remove(out)
        busy0, steal0 = machine_cpu()
        rep0 = replica_cpu(head.proc.pid)
        start = time.perf_counter()
        result = run_job(JobRequest(resource=resource, output_uri=out, source_uri=src))
        seconds = time.perf_counter() - start
        busy1, steal1 = machine_cpu()
        if i == 0:
            continue
        runs.append({"seconds": seconds, "model_s": model_s, "ratio": model_s / seconds, "summary": result.summary,
                     "busy": busy1 - busy0, "steal": steal1 - steal0, "replica": replica_cpu(head.proc.pid) - rep0,
                     "load": os.getloadavg()[0]})  # fmt: skip
    ratios = sorted(r["ratio"] for r in runs)
    best = min(runs, key=lambda r: r["seconds"])
    return best | {
        "pairs": [{"model_only_s": round(r["model_s"], 2), "prediction_s": round(r["seconds"], 2),
                   "ratio": round(r["ratio"], 3), "load1": round(r["load"], 1)} for r in runs],
        "median_ratio": ratios[len(ratios) // 2] if len(ratios) % 2 else sum(ratios[len(ratios) // 2 - 1 : len(ratios) // 2 + 1]) / 2,
    }  # fmt: skip


def stage_table(run: dict[str, Any], megapixels: float) -> dict[str, Any]:
    from rasterkube.predict import stages

    times = stages.StageTimes.from_dict(run["summary"]["stages"])
    table = {k: round(v, 3) for k, v in stages.per_megapixel(times, megapixels).items()}
    attributed = sum(times.cpu.get(s, 0.0) for s in stages.STAGES)
    replica_overhead = max(run["replica"] - times.cpu.get(stages.MODEL, 0.0), 0.0)
    table["replicaOverhead"] = round(replica_overhead / megapixels, 3)
    table["other"] = round(max(run["busy"] - attributed - replica_overhead, 0.0) / megapixels, 3)
    table["total"] = round(run["busy"] / megapixels, 3)
    block_phase = times.counts.get(stages.BLOCK_PHASE_S, 0.0)
    return {
        "core_s_per_mpx": table,
        "replica_busy": round(times.wall.get(stages.MODEL, 0.0) / block_phase, 3) if block_phase else None,
        "block_phase_s": round(block_phase, 2),
        "stage_wall_s": {k: round(v, 2) for k, v in times.wall.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the report here too")
    parser.add_argument("--side", type=int, default=4096, help="image side in px (1024 for a quick run)")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--clip", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpus-per-replica", type=float, default=None, help="serving.cpusPerReplica (default: unset)")
    parser.add_argument("--multiplier", type=int, default=None, help="xyBlockMultiplier (default: unset)")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from rasterkube.predict import stages
    from rasterkube.runtime.executor import ensure_ray

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        os.environ[stages.ENV_STAGE_TIMES] = str(tmp / "stages")
        model = export_model(tmp / "light.pt2", args.patch)
        src, out = str(tmp / "src.zarr"), str(tmp / "pred.zarr")
        make_source(src, args.side, args.chunk)
        load_before = os.getloadavg()
        alone = ModelOnly(model, src, args)
        megapixels = args.side * args.side / 1e6
        head = RayHead(args.ray_cpus)
        try:
            os.environ["RAY_ADDRESS"] = head.address
            ensure_ray()
            run = prediction(model, src, out, args, head, alone)
        finally:
            import ray

            ray.shutdown()
            head.stop()
        report: dict[str, Any] = {
            "benchmark": "pipeline",
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "model": "3 conv layers 8-32-32-3, 3x3",
            "side": args.side, "chunk": args.chunk, "patch": args.patch, "clip": args.clip, "batch": args.batch,
            "cpus_per_replica": args.cpus_per_replica, "xy_block_multiplier": args.multiplier,
            "model_only_patches": alone.patches, "prediction_patches": run["summary"]["patches"],
            "pairs": run["pairs"],
            "prediction_vs_model_only": round(run["median_ratio"], 3), "target": 0.8,
            **stage_table(run, megapixels),
            "steal_s": round(run["steal"], 2),
            "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        }  # fmt: skip
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
