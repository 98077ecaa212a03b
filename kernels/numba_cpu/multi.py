"""Tensor lists: one kernel call over many arrays of one dtype.

Every optimizer kernel, reduction and scaling pass of this backend runs over a *table* of tensors
rather than over one array, so ``multi_step`` over 200 parameters is one parallel launch:

    table[t] = (θ, g, θ̂, s₀, s₁, s₂)    data addresses (int64) of tensor t's arrays, 0 when unused
    offsets[t] = n₀ + … + n₍t−1₎         int64, offsets[len] = N, the total element count

The N elements of the list form one flat index space, cut into ``parts`` contiguous ranges of
equal element count (``part_range``, ``parts_for``); a range may cover the end of one tensor,
several whole tensors and the start of another (``next_span`` walks it). So a list of many small
tensors and a single large tensor load-balance the same way (by elements, not by tensor), and
each thread streams contiguous blocks of every tensor it touches with a simple inner loop. Inside
a kernel an address becomes a typed pointer (``pointer``, an ``inttoptr``); the inner loops index
it like an array.

Building the table (``gather``) is the host overhead of a step, so it is done by a compiled
function that reads the CPython list and tuple objects and NumPy's array structs directly
(``id(obj)`` is the object's address in CPython): a few nanoseconds per array, against about 1 µs
per array for ``a.__array_interface__['data'][0]`` or ``a.ctypes.data`` in Python. The field offsets
come from the interpreter (``object.__basicsize__``, ``tuple.__basicsize__``) and NumPy's public
``PyArrayObject_fields`` / ``PyArray_Descr`` layouts, and are checked against Python-level
attributes of probe objects at import; if any check fails (another interpreter, another layout),
or an array is not exactly a C-contiguous ``numpy.ndarray`` of the expected dtype, native byte
order and size (writeable where written), the table is built in Python instead (``_gather_python``,
which raises ``ValueError`` for invalid arrays). The compiled reader holds the GIL.

The same reader gives the optimizers their per-step test of the gradients (``grads_match``: each
gradient a plain C-contiguous ndarray alike its parameter, its bytes outside the parameters' and
state's sorted intervals), a few nanoseconds per gradient instead of about 0.3 µs in Python.

Limits: one dtype per call; every array C-contiguous; θ, θ̂ and the state arrays writeable; within
a tensor all arrays have θ's number of elements; the lists (and the arrays in them) must stay
alive and unmodified until the call returns: the kernels hold raw addresses, not references.
Arrays of different tensors must not overlap (the kernels run the tensors in parallel).
"""

from __future__ import annotations

import ctypes
import sys
import threading

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cache import has_cached_code, njit as cached_njit

__all__ = ["COLUMNS", "aligned_split", "array_at", "data_address", "float64_at", "gather", "grads_match", "itemsize",
           "larger", "last_at_most", "next_span", "part_range", "parts_for", "parts_on_host", "pointer",
           "readers_cached", "smaller", "tuple_at", "written_intervals", "SERIAL_BELOW"]

PARAM, GRAD, AVG, STATE = 0, 1, 2, 3  # table columns; states are STATE, STATE + 1, STATE + 2
COLUMNS = 6

# The flat element range is cut into parts of at least PART_MIN elements, at most PARTS_MAX of
# them; prange (static schedule) hands each thread a contiguous run of parts. The cut depends on
# the total element count only, never on the thread count, so reductions add in the same order on
# any number of threads (and an update never depends on the cut at all). A list of fewer than
# 2·PART_MIN elements is one part, run on the calling thread: no parallel region to open and join
# (which costs microseconds, and milliseconds when another process holds a core the team waits on).
PART_MIN = 8192
PARTS_MAX = 256
# Lists of fewer elements run a kernel's serial twin (``_jit``): the same parts, in order, on the
# calling thread. Measured for float32 Adam on the 2-core machine (medians of 300 steps, both
# threads free): 16,384 elements 10 µs serial against 13 µs parallel, 32,768 equal (16 µs),
# 65,536 31 against 25 µs; while another process keeps a core busy, a parallel region of a few
# parts can wait milliseconds for it.
SERIAL_BELOW = 4 * PART_MIN


# ---------------------------------------------------------------------------------------------
# Addresses inside kernels
# ---------------------------------------------------------------------------------------------


