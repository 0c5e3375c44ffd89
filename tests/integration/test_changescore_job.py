"""The ChangeScore job on real Ray: blockwise equals whole-array numerics, S3, faults, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from helpers.stores import random_series, write_store
from rasterkube import geozarr, multiscale, storage
from rasterkube.api import ChangeScore
from rasterkube.change import clustering, scores, service
from rasterkube.errors import UserError
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest
from rasterkube.runtime.progress import CallbackReporter

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def request(source: str, output: str, **spec) -> JobRequest:
    resource = {
        "apiVersion": "rasterkube.dev/v1alpha1",
        "kind": "ChangeScore",
        "metadata": {"name": "t"},
        "spec": {"source": {"uri": source}, **spec},
    }
    return JobRequest(resource=resource, output_uri=output, source_uri=source)


def expected(data: np.ndarray, methods, metric, robust) -> tuple[list[str], np.ndarray]:
    t, b, h, w = data.shape
    names, values = scores.compute_scores(data.reshape(t, b, h * w), methods, metric, robust)
    return names, values.reshape(t, len(names), h, w)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_blockwise_equals_whole_array(tmp_path: Path, metric: str) -> None:
    data = random_series(5, 3, 37, 29, seed=2)  # odd sizes: not multiples of chunk or block
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=8)
    out = str(tmp_path / "out.zarr")
    seen: list[int] = []
    result = run_job(
        request(src, out, methods=["difference", "looMedoid"], distance=metric, robustTimeZScore=True,
                xyBlockMultiplier=1),  # fmt: skip
        CallbackReporter(lambda pct, msg: seen.append(pct)),
        max_in_flight=2,
    )
    names, want = expected(data, ["difference", "looMedoid"], metric, True)
    assert result.summary["blocks"] == 5 * 4
    assert result.summary["bands"] == names == [
        f"difference_{metric}_distance",
        f"difference_{metric}_distance_robust_time_zscore",
        f"loo_medoid_{metric}_distance",
        f"loo_medoid_{metric}_distance_robust_time_zscore",
    ]
    ds = geozarr.open_dataset(out)
    got = ds["variables"].values
    np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
    assert np.isnan(got[0, 0]).all(), "difference at the first time step is NaN"
    assert not np.isinf(got).any()
    assert ds.attrs["spatial:transform"] == geozarr.describe(src).grid.to_attrs()["spatial:transform"]
    assert seen[-1] == 100 and seen == sorted(seen)


def test_selector_window_and_bbox(tmp_path: Path) -> None:
    data = random_series(3, 2, 24, 24, seed=4, nan_fraction=0)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=8)
    out = str(tmp_path / "sel.zarr")
    run_job(request(src, out, methods=["looMedoid"], distance="euclidean", selector={"x": [5, 19], "y": [3, 11]}))
    got = geozarr.open_dataset(out)
    _, want = expected(data[:, :, 3:11, 5:19], ["looMedoid"], "euclidean", False)
    np.testing.assert_allclose(got["variables"].values, want, rtol=1e-6)
    src_info = geozarr.describe(src)
    np.testing.assert_allclose(got.x.values, src_info.grid.x_coords()[5:19])
    np.testing.assert_allclose(got.y.values, src_info.grid.y_coords()[3:11])
    # the same window as a bbox in the store's CRS, given through bboxCrs
    x, y = src_info.grid.x_coords(), src_info.grid.y_coords()
    bbox = [x[5] - 4, y[10] - 4, x[18] + 4, y[3] + 4]
    out2 = str(tmp_path / "bbox.zarr")
    run_job(request(src, out2, methods=["looMedoid"], distance="euclidean",
                    selector={"bbox": bbox, "bboxCrs": "EPSG:32633"}))  # fmt: skip
    np.testing.assert_allclose(geozarr.open_dataset(out2)["variables"].values, want, rtol=1e-6)


def test_alpha_earth_shaped_store_by_blocks(tmp_path: Path) -> None:
    """9 years × 64 int8 bands, as the AlphaEarth annual embedding mosaic, scored by blocks."""
    rng = np.random.default_rng(9)
    data = rng.integers(-127, 128, size=(9, 64, 40, 40), dtype=np.int16).astype(np.int8)
    data[3, :, :5, :5] = -128  # nodata
    src = write_store(str(tmp_path / "aef.zarr"), data, chunk=16, bands=[f"A{i:02d}" for i in range(64)])
    out = str(tmp_path / "aef-scores.zarr")
    result = run_job(request(src, out, methods=["looMedoid"], distance="alphaEarthCosine", robustTimeZScore=True,
                            xyBlockMultiplier=1))  # fmt: skip
    assert result.summary["shape"] == [9, 2, 40, 40] and result.summary["blocks"] == 9
    got = geozarr.open_dataset(out)["variables"].values
    _, want = expected(data, ["looMedoid"], "alphaEarthCosine", True)
    np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
    assert np.isnan(got[3, 0, :5, :5]).all() and np.isfinite(got[3, 0, 5:, 5:]).all()


def test_source_and_output_on_s3(s3: str) -> None:
    data = random_series(4, 2, 20, 20, seed=5)
    src = write_store("s3://rasterkube/job/src.zarr", data, chunk=8)
    out = "s3://rasterkube/job/out.zarr"
    run_job(request(src, out, methods=["difference"], distance="euclidean", xyBlockMultiplier=1))
    _, want = expected(data, ["difference"], "euclidean", False)
    np.testing.assert_allclose(geozarr.open_dataset(out)["variables"].values, want, rtol=1e-6, equal_nan=True)
    fs, path = storage.filesystem("s3://rasterkube/job")
    assert not [k for k in fs.ls(path, refresh=True) if ".tmp-" in k or storage.STAGE_MARKER in k]


def test_failed_block_leaves_no_output(tmp_path: Path) -> None:
    """A corrupt chunk makes one block fail: no store at the output URI; the hidden staging
    is kept with its ledger (a fault, not bad input: the next run resumes from it)."""
    data = random_series(3, 2, 16, 16, seed=6)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=8)
    chunk = next(p for p in (tmp_path / "src.zarr" / "variables").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"not zstd")
    out = tmp_path / "out.zarr"
    with pytest.raises(Exception):  # noqa: B017 — the Ray task error wraps the codec error
        run_job(request(src, str(out), methods=["looMedoid"], distance="euclidean", xyBlockMultiplier=1))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    (staged,) = [p for p in tmp_path.iterdir()
                 if p.name.startswith(".out.zarr" + storage.STAGE_MARKER) and not p.name.endswith(".lock")]  # fmt: skip
    assert (staged / ".ledger" / "stage.json").is_file()


def test_previous_output_survives_a_failed_rerun(tmp_path: Path) -> None:
    data = random_series(3, 2, 16, 16, seed=7)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=8)
    out = str(tmp_path / "out.zarr")
    run_job(request(src, out, methods=["looMedoid"], distance="euclidean"))
    before = geozarr.open_dataset(out)["variables"].values
    with pytest.raises(UserError, match="spec.bands"):
        run_job(request(src, out, methods=["looMedoid"], distance="euclidean", bands=["nope"]))
    np.testing.assert_array_equal(geozarr.open_dataset(out)["variables"].values, before)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"dataVar": "embeddings"}, "spec.dataVar: 'embeddings' is not a variable"),
        ({"bands": ["test:b0", "nir"]}, "spec.bands: 'nir' not in"),
        ({"distance": "alphaEarthCosine"}, "spec.distance: alphaEarthCosine expects int8"),
        ({"methods": ["clusterTransition"], "clustering": {"k": 64}, "selector": {"x": [0, 4], "y": [0, 4]}},
         "spec.clustering.k: the time step 2017-01-01 has only"),
        ({"selector": {"x": [0, 99]}}, "spec.selector.x: [0, 99) goes past the source's 16 pixels"),
        ({"selector": {"bbox": [0, 0, 1, 1]}}, "spec.selector.bbox: [0.0, 0.0, 1.0, 1.0] (EPSG:4326) does not overlap"),
    ],
)
def test_bad_requests_write_nothing(tmp_path: Path, spec: dict, message: str) -> None:
    src = write_store(str(tmp_path / "src.zarr"), random_series(3, 2, 16, 16), chunk=8)
    with pytest.raises(UserError) as err:
        run_job(request(src, str(tmp_path / "out.zarr"), **spec))
    assert message in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.zarr"]


def test_single_time_step_rejected(tmp_path: Path) -> None:
    src = write_store(str(tmp_path / "one.zarr"), random_series(1, 2, 8, 8))
    with pytest.raises(UserError, match="has 1 time step; change scores need at least 2"):
        run_job(request(src, str(tmp_path / "o.zarr")))


def test_real_landsat_series(tmp_path: Path, landsat_store: str) -> None:
    out = str(tmp_path / "landsat-change.zarr")
    result = run_job(request(landsat_store, out, methods=["looMedoid"], distance="euclidean", robustTimeZScore=True))
    ds = geozarr.open_dataset(out)
    z = ds["variables"].sel(band="loo_medoid_euclidean_distance_robust_time_zscore").values
    assert result.summary["times"][0] == "2008-01-01" and ds.attrs["proj:code"] == "EPSG:32613"
    assert np.isfinite(z).mean() > 0.9 and not np.isinf(z).any()
    # The 2012/2013 composites differ strongly from the other years (the scene's change signal).
    changed = (z > 3).mean(axis=(1, 2))
    years = [str(t)[:4] for t in ds.time.values]
    assert changed[years.index("2013")] > changed[years.index("2009")]


@pytest.mark.parametrize("method", ["kmeans", "spectral"])
def test_cluster_transition_by_blocks_equals_whole_array(tmp_path: Path, method: str) -> None:
    """Clusters are fitted once on a sample of the whole window; blocks only assign them."""
    data = random_series(3, 2, 300, 270, seed=11)  # > 256 px: the pyramid gets a level 1
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=64)
    out = str(tmp_path / "ct.zarr")
    spec = {"methods": ["difference", "clusterTransition"], "distance": "euclidean",
            "clustering": {"k": 3, "method": method}, "xyBlockMultiplier": 1}  # fmt: skip
    req = request(src, out, **spec)
    req.resource["spec"]["output"] = {"multiscales": True}
    result = run_job(req)
    assert result.summary["bands"] == ["difference_euclidean_distance", "cluster_transition_label", "cluster_transition"]
    got = geozarr.open_dataset(out)["variables"].values

    resource = ChangeScore.model_validate(req.resource)
    info = geozarr.describe(src)
    window = service.selector_window(None, info.grid)
    model = service.fit_clusters(resource.spec, info, [0, 1], window)
    want = clustering.cluster_bands(data.reshape(3, 2, -1), model).reshape(3, 2, 300, 270)
    np.testing.assert_array_equal(got[:, 1:], want)
    _, diff = expected(data, ["difference"], "euclidean", False)
    np.testing.assert_allclose(got[:, :1], diff, rtol=1e-6, equal_nan=True)
    labels = got[:, 1]
    assert set(np.unique(labels[np.isfinite(labels)])) <= {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(np.isnan(labels), np.isnan(data).any(axis=1))
    assert np.isnan(got[0, 2]).all()
    # the pyramid takes the mode of the label band, the mean of the others
    level1 = xr.open_datatree(out, engine="zarr")["1"]["variables"].values
    np.testing.assert_array_equal(level1[:, 1], multiscale.coarsen_mode(labels))
    assert geozarr.describe(out).attrs[multiscale.CATEGORICAL_BANDS_ATTR] == ["cluster_transition_label"]


def test_cluster_transition_finds_the_landsat_change(tmp_path: Path, landsat_store: str) -> None:
    """The 2012→2013 change of the real series: far more aligned-class transitions than in
    the quiet years, and one class (bright NIR, vegetation) nearly vanishes in 2013."""
    out = str(tmp_path / "landsat-ct.zarr")
    run_job(request(landsat_store, out, methods=["clusterTransition"], distance="euclidean",
                    clustering={"k": 4, "method": "kmeans"}))  # fmt: skip
    ds = geozarr.open_dataset(out)
    years = [str(t)[:4] for t in ds.time.values]
    transition = ds["variables"].sel(band="cluster_transition").values
    labels = ds["variables"].sel(band="cluster_transition_label").values
    rate = {y: float(np.nanmean(transition[i])) for i, y in enumerate(years) if i}
    quiet = max(rate["2009"], rate["2010"], rate["2011"])
    assert rate["2013"] > 2 * quiet, rate
    share = np.array([[np.mean(labels[i] == c) for c in range(4)] for i in range(len(years))])
    # aligned labels are stable through the quiet years (each class's share moves little)...
    assert np.abs(share[1:4] - share[0]).max() < 0.1, share
    # ...and one class collapses in 2013
    assert (share[years.index("2013")] < 0.25 * share[years.index("2011")]).any(), share
