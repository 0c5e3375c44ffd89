"""The I/O side of ``rasterkube plan``: what the arithmetic needs, read as metadata only.

A source store is described (its zarr metadata), a Mosaic searches its catalog (the STAC
items, not the COGs), a Prediction hashes its model file (its identity in the calibration).
A resource whose source is another resource of the same manifests is planned on that
resource's planned output, so a whole chain is planned before any of it exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from rasterkube import geozarr, manifests, runner
from rasterkube.api import ChangeScore, Mosaic, Prediction, Resource, Vectorization
from rasterkube.constants import DATA_VAR, Kind
from rasterkube.errors import UserError
from rasterkube.jobs.context import JobRequest
from rasterkube.planning import work as W
from rasterkube.planning.calibration import Calibration, estimate
from rasterkube.planning.work import Estimate, Raster, Sizing, Work


def raster_of(info: geozarr.StoreInfo) -> Raster:
    return Raster(len(info.times), tuple(info.bands), info.grid.shape, (info.chunks[2], info.chunks[3]),
                  int(np.dtype(info.dtype).itemsize), info.grid)  # fmt: skip


def _bands(source: Raster, wanted: Sequence[str] | None, field_name: str, where: str) -> int:
    if wanted is None:
        return len(source.bands)
    missing = [b for b in wanted if b not in source.bands]
    if missing:
        raise UserError(f"spec.{field_name}: {', '.join(map(repr, missing))} not in {where} "
                        f"(its bands are {', '.join(source.bands)})")  # fmt: skip
    return len(wanted)


def change_score_work(resource: ChangeScore, source: Raster, where: str) -> Work:
    from rasterkube.change import service

    spec = resource.spec
    n_bands = _bands(source, spec.bands, "bands", where)
    if source.times < service.MIN_TIME_STEPS:
        raise UserError(f"spec.source: {where} has {source.times} time step; change scores need at least "
                        f"{service.MIN_TIME_STEPS}")  # fmt: skip
    assert source.grid is not None
    win = service.selector_window(spec.selector, source.grid)
    return W.change_score(
        source, (win.y0, win.y1, win.x0, win.x1), n_bands, service.score_names(spec),
        [str(m) for m in spec.methods], spec.clustering.k, spec.xy_block_multiplier,
        geozarr.MAX_CHUNK_BYTES, service.STRIP_PIXELS,
    )  # fmt: skip


def prediction_work(resource: Prediction, source: Raster, where: str) -> Work:
    from rasterkube.predict import actors, service

    spec = resource.spec
    n_feat = _bands(source, spec.model.features, "model.features", where)
    sha = model_sha256(spec.model.uri)
    stacked = spec.model.actor == actors.Actor.CHANGE_DETECTION
    buffers = service.block_buffer_bytes(
        spec, source.chunk[0] * spec.xy_block_multiplier, 1 if stacked else source.times,
        n_feat * (source.times if stacked else 1), len(spec.model.labels),
    )  # fmt: skip
    return W.prediction(
        source, n_feat, list(spec.model.labels), stacked,
        spec.patch_size, spec.clip_size, spec.xy_block_multiplier, sha, geozarr.MAX_CHUNK_BYTES, buffers,
    )  # fmt: skip


def model_sha256(uri: str) -> str:
    """The model's identity, which picks its calibrated inference cost; nothing is loaded."""
    from rasterkube.predict import models

    return models.fetch(uri).sha256


def vectorization_work(resource: Vectorization, source: Raster, where: str) -> Work:
    from rasterkube.vectorize import service

    n_feat = _bands(source, resource.spec.features, "features", where)
    return W.vectorization(source, n_feat, service.BLOCK_SIDE)


def mosaic_work(resource: Mosaic, request: JobRequest) -> Work:
    """The catalog is searched (what the job's preflight does) and each scene's footprint put
    on the output grid; nothing is read from the COGs."""
    from rasterkube.mosaic import service

    plan = service.preflight(resource, request)
    total: Work | None = None
    labels = [plan.recipe.label(b) for b in plan.band_ids]
    for row in plan.rows:
        a, _, c, _, e, f = row.grid.transform
        footprints = []
        for scene in row.scenes:
            x0, y0, x1, y1 = service.footprint_in(scene, row.grid.crs)
            cols = sorted(((x0 - c) / a, (x1 - c) / a))
            rows = sorted(((y0 - f) / e, (y1 - f) / e))
            footprints.append(W.Footprint((rows[0], rows[1]), (cols[0], cols[1])))
        part = W.mosaic_row(row.grid.shape, resource.spec.chunk_size, len(plan.windows), labels, footprints,
                            geozarr.MAX_CHUNK_BYTES, service.STACK_BUDGET_BYTES, row.grid)  # fmt: skip
        total = part if total is None else total + part
    assert total is not None
    if len(plan.rows) > 1:
        total = replace(total, notes=(*total.notes, f"{len(plan.rows)} AOI rows (one store each); a consumer "
                                      "is planned on the first"))  # fmt: skip
    return total