@intrinsic
def pointer(typingctx, address, like):
    """A pointer to ``like``'s type at the integer ``address`` (indexable: ``p[i]``, ``p[i] = x``)."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Float):
        return None
    signature = types.CPointer(like)(address, like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


def typed_pointer(numba_type):
    """An intrinsic ``f(address)``: a pointer to ``numba_type`` at the integer ``address`` (what
    ``pointer`` gives for a float type chosen by an argument, for a fixed type: codes, bit
    patterns, table rows)."""

    def at(typingctx, address):
        if not isinstance(address, types.Integer):
            return None
        signature = types.CPointer(numba_type)(address)

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

        return signature, codegen

    at.__name__ = at.__qualname__ = f"pointer_{numba_type}"  # (what numba's messages name it)
    return intrinsic(at)


# Views and tuples at addresses, written as intrinsics rather than with numba's ``carray`` and
# ``to_fixed_tuple``: those are overloads whose implementations numba compiles (not caches) in
# every process that compiles a kernel using them, once per signature: about 0.02 s each, six to
# ten of them on a part runner's first compile.


@intrinsic
def array_at(typingctx, data, shape):
    """The C-contiguous array of ``shape`` (an integer, or a tuple of them) whose elements start at
    the pointer ``data``: what ``numba.carray(data, shape)`` gives."""
    if not isinstance(data, types.CPointer):
        return None
    if isinstance(shape, types.Integer):
        dims = (shape,)
    elif isinstance(shape, types.BaseTuple) and len(shape) and all(isinstance(d, types.Integer) for d in shape):
        dims = tuple(shape)
    else:
        return None
    array_type = types.Array(data.dtype, len(dims), "C")

    def codegen(context, builder, sig, args):
        from numba.np.arrayobj import populate_array  # (loaded with numba's CPU target by now)

        values = [args[1]] if isinstance(shape, types.Integer) else cgutils.unpack_tuple(builder, args[1])
        extents = [context.cast(builder, v, t, types.intp) for v, t in zip(values, dims)]
        size = context.get_abi_sizeof(context.get_data_type(data.dtype))
        strides = [context.get_constant(types.intp, size)]
        for extent in reversed(extents[1:]):
            strides.insert(0, builder.mul(strides[0], extent))
        array = context.make_array(array_type)(context, builder)
        populate_array(array, data=args[0], shape=extents, strides=strides, itemsize=size, meminfo=None)
        return array._getvalue()

    return array_type(data, shape), codegen


@intrinsic
def tuple_at(typingctx, data, count):
    """The tuple of the ``count`` values (a compile-time constant) at the pointer ``data``: what
    ``to_fixed_tuple(numba.carray(data, count), count)`` gives."""
    if not isinstance(data, types.CPointer) or not isinstance(count, types.IntegerLiteral):
        return None
    tuple_type = types.UniTuple(data.dtype, count.literal_value)

    def codegen(context, builder, sig, args):
        items = [builder.load(builder.gep(args[0], [context.get_constant(types.intp, k)]))
                 for k in range(count.literal_value)]
        return context.make_tuple(builder, tuple_type, items)

    return tuple_type(data, count), codegen


@intrinsic
def float64_at(typingctx, data):
    """The pointer ``data`` (to any type) as a pointer to float64: a part runner whose scalars are
    float32 writing float64 results into a buffer the host views as float32."""
    if not isinstance(data, types.CPointer):
        return None
    signature = types.CPointer(types.float64)(data)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@intrinsic
def itemsize(typingctx, like):
    """The size in bytes of ``like``'s type, a compile-time constant."""
    if not isinstance(like, types.Float):
        return None

    def codegen(context, builder, sig, args):
        size = context.get_abi_sizeof(context.get_value_type(like))
        return context.get_constant(types.intp, size)

    return types.intp(like), codegen


@numba.njit(inline="always")
def smaller(a, b):
    """min(a, b) for two integers: the builtin is an overload that numba compiles (not caches) in
    every process that compiles a kernel using it. (For floats it would differ from the builtin
    where a or b is NaN.)"""
    return a if a < b else b


@numba.njit(inline="always")
def larger(a, b):
    """max(a, b) for two integers (see ``smaller``)."""
    return a if a > b else b


