"""Tensor lists: one kernel launch over many device arrays of one dtype.

numba-cuda kernels cannot take a list of arrays, so a tensor-list kernel takes a *table*, an int64
device array with one row per (non-empty) tensor:

    table[t] = (n, first_chunk, address₀, address₁, …)

n is the tensor's element count, its elements form the chunks first_chunk … first_chunk +
⌈n / CHUNK⌉ − 1 of the launch, and the addresses are the device addresses of the tensor's arrays
(θ, g, the state arrays the configuration uses, the Polyak average; 0 where a tensor has no
average). Inside a kernel ``view(address, n, like)`` turns an address back into a 1-D array of
``like``'s dtype (an ``inttoptr`` intrinsic; under the simulator, a NumPy view of host memory).
Blocks stride over chunks; a block finds its chunk's tensor by binary search over ``first_chunk``
(``find``), then its threads stride over the chunk's elements. So the launch is balanced by
elements, whatever the mix of tensor sizes, and each step is one launch per (dtype, configuration).

The table is built on the host and copied to the device asynchronously on the launch stream (from
pageable memory: CUDA stages the bytes and returns without waiting for the device). Tables are
cached by their contents (the addresses and sizes) and stream, so a training loop that steps the
same tensors every iteration uploads its table once; ``TABLE_CACHE`` tables are kept (least
recently used dropped; freeing a dropped table's device memory is the one place where CUDA may
wait for the device, once per table).

Limits: the arrays of one call share a dtype and are C-contiguous, each tensor's arrays have its
parameter's size; the kernel holds raw addresses, not references, so the arrays must stay alive
until the kernel has run (the caller holds them, and frees of CUDA memory wait for running
kernels); arrays of different tensors must not overlap (tensors are updated in parallel).
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict

import numpy as np
from numba import cuda, types

from ._arrays import stream_key
from ._jit import SIMULATOR

__all__ = ["CHUNK", "TABLE_CACHE", "find", "table", "view"]

CHUNK = 24 if SIMULATOR else 1 << 16  # elements per chunk (small under the simulator: many chunks)
TABLE_CACHE = 64
N, FIRST_CHUNK, ADDRESSES = 0, 1, 2  # table columns


if SIMULATOR:
    _CTYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}

    def view(address, n, like):
        """A NumPy view of ``n`` elements of ``like``'s dtype at host ``address`` (simulator)."""
        pointer = ctypes.cast(int(address), ctypes.POINTER(_CTYPES[np.dtype(like.dtype)]))
        return np.ctypeslib.as_array(pointer, shape=(int(n),))

else:
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic
    from numba.cuda.np.arrayobj import get_itemsize, make_array, populate_array

    @intrinsic
    def view(typingctx, address, n, like):
        """A 1-D C-contiguous array of ``like``'s dtype over ``n`` elements at device ``address``
        (an int64), not memory-managed."""
        if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
            return None
        array_type = types.Array(like.dtype, 1, "C")

        def codegen(context, builder, signature, args):
            address, n, _ = args
            array = make_array(array_type)(context, builder)
            itemsize = cgutils.intp_t(get_itemsize(context, array_type))
            data = builder.inttoptr(address, context.get_data_type(array_type.dtype).as_pointer())
            n = context.cast(builder, n, signature.args[1], types.intp)
            populate_array(array, data=data, shape=[n], strides=[itemsize], itemsize=itemsize,
                           meminfo=None)
            return array._getvalue()

        return array_type(address, n, like), codegen


@cuda.jit(device=True)
def find(table, chunk):
    """The row t of the tensor holding ``chunk``: the last t with table[t, FIRST_CHUNK] <= chunk."""
    lo = 0
    hi = table.shape[0] - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if table[mid, 1] <= chunk:
            lo = mid
        else:
            hi = mid - 1
    return lo


_cache: OrderedDict = OrderedDict()


def table(rows, stream):
    """The device table for ``rows`` = [(n, address₀, address₁, …), …] (tensors with n = 0
    dropped) and the number of chunks; None when no tensor has elements."""
    kept = tuple(row for row in rows if row[0] > 0)
    if not kept:
        return None, 0
    key = (stream_key(stream), kept)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit[0], hit[1]
    host = np.empty((len(kept), 2 + len(kept[0]) - 1), np.int64)
    chunks = 0
    for t, row in enumerate(kept):
        host[t, N] = row[0]
        host[t, FIRST_CHUNK] = chunks
        host[t, ADDRESSES:] = row[1:]
        chunks += -(-row[0] // CHUNK)
    device = cuda.to_device(host, stream=stream) if stream else cuda.to_device(host)
    _cache[key] = (device, chunks, host)  # the host copy stays alive until the async copy is done
    while len(_cache) > TABLE_CACHE:
        _cache.popitem(last=False)
    return device, chunks
