"""``rasterkube plan``: what a resource will cost, before it runs (issue 16.3).

:mod:`~rasterkube.planning.work` counts blocks, patches, bytes and requests (pure);
:mod:`~rasterkube.planning.calibration` turns them into core-, GPU- and wall time from costs
measured by ``bench/bench_calibrate.py``; :mod:`~rasterkube.planning.inputs` reads the
metadata the counts need.
"""

from rasterkube.planning.calibration import Calibration, KindCost, estimate, load
from rasterkube.planning.work import Estimate, Raster, Sizing, Work

__all__ = ["Calibration", "Estimate", "KindCost", "Raster", "Sizing", "Work", "estimate", "load"]
