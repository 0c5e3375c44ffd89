"""The real KubeRay CRDs (and optionally the KubeRay operator binary), pinned and cached.

The CRDs come straight from the KubeRay Go module on the Go module proxy:
``go mod download -json github.com/ray-project/kuberay/ray-operator@v<KUBERAY_VERSION>``
fetches the module zip (its hash checked against sum.golang.org by the Go
tool) into the module cache, and the three files under ``config/crd/bases/``
are copied into ``cache_dir()/kuberay/v<version>/crds/``. Nothing is taken
from a branch or a release page, so tests always see exactly the schema that
KubeRay v<version> installs.

``ensure_kuberay_operator()`` compiles the KubeRay operator (``main.go`` at the
module root) from the same module version into ``cache_dir()/bin``. It is
not needed by the tests — without kubelets it could never start a Ray pod —
but lets a developer run the real controller against the dev control plane.

Conventions are those of :mod:`rasterkube_devstack.binaries`: the same
GOMODCACHE/GOCACHE/GOFLAGS, a file lock per artefact, and atomic renames, so
concurrent callers never see half-written files.

Run ``python -m rasterkube_devstack.kuberay [--operator]`` to warm the cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from rasterkube_devstack import binaries
from rasterkube_devstack.binaries import BinaryBuildError

if TYPE_CHECKING:
    from rasterkube_devstack import images

log = logging.getLogger(__name__)

#: KubeRay release (tag ``ray-operator/v1.5.1``). v1.5.2 is listed on the
#: proxy, but sum.golang.org (through the proxy) has no record of it yet, so
#: the Go tool cannot verify it; v1.5.1 is the newest verifiable patch.
KUBERAY_VERSION = "1.5.1"
KUBERAY_MODULE = "github.com/ray-project/kuberay/ray-operator"
CRD_SUBDIR = Path("config/crd/bases")
#: file name -> metadata.name of the CRD inside it.
CRD_FILES: dict[str, str] = {
    "ray.io_rayclusters.yaml": "rayclusters.ray.io",
    "ray.io_rayjobs.yaml": "rayjobs.ray.io",
    "ray.io_rayservices.yaml": "rayservices.ray.io",
}
#: Provenance of the copied CRDs (module version, zip hash, git origin).
SOURCE_FILE = "SOURCE.json"
OPERATOR_NAME = "kuberay-operator"


def kuberay_dir(version: str = KUBERAY_VERSION) -> Path:
    return binaries.cache_dir() / "kuberay" / f"v{version}"


def crd_dir(version: str = KUBERAY_VERSION) -> Path:
    return kuberay_dir(version) / "crds"


def _crds_ready(directory: Path) -> bool:
    return all((directory / name).is_file() for name in CRD_FILES) and (directory / SOURCE_FILE).is_file()


def _download_module(version: str) -> dict[str, object]:
    """``go mod download -json module@version``; returns its JSON (Dir, Sum, Origin, ...)."""
    scratch_root = binaries.cache_dir() / "tmp"
    scratch_root.mkdir(parents=True, exist_ok=True)
    hint = (
        "Check access to the Go module proxy (GOPROXY) and the checksum database (GOSUMDB), and that "
        f"{KUBERAY_MODULE}@v{version} exists. Go caches live in {binaries.cache_dir() / 'go'}."
    )
    with tempfile.TemporaryDirectory(prefix="kuberay-download-", dir=scratch_root) as tmp:
        # `go mod download` needs module mode: a bare go.mod is enough.
        (Path(tmp) / "go.mod").write_text("module rasterkube.local/devstack/kuberay\n")
        out = binaries._run_go(
            ["mod", "download", "-json", f"{KUBERAY_MODULE}@v{version}"],
            Path(tmp),
            f"downloading {KUBERAY_MODULE}@v{version}",
            hint,
        )
    info: dict[str, object] = json.loads(out)
    if info.get("Error") or not info.get("Dir"):
        raise BinaryBuildError(
            f"go mod download {KUBERAY_MODULE}@v{version} failed: {info.get('Error') or 'no Dir in output'}\n{hint}"
        )
    return info


def _check_crd(path: Path, expected_name: str) -> None:
    """The copied file must be the CRD we think it is (guards against layout changes upstream)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the files are ~1 MB each
    doc = yaml.load(path.read_text(), Loader=loader)  # a safe loader (CSafeLoader or SafeLoader)
    kind = doc.get("kind") if isinstance(doc, dict) else None
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc, dict) else None
    if kind != "CustomResourceDefinition" or name != expected_name:
        raise BinaryBuildError(
            f"{path} is not the CRD {expected_name!r} (kind={kind!r}, name={name!r}); "
            f"KubeRay moved or renamed its CRDs: update CRD_FILES/CRD_SUBDIR in {__name__}."
        )


