"""The capacity model of docs/scale.md: ``rasterkube plan``'s arithmetic and a calibration,
extrapolated to a country, a continent and all land at 10 m.

The chain is Mosaic (Sentinel-2 L2A, 4 bands, one annual median of ``--scenes`` acquisitions
per pixel) → Prediction (the shipped water model, 128 px patches, 8 px clip) →
Vectorization (one probability band). Each area is cut into 100 km × 100 km tiles (10⁴ × 10⁴
px, about one MGRS tile: one resource, or one AOI row, each), and each tile is planned with
:mod:`rasterkube.planning.work` exactly as ``rasterkube plan`` plans a manifest; the totals are
a tile's times the number of tiles. Prints JSON (``--json`` writes it too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from rasterkube import geozarr  # noqa: E402
from rasterkube.mosaic.service import STACK_BUDGET_BYTES  # noqa: E402
from rasterkube.planning import calibration as C  # noqa: E402
from rasterkube.planning import work as W  # noqa: E402
from rasterkube.vectorize.service import BLOCK_SIDE  # noqa: E402

TILE_PX = 10_000  # 100 km at 10 m
AREAS_KM2 = {"France": 5.5e5, "Africa": 3.0e7, "all land": 1.5e8}
BANDS = ["B02", "B03", "B04", "B08"]
#: Requests one S3 prefix serves per second before it answers 503 SlowDown (AWS's documented
#: per-prefix rates; a new prefix starts there and is split as load persists).
S3_GET_PER_S, S3_PUT_PER_S = 5_500, 3_500


def tile_works(scenes: int, model_sha: str, chunk: int) -> dict[str, W.Work]:
    shape = (TILE_PX, TILE_PX)
    whole = W.Footprint((-1.0, TILE_PX + 1.0), (-1.0, TILE_PX + 1.0))
    mosaic = W.mosaic_row(shape, chunk, 1, BANDS, [whole] * scenes, geozarr.MAX_CHUNK_BYTES, STACK_BUDGET_BYTES)
    assert mosaic.output is not None
    prediction = W.prediction(mosaic.output, 4, ["land", "water"], False, 128, 8, 4, model_sha, geozarr.MAX_CHUNK_BYTES)
    assert prediction.output is not None
    vectorization = W.vectorization(prediction.output, 1, BLOCK_SIDE)
    return {"Mosaic": mosaic, "Prediction": prediction, "Vectorization": vectorization}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calibration", help="calibration JSON (default: the shipped one)")
    parser.add_argument("--scenes", type=int, default=40, help="acquisitions per pixel and year (default 40)")
    parser.add_argument("--chunk", type=int, default=512, help="Mosaic chunkSize (default 512)")
    parser.add_argument("--cpu-nodes", type=int, default=50)
    parser.add_argument("--cores-per-node", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args()
    cal = C.load(args.calibration)
    patch_terms = [t for t in cal.kinds["Prediction"].per_unit_core_s if t.startswith(W.TERM_PATCHES_PREFIX)]
    model_sha = patch_terms[0][len(W.TERM_PATCHES_PREFIX):]
    works = tile_works(args.scenes, model_sha, args.chunk)
    cores = args.cpu_nodes * args.cores_per_node
    sizing = W.Sizing(args.cpu_nodes, float(args.cores_per_node), source="model")
    per_tile = {}
    for kind, work in works.items():
        est = C.estimate(work, sizing, cal, name="tile", namespace="scale")
        per_tile[kind] = {
            "blocks": work.blocks, "patches": work.patches, "core_s": round(est.core_seconds, 1),
            "bytes_read": work.bytes_read, "bytes_written": work.bytes_written,
            "requests": work.object_store_requests, "gets": work.chunk_reads,
            "puts": work.chunk_writes + work.ledger_markers,
            "peak_worker_mib": round(est.peak_memory_per_worker_bytes / 2**20),
        }  # fmt: skip
    areas = {}
    for area, km2 in AREAS_KM2.items():
        tiles = km2 / (TILE_PX * 10 / 1000) ** 2
        row: dict[str, object] = {"km2": km2, "tiles": round(tiles), "pixels": km2 * 1e4}
        total_core_s = 0.0
        for kind, t in per_tile.items():
            core_s = t["core_s"] * tiles  # type: ignore[operator]
            total_core_s += core_s
            # Request rate when the whole cluster works on this kind at once.
            per_core_s = cores / t["core_s"]  # type: ignore[operator]
            row[kind] = {"core_hours": round(core_s / 3600), "blocks": round(t["blocks"] * tiles),  # type: ignore[operator]
                         "requests": round(t["requests"] * tiles),  # type: ignore[operator]
                         "bytes_written_tb": None if t["bytes_written"] is None else round(t["bytes_written"] * tiles / 1e12, 2),  # type: ignore[operator]
                         "get_per_s": round(t["gets"] * per_core_s), "put_per_s": round(t["puts"] * per_core_s)}  # type: ignore[operator]  # fmt: skip
        row["total_core_hours"] = round(total_core_s / 3600)
        row["wall_hours_on_cluster"] = round(total_core_s / cores / 3600, 1)
        areas[area] = row
    emit({"model": __doc__.split("\n\n")[0], "calibration": cal.label, "scenes_per_pixel": args.scenes,
          "cluster": {"cpu_nodes": args.cpu_nodes, "cores_per_node": args.cores_per_node, "cores": cores},
          "s3_prefix_limits_per_s": {"GET": S3_GET_PER_S, "PUT": S3_PUT_PER_S},
          "per_tile": per_tile, "areas": areas}, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
