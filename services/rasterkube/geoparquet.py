"""GeoParquet 1.1 metadata: validation against the specification's JSON schema.

The schema (and the PROJJSON schema it refers to) ship with the package
(``rasterkube/schemas/geoparquet``, see its README for sources and licenses): validation never
downloads anything. The ``$ref`` to ``https://proj.org/schemas/v0.7/projjson.schema.json`` is
resolved from the shipped copy through a ``referencing`` registry, so jsonschema never tries
the network.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any, Final

SCHEMA_DIR: Final = "schemas/geoparquet"
SCHEMA_FILE: Final = "geoparquet-1.1.0.schema.json"
PROJJSON_FILE: Final = "projjson-0.7.schema.json"
GEO_KEY: Final = b"geo"


def _load(name: str) -> dict[str, Any]:
    return json.loads(resources.files("rasterkube").joinpath(SCHEMA_DIR, name).read_text(encoding="utf-8"))


@cache
def validator() -> Any:
    """A Draft 7 validator of the GeoParquet 1.1.0 ``geo`` metadata (schemas from the package)."""
    from jsonschema import Draft7Validator
    from referencing import Registry, Resource

    projjson = _load(PROJJSON_FILE)
    registry = Registry().with_resource(projjson["$id"], Resource.from_contents(projjson))
    return Draft7Validator(_load(SCHEMA_FILE), registry=registry)


def validate_metadata(meta: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``meta`` is valid GeoParquet 1.1.0 metadata."""
    validator().validate(meta)


def read_metadata(path: str) -> dict[str, Any]:
    """The ``geo`` metadata of a Parquet file (KeyError without one)."""
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[GEO_KEY])