def ensure_kuberay_crds(version: str = KUBERAY_VERSION) -> list[Path]:
    """Paths of the real KubeRay CRDs (RayCluster, RayJob, RayService) of ``version``.

    Cached in ``cache_dir()/kuberay/v<version>/crds``; the first call downloads
    the KubeRay module through the Go module proxy (a few MB, seconds).
    """
    target = crd_dir(version)
    if _crds_ready(target):
        return [target / name for name in CRD_FILES]
    with binaries._file_lock(f"kuberay-crds-{version}"):
        if _crds_ready(target):  # another process finished while we waited
            return [target / name for name in CRD_FILES]
        info = _download_module(version)
        source = Path(str(info["Dir"])) / CRD_SUBDIR
        missing = [name for name in CRD_FILES if not (source / name).is_file()]
        if missing:
            present = sorted(p.name for p in source.glob("*")) if source.is_dir() else []
            raise BinaryBuildError(
                f"{KUBERAY_MODULE}@v{version} has no {', '.join(missing)} under {CRD_SUBDIR} "
                f"(found: {present or 'nothing'}); update CRD_FILES/CRD_SUBDIR in {__name__}."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".crds-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it 0700
        try:
            for name, crd_name in CRD_FILES.items():
                shutil.copyfile(source / name, staging / name)
                _check_crd(staging / name, crd_name)
            provenance = {k: info.get(k) for k in ("Path", "Version", "Sum", "GoModSum", "Origin")}
            provenance["CopiedFrom"] = str(CRD_SUBDIR)
            (staging / SOURCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            shutil.rmtree(target, ignore_errors=True)  # a partial dir from an older layout
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("KubeRay v%s CRDs ready: %s", version, target)
    return [target / name for name in CRD_FILES]


def _check_operator_binary(binary: Path, version: str) -> None:
    """The binary embeds the pinned module version and runs (``-h`` lists its flags)."""
    go = binaries._go_binary()
    proc = subprocess.run([go, "version", "-m", str(binary)], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0 or f"{KUBERAY_MODULE}\tv{version}" not in proc.stdout:
        raise binaries._fail(
            f"{binary} does not embed {KUBERAY_MODULE} v{version}",
            proc.stdout + proc.stderr,
            "Delete the binary and rebuild.",
        )
    proc = subprocess.run([str(binary), "-h"], capture_output=True, text=True, timeout=60, check=False)
    if "-metrics-addr" not in proc.stdout + proc.stderr:
        raise binaries._fail(f"{binary} -h did not list its flags", proc.stdout + proc.stderr, "Rebuild.")


def ensure_kuberay_operator(version: str = KUBERAY_VERSION) -> Path:
    """Path to the KubeRay operator v``version``, compiled from the module proxy on first use.

    A cold build takes several minutes on 2 cores (controller-runtime and the
    Kubernetes client libraries); later calls return the cached binary.
    """

    def produce(output: Path) -> None:
        binaries._go_build(
            name=OPERATOR_NAME,
            dep=KUBERAY_MODULE,
            dep_version=f"v{version}",
            replace_version=f"v{version}",  # the module has no local replaces; unused
            package=KUBERAY_MODULE,  # main.go sits at the module root
            output=output,
        )
        _check_operator_binary(output, version)

    return binaries._ensure(OPERATOR_NAME, version, produce)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    args = sys.argv[1:] if argv is None else argv
    result: dict[str, object] = {"version": KUBERAY_VERSION, "crds": [str(p) for p in ensure_kuberay_crds()]}
    if "--operator" in args:
        result["operator"] = str(ensure_kuberay_operator())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --------------------------------------------------------------------------
# The KubeRay operator in the cluster (the real node)
# --------------------------------------------------------------------------

OPERATOR_NAMESPACE = "kuberay-system"
OPERATOR_REPOSITORY = "rasterkube.local/kuberay-operator"
#: KubeRay's own kustomize bases (RBAC and the manager Deployment) inside the module.
OPERATOR_BASES = (Path("config/rbac"), Path("config/manager"))
#: The image name KubeRay's manager.yaml refers to (replaced by kustomize's images transformer).
UPSTREAM_IMAGE = "kuberay/operator"


def module_dir(version: str = KUBERAY_VERSION) -> Path:
    """The KubeRay module in the Go module cache (downloaded on first use)."""
    return Path(str(_download_module(version)["Dir"]))


def operator_image(version: str = KUBERAY_VERSION) -> images.Image:
    """An image of the KubeRay operator binary built here (``/manager``, as upstream's image)."""
    from rasterkube_devstack import images

    return images.single_file_image(OPERATOR_REPOSITORY, version, ensure_kuberay_operator(version), "/manager",
                                    images.ImageConfig(entrypoint=["/manager"], user="65532:65532"))  # fmt: skip


def operator_manifests(kubectl: Path, image: str, namespace: str = OPERATOR_NAMESPACE,
                       version: str = KUBERAY_VERSION) -> str:  # fmt: skip
    """KubeRay's own RBAC and Deployment for ``version`` (its kustomize bases), with ``image``.

    Rendered by kubectl's built-in kustomize, so the operator runs with exactly the
    permissions and flags that KubeRay ships for the CRDs of the same version.
    """
    source = module_dir(version)
    repository, _, tag = image.rpartition(":")
    scratch = binaries.cache_dir() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kuberay-kustomize-", dir=scratch) as tmp:
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": namespace,
            # kustomize takes bases by relative path only
            "resources": [os.path.relpath(source / base, tmp) for base in OPERATOR_BASES],
            "images": [{"name": UPSTREAM_IMAGE, "newName": repository, "newTag": tag}],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        proc = subprocess.run([str(kubectl), "kustomize", tmp], capture_output=True, text=True, timeout=120,
                              check=False)  # fmt: skip
    if proc.returncode != 0:
        raise BinaryBuildError(f"rendering KubeRay's manifests with kustomize failed: {proc.stderr[-2000:]}")
    namespace_doc = yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    return namespace_doc + "---\n" + proc.stdout
