"""The Vectorization job's driver-side pieces: what block results cost the driver."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_vectorize_polygons import TRANSFORM, UTM, blobs

from rasterkube.vectorize import polygons as P
from rasterkube.vectorize import service


def block_output() -> service.BlockOutput:
    """What vectorize_block returns for the middle block of a 3×3 tiling: interior polygons
    as Rows and pieces on all four seams."""
    values = blobs(96, 96, seed=3)
    bounds = (32, 64, 32, 64)
    r = P.polygonize_block(values[32:64, 32:64], 0.5, 4, bounds, values.shape, TRANSFORM)
    final = P.Rows.of(P.finish(r.final, P.Finish(UTM, UTM)))
    pieces = P.BlockPieces(P.Components.concat([]), r.pieces, r.piece_labels, r.edges)
    return service.BlockOutput([[final]], [[pieces]], [[None]])


def test_block_output_pickles_in_band_so_the_driver_pins_nothing_in_the_object_store() -> None:
    out = block_output()
    assert len(out.final[0][0]) and len(out.pieces[0][0].piece_labels), "the block has polygons and seam pieces"
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(out, protocol=5, buffer_callback=buffers.append)  # as Ray serializes task results
    # An out-of-band buffer comes back from Ray as a view into the object store, which keeps
    # the block's whole result there while the driver holds it (until the file is written).
    assert buffers == []
    back = pickle.loads(data)
    rows, want = back.final[0][0], out.final[0][0]
    assert (rows.wkb == want.wkb).all() and np.array_equal(rows.bbox, want.bbox)
    assert np.array_equal(rows.moments.mean, want.moments.mean)
    assert np.array_equal(back.pieces[0][0].piece_labels, out.pieces[0][0].piece_labels)
    assert np.array_equal(back.pieces[0][0].edges.top, out.pieces[0][0].edges.top)
    assert back.empty_max == [[None]]


@pytest.mark.parametrize(
    "values", [[b"\x01\x03", b"", b"abc" * 100], [], [b"a", None, b"bc"]], ids=["bytes", "empty", "missing"]
)
def test_binary_array_equals_pa_array(values: list[bytes | None]) -> None:
    array = np.array(values, dtype=object)
    column = P.binary_array(array)
    assert column.equals(pa.array(array, pa.large_binary()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_take_rows_gathers_across_chunks_in_index_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = [bytes(rng.integers(0, 256, rng.integers(0, 40), dtype=np.uint8)) for _ in range(50)]
    cuts = [0, 7, 7, 31, 50]  # one empty chunk
    chunked = pa.chunked_array([P.binary_array(np.array(values[a:b] + [b""], dtype=object)[:-1])
                                for a, b in zip(cuts[:-1], cuts[1:], strict=True)], pa.large_binary())  # fmt: skip
    idx = rng.integers(0, len(values), 80)  # repeats, any order
    got = P.take_rows(chunked, idx)
    assert got.to_pylist() == [values[i] for i in idx]
    assert P.take_rows(chunked, np.zeros(0, np.intp)).to_pylist() == []


def features(centerlines: bool = False) -> service.FeatureSet:
    parts = []
    for seed, label in ((1, "a"), (2, "b")):
        values = blobs(64, 64, seed=seed)
        comps = P.polygonize(values, 0.3, 4, TRANSFORM, block_shape=(16, 16), centerlines=centerlines)
        parts.append((label, np.datetime64("2020-01-01"), P.Rows.of(P.finish(comps, P.Finish(UTM, UTM)))))
    return service.feature_set(parts, UTM, stats=True, centerlines=centerlines)


def test_feature_set_keeps_one_copy_of_the_wkb() -> None:
    """Concatenating the blocks' rows shares their buffers: the driver holds the output once."""
    fs = features()
    a = P.Rows.of(P.finish(P.polygonize(blobs(32, 32, seed=4), 0.3, 4, TRANSFORM), P.Finish(UTM, UTM)))
    both = P.Rows.concat([a, a])
    data = [c.buffers()[2].address for c in both.wkb_array.chunks]
    assert data == [a.wkb_array.chunk(0).buffers()[2].address] * 2
    assert fs.num_rows > 20


