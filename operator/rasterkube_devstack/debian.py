"""The Debian packages the real node and the image builder need, installed when missing.

The node runs containerd, runc and the CNI plugins from Debian's own packages (bookworm:
containerd 1.6.20, runc 1.1.5, containernetworking-plugins 1.1.1), plus iptables and conntrack
for kube-proxy; the image builder uses debootstrap. ``ensure(...)`` asks dpkg what is
installed and runs ``apt-get install`` (after one ``apt-get update``) for the rest, as root,
under a file lock so that parallel callers install once. ``python -m rasterkube_devstack.debian``
does it from the command line (``make node-deps``).

Versions are Debian's: bookworm only takes security fixes, and pinning an exact version
would break the day a fix replaces it in the archive. What is installed is reported
(:func:`versions`) and recorded by the node.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence

from rasterkube_devstack import binaries

#: Packages of the node: container runtime, OCI runtime, CNI plugins, kube-proxy's tools,
#: and the util-linux/iproute2 tools the stack itself calls (nsenter, unshare, mount, ip).
NODE_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack",
                 "iproute2", "util-linux", "mount")  # fmt: skip
#: Packages of the image builder (a Debian root filesystem without Docker).
IMAGE_PACKAGES = ("debootstrap",)
APT_TIMEOUT_S = 30 * 60
QUERY_TIMEOUT_S = 60


class DebianPackageError(RuntimeError):
    """Packages are missing and could not be installed (the message says how to)."""


def installed_version(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    if shutil.which("dpkg-query") is None:
        return None
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package], capture_output=True, text=True,
                          timeout=QUERY_TIMEOUT_S, check=False)  # fmt: skip
    status, _, version = proc.stdout.partition("\t")
    return version if proc.returncode == 0 and status.endswith(" installed") else None


def missing(packages: Iterable[str]) -> list[str]:
    return [package for package in packages if installed_version(package) is None]


def versions(packages: Iterable[str]) -> dict[str, str | None]:
    return {package: installed_version(package) for package in packages}


def _apt(args: Sequence[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        raise DebianPackageError(f"`apt-get {' '.join(args)}` exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")


def ensure(packages: Iterable[str]) -> list[str]:
    """Install the ``packages`` that are missing; returns what was installed."""
    wanted = list(dict.fromkeys(packages))
    todo = missing(wanted)
    if not todo:
        return []
    if shutil.which("apt-get") is None or shutil.which("dpkg-query") is None:
        raise DebianPackageError(
            f"the packages {', '.join(todo)} are needed and this is not a Debian/Ubuntu system with apt; "
            "install their equivalents by hand"
        )
    if os.geteuid() != 0:
        raise DebianPackageError(f"the packages {', '.join(todo)} are needed: run `sudo apt-get install {' '.join(todo)}`")
    with binaries._file_lock("apt"):
        todo = missing(wanted)
        if todo:
            _apt(["update", "-q"])
            _apt(["install", "-y", "-q", "--no-install-recommends", *todo])
    still = missing(wanted)
    if still:
        raise DebianPackageError(f"apt-get did not install {', '.join(still)}")
    return todo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install the Debian packages of the rasterkube dev node.")
    parser.add_argument("--image", action="store_true", help="also the image builder's (debootstrap)")
    args = parser.parse_args(argv)
    packages = [*NODE_PACKAGES, *(IMAGE_PACKAGES if args.image else ())]
    try:
        installed = ensure(packages)
    except DebianPackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"installed": installed, "versions": versions(packages)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
