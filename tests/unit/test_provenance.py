"""Provenance items (pure builders), their validation against the shipped STAC schemas, and
the catalog of a storage root (no Ray: stores and items are written directly)."""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
from pystac.errors import STACValidationError
from shapely.geometry import Point, shape

from helpers.stores import UTM33, grid, random_series, write_store
from rasterkube import catalog, cli, provenance, stacschema, storage
from rasterkube.api import RESOURCE_MODELS
from rasterkube.constants import Kind
from rasterkube.grid import GeoGrid

TIMES = np.array(["2019-01-01", "2020-01-01", "2021-01-01"], dtype="datetime64[s]")
SHA = "ab" * 32


def resource(kind: Kind, spec: dict[str, Any], generation: int | None = 7) -> Any:
    meta: dict[str, Any] = {"name": "r1", "namespace": "team-a", "uid": "0f0e-uid"}
    if generation is not None:
        meta["generation"] = generation
    return RESOURCE_MODELS[kind].model_validate(
        {"apiVersion": "rasterkube.dev/v1alpha1", "kind": kind.value, "metadata": meta, "spec": spec}
    )


def prediction() -> Any:
    return resource(Kind.PREDICTION, {"source": {"uri": "s3://b/in.zarr"},
                                      "model": {"uri": "hf://org/repo/m.pt2", "features": ["a", "b"],
                                                "labels": ["water", "land"]}})  # fmt: skip


def raster_item(res: Any = None, g: GeoGrid | None = None, **prov: Any) -> dict[str, Any]:
    res = res or prediction()
    p = provenance.Provenance.of(res, "run-1", "a test", sources=["s3://b/in.zarr"],
                                 derived_from=["s3://b/in.zarr/stac-item.json"], **prov)  # fmt: skip
    out = provenance.RasterOutput(g or grid(40, 30), TIMES, ("water", "land"), "float32")
    return provenance.raster_item(p, provenance.item_id(res.kind, res.namespace, res.name), out)


# ------------------------------------------------------------------------------ item fields


def test_raster_item_names_the_resource_its_spec_and_the_model() -> None:
    res = prediction()
    item = raster_item(res, model_uri="hf://org/repo/m.pt2", model_sha256=SHA)
    stacschema.validate(item)
    props = item["properties"]
    assert item["id"] == "prediction-team-a-r1"
    assert props["processing:software"] == {"rasterkube": provenance.software_version()}
    assert props["rasterkube:kind"] == "Prediction" and props["rasterkube:name"] == "r1"
    assert props["rasterkube:namespace"] == "team-a" and props["rasterkube:generation"] == 7
    assert props["rasterkube:uid"] == "0f0e-uid" and props["rasterkube:run_id"] == "run-1"
    assert props["rasterkube:spec_hash"] == res.spec_hash and len(res.spec_hash) == 64
    assert props["processing:expression"] == {"format": "rasterkube.dev/v1alpha1 spec", "expression": res.spec.to_wire()}
    assert props["rasterkube:model_sha256"] == SHA and props["rasterkube:model_uri"] == "hf://org/repo/m.pt2"
    assert props["rasterkube:sources"] == ["s3://b/in.zarr"]
    assert item["links"] == [{"rel": "derived_from", "href": "s3://b/in.zarr/stac-item.json", "type": "application/geo+json"}]
    assert props["start_datetime"] == "2019-01-01T00:00:00Z" and props["end_datetime"] == "2021-01-01T00:00:00Z"
    assert props["datetime"] is None


def test_raster_item_projection_and_raster_fields() -> None:
    g = grid(40, 30)
    item = raster_item(g=g)
    props = item["properties"]
    assert props["proj:code"] == UTM33 and props["proj:shape"] == [40, 30]
    assert props["proj:transform"] == list(g.transform) and props["proj:bbox"] == list(g.bbox)
    asset = item["assets"]["data"]
    assert asset["href"] == "./" and asset["type"] == "application/vnd.zarr" and asset["roles"] == ["data"]
    assert [b["name"] for b in asset["bands"]] == ["water", "land"]
    assert all(b["data_type"] == "float32" and b["nodata"] == "nan" for b in asset["bands"])
    assert all(b["raster:spatial_resolution"] == 10.0 and b["raster:sampling"] == "area" for b in asset["bands"])
    assert "rasterkube:model_sha256" not in props  # only Predictions name a model


