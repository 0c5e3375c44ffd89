"""Operator settings and its command line (no kopf import: the CLI stays fast)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from rasterkube.constants import ENV_STORAGE_ROOT
from rasterkube.errors import UserError
from rasterkube_operator.backends.base import BackendName


@dataclass(frozen=True)
class OperatorConfig:
    backend: BackendName
    storage_root: str
    ray_address: str | None = None
    namespaces: list[str] = field(default_factory=list)
    metrics_port: int = 9090
    health_port: int = 8080
    listen_host: str = "0.0.0.0"
    poll_interval_s: float = 2.0
    max_running_jobs: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=[b.value for b in BackendName], default=BackendName.RAY.value)
    parser.add_argument("--ray-address", default=os.environ.get("RASTERKUBE_RAY_ADDRESS"),
                        help="Ray dashboard / Jobs API URL (ray backend), e.g. http://ray-head:8265")  # fmt: skip
    parser.add_argument("--namespace", action="append", default=[], help="watch only this namespace (repeatable)")
    parser.add_argument("--storage-root", default=os.environ.get(ENV_STORAGE_ROOT),
                        help="default output root, e.g. s3://bucket/prefix (env RASTERKUBE_STORAGE_ROOT)")  # fmt: skip
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port; 0 = off")
    parser.add_argument("--health-port", type=int, default=8080, help="liveness /healthz port")
    parser.add_argument("--listen-host", default="0.0.0.0", help="address for metrics and health endpoints")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds between job status polls")
    parser.add_argument("--max-running-jobs", type=int, default=int(os.environ.get("RASTERKUBE_MAX_RUNNING_JOBS", "0")),
                        help="admission limit: more resources wait in Pending (reason Queued); 0 = no limit")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    if not args.storage_root:
        raise UserError("--storage-root: set it (or RASTERKUBE_STORAGE_ROOT), e.g. s3://my-bucket/rasterkube")
    return OperatorConfig(
        backend=BackendName(args.backend),
        storage_root=args.storage_root,
        ray_address=args.ray_address,
        namespaces=list(args.namespace),
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        listen_host=args.listen_host,
        poll_interval_s=args.poll_interval,
        max_running_jobs=args.max_running_jobs,
    )
