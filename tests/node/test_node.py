"""The node itself: Ready, its system pods running, cluster DNS and Services working for pods, and
no way out of the network namespace (checked on the routes, never by connecting outside)."""

from __future__ import annotations

import json
import time

from rasterkube_devstack import kuberay, node
from rasterkube_devstack.controlplane import KUBERNETES_SERVICE_IP

from conftest import Cluster

PROBE = """
import json, socket, urllib.request
out = {}
out["kubernetes"] = socket.gethostbyname("kubernetes.default.svc.cluster.local")
out["dns"] = socket.gethostbyname("kube-dns.kube-system.svc.cluster.local")
try:
    socket.getaddrinfo("example.com", 80)
    out["outside_name"] = "resolved"
except socket.gaierror as exc:
    out["outside_name"] = f"unresolved: {exc}"
with socket.create_connection((out["kubernetes"], 443), timeout=10):
    out["service_tcp"] = "connected"
try:
    urllib.request.urlopen(S3 + "/", timeout=10)
except urllib.error.HTTPError as exc:
    out["s3"] = exc.code
out["routes"] = open("/proc/net/route").read().split("\\n")[1:]
print(json.dumps(out))
"""


def test_node_is_ready_with_dns_and_the_kuberay_operator(cluster: Cluster) -> None:
    (node_obj,) = cluster.items("nodes", namespace="default")
    conditions = {c["type"]: c["status"] for c in node_obj["status"]["conditions"]}
    assert conditions["Ready"] == "True"
    assert {a["type"]: a["address"] for a in node_obj["status"]["addresses"]}["InternalIP"] == node.NODE_IP
    assert node_obj["status"]["nodeInfo"]["kubeletVersion"] == f"v{node.KUBERNETES_VERSION}"
    assert node_obj["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://1.")
    coredns = cluster.get("deployment", "coredns", "kube-system")
    assert coredns and coredns["status"].get("readyReplicas") == 1
    kuberay_op = cluster.get("deployment", "kuberay-operator", kuberay.OPERATOR_NAMESPACE)
    assert kuberay_op and kuberay_op["status"].get("readyReplicas") == 1
    image = kuberay_op["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith(f"{kuberay.OPERATOR_REPOSITORY}:{kuberay.KUBERAY_VERSION}-")


def test_pods_resolve_cluster_names_reach_services_and_nothing_else(cluster: Cluster) -> None:
    name = "net-probe"
    script = PROBE.replace("S3", json.dumps(cluster.info.s3_endpoint_in_cluster))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
           "spec": {"restartPolicy": "Never", "containers": [{
               "name": "probe", "image": cluster.info.image, "imagePullPolicy": "Never",
               "command": ["python", "-c", script],
               "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}}]}}  # fmt: skip
    cluster.kubectl("delete", "pod", name, "--ignore-not-found", "--wait=true")
    started = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    phase = cluster.wait("the probe pod to finish", lambda: (cluster.get("pod", name) or {}).get("status", {}).get(
        "phase") in ("Succeeded", "Failed") and cluster.get("pod", name)["status"]["phase"], 240)  # fmt: skip
    cluster.record("pod_start_to_exit_seconds", round(time.monotonic() - started, 1))
    logs = cluster.kubectl("logs", name).stdout
    assert phase == "Succeeded", logs
    out = json.loads(logs.strip().splitlines()[-1])
    assert out["kubernetes"] == KUBERNETES_SERVICE_IP and out["dns"] == node.CLUSTER_DNS_IP
    assert out["service_tcp"] == "connected"  # ClusterIP -> the API server through kube-proxy
    assert out["s3"] == 403  # the S3 server answers pods (anonymous: refused)
    assert out["outside_name"].startswith("unresolved"), "CoreDNS must not forward outside the cluster"
    # the pod's only routes: its subnet and the bridge inside the node's namespace
    gateways = {line.split()[2] for line in out["routes"] if line.strip()}
    assert gateways <= {"00000000", "0100F40A"}  # 10.244.0.1 little-endian, or on-link
    cluster.kubectl("delete", "pod", name, "--wait=false")


def test_the_node_namespace_has_no_route_out(cluster: Cluster) -> None:
    ns = cluster.node.layout.netns
    routes = ns.ip("route", "show")
    assert "default" not in routes
    for line in routes.splitlines():
        destination = line.split()[0]
        assert destination.startswith(("10.254.0.", "10.244.0.", "10.0.0.")), line
    # its interfaces: loopback, the node's veth pair, the pod bridge and the pods' veths (whose
    # other ends are in the pods' namespaces) — nothing that leads to this machine's network
    names = {line.split(":")[1].strip().split("@")[0] for line in ns.ip("-o", "link").splitlines()}
    assert {node.NODE_IF, node.NODE_PEER_IF, node.POD_BRIDGE, "lo"} <= names
    assert all(n in (node.NODE_IF, node.NODE_PEER_IF, node.POD_BRIDGE, "lo") or n.startswith("veth") for n in names), names
