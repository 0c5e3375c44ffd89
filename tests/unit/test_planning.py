"""``rasterkube plan``'s arithmetic (issue 16.3): counts derived by hand for small grids."""

from __future__ import annotations

import pytest

from rasterkube.constants import Kind
from rasterkube.errors import UserError
from rasterkube.planning import calibration as C
from rasterkube.planning import render
from rasterkube.planning import work as W
from rasterkube.predict import windows
from rasterkube.runtime.blocks import plan_blocks

MAX_CHUNK = 32 * 2**20
STRIP = 65_536


def test_axis_arithmetic_matches_the_jobs() -> None:
    assert W.axis_spans(100, 32) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert W.chunks_touched(0, 32, 16) == 2
    assert W.chunks_touched(8, 40, 16) == 3  # a span that starts inside a chunk
    assert W.chunks_touched(96, 100, 16) == 1
    # stride 24: origins 0, 24, 48, 72, 96 and the last one shifted back to 104
    assert W.patch_origins_along(128, 32, 4) == 6
    for length in (1, 20, 24, 25, 44, 72, 128, 300):
        assert W.patch_origins_along(length, 32, 4) == len({y for y, _ in windows.patch_origins(length, 1, 32, 4)})
    blocks = W.Blocks.of((100, 70), (16, 16), 2)
    assert blocks.count == len(plan_blocks((100, 70), (16, 16), 2)) == 12


def test_change_score_counts() -> None:
    # 3 times × 2 bands, 100×70 px in chunks of 16: blocks of 32 px → 4 rows × 3 columns.
    src = W.Raster(3, ("a", "b"), (100, 70), (16, 16))
    work = W.change_score(src, (0, 100, 0, 70), 2, ["d", "d_robust_time_zscore"], ["difference"], 5, 2, MAX_CHUNK,
                          STRIP)  # fmt: skip
    assert work.blocks == 12
    # chunks read per time: rows 2+2+2+1 = 7, columns 2+2+1 = 5
    assert work.chunk_reads == 3 * 7 * 5 == 105
    assert work.bytes_read == 105 * 2 * 16 * 16 * 4
    assert work.chunk_writes == 3 * 7 * 5  # output chunks 16 px: 7 × 5 per time
    assert work.bytes_written == 3 * 2 * 100 * 70 * 4
    assert work.ledger_markers == 12
    assert work.object_store_requests == 105 + 105 + 12 + 2 * 105 + W.METADATA_REQUESTS_PER_JOB + 12 * W.METADATA_REQUESTS_PER_BLOCK
    mpx = 100 * 70 / 1e6
    assert work.terms == {W.TERM_READ: mpx * 3 * 2, W.TERM_DIFFERENCE: mpx * 3 * 2, W.TERM_ZSCORE: mpx * 3 * 1}
    assert work.output is not None and work.output.shape == (100, 70) and work.output.bands == ("d", "d_robust_time_zscore")


def test_change_score_selector_and_strips_reread_chunks() -> None:
    src = W.Raster(2, ("a",), (64, 64), (16, 16))
    # window rows 8..40, columns 0..32: one block of 32×32 whose rows straddle 3 chunk rows
    work = W.change_score(src, (8, 40, 0, 32), 1, ["s"], ["looMedoid"], 5, 2, MAX_CHUNK, STRIP)
    assert work.blocks == 1 and work.chunk_reads == 2 * 3 * 2
    assert work.terms == {W.TERM_READ: 32 * 32 / 1e6 * 2, W.TERM_LOO_MEDOID: 32 * 32 / 1e6 * 2 * 2 * 1}
    # with looMedoid, difference is the pairwise matrix's sub-diagonal: no term of its own
    both = W.change_score(src, (8, 40, 0, 32), 1, ["d", "l"], ["difference", "looMedoid"], 5, 2, MAX_CHUNK, STRIP)
    assert W.TERM_DIFFERENCE not in both.terms
    # strips of 8 rows (256 px / 32 columns): rows 8-16, 16-24, 24-32, 32-40 → one chunk row each
    # (4), each strip reading 2 chunk columns
    strips = W.change_score(src, (8, 40, 0, 32), 1, ["s"], ["looMedoid"], 5, 2, MAX_CHUNK, 256)
    assert strips.chunk_reads == 2 * 4 * 2
    # strips of 12 rows: 8-20 (2 chunk rows), 20-32 (1), 32-40 (1)
    assert W.change_score(src, (8, 40, 0, 32), 1, ["s"], ["looMedoid"], 5, 2, MAX_CHUNK, 384).chunk_reads == 2 * 4 * 2


def test_change_score_cluster_terms() -> None:
    src = W.Raster(4, ("a", "b", "c"), (32, 32), (16, 16))
    work = W.change_score(src, (0, 32, 0, 32), 3, ["l", "c"], ["clusterTransition"], 7, 1, MAX_CHUNK, STRIP)
    assert work.terms == {W.TERM_READ: 32 * 32 / 1e6 * 4 * 3, W.TERM_CLUSTER: 32 * 32 / 1e6 * 4 * 3 * 7,
                          W.TERM_CLUSTER_FIT: 1.0}


