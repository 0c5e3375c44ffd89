"""The GeoParquet 1.1 schema shipped with the package: offline, and it tells bad metadata apart."""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from rasterkube import geoparquet
from rasterkube.vectorize import polygons as P
from rasterkube.vectorize import service


def vectorization_metadata() -> dict[str, Any]:
    """The ``geo`` metadata the Vectorization job writes, for two polygons."""
    import numpy as np

    values = np.zeros((8, 8), dtype=np.float32)
    values[1:3, 1:3] = values[5:7, 4:8] = 1.0
    components = P.polygonize(values, 0.5, 8, (10.0, 0.0, 400_000.0, 0.0, -10.0, 5_600_000.0))
    rows = P.Rows.of(P.finish(components, P.Finish("EPSG:32633", "EPSG:4326")))
    assert len(rows) == 2
    return service.geo_metadata("EPSG:4326", rows, centerlines=False)


def test_metadata_written_by_rasterkube_and_geopandas_validates(tmp_path: Path) -> None:
    import geopandas
    from shapely.geometry import box

    geoparquet.validate_metadata(vectorization_metadata())
    frame = geopandas.GeoDataFrame({"id": [1]}, geometry=[box(0, 0, 1, 1)], crs="EPSG:32633")
    frame.to_parquet(tmp_path / "g.parquet", write_covering_bbox=True)  # how the Mosaic index is written
    geoparquet.validate_metadata(geoparquet.read_metadata(str(tmp_path / "g.parquet")))


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda m: m.update(version="1.0.0"), "version"),  # not 1.1.0
        (lambda m: m.pop("primary_column"), ""),
        (lambda m: m["columns"]["geometry"].pop("geometry_types"), "columns"),
        (lambda m: m["columns"]["geometry"].update(encoding="WKT"), "columns"),
        (lambda m: m["columns"]["geometry"].update(bbox=[0, 0, 1]), "columns"),
        (lambda m: m["columns"]["geometry"]["covering"]["bbox"].update(xmin=["bbox", "minx"]), "columns"),
        (lambda m: m["columns"]["geometry"].update(crs={"type": "GeographicCRS", "name": 4326}), "columns"),
    ],
)
def test_invalid_metadata_is_refused(change: Any, path: str) -> None:
    meta = copy.deepcopy(vectorization_metadata())
    change(meta)
    with pytest.raises(jsonschema.ValidationError) as err:
        geoparquet.validate_metadata(meta)
    assert (err.value.absolute_path[0] if err.value.absolute_path else "") == path


def test_validation_never_touches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PROJJSON $ref resolves from the shipped copy: no socket is ever opened."""
    geoparquet.validator.cache_clear()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validation tried the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    geoparquet.validate_metadata(vectorization_metadata())


def test_shipped_schemas_are_the_published_ones() -> None:
    from importlib import resources

    base = resources.files("rasterkube").joinpath(geoparquet.SCHEMA_DIR)
    schema = json.loads(base.joinpath(geoparquet.SCHEMA_FILE).read_text())
    assert schema["properties"]["version"]["const"] == "1.1.0"
    crs_ref = schema["properties"]["columns"]["patternProperties"][".+"]["properties"]["crs"]["oneOf"][0]["$ref"]
    assert crs_ref == json.loads(base.joinpath(geoparquet.PROJJSON_FILE).read_text())["$id"]
    for notice in ("LICENSE-geoparquet", "LICENSE-proj", "README.md"):
        assert base.joinpath(notice).is_file()
