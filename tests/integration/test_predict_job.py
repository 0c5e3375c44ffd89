"""The Prediction job on real Ray + Ray Serve with real exported models.

Blockwise clip merging equals whole-image inference, weighted average is seam-free, change
detection stacks time-major, nodata propagates, bad input is refused with nothing written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.stores import random_series, write_store
from helpers.torchmodels import ConvNet, conv_pt2, export_pt2
from rasterkube import geozarr
from rasterkube.errors import UserError
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest
from rasterkube.predict import serving, windows
from rasterkube.runtime.progress import CallbackReporter

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

# float32 convolutions of different input sizes may use different kernels/accumulation orders.
ATOL = 2e-5


def request(source: str, output: str, model_uri: str, features: list[str], labels: list[str], **spec) -> JobRequest:
    resource = {
        "apiVersion": "rasterkube.dev/v1alpha1",
        "kind": "Prediction",
        "metadata": {"name": "t"},
        "spec": {
            "source": {"uri": source},
            "model": {"uri": model_uri, "features": features, "labels": labels, **spec.pop("model", {})},
            # One deployment per run unless a test says otherwise: no replicas left over.
            "serving": {"shareDeployment": False, **spec.pop("serving", {})},
            **spec,
        },
    }
    return JobRequest(resource=resource, output_uri=output, source_uri=source)


def whole_image(net: torch.nn.Module, image: np.ndarray, clip: int, softmax: bool) -> np.ndarray:
    """The model applied once to the whole (reflect-padded) image, cropped back."""
    padded = windows.pad_for_patches(np.nan_to_num(image), clip, "reflect")
    with torch.inference_mode():
        y = net.eval()(torch.from_numpy(padded[None].copy()))
        if softmax:
            y = torch.softmax(y, dim=1)
    return y[0, :, clip : clip + image.shape[1], clip : clip + image.shape[2]].numpy()


def test_clip_merge_equals_whole_image_inference(tmp_path: Path) -> None:
    # Odd sizes: not multiples of the patch stride, the chunk or the block.
    data = random_series(2, 3, 157, 203, seed=3, nan_fraction=0.0)
    data[1, :, 50:53, 60:66] = np.nan  # nodata in the second time step
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=32)
    net = ConvNet(3, 4, layers=3, seed=1)  # receptive-field radius 3 <= clipSize 4
    model = export_pt2(net, tmp_path / "seg.pt2", 3, patch=40)
    out = str(tmp_path / "out.zarr")
    seen: list[float] = []
    result = run_job(
        request(src, out, str(model), [f"test:b{i}" for i in range(3)], list("abcd"),
                patchSize=40, clipSize=4, maxBatchSize=7, xyBlockMultiplier=2),
        CallbackReporter(lambda pct, msg: seen.append(pct)),
    )
    assert result.summary["bands"] == list("abcd")
    assert result.summary["blocks"] == 3 * 4
    assert seen == sorted(seen) and seen[-1] == 100
    got = geozarr.open_dataset(out)["variables"].values
    assert got.shape == (2, 4, 157, 203)
    for t in range(2):
        want = whole_image(net, data[t], 4, softmax=True)
        valid = np.isfinite(data[t]).all(axis=0)
        np.testing.assert_allclose(got[t][:, valid], want[:, valid], atol=ATOL, rtol=0)
        assert np.isnan(got[t][:, ~valid]).all(), "nodata pixels stay nodata"
    np.testing.assert_allclose(got[0].sum(axis=0), 1.0, atol=1e-5)  # softmax probabilities
    # Away from the image edge it is exactly the unpadded model, too.
    with torch.inference_mode():
        plain = torch.softmax(net(torch.from_numpy(data[0][None].copy())), dim=1)[0].numpy()
    np.testing.assert_allclose(got[0][:, 4:-4, 4:-4], plain[:, 4:-4, 4:-4], atol=ATOL, rtol=0)
    # The grid and attributes follow the source.
    src_info, out_info = geozarr.describe(src), geozarr.describe(out)
    assert out_info.grid == src_info.grid
    assert (out_info.times == src_info.times).all()
    assert out_info.attrs["rasterkube:actor"] == "semanticSegmentation"


def test_weighted_average_is_seam_free(tmp_path: Path) -> None:
    data = random_series(1, 2, 97, 131, seed=5, nan_fraction=0.0)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=16)
    net = ConvNet(2, 1, layers=2, seed=2)  # radius 2: the two outer pixels of a patch lack context
    model = export_pt2(net, tmp_path / "reg.pt2", 2, patch=24)
    out = str(tmp_path / "out.zarr")
    run_job(request(src, out, str(model), ["test:b0", "test:b1"], ["value"], patchSize=24, clipSize=4,
                    mergeMode="weightedAverage", xyBlockMultiplier=2, model={"actor": "regression"}))
    got = geozarr.open_dataset(out)["variables"].values[0, 0]
    want = whole_image(net, data[0], 4, softmax=False)[0]
    err = np.abs(got - want)
    # Patch-edge pixels without context get the smallest blend weights: their errors are
    # damped to a few percent of the signal ...
    assert err.max() < 0.05 * np.ptp(want), (err.max(), np.ptp(want))
    # ... and block edges (every 32 px, where tasks meet) are no worse than the patch overlaps
    # inside a block: the halo gives blocks the same context, so there are no seams.
    block_edges = np.r_[err[31:33].ravel(), err[:, 31:33].ravel(), err[63:65].ravel(), err[:, 63:65].ravel()]
    assert block_edges.max() <= err.max() + 1e-7
    assert block_edges.mean() < 3 * err.mean() + 1e-6
    print("weighted-average error", err.max(), err.mean(), block_edges.mean(), np.ptp(want))


def test_weighted_average_keeps_constants_at_borders(tmp_path: Path) -> None:
    data = random_series(1, 1, 45, 37, seed=6, nan_fraction=0.0)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=16)
    net = ConvNet(1, 1, layers=1)
    with torch.no_grad():
        net.convs[0].weight.zero_()
        net.convs[0].bias.fill_(0.75)
    model = export_pt2(net, tmp_path / "const.pt2", 1, patch=16)
    out = str(tmp_path / "out.zarr")
    run_job(request(src, out, str(model), ["test:b0"], ["c"], patchSize=16, clipSize=3,
                    mergeMode="weightedAverage", model={"actor": "regression"}))
    got = geozarr.open_dataset(out)["variables"].values
    np.testing.assert_allclose(got, 0.75, rtol=1e-6)  # no darkening at borders or seams


class TimeMajorIdentity(torch.nn.Module):
    """Returns its input channels unchanged: shows the channel order the model was given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


