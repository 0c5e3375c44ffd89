"""Windowing numerics of patch-based inference (DESIGN §2 Prediction, §4 Inference).

Pure functions over numpy arrays: no torch, no I/O, no global state. The Prediction service
reads a block (with a halo), pads it, cuts it into patches, runs the model on batches of
patches and merges the predictions back with one of the two ``mergeMode`` values.

Frames and coordinates
----------------------
An image (or block) of ``H × W`` pixels is padded by ``clipSize`` (``c``) pixels on each side,
giving the *padded frame* of ``(H + 2c) × (W + 2c)`` pixels. Patch origins are given in that
frame. A patch of ``patchSize`` (``P``) pixels at origin ``o`` keeps its *centre*
``[o + c, o + P - c)`` in the padded frame, which is ``[o, o + s)`` in image coordinates with
stride ``s = P - 2c``. So the centres tile the image exactly, and every kept pixel has at least
``c`` pixels of context on every side inside its patch.

Exactness
---------
For a fully-convolutional model whose receptive-field radius is at most ``c``, a kept pixel
only sees pixels of its own patch, which are pixels of the padded frame. So ``mergeMode: clip``
equals applying the model once to the whole padded image, whatever the patch grid; and with
:func:`halo_block` + :func:`pad_halo` the padded block *is* a window of the whole image's
padded frame, so blockwise inference equals whole-image inference, bit for bit.

``mergeMode`` (:class:`rasterkube.api.kinds.MergeMode`) picks :func:`merge_clip` or
:func:`merge_weighted`. ``weightedAverage`` blends overlapping predictions with
:func:`blend_window`; it is seam-free and constant-preserving, but not bit-identical between
block layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from rasterkube.errors import UserError
from rasterkube.grid import Window

__all__ = [
    "PAD_MODES",
    "TIME_BAND_SEPARATOR",
    "HaloBlock",
    "PadMode",
    "blend_window",
    "cut_patches",
    "fill_invalid",
    "halo_block",
    "accumulate_weighted",
    "frame_top_rows",
    "merge_clip",
    "merge_weighted",
    "normalise_weighted",
    "pad_frame_bottom",
    "pad_frame_cols",
    "pad_frame_top",
    "place_clip",
    "strip_rows",
    "pad_for_patches",
    "pad_halo",
    "patch_origins",
    "stack_time_major",
    "time_major_labels",
    "unstack_time_major",
    "valid_pixels",
    "with_nodata",
]

PadMode = Literal["reflect", "edge", "constant"]
PAD_MODES: Final[tuple[str, ...]] = ("reflect", "edge", "constant")

#: Joins a time label and a band label in :func:`time_major_labels`. Band labels already
#: contain ``:`` (``sentinel-2-l2a:B04``), so the time is separated by ``@``.
TIME_BAND_SEPARATOR: Final = "@"

Origin = tuple[int, int]


# --------------------------------------------------------------------------- validation


def _check_patch(patch_size: int, clip_size: int) -> int:
    """Validate the CRD fields and return the stride ``patchSize - 2·clipSize``."""
    if patch_size < 1:
        raise UserError(f"patchSize must be a positive number of pixels, got {patch_size}")
    if clip_size < 0:
        raise UserError(f"clipSize must be 0 or more pixels, got {clip_size}")
    if 2 * clip_size >= patch_size:
        # Nothing would be kept of each patch: the centre is patch minus clip on both sides.
        raise UserError(
            f"clipSize ({clip_size}) must be less than half of patchSize ({patch_size}): "
            f"lower clipSize or raise patchSize so that patchSize - 2*clipSize > 0"
        )
    return patch_size - 2 * clip_size


def _axis_origins(length: int, stride: int) -> list[int]:
    """Origins along one axis, every ``stride`` pixels; the last one is moved back to fit.

    Shifting back (instead of padding a partial last patch) keeps every patch the model's full
    size, so batches stay uniform; the shifted patch's centre overlaps its neighbour's, which is
    harmless because overlapping centres are consistent (clip) or blended (weighted average).
    """
    last = max(length - stride, 0)  # 0 when the image is smaller than one centre
    origins = list(range(0, last, stride))
    origins.append(last)
    return origins


def patch_origins(height: int, width: int, patch_size: int, clip_size: int) -> list[Origin]:
    """Row-major ``(y, x)`` patch origins in the padded frame of a ``height × width`` image.

    The kept centres (stride ``patch_size - 2·clip_size``) cover ``[0, height) × [0, width)``
    exactly; the last row/column of patches is shifted back so that no patch extends past the
    padded image. If the image is smaller than one centre along an axis, there is a single
    origin 0 there and the padded image must be enlarged to a whole patch:
    pass ``patch_size`` to :func:`pad_for_patches` / :func:`pad_halo`.
    """
    stride = _check_patch(patch_size, clip_size)
    if height < 1 or width < 1:
        raise ValueError(f"image must have at least one pixel, got {height}x{width}")
    ys = _axis_origins(height, stride)
    xs = _axis_origins(width, stride)
    return [(y, x) for y in ys for x in xs]


# --------------------------------------------------------------------------- padding


@dataclass(frozen=True)
class HaloBlock:
    """How to read and pad one block so that its padded data is a window of the whole image's
    padded frame (``clipSize`` pixels around the image).

    ``read`` is the block grown by ``clipSize`` on each side and clipped to the image (the halo
    is real neighbouring data); ``pad`` is what the clipping removed, ``((top, bottom), (left,
    right))``, to be filled by :func:`pad_halo` exactly as :func:`pad_for_patches` fills the
    whole image's border. ``block_in_read`` locates the block's own pixels inside ``read``
    (e.g. to cut its nodata mask). Merging with ``out_shape=(K, *block.shape)`` yields the
    block's own predictions directly: the halo only provides context and is never predicted.
    """

    block: Window
    read: Window
    pad: tuple[tuple[int, int], tuple[int, int]]
    block_in_read: Window
    image_shape: tuple[int, int]
    clip_size: int

    @property
    def padded_shape(self) -> tuple[int, int]:
        """Shape of the padded block before any enlargement to a whole patch."""
        (top, bottom), (left, right) = self.pad
        h, w = self.read.shape
        return h + top + bottom, w + left + right


def halo_block(block_window: Window, clip_size: int, image_shape: tuple[int, int]) -> HaloBlock:
    """The read window of ``block_window`` with a ``clip_size`` halo (clipped to the image), the
    padding that replaces the clipped part, and the block's offsets inside the read window."""
    if clip_size < 0:
        raise UserError(f"clipSize must be 0 or more pixels, got {clip_size}")
    height, width = image_shape
    b = block_window
    if not (0 <= b.y0 < b.y1 <= height and 0 <= b.x0 < b.x1 <= width):
        raise ValueError(f"block {b} is empty or outside the image of shape {image_shape}")
    read = Window(
        max(b.y0 - clip_size, 0),
        min(b.y1 + clip_size, height),
        max(b.x0 - clip_size, 0),
        min(b.x1 + clip_size, width),
    )
    # Whatever the image edge cut off the halo is padded, so the padded block spans exactly
    # image rows [y0 - c, y1 + c) and columns [x0 - c, x1 + c) of the whole padded frame.
    pad = (
        (clip_size - (b.y0 - read.y0), clip_size - (read.y1 - b.y1)),
        (clip_size - (b.x0 - read.x0), clip_size - (read.x1 - b.x1)),
    )
    inside = Window(b.y0 - read.y0, b.y1 - read.y0, b.x0 - read.x0, b.x1 - read.x0)
    return HaloBlock(b, read, pad, inside, (int(height), int(width)), clip_size)


