"""OCI images without a registry or Docker: layers as reproducible tar files, imported into containerd.

An image here is a list of layers plus a config (entrypoint, env, user...). Each layer is a
tar archive written deterministically (sorted entries, fixed times and owners), kept in a
content-addressed blob cache (``cache_dir()/images/blobs/sha256/<digest>``) and described by
a small JSON record keyed by *what it was built from* (``cache_dir()/images/layers/<key>.json``),
so a layer whose inputs did not change is never rebuilt. :func:`import_image` streams an
OCI image layout archive (``oci-layout``, ``index.json``, ``blobs/``) into ``ctr images
import`` of the node's containerd; blobs that containerd already holds are left out of the
stream, so a changed top layer costs only its own bytes.

The image name carries a digest of the manifest (``<repo>:<version>-<digest12>``), so a
changed image is a new name: pods never run a stale image under an old tag, and
``imagePullPolicy: IfNotPresent`` never reaches for a registry.

The layer formats and media types are those of the OCI image spec v1.1; containerd 1.6
imports them with its overlayfs snapshotter.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rasterkube_devstack import binaries

log = logging.getLogger(__name__)

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
#: containerd's import takes the image name from this annotation of the index entry.
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
#: Every file in a layer gets this time: the same inputs give the same bytes and digest.
EPOCH = 0
CHUNK = 1 << 20
#: gzip level of compressed layers: written once per content, so speed over a few % of size.
GZIP_LEVEL = 1
CTR_TIMEOUT_S = 60 * 60
LOCAL_REGISTRY = "rasterkube.local"


class ImageError(RuntimeError):
    """An image could not be built or imported (the message says what to do)."""


# --------------------------------------------------------------------------
# Cache layout
# --------------------------------------------------------------------------


def images_dir() -> Path:
    return binaries.cache_dir() / "images"


def blob_path(digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return images_dir() / "blobs" / algorithm / hexdigest


def _record_path(key: str) -> Path:
    return images_dir() / "layers" / f"{key}.json"


def content_key(*parts: object) -> str:
    """A short stable hash of what a layer is built from (strings, bytes, files, JSON)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(_file_digest(part).encode())
        elif isinstance(part, bytes):
            h.update(hashlib.sha256(part).digest())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


# --------------------------------------------------------------------------
# Blobs and layers
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class Layer(Blob):
    #: digest of the uncompressed tar (the config's rootfs.diff_ids)
    diff_id: str = ""
    #: what the layer holds, for humans (history in the image config)
    created_by: str = ""


class _HashingWriter(io.RawIOBase):
    """Write-through file that hashes (and counts) what passes."""

    def __init__(self, target: IO[bytes]) -> None:
        self._target = target
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._target.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def tar_info(name: str, *, size: int = 0, mode: int = 0o644, kind: bytes = tarfile.REGTYPE,
             linkname: str = "", uid: int = 0, gid: int = 0) -> tarfile.TarInfo:  # fmt: skip
    """A TarInfo with the fixed owner/time that makes layers reproducible."""
    info = tarfile.TarInfo(name.lstrip("/"))
    info.size, info.mode, info.type, info.linkname = size, mode, kind, linkname
    info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, uid, gid, "", ""
    return info