def test_change_detection_stacks_time_major(tmp_path: Path) -> None:
    t, c, h, w = 2, 3, 20, 24
    # Pixel values encode (time, band): 10·t + band.
    data = (10 * np.arange(t)[:, None, None, None] + np.arange(c)[None, :, None, None]).astype(np.float32)
    data = np.broadcast_to(data, (t, c, h, w)).copy()
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=16, start_year=2010)
    ep = torch.export.export(
        TimeMajorIdentity(), (torch.randn(2, t * c, 16, 16),), dynamic_shapes=({0: torch.export.Dim("b", min=1)},)
    )
    model = tmp_path / "change.pt2"
    torch.export.save(ep, str(model))
    labels = [f"ch{i}" for i in range(t * c)]
    out = str(tmp_path / "out.zarr")
    with pytest.raises(UserError, match="spec.model.features: 3 feature"):
        # As a per-time-step actor the same model would get 3 channels, not 6.
        run_job(request(src, out, str(model), ["test:b0", "test:b1", "test:b2"], labels, patchSize=16,
                        clipSize=2, model={"actor": "regression"}))
    result = run_job(request(src, out, str(model), ["test:b0", "test:b1", "test:b2"], labels, patchSize=16,
                             clipSize=2, model={"actor": "changeDetection"}))
    ds = geozarr.open_dataset(out)
    got = ds["variables"].values
    assert got.shape == (1, t * c, h, w), "one output time step"
    # softmax over identity channels: order is preserved, so the largest value is the last
    # (t=1, band 2) channel and values increase with 10·t + band.
    means = got[0].mean(axis=(1, 2))
    assert list(np.argsort(means)) == list(range(t * c)), "channels stacked time-major: t0b0, t0b1, ..., t1b2"
    assert str(ds["time"].values[0])[:10] == "2010-01-01"
    assert int(geozarr.describe(out).times.size) == 1
    assert result.summary["times"] == ["2010-01-01"]
    delta = ds["time_delta"].values
    assert int(np.asarray(delta).astype("timedelta64[s]").astype(np.int64)[0]) == 365 * 86400


