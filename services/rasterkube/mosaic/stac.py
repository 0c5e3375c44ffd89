"""Finding scenes: STAC APIs (pystac-client) and static catalogs (pystac; local or ``s3://``).

Both paths end in the same :class:`Scene` records and the same :func:`scene_matches`
filter, so a static catalog and an API give the same scenes for the same spec:

* AOI: the item's geometry (else its bbox) intersects the AOI (EPSG:4326);
* time: the acquisition ``datetime`` (else ``start_datetime``) lies in ``[start, end)`` —
  ``time.end`` is exclusive, as the spec says;
* cloud cover: ``eo:cloud_cover`` ≤ ``maxCloudCover``; an item without the property is
  kept (no evidence of clouds; the per-pixel mask still applies).

I/O module: network and file access live here, the filter is a pure function.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from rasterkube import storage
from rasterkube.errors import UserError

PROP_CLOUD_COVER: Final = "eo:cloud_cover"
# Item properties a Scene keeps (what the recipes' scaling reads); everything else is
# dropped so Scenes stay small in the Ray object store.
KEPT_PROPERTIES: Final = ("s2:processing_baseline", "earthsearch:boa_offset_applied", "platform", "proj:code", "proj:epsg")
# Upper bound on items taken from an API search: a typo in the AOI or time range should fail
# clearly rather than page through a whole archive.
MAX_ITEMS: Final = 20_000

# (connect, read) seconds per API request: an unreachable API fails the preflight quickly.
API_TIMEOUT_S: Final = (10.0, 60.0)

BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """One STAC item reduced to what compositing needs."""

    id: str
    time: np.datetime64  # datetime64[s], UTC
    bbox: BBox  # EPSG:4326
    assets: Mapping[str, str]  # asset key → absolute href
    collection: str | None = None
    cloud_cover: float | None = None
    geometry: Mapping[str, Any] | None = None  # GeoJSON, EPSG:4326
    properties: Mapping[str, Any] = field(default_factory=dict)
    href: str | None = None  # the STAC item's own URL or path (provenance links to it)


def _utc_seconds(value: dt.datetime) -> np.datetime64:
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return np.datetime64(value, "s")


def scene_from_item(item: Any) -> Scene:
    """A :class:`Scene` from a ``pystac.Item`` (asset hrefs made absolute)."""
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
        raise ValueError(f"STAC item {item.id} has neither datetime nor start_datetime")
    props = item.properties
    cloud = props.get(PROP_CLOUD_COVER)
    bbox = tuple(float(v) for v in (item.bbox or ()))
    return Scene(
        id=item.id,
        time=_utc_seconds(when),
        bbox=bbox if len(bbox) == 4 else (-180.0, -90.0, 180.0, 90.0),  # type: ignore[arg-type]
        assets={key: asset.get_absolute_href() or asset.href for key, asset in item.assets.items()},
        collection=item.collection_id,
        cloud_cover=None if cloud is None else float(cloud),
        geometry=item.geometry,
        properties={k: props[k] for k in KEPT_PROPERTIES if k in props},
        href=item.get_self_href(),
    )


def scene_matches(
    scene: Scene,
    aoi: Any,
    start: np.datetime64,
    end: np.datetime64,
    max_cloud_cover: float,
    collection: str | None = None,
) -> bool:
    """The search filter (pure): collection, AOI intersection, ``[start, end)``, cloud cover.

    ``aoi`` is a shapely geometry in EPSG:4326.
    """
    from shapely.geometry import box, shape

    if collection is not None and scene.collection is not None and scene.collection != collection:
        return False
    if not start <= scene.time < end:
        return False
    if scene.cloud_cover is not None and scene.cloud_cover > max_cloud_cover:
        return False
    footprint = shape(scene.geometry) if scene.geometry else box(*scene.bbox)
    return bool(footprint.intersects(aoi))


# ------------------------------------------------------------------------------ static


def _stac_io() -> Any:
    """A pystac StacIO that reads and writes through fsspec (s3:// with our endpoint)."""
    import fsspec
    from pystac.stac_io import DefaultStacIO

    class FsspecStacIO(DefaultStacIO):  # type: ignore[misc]
        def read_text_from_href(self, href: str) -> str:
            if href.startswith(("http://", "https://")):
                return str(super().read_text_from_href(href))
            with fsspec.open(href, "r", **storage.storage_options(href)) as fh:
                return str(fh.read())

        def write_text_to_href(self, href: str, txt: str) -> None:
            if "://" not in href or href.startswith("file://"):
                super().write_text_to_href(href, txt)
                return
            with fsspec.open(href, "w", **storage.storage_options(href)) as fh:
                fh.write(txt)

    return FsspecStacIO()


def _catalog_href(uri: str) -> str:
    """``…/catalog.json`` as given, or a directory that holds one; local paths absolute."""
    uri = storage.normalize(uri)
    if not uri.endswith(".json"):
        uri = storage.join(uri, "catalog.json")
    return uri


def _items_of(catalog: Any, collection: str) -> Iterator[Any]:
    """Items of ``collection`` in a static catalog: only that collection's subtree when the
    catalog has it, else every item (filtered by collection id afterwards)."""
    import pystac

    if isinstance(catalog, pystac.Collection) and catalog.id == collection:
        yield from catalog.get_items(recursive=True)
        return
    wanted = [c for c in catalog.get_all_collections() if c.id == collection]
    if wanted:
        for coll in wanted:
            yield from coll.get_items(recursive=True)
        return
    yield from catalog.get_items(recursive=True)


def search_catalog(uri: str, collection: str, aoi: Any, start: np.datetime64, end: np.datetime64,
                   max_cloud_cover: float, field_name: str = "spec.stac.catalog") -> list[Scene]:  # fmt: skip
    """Scenes of a static catalog matching the filter, sorted by time then id."""
    import pystac

    href = _catalog_href(uri)
    try:
        root = pystac.read_file(href, stac_io=_stac_io())
    except FileNotFoundError:
        raise UserError(f"{field_name}: {href} does not exist; give the URI of a static catalog's catalog.json") from None
    except Exception as exc:  # noqa: BLE001 — network, permissions, not JSON, not STAC: all the user's to fix
        raise UserError(f"{field_name}: cannot read the STAC catalog {href} ({type(exc).__name__}: {exc})") from None
    if not isinstance(root, pystac.Catalog):
        raise UserError(f"{field_name}: {href} is a STAC {type(root).__name__}, not a catalog or collection")
    try:
        scenes = [scene_from_item(item) for item in _items_of(root, collection)]
    except Exception as exc:  # noqa: BLE001 — any failure here is bad user input, reported as such
        raise UserError(f"{field_name}: cannot read the items of {href} ({type(exc).__name__}: {exc})") from None
    return _filtered(scenes, aoi, start, end, max_cloud_cover, collection)


# --------------------------------------------------------------------------------- API


def search_api(url: str, collection: str, aoi: Any, start: np.datetime64, end: np.datetime64,
               max_cloud_cover: float, field_name: str = "spec.stac.api") -> list[Scene]:  # fmt: skip
    """Scenes from a STAC API search (server-side filters where supported, then ours)."""
    from pystac_client import Client
    from shapely.geometry import mapping

    try:
        client = Client.open(url, timeout=API_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 — any failure here is bad user input, reported as such
        raise UserError(f"{field_name}: cannot open the STAC API {url} ({type(exc).__name__}: {exc})") from None
    # The API's datetime range is inclusive; ours is half-open, so the end is filtered again.
    params: dict[str, Any] = {
        "collections": [collection],
        "intersects": mapping(aoi),
        "datetime": f"{_iso(start)}/{_iso(end)}",
        "max_items": MAX_ITEMS,
    }
    if client.conforms_to("QUERY"):  # else cloud cover is filtered here only
        params["query"] = {PROP_CLOUD_COVER: {"lte": max_cloud_cover}}
    try:
        items = list(client.search(**params).items())
        scenes = [scene_from_item(item) for item in items]
    except Exception as exc:  # noqa: BLE001 — any failure here is bad user input, reported as such
        raise UserError(f"{field_name}: searching {url} failed ({type(exc).__name__}: {exc})") from None
    return _filtered(scenes, aoi, start, end, max_cloud_cover, collection)


def _iso(t: np.datetime64) -> str:
    return f"{np.datetime_as_string(t.astype('datetime64[s]'))}Z"


def _filtered(scenes: Iterable[Scene], aoi: Any, start: np.datetime64, end: np.datetime64,
              max_cloud_cover: float, collection: str) -> list[Scene]:  # fmt: skip
    kept = [s for s in scenes if scene_matches(s, aoi, start, end, max_cloud_cover, collection)]
    return sorted(kept, key=lambda s: (s.time, s.id))
