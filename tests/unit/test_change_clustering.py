"""clusterTransition numerics: clustering, Hungarian alignment, assignment, transitions."""

from __future__ import annotations

import numpy as np
import pytest

from rasterkube.change import clustering

CENTRES = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])


def blobs(n_per: int, seed: int, centres: np.ndarray = CENTRES, spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), n_per)
    return centres[labels] + rng.normal(scale=spread, size=(len(labels), centres.shape[1])), labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a relabelling."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("method", ["kmeans", "spectral"])
def test_fit_recovers_separated_clusters(method: str) -> None:
    points, truth = blobs(60, seed=1)
    centres = clustering.fit_centroids(points, 4, method, seed=3)
    got = np.sqrt(((points[:, None] - centres[None]) ** 2).sum(-1)).argmin(1)
    assert same_partition(got, truth)
    # each fitted centre sits on one true centre
    assert np.allclose(np.sort(centres, axis=0), np.sort(CENTRES, axis=0), atol=0.5)


def test_fit_is_deterministic() -> None:
    points, _ = blobs(50, seed=2)
    np.testing.assert_array_equal(clustering.fit_centroids(points, 4, "kmeans", 7), clustering.fit_centroids(points, 4, "kmeans", 7))


def test_alignment_recovers_a_known_permutation() -> None:
    rng = np.random.default_rng(5)
    perms = [np.arange(4), np.array([2, 0, 3, 1]), np.array([3, 2, 1, 0])]
    # each step: the same classes, shifted a little (a drift) and listed in a different order
    steps = np.stack([CENTRES[p] + rng.normal(scale=0.3, size=CENTRES.shape) for p in perms])
    aligned, order = clustering.align(steps)
    for t, p in enumerate(perms):
        # aligned class i of step t is original cluster order[t, i], which holds true class p[order[t, i]]
        np.testing.assert_array_equal(p[order[t]], perms[0])
    np.testing.assert_allclose(aligned, np.stack([CENTRES] * 3), atol=1.5)


def test_fit_model_aligns_relabelled_steps_and_marks_transitions() -> None:
    """Three steps of the same scene (k-means labels arbitrary per step); at the last, pixels move class."""
    points, truth = blobs(80, seed=8)
    x = np.stack([points.T, points.T, points.T]).astype(np.float32)  # (T, B, N)
    moved = (truth == 0) & (np.arange(truth.size) % 2 == 0)  # half of class 0 (class 0 stays)
    x[2, :, moved] = CENTRES[3] + np.random.default_rng(1).normal(scale=0.5, size=(moved.sum(), 2))
    samples = [clustering.raw_features(x[t : t + 1], "euclidean")[0][0] for t in range(3)]
    model = clustering.fit_model(samples, "euclidean", k=4, method="kmeans", seed=0)
    bands = clustering.cluster_bands(x, model)
    labels, trans = bands[:, 0], bands[:, 1]
    np.testing.assert_array_equal(labels[0], labels[1])  # same data → same aligned labels
    assert np.isnan(trans[0]).all()
    assert (trans[1] == 0).all()
    np.testing.assert_array_equal(trans[2], moved.astype(np.float32))
    assert (labels[2][moved] == labels[0][truth == 3][0]).all()  # they joined class 3's aligned label


def test_transitions_nan_rules() -> None:
    labels = np.array([[0, 1, np.nan], [0, 2, 1], [1, 2, 1]], dtype=np.float32)
    got = clustering.transitions(labels)
    np.testing.assert_array_equal(got, np.array([[np.nan] * 3, [0, 1, np.nan], [1, 0, 0]], dtype=np.float32))


def test_invalid_pixels_and_cosine_features() -> None:
    x = np.array([[[1.0, np.nan, 0.0, 2.0], [1.0, 1.0, 0.0, 2.0]]], dtype=np.float32)  # (1, 2, 4)
    feats, valid = clustering.raw_features(x, "cosine")
    np.testing.assert_array_equal(valid, [[True, False, False, True]])  # NaN band; zero vector
    np.testing.assert_allclose(feats[0, 0], feats[0, 3])  # same direction → same feature


def test_too_few_samples() -> None:
    with pytest.raises(ValueError, match="fewer than k=5"):
        clustering.fit_model([np.zeros((3, 2))], "euclidean", k=5, method="kmeans")
