"""`rasterkube` as users run it: real processes, real Ray, exit codes and messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.rayhead import ray_head
from helpers.stores import random_series, write_store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RASTERKUBE = str(Path(sys.executable).with_name("rasterkube"))


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    clean = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([RASTERKUBE, *args], cwd=cwd, env={**clean, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture()
def example_dir(tmp_path: Path, landsat_store: str) -> Path:
    """A working directory laid out as the example expects (source at out/samples/...)."""
    (tmp_path / "out" / "samples").mkdir(parents=True)
    shutil.copytree(landsat_store, tmp_path / "out" / "samples" / "landsat-annual.zarr")
    shutil.copy(REPO / "examples" / "local" / "changescore-landsat.yaml", tmp_path / "cs.yaml")
    return tmp_path


def test_example_runs_on_embedded_ray(example_dir: Path) -> None:
    proc = run(["run", "-f", "cs.yaml"], example_dir)
    assert proc.returncode == 0, proc.stderr
    (summary,) = json.loads(proc.stdout)
    assert summary["kind"] == "ChangeScore" and summary["phase"] == "Succeeded"
    assert summary["startTime"] and summary["completionTime"]
    assert summary["usage"]["cpuSeconds"] > 0 and summary["usage"]["wallSeconds"] > 0  # what the run cost
    assert summary["outputs"]["uri"] == str(example_dir / "out" / "examples" / "landsat-change.zarr")
    assert summary["outputs"]["summary"]["shape"] == [6, 4, 61, 61]
    assert "100%" in proc.stderr  # progress on stderr


def test_example_runs_on_ray_address(example_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    with ray_head(tmp_path_factory.mktemp("ray", numbered=True)) as ray_env:
        env = {k: v for k, v in ray_env.items() if k != "DASHBOARD"}
        proc = run(["run", "-q", "-f", "cs.yaml"], example_dir, env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["phase"] == "Succeeded"
    assert "Connecting to existing Ray cluster" in proc.stderr


def test_unreachable_ray_address_is_a_clear_error(example_dir: Path) -> None:
    from helpers.s3server import free_port

    proc = run(["run", "-q", "-f", "cs.yaml"], example_dir, {"RAY_ADDRESS": f"127.0.0.1:{free_port()}"}, timeout=60)
    assert proc.returncode == 1
    assert "cannot connect to the Ray cluster" in proc.stderr and "Traceback" not in proc.stderr
    assert not (example_dir / "out" / "examples").exists()


def _ray_state_env(base: Path) -> dict[str, str]:
    """Ray looks for ``ray_current_cluster`` in ``$RAY_TMPDIR/ray`` (default /tmp/ray)."""
    return {"RAY_TMPDIR": str(base)}


def test_stale_ray_state_of_a_dead_cluster_does_not_break_a_local_run(
    example_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """What a killed `ray start --head` leaves behind: the address file of a dead cluster."""
    from helpers.s3server import free_port

    base = tmp_path_factory.mktemp("rs", numbered=True)  # short: Ray's socket paths live under it
    (base / "ray").mkdir()
    (base / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    proc = run(["run", "-q", "-f", "cs.yaml"], example_dir, _ray_state_env(base))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["phase"] == "Succeeded"
    assert "Connecting to existing Ray cluster" not in proc.stderr


def test_a_live_ray_start_cluster_is_not_joined_without_ray_address(
    example_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The README promises an embedded Ray unless RAY_ADDRESS is set: a `ray start` cluster
    someone runs on the same machine is left alone (Ray itself would join it)."""
    base = tmp_path_factory.mktemp("rl", numbered=True)
    with ray_head(base / "ray") as ray_env:
        assert (base / "ray" / "ray_current_cluster").read_text().endswith(ray_env["RAY_ADDRESS"].split(":")[1])
        proc = run(["run", "-q", "-f", "cs.yaml"], example_dir, _ray_state_env(base))
        from ray.job_submission import JobSubmissionClient

        drivers = JobSubmissionClient(ray_env["DASHBOARD"]).list_jobs()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["phase"] == "Succeeded"
    assert "Connecting to existing Ray cluster" not in proc.stderr
    assert drivers == [], "the run connected a driver to the other cluster"


