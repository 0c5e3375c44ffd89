"""Outputs other tools read with their georeferencing (issue 13, DESIGN §3 "Readable by others").

rioxarray (``.rio.crs``, ``.rio.transform()``), odc-geo (``.odc.geobox``) and xarray's
``open_datatree`` find the CRS and transform of every raster output — Mosaic (``variables``
and ``count``), Prediction, ChangeScore, every pyramid level — from the CF ``spatial_ref``
grid mapping written next to the ``proj:``/``spatial:`` attributes. GeoParquet outputs
(Vectorization, the Mosaic index) read back with geopandas and pyarrow, their ``geo``
metadata valid against the GeoParquet 1.1 JSON schema shipped with the package. Mosaic inputs
as users make them: COGs from rioxarray in a pystac catalog, an AOI GeoParquet in UTM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from helpers import interop
from helpers.stores import random_series, write_store
from helpers.torchmodels import conv_pt2
from rasterkube import geoparquet, geozarr, multiscale
from rasterkube.grid import GeoGrid
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest
from rasterkube.mosaic import localstac

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def resource(kind: str, output_uri: str, source: str | None = None, **spec: Any) -> JobRequest:
    body = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": kind, "metadata": {"name": "out"},
            "spec": {**({"source": {"uri": source}} if source else {}), **spec}}  # fmt: skip
    return JobRequest(resource=body, output_uri=output_uri, source_uri=source)


def assert_readers_find(da: xr.DataArray, grid: GeoGrid) -> None:
    """rioxarray and odc-geo both see ``grid``'s CRS and transform on ``da``."""
    import odc.geo.xr  # noqa: F401 — registers .odc
    import rioxarray  # noqa: F401 — registers .rio
    from affine import Affine
    from pyproj import CRS

    crs = CRS.from_user_input(grid.crs)
    assert da.rio.crs is not None and CRS.from_user_input(da.rio.crs) == crs
    assert da.rio.transform() == Affine(*grid.transform)
    geobox = da.odc.geobox
    assert geobox is not None and geobox.crs is not None and CRS.from_user_input(geobox.crs) == crs
    assert tuple(geobox.affine)[:6] == pytest.approx(grid.transform, abs=1e-9)
    assert tuple(geobox.shape) == grid.shape


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    # 300×280: ChangeScore's pyramid gets two levels (MIN_SIZE 256).
    return write_store(str(tmp_path_factory.mktemp("src") / "src.zarr"), random_series(3, 2, 300, 280, seed=7), chunk=64)


def test_changescore_pyramid_levels_read_by_rioxarray_odc_geo_and_datatree(tmp_path: Path, source: str) -> None:
    out = str(tmp_path / "scores.zarr")
    run_job(resource("ChangeScore", out, source, methods=["difference"], output={"multiscales": True}))
    grid = geozarr.describe(out).grid
    tree = xr.open_datatree(out, engine="zarr")
    levels = sorted(tree.children)
    assert levels == ["0", "1"]
    for level in levels:
        node = tree[level].to_dataset()
        assert "spatial_ref" in node.coords
        assert node["variables"].attrs["grid_mapping"] == "spatial_ref" or node["variables"].encoding.get(
            "grid_mapping") == "spatial_ref"  # fmt: skip
        assert_readers_find(node["variables"], multiscale.level_grid(grid, int(level)))
    # The store as a plain dataset (level 0) too, and the proj:/spatial: attributes are kept.
    ds = geozarr.open_dataset(out)
    assert_readers_find(ds["variables"], grid)
    assert ds.attrs["proj:code"] == grid.crs and ds.attrs["spatial:transform"] == list(grid.transform)


def test_prediction_output_read_by_rioxarray_and_odc_geo(tmp_path: Path, source: str) -> None:
    model = conv_pt2(tmp_path / "m.pt2", 2, 1, patch=32)
    out = str(tmp_path / "pred.zarr")
    run_job(resource("Prediction", out, source, model={"uri": str(model), "actor": "regression",
                                                        "features": ["test:b0", "test:b1"], "labels": ["p"]},
                     patchSize=32, clipSize=4, serving={"shareDeployment": False}))  # fmt: skip
    assert_readers_find(xr.open_zarr(out)["variables"], geozarr.describe(source).grid)