def sizing_for(resource: Resource[Any], workers: int | None, cpus: float | None, gpus: float | None) -> Sizing:
    """The spec's resources, with what the command line overrides."""
    r = resource.spec.resources
    given = workers is not None or cpus is not None or gpus is not None
    return Sizing(
        workers=workers if workers is not None else r.workers,
        cpus_per_worker=cpus if cpus is not None else r.cpus,
        gpus=gpus if gpus is not None else r.gpus * (workers if workers is not None else r.workers),
        source="command line" if given else "spec.resources",
    )


def gpus_reserved(resource: Resource[Any], sizing: Sizing) -> float:
    if not isinstance(resource, Prediction):
        return 0.0
    s = resource.spec.serving
    want = s.replicas * s.gpus_per_replica
    return min(want, sizing.gpus) if sizing.gpus > 0 else want


def max_parallel(resource: Resource[Any], sizing: Sizing) -> float | None:
    """A Prediction's work is mostly its model replicas': they bound its parallelism. An unset
    cpusPerReplica is sized as a run sizes it (:func:`rasterkube.predict.serving.replica_cpus`)."""
    if not isinstance(resource, Prediction):
        return None
    from rasterkube.predict.serving import replica_cpus

    s = resource.spec.serving
    cpus = replica_cpus(s.cpus_per_replica, s.replicas, s.max_replicas, s.gpus_per_replica, sizing.cpus, sizing.cpus_per_worker)
    return s.replicas * cpus


def plan_manifests(
    items: Sequence[manifests.Loaded],
    root: str,
    calibration: Calibration,
    *,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus: float | None = None,
) -> list[Estimate]:
    """An estimate per resource (:func:`rasterkube.manifests.load`), in dependency order, without running
    any: refs are resolved as ``rasterkube run`` resolves them."""
    estimates = []
    for p, work in work_manifests(items, root):
        res = p.item.resource
        sizing = sizing_for(res, workers, cpus_per_worker, gpus)
        estimates.append(estimate(work, sizing, calibration, name=res.name, namespace=res.namespace,
                                  gpus_reserved=gpus_reserved(res, sizing), max_parallel=max_parallel(res, sizing)))  # fmt: skip
    return estimates


def work_manifests(items: Sequence[manifests.Loaded], root: str) -> list[tuple[runner.Planned, Work]]:
    """The work of each resource (:func:`rasterkube.manifests.load`), in dependency order."""
    order = runner.plan(items, root)
    outputs: dict[tuple[Kind, str, str], Raster | None] = {}
    out = []
    for p in order:
        try:
            work = _work(p, outputs)
        except UserError as exc:
            raise UserError(f"{p.item.origin}: {p.item.label}: {exc}") from None
        outputs[p.item.key] = work.output
        out.append((p, work))
    return out


def _work(p: runner.Planned, outputs: dict[tuple[Kind, str, str], Raster | None]) -> Work:
    res = p.item.resource
    kind = Kind(res.kind)
    request = JobRequest(resource=res.model_dump(by_alias=True, exclude_none=True, mode="json"),
                         output_uri=p.output_uri, source_uri=p.source_uri)  # fmt: skip
    if kind == Kind.MOSAIC:
        return mosaic_work(res, request)
    if p.depends_on is not None:
        source = outputs[p.depends_on]
        where = f"the planned output of {p.depends_on[0].value}/{p.depends_on[2]}"
        if source is None:
            raise UserError(f"spec.source: {where} is not a raster")
    else:
        assert p.source_uri is not None
        data_var = res.spec.data_var if kind == Kind.CHANGE_SCORE else DATA_VAR
        try:
            source = raster_of(geozarr.describe(p.source_uri, data_var))
        except geozarr.StoreError as exc:
            raise exc.in_spec(res.spec.source.field_path) from None
        where = p.source_uri
    if kind == Kind.CHANGE_SCORE:
        return change_score_work(res, source, where)
    if kind == Kind.PREDICTION:
        return prediction_work(res, source, where)
    if kind == Kind.VECTORIZATION:
        return vectorization_work(res, source, where)
    raise UserError(f"kind: {kind.value} cannot be planned")  # pragma: no cover — every kind is above
