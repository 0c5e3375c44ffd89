"""Compositing numerics of the Mosaic service: masking, scaling, time windows, reducers.

Everything here is a pure function over numpy arrays (no I/O, no STAC, no global state).

Data layout
-----------
A stack of observations has shape ``(N, B, H, W)``: scenes, bands, rows, columns, in
floating point with NaN marking an invalid observation of a band.  Per-scene validity
masks (from SCL or QA_PIXEL) have shape ``(N, H, W)``; ``times`` has shape ``(N,)``
(``datetime64``).  Composites have shape ``(T, B, H, W)`` for ``T`` time windows, and
the count of valid observations per window ``(T, H, W)`` as ``uint16``.

Memory
------
The reducers make at most one copy of their input stack (the median sorts a copy in
place; ``overwrite_input=True`` skips even that); every other temporary has the size
of one scene ``(B, H, W)`` or less, so peak memory is about twice the stack.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "BOA_ADD_OFFSET",
    "BOA_ADD_OFFSET_SINCE_BASELINE",
    "BOA_QUANTIFICATION_VALUE",
    "LANDSAT_FILL_DN",
    "LANDSAT_SR_OFFSET",
    "LANDSAT_SR_SCALE",
    "LANDSAT_ST_OFFSET",
    "LANDSAT_ST_SCALE",
    "MAX_OBSERVATIONS",
    "MAX_WINDOWS",
    "METHODS",
    "METHOD_BEST",
    "METHOD_MEDIAN",
    "QA_PIXEL_BITS",
    "QA_PIXEL_CIRRUS",
    "QA_PIXEL_CLEAR",
    "QA_PIXEL_CLOUD",
    "QA_PIXEL_CLOUD_SHADOW",
    "QA_PIXEL_DILATED_CLOUD",
    "QA_PIXEL_FILL",
    "QA_PIXEL_INVALID_MASK",
    "QA_PIXEL_SNOW",
    "QA_PIXEL_WATER",
    "SCL_CLASSES",
    "SCL_INVALID",
    "SCL_VALID",
    "SENTINEL2_NODATA_DN",
    "assign_windows",
    "best_pixel",
    "composite",
    "landsat_sr_scale",
    "landsat_st_scale",
    "masked_median",
    "parse_duration",
    "qa_pixel_valid",
    "scl_valid",
    "sentinel2_scale",
    "time_windows",
]

# --------------------------------------------------------------------------------------
# Sentinel-2 L2A scene classification (SCL)
# --------------------------------------------------------------------------------------

SCL_CLASSES: Final[Mapping[int, str]] = {
    0: "no data",
    1: "saturated or defective",
    2: "dark area pixels",
    3: "cloud shadows",
    4: "vegetation",
    5: "not vegetated",
    6: "water",
    7: "unclassified",
    8: "cloud medium probability",
    9: "cloud high probability",
    10: "thin cirrus",
    11: "snow or ice",
}
"""Sentinel-2 Level-2A Scene Classification (``SCL`` band) values and their classes.

Source: ESA Sentinel-2 MSI Level-2A Product Definition (S2-PDGS-MPC-L2A-PDD) and the
Sen2Cor Software Release Note / Sentinel-2 User Handbook, "Scene Classification" table.
"""

SCL_INVALID: Final[frozenset[int]] = frozenset({0, 1, 3, 7, 8, 9, 10})
"""SCL classes the ``sentinel-2-l2a`` recipes treat as invalid observations.

