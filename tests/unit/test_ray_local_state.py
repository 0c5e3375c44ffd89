"""How rasterkube picks the Ray it talks to, from the environment alone (no Ray started)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rasterkube.runtime.executor import auth_token_available

SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _switch_after_import(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in (SWITCH, "RAY_ADDRESS")}
    code = f"import os, rasterkube; print(os.environ.get({SWITCH!r}, 'unset'))"
    proc = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


@pytest.mark.parametrize("address", ["", "local", "127.0.0.1:6379", "localhost:6379", "ray://127.0.0.1:10001"])
def test_a_ray_on_this_machine_stays_on_loopback(address: str) -> None:
    assert _switch_after_import({"RAY_ADDRESS": address} if address else {}) == "0"


def test_a_remote_cluster_and_an_explicit_setting_are_left_alone() -> None:
    assert _switch_after_import({"RAY_ADDRESS": "10.0.0.5:6379"}) == "unset"
    assert _switch_after_import({SWITCH: "1"}) == "1"


def test_auth_token_is_found_where_ray_looks(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    assert not auth_token_available(home)
    assert auth_token_available({**home, "RAY_AUTH_TOKEN": "abc"})
    assert not auth_token_available({**home, "RAY_AUTH_TOKEN": "  "})
    token = tmp_path / "token"
    assert not auth_token_available({**home, "RAY_AUTH_TOKEN_PATH": str(token)})
    token.write_text("abc")
    assert auth_token_available({**home, "RAY_AUTH_TOKEN_PATH": str(token)})
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc")
    assert auth_token_available(home)
