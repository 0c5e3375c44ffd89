"""Model loading: fetch a model file by URI, cache it by content, load it without pickle.

Formats
-------
* ``.pt2`` archives written by ``torch.export.save`` (one program, ``model``) or by
  ``torch.export.pt2_archive._package.package_pt2`` with programs ``model`` and an optional
  ``transforms`` (applied to the input batch before the model, e.g. normalisation).
* TorchScript files (``torch.jit.save``) as a fallback, for models that do not export.

Where from
----------
Local paths, ``s3://`` (s3fs, the job's AWS_* settings), ``https://``/``http://`` and
``hf://org/repo/path/in/repo`` (optionally ``hf://org/repo@revision/path``), resolved to the
Hugging Face ``resolve`` URL (``$HF_ENDPOINT`` overrides the host, as in huggingface_hub).

Remote files are downloaded once into ``<cache>/models/<sha256>/<name>``: the cache key is the
*content*, so two URIs of the same bytes share one file and one Ray Serve deployment. An index
remembers which URI (and ETag/size) gave which content, so a later run does not download again
while the remote file is unchanged.

The cache survives killed runs and concurrent ones: a download goes to ``<cache>/models/
.part-<key>`` and is renamed into place only when whole; one download per URL at a time on a
machine (a lock file: the second run waits, then finds it cached), and a ``.part-`` directory
whose lock nobody holds is a killed download's and is removed. A cached file is checked against
its name (its SHA-256) before use, so a truncated or damaged one is fetched again, never loaded.

No pickle
---------
``torch.export.load`` unpickles archive members it cannot read as raw tensors, and falls back
to ``torch.load(weights_only=False)`` for sample inputs: loading an untrusted archive could run
arbitrary code. :func:`check_pt2_safe` refuses archives with pickled weights or constants,
opaque objects or AOTInductor shared libraries, and checks that the sample inputs load with
``weights_only=True`` — so the loader's fallback is never reached. TorchScript files are read by
TorchScript's own restricted unpickler (tensors and TorchScript types only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from rasterkube import locks, storage
from rasterkube.errors import UserError
from rasterkube.sampledata import cache_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FIELD: Final = "spec.model.uri"
HF_SCHEME: Final = "hf://"
HF_DEFAULT_ENDPOINT: Final = "https://huggingface.co"
HF_DEFAULT_REVISION: Final = "main"
ENV_HF_ENDPOINT: Final = "HF_ENDPOINT"
ENV_HF_TOKEN: Final = "HF_TOKEN"
FORMAT_PT2: Final = "pt2"
FORMAT_TORCHSCRIPT: Final = "torchscript"
PROGRAM_MODEL: Final = "model"
PROGRAM_TRANSFORMS: Final = "transforms"
CACHE_SUBDIR: Final = "models"
PART_PREFIX: Final = ".part-"
LOCKS_SUBDIR: Final = ".locks"
INDEX_LOCK: Final = "index.lock"
DOWNLOAD_ATTEMPTS: Final = 3
HTTP_TIMEOUT_S: Final = 60
CHUNK: Final = 1 << 20


class ModelError(UserError):
    """A model that cannot be fetched or loaded; the message names ``spec.model.uri``."""

    def __init__(self, uri: str, problem: str) -> None:
        super().__init__(f"{FIELD}: {uri}: {problem}")


# ----------------------------------------------------------------------------- URIs


def resolve_uri(uri: str) -> str:
    """``hf://org/repo[@rev]/path`` → the Hugging Face resolve URL; other URIs unchanged."""
    if not uri.startswith(HF_SCHEME):
        return uri
    rest = uri[len(HF_SCHEME) :]
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise ModelError(uri, "expected hf://org/repo/path/to/model.pt2 (optionally hf://org/repo@revision/...)")
    org, repo, path = parts[0], parts[1], "/".join(parts[2:])
    repo, _, revision = repo.partition("@")
    return f"{_hf_endpoint()}/{org}/{repo}/resolve/{revision or HF_DEFAULT_REVISION}/{path}"


def _hf_endpoint() -> str:
    return os.environ.get(ENV_HF_ENDPOINT, HF_DEFAULT_ENDPOINT).rstrip("/")


def _is_http(uri: str) -> bool:
    return uri.startswith(("https://", "http://"))


