"""Thresholded rasters to polygons with statistics, blockwise and seamless. Pure functions.

Everything here works on numpy arrays and shapely geometries; reading stores, Ray and writing
GeoParquet live in :mod:`rasterkube.vectorize.service`.

Seamless blockwise polygonization
---------------------------------
The result must be the same as one ``rasterio.features.shapes`` call over the whole raster,
while every block is polygonized on its own (a Ray task holding one block, so memory stays
flat in the AOI size). Per block (:func:`polygonize_block`):

1. ``foreground = value > threshold`` (NaN is background: ``NaN > t`` is False).
2. Connected components with :func:`scipy.ndimage.label` (cross structure for 4-connectivity,
   3×3 for 8), so every component has an id and exact per-component *moments* (count, mean,
   sum of squared deviations M2, min, max) computed from its pixels.
3. ``rasterio.features.shapes`` over the label image, in *pixel* coordinates offset by the
   block origin: one polygon per component, all vertices on the integer pixel lattice.
4. Components that touch an internal block edge are *pieces*: they are returned in pixel
   coordinates together with the label strips of the four block edges. Components away from
   internal edges are final and are finished in the task (the parallel part of the work).

Then (:func:`merge_pieces`):

5. On the driver, as blocks finish in any order (:class:`SeamMerger`): adjacent foreground
   pixels across every seam between two finished blocks (side by side for 4-connectivity;
   plus the two diagonals and the block corners for 8) give edges between pieces; the
   connected components of that graph (``scipy.sparse.csgraph.connected_components``, the
   library's union-find) are whole-raster components as soon as none of their pieces touches
   an edge whose neighbour block is still missing — those are handed out for merging while
   the other blocks run (:func:`group_pieces`: the same for all blocks at once).
6. In parallel tasks over runs of whole groups (:meth:`Groups.split`, :func:`merge_groups`):
   the geometry of a merged component is the union of its pieces. This is exact: the pieces
   are valid polygons with integer coordinates and axis-parallel edges, so every node the
   overlay computes is an existing lattice point (no rounding), and the union is the point
   set of the component's pixels — holes included, since a hole is simply area no piece
   covers. Moments are combined with Chan et al.'s parallel formula (count-weighted means and
   M2 plus the between-piece term), i.e. the statistics of the merged pixel set, not averages
   of averages.

Every geometry, merged or not, is then put into one canonical form (:func:`canonical`):
valid (``make_valid``: GDAL's 8-connected output can touch itself at a vertex, which GEOS
represents as a MultiPolygon), without collinear vertices (the seams leave some on merged
rings; GDAL itself emits none), mapped to the grid's CRS with GDAL's own arithmetic
(``x = c + col·a + row·b``), and ``shapely.normalize``-d. The canonical form of one
whole-raster ``shapes`` call equals ours polygon for polygon, bit for bit (the unit tests
check it on rasters with many blobs crossing block edges, holes and both connectivities).

Centre lines (``medialSkeletonize``) are ``skimage.morphology.skeletonize`` of each
component's pixels on its bounding box, traced into lines through pixel centres: in the
block task for finished components, on the driver for merged ones (their polygon rasterized
back on its bounding box gives exactly their pixels). Same pixels, same lines, blockwise or
not; memory follows the largest component's bounding box.

Hand-written where a library does it: the seam matching (:func:`seam_pairs`; the union-find
itself is scipy's) and the bookkeeping of which groups are complete (:class:`SeamMerger`),
the affine mapping (:func:`pixel_to_world`, instead of
``shapely.affinity.affine_transform``, to reproduce GDAL's float arithmetic exactly), the
GeoJSON → shapely conversion (:func:`polygonize_labels`, vectorized), Chan's moment
update (:func:`combine_moments`), the skeleton tracing (:func:`skeleton_lines`) and the
removal of collinear seam vertices (:func:`drop_collinear`: for axis-parallel rings a
vertex test on coordinate arrays, 3× faster than GEOS's simplify at tolerance 0 with the
same result).

Simplification (:func:`simplify`) is a coverage simplification of all polygons of one band
and time step together (GEOS's topology-preserving Visvalingam–Whyatt): distinct components
share no edge, but they can touch at a corner (4-connectivity) or nest (an island in a hole),
and simplifying them one by one let neighbours overlap. It runs on the driver after the merge,
so it needs every polygon at once (memory of the output, which the driver holds anyway); it
is off by default. Collinear vertices on the merged seams are removed without it
(:func:`drop_collinear`), so the unsimplified output is GDAL's own.

Nodata: NaN and the store's fill value (``nodata``; an integer band has no NaN) are
background, never foreground, and no statistic sees them.
"""

from __future__ import annotations

import gc
import itertools
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import numpy as np
import pyarrow as pa
import rasterio.features
import shapely
from affine import Affine
from numpy.typing import NDArray
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

# ndimage.label structures: 4-connectivity is the cross, 8-connectivity the full 3×3.
STRUCTURES: Final = {4: ndimage.generate_binary_structure(2, 1), 8: ndimage.generate_binary_structure(2, 2)}
Transform = tuple[float, float, float, float, float, float]
Geoms = NDArray[np.object_]


# ----------------------------------------------------------------------------- per-pixel steps


def foreground(values: NDArray[np.number], threshold: float, nodata: float | None = None) -> NDArray[np.bool_]:
    """Pixels strictly above the threshold; NaN is background (``NaN > t`` is False), and so is
    ``nodata`` (the store's fill value: an integer band has no NaN to mark missing pixels)."""
    with np.errstate(invalid="ignore"):
        fg = np.asarray(values > threshold)
    if nodata is not None and not np.isnan(nodata) and fg.any():
        fg &= values != nodata
    return fg


def label_components(mask: NDArray[np.bool_], connectivity: int) -> tuple[NDArray[np.int32], int]:
    """Connected components of ``mask`` (ids 1..n, 0 = background)."""
    labels, n = ndimage.label(mask, structure=STRUCTURES[connectivity], output=np.int32)
    return labels, int(n)


# ----------------------------------------------------------------------------------- moments


@dataclass(frozen=True)
class Moments:
    """Per-component statistics that combine exactly across pieces (Chan et al. 1979).

    ``m2`` is the sum of squared deviations from the mean, so ``std = sqrt(m2 / count)``
    (population std, numpy's default ``ddof=0``). float64 throughout."""

    count: NDArray[np.int64]
    mean: NDArray[np.float64]
    m2: NDArray[np.float64]
    vmin: NDArray[np.float64]
    vmax: NDArray[np.float64]

    def take(self, idx: NDArray[np.intp]) -> Moments:
        return Moments(self.count[idx], self.mean[idx], self.m2[idx], self.vmin[idx], self.vmax[idx])

    @property
    def std(self) -> NDArray[np.float64]:
        return np.sqrt(self.m2 / np.maximum(self.count, 1))

    @classmethod
    def concat(cls, parts: Sequence[Moments]) -> Moments:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("count", "mean", "m2", "vmin", "vmax")))

    @classmethod
    def empty(cls) -> Moments:
        return cls(np.zeros(0, np.int64), *(np.zeros(0) for _ in range(4)))


