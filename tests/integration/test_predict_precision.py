"""spec.precision and spec.compile with real exported models: results within the documented
tolerance of fp32 (through TorchRunner and through a whole Prediction), and bad input refused
with nothing written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.stores import random_series, write_store
from helpers.torchmodels import ConvNet, conv_pt2
from rasterkube import geozarr
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest
from rasterkube.predict import inference, models, serving

pytestmark = pytest.mark.integration

# The documented tolerances (README, Prediction): compile changes only float32 rounding; bf16
# rounds inputs and weights of each convolution to 8 significant bits, so results differ by
# up to a few 1e-2 of the output's scale (measured here: 0.6e-2 on raw values, 1.8e-2 on probabilities).
COMPILE_ATOL = 1e-5
BF16_REL = 3e-2


def config(model: Path, softmax: bool = True, **kw) -> serving.ServeConfig:
    return serving.ServeConfig(
        model_uri=str(model), model_sha256=models.fetch(str(model)).sha256, softmax=softmax, device="cpu",
        max_batch_size=5, replicas=1, max_replicas=None, cpus_per_replica=1, gpus_per_replica=0, **kw,
    )  # fmt: skip


def scale_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Largest difference relative to the largest magnitude of the fp32 result."""
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 → 16 → 16 → 3, 3x3 kernels (receptive-field radius 3)
    return conv_pt2(tmp_path_factory.mktemp("m") / "net.pt2", 4, 3, patch=32, hidden=16, seed=2)


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    # 12 patches = batches of 5, 5 and 2: a short last batch
    return random_series(1, 4, 12 * 32, 32, seed=5, nan_fraction=0.0)[0].reshape(4, 12, 32, 32).transpose(1, 0, 2, 3)


@pytest.mark.parametrize("softmax", [True, False])
def test_bf16_and_compile_within_tolerance_of_fp32(model: Path, patches: np.ndarray, softmax: bool) -> None:
    want = serving.TorchRunner(config(model, softmax)).predict(patches)
    assert want.dtype == np.float32 and want.shape == (12, 3, 32, 32)
    bf16 = serving.TorchRunner(config(model, softmax, precision="bf16")).predict(patches)
    assert bf16.dtype == np.float32
    assert 0 < scale_diff(bf16, want) <= BF16_REL, "bf16 really ran (results differ), within tolerance"
    torch._dynamo.reset()
    compiled = serving.TorchRunner(config(model, softmax, compile=True, warmup_input=(4, 32, 32)))
    got = compiled.predict(patches)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=COMPILE_ATOL, rtol=0)
    both = serving.TorchRunner(config(model, softmax, compile=True, precision="bf16", warmup_input=(4, 32, 32)))
    assert scale_diff(both.predict(patches), want) <= BF16_REL


def test_compiled_model_is_compiled_once_for_every_batch_size(model: Path, patches: np.ndarray) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runner = serving.TorchRunner(config(model, compile=True, warmup_input=(4, 32, 32)))
    assert counters["stats"]["unique_graphs"] == 1, "compiled at start (warm-up)"
    for n in (12, 1, 3, 5, 7):  # short last batches are padded to maxBatchSize
        runner.predict(patches[:n])
    assert counters["stats"]["unique_graphs"] == 1, "no recompilation for partial batches"


def test_fp16_on_a_cpu_replica_is_refused(model: Path) -> None:
    # device auto on a replica that sees no GPU: fp16 is not emulated on the CPU.
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device auto picks it")
    with pytest.raises(inference.PrecisionError, match=r"^spec\.precision: fp16 runs on CUDA GPUs only.*runs on cpu"):
        serving.TorchRunner(dataclasses.replace(config(model), device="auto", precision="fp16"))


def no_cxx() -> object:
    """Inductor's compiler search finds nothing (its own config patch: restored on exit)."""
    from torch._inductor import config as inductor_config

    return inductor_config.patch({"cpp.cxx": ("rasterkube-test-no-such-c++",)})


def test_compile_without_a_compiler_is_refused_in_the_replica(model: Path) -> None:
    with no_cxx(), pytest.raises(inference.CompileError, match=r"^spec\.compile: the model replica's machine has no C\+\+"):
        serving.TorchRunner(config(model, compile=True, warmup_input=(4, 32, 32)))


# ------------------------------------------------------------------- whole Prediction runs


def request(source: str, output: str, model_uri: str, **spec) -> JobRequest:
    resource = {
        "apiVersion": "rasterkube.dev/v1alpha1",
        "kind": "Prediction",
        "metadata": {"name": "p"},
        "spec": {
            "source": {"uri": source},
            "model": {"uri": model_uri, "features": [f"test:b{i}" for i in range(4)], "labels": list("abc")},
            "patchSize": 32, "clipSize": 4, "maxBatchSize": 8, "xyBlockMultiplier": 2, "device": "cpu",
            "serving": {"shareDeployment": False},
            **spec,
        },
    }  # fmt: skip
    return JobRequest(resource=resource, output_uri=output, source_uri=source)


@pytest.mark.usefixtures("ray_session")
def test_prediction_with_bf16_and_compile_is_within_tolerance(model: Path, tmp_path: Path) -> None:
    data = random_series(1, 4, 70, 90, seed=6, nan_fraction=0.0)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=16)
    run_job(request(src, str(tmp_path / "fp32.zarr"), str(model)))
    fast = run_job(request(src, str(tmp_path / "fast.zarr"), str(model), precision="bf16", compile=True))
    want, got = (geozarr.open_dataset(str(tmp_path / n))["variables"].values for n in ("fp32.zarr", "fast.zarr"))
    assert got.dtype == np.float32 and got.shape == want.shape == (1, 3, 70, 90)
    assert 0 < scale_diff(got, want) <= BF16_REL
    assert fast.summary["patches"] > 8, "several model batches per block"


@pytest.mark.usefixtures("ray_session")
def test_replica_without_a_gpu_refuses_fp16_as_a_user_error(model: Path) -> None:
    # device auto, and the replica sees no GPU (the API refuses gpusPerReplica 0 with fp16; a
    # replica can still end up without one, e.g. on a CPU-only torch): Serve reports our error.
    from rasterkube.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device auto picks it")
    cfg = dataclasses.replace(config(model), device="auto", precision="fp16")
    app = cfg.app_name(False, "fp16-on-cpu")
    with pytest.raises(UserError, match=r"^spec\.precision: fp16 runs on CUDA GPUs only.*runs on cpu") as err:
        serving.deploy(cfg, app, share=False)
    assert "Traceback" not in str(err.value)
    assert serving.app_status(app)[0] is None, "the failed application is deleted"


@pytest.mark.usefixtures("ray_session")
def test_bad_compile_input_names_the_field_and_writes_nothing(model: Path, tmp_path: Path) -> None:
    from rasterkube.errors import UserError

    src = write_store(str(tmp_path / "src.zarr"), random_series(1, 4, 24, 24, seed=1), chunk=16)
    script = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(ConvNet(4, 3, seed=2).eval()), str(script))
    out = tmp_path / "out.zarr"
    with pytest.raises(UserError, match=r"^spec\.compile: TorchScript models cannot be compiled"):
        run_job(request(src, str(out), str(script), compile=True))
    with no_cxx(), pytest.raises(UserError, match=r"^spec\.compile: the job's machine has no C\+\+ compiler"):
        run_job(request(src, str(out), str(model), compile=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.ts", "src.zarr"], "nothing written"