def is_remote(uri: str) -> bool:
    """Fetched over the network (s3://, https://, ...) rather than read from local disk."""
    return _is_http(uri) or "://" in uri and not uri.startswith("file://")


# ----------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class FetchedModel:
    """A model file on local disk and the SHA-256 of its content (its identity)."""

    uri: str
    path: Path
    sha256: str

    @property
    def short_id(self) -> str:
        return self.sha256[:12]


class _Index:
    """``uri → {sha256, version}`` in ``<cache>/models/index.json`` (version = ETag or size)."""

    def __init__(self, root: Path) -> None:
        self.path = root / "index.json"

    def get(self, uri: str) -> dict[str, str] | None:
        try:
            return json.loads(self.path.read_text()).get(uri)
        except (OSError, ValueError):
            return None

    def put(self, uri: str, entry: dict[str, str]) -> None:
        # Read-modify-write under a lock: two runs adding different URIs keep both entries.
        with locks.held(self.path.parent / LOCKS_SUBDIR / INDEX_LOCK):
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}
            data[uri] = entry
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.path)  # atomic: concurrent readers never see a half index


def _http_request(url: str, method: str = "GET") -> urllib.request.Request:
    req = urllib.request.Request(url, method=method)
    token = os.environ.get(ENV_HF_TOKEN)
    if token and url.startswith(_hf_endpoint() + "/"):  # never send the token elsewhere
        req.add_header("Authorization", f"Bearer {token}")
    return req


def _remote_version(uri: str, url: str) -> str | None:
    """ETag (or size) of the remote file, to tell whether the cached copy is current."""
    try:
        if _is_http(url):
            with urllib.request.urlopen(_http_request(url, "HEAD"), timeout=HTTP_TIMEOUT_S) as resp:
                return resp.headers.get("ETag") or resp.headers.get("Content-Length")
        fs, path = storage.filesystem(url)
        info = fs.info(path)
        return str(info.get("ETag") or info.get("etag") or info.get("size"))
    except FileNotFoundError:
        raise ModelError(uri, "does not exist; check the URI (and that the file was uploaded)") from None
    except urllib.error.HTTPError as exc:
        raise ModelError(uri, f"the server answered HTTP {exc.code} ({exc.reason})") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ModelError(uri, f"cannot be reached ({exc}); check the address and the network") from None


def _download_to(url: str, uri: str, dest: Path) -> None:
    last: Exception | None = None
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            if _is_http(url):
                with urllib.request.urlopen(_http_request(url), timeout=HTTP_TIMEOUT_S) as resp, open(dest, "wb") as out:
                    shutil.copyfileobj(resp, out, CHUNK)
            else:
                fs, path = storage.filesystem(url)
                fs.get_file(path, str(dest))
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # the client's problem: retrying will not help
                raise ModelError(uri, f"the server answered HTTP {exc.code} ({exc.reason})") from None
            last = exc
        except FileNotFoundError:
            raise ModelError(uri, "does not exist; check the URI") from None
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.5 * 2**attempt)  # transient: back off and retry
    raise ModelError(uri, f"download failed after {DOWNLOAD_ATTEMPTS} attempts ({last})")