def _axis_mode(mode: PadMode, image_length: int, clip_size: int) -> str:
    # Reflect needs more pixels than it mirrors; a too-short image falls back to repeating its
    # edge. The decision uses the *image* length (not the block's) so that a block padded by
    # pad_halo matches the whole image padded by pad_for_patches.
    if mode == "reflect" and image_length <= clip_size:
        return "edge"
    return mode


def _pad(
    x: npt.NDArray[np.generic],
    widths: tuple[tuple[int, int], tuple[int, int]],
    modes: tuple[str, str],
    patch_size: int | None,
) -> npt.NDArray[np.generic]:
    if x.ndim != 3:
        raise ValueError(f"expected a (band, y, x) array, got shape {x.shape}")
    out = x
    for axis, (w, mode) in enumerate(zip(widths, modes, strict=True), start=1):
        if w != (0, 0):
            pad_width = [(0, 0)] * 3
            pad_width[axis] = w
            out = np.pad(out, pad_width, mode=mode)  # type: ignore[call-overload]
    if patch_size is not None:
        # An image smaller than one patch: enlarge bottom/right so the single patch fits. These
        # pixels lie more than clipSize beyond any kept pixel, so their values never reach a
        # kept prediction of a model with receptive-field radius <= clipSize.
        extra_y = max(patch_size - out.shape[1], 0)
        extra_x = max(patch_size - out.shape[2], 0)
        if extra_y or extra_x:
            out = np.pad(out, [(0, 0), (0, extra_y), (0, extra_x)], mode="edge")
    return out