def test_prediction_counts() -> None:
    # 1 time × 4 bands, 300×200 px in chunks of 64, blocks of 128; 32 px patches, 4 px clip.
    src = W.Raster(1, tuple("abcd"), (300, 200), (64, 64))
    work = W.prediction(src, 4, ["land", "water"], False, 32, 4, 2, "abc", MAX_CHUNK, 12345)
    assert work.blocks == 6
    # patches: rows of blocks 128, 128, 44 px → 6, 6, 2 origins; columns 128, 72 → 6, 3
    assert work.patches == (6 + 6 + 2) * (6 + 3) == 126
    by_blocks = sum(len(windows.patch_origins(*b.shape, 32, 4)) for b in plan_blocks((300, 200), (64, 64), 2))
    assert work.patches == by_blocks
    # halo reads: rows [0,132) [124,260) [252,300) → 3+4+2 chunks; columns [0,132) [124,200) → 3+3
    assert work.chunk_reads == 9 * 6
    assert work.bytes_read == 54 * 4 * 64 * 64 * 4
    assert work.bytes_written == 1 * 2 * 300 * 200 * 4
    assert work.terms == {W.patch_term("abc"): 126 * 32 * 32 / 1e6}
    assert work.block_buffer_bytes == 12345  # the job's own estimate, passed through
    # changeDetection: the times are stacked into one input, one output step
    stacked = W.prediction(W.Raster(2, tuple("abc"), (300, 200), (64, 64)), 3, ["n", "c"], True, 32, 4, 2, "abc", MAX_CHUNK, 1)
    assert stacked.patches == 126 and stacked.output is not None and stacked.output.times == 1
    assert stacked.chunk_reads == 2 * 54


def test_vectorization_and_mosaic_counts() -> None:
    src = W.Raster(2, ("p",), (3000, 2100), (256, 256))
    work = W.vectorization(src, 1, 1024)  # 4 chunks a block: 3 × 3 blocks
    assert work.blocks == 9 and work.bytes_written is None
    assert work.chunk_reads == 2 * 12 * 9  # every chunk once per time
    assert work.terms == {W.TERM_POLYGONIZE: 3000 * 2100 / 1e6 * 2}
    # a 200×300 px store in 128 px chunks (2 × 3 blocks); one scene covers the top-left 100×100
    # px (1 block), one the whole grid (6 blocks); 2 bands + the mask
    fps = [W.Footprint((-5.0, 100.0), (-5.0, 100.0)), W.Footprint((-50.0, 400.0), (-50.0, 400.0))]
    row = W.mosaic_row((200, 300), 128, 2, ["b1", "b2"], fps, MAX_CHUNK, 1000)
    assert row.blocks == 6
    assert row.terms == {W.TERM_COMPOSITE: (128 * 128 + 200 * 300) * 3 / 1e6}
    assert row.chunk_reads == (1 + 6) * 3
    assert row.bytes_written == 2 * 2 * 200 * 300 * 4 + 2 * 200 * 300 * 2
    assert (row + row).blocks == 12


def _cal() -> C.Calibration:
    cost = C.KindCost(2.0, {W.TERM_READ: 0.5, W.patch_term("slow"): 3.0, W.patch_term("fast"): 1.0}, 1.0, 100)
    return C.Calibration("m", "2026-12-02", 2, (0.5, 0.5, 0.5), {"ChangeScore": cost, "Prediction": cost},
                         {"slow": "slow.pt2"}, "test")  # fmt: skip


def _work(kind: Kind, terms: dict[str, float], blocks: int = 2) -> W.Work:
    return W.Work(kind, blocks, 0, 0, 0, 0, 0, 0, 50, terms)


def test_estimate_arithmetic() -> None:
    est = C.estimate(_work(Kind.CHANGE_SCORE, {W.TERM_READ: 10.0}), W.Sizing(2, 2.0), _cal(), name="n", namespace="d")
    assert est.core_seconds == 2.0 + 5.0
    assert est.wall_seconds == 1.0 + 5.0 / 2  # 4 CPUs, but only 2 blocks
    assert est.peak_memory_per_worker_bytes == 150
    assert est.gpu_seconds == 0


def test_unknown_model_is_priced_as_the_slowest_and_said() -> None:
    est = C.estimate(_work(Kind.PREDICTION, {W.patch_term("new"): 2.0}), W.Sizing(), _cal(), name="n", namespace="d",
                     gpus_reserved=1.0, max_parallel=1.0)  # fmt: skip
    assert est.core_seconds == 2.0 + 6.0
    assert est.gpu_seconds == est.wall_seconds == 1.0 + 6.0
    assert any("slow.pt2" in n for n in est.notes)
    with pytest.raises(UserError, match="no costs for Mosaic"):
        C.estimate(_work(Kind.MOSAIC, {}), W.Sizing(), _cal(), name="n", namespace="d")


def test_shipped_calibration_loads_and_is_named(tmp_path) -> None:
    cal = C.load()
    assert {"ChangeScore", "Prediction", "Mosaic", "Vectorization"} <= set(cal.kinds)
    assert cal.date in cal.label and cal.machine in cal.label
    bad = tmp_path / "cal.json"
    bad.write_text("{}")
    with pytest.raises(UserError, match="--calibration"):
        C.load(bad)
    with pytest.raises(UserError, match="does not exist"):
        C.load(tmp_path / "nope.json")


def test_table_names_every_quantity() -> None:
    est = C.estimate(_work(Kind.CHANGE_SCORE, {W.TERM_READ: 10.0}), W.Sizing(), _cal(), name="n", namespace="d")
    text = render.table([est])
    for word in ("calibration: test (m, 2 CPUs, 2026-12-02)", "ChangeScore/n", "blocks", "bytes read", "object store",
                 "peak memory", "core-hours", "GPU-hours", "sizing"):  # fmt: skip
        assert word in text
    assert render.human_bytes(3 * 2**30) == "3.0 GiB"
