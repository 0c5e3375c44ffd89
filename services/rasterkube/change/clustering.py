"""The ``clusterTransition`` change method: pure numerics (no I/O).

Workflow (the spectral-clustering land-cover change recipe, made automatic):

1. **Features.** Each pixel's band vector at a time step, as float64. ``euclidean``: bands
   are standardized with one mean/scale pooled over all time steps (so a class keeps its
   place in feature space across years); ``cosine``/``alphaEarthCosine``: vectors are scaled
   to unit length (int8 AlphaEarth codes are de-quantized first), so Euclidean k-means on
   them clusters by angle. A step is invalid where any band is missing (or the vector is 0
   for the cosines).
2. **Fit** per time step on a sample of valid pixels from the whole AOI (the caller draws it,
   before any block is processed, so every block uses the same clusters): ``kmeans`` —
   k-means++ seeding and Lloyd iterations, best of a few seeded restarts; ``spectral`` —
   Ng–Jordan–Weiss spectral clustering of a (smaller) sample: RBF affinity with the median
   pairwise distance as bandwidth, the top-k eigenvectors of the normalized affinity,
   row-normalized, clustered by k-means; each cluster is then represented by the mean of its
   members in *feature* space, so all pixels can be assigned by nearest mean.
3. **Align** labels across time: each step's centroids are matched to step 0's by the
   Hungarian algorithm (``scipy.optimize.linear_sum_assignment`` on centroid distances) and
   reordered, so aligned label ``i`` means "the class nearest step 0's cluster ``i``" at every
   step. Matching every step to the same reference (rather than chain-wise to the previous
   step) keeps one poor year from shifting the labels of all later years.
4. **Assign** every pixel to its nearest aligned centroid (blockwise), and mark a
   **transition** where the aligned label differs from the previous step's.

Outputs (T, N) float32: the label (NaN where invalid) and the transition (1 changed, 0 same;
NaN at ``t = 0`` — as ``difference`` — and where either step is invalid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy.linalg import eigh
from scipy.optimize import linear_sum_assignment

from rasterkube.change import scores

KMEANS: Final = "kmeans"
SPECTRAL: Final = "spectral"
CLUSTER_METHODS: Final = (KMEANS, SPECTRAL)

LABEL_BAND: Final = "cluster_transition_label"
TRANSITION_BAND: Final = "cluster_transition"
BANDS: Final = (LABEL_BAND, TRANSITION_BAND)

#: Restarts of k-means from different k-means++ seeds; the lowest inertia wins.
KMEANS_RESTARTS: Final = 4
KMEANS_MAX_ITER: Final = 100
#: Spectral clustering builds an n×n affinity: keep its sample small (n² float64 = 8 MiB at 1000).
SPECTRAL_MAX_SAMPLES: Final = 1000
#: Pixels per chunk when assigning: bounds the (chunk, k) distance matrix.
ASSIGN_CHUNK: Final = 65_536
#: Elements of one (points, k, B) difference temporary (8 MiB of float64), for any k and B.
_MAX_DIFF_ELEMENTS: Final = 1 << 20

_Float = npt.NDArray[np.float64]


@dataclass(frozen=True)
class FeatureSpace:
    """How band vectors become clustering features (fitted once, used by every block)."""

    metric: str
    mean: tuple[float, ...] | None = None  # euclidean only: pooled per-band mean
    scale: tuple[float, ...] | None = None  # and standard deviation (1 where constant)


@dataclass(frozen=True)
class ClusterModel:
    """Aligned centroids (T, k, B) in feature space: row ``i`` of every step is class ``i``."""

    space: FeatureSpace
    centroids: tuple[tuple[tuple[float, ...], ...], ...]

    def array(self) -> _Float:
        return np.asarray(self.centroids, dtype=np.float64)


# ------------------------------------------------------------------------------- features


def raw_features(x: npt.ArrayLike, metric: str) -> tuple[_Float, npt.NDArray[np.bool_]]:
    """(T, B, N) → features (T, N, B) float64 and validity (T, N), before standardization."""
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"x must have shape (T, B, N); got {arr.shape}")
    if arr.dtype == np.int8:
        values = scores.dequantize_alpha_earth(arr).astype(np.float64)
    else:
        values = arr.astype(np.float64)
    feats = np.moveaxis(values, 1, 2)  # (T, N, B)
    valid = np.isfinite(feats).all(axis=-1)
    if metric != scores.METRIC_EUCLIDEAN:
        norms = np.sqrt(np.einsum("tnb,tnb->tn", np.where(valid[..., None], feats, 0), np.where(valid[..., None], feats, 0)))
        valid &= norms > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            feats = feats / norms[..., None]
    return feats, valid


def fit_space(samples: list[_Float], metric: str) -> FeatureSpace:
    """The feature space for ``metric`` from raw samples (one (n, B) array per time step)."""
    if metric != scores.METRIC_EUCLIDEAN:
        return FeatureSpace(metric)
    pooled = np.concatenate(samples)
    mean = pooled.mean(axis=0)
    std = pooled.std(axis=0)
    std[std == 0] = 1.0  # a constant band carries no information: leave it centred, unscaled
    return FeatureSpace(metric, tuple(map(float, mean)), tuple(map(float, std)))


def transform(feats: _Float, space: FeatureSpace) -> _Float:
    """Apply the fitted standardization (a no-op for the cosine metrics)."""
    if space.mean is None or space.scale is None:
        return feats
    return (feats - np.asarray(space.mean)) / np.asarray(space.scale)


# --------------------------------------------------------------------------------- fitting


def _sq_distances(points: _Float, centres: _Float) -> _Float:
    """(n, k) squared Euclidean distances from direct differences (no Gram cancellation),
    in row chunks so the (rows, k, B) temporary stays bounded (embeddings have B = 64)."""
    n, k, b = len(points), len(centres), points.shape[1]
    step = max(1, _MAX_DIFF_ELEMENTS // max(1, k * b))
    out = np.empty((n, k))
    for start in range(0, n, step):
        diff = points[start : start + step, None, :] - centres[None, :, :]
        out[start : start + step] = np.einsum("nkb,nkb->nk", diff, diff)
    return out


def _kmeans_pp(points: _Float, k: int, rng: np.random.Generator) -> _Float:
    centres = [points[rng.integers(len(points))]]
    closest = _sq_distances(points, centres[0][None])[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        pick = rng.integers(len(points)) if total <= 0 else rng.choice(len(points), p=closest / total)
        centres.append(points[pick])
        closest = np.minimum(closest, _sq_distances(points, points[pick][None])[:, 0])
    return np.array(centres)


def _lloyd(points: _Float, centres: _Float) -> tuple[_Float, npt.NDArray[np.intp], float]:
    k = len(centres)
    labels = np.zeros(len(points), dtype=np.intp)
    for iteration in range(KMEANS_MAX_ITER):
        dist = _sq_distances(points, centres)
        new = dist.argmin(axis=1)
        if iteration and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = points[labels == j]
            if len(members):
                centres[j] = members.mean(axis=0)
            else:  # an empty cluster takes the point worst served by the others
                far = dist[np.arange(len(points)), labels].argmax()
                centres[j] = points[far]
                labels[far] = j
    inertia = float(_sq_distances(points, centres)[np.arange(len(points)), labels].sum())
    return centres, labels, inertia


def kmeans(points: npt.ArrayLike, k: int, seed: int = 0) -> tuple[_Float, npt.NDArray[np.intp]]:
    """k-means of (n, B) points: centroids (k, B) and labels (n,), deterministic for ``seed``."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < k:
        raise ValueError(f"k-means needs at least k={k} points, got {len(pts)}")
    rng = np.random.default_rng(seed)
    best: tuple[_Float, npt.NDArray[np.intp], float] | None = None
    for _ in range(KMEANS_RESTARTS):
        run = _lloyd(pts, _kmeans_pp(pts, k, rng))
        if best is None or run[2] < best[2]:
            best = run
    assert best is not None
    return best[0], best[1]


