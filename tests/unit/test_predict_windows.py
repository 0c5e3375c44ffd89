"""Windowing numerics of patch-based inference, checked against a fully-convolutional model."""

from __future__ import annotations

import numpy as np
import pytest
from rasterkube.grid import Window
from rasterkube.predict.windows import (
    blend_window,
    cut_patches,
    fill_invalid,
    halo_block,
    merge_clip,
    merge_weighted,
    pad_for_patches,
    pad_halo,
    patch_origins,
    stack_time_major,
    time_major_labels,
    unstack_time_major,
    valid_pixels,
    with_nodata,
)
from rasterkube.runtime.blocks import plan_blocks
from scipy import ndimage

BANDS_IN, BANDS_OUT = 3, 2
RADIUS = 2  # receptive-field radius of the 5x5 model below
KERNEL = np.random.default_rng(7).normal(size=(BANDS_OUT, BANDS_IN, 5, 5))


def conv_model(x: np.ndarray) -> np.ndarray:
    """A fully-convolutional 'model': (C, H, W) → (K, H, W), zero padding at its own borders
    (like a conv net), so a patch's border pixels differ from whole-image application."""
    out = np.stack(
        [
            sum(ndimage.correlate(x[c], KERNEL[k, c], mode="constant") for c in range(x.shape[0]))
            for k in range(BANDS_OUT)
        ]
    )
    return np.tanh(out)


def batch(model, patches: np.ndarray) -> np.ndarray:
    return np.stack([model(p) for p in patches])


def whole_image(model, image: np.ndarray, clip: int) -> np.ndarray:
    """Reference: the model applied once to the whole padded image, padding margin removed."""
    padded = np.pad(image, [(0, 0), (clip, clip), (clip, clip)], mode="reflect")
    return model(padded)[:, clip:-clip, clip:-clip]


def clip_infer(model, image: np.ndarray, patch: int, clip: int) -> np.ndarray:
    _, h, w = image.shape
    origins = patch_origins(h, w, patch, clip)
    padded = pad_for_patches(image, clip, patch_size=patch)
    preds = batch(model, cut_patches(padded, origins, patch))
    return merge_clip(preds, origins, (BANDS_OUT, h, w), clip)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(BANDS_IN, h, w))


# --------------------------------------------------------------------------- origins


