"""Resumable jobs: the time a resumed run saves over starting again.

Builds a time series store, then runs the real job entrypoint (``python -m rasterkube.jobs
changescore``, embedded Ray) three times with the same resource: (1) uninterrupted, to its
own output; (2) SIGKILLed — the driver and its whole Ray — once the staging's ledger holds
``--kill-at`` of the blocks; (3) again, which resumes from the ledger. Reports the wall
times (each includes starting Ray), the blocks reused, the time saved (1 − resumed / full)
and whether the resumed output equals the uninterrupted one byte for byte. Prints one JSON
object (and writes it with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402
from helpers.stores import random_series, write_store  # noqa: E402

from rasterkube import staging, storage  # noqa: E402
from rasterkube.constants import PROGRESS_PREFIX, RESULT_PREFIX  # noqa: E402

NAME = "bench-resume"
BLOCKS_MESSAGE = "scoring blocks"


def job_request(src: str, out: str, multiplier: int) -> dict[str, Any]:
    return {
        "resource": {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore", "metadata": {"name": NAME},
                     "spec": {"source": {"uri": src}, "methods": ["difference", "looMedoid"], "distance": "euclidean",
                              "robustTimeZScore": True, "xyBlockMultiplier": multiplier}},
        "outputUri": out,
        "sourceUri": src,
    }  # fmt: skip


def start(request: dict[str, Any], log: Any) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single-machine Ray on loopback
    command = [sys.executable, "-m", "rasterkube.jobs", "changescore", "--spec", json.dumps(request)]
    # Its own session: the kill reaches the driver and every Ray process it started.
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run_to_end(request: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    """(wall seconds, seconds from the first block progress line to the result, summary).

    The second number leaves out starting Python and Ray, which a resumed run pays as well
    and which the load of a shared machine stretches most."""
    t0 = time.perf_counter()
    proc = start(request, subprocess.PIPE)
    assert proc.stdout is not None
    blocks_from, result, tail = None, None, []
    for raw in proc.stdout:  # read as it comes: timestamps, and a pipe that never fills
        line = raw.decode(errors="replace").rstrip()
        tail = [*tail[-50:], line]
        if blocks_from is None and line.startswith(PROGRESS_PREFIX) and BLOCKS_MESSAGE in line:
            blocks_from = time.perf_counter()
        if line.startswith(RESULT_PREFIX):
            result = (time.perf_counter(), json.loads(line[len(RESULT_PREFIX) :]))
    proc.wait()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or result is None or blocks_from is None:
        raise SystemExit(f"job failed ({proc.returncode}): " + "\n".join(tail))
    return seconds, result[0] - blocks_from, result[1]["summary"]


def ledgered(out: str) -> int:
    parent, name = os.path.split(out)
    count = 0
    for entry in os.listdir(parent):
        blocks = os.path.join(parent, entry, staging.LEDGER_DIR, staging.BLOCKS_DIR)
        if entry.startswith(f".{name}{storage.STAGE_MARKER}") and os.path.isdir(blocks):
            count += len(os.listdir(blocks))
    return count


def run_and_kill(request: dict[str, Any], at_blocks: int) -> tuple[float, int]:
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = start(request, log)
        try:
            while (done := ledgered(request["outputUri"])) < at_blocks:
                if proc.poll() is not None:
                    raise SystemExit("the run ended before it could be killed; use a larger --side")
                time.sleep(0.01)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return time.perf_counter() - t0, done


def store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", type=int, default=512, help="side of the AOI in pixels")
    parser.add_argument("--times", type=int, default=12, help="time steps (looMedoid costs grow with their square)")
    parser.add_argument("--bands", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--multiplier", type=int, default=1)
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of the blocks ledgered before the kill")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    blocks = (-(-args.side // (args.chunk * args.multiplier))) ** 2
    with tempfile.TemporaryDirectory() as tmp:
        src = write_store(str(Path(tmp) / "src.zarr"), random_series(args.times, args.bands, args.side, args.side, seed=1),
                          chunk=args.chunk)  # fmt: skip
        full_out, out = str(Path(tmp) / "full.zarr"), str(Path(tmp) / "resumed.zarr")
        full_s, full_job_s, full_summary = run_to_end(job_request(src, full_out, args.multiplier))
        killed_s, at_kill = run_and_kill(job_request(src, out, args.multiplier), int(blocks * args.kill_at))
        resumed_s, resumed_job_s, summary = run_to_end(job_request(src, out, args.multiplier))
        a, b = store_files(Path(full_out)), store_files(Path(out))
        equal = a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    report = {
        "benchmark": "resume",
        "shape": [args.times, args.bands, args.side, args.side],
        "blocks": blocks,
        "full_run_s": round(full_s, 2),
        "killed_after_s": round(killed_s, 2),
        "ledgered_at_kill": at_kill,
        "resumed_run_s": round(resumed_s, 2),
        "blocks_reused": summary["blocksReused"],
        "full_run_blocks_reused": full_summary["blocksReused"],
        "full_run_blocks_to_commit_s": round(full_job_s, 2),
        "resumed_run_blocks_to_commit_s": round(resumed_job_s, 2),
        "resumed_over_full_blocks_to_commit": round(resumed_job_s / full_job_s, 3),
        "resumed_over_full": round(resumed_s / full_s, 3),
        "time_saved_s": round(full_s - resumed_s, 2),
        "time_saved_share": round(1 - resumed_s / full_s, 3),
        "killed_plus_resumed_over_full": round((killed_s + resumed_s) / full_s, 3),
        "outputs_equal_byte_for_byte": equal,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "note": "*_run_s are wall times including the start of Python and the embedded Ray; "
                "*_blocks_to_commit_s run from the first block progress line to the result",
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
