"""The pure parts of how a replica runs its model: batches, padding, precision rules, the
deployment identity, and the CUDA feed's schedule (on a CPU stand-in for streams and events)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
import torch
from rasterkube.api import Prediction
from rasterkube.errors import UserError
from rasterkube.predict import inference, serving


def test_batch_slices_cover_every_patch_once_in_order() -> None:
    assert inference.batch_slices(12, 5) == [slice(0, 5), slice(5, 10), slice(10, 12)]
    assert inference.batch_slices(5, 5) == [slice(0, 5)]
    assert inference.batch_slices(0, 5) == []


def test_pad_batch_appends_zero_patches_only_when_short() -> None:
    x = np.ones((2, 3, 4, 4), np.float32)
    padded = inference.pad_batch(x, 5)
    assert padded.shape == (5, 3, 4, 4) and padded.dtype == np.float32
    assert (padded[:2] == 1).all() and (padded[2:] == 0).all()
    assert inference.pad_batch(x, 2) is x
    batches = list(inference.iter_cpu_batches(np.ones((7, 1, 2, 2)), 3, pad=True))
    assert [sl for sl, _ in batches] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert all(b.shape == (3, 1, 2, 2) and b.dtype == np.float32 and b.flags.c_contiguous for _, b in batches)
    assert [b.shape[0] for _, b in inference.iter_cpu_batches(np.ones((7, 1, 2, 2)), 3, pad=False)] == [3, 3, 1]


def test_precision_dtypes_and_device_rule() -> None:
    assert inference.autocast_dtype("fp32") is None
    assert inference.autocast_dtype("bf16") is torch.bfloat16
    assert inference.autocast_dtype("fp16") is torch.float16
    inference.check_precision("fp16", "cuda")
    inference.check_precision("bf16", "cpu")
    with pytest.raises(inference.PrecisionError, match=r"^spec\.precision: fp16 runs on CUDA GPUs only"):
        inference.check_precision("fp16", "cpu")
    with pytest.raises(ValueError):
        inference.autocast_dtype("int8")


def test_autocast_is_off_for_fp32_and_on_for_bf16() -> None:
    conv = torch.nn.Conv2d(2, 2, 1)
    x = torch.randn(1, 2, 4, 4)
    with torch.inference_mode():
        with inference.autocast("cpu", None):
            assert conv(x).dtype == torch.float32
        with inference.autocast("cpu", torch.bfloat16):
            assert conv(x).dtype == torch.bfloat16
            # the softmax and the output stay float32 (the served module casts before them)
            out = inference.served(conv, None, softmax=True)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.sum(dim=1), torch.ones(1, 4, 4))


def test_missing_c_compiler_for_cuda_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "rasterkube-test-no-such-cc")
    assert "no C compiler (rasterkube-test-no-such-cc)" in (inference.compiler_problem("cuda") or "")
    with pytest.raises(inference.CompileError, match=r"^spec\.compile: here has no C compiler"):
        inference.check_toolchain("cuda", "here")


def test_inductor_cache_goes_under_rasterkube_cache_unless_set(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("RASTERKUBE_CACHE", str(tmp_path))
    monkeypatch.delenv(inference.INDUCTOR_CACHE_ENV, raising=False)
    assert inference.use_inductor_cache() == str(tmp_path / "inductor")
    monkeypatch.setenv(inference.INDUCTOR_CACHE_ENV, "/elsewhere")
    assert inference.use_inductor_cache() == "/elsewhere"


def base_config(**kw: Any) -> serving.ServeConfig:
    return serving.ServeConfig(model_uri="m.pt2", model_sha256="a" * 64, softmax=True, device="auto",
                               max_batch_size=16, replicas=1, max_replicas=None, cpus_per_replica=1,
                               gpus_per_replica=0, **kw)  # fmt: skip


def test_precision_and_compile_make_a_different_deployment() -> None:
    plain = base_config()
    keys = {plain.key(), base_config(precision="bf16").key(), base_config(compile=True).key(),
            base_config(compile=True, warmup_input=(4, 64, 64)).key()}  # fmt: skip
    assert len(keys) == 4
    assert plain.app_name(True, "r") != base_config(precision="bf16").app_name(True, "r")
    assert plain.precision == "fp32" and plain.compile is False, "defaults: what a config without them meant"


def test_serve_config_carries_precision_and_compile() -> None:
    from pathlib import Path

    from rasterkube.predict import actors, models, service

    def spec(**kw: Any) -> Any:
        return Prediction.model_validate({
            "apiVersion": "rasterkube.dev/v1alpha1", "kind": "Prediction", "metadata": {"name": "p"},
            "spec": {"source": {"uri": "s.zarr"}, "model": {"uri": "/m.pt2", "features": ["a", "b"], "labels": ["x"]},
                     "patchSize": 64, "clipSize": 4, **kw},
        }).spec  # fmt: skip

    prepared = service.Prepared(
        info=None,  # type: ignore[arg-type]
        feature_indices=(0, 1),
        fetched=models.FetchedModel("/m.pt2", Path("/m.pt2"), "b" * 64),
        signature=models.Signature(2, 1, None, models.FORMAT_PT2, False),
        plan=actors.plan("semanticSegmentation", 2, 1, 2),
    )
    plain = service.serve_config(spec(), prepared, (2.0, 2.0))
    assert (plain.precision, plain.compile, plain.warmup_input) == ("fp32", False, None)
    fast = service.serve_config(spec(precision="bf16", compile=True), prepared, (2.0, 2.0))
    assert (fast.precision, fast.compile, fast.warmup_input) == ("bf16", True, (2, 64, 64))


# ------------------------------------------------------------------------ the CUDA feed


class FakeStream:
    def __init__(self, log: list[tuple[Any, ...]], name: str) -> None:
        self.log, self.name = log, name

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(("wait", self.name, event.name))

    def synchronize(self) -> None:
        self.log.append(("sync", self.name))


class FakeEvent:
    def __init__(self, log: list[tuple[Any, ...]], name: str) -> None:
        self.log, self.name = log, name

    def record(self, stream: FakeStream) -> None:
        self.log.append(("record", self.name, stream.name))

    def synchronize(self) -> None:
        self.log.append(("host-wait", self.name))


class CpuFeed(inference.CudaFeed):
    """The feed's schedule with CPU tensors and logging stand-ins for streams and events."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self._names = iter(["copied0", "copied1", "consumed0", "consumed1"])
        super().__init__("cpu")

    def _stream(self) -> FakeStream:
        return FakeStream(self.log, "copy")

    def _event(self) -> FakeEvent:
        return FakeEvent(self.log, next(self._names))

    def _current_stream(self) -> FakeStream:
        return FakeStream(self.log, "compute")

    def _on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _pinned(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.full(shape, -1.0)

    def _device_empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.full(shape, -1.0)

    def _stage(self, batch: np.ndarray, sl: slice, slot: int, rows: int) -> None:
        self.log.append(("stage", sl.start, slot))
        super()._stage(batch, sl, slot, rows)


@pytest.mark.parametrize("pad", [False, True])
def test_cuda_feed_overlaps_the_next_copy_with_compute(pad: bool) -> None:
    feed = CpuFeed()
    batch = np.arange(12, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 3, 3), np.float32)
    seen: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        feed.log.append(("compute", int(x[0, 0, 0, 0])))
        return x[:, :1] * 2

    out = feed.run(batch, 5, pad, forward)
    np.testing.assert_array_equal(out, batch[:, :1] * 2)
    assert seen == ([5, 5, 5] if pad else [5, 5, 2])
    log = feed.log
    at = log.index
    # the next batch is staged after this one's compute is queued, before the next compute
    assert at(("compute", 0)) < at(("stage", 5, 1)) < at(("compute", 5)) < at(("stage", 10, 0)) < at(("compute", 10))
    # each compute waits for its slot's copy; each copy waits for the compute that last read the slot
    for start, slot in ((0, 0), (5, 1), (10, 0)):
        assert log[at(("compute", start)) - 1] == ("wait", "compute", f"copied{slot}")
        staged = at(("stage", start, slot))
        assert log[staged + 1 : staged + 4] == [("host-wait", f"copied{slot}"), ("wait", "copy", f"consumed{slot}"),
                                                ("record", f"copied{slot}", "copy")]  # fmt: skip
        assert log[at(("compute", start)) + 1] == ("record", f"consumed{slot}", "compute")
    assert log[-1] == ("sync", "compute"), "the host waits once, at the end"
    # buffers are reused by the next request of the same shape
    host = feed.host
    feed.run(batch[:3], 5, pad, forward)
    assert feed.host is host


