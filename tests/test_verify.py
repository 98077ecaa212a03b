"""``fastopt.verify``'s error measure: absolute errors are judged against the size of the data,
so an output much smaller than the dtype's atol is still checked."""

from __future__ import annotations

import numpy as np
import pytest

from fastopt.verify import TOLERANCE, Result


def record(actual, expected, dtype="float32"):
    rtol, atol = TOLERANCE["optimizer"][dtype]
    result = Result("adadelta", "numba", dtype, rtol, atol)
    result.record("acc_delta", np.asarray(actual, dtype), expected)
    return result


def test_a_small_state_off_by_one_percent_fails():
    rng = np.random.default_rng(0)
    expected = rng.uniform(1e-7, 1e-6, 1000)  # AdaDelta's acc_delta sits here, below atol = 2e-6
    assert not record(expected * 1.01, expected).passed
    assert record(expected, expected).passed


def test_rounding_to_float32_passes_at_any_scale():
    rng = np.random.default_rng(1)
    for scale in (1e-12, 1e-6, 1.0, 1e6):
        expected = rng.standard_normal(1000) * scale
        assert record(expected.astype(np.float32), expected).passed, scale


@pytest.mark.parametrize("values", [[0.0, 0.0], [np.inf, -np.inf]], ids=["zeros", "infinities"])
def test_exact_values_pass_even_where_the_scale_is_zero_or_infinite(values):
    assert record(values, np.array(values)).passed


def test_nan_fails():
    assert not record([np.nan, 1.0], np.array([1.0, 1.0])).passed
