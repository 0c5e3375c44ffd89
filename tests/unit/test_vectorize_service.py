"""The Vectorization job's driver-side pieces: what block results cost the driver."""

from __future__ import annotations

import pickle

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
def test_binary_column_equals_pa_array(values: list[bytes | None]) -> None:
    array = np.array(values, dtype=object)
    column = service.binary_column(array)
    assert column.equals(pa.array(array, pa.binary()))
