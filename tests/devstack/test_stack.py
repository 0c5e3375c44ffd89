"""`rasterkube dev up --api-only|down` end to end: real kube-apiserver + etcd, a real S3 server, a Ray head, the CRDs.

One stack for the module, started *without* the operator so the first checks do not depend
on it; the operator test then runs ``up()`` again with the operator (the "already running"
path starts just the operator) and kills/restarts it; the last test brings everything down
and checks that every process is gone and every port closed. With the binaries cached the
module takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from rasterkube_devstack import processes, s3, stack
from rasterkube_devstack.controlplane import ControlPlane

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RASTERKUBE = str(Path(sys.executable).with_name("rasterkube"))
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.StackInfo]:
    directory = tmp_path_factory.mktemp("devstack")
    info = stack.up(directory, with_operator=False, verbose=False)
    try:
        yield info
    finally:
        stack.down(directory, verbose=False)


def sourced(info: stack.StackInfo, command: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in bash after sourcing the stack's env.sh (what a developer does)."""
    script = f". {info.env_file} && {command}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "KUBECONFIG"))}
    return subprocess.run(["bash", "-c", script], env=env, cwd=info.directory, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def http_status(url: str) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def test_up_reports_and_writes_env_sh(dev: stack.StackInfo) -> None:
    assert not dev.already_running
    assert {"binaries", "control_plane", "crds", "s3", "ray_head", "samples", "total"} <= set(dev.timings)
    text = dev.env_file.read_text()
    for key in ("KUBECONFIG", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                "RASTERKUBE_RAY_DASHBOARD"):  # fmt: skip
        assert f"export {key}=" in text, key
    assert dev.ray_address.startswith("127.0.0.1:") and dev.ray_dashboard.startswith("http://127.0.0.1:")
    assert len(str(dev.ray_temp_dir)) <= stack.MAX_RAY_TEMP_DIR_CHARS  # unix socket paths must fit
    again = stack.up(dev.directory, with_operator=False, verbose=False)
    assert again.already_running and again.ray_address == dev.ray_address


def test_kubectl_lists_rasterkube_and_kuberay_crds(dev: stack.StackInfo) -> None:
    proc = sourced(dev, "kubectl api-resources --categories=rasterkube -o name")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(stack.rasterkube_crd_names())
    established = "{.status.conditions[?(@.type==\"Established\")].status}"
    proc = sourced(dev, f"kubectl api-resources --api-group=ray.io -o name && "
                        f"kubectl get crd rayjobs.ray.io -o jsonpath='{established}'")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "rayjobs.ray.io" in proc.stdout.split() and proc.stdout.rstrip().endswith("True")


def test_s3_has_the_seeded_sample_store(dev: stack.StackInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    from rasterkube import geozarr

    for key, value in s3.credentials_env(dev.s3_endpoint).items():
        monkeypatch.setenv(key, value)
    assert dev.sample_uri == stack.SAMPLE_URI
    info = geozarr.describe(stack.SAMPLE_URI)
    assert [str(t)[:4] for t in info.times] == [str(y) for y in range(2008, 2014)]
    assert info.bands == ("landsat:red", "landsat:nir08", "landsat:swir16")


JOB_CHECK = """
import json, os, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient

client = JobSubmissionClient(os.environ["RASTERKUBE_RAY_DASHBOARD"])
job = client.submit_job(entrypoint='python -c "import os, sys, rasterkube; print(1); print(sys.executable); '
                                   'print(os.environ.get(\\'AWS_ENDPOINT_URL\\'))"')
deadline = time.monotonic() + 120
while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
    time.sleep(0.5)
print(json.dumps({"status": str(client.get_job_status(job)), "logs": client.get_job_logs(job)}))
"""


def test_ray_head_runs_a_job_through_the_jobs_api(dev: stack.StackInfo) -> None:
    # A child process: RAY_AUTH_MODE is read when Ray is first imported.
    proc = sourced(dev, f"{sys.executable} -c {shlex.quote(JOB_CHECK)}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED", result["logs"]
    lines = result["logs"].splitlines()
    assert "1" in lines
    assert str(Path(sys.executable).parent) in result["logs"], "`python` in a job is the one with rasterkube"
    assert dev.s3_endpoint in lines, "job drivers inherit the head's S3 environment"


def test_rasterkube_run_on_the_stack_reads_the_seeded_store(dev: stack.StackInfo) -> None:
    manifest = dev.directory / "changescore.yaml"
    manifest.write_text(
        "apiVersion: rasterkube.dev/v1alpha1\nkind: ChangeScore\nmetadata:\n  name: dev-change\nspec:\n"
        f"  source:\n    uri: {stack.SAMPLE_URI}\n  methods: [difference, looMedoid]\n  distance: euclidean\n"
        "  robustTimeZScore: true\n"
    )
    proc = sourced(dev, f"{RASTERKUBE} run -q -f {manifest}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (outcome,) = json.loads(proc.stdout)
    assert outcome["phase"] == "Succeeded"
    assert "Connecting to existing Ray cluster" in proc.stderr, "ran on the stack's Ray, not an embedded one"
    assert json.dumps(outcome).count("s3://rasterkube/data/default/changescore/dev-change") >= 1


def test_up_with_the_operator_serves_healthz_and_survives_a_kill(dev: stack.StackInfo) -> None:
    info = stack.up(dev.directory, with_operator=True, verbose=False)
    assert info.operator_health and info.operator_metrics
    assert http_status(info.operator_health) == 200
    assert http_status(info.operator_metrics) == 200
    (pid,) = stack.running_pids(dev.directory)[stack.OPERATOR]
    assert "--listen-host" in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")

    assert stack.stop_operator(dev.directory, signal.SIGKILL)
    assert not processes.is_alive(pid) and http_status(info.operator_health) is None
    restarted = stack.start_operator(dev.directory)
    # The ports are reused when still free; a killed listener's port may not be yet, so the
    # contract is that stack.json and env point at wherever the new operator listens.
    assert restarted.operator_health and stack.load(dev.directory).operator_health == restarted.operator_health
    assert http_status(restarted.operator_health) == 200


def test_down_stops_every_process_and_closes_every_port(dev: stack.StackInfo) -> None:
    pids = [pid for group in stack.running_pids(dev.directory).values() for pid in group]
    state = json.loads((dev.directory / stack.STATE_FILE).read_text())
    plane = ControlPlane(dev.directory / stack.K8S_DIR).state
    ports = [
        *state["ray_ports"].values(),
        int(dev.s3_endpoint.rsplit(":", 1)[1]),
        plane["apiserver_secure_port"], plane["etcd_client_port"], plane["etcd_peer_port"],
        *state.get("operator_ports", {}).values(),
    ]  # fmt: skip
    assert len(pids) > 10 and all(processes.is_alive(p) for p in pids)
    assert stack.port_open(int(state["ray_ports"]["port"]))

    started = time.monotonic()
    stopped = stack.down(dev.directory, verbose=False)
    assert all(was for name, was in stopped.items() if name != stack.OPERATOR), stopped
    assert time.monotonic() - started < 30
    assert [p for p in pids if processes.is_alive(p)] == []
    assert [p for p in ports if stack.port_open(int(p))] == []
    assert not list((dev.directory / "pids").glob("*.pid"))
    assert not list((dev.directory / stack.K8S_DIR / "pids").glob("*.pid"))
    assert not dev.env_file.exists() and not dev.ray_temp_dir.exists()
    assert stack.down(dev.directory, verbose=False) == dict.fromkeys(stopped, False)  # idempotent
