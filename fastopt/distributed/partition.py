"""Who owns which elements: a pure function of (parameter sizes, world size), and how the buckets
the collectives run in cut across that ownership.

The parameters of one dtype, in the optimizer's order, form one flat index space [0, T): parameter
k occupies [o_k, o_k + n_k) with o_k = n_0 + … + n_(k−1) (its elements in C order). Rank r of N
owns one contiguous 1/N of the whole space,

    range(r) = [c_r, c_(r+1)),   c_r = ⌊T·r/N⌋,

so it owns ⌊T/N⌋ or ⌈T/N⌉ elements, whatever the bucket size. A range may cut a parameter
anywhere: a tensor may straddle two (or more) ranks. Any rank can compute any other rank's range
(checkpoints record N and where each piece sits).

The collectives run in buckets of at most E elements, [b_j, b_(j+1)) with b_j = j·E. A bucket
covers parts of one or several ranks' ranges: rank r's part of bucket j is

    part(j, r) = [clip(c_r), clip(c_(r+1))),   clip(x) = min(max(x, b_j), b_(j+1)),

possibly empty. The parts of a bucket are contiguous and in rank order, so one reduce-scatter
with per-rank counts |part(j, r)| (``Ireduce_scatter(send, recv, counts)``) gives each rank the
sum over ranks of its part, and one allgather with counts and displacements (``Iallgatherv``)
returns every rank's updated part; empty parts are counts of 0. Rank r's parts of consecutive
buckets are consecutive pieces of its range: bucket j's part lands at clip(c_r) − c_r of the
rank's receive buffer.

``Piece`` is the intersection of one parameter with one part: the unit the fused update runs on.

8-bit state (quantization blocks of B = 256 elements, counted from each parameter's first element)
must not be cut: a piece of a parameter has to start on a block boundary of that parameter. Then
every cut point x (rank cut or bucket bound) is moved down to one,

    aligned(x) = o_k + B·⌊(x − o_k)/B⌋   for the parameter k with o_k ≤ x < o_k + n_k   (x = T: T),

which keeps the cuts in order (it is monotone), moves each by less than B, and leaves a cut on a
parameter's first element where it is. A rank then owns ⌊T/N⌋ ± B elements, and a bucket up to
E + B − 1 (buckets that become empty are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Piece", "aligned", "aligned_buckets", "bucket_bounds", "bucket_parts", "offsets_of", "pieces_in", "rank_bounds"]


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


def rank_bounds(total: int, world_size: int) -> np.ndarray:
    """The N + 1 cut points c_r = ⌊T·r/N⌋ of the space: rank r owns [c_r, c_(r+1))."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return (total * np.arange(world_size + 1, dtype=np.int64)) // world_size


def aligned(cuts, offsets: np.ndarray, block: int) -> np.ndarray:
    """``cuts`` (ascending positions in [0, T]) moved down to block boundaries of the parameters
    they fall in (module docstring), as int64."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    cuts = np.asarray(cuts, np.int64)
    owner = np.searchsorted(offsets, cuts, side="right") - 1  # o_owner <= x < o_(owner+1)
    owner = np.clip(owner, 0, len(offsets) - 1)
    first = offsets[owner]
    return first + (cuts - first) // block * block


def aligned_buckets(bounds: list[tuple[int, int]], offsets: np.ndarray, block: int) -> list[tuple[int, int]]:
    """``bucket_bounds`` with every bound ``aligned``, empty buckets dropped."""
    if not bounds:
        return []
    edges = aligned([lo for lo, _ in bounds] + [bounds[-1][1]], offsets, block)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def bucket_parts(lo: int, hi: int, cuts: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(counts, displs) of bucket [lo, hi) among the ranks whose cut points are ``cuts``: rank r's
    part is [lo + displs[r], lo + displs[r] + counts[r]) (counts[r] = 0 when its range misses the
    bucket), the recvcounts and displacements of the bucket's collectives."""
    clipped = np.clip(cuts, lo, hi)
    counts = tuple(int(c) for c in np.diff(clipped))
    displs = tuple(int(d) for d in clipped[:-1] - lo)
    return counts, displs


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
