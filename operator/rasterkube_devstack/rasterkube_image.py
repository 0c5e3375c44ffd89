"""The rasterkube image (operator, Ray head, Ray workers): one recipe, two builders.

:data:`RECIPE` says what the image is: a Debian base with Python, the project's wheel and its
dependencies at the pinned versions of ``requirements/constraints.txt`` in a virtual
environment at ``/opt/rasterkube``, a numeric non-root user, the environment and the
entrypoint. From it:

* :func:`render_dockerfile` writes the repository's ``Dockerfile`` (for registries; a test
  fails when the committed file differs from what the recipe renders, so the two cannot
  drift), and
* :func:`build` builds the same image here without Docker or a registry: ``debootstrap`` for
  the Debian base (same suite and packages as the Dockerfile's base plus ``apt-get``), then the
  same commands in a chroot, then the wheels resolved by pip with the same constraints and
  installed by :mod:`installer` straight into a layer tar (no staging copy: the dependencies
  are several GB). Three layers, each cached by what it is built from (:mod:`.images`): the
  OS (recipe), the dependencies (constraints + the wheel's requirements), the project (the
  wheel's contents). A code change rebuilds only the last one (seconds).

Torch and CPU: PyPI has one torch wheel for Linux x86-64 and it is the CUDA build — its
``libtorch_cuda.so`` is linked against the CUDA runtime wheels (``nvidia-*``, ``cuda-toolkit``),
so ``import torch`` fails without them even on a CPU-only machine; PyTorch's CPU-only wheels
live on its own index, not on PyPI. From PyPI only, the image therefore carries torch with its
declared CUDA dependencies at the pinned versions: the same environment as ``make install``,
it runs on CPU (``torch.cuda.is_available()`` is False there) and on GPU nodes alike, at the
price of size (about 5 of the image's ~6.5 GB unpacked). Layers are gzip-compressed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

from rasterkube_devstack import binaries, debian, images

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
CONSTRAINTS = Path("requirements/constraints.txt")
REPOSITORY = f"{images.LOCAL_REGISTRY}/rasterkube"
DEBOOTSTRAP_TIMEOUT_S = 30 * 60
PIP_TIMEOUT_S = 60 * 60
#: Files above this size are spooled to disk (not memory) while they are hashed.
SPOOL_BYTES = 64 << 20


@dataclass(frozen=True)
class Recipe:
    """What the image is (both builders read only this)."""

    debian_suite: str = "bookworm"
    #: Docker Hub's slim tag of the same suite; the local build debootstraps the suite itself.
    base_image: str = "debian:bookworm-slim"
    debian_mirror: str = "http://deb.debian.org/debian"
    #: python3 in full: python3-minimal lacks ctypes, without which Ray fails. wget: KubeRay's
    #: probes of Ray pods run it. python3-venv: the environment the packages go into.
    apt_packages: tuple[str, ...] = ("python3", "python3-venv", "wget", "ca-certificates")
    python: str = "python3.11"
    prefix: str = "/opt/rasterkube"
    user: str = "rasterkube"
    uid: int = 10001
    home: str = "/home/rasterkube"
    env: tuple[tuple[str, str], ...] = (
        ("PATH", "/opt/rasterkube/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        ("PYTHONUNBUFFERED", "1"),
        # Ray pods never try to report usage (there is nowhere to report to on the dev node).
        ("RAY_USAGE_STATS_ENABLED", "0"),
    )
    #: Optional extras of the project installed too (output.pmtiles needs pmtiles and
    #: mapbox-vector-tile; the examples use it).
    extras: tuple[str, ...] = ("pmtiles",)
    entrypoint: tuple[str, ...] = ("rasterkube",)
    cmd: tuple[str, ...] = ("operator",)
    ports: tuple[int, ...] = (8080, 9090)

    @property
    def site_packages(self) -> str:
        return f"{self.prefix}/lib/{self.python}/site-packages"

    def os_steps(self) -> list[str]:
        """Commands run as root in the base (the Dockerfile's RUN, the local build's chroot)."""
        return [
            f"groupadd --system --gid {self.uid} {self.user}",
            f"useradd --system --uid {self.uid} --gid {self.uid} --home-dir {self.home} --create-home "
            f"--shell /bin/bash {self.user}",
            f"python3 -m venv --without-pip {self.prefix}",
            # KubeRay starts Ray in a login shell (bash -lc), where Debian's /etc/profile resets
            # PATH: put the environment's bin (ray, python) back in front for every login shell.
            f"echo 'export PATH={self.prefix}/bin:$PATH' > /etc/profile.d/rasterkube.sh",
        ]

    def image_config(self) -> images.ImageConfig:
        return images.ImageConfig(
            entrypoint=self.entrypoint, cmd=self.cmd, env=dict(self.env), user=f"{self.uid}:{self.uid}",
            workdir=self.home, exposed_ports=self.ports,
            labels={"org.opencontainers.image.source": "rasterkube", "org.opencontainers.image.title": "rasterkube"},
        )  # fmt: skip


RECIPE = Recipe()


# --------------------------------------------------------------------------
# The Dockerfile (for registries)
# --------------------------------------------------------------------------


def render_dockerfile(recipe: Recipe = RECIPE) -> str:
    """The Dockerfile that builds :data:`RECIPE` with Docker (committed at the repository root)."""
    run = " \\\n    && ".join(
        [
            "apt-get update",
            f"apt-get install -y --no-install-recommends {' '.join(recipe.apt_packages)}",
            "rm -rf /var/lib/apt/lists/*",
            *recipe.os_steps(),
        ]
    )
    env = " \\\n    ".join(f"{key}={shlex.quote(value)}" for key, value in recipe.env)
    labels = " \\\n      ".join(f'{k}="{v}"' for k, v in recipe.image_config().labels.items())
    return f"""\