def test_geometry_and_bbox_are_lon_lat_and_cover_the_grid() -> None:
    from pyproj import Transformer

    g = GeoGrid(UTM33, (10.0, 0.0, 300_000.0, 0.0, -10.0, 5_900_000.0), (5000, 8000))  # 80 x 50 km
    geometry, bbox = provenance.footprint(g)
    poly = shape(geometry)
    assert poly.is_valid and geometry["coordinates"][0][0] == geometry["coordinates"][0][-1]
    to_lonlat = Transformer.from_crs(UTM33, "EPSG:4326", always_xy=True)
    x0, y0, x1, y1 = g.bbox
    for x, y in [(x0, y0), (x1, y1), ((x0 + x1) / 2, y0), ((x0 + x1) / 2, y1), ((x0 + x1) / 2, (y0 + y1) / 2)]:
        lon, lat = to_lonlat.transform(x, y)
        assert bbox[0] <= lon <= bbox[2] and bbox[1] <= lat <= bbox[3]
        assert poly.buffer(1e-6).contains(Point(lon, lat))
    assert 10 < bbox[0] < bbox[2] < 15 and 52 < bbox[1] < bbox[3] < 54  # west of zone 33's meridian, ~53°N
    # A lon/lat grid is its own footprint.
    ll = GeoGrid("EPSG:4326", (0.01, 0.0, 13.0, 0.0, -0.01, 53.0), (100, 200))
    assert provenance.footprint(ll)[1] == [13.0, 52.0, 15.0, 53.0]


def test_crs_without_a_code_is_given_as_wkt2() -> None:
    from pyproj import CRS

    wkt = CRS.from_proj4("+proj=laea +lat_0=52 +lon_0=10 +x_0=4321000 +y_0=3210000 +ellps=GRS80 +units=m").to_wkt()
    g = GeoGrid(wkt, (10.0, 0.0, 4_400_000.0, 0.0, -10.0, 3_300_000.0), (20, 20))
    item = raster_item(g=g)
    stacschema.validate(item)
    assert item["properties"]["proj:code"] is None and item["properties"]["proj:wkt2"].startswith("PROJCRS")


@pytest.mark.parametrize(
    ("times", "end", "expected"),
    [
        (["2020-05-01"], None, {"datetime": "2020-05-01T00:00:00Z"}),
        (["2020-01-01", "2022-01-01"], None,
         {"datetime": None, "start_datetime": "2020-01-01T00:00:00Z", "end_datetime": "2022-01-01T00:00:00Z"}),
        (["2020-01-01"], "2020-12-31T23:59:59",  # a Mosaic window: its end, inclusive
         {"datetime": None, "start_datetime": "2020-01-01T00:00:00Z", "end_datetime": "2020-12-31T23:59:59Z"}),
        (["NaT"], None, {"datetime": "2024-02-03T04:05:06Z"}),  # no dates: the processing time
    ],
)  # fmt: skip
def test_time_fields(times: list[str], end: str | None, expected: dict[str, Any]) -> None:
    got = provenance.time_fields(np.array(times, dtype="datetime64[s]"), "2024-02-03T04:05:06Z",
                                 None if end is None else np.datetime64(end))  # fmt: skip
    assert got == expected


def test_generation_and_uid_left_out_when_unknown() -> None:
    """A local run (rasterkube run) has no generation or uid: the fields are absent, not null."""
    res = resource(Kind.CHANGE_SCORE, {"source": {"uri": "/in.zarr"}}, generation=None)
    item = raster_item(res)
    stacschema.validate(item)
    assert "rasterkube:generation" not in item["properties"]


