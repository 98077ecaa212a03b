"""Shared test helpers: tolerance table, fresh random generators, torch detection."""

from __future__ import annotations

import numpy as np
import pytest

# float32 kernels are compared with a float64 reference; float64 kernels with the same reference.
# Tolerance = atol + rtol * |reference|, keyed by the dtype under test.
TOLERANCE = {
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6),
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-14),
}


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype, what: str = "") -> None:
    """Compare errors, dtype, shape, then values against the dtype's tolerance."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, err_msg=what, **TOLERANCE[np.dtype(dtype)])


@pytest.fixture
def rng(request):
    """A generator with a fresh seed for every test; the seed is printed so a failure can be replayed."""
    seed = np.random.SeedSequence().entropy
    print(f"{request.node.nodeid}: seed {seed}")
    return np.random.default_rng(seed)


def torch_or_skip():
    return pytest.importorskip("torch", reason="torch is not installed; parity with torch cannot be checked")


def pytest_collection_modifyitems(items):
    """Tests marked ``long`` run first (a stable sort keeps the rest in order), so that in a
    parallel run (``-n auto``) the other workers share the short tests meanwhile instead of one
    worker starting a long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
