"""kubectl against a dev stack, for the e2e tests."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

from rasterkube_devstack import binaries
from rasterkube_devstack.stack import StackInfo


def kubectl(info: StackInfo, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(binaries.ensure_kubectl()), "--kubeconfig", str(info.kubeconfig), *args]
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
    return proc


def get(info: StackInfo, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
    proc = kubectl(info, "get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def wait_for(info: StackInfo, kind: str, name: str, predicate: Callable[[dict[str, Any]], bool],
             timeout: float = 180, namespace: str = "default") -> dict[str, Any]:  # fmt: skip
    """Poll until ``predicate(object)`` holds; the assertion shows the last object seen."""
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        obj = get(info, kind, name, namespace)
        if obj is not None and predicate(obj):
            return obj
        time.sleep(0.3)
    raise AssertionError(f"{kind}/{name}: condition not met in {timeout}s; last: {json.dumps(obj)[:2000]}")


def status_is(predicate: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
    return lambda obj: predicate(obj.get("status") or {})