def component_moments(values: NDArray[np.number], labels: NDArray[np.int32], n: int,
                      fg: NDArray[np.bool_] | None = None) -> Moments:  # fmt: skip
    """Moments of ``values`` over each component 1..n, two-pass (mean first, then M2);
    ``fg``: ``labels > 0`` when the caller has it."""
    if n == 0:
        return Moments.empty()
    if fg is None:
        fg = labels > 0
    # One scan of the mask, then gathers (two boolean-mask selections cost twice the scan).
    at = np.flatnonzero(fg)
    lab = labels.ravel().take(at)
    lab -= 1
    v = values.ravel().take(at).astype(np.float64)
    count = np.bincount(lab, minlength=n).astype(np.int64)
    mean = np.bincount(lab, weights=v, minlength=n) / count
    dev = v - mean.take(lab)
    dev *= dev
    m2 = np.bincount(lab, weights=dev, minlength=n)
    vmin = np.full(n, np.inf)
    vmax = np.full(n, -np.inf)
    np.minimum.at(vmin, lab, v)
    np.maximum.at(vmax, lab, v)
    return Moments(count, mean, m2, vmin, vmax)


def combine_moments(m: Moments, group: NDArray[np.intp], n_groups: int) -> Moments:
    """Moments of the unions of pieces: ``group[i]`` is the merged component of piece i.

    Chan's parallel update, vectorized over groups: n = Σnᵢ, mean = Σnᵢ·meanᵢ / n,
    M2 = ΣM2ᵢ + Σnᵢ·(meanᵢ − mean)² — exactly the two-pass statistics of the merged pixels up
    to float rounding."""
    count = np.bincount(group, weights=m.count, minlength=n_groups).astype(np.int64)
    mean = np.bincount(group, weights=m.count * m.mean, minlength=n_groups) / count
    m2 = np.bincount(group, weights=m.m2 + m.count * (m.mean - mean[group]) ** 2, minlength=n_groups)
    vmin = np.full(n_groups, np.inf)
    vmax = np.full(n_groups, -np.inf)
    np.minimum.at(vmin, group, m.vmin)
    np.maximum.at(vmax, group, m.vmax)
    return Moments(count, mean, m2, vmin, vmax)


# ---------------------------------------------------------------------------------- geometry


def polygonize_labels(labels: NDArray[np.int32], n: int, connectivity: int, origin: tuple[int, int] = (0, 0),
                      mask: NDArray[np.bool_] | None = None,
                      world: tuple[NDArray[np.bool_], Transform] | None = None) -> Geoms:  # fmt: skip
    """One polygon per component (index i ↔ label i+1), in pixel coordinates of the whole
    raster (``origin`` = (row, col) of the block), i.e. on the integer lattice; ``mask``:
    ``labels > 0`` when the caller has it. ``world = (in_crs, transform)``: the components
    where ``in_crs`` is True come in CRS coordinates instead (:func:`pixel_to_world`'s
    arithmetic, bit for bit).

    ``rasterio.features.shapes`` (GDAL's polygonizer) traces the rings; the GeoJSON it yields
    is turned into shapely polygons in one vectorized call (what ``shapely.geometry.shape``
    does one polygon at a time, 3× slower — as slow as the tracing itself). The coordinate
    tuples are flattened with ``np.fromiter`` over a chained iterator, 2.5× faster than
    ``np.asarray`` on the list of tuples."""
    geoms = np.empty(n, dtype=object)
    if n == 0:
        return geoms
    with _no_gc():
        values, rings_per_polygon, ring_sizes, coords = _read_shapes(
            labels, labels > 0 if mask is None else mask, connectivity, Affine.translation(origin[1], origin[0]))
    vertex_ring = np.repeat(np.arange(len(ring_sizes)), ring_sizes)
    ring_polygon = np.repeat(np.arange(len(values)), rings_per_polygon)
    component = values - 1
    if world is not None:
        # Straight to CRS coordinates where asked: no shapely.transform round trip later.
        in_crs, crs_transform = world
        sel = in_crs[component][ring_polygon][vertex_ring]
        coords[sel] = _apply_transform(coords[sel], crs_transform)
    rings_arr = shapely.linearrings(coords, indices=vertex_ring)
    # With indices, the first ring of each polygon is its shell and the others its holes.
    geoms[component] = shapely.polygons(rings_arr, indices=ring_polygon)
    return geoms


def _read_shapes(
    labels: NDArray[np.int32], mask: NDArray[np.bool_], connectivity: int, transform: Affine
) -> tuple[NDArray[np.int64], NDArray[np.intp], NDArray[np.intp], NDArray[np.float64]]:
    """GDAL's polygons of ``labels`` as arrays: each polygon's label and ring count, each
    ring's vertex count, and all (x, y) vertices. The GeoJSON tuples are gone when it returns."""
    values: list[float] = []
    rings_per_polygon: list[int] = []
    rings: list[list[tuple[float, float]]] = []
    for geojson, value in rasterio.features.shapes(labels, mask=mask, connectivity=connectivity, transform=transform):
        polygon_rings = geojson["coordinates"]
        values.append(value)
        rings_per_polygon.append(len(polygon_rings))
        rings.extend(polygon_rings)
    ring_sizes = np.fromiter(map(len, rings), dtype=np.intp, count=len(rings))
    flat = itertools.chain.from_iterable(itertools.chain.from_iterable(rings))
    coords = np.fromiter(flat, dtype=np.float64, count=2 * int(ring_sizes.sum())).reshape(-1, 2)
    return np.asarray(values, dtype=np.int64), np.asarray(rings_per_polygon, dtype=np.intp), ring_sizes, coords


@contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector off while GDAL's GeoJSON is read: tens of thousands of
    coordinate tuples (no cycles among them) trigger collections that walk the whole heap
    of a Ray worker — 5–10 % of a block's time. Keep the tuples' lifetime inside the block:
    turned on while they are still referenced, the next collection walks them all."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def make_valid(geoms: Geoms) -> Geoms:
    """``make_valid`` only where needed (the check is much cheaper than the repair)."""
    out = np.asarray(geoms, dtype=object).copy()
    bad = ~shapely.is_valid(out)
    if bad.any():
        out[bad] = shapely.make_valid(out[bad], method="structure", keep_collapsed=False)
    return out


