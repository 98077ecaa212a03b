"""Who owns which elements: a pure function of (parameter sizes, world size, bucket size).

The parameters of one dtype, in the optimizer's order, form one flat index space [0, T): parameter
k occupies [o_k, o_k + n_k) with o_k = n_0 + … + n_(k−1) (its elements in C order). That space is
cut into buckets of at most E elements, [b_j, b_(j+1)) with b_j = j·E, and each bucket is split
among the N ranks into contiguous slices

    slice(j, r) = [b_j + ⌊L_j·r/N⌋, b_j + ⌊L_j·(r+1)/N⌋),   L_j = b_(j+1) − b_j,

so rank r owns ⌊L_j/N⌋ or ⌈L_j/N⌉ elements of every bucket: T/N in all, to within one element per
bucket. With one bucket (T ≤ E, the default for models below 25 MB) rank r owns one contiguous
1/N of the space. A slice may cut a parameter anywhere: a tensor may straddle two ranks (and two
buckets). Any rank can compute any other rank's slices (checkpoints record only N and E).

``Piece`` is the intersection of one parameter with one slice: the unit the fused update runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Piece", "bucket_bounds", "offsets_of", "pieces_in", "slice_bounds"]


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of parameter ``param`` (flat, C order), at ``flat`` in the space."""

    param: int
    start: int
    stop: int
    flat: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def offsets_of(sizes) -> np.ndarray:
    """o_k for every parameter and o_len = T, as int64."""
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(np.asarray(sizes, np.int64), out=offsets[1:])
    return offsets


def bucket_bounds(total: int, bucket_elems: int) -> list[tuple[int, int]]:
    """[(b_j, b_(j+1))]: the buckets of a space of ``total`` elements (none when it is empty)."""
    if bucket_elems < 1:
        raise ValueError(f"bucket_elems must be >= 1, got {bucket_elems}")
    return [(lo, min(lo + bucket_elems, total)) for lo in range(0, total, bucket_elems)]


def slice_bounds(lo: int, hi: int, world_size: int) -> np.ndarray:
    """The N + 1 cut points of bucket [lo, hi): rank r owns [cuts[r], cuts[r + 1])."""
    length = hi - lo
    return lo + (length * np.arange(world_size + 1, dtype=np.int64)) // world_size


def pieces_in(offsets: np.ndarray, lo: int, hi: int) -> list[Piece]:
    """The parameters' parts inside [lo, hi), in order (empty parameters contribute nothing)."""
    out = []
    if hi <= lo:
        return out
    first = int(np.searchsorted(offsets, lo, side="right")) - 1
    for k in range(max(first, 0), len(offsets) - 1):
        p_lo, p_hi = int(offsets[k]), int(offsets[k + 1])
        if p_lo >= hi:
            break
        a, b = max(lo, p_lo), min(hi, p_hi)
        if b > a:
            out.append(Piece(k, a - p_lo, b - p_lo, a))
    return out