@pytest.mark.parametrize(
    ("h", "w", "patch", "clip"), [(37, 53, 16, 2), (29, 41, 21, 4), (5, 64, 12, 3)]
)
def test_origins_centres_tile_the_image_and_stay_inside(
    h: int, w: int, patch: int, clip: int
) -> None:
    origins = patch_origins(h, w, patch, clip)
    stride = patch - 2 * clip
    hits = np.zeros((h, w), dtype=int)
    for y, x in origins:
        assert 0 <= y and 0 <= x
        if h >= stride:
            assert y + patch <= h + 2 * clip  # no patch past the padded image
        if w >= stride:
            assert x + patch <= w + 2 * clip
        hits[y : y + stride, x : x + stride] += 1
    assert (hits >= 1).all()
    # Only the shifted last row/column overlaps: strictly fewer patches than one extra per axis.
    assert len(origins) == -(-h // stride) * -(-w // stride)
    assert max(y for y, _ in origins) == max(h - stride, 0)


# --------------------------------------------------------------------------- (1) clip merge


@pytest.mark.parametrize(("h", "w"), [(37, 53), (29, 41), (11, 13)])
@pytest.mark.parametrize(("patch", "clip"), [(16, 2), (21, 4), (12, 5), (9, 3)])
def test_clip_merge_equals_whole_image(h: int, w: int, patch: int, clip: int) -> None:
    img = image(h, w)
    got = clip_infer(conv_model, img, patch, clip)
    np.testing.assert_array_equal(got, whole_image(conv_model, img, clip))


def test_clip_merge_exact_where_reflect_falls_back_to_edge() -> None:
    img = image(3, 40)
    clip, patch = 4, 16
    padded = np.pad(img, [(0, 0), (clip, clip), (0, 0)], mode="edge")
    padded = np.pad(padded, [(0, 0), (0, 0), (clip, clip)], mode="reflect")
    expected = conv_model(padded)[:, clip:-clip, clip:-clip]
    np.testing.assert_array_equal(clip_infer(conv_model, img, patch, clip), expected)


def test_clip_without_context_would_differ() -> None:
    # The same pipeline with too small a clip (< model radius) is NOT exact: the test can fail.
    img = image(37, 53)
    clip = RADIUS - 1
    got = clip_infer(conv_model, img, 16, clip)
    assert not np.allclose(got, whole_image(conv_model, img, clip), atol=1e-6)


# --------------------------------------------------------------------------- (2) blocks


def blockwise(
    model, img: np.ndarray, chunk: tuple[int, int], mult: int, patch: int, clip: int
) -> np.ndarray:
    _, h, w = img.shape
    out = np.full((BANDS_OUT, h, w), np.nan)
    for block in plan_blocks((h, w), chunk, mult):
        halo = halo_block(block, clip, (h, w))
        padded = pad_halo(img[(slice(None), *halo.read.slices)], halo, patch_size=patch)
        bh, bw = block.shape
        origins = patch_origins(bh, bw, patch, clip)
        preds = batch(model, cut_patches(padded, origins, patch))
        out[(slice(None), *block.slices)] = merge_clip(preds, origins, (BANDS_OUT, bh, bw), clip)
    return out


@pytest.mark.parametrize(
    ("h", "w", "chunk", "mult", "patch", "clip"),
    [
        (37, 53, (3, 5), 3, 16, 2),  # 9x15 blocks, last ones 1 row / 8 columns
        (41, 29, (7, 5), 1, 12, 3),  # blocks smaller than a patch
        (23, 31, (5, 3), 2, 21, 4),  # halo partly cut at the image edge (block 1 < clip)
        (4, 40, (1, 9), 1, 16, 4),  # image no taller than clip: edge fallback on y
    ],
)
def test_blockwise_with_halo_equals_whole_image(
    h: int, w: int, chunk: tuple[int, int], mult: int, patch: int, clip: int
) -> None:
    img = image(h, w, seed=1)
    expected = clip_infer(conv_model, img, patch, clip)  # == whole image, test (1)
    np.testing.assert_array_equal(blockwise(conv_model, img, chunk, mult, patch, clip), expected)


def test_halo_block_geometry() -> None:
    halo = halo_block(Window(1, 10, 20, 27), 3, (12, 27))
    assert halo.read == Window(0, 12, 17, 27)
    assert halo.pad == ((2, 1), (0, 3))
    assert halo.block_in_read == Window(1, 10, 3, 10)
    assert halo.padded_shape == (9 + 6, 7 + 6)


def test_block_padded_without_halo_would_differ() -> None:
    # Reflect-padding the bare block instead of reading a halo changes its edge predictions.
    img = image(37, 53, seed=1)
    block = Window(9, 18, 15, 30)
    clip, patch = 2, 16
    bare = pad_for_patches(img[(slice(None), *block.slices)], clip, patch_size=patch)
    origins = patch_origins(*block.shape, patch, clip)
    got = merge_clip(
        batch(conv_model, cut_patches(bare, origins, patch)),
        origins,
        (BANDS_OUT, *block.shape),
        clip,
    )
    expected = clip_infer(conv_model, img, patch, clip)[(slice(None), *block.slices)]
    assert not np.allclose(got, expected)


# --------------------------------------------------------------------------- (3) weighted


def weighted_infer(model, img: np.ndarray, patch: int, clip: int, k: int = BANDS_OUT) -> np.ndarray:
    _, h, w = img.shape
    origins = patch_origins(h, w, patch, clip)
    padded = pad_for_patches(img, clip, patch_size=patch)
    preds = batch(model, cut_patches(padded, origins, patch))
    return merge_weighted(preds, origins, (k, h, w), patch, clip)


@pytest.mark.parametrize(
    ("h", "w", "patch", "clip"), [(37, 53, 16, 2), (29, 41, 21, 4), (5, 7, 16, 3)]
)
def test_weighted_average_keeps_a_constant_constant(h: int, w: int, patch: int, clip: int) -> None:
    origins = patch_origins(h, w, patch, clip)
    preds = np.full((len(origins), 2, patch, patch), 0.7, dtype=np.float32)
    out = merge_weighted(preds, origins, (2, h, w), patch, clip)
    assert out.dtype == np.float32 and out.shape == (2, h, w)
    assert (out == np.float32(0.7)).all()  # borders and seams included, exactly


def test_blend_window_is_smooth_positive_and_a_partition_of_unity() -> None:
    patch, clip = 16, 3
    win = blend_window(patch, clip)
    assert win.shape == (patch, patch) and (win > 0).all() and win.max() == 1.0
    np.testing.assert_allclose(win, win.T)
    row = win[patch // 2]
    stride = patch - 2 * clip
    # Neighbours at the nominal stride: fall + rise == 1 across the overlap.
    np.testing.assert_allclose(row[stride:] + row[: patch - stride], 1.0)
    assert (np.diff(row[: 2 * clip]) > 0).all()


def smooth_model(x: np.ndarray) -> np.ndarray:
    # Radius-3 box blur with zero padding: patch borders come out dark, a visible seam if kept.
    return ndimage.uniform_filter(x[:1], size=(1, 7, 7), mode="constant")


def seam_ratio(out: np.ndarray, patch: int, clip: int) -> float:
    """Max |step| between horizontally adjacent pixels across patch edges / elsewhere."""
    step = np.abs(np.diff(out[0], axis=1))  # step[:, j] is between columns j and j + 1
    _, _, w = out.shape
    edges = set()
    for _, x in patch_origins(out.shape[1], w, patch, clip):
        # Patch columns [x - clip, x - clip + patch) in image coordinates; its edges:
        edges.update({x - clip - 1, x - clip + patch - 1})
    edges = sorted(e for e in edges if 0 <= e < w - 1)
    inside = np.ones(w - 1, dtype=bool)
    inside[edges] = False
    return float(step[:, edges].max() / step[:, inside].max())


def test_weighted_average_has_no_seams() -> None:
    patch, clip = 24, 3
    yy, xx = np.mgrid[0:40, 0:70]
    field = (1.0 + 0.01 * xx + 0.005 * yy)[None]  # smooth, slowly varying
    out = weighted_infer(smooth_model, field, patch, clip, k=1)
    assert seam_ratio(out, patch, clip) <= 1.0
    # The seam detector does detect seams: plain overwrite of whole patches shows them.
    _, h, w = field.shape
    origins = patch_origins(h, w, patch, clip)
    preds = batch(smooth_model, cut_patches(pad_for_patches(field, clip), origins, patch))
    naive = np.zeros((1, h + 2 * clip, w + 2 * clip))
    for p, (y, x) in zip(preds, origins):
        naive[:, y : y + patch, x : x + patch] = p
    assert seam_ratio(naive[:, clip:-clip, clip:-clip], patch, clip) > 1.5


# --------------------------------------------------------------------------- (4) time stacking


def test_time_major_stacking_order_and_labels() -> None:
    t, c = 3, 4
    x = (10 * np.arange(t)[:, None] + np.arange(c)[None, :]).astype(float)[
        :, :, None, None
    ] * np.ones((1, 1, 2, 3))
    stacked = stack_time_major(x)
    assert stacked.shape == (t * c, 2, 3)
    np.testing.assert_array_equal(stacked[:, 0, 0], [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23])
    np.testing.assert_array_equal(unstack_time_major(stacked, t), x)
    labels = time_major_labels(["2023", "2024"], ["s2:B04", "s2:B08"])
    assert labels == ["s2:B04@2023", "s2:B08@2023", "s2:B04@2024", "s2:B08@2024"]
    with pytest.raises(ValueError, match="time, band"):
        stack_time_major(x[0])


# --------------------------------------------------------------------------- (5) nodata


def test_nodata_propagates_only_to_invalid_pixels() -> None:
    x = np.random.default_rng(3).normal(size=(2, BANDS_IN, 30, 35))  # (T, C, H, W)
    x[1, 2, 4, 5] = np.nan  # one band at one time
    x[0, 0, 20, 30] = np.inf
    valid = valid_pixels(x)
    assert valid.shape == (30, 35) and (~valid).sum() == 2 and not valid[4, 5] and not valid[20, 30]
    img = fill_invalid(stack_time_major(x))[:BANDS_IN]
    assert np.isfinite(img).all()
    out = with_nodata(clip_infer(conv_model, img, 16, 2), valid)
    assert np.isnan(out[:, 4, 5]).all() and np.isnan(out[:, 20, 30]).all()
    assert np.isfinite(out).sum() == out.size - 2 * BANDS_OUT
    ints = with_nodata(np.ones((1, 30, 35), dtype=np.uint8), valid)
    assert ints.dtype == np.float32 and np.isnan(ints[0, 4, 5])


# --------------------------------------------------------------------------- (6) validation


def test_validation_errors_name_the_fields() -> None:
    with pytest.raises(ValueError, match="clipSize.*patchSize"):
        patch_origins(10, 10, 8, 4)
    with pytest.raises(ValueError, match="clipSize"):
        patch_origins(10, 10, 8, -1)
    with pytest.raises(ValueError, match="patchSize"):
        blend_window(0, 0)
    with pytest.raises(ValueError, match="at least one pixel"):
        patch_origins(0, 10, 8, 1)
    with pytest.raises(ValueError, match="padding mode"):
        pad_for_patches(np.zeros((1, 4, 4)), 1, mode="wrap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="patch_size=16"):
        cut_patches(np.zeros((1, 9, 9)), [(0, 0)], 16)
    with pytest.raises(ValueError, match="outside the image"):
        halo_block(Window(0, 5, 0, 5), 2, (4, 4))


def test_merges_refuse_incomplete_coverage() -> None:
    origins = patch_origins(20, 20, 12, 2)
    preds = np.zeros((len(origins) - 1, 1, 12, 12))
    with pytest.raises(ValueError, match="unwritten"):
        merge_clip(preds, origins[:-1], (1, 20, 20), 2)
    with pytest.raises(ValueError, match="uncovered"):
        merge_weighted(preds, origins[:-1], (1, 20, 20), 12, 2)
    with pytest.raises(ValueError, match="origins"):
        merge_clip(preds, origins, (1, 20, 20), 2)


# --------------------------------------------------------------------------- strips


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
@pytest.mark.parametrize(
    ("image", "block", "clip", "chunk"),
    [
        ((70, 50), Window(0, 70, 0, 50), 4, 16),  # the whole image: padded on every side
        ((70, 50), Window(16, 48, 16, 48), 4, 16),  # inside: the halo is real data
        ((70, 50), Window(48, 70, 0, 32), 6, 16),  # bottom-left corner, short last strip
        ((70, 50), Window(0, 70, 0, 50), 4, 3),  # strips shorter than the reflected rows
        ((3, 40), Window(0, 3, 0, 40), 4, 1),  # an image shorter than clipSize: edge fallback
    ],
)
def test_frame_filled_strip_by_strip_equals_pad_halo(
    image: tuple[int, int], block: Window, clip: int, chunk: int, mode: str
) -> None:
    from rasterkube.predict.windows import pad_frame_bottom, pad_frame_cols, pad_frame_top, strip_rows

    data = np.random.default_rng(3).normal(size=(2, *image)).astype(np.float32)
    halo = halo_block(block, clip, image)
    read = data[:, halo.read.y0 : halo.read.y1, halo.read.x0 : halo.read.x1]
    want = pad_halo(read, halo, mode)  # type: ignore[arg-type]
    strips = strip_rows(halo, chunk)
    assert strips[0][0] == 0 and strips[-1][1] == halo.read.shape[0]
    assert all(a < b for a, b in strips) and all(s[1] == t[0] for s, t in zip(strips, strips[1:]))
    # Inner cuts fall on the block's chunk rows (whole chunks decoded once each).
    assert all((halo.read.y0 + a - block.y0) % chunk == 0 for a, _ in strips[1:])
    frame = np.full_like(want, np.nan)
    top = halo.pad[0][0]
    for a, b in strips:
        frame[:, top + a : top + b] = pad_frame_cols(read[:, a:b], halo, mode)  # type: ignore[arg-type]
    assert pad_frame_top(frame, halo, mode) <= halo.read.shape[0]  # type: ignore[arg-type]
    pad_frame_bottom(frame, halo, mode)  # type: ignore[arg-type]
    np.testing.assert_array_equal(frame, want)


def test_weighted_merge_in_pieces_equals_the_whole() -> None:
    from rasterkube.predict.windows import accumulate_weighted, normalise_weighted

    h, w, patch, clip = 45, 37, 16, 3
    origins = patch_origins(h, w, patch, clip)
    preds = np.random.default_rng(4).random((len(origins), 2, patch, patch), dtype=np.float32)
    whole = merge_weighted(preds, origins, (2, h, w), patch, clip)
    acc, weight = np.zeros((2, h + 2 * clip, w + 2 * clip)), np.zeros((h + 2 * clip, w + 2 * clip))
    for pred, (y, x) in zip(preds, origins):
        accumulate_weighted(acc, weight, pred, y, x, blend_window(patch, clip))
    rows = [normalise_weighted(acc, weight, clip, (h, w), a, min(a + 16, h)) for a in range(0, h, 16)]
    np.testing.assert_array_equal(np.concatenate(rows, axis=1).astype(np.float32), whole)
