"""A real Ray head started with `ray start`, on loopback, for RAY_ADDRESS tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers.s3server import free_port

RAY = str(Path(sys.executable).with_name("ray"))


@contextmanager
def ray_head(tmp: Path, num_cpus: int = 1, env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """Yields the env a client needs: RAY_ADDRESS (GCS) and the dashboard (Jobs API) URL.

    ``env``: more environment for the head's processes (e.g. RAY_AUTH_TOKEN)."""
    port, dash = free_port(), free_port()
    # Job entrypoints run `python`: the head must find this environment's interpreter first.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_TMPDIR": str(tmp), "PATH": path, **(env or {})}
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
           f"--temp-dir={tmp}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    try:
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token", "DASHBOARD": f"http://127.0.0.1:{dash}"}
    finally:
        stop_head(tmp)


def stop_head(tmp: Path, timeout_s: float = 30.0) -> None:
    """Stop only this head: the processes whose command line names its temp dir, and their
    children. (`ray stop` would kill every Ray on the machine, the test session's own too.)"""
    import psutil

    marker = str(tmp)
    procs: list[psutil.Process] = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in proc.info["cmdline"] or ()):
                procs.extend([proc, *proc.children(recursive=True)])
        except psutil.Error:
            continue
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