No data (0), saturated/defective (1), cloud shadows (3), unclassified (7: Sen2Cor puts
most undetected cloud edges and haze here), cloud medium (8) and high (9) probability,
thin cirrus (10).  Dark area pixels (2: terrain shadow, dark surfaces), vegetation,
bare soil, water and snow stay valid: they are real surface observations.
"""

SCL_VALID: Final[frozenset[int]] = frozenset(SCL_CLASSES) - SCL_INVALID
"""The complement of :data:`SCL_INVALID` within :data:`SCL_CLASSES`; other values
(outside 0–11) are invalid too."""

# --------------------------------------------------------------------------------------
# Landsat Collection 2 Level-2 QA_PIXEL
# --------------------------------------------------------------------------------------

QA_PIXEL_FILL: Final = 0
QA_PIXEL_DILATED_CLOUD: Final = 1
QA_PIXEL_CIRRUS: Final = 2
QA_PIXEL_CLOUD: Final = 3
QA_PIXEL_CLOUD_SHADOW: Final = 4
QA_PIXEL_SNOW: Final = 5
QA_PIXEL_CLEAR: Final = 6
QA_PIXEL_WATER: Final = 7

QA_PIXEL_BITS: Final[Mapping[int, str]] = {
    QA_PIXEL_FILL: "fill",
    QA_PIXEL_DILATED_CLOUD: "dilated cloud",
    QA_PIXEL_CIRRUS: "cirrus (high confidence; Landsat 8-9 OLI only)",
    QA_PIXEL_CLOUD: "cloud",
    QA_PIXEL_CLOUD_SHADOW: "cloud shadow",
    QA_PIXEL_SNOW: "snow",
    QA_PIXEL_CLEAR: "clear (no cloud and no dilated cloud)",
    QA_PIXEL_WATER: "water",
}
"""Single-bit flags of the Landsat Collection 2 Level-2 ``QA_PIXEL`` band (bit → meaning).

Source: USGS Landsat 8-9 Collection 2 Level-2 Science Product Guide (LSDS-1619), table
"Pixel Quality Assessment (QA_PIXEL) Bit Index"; bits 8-15 hold two-bit confidence
levels (cloud, cloud shadow, snow/ice, cirrus), which the recipes do not use.
"""

QA_PIXEL_INVALID_MASK: Final = (
    (1 << QA_PIXEL_FILL)
    | (1 << QA_PIXEL_DILATED_CLOUD)
    | (1 << QA_PIXEL_CIRRUS)
    | (1 << QA_PIXEL_CLOUD)
    | (1 << QA_PIXEL_CLOUD_SHADOW)
)
"""QA_PIXEL bits any of which makes an observation invalid: fill, dilated cloud, cirrus,
cloud, cloud shadow (``0b11111``).  Snow and water are surface observations and stay."""

# --------------------------------------------------------------------------------------
# Scale and offset
# --------------------------------------------------------------------------------------

LANDSAT_FILL_DN: Final = 0
"""DN 0 is fill in every Landsat C2 L2 SR and ST band."""
LANDSAT_SR_SCALE: Final = 2.75e-5
LANDSAT_SR_OFFSET: Final = -0.2
"""Landsat C2 L2 surface reflectance = DN × 0.0000275 − 0.2 (LSDS-1619, "Scale factor")."""
LANDSAT_ST_SCALE: Final = 0.00341802
LANDSAT_ST_OFFSET: Final = 149.0
"""Landsat C2 L2 surface temperature (ST_B10, kelvin) = DN × 0.00341802 + 149.0."""

SENTINEL2_NODATA_DN: Final = 0
"""DN 0 is no data in every Sentinel-2 L2A reflectance band."""
BOA_QUANTIFICATION_VALUE: Final = 10_000.0
BOA_ADD_OFFSET: Final = -1000
BOA_ADD_OFFSET_SINCE_BASELINE: Final = (4, 0)
"""Sentinel-2 L2A reflectance = (DN + BOA_ADD_OFFSET) / BOA_QUANTIFICATION_VALUE.