def test_integer_bands_carry_their_nodata_value() -> None:
    bands = provenance.raster_bands(["a"], "uint8", 255.0, grid(4, 4))
    assert bands == [{"name": "a", "data_type": "uint8", "nodata": 255.0, "raster:sampling": "area",
                      "raster:spatial_resolution": 10.0}]  # fmt: skip
    packed = provenance.raster_bands(["a"], "int16", -9999.0, grid(4, 4), scale_offset=(0.0001, -0.1))
    assert packed[0]["raster:scale"] == 0.0001 and packed[0]["raster:offset"] == -0.1


def test_vector_item_assets_beside_it() -> None:
    res = resource(Kind.VECTORIZATION, {"source": {"uri": "/in.zarr"}, "features": ["p"], "threshold": 0.5})
    p = provenance.Provenance.of(res, "run-2", "polygons", sources=["/in.zarr"])
    files = [provenance.FileAsset("data", "v.parquet", provenance.PARQUET_TYPE, "EPSG:4326", "polygons"),
             provenance.FileAsset("pmtiles", "v.pmtiles", provenance.PMTILES_TYPE, "EPSG:3857", "tiles", ("visual",))]
    item = provenance.vector_item(p, "vectorization-team-a-r1", grid(20, 20), TIMES, files,
                                  {provenance.FEATURE_COUNT: 12})  # fmt: skip
    stacschema.validate(item)
    assert item["assets"]["data"] == {"href": "./v.parquet", "type": "application/vnd.apache.parquet",
                                      "title": "polygons", "roles": ["data"], "proj:code": "EPSG:4326"}  # fmt: skip
    assert item["assets"]["pmtiles"]["href"] == "./v.pmtiles" and item["assets"]["pmtiles"]["proj:code"] == "EPSG:3857"
    assert provenance.stacschema.RASTER_EXTENSION not in item["stac_extensions"]
    assert item["properties"]["rasterkube:feature_count"] == 12


def test_index_collection_links_every_row_item() -> None:
    _index_collection_of(("west", 400_000.0), ("east", 500_000.0))


def test_an_index_of_one_row_has_one_box() -> None:
    """STAC 1.1 allows the overall box alone or with two or more sub-boxes: a one-row index
    (a Mosaic whose AOI has one row, the e2e client test's) must not list its box twice."""
    coll = _index_collection_of(("only", 400_000.0))
    assert len(coll["extent"]["spatial"]["bbox"]) == 1


def _index_collection_of(*rows_at: tuple[str, float]) -> dict[str, Any]:
    res = resource(Kind.MOSAIC, {"dataset": "sentinel-2-l2a", "aoi": {"uri": "/aoi.parquet"},
                                 "time": {"start": "2021-01-01", "end": "2022-01-01"}})  # fmt: skip
    p = provenance.Provenance.of(res, "run-3", "composites", sources=["/catalog.json"])
    rows = []
    for key, x0 in rows_at:
        g = GeoGrid(UTM33, (10.0, 0.0, x0, 0.0, -10.0, 5_600_000.0), (50, 50))
        out = provenance.RasterOutput(g, TIMES[:1], ("b",), "float32", end=np.datetime64("2021-12-31T23:59:59"))
        item = provenance.raster_item(p, provenance.item_id(res.kind, res.namespace, res.name, key), out,
                                      collection="mosaic-team-a-r1")  # fmt: skip
        stacschema.validate(item)
        assert item["collection"] == "mosaic-team-a-r1"
        assert {"rel": "collection", "href": "../collection.json", "type": "application/json"} in item["links"]
        rows.append((f"./{key}.zarr/stac-item.json", item))
    coll = provenance.index_collection(p, "mosaic-team-a-r1", rows, "index.parquet")
    stacschema.validate(coll)
    assert [link["href"] for link in coll["links"] if link["rel"] == "item"] == [
        f"./{key}.zarr/stac-item.json" for key, _ in rows_at]  # fmt: skip
    if len(rows_at) == 1:
        return coll
    union, west, east = coll["extent"]["spatial"]["bbox"]
    assert union == [west[0], min(west[1], east[1]), east[2], max(west[3], east[3])]
    assert coll["extent"]["temporal"]["interval"] == [["2019-01-01T00:00:00Z", "2021-12-31T23:59:59Z"]]
    assert coll["assets"]["index"]["href"] == "./index.parquet"
    assert coll["providers"][0]["processing:software"] == {"rasterkube": provenance.software_version()}
    assert coll["rasterkube:spec_hash"] == res.spec_hash
    return coll