def test_cuda_feed_pads_with_zeros_not_stale_patches() -> None:
    feed = CpuFeed()
    inputs: list[torch.Tensor] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        inputs.append(x.clone())
        return x

    feed.run(np.ones((7, 1, 2, 2), np.float32), 4, True, forward)
    assert (inputs[1][:3] == 1).all() and (inputs[1][3:] == 0).all()



def test_a_replica_user_error_becomes_the_deploy_error() -> None:
    # Serve's deployment message: the replica constructor's traceback, our error last
    traceback = (
        'Traceback (most recent call last):\n  File ".../replica.py", line 4008, in _call_func_or_gen\n'
        "    result = callable(*args, **kwargs)\n"
        '  File ".../inference.py", line 87, in check_precision\n    raise PrecisionError(\n'
        "rasterkube.predict.inference.PrecisionError: spec.precision: fp16 runs on CUDA GPUs only, and this "
        "model replica runs on cpu (no GPU visible to it); use bf16 or fp32"
    )
    err = serving.deploy_failure("Failed to update the deployments ['ModelServer'].", [traceback])
    assert type(err) is UserError
    assert str(err).startswith("spec.precision: fp16 runs on CUDA GPUs only") and "Traceback" not in str(err)
    fault = serving.deploy_failure("Failed to update the deployments ['ModelServer'].",
                                   ["Traceback ...\n  File x\nRuntimeError: CUDA error: out of memory\n"])  # fmt: skip
    assert type(fault) is RuntimeError
    assert str(fault) == "Ray Serve could not deploy the model: RuntimeError: CUDA error: out of memory"
    assert "deployments ['ModelServer']" in str(serving.deploy_failure("Failed to update the deployments ['ModelServer'].", []))
