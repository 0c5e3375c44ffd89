"""OCI layers and archives written without Docker: reproducible, content-addressed, cached by input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from rasterkube_devstack import images


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RASTERKUBE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fill(root: Path):
    def fill(writer: images.LayerWriter) -> None:
        writer.tree(root, owners={"home/user": (10001, 10001)})

    return fill


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "home" / "user").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "bin" / "link").symlink_to("tool")
    return root


@pytest.mark.parametrize("compress", [False, True])
def test_layers_are_reproducible_and_cached_by_key(tmp_path: Path, compress: bool) -> None:
    root = _tree(tmp_path)
    first = images.build_layer("k1", _fill(root), "test", compress=compress)
    (root / "bin" / "tool").touch()  # a newer mtime: same content, same layer
    again = images.build_layer("k2", _fill(root), "test", compress=compress)
    assert first.digest == again.digest and first.diff_id == again.diff_id
    assert images.cached_layer("k1") == first
    data = images.blob_path(first.digest).read_bytes()
    assert f"sha256:{hashlib.sha256(data).hexdigest()}" == first.digest and len(data) == first.size
    plain = gzip.decompress(data) if compress else data
    assert f"sha256:{hashlib.sha256(plain).hexdigest()}" == first.diff_id
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/tool"].mode == 0o755 and members["bin/link"].linkname == "tool"
    assert (members["home/user"].uid, members["home"].uid) == (10001, 0)
    assert {m.mtime for m in members.values()} == {0}


def test_a_cached_layer_is_not_rebuilt_and_a_lost_blob_is(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    calls = []

    def fill(writer: images.LayerWriter) -> None:
        calls.append(1)
        writer.tree(root)

    layer = images.build_layer("key", fill, "test")
    images.build_layer("key", fill, "test")
    assert len(calls) == 1
    images.blob_path(layer.digest).unlink()
    assert images.cached_layer("key") is None
    assert images.build_layer("key", fill, "test") == layer and len(calls) == 2


def test_image_name_follows_content_and_archive_is_an_oci_layout(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF-not-really")
    config = images.ImageConfig(entrypoint=["/pause"], user="65535:65535")
    image = images.single_file_image("rasterkube.local/pause", "1", binary, "/pause", config)
    assert image.name.startswith("rasterkube.local/pause:1-")
    assert images.single_file_image("rasterkube.local/pause", "1", binary, "/pause", config).name == image.name
    binary.write_bytes(b"\x7fELF-changed")
    assert images.single_file_image("rasterkube.local/pause", "1", binary, "/pause", config).name != image.name

    out = io.BytesIO()
    images.write_archive(out, image)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        names = set(tar.getnames())
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{image.manifest_blob.digest[7:]}"))  # type: ignore[arg-type]
        config_json = json.load(tar.extractfile(f"blobs/sha256/{image.config_blob.digest[7:]}"))  # type: ignore[arg-type]
    assert "oci-layout" in names and all(f"blobs/sha256/{layer.digest[7:]}" in names for layer in image.layers)
    (entry,) = index["manifests"]
    assert entry["annotations"][images.ANNOTATION_IMAGE_NAME] == image.name
    assert manifest["config"]["digest"] == image.config_blob.digest
    assert config_json["config"]["Entrypoint"] == ["/pause"] and config_json["config"]["User"] == "65535:65535"
    assert config_json["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]

    thin = io.BytesIO()
    images.write_archive(thin, image, skip=[image.layers[0].digest])
    thin.seek(0)
    with tarfile.open(fileobj=thin) as tar:
        assert f"blobs/sha256/{image.layers[0].digest[7:]}" not in tar.getnames()