def _check_mode(mode: str) -> None:
    if mode not in PAD_MODES:
        raise ValueError(f"padding mode must be one of {PAD_MODES}, got {mode!r}")


def pad_for_patches(
    block: npt.NDArray[np.generic],
    clip_size: int,
    mode: PadMode = "reflect",
    *,
    patch_size: int | None = None,
) -> npt.NDArray[np.generic]:
    """Pad a whole ``(C, H, W)`` image by ``clip_size`` on each side so edge pixels get context.

    ``reflect`` mirrors the image without repeating the edge pixel (so no artificial flat
    border); along an axis of at most ``clip_size`` pixels it falls back to ``edge``. With
    ``patch_size``, a padded image smaller than one patch is enlarged at the bottom/right.
    """
    _check_mode(mode)
    if clip_size < 0:
        raise UserError(f"clipSize must be 0 or more pixels, got {clip_size}")
    if block.ndim != 3:
        raise ValueError(f"expected a (band, y, x) array, got shape {block.shape}")
    _, height, width = block.shape
    modes = (_axis_mode(mode, height, clip_size), _axis_mode(mode, width, clip_size))
    return _pad(block, ((clip_size, clip_size), (clip_size, clip_size)), modes, patch_size)


def pad_halo(
    read_data: npt.NDArray[np.generic],
    halo: HaloBlock,
    mode: PadMode = "reflect",
    *,
    patch_size: int | None = None,
) -> npt.NDArray[np.generic]:
    """Pad the ``(C, h, w)`` data read at ``halo.read`` into the block's padded frame.

    Only sides cut by the image edge are padded, and with the image's own mode decision, so the
    result equals the matching window of ``pad_for_patches(whole_image)`` (see module docs).
    """
    _check_mode(mode)
    if read_data.ndim != 3 or read_data.shape[1:] != halo.read.shape:
        raise ValueError(
            f"read data of shape {read_data.shape} does not match the read window {halo.read.shape}"
        )
    height, width = halo.image_shape
    modes = (_axis_mode(mode, height, halo.clip_size), _axis_mode(mode, width, halo.clip_size))
    return _pad(read_data, halo.pad, modes, patch_size)


def strip_rows(halo: HaloBlock, chunk: int) -> list[tuple[int, int]]:
    """Row ranges of ``halo.read`` (relative to it) split at the block's chunk rows.

    Reading a block strip by strip decodes every chunk once, as reading it whole does, and
    lets the first patches go to the model while the rest is read."""
    b = halo.block
    cuts = list(range(b.y0 + chunk, b.y1, chunk)) if chunk > 0 else []
    edges = [halo.read.y0, *cuts, halo.read.y1]
    return [(a - halo.read.y0, z - halo.read.y0) for a, z in zip(edges, edges[1:], strict=False)]


def _modes(halo: HaloBlock, mode: PadMode) -> tuple[str, str]:
    _check_mode(mode)
    height, width = halo.image_shape
    return _axis_mode(mode, height, halo.clip_size), _axis_mode(mode, width, halo.clip_size)


def pad_frame_cols(read_rows: npt.NDArray[np.generic], halo: HaloBlock, mode: PadMode = "reflect") -> npt.NDArray[np.generic]:
    """Rows of the read data padded left and right into the block's padded frame.

    Padding is separable: padding rows first and columns then (:func:`pad_halo`) or the other
    way round (these functions) give the same frame, corners included."""
    return _pad(read_rows, ((0, 0), halo.pad[1]), _modes(halo, mode), None)


