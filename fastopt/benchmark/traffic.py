"""Compulsory bytes per element of every benchmarked kernel.

The rule: each input is read once per pass over memory and each output written once; b is the
dtype's size (4 for float32). Per-channel vectors and scalars are negligible and not counted. These
are the fewest bytes any implementation of the same passes can move, so "achieved GB/s" = bytes /
time is a lower bound on the traffic, and "% of bandwidth" compares it with the in-place STREAM
kernel (``a[i] += s·b[i]``, 3b, ``timing.stream_in_place``) measured in the same run.

| kernel | passes | reads | writes | bytes per element |
|---|---|---|---|---|
| optimizer step, k state arrays | 1 | θ, g, k states | θ, k states (in place) | (3 + 2k)·b |
| SGD | 1 | θ, g | θ | 3b = 12 |
| SGD momentum/Nesterov, AdaGrad, RMSProp | 1 | θ, g, 1 state | θ, 1 state | 5b = 20 |
| RMSProp centered or momentum, AdaDelta, Adam/AdamW, delta-bar-delta | 1 | θ, g, 2 states | θ, 2 states | 7b = 28 |
| RMSProp centered + momentum, Adam/AdamW amsgrad | 1 | θ, g, 3 states | θ, 3 states | 9b = 36 |
| training step: clip-by-global-norm + AdamW + EMA | 2 | g (norm); θ, g, m, v, θ̂ | θ, m, v, θ̂ | 10b = 40 |
| Adam, float32 θ and g, 8-bit m and v (blocks of 256) | 1 | θ, g, 2 codes, 2 absmax/256 | θ, 2 codes, 2 absmax/256 | 4+4+2 + 4+2 + 2·2·4/256 = 16.0625 |
| Adam, bfloat16 θ and g, float32 master and state | 1 | g, master, m, v | θ, master, m, v | 2+4+8 + 2+4+8 = 28 |
| Adam, bfloat16 θ and g, no master (rounded θ) | 1 | θ, g, m, v | θ, m, v | 2+2+8 + 2+8 = 22 |
| batch norm forward, training | 2 | x (statistics); x (normalize) | y | 3b = 12 (+b) |
| batch norm forward, eval | 1 | x | y | 2b = 8 (+b) |
| batch norm backward, training | 2 | dy, x (reductions); dy, x (elementwise) | dx | 5b = 20 (+b) |

Optimizer steps update in place: every byte written was just read, so nothing moves that is not
counted. Batch norm writes ``y`` (``dx``) out of place: with ordinary stores the CPU first reads
each output cache line (write-allocate), so the memory moves b more per element than counted
("(+b)") unless the kernel writes with streaming (non-temporal) stores. The % of bandwidth of those
rows is therefore capped at 3/4 (forward-train), 2/3 (eval) and 5/6 (backward) with ordinary stores.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Traffic", "batchnorm", "eight_bit_optimizer", "low_precision_optimizer", "optimizer", "stream",
           "training_step", "BATCHNORM_PASSES"]


@dataclass(frozen=True)
class Traffic:
    """Compulsory traffic of one kernel: bytes per element and the formula that gives them."""

    bytes_per_element: float  # an int, but for 8-bit state's absmax (4 bytes per block)
    formula: str
    write_allocate: bool = False  # an out-of-place output: ordinary stores read it first (+itemsize)

    def bytes(self, elements: int) -> int:
        return self.bytes_per_element * elements


def stream(itemsize: int) -> Traffic:
    return Traffic(3 * itemsize, f"a[i] += s·b[i]: read a, b; write a (in place) = 3 × {itemsize} = {3 * itemsize} B")


def optimizer(state_arrays: int, itemsize: int) -> Traffic:
    """An in-place optimizer step with ``state_arrays`` state arrays of the parameter's size."""
    k = state_arrays
    reads = 2 + k
    writes = 1 + k
    return Traffic((reads + writes) * itemsize,
                   f"read θ, g + {k} state; write θ + {k} state (in place) = (3 + 2·{k}) × {itemsize} "
                   f"= {(reads + writes) * itemsize} B")


def eight_bit_optimizer(states: int, block: int) -> Traffic:
    """An in-place step over float32 θ and g with ``states`` 8-bit states (codes, and one float32
    absmax per ``block`` elements, each read and written)."""
    k = states
    total = 4 + 4 + k + 4 + k + 2 * k * 4 / block
    return Traffic(total, f"read θ, g (4 B each) + {k} codes (1 B) + absmax; write θ + {k} codes + absmax "
                          f"= 12 + 2·{k} + 2·{k}·4/{block} = {total:g} B")


def low_precision_optimizer(states: int, grad_size: int, master: bool) -> Traffic:
    """An in-place step over 16-bit θ with float32 state; with a float32 master copy θ is only
    written (the update reads the copy)."""
    k = states
    if master:
        total = grad_size + 4 + 4 * k + 2 + 4 + 4 * k
        return Traffic(total, f"read g ({grad_size} B), master (4 B) + {k} float32 state; write θ (2 B), master + "
                              f"{k} state = {total} B")
    total = 2 + grad_size + 4 * k + 2 + 4 * k
    return Traffic(total, f"read θ (2 B), g ({grad_size} B) + {k} float32 state; write θ + {k} state = {total} B")


def training_step(state_arrays: int, itemsize: int) -> Traffic:
    """Clip by global norm (a pass reading g) then a fused update with ``state_arrays`` arrays (the
    optimizer's and the EMA copy θ̂), in place."""
    k = state_arrays
    return Traffic((1 + 3 + 2 * k) * itemsize,
                   f"norm: read g; update: read θ, g + {k} state (m, v, θ̂), write θ + {k} state "
                   f"(in place) = (1 + 3 + 2·{k}) × {itemsize} = {(1 + 3 + 2 * k) * itemsize} B")


BATCHNORM_PASSES = {
    # pass: (multiple of the itemsize, formula, writes out of place)
    "forward-train": (3, "statistics: read x; normalize: read x, write y", True),
    "forward-eval": (2, "normalize: read x, write y", True),
    "backward-train": (5, "reductions: read dy, x; elementwise: read dy, x, write dx", True),
}


def batchnorm(pass_name: str, itemsize: int) -> Traffic:
    multiple, formula, out_of_place = BATCHNORM_PASSES[pass_name]
    note = f" = {multiple} × {itemsize} = {multiple * itemsize} B"
    if out_of_place:
        note += f" (+{itemsize} write-allocate read of the output with ordinary stores)"
    return Traffic(multiple * itemsize, formula + note, write_allocate=out_of_place)
