"""The node e2e suite (``make test-node``): a real Kubernetes node, the chart installed with helm,
KubeRay running real Ray pods, a real S3 server — everything in the network namespace the dev
stack creates (rasterkube_devstack.nodestack).

One stack for the session (bring-up is the expensive part); the operator is installed once with
helm, as a platform engineer would. Tests that change the operator's settings (helm upgrade)
put them back. ``test_zz_down.py`` runs last and checks that ``dev down`` leaves nothing.

Timings (apply → Ray pods Running → Succeeded per kind, bring-up) are written to
``out/node-e2e/timings.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rasterkube_devstack import binaries, node, nodestack

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "rasterkube"
RELEASE = "rasterkube"
OPERATOR_NAMESPACE = nodestack.OPERATOR_NAMESPACE
TIMINGS_FILE = REPO / "out" / "node-e2e" / "timings.json"
#: Run the suite on a stack that is already up (`rasterkube dev up --dir DIR`), e.g. while
#: developing; it is neither started nor stopped (test_zz_down is skipped).
ENV_REUSE = "RASTERKUBE_NODE_STACK"
#: Operator settings for the suite: bounds short enough to test, finished clusters freed fast.
SUITE_VALUES = {
    "kuberay.unschedulableTimeoutSeconds": "60",
    "kuberay.ttlSecondsAfterFinished": "15",
}

_REASON = node.unavailable_reason()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.integration)
        if _REASON:
            item.add_marker(pytest.mark.skip(reason=f"a real node cannot run here: {_REASON}"))


class Cluster:
    """The running stack plus helpers the tests share."""

    def __init__(self, info: nodestack.NodeStackInfo) -> None:
        self.info = info
        self.node = node.Node(info.directory)
        self.timings: dict[str, Any] = dict(info.timings)
        self.reused = False

    @property
    def kubeconfig(self) -> Path:  # helpers.kube uses info.kubeconfig
        return self.info.kubeconfig

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout_s: float = 180) -> subprocess.CompletedProcess[str]:  # fmt: skip
        proc = subprocess.run([str(binaries.ensure_kubectl()), f"--kubeconfig={self.info.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr[-3000:]}")
        return proc

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        proc = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def items(self, kind: str, namespace: str = "default", selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", kind, "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
        return list(json.loads(self.kubectl(*args).stdout)["items"])

    def wait(self, what: str, check: Callable[[], Any], timeout_s: float, poll_s: float = 1.0) -> Any:
        """Poll ``check()`` until it returns something truthy; fail naming ``what``."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(poll_s)
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {str(last)[:2000]}")

    def helm(self, *args: str, timeout_s: float = 600) -> str:
        env = {**os.environ, "KUBECONFIG": str(self.info.kubeconfig)}
        proc = subprocess.run([str(binaries.ensure_helm()), *args], env=env, capture_output=True, text=True,
                              timeout=timeout_s)  # fmt: skip
        if proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        return proc.stdout

    def operator_logs(self) -> str:
        return self.kubectl("-n", OPERATOR_NAMESPACE, "logs", f"deployment/{RELEASE}", "--tail=400", check=False).stdout

    def record(self, key: str, value: Any) -> None:
        self.timings[key] = value


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reuse = os.environ.get(ENV_REUSE)
    directory = Path(reuse) if reuse else tmp_path_factory.mktemp("node-stack")
    started = time.monotonic()
    info = nodestack.load(directory) if reuse else nodestack.up(directory, verbose=False)
    result = Cluster(info)
    result.reused = bool(reuse)
    result.record("bring_up_seconds", round(time.monotonic() - started, 1))
    saved = dict(os.environ)
    os.environ.update(info.env())  # this process reads the outputs from the same S3 server
    try:
        yield result
    finally:
        os.environ.clear()
        os.environ.update(saved)
        TIMINGS_FILE.parent.mkdir(parents=True, exist_ok=True)
        TIMINGS_FILE.write_text(json.dumps({**result.timings, "loadavg": os.getloadavg()}, indent=2) + "\n")
        if not reuse and node.Node(directory).is_running():  # test_zz_down did not run (or failed)
            nodestack.down(directory, verbose=False)


@pytest.fixture(scope="session")
def operator(cluster: Cluster) -> Cluster:
    """The chart installed with helm from the stack's values (and the suite's bounds)."""
    started = time.monotonic()
    sets = [arg for key, value in SUITE_VALUES.items() for arg in ("--set", f"{key}={value}")]
    cluster.helm("upgrade", "--install", RELEASE, str(CHART), "-n", OPERATOR_NAMESPACE, "--create-namespace",
                 "-f", str(cluster.info.values_file), *sets, "--wait", "--timeout", "5m")  # fmt: skip
    cluster.record("helm_install_seconds", round(time.monotonic() - started, 1))
    return cluster
