"""Stage timings of the Prediction pipeline: nesting, sums and the side channel."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from rasterkube.predict import stages


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_nested_stage_pauses_the_outer_one() -> None:
    times = stages.StageTimes()
    with times.timed(stages.CUT):
        _spin(0.02)
        with times.timed(stages.SEND):
            _spin(0.05)
        _spin(0.02)
    assert times.cpu[stages.SEND] >= 0.05
    assert 0.04 <= times.cpu[stages.CUT] < 0.05 + 0.02, "the inner stage is not counted twice"
    assert times.wall[stages.CUT] + times.wall[stages.SEND] == pytest.approx(sum(times.wall.values()))


def test_per_megapixel_in_pipeline_order_and_side_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = stages.StageTimes({stages.WRITE: 1.0, stages.READ: 2.0}, {}, {"patches": 4})
    b = stages.StageTimes({stages.READ: 1.0}, {}, {"patches": 5})
    assert list(stages.per_megapixel(a, 2.0)) == [stages.READ, stages.WRITE]
    assert stages.per_megapixel(a, 2.0)[stages.READ] == 1.0
    monkeypatch.delenv(stages.ENV_STAGE_TIMES, raising=False)
    stages.record(a, "r1")
    assert stages.collect("r1") is None, "nothing written without the side channel"
    monkeypatch.setenv(stages.ENV_STAGE_TIMES, str(tmp_path))
    stages.record(a, "r1")
    stages.record(b, "r1")
    stages.record(b, "other-run")
    total = stages.collect("r1")
    assert total is not None and total.cpu[stages.READ] == 3.0 and total.counts["patches"] == 9
