"""STAC validation against the JSON schemas shipped with the package — never downloaded.

pystac validates an object against the core schema of its ``stac_version`` and against the
schema URL of every entry in its ``stac_extensions``; by default it fetches each URL. Here a
pystac validator resolves those URLs (and every ``$ref`` inside the schemas) from
``rasterkube/schemas/stac`` (see its README for sources and licenses) and refuses any other:
validation never opens a socket, and an object that names a schema rasterkube does not ship
is reported as such instead of being half-checked.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any, Final

STAC_VERSION: Final = "1.1.0"
SCHEMA_DIR: Final = "schemas/stac"

PROCESSING_EXTENSION: Final = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
PROJECTION_EXTENSION: Final = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
RASTER_EXTENSION: Final = "https://stac-extensions.github.io/raster/v2.0.0/schema.json"

_CORE: Final = f"https://schemas.stacspec.org/v{STAC_VERSION}"
_CORE_DIR: Final = f"stac-spec-{STAC_VERSION}"
_ITEM_PARTS: Final = ("bands", "basics", "common", "data-values", "datetime", "instrument", "licensing", "provider")

#: Schema URL → shipped file (relative to SCHEMA_DIR, or to the GeoParquet schema directory).
SCHEMA_FILES: Final[dict[str, str]] = {
    f"{_CORE}/item-spec/json-schema/item.json": f"{_CORE_DIR}/item.json",
    f"{_CORE}/catalog-spec/json-schema/catalog.json": f"{_CORE_DIR}/catalog.json",
    f"{_CORE}/collection-spec/json-schema/collection.json": f"{_CORE_DIR}/collection.json",
    **{f"{_CORE}/item-spec/json-schema/{name}.json": f"{_CORE_DIR}/{name}.json" for name in _ITEM_PARTS},
    "https://geojson.org/schema/Feature.json": "geojson/Feature.json",
    "https://geojson.org/schema/Geometry.json": "geojson/Geometry.json",
    PROCESSING_EXTENSION: "processing-1.2.0.schema.json",
    PROJECTION_EXTENSION: "projection-2.0.0.schema.json",
    RASTER_EXTENSION: "raster-2.0.0.schema.json",
}
# The projection extension refers to PROJJSON for proj:projjson: the copy shipped for GeoParquet.
PROJJSON_URL: Final = "https://proj.org/schemas/v0.7/projjson.schema.json"


class SchemaNotShipped(LookupError):
    """An object names a schema (core version or extension) that rasterkube does not ship."""


def _read(package_path: str) -> dict[str, Any]:
    return json.loads(resources.files("rasterkube").joinpath(package_path).read_text(encoding="utf-8"))


@cache
def shipped_schema(url: str) -> dict[str, Any]:
    """The shipped schema for ``url`` (a trailing ``#`` ignored); SchemaNotShipped otherwise."""
    key = url.rstrip("#")
    if key == PROJJSON_URL:
        from rasterkube import geoparquet

        return _read(f"{geoparquet.SCHEMA_DIR}/{geoparquet.PROJJSON_FILE}")
    try:
        return _read(f"{SCHEMA_DIR}/{SCHEMA_FILES[key]}")
    except KeyError:
        raise SchemaNotShipped(
            f"the STAC schema {url} is not shipped with rasterkube (shipped: STAC {STAC_VERSION} core, "
            "processing v1.2.0, projection v2.0.0, raster v2.0.0)"
        ) from None


@cache
def registry() -> Any:
    """Every shipped schema by URL; a ``$ref`` to anything else fails (SchemaNotShipped)."""
    from referencing import Registry
    from referencing.jsonschema import DRAFT7

    def retrieve(url: str) -> Any:
        return DRAFT7.create_resource(shipped_schema(url))

    urls = (*SCHEMA_FILES, PROJJSON_URL)
    return Registry(retrieve=retrieve).with_resources((url, DRAFT7.create_resource(shipped_schema(url))) for url in urls)  # type: ignore[call-arg]


@cache
def validator() -> Any:
    """A pystac :class:`~pystac.validation.STACValidator` over the shipped schemas (one per
    process). It keeps one compiled jsonschema validator per schema URL, so validating an
    item costs milliseconds (pystac's default rebuilds its registry on every call); use it
    with ``pystac.validation.set_validator`` to run pystac's own ``validate_all`` offline."""
    import jsonschema
    from pystac.errors import STACValidationError
    from pystac.validation import STACValidator
    from pystac.validation.schema_uri_map import DefaultSchemaUriMap

    class ShippedSchemaValidator(STACValidator):
        def __init__(self) -> None:
            self._compiled: dict[str, Any] = {}
            self._core = DefaultSchemaUriMap()

        def _check(self, doc: dict[str, Any], url: str, object_type: Any, href: str | None) -> str:
            compiled = self._compiled.get(url)
            if compiled is None:
                schema = shipped_schema(url)
                compiled = jsonschema.validators.validator_for(schema)(schema, registry=registry())
                self._compiled[url] = compiled
            errors = list(compiled.iter_errors(doc))
            if errors:
                best = jsonschema.exceptions.best_match(errors)
                where = f"at {href} " if href else ""
                raise STACValidationError(f"Validation failed for {object_type} {where}with ID {doc.get('id')} "
                                          f"against schema at {url}\n{best}", source=errors) from best  # fmt: skip
            return url

        def validate_core(self, stac_dict: dict[str, Any], stac_object_type: Any, stac_version: str,
                          href: str | None = None) -> str | None:  # fmt: skip
            url = self._core.get_object_schema_uri(stac_object_type, stac_version)
            return None if url is None else self._check(stac_dict, url, stac_object_type, href)

        def validate_extension(self, stac_dict: dict[str, Any], stac_object_type: Any, stac_version: str,
                               extension_id: str, href: str | None = None) -> str:  # fmt: skip
            return self._check(stac_dict, extension_id, stac_object_type, href)

    return ShippedSchemaValidator()


def validate(doc: dict[str, Any]) -> None:
    """Validate a STAC Item, Collection or Catalog (as a dict) against the shipped schemas.

    Raises ``pystac.errors.STACValidationError`` (the best-matching schema error in its
    message, all of them in ``.source``), or :class:`SchemaNotShipped`."""
    from pystac import STACObjectType
    from pystac.validation import validate_dict

    kinds = {"Feature": STACObjectType.ITEM, "Collection": STACObjectType.COLLECTION, "Catalog": STACObjectType.CATALOG}
    kind = kinds.get(str(doc.get("type")))
    if kind is None:
        from pystac.errors import STACValidationError

        raise STACValidationError(f"not a STAC Item, Collection or Catalog: type is {doc.get('type')!r}")
    version = doc.get("stac_version")
    if version != STAC_VERSION:
        raise SchemaNotShipped(f"STAC version {version!r}: rasterkube ships the STAC {STAC_VERSION} schemas only")
    extensions = list(doc.get("stac_extensions", []))
    for url in extensions:
        shipped_schema(url)  # SchemaNotShipped before pystac logs a traceback for it
    validate_dict(doc, stac_object_type=kind, stac_version=STAC_VERSION,
                  extensions=extensions, validator=validator())  # fmt: skip
