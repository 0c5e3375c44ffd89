"""The compositing recipes (``spec.dataset``): collections, assets, masks, scaling. Pure tables.

Asset keys follow the public collections, so one recipe reads Earth Search, the Planetary
Computer (after signing) and the static catalogs of :mod:`rasterkube.mosaic.localstac` alike:

* ``sentinel-2-l2a`` (Earth Search v1 layout): ``coastal blue green red rededge1 rededge2
  rededge3 nir nir08 nir09 swir16 swir22`` and the scene classification ``scl``.  Band ids
  are the ESA ones (``B01`` … ``B12``, ``B8A``), so labels read ``sentinel-2-l2a:B04``.
* ``landsat-c2-l2`` (USGS / Planetary Computer layout): ``coastal blue green red nir08 swir16
  swir22`` and ``qa_pixel``.  Landsat band *numbers* differ between TM/ETM+ and OLI (red is
  SR_B3 on Landsat 5/7 and SR_B4 on Landsat 8/9), so the band ids are the common names and
  labels read ``landsat-c2-l2:red``.

Labels are ``<collection>:<band id>`` for every recipe of a collection — the median and the
best-pixel recipe of Sentinel-2 give the same physical quantity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from rasterkube.api.kinds import Dataset
from rasterkube.mosaic import composite

S2_COLLECTION: Final = "sentinel-2-l2a"
LANDSAT_COLLECTION: Final = "landsat-c2-l2"
EARTH_SEARCH: Final = "https://earth-search.aws.element84.com/v1"

# STAC item properties the scaling reads.
PROP_S2_BASELINE: Final = "s2:processing_baseline"
# Earth Search v1 re-encodes pre-04.00 products with the +1000 offset and says so here.
PROP_EARTHSEARCH_OFFSET: Final = "earthsearch:boa_offset_applied"
# Baseline assumed when an item does not say: every product in today's archives (the
# reprocessed collection included) carries the 04.00 offset.
DEFAULT_S2_BASELINE: Final = "04.00"

S2_ASSETS: Final[Mapping[str, str]] = {
    "B01": "coastal",
    "B02": "blue",
    "B03": "green",
    "B04": "red",
    "B05": "rededge1",
    "B06": "rededge2",
    "B07": "rededge3",
    "B08": "nir",
    "B8A": "nir08",
    "B09": "nir09",
    "B11": "swir16",
    "B12": "swir22",
}
LANDSAT_ASSETS: Final[Mapping[str, str]] = {
    name: name for name in ("coastal", "blue", "green", "red", "nir08", "swir16", "swir22")
}


def _sentinel2_reflectance(dn: npt.NDArray[Any], properties: Mapping[str, Any]) -> npt.NDArray[np.float32]:
    baseline = str(properties.get(PROP_S2_BASELINE) or DEFAULT_S2_BASELINE)
    if properties.get(PROP_EARTHSEARCH_OFFSET) is True:
        baseline = DEFAULT_S2_BASELINE  # DNs carry the offset whatever the original baseline
    return composite.sentinel2_scale(dn, baseline)


def _landsat_reflectance(dn: npt.NDArray[Any], properties: Mapping[str, Any]) -> npt.NDArray[np.float32]:
    return composite.landsat_sr_scale(dn)


@dataclass(frozen=True)
class Recipe:
    """How one ``spec.dataset`` turns STAC items into composites."""

    dataset: str
    collection: str
    method: composite.Method
    assets: Mapping[str, str]  # band id → asset key
    default_bands: tuple[str, ...]
    mask_asset: str
    mask_valid: Callable[[npt.NDArray[Any]], npt.NDArray[np.bool_]]
    reflectance: Callable[[npt.NDArray[Any], Mapping[str, Any]], npt.NDArray[np.float32]]
    resolution: float  # native pixel size (m) of the default bands
    # Where native pixels sit: 0 → pixel edges on multiples of the resolution (Sentinel-2
    # tiles), 0.5 → pixel centres on multiples (the Landsat WRS-2 grid: corners at 15 m).
    anchor: float
    default_api: str

    def band_id(self, name: str) -> str | None:
        """``B04``, ``red`` or ``sentinel-2-l2a:B04`` → ``B04``; None if not a band here."""
        name = name.removeprefix(f"{self.collection}:")
        if name in self.assets:
            return name
        by_asset = {asset: band for band, asset in self.assets.items()}
        return by_asset.get(name)

    def label(self, band_id: str) -> str:
        return f"{self.collection}:{band_id}"

    def resolve_bands(self, wanted: Sequence[str] | None) -> tuple[list[str], list[str]]:
        """(band ids, unknown names) for ``spec.bands`` (default: the recipe's bands)."""
        if wanted is None:
            return list(self.default_bands), []
        ids, unknown = [], []
        for name in wanted:
            band = self.band_id(name)
            if band is None:
                unknown.append(name)
            elif band not in ids:
                ids.append(band)
        return ids, unknown

    def band_help(self) -> str:
        return ", ".join(f"{band} ({asset})" if band != asset else band for band, asset in self.assets.items())


_S2_COMMON = {
    "collection": S2_COLLECTION,
    "assets": S2_ASSETS,
    "default_bands": ("B02", "B03", "B04", "B08"),
    "mask_asset": "scl",
    "mask_valid": composite.scl_valid,
    "reflectance": _sentinel2_reflectance,
    "resolution": 10.0,
    "anchor": 0.0,
    "default_api": EARTH_SEARCH,
}

RECIPES: Final[Mapping[str, Recipe]] = {
    Dataset.SENTINEL_2_L2A.value: Recipe(dataset=Dataset.SENTINEL_2_L2A.value, method=composite.METHOD_MEDIAN, **_S2_COMMON),  # type: ignore[arg-type]
    Dataset.SENTINEL_2_L2A_BEST.value: Recipe(
        dataset=Dataset.SENTINEL_2_L2A_BEST.value, method=composite.METHOD_BEST, **_S2_COMMON  # type: ignore[arg-type]
    ),
    Dataset.LANDSAT_C2_L2.value: Recipe(
        dataset=Dataset.LANDSAT_C2_L2.value,
        collection=LANDSAT_COLLECTION,
        method=composite.METHOD_MEDIAN,
        assets=LANDSAT_ASSETS,
        default_bands=("blue", "green", "red", "nir08", "swir16", "swir22"),
        mask_asset="qa_pixel",
        mask_valid=composite.qa_pixel_valid,
        reflectance=_landsat_reflectance,
        resolution=30.0,
        anchor=0.5,
        default_api=EARTH_SEARCH,
    ),
}


def recipe_for(dataset: str) -> Recipe:
    return RECIPES[str(dataset)]