def drop_collinear(geoms: Geoms) -> Geoms:
    """Remove collinear vertices from (Multi)Polygons whose edges are all axis-parallel (the
    lattice polygons of :func:`merge_pieces`): a vertex is collinear exactly when it shares its
    x, or its y, with both ring neighbours. Vectorized over all rings (3–5× faster than the
    Douglas–Peucker ``shapely.simplify(g, 0)`` it replaces, which walks every ring in GEOS's
    topology-preserving simplifier); ring starts are treated like any other vertex. Rings
    keep their order and orientation; other geometry types go through ``shapely.simplify``."""
    geoms = np.asarray(geoms, dtype=object)
    out = geoms.copy()
    types = shapely.get_type_id(geoms)
    is_polygonal = np.isin(types, (3, 6)) & ~shapely.is_empty(geoms)  # Polygon, MultiPolygon
    polygonal = np.flatnonzero(is_polygonal)
    other = np.flatnonzero(~is_polygonal & (types >= 0))
    if len(other):
        out[other] = shapely.simplify(geoms[other], 0.0, preserve_topology=True)
    if not len(polygonal):
        return out
    parts, part_of = shapely.get_parts(geoms[polygonal], return_index=True)
    rings, ring_of = shapely.get_rings(parts, return_index=True)  # shell first, then holes
    xy, vertex_of = shapely.get_coordinates(rings, return_index=True)
    # Rings are closed: drop each closing vertex, look at cyclic neighbours, close again.
    last = np.r_[vertex_of[1:] != vertex_of[:-1], True]
    xy, vertex_of = xy[~last], vertex_of[~last]
    starts = np.r_[0, np.flatnonzero(np.diff(vertex_of)) + 1]
    sizes = np.diff(np.r_[starts, len(xy)])
    idx = np.arange(len(xy))
    first = np.repeat(starts, sizes)
    prev = np.where(idx == first, idx + np.repeat(sizes, sizes) - 1, idx - 1)
    nxt = np.where(idx == first + np.repeat(sizes, sizes) - 1, first, idx + 1)
    collinear = ((xy[prev, 0] == xy[:, 0]) & (xy[:, 0] == xy[nxt, 0])) | (
        (xy[prev, 1] == xy[:, 1]) & (xy[:, 1] == xy[nxt, 1])
    )
    keep = ~collinear
    xy, vertex_of = xy[keep], vertex_of[keep]
    # close every ring again: repeat its first remaining vertex at its end
    starts = np.r_[0, np.flatnonzero(np.diff(vertex_of)) + 1]
    ends = np.r_[starts[1:], len(xy)]
    closed = np.insert(xy, ends, xy[starts], axis=0)
    closed_of = np.insert(vertex_of, ends, vertex_of[starts])
    new_rings = shapely.linearrings(closed, indices=closed_of)
    new_parts = shapely.polygons(new_rings, indices=ring_of)
    multi = types[polygonal] == 6
    result = np.empty(len(polygonal), dtype=object)
    single = np.flatnonzero(~multi)
    result[single] = new_parts[np.searchsorted(part_of, single)]
    if multi.any():
        many = np.flatnonzero(multi)
        sel = np.isin(part_of, many)
        result[many] = shapely.multipolygons(new_parts[sel], indices=np.searchsorted(many, part_of[sel]))
    out[polygonal] = result
    return out


def pixel_to_world(geoms: Geoms, transform: Transform) -> Geoms:
    """Pixel (col, row) → CRS coordinates with GDAL's arithmetic (``c + col·a + row·b``), so
    coordinates are bit-identical to what GDAL writes for a georeferenced raster."""
    return shapely.transform(geoms, lambda xy: _apply_transform(xy, transform))


def _apply_transform(xy: NDArray[np.float64], transform: Transform) -> NDArray[np.float64]:
    """(col, row) → (x, y) exactly as GDAL computes it: ``c + col·a + row·b``."""
    a, b, c, d, e, f = transform
    col, row = xy[:, 0], xy[:, 1]
    return np.column_stack([c + col * a + row * b, f + col * d + row * e])


def canonical(geoms: Geoms, transform: Transform | None = None, checked: bool = False) -> Geoms:
    """The one form every output polygon has: valid, in CRS coordinates (when ``transform``
    is given, from pixel coordinates), normalized. No collinear vertices: GDAL's rings have
    none, and :func:`merge_pieces` removes the ones its unions leave on the seams (the
    removal is costly, so only there).

    ``checked``: the caller knows the input is valid — GDAL's 4-connected polygons are (a hole
    that touches the shell diagonally comes out as a valid touching hole; 0 invalid in 46k
    polygons of rough random fields, and the unit tests check validity), while its
    8-connected ones can touch themselves at a vertex."""
    out = geoms if checked else make_valid(geoms)
    if transform is not None:
        out = pixel_to_world(out, transform)
    return shapely.normalize(out)


# ------------------------------------------------------------------------------------ blocks


@dataclass(frozen=True)
class Edges:
    """Component labels along the four edges of a block (0 = background)."""

    top: NDArray[np.int32]
    bottom: NDArray[np.int32]
    left: NDArray[np.int32]
    right: NDArray[np.int32]

    @classmethod
    def of(cls, labels: NDArray[np.int32]) -> Edges:
        return cls(labels[0].copy(), labels[-1].copy(), labels[:, 0].copy(), labels[:, -1].copy())


def _nones(n: int) -> Geoms:
    return np.full(n, None, dtype=object)


def _cat(arrays: Sequence[Geoms]) -> Geoms:
    return np.concatenate(arrays) if arrays else _nones(0)


@dataclass(frozen=True)
class Components:
    """Components with their geometries (pixel or CRS coordinates) and moments;
    ``centerline``: their centre lines, or None where not computed."""

    geometry: Geoms
    moments: Moments
    centerline: Geoms

    def take(self, idx: NDArray[np.intp]) -> Components:
        return Components(self.geometry[idx], self.moments.take(idx), self.centerline[idx])

    def __reduce__(self) -> tuple[Any, ...]:
        return _unpack_components, (_pack(self.geometry), self.moments, _pack(self.centerline))

    def __len__(self) -> int:
        return len(self.geometry)

    @classmethod
    def concat(cls, parts: Sequence[Components]) -> Components:
        return cls(_cat([p.geometry for p in parts]), Moments.concat([p.moments for p in parts]),
                   _cat([p.centerline for p in parts]))  # fmt: skip


@dataclass(frozen=True)
class BlockPieces:
    """What one block returns for one band and time step.

    ``final``: components that touch no internal block edge, already in canonical CRS form.
    ``pieces``: components on an internal edge, in pixel coordinates (valid), with their block
    labels in ``piece_labels`` so the seams in ``edges`` can be matched to them."""

    final: Components
    pieces: Components
    piece_labels: NDArray[np.int32]
    edges: Edges