@numba.njit(inline="always")
def aligned_split(address, i0, i1, like):
    """The first index in [i0, i1] whose element of the array at ``address`` starts a 64-byte cache
    line (i1 if none does). Loops run [i0, split) then [split, i1), so the vector loop's loads and
    stores of that array (and of every array with the same offset from a line, as large NumPy
    arrays all have) do not straddle cache lines."""
    size = itemsize(like)
    return smaller(i1, i0 + ((-(address + i0 * size)) % 64) // size)


@numba.njit(inline="always")
def parts_for(total):
    """How many contiguous parts to cut ``total`` elements into (1 to PARTS_MAX)."""
    return larger(1, smaller(PARTS_MAX, total // PART_MIN))


def parts_on_host(total: int) -> int:
    """``parts_for`` in Python, for host code that sizes a buffer of per-part results (a jitted
    function called from Python compiles in every process)."""
    return max(1, min(PARTS_MAX, int(total) // PART_MIN))


@numba.njit(inline="always")
def part_range(part, parts, total):
    """Flat element range [lo, hi) of range ``part`` of ``parts`` over ``total`` elements."""
    return total * part // parts, total * (part + 1) // parts


@numba.njit(inline="always")
def last_at_most(sorted_values, value):
    """The last index i with ``sorted_values[i] <= value`` (−1 if none), by bisection: what
    ``np.searchsorted(sorted_values, value, side="right") - 1`` returns. (numba's searchsorted
    takes about 0.3 s to compile in every process that loads no cache; this loop a few ms.)"""
    lo = 0
    hi = sorted_values.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if sorted_values[mid] <= value:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@numba.njit(inline="always")
def next_span(offsets, t, lo, hi):
    """The piece of flat range [lo, hi) inside tensor t: (i0, i1) in t's own indices (maybe
    empty, for a 0-size tensor), and the flat position after it. Start with t the tensor holding
    lo: ``last_at_most(offsets, lo)``."""
    end = smaller(hi, offsets[t + 1])
    return lo - offsets[t], end - offsets[t], end


# ---------------------------------------------------------------------------------------------
# Building the table
# ---------------------------------------------------------------------------------------------

_HEAD = object.__basicsize__  # PyObject header; ob_type is its last field
_TYPE = _HEAD - 8
_SIZE = _HEAD  # PyVarObject.ob_size
_LIST_ITEMS = _HEAD + 8  # PyListObject.ob_item (PyObject **)
_TUPLE_ITEMS = tuple.__basicsize__  # PyTupleObject.ob_item[], inline
_DATA = _HEAD  # PyArrayObject_fields: data, nd, dimensions, strides, base, descr, flags
_ND = _HEAD + 8
_DIMS = _HEAD + 16
_DESCR = _HEAD + 40
_FLAGS = _HEAD + 48
_BYTEORDER = _HEAD + 10  # PyArray_Descr: typeobj, kind, type, byteorder, flags(1.x), type_num
_TYPE_NUM = _HEAD + 12
_C_CONTIGUOUS, _WRITEABLE = 0x0001, 0x0400
_NATIVE = ord("=")


@intrinsic
def _load_int64(typingctx, address):
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))
        return builder.load(ptr)

    return types.int64(address), codegen


@intrinsic
def _load_int32(typingctx, address):
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int32)))
        return context.cast(builder, builder.load(ptr), types.int32, types.int64)

    return types.int64(address), codegen


@intrinsic
def _load_int8(typingctx, address):
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int8)))
        return context.cast(builder, builder.load(ptr), types.int8, types.int64)

    return types.int64(address), codegen


@numba.njit(inline="always")
def _length(sequence, list_type, tuple_type):
    """len() of a list or tuple object, or −1 for any other object."""
    kind = _load_int64(sequence + _TYPE)
    if kind != list_type and kind != tuple_type:
        return -1
    return _load_int64(sequence + _SIZE)


@numba.njit(inline="always")
def _item(sequence, k, list_type, tuple_type):
    """Address of item k of a list or tuple object, or 0 (not a list or tuple, or too short)."""
    if k >= _length(sequence, list_type, tuple_type):
        return 0
    if _load_int64(sequence + _TYPE) == list_type:
        return _load_int64(_load_int64(sequence + _LIST_ITEMS) + 8 * k)
    return _load_int64(sequence + _TUPLE_ITEMS + 8 * k)


