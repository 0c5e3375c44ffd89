"""Multiscale pyramids on real Ray: levels against numpy, the convention's attributes,
open_datatree, existing readers, the CLI and ChangeScore with output.multiscales."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from helpers.stores import grid, random_series, write_store
from rasterkube import geozarr, multiscale, storage
from rasterkube.cli import main
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

# The convention's JSON schema (zarr-conventions/multiscales v1), reduced to what we rely on;
# the full schema is not fetched at test time (no network).
LAYOUT_SCHEMA = {
    "type": "object",
    "required": ["layout"],
    "properties": {
        "resampling_method": {"type": "string"},
        "layout": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["asset"],
                "properties": {
                    "asset": {"type": "string", "pattern": "^(?!/)(?!.*(\\.\\.))([^/]+(/[^/]+)*)$"},
                    "derived_from": {"type": "string"},
                    "transform": {
                        "type": "object",
                        "properties": {
                            "scale": {"type": "array", "items": {"type": "number"}},
                            "translation": {"type": "array", "items": {"type": "number"}},
                        },
                    },
                    "resampling_method": {"type": "string"},
                },
                "if": {"required": ["derived_from"]},
                "then": {"required": ["transform"]},
            },
        },
    },
}


def test_pyramid_levels_match_numpy_and_open_as_datatree(tmp_path: Path) -> None:
    data = random_series(2, 3, 37, 29, seed=3, nan_fraction=0.3)  # odd sizes, many NaNs
    data[:, 2] = np.round(np.abs(data[:, 2]) * 2)  # band 2: class labels 0..n
    data[0, 2, :4, :4] = np.nan
    uri = str(tmp_path / "s.zarr")
    write_store(uri, data, chunk=8)
    before = geozarr.describe(uri)
    # flag band 2 categorical, as a producer of label bands does
    root = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    root["attributes"][multiscale.CATEGORICAL_BANDS_ATTR] = ["test:b2"]
    (tmp_path / "s.zarr" / "zarr.json").write_text(json.dumps(root))

    grids = multiscale.build_committed(uri, min_size=4)
    assert [g.shape for g in grids] == [(37, 29), (19, 15), (10, 8), (5, 4)]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    tree = xr.open_datatree(uri, engine="zarr")
    assert sorted(tree.children) == ["0", "1", "2", "3"]
    want = data
    for level in range(4):
        ds = tree[str(level)].to_dataset()
        got = ds["variables"].values
        np.testing.assert_allclose(got[:, :2], want[:, :2], rtol=1e-6, equal_nan=True)
        np.testing.assert_array_equal(got[:, 2], want[:, 2])
        grid = grids[level]
        assert ds.attrs["spatial:transform"] == list(grid.transform)
        assert ds.attrs["spatial:shape"] == list(grid.shape) and ds.attrs["spatial:bbox"] == list(grid.bbox)
        np.testing.assert_allclose(ds.x.values, grid.x_coords())
        np.testing.assert_allclose(ds.y.values, grid.y_coords())
        assert [str(b) for b in ds.band.values] == list(before.bands)
        # the next level from this one, by the pure functions
        want = np.concatenate([multiscale.coarsen_mean(want[:, :2]), multiscale.coarsen_mode(want[:, 2:])], axis=1)

    attrs = tree.attrs
    names = [c["name"] for c in attrs["zarr_conventions"]]
    assert names == ["proj:", "spatial:", "multiscales"]
    assert next(c for c in attrs["zarr_conventions"] if c["name"] == "multiscales") == multiscale.MULTISCALES_CONVENTION
    import jsonschema

    jsonschema.validate(attrs["multiscales"], LAYOUT_SCHEMA)
    layout = attrs["multiscales"]["layout"]
    assert [e["asset"] for e in layout] == ["0", "1", "2", "3"]
    assert [e.get("derived_from") for e in layout] == [None, "0", "1", "2"]
    assert layout[2]["spatial:transform"] == [40.0, 0.0, 400000.0, 0.0, -40.0, 5600000.0]
    assert attrs["spatial:transform"] == list(grids[0].transform)  # the root describes level 0

    # existing readers see level 0, unchanged
    after = geozarr.describe(uri)
    assert after.grid == before.grid and after.bands == before.bands and after.shape == before.shape
    np.testing.assert_array_equal(geozarr.open_dataset(uri)["variables"].values, data)
    window = geozarr.read_region(uri, "variables", before.grid.window_for_bbox(before.grid.bbox), [1, 0])
    np.testing.assert_array_equal(window, data[:, [1, 0]])


def test_rebuild_and_extra_variables(tmp_path: Path) -> None:
    """A (time, y, x) integer variable (a mosaic's count) is coarsened by mode; a rebuild replaces levels."""
    data = random_series(2, 1, 20, 20, seed=1, nan_fraction=0)
    tmp = str(tmp_path / ".m.zarr.tmp-x")
    times = np.array(["2020-01-01", "2021-01-01"], dtype="datetime64[s]")
    info = geozarr.create(tmp, grid(20, 20), times, ["b"], chunk_size=8)
    geozarr.add_variable(tmp, "count", info, n_bands=None, dtype="uint16", fill_value=0)
    full = info.grid.window_for_bbox(info.grid.bbox)
    count = np.random.default_rng(0).integers(0, 3, size=(2, 20, 20)).astype(np.uint16)
    geozarr.write_region(tmp, "variables", full, data)
    geozarr.write_region(tmp, "count", full, count)
    multiscale.build(tmp, min_size=4)
    geozarr.finalize(tmp)
    uri = str(tmp_path / "m.zarr")
    storage.commit(tmp, uri)
    tree = xr.open_datatree(uri, engine="zarr")
    np.testing.assert_array_equal(tree["1"]["count"].values, multiscale.coarsen_mode(count))
    assert tree["1"]["count"].dtype == np.uint16
    assert tree.attrs["multiscales"]["resampling_method"] == "average"

    assert main(["multiscales", uri, "--min-size", "8"]) == 0  # rebuild with fewer levels
    tree = xr.open_datatree(uri, engine="zarr")
    assert sorted(tree.children) == ["0", "1", "2"]
    assert len(tree.attrs["multiscales"]["layout"]) == 3
    np.testing.assert_array_equal(geozarr.open_dataset(uri)["variables"].values, data)


def test_changescore_with_multiscales_output(tmp_path: Path) -> None:
    data = random_series(3, 2, 300, 280, seed=2)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=64)
    out = str(tmp_path / "scores.zarr")
    resource = {
        "apiVersion": "rasterkube.dev/v1alpha1",
        "kind": "ChangeScore",
        "metadata": {"name": "t"},
        "spec": {"source": {"uri": src}, "methods": ["difference"], "distance": "euclidean",
                 "output": {"multiscales": True}},
    }  # fmt: skip
    result = run_job(JobRequest(resource=resource, output_uri=out, source_uri=src))
    assert result.summary["multiscales"] == [[300, 280], [150, 140]]
    tree = xr.open_datatree(out, engine="zarr")
    assert sorted(tree.children) == ["0", "1"]
    level0 = tree["0"]["variables"].values
    np.testing.assert_allclose(tree["1"]["variables"].values, multiscale.coarsen_mean(level0), rtol=1e-6, equal_nan=True)
    # a multiscale output is a valid source for the next job (read through level 0)
    again = str(tmp_path / "again.zarr")
    resource["spec"] = {"source": {"uri": out}, "methods": ["difference"], "distance": "euclidean"}
    run_job(JobRequest(resource=resource, output_uri=again, source_uri=out))
    assert geozarr.describe(again).shape == (3, 1, 300, 280)


def test_build_committed_on_s3(s3: str) -> None:
    data = random_series(2, 2, 40, 36, seed=4)
    uri = write_store("s3://rasterkube/ms/src.zarr", data, chunk=8)
    grids = multiscale.build_committed(uri, min_size=8)
    assert [g.shape for g in grids] == [(40, 36), (20, 18), (10, 9), (5, 5)]
    np.testing.assert_array_equal(geozarr.open_dataset(uri)["variables"].values, data)
    root = geozarr.open_group(uri)
    assert [e["asset"] for e in root.attrs["multiscales"]["layout"]] == ["0", "1", "2", "3"]
    level1 = np.asarray(root["1/variables"][...])
    np.testing.assert_allclose(level1, multiscale.coarsen_mean(data), rtol=1e-6, equal_nan=True)
    assert "variables" not in root  # moved into level 0, not left behind at the root
    fs, path = storage.filesystem("s3://rasterkube/ms")
    assert not [k for k in fs.ls(path, refresh=True) if ".tmp-" in k]