# ---------------------------------------------------------------------------- validation


def _break(item: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split("/")
    target = item
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "schema"),
    [
        ("bbox", [1.0, 2.0, 3.0], "item.json"),
        ("properties/datetime", _DELETE, "item.json"),  # neither datetime nor a range
        ("properties/start_datetime", _DELETE, "item.json"),  # datetime null needs both ends
        ("assets/data/bands/0/data_type", "float", "item.json"),
        ("properties/proj:code", 32633, "projection"),
        ("properties/proj:shape", [40], "projection"),
        ("properties/processing:datetime", "2024-01-01T00:00:00+02:00", "processing"),  # not UTC
        ("properties/processing:software", {"rasterkube": 1}, "processing"),
        ("assets/data/bands/0/raster:sampling", "centre", "raster"),
        ("assets/data/bands/0/raster:spatial_resolution", "10 m", "raster"),
    ],
)  # fmt: skip
def test_broken_items_fail_validation(path: str, value: Any, schema: str) -> None:
    item = copy.deepcopy(raster_item())
    stacschema.validate(item)
    _break(item, path, value)
    with pytest.raises(STACValidationError, match=schema):
        stacschema.validate(item)


def test_extension_declared_without_its_fields_fails() -> None:
    item = raster_item()
    for band in item["assets"]["data"]["bands"]:
        for key in [k for k in band if k.startswith("raster:")]:
            del band[key]
    with pytest.raises(STACValidationError, match="raster"):
        stacschema.validate(item)


def test_schema_not_shipped_is_refused() -> None:
    item = raster_item()
    item["stac_extensions"].append("https://stac-extensions.github.io/eo/v1.1.0/schema.json")
    with pytest.raises(stacschema.SchemaNotShipped, match="eo/v1.1.0"):
        stacschema.validate(item)
    with pytest.raises(stacschema.SchemaNotShipped, match="1.0.0"):
        stacschema.validate({**raster_item(), "stac_version": "1.0.0"})


def test_validation_never_touches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    for cached in (stacschema.validator, stacschema.registry, stacschema.shipped_schema):
        cached.cache_clear()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validation tried the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    stacschema.validate(raster_item(g=GeoGrid("EPSG:4326", (0.1, 0, 10, 0, -0.1, 50), (10, 10))))
    stacschema.validate(catalog.catalog_doc("c", "t", "d", [catalog.Entry("item", "./a.json", "a", "application/geo+json")]))


def test_shipped_schemas_are_the_published_ones() -> None:
    from importlib import resources

    base = resources.files("rasterkube").joinpath(stacschema.SCHEMA_DIR)
    for url, name in stacschema.SCHEMA_FILES.items():
        schema = json.loads(base.joinpath(name).read_text())
        if not url.endswith("common.json"):  # the published common.json has the $id ".../commonjson"
            assert schema["$id"].rstrip("#") == url, name
    item_schema = stacschema.shipped_schema(f"https://schemas.stacspec.org/v{stacschema.STAC_VERSION}/item-spec/json-schema/item.json")
    assert '"stac_version": {"title": "STAC version", "type": "string", "const": "1.1.0"}' in json.dumps(item_schema)
    for notice in ("README.md", "LICENSE-stac-spec", "LICENSE-geojson-schema", "LICENSE-processing",
                   "LICENSE-projection", "LICENSE-raster"):  # fmt: skip
        assert base.joinpath(notice).is_file(), notice


# ------------------------------------------------------------------------------------ I/O


def test_item_in_a_store_resolves_to_the_store_with_pystac(tmp_path: Path) -> None:
    store = write_store(str(tmp_path / "s.zarr"), random_series(3, 2, 40, 30))
    provenance.write_into_store(store, raster_item())
    item = pystac.Item.from_file(provenance.store_item_uri(store))
    assert item.assets["data"].get_absolute_href() == store
    assert storage.is_committed(store)


