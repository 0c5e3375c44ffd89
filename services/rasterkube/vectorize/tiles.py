"""PMTiles (vector tiles) of the features, for map viewers (``output.pmtiles``).

The archive is written by the ``pmtiles`` package and every tile encoded by
``mapbox-vector-tile``; the tiling in between is hand-written here (no PyPI tiler installs
cleanly without GDAL/tippecanoe binaries): features in Web Mercator, for every zoom from
:func:`zoom_range` every tile their bounds touch, features clipped to the tile plus a small
buffer (so strokes do not show seams), quantized to the tile's 4096 extent, gzip-compressed.
No generalization beyond that quantization: at low zooms small polygons collapse to little
more than points, as with tippecanoe's defaults without ``--drop-*``. Sizes grow with the
feature count, so this is meant for results that fit a map, not continents of polygons.
"""

from __future__ import annotations

import gzip
import math
import warnings
from collections.abc import Iterator
from typing import Any, Final

import numpy as np
import shapely

LAYER: Final = "features"
EXTENT: Final = 4096
BUFFER: Final = 64 / EXTENT  # of a tile's width, on every side
MERCATOR_HALF: Final = 20037508.342789244  # metres from the origin to the edge of EPSG:3857
MAX_ZOOM: Final = 16
ZOOM_LEVELS: Final = 6


def zoom_range(pixel_size_m: float) -> tuple[int, int]:
    """(min, max) zoom: at max zoom a 256-px tile pixel is about the raster's pixel size."""
    z = math.log2(2 * MERCATOR_HALF / (256 * max(pixel_size_m, 1e-3)))
    zmax = int(min(MAX_ZOOM, max(0, math.ceil(z))))
    return max(0, zmax - ZOOM_LEVELS + 1), zmax


def tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """EPSG:3857 bounds of XYZ tile (y down from the north)."""
    size = 2 * MERCATOR_HALF / 2**z
    x0, y1 = -MERCATOR_HALF + x * size, MERCATOR_HALF - y * size
    return x0, y1 - size, x0 + size, y1


def tiles_covering(bounds: tuple[float, float, float, float], z: int) -> Iterator[tuple[int, int]]:
    """(x, y) of the tiles of zoom ``z`` that ``bounds`` (EPSG:3857) touch."""
    n = 2**z
    size = 2 * MERCATOR_HALF / n

    def col(v: float) -> int:
        return min(n - 1, max(0, int((v + MERCATOR_HALF) // size)))

    def row(v: float) -> int:
        return min(n - 1, max(0, int((MERCATOR_HALF - v) // size)))

    for x in range(col(bounds[0]), col(bounds[2]) + 1):
        for y in range(row(bounds[3]), row(bounds[1]) + 1):
            yield x, y


def _properties(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, np.generic):
            v = v.item()
        if hasattr(v, "isoformat"):
            v = v.isoformat()
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[k] = v
    return out


def encode_tiles(geoms: np.ndarray, props: list[dict[str, Any]], zooms: tuple[int, int]) -> Iterator[tuple[int, bytes]]:
    """(tile id, gzip-compressed MVT) for every non-empty tile, in tile id order.
    ``geoms`` are in EPSG:3857."""
    import mapbox_vector_tile
    from pmtiles.tile import zxy_to_tileid

    tree = shapely.STRtree(geoms)
    tiles: list[tuple[int, int, int, int]] = []
    if len(geoms):
        total = tuple(shapely.total_bounds(geoms))
        for z in range(zooms[0], zooms[1] + 1):
            tiles += [(zxy_to_tileid(z, x, y), z, x, y) for x, y in tiles_covering(total, z)]  # type: ignore[arg-type]
    for tile_id, z, x, y in sorted(tiles):
        x0, y0, x1, y1 = tile_bounds(z, x, y)
        pad = (x1 - x0) * BUFFER
        hits = tree.query(shapely.box(x0, y0, x1, y1))
        if not len(hits):
            continue
        clipped = shapely.clip_by_rect(geoms[hits], x0 - pad, y0 - pad, x1 + pad, y1 + pad)
        features = [{"geometry": g, "properties": props[i]} for g, i in zip(clipped, hits, strict=True)
                    if not g.is_empty]  # fmt: skip
        if not features:
            continue
        with warnings.catch_warnings():
            # mapbox-vector-tile 2.2 calls shapely.ops.transform, deprecated in shapely 2.1
            warnings.simplefilter("ignore", DeprecationWarning)
            data = mapbox_vector_tile.encode(
                [{"name": LAYER, "features": features}],
                default_options={"quantize_bounds": (x0, y0, x1, y1), "extents": EXTENT,
                                 "on_invalid_geometry": mapbox_vector_tile.encoder.on_invalid_geometry_make_valid},
            )  # fmt: skip
        yield tile_id, gzip.compress(data, mtime=0)


def write_pmtiles(gdf: Any, path: str, pixel_size_m: float) -> dict[str, Any]:
    """Write the GeoDataFrame's features as a PMTiles v3 archive at local ``path``."""
    from pmtiles.tile import Compression, TileType, zxy_to_tileid
    from pmtiles.writer import Writer

    web = gdf.to_crs("EPSG:3857") if len(gdf) else gdf
    columns = [c for c in gdf.columns if c != gdf.geometry.name and gdf[c].dtype.name != "geometry"]
    props = [_properties(r) for r in web[columns].to_dict("records")] if len(gdf) else []
    zooms = zoom_range(pixel_size_m)
    lon0, lat0, lon1, lat1 = gdf.to_crs("EPSG:4326").total_bounds if len(gdf) else (-180.0, -85.0, 180.0, 85.0)
    count = 0
    with open(path, "wb") as fh:
        writer = Writer(fh)
        for tile_id, data in encode_tiles(np.asarray(web.geometry.values, dtype=object), props, zooms):
            writer.write_tile(tile_id, data)
            count += 1
        if count == 0:  # an archive needs one tile: an empty one at 0/0/0
            import mapbox_vector_tile

            writer.write_tile(zxy_to_tileid(0, 0, 0), gzip.compress(mapbox_vector_tile.encode([]), mtime=0))
        e7 = 10_000_000
        header = {"tile_type": TileType.MVT, "tile_compression": Compression.GZIP,
                  "min_lon_e7": int(lon0 * e7), "min_lat_e7": int(lat0 * e7),
                  "max_lon_e7": int(lon1 * e7), "max_lat_e7": int(lat1 * e7), "center_zoom": zooms[0]}  # fmt: skip
        from pandas.api.types import is_numeric_dtype

        fields = {c: "Number" if is_numeric_dtype(gdf[c].dtype) else "String" for c in columns}
        writer.finalize(header, {"vector_layers": [{"id": LAYER, "fields": fields, "minzoom": zooms[0],
                                                    "maxzoom": zooms[1]}]})  # fmt: skip
    return {"tiles": count, "min_zoom": zooms[0], "max_zoom": zooms[1]}
