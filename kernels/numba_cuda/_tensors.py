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
cached by their contents (the addresses and sizes) alone, under a lock, and shared by every host
thread and stream: a table uploaded on one stream is used on another only after that stream has
waited on the event recorded after the upload (once per stream; the per-thread default stream
counts once per thread). So a training loop that steps the same tensors every iteration uploads its
table once. ``TABLE_CACHE`` tables are kept (least recently used dropped, except tables a captured
CUDA graph uses; freeing a dropped table's device memory is the one place where CUDA may wait for
the device, once per table). Under ``torch.cuda.graph`` capture nothing is uploaded: the table must
exist from a step before the capture (``table`` raises otherwise).

Limits: the arrays of one call share a dtype and are C-contiguous, each tensor's arrays have its
parameter's size; the kernel holds raw addresses, not references, so the arrays must stay alive
until the kernel has run (the caller holds them, and frees of CUDA memory wait for running
kernels); arrays of different tensors must not overlap (tensors are updated in parallel).
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict

import numpy as np
from numba import cuda, types

from ._arrays import is_capturing, new_event, stream_key
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


class _Table:
    """One uploaded table: the device array, its chunk count, the host copy (kept alive until the
    asynchronous copy has read it), the event recorded after the upload, the streams known to be
    ordered after that event, and whether a captured CUDA graph holds its address."""

    __slots__ = ("device", "chunks", "host", "uploaded", "ready", "pinned")

    def __init__(self, device, chunks, host, uploaded, stream_key):
        self.device = device
        self.chunks = chunks
        self.host = host
        self.uploaded = uploaded
        self.ready = {stream_key}
        self.pinned = False


_cache: OrderedDict = OrderedDict()
_lock = threading.Lock()  # tables are shared by every host thread and stream


def _upload(host, stream):
    """Copy the host table to the device on ``stream`` (asynchronous) and record an event after it."""
    device = cuda.to_device(host, stream=stream)
    uploaded = new_event()
    uploaded.record(stream=stream)
    return device, uploaded


def _rows_table(kept):
    """The host table of the rows ``kept`` and its chunk count."""
    host = np.empty((len(kept), 2 + len(kept[0]) - 1), np.int64)
    chunks = 0
    for t, row in enumerate(kept):
        host[t, N] = row[0]
        host[t, FIRST_CHUNK] = chunks
        host[t, ADDRESSES:] = row[1:]
        chunks += -(-row[0] // CHUNK)
    return host, chunks


def table(rows, stream):
    """The device table for ``rows`` = [(n, address₀, address₁, …), …] (tensors with n = 0
    dropped) and the number of chunks, ready for kernels on ``stream``; None when no tensor has
    elements.

    Tables are cached by their rows alone and shared between streams and host threads (under a
    lock). A table is uploaded on the stream that first needs it, with an event recorded after the
    copy; a kernel on another stream (or on the per-thread default stream of another thread) first
    makes its stream wait on that event, once per stream. While torch captures a CUDA graph
    nothing can be uploaded or waited on: the table must exist from an earlier step (the warm-up
    torch's graph capture needs anyway; ``torch.cuda.graph`` synchronizes the device before it
    captures, so the upload has finished), and a table a graph has used is never dropped.
    """
    kept = tuple(row for row in rows if row[0] > 0)
    if not kept:
        return None, 0
    key = stream_key(stream)
    capturing = is_capturing(stream)
    with _lock:
        entry = _cache.get(kept)
        if entry is None:
            if capturing:
                raise RuntimeError(
                    "numba-cuda: a tensor list was first seen while torch captures a CUDA graph; the "
                    "list's table must be uploaded before the capture: run the same step once "
                    "before capturing (the warm-up torch.cuda.graph requires anyway)")
            host, chunks = _rows_table(kept)
            device, uploaded = _upload(host, stream)
            entry = _cache[kept] = _Table(device, chunks, host, uploaded, key)
            _evict()
        else:
            _cache.move_to_end(kept)
            if key not in entry.ready:
                if not capturing:
                    entry.uploaded.wait(stream=stream)
                    entry.ready.add(key)
            if capturing:
                entry.pinned = True
        return entry.device, entry.chunks


def _evict() -> None:
    """Drop least recently used tables beyond ``TABLE_CACHE`` (never one a captured graph uses)."""
    unpinned = [k for k, entry in _cache.items() if not entry.pinned]
    for k in unpinned[:max(0, len(unpinned) - TABLE_CACHE)]:
        del _cache[k]
