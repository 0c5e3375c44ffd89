"""``rasterkube plan``'s readable table (pure: estimates in, text out)."""

from __future__ import annotations

from collections.abc import Sequence

from rasterkube.planning.work import COMMIT_REQUESTS_PER_OBJECT, Estimate

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    value, unit = float(n), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{value:.0f} {_UNITS[unit]}" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def human_count(n: float) -> str:
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            return f"{n / limit:.2f}{suffix}"
    return f"{n:g}"


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172_800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def table(estimates: Sequence[Estimate]) -> str:
    """One block of lines per resource, the calibration first."""
    if not estimates:
        return ""
    lines = [f"calibration: {estimates[0].calibration}"]
    for e in estimates:
        w, s = e.work, e.sizing
        lines.append("")
        lines.append(f"{e.kind.value}/{e.name} (namespace {e.namespace})")
        if w.output is not None:
            o = w.output
            lines.append(f"  output            {o.times} time × {len(o.bands)} band × {o.shape[0]}×{o.shape[1]} px, "
                         f"chunks {o.chunk[0]}×{o.chunk[1]}")  # fmt: skip
        blocks = f"{human_count(w.blocks)}" + (f", {human_count(w.patches)} patches" if w.patches else "")
        lines.append(f"  blocks            {blocks}")
        lines.append(f"  bytes read        {human_bytes(w.bytes_read)} (uncompressed)")
        lines.append(f"  bytes written     {human_bytes(w.bytes_written)}" + ("" if w.bytes_written is None else " (uncompressed)"))
        lines.append(f"  object store      {human_count(w.object_store_requests)} requests: {human_count(w.chunk_reads)} reads, "
                     f"{human_count(w.chunk_writes)} writes, {human_count(w.ledger_markers)} ledger markers, "
                     f"{human_count(COMMIT_REQUESTS_PER_OBJECT * w.committed_objects)} to commit, "
                     f"{human_count(w.metadata_requests)} metadata")  # fmt: skip
        lines.append(f"  peak memory       {human_bytes(e.peak_memory_per_worker_bytes)} per worker")
        lines.append(f"  core-hours        {e.core_hours:.3g} ({human_seconds(e.core_seconds)} of one core)")
        lines.append(f"  GPU-hours         {e.gpu_hours:.4g}")
        lines.append(f"  wall time         {human_seconds(e.wall_seconds)}")
        lines.append(f"  sizing            {s.workers} worker(s) × {s.cpus_per_worker:g} CPU, {s.gpus:g} GPU ({s.source})")
        for note in dict.fromkeys([*w.notes, *e.notes]):
            lines.append(f"  note: {note}")
    return "\n".join(lines)