# rasterkube operator and job image: the operator Deployment runs `rasterkube operator`; the same
# image is the Ray head/worker/job image for the kuberay backend (it contains Ray).
#   docker build -t ghcr.io/rasterkube/rasterkube:0.1.0 .
#
# GENERATED from the image recipe (operator/rasterkube_devstack/rasterkube_image.py) by
#   python -m rasterkube_devstack.rasterkube_image --dockerfile
# Do not edit by hand: the dev node builds the same recipe without Docker, and a test fails when
# this file and the recipe disagree.
FROM {recipe.base_image}

RUN {run}

ENV {env}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY {CONSTRAINTS} {CONSTRAINTS}
COPY services services
COPY operator operator
# The project and its dependencies at the pinned versions; pip itself is not kept (the local
# build installs the same wheels without it).
RUN python3 -m venv {recipe.prefix} \\
    && {recipe.prefix}/bin/python -m pip install --no-cache-dir -c {CONSTRAINTS} '.[{",".join(recipe.extras)}]' \\
    && {recipe.prefix}/bin/python -m pip uninstall -y pip \\
    && rm -rf /src

LABEL {labels}
USER {recipe.uid}:{recipe.uid}
WORKDIR {recipe.home}
EXPOSE {' '.join(str(p) for p in recipe.ports)}
ENTRYPOINT {json.dumps(list(recipe.entrypoint))}
CMD {json.dumps(list(recipe.cmd))}
"""


# --------------------------------------------------------------------------
# Local build: layer 1, the OS
# --------------------------------------------------------------------------


def _os_layer(recipe: Recipe) -> images.Layer:
    key = images.content_key("os-layer", recipe.debian_suite, recipe.debian_mirror, recipe.apt_packages,
                             recipe.os_steps(), debian.installed_version("debootstrap"))  # fmt: skip

    def fill(writer: images.LayerWriter) -> None:
        debian.ensure(debian.IMAGE_PACKAGES)
        scratch = binaries.cache_dir() / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=scratch))
        try:
            _debootstrap(recipe, root)
            for step in recipe.os_steps():
                _run(["chroot", str(root), "/bin/sh", "-c", step], f"running `{step}` in the image root")
            _tidy(root)
            writer.tree(root, owners={recipe.home.lstrip("/"): (recipe.uid, recipe.uid)})
        finally:
            _remove_tree(root)

    return images.build_layer(key, fill, f"debootstrap {recipe.debian_suite} + {' '.join(recipe.apt_packages)}; "
                                         + "; ".join(recipe.os_steps()), compress=True)  # fmt: skip


def _debootstrap(recipe: Recipe, root: Path) -> None:
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(recipe.apt_packages)}", recipe.debian_suite,
          str(root), recipe.debian_mirror], "debootstrap of the image's Debian base", DEBOOTSTRAP_TIMEOUT_S)  # fmt: skip


def _tidy(root: Path) -> None:
    """What a Docker base image does not carry: apt lists and caches, logs of the build."""
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log", "tmp", "debootstrap"):
        path = root / sub
        if path.is_dir():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


def _remove_tree(root: Path) -> None:
    # Nothing is mounted in it (chroot steps need no /proc); plain removal.
    shutil.rmtree(root, ignore_errors=True)


def _run(argv: Sequence[str], what: str, timeout_s: float = 600) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise images.ImageError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                                f"{(proc.stdout + proc.stderr)[-3000:]}")  # fmt: skip
    return proc.stdout


# --------------------------------------------------------------------------
# Local build: layers 2 and 3, Python packages installed into the tar
# --------------------------------------------------------------------------


def build_wheel(source: Path, out_dir: Path) -> Path:
    """The project's wheel, built by pip from ``source`` (what the Dockerfile's ``pip install .`` builds)."""
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out_dir), str(source)],
         "building the rasterkube wheel", PIP_TIMEOUT_S)  # fmt: skip
    (wheel,) = sorted(out_dir.glob("rasterkube-*.whl"))
    return wheel


def wheel_content_digest(wheel: Path) -> str:
    """Digest of a wheel's members (names and bytes): equal for equal contents, whatever the zip times."""
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            h.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
    return h.hexdigest()