def test_bad_input_names_the_field_and_writes_nothing(tmp_path: Path) -> None:
    data = random_series(1, 2, 30, 30, seed=1)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=16)
    model = conv_pt2(tmp_path / "m.pt2", 2, 3, patch=16)
    out = tmp_path / "out.zarr"
    feats = ["test:b0", "test:b1"]
    cases = {
        "spec.model.features": request(src, str(out), str(model), ["test:b0", "nope"], list("abc"), patchSize=16,
                                       clipSize=2),
        "spec.model.labels": request(src, str(out), str(model), feats, ["a", "b"], patchSize=16, clipSize=2),
        "spec.patchSize": request(src, str(out), str(model), feats, list("abc"), patchSize=32, clipSize=2),
        "spec.model.uri": request(src, str(out), str(tmp_path / "missing.pt2"), feats, list("abc"), patchSize=16,
                                  clipSize=2),
        "spec.maxBatchSize": request(src, str(out), str(model), feats, list("abc"), patchSize=16, clipSize=2,
                                     maxBatchSize=1024, model={"uri": str(conv_pt2(tmp_path / "big.pt2", 2, 3))}),
    }
    cases["spec.maxBatchSize"].resource["spec"]["patchSize"] = 2048
    cases["spec.maxBatchSize"].resource["spec"]["clipSize"] = 16
    (tmp_path / "junk.pt2").write_bytes(b"not a model")
    cases["spec.model.uri "] = request(src, str(out), str(tmp_path / "junk.pt2"), feats, list("abc"), patchSize=16,
                                      clipSize=2)
    for field, req in cases.items():
        with pytest.raises(UserError) as err:
            run_job(req)
        assert str(err.value).startswith(field.strip()), (field, str(err.value))
        assert not out.exists()
        assert not any(p.name.startswith(".") and "out.zarr" in p.name for p in tmp_path.iterdir())


def test_shared_deployment_is_reused_then_scales_to_zero(tmp_path: Path) -> None:
    import time

    from ray import serve

    data = random_series(1, 2, 24, 24, seed=8, nan_fraction=0.0)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=16)
    model = conv_pt2(tmp_path / "shared.pt2", 2, 2, patch=16)
    feats = ["test:b0", "test:b1"]
    shared = {"shareDeployment": True, "idleTimeoutSeconds": 1}
    first = run_job(request(src, str(tmp_path / "a.zarr"), str(model), feats, ["x", "y"], patchSize=16,
                            clipSize=2, serving=shared))
    second = run_job(request(src, str(tmp_path / "b.zarr"), str(model), feats, ["x", "y"], patchSize=16,
                             clipSize=2, serving=shared))
    app = first.summary["deployment"]
    assert second.summary["deployment"] == app and second.summary["deploymentReused"] is True
    assert not first.summary["deploymentReused"]
    np.testing.assert_array_equal(geozarr.open_dataset(str(tmp_path / "a.zarr"))["variables"].values,
                                  geozarr.open_dataset(str(tmp_path / "b.zarr"))["variables"].values)
    # Idle: the replicas go away (their CPU returns to the cluster), the app stays for reuse.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        deployment = serve.status().applications[app].deployments["ModelServer"]
        if sum(deployment.replica_states.values()) == 0:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"replicas still running after 90 s: {deployment.replica_states}")
    serving.delete(app)


class Interrupted(Exception):
    """Stands for a fault that ends the driver mid-run (not bad input: the staging is kept)."""


def test_interrupted_prediction_resumes_from_its_finished_blocks(tmp_path: Path) -> None:
    data = random_series(2, 3, 96, 96, seed=4, nan_fraction=0.0)
    src = write_store(str(tmp_path / "src.zarr"), data, chunk=16)
    model = conv_pt2(tmp_path / "m.pt2", 3, 2, patch=24)
    args = (src, str(tmp_path / "out.zarr"), str(model), [f"test:b{i}" for i in range(3)], ["a", "b"])
    spec = {"patchSize": 24, "clipSize": 4, "maxBatchSize": 8, "xyBlockMultiplier": 1}

    def stop_at_half(_pct: float, message: str) -> None:
        if message.startswith("predicting blocks: ") and int(message.split(": ")[1].split("/")[0]) >= 18:
            raise Interrupted(message)

    with pytest.raises(Interrupted):
        run_job(request(*args, **spec), CallbackReporter(stop_at_half), max_in_flight=1)
    assert not (tmp_path / "out.zarr").exists()
    resumed = run_job(request(*args, **spec))
    assert resumed.summary["blocks"] == 36 and 18 <= resumed.summary["blocksReused"] < 36
    full = run_job(request(src, str(tmp_path / "full.zarr"), *args[2:], **spec))
    assert full.summary["blocksReused"] == 0 and full.summary["patches"] == resumed.summary["patches"]
    # Ray Serve batches patches of several blocks together, and the batch shape changes
    # oneDNN's kernels: equal to float32 rounding, not to the bit (the ChangeScore test is).
    got, want = (geozarr.open_dataset(str(tmp_path / n))["variables"].values for n in ("out.zarr", "full.zarr"))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
