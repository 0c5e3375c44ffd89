"""Last of the node suite: `rasterkube dev down` leaves no process, mount, cgroup or network
namespace behind (and a second down is a no-op)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rasterkube_devstack import node, processes

from conftest import Cluster

RASTERKUBE = str(Path(sys.executable).with_name("rasterkube"))


def test_dev_down_leaves_nothing_behind(cluster: Cluster) -> None:
    if cluster.reused:
        pytest.skip("the suite runs on a stack it did not start (RASTERKUBE_NODE_STACK): not stopping it")
    the_node = cluster.node
    layout = the_node.layout
    # Before: the node's traces are there (so that "nothing after" means something).
    before = the_node.leftovers()
    assert before["processes"] and before["mounts"] and before["cgroups"] and before["netns"], before
    s3_pids = processes.recorded_pids(cluster.info.directory / "pids" / "s3.pid")
    assert s3_pids

    started = time.monotonic()
    proc = subprocess.run([RASTERKUBE, "dev", "down", "--dir", str(cluster.info.directory)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    cluster.record("dev_down_seconds", round(time.monotonic() - started, 1))
    assert proc.returncode == 0, proc.stderr

    assert the_node.leftovers() == {"processes": [], "mounts": [], "cgroups": [], "netns": [], "dirs": []}
    assert [p for p in s3_pids if processes.is_alive(p)] == []
    # nothing of the node anywhere on the machine: mounts, cgroups, namespaces, its runtime dirs
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert layout.id not in mountinfo
    assert not [p for p in Path("/sys/fs/cgroup").glob(f"*/{layout.cgroup}")]
    assert not layout.netns.exists() and not layout.run.exists() and not layout.data.exists()
    assert not (cluster.info.directory / "env.sh").exists()
    state = json.loads((cluster.info.directory / "stack.json").read_text())
    assert state["stopped"] is True
    again = subprocess.run([RASTERKUBE, "dev", "down", "--dir", str(cluster.info.directory)], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0 and "nothing was running" in again.stderr
    assert not node.Node(cluster.info.directory).is_running()
