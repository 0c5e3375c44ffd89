"""Object-store access and atomic commit of outputs (DESIGN §3 "Outputs are atomic").

A job writes its whole output under a hidden temporary sibling prefix and commits it at the
end. On a local filesystem the commit is a rename. On object stores (no rename) the old
output is removed, every object is copied, and the root ``zarr.json`` — which holds the
consolidated metadata and is what every reader opens first — is copied last, so a store
is only openable once it is complete. The temporary prefix is then deleted.

Stray state (a run killed at any point, two runs at once on one machine)
-----------------------------------------------------------------------
* A run *stages* its output (:func:`stage`): the temporary sibling ``.<name>.tmp-<run id>`` is
  claimed with a lock file beside it, held for as long as the run's process lives. Any later
  stage or commit of the same output removes the siblings whose lock is free — their run is
  dead, whatever killed it — and leaves those of live runs alone.
* Commits of one output are serialized by a lock on the output (beside it; for object stores
  in the local cache, so it serializes the runs of this machine only).
* A local commit is two renames: the old output to ``.<name>.old-<run id>``, the staged one to
  the final name. A run killed between them leaves no output; the next stage or commit of it,
  or :func:`recover`, finishes that commit (the staged copy was whole: only a finalized store
  is committed), or puts the old output back if the staged copy is gone.
* Object stores have no locks that outlive a process: a temporary prefix there is stale when
  nothing under it changed for :data:`REMOTE_STALE_AFTER_S` (a live run writes chunks all the
  time); a commit killed mid-copy leaves the output without its root metadata, which does
  not open, and the next commit of it replaces it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import fsspec
from filelock import FileLock
from fsspec.implementations.local import LocalFileSystem

from rasterkube import locks

ROOT_METADATA: Final = "zarr.json"
TMP_MARKER: Final = ".tmp-"
OLD_MARKER: Final = ".old-"
#: Deterministic staging of a raster job (:mod:`rasterkube.staging`), unlike ``TMP_MARKER``.
STAGE_MARKER: Final = ".stage-"
ENV_S3_ENDPOINT: Final = "AWS_ENDPOINT_URL"
# A temporary prefix on an object store with nothing written under it for this long belongs to
# a dead run (runs write chunks continuously; a day is far beyond any pause in one).
REMOTE_STALE_AFTER_S: Final = 24 * 3600
COMMIT_LOCKS_DIR: Final = "locks"

log = logging.getLogger(__name__)

# Temporary siblings this process is writing, with the lock that tells other processes so.
_claims: dict[str, FileLock] = {}


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri``: the S3 endpoint comes from AWS_ENDPOINT_URL(_S3)."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(ENV_S3_ENDPOINT)
        return {"endpoint_url": endpoint} if endpoint else {}
    return {}


def normalize(uri: str) -> str:
    """Absolute local paths (so Ray workers in other directories agree); URLs unchanged."""
    if "://" in uri:
        return uri[len("file://") :] if uri.startswith("file://") else uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def _sibling(uri: str, marker: str, token: str) -> str:
    parent, name = uri.rstrip("/").rsplit("/", 1)
    return f"{parent}/.{name}{marker}{token}"


def temporary_uri(final_uri: str, run_id: str | None = None) -> str:
    """A hidden sibling of ``final_uri`` to write into before the commit."""
    return _sibling(final_uri, TMP_MARKER, run_id or uuid.uuid4().hex[:12])


def staging_uri(final_uri: str, key: str) -> str:
    """The hidden sibling of ``final_uri`` that a job with stage key ``key`` writes into; the
    same for every rerun of the same work, so an interrupted run's blocks are found again."""
    return _sibling(final_uri, STAGE_MARKER, key)


def other_stagings(final_uri: str, keep: str) -> list[str]:
    """Staging siblings of ``final_uri`` other than ``keep``: left by runs of another spec,
    generation or input, whose blocks must never be reused."""
    parent, name = final_uri.rstrip("/").rsplit("/", 1)
    fs, parent_path = filesystem(parent)
    prefix = f".{name}{STAGE_MARKER}"
    fs.invalidate_cache(parent_path)
    try:
        entries = fs.ls(parent_path, detail=False)
    except FileNotFoundError:
        return []
    found = [posixpath.basename(str(e).rstrip("/")) for e in entries]
    names = [n for n in sorted(found) if n.startswith(prefix) and not n.endswith(locks.LOCK_SUFFIX)]
    return [join(parent, n) for n in names if join(parent, n) != keep and not claimed_by_another_run(join(parent, n))]


