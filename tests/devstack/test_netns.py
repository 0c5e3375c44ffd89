"""Network namespaces made by the dev stack: reachable from each other, not from outside."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from rasterkube_devstack import netns

pytestmark = pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason()))


@pytest.fixture()
def prefix() -> str:
    name = f"rkt{uuid.uuid4().hex[:6]}"
    yield name
    netns.cleanup(name)


def test_two_namespaces_joined_by_veth_talk_and_have_no_way_out(prefix: str) -> None:
    a, b = netns.create(f"{prefix}a"), netns.create(f"{prefix}b")
    netns.veth_pair(a, "eth0", b, "eth0")
    a.add_address("eth0", "10.254.9.1/24")
    b.add_address("eth0", "10.254.9.2/24")
    server = subprocess.Popen(b.command([sys.executable, "-m", "http.server", "--bind", "10.254.9.2", "8000"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        fetch = "import time,urllib.request as u\nfor _ in range(100):\n try: print(u.urlopen('http://10.254.9.2:8000/').status); break\n except OSError: time.sleep(0.1)"
        out = subprocess.run(a.command([sys.executable, "-c", fetch]), capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "200", out.stderr
        assert server.pid in b.pids()
        # No default route inside: nothing started in them can reach any other address.
        for ns in (a, b):
            assert "default" not in ns.ip("route", "show") and "10.254.9.0/24" in ns.ip("route", "show")
    finally:
        server.terminate()
        server.wait(10)


def test_delete_stops_what_runs_inside_and_leaves_nothing(prefix: str) -> None:
    ns = netns.create(f"{prefix}c")
    proc = subprocess.Popen(ns.command(["sleep", "300"]))
    assert [n.name for n in netns.ours(prefix)] == [f"{prefix}c"]
    assert netns.cleanup(prefix) == [f"{prefix}c"]
    assert proc.wait(10) is not None
    assert not ns.exists() and netns.ours(prefix) == []


def test_an_existing_name_is_not_reused_and_long_interface_names_are_refused(prefix: str) -> None:
    ns = netns.create(f"{prefix}d")
    with pytest.raises(netns.NetnsError, match="exists"):
        netns.create(f"{prefix}d")
    with pytest.raises(ValueError, match="1..15 bytes"):
        ns.add_bridge("a-bridge-name-too-long")


def test_a_namespace_file_left_by_a_reboot_is_no_namespace_and_does_not_block_its_name(prefix: str) -> None:
    """/run here is not a tmpfs: after a reboot (or from a restored disk) /run/netns/NAME stays
    as a plain file with nothing mounted on it. It is not a live namespace, and the name can be
    created again."""
    ns = netns.create(f"{prefix}s")
    subprocess.run(["umount", str(ns.path)], check=True)  # what a reboot leaves: the file alone
    assert ns.path.exists() and not ns.exists() and ns.stale()
    again = netns.create(ns.name)
    assert again.exists() and not again.stale()
    subprocess.run(["umount", str(ns.path)], check=True)
    netns.delete(ns)
    assert not ns.path.exists()
