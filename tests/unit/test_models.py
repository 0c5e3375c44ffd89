"""The typed API models: defaults, camelCase wire form, cross-field rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rasterkube.api import ChangeScoreSpec, MosaicSpec, PredictionSpec, VectorizationSpec
from rasterkube.constants import Kind


def prediction(**over):
    base = {"source": {"mosaicRef": {"name": "m"}}, "model": {"uri": "m.pt2", "features": ["a"], "labels": ["b"]}}
    return PredictionSpec.model_validate({**base, **over})


def test_change_score_defaults_and_wire_names() -> None:
    spec = ChangeScoreSpec.model_validate({"source": {"uri": "s3://b/x.zarr"}})
    wire = spec.to_wire()
    assert wire["dataVar"] == "variables"
    assert wire["methods"] == ["looMedoid"]
    assert wire["distance"] == "cosine"
    assert wire["robustTimeZScore"] is False
    assert wire["xyBlockMultiplier"] == 4
    assert spec.source.ref is None


def test_source_must_have_exactly_one_field() -> None:
    with pytest.raises(ValidationError, match="exactly one of mosaicRef"):
        ChangeScoreSpec.model_validate({"source": {}})
    with pytest.raises(ValidationError, match="exactly one of mosaicRef"):
        ChangeScoreSpec.model_validate({"source": {"uri": "a", "mosaicRef": {"name": "m"}}})


def test_source_ref_kind() -> None:
    spec = ChangeScoreSpec.model_validate({"source": {"predictionRef": {"name": "emb"}}})
    assert spec.source.ref == (Kind.PREDICTION, "emb")


@pytest.mark.parametrize(
    ("model", "source", "ok"),
    [
        (PredictionSpec, {"changeScoreRef": {"name": "c"}}, False),
        (PredictionSpec, {"mosaicRef": {"name": "c"}}, True),
        (ChangeScoreSpec, {"changeScoreRef": {"name": "c"}}, False),
        (VectorizationSpec, {"changeScoreRef": {"name": "c"}}, True),
    ],
)
def test_allowed_source_kinds(model, source, ok) -> None:
    extra = {"model": {"uri": "m", "features": ["a"], "labels": ["b"]}} if model is PredictionSpec else {}
    if model is VectorizationSpec:
        extra = {"features": ["x"]}
    if ok:
        model.model_validate({"source": source, **extra})
    else:
        with pytest.raises(ValidationError, match="is not accepted by a"):
            model.model_validate({"source": source, **extra})


def test_clip_size_must_be_below_half_patch() -> None:
    assert prediction(patchSize=64, clipSize=31).clip_size == 31
    with pytest.raises(ValidationError, match=r"clipSize \(32\) must be less than patchSize/2 \(32\)"):
        prediction(patchSize=64, clipSize=32)


def test_precision_and_compile_defaults_and_rules() -> None:
    from rasterkube.manifests import format_validation_error

    spec = prediction()
    assert spec.precision == "fp32" and spec.compile is False
    assert spec.to_wire()["precision"] == "fp32" and spec.to_wire()["compile"] is False
    gpu = {"serving": {"gpusPerReplica": 1}, "resources": {"gpus": 1}}
    assert prediction(precision="fp16", **gpu).precision == "fp16"
    assert prediction(precision="fp16", device="cuda", compile=True, **gpu).compile is True
    assert prediction(precision="bf16", device="cpu").precision == "bf16"
    for bad in ({"device": "cpu", **gpu}, {}, {"device": "cuda"}):
        with pytest.raises(ValidationError) as err:
            prediction(precision="fp16", **bad)
        assert format_validation_error(err.value, "spec").startswith("spec.precision: fp16 runs on CUDA GPUs only"), bad
    with pytest.raises(ValidationError) as err:
        prediction(precision="int8")
    assert format_validation_error(err.value, "spec").startswith("spec.precision: 'int8' is not allowed")
    with pytest.raises(ValidationError) as err:
        prediction(compile="sometimes")
    assert format_validation_error(err.value, "spec").startswith("spec.compile: input should be a valid boolean")


def test_unknown_enum_and_field_rejected() -> None:
    with pytest.raises(ValidationError) as err:
        ChangeScoreSpec.model_validate({"source": {"uri": "a"}, "distance": "manhattan", "colour": 1})
    types = {e["type"] for e in err.value.errors()}
    assert types == {"enum", "extra_forbidden"}


def test_methods_unique_and_nonempty() -> None:
    with pytest.raises(ValidationError, match="each method once"):
        ChangeScoreSpec.model_validate({"source": {"uri": "a"}, "methods": ["looMedoid", "looMedoid"]})
    with pytest.raises(ValidationError):
        ChangeScoreSpec.model_validate({"source": {"uri": "a"}, "methods": []})


def test_selector_rules() -> None:
    ok = ChangeScoreSpec.model_validate({"source": {"uri": "a"}, "selector": {"x": [0, 10], "y": [5, 6]}})
    assert ok.selector is not None and ok.selector.x == [0, 10]
    for bad, msg in (
        ({"x": [3, 3]}, "start < stop"),
        ({"bbox": [0, 0, 1, 1], "x": [0, 1]}, "either bbox or x/y"),
        ({"bbox": [1, 0, 0, 1]}, "min < max"),
    ):
        with pytest.raises(ValidationError, match=msg):
            ChangeScoreSpec.model_validate({"source": {"uri": "a"}, "selector": bad})


def test_mosaic_aoi_and_time_rules() -> None:
    base = {"dataset": "sentinel-2-l2a", "aoi": {"bbox": [12.0, 52.0, 12.1, 52.1]},
            "time": {"start": "2020-01-01", "end": "2024-01-01", "window": "P1Y"}}  # fmt: skip
    spec = MosaicSpec.model_validate(base)
    assert spec.max_cloud_cover == 75 and spec.chunk_size == 512
    with pytest.raises(ValidationError, match="end must be after start"):
        MosaicSpec.model_validate({**base, "time": {"start": "2024-01-01", "end": "2020-01-01"}})
    with pytest.raises(ValidationError, match="exactly one of geometry, bbox or uri"):
        MosaicSpec.model_validate({**base, "aoi": {"bbox": [0, 0, 1, 1], "uri": "a.parquet"}})
    with pytest.raises(ValidationError, match="String should match pattern"):
        MosaicSpec.model_validate({**base, "time": {**base["time"], "window": "1 year"}})


def test_vectorization_connectivity() -> None:
    spec = VectorizationSpec.model_validate({"source": {"uri": "a"}, "features": ["water"]})
    assert spec.connectivity == 4 and spec.output.crs == "EPSG:4326"
    with pytest.raises(ValidationError, match="must be 4 or 8"):
        VectorizationSpec.model_validate({"source": {"uri": "a"}, "features": ["w"], "connectivity": 6})


def test_spec_hash_is_the_same_for_the_same_work_and_changes_with_it() -> None:
    from rasterkube.api import ChangeScore

    base = {"apiVersion": "rasterkube.dev/v1alpha1", "kind": "ChangeScore", "metadata": {"name": "a"},
            "spec": {"source": {"uri": "s.zarr"}}}  # fmt: skip
    a = ChangeScore.model_validate(base)
    explicit_default = ChangeScore.model_validate(
        {**base, "metadata": {"name": "b", "uid": "u"}, "spec": {"source": {"uri": "s.zarr"}, "dataVar": "variables"}}
    )
    other = ChangeScore.model_validate({**base, "spec": {"source": {"uri": "s.zarr"}, "distance": "alphaEarthCosine"}})
    assert a.spec_hash == explicit_default.spec_hash  # metadata and spelled-out defaults do not count
    assert a.spec_hash != other.spec_hash
    assert len(a.spec_hash) == 64
