"""``fastopt.distributed.partition.aligned``: the cut points of sharded 8-bit state."""

from __future__ import annotations

import numpy as np
import pytest

from fastopt.distributed import partition


@pytest.mark.parametrize("sizes", [[1000, 5000, 10, 3000], [0, 300, 0, 0, 257, 1], [5], [256, 256, 256]])
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_aligned_cuts_start_every_piece_on_a_block_of_its_parameter(sizes, world):
    block = 256
    offsets = partition.offsets_of(sizes)
    total = int(offsets[-1])
    cuts = partition.aligned(partition.rank_bounds(total, world), offsets, block)
    assert cuts[0] == 0 and cuts[-1] == total and (np.diff(cuts) >= 0).all()
    assert (partition.rank_bounds(total, world) - cuts < block).all()
    for bucket_elems in (1, 100, 256, 1000):
        bounds = partition.aligned_buckets(partition.bucket_bounds(total, bucket_elems), offsets, block)
        assert [lo for lo, _ in bounds[1:]] == [hi for _, hi in bounds[:-1]] and all(hi > lo for lo, hi in bounds)
        assert not bounds or (bounds[0][0] == 0 and bounds[-1][1] == total)
        for lo, hi in bounds:
            for r in range(world):
                for piece in partition.pieces_in(offsets, max(lo, cuts[r]), min(hi, cuts[r + 1])):
                    assert piece.start % block == 0, (piece, lo, hi, cuts)
                    assert piece.stop % block == 0 or piece.stop == sizes[piece.param], piece


def test_aligned_leaves_parameter_starts_and_the_end_where_they_are():
    offsets = partition.offsets_of([300, 10, 600])
    np.testing.assert_array_equal(partition.aligned([0, 300, 310, 909, 910], offsets, 256), [0, 300, 310, 822, 910])
    np.testing.assert_array_equal(partition.aligned([299, 301, 567], offsets, 256), [256, 300, 566])