class LayerWriter:
    """A tar stream of one layer; entries must be added in a deterministic order."""

    def __init__(self, out: IO[bytes]) -> None:
        self._tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)
        self._dirs: set[str] = set()

    def directory(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        name = name.strip("/")
        if name and name not in self._dirs:
            self._dirs.add(name)
            self._tar.addfile(tar_info(name, mode=mode, kind=tarfile.DIRTYPE, uid=uid, gid=gid))

    def parents(self, name: str) -> None:
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.directory("/".join(parts[:i]))

    def file(self, name: str, data: bytes | IO[bytes], *, size: int | None = None, mode: int = 0o644,
             uid: int = 0, gid: int = 0) -> None:  # fmt: skip
        self.parents(name)
        if isinstance(data, bytes):
            size, data = len(data), io.BytesIO(data)
        assert size is not None, "size is needed for a stream"
        self._tar.addfile(tar_info(name, size=size, mode=mode, uid=uid, gid=gid), data)

    def symlink(self, name: str, target: str) -> None:
        self.parents(name)
        self._tar.addfile(tar_info(name, mode=0o777, kind=tarfile.SYMTYPE, linkname=target))

    def tree(self, root: Path, prefix: str = "", owners: Mapping[str, tuple[int, int]] | None = None) -> None:
        """Every entry under ``root`` (sorted), as ``prefix/<relative path>``.

        Owners are root except for the paths in ``owners`` (name -> (uid, gid), not recursive).
        Hard links become copies; sockets, devices and fifos are left out (the container
        runtime provides /dev).
        """
        owners = owners or {}
        for path in sorted(_walk(root)):
            rel = path.relative_to(root).as_posix()
            name = f"{prefix.strip('/')}/{rel}".strip("/")
            st = path.lstat()
            mode = st.st_mode & 0o7777
            uid, gid = owners.get(name, (0, 0))
            if path.is_symlink():
                self.symlink(name, os.readlink(path))
            elif path.is_dir():
                self.directory(name, mode, uid, gid)
            elif path.is_file():
                with open(path, "rb") as handle:
                    self.file(name, handle, size=st.st_size, mode=mode, uid=uid, gid=gid)

    def close(self) -> None:
        self._tar.close()


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames:
            yield base / name
        for name in filenames:
            yield base / name


def build_layer(key: str, fill: Callable[[LayerWriter], None], created_by: str, *, compress: bool = False) -> Layer:
    """The cached layer for ``key``, or build it with ``fill(writer)`` and cache it.

    The tar (gzip-compressed with ``compress``, reproducibly: no name, no time in the header)
    goes to a temp file while its digests are computed, then moves into the blob cache under
    its digest; a record ``layers/<key>.json`` maps the inputs to it. Under a file lock, so
    concurrent builders of the same key build once.
    """
    cached = cached_layer(key)
    if cached is not None:
        return cached
    with binaries._file_lock(f"image-layer-{key}"):
        cached = cached_layer(key)
        if cached is not None:
            return cached
        blobs = images_dir() / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        for stale in blobs.glob(f".layer-{key}-*"):  # what a killed build of this key left
            stale.unlink(missing_ok=True)
        started = time.monotonic()
        fd, tmp_name = tempfile.mkstemp(prefix=f".layer-{key}-", dir=blobs)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                hashing = _HashingWriter(out)
                if compress:
                    zipped = gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=hashing, mtime=0)
                    plain = _HashingWriter(zipped)
                else:
                    zipped, plain = None, hashing
                writer = LayerWriter(plain)  # type: ignore[arg-type]
                fill(writer)
                writer.close()
                if zipped is not None:
                    zipped.close()
            digest = f"sha256:{hashing.sha.hexdigest()}"
            diff_id = f"sha256:{plain.sha.hexdigest()}"
            os.replace(tmp, blob_path(digest))
        finally:
            tmp.unlink(missing_ok=True)
        media_type = MEDIA_LAYER_GZIP if compress else MEDIA_LAYER
        layer = Layer(digest=digest, size=hashing.size, media_type=media_type, diff_id=diff_id, created_by=created_by)
        _write_json(_record_path(key), {**layer.__dict__, "key": key, "seconds": round(time.monotonic() - started, 1)})
        log.info("layer %s (%s): %.1f MB in %.0fs", key[:12], created_by, layer.size / 1e6, time.monotonic() - started)
        return layer


def cached_layer(key: str, present: Iterable[str] = ()) -> Layer | None:
    """The layer recorded for ``key`` when its blob is still in the cache, or in ``present``
    (digests a containerd already holds: big blobs are moved there, see :func:`release_blobs`)."""
    try:
        record = json.loads(_record_path(key).read_text())
    except (FileNotFoundError, ValueError):
        return None
    fields = {k: record[k] for k in ("digest", "size", "media_type", "diff_id", "created_by") if k in record}
    layer = Layer(**fields)
    path = blob_path(layer.digest)
    if path.is_file() and path.stat().st_size == layer.size:
        return layer
    return layer if layer.digest in set(present) else None


#: Blobs at least this big are dropped from the cache once containerd holds them (the image
#: with torch is GBs: one copy in containerd's store is enough).
RELEASE_BYTES = 256 << 20


def release_blobs(image: Image, containerd: Containerd, min_bytes: int = RELEASE_BYTES) -> int:
    """Delete the cached copies of ``image``'s big layers that ``containerd`` holds; bytes freed."""
    held = containerd.content_digests()
    freed = 0
    for layer in image.layers:
        path = blob_path(layer.digest)
        if layer.size >= min_bytes and layer.digest in held and path.is_file():
            path.unlink()
            freed += layer.size
    return freed


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------
# Image config, manifest, name
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an image config (what a Dockerfile's ENV/USER/... set)."""

    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    user: str = ""
    workdir: str = ""
    exposed_ports: Sequence[int] = ()
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Image:
    """A built image: its name, manifest and the blobs it needs."""

    name: str
    manifest: bytes
    config: bytes
    layers: tuple[Layer, ...]

    @property
    def manifest_blob(self) -> Blob:
        return Blob(f"sha256:{hashlib.sha256(self.manifest).hexdigest()}", len(self.manifest), MEDIA_MANIFEST)

    @property
    def config_blob(self) -> Blob:
        return Blob(f"sha256:{hashlib.sha256(self.config).hexdigest()}", len(self.config), MEDIA_CONFIG)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


def assemble(repository: str, version: str, layers: Sequence[Layer], config: ImageConfig) -> Image:
    """Config + manifest for ``layers``; the name is ``<repository>:<version>-<manifest digest[:12]>``."""
    env = [f"{k}={v}" for k, v in config.env.items()]
    runtime: dict[str, Any] = {"Env": env}
    if config.entrypoint:
        runtime["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        runtime["Cmd"] = list(config.cmd)
    if config.user:
        runtime["User"] = config.user
    if config.workdir:
        runtime["WorkingDir"] = config.workdir
    if config.exposed_ports:
        runtime["ExposedPorts"] = {f"{port}/tcp": {} for port in config.exposed_ports}
    if config.labels:
        runtime["Labels"] = dict(config.labels)
    config_json = _canonical(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": layer.created_by} for layer in layers],
        }
    )
    config_blob = Blob(f"sha256:{hashlib.sha256(config_json).hexdigest()}", len(config_json), MEDIA_CONFIG)
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config_blob.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }
    )
    digest = hashlib.sha256(manifest).hexdigest()
    return Image(name=f"{repository}:{version}-{digest[:12]}", manifest=manifest, config=config_json,
                 layers=tuple(layers))  # fmt: skip


