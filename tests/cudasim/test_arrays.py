"""The array helpers of the backend contract on (simulated) numba device arrays."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt.kernels.numba_cuda as backend

from .helpers import device


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_allocations_keep_kind_shape_and_dtype(dtype):
    like = device(np.ones((3, 5), dtype))
    assert backend.owns(like) and not backend.owns(np.ones(3))
    for array in (backend.empty_like(like), backend.zeros_like(like), backend.full_like(like, 2.5),
                  backend.empty((3, 5), dtype, like), backend.from_numpy(np.ones((3, 5), dtype), like)):
        assert type(array) is type(like)
        assert array.shape == (3, 5) and array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(backend.to_numpy(backend.zeros_like(like)), np.zeros((3, 5), dtype))
    np.testing.assert_array_equal(backend.to_numpy(backend.full_like(like, 2.5)), np.full((3, 5), 2.5, dtype))
    assert backend.empty((0,), dtype, like).shape == (0,)
    assert backend.zeros_like(device(np.ones(0, dtype))).shape == (0,)


def test_to_numpy_is_a_copy():
    a = device(np.arange(4.0))
    host = backend.to_numpy(a)
    host[0] = 99.0
    assert backend.to_numpy(a)[0] == 0.0


def test_simulator_counts_as_available():
    assert backend.unavailable_reason() == ""