@numba.njit(inline="always")
def _array_data(array, size, written, ndarray_type, type_num):
    """Data address of an ndarray object, or 0 unless it is exactly a C-contiguous ndarray of
    ``type_num`` in native byte order with ``size`` elements (``size`` < 0: any), writeable when
    ``written``. Also returns its element count."""
    if array == 0 or _load_int64(array + _TYPE) != ndarray_type:
        return 0, 0
    flags = _load_int32(array + _FLAGS)
    descr = _load_int64(array + _DESCR)
    if (flags & _C_CONTIGUOUS) == 0 or (written and (flags & _WRITEABLE) == 0):
        return 0, 0
    if _load_int32(descr + _TYPE_NUM) != type_num or _load_int8(descr + _BYTEORDER) != _NATIVE:
        return 0, 0
    n = 1
    dims = _load_int64(array + _DIMS)
    for k in range(_load_int32(array + _ND)):
        n *= _load_int64(dims + 8 * k)
    if size >= 0 and n != size:
        return 0, 0
    return _load_int64(array + _DATA), n


_I64 = types.int64


class _Reader:
    """One of the compiled object readers below, under the house kernels' protocol (``_jit``: a
    declared signature, compiled or loaded from the disk cache at the first call or by
    ``compile()``, listed in ``KERNELS`` so ``fastopt compile`` fills the cache with it), with two
    differences: its one signature serves every dtype (no float argument), and it holds the GIL
    (it reads Python objects that another thread could change). Importing the backend compiles
    nothing, so a program that never steps an optimizer never pays the ~2 s these take.

    ``call`` is the function to call: the compiled dispatcher itself once compiled, so the hot
    path goes straight to it."""

    parallel = False
    dtypes = ("int64",)  # what ``_jit`` reports for a signature without a float argument

    def __init__(self, signature, py_func):
        self.py_func = py_func
        self.signatures = [signature]
        self.serial = self
        self.__name__ = py_func.__name__
        self.__doc__ = py_func.__doc__
        self._dispatcher = None
        self._lock = threading.Lock()
        self.call = self._first_call

    def compile(self, dtype=None) -> list:
        """Compile (or load from the cache) the one signature; returns [its dispatcher]."""
        if dtype is not None and np.dtype(dtype) != np.int64:
            return []
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = cached_njit(self.signatures)(self.py_func)
                self.call = self._dispatcher
        return [self._dispatcher]

    @property
    def dispatchers(self) -> dict:
        return {} if self._dispatcher is None else {"int64": self._dispatcher}

    def _first_call(self, *args):
        return self.compile()[0](*args)


def _reader(signature):
    return lambda py_func: _Reader(signature, py_func)


@_reader(types.Tuple((_I64[:, ::1], _I64[::1], types.boolean))(
    _I64, _I64, _I64, _I64, _I64, _I64, _I64, types.boolean, _I64, _I64, _I64, _I64))
def _gather_objects(params, grads, states, avgs, slot0, slot1, slot2, param_written, type_num,
                    ndarray_type, list_type, tuple_type):
    """The table and offsets from the addresses of the Python lists (0: list not given).

    ``slot0..2`` are the indices into each tensor's state tuple that feed columns STATE, STATE + 1,
    STATE + 2 (−1: unused); scalars rather than a tuple, which numba unboxes about 1 µs slower.
    Returns ok = False as soon as an object is not what the fast path handles.
    """
    slots = (slot0, slot1, slot2)
    n = larger(_length(params, list_type, tuple_type), 0)
    table = np.zeros((n, COLUMNS), np.int64)
    offsets = np.zeros(n + 1, np.int64)
    ok = _length(params, list_type, tuple_type) >= 0
    for t in range(n):
        data, size = _array_data(_item(params, t, list_type, tuple_type), -1, param_written,
                                 ndarray_type, type_num)
        ok = ok and data != 0
        table[t, PARAM] = data
        offsets[t + 1] = offsets[t] + size
        if grads != 0:
            data, _ = _array_data(_item(grads, t, list_type, tuple_type), size, False,
                                  ndarray_type, type_num)
            ok = ok and data != 0
            table[t, GRAD] = data
        if avgs != 0:
            data, _ = _array_data(_item(avgs, t, list_type, tuple_type), size, True,
                                  ndarray_type, type_num)
            ok = ok and data != 0
            table[t, AVG] = data
        if states != 0:
            state = _item(states, t, list_type, tuple_type)
            ok = ok and state != 0
            for j in range(3):
                if slots[j] >= 0 and state != 0:
                    data, _ = _array_data(_item(state, slots[j], list_type, tuple_type), size,
                                          True, ndarray_type, type_num)
                    ok = ok and data != 0
                    table[t, STATE + j] = data
        if not ok:
            break
    return table, offsets, ok


