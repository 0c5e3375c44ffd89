"""What the client's methods return: a resource's outcome and easy access to its output."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

from rasterkube import storage
from rasterkube.constants import Kind, Phase
from rasterkube.errors import UserError

if TYPE_CHECKING:
    from rasterkube.client.core import Client

INDEX_FILE: Final = "index.parquet"
WGS84: Final = "EPSG:4326"
RASTER_KINDS: Final = frozenset({Kind.MOSAIC, Kind.PREDICTION, Kind.CHANGE_SCORE})


@dataclass
class Result:
    """A resource run through the :class:`~rasterkube.Client` (or a store given by URI).

    ``kind`` and ``name`` say what it is (``kind`` is None for a plain store URI),
    ``status`` is the resource's status (``phase``, ``progress``, ``outputs``, ``conditions``,
    …), ``manifest`` the resource as created. ``uri`` and ``summary`` come from
    ``status.outputs``.
    """

    kind: str | None
    name: str
    namespace: str
    status: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)
    client: Client | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------- status
    @property
    def phase(self) -> str:
        return str(self.status.get("phase") or Phase.PENDING)

    @property
    def succeeded(self) -> bool:
        return self.phase == Phase.SUCCEEDED

    @property
    def outputs(self) -> dict[str, Any]:
        return dict(self.status.get("outputs") or {})

    @property
    def uri(self) -> str | None:
        """Where the output is: a GeoZarr store, a directory of stores with ``index.parquet``
        (a multi-row Mosaic) or a GeoParquet file (a Vectorization). None until it succeeded."""
        return self.outputs.get("uri")

    @property
    def summary(self) -> dict[str, Any]:
        """What the output holds: shape, bands, times, feature counts (the job's summary)."""
        return dict(self.outputs.get("summary") or {})

    @property
    def progress(self) -> dict[str, Any]:
        return dict(self.status.get("progress") or {})

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.name}" if self.kind else self.name

    def __repr__(self) -> str:
        return f"Result({self.label}, phase={self.phase}, uri={self.uri!r})"

    def _require_uri(self) -> str:
        if not self.uri:
            raise UserError(
                f"{self.label} has no output yet (phase {self.phase}); wait for it: client.wait(result)"
            )
        return self.uri

    # ------------------------------------------------------------------- refresh / wait
    def refresh(self) -> Result:
        """The latest state of the same resource (cluster mode reads it from the API server)."""
        if self.client is None or self.kind is None:
            return self
        return self.client.get(self.kind, self.name)

    def wait(self, timeout: float | None = None) -> Result:
        """Block until it has succeeded (returns the final result) or raise if it failed."""
        if self.client is None:
            return self
        return self.client.wait(self, timeout=timeout)

    # ------------------------------------------------------------------- outputs
    @property
    def is_index(self) -> bool:
        """True for a Mosaic of a multi-row AOI: one store per row and a mosaic index."""
        if self.kind != Kind.MOSAIC or not self.uri:
            return False
        if self.summary:  # the job's summary says so (an "index" entry); else look
            return bool(self.summary.get("index"))
        return storage.exists(storage.join(self.uri, INDEX_FILE))

    @property
    def index_uri(self) -> str | None:
        if not self.is_index:
            return None
        return str(self.summary.get("index") or storage.join(self._require_uri(), INDEX_FILE))

    @property
    def mosaics(self) -> Any:
        """The mosaic index as a GeoDataFrame (EPSG:4326): one row per GeoZarr store, its URI
        in the ``location`` column. A single-AOI output gives one row: the store's footprint."""
        import geopandas

        uri = self._require_uri()
        if self.kind == Kind.VECTORIZATION:
            raise UserError(f"{self.label} holds vector features, not mosaics: read them with .open()")
        index = self.index_uri
        if index is not None:
            return geopandas.read_parquet(index, storage_options=storage.storage_options(index) or None)
        return footprint_index(uri)

    @property
    def first_row_mosaic(self) -> str:
        """URI of the first row's GeoZarr store (the store itself for a single AOI)."""
        if not self.is_index:
            return self._require_uri()
        locations = self.summary.get("locations")
        if locations:
            return str(locations[0])
        return str(self.mosaics["location"].iloc[0])

    def open(self, row: int | None = None) -> Any:
        """The output: an xarray Dataset for rasters (lazy; ``ds["variables"]`` has dims
        ``(time, band, y, x)``), a GeoDataFrame for a Vectorization. ``row`` picks a store of a
        multi-row Mosaic (default: the first)."""
        uri = self._require_uri()
        if self.kind == Kind.VECTORIZATION:
            import geopandas

            return geopandas.read_parquet(uri, storage_options=storage.storage_options(uri) or None)
        from rasterkube.geozarr import open_dataset

        if self.is_index:
            locations = list(self.mosaics["location"])
            i = 0 if row is None else row
            if not -len(locations) <= i < len(locations):
                raise UserError(f"row: {row} is out of range; {self.label} has {len(locations)} stores")
            return open_dataset(locations[i])
        if row not in (None, 0):
            raise UserError(f"row: {self.label} is a single store; leave row out")
        return open_dataset(uri)

    def stores(self) -> list[str]:
        """Every GeoZarr store of the output (several for a multi-row Mosaic)."""
        if self.kind == Kind.VECTORIZATION:
            return []
        if self.is_index:
            return [str(v) for v in self.mosaics["location"]]
        return [self._require_uri()]

    def _with(self, **changes: Any) -> Result:
        return replace(self, **changes)


def footprint_index(uri: str, key: str = "aoi") -> Any:
    """A one-row mosaic index for one store: its footprint in EPSG:4326 and ``location``."""
    import geopandas
    from shapely.geometry import box

    from rasterkube.geozarr import describe

    info = describe(uri)
    frame = geopandas.GeoDataFrame(
        {"key": [key], "location": [uri], "crs": [info.grid.crs]},
        geometry=[box(*info.grid.bbox)],
        crs=info.grid.crs,
    )
    return frame.to_crs(WGS84)


def result_from_object(obj: dict[str, Any], client: Client | None = None) -> Result:
    """A result from a custom object as the API server returns it."""
    meta = obj.get("metadata") or {}
    manifest = {k: obj[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in obj}
    return Result(
        kind=obj.get("kind"),
        name=meta.get("name", ""),
        namespace=meta.get("namespace", "default"),
        status=dict(obj.get("status") or {}),
        manifest=manifest,
        client=client,
    )