@pytest.mark.parametrize("centerlines", [False, True])
def test_row_groups_written_one_by_one_equal_the_whole_sorted_table(
    tmp_path: Path, centerlines: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    fs = features(centerlines)
    whole = fs.table()
    # The whole table is the rows in Hilbert order of their boxes.
    order = service.hilbert_order(fs.rows.bbox)
    assert whole.column("geometry").to_pylist() == fs.rows.wkb[order].tolist()
    groups = list(fs.row_groups(size=7))
    assert [g.num_rows for g in groups[:-1]] == [7] * (len(groups) - 1) and 0 < groups[-1].num_rows <= 7
    assert pa.concat_tables(groups).equals(whole, check_metadata=True)
    monkeypatch.setattr(service, "ROW_GROUP_ROWS", 7)
    path = str(tmp_path / "f.parquet")
    service._to_parquet(fs, path)
    assert pq.ParquetFile(path).num_row_groups == len(groups)
    back = pq.read_table(path)  # Parquet stores the seconds as milliseconds
    assert back.cast(whole.schema).equals(whole) and back.schema.metadata[b"geo"] == whole.schema.metadata[b"geo"]


def test_an_empty_feature_set_writes_the_schema_and_one_empty_row_group(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    fs = service.feature_set([("a", np.datetime64("2020-01-01"), P.Rows.concat([]))], UTM, stats=False)
    path = str(tmp_path / "e.parquet")
    service._to_parquet(fs, path)
    assert pq.ParquetFile(path).num_row_groups == 1
    back, want = pq.read_table(path), fs.table()
    assert back.cast(want.schema).equals(want) and want.num_rows == 0
    assert back.schema.metadata[b"geo"] == want.schema.metadata[b"geo"]


def test_a_row_group_gathered_in_batches_is_written_as_one_array(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row group's column gathered in batches gives the file of one array, byte for byte."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    n = 5000
    blocks = []
    for start in range(0, n, 900):  # rows arrive in blocks of 900
        k = min(900, n - start)
        wkb = np.array([rng.bytes(int(s)) for s in rng.integers(20, 400, k)] + [b""], dtype=object)[:-1]
        moments = P.Moments(rng.integers(1, 50, k), *(rng.random(k) for _ in range(4)))
        blocks.append(P.Rows(P.pa.chunked_array([P.binary_array(wkb)]), np.sort(rng.random((k, 4)), axis=1),
                             np.full(k, 3, np.int8), moments, rng.random(k),
                             P.pa.chunked_array([P.binary_array(np.full(k, None, dtype=object))]),
                             np.full(k, -1, np.int8)))  # fmt: skip
    fs = service.feature_set([("a", np.datetime64("2020-01-01"), P.Rows.concat(blocks))], UTM, stats=True)
    monkeypatch.setattr(service, "GATHER_ROWS", 1024)
    batched = fs.table()
    assert batched.column("geometry").num_chunks == 5
    one = str(tmp_path / "one.parquet")
    pq.write_table(batched.combine_chunks(), one, compression="zstd")
    written = str(tmp_path / "batched.parquet")
    service._to_parquet(fs, written)
    assert Path(written).read_bytes() == Path(one).read_bytes()


def test_merged_rows_pickle_in_band() -> None:
    """A merge task's Rows come back to the driver copied, not as views pinning Ray's store."""
    rows = block_output().final[0][0]
    buffers: list[pickle.PickleBuffer] = []
    back = pickle.loads(pickle.dumps(rows, protocol=5, buffer_callback=buffers.append))
    assert buffers == [] and len(rows) > 0
    assert (back.wkb == rows.wkb).all() and np.array_equal(back.bbox, rows.bbox)
    assert np.array_equal(back.moments.mean, rows.moments.mean) and back.centerline.tolist() == rows.centerline.tolist()


@pytest.mark.parametrize("centerlines", [False, True])
def test_packed_rows_write_the_same_table(centerlines: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows held compressed (as the driver holds every block's) gather into the same table."""
    monkeypatch.setattr(service, "GATHER_ROWS", 16)  # batches across chunks
    parts = []
    for seed, label in ((1, "a"), (2, "b")):
        values = blobs(64, 64, seed=seed)
        comps = P.polygonize(values, 0.3, 4, TRANSFORM, block_shape=(16, 16), centerlines=centerlines)
        rows = P.Rows.of(P.finish(comps, P.Finish(UTM, UTM)))
        half = len(rows) // 2
        blocks = [rows.take(np.arange(half)), rows.take(np.arange(half, len(rows)))]
        parts.append((label, np.datetime64("2020-01-01"), blocks))
    plain = service.feature_set([(lb, t, P.Rows.concat(r)) for lb, t, r in parts], UTM, True, centerlines)
    packed_rows = [(lb, t, P.Rows.concat([r[0].packed(), r[1]])) for lb, t, r in parts]  # packed and not, mixed
    packed = service.feature_set(packed_rows, UTM, True, centerlines)
    assert isinstance(packed.rows.wkb_array, P.PackedChunks)
    assert sum(len(c.buffers[2][0]) for c in packed.rows.wkb_array.chunks) < 0.5 * plain.rows.wkb_array.nbytes
    assert packed.table().equals(plain.table(), check_metadata=True)
    assert (packed.rows.wkb == plain.rows.wkb).all()
    back = pickle.loads(pickle.dumps(packed.rows))
    assert (back.wkb == plain.rows.wkb).all() and back.centerline.tolist() == plain.rows.centerline.tolist()
