"""Usage after running, measured on real Ray and a real S3 server (issue 16.4)."""

from __future__ import annotations

import pytest

from helpers.stores import random_series, write_store
from rasterkube import storage
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest
from rasterkube.runtime.usage import Usage

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def _tree_bytes(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    return sum(info["size"] for info in fs.find(path, detail=True, refresh=True).values())


def test_changescore_on_s3_reports_what_it_cost(s3: str) -> None:
    data = random_series(4, 2, 32, 32, seed=11)
    src = write_store("s3://rasterkube/usage/src.zarr", data, chunk=16)
    out = "s3://rasterkube/usage/out.zarr"
    resource = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore", "metadata": {"name": "u"},
                "spec": {"source": {"uri": src}, "methods": ["difference", "looMedoid"], "xyBlockMultiplier": 1}}  # fmt: skip
    result = run_job(JobRequest(resource=resource, output_uri=out, source_uri=src))
    assert result.usage is not None
    used = Usage.from_dict(result.usage)
    assert used.cpu_seconds > 0 and used.wall_seconds > 0
    assert used.gpu_seconds == 0, "no GPU was asked for"
    assert used.peak_memory_bytes > 32 * 2**20, "a Python process with numpy and Ray holds more than 32 MiB"
    # 4 blocks, each reads its chunks and writes its scores: many requests, real bytes
    assert used.object_store_requests >= 8
    src_bytes, out_bytes = _tree_bytes(src), _tree_bytes(out)
    # every chunk of the source was read once (plus metadata); the output and its STAC item written once
    assert 0.9 * src_bytes <= used.bytes_read <= 3 * src_bytes + 2**20, (used.bytes_read, src_bytes)
    assert 0.9 * out_bytes <= used.bytes_written <= 3 * out_bytes + 2**20, (used.bytes_written, out_bytes)


def test_local_client_sums_its_runs(tmp_path) -> None:
    import rasterkube

    src = write_store(str(tmp_path / "src.zarr"), random_series(3, 2, 16, 16, seed=12), chunk=8)
    client = rasterkube.Client(local=True, storage_root=str(tmp_path / "root"), progress=False)
    first = client.run_mosaics_change("a", src, methods=["difference"])
    second = client.run_mosaics_change("b", src, methods=["looMedoid"])
    runs = [Usage.from_dict(r.status["usage"]) for r in (first, second)]
    assert all(u.cpu_seconds > 0 and u.wall_seconds > 0 for u in runs)
    assert runs[0].object_store_requests == 0, "local files are not object-store requests"
    assert client.usage() == runs[0] + runs[1] == client.usage("ChangeScore")
    assert client.usage("Mosaic") == Usage()