def _gather_python(params, grads, states, avgs, slots, param_written, dtype):
    """``_gather_objects`` written with Python attributes: any interpreter, ndarray subclasses;
    raises ValueError for an array the kernels cannot take."""
    n = len(params)
    table = np.zeros((n, COLUMNS), np.int64)
    offsets = np.zeros(n + 1, np.int64)
    for t in range(n):
        size = np.size(params[t])
        columns = [(PARAM, params[t], param_written, f"params[{t}]")]
        if grads is not None:
            columns.append((GRAD, grads[t], False, f"grads[{t}]"))
        if avgs is not None:
            columns.append((AVG, avgs[t], True, f"avgs[{t}]"))
        for j, slot in enumerate(slots):
            if slot >= 0:
                columns.append((STATE + j, states[t][slot], True, f"states[{t}][{slot}]"))
        for column, array, written, where in columns:
            if not isinstance(array, np.ndarray) or array.dtype != dtype:
                raise ValueError(f"{where} must be a numpy.ndarray of dtype {dtype}, got "
                                 f"{type(array).__name__} of dtype {getattr(array, 'dtype', None)}")
            if not array.flags.c_contiguous or (written and not array.flags.writeable):
                raise ValueError(f"{where} must be C-contiguous" + (" and writeable" if written else ""))
            if array.size != size:
                raise ValueError(f"{where} has {array.size} elements, params[{t}] has {size}")
            table[t, column] = array.__array_interface__["data"][0]
        offsets[t + 1] = offsets[t] + size
    return table, offsets


def _layout_checked() -> bool:
    """Whether the object offsets above are right here, checked on probe objects."""
    if sys.implementation.name != "cpython":
        return False
    try:
        read64 = lambda address: ctypes.c_int64.from_address(address).value  # noqa: E731
        read32 = lambda address: ctypes.c_int32.from_address(address).value  # noqa: E731
        probe = np.zeros((3, 5), np.float32)[1:]
        as_list, as_tuple = [None, probe], (None, None, probe)
        descr = read64(id(probe) + _DESCR)
        return all((
            read64(id(probe) + _TYPE) == id(np.ndarray),
            read64(id(probe) + _DATA) == probe.__array_interface__["data"][0],
            read32(id(probe) + _ND) == 2,
            [read64(read64(id(probe) + _DIMS) + 8 * k) for k in range(2)] == [2, 5],
            descr == id(probe.dtype),
            read32(descr + _TYPE_NUM) == probe.dtype.num,
            ctypes.c_int8.from_address(descr + _BYTEORDER).value == _NATIVE,
            read32(id(probe) + _FLAGS) & _C_CONTIGUOUS == _C_CONTIGUOUS,
            read32(id(probe.T) + _FLAGS) & _C_CONTIGUOUS == 0,
            read32(id(probe) + _FLAGS) & _WRITEABLE == _WRITEABLE,
            read64(id(as_list) + _TYPE) == id(list) and read64(id(as_list) + _SIZE) == 2,
            read64(read64(id(as_list) + _LIST_ITEMS) + 8) == id(probe),
            read64(id(as_tuple) + _TYPE) == id(tuple) and read64(id(as_tuple) + _SIZE) == 3,
            read64(id(as_tuple) + _TUPLE_ITEMS + 16) == id(probe),
        ))
    except Exception:  # noqa: BLE001 - any surprise means: do not read objects directly
        return False


FAST_GATHER = _layout_checked()


def data_address(array: np.ndarray) -> int:
    """The address of an ndarray's data: read from its struct where the layout checks passed
    (``FAST_GATHER``; about 0.3 µs), else through ``__array_interface__`` (about 1.2 µs: a dict
    built per call)."""
    if FAST_GATHER and isinstance(array, np.ndarray):
        return ctypes.c_int64.from_address(id(array) + _DATA).value
    return array.__array_interface__["data"][0]


_NO_SLOTS = (-1, -1, -1)


_FLOAT16, _FLOAT32, _FLOAT64 = np.dtype(np.float16).num, np.dtype(np.float32).num, np.dtype(np.float64).num


