"""Views and tuples at raw addresses inside kernels (``multi.array_at``, ``multi.tuple_at``,
``multi.float64_at``), and the host helpers that feed them (``data_address``, ``parts_on_host``).

The part runners make their tables, offsets, hyperparameters, maps and scratch rows with these
intrinsics instead of numba's ``carray`` and ``to_fixed_tuple``, whose implementations (like those
of the builtins ``min`` and ``max``) numba compiles anew in every process that compiles a kernel
using them. These tests check that the intrinsics give what ``carray`` gives, and that a part
runner's first compile compiles none of numba's own overloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from numba import types

from fastopt.kernels.numba_cpu import multi
from fastopt.kernels.numba_cpu.multi import array_at, float64_at, pointer, tuple_at, typed_pointer

_ints64 = typed_pointer(types.int64)


@numba.njit
def _float_views(address, like, n, rows, cols):
    return array_at(pointer(address, like), n), array_at(pointer(address, like), (rows, cols))


@numba.njit
def _int_view(address, rows, cols):
    return array_at(_ints64(address), (rows, cols))


@numba.njit
def _first_three(address, like):
    return tuple_at(pointer(address, like), 3)


@numba.njit
def _written_through(address, like, rows, cols):
    view = array_at(pointer(address, like), (rows, cols))
    view[rows - 1, cols - 1] = view[0, 1] + 1
    return view.strides


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_array_at_views_the_memory_as_carray_does(dtype):
    data = np.arange(12, dtype=dtype)
    flat, grid = _float_views(data.ctypes.data, dtype(0), 12, 3, 4)
    np.testing.assert_array_equal(flat, data)
    np.testing.assert_array_equal(grid, data.reshape(3, 4))
    assert flat.dtype == grid.dtype == data.dtype
    assert grid.shape == (3, 4) and grid.flags.c_contiguous


def test_array_at_of_int64_and_writes_reach_the_memory():
    table = np.arange(10, dtype=np.int64)
    np.testing.assert_array_equal(_int_view(table.ctypes.data, 2, 5), table.reshape(2, 5))
    data = np.zeros(6, np.float32)
    data[1] = 2.5
    strides = _written_through(data.ctypes.data, np.float32(0), 2, 3)
    assert tuple(strides) == (12, 4)  # C order, float32
    assert data[5] == np.float32(3.5) and data[:5].tolist() == [0, 2.5, 0, 0, 0]


def test_tuple_at_reads_the_first_values():
    data = np.array([1.5, -2.0, 3.25, 9.0], np.float32)
    found = _first_three(data.ctypes.data, np.float32(0))
    assert found == (1.5, -2.0, 3.25)
    assert isinstance(found, tuple) and len(found) == 3


@numba.njit
def _float64_slots(address, like, n):
    slots = array_at(float64_at(pointer(address, like)), n)
    slots[n - 1] = 0.1
    return slots[0]


def test_float64_at_views_float32_memory_as_float64_slots():
    sums = np.array([2.5, 0.0, 0.0])
    assert _float64_slots(sums.ctypes.data, np.float32(0), 3) == 2.5
    assert sums[2] == 0.1 and sums[:2].tolist() == [2.5, 0.0]  # the float64 value, bit for bit


def test_data_address_reads_what_the_array_interface_says():
    base = np.arange(40, dtype=np.float32).reshape(5, 8)
    arrays = [base, base[2:], base[:, 3:], base.T, base.view(np.int32), np.ascontiguousarray(base[::2]),
              np.zeros(0, np.uint8), np.ones(3)]
    assert multi.FAST_GATHER  # CPython on this machine: the struct is read
    for a in arrays:
        assert multi.data_address(a) == a.__array_interface__["data"][0]


def test_parts_on_host_cuts_as_the_kernels_do():
    @numba.njit
    def in_kernel(total):
        return multi.parts_for(total)

    totals = [0, 1, multi.PART_MIN - 1, multi.PART_MIN, 2 * multi.PART_MIN - 1, 2 * multi.PART_MIN, 75_014,
              multi.PART_MIN * multi.PARTS_MAX - 1, multi.PART_MIN * multi.PARTS_MAX, 1 << 30]
    assert [multi.parts_on_host(t) for t in totals] == [in_kernel(t) for t in totals]
    assert multi.parts_on_host(np.int64(75_014)) == 9


def test_the_intrinsics_refuse_what_is_not_a_pointer():
    @numba.njit
    def from_integer(address):
        return array_at(address, 4)

    @numba.njit
    def count_not_constant(address, like, n):
        return tuple_at(pointer(address, like), n)

    with pytest.raises(numba.core.errors.TypingError):
        from_integer(0)
    with pytest.raises(numba.core.errors.TypingError):
        count_not_constant(0, np.float32(0), 3)


_LISTEN = r"""
import json
import sys

import numpy as np
from numba.core import event

compiled = []


class Listener(event.Listener):
    def on_start(self, ev):
        f = ev.data["dispatcher"].py_func
        compiled.append(f"{f.__module__}:{f.__qualname__}")

    def on_end(self, ev):
        pass


event.register("numba:compile", Listener())
import ml_dtypes
import fastopt

configurations = {
    "float32": [(np.float32, fastopt.Adam, {})],
    "others": [(np.float64, fastopt.Adam, {}), (np.float32, fastopt.Adam, {"state_dtype": "int8"}),
               (np.float32, fastopt.SGD, {"momentum": 0.9, "state_dtype": "int8"}),
               (ml_dtypes.bfloat16, fastopt.Adam, {}), (np.float32, fastopt.Adam, {"state_dtype": "bfloat16"})],
}[sys.argv[1]]
for n in (10_000, 100_000):  # the serial and the parallel launch
    for dtype, optimizer, keywords in configurations:
        p = np.zeros(n, dtype)
        optimizer([p], lr=1e-3, **keywords).step([np.ones(n, dtype)])
print(json.dumps(compiled))
"""


def _compiled_in_a_new_process(which, env):
    out = subprocess.run([sys.executable, "-c", _LISTEN, which], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_first_use_of_another_configuration_compiles_no_numba_overload(tmp_path):
    """A new process compiles float32 Adam into an empty cache (the tensor-table readers, the
    launchers, float32 Adam's runner); a second one, on that cache, the first step of float64
    Adam, 8-bit Adam and SGD, bfloat16 parameters with master weights and bfloat16 state: every
    function numba compiles there is fastopt's, none of numba's own overload implementations,
    which it would compile again in every such process (``carray``'s did, six times for 8-bit
    Adam)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    first = _compiled_in_a_new_process("float32", env)
    assert "fastopt.kernels.numba_cpu.multi:_gather_objects" in first, first  # the listener hears compiles
    foreign = [name for name in _compiled_in_a_new_process("others", env) if not name.startswith("fastopt.")]
    assert foreign == [], foreign
