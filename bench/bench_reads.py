"""Block reads through the reader layer (rasterkube.geozarr.read_block): rasterkube's own
stores at least as fast as before it existed, and what decoding another tool's store costs.

Every job reads its source in blocks of chunk-aligned windows. Measured per window (median
over interleaved rounds, in one process, so the machine's noise hits every side alike):

- ``native`` — ``read_block`` on a rasterkube store (one plain (time, band, y, x) array).
- ``before`` — the read path before the reader layer existed, on the same store: open the
  group, find the full-resolution level, index the array (what ``read_region`` did per block).
  Target: native / before ≤ 1.0 (as fast as it was).
- ``xarray_int16_packed`` — the same values written by xarray as int16 with CF
  scale_factor/add_offset/_FillValue: read and decoded by xarray's CF decoding.
- ``odc_stac_per_band`` — the same values as one uint16 variable per band with a ``nodata``
  attribute (odc-stac's layout), bands assembled from the variables.
- ``band_last`` — the same values as (time, y, x, band).

Reported as ms per window and as ratios to ``native``. Prints one JSON object (and writes it
with --json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402
from helpers.stores import grid, random_series, write_store  # noqa: E402

from rasterkube import geozarr  # noqa: E402
from rasterkube.grid import Window  # noqa: E402


def foreign_stores(root: Path, data: np.ndarray, chunk: int) -> dict[str, str]:
    """The same values as other tools write them (xarray to_zarr, zarr v3)."""
    import xarray as xr

    t, b, h, w = data.shape
    g = grid(h, w)
    attrs = {"proj:code": g.crs, "spatial:transform": list(g.transform), "spatial:shape": [h, w]}
    coords = {"time": np.arange(t).astype("datetime64[D]").astype("datetime64[ns]"),
              "band": [f"b{i}" for i in range(b)], "y": g.y_coords(), "x": g.x_coords()}  # fmt: skip
    ds = xr.Dataset({"variables": (("time", "band", "y", "x"), data)}, coords=coords, attrs=attrs)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = {"dtype": "int16", "scale_factor": 1e-3, "add_offset": 0.0, "_FillValue": -32768,
               "chunks": (1, b, chunk, chunk)}  # fmt: skip
        out["xarray_int16_packed"] = str(root / "packed.zarr")
        ds.to_zarr(out["xarray_int16_packed"], encoding={"variables": enc})
        dn = np.where(np.isnan(data), 0, np.round(data * 1000 + 10_000)).astype(np.uint16)
        per_band = xr.Dataset({f"b{i}": (("time", "y", "x"), dn[:, i], {"nodata": 0}) for i in range(b)},
                              coords={k: v for k, v in coords.items() if k != "band"}, attrs=attrs)  # fmt: skip
        out["odc_stac_per_band"] = str(root / "per-band.zarr")
        per_band.to_zarr(out["odc_stac_per_band"], encoding={f"b{i}": {"chunks": (1, chunk, chunk)} for i in range(b)})
        out["band_last"] = str(root / "band-last.zarr")
        ds.transpose("time", "y", "x", "band").to_zarr(
            out["band_last"], encoding={"variables": {"chunks": (1, chunk, chunk, b)}})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--bands", type=int, default=4)
    parser.add_argument("--times", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-reads-"))
    data = random_series(args.times, args.bands, args.side, args.side, seed=1)
    native_uri = write_store(str(root / "native.zarr"), data, chunk=args.chunk)
    stores = {"native": native_uri, **foreign_stores(root, data, args.chunk)}
    layouts = {name: geozarr.describe(uri).layout for name, uri in stores.items()}
    windows = [Window(y, y + args.chunk, x, x + args.chunk)
               for y in range(0, args.side, args.chunk) for x in range(0, args.side, args.chunk)]  # fmt: skip
    picks = [args.bands - 1, 0]

    def before(w: Window) -> np.ndarray:
        arr = geozarr.open_data_array(native_uri, "variables")
        ys, xs = w.slices
        return np.asarray(arr[:, :, ys, xs])[:, picks]

    readers: dict[str, Callable[[Window], np.ndarray]] = {"before": before}
    for name, layout in layouts.items():
        readers[name] = lambda w, layout=layout: geozarr.read_block(layout, w, picks)  # type: ignore[misc]
    for w in windows:  # every reader gives the same values (the foreign ones after decoding)
        want = before(w)
        np.testing.assert_array_equal(readers["native"](w), want)
        np.testing.assert_allclose(readers["xarray_int16_packed"](w), want, atol=5.1e-4, equal_nan=True)
        np.testing.assert_array_equal(readers["band_last"](w), want)
    times: dict[str, list[float]] = {name: [] for name in readers}
    names = list(readers)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for w in windows:
                readers[name](w)
            times[name].append((time.perf_counter() - t0) / len(windows) * 1e3)
    ms = {name: round(float(np.median(v)), 3) for name, v in times.items()}
    report: dict[str, Any] = {
        "benchmark": "block_reads",
        "store": {"times": args.times, "bands": args.bands, "side": args.side, "chunk": args.chunk,
                  "windows": len(windows), "bands_read": len(picks)},  # fmt: skip
        "ms_per_window": ms,
        "ratio_to_native": {name: round(v / ms["native"], 3) for name, v in ms.items()},
        "native_vs_before": round(ms["native"] / ms["before"], 3),
        "target": "native_vs_before <= 1.0 (the rasterkube store path as fast as before the reader layer)",
        "load_average": [round(v, 2) for v in __import__("os").getloadavg()],
    }
    report["meets_target"] = report["native_vs_before"] <= 1.0
    emit(report, args.json)


if __name__ == "__main__":
    main()
