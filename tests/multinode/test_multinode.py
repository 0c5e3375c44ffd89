"""A Ray cluster of one head and two worker nodes on this machine, each node in a network
namespace of its own (rasterkube_devstack.raycluster), inputs and outputs in a real S3 server
that every node reaches over the namespaces' bridge — no path that only one node can see.

The same manifests run there (a driver on the head, as a Ray job's entrypoint runs) and on an
embedded single-node Ray; their outputs must be equal. Then the faults: a worker node killed
with SIGKILL mid-job (Ray retries its tasks elsewhere; same output), and the head killed (the
run fails with a reason and leaves nothing that looks complete).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from rasterkube import storage
from rasterkube.runtime.headwatch import EXIT_HEAD_LOST
from rasterkube_devstack import netns, nodestack
from rasterkube_devstack.raycluster import HEAD, RayCluster, worker_role

pytestmark = pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason()))

REPO = Path(__file__).resolve().parents[2]
RASTERKUBE = str(Path(sys.executable).with_name("rasterkube"))
BUCKET = "rasterkube"
RUN_TIMEOUT_S = 900
#: A worker lost mid-job: Ray notices the node is gone (health checks), then retries its tasks.
WORKER_LOSS_BOUND_S = 420
HEAD_LOSS_BOUND_S = 240


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    rc = RayCluster(tmp_path_factory.mktemp("multinode"), f"rkm{uuid.uuid4().hex[:5]}")
    rc.start(buckets=(BUCKET,))
    try:
        seeded = subprocess.run([sys.executable, "-c", nodestack.seed_script()], capture_output=True, text=True,
                                env={**os.environ, **rc.s3_env(inside=False)}, timeout=600)  # fmt: skip
        assert seeded.returncode == 0, seeded.stderr[-3000:]
        yield rc
    finally:
        rc.stop()
    assert not netns.ours(rc.prefix)


@pytest.fixture()
def host_s3(cluster: RayCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process reads the cluster's S3 through the loopback forward."""
    env = cluster.s3_env(inside=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    storage_fs_reset()
    return env


def storage_fs_reset() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def run_multinode(cluster: RayCluster, manifest: Path, root: str) -> subprocess.CompletedProcess[str]:
    return cluster.run_in(HEAD, [RASTERKUBE, "run", "-f", str(manifest), "--storage-root", root],
                          timeout_s=RUN_TIMEOUT_S)  # fmt: skip


def run_single_node(cluster: RayCluster, manifest: Path, root: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(cluster.s3_env(inside=False))
    return subprocess.run([RASTERKUBE, "run", "-f", str(manifest), "--storage-root", root], capture_output=True,
                          text=True, env=env, timeout=RUN_TIMEOUT_S)  # fmt: skip


def committed_outputs(root: str) -> dict[str, str]:
    """Relative path → URI of every committed output (zarr store, GeoParquet, PMTiles) under ``root``."""
    fs, base = storage.filesystem(root)
    fs.invalidate_cache()
    base = base.rstrip("/")
    keys = [k[len(base) + 1 :] for k in fs.find(base)]
    keys = [k for k in keys if not any(part.startswith(".") for part in k.split("/"))]  # staging is no output
    groups = sorted({k.rsplit("/", 1)[0] for k in keys if k.endswith("/zarr.json")}, key=len)
    stores: list[str] = []
    for group in groups:
        if not any(group.startswith(s + "/") for s in stores):
            stores.append(group)
    files = [k for k in keys if k.endswith((".parquet", ".pmtiles")) and not any(k.startswith(s + "/") for s in stores)]
    return {rel: f"s3://{base}/{rel}" for rel in [*stores, *files]}


def _arrays(uri: str) -> dict[str, np.ndarray]:
    import zarr

    store = zarr.storage.FsspecStore.from_url(uri, storage_options=storage.storage_options(uri), read_only=True)
    group = zarr.open_group(store, mode="r")
    return {path: np.asarray(arr[...]) for path, arr in group.members(max_depth=None) if isinstance(arr, zarr.Array)}


def assert_same_outputs(single: str, multi: str, *, float_rtol: dict[str, float]) -> list[str]:
    """Every output of ``single`` exists under ``multi`` with equal content; returns their paths."""
    import geopandas

    a, b = committed_outputs(single), committed_outputs(multi)
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    assert a, f"no outputs under {single}"
    for rel in sorted(a):
        if rel.endswith(".parquet"):
            fa = geopandas.read_parquet(a[rel], storage_options=storage.storage_options(a[rel]))
            fb = geopandas.read_parquet(b[rel], storage_options=storage.storage_options(b[rel]))
            assert len(fa) == len(fb), rel
            key = [c for c in fa.columns if c != "geometry"]
            fa, fb = (f.sort_values(key).reset_index(drop=True) for f in (fa, fb))
            assert fa.geometry.geom_equals_exact(fb.geometry, tolerance=1e-9).all(), rel
        elif rel.endswith(".pmtiles"):
            continue  # rendered from the GeoParquet just compared
        else:
            xa, xb = _arrays(a[rel]), _arrays(b[rel])
            assert sorted(xa) == sorted(xb), rel
            rtol = next((t for kind, t in float_rtol.items() if f"/{kind}/" in f"/{rel}"), 0.0)
            for name in xa:
                if rtol and np.issubdtype(xa[name].dtype, np.floating):
                    np.testing.assert_array_equal(np.isnan(xa[name]), np.isnan(xb[name]), err_msg=f"{rel}:{name}")
                    np.testing.assert_allclose(xa[name], xb[name], rtol=rtol, atol=1e-5, equal_nan=True,
                                               err_msg=f"{rel}:{name}")  # fmt: skip
                else:
                    np.testing.assert_array_equal(xa[name], xb[name], err_msg=f"{rel}:{name}")
    return sorted(a)


def test_three_nodes_each_in_its_own_namespace_and_tasks_run_on_all(cluster: RayCluster) -> None:
    assert cluster.alive_nodes() == ["10.253.0.10", "10.253.0.11", "10.253.0.12"]
    for role in cluster.node_roles:
        routes = cluster.hosts[role].ns.ip("route", "show")
        assert "default" not in routes, f"{role} has a way out: {routes}"


def test_every_kind_equals_a_single_node_run(cluster: RayCluster, host_s3: dict[str, str], tmp_path: Path) -> None:
    manifests = [REPO / "examples" / "prediction-change.yaml", REPO / "examples" / "changescore-landsat.yaml",
                 REPO / "examples" / "vectorization-change.yaml"]  # fmt: skip
    both = tmp_path / "all.yaml"
    both.write_text("\n---\n".join(p.read_text() for p in manifests))
    single = run_single_node(cluster, both, f"s3://{BUCKET}/single")
    assert single.returncode == 0, single.stderr[-4000:]
    multi = run_multinode(cluster, both, f"s3://{BUCKET}/multi")
    assert multi.returncode == 0, multi.stderr[-4000:]
    outputs = assert_same_outputs(f"s3://{BUCKET}/single", f"s3://{BUCKET}/multi",
                                  float_rtol={"prediction": 1e-4})  # fmt: skip
    kinds = {rel.split("/")[1] for rel in outputs}
    assert kinds == {"mosaic", "prediction", "changescore", "vectorization"}, outputs


def _series_store(uri: str) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.stores import random_series, write_store

    return write_store(uri, random_series(8, 3, 192, 192, seed=7), chunk=16)  # 144 blocks


def _changescore_manifest(path: Path, source: str, name: str) -> Path:
    doc = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore", "metadata": {"name": name},
           "spec": {"source": {"uri": source}, "methods": ["difference", "looMedoid"], "distance": "euclidean",
                    "robustTimeZScore": True, "xyBlockMultiplier": 1}}  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    return path


def _staged_objects(root: str, name: str) -> int:
    fs, base = storage.filesystem(f"{root}/default/changescore")
    fs.invalidate_cache()
    try:
        staged = [p for p in fs.ls(base) if p.rsplit("/", 1)[-1].startswith(f".{name}")]
    except FileNotFoundError:
        return 0
    return sum(len(fs.find(p)) for p in staged)


def _wait_for(proc: subprocess.Popen[bytes], condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_worker_node_killed_mid_job_still_gives_the_same_output(cluster: RayCluster, host_s3: dict[str, str],
                                                                  tmp_path: Path) -> None:  # fmt: skip
    source = _series_store(f"s3://{BUCKET}/inputs/series-w.zarr")
    manifest = _changescore_manifest(tmp_path / "cs.yaml", source, "worker-loss")
    single = run_single_node(cluster, manifest, f"s3://{BUCKET}/wl-single")
    assert single.returncode == 0, single.stderr[-4000:]
    expected = len(storage.filesystem(f"s3://{BUCKET}/wl-single")[0].find(f"{BUCKET}/wl-single/default/changescore"))

    root = f"s3://{BUCKET}/wl-multi"
    log = tmp_path / "run.log"
    proc = cluster.popen_in(HEAD, [RASTERKUBE, "run", "-f", str(manifest), "--storage-root", root], log=log)
    try:
        _wait_for(proc, lambda: _staged_objects(root, "worker-loss") >= expected // 4, 300, "a quarter of the blocks")
        killed_at = time.monotonic()
        assert cluster.kill(worker_role(1)), "no process to kill in worker-1's namespace"
        rc = proc.wait(WORKER_LOSS_BOUND_S)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log.read_text()[-4000:]
    print(f"worker-1 killed; the job finished {elapsed:.0f}s later")
    assert_same_outputs(f"s3://{BUCKET}/wl-single", root, float_rtol={})


def test_the_head_killed_fails_the_run_with_a_reason_and_nothing_looks_complete(
    cluster: RayCluster, host_s3: dict[str, str], tmp_path: Path
) -> None:
    source = _series_store(f"s3://{BUCKET}/inputs/series-h.zarr")
    manifest = _changescore_manifest(tmp_path / "cs.yaml", source, "head-loss")
    root = f"s3://{BUCKET}/hl"
    log = tmp_path / "run.log"
    proc = cluster.popen_in(HEAD, [RASTERKUBE, "run", "-f", str(manifest), "--storage-root", root], log=log)
    try:
        _wait_for(proc, lambda: _staged_objects(root, "head-loss") > 20, 300, "the first blocks")
        # The head node's Ray processes die; the driver (the job's entrypoint) survives to tell.
        ray_pids = [p for p in cluster.hosts[HEAD].ns.pids() if p != proc.pid and not _descends_from(p, proc.pid)]
        for pid in ray_pids:
            os.kill(pid, 9)
        rc = proc.wait(HEAD_LOSS_BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert rc == EXIT_HEAD_LOST, out[-3000:]
    assert "lost the Ray cluster" in out and cluster.head_address in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not storage.is_committed(f"{root}/default/changescore/head-loss")

    # The head comes back (a new cluster on the same S3): the next run continues from the ledger.
    cluster.restart_nodes()
    again = cluster.run_in(HEAD, [RASTERKUBE, "run", "-q", "-f", str(manifest), "--storage-root", root],
                           timeout_s=RUN_TIMEOUT_S)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    (outcome,) = json.loads(again.stdout)
    assert outcome["outputs"]["summary"]["blocksReused"] > 0, outcome
    assert storage.is_committed(f"{root}/default/changescore/head-loss")


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
    return False