def internal_edge_labels(edges: Edges, block: tuple[int, int, int, int], shape: tuple[int, int]) -> NDArray[np.int32]:
    """Sorted labels of components on an edge shared with another block (not the raster's)."""
    y0, y1, x0, x1 = block
    strips = [s for s, internal in ((edges.top, y0 > 0), (edges.bottom, y1 < shape[0]),
                                    (edges.left, x0 > 0), (edges.right, x1 < shape[1])) if internal]  # fmt: skip
    if not strips:
        return np.zeros(0, np.int32)
    found = np.unique(np.concatenate(strips))
    return found[found > 0].astype(np.int32)


def polygonize_block(values: NDArray[np.number], threshold: float, connectivity: int,
                     block: tuple[int, int, int, int], shape: tuple[int, int],
                     transform: Transform, centerlines: bool = False, nodata: float | None = None) -> BlockPieces:  # fmt: skip
    """Polygonize one block (``values`` = the raster's ``[y0:y1, x0:x1]``) of a raster of ``shape``;
    pixels equal to ``nodata`` (and NaN) are background.

    With ``centerlines``, the finished components get their centre lines (the pieces get
    theirs once merged, in :func:`merge_pieces`)."""
    fg = foreground(values, threshold, nodata)
    labels, n = label_components(fg, connectivity)
    moments = component_moments(values, labels, n, fg)
    edges = Edges.of(labels)
    on_edge = internal_edge_labels(edges, block, shape)
    is_piece = np.zeros(n, dtype=bool)
    is_piece[on_edge - 1] = True
    # Pieces stay on the pixel lattice (exact unions); finished components go to CRS now.
    geoms = polygonize_labels(labels, n, connectivity, origin=(block[0], block[2]), mask=fg,
                              world=(~is_piece, transform))  # fmt: skip
    whole = Components(geoms, moments, _nones(n))
    inner_idx = np.flatnonzero(~is_piece)
    inner = whole.take(inner_idx)
    lines = _nones(len(inner_idx))
    if centerlines and len(inner_idx):
        lines = component_centerlines(labels, inner_idx + 1, origin=(block[0], block[2]))
        lines = shapely.normalize(pixel_to_world(lines, transform))
    final = Components(canonical(inner.geometry, checked=connectivity == 4), inner.moments, lines)
    pieces = whole.take(on_edge - 1)
    return BlockPieces(final, Components(make_valid(pieces.geometry), pieces.moments, pieces.centerline),
                       on_edge, edges)  # fmt: skip


# ------------------------------------------------------------------------------ centre lines


def skeleton_lines(skeleton: NDArray[np.bool_], origin: tuple[int, int]) -> shapely.Geometry | None:
    """Trace a one-pixel-wide skeleton into lines through pixel centres (pixel coordinates of
    the raster, ``origin`` = (row, col) of the array's first pixel).

    Hand-written (skan does it as a graph library): every pair of 8-adjacent skeleton pixels
    is a segment — a diagonal one only when no orthogonal pair already joins the two pixels,
    so corners do not become little triangles — and ``shapely.line_merge`` joins the segments
    into the longest lines between junctions and ends. A one-pixel skeleton has no segment:
    None."""
    s = skeleton
    # (pixel pairs as a mask over the first pixel, offset to the second)
    pairs = [
        (s[:, :-1] & s[:, 1:], (0, 1)),
        (s[:-1, :] & s[1:, :], (1, 0)),
        (s[:-1, :-1] & s[1:, 1:] & ~s[:-1, 1:] & ~s[1:, :-1], (1, 1)),
        (s[:-1, 1:] & s[1:, :-1] & ~s[:-1, :-1] & ~s[1:, 1:], (1, -1)),
    ]
    segments = []
    for here, (dy, dx) in pairs:
        rr, cc = np.nonzero(here)
        if dx < 0:
            cc = cc + 1  # that mask starts at column 1
        start = np.column_stack([cc, rr])
        segments.append(np.stack([start, start + (dx, dy)], axis=1))
    seg = np.concatenate(segments).astype(np.float64)
    if len(seg) == 0:
        return None
    seg += (origin[1] + 0.5, origin[0] + 0.5)  # pixel centres, in the raster's pixel coordinates
    lines = shapely.linestrings(seg.reshape(-1, 2), indices=np.repeat(np.arange(len(seg)), 2))
    return shapely.line_merge(shapely.multilinestrings(lines))


def component_centerlines(labels: NDArray[np.int32], ids: NDArray[np.intp], origin: tuple[int, int]) -> Geoms:
    """Centre lines (medial axis skeletons, ``skimage.morphology.skeletonize``) of the
    components ``ids`` of a label image, each on its own bounding box."""
    from skimage.morphology import skeletonize

    boxes = ndimage.find_objects(labels)
    out = _nones(len(ids))
    for k, lab in enumerate(ids):
        ys, xs = boxes[lab - 1]
        mask = labels[ys, xs] == lab
        out[k] = skeleton_lines(skeletonize(mask), (origin[0] + ys.start, origin[1] + xs.start))
    return out


def polygon_centerline(geom: shapely.Geometry) -> shapely.Geometry | None:
    """Centre line of a component given as its polygon in pixel coordinates: rasterized back
    on its bounding box — exactly its pixels, since lattice edges never pass through a pixel
    centre — then skeletonized as in :func:`component_centerlines` (same pixels, same lines).
    Memory follows the component's bounding box, not the AOI."""
    from skimage.morphology import skeletonize

    x0, y0, x1, y1 = (int(round(v)) for v in shapely.bounds(geom))
    mask = rasterio.features.rasterize([(geom, 1)], out_shape=(y1 - y0, x1 - x0), transform=Affine.translation(x0, y0),
                                       dtype=np.uint8).astype(bool)  # fmt: skip
    return skeleton_lines(skeletonize(mask), (y0, x0))


# ------------------------------------------------------------------------------------- merge


Pairs = tuple[NDArray[np.int32], NDArray[np.int32]]


def seam_pairs(a: NDArray[np.int32], b: NDArray[np.int32], connectivity: int) -> Pairs:
    """Label pairs of foreground pixels adjacent across a seam (``a`` and ``b`` are the facing
    pixel rows/columns of the two blocks, aligned): side by side, plus diagonals for 8."""
    shifts = [(slice(None), slice(None))]
    if connectivity == 8:
        shifts += [(slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))]
    pa, pb = [], []
    for sa, sb in shifts:
        x, y = a[sa], b[sb]
        m = (x > 0) & (y > 0)
        pa.append(x[m])
        pb.append(y[m])
    return np.concatenate(pa), np.concatenate(pb)


# Neighbour directions of a block on the block grid, (drow, dcol). The four sides come first;
# the corners matter for 8-connectivity only (there the two corner pixels touch diagonally).
SIDES: Final = ((0, 1), (1, 0), (0, -1), (-1, 0))
CORNERS: Final = ((1, 1), (1, -1), (-1, -1), (-1, 1))


