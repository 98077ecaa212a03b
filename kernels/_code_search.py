"""The order in which the GPU kernels keep an 8-bit map's 255 midpoints for the code search.

The code of x is q = #{i : x > t_i} over the sorted midpoints t_0 < … < t_254, found in 8 steps
that each halve the range of codes: the nodes of a complete binary tree. The GPU kernels keep the
midpoints in shared memory in the tree's breadth-first (Eytzinger) order: node k = 1 … 255, with
children 2k and 2k + 1, at level l = ⌊log₂ k⌋, holds t_{q + s − 1} where s = 128 / 2^l and
q = (k − 2^l) · 2s is the first code of its subtree. The search is k ← 2k + [x > node k], eight
times from k = 1, and then q = k − 256: the same comparisons as the sorted search, so the same
code.

Why: the 32 lanes of a warp search at the same level together. In sorted order the nodes of a
level lie 2s words apart, so at s = 32 the four nodes t_31, t_95, t_159, t_223 share one of
shared memory's 32 banks, and from level 3 on eight nodes share each bank they use: up to 8-way
bank conflicts, which the warp's reads pay in turn. In breadth-first order a level's nodes are
2^l consecutive words: no conflict at levels 0–5, at most 2 and 4 ways at levels 6 and 7.
"""

from __future__ import annotations

import numpy as np

__all__ = ["search_order"]


def search_order() -> np.ndarray:
    """order[k] = the index i of the midpoint t_i that node k holds (k = 1 … 255); order[0] = 255,
    the +Inf after the midpoints, which the search never reads."""
    order = np.empty(256, dtype=np.int64)
    order[0] = 255
    for k in range(1, 256):
        level = k.bit_length() - 1
        step = 128 >> level
        order[k] = (k - (1 << level)) * 2 * step + step - 1
    return order