def _is_local(uri: str) -> bool:
    return "://" not in uri


def stage(final_uri: str, run_id: str | None = None) -> str:
    """The temporary sibling to write ``final_uri`` into, claimed by this process.

    Leftovers of dead runs beside ``final_uri`` are cleaned first (and a commit a dead run left
    half done is finished), so a killed run never leaves the next one stray state. The claim
    ends with :func:`commit` or :func:`remove` of the returned URI, or with the process."""
    final = normalize(final_uri)
    tmp = temporary_uri(final, run_id)
    _claim(tmp)
    recover(final)
    _remove_path(tmp)  # a previous attempt with the same run id may have left a partial prefix
    return tmp


def _claim(tmp: str) -> None:
    if not _is_local(tmp) or tmp in _claims:
        return  # object stores: no lock outlives a process there (age rule in _sweep_remote)
    lock = locks.try_hold(tmp + locks.LOCK_SUFFIX)
    if lock is None:
        raise RuntimeError(f"{tmp} is being written by another live run with the same run id")
    _claims[tmp] = lock


def claim_waiting(uri: str, on_wait: Callable[[], None] | None = None) -> None:
    """Hold ``uri``'s lock for this process (local roots only), waiting while a live run holds it.

    A job's staging is named by its work (:mod:`rasterkube.staging`), so a second run of the
    same work at the same time meets the first one's staging: it waits until that run has
    committed (its staging is gone; it starts afresh) or died (it resumes the ledger)."""
    if not _is_local(uri) or uri in _claims:
        return
    lock = locks.try_hold(uri + locks.LOCK_SUFFIX)
    if lock is None:
        if on_wait is not None:
            on_wait()
        lock = locks.hold(uri + locks.LOCK_SUFFIX)
    _claims[uri] = lock


def claimed_by_another_run(uri: str) -> bool:
    """A live process other than this one holds ``uri``'s lock (local roots; never on object stores)."""
    if not _is_local(uri) or uri in _claims:
        return False
    lock = locks.try_hold(uri + locks.LOCK_SUFFIX)
    if lock is None:
        return True
    locks.drop(lock)
    return False


def _release(tmp: str) -> None:
    lock = _claims.pop(tmp, None)
    if lock is not None:
        locks.drop(lock)


def _commit_lock_path(final: str) -> str:
    """Beside a local output (every process that sees the output sees the lock); in the local
    cache for object stores (there it serializes this machine's runs only)."""
    if _is_local(final):
        parent, name = os.path.split(final)
        return os.path.join(parent, f".{name}{locks.LOCK_SUFFIX}")
    from rasterkube.sampledata import cache_dir

    key = hashlib.sha256(final.encode()).hexdigest()[:32]
    return str(cache_dir() / COMMIT_LOCKS_DIR / f"commit-{key}{locks.LOCK_SUFFIX}")


@contextmanager
def _commit_lock(final: str) -> Iterator[None]:
    path = _commit_lock_path(final)
    if not _is_local(final) and not _writable_dir(os.path.dirname(path)):
        # A pod with a read-only home and no RASTERKUBE_CACHE: the lock only ever serialized
        # this machine's runs of an object-store output, so commit without it.
        log.warning("no writable cache for the commit lock of %s (set RASTERKUBE_CACHE); committing unlocked", final)
        yield
        return
    with locks.held(path):
        yield


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def recover(final_uri: str, *, stale_after_s: float = REMOTE_STALE_AFTER_S) -> None:
    """Clean what dead runs left beside ``final_uri`` and finish a commit one left half done.

    Cheap when there is nothing to do (one directory listing); locks only when there is."""
    final = normalize(final_uri)
    if not _is_local(final):
        _sweep_remote(final, stale_after_s)
        return
    parent, name = os.path.split(final)
    if not _stray_local(parent, name):
        return
    try:
        with _commit_lock(final):
            _recover_local(parent, name)
    except PermissionError as exc:  # a read-only source directory: nothing of ours to clean there
        log.warning("cannot clean stale siblings of %s: %s", final, exc)


