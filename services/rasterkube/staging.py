"""Resumable raster jobs: a deterministic staging store and the ledger of its finished blocks.

A raster job (Mosaic, Prediction, ChangeScore) writes its blocks into a hidden sibling of its
output — the *staging* store — and commits it at the end (:func:`rasterkube.storage.commit`).
The staging's name is a digest of everything that decides the output's bytes (a
:class:`StageKey`): the resource (its uid; namespace/name without Kubernetes), its
generation, :attr:`Resource.spec_hash` and the identity of its inputs (this commit of the
source store, the model's sha256, the STAC scenes found). A rerun of the same work — the
RayJob retried by KubeRay's ``backoffLimit``, the operator submitting again after a
restart, ``rasterkube run`` started again after an interrupt — finds the staging of the run
that died and continues from its ledger; any change gets another staging, and the stagings
of older keys of the same output are removed, so stale blocks are never reused.

The ledger lives in the staging store (``.ledger/``, a name zarr never lists as a member):

- ``stage.json``: the key's parts, written *after* the store's metadata. A staging without
  it (the run died while creating the store, or had finished its blocks) is not resumable
  and is removed.
- ``blocks/<y0>-<y1>-<x0>-<x1>.<result>``: one empty object per finished block, written by
  the block task itself right after the block's last chunk was written, so a marker never
  names a block whose chunks are not all there. The block's result (a count the summary
  adds up) is in the name.

Why one object per block, not one ledger file: object stores cannot append, so a shared
file would be rewritten whole by every task — concurrent tasks would lose each other's
entries (read-modify-write), and each write would grow with the job. A marker object is one
small PUT that appears whole or not at all, needs no coordination between tasks and no
driver in the loop (tasks on other nodes record their own blocks), and the whole ledger is
read back with one LIST per 1000 blocks — the reason the result is in the key, not in the
body (a GET per block would cost a million requests on a continental job).

Blocks are idempotent: the same block of the same key writes the same bytes (deterministic
numerics, chunk-aligned blocks), so a block whose marker was lost is simply written again.
Before the pyramid and the commit, which move and copy the store, the ledger is deleted
(:meth:`Stage.seal`): a run killed after that starts over, and nothing but a commit makes
the output appear at its URI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from rasterkube import storage
from rasterkube.api import Resource
from rasterkube.grid import Window

log = logging.getLogger(__name__)

LEDGER_DIR: Final = ".ledger"
STAGE_FILE: Final = "stage.json"
BLOCKS_DIR: Final = "blocks"
#: Hex digits of the key's sha256 in the staging name (64 bits: no collisions in practice).
KEY_CHARS: Final = 16
_MARKER = re.compile(r"^(\d+)-(\d+)-(\d+)-(\d+)\.(\d+)$")


@dataclass(frozen=True)
class StageKey:
    """What a staging store's blocks depend on; its digest names the staging."""

    resource: str  # the uid, or namespace/name where there is none (``rasterkube run``)
    generation: int | None
    spec_hash: str
    inputs: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "generation": self.generation,
            "specHash": self.spec_hash,
            "inputs": dict(self.inputs),
        }

    @property
    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def stage_key(resource: Resource[Any], inputs: Mapping[str, str | None]) -> StageKey:
    """The key of ``resource``'s run with these inputs (source version, model sha256, ...)."""
    meta = resource.metadata
    identity = meta.uid or f"{meta.namespace}/{meta.name}"
    pairs = tuple(sorted((k, v or "") for k, v in inputs.items()))
    return StageKey(identity, meta.generation, resource.spec_hash, pairs)


def marker_name(block: Window, result: int) -> str:
    return f"{block.y0}-{block.y1}-{block.x0}-{block.x1}.{int(result)}"


def parse_marker(name: str) -> tuple[Window, int] | None:
    """(block, result) of a marker name; None for anything else in the directory."""
    match = _MARKER.match(name)
    if match is None:
        return None
    y0, y1, x0, x1, result = (int(g) for g in match.groups())
    return Window(y0, y1, x0, x1), result


