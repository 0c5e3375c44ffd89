"""Refresh the JavaScript bundled with the viewer from the npm registry.

    python -m rasterkube.viewer.vendor          # re-fetch the pinned versions, check, copy
    python -m rasterkube.viewer.vendor --check  # only verify the committed files

The files live in ``static/vendor/`` and are committed (the viewer never downloads anything at
run time). ``VENDOR.json`` there records each package's version, the sha256 of its registry
tarball and of every copied file; ``--check`` (and a unit test) compares the files with it.
To upgrade, change a version here, set its sha256 to the new tarball's (the error message
prints it), run this module and commit the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Final

from rasterkube.viewer.npm import NpmPackage, extract_member, pack, sha256_file

VENDOR_DIR: Final = Path(__file__).parent / "static" / "vendor"
MANIFEST: Final = "VENDOR.json"

MAPLIBRE: Final = NpmPackage(
    "maplibre-gl", "5.24.1", "b84d7fdf7fba5922fd3fff9a92733936c7a03b99165afc6c84f41c311bdbfa9d"
)
PMTILES: Final = NpmPackage("pmtiles", "4.5.0", "23ae7c575578ad24cd579377d69c46550631da219e6f179997ec2cf3b8c937e5")

#: package → (file in the tarball, name under static/vendor/), and the package's license.
FILES: Final = {
    MAPLIBRE: [
        ("dist/maplibre-gl.js", "maplibre-gl.js"),
        ("dist/maplibre-gl.css", "maplibre-gl.css"),
        ("LICENSE.txt", "LICENSE-maplibre-gl.txt"),
    ],
    # The pmtiles tarball ships no LICENSE file; its package.json says BSD-3-Clause.
    PMTILES: [("dist/pmtiles.js", "pmtiles.js"), ("package.json", "pmtiles-package.json")],
}
LICENSES: Final = {MAPLIBRE: "BSD-3-Clause (LICENSE-maplibre-gl.txt)", PMTILES: "BSD-3-Clause (pmtiles-package.json)"}


def refresh(vendor_dir: Path = VENDOR_DIR) -> dict[str, object]:
    manifest: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for package, members in FILES.items():
            tarball = pack(package, Path(tmp))
            files = {}
            for member, name in members:
                files[name] = sha256_file(extract_member(tarball, member, vendor_dir / name))
            manifest[package.name] = {
                "version": package.version,
                "tarball_sha256": package.sha256,
                "license": LICENSES[package],
                "files": files,
            }
    (vendor_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def check(vendor_dir: Path = VENDOR_DIR) -> list[str]:
    """Problems with the committed files (missing, changed, versions not the pinned ones)."""
    path = vendor_dir / MANIFEST
    if not path.exists():
        return [f"{path} is missing; run python -m rasterkube.viewer.vendor"]
    manifest = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    for package in FILES:
        entry = manifest.get(package.name, {})
        if entry.get("version") != package.version or entry.get("tarball_sha256") != package.sha256:
            problems.append(f"{package.name}: {MANIFEST} is not for the pinned {package.spec}")
        for name, digest in entry.get("files", {}).items():
            file = vendor_dir / name
            if not file.exists() or sha256_file(file) != digest:
                problems.append(f"{file} is missing or differs from {MANIFEST}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="verify the committed files only")
    args = parser.parse_args(argv)
    if not args.check:
        for name, entry in refresh().items():
            print(f"{name} {entry['version']}: {', '.join(entry['files'])}")  # type: ignore[index]
    problems = check()
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
