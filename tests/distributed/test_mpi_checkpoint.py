"""Checkpoints of a sharded optimizer under mpiexec: bit-identical resume at the same world size,
consolidation, resharding 3 → 2 and 3 → 1 ranks through save/load on disk, and a save killed
halfway leaving the previous checkpoint loadable."""

from __future__ import annotations

import pytest

from . import mpirun


@pytest.mark.long
def test_save_at_3_ranks_resumes_at_2_and_1(tmp_path):
    directory = str(tmp_path / "checkpoint")
    results = mpirun.run("mpi_checkpoint.py", 3, "train-save", directory)
    mpirun.assert_all_ok(results, ["resume from the sharded state dict is bit-identical",
                                   "consolidated state equals one process's", "save after 10 steps"])
    for n in (2, 1):
        results = mpirun.run("mpi_checkpoint.py", n, "load-continue", directory)
        mpirun.assert_all_ok(results, ["load and continue, sharded", "load and continue, replicated"])


@pytest.mark.long
def test_rank_killed_during_save_leaves_previous_checkpoint(tmp_path):
    directory = str(tmp_path / "checkpoint")
    mpirun.run("mpi_checkpoint.py", 2, "crash", directory, expect_failure=True)
    results = mpirun.run("mpi_checkpoint.py", 2, "after-crash", directory)
    mpirun.assert_all_ok(results, ["the previous checkpoint still loads", "an unfinished first save does not load",
                                   "a corrupt file does not load"])
