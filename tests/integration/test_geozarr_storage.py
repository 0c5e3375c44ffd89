"""GeoZarr stores and atomic commits, on a local filesystem and a real S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers.stores import grid, random_series, write_store
from rasterkube import geozarr, storage
from rasterkube.grid import Window

pytestmark = pytest.mark.integration


def check_store(uri: str, data: np.ndarray) -> None:
    info = geozarr.describe(uri)
    assert info.shape == data.shape
    assert info.grid == grid(*data.shape[2:])
    np.testing.assert_array_equal(geozarr.read_region(uri, "variables", Window(0, *data.shape[2:3], 0, data.shape[3])), data)
    ds = geozarr.open_dataset(uri)
    assert ds["variables"].dims == ("time", "band", "y", "x")
    assert list(ds.band.values) == list(info.bands)
    assert str(ds.time.values[0])[:10] == "2017-01-01"
    np.testing.assert_allclose(ds.x.values, grid(*data.shape[2:]).x_coords())
    assert ds.attrs["proj:code"] == "EPSG:32633"
    assert ds.attrs["spatial:dimensions"] == ["y", "x"]
    assert {c["name"] for c in ds.attrs["zarr_conventions"]} == {"proj:", "spatial:"}
    np.testing.assert_array_equal(np.asarray(ds["variables"].values), data)


def test_round_trip_local(tmp_path: Path) -> None:
    data = random_series(3, 2, 21, 34)
    uri = write_store(str(tmp_path / "a.zarr"), data, chunk=8)
    check_store(uri, data)
    assert not any(p.name.startswith(".a.zarr.tmp-") for p in tmp_path.iterdir())
    # consolidated metadata lives in the root zarr.json, the object a commit writes last
    assert "consolidated_metadata" in json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())


def test_round_trip_s3(s3: str) -> None:
    data = random_series(2, 3, 17, 19, seed=1)
    uri = write_store("s3://rasterkube/tests/rt.zarr", data, chunk=8)
    check_store(uri, data)
    fs, path = storage.filesystem("s3://rasterkube/tests")
    assert not [k for k in fs.ls(path) if ".tmp-" in k]


@pytest.mark.parametrize("root", ["local", "s3"])
def test_repeated_commit_replaces_whole_store(tmp_path: Path, request: pytest.FixtureRequest, root: str) -> None:
    base = str(tmp_path) if root == "local" else (request.getfixturevalue("s3") and "s3://rasterkube/repeat")
    uri = storage.join(base, "r.zarr")
    write_store(uri, random_series(3, 4, 16, 16), chunk=8)
    smaller = random_series(2, 1, 8, 8, seed=3)
    write_store(uri, smaller, chunk=8)
    check_store(uri, smaller)
    fs, path = storage.filesystem(uri)
    # no chunk of the old, larger store survives the replacement
    assert not [k for k in fs.find(path) if "/variables/c/2/" in k or "/variables/c/0/3/" in k]


def test_half_copied_store_does_not_look_complete(s3: str) -> None:
    """Simulate a crash in the middle of an S3 commit: everything but the root metadata."""
    data = random_series(2, 1, 8, 8)
    tmp = storage.temporary_uri("s3://rasterkube/crash/c.zarr", "run1")
    geozarr.create(tmp, grid(8, 8), np.array(["2017-01-01", "2018-01-01"], dtype="datetime64[s]"), ["b"], chunk_size=8)
    geozarr.write_region(tmp, "variables", Window(0, 8, 0, 8), data)
    geozarr.finalize(tmp)
    fs, tmp_path = storage.filesystem(tmp)
    for key in fs.find(tmp_path):
        if not key.endswith(f"{tmp_path.split('/')[-1]}/zarr.json"):
            fs.copy(key, key.replace(tmp_path, "rasterkube/crash/c.zarr"))
    assert storage.exists("s3://rasterkube/crash/c.zarr")
    assert not storage.is_committed("s3://rasterkube/crash/c.zarr")
    with pytest.raises(geozarr.StoreError, match="not a complete store"):
        geozarr.describe("s3://rasterkube/crash/c.zarr")
    storage.commit(tmp, "s3://rasterkube/crash/c.zarr")
    check_store("s3://rasterkube/crash/c.zarr", data)


def test_commit_refuses_incomplete_tmp(tmp_path: Path) -> None:
    (tmp_path / ".x.zarr.tmp-1").mkdir()
    with pytest.raises(RuntimeError, match="refusing to commit"):
        storage.commit(str(tmp_path / ".x.zarr.tmp-1"), str(tmp_path / "x.zarr"))
    assert not (tmp_path / "x.zarr").exists()


def test_describe_errors(tmp_path: Path) -> None:
    with pytest.raises(geozarr.StoreError, match="does not exist"):
        geozarr.describe(str(tmp_path / "missing.zarr"))
    uri = write_store(str(tmp_path / "s.zarr"), random_series(2, 2, 4, 4))
    with pytest.raises(geozarr.StoreError, match="'embeddings' is not a variable") as err:
        geozarr.describe(uri, "embeddings")
    assert err.value.field == "dataVar"
    with pytest.raises(geozarr.StoreError, match="'nir' not in") as err:
        geozarr.describe(uri).band_indices(["nir"])
    assert err.value.field == "bands"
