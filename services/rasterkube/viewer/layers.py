"""The viewer's layers: what ``rasterkube view`` opens, and how each is read (the I/O side).

- :class:`RasterLayer` — a GeoZarr store (plain or multiscale). Its pyramid levels come from
  the root ``multiscales`` layout (``spatial:transform``/``spatial:shape`` per level); tiles
  are read from the level that fits the zoom (:mod:`rasterkube.viewer.tiles`).
- :class:`FeatureLayer` — a GeoParquet file, served whole as GeoJSON in EPSG:4326.
- :class:`PMTilesLayer` — a PMTiles archive, served as a file with HTTP range requests and
  read in the browser by the bundled ``pmtiles`` library.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import zarr
from pyproj import CRS, Transformer

from rasterkube import geozarr, storage
from rasterkube.constants import DATA_VAR
from rasterkube.errors import UserError
from rasterkube.grid import Window
from rasterkube.multiscale import CATEGORICAL_BANDS_ATTR, band_modes
from rasterkube.viewer import tiles

#: Stretch statistics are computed from at most about this many pixels per band.
STATS_PIXELS: Final = 512 * 512
#: At most this many distinct classes are listed in a categorical band's legend.
MAX_CLASSES: Final = 20
RASTER, FEATURES, PMTILES = "raster", "features", "pmtiles"


def layer_id(path: str, taken: set[str]) -> str:
    stem = re.sub(r"(\.zarr|\.parquet|\.geoparquet|\.pmtiles)$", "", storage.normalize(path).rstrip("/").split("/")[-1])
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or "layer"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


PARQUET_MAGIC = b"PAR1"


def _magic(path: str) -> bytes:
    """The first four bytes of a file (b"" for a directory, a missing path or a store)."""
    try:
        fs, p = storage.filesystem(path)
        if not fs.isfile(p):
            return b""
        with fs.open(p, "rb") as fh:
            return fh.read(len(PARQUET_MAGIC))
    except OSError:
        return b""


def open_layers(paths: list[str]) -> dict[str, Any]:
    """Layers for the paths given on the command line, by kind (raise UserError if unknown)."""
    taken: set[str] = set()
    layers: dict[str, Any] = {}
    for path in paths:
        lid = layer_id(path, taken)
        lower = path.lower().rstrip("/")
        if lower.endswith(".pmtiles"):
            layers[lid] = PMTilesLayer(lid, path)
        elif lower.endswith((".parquet", ".geoparquet")) or _magic(path) == PARQUET_MAGIC:
            # By content too: a Vectorization's default output name has no extension.
            layers[lid] = FeatureLayer(lid, path)
        elif storage.exists(path) and (lower.endswith(".zarr") or geozarr.is_complete(path)):
            layer = RasterLayer(lid, storage.normalize(path))
            _ = layer.info  # a StoreError now (with what to do) rather than on the first tile
            layers[lid] = layer
        elif not storage.exists(path):
            raise UserError(f"{path} does not exist")
        else:
            raise UserError(f"{path}: not a GeoZarr store (no zarr.json), GeoParquet (.parquet) or PMTiles (.pmtiles)")
    if not layers:
        raise UserError("give at least one GeoZarr store, GeoParquet or PMTiles file")
    return layers


def _lonlat_bounds(crs: str, bbox: tuple[float, float, float, float]) -> list[float]:
    transformer = Transformer.from_crs(CRS.from_user_input(crs), CRS.from_epsg(4326), always_xy=True)
    w, s, e, n = transformer.transform_bounds(*bbox, densify_pts=21)
    return [max(-180.0, w), max(-85.0511, s), min(180.0, e), min(85.0511, n)]


@dataclass
class RasterLayer:
    id: str
    uri: str
    kind: str = RASTER

    @cached_property
    def info(self) -> geozarr.StoreInfo:
        return geozarr.describe(self.uri, DATA_VAR)

    @cached_property
    def levels(self) -> list[tuple[str, tiles.LevelGrid]]:
        """(group path, grid) of every level, finest first; one level ("" or "0") without a pyramid."""
        layout = (self.info.attrs.get(geozarr.MULTISCALES_ATTR) or {}).get("layout") or []
        levels = []
        for entry in layout:
            if "spatial:transform" in entry and "spatial:shape" in entry:
                grid = tiles.LevelGrid.from_transform(entry["spatial:transform"], entry["spatial:shape"])
                levels.append((str(entry["asset"]), grid))
        if not levels:
            g = self.info.grid
            levels = [(geozarr.level0_group(self.info.attrs), tiles.LevelGrid.from_transform(g.transform, g.shape))]
        return sorted(levels, key=lambda lv: abs(lv[1].a))

    @cached_property
    def _arrays(self) -> list[zarr.Array]:
        root = geozarr.open_group(self.uri)
        out = []
        for path, _ in self.levels:
            arr = root[f"{path}/{DATA_VAR}" if path else DATA_VAR]
            assert isinstance(arr, zarr.Array)
            out.append(arr)
        return out

    def _read(self, level: int, time: slice, band: int, window: Window, step: int = 1) -> np.ndarray:
        """(time, y, x) float64 values of one band: rasterkube's pyramid levels read as they
        are; any other store (one level) through the reader layer, decoded (nodata → NaN)."""
        layout = self.info.layout
        if layout is not None and not layout.native:
            block = geozarr.read_block(layout, window, [band], time, step)[:, 0]
        else:
            ys, xs = window.slices
            block = self._arrays[level][time, band, ys.start : ys.stop : step, xs.start : xs.stop : step]
        return np.asarray(block, dtype=np.float64)

    @cached_property
    def to_store_crs(self) -> Transformer:
        return Transformer.from_crs(CRS.from_epsg(3857), CRS.from_user_input(self.info.grid.crs), always_xy=True)

    @cached_property
    def categorical(self) -> tuple[bool, ...]:
        listed = [str(b) for b in self.info.attrs.get(CATEGORICAL_BANDS_ATTR, [])]
        return band_modes(self.info.dtype, self.info.bands, listed)

    @cached_property
    def bounds(self) -> list[float]:
        return _lonlat_bounds(self.info.grid.crs, self.info.grid.bbox)

    @cached_property
    def stats(self) -> list[dict[str, Any]]:
        """Per band: the default stretch (2–98 % over all times) or the classes present, and the
        time steps with data — from the coarsest level (strided to ≤ STATS_PIXELS pixels)."""
        h, w = self.levels[-1][1].shape
        step = max(1, math.ceil(math.sqrt(h * w / STATS_PIXELS)))
        out = []
        for b in range(len(self.info.bands)):
            values = self._read(len(self.levels) - 1, slice(None), b, Window(0, h, 0, w), step)
            # Time steps with data (e.g. a difference score is NaN at the first), so the page
            # opens on a band and time that show something.
            entry: dict[str, Any] = {"times_with_data": np.flatnonzero(np.isfinite(values).any(axis=(1, 2))).tolist()}
            if self.categorical[b]:
                classes = np.unique(values[np.isfinite(values)])[:MAX_CLASSES]
                entry["classes"] = [float(c) for c in classes]
            else:
                entry["vmin"], entry["vmax"] = tiles.value_range(values)
            out.append(entry)
        return out

    def describe(self) -> dict[str, Any]:
        info = self.info
        res = abs(info.grid.resolution[0])
        crs = CRS.from_user_input(info.grid.crs)
        res_m = res * 111_320.0 if crs.is_geographic else res * float(crs.axis_info[0].unit_conversion_factor or 1.0)
        lat = (self.bounds[1] + self.bounds[3]) / 2
        maxzoom = min(tiles.MAX_ZOOM, max(0, math.ceil(tiles.native_zoom(res_m, lat))))
        return {
            "id": self.id,
            "kind": self.kind,
            "uri": self.uri,
            "bounds": self.bounds,
            "crs": info.grid.crs,
            "shape": list(info.shape),
            "levels": len(self.levels),
            "maxzoom": maxzoom,
            "bands": [
                {"name": name, "categorical": self.categorical[i], **self.stats[i]} for i, name in enumerate(info.bands)
            ],
            "times": [str(t)[:10] if str(t).endswith("T00:00:00") else str(t) for t in info.times],
        }

    def band_index(self, band: str | None) -> int:
        if band is None or band == "":
            return 0
        if band in self.info.bands:
            return self.info.bands.index(band)
        if band.isdigit() and int(band) < len(self.info.bands):
            return int(band)
        raise UserError(f"band {band!r} not in {self.id} (its bands are {', '.join(self.info.bands)})")

    def read_tile(self, z: int, x: int, y: int, time: int, bands: list[int]) -> list[np.ndarray] | None:
        """Nearest-neighbour samples (one (256, 256) float array per band) or None if outside."""
        xs, ys = tiles.pixel_centres(tiles.tile_bounds(z, x, y))
        sx, sy = self.to_store_crs.transform(xs, ys)
        sx, sy = np.asarray(sx), np.asarray(sy)
        level = tiles.pick_level([g for _, g in self.levels], tiles.tile_pixel_size(sx, sy))
        rows, cols, inside = tiles.sample_indices(self.levels[level][1], sx, sy)
        if not inside.any():
            return None
        r0, r1 = int(rows[inside].min()), int(rows[inside].max()) + 1
        c0, c1 = int(cols[inside].min()), int(cols[inside].max()) + 1
        out = []
        for b in bands:
            block = self._read(level, slice(time, time + 1), b, Window(r0, r1, c0, c1))[0]
            values = np.where(inside, block[np.where(inside, rows - r0, 0), np.where(inside, cols - c0, 0)], np.nan)
            out.append(values)
        return out

    def render(self, z: int, x: int, y: int, query: dict[str, str]) -> bytes:
        """A tile PNG: ``band``, ``time`` (index), ``colormap``, ``vmin``/``vmax``, or ``rgb=b1,b2,b3``."""
        time = int(query.get("time", 0) or 0)
        if not 0 <= time < len(self.info.times):
            raise UserError(f"time index {time} out of range 0..{len(self.info.times) - 1}")
        if query.get("rgb"):
            idx = [self.band_index(b) for b in query["rgb"].split(",")]
            if len(idx) != 3:
                raise UserError("rgb needs three bands, e.g. rgb=red,green,blue")
            samples = self.read_tile(z, x, y, time, idx)
            if samples is None:
                return tiles.EMPTY_TILE
            ranges = [(self.stats[i].get("vmin", 0.0), self.stats[i].get("vmax", 1.0)) for i in idx]
            return tiles.encode_png(tiles.colorize_rgb(samples, ranges))
        b = self.band_index(query.get("band"))
        colormap = query.get("colormap") or tiles.DEFAULT_COLORMAP
        if colormap not in tiles.COLORMAPS:
            raise UserError(f"unknown colormap {colormap!r}; use one of {', '.join(tiles.COLORMAPS)}")
        try:
            vmin = float(query.get("vmin") or self.stats[b].get("vmin", 0.0))
            vmax = float(query.get("vmax") or self.stats[b].get("vmax", 1.0))
        except ValueError:
            raise UserError(f"vmin and vmax must be numbers, got {query.get('vmin')!r}, {query.get('vmax')!r}") from None
        samples = self.read_tile(z, x, y, time, [b])
        if samples is None:
            return tiles.EMPTY_TILE
        if self.categorical[b]:
            return tiles.encode_png(tiles.colorize_classes(samples[0]))
        return tiles.encode_png(tiles.colorize(samples[0], vmin, vmax, colormap))


@dataclass
class FeatureLayer:
    id: str
    uri: str
    kind: str = FEATURES

    @cached_property
    def geojson(self) -> bytes:
        import geopandas

        opts = storage.storage_options(self.uri)
        try:
            gdf = geopandas.read_parquet(self.uri, storage_options=opts or None)
        except (ValueError, OSError) as exc:
            raise UserError(f"{self.uri}: not a readable GeoParquet file: {exc}") from None
        if gdf.crs is not None and not gdf.crs.equals(CRS.from_epsg(4326)):
            gdf = gdf.to_crs(4326)
        columns = [c for c in gdf.columns if c != gdf.geometry.name]
        covering = [c for c in columns if gdf[c].map(lambda v: isinstance(v, dict)).any()]
        gdf = gdf.drop(columns=covering)
        for c in columns:
            if c not in covering and pd.api.types.is_datetime64_any_dtype(gdf[c]):
                # ISO strings, as in the PMTiles written by Vectorization (vectorize.tiles).
                gdf[c] = gdf[c].map(lambda t: None if pd.isna(t) else t.isoformat())
        self._bounds = [float(v) for v in gdf.total_bounds] if len(gdf) else None
        self._columns = [c for c in columns if c not in covering]
        self._times = sorted(str(t) for t in gdf["time"].dropna().unique()) if "time" in gdf else []
        self._count = len(gdf)
        return gdf.to_json(default=str, na="null").encode()

    def describe(self) -> dict[str, Any]:
        _ = self.geojson
        return {"id": self.id, "kind": self.kind, "uri": self.uri, "bounds": self._bounds,
                "columns": self._columns, "count": self._count, "times": self._times}  # fmt: skip


@dataclass
class PMTilesLayer:
    id: str
    uri: str
    kind: str = PMTILES

    @cached_property
    def path(self) -> Path:
        if "://" in self.uri and not self.uri.startswith("file://"):
            raise UserError(f"{self.uri}: PMTiles are served from local files only; copy it here first")
        return Path(storage.normalize(self.uri).removeprefix("file://"))

    @cached_property
    def header(self) -> dict[str, Any]:
        """Bounds, zooms and vector layer names from the archive's header and metadata (spec v3)."""
        import gzip

        with open(self.path, "rb") as fh:
            head = fh.read(127)
            if head[:7] != b"PMTiles" or head[7] != 3:
                raise UserError(f"{self.uri} is not a PMTiles v3 archive")
            meta_offset, meta_length = int.from_bytes(head[24:32], "little"), int.from_bytes(head[32:40], "little")
            fh.seek(meta_offset)
            raw = fh.read(meta_length)
        internal_compression = head[97]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = json.loads(gzip.decompress(raw) if internal_compression == 2 else raw) if raw else {}
        e7 = 1e7

        def i32(offset: int) -> float:
            return int.from_bytes(head[offset : offset + 4], "little", signed=True) / e7

        return {
            "bounds": [i32(102), i32(106), i32(110), i32(114)],
            "minzoom": head[100],
            "maxzoom": head[101],
            "vector_layers": [v.get("id") for v in meta.get("vector_layers", []) if v.get("id")],
        }

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "uri": self.uri, **self.header}
