"""``mpiexec -n 2 fastopt train``: the digits MLP data-parallel (a share of every minibatch per
rank, synchronized batch norm, sharded Adam) prints from rank 0 only and reaches the
single-process run's test accuracy with the same seed; ``fastopt info`` shows the MPI library
and the world size on every rank."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import fastopt.demo

from . import mpirun

EPOCHS = 3


def _mpiexec(*args, timeout=120):
    mpirun.require_mpi()
    command = [mpirun.mpiexec(), "-n", "2", sys.executable, "-m", "fastopt", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**mpirun.os.environ, "NUMBA_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.long
@pytest.mark.parametrize("dtype, state_dtype", [("float32", "float32"), ("bfloat16", "float32"), ("float32", "int8")])
def test_mpiexec_fastopt_train_matches_single_process(dtype, state_dtype):
    """bfloat16: the optimizer's parameters (and its float32 master copies) data-parallel; int8:
    its 8-bit state, sharded over the ranks."""
    out = _mpiexec("train", "--backend", "numpy", "--epochs", str(EPOCHS), "--dtype", dtype,
                   "--state-dtype", state_dtype)
    assert out.count("test accuracy:") == 1, out  # rank 0 alone prints
    assert "data-parallel on 2 MPI ranks" in out
    accuracy = float(re.search(r"test accuracy: ([\d.]+)%", out).group(1))
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    single = fastopt.demo.train(epochs=EPOCHS, backend="numpy", dtype=dtype, state_dtype=state_dtype)
    assert abs(accuracy - 100 * single.test_accuracy) <= 0.5
    # 8-bit state: the ranks' sum of their gradients rounds unlike one process's batch mean, and a
    # state near a midpoint of the map then takes the neighbouring code, an update differing by a step
    tolerance = 1e-3 if state_dtype == "int8" else 1e-4
    assert losses == pytest.approx([h["loss"] for h in single.history], abs=tolerance)


@pytest.mark.long
def test_mpiexec_fastopt_info_shows_mpi():
    out = _mpiexec("info")
    # both ranks print; their lines may interleave
    ranks = re.findall(r"MPI +mpi4py [\d.]+, .+?; world size 2, this is rank (\d)", out)
    assert sorted(ranks) == ["0", "1"], out
