"""The rank side of the MPI tests: named checks, results written after each one (``mpirun``)."""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from pathlib import Path

import numpy as np
from mpi4py import MPI

COMM = MPI.COMM_WORLD


class Checks:
    """``checks.run(name, fn)`` runs ``fn()`` on this rank and records "ok" or the error."""

    def __init__(self):
        self.out = Path(sys.argv[1])
        self.results: dict[str, str] = {}
        self.names: list[str] = []

    def run(self, name: str, fn, *args, **kwargs) -> None:
        self.names.append(name)
        try:
            fn(*args, **kwargs)
            self.results[name] = "ok"
        except Exception as exc:  # recorded, reported by the pytest side
            self.results[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
        (self.out / f"rank{COMM.rank}.json").write_text(json.dumps(self.results))


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def assert_identical_on_all_ranks(arrays, what: str) -> None:
    """The arrays' bytes hash the same on every rank (a collective)."""
    everyone = COMM.allgather(digest(arrays))
    assert len(set(everyone)) == 1, f"{what}: ranks hold different bytes: {everyone}"


def assert_close(actual, expected, dtype, what: str, rtol_of=None) -> None:
    """float64 within 1e-12 relative, float32 within 1e-5 (atol scaled by the data's RMS);
    ``rtol_of``: the dtype whose tolerance applies, when it is not ``dtype``."""
    rtol = 1e-12 if np.dtype(dtype if rtol_of is None else rtol_of) == np.float64 else 1e-5
    expected = np.asarray(expected, np.float64)
    scale = float(np.sqrt(np.mean(expected[np.isfinite(expected)] ** 2))) if expected.size else 0.0
    assert np.asarray(actual).dtype == np.dtype(dtype), f"{what}: dtype {np.asarray(actual).dtype}"
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=rtol * scale, err_msg=what)
