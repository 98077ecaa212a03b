"""Checking a kernel's outputs against the reference's, before anything is timed.

Tolerance (after llm.c): |actual − expected| ≤ atol·max(1, max|expected|) + rtol·|expected|, keyed
by dtype. Both sides ran in the same dtype on the same inputs, so they differ only by rounding
order; a kernel that is wrong by more than rounding fails.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TOLERANCE", "VerificationError", "compare"]

TOLERANCE = {
    np.dtype(np.float32): dict(rtol=1e-4, atol=1e-5),
    np.dtype(np.float64): dict(rtol=1e-9, atol=1e-11),
}


class VerificationError(AssertionError):
    """A kernel's output differs from the reference's by more than the tolerance."""


def compare(what: str, actual, expected, *, loose: float = 1.0) -> None:
    """Raise ``VerificationError`` naming ``what`` unless ``actual`` matches ``expected``.

    Errors, then shape, then values; NaN matches NaN only. ``loose`` multiplies the tolerance (for
    comparisons with another library, whose rounding order differs more).
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        raise VerificationError(f"{what}: shape {actual.shape} differs from the reference's {expected.shape}")
    if expected.size == 0:
        return
    tol = TOLERANCE.get(expected.dtype, TOLERANCE[np.dtype(np.float64)])
    a = actual.astype(np.float64, copy=False)
    e = expected.astype(np.float64, copy=False)
    finite = np.isfinite(e)
    scale = max(1.0, float(np.abs(e[finite]).max())) if finite.any() else 1.0
    allowed = loose * (tol["atol"] * scale + tol["rtol"] * np.abs(e))
    with np.errstate(invalid="ignore"):
        bad = ~((np.abs(a - e) <= allowed) | (np.isnan(a) & np.isnan(e)) | ((a == e) & ~np.isnan(e)))
    count = int(np.count_nonzero(bad))
    if count:
        i = int(np.flatnonzero(bad.ravel())[0])
        with np.errstate(invalid="ignore"):
            worst = float(np.nanmax(np.abs(a - e))) if np.isfinite(a).any() else float("nan")
        raise VerificationError(
            f"{what}: {count} of {e.size} values differ from the reference beyond rtol={loose * tol['rtol']:g}, "
            f"atol={loose * tol['atol']:g}·{scale:.3g}; first at flat index {i}: {a.ravel()[i]!r} vs "
            f"{e.ravel()[i]!r}; max |difference| {worst:.3g}")
