"""Operator latency and scale on the dev stack (real API server, Ray, S3, operator process).

1. One resource on an idle stack: kubectl apply → Ray job accepted (Ray's job start_time),
   and Ray job end_time → phase Succeeded seen through the API server.
2. N resources applied at once: all reach a terminal phase; wall time, the operator's peak
   RSS, and its reconcile counts from /metrics.
Prints one JSON object (and writes it with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# The dev stack's Ray is single-machine (loopback) with token auth; this process is a client.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRss, emit  # noqa: E402
from rasterkube_devstack import binaries  # noqa: E402
from rasterkube_devstack import stack as devstack  # noqa: E402


def kubectl(info: devstack.StackInfo, *args: str, input: str | None = None) -> str:
    cmd = [str(binaries.ensure_kubectl()), "--kubeconfig", str(info.kubeconfig), *args]
    return subprocess.run(cmd, input=input, capture_output=True, text=True, check=True, timeout=300).stdout


def manifest(name: str, source: str) -> dict:
    return {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"source": {"uri": source}, "methods": ["looMedoid"], "distance": "euclidean"}}  # fmt: skip


def phases(info: devstack.StackInfo) -> dict[str, dict]:
    items = json.loads(kubectl(info, "get", "changescores", "-o", "json"))["items"]
    return {i["metadata"]["name"]: i.get("status") or {} for i in items}


def reconcile_counts(info: devstack.StackInfo) -> dict[str, float]:
    text = urllib.request.urlopen(info.operator_metrics, timeout=5).read().decode()
    counts: dict[str, float] = {}
    for m in re.finditer(r'^rasterkube_reconciles_total\{kind="(\w+)",result="(\w+)"\} ([0-9.e+]+)$', text, re.M):
        counts[m[2]] = counts.get(m[2], 0) + float(m[3])
    return counts


def operator_pid(info: devstack.StackInfo) -> int:
    return devstack.running_pids(info.directory)["operator"][0]


def single_latency(info: devstack.StackInfo) -> dict[str, float]:
    from ray.job_submission import JobSubmissionClient

    applied = time.time()
    kubectl(info, "apply", "-f", "-", input=json.dumps(manifest("latency", info.sample_uri or "")))
    seen = None
    while True:
        status = phases(info).get("latency", {})
        if status.get("phase") in ("Succeeded", "Failed"):
            seen = time.time()
            break
        time.sleep(0.05)
    job = JobSubmissionClient(info.ray_dashboard).get_job_info(status["job"]["id"])
    return {
        "phase": status["phase"],
        "apply_to_job_submitted_s": round(job.start_time / 1000 - applied, 2),
        "job_end_to_succeeded_s": round(seen - job.end_time / 1000, 2),
        "job_runtime_s": round((job.end_time - job.start_time) / 1000, 2),
    }


def many(info: devstack.StackInfo, n: int) -> dict[str, object]:
    before = reconcile_counts(info)
    docs = "\n---\n".join(json.dumps(manifest(f"many-{i:03d}", info.sample_uri or "")) for i in range(n))
    start = time.time()
    with PeakRss(operator_pid(info), interval_s=0.2, tree=False) as rss:
        kubectl(info, "apply", "-f", "-", input=docs)
        while True:
            st = {k: v for k, v in phases(info).items() if k.startswith("many-")}
            done = [v for v in st.values() if v.get("phase") in ("Succeeded", "Failed")]
            if len(done) == n:
                break
            time.sleep(1)
    wall = time.time() - start
    after = reconcile_counts(info)
    return {
        "resources": n,
        "succeeded": sum(v.get("phase") == "Succeeded" for v in st.values()),
        "failed": sum(v.get("phase") == "Failed" for v in st.values()),
        "wall_s": round(wall, 1),
        "operator_peak_rss_mib": rss.peak_mib,
        "reconciles": {k: after.get(k, 0) - before.get(k, 0) for k in after},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        info = devstack.up(Path(tmp) / "stack", verbose=False)
        try:
            report = {"benchmark": "operator", "stack_up_s": info.timings, "single": single_latency(info),
                      "many": many(info, args.n)}  # fmt: skip
        finally:
            devstack.down(Path(tmp) / "stack", verbose=False)
    emit(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
