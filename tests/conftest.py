"""Shared test helpers: tolerance table, fresh random generators, torch detection, and the rule
that in CI only tests marked ``gpu`` may skip."""

from __future__ import annotations

import os

import numpy as np
import pytest

# In CI (the CI variable set, as CI services and .ci/run set it) a skip is a failure unless the test
# is marked ``gpu``: CI has no GPU, and everything else the suite needs is in the test extra, so
# any other skip means a check did not run (torch missing, NVVM missing, ...).
STRICT_SKIPS = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
EXPECTED_SKIP_MARKER = "gpu"

# float32 kernels are compared with a float64 reference; float64 kernels with the same reference.
# Tolerance per element = atol * scale + rtol * |reference|, keyed by the dtype under test. ``atol``
# is relative to ``scale``, the magnitude of the data (by default the root mean square of the
# reference's finite values), so that a check of small state (AdaDelta's accumulated squared steps
# sit near 1e-6) is as strict as one of unit-sized parameters instead of passing any value below a
# fixed absolute floor.
TOLERANCE = {
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6),
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-14),
}


def data_scale(expected: np.ndarray) -> float:
    """The root mean square of the finite values of ``expected`` (0.0 when there are none)."""
    values = np.asarray(expected, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(values * values))) if values.size else 0.0


def tolerance(expected: np.ndarray, dtype, scale: float | None = None) -> dict:
    """``rtol`` and ``atol`` for ``np.testing.assert_allclose`` against ``expected``: the dtype's
    relative tolerance, and its ``atol`` multiplied by ``scale`` (default ``data_scale(expected)``)."""
    table = TOLERANCE[np.dtype(dtype)]
    scale = data_scale(expected) if scale is None else float(scale)
    return dict(rtol=table["rtol"], atol=table["atol"] * scale)


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype, what: str = "", *,
                 scale: float | None = None, before: np.ndarray | None = None) -> None:
    """Compare dtype, shape, then values against the dtype's tolerance scaled to the data
    (``tolerance``). NaN must sit where the reference has NaN.

    ``before``: the array's value before an in-place update. The scale is then the larger of
    the two magnitudes: an update that cancels (θ − εu ≈ 0) leaves an error of the size of θ,
    which the result alone cannot show (a one-element array would be judged on its tiny value)."""
    assert np.dtype(actual.dtype) == np.dtype(dtype), f"{what}: dtype {actual.dtype} != {np.dtype(dtype)}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if scale is None and before is not None:
        scale = max(data_scale(expected), data_scale(before))
    np.testing.assert_allclose(actual, expected, err_msg=what, **tolerance(expected, dtype, scale))


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


def _unexpected_skip(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return (f"skipped in CI, where only tests marked {EXPECTED_SKIP_MARKER!r} may skip (the test extra "
            f"installs everything else): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT_SKIPS and report.skipped and item.get_closest_marker(EXPECTED_SKIP_MARKER) is None:
        report.outcome = "failed"
        report.longrepr = _unexpected_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import (``importorskip`` at module level) counts the same."""
    outcome = yield
    report = outcome.get_result()
    if STRICT_SKIPS and report.skipped:
        report.outcome = "failed"
        report.longrepr = _unexpected_skip(report)


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    expected = sum(1 for r in skipped if EXPECTED_SKIP_MARKER in getattr(r, "keywords", {}))
    other = len(skipped) - expected
    terminalreporter.write_line(
        f"skips: {expected} marked {EXPECTED_SKIP_MARKER!r} (no GPU here; expected), {other} other"
        + ("" if STRICT_SKIPS else " (outside CI; in CI any other skip fails)"))