def test_token_auth_head_is_reached_without_ray_auth_mode(
    example_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A head with token auth (Ray's default when a token exists): the client finds the token
    where Ray keeps it and connects without RAY_AUTH_MODE=token."""
    import secrets

    token = secrets.token_hex(32)
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    with ray_head(tmp_path_factory.mktemp("ray", numbered=True), env={"RAY_AUTH_TOKEN": token}) as ray_env:
        env = {"RAY_ADDRESS": ray_env["RAY_ADDRESS"], "HOME": str(home)}
        clean = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        proc = subprocess.run([RASTERKUBE, "run", "-q", "-f", "cs.yaml"], cwd=example_dir, env={**clean, **env},
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["phase"] == "Succeeded"
    assert "Connecting to existing Ray cluster" in proc.stderr


BAD = {
    "wrong type": ("  robustTimeZScore: sometimes\n", "spec.robustTimeZScore: input should be a valid boolean"),
    "unknown enum": ("  distance: manhattan\n", "spec.distance: 'manhattan' is not allowed"),
    "band not in store": ("  bands: [landsat:red, landsat:blue]\n", "spec.bands: 'landsat:blue' not in"),
    "missing dataVar": ("  dataVar: embeddings\n", "spec.dataVar: 'embeddings' is not a variable"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_exits_2_with_one_clear_message(example_dir: Path, case: str) -> None:
    extra, message = BAD[case]
    text = (example_dir / "cs.yaml").read_text().replace("  robustTimeZScore: true\n", extra)
    (example_dir / "bad.yaml").write_text(text)
    proc = run(["run", "-f", "bad.yaml"], example_dir)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (example_dir / "out" / "examples").exists(), "nothing is written"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: [", "not valid YAML"),
        ("apiVersion: rasterkube.dev/v1alpha1\nkind: Gadget\nmetadata: {name: a}\n", "'Gadget' is not a rasterkube kind"),
        ("apiVersion: rasterkube.dev/v1alpha1\nkind: ChangeScore\nmetadata: {name: a}\nspec: {}\n",
         "spec.source: required field is missing"),
        ("apiVersion: rasterkube.dev/v1alpha1\nkind: ChangeScore\nmetadata: {name: a}\nspec:\n"
         "  source: {mosaicRef: {name: ghost}}\n", "spec.source.mosaicRef.name: no Mosaic named 'ghost'"),
        ("apiVersion: rasterkube.dev/v1alpha1\nkind: Prediction\nmetadata: {name: a}\nspec:\n  source: {uri: s.zarr}\n"
         "  model: {uri: m.pt2, features: [a], labels: [b]}\n  device: cpu\n  precision: fp16\n",
         "spec.precision: fp16 runs on CUDA GPUs only; use bf16 or fp32 on CPU"),
        ("apiVersion: rasterkube.dev/v1alpha1\nkind: Prediction\nmetadata: {name: a}\nspec:\n  source: {uri: s.zarr}\n"
         "  model: {uri: m.pt2, features: [a], labels: [b]}\n  precision: int8\n",
         "spec.precision: 'int8' is not allowed"),
        ("apiVersion: rasterkube.dev/v1alpha1\nkind: Mosaic\nmetadata: {name: a}\nspec:\n  dataset: landsat-c2-l2\n"
         "  stac: {catalog: missing/catalog.json}\n"
         "  aoi: {bbox: [0, 0, 1, 1]}\n  time: {start: '2020-01-01', end: '2021-01-01'}\n",
         "spec.stac.catalog"),
    ],
)
def test_invalid_input_without_starting_ray(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "m.yaml").write_text(text)
    proc = run(["run", "-f", "m.yaml"], tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]


def test_job_entrypoint_prints_result_line(tmp_path: Path) -> None:
    src = write_store(str(tmp_path / "src.zarr"), random_series(3, 2, 16, 16))
    request = {
        "resource": {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore", "metadata": {"name": "j"},
                     "spec": {"source": {"uri": src}, "distance": "euclidean"}},
        "outputUri": str(tmp_path / "out.zarr"),
        "sourceUri": src,
    }  # fmt: skip
    (tmp_path / "req.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "rasterkube.jobs", "changescore", "--spec", str(tmp_path / "req.json")],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from rasterkube.runtime.progress import last_progress

    progress, result = last_progress(proc.stdout)
    assert progress == {"percent": 100, "message": "output committed"}
    assert result and result["ok"] and result["uri"] == str(tmp_path / "out.zarr")
    # a user error: exit 2, a RESULT line with the message, no traceback
    request["resource"]["spec"]["bands"] = ["nope"]
    proc = subprocess.run([sys.executable, "-m", "rasterkube.jobs", "changescore", "--spec", json.dumps(request)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_progress(proc.stdout)[1] == {"ok": False, "error": "spec.bands: 'nope' not in " + src
                                              + " (its bands are test:b0, test:b1)"}  # fmt: skip