def frame_top_rows(halo: HaloBlock) -> int:
    """How many read rows :func:`pad_frame_top` mirrors into the top padding."""
    return min(halo.read.shape[0], halo.pad[0][0] + 1)  # reflect mirrors ``top`` rows after the first


def pad_frame_top(frame: npt.NDArray[np.generic], halo: HaloBlock, mode: PadMode = "reflect") -> int:
    """Fill the top padding rows of ``frame`` (``(C, Hp, Wp)``) from its first read rows, in
    place; returns how many read rows that needs (:func:`frame_top_rows`; they must be in the
    frame already)."""
    top = halo.pad[0][0]
    need = frame_top_rows(halo)
    if top:
        src = frame[:, top : top + need]
        frame[:, :top] = _pad(src, ((top, 0), (0, 0)), _modes(halo, mode), None)[:, :top]
    return need


def pad_frame_bottom(frame: npt.NDArray[np.generic], halo: HaloBlock, mode: PadMode = "reflect") -> None:
    """Fill the bottom padding rows of ``frame`` from its last read rows, in place."""
    top, bottom = halo.pad[0]
    h = halo.read.shape[0]
    if bottom:
        need = min(h, bottom + 1)
        src = frame[:, top + h - need : top + h]
        frame[:, top + h : top + h + bottom] = _pad(src, ((0, bottom), (0, 0)), _modes(halo, mode), None)[:, need:]


# --------------------------------------------------------------------------- patches


