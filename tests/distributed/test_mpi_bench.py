"""``fastopt bench --op distributed`` under mpiexec -n 2, tiny sizes: it verifies the sharded step
against the replicated one, times every row and reports bytes and state (never judged on time)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from . import mpirun


@pytest.mark.long
def test_distributed_benchmark_rows(tmp_path):
    mpirun.require_mpi()
    out = tmp_path / "bench.json"
    command = [mpirun.mpiexec(), "-n", "2", sys.executable, "-m", "fastopt.benchmark", "--op", "distributed",
               "--small", "--no-torch", "--backend", "numpy", "--repeats", "2", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bit for bit" in proc.stdout
    report = json.loads(out.read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert sorted(rows) == ["floor allreduce", "floor bucketed", "floor rs+ag", "replicated", "sharded"]
    n, itemsize = report["n"], 4
    assert report["world_size"] == 2
    assert rows["sharded"]["sent_per_rank_bytes"] == n * itemsize  # 2·(N − 1)/N·n·s with N = 2
    assert rows["replicated"]["state_per_rank_bytes"] == 2 * n * itemsize  # Adam's m and v
    assert rows["sharded"]["state_per_rank_bytes"] == n * itemsize  # half of them
    assert all(row["ms"] > 0 for row in rows.values())
