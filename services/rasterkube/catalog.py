"""``rasterkube catalog ROOT``: a static STAC catalog of every output under a storage root.

Finds the provenance of every output (:mod:`rasterkube.provenance`) — the item inside each
GeoZarr store, the item beside each GeoParquet, the collection of each Mosaic index — checks
each against the shipped schemas, and writes ``ROOT/catalog.json`` (or ``--out``) linking
them with hrefs relative to the catalog. The items themselves are left as they are: the
catalog points at them, so it can be rebuilt at any time and outputs can be added or removed
between builds. Hidden entries (``.name``: the temporary prefixes of running or killed jobs)
are never looked into, nor are the chunks of a store: listing stops at a store's root.
Works on a local path and on ``s3://`` (fsspec).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from rasterkube import provenance, stacschema, storage
from rasterkube.errors import UserError

CATALOG_FILE: Final = "catalog.json"
CATALOG_ID: Final = "rasterkube"
#: Root metadata of a zarr store (v3, v2): a directory with one is a store, not looked into.
STORE_MARKERS: Final = ("zarr.json", ".zgroup")
#: Files that are outputs in their own right: reported when no item is beside them.
FILE_OUTPUT_SUFFIXES: Final = (".parquet",)


@dataclass(frozen=True)
class Found:
    """What a walk of a storage root found (URIs)."""

    items: tuple[str, ...]
    collections: tuple[str, ...]
    without: tuple[str, ...]  # outputs with no provenance (older runs, other tools' stores)


@dataclass(frozen=True)
class Entry:
    """One link of the catalog."""

    rel: str
    href: str
    title: str
    media_type: str


@dataclass
class Report:
    catalog: str
    items: int = 0
    collections: int = 0
    invalid: list[str] = field(default_factory=list)  # "uri: why"
    without_provenance: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"catalog": self.catalog, "items": self.items, "collections": self.collections,
                "invalid": self.invalid, "withoutProvenance": self.without_provenance}  # fmt: skip


def _uri(root: str, path: str) -> str:
    """The URI of a filesystem path under ``root`` (fsspec strips the scheme)."""
    if "://" in root:
        return f"{root.split('://', 1)[0]}://{path.lstrip('/')}"
    return path


def discover(root: str) -> Found:
    """Every item, collection and output without provenance under ``root``."""
    fs, top = storage.filesystem(root)
    fs.invalidate_cache()  # an object store listing may be cached from before the last commit
    items: list[str] = []
    collections: list[str] = []
    without: list[str] = []
    stack = [top.rstrip("/")]
    while stack:
        directory = stack.pop()
        entries = {posixpath.basename(e["name"].rstrip("/")): e for e in fs.ls(directory, detail=True)}
        if provenance.COLLECTION_FILE in entries and _is_ours(fs, entries[provenance.COLLECTION_FILE]["name"]):
            collections.append(_uri(root, entries[provenance.COLLECTION_FILE]["name"]))
            continue  # its row stores are linked by the collection
        if any(marker in entries for marker in STORE_MARKERS):
            if provenance.ITEM_FILE in entries:
                items.append(_uri(root, entries[provenance.ITEM_FILE]["name"]))
            else:
                without.append(_uri(root, directory))
            continue
        for name, entry in sorted(entries.items(), reverse=True):
            if name.startswith("."):
                continue
            if entry["type"] == "directory":
                stack.append(entry["name"].rstrip("/"))
            elif name.endswith(provenance.ITEM_SUFFIX):
                items.append(_uri(root, entry["name"]))
            elif name.endswith(FILE_OUTPUT_SUFFIXES) and name + provenance.ITEM_SUFFIX not in entries:
                without.append(_uri(root, entry["name"]))
    return Found(tuple(sorted(items)), tuple(sorted(collections)), tuple(sorted(without)))


def _is_ours(fs: Any, path: str) -> bool:
    """A Mosaic index collection (rasterkube's), not another catalog's collection.json."""
    import json

    try:
        with fs.open(path, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("type") == "Collection" and provenance.KIND in doc


def relative_href(target: str, base_dir: str) -> str:
    """``target`` relative to the directory ``base_dir`` (``./x`` or ``../x``): same scheme only."""
    if ("://" in target) != ("://" in base_dir):
        return target
    if "://" in target:
        scheme, path = target.split("://", 1)
        base_scheme, base = base_dir.split("://", 1)
        if scheme != base_scheme:
            return target
        rel = posixpath.relpath(path, base)
    else:
        rel = os.path.relpath(target, base_dir)
    return rel if rel.startswith("..") else f"./{rel}"


def catalog_doc(catalog_id: str, title: str, description: str, entries: Sequence[Entry]) -> dict[str, Any]:
    """A STAC 1.1 Catalog linking ``entries`` (pure)."""
    links = [{"rel": "root", "href": f"./{CATALOG_FILE}", "type": provenance.JSON_TYPE, "title": title}]
    links += [{"rel": e.rel, "href": e.href, "type": e.media_type, "title": e.title} for e in entries]
    return {"type": "Catalog", "stac_version": stacschema.STAC_VERSION, "id": catalog_id, "title": title,
            "description": description, "links": links}  # fmt: skip


def _check(uri: str) -> tuple[dict[str, Any] | None, str | None]:
    """(document, None) when it reads and validates; (None, why) otherwise."""
    try:
        doc = provenance.read(uri)
        stacschema.validate(doc)
    except Exception as exc:  # noqa: BLE001 — any unreadable or invalid document is reported, not fatal
        return None, f"{uri}: {str(exc).splitlines()[0]}"
    return doc, None


def _check_collection(uri: str) -> tuple[dict[str, Any] | None, list[str]]:
    """A collection and every item it links, validated."""
    doc, why = _check(uri)
    if doc is None:
        return None, [why or uri]
    base = uri.rsplit("/", 1)[0]
    problems = []
    for link in doc.get("links", []):
        if link.get("rel") == provenance.REL_ITEM:
            _, item_why = _check(_resolve(base, link["href"]))
            if item_why:
                problems.append(item_why)
    return (None if problems else doc), problems


def _resolve(base_dir: str, href: str) -> str:
    if "://" in href or os.path.isabs(href):
        return href
    if "://" in base_dir:
        scheme, path = base_dir.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(path, href))}"
    return os.path.normpath(os.path.join(base_dir, href))


def build(root: str, out: str | None = None, catalog_id: str = CATALOG_ID) -> Report:
    """Write a catalog of every output under ``root``; the report says what it links, what
    failed validation (left out) and which outputs have no provenance."""
    root = storage.normalize(root)
    if not storage.exists(root):
        raise UserError(f"ROOT: {root} does not exist; give the storage root the outputs were written under")
    target = storage.normalize(out) if out else storage.join(root, CATALOG_FILE)
    base_dir = target.rsplit("/", 1)[0] if "://" in target else os.path.dirname(target)
    found = discover(root)
    report = Report(catalog=target, without_provenance=list(found.without))
    entries: list[Entry] = []
    for uri in found.collections:
        doc, problems = _check_collection(uri)
        report.invalid.extend(problems)
        if doc is not None:
            entries.append(Entry("child", relative_href(uri, base_dir), doc.get("title") or doc["id"], provenance.JSON_TYPE))
            report.collections += 1
    for uri in found.items:
        doc, why = _check(uri)
        if doc is None:
            report.invalid.append(why or uri)
            continue
        entries.append(Entry("item", relative_href(uri, base_dir), doc["id"], provenance.GEOJSON_TYPE))
        report.items += 1
    title = f"rasterkube outputs under {root}"
    description = ("Every rasterkube output found under the storage root: the STAC item of each GeoZarr store and "
                   "GeoParquet file, and the collection of each Mosaic index (built by `rasterkube catalog`).")  # fmt: skip
    provenance.commit_json(target, catalog_doc(catalog_id, title, description, entries), uuid.uuid4().hex[:12])
    return report