def _strip(edges: Edges, direction: tuple[int, int]) -> NDArray[np.int32]:
    """The labels of a block that face its neighbour in ``direction`` (a side strip, or the
    one corner pixel)."""
    return {(0, 1): edges.right, (1, 0): edges.bottom, (0, -1): edges.left, (-1, 0): edges.top,
            (1, 1): edges.bottom[-1:], (1, -1): edges.bottom[:1], (-1, -1): edges.top[:1],
            (-1, 1): edges.top[-1:]}[direction]  # fmt: skip


def _facing(a: Edges, b: Edges, direction: tuple[int, int], connectivity: int) -> Pairs:
    """Label pairs (block a, block b) of foreground pixels adjacent across the seam between a
    and its neighbour b in ``direction``."""
    back = (-direction[0], -direction[1])
    if direction in SIDES:
        return seam_pairs(_strip(a, direction), _strip(b, back), connectivity)
    la, lb = _strip(a, direction), _strip(b, back)
    both = (la > 0) & (lb > 0)
    return la[both], lb[both]


def piece_key(block: NDArray[np.int64], label: NDArray[np.int32]) -> NDArray[np.int64]:
    """Pieces' identities that do not depend on the order blocks finish in: (block index,
    label). A merged component is known by the smallest key of its pieces."""
    return (np.asarray(block, dtype=np.int64) << 32) | np.asarray(label, dtype=np.int64)


class SeamMerger:
    """Groups the pieces of a raster's blocks into whole-raster components *while the blocks
    are still being computed*, so the unions can start before the last block is done.

    Blocks are :meth:`add`-ed in any order. A piece touches some internal block edges; it
    *needs* the neighbour block across each of them (and, for 8-connectivity, across a corner
    pixel). Seams between two added blocks are matched as soon as both are there. The
    connected components of the seam graph over the open pieces are whole-raster components
    once no piece in them needs a block that is missing (nothing can join them any more):
    :meth:`ready` hands those out and forgets them, so the merger only holds the frontier of
    the blocks done so far. After the last block every piece is ready. The graph's connected
    components are scipy's (``connected_components``); the bookkeeping is ours.

    ``blocks``: (y0, y1, x0, x1) windows tiling the raster on a regular grid (as
    :func:`rasterkube.runtime.blocks.plan_blocks` makes them)."""

    def __init__(self, blocks: Sequence[tuple[int, int, int, int]], connectivity: int) -> None:
        rows = {y0: i for i, y0 in enumerate(sorted({b[0] for b in blocks}))}
        cols = {x0: j for j, x0 in enumerate(sorted({b[2] for b in blocks}))}
        self._pos = [(rows[b[0]], cols[b[2]]) for b in blocks]
        self._at = {ij: k for k, ij in enumerate(self._pos)}
        self._directions = SIDES + CORNERS if connectivity == 8 else SIDES
        self._connectivity = connectivity
        self._edges: dict[int, Edges] = {}  # edge strips of every added block (later seams need them)
        self._pieces: dict[int, BlockPieces] = {}  # added blocks that still have open pieces
        self._offset: dict[int, int] = {}  # first global piece id of each added block
        self._n = 0  # global piece ids handed out
        # Open pieces: sorted global ids, their block and label; seam edges between open
        # pieces; (piece, block) pairs of the missing blocks open pieces still need.
        self._open = np.zeros(0, np.int64)
        self._open_block = np.zeros(0, np.int64)
        self._open_label = np.zeros(0, np.int32)
        self._edge_a = np.zeros(0, np.int64)
        self._edge_b = np.zeros(0, np.int64)
        self._need_piece = np.zeros(0, np.int64)
        self._need_block = np.zeros(0, np.int64)

    @property
    def open_pieces(self) -> int:
        return len(self._open)

    def _neighbours(self, k: int) -> list[tuple[tuple[int, int], int]]:
        i, j = self._pos[k]
        return [(d, m) for d in self._directions if (m := self._at.get((i + d[0], j + d[1]))) is not None]

    def _gids(self, k: int, labels: NDArray[np.int32]) -> NDArray[np.int64]:
        return self._offset[k] + np.searchsorted(self._pieces[k].piece_labels, labels).astype(np.int64)

    def add(self, k: int, block: BlockPieces) -> None:
        """A finished block (index ``k`` in ``blocks``): its pieces and edge strips."""
        if k in self._edges:
            raise ValueError(f"block {k} was added twice")
        n = len(block.piece_labels)
        self._edges[k] = block.edges
        self._offset[k] = self._n
        self._n += n
        if n:
            self._pieces[k] = block
            self._open = np.r_[self._open, np.arange(self._offset[k], self._n, dtype=np.int64)]
            self._open_block = np.r_[self._open_block, np.full(n, k, np.int64)]
            self._open_label = np.r_[self._open_label, block.piece_labels]
        # Pieces of earlier blocks that waited for this one no longer do.
        keep = self._need_block != k
        need_p, need_b = [self._need_piece[keep]], [self._need_block[keep]]
        ea, eb = [self._edge_a], [self._edge_b]
        for d, m in self._neighbours(k) if n else ():
            if m not in self._edges:
                facing = np.unique(_strip(block.edges, d))
                facing = facing[np.isin(facing, block.piece_labels)]
                need_p.append(self._gids(k, facing))
                need_b.append(np.full(len(facing), m, np.int64))
            elif m in self._pieces:  # both done: match the seam (merged blocks have no pieces left on it)
                la, lb = _facing(block.edges, self._edges[m], d, self._connectivity)
                ea.append(self._gids(k, la))
                eb.append(self._gids(m, lb))
        self._need_piece, self._need_block = np.concatenate(need_p), np.concatenate(need_b)
        self._edge_a, self._edge_b = np.concatenate(ea), np.concatenate(eb)

    def ready(self) -> Groups:
        """The groups of open pieces that nothing can join any more, numbered by their
        smallest :func:`piece_key` (so the numbering does not depend on the order blocks
        finished in); they are forgotten here. Once every block is added, all pieces are."""
        n_open = len(self._open)
        if n_open == 0:
            return Groups.empty()
        waiting = np.zeros(n_open, dtype=bool)
        waiting[np.searchsorted(self._open, self._need_piece)] = True
        if waiting.all():
            return Groups.empty()
        a = np.searchsorted(self._open, self._edge_a)
        b = np.searchsorted(self._open, self._edge_b)
        graph = sparse.csr_array((np.ones(len(a), np.int8), (a, b)), shape=(n_open, n_open))
        n_comp, comp = connected_components(graph, directed=False)
        blocked = np.bincount(comp, weights=waiting, minlength=n_comp) > 0
        take = np.flatnonzero(~blocked[comp])
        if not len(take):
            return Groups.empty()
        # Pieces block by block (the order Components are gathered in), groups by smallest key.
        take = take[np.argsort(self._open_block[take], kind="stable")]
        owner = self._open_block[take]
        keys = piece_key(owner, self._open_label[take])
        comps, group = np.unique(comp[take], return_inverse=True)
        first = np.full(len(comps), np.iinfo(np.int64).max)
        np.minimum.at(first, group, keys)
        rank = np.empty(len(comps), np.intp)
        rank[np.argsort(first, kind="stable")] = np.arange(len(comps))
        blocks, starts = np.unique(owner, return_index=True)
        pieces = Components.concat([self._pieces[int(k)].pieces.take(self._open[take[s:e]] - self._offset[int(k)])
                                    for k, s, e in zip(blocks, starts, [*starts[1:], len(take)], strict=True)])  # fmt: skip
        result = Groups(pieces, rank[group].astype(np.intp), len(comps), np.sort(first))
        self._forget(take)
        return result

    def _forget(self, idx: NDArray[np.intp]) -> None:
        """Drop the open pieces at positions ``idx`` (merged groups: complete, so no edge or
        need links them to a piece that stays)."""
        stays = np.ones(len(self._open), dtype=bool)
        stays[idx] = False
        keep = stays[np.searchsorted(self._open, self._edge_a)]
        self._edge_a, self._edge_b = self._edge_a[keep], self._edge_b[keep]
        keep = stays[np.searchsorted(self._open, self._need_piece)]
        self._need_piece, self._need_block = self._need_piece[keep], self._need_block[keep]
        self._open, self._open_block = self._open[stays], self._open_block[stays]
        self._open_label = self._open_label[stays]
        for k in set(self._pieces) - set(np.unique(self._open_block).tolist()):
            del self._pieces[k]  # every piece of block k is merged


