"""Per-kind costs measured by ``bench/bench_calibrate.py``, and the arithmetic that turns a
:class:`~rasterkube.planning.work.Work` into core-seconds, wall time and memory.

A kind's CPU time is fitted as ``core_s = a + Σ b_term · units_term`` (least squares over
runs of several sizes on one machine); its wall time as ``wall_a + (core_s - a) / parallel``,
with ``parallel`` the CPUs the block tasks can use at once. The calibration file records the
machine, the date and the load average it was measured under; a plan names it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

from rasterkube.constants import Kind
from rasterkube.errors import UserError
from rasterkube.planning.work import TERM_PATCHES_PREFIX, Estimate, Sizing, Work

#: Shipped with the package: measured on the project's build machine.
DEFAULT_FILE: Final = "calibration.json"
FORMAT_VERSION: Final = 1


@dataclass(frozen=True)
class KindCost:
    """One kind's fitted costs on the calibration machine."""

    intercept_core_s: float
    #: Core-seconds per unit of each cost term (:data:`rasterkube.planning.work.TERM_UNITS`).
    per_unit_core_s: Mapping[str, float]
    wall_intercept_s: float
    #: Resident memory of a worker before its block's buffers (Python, numpy, zarr, Ray).
    worker_base_bytes: int
    runs: int = 0


@dataclass(frozen=True)
class Calibration:
    machine: str
    date: str
    cpus: int
    load_average: tuple[float, float, float]
    kinds: Mapping[str, KindCost]
    #: Model files (sha256 → file name) whose inference cost was measured.
    models: Mapping[str, str] = field(default_factory=dict)
    origin: str = ""

    @property
    def label(self) -> str:
        return f"{self.origin or 'calibration'} ({self.machine}, {self.cpus} CPUs, {self.date})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("origin")
        data["format"] = FORMAT_VERSION
        data["load_average"] = list(self.load_average)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "") -> Calibration:
        if data.get("format") != FORMAT_VERSION:
            raise UserError(f"--calibration: {origin} is not a rasterkube calibration of format {FORMAT_VERSION} "
                            "(write one with bench/bench_calibrate.py --out FILE)")  # fmt: skip
        return cls(
            machine=str(data["machine"]),
            date=str(data["date"]),
            cpus=int(data["cpus"]),
            load_average=tuple(data["load_average"]),  # type: ignore[arg-type]
            kinds={k: KindCost(**v) for k, v in data["kinds"].items()},
            models=dict(data.get("models", {})),
            origin=origin,
        )


def load(path: str | Path | None = None) -> Calibration:
    """The calibration at ``path``, or the one shipped with the package."""
    if path is None:
        text = resources.files("rasterkube.planning").joinpath(DEFAULT_FILE).read_text(encoding="utf-8")
        return Calibration.from_dict(json.loads(text), origin=f"shipped {DEFAULT_FILE}")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--calibration: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--calibration: {path} is not JSON ({exc})") from None
    try:
        return Calibration.from_dict(data, origin=str(path))
    except (KeyError, TypeError) as exc:
        raise UserError(f"--calibration: {path} lacks {exc} (write one with bench/bench_calibrate.py --out FILE)") from None


def parallelism(work: Work, sizing: Sizing, max_parallel: float | None = None) -> float:
    """CPUs kept busy at once: no more than the blocks there are, nor ``max_parallel`` (a
    Prediction's model replicas × their CPUs, which do most of its work)."""
    cap = sizing.cpus if max_parallel is None else min(sizing.cpus, max_parallel)
    return max(1.0, min(cap, float(work.blocks)))


def _per_unit(cost: KindCost, term: str, cal: Calibration) -> tuple[float, str | None]:
    if term in cost.per_unit_core_s:
        return cost.per_unit_core_s[term], None
    if term.startswith(TERM_PATCHES_PREFIX):
        known = {t: b for t, b in cost.per_unit_core_s.items() if t.startswith(TERM_PATCHES_PREFIX)}
        if known:
            # The slowest calibrated model: an unknown model is priced high rather than low.
            t, b = max(known.items(), key=lambda kv: kv[1])
            name = cal.models.get(t[len(TERM_PATCHES_PREFIX):], t)
            return b, f"this model's inference was not calibrated; priced as {name}, the slowest calibrated model"
    raise UserError(f"calibration {cal.label}: no cost for {term!r}; calibrate it with bench/bench_calibrate.py")


def estimate(
    work: Work,
    sizing: Sizing,
    cal: Calibration,
    *,
    name: str,
    namespace: str,
    gpus_reserved: float = 0.0,
    max_parallel: float | None = None,
) -> Estimate:
    """Core-seconds, wall time, GPU time and peak memory of ``work`` on ``sizing``.

    ``gpus_reserved``: GPUs the job holds while it runs (a Prediction's replicas × gpusPerReplica);
    GPU time is that reservation over the estimated wall time — what the status's usage
    measures too — from a CPU calibration unless the calibration machine had the GPU."""
    cost = cal.kinds.get(work.kind.value)
    if cost is None:
        raise UserError(f"calibration {cal.label}: no costs for {work.kind.value}")
    notes: list[str] = []
    variable = 0.0
    for term, units in work.terms.items():
        per_unit, note = _per_unit(cost, term, cal)
        variable += per_unit * units
        if note:
            notes.append(note)
    core = cost.intercept_core_s + variable
    wall = cost.wall_intercept_s + variable / parallelism(work, sizing, max_parallel)
    if gpus_reserved > 0:
        notes.append("GPU time = GPUs reserved × the wall time of a CPU-calibrated run (an upper bound on a GPU)")
    if work.kind == Kind.PREDICTION:
        notes.append("core time includes the model replicas' inference")
    # Calibrated on warm workers: a fresh cluster's first job also pays their start.
    notes.append("excludes starting Ray and its worker processes (a few core-seconds per worker)")
    return Estimate(
        kind=work.kind,
        name=name,
        namespace=namespace,
        work=work,
        sizing=sizing,
        core_seconds=core,
        wall_seconds=wall,
        gpu_seconds=gpus_reserved * wall,
        peak_memory_per_worker_bytes=cost.worker_base_bytes + work.block_buffer_bytes,
        calibration=cal.label,
        notes=tuple(notes),
    )