def _origin_arrays(origins: Sequence[Origin]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    arr = np.asarray(origins, dtype=np.intp).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def cut_patches(
    padded: npt.NDArray[np.generic], origins: Sequence[Origin], patch_size: int
) -> npt.NDArray[np.generic]:
    """Stack the ``(C, P, P)`` patches at ``origins`` into one contiguous ``(N, C, P, P)`` batch."""
    if padded.ndim != 3:
        raise ValueError(f"expected a padded (band, y, x) array, got shape {padded.shape}")
    ys, xs = _origin_arrays(origins)
    if len(ys) == 0:
        raise ValueError("no patch origins given")
    _, hp, wp = padded.shape
    if ys.min() < 0 or xs.min() < 0 or ys.max() + patch_size > hp or xs.max() + patch_size > wp:
        raise ValueError(
            f"a {patch_size}-pixel patch at the given origins extends past the padded image "
            f"{hp}x{wp}; pad with pad_for_patches(..., patch_size={patch_size})"
        )
    # Views of the padded array, copied once into a contiguous batch (what the model wants).
    return np.stack([padded[:, y : y + patch_size, x : x + patch_size] for y, x in zip(ys, xs)])


def _check_preds(preds: npt.NDArray[np.generic], n: int, k: int) -> int:
    if preds.ndim != 4 or preds.shape[2] != preds.shape[3]:
        raise ValueError(f"predictions must be (N, K, P, P), got shape {preds.shape}")
    if preds.shape[0] != n:
        raise ValueError(f"{preds.shape[0]} patch predictions for {n} origins")
    if preds.shape[1] != k:
        raise ValueError(f"predictions have {preds.shape[1]} bands, out_shape expects {k}")
    return int(preds.shape[2])


def merge_clip(
    preds: npt.NDArray[np.generic],
    origins: Sequence[Origin],
    out_shape: tuple[int, int, int],
    clip_size: int,
) -> npt.NDArray[np.generic]:
    """``mergeMode: clip``: keep each patch's centre (patch minus ``clip_size`` on each side).

    Where centres overlap (the shifted last row/column) a later patch overwrites an earlier
    one; for a fully-convolutional model with receptive field <= ``clip_size`` both hold the
    same values. Raises if the centres leave any output pixel unwritten.
    """
    k, height, width = out_shape
    ys, xs = _origin_arrays(origins)
    patch = _check_preds(preds, len(ys), k)
    stride = _check_patch(patch, clip_size)
    out = np.empty(out_shape, dtype=preds.dtype)
    covered = np.zeros((height, width), dtype=bool)
    for i, (y, x) in enumerate(zip(ys, xs)):
        h, w = place_clip(out, preds[i], int(y), int(x), clip_size, stride)
        covered[y : y + h, x : x + w] = True
    if not covered.all():
        # An explicit check, not `assert`: it must hold under `python -O` too.
        raise ValueError(
            f"patch centres leave {int((~covered).sum())} output pixels unwritten; "
            "use patch_origins() for the origins"
        )
    return out


def place_clip(
    out: npt.NDArray[np.generic], pred: npt.NDArray[np.generic], y: int, x: int, clip_size: int, stride: int
) -> tuple[int, int]:
    """Write the centre of one ``(K, P, P)`` patch prediction at image pixel ``(y, x)`` of
    ``out`` (``(K, H, W)``), clipped to the image (tiny images); returns the centre's shape."""
    _, height, width = out.shape
    h, w = min(stride, height - y), min(stride, width - x)
    if h <= 0 or w <= 0 or y < 0 or x < 0:
        raise ValueError(f"patch origin ({y}, {x}) keeps no pixel of a {height}x{width} image")
    out[:, y : y + h, x : x + w] = pred[:, clip_size : clip_size + h, clip_size : clip_size + w]
    return h, w


def _ramp(length: int, ramp_len: int) -> npt.NDArray[np.float64]:
    """1-D window: squared-sine rise over ``ramp_len`` pixels, flat 1, mirrored fall."""
    if ramp_len == 0:
        return np.ones(length)
    i = np.arange(length, dtype=np.float64)
    # Pixel centres (i + 0.5) keep every weight strictly inside (0, 1]: no zero weights at image
    # borders, where only one patch covers a pixel, hence no 0/0 when normalising.
    up = np.where(i < ramp_len, np.sin(0.5 * np.pi * (i + 0.5) / ramp_len) ** 2, 1.0)
    return np.minimum(up, up[::-1])


def blend_window(patch_size: int, clip_size: int) -> npt.NDArray[np.float64]:
    """Separable ``(P, P)`` weights for ``mergeMode: weightedAverage``, strictly positive.

    Each side rises as sin² over ``2·clip_size`` pixels, the overlap of neighbouring patches at
    the nominal stride, where a patch's fall and its neighbour's rise add up to exactly 1
    (sin² + cos²). Pixels near a patch edge, whose context was cut by the patch, get the least
    weight.
    """
    _check_patch(patch_size, clip_size)
    w = _ramp(patch_size, 2 * clip_size)
    return np.outer(w, w)


def merge_weighted(
    preds: npt.NDArray[np.generic],
    origins: Sequence[Origin],
    out_shape: tuple[int, int, int],
    patch_size: int,
    clip_size: int,
) -> npt.NDArray[np.floating]:
    """``mergeMode: weightedAverage``: blend overlapping patches with :func:`blend_window`.

    The sum of weighted predictions is divided by the sum of weights, so a constant prediction
    stays constant everywhere (no darkening at image borders or seams between patches); the
    ``clip_size`` padding margin is then discarded. Accumulates in float64 (see
    :func:`accumulate_weighted`).
    """
    k, height, width = out_shape
    ys, xs = _origin_arrays(origins)
    if _check_preds(preds, len(ys), k) != patch_size:
        raise ValueError(f"predictions are {preds.shape[2]} pixels wide, patchSize is {patch_size}")
    window = blend_window(patch_size, clip_size)
    if len(ys) == 0 or ys.min() < 0 or xs.min() < 0:
        raise ValueError("patch origins must be given and not negative; use patch_origins()")
    # The padded frame, possibly enlarged to a whole patch for images smaller than one.
    hp = max(height + 2 * clip_size, int(ys.max()) + patch_size)
    wp = max(width + 2 * clip_size, int(xs.max()) + patch_size)
    acc = np.zeros((k, hp, wp), dtype=np.float64)
    weight = np.zeros((hp, wp), dtype=np.float64)
    for i, (y, x) in enumerate(zip(ys, xs)):
        accumulate_weighted(acc, weight, preds[i], int(y), int(x), window)
    out_dtype = np.result_type(preds.dtype, np.float32)
    return normalise_weighted(acc, weight, clip_size, (height, width), 0, height).astype(out_dtype, copy=False)


def accumulate_weighted(
    acc: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64] | None,
    pred: npt.NDArray[np.generic],
    y: int,
    x: int,
    window: npt.NDArray[np.float64],
) -> None:
    """Add one ``(K, P, P)`` prediction, weighted by ``window``, at padded-frame ``(y, x)``.

    The sums stay float64: in float32 a constant prediction came back one unit in the last
    place off at seams (sum of weighted values / sum of weights), and constants must stay
    exact (tested). Its cost is the merge stage's, a small share of a Prediction's."""
    p = window.shape[0]
    acc[:, y : y + p, x : x + p] += window * pred
    if weight is not None:  # None: the weights of this patch grid are summed elsewhere already
        weight[y : y + p, x : x + p] += window


