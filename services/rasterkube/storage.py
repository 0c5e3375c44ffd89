"""Object-store access and atomic commit of outputs (DESIGN §3 "Outputs are atomic").

A job writes its whole output under a hidden temporary sibling prefix and commits it at the
end. On a local filesystem the commit is a rename. On object stores (no rename) the old
output is removed, every object is copied, and the root ``zarr.json`` — which holds the
consolidated metadata and is what every reader opens first — is copied last, so a store
is only openable once it is complete. The temporary prefix is then deleted.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Callable
from typing import Any, Final

import fsspec
from fsspec.implementations.local import LocalFileSystem

ROOT_METADATA: Final = "zarr.json"
TMP_MARKER: Final = ".tmp-"
OLD_MARKER: Final = ".old-"
#: Deterministic staging of a raster job (:mod:`rasterkube.staging`), unlike ``TMP_MARKER``.
STAGE_MARKER: Final = ".stage-"
ENV_S3_ENDPOINT: Final = "AWS_ENDPOINT_URL"


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
    return [join(parent, n) for n in sorted(found) if n.startswith(prefix) and join(parent, n) != keep]


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


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def commit(tmp_uri: str, final_uri: str) -> None:
    """Make ``tmp_uri`` appear at ``final_uri`` all at once, replacing an older output."""
    fs, tmp = filesystem(tmp_uri)
    _, final = filesystem(final_uri)
    if not fs.exists(posixpath.join(tmp, ROOT_METADATA)):
        raise RuntimeError(f"refusing to commit {tmp_uri}: it has no {ROOT_METADATA}")
    if isinstance(fs, LocalFileSystem):
        _commit_by_rename(fs, tmp, final)
    else:
        _commit_by_copy(fs, tmp, final)


def _commit_by_rename(fs: fsspec.AbstractFileSystem, tmp: str, final: str) -> None:
    old = None
    if os.path.exists(final):
        old = _sibling(final, OLD_MARKER, uuid.uuid4().hex[:12])
        os.rename(final, old)
    os.makedirs(os.path.dirname(final), exist_ok=True)
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
    tmp = temporary_uri(final, f"{run_id}-{uuid.uuid4().hex[:6]}")
    fs, final_path = filesystem(final)
    if "://" not in final:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            write(tmp)
            if os.path.isdir(final):  # an older output of another shape: replace it
                remove(final)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
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