def group_pieces(results: Sequence[BlockPieces], blocks: Sequence[tuple[int, int, int, int]],
                 connectivity: int) -> Groups:  # fmt: skip
    """The pieces of all blocks (in the order of ``results``) and the whole-raster component
    each belongs to: a :class:`SeamMerger` given every block."""
    merger = SeamMerger(blocks, connectivity)
    for k, r in enumerate(results):
        merger.add(k, r)
    return merger.ready()


@dataclass(frozen=True)
class Groups:
    """Pieces (pixel coordinates) and the merged component ``group[i]`` of piece i, 0..n-1;
    ``keys[g]``: the smallest :func:`piece_key` of group g (non-decreasing), so merged
    components can be put in an order that does not depend on how the blocks finished."""

    pieces: Components
    group: NDArray[np.intp]
    n_groups: int
    keys: NDArray[np.int64]

    @classmethod
    def empty(cls) -> Groups:
        return cls(Components.concat([]), np.zeros(0, np.intp), 0, np.zeros(0, np.int64))

    @classmethod
    def concat(cls, parts: Sequence[Groups]) -> Groups:
        offsets = np.cumsum([0, *(p.n_groups for p in parts)])
        return cls(Components.concat([p.pieces for p in parts]),
                   np.concatenate([np.zeros(0, np.intp), *(p.group + o for p, o in zip(parts, offsets, strict=False))]),
                   int(offsets[-1]), np.concatenate([np.zeros(0, np.int64), *(p.keys for p in parts)]))  # fmt: skip

    def cost(self) -> int:
        """Vertices to union: what a merge task's time follows."""
        return int(shapely.get_num_coordinates(self.pieces.geometry).sum()) if len(self.pieces) else 0

    def split(self, k: int) -> list[Groups]:
        """At most ``k`` parts, each a run of whole groups with about the same number of
        vertices (the union's cost), group ids renumbered from 0; merged in order and
        concatenated they give :func:`merge_groups` of the whole."""
        if k <= 1 or self.n_groups <= 1:
            return [self]
        cost = np.bincount(self.group, weights=shapely.get_num_coordinates(self.pieces.geometry), minlength=self.n_groups)
        cum = np.cumsum(cost)
        cuts = np.unique(np.searchsorted(cum, cum[-1] * np.arange(1, k) / k, side="right"))
        edges = [0, *(int(c) for c in cuts if 0 < c < self.n_groups), self.n_groups]
        parts = []
        for g0, g1 in itertools.pairwise(edges):
            idx = np.flatnonzero((self.group >= g0) & (self.group < g1))
            parts.append(Groups(self.pieces.take(idx), self.group[idx] - g0, g1 - g0, self.keys[g0:g1]))
        return parts


def merge_groups(groups: Groups, transform: Transform, centerlines: bool = False) -> Components:
    """One canonical component (CRS coordinates) per group: the union of its pieces."""
    n_groups, group, pieces = groups.n_groups, groups.group, groups.pieces
    if n_groups == 0:
        return Components.concat([])
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    merged = np.empty(n_groups, dtype=object)
    dissolved = np.zeros(n_groups, dtype=bool)
    for g, members in enumerate(np.split(order, bounds)):
        parts = pieces.geometry[members]
        # Integer lattice coordinates: the union's nodes are existing vertices (exact).
        merged[g] = parts[0] if len(parts) == 1 else shapely.union_all(parts)
        dissolved[g] = len(parts) > 1
    merged[dissolved] = drop_collinear(merged[dissolved])  # the seams' vertices; pieces are valid
    moments = combine_moments(pieces.moments, group, n_groups)
    lines = _nones(n_groups)
    if centerlines:
        lines = shapely.normalize(pixel_to_world(np.array([polygon_centerline(g) for g in merged], dtype=object),
                                                 transform))  # fmt: skip
    return Components(canonical(merged, transform, checked=True), moments, lines)


def merge_pieces(results: Sequence[BlockPieces], blocks: Sequence[tuple[int, int, int, int]], connectivity: int,
                 transform: Transform, centerlines: bool = False) -> Components:  # fmt: skip
    """The components made of pieces (one or more), canonical, in CRS coordinates; the blocks'
    ``final`` components are not included. :func:`group_pieces` then :func:`merge_groups`
    (which the job runs in parallel on parts of the groups, :meth:`Groups.split`)."""
    return merge_groups(group_pieces(results, blocks, connectivity), transform, centerlines)


def polygonize(values: NDArray[np.number], threshold: float, connectivity: int, transform: Transform,
               block_shape: tuple[int, int] | None = None, centerlines: bool = False,
               nodata: float | None = None) -> Components:  # fmt: skip
    """Whole-raster convenience (tests, small rasters): blocks of ``block_shape`` then merge."""
    h, w = values.shape
    by, bx = block_shape or (h, w)
    blocks = [(y0, min(y0 + by, h), x0, min(x0 + bx, w)) for y0 in range(0, h, by) for x0 in range(0, w, bx)]
    results = [polygonize_block(values[y0:y1, x0:x1], threshold, connectivity, (y0, y1, x0, x1), (h, w), transform,
                                centerlines, nodata) for y0, y1, x0, x1 in blocks]  # fmt: skip
    merged = merge_pieces(results, blocks, connectivity, transform, centerlines)
    return Components.concat([*(r.final for r in results), merged])