@_reader(types.boolean(_I64, _I64, _I64, _I64, _I64[::1], _I64[::1], _I64, _I64, _I64, _I64))
def _grads_match_objects(params, grads, lo, hi, starts, ends, ndarray_type, list_type, tuple_type, bfloat16_type):
    """``grads_match`` on the objects' addresses; ``bfloat16_type``: bfloat16's type number, or −1."""
    for k in range(lo, hi):
        param = _item(params, k, list_type, tuple_type)
        if param == 0 or _load_int64(param + _TYPE) != ndarray_type:
            return False
        type_num = _load_int32(_load_int64(param + _DESCR) + _TYPE_NUM)
        low = type_num == _FLOAT16 or type_num == bfloat16_type
        if not low and type_num != _FLOAT32 and type_num != _FLOAT64:
            return False
        grad = _item(grads, k, list_type, tuple_type)
        start, n = _array_data(grad, -1, False, ndarray_type, type_num)
        size = 2 if low else (4 if type_num == _FLOAT32 else 8)
        if start == 0 and low:  # a 16-bit parameter's gradient may be float32
            start, n = _array_data(grad, -1, False, ndarray_type, _FLOAT32)
            size = 4
        nd = _load_int32(param + _ND)
        if start == 0 or _load_int32(grad + _ND) != nd:
            return False
        grad_dims, param_dims = _load_int64(grad + _DIMS), _load_int64(param + _DIMS)
        for j in range(nd):
            if _load_int64(grad_dims + 8 * j) != _load_int64(param_dims + 8 * j):
                return False
        if n == 0:
            continue
        end = start + n * size
        below = last_at_most(starts, end - 1)  # the last written interval starting before end
        if below >= 0 and ends[below] > start:
            return False
    return True


def written_intervals(arrays) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the byte intervals of ``arrays`` (C-contiguous NumPy arrays that do not
    overlap, as ``check_disjoint`` makes sure), sorted, for ``grads_match``; empty arrays left out."""
    spans = sorted((a.__array_interface__["data"][0], a.nbytes) for a in arrays if a.size)
    starts = np.array([start for start, _ in spans], np.int64)
    ends = np.array([start + size for start, size in spans], np.int64)
    return starts, ends


def readers_cached() -> bool:
    """Whether numba's disk cache holds the compiled table reader (``has_cached_code``): False
    before the first optimizer step with this cache and these sources."""
    return has_cached_code(_gather_objects.py_func)


_bfloat16_type = -1  # bfloat16's type number, once ml_dtypes is imported (no bfloat16 array before)


def grads_match(params, grads, lo, hi, intervals) -> bool:
    """Whether, for every k in [lo, hi), ``grads[k]`` is exactly a C-contiguous ``numpy.ndarray``
    with ``params[k]``'s shape and dtype, or float32 for a 16-bit parameter (``params[k]`` float32,
    float64, float16 or bfloat16; native byte order), and its bytes meet none of ``intervals``
    (from ``written_intervals``: the parameters' and state's). ``params[k]`` must be a NumPy array.
    A few nanoseconds per gradient, read from the objects as ``gather`` does; False also when that
    reader is not available here, or when ``params``/``grads`` are not lists or tuples: the caller
    then runs its full checks, which name the problem."""
    global _bfloat16_type
    if not FAST_GATHER:
        return False
    if _bfloat16_type < 0 and "ml_dtypes" in sys.modules:
        _bfloat16_type = np.dtype(sys.modules["ml_dtypes"].bfloat16).num
    return _grads_match_objects.call(id(params), id(grads), lo, hi, intervals[0], intervals[1],
                                     id(np.ndarray), id(list), id(tuple), _bfloat16_type)


def gather(params, grads=None, states=None, avgs=None, slots=_NO_SLOTS, *, param_written=True):
    """(table, offsets) for lists of arrays of params[0]'s dtype; ``states`` a list of tuples
    (or lists) whose entries ``slots`` feed the state columns. ``params`` must not be empty."""
    dtype = params[0].dtype
    if FAST_GATHER:
        table, offsets, ok = _gather_objects.call(
            id(params), 0 if grads is None else id(grads), 0 if states is None else id(states),
            0 if avgs is None else id(avgs), slots[0], slots[1], slots[2], param_written, dtype.num,
            id(np.ndarray), id(list), id(tuple))
        if ok:
            return table, offsets
    return _gather_python(params, grads, states, avgs, slots, param_written, dtype)