def test_mosaic_from_rioxarray_cogs_and_a_utm_aoi_geoparquet(tmp_path: Path) -> None:
    """Inputs as users make them: COGs written by rioxarray listed in a pystac catalog, an AOI
    GeoParquet written by geopandas in UTM with two rows. The stores equal those from the same
    scenes written by rasterio (localstac); every store and the index are readable by others."""
    import geopandas
    import pyarrow.parquet as pq
    from shapely.geometry import box

    scenes = localstac.synthetic_scenes(tmp_path / "ref-stac", "landsat-c2-l2", n_scenes=3, shape=(60, 60),
                                        origin=(500_000.0, 5_800_000.0), step_days=31, seed=5)  # fmt: skip
    catalog = interop.rioxarray_cog_catalog(tmp_path / "rio", scenes)
    x0, y1 = 500_000.0, 5_800_000.0
    aoi = geopandas.GeoDataFrame({"id": ["north", "south"]},
                                 geometry=[box(x0 + 100, y1 - 700, x0 + 900, y1 - 100),
                                           box(x0 + 600, y1 - 1700, x0 + 1500, y1 - 1000)], crs="EPSG:32633")  # fmt: skip
    aoi.to_parquet(tmp_path / "aoi.parquet")
    spec = {"dataset": "landsat-c2-l2", "aoi": {"uri": str(tmp_path / "aoi.parquet")}, "maxCloudCover": 100,
            "bands": list(scenes.bands),
            "time": {"start": "2021-01-01", "end": "2021-04-01", "window": "P1M"}, "chunkSize": 64}  # fmt: skip
    got, want = str(tmp_path / "rio-mosaic"), str(tmp_path / "ref-mosaic")
    run_job(resource("Mosaic", got, stac={"catalog": str(catalog)}, **spec))
    run_job(resource("Mosaic", want, stac={"catalog": str(scenes.catalog)}, **spec))
    index = geopandas.read_parquet(os.path.join(got, "index.parquet"))
    assert list(index["key"]) == ["north", "south"] and index.crs.to_epsg() == 4326
    for key, location in zip(index["key"], index["location"], strict=True):
        mine, theirs = geozarr.open_dataset(location), geozarr.open_dataset(os.path.join(want, f"{key}.zarr"))
        np.testing.assert_array_equal(mine["variables"].values, theirs["variables"].values)
        np.testing.assert_array_equal(mine["count"].values, theirs["count"].values)
        assert 0 < mine["count"].values.mean() and np.isfinite(mine["variables"].values).any()
        grid = geozarr.describe(location).grid
        assert_readers_find(mine["variables"], grid)
        assert_readers_find(mine["count"], grid)
    # The index: GeoParquet 1.1 read by pyarrow and geopandas, metadata valid against the schema.
    path = os.path.join(got, "index.parquet")
    table = pq.read_table(path)
    assert table.num_rows == 2 and "location" in table.column_names
    geoparquet.validate_metadata(geoparquet.read_metadata(path))


@pytest.mark.parametrize("centerlines", [False, True])
def test_vectorization_geoparquet_read_by_geopandas_and_pyarrow_and_valid(tmp_path: Path, source: str,
                                                                          centerlines: bool) -> None:  # fmt: skip
    import geopandas
    import pyarrow.parquet as pq
    import shapely

    out = str(tmp_path / "f.parquet")
    result = run_job(resource("Vectorization", out, source, features=["test:b0"], threshold=1.5,
                              medialSkeletonize=centerlines))  # fmt: skip
    meta = geoparquet.read_metadata(out)
    geoparquet.validate_metadata(meta)
    assert meta["version"] == "1.1.0" and ("centerline" in meta["columns"]) == centerlines
    gdf = geopandas.read_parquet(out)
    assert gdf.crs.to_epsg() == 4326 and len(gdf) == result.summary["feature_count"] > 0
    table = pq.read_table(out)
    geoms = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    assert shapely.equals(geoms, gdf.geometry.values).all()
    bbox = table["bbox"].combine_chunks()
    np.testing.assert_allclose(bbox.field("xmin").to_numpy(), shapely.bounds(geoms)[:, 0])
    assert json.loads(table.schema.metadata[b"geo"])["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