def spectral_embedding(points: npt.ArrayLike, k: int) -> _Float:
    """Ng–Jordan–Weiss embedding (n, k): top-k eigenvectors of D^-½ W D^-½, rows normalized.

    W is an RBF affinity ``exp(-d² / (2σ²))`` with σ the median pairwise distance (a scale-free
    default: no per-dataset tuning); the diagonal is 0 as in the original algorithm.
    """
    pts = np.asarray(points, dtype=np.float64)
    sq = _sq_distances(pts, pts)
    positive = sq[sq > 0]
    sigma2 = float(np.median(positive)) if positive.size else 1.0
    affinity = np.exp(-sq / (2.0 * sigma2))
    np.fill_diagonal(affinity, 0.0)
    degree = affinity.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, np.finfo(np.float64).tiny))
    normalized = affinity * inv_sqrt[:, None] * inv_sqrt[None, :]
    n = len(pts)
    _, vectors = eigh(normalized, subset_by_index=[n - k, n - 1])  # the k largest eigenvalues
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float64).tiny)


def fit_centroids(points: npt.ArrayLike, k: int, method: str, seed: int = 0) -> _Float:
    """(k, B) cluster centres in feature space for one time step's sample."""
    pts = np.asarray(points, dtype=np.float64)
    if method == KMEANS:
        return kmeans(pts, k, seed)[0]
    if method != SPECTRAL:
        raise ValueError(f"unknown clustering method {method!r}; allowed: {', '.join(CLUSTER_METHODS)}")
    if len(pts) > SPECTRAL_MAX_SAMPLES:
        pts = pts[np.random.default_rng(seed).choice(len(pts), SPECTRAL_MAX_SAMPLES, replace=False)]
    _, labels = kmeans(spectral_embedding(pts, k), k, seed)
    centres = np.empty((k, pts.shape[1]))
    for j in range(k):
        members = pts[labels == j]
        # _lloyd never leaves a cluster empty, but guard: fall back to the overall mean.
        centres[j] = members.mean(axis=0) if len(members) else pts.mean(axis=0)
    return centres