def fetch(uri: str, cache: Path | None = None) -> FetchedModel:
    """The model file of ``uri`` on local disk (downloaded once, cached by content)."""
    if not uri.strip():
        raise ModelError(uri, "is empty; give a local path, s3://, https:// or hf:// URI of a .pt2 file")
    url = resolve_uri(uri)
    if not is_remote(url):
        path = Path(url.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise ModelError(uri, "does not exist (or is not a file); check the path")
        return FetchedModel(uri=uri, path=path.resolve(), sha256=storage.sha256_file(path))
    root = (cache or cache_dir()) / CACHE_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    index = _Index(root)
    version = _remote_version(uri, url)
    name = Path(url.split("?")[0]).name or "model"
    key = hashlib.sha256(url.encode()).hexdigest()[:32]
    # One download of a URL at a time on this machine: a concurrent run waits here, then finds
    # the file cached instead of downloading it again.
    with locks.held(root / LOCKS_SUBDIR / f"{key}{locks.LOCK_SUFFIX}"):
        _sweep_partial_downloads(root, own=key)
        entry = index.get(url)
        if entry and entry.get("version") == version:
            cached = root / entry["sha256"] / name
            if _intact(cached, entry["sha256"]):
                return FetchedModel(uri=uri, path=cached, sha256=entry["sha256"])
        part_dir = root / f"{PART_PREFIX}{key}"
        shutil.rmtree(part_dir, ignore_errors=True)  # a killed download of this URL
        part_dir.mkdir()
        try:
            part = part_dir / name
            _download_to(url, uri, part)
            sha = storage.sha256_file(part)
            final = root / sha / name
            final.parent.mkdir(exist_ok=True)
            part.replace(final)  # same filesystem: atomic; also replaces a damaged copy
            _verified[_stat_key(final)] = sha
        finally:
            shutil.rmtree(part_dir, ignore_errors=True)
        index.put(url, {"sha256": sha, "version": version or ""})
    return FetchedModel(uri=uri, path=final, sha256=sha)


# (path, size, mtime, inode) → sha256 of files this process has hashed: a model is checked
# once per process, not once per replica start or preflight.
_verified: dict[tuple[str, int, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _intact(cached: Path, sha256: str) -> bool:
    """The cached file is there and its content is the one its directory is named after."""
    if not cached.is_file():
        return False
    key = _stat_key(cached)
    if _verified.get(key) != sha256:
        actual = storage.sha256_file(cached)
        if actual != sha256:
            log.warning("cached model %s is damaged (sha256 %s); fetching it again", cached, actual[:12])
            cached.unlink(missing_ok=True)
            return False
        _verified[key] = actual
    return True


def _sweep_partial_downloads(root: Path, own: str) -> None:
    """Remove the ``.part-`` directories of downloads whose process is gone."""
    for part_dir in root.glob(f"{PART_PREFIX}*"):
        key = part_dir.name[len(PART_PREFIX) :]
        if key == own:
            continue  # ours: we hold its lock and clear it ourselves
        lock = locks.try_hold(root / LOCKS_SUBDIR / f"{key}{locks.LOCK_SUFFIX}")
        if lock is None:
            continue  # a live download
        try:
            shutil.rmtree(part_dir, ignore_errors=True)
        finally:
            locks.drop(lock)


# ----------------------------------------------------------------------------- safety


def model_format(path: Path, uri: str = "") -> str:
    """``pt2`` or ``torchscript``, from the archive's members (not the file name)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        raise ModelError(
            uri or str(path),
            "is not a model archive (neither a .pt2 from torch.export.save nor a TorchScript file); "
            "export the model with torch.export.export + torch.export.save",
        ) from None
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return FORMAT_PT2
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return FORMAT_TORCHSCRIPT
    raise ModelError(uri or str(path), "is a zip file but neither a torch.export .pt2 archive nor TorchScript")


def _payload_configs(zf: zipfile.ZipFile) -> dict[str, dict[str, Any]]:
    configs = {}
    for name in zf.namelist():
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            configs[name] = json.loads(zf.read(name)).get("config", {})
    return configs


def check_pt2_safe(path: Path, uri: str = "") -> None:
    """Refuse archives whose loading would unpickle (run) arbitrary code; see module docs."""
    import io

    import torch

    where = uri or str(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if any("/data/aotinductor/" in n for n in names):
            raise ModelError(where, "holds AOTInductor compiled code (shared libraries); ship the exported program")
        for config_name, config in _payload_configs(zf).items():
            for fqn, meta in config.items():
                if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                    raise ModelError(
                        where,
                        f"{fqn} in {config_name.rsplit('/', 1)[-1]} is stored with pickle, which could run code "
                        "when loaded; re-export with plain tensors (torch.export.save of an nn.Module)",
                    )
        for name in names:
            if "/data/sample_inputs/" in name and name.endswith(".pt"):
                payload = zf.read(name)
                if not payload:
                    continue  # no sample inputs saved: nothing to unpickle
                try:
                    torch.load(io.BytesIO(payload), weights_only=True)
                except Exception:  # noqa: BLE001 - any failure means: not plain tensors
                    raise ModelError(where, "its sample inputs are not plain tensors (would need pickle)") from None


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Signature:
    """What the pipeline needs to know of a model: channels in and out, fixed patch size."""

    in_channels: int | None  # None: unknown (TorchScript)
    out_channels: int
    patch: int | None  # fixed square input size, or None when H and W are dynamic
    format: str
    has_transforms: bool


@dataclass
class LoadedModel:
    """A callable model (``transforms`` first, if any) with its signature."""

    model: Any  # torch.nn.Module
    transforms: Any | None
    signature: Signature

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.transforms is not None:
            x = self.transforms(x)
        return self.model(x)


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None


def _program_shapes(ep: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    user_inputs = set(ep.graph_signature.user_inputs)
    inputs = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    output = next(n for n in ep.graph.nodes if n.op == "output")
    outs = output.args[0]
    if len(inputs) != 1 or len(outs) != 1:
        raise ValueError(f"expected one input and one output tensor, got {len(inputs)} and {len(outs)}")
    return tuple(inputs[0].meta["val"].shape), tuple(outs[0].meta["val"].shape)


def _pt2_signature(model_ep: Any, transforms_ep: Any | None, uri: str) -> Signature:
    try:
        in_shape, out_shape = _program_shapes(model_ep)
        if transforms_ep is not None:
            in_shape, _ = _program_shapes(transforms_ep)
    except (ValueError, KeyError, AttributeError) as exc:
        raise ModelError(uri, f"the exported program is not an image model ({exc})") from None
    if len(in_shape) != 4 or len(out_shape) != 4:
        raise ModelError(
            uri, f"takes {len(in_shape)}-d input and gives {len(out_shape)}-d output; expected (N, C, H, W) both"
        )
    out_c = _static(out_shape[1])
    if out_c is None:
        raise ModelError(uri, "has a dynamic number of output channels; export with a fixed channel count")
    h, w = _static(in_shape[2]), _static(in_shape[3])
    if h != w:
        raise ModelError(uri, f"takes {h}x{w} inputs; rasterkube cuts square patches, export with H == W")
    return Signature(_static(in_shape[1]), out_c, h, FORMAT_PT2, transforms_ep is not None)


def load(path: Path, uri: str = "", *, probe_channels: int | None = None, probe_patch: int = 64) -> LoadedModel:
    """Load a fetched model on CPU. TorchScript signatures are probed with a zero batch of
    ``probe_channels`` channels (TorchScript carries no shapes)."""
    import torch

    where = uri or str(path)
    fmt = model_format(path, where)
    if fmt == FORMAT_PT2:
        from torch.export.pt2_archive._package import load_pt2

        check_pt2_safe(path, where)
        try:
            programs = load_pt2(str(path)).exported_programs
        except Exception as exc:  # noqa: BLE001 - untrusted input: every failure is the file's
            raise ModelError(where, f"cannot be loaded as a .pt2 archive ({type(exc).__name__}: {exc})") from None
        if PROGRAM_MODEL not in programs:
            if len(programs) != 1:
                raise ModelError(where, f"has programs {sorted(programs)}; name the network 'model'")
            programs = {PROGRAM_MODEL: next(iter(programs.values()))}
        model_ep, transforms_ep = programs[PROGRAM_MODEL], programs.get(PROGRAM_TRANSFORMS)
        signature = _pt2_signature(model_ep, transforms_ep, where)
        model = model_ep.module()
        transforms = transforms_ep.module() if transforms_ep is not None else None
        return LoadedModel(model, transforms, signature)
    try:
        model = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001 - untrusted input: every failure is the file's
        raise ModelError(where, f"cannot be loaded as TorchScript ({type(exc).__name__}: {exc})") from None
    if probe_channels is None:
        raise ModelError(where, "is TorchScript: give model.features so its input channels are known")
    try:
        with torch.inference_mode():
            out = model(torch.zeros(1, probe_channels, probe_patch, probe_patch))
    except Exception as exc:  # noqa: BLE001 - the user's model code: report whatever it raises
        raise ModelError(
            where, f"fails on a (1, {probe_channels}, {probe_patch}, {probe_patch}) input: {type(exc).__name__}: {exc}"
        ) from None
    if not hasattr(out, "ndim") or out.ndim != 4:
        raise ModelError(where, "does not return an (N, K, H, W) tensor")
    return LoadedModel(model, None, Signature(probe_channels, int(out.shape[1]), None, FORMAT_TORCHSCRIPT, False))
