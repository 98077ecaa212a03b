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


LOWP_CHECKS = 19


@pytest.mark.long
def test_16_bit_parameters_match_one_process_at_3_ranks():
    """bfloat16 and float16 parameters with comm=: float32 reduction and master copies, stochastic
    rounding, sharded and replicated, checkpoints, 8-bit and bfloat16 state (replicated and
    sharded, with checkpoints and a refused bad piece), and bad input on one rank (``mpi_lowp.py``)."""
    results = mpirun.run("mpi_lowp.py", 3, "numpy", timeout=120)
    assert len(results[0]) == LOWP_CHECKS, sorted(results[0])
    mpirun.assert_all_ok(results, list(results[0]))


@pytest.mark.long
def test_16_bit_parameters_on_the_numba_backend():
    """At 2 ranks the step is bit-identical to one process (mpi_lowp.py), here on the kernels."""
    results = mpirun.run("mpi_lowp.py", 2, "numba", "--quick", timeout=180)
    mpirun.assert_all_ok(results, list(results[0]))
    assert len(results[0]) == 5