def single_file_image(repository: str, version: str, binary: Path, target: str, config: ImageConfig) -> Image:
    """An image of one static binary (pause, CoreDNS, the KubeRay operator): no OS, one layer."""
    key = content_key("single-file", binary, target)

    def fill(writer: LayerWriter) -> None:
        with open(binary, "rb") as handle:
            writer.file(target, handle, size=binary.stat().st_size, mode=0o755)

    layer = build_layer(key, fill, f"COPY {binary.name} {target}")
    return assemble(repository, version, [layer], config)


# --------------------------------------------------------------------------
# Import into containerd
# --------------------------------------------------------------------------


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(tar_info(name, size=len(data)), io.BytesIO(data))


def write_archive(out: IO[bytes], image: Image, skip: Iterable[str] = ()) -> None:
    """An OCI image layout archive of ``image``; layer blobs in ``skip`` are left out."""
    skipped = set(skip)
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            image.manifest_blob.descriptor(
                annotations={ANNOTATION_IMAGE_NAME: image.name, ANNOTATION_REF_NAME: image.name.rsplit(":", 1)[1]},
                platform={"architecture": "amd64", "os": "linux"},
            )
        ],
    }
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", _canonical(OCI_LAYOUT))
        for blob, data in ((image.config_blob, image.config), (image.manifest_blob, image.manifest)):
            _add_bytes(tar, f"blobs/sha256/{blob.digest.split(':')[1]}", data)
        for layer in image.layers:
            if layer.digest in skipped:
                continue
            path = blob_path(layer.digest)
            if not path.is_file():
                raise ImageError(f"layer {layer.digest} ({layer.created_by[:80]}) is neither cached nor in "
                                 f"containerd; delete {_record_path('<key>').parent} records to rebuild it")  # fmt: skip
            with open(path, "rb") as handle:
                tar.addfile(tar_info(f"blobs/sha256/{layer.digest.split(':')[1]}", size=layer.size), handle)
        _add_bytes(tar, "index.json", _canonical(index))


@dataclass(frozen=True)
class Containerd:
    """``ctr`` against one containerd (socket) in the ``k8s.io`` namespace (the CRI's)."""

    address: Path
    namespace: str = "k8s.io"

    def ctr(self, *args: str, input: bytes | None = None, timeout_s: float = 120) -> str:
        cmd = ["ctr", "--address", str(self.address), "--namespace", self.namespace, *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            raise ImageError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
        return proc.stdout.decode()

    def image_names(self) -> set[str]:
        return set(self.ctr("images", "list", "--quiet").split())

    def has_blob(self, digest: str) -> bool:
        return digest in self.ctr("content", "list", "--quiet").split()

    def content_digests(self) -> set[str]:
        return set(self.ctr("content", "list", "--quiet").split())


def import_image(containerd: Containerd, image: Image) -> float:
    """Import ``image`` into containerd (unpacked for overlayfs) unless it is there; returns seconds."""
    if image.name in containerd.image_names():
        return 0.0
    started = time.monotonic()
    present = containerd.content_digests()
    skip = [layer.digest for layer in image.layers if layer.digest in present]
    cmd = ["ctr", "--address", str(containerd.address), "--namespace", containerd.namespace, "images", "import",
           "--snapshotter", "overlayfs", "-"]  # fmt: skip
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr)
        assert proc.stdin is not None
        try:
            with contextlib.suppress(BrokenPipeError):
                write_archive(proc.stdin, image, skip)  # type: ignore[arg-type]
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            rc = proc.wait(timeout=CTR_TIMEOUT_S)
        stderr.seek(0)
        error = stderr.read().decode(errors="replace")
    if rc != 0 or image.name not in containerd.image_names():
        raise ImageError(f"importing {image.name} into containerd failed (exit {rc}): {error[-3000:]}")
    seconds = time.monotonic() - started
    log.info("imported %s (%.0f MB, %d cached layers skipped) in %.1fs", image.name, image.size / 1e6, len(skip), seconds)
    return seconds