Processing baseline 04.00 (in operation from 25 January 2022, also used by the
reprocessed archive) shifted DNs by +1000 so that negative reflectances survive;
products declare ``BOA_ADD_OFFSET = -1000`` in their metadata.  Earlier baselines have
no offset (0).  Source: ESA "Sentinel-2: Processing Baseline 04.00" technical note.
"""

_BASELINE_RE: Final = re.compile(r"N?(\d{1,2})\.?(\d{2})")

# --------------------------------------------------------------------------------------
# Time windows and reducers
# --------------------------------------------------------------------------------------

METHOD_MEDIAN: Final = "median"
METHOD_BEST: Final = "best"
METHODS: Final = (METHOD_MEDIAN, METHOD_BEST)
Method = Literal["median", "best"]

MAX_OBSERVATIONS: Final = int(np.iinfo(np.uint16).max)
"""Counts are uint16 (the count layer is stored next to every composite; 2 bytes is
plenty for the scenes of one window), so a stack may hold at most this many scenes."""

MAX_WINDOWS: Final = 100_000
"""Guard against a typo such as ``P1D`` over a century building a runaway window list."""

_DURATION_RE: Final = re.compile(r"P(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?")
_DAYS_PER_WEEK: Final = 7
_MONTHS_PER_YEAR: Final = 12
_DAY: Final = np.dtype("datetime64[D]")

Window = tuple[np.datetime64, np.datetime64]


def scl_valid(scl: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """True where a Sentinel-2 SCL value is a usable observation (not in :data:`SCL_INVALID`).

    Values outside the documented classes 0–11 are invalid: an unknown class is no
    evidence of a clear view.
    """
    scl = np.asarray(scl)
    if scl.dtype.kind not in "iu":
        raise TypeError(f"SCL must be an integer array, got {scl.dtype}")
    return np.isin(scl, sorted(SCL_VALID))


def qa_pixel_valid(qa: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """True where a Landsat C2 L2 QA_PIXEL value has none of :data:`QA_PIXEL_INVALID_MASK` set."""
    qa = np.asarray(qa)
    if qa.dtype.kind not in "iu":
        raise TypeError(f"QA_PIXEL must be an integer array (uint16), got {qa.dtype}")
    return (qa & QA_PIXEL_INVALID_MASK) == 0


def _scale(dn: npt.ArrayLike, scale: float, offset: float, fill: int) -> npt.NDArray[np.float32]:
    dn = np.asarray(dn)
    if dn.dtype.kind not in "iu":
        raise TypeError(f"digital numbers must be an integer array, got {dn.dtype}")
    # float64 arithmetic, rounded once to float32: DN × 2.75e-5 − 0.2 cancels badly near
    # zero reflectance if done in float32.
    out = (dn * scale + offset).astype(np.float32)
    out[dn == fill] = np.nan
    return out


def landsat_sr_scale(dn: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Landsat C2 L2 surface reflectance from DNs (float32); fill (DN 0) → NaN."""
    return _scale(dn, LANDSAT_SR_SCALE, LANDSAT_SR_OFFSET, LANDSAT_FILL_DN)


