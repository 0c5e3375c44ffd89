"""Pinned packages from the npm registry, fetched with its own client (``npm pack``).

Used at build time (:mod:`rasterkube.viewer.vendor` refreshes the bundled JavaScript) and by
:mod:`rasterkube.viewer.browser` (a headless Chromium for screenshots); never by the viewer
itself, which serves only files shipped in the package. Every tarball is checked against its
pinned sha256 before anything in it is used.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from rasterkube.errors import UserError
from rasterkube.storage import sha256_file


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    sha256: str  # of the registry tarball

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball_name(self) -> str:
        # npm pack names "@scope/name" tarballs "scope-name-<version>.tgz".
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


def pack(package: NpmPackage, directory: Path) -> Path:
    """``npm pack`` the pinned version into ``directory`` and verify its sha256."""
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(f"npm is needed to fetch {package.spec} from the npm registry; install Node.js (npm)")
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [npm, "pack", package.spec, "--silent", "--pack-destination", str(directory)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    tarball = directory / package.tarball_name
    if proc.returncode != 0 or not tarball.exists():
        raise UserError(f"npm pack {package.spec} failed: {proc.stderr.strip()[-500:]}; check access to the npm registry")
    digest = sha256_file(tarball)
    if digest != package.sha256:
        tarball.unlink()
        raise UserError(f"{package.spec} tarball has sha256 {digest}, expected {package.sha256}; refusing to use it")
    return tarball


def extract_member(tarball: Path, member: str, dest: Path) -> Path:
    """Copy one file of an npm tarball (paths start with ``package/``) to ``dest``."""
    with tarfile.open(tarball, "r:gz") as tf:
        src = tf.extractfile(f"package/{member}")
        if src is None:
            raise UserError(f"{member} is not a file in {tarball.name}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    return dest