def normalise_weighted(
    acc: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    clip_size: int,
    shape: tuple[int, int],
    row0: int,
    row1: int,
) -> npt.NDArray[np.float64]:
    """Rows ``[row0, row1)`` of the ``shape`` image: weighted sums over weights, the padding
    margin dropped; raises if a pixel got no patch."""
    inner = (slice(clip_size + row0, clip_size + row1), slice(clip_size, clip_size + shape[1]))
    w_inner = weight[inner]
    if not (w_inner > 0).all():
        raise ValueError(
            f"patches leave {int((w_inner <= 0).sum())} output pixels uncovered; "
            "use patch_origins() for the origins"
        )
    return acc[(slice(None), *inner)] / w_inner


# --------------------------------------------------------------------------- time stacking


def stack_time_major(x: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """``(T, C, H, W)`` → ``(T·C, H, W)``, time the slow axis: ``[t0c0, t0c1, …, t1c0, …]``.

    The ``changeDetection`` actor's model takes the time steps stacked along channels in this
    order (channel ``t·C + c`` is band ``c`` at time ``t``); :func:`time_major_labels` names
    them. A free view for C-ordered input.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (time, band, y, x) array, got shape {x.shape}")
    t, c, h, w = x.shape
    return x.reshape(t * c, h, w)


def unstack_time_major(x: npt.NDArray[np.generic], times: int) -> npt.NDArray[np.generic]:
    """Inverse of :func:`stack_time_major`: ``(T·C, H, W)`` → ``(T, C, H, W)``."""
    if x.ndim != 3 or times < 1 or x.shape[0] % times:
        raise ValueError(f"cannot split {x.shape[0] if x.ndim else 0} channels into {times} times")
    return x.reshape(times, x.shape[0] // times, *x.shape[1:])


def time_major_labels(times: Sequence[object], bands: Sequence[str]) -> list[str]:
    """Labels of the channels of :func:`stack_time_major`, ``"<band>@<time>"``, time-major.

    Compare with ``model.features`` to check that the model was trained on this order.
    """
    return [f"{band}{TIME_BAND_SEPARATOR}{t}" for t in times for band in bands]


# --------------------------------------------------------------------------- nodata


def valid_pixels(x: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_]:
    """``(..., H, W)`` → ``(H, W)``: True where every band (and time) of the input is finite."""
    if x.ndim < 2:
        raise ValueError(f"expected an array with (y, x) as last axes, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        return np.ones(x.shape[-2:], dtype=bool)  # integer data has no NaN
    return np.isfinite(x).all(axis=tuple(range(x.ndim - 2)))


def fill_invalid(x: npt.NDArray[np.floating], fill: float = 0.0) -> npt.NDArray[np.floating]:
    """Replace non-finite input by ``fill`` before inference.

    A NaN would spread through every convolution and poison its neighbours' predictions;
    the pixel itself is set back to NaN afterwards by :func:`with_nodata`.
    """
    return np.where(np.isfinite(x), x, np.asarray(fill, dtype=x.dtype))


def with_nodata(
    preds: npt.NDArray[np.generic], valid_mask: npt.NDArray[np.bool_]
) -> npt.NDArray[np.floating]:
    """``(K, H, W)`` predictions with NaN wherever ``valid_mask`` (``(H, W)``) is False.

    Integer predictions are promoted to float so that they can hold NaN.
    """
    if preds.ndim < 2 or preds.shape[-2:] != valid_mask.shape:
        raise ValueError(
            f"mask of shape {valid_mask.shape} does not match predictions {preds.shape}"
        )
    dtype = np.result_type(preds.dtype, np.float32)
    return np.where(valid_mask, preds, np.asarray(np.nan, dtype=dtype)).astype(dtype, copy=False)
