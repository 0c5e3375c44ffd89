"""The Python client: build the four kinds of resources from notebooks, in a cluster or locally.

Every method builds the resource through the typed models of :mod:`rasterkube.api` (so a bad
argument fails with the same message as a bad manifest, naming the parameter), then either
creates it in the cluster (``local=False``: the operator runs it; the client waits on its
status) or runs it here (``local=True``: the code of ``rasterkube run`` on an embedded Ray, or
on the Ray cluster in ``RAY_ADDRESS``). Both return a :class:`~rasterkube.client.Result`.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, Final

from pydantic import ValidationError

from rasterkube import storage
from rasterkube.api import RESOURCE_MODELS, SHORT_NAMES, Resource
from rasterkube.api.common import NAME_PATTERN, REF_KINDS
from rasterkube.client.cluster import ClusterBackend, CustomObjects
from rasterkube.client.local import LocalBackend
from rasterkube.client.progress import progress_bar
from rasterkube.client.results import Result, result_from_object
from rasterkube.constants import API_VERSION, ENV_STORAGE_ROOT, Kind, Phase
from rasterkube.errors import ResourceFailed, ResourceNotFound, UserError
from rasterkube.manifests import ManifestError, format_validation_error
from rasterkube.runtime.usage import Usage

REF_FIELDS: Final = {kind: field.value for field, kind in REF_KINDS.items()}
AOI_DIR: Final = "aoi"
URI_SUFFIXES: Final = (".zarr", ".parquet", ".geoparquet", ".json", ".geojson")
# Spec paths whose Python parameter is not simply the snake_case of the field.
_COMMON_PARAMS: Final = {
    "metadata.name": "name",
    "metadata.namespace": "namespace",
    "spec.output.uri": "output_uri",
    "spec.resources": "resources",
}
_PARAMS: Final = {
    Kind.MOSAIC: {"spec.time.start": "start", "spec.time.end": "end", "spec.time.window": "window",
                  "spec.time": "start/end", "spec.aoi": "aoi", "spec.stac": "stac"},
    Kind.PREDICTION: {"spec.source": "mosaic", "spec.model.uri": "model_uri", "spec.model.actor": "actor",
                      "spec.model.features": "features", "spec.model.labels": "labels"},
    Kind.CHANGE_SCORE: {"spec.source": "source", "spec.selector": "selector", "spec.clustering": "clustering"},
    Kind.VECTORIZATION: {"spec.source": "source"},
}  # fmt: skip
_CONTAINERS: Final = {"serving", "output", "model", "time"}


# ------------------------------------------------------------------------- small converters


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _camel_value(value: Any) -> Any:
    """``loo_medoid`` → ``looMedoid`` (enum values are camelCase on the wire)."""
    if isinstance(value, str) and "_" in value:
        head, *rest = value.split("_")
        return head + "".join(part[:1].upper() + part[1:] for part in rest)
    return value


def _list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


def _date(value: Any) -> Any:
    """A date, datetime (pandas Timestamp included) or ISO string for ``time.start``/``end``."""
    if isinstance(value, dt.datetime):
        if value.time() == dt.time(0) and value.tzinfo is None:
            return value.date().isoformat()
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if value is not None and type(value).__name__ == "datetime64":
        return str(value)[:10] if str(value).endswith("T00:00:00") or len(str(value)) == 10 else str(value)
    return value


def _crs(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"EPSG:{value}"
    to_string = getattr(value, "to_string", None)  # pyproj.CRS
    return to_string() if callable(to_string) else str(value)


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _stac(value: Any) -> Any:
    """A STAC API URL, a catalog.json path/URI, or the ``stac`` block as a dict."""
    if value is None or isinstance(value, Mapping):
        return value
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if text.startswith(("http://", "https://")) and not text.endswith(".json"):
        return {"api": text}
    return {"catalog": text}


def _output(uri: Any, multiscales: bool | None = None, **extra: Any) -> dict[str, Any] | None:
    out = _drop_none({"uri": os.fspath(uri) if isinstance(uri, os.PathLike) else uri,
                      "multiscales": multiscales or None, **extra})  # fmt: skip
    return out or None


def parse_kind(value: Any) -> Kind:
    """``Mosaic``, ``mosaic``, ``mosaics``, ``mos``, a :class:`Kind` or a :class:`Result`."""
    if isinstance(value, Result) and value.kind:
        return Kind(value.kind)
    if isinstance(value, Kind):
        return value
    text = str(value).lower()
    for kind in Kind:
        if text in (kind.value.lower(), kind.plural, kind.singular, *SHORT_NAMES.get(kind, [])):
            return kind
    names = ", ".join(k.value for k in Kind)
    raise UserError(f"kind: {value!r} is not a rasterkube kind; use one of {names}")


def _looks_like_uri(text: str) -> bool:
    return "://" in text or "/" in text or os.sep in text or text.startswith(("~", ".")) or text.endswith(URI_SUFFIXES)


def _is_geodataframe(value: Any) -> bool:
    return any(cls.__name__ == "GeoDataFrame" for cls in type(value).__mro__)


def _is_geoseries(value: Any) -> bool:
    return any(cls.__name__ == "GeoSeries" for cls in type(value).__mro__)


AOI_HELP: Final = (
    "give a bbox [minLon, minLat, maxLon, maxLat], a GeoJSON geometry (dict), a shapely geometry, a "
    "GeoDataFrame (one mosaic per row) or the path/URI of a GeoParquet/GeoJSON file"
)


# ------------------------------------------------------------------------------ the client


def _labelled(kind: Kind, method: str) -> Any:
    """Prefix a UserError raised while building the spec with ``method(): Kind/name:``."""

    def decorate(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(self: Client, name: str, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, name, *args, **kwargs)
            except UserError as exc:
                label = f"{method}(): "
                if type(exc) is not UserError or str(exc).startswith(label):  # already labelled
                    raise
                raise UserError(f"{label}{kind.value}/{name}: {exc}") from None

        return wrapper

    return decorate


class Client:
    """Create rasterkube resources from Python and get their outputs back.

    ``Client(local=True)`` runs everything in this process (embedded Ray, or ``RAY_ADDRESS``),
    outputs under ``storage_root`` (default ``RASTERKUBE_STORAGE_ROOT`` or
    ``./rasterkube-data``). ``Client()`` creates the custom resources in the cluster of
    ``kubeconfig`` (default ``KUBECONFIG``/``~/.kube/config``, or in-cluster) in ``namespace``;
    the operator runs them and the client waits on their status with a progress bar.

    Every method returns a :class:`Result` (``.uri``, ``.open()``, ``.mosaics``,
    ``.first_row_mosaic``, ``.summary``, ``.status``) or raises: a
    :class:`~rasterkube.errors.UserError` (a ``ValueError``) for bad arguments, naming the
    parameter, with nothing created or written; :class:`~rasterkube.errors.ResourceFailed`
    when the run failed (the message is the status message);
    :class:`~rasterkube.errors.WaitTimeout` when ``timeout`` passed (the run goes on).

    Example::

        import rasterkube
        client = rasterkube.Client(local=True)
        mosaic = client.build_mosaics("landsat", "landsat-c2-l2", aoi=[-106.924, 40.281, -106.904, 40.296],
                                      start="2008-01-01", end="2014-01-01", window="P1Y",
                                      bands=["red", "nir08", "swir16"], stac="out/stac/catalog.json")
        change = client.run_mosaics_change("landsat-change", mosaic, methods=["difference", "looMedoid"])
        polygons = client.vectorize_mosaic("landsat-change-polygons", change,
                                           features=["loo_medoid_euclidean_distance_robust_time_zscore"], threshold=3)
        polygons.open()        # GeoDataFrame
    """

    def __init__(
        self,
        namespace: str = "default",
        local: bool = False,
        storage_root: str | os.PathLike[str] | None = None,
        kubeconfig: str | os.PathLike[str] | None = None,
        *,
        context: str | None = None,
        progress: bool = True,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        dry_run: bool = False,
        api: CustomObjects | None = None,
    ) -> None:
        if not isinstance(namespace, str) or len(namespace) > 63 or not re.match(NAME_PATTERN, namespace) or "." in namespace:
            raise UserError(f"namespace: {namespace!r} is not a valid namespace name (lowercase letters, digits and '-')")
        self.namespace = namespace
        self.local = local
        self.progress = progress
        self.timeout = timeout
        self.dry_run = dry_run
        root = os.fspath(storage_root) if storage_root is not None else None
        self._storage_root = root
        self._local: LocalBackend | None = None
        self._cluster: ClusterBackend | None = None
        if local:
            self._local = LocalBackend(namespace, root)
        elif not dry_run or api is not None:
            self._cluster = ClusterBackend(
                namespace, api=api, kubeconfig=os.fspath(kubeconfig) if kubeconfig else None, context=context,
                poll_interval_s=poll_interval,
            )  # fmt: skip

    def __repr__(self) -> str:
        mode = f"local, storage_root={self.storage_root!r}" if self.local else "cluster"
        return f"Client(namespace={self.namespace!r}, {mode})"

    @property
    def storage_root(self) -> str | None:
        """Where local outputs (and GeoDataFrame AOIs) go; in cluster mode only what you gave
        or ``RASTERKUBE_STORAGE_ROOT`` (the operator picks the outputs' default location)."""
        if self._local is not None:
            return self._local.root
        root = self._storage_root or os.environ.get(ENV_STORAGE_ROOT)
        return storage.normalize(root) if root else None

    # ------------------------------------------------------------------ the four kinds

    @_labelled(Kind.MOSAIC, "build_mosaics")
    def build_mosaics(
        self,
        name: str,
        dataset: str,
        aoi: Any,
        start: Any,
        end: Any,
        window: str | None = None,
        bands: Sequence[str] | str | None = None,
        crs: Any = None,
        resolution: float | None = None,
        max_cloud_cover: float | None = None,
        chunk_size: int | None = None,
        stac: Any = None,
        multiscales: bool = False,
        output_uri: str | None = None,
        *,
        resources: Mapping[str, Any] | None = None,
        wait: bool = True,
    ) -> Result:
        """A cloud-masked composite per ``window`` (ISO-8601, e.g. ``P1Y``) of ``dataset``
        (``sentinel-2-l2a``, ``sentinel-2-l2a-best``, ``landsat-c2-l2``) over ``aoi`` in
        ``[start, end)``.

        ``aoi``: a bbox ``[minLon, minLat, maxLon, maxLat]``, a GeoJSON geometry, a shapely
        geometry, a GeoDataFrame (written as GeoParquet under the storage root; one mosaic per
        row plus a mosaic index, see :attr:`Result.mosaics`) or a GeoParquet/GeoJSON path/URI.
        ``stac``: a STAC API URL or a static ``catalog.json`` (default: Earth Search).
        ``crs``: ``"EPSG:32633"``, an EPSG code or a pyproj CRS (default: native UTM);
        ``max_cloud_cover`` (percent, default 75), ``chunk_size`` (px, default 512)."""
        aoi_spec, frame = self._aoi(aoi, name)
        spec = _drop_none({
            "dataset": dataset,
            "stac": _stac(stac),
            "aoi": aoi_spec,
            "time": _drop_none({"start": _date(start), "end": _date(end), "window": window}),
            "bands": _list(bands),
            "crs": _crs(crs),
            "resolution": resolution,
            "maxCloudCover": max_cloud_cover,
            "chunkSize": chunk_size,
            "output": _output(output_uri, multiscales),
            "resources": resources,
        })  # fmt: skip
        return self._submit(Kind.MOSAIC, name, spec, "build_mosaics", wait, aoi_frame=frame)

    @_labelled(Kind.PREDICTION, "predict_mosaic")
    def predict_mosaic(
        self,
        name: str,
        mosaic: Any,
        model_uri: str,
        actor: str,
        features: Sequence[str] | str,
        labels: Sequence[str] | str,
        patch_size: int | None = None,
        clip_size: int | None = None,
        merge_mode: str | None = None,
        max_batch_size: int | None = None,
        device: str = "auto",
        replicas: int = 1,
        gpus_per_replica: float = 0,
        *,
        xy_block_multiplier: int | None = None,
        max_replicas: int | None = None,
        cpus_per_replica: float | None = None,
        share_deployment: bool | None = None,
        precision: str | None = None,
        compile: bool | None = None,  # noqa: A002 - the spec field's name
        multiscales: bool = False,
        output_uri: str | None = None,
        resources: Mapping[str, Any] | None = None,
        wait: bool = True,
    ) -> Result:
        """Patch-batched PyTorch inference over ``mosaic`` (a result, a Mosaic's name or a
        store URI), hosted by Ray Serve.

        ``model_uri``: a ``.pt2``/TorchScript file (path, ``s3://``, ``https://``,
        ``hf://org/repo/file``); ``actor``: ``semanticSegmentation``, ``changeDetection``,
        ``regression`` or ``embedding`` (snake_case works too); ``features``: source band
        labels in the model's input order; ``labels``: one per output channel.
        ``merge_mode``: ``clip`` or ``weightedAverage``; ``device``: ``auto``, ``cpu``, ``cuda``;
        ``precision``: ``fp32``, ``bf16`` or ``fp16`` (CUDA only); ``compile``: torch.compile per replica."""
        serving = _drop_none({
            "replicas": replicas,
            "maxReplicas": max_replicas,
            "cpusPerReplica": cpus_per_replica,
            "gpusPerReplica": gpus_per_replica,
            "shareDeployment": share_deployment,
        })  # fmt: skip
        if gpus_per_replica and not (resources or {}).get("gpus"):
            # GPU replicas need GPU workers (KubeRay sizes them from resources): enough GPUs for
            # the replicas asked for, unless the caller sized the workers themselves.
            resources = {**(resources or {}), "gpus": math.ceil(gpus_per_replica * (replicas or 1))}
        spec = _drop_none({
            "source": self._source(mosaic, (Kind.MOSAIC,), "mosaic"),
            "model": {"uri": os.fspath(model_uri) if isinstance(model_uri, os.PathLike) else model_uri,
                      "actor": _camel_value(actor), "features": _list(features), "labels": _list(labels)},
            "patchSize": patch_size,
            "clipSize": clip_size,
            "mergeMode": _camel_value(merge_mode),
            "maxBatchSize": max_batch_size,
            "xyBlockMultiplier": xy_block_multiplier,
            "device": device,
            "precision": precision,
            "compile": compile,
            "serving": serving,
            "output": _output(output_uri, multiscales),
            "resources": resources,
        })  # fmt: skip
        return self._submit(Kind.PREDICTION, name, spec, "predict_mosaic", wait)

    @_labelled(Kind.CHANGE_SCORE, "run_mosaics_change")
    def run_mosaics_change(
        self,
        name: str,
        source: Any,
        methods: Sequence[str] | str = ("looMedoid",),
        distance: str = "euclidean",
        robust_time_zscore: bool = True,
        selector: Mapping[str, Any] | Sequence[float] | None = None,
        clustering: Mapping[str, Any] | int | None = None,
        *,
        data_var: str | None = None,
        bands: Sequence[str] | str | None = None,
        xy_block_multiplier: int | None = None,
        multiscales: bool = False,
        output_uri: str | None = None,
        resources: Mapping[str, Any] | None = None,
        wait: bool = True,
    ) -> Result:
        """Per-pixel temporal change scores of ``source`` (a Mosaic or embedding Prediction
        result, a resource name, ``(kind, name)`` or a store URI).

        ``methods``: ``difference``, ``looMedoid``, ``clusterTransition``; ``distance``:
        ``euclidean``, ``cosine``, ``alphaEarthCosine``; ``selector``: ``{"x": [0, 100],
        "y": [0, 100]}``, ``{"bbox": [...], "bbox_crs": "EPSG:4326"}`` or a lon/lat bbox list;
        ``clustering``: ``{"k": 5, "method": "kmeans"}`` or just ``k``. Bands are named
        ``<method>_<metric>_distance[_robust_time_zscore]``."""
        if selector is not None and not isinstance(selector, Mapping):
            selector = {"bbox": list(selector)}
        if isinstance(clustering, int) and not isinstance(clustering, bool):
            clustering = {"k": clustering}
        spec = _drop_none({
            "source": self._source(source, (Kind.MOSAIC, Kind.PREDICTION), "source"),
            "dataVar": data_var,
            "bands": _list(bands),
            "methods": [_camel_value(m) for m in _list(methods) or []],
            "distance": _camel_value(distance),
            "robustTimeZScore": robust_time_zscore,
            "selector": dict(selector) if selector is not None else None,
            "clustering": dict(clustering) if clustering is not None else None,
            "xyBlockMultiplier": xy_block_multiplier,
            "output": _output(output_uri, multiscales),
            "resources": resources,
        })  # fmt: skip
        return self._submit(Kind.CHANGE_SCORE, name, spec, "run_mosaics_change", wait)

    @_labelled(Kind.VECTORIZATION, "vectorize_mosaic")
    def vectorize_mosaic(
        self,
        name: str,
        source: Any,
        features: Sequence[str] | str,
        threshold: float,
        stats: bool = True,
        min_area: float | None = None,
        simplify_tolerance: float | None = None,
        connectivity: int = 4,
        *,
        medial_skeletonize: bool | None = None,
        method: str | None = None,
        crs: Any = None,
        pmtiles: bool | None = None,
        output_uri: str | None = None,
        resources: Mapping[str, Any] | None = None,
        wait: bool = True,
    ) -> Result:
        """Polygons (GeoParquet, EPSG:4326 unless ``crs``) of the pixels above ``threshold`` in
        each band of ``features`` of ``source`` (a Prediction/ChangeScore/Mosaic result, a
        resource name, ``(kind, name)`` or a store URI). ``min_area`` in m²,
        ``simplify_tolerance`` in CRS units, ``connectivity`` 4 or 8."""
        spec = _drop_none({
            "source": self._source(source, (Kind.PREDICTION, Kind.CHANGE_SCORE, Kind.MOSAIC), "source"),
            "features": _list(features),
            "threshold": threshold,
            "method": method,
            "stats": stats,
            "medialSkeletonize": medial_skeletonize,
            "simplifyTolerance": simplify_tolerance,
            "minArea": min_area,
            "connectivity": connectivity,
            "output": _output(output_uri, crs=_crs(crs), pmtiles=pmtiles),
            "resources": resources,
        })  # fmt: skip
        return self._submit(Kind.VECTORIZATION, name, spec, "vectorize_mosaic", wait)

    def build_zarr_multiscales(self, store_or_result: Any, min_size: int | None = None) -> Result:
        """Add (or rebuild) the multiscale pyramid of committed GeoZarr stores, atomically:
        child groups ``0..N`` (×2 coarser each), readable with ``xarray.open_datatree``.

        Takes a result (every store of a multi-row Mosaic) or a store URI; runs from this
        process on Ray (``RAY_ADDRESS`` or an embedded Ray). To get pyramids from the job
        itself, pass ``multiscales=True`` when creating the resource instead."""
        from rasterkube import multiscale
        from rasterkube.runtime.executor import ensure_ray

        if isinstance(store_or_result, Result):
            result = store_or_result
            if result.kind == Kind.VECTORIZATION:
                raise UserError(f"store_or_result: {result.label} is vector data; multiscales are for GeoZarr stores")
            uris = result.stores()
        elif isinstance(store_or_result, (str, os.PathLike)):
            uri = storage.normalize(os.fspath(store_or_result))
            result = Result(None, uri, self.namespace, {"phase": Phase.SUCCEEDED.value,
                                                        "outputs": {"uri": uri, "summary": {}}}, client=self)  # fmt: skip
            uris = [uri]
        else:
            raise UserError(f"store_or_result: give a result or a store URI (got {type(store_or_result).__name__})")
        for uri in uris:  # fails early, before Ray starts, unless every store is complete
            from rasterkube.geozarr import describe

            multiscale.check_rewritable(describe(uri))
        ensure_ray()
        levels: list[list[int]] = []
        for uri in uris:
            bar = progress_bar(f"multiscales {uri.rstrip('/').rsplit('/', 1)[-1]}", self.progress)
            reporter = _BarReporter(bar)
            try:
                grids = multiscale.build_committed(uri, reporter=reporter, min_size=min_size or multiscale.MIN_SIZE)
            finally:
                bar.close()
            levels = [list(g.shape) for g in grids]
        outputs = dict(result.outputs)
        outputs["summary"] = {**result.summary, "multiscales": levels}
        return result._with(status={**result.status, "outputs": outputs})

    # ------------------------------------------------------------------ generic operations

    def get(self, kind: Any, name: str) -> Result:
        """The resource's current state (cluster: from the API server; local: this session's
        run, or a committed output at the default location)."""
        k = parse_kind(kind)
        if self._local is not None:
            found = self._local.get(k, name)
            if found is None:
                raise ResourceNotFound(
                    f"{k.value}/{name}: not run in this session and no output at {self._local.default_output(k, name)}"
                )
            found.client = self
            return found
        obj = self._require_cluster().get(k, name)
        if obj is None:
            raise ResourceNotFound(f"{k.value}/{name}: not found in namespace {self.namespace!r}")
        return result_from_object(obj, self)

    def delete(self, kind: Any, name: str | None = None, outputs: bool = False) -> bool:
        """Delete the resource (cluster: the operator stops its job); ``outputs=True`` also
        removes its output. ``kind`` may be a result. True if something was deleted."""
        if isinstance(kind, Result):
            name = kind.name
        if name is None:
            raise UserError("name: give the resource's name (or pass a result)")
        k = parse_kind(kind)
        uri = None
        if outputs:
            try:
                uri = self.get(k, name).uri
            except ResourceNotFound:
                uri = None
        deleted = False
        if self._local is not None:
            deleted = self._local.forget(k, name) is not None
        else:
            deleted = self._require_cluster().delete(k, name)
        if uri:
            deleted = storage.exists(uri) or deleted
            storage.remove(uri)
        return deleted

    def usage(self, kind: Any = None, namespace: str | None = None) -> Usage:
        """What the resources' last successful runs cost, summed (``status.usage``): CPU and
        GPU seconds, bytes read and written, object-store requests and wall time add up; the
        peak memory is the largest of one process. ``kind``: one kind (default all);
        ``namespace``: default the client's. Local mode sums this session's runs."""
        kinds = [parse_kind(kind)] if kind is not None else list(Kind)
        ns = namespace or self.namespace
        if self._local is not None:
            statuses = [r.status for (k, _), r in self._local.runs.items() if k in kinds and ns == self.namespace]
        else:
            cluster = self._require_cluster()
            statuses = [obj.get("status") or {} for k in kinds for obj in cluster.list(k, ns)]
        total = Usage()
        for status in statuses:
            if status.get("usage"):
                total = total + Usage.from_dict(status["usage"])
        return total

    def plan(
        self,
        *manifests: str | os.PathLike[str] | Mapping[str, Any],
        calibration: str | os.PathLike[str] | None = None,
        workers: int | None = None,
        cpus_per_worker: float | None = None,
        gpus: float | None = None,
    ) -> list[Any]:
        """What running ``manifests`` would cost, without running them (``rasterkube plan``):
        one :class:`rasterkube.planning.Estimate` per resource, in dependency order — blocks
        and patches, bytes read and written, object-store requests, peak memory per worker,
        core-, GPU- and wall time (``.to_dict()`` for the JSON form).

        ``manifests``: paths of YAML files, or manifests as dicts (their namespace defaults to
        the client's); refs between them are planned on the upstream's planned output.
        ``calibration``: a calibration JSON of another machine (default: the shipped one);
        ``workers``, ``cpus_per_worker``, ``gpus``: the sizing to assume instead of each
        resource's ``spec.resources``. Only metadata is read (source stores, the STAC search
        of a Mosaic, the model file's hash)."""
        from rasterkube import manifests as mf
        from rasterkube import runner
        from rasterkube.planning import calibration as cal
        from rasterkube.planning import inputs

        if not manifests:
            raise UserError("manifests: give at least one manifest file or manifest dict")
        items: list[mf.Loaded] = []
        for i, m in enumerate(manifests):
            if isinstance(m, Mapping):
                doc = dict(m)
                meta = dict(doc.get("metadata") or {})
                meta.setdefault("namespace", self.namespace)
                items.append(mf.validate({**doc, "metadata": meta}, f"manifests[{i}]"))
            else:
                items.extend(mf.load([os.fspath(m)]))
        root = self.storage_root or runner.storage_root()
        return inputs.plan_manifests(items, root, cal.load(calibration), workers=workers,
                                     cpus_per_worker=cpus_per_worker, gpus=gpus)  # fmt: skip

    def wait(self, result: Result, timeout: float | None = None) -> Result:
        """Block until ``result``'s resource succeeded, with a progress bar; the final result.
        Raises ResourceFailed (phase Failed / Stalled, or its source failed) or WaitTimeout."""
        if result.kind is None:
            return result
        if self._local is not None:
            if result.phase == Phase.FAILED:
                raise ResourceFailed(result.kind, result.name, str(result.progress.get("message", "")), result.status)
            return result
        kind = Kind(result.kind)
        generation = (result.manifest.get("metadata") or {}).get("generation")
        bar = progress_bar(result.label, self.progress)
        try:
            obj = self._require_cluster().wait(kind, result.name, timeout if timeout is not None else self.timeout,
                                               bar.update, generation)  # fmt: skip
        finally:
            bar.close()
        return result_from_object(obj, self)

    # ------------------------------------------------------------------ internals

    def _require_cluster(self) -> ClusterBackend:
        if self._cluster is None:
            raise UserError("this client has no cluster connection (dry_run=True without api); use Client() or local=True")
        return self._cluster

    def _exists(self, kind: Kind, name: str) -> bool:
        if self._local is not None:
            return self._local.exists(kind, name)
        if self._cluster is None:
            return False
        return self._cluster.exists(kind, name)

    def _source(self, value: Any, allowed: tuple[Kind, ...], param: str) -> dict[str, Any]:
        names = " or ".join(k.value for k in allowed)
        if isinstance(value, Result):
            if value.kind is None:
                return {"uri": value._require_uri()}
            kind = Kind(value.kind)
            if kind not in allowed:
                raise UserError(f"{param}: this reads a {names} (or a store URI); got the {value.label} result")
            if value.is_index:
                raise UserError(
                    f"{param}: {value.label} is a mosaic index of {len(value.stores())} stores; pass one of them: "
                    f"{param}=result.first_row_mosaic or result.mosaics.location[i]"
                )
            if value.namespace == self.namespace and value.kind is not None:
                return {REF_FIELDS[kind]: {"name": value.name}}
            return {"uri": value._require_uri()}
        if isinstance(value, tuple) and len(value) == 2:
            kind = parse_kind(value[0])
            if kind not in allowed:
                raise UserError(f"{param}: this reads a {names} (or a store URI); got a {kind.value}")
            return {REF_FIELDS[kind]: {"name": str(value[1])}}
        if isinstance(value, os.PathLike):
            return {"uri": os.fspath(value)}
        if isinstance(value, str) and value:
            if _looks_like_uri(value):
                return {"uri": value}
            found = [k for k in allowed if self._exists(k, value)]
            unknowable = self._local is None and self._cluster is None  # dry run without a cluster
            if len(found) == 1 or (not found and (len(allowed) == 1 or unknowable)):
                return {REF_FIELDS[(found or allowed)[0]]: {"name": value}}
            if found:
                kinds = ", ".join(k.value for k in found)
                raise UserError(f"{param}: {value!r} names a {kinds}; say which: {param}=(kind, {value!r}) or the result")
            raise UserError(
                f"{param}: no {names} named {value!r} in namespace {self.namespace!r}; pass its result, "
                f"(kind, name) or a store URI"
            )
        raise UserError(
            f"{param}: give a result, a resource name, (kind, name) or a store URI (got {type(value).__name__})"
        )

    def _aoi(self, aoi: Any, name: str) -> tuple[dict[str, Any], Any]:
        """``spec.aoi`` for ``aoi``, and a GeoDataFrame to write to its ``uri`` (or None)."""
        if isinstance(aoi, (str, os.PathLike)):
            text = os.fspath(aoi)
            return {"uri": storage.normalize(text) if self.local else text}, None
        if isinstance(aoi, Mapping):
            if set(aoi) & {"bbox", "geometry", "uri"} and "type" not in aoi:
                return dict(aoi), None  # already the aoi block
            kind = aoi.get("type")
            if kind == "Feature":
                return {"geometry": dict(aoi.get("geometry") or {})}, None
            if kind == "FeatureCollection":
                import geopandas

                try:
                    frame = geopandas.GeoDataFrame.from_features(aoi, crs="EPSG:4326")
                except Exception as exc:  # noqa: BLE001 — bad user input, reported as such
                    raise UserError(f"aoi: not a GeoJSON FeatureCollection ({exc})") from None
                return self._aoi(frame, name)
            return {"geometry": dict(aoi)}, None
        if isinstance(aoi, (list, tuple)):
            if len(aoi) != 4 or not all(isinstance(v, (int, float)) for v in aoi):
                raise UserError(f"aoi: a bbox is [minLon, minLat, maxLon, maxLat] (got {list(aoi)!r}); or {AOI_HELP}")
            return {"bbox": [float(v) for v in aoi]}, None
        if _is_geoseries(aoi):
            import geopandas

            return self._aoi(geopandas.GeoDataFrame(geometry=aoi), name)
        if _is_geodataframe(aoi):
            if len(aoi) == 0:
                raise UserError("aoi: the GeoDataFrame has no rows; give at least one polygon")
            if aoi.crs is None:
                raise UserError("aoi: the GeoDataFrame has no CRS; set one, e.g. frame.set_crs('EPSG:4326')")
            root = self.storage_root
            if root is None:
                raise UserError(
                    f"aoi: a GeoDataFrame is written as GeoParquet under the storage root for the cluster to read; "
                    f"pass Client(storage_root='s3://bucket/prefix') or set {ENV_STORAGE_ROOT}, or pass aoi as a URI"
                )
            return {"uri": storage.join(root, self.namespace, AOI_DIR, f"{name}.parquet")}, aoi
        geo = getattr(aoi, "__geo_interface__", None)
        if isinstance(geo, Mapping):  # shapely geometries and anything else speaking the protocol
            return self._aoi(dict(geo), name)
        raise UserError(f"aoi: {AOI_HELP} (got {type(aoi).__name__})")

    def _validate(self, kind: Kind, name: str, spec: dict[str, Any], method: str) -> Resource[Any]:
        label = f"{method}(): {kind.value}/{name}"
        if not isinstance(name, str) or len(name) > 253 or not re.match(NAME_PATTERN, name):
            raise UserError(
                f"{label}: name: {name!r} is not a valid resource name; use lowercase letters, digits, '-' and '.', "
                "starting and ending with a letter or digit"
            )
        doc = {"apiVersion": API_VERSION, "kind": kind.value,
               "metadata": {"name": name, "namespace": self.namespace}, "spec": spec}  # fmt: skip
        try:
            return RESOURCE_MODELS[kind].model_validate(doc)
        except ValidationError as exc:
            lines = format_validation_error(exc).splitlines()
            raise ManifestError([f"{label}: {_with_param(line, kind)}" for line in lines]) from None

    def _submit(self, kind: Kind, name: str, spec: dict[str, Any], method: str, wait: bool,
                aoi_frame: Any = None) -> Result:  # fmt: skip
        resource = self._validate(kind, name, spec, method)
        manifest = resource.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")
        if self.dry_run:
            return Result(kind.value, name, self.namespace, {"phase": Phase.PENDING.value}, manifest, self)
        written = _write_aoi(aoi_frame, manifest["spec"]["aoi"]["uri"]) if aoi_frame is not None else None
        try:
            if self._local is not None:
                return self._run_local(resource, manifest, method)
            obj = self._require_cluster().apply(manifest)
        except UserError:
            if written is not None:  # nothing was created: leave nothing behind
                storage.remove(written[0])
                if written[1] is not None:
                    shutil.rmtree(written[1], ignore_errors=True)
            raise
        result = result_from_object(obj, self)
        return self.wait(result) if wait else result

    def _run_local(self, resource: Resource[Any], manifest: dict[str, Any], method: str) -> Result:
        assert self._local is not None
        bar = progress_bar(f"{resource.kind}/{resource.name}", self.progress)
        try:
            result = self._local.run(resource, manifest, f"{method}()", bar.update)
        finally:
            bar.close()
        result.client = self
        return result


class _BarReporter:
    """A job Reporter that drives a progress bar."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def progress(self, percent: float, message: str, reason: str | None = None) -> None:
        self._bar.update(int(max(0.0, min(100.0, percent))), message, reason)


def _param_for(path: str, kind: Kind) -> str | None:
    table = {**_COMMON_PARAMS, **_PARAMS.get(kind, {})}
    for prefix in sorted(table, key=len, reverse=True):
        if path == prefix or path.startswith((prefix + ".", prefix + "[")):
            return table[prefix]
    parts = [re.sub(r"\[\d+\]$", "", p) for p in path.split(".")]
    if not parts or parts[0] != "spec" or len(parts) < 2:
        return None
    rest = parts[1:]
    while len(rest) > 1 and rest[0] in _CONTAINERS:
        rest = rest[1:]
    return _snake(rest[0])


def _with_param(line: str, kind: Kind) -> str:
    """``spec.maxCloudCover: msg`` → ``max_cloud_cover: msg (spec.maxCloudCover)``."""
    path, sep, message = line.partition(": ")
    if not sep:
        return line
    param = _param_for(path, kind)
    if param is None or param == path:
        return line
    return f"{param}: {message} ({path})"


def _write_aoi(frame: Any, uri: str) -> tuple[str, str | None]:
    """Write the AOI GeoDataFrame as GeoParquet at ``uri`` (atomically): ``uri`` and the first
    local directory this created (None if none), so a refused request can remove both."""
    import uuid

    created = None
    if "://" not in uri:
        missing = os.path.dirname(uri)
        while not os.path.exists(os.path.dirname(missing)) and os.path.dirname(missing) != missing:
            missing = os.path.dirname(missing)
        created = None if os.path.exists(missing) else missing
    try:
        storage.commit_file(lambda path: frame.to_parquet(path, write_covering_bbox=True), uri, uuid.uuid4().hex[:12])
    except (OSError, ValueError) as exc:
        raise UserError(f"aoi: could not write the GeoDataFrame to {uri} ({type(exc).__name__}: {exc})") from None
    return uri, created