def wheel_requirements(wheel: Path, extras: Iterable[str] = ()) -> list[str]:
    """The wheel's requirements: the unconditional ones and those of ``extras`` (marker removed)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    found = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *extras)):
            requirement.marker = None
            found.append(str(requirement))
    return sorted(found)


def dependency_pins(requirements: Iterable[str]) -> list[str]:
    """``name==version`` of every distribution ``requirements`` pull in, as installed here.

    The environment this runs in was installed from the same constraints (``make install``),
    so this is what pip resolves for the image — known without asking an index, and it keys
    the dependency layer: a pin of a package the image does not contain (a test tool) does
    not rebuild the layer.
    """
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    todo = [(Requirement(r), "") for r in requirements]
    seen: set[tuple[str, str]] = set()
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        extras = tuple(sorted(requirement.extras))
        for wanted in ("", *extras):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                raise images.ImageError(f"{name} (a dependency of the image) is not installed here: run `make install`") from None
            pins[name] = dist.version
            todo += [(Requirement(r), wanted) for r in dist.requires or []]
    return sorted(f"{n}=={v}" for n, v in pins.items())


def download_dependencies(wheel: Path, constraints: Path, out_dir: Path) -> list[Path]:
    """The wheels of every dependency of ``wheel`` at the constrained versions (pip resolves)."""
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-c", str(constraints),
          "-d", str(out_dir), str(wheel)], "downloading the dependency wheels with pip", PIP_TIMEOUT_S)  # fmt: skip
    return sorted(p for p in out_dir.glob("*.whl") if p.name != wheel.name)


def download_pinned(pins: Sequence[str], out_dir: Path) -> list[Path]:
    """Exactly these ``name==version`` wheels (their own dependencies are in an earlier layer)."""
    if not pins:
        return []
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps", "-d",
          str(out_dir), *pins], "downloading the extras' wheels with pip", PIP_TIMEOUT_S)  # fmt: skip
    return sorted(out_dir.glob("*.whl"))


def _python_layer(key: str, wheels: Sequence[Path], recipe: Recipe, what: str) -> images.Layer:
    def fill(writer: images.LayerWriter) -> None:
        destination = TarDestination(writer, recipe)
        for wheel in wheels:
            destination.install(wheel)
        destination.close()

    return images.build_layer(key, fill, what, compress=True)


class TarDestination:
    """Installs wheels into a layer as if into ``recipe.prefix`` (a venv): files, scripts, RECORD.

    Uses :mod:`installer` (PyPA's wheel installer) for the wheel format — schemes, entry-point
    scripts with the image's interpreter, RECORD — and writes into the tar instead of a
    directory. Python files get a ``__pycache__`` .pyc compiled here (same Python minor as
    the image) with unchecked hashes, so they are valid whatever the files' times.
    """

    def __init__(self, writer: images.LayerWriter, recipe: Recipe) -> None:
        from installer.destinations import WheelDestination

        self._writer = writer
        self._recipe = recipe
        self._compile = sys.version_info[:2] == _python_version(recipe)
        outer = self

        class _Destination(WheelDestination):
            def write_script(self, name: str, module: str, attr: str, section: str):  # type: ignore[no-untyped-def]
                return outer._write_script(name, module, attr, section)

            def write_file(self, scheme, path, stream, is_executable):  # type: ignore[no-untyped-def]
                return outer._write_file(scheme, path, stream, is_executable)

            def finalize_installation(self, scheme, record_file_path, records):  # type: ignore[no-untyped-def]
                outer._finalize(scheme, record_file_path, records)

        self._destination = _Destination()
        self._entries: dict[str, tuple[bytes | Path, int]] = {}

    def _scheme_dir(self, scheme: str) -> str:
        r = self._recipe
        return {"purelib": r.site_packages, "platlib": r.site_packages, "scripts": f"{r.prefix}/bin",
                "data": r.prefix, "headers": f"{r.prefix}/include"}[scheme]  # fmt: skip

    def install(self, wheel: Path) -> None:
        from installer import install
        from installer.sources import WheelFile

        with WheelFile.open(wheel) as source:
            install(source, self._destination, additional_metadata={"INSTALLER": b"rasterkube-devstack\n"})

    def _add(self, name: str, stream: BinaryIO, mode: int) -> tuple[str, int]:
        """Hash ``stream`` while spooling it, then append it to the tar."""
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            h, size = hashlib.sha256(), 0
            while chunk := stream.read(images.CHUNK):
                h.update(chunk)
                size += len(chunk)
                spool.write(chunk)
            spool.seek(0)
            self._writer.file(name, spool, size=size, mode=mode)  # type: ignore[arg-type]
            if self._compile and name.endswith(".py"):
                spool.seek(0)
                self._write_pyc(name, spool.read())
        return _urlsafe_b64(h.digest()), size

    def _write_pyc(self, name: str, source: bytes) -> None:
        import importlib._bootstrap_external as bootstrap  # the stdlib's own pyc writer

        try:
            code = compile(source, f"/{name}", "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            return  # e.g. templates shipped as .py; Python would not import them either
        data = bootstrap._code_to_hash_pyc(code, importlib.util.source_hash(source), checked=False)
        directory, _, filename = name.rpartition("/")
        tag = sys.implementation.cache_tag
        self._writer.file(f"{directory}/__pycache__/{filename[:-3]}.{tag}.pyc", bytes(data))

    def _write_file(self, scheme: str, path: str, stream: BinaryIO, is_executable: bool):  # type: ignore[no-untyped-def]
        from installer.records import Hash, RecordEntry

        name = f"{self._scheme_dir(scheme)}/{path}"
        digest, size = self._add(name, stream, 0o755 if is_executable else 0o644)
        return RecordEntry(path, Hash("sha256", digest), size)

    def _write_script(self, name: str, module: str, attr: str, section: str):  # type: ignore[no-untyped-def]
        from installer.scripts import Script

        script_name, data = Script(name, module, attr, section).generate(f"{self._recipe.prefix}/bin/python", "posix")
        return self._write_file("scripts", script_name, io.BytesIO(data), True)

    def _finalize(self, scheme: str, record_file_path: str, records: Iterable) -> None:  # type: ignore[type-arg]
        from installer.utils import construct_record_file

        def prefix_for_scheme(file_scheme: str) -> str | None:
            # RECORD paths are relative to the directory of RECORD's own scheme (as installer does)
            if file_scheme == scheme:
                return None
            return os.path.relpath(self._scheme_dir(file_scheme), self._scheme_dir(scheme)) + "/"

        with construct_record_file(list(records), prefix_for_scheme) as stream:
            data = stream.read()
        self._writer.file(f"{self._scheme_dir(scheme)}/{record_file_path}", data)

    def close(self) -> None:
        pass


def _urlsafe_b64(digest: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _python_version(recipe: Recipe) -> tuple[int, int]:
    major, minor = recipe.python.removeprefix("python").split(".")
    return int(major), int(minor)


# --------------------------------------------------------------------------
# The whole image
# --------------------------------------------------------------------------


@dataclass
class BuildReport:
    image: images.Image
    seconds: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)


def build(source: Path = REPO_ROOT, recipe: Recipe = RECIPE, *, version: str | None = None,
          present: Iterable[str] = ()) -> BuildReport:  # fmt: skip
    """Build (or find in the cache) the image of ``source`` per ``recipe``; see the module docstring.

    ``present``: layer digests a containerd already holds (they count as cached)."""
    present = frozenset(present)
    report_seconds: dict[str, float] = {}
    cached: dict[str, bool] = {}
    scratch = binaries.cache_dir() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="image-build-", dir=scratch) as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        wheel = build_wheel(source, work / "project")
        report_seconds["wheel"] = round(time.monotonic() - t0, 2)
        constraints = source / CONSTRAINTS
        version = version or wheel.name.split("-")[1]

        t0 = time.monotonic()
        os_key = images.content_key("os-layer", recipe.debian_suite, recipe.debian_mirror, recipe.apt_packages,
                                    recipe.os_steps(), debian.installed_version("debootstrap"))  # fmt: skip
        cached["os"] = images.cached_layer(os_key, present) is not None
        base = images.cached_layer(os_key, present) or _os_layer(recipe)
        report_seconds["os_layer"] = round(time.monotonic() - t0, 2)

        t0 = time.monotonic()
        deps_key = images.content_key("deps-layer", dependency_pins(wheel_requirements(wheel)), recipe.site_packages,
                                      recipe.prefix, sys.version_info[:2])  # fmt: skip
        deps_cached = images.cached_layer(deps_key, present)
        cached["dependencies"] = deps_cached is not None
        if deps_cached is not None:
            deps = deps_cached
        else:
            wheels = download_dependencies(wheel, constraints, work / "wheels")
            deps = _python_layer(deps_key, wheels, recipe, f"install {len(wheels)} dependency wheels (-c {CONSTRAINTS})")
            shutil.rmtree(work / "wheels", ignore_errors=True)
        report_seconds["dependencies_layer"] = round(time.monotonic() - t0, 2)

        # The extras' few packages in a layer of their own: adding one does not rebuild the GBs above.
        t0 = time.monotonic()
        base_pins = dependency_pins(wheel_requirements(wheel))
        extra_pins = sorted(set(dependency_pins(wheel_requirements(wheel, recipe.extras))) - set(base_pins))
        extras_key = images.content_key("extras-layer", extra_pins, recipe.site_packages, recipe.prefix,
                                        sys.version_info[:2])  # fmt: skip
        extras_cached = images.cached_layer(extras_key, present)
        cached["extras"] = extras_cached is not None
        extras = extras_cached or _python_layer(
            extras_key, download_pinned(extra_pins, work / "extras"), recipe,
            f"install extras {','.join(recipe.extras)}: {' '.join(extra_pins)}",
        )
        report_seconds["extras_layer"] = round(time.monotonic() - t0, 2)

        t0 = time.monotonic()
        app_key = images.content_key("app-layer", wheel_content_digest(wheel), recipe.site_packages, recipe.prefix)
        app_cached = images.cached_layer(app_key, present)
        cached["project"] = app_cached is not None
        app = app_cached or _python_layer(app_key, [wheel], recipe, f"install {wheel.name}")
        report_seconds["project_layer"] = round(time.monotonic() - t0, 2)
    image = images.assemble(REPOSITORY, version, [base, deps, extras, app], recipe.image_config())
    return BuildReport(image=image, seconds=report_seconds, cached=cached)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The rasterkube image recipe: render the Dockerfile or build locally.")
    parser.add_argument("--dockerfile", action="store_true", help="write the Dockerfile rendered from the recipe")
    parser.add_argument("--check", action="store_true", help="with --dockerfile: fail if the file differs")
    parser.add_argument("--build", action="store_true", help="build the image here (no Docker) and print its name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.dockerfile:
        text = render_dockerfile()
        if args.check:
            if DOCKERFILE.read_text() != text:
                print(f"{DOCKERFILE} differs from the recipe: run python -m rasterkube_devstack.rasterkube_image "
                      "--dockerfile", file=sys.stderr)  # fmt: skip
                return 1
            return 0
        DOCKERFILE.write_text(text)
        print(DOCKERFILE)
    if args.build:
        report = build()
        print(json.dumps({"image": report.image.name, "bytes": report.image.size, "seconds": report.seconds,
                          "cached": report.cached}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