# ------------------------------------------------------------------------------- finishing


@dataclass(frozen=True)
class Finish:
    """Post-processing of canonical components; the same for block tasks and the driver."""

    src_crs: str
    dst_crs: str
    simplify_tolerance: float = 0.0
    min_area: float = 0.0


@dataclass(frozen=True)
class Features:
    """Finished polygons (and centre lines, or None) in the output CRS, with moments and
    areas (m²)."""

    geometry: Geoms
    moments: Moments
    area_m2: NDArray[np.float64]
    centerline: Geoms

    def __len__(self) -> int:
        return len(self.geometry)

    def __reduce__(self) -> tuple[Any, ...]:
        return _unpack_features, (_pack(self.geometry), self.moments, self.area_m2, _pack(self.centerline))

    @classmethod
    def concat(cls, parts: Sequence[Features]) -> Features:
        area = np.concatenate([p.area_m2 for p in parts]) if parts else np.zeros(0)
        return cls(_cat([p.geometry for p in parts]), Moments.concat([p.moments for p in parts]), area,
                   _cat([p.centerline for p in parts]))  # fmt: skip


def _pack(geoms: Geoms) -> NDArray[np.object_]:
    """Geometries for pickling (to and from Ray tasks) as one vectorized WKB array: shapely
    pickles geometry by geometry, which cost the driver more than the merge. WKB keeps the
    float64 coordinates bit for bit."""
    return shapely.to_wkb(geoms) if len(geoms) else _nones(0)


def _unpack(wkb: NDArray[np.object_]) -> Geoms:
    return shapely.from_wkb(wkb) if len(wkb) else _nones(0)


def _unpack_components(wkb: NDArray[np.object_], moments: Moments, lines: NDArray[np.object_]) -> Components:
    return Components(_unpack(wkb), moments, _unpack(lines))


def _unpack_features(wkb: NDArray[np.object_], moments: Moments, area: NDArray[np.float64],
                     lines: NDArray[np.object_]) -> Features:  # fmt: skip
    return Features(_unpack(wkb), moments, area, _unpack(lines))


@dataclass(frozen=True)
class Rows:
    """Finished features as Arrow-ready columns: what block tasks send the driver instead of
    geometry objects, so the driver neither decodes nor re-encodes them (it concatenates,
    sorts and writes). ``wkb_array``: ISO WKB of the polygons, ``bbox``: their (n, 4)
    xmin, ymin, xmax, ymax (the GeoParquet covering column and the Hilbert sort key),
    ``type_id``: shapely geometry type ids (the GeoParquet ``geometry_types``);
    ``centerline_array``/``centerline_type_id`` the same for the centre lines (null / -1
    where absent).

    The WKB columns are Arrow ``large_binary`` chunked arrays, one contiguous buffer per
    block: the driver holds every polygon of the output until the file is written, and one
    Python ``bytes`` object per polygon cost it ~3× the WKB (object headers, allocator
    fragmentation, and a second copy when the column was joined for Arrow). ``concat``
    keeps the chunks (no copy); ``take`` copies only the rows it selects (:func:`take_rows`)."""

    wkb_array: Any
    bbox: NDArray[np.float64]
    type_id: NDArray[np.int8]
    moments: Moments
    area_m2: NDArray[np.float64]
    centerline_array: Any
    centerline_type_id: NDArray[np.int8]

    def __len__(self) -> int:
        return len(self.bbox)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled whole, buffers in band (as the service's ``BlockOutput``): Ray hands
        out-of-band buffers to the driver as views into its object store, so a merge task's
        rows would stay there, mapped into the driver, next to the driver's sorted copy."""
        fields = (self.wkb_array, self.bbox, self.type_id, self.moments, self.area_m2, self.centerline_array,
                  self.centerline_type_id)  # fmt: skip
        return _unpickle_rows, (pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL),)

    @property
    def wkb(self) -> NDArray[np.object_]:
        """The polygons' WKB as an object array of ``bytes`` (a copy, for small results)."""
        return _objects(self.wkb_array)

    @property
    def centerline(self) -> NDArray[np.object_]:
        """The centre lines' WKB as an object array (None where absent; a copy)."""
        return _objects(self.centerline_array)

    @classmethod
    def of(cls, f: Features) -> Rows:
        n = len(f)
        if n == 0:
            return cls.concat([])
        return cls(_chunked(binary_array(shapely.to_wkb(f.geometry, flavor="iso"))),
                   np.asarray(shapely.bounds(f.geometry), np.float64),
                   shapely.get_type_id(f.geometry).astype(np.int8), f.moments, f.area_m2,
                   _chunked(binary_array(shapely.to_wkb(f.centerline, flavor="iso"))),
                   shapely.get_type_id(f.centerline).astype(np.int8))  # fmt: skip

    def packed(self) -> Rows:
        """These rows with their WKB zstd-compressed (:class:`PackedChunks`): what the driver
        holds of every polygon until the file is written."""
        return Rows(PackedChunks.of(self.wkb_array), self.bbox, self.type_id, self.moments, self.area_m2,
                    PackedChunks.of(self.centerline_array), self.centerline_type_id)  # fmt: skip

    def take(self, idx: NDArray[np.intp]) -> Rows:
        return Rows(_chunked(take_rows(self.wkb_array, idx)), self.bbox[idx], self.type_id[idx],
                    self.moments.take(idx), self.area_m2[idx], _chunked(take_rows(self.centerline_array, idx)),
                    self.centerline_type_id[idx])  # fmt: skip

    @classmethod
    def concat(cls, parts: Sequence[Rows]) -> Rows:
        def cat(name: str, empty: NDArray[Any]) -> NDArray[Any]:
            arrays = [getattr(p, name) for p in parts]
            return np.concatenate(arrays) if arrays else empty

        def chunks(name: str) -> Any:
            arrays = [getattr(p, name) for p in parts]
            if any(isinstance(a, PackedChunks) for a in arrays):
                packed = (c if isinstance(c, Packed) else Packed.of(c) for a in arrays for c in a.chunks)
                return PackedChunks(tuple(packed))
            return pa.chunked_array([c for a in arrays for c in a.chunks], pa.large_binary())

        return cls(chunks("wkb_array"), cat("bbox", np.zeros((0, 4))), cat("type_id", np.zeros(0, np.int8)),
                   Moments.concat([p.moments for p in parts]), cat("area_m2", np.zeros(0)),
                   chunks("centerline_array"), cat("centerline_type_id", np.zeros(0, np.int8)))  # fmt: skip


def _unpickle_rows(data: bytes) -> Rows:
    return Rows(*pickle.loads(data))