def landsat_st_scale(dn: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Landsat C2 L2 surface temperature ST_B10 in kelvin from DNs (float32); fill → NaN."""
    return _scale(dn, LANDSAT_ST_SCALE, LANDSAT_ST_OFFSET, LANDSAT_FILL_DN)


def _parse_baseline(baseline: str) -> tuple[int, int]:
    """``"04.00"`` (STAC ``s2:processing_baseline``) or ``"N0400"`` (product name) → (4, 0)."""
    match = _BASELINE_RE.fullmatch(baseline.strip())
    if match is None:
        raise ValueError(
            f"unrecognised Sentinel-2 processing baseline {baseline!r}: expected 'MM.mm' as in "
            "the STAC property s2:processing_baseline (e.g. '05.09') or 'Nmmmm' as in product names"
        )
    return int(match[1]), int(match[2])


def sentinel2_scale(dn: npt.ArrayLike, baseline: str) -> npt.NDArray[np.float32]:
    """Sentinel-2 L2A surface reflectance from DNs (float32); no data (DN 0) → NaN.

    ``baseline`` is the product's processing baseline; from 04.00 on, DNs carry
    :data:`BOA_ADD_OFFSET`.
    """
    offset = BOA_ADD_OFFSET if _parse_baseline(baseline) >= BOA_ADD_OFFSET_SINCE_BASELINE else 0
    return _scale(
        dn, 1.0 / BOA_QUANTIFICATION_VALUE, offset / BOA_QUANTIFICATION_VALUE, SENTINEL2_NODATA_DN
    )


def parse_duration(window_iso: str) -> tuple[int, int]:
    """An ISO-8601 date duration → (months, days); years count 12 months, weeks 7 days.

    Only calendar components are supported (``PnYnMnWnD``, integers): composites are
    built from whole days of acquisitions, and an hour-level window is a typo.
    """
    text = window_iso.strip()
    match = _DURATION_RE.fullmatch(text)
    if match is None or text == "P":
        hint = (
            "time components (after 'T') are not supported"
            if "T" in text.upper()
            else "use whole years, months, weeks or days"
        )
        raise ValueError(
            f"unsupported time window {window_iso!r}: {hint}; expected an ISO-8601 duration "
            "such as P1Y, P6M, P3M, P1M, P2W, P10D or P1Y6M"
        )
    years, months, weeks, days = (int(g) if g else 0 for g in match.groups())
    total_months = years * _MONTHS_PER_YEAR + months
    total_days = weeks * _DAYS_PER_WEEK + days
    if total_months == 0 and total_days == 0:
        raise ValueError(f"time window {window_iso!r} is empty: use a positive duration such as P1M")
    return total_months, total_days


def _to_datetime64(value: object) -> np.datetime64:
    """Naive UTC ``datetime64`` from a datetime64, ISO string, date or (aware) datetime."""
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    elif isinstance(value, str) and value.endswith(("Z", "z")):
        # numpy deprecates zone designators; STAC datetimes are UTC with a trailing Z.
        value = value[:-1]
    result = np.datetime64(value)  # type: ignore[call-overload]
    if np.isnat(result):
        raise ValueError(f"time bound {value!r} is not a date")
    return result


def _add_calendar(start: np.datetime64, months: int, days: int) -> np.datetime64:
    """``start`` + months (clamped to the month's last day) + days, time of day kept.

    Like ``dateutil.relativedelta``: Jan 31 + 1 month → Feb 28 (29 in leap years).
    """
    day = start.astype(_DAY)
    month = start.astype("datetime64[M]")
    day_of_month = int((day - month.astype(_DAY)).astype(int))  # 0-based
    target = month + np.timedelta64(months, "M")
    days_in_target = int(((target + 1).astype(_DAY) - target.astype(_DAY)).astype(int))
    clamped = target.astype(_DAY) + np.timedelta64(min(day_of_month, days_in_target - 1), "D")
    return clamped + np.timedelta64(days, "D") + (start - day)


def time_windows(start: object, end: object, window_iso: str | None) -> list[Window]:
    """Consecutive half-open windows ``[s, e)`` covering ``[start, end)``.

    Window ``k`` starts at ``start + k × duration``, always computed from ``start``
    (not chained), so month-end anchors do not drift: ``P1M`` from Jan 31 gives
    [Jan 31, Feb 28/29), [Feb 28/29, Mar 31), [Mar 31, Apr 30), …  The last window is
    clipped to ``end``; ``window_iso=None`` gives the single window ``[start, end)``.
    Bounds share one datetime64 unit (days, or finer if an input is finer).
    """
    lo, hi = _to_datetime64(start), _to_datetime64(end)
    unit = np.promote_types(np.promote_types(lo.dtype, hi.dtype), _DAY)
    lo, hi = lo.astype(unit), hi.astype(unit)
    if not lo < hi:
        raise ValueError(f"time.end ({hi}) must be after time.start ({lo})")
    if window_iso is None:
        return [(lo, hi)]
    months, days = parse_duration(window_iso)
    windows: list[Window] = []
    window_start = lo
    while window_start < hi:
        if len(windows) == MAX_WINDOWS:
            raise ValueError(
                f"time window {window_iso!r} splits {lo}..{hi} into more than {MAX_WINDOWS} "
                "windows: use a longer window"
            )
        k = len(windows) + 1
        window_end = _add_calendar(lo, k * months, k * days).astype(unit)
        windows.append((window_start, min(window_end, hi)))
        window_start = window_end
    return windows


def _as_times(times: npt.ArrayLike) -> npt.NDArray[np.datetime64]:
    array = np.asarray(times)
    if array.dtype.kind != "M":
        array = np.array([_to_datetime64(t) for t in array.ravel()]).reshape(array.shape)
    return array


def assign_windows(times: npt.ArrayLike, windows: Sequence[Window]) -> npt.NDArray[np.intp]:
    """Index of the window containing each time, −1 outside every window (or NaT).

    ``windows`` must be sorted and non-overlapping, as :func:`time_windows` makes them.
    """
    times = _as_times(times)
    if not windows:
        return np.full(times.shape, -1, dtype=np.intp)
    starts = np.array([w[0] for w in windows])
    ends = np.array([w[1] for w in windows])
    unit = np.promote_types(np.promote_types(starts.dtype, ends.dtype), times.dtype)
    starts, ends, times = starts.astype(unit), ends.astype(unit), times.astype(unit)
    if np.any(ends <= starts) or np.any(starts[1:] < ends[:-1]):
        raise ValueError("windows must be non-empty, sorted and non-overlapping")
    index = np.searchsorted(starts, times, side="right") - 1
    inside = (index >= 0) & ~np.isnat(times)
    inside[inside] &= times[inside] < ends[index[inside]]
    return np.where(inside, index, -1)


def _check_stack(stack: np.ndarray) -> None:
    if stack.ndim != 4:
        raise ValueError(f"stack must have shape (N, B, H, W), got {stack.shape}")
    if stack.dtype.kind != "f":
        raise TypeError(f"stack must be floating point with NaN for invalid, got {stack.dtype}")
    if stack.shape[0] == 0:
        raise ValueError("stack has no observations: reduce only non-empty windows")
    if stack.shape[0] > MAX_OBSERVATIONS:
        raise ValueError(f"at most {MAX_OBSERVATIONS} observations per window, got {stack.shape[0]}")


def _valid_count(stack: np.ndarray) -> npt.NDArray[np.uint16]:
    """Observations valid in every band, per pixel; one scene at a time (no (N, …) bool)."""
    count = np.zeros(stack.shape[2:], dtype=np.uint16)
    for scene in stack:
        count += ~np.isnan(scene).any(axis=0)
    return count


def masked_median(
    stack: npt.NDArray[np.floating], *, overwrite_input: bool = False
) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.uint16]]:
    """Per-pixel, per-band median over the valid (non-NaN) observations of ``stack``.

    Returns ``median`` (B, H, W) in the stack's dtype — identical to
    ``np.nanmedian(stack, axis=0)`` but with no RuntimeWarning for all-NaN pixels and
    several times faster — and ``count`` (H, W) uint16, the observations valid in every
    band.  Where NaNs are aligned across bands (as :func:`composite` guarantees), the
    median is NaN exactly where ``count == 0``.

    Method: one sort along N (NaNs sort last), so the valid values of a lane are its
    first ``c`` entries and the median is the mean of entries ``(c-1)//2`` and ``c//2``.
    ``np.nanmedian`` instead falls back to masked arrays for N < 600, which is slow and
    allocates several stack-sized temporaries.  ``overwrite_input=True`` sorts ``stack``
    in place (no copy at all).
    """
    stack = np.asarray(stack)
    _check_stack(stack)
    count = _valid_count(stack)
    ordered = stack if overwrite_input else stack.copy()
    ordered.sort(axis=0)
    # Per-band valid count c, as int32 (N ≤ MAX_OBSERVATIONS) and updated in place so the
    # (B, H, W) temporaries stay small next to the sorted copy.
    band_count = np.zeros(ordered.shape[1:], dtype=np.int32)
    for scene in ordered:
        band_count += ~np.isnan(scene)
    # Middle entries c//2 (≤ N//2 < N) and (c-1)//2; with no valid value both indices are
    # 0 and pick a NaN, so the median is NaN, silently.
    upper = np.take_along_axis(ordered, (band_count // 2)[None], axis=0)[0]
    band_count -= 1
    band_count //= 2
    lower = np.take_along_axis(ordered, np.maximum(band_count, 0, out=band_count)[None], axis=0)[0]
    # Same arithmetic as np.median's mean of the two middle values (bit-identical); the
    # errstate only matters for genuine ±inf data, where inf + -inf is NaN as in numpy.
    with np.errstate(invalid="ignore"):
        median = np.add(lower, upper) / ordered.dtype.type(2)
    return median, count


def _time_distance_order(times: npt.NDArray[np.datetime64], centre: np.datetime64) -> np.ndarray:
    """Scene indices, closest to ``centre`` first; ties → earlier time, then lower index."""
    unit = np.promote_types(times.dtype, np.asarray(centre).dtype)
    t = times.astype(unit).astype(np.int64)
    c = np.asarray(centre).astype(unit).astype(np.int64)
    distance = np.abs(t - c)
    order = np.lexsort((np.arange(t.size), t, distance))
    return order[~np.isnat(times[order])]


def best_pixel(
    stack: npt.NDArray[np.floating], times: npt.ArrayLike, centre: object
) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.uint16], npt.NDArray[np.intp]]:
    """Per pixel, the valid observation closest in time to ``centre``.

    An observation is valid at a pixel when none of its bands is NaN, so every band of
    the result comes from the same scene.  Returns ``values`` (B, H, W), ``count``
    (H, W) uint16 of valid observations, and ``chosen`` (H, W), the index into the
    stack of the chosen scene; NaN and −1 where no observation is valid.  Ties in
    distance go to the earlier acquisition (then to the lower stack index).
    """
    stack = np.asarray(stack)
    _check_stack(stack)
    times = _as_times(times)
    if times.shape != stack.shape[:1]:
        raise ValueError(f"times has shape {times.shape}, expected ({stack.shape[0]},)")
    count = np.zeros(stack.shape[2:], dtype=np.uint16)
    chosen = np.full(stack.shape[2:], -1, dtype=np.intp)
    for index in _time_distance_order(times, _to_datetime64(centre)):
        valid = ~np.isnan(stack[index]).any(axis=0)
        count += valid
        chosen[valid & (chosen < 0)] = index
    values = np.take_along_axis(stack, np.maximum(chosen, 0)[None, None], axis=0)[0]
    values[:, chosen < 0] = np.nan
    return values, count, chosen


def _window_centre(window: Window) -> np.datetime64:
    start, end = window
    return start + (end - start) // 2


def composite(
    stack: npt.NDArray[np.floating],
    valid_mask: npt.NDArray[np.bool_],
    times: npt.ArrayLike,
    windows: Sequence[Window],
    method: Method = METHOD_MEDIAN,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint16]]:
    """Mask a scene stack and reduce each time window to one composite.

    ``stack`` (N, B, H, W), ``valid_mask`` (N, H, W) (e.g. :func:`scl_valid`), ``times``
    (N,).  An observation is used at a pixel when the mask says valid *and* none of its
    bands is NaN (a fill DN in one band invalidates the whole observation), so the
    count layer states exactly which observations every band used.  Returns composites
    (T, B, H, W) float32 and counts (T, H, W) uint16; scenes outside every window are
    ignored, and an empty window is all NaN with count 0.  ``method`` is
    :data:`METHOD_MEDIAN` or :data:`METHOD_BEST` (closest to the window centre).
    """
    if method not in METHODS:
        raise ValueError(f"unknown compositing method {method!r}: use one of {', '.join(METHODS)}")
    stack = np.asarray(stack)
    _check_stack(stack)
    valid_mask = np.asarray(valid_mask, dtype=bool)
    if valid_mask.shape != stack.shape[:1] + stack.shape[2:]:
        raise ValueError(f"valid_mask has shape {valid_mask.shape}, expected (N, H, W) of {stack.shape}")
    times = _as_times(times)
    if times.shape != stack.shape[:1]:
        raise ValueError(f"times has shape {times.shape}, expected ({stack.shape[0]},)")
    window_of = assign_windows(times, windows)
    # The one stack-sized copy: scenes grouped by window (stable, so time order is kept
    # within a window) and masked; each window is then a contiguous view the median may
    # sort in place.
    order = np.argsort(window_of, kind="stable")
    order = order[window_of[order] >= 0]
    masked = stack[order].astype(np.float32, copy=False)
    for scene, valid in zip(masked, valid_mask[order], strict=True):
        scene[:, ~(valid & ~np.isnan(scene).any(axis=0))] = np.nan
    bounds = np.searchsorted(window_of[order], np.arange(len(windows) + 1))
    n_bands, height, width = stack.shape[1:]
    values = np.full((len(windows), n_bands, height, width), np.nan, dtype=np.float32)
    counts = np.zeros((len(windows), height, width), dtype=np.uint16)
    for k, window in enumerate(windows):
        part = masked[bounds[k] : bounds[k + 1]]
        if part.shape[0] == 0:
            continue
        if method == METHOD_MEDIAN:
            values[k], counts[k] = masked_median(part, overwrite_input=True)
        else:
            values[k], counts[k], _ = best_pixel(
                part, times[order[bounds[k] : bounds[k + 1]]], _window_centre(window)
            )
    return values, counts
