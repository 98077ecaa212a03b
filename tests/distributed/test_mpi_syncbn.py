"""Synchronized batch norm under mpiexec -n 3 against single-process batch norm on the
concatenated batch (see mpi_syncbn.py for the cases)."""

from __future__ import annotations

import pytest

from . import mpirun


@pytest.mark.long
def test_sync_batchnorm_matches_one_process():
    results = mpirun.run("mpi_syncbn.py", 3, "numpy", timeout=60)
    assert len(results[0]) == 16, sorted(results[0])
    mpirun.assert_all_ok(results, list(results[0]))
