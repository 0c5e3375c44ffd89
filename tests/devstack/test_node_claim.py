"""The shared containerd image store: one live node at a time, and a dead one never blocks it."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from rasterkube_devstack import binaries, netns, node

pytestmark = pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason()))


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(binaries.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _owned_by(other: Path) -> None:
    owner = binaries.cache_dir() / "containerd" / "owner.json"
    owner.parent.mkdir(parents=True, exist_ok=True)
    owner.write_text(json.dumps({"directory": str(other), "pid": 1}))


def test_a_live_node_keeps_the_image_store_and_is_named(cache: Path, tmp_path: Path) -> None:
    other = tmp_path / f"other-{uuid.uuid4().hex[:6]}"
    _owned_by(other)
    ns = netns.create(node.NodeLayout.of(other / "node").netns.name)
    try:
        with pytest.raises(node.NodeError, match=str(other)):
            node.Node(tmp_path / "mine")._claim_containerd_root()
    finally:
        netns.delete(ns)


def test_a_node_left_by_a_reboot_does_not_block_the_image_store(cache: Path, tmp_path: Path) -> None:
    """What failed CI once: the disk came back with the owner file and /run/netns/NAME of a node
    that no longer ran (a plain file, nothing mounted), and every node test refused to start."""
    other = tmp_path / f"other-{uuid.uuid4().hex[:6]}"
    _owned_by(other)
    ns = netns.create(node.NodeLayout.of(other / "node").netns.name)
    subprocess.run(["umount", str(ns.path)], check=True)
    try:
        mine = node.Node(tmp_path / "mine")
        mine._claim_containerd_root()
        owner = json.loads((binaries.cache_dir() / "containerd" / "owner.json").read_text())
        assert owner["directory"] == str(mine.directory)
    finally:
        netns.delete(ns)
    assert not ns.path.exists()