def binary_array(values: NDArray[np.object_]) -> Any:
    """An Arrow ``large_binary`` array of ``values`` (an object array of ``bytes``) built from
    one buffer of the exact size: ``pa.array`` on the object array grows its buffer by doubling
    (2.7× the column at its peak). Missing values (None) take ``pa.array``'s way."""
    try:
        data = b"".join(values)
    except TypeError:  # None among the values: pa.array gives them a validity bitmap
        return pa.array(values, pa.large_binary())
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, values), np.int64, len(values)), out=offsets[1:])
    return pa.Array.from_buffers(pa.large_binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def take_rows(values: Any, idx: NDArray[np.intp]) -> Any:
    """``values[idx]`` of a chunked array as one array, copying only the selected rows:
    ``ChunkedArray.take`` concatenates all chunks first (pyarrow 26), a full copy of the
    column for every row group gathered from it. Rows are taken chunk by chunk, then put
    back in ``idx``'s order."""
    idx = np.asarray(idx, np.int64)
    lengths = np.array([len(c) for c in values.chunks], np.int64)
    starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    chunk = np.searchsorted(starts, idx, side="right") - 1
    by_chunk = np.argsort(chunk, kind="stable")
    cuts = np.searchsorted(chunk[by_chunk], np.arange(len(lengths) + 1))
    pieces = [values.chunk(c).take(pa.array(idx[by_chunk[a:b]] - starts[c]))
              for c, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)) if b > a]  # fmt: skip
    grouped = pa.concat_arrays(pieces) if pieces else pa.array([], values.type)
    inverse = np.empty_like(by_chunk)
    inverse[by_chunk] = np.arange(len(by_chunk))
    return grouped.take(pa.array(inverse))


@dataclass(frozen=True)
class Packed:
    """One Arrow array with every buffer zstd-compressed. Polygon WKB on a pixel grid
    compresses ~7× (float64 coordinates with few significant bits) in ~1 ms per block."""

    type: Any
    length: int
    null_count: int
    offset: int
    buffers: tuple[tuple[bytes, int] | None, ...]

    def __len__(self) -> int:
        return self.length

    @classmethod
    def of(cls, array: Any) -> Packed:
        buffers = tuple(None if b is None else (pa.compress(b, codec=PACK_CODEC, asbytes=True), b.size)
                        for b in array.buffers())  # fmt: skip
        return cls(array.type, len(array), array.null_count, array.offset, buffers)

    def array(self) -> Any:
        buffers = [None if b is None else pa.decompress(b[0], decompressed_size=b[1], codec=PACK_CODEC)
                   for b in self.buffers]  # fmt: skip
        return pa.Array.from_buffers(self.type, self.length, buffers, self.null_count, self.offset)


PACK_CODEC: Final = "zstd"


@dataclass(frozen=True)
class PackedChunks:
    """A chunked binary column of :class:`Packed` chunks, read as ``pyarrow.ChunkedArray``
    is by :func:`take_rows` (``chunks``, ``chunk(i)`` decompressed, ``type``)."""

    chunks: tuple[Packed, ...]

    @classmethod
    def of(cls, values: Any) -> PackedChunks:
        if isinstance(values, PackedChunks):
            return values
        return cls(tuple(Packed.of(c) for c in values.chunks))

    @property
    def type(self) -> Any:
        return pa.large_binary()

    def __len__(self) -> int:
        return sum(len(c) for c in self.chunks)

    def chunk(self, i: int) -> Any:
        return self.chunks[i].array()

    def to_pylist(self) -> list[bytes | None]:
        return [v for c in self.chunks for v in c.array().to_pylist()]


def _chunked(array: Any) -> Any:
    return pa.chunked_array([array], pa.large_binary())


def _objects(values: Any) -> NDArray[np.object_]:
    out = np.empty(len(values), dtype=object)
    out[:] = values.to_pylist()
    return out


def finish(c: Components, f: Finish) -> Features:
    """Simplify (in the grid's CRS), measure area in m² (of the output shape), drop polygons
    under ``min_area``, reproject to the output CRS.

    The simplification is topology-preserving *across* polygons (:func:`simplify`), so it
    must see every polygon of one band and time step in one call."""
    return finish_kept(c, f)[1]


def finish_kept(c: Components, f: Finish) -> tuple[NDArray[np.intp], Features]:
    """:func:`finish`, with the indices of the components that stayed (``min_area``)."""
    geoms = simplify(c.geometry, f.simplify_tolerance)
    area = area_m2(geoms, f.src_crs) if len(geoms) else np.zeros(0)
    keep = np.flatnonzero(area >= f.min_area) if f.min_area > 0 else np.arange(len(geoms))
    return keep, Features(reproject(geoms[keep], f.src_crs, f.dst_crs), c.moments.take(keep), area[keep],
                          reproject(c.centerline[keep], f.src_crs, f.dst_crs))  # fmt: skip


@lru_cache(maxsize=16)
def _crs(crs: str) -> Any:
    from pyproj import CRS

    return CRS.from_user_input(crs)


@lru_cache(maxsize=16)
def _transformer(src: str, dst: str) -> Any:
    """None when the CRSs are the same; pyproj objects are slow to build, so cached."""
    from pyproj import Transformer

    return None if _crs(src) == _crs(dst) else Transformer.from_crs(_crs(src), _crs(dst), always_xy=True)


def area_m2(geoms: Geoms, crs: str) -> NDArray[np.float64]:
    """Areas in m²: planar in a projected CRS (scaled by its linear unit), geodesic on the
    ellipsoid (pyproj.Geod) when the CRS is geographic — not planar degrees."""
    c = _crs(crs)
    if c.is_geographic:
        geod = c.get_geod()
        assert geod is not None
        return np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in geoms], dtype=np.float64)
    unit = c.axis_info[0].unit_conversion_factor if c.axis_info else 1.0
    return np.asarray(shapely.area(geoms), dtype=np.float64) * unit * unit


def reproject(geoms: Geoms, src: str, dst: str) -> Geoms:
    """Vertex-wise reprojection (pixel-edge polygons have no long edges to densify)."""
    t = _transformer(src, dst)
    if t is None:
        return geoms
    return shapely.transform(geoms, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def simplify(geoms: Geoms, tolerance: float) -> Geoms:
    """Topology-preserving simplification of a set of polygons: GEOS's coverage simplifier
    (``shapely.coverage_simplify``, Visvalingam–Whyatt with ``tolerance`` ≈ the square root
    of the triangle areas removed), which moves no edge across any other edge of the set — so
    rings never collapse or cross, neighbours that touched at a corner still touch there and
    never overlap, and islands stay inside their holes. (Per-polygon Douglas–Peucker, which
    this replaced, keeps each polygon valid but not its neighbours apart: on rough 4-connected
    fields tolerances of 1–4 pixels made 3–66 overlapping pairs out of 400 touching ones.)
    Then valid again (a no-op check in practice)."""
    if tolerance <= 0 or not len(geoms):
        return geoms
    return make_valid(shapely.coverage_simplify(np.asarray(geoms, dtype=object), tolerance))
