"""The real node's configuration, as pure functions: what containerd, kubelet, kube-proxy and the
CNI plugin are told, and why each setting is what it is (the module docstring of
rasterkube_devstack.node). The node itself is tested in tests/node."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from rasterkube_devstack import node
from rasterkube_devstack.controlplane import SERVICE_CLUSTER_IP_RANGE


@pytest.fixture()
def layout(tmp_path: Path) -> node.NodeLayout:
    return node.NodeLayout.of(tmp_path / "stack" / "node")


def test_node_id_is_stable_per_directory_and_names_fit_the_kernel(tmp_path: Path) -> None:
    a, b = node.NodeLayout.of(tmp_path / "a"), node.NodeLayout.of(tmp_path / "b")
    assert a.id == node.NodeLayout.of(tmp_path / "a").id != b.id
    for ifname in (node.NODE_IF, node.NODE_PEER_IF, node.POD_BRIDGE):
        assert len(ifname) <= 15
    # unix socket paths are limited to 107 bytes: the runtime dir stays short wherever the stack is
    assert len(str(a.containerd_socket)) < 60


def test_containerd_config_is_valid_toml_with_the_settings_this_machine_needs(layout: node.NodeLayout) -> None:
    config = tomllib.loads(node.containerd_config(layout, "rasterkube.local/pause:x"))
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert config["version"] == 2
    assert cri["restrict_oom_score_adj"] is True  # no CAP_SYS_RESOURCE here
    assert cri["sandbox_image"] == "rasterkube.local/pause:x"
    assert cri["netns_mounts_under_state_dir"] is True  # pod namespaces not in /var/run/netns
    runc = cri["containerd"]["runtimes"]["runc"]
    assert runc["options"]["SystemdCgroup"] is False and cri["containerd"]["snapshotter"] == "overlayfs"
    assert cri["cni"]["conf_dir"] == str(layout.cni_conf)
    assert config["grpc"]["address"] == str(layout.containerd_socket)
    assert config["state"].startswith(str(layout.run)) and config["root"] == str(node.containerd_root())


def test_kubelet_config(layout: node.NodeLayout, tmp_path: Path) -> None:
    config = node.kubelet_config(layout, tmp_path / "ca.crt")
    assert (config["cgroupDriver"], config["failSwapOn"], config["failCgroupV1"]) == ("cgroupfs", False, False)
    assert config["cgroupRoot"] == f"/{layout.cgroup}"  # every pod process under one cgroup of ours
    assert config["resolvConf"] == ""  # the host resolver is never handed to pods
    assert config["clusterDNS"] == [node.CLUSTER_DNS_IP] and config["address"] == node.NODE_IP
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["imageGCHighThresholdPercent"] == 100  # imported images cannot be pulled back


def test_kubelet_runs_in_its_own_mount_namespace_seeing_the_kernel_settings_it_wants(layout: node.NodeLayout) -> None:
    argv = node.kubelet_wrapper(layout, ["/bin/kubelet", "--v=1"])
    assert argv[:5] == ["unshare", "--mount", "--propagation", "unchanged", "--"]
    script = argv[argv.index("-c") + 1]
    for name in node.KUBELET_KERNEL_TUNABLES:
        assert f"/proc/sys/{name}" in script
    assert f"rasterkube-kubelet-logs {node.KUBELET_PRIVATE_LOG_DIR}\n" in script  # its /var/log/containers stays private
    assert argv[-3:] == [*layout.netns.command(["/bin/kubelet", "--v=1"])][-3:]
    assert "nsenter" in argv and f"--net={layout.netns.path}" in argv


def test_cni_bridge_without_masquerade_and_kube_proxy_leaves_machine_settings_alone(layout: node.NodeLayout) -> None:
    (bridge,) = node.cni_config(layout)["plugins"]
    assert bridge["ipMasq"] is False and bridge["isGateway"] is True
    assert bridge["ipam"]["ranges"][0][0]["subnet"] == node.POD_CIDR
    assert bridge["ipam"]["dataDir"] == str(layout.cni_data)  # not /var/lib/cni
    proxy = node.kube_proxy_config(Path("/k"))
    assert proxy["conntrack"] == {"maxPerCore": 0, "min": 0}
    assert proxy["iptables"]["masqueradeAll"] is True


def test_coredns_serves_cluster_names_only() -> None:
    manifests = node.coredns_manifests("rasterkube.local/coredns:x")
    assert "forward" not in node.COREFILE  # nothing outside the cluster is asked
    (service,) = [m for m in manifests if m["kind"] == "Service"]
    assert service["spec"]["clusterIP"] == node.CLUSTER_DNS_IP
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["imagePullPolicy"] == "Never"


def test_the_service_range_is_the_control_planes() -> None:
    assert node.CLUSTER_DNS_IP.rsplit(".", 1)[0] == SERVICE_CLUSTER_IP_RANGE.rsplit(".", 1)[0]


def test_toml_writer_quotes_dotted_table_names() -> None:
    text = node._toml({"plugins": {"io.containerd.grpc.v1.cri": {"a": True, "b": ["x", 1]}}})
    assert tomllib.loads(text) == {"plugins": {"io.containerd.grpc.v1.cri": {"a": True, "b": ["x", 1]}}}