def _vector_output(root: Path, name: str) -> str:
    """A GeoParquet output and its item, as the Vectorization job leaves them."""
    import geopandas as gpd
    from shapely.geometry import box

    uri = str(root / name)
    gpd.GeoDataFrame({"label": ["p"]}, geometry=[box(13, 52, 13.1, 52.1)], crs="EPSG:4326").to_parquet(uri)
    res = resource(Kind.VECTORIZATION, {"source": {"uri": "/in.zarr"}, "features": ["p"], "threshold": 0.5})
    p = provenance.Provenance.of(res, "run", "polygons", sources=["/in.zarr"])
    files = [provenance.FileAsset("data", name, provenance.PARQUET_TYPE, "EPSG:4326", "polygons")]
    item = provenance.vector_item(p, "vectorization-" + name, grid(20, 20), TIMES, files)
    provenance.commit_json(provenance.file_item_uri(uri), item, "run")
    return uri


def test_catalog_links_every_item_and_reports_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    root = tmp_path / "root"
    a = write_store(str(root / "team-a" / "prediction" / "a.zarr"), random_series(3, 2, 40, 30))
    provenance.write_into_store(a, raster_item())
    (root / "team-a" / "vectorization").mkdir(parents=True)
    vec = _vector_output(root / "team-a" / "vectorization", "v.parquet")
    old = write_store(str(root / "old.zarr"), random_series(2, 1, 8, 8))  # written before provenance
    hidden = write_store(str(root / "team-a" / "prediction" / ".a.zarr.tmp-123"), random_series(2, 1, 8, 8))
    provenance.write_into_store(hidden, raster_item())  # a killed run's temporary prefix
    bad = write_store(str(root / "bad.zarr"), random_series(2, 1, 8, 8))
    broken = raster_item()
    broken["properties"]["proj:code"] = 32633
    Path(provenance.store_item_uri(bad)).write_text(json.dumps(broken))

    report = catalog.build(str(root))
    assert report.catalog == str(root / "catalog.json")
    assert report.items == 2 and report.collections == 0
    assert report.without_provenance == [old]
    assert len(report.invalid) == 1 and report.invalid[0].startswith(provenance.store_item_uri(bad))

    cat = pystac.Catalog.from_file(report.catalog)
    hrefs = sorted(link.href for link in cat.links if link.rel == "item")
    assert hrefs == ["./team-a/prediction/a.zarr/stac-item.json", "./team-a/vectorization/v.parquet.stac-item.json"]
    items = {i.id: i for i in cat.get_items()}
    assert items["prediction-team-a-r1"].assets["data"].get_absolute_href() == a
    assert items["vectorization-v.parquet"].assets["data"].get_absolute_href() == vec
    # The command: the same catalog, exit 1 for the invalid item it left out.
    assert cli.main(["catalog", str(root)]) == cli.EXIT_FAILED
    assert "not linked, invalid: " + provenance.store_item_uri(bad) in capsys.readouterr().err

    # pystac's own walk of the catalog and its items, with the shipped schemas.
    monkeypatch.setattr(pystac.validation.RegisteredValidator, "_validator", stacschema.validator())
    pystac.validation.validate_all_dict(json.loads(Path(report.catalog).read_text()), report.catalog)


def test_catalog_of_a_missing_root_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rasterkube.errors import UserError

    with pytest.raises(UserError, match="ROOT"):
        catalog.build(str(tmp_path / "nope"))
    assert cli.main(["catalog", str(tmp_path / "nope")]) == cli.EXIT_USER_ERROR
    assert capsys.readouterr().err.startswith(f"error: ROOT: {tmp_path / 'nope'} does not exist")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize(
    ("target", "base", "href"),
    [
        ("/r/a/b.json", "/r", "./a/b.json"),
        ("/r/a/b.json", "/r/x", "../a/b.json"),
        ("s3://bucket/r/a.json", "s3://bucket/r", "./a.json"),
        ("s3://bucket/r/a.json", "/local", "s3://bucket/r/a.json"),
    ],
)
def test_relative_href(target: str, base: str, href: str) -> None:
    assert catalog.relative_href(target, base) == href
