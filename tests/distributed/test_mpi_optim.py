"""The optimizers with comm= under mpiexec: equivalence with one process on the whole batch,
bit-identical parameters on every rank, sharded state memory, bad input on one rank."""

from __future__ import annotations

import pytest

from . import mpirun

OPTIM_CHECKS = 43


@pytest.mark.long
@pytest.mark.parametrize("n", [2, 3])
def test_data_parallel_matches_one_process(n):
    results = mpirun.run("mpi_optim.py", n, "numpy", timeout=90)
    assert len(results[0]) == OPTIM_CHECKS, sorted(results[0])
    mpirun.assert_all_ok(results, list(results[0]))


@pytest.mark.long
def test_data_parallel_numba_backend():
    """One representative job on the compiled kernels (the numba cache makes the ranks' start cheap)."""
    results = mpirun.run("mpi_optim.py", 2, "numba", "--quick", timeout=180)
    mpirun.assert_all_ok(results, list(results[0]))
    assert len(results[0]) >= 3


@pytest.mark.long
def test_bad_input_on_one_rank_raises_everywhere():
    results = mpirun.run("mpi_bad_input.py", 2, timeout=60)
    assert len(results[0]) == 16, sorted(results[0])
    mpirun.assert_all_ok(results, list(results[0]))