def _listdir(parent: str) -> list[str]:
    try:
        return os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _stray_local(parent: str, name: str) -> list[str]:
    prefixes = (f".{name}{TMP_MARKER}", f".{name}{OLD_MARKER}")
    return [e for e in _listdir(parent) if e.startswith(prefixes) and os.path.join(parent, e) not in _claims]


def _remove_path(path: str) -> None:
    if _is_local(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def _recover_local(parent: str, name: str) -> None:
    """With the output's commit lock held: no commit of it is in progress in any live process."""
    _finish_interrupted_commit(parent, name)
    _sweep_dead_siblings(parent, name)


def _finish_interrupted_commit(parent: str, name: str) -> None:
    final = os.path.join(parent, name)
    tmp_prefix, old_prefix = f".{name}{TMP_MARKER}", f".{name}{OLD_MARKER}"
    for entry in sorted(_listdir(parent)):
        if not entry.startswith(old_prefix):
            continue
        old = os.path.join(parent, entry)
        if not os.path.lexists(final):
            # Killed between the two renames of a commit. The staged copy of that run (same
            # token) was whole — only finalized stores are committed — so finish the commit;
            # if it is gone too, put the old output back.
            token = entry[len(old_prefix) :]
            stage_token = STAGE_MARKER.lstrip(".")
            staged = os.path.join(parent, f".{name}{STAGE_MARKER}{token[len(stage_token):]}"
                                  if token.startswith(stage_token) else tmp_prefix + token)  # fmt: skip
            if os.path.exists(os.path.join(staged, ROOT_METADATA)):
                log.warning("finishing the commit of %s that a killed run left half done", final)
                os.rename(staged, final)
            else:
                log.warning("restoring %s, which a killed run's commit had moved aside", final)
                os.rename(old, final)
                continue
        _remove_path(old)


def _sweep_dead_siblings(parent: str, name: str) -> None:
    """Remove the temporary siblings (and their lock files) whose run is not alive."""
    tmp_prefix = f".{name}{TMP_MARKER}"
    for entry in sorted(_listdir(parent)):
        if not entry.startswith(tmp_prefix):
            continue
        path = os.path.join(parent, entry)
        target = path.removesuffix(locks.LOCK_SUFFIX)
        if target in _claims:
            continue  # this process is writing it
        lock = locks.try_hold(target + locks.LOCK_SUFFIX)
        if lock is None:
            continue  # a live run is writing it
        try:
            if os.path.lexists(target):
                log.info("removing %s, left by a run that is no longer alive", target)
                _remove_path(target)
        finally:
            locks.drop(lock)


def _sweep_remote(final: str, stale_after_s: float) -> None:
    fs, path = filesystem(final)
    parent, name = path.rstrip("/").rsplit("/", 1)
    prefix = f".{name}{TMP_MARKER}"
    try:
        fs.invalidate_cache(parent)
        entries = [e for e in fs.ls(parent, detail=False) if posixpath.basename(e.rstrip("/")).startswith(prefix)]
    except FileNotFoundError:
        return
    except OSError as exc:  # e.g. no permission to list the bucket: cleaning is best effort
        log.warning("cannot look for stale temporary outputs beside %s: %s", final, exc)
        return
    now = time.time()
    for entry in entries:
        newest = max((_mtime(info) for info in fs.find(entry, detail=True, withdirs=False).values()), default=None)
        if newest is None:
            newest = _mtime(fs.info(entry))
        if newest is not None and now - newest > stale_after_s:
            log.info("removing %s: nothing was written under it for %.0f s", entry, now - newest)
            fs.rm(entry, recursive=True)


def _mtime(info: dict[str, Any]) -> float | None:
    value = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


def is_committed(uri: str) -> bool:
    """A committed store has its root metadata; a half-copied one does not."""
    fs, path = filesystem(uri)
    return bool(fs.exists(posixpath.join(path, ROOT_METADATA)))


#: What ``fs.info`` says about an object that changes when it is rewritten: its size and
#: modification time (local files; ``LastModified`` on S3) and the S3 ``ETag`` (content hash).
VERSION_FIELDS: Final = ("size", "mtime", "LastModified", "ETag")


def object_version(uri: str) -> str | None:
    """A token that changes whenever the object at ``uri`` is written again (None: missing).

    The modification time is in it, so a store committed again with the same bytes counts as
    another version: resumed runs would rather start over than mix blocks of two commits."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return "|".join(f"{k}={info[k]}" for k in VERSION_FIELDS if info.get(k) is not None)


def remove(uri: str, *, release: bool = True) -> None:
    """Delete ``uri`` (and end this process's claim on it, if it is a staged sibling, unless
    ``release`` is False: a job emptying the staging it goes on to write)."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if release:
        _release(normalize(uri))


def commit(tmp_uri: str, final_uri: str) -> None:
    """Make ``tmp_uri`` appear at ``final_uri`` all at once, replacing an older output."""
    fs, tmp = filesystem(tmp_uri)
    _, final = filesystem(final_uri)
    if not fs.exists(posixpath.join(tmp, ROOT_METADATA)):
        raise RuntimeError(f"refusing to commit {tmp_uri}: it has no {ROOT_METADATA}")
    local = isinstance(fs, LocalFileSystem)
    if local:
        os.makedirs(os.path.dirname(final), exist_ok=True)
    # One commit of an output at a time: two renames (or copies) of concurrent runs would
    # otherwise interleave (a rename onto a non-empty directory fails; copies would mix).
    with _commit_lock(final if local else normalize(final_uri)):
        if local:
            _finish_interrupted_commit(*os.path.split(final))  # one a killed run left half done
            _commit_by_rename(fs, tmp, final)
        else:
            _commit_by_copy(fs, tmp, final)
    _release(normalize(tmp_uri))


def _commit_by_rename(fs: fsspec.AbstractFileSystem, tmp: str, final: str) -> None:
    old = None
    if os.path.exists(final):
        # Named after the staged copy's token, so a run killed between the two renames leaves
        # enough for the next one to finish the commit (_finish_interrupted_commit).
        name = os.path.basename(tmp)
        if STAGE_MARKER in name:  # a job's staging: .<name>.old-stage-<key>
            token = STAGE_MARKER.lstrip(".") + name.split(STAGE_MARKER, 1)[1]
        else:
            token = name.split(TMP_MARKER, 1)[1] if TMP_MARKER in name else uuid.uuid4().hex[:12]
        old = _sibling(final, OLD_MARKER, token)
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        fs.rm(old, recursive=True)


def _commit_by_copy(fs: fsspec.AbstractFileSystem, tmp: str, final: str) -> None:
    # Remove the old root metadata first: from here on the old output no longer opens, so a
    # crash mid-copy cannot leave a mix of old and new chunks that looks like a store.
    if fs.exists(final):
        root = posixpath.join(final, ROOT_METADATA)
        if fs.exists(root):
            fs.rm(root)
        fs.rm(final, recursive=True)
    keys = [k for k in fs.find(tmp) if posixpath.relpath(k, tmp) != ROOT_METADATA]
    if keys:
        # One call with lists: s3fs runs the server-side copies concurrently (a store has
        # thousands of chunk objects; copying them one by one took minutes).
        fs.copy(keys, [posixpath.join(final, posixpath.relpath(k, tmp)) for k in keys])
    fs.copy(posixpath.join(tmp, ROOT_METADATA), posixpath.join(final, ROOT_METADATA))
    fs.rm(tmp, recursive=True)


def commit_file(write: Callable[[str], Any], uri: str, run_id: str) -> None:
    """Call ``write(local_path)`` and make the file appear at ``uri`` whole or not at all.

    Local: write a hidden sibling, then ``os.replace`` (atomic on POSIX). Object stores: upload
    to a hidden sibling key, then one server-side copy to the final key (a single object
    appears whole or not at all), then delete the temporary key."""
    final = normalize(uri)
    fs, final_path = filesystem(final)
    if "://" not in final:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = stage(final, f"{run_id}-{uuid.uuid4().hex[:6]}")
        try:
            write(tmp)
            with _commit_lock(final):
                if os.path.isdir(final):  # an older output of another shape: replace it
                    _remove_path(final)
                os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
            _release(tmp)
        return
    recover(final)  # temporary keys of dead runs (age rule)
    tmp = temporary_uri(final, f"{run_id}-{uuid.uuid4().hex[:6]}")
    _, tmp_path = filesystem(tmp)
    with tempfile.TemporaryDirectory() as local:
        path = os.path.join(local, "output")
        write(path)
        try:
            fs.put(path, tmp_path)
            fs.copy(tmp_path, final_path)
        finally:
            if fs.exists(tmp_path):
                fs.rm(tmp_path)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a local file, read in 1 MiB pieces (pinned downloads, model identity)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