def align(centroids: npt.ArrayLike, reference: int = 0) -> tuple[_Float, npt.NDArray[np.intp]]:
    """Reorder each step's centroids (T, k, B) to match ``reference``'s by the Hungarian algorithm.

    Returns the aligned centroids and ``order`` (T, k): aligned class ``i`` of step ``t`` is
    original cluster ``order[t, i]``. The matching minimizes the summed Euclidean distance
    between matched centroids."""
    cents = np.asarray(centroids, dtype=np.float64)
    order = np.empty(cents.shape[:2], dtype=np.intp)
    for t in range(cents.shape[0]):
        cost = np.sqrt(_sq_distances(cents[reference], cents[t]))
        rows, cols = linear_sum_assignment(cost)
        order[t, rows] = cols
    aligned = np.take_along_axis(cents, order[:, :, None], axis=1)
    return aligned, order


# ------------------------------------------------------------------------ assign and score


def assign(feats: _Float, valid: npt.NDArray[np.bool_], centroids: _Float) -> npt.NDArray[np.float32]:
    """Nearest-centroid labels (T, N) float32 (NaN where invalid) for features (T, N, B)."""
    n_time, n_pixel, _ = feats.shape
    labels = np.full((n_time, n_pixel), np.nan, dtype=np.float32)
    for t in range(n_time):
        for start in range(0, n_pixel, ASSIGN_CHUNK):
            part = slice(start, min(start + ASSIGN_CHUNK, n_pixel))
            ok = valid[t, part]
            if ok.any():
                nearest = _sq_distances(feats[t, part][ok], centroids[t]).argmin(axis=1)
                labels[t, part][ok] = nearest
    return labels


def transitions(labels: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """(T, N): 1 where the aligned label changed since the previous step, 0 where not; NaN at
    ``t = 0`` and where either step is invalid (NaN label)."""
    lab = np.asarray(labels, dtype=np.float32)
    out = np.full(lab.shape, np.nan, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        changed = (lab[1:] != lab[:-1]).astype(np.float32)
    changed[np.isnan(lab[1:]) | np.isnan(lab[:-1])] = np.nan
    out[1:] = changed
    return out


def cluster_bands(x: npt.ArrayLike, model: ClusterModel) -> npt.NDArray[np.float32]:
    """(T, B, N) → (T, 2, N) float32: the aligned label and the transition (see :data:`BANDS`)."""
    feats, valid = raw_features(x, model.space.metric)
    labels = assign(transform(feats, model.space), valid, model.array())
    return np.stack([labels, transitions(labels)], axis=1)


def fit_model(samples: list[npt.ArrayLike], metric: str, k: int, method: str, seed: int = 0) -> ClusterModel:
    """Fit the feature space and aligned centroids from per-step samples.

    ``samples[t]`` is (n_t, B): :func:`raw_features` of valid pixels of step ``t`` only."""
    raw = [np.asarray(s, dtype=np.float64) for s in samples]
    for t, s in enumerate(raw):
        if len(s) < k:
            raise ValueError(f"time step {t} has {len(s)} valid sampled pixels, fewer than k={k}")
    space = fit_space(raw, metric)
    fitted = np.stack([fit_centroids(transform(s, space), k, method, seed + t) for t, s in enumerate(raw)])
    aligned, _ = align(fitted)
    return ClusterModel(space, tuple(tuple(tuple(map(float, c)) for c in step) for step in aligned))