def results_from_markers(names: Iterable[str]) -> dict[Window, int]:
    finished: dict[Window, int] = {}
    for name in names:
        parsed = parse_marker(posixpath.basename(name.rstrip("/")))
        if parsed is not None:
            finished[parsed[0]] = parsed[1]
    return finished


@dataclass(frozen=True)
class BlockLedger:
    """Where a staging's finished blocks are recorded; small, so it travels with every task."""

    uri: str

    def record(self, block: Window, result: int) -> None:
        """Mark ``block`` finished (call after all of its chunks are written)."""
        fs, path = storage.filesystem(self.uri)
        fs.pipe_file(posixpath.join(path, marker_name(block, result)), b"")

    def read(self) -> dict[Window, int]:
        """Every recorded block and its result."""
        fs, path = storage.filesystem(self.uri)
        fs.invalidate_cache(path)
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return {}
        return results_from_markers(str(n) for n in names)


@dataclass(frozen=True)
class Stage:
    """The staging store of one run: fresh, or resumed with the blocks already finished."""

    uri: str
    key: StageKey
    resumed: bool
    finished: Mapping[Window, int] = field(default_factory=dict)

    @property
    def ledger(self) -> BlockLedger:
        return BlockLedger(storage.join(self.uri, LEDGER_DIR, BLOCKS_DIR))

    @property
    def stage_file(self) -> str:
        return storage.join(self.uri, LEDGER_DIR, STAGE_FILE)

    def begin(self) -> None:
        """Open the ledger of a fresh staging (after the store's metadata is written)."""
        if self.resumed:
            return
        fs, blocks = storage.filesystem(self.ledger.uri)
        fs.makedirs(blocks, exist_ok=True)  # a no-op on object stores; local markers need it
        _, stage_file = storage.filesystem(self.stage_file)
        fs.pipe_file(stage_file, json.dumps(self.key.to_dict(), indent=2).encode())

    def reused(self, blocks: Iterable[Window]) -> int:
        """How many of ``blocks`` an earlier run had finished (and this one skips)."""
        return sum(1 for b in blocks if b in self.finished)

    def seal(self) -> None:
        """Delete the ledger: the blocks are done and the store is about to be restructured
        (pyramid) and committed; from here a killed run is not resumed but started over."""
        storage.remove(storage.join(self.uri, LEDGER_DIR))

    def discard(self) -> None:
        storage.remove(self.uri)


def _recorded_key(stage_file: str) -> dict[str, Any] | None:
    fs, path = storage.filesystem(stage_file)
    try:
        return dict(json.loads(fs.cat_file(path)))
    except (FileNotFoundError, ValueError):
        return None


def open_stage(final_uri: str, key: StageKey) -> Stage:
    """The staging of ``final_uri`` for ``key``: resumed when an earlier run of the same key
    left one with a ledger, else fresh (emptied). Stagings of other keys are removed first."""
    final_uri = storage.normalize(final_uri)
    uri = storage.staging_uri(final_uri, key.digest)
    storage.recover(final_uri)  # a commit a killed run left half done is finished first
    # A live run of the same work holds this staging: wait for it to commit or die.
    storage.claim_waiting(uri, on_wait=lambda: log.warning("%s is being written by another run; waiting for it", uri))
    for stale in storage.other_stagings(final_uri, keep=uri):
        log.info("removing the staging of another spec, generation or input: %s", stale)
        storage.remove(stale)
    stage = Stage(uri, key, resumed=True)
    if storage.is_committed(uri) and _recorded_key(stage.stage_file) == key.to_dict():
        finished = stage.ledger.read()
        log.info("resuming %s: %d blocks already finished", uri, len(finished))
        return Stage(uri, key, resumed=True, finished=finished)
    storage.remove(uri, release=False)  # a staging without its ledger: died while starting or finishing
    return Stage(uri, key, resumed=False)
