"""Pure logic of the Prediction service: actors, serving settings, memory and capacity checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rasterkube.api import PredictionSpec
from rasterkube.api.common import quantity_bytes
from rasterkube.errors import UserError
from rasterkube.predict import actors, serving
from rasterkube.predict.service import block_buffer_bytes, check_memory, idle_timeout


def test_per_time_step_actors_take_the_features_as_channels() -> None:
    plan = actors.plan("semanticSegmentation", 4, n_source_times=3, model_in_channels=4)
    assert plan == actors.ActorPlan(time_stacked=False, input_times=1, in_channels=4)
    with pytest.raises(UserError, match="spec.model.features: 3 feature\\(s\\) given but the model takes 4"):
        actors.plan("regression", 3, 1, 4)


def test_change_detection_stacks_all_source_times() -> None:
    assert actors.plan("changeDetection", 3, 2, 6) == actors.ActorPlan(True, 2, 6)
    assert actors.plan("changeDetection", 3, 4, None).in_channels == 12  # TorchScript: from the source
    with pytest.raises(UserError, match="spec.source: the changeDetection model stacks 2 time steps .* has 3"):
        actors.plan("changeDetection", 3, 3, 6)
    with pytest.raises(UserError, match="not a multiple"):
        actors.plan("changeDetection", 4, 2, 6)
    with pytest.raises(UserError, match="at least 2 time steps"):
        actors.plan("changeDetection", 3, 1, 3)


def test_change_detection_output_is_the_window_start_with_time_delta() -> None:
    times = np.array(["2010-01-01", "2013-01-01"], dtype="datetime64[s]")
    out, coords = actors.output_times(actors.ActorPlan(True, 2, 6), times)
    assert list(out) == [times[0]]
    dim, values, attrs = coords[actors.TIME_DELTA]
    assert dim == "time" and values.tolist() == [(times[1] - times[0]).astype(int)] and attrs["units"] == "seconds"
    same, none = actors.output_times(actors.ActorPlan(False, 1, 3), times)
    assert (same == times).all() and none == {}


def test_labels_match_output_channels() -> None:
    actors.check_labels(["a", "b"], 2)
    with pytest.raises(UserError, match="spec.model.labels: 1 label\\(s\\) given but the model returns 2"):
        actors.check_labels(["a"], 2)
    with pytest.raises(UserError, match="unique"):
        actors.check_labels(["a", "a"], 2)


def test_softmax_only_for_class_probabilities() -> None:
    assert actors.applies_softmax("semanticSegmentation") and actors.applies_softmax("changeDetection")
    assert not actors.applies_softmax("regression") and not actors.applies_softmax("embedding")


CONFIG = serving.ServeConfig(
    model_uri="s3://b/m.pt2", model_sha256="ab" * 32, softmax=True, device="auto", max_batch_size=16,
    replicas=1, max_replicas=None, cpus_per_replica=1.0, gpus_per_replica=0.0,
)  # fmt: skip


def test_deployments_are_shared_by_content_and_settings() -> None:
    moved = dataclasses.replace(CONFIG, model_uri="/local/copy.pt2")
    assert moved.app_name(True, "r1") == CONFIG.app_name(True, "r2"), "same bytes, same settings: shared"
    assert dataclasses.replace(CONFIG, max_batch_size=32).key() != CONFIG.key()
    assert CONFIG.app_name(False, "r1") != CONFIG.app_name(False, "r2"), "per-run apps when not shared"
    assert CONFIG.app_name(True, "x").startswith(f"{serving.APP_PREFIX}-abababababab-")


def test_shared_deployments_scale_to_zero_when_idle() -> None:
    shared = serving._options(CONFIG, share=True)
    auto = shared["autoscaling_config"]
    assert auto["min_replicas"] == 0 and auto["initial_replicas"] == 1 and auto["max_replicas"] == 1
    assert auto["downscale_to_zero_delay_s"] == CONFIG.idle_timeout_s
    per_run = serving._options(CONFIG, share=False)
    assert per_run["num_replicas"] == 1 and "autoscaling_config" not in per_run
    scaling = serving._options(dataclasses.replace(CONFIG, replicas=2, max_replicas=6), share=False)
    assert scaling["autoscaling_config"]["min_replicas"] == 2 and scaling["autoscaling_config"]["max_replicas"] == 6
    gpu = serving._options(dataclasses.replace(CONFIG, gpus_per_replica=0.5), share=False)
    assert {k: gpu["ray_actor_options"][k] for k in ("num_cpus", "num_gpus")} == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert "env_vars" in gpu["ray_actor_options"]["runtime_env"]
    assert per_run["logging_config"] == {"enable_access_log": False}


def test_device_and_threads() -> None:
    assert serving.pick_device("auto", True) == "cuda" and serving.pick_device("auto", False) == "cpu"
    assert serving.pick_device("cpu", True) == "cpu"
    assert serving.torch_threads(0.5) == 1 and serving.torch_threads(4) == 4
    assert serving.patch_count([np.zeros((3, 1)), np.zeros((5, 1))]) == 8


def test_capacity_check_names_the_field() -> None:
    serving.check_capacity(CONFIG, 0.0, {"CPU": 2.0})
    with pytest.raises(UserError, match="spec.serving.cpusPerReplica: 3 replica\\(s\\) x 1 CPU"):
        serving.check_capacity(dataclasses.replace(CONFIG, replicas=3), 0.0, {"CPU": 2.0})


def _spec(**kw: object) -> PredictionSpec:
    base = {"source": {"uri": "s"}, "model": {"uri": "m", "features": ["a"], "labels": ["x"]}}
    return PredictionSpec.model_validate({**base, **kw})


def test_memory_checks() -> None:
    plan = actors.ActorPlan(False, 1, 4)
    check_memory(_spec(patchSize=256, clipSize=32), 512, plan, 1, 2)
    with pytest.raises(UserError, match="spec.maxBatchSize: a batch of 1024 patches"):
        check_memory(_spec(patchSize=1024, clipSize=32, maxBatchSize=1024), 512, plan, 1, 2)
    with pytest.raises(UserError, match="spec.xyBlockMultiplier: a block of 16x512 px"):
        check_memory(_spec(patchSize=256, clipSize=100, xyBlockMultiplier=16), 512, plan, 6, 8)
    # Patches stream to the model a batch at a time: buffers no longer grow with the overlap of
    # patches (stride 56 of 256 px held ~21 copies of each pixel), only the batches in flight.
    large = block_buffer_bytes(_spec(patchSize=256, clipSize=100), 4096, 1, 4, 2)
    frame = (4096 + 200) ** 2 * 4 * 4
    assert frame < large < frame + 4096**2 * 2 * 4 + 10 * 16 * 6 * 256**2 * 4
    assert block_buffer_bytes(_spec(patchSize=256, clipSize=100, mergeMode="weightedAverage"), 4096, 1, 4, 2) > large


def test_quantities() -> None:
    assert quantity_bytes("4Gi") == 4 * 2**30 and quantity_bytes("512M") == 512_000_000
    assert quantity_bytes("1e9") == 10**9 and quantity_bytes("1024") == 1024


def test_embedded_ray_gives_idle_replicas_back_quickly() -> None:
    assert idle_timeout(120, embedded_ray=False) == 120.0
    assert idle_timeout(120, embedded_ray=True) == 5.0 and idle_timeout(1, embedded_ray=True) == 1.0


def test_unset_cpus_per_replica_is_sized_from_the_cluster() -> None:
    assert PredictionSpec.model_validate(
        {"source": {"uri": "s3://b/s.zarr"}, "model": {"uri": "s3://b/m.pt2", "features": ["a"], "labels": ["x"]}}
    ).serving.cpus_per_replica is None, "no serving settings: sized at run time, not 1 CPU"
    size = serving.replica_cpus
    assert size(None, 1, None, 0.0, 2.0, 2.0) == 2.0, "one replica gets every core of a 2-CPU cluster"
    assert size(None, 2, None, 0.0, 16.0, 8.0) == 8.0
    assert size(None, 1, None, 0.0, 16.0, 8.0) == 8.0, "at most one node's CPUs: a replica runs on one node"
    assert size(None, 2, 6, 0.0, 24.0, 8.0) == 4.0, "sized for maxReplicas so that all of them fit"
    assert size(None, 3, None, 0.0, 8.0, 8.0) == 2.0, "whole cores (torch threads)"
    assert size(None, 4, None, 0.0, 2.0, 2.0) == 0.5, "fewer CPUs than replicas: a fraction each, all fit"
    assert size(None, 1, None, 1.0, 16.0, 16.0) == serving.GPU_REPLICA_CPUS, "a GPU replica feeds its GPU"
    assert size(0.5, 1, None, 0.0, 16.0, 16.0) == 0.5, "an explicit setting is kept"
    config = dataclasses.replace(CONFIG, cpus_per_replica=size(None, 4, None, 0.0, 2.0, 2.0), replicas=4)
    serving.check_capacity(config, 0.0, {"CPU": 2.0})
