"""``rasterkube.Client`` in cluster mode on the dev stack: real kube-apiserver + etcd, the
operator as a process, real Ray, real S3. A Mosaic from a GeoDataFrame AOI (written to the S3
storage root by the client) and a ChangeScore reading it through a ref, then a bad band →
ResourceFailed with the operator's message."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import rasterkube
from rasterkube import storage
from rasterkube.errors import ResourceFailed
from rasterkube_devstack import stack as devstack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BBOX = (-106.924, 40.281, -106.904, 40.296)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack.StackInfo]:
    directory = tmp_path_factory.mktemp("devstack")
    info = devstack.up(directory, verbose=False)
    saved = dict(os.environ)
    os.environ.update(info.env())  # KUBECONFIG, AWS_* and RASTERKUBE_STORAGE_ROOT, as after `source env.sh`
    try:
        yield info
    finally:
        os.environ.clear()
        os.environ.update(saved)
        devstack.down(directory, verbose=False)


def test_client_creates_waits_and_reads_outputs(stack: devstack.StackInfo) -> None:
    import geopandas
    from shapely.geometry import box

    client = rasterkube.Client(namespace="default", kubeconfig=stack.kubeconfig, timeout=300, poll_interval=0.5)
    assert client.storage_root == stack.storage_root
    aoi = geopandas.GeoDataFrame({"id": ["colorado"]}, geometry=[box(*BBOX)], crs="EPSG:4326")
    mosaic = client.build_mosaics("client-mosaic", "landsat-c2-l2", aoi, "2008-01-01", "2010-01-01", window="P1Y",
                                  bands=["red", "nir08"], max_cloud_cover=90, chunk_size=64,
                                  stac=f"{devstack.SAMPLE_STAC_URI}/catalog.json")  # fmt: skip
    assert mosaic.manifest["spec"]["aoi"] == {"uri": f"{stack.storage_root}/default/aoi/client-mosaic.parquet"}
    assert mosaic.succeeded and mosaic.status["job"]["id"]
    ready = {c["type"]: c["status"] for c in mosaic.status["conditions"]}
    assert ready["Ready"] == "True" and ready["Stalled"] == "False"
    index = mosaic.mosaics  # a one-row AOI file still gives a mosaic index
    assert list(index["key"]) == ["colorado"] and mosaic.first_row_mosaic.endswith("colorado.zarr")
    assert mosaic.first_row_mosaic.startswith(f"{stack.storage_root}/default/mosaic/client-mosaic/")
    assert mosaic.open()["variables"].shape[:2] == (2, 2)

    change = client.run_mosaics_change("client-change", mosaic.first_row_mosaic, methods=["difference"],
                                       robust_time_zscore=False)  # fmt: skip
    assert change.uri == f"{stack.storage_root}/default/changescore/client-change"
    assert storage.is_committed(change.uri) and change.summary["bands"] == ["difference_euclidean_distance"]
    assert client.get("changescores", "client-change").uri == change.uri

    with pytest.raises(ResourceFailed, match=r"ChangeScore/client-bad failed: .*spec.bands.*'nope'"):
        client.run_mosaics_change("client-bad", change.uri, bands=["nope"])
    assert client.delete("changescore", "client-bad") and client.get("changescore", "client-change").succeeded
