"""Run a helper script under ``mpiexec -n N`` as a subprocess and collect every rank's results.

Each helper script (``mpi_*.py`` beside this file) runs a list of named checks on every rank
(``rank_checks.Checks``) and writes ``rank<r>.json`` into the directory given as its first
argument after every check: ``{check name: "ok" | "<exception>: <message>"}``. ``run`` returns
those dictionaries, one per rank. A job that runs past ``timeout`` seconds (a hang: some rank
waits in a collective the others never reach) is killed, with all its processes, and reported as a
failure naming the checks that had finished.

mpiexec is the one installed beside the Python running the tests (the ``mpich`` wheel of the
``mpi``/``test`` extras puts it in the virtual environment's ``bin``); MPICH's wheel runs as root
and in containers without extra settings. Where mpi4py is not installed, ``require_mpi`` skips
with the reason (and in CI, where the test extra installs it, that skip fails the run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpiexec not found beside the interpreter or on PATH (install the 'mpi' extra)")
    return found


def require_mpi() -> None:
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install -e '.[mpi]'); the MPI tests cannot run")


def run(script: str, n: int, *args: str, timeout: float = 60.0, env: dict | None = None,
        expect_failure: bool = False, files: dict | None = None) -> list[dict]:
    """``mpiexec -n n python script OUT *args``; each rank's results, after asserting a clean exit
    (``expect_failure``: a non-zero exit, as when a rank is killed on purpose; ranks that wrote no
    results are then None). ``files``: a dict that receives the other files the ranks wrote into
    the results directory, name -> text."""
    require_mpi()
    with tempfile.TemporaryDirectory() as out:
        environment = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        command = [mpiexec(), "-n", str(n), sys.executable, str(HERE / script), out, *args]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=environment, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and every rank it started
            output, _ = proc.communicate()
            partial = _collect(Path(out), n)
            pytest.fail(f"{script} under mpiexec -n {n} hung: killed after {timeout:.0f} s; checks finished "
                        f"per rank: {[list(r) for r in partial]}\n{output[-4000:]}")
        results = _collect(Path(out), n)
        if files is not None:
            files.update({p.name: p.read_text() for p in Path(out).iterdir() if not p.name.startswith("rank")})
    if expect_failure:
        assert proc.returncode != 0, f"{script} under mpiexec -n {n} was expected to fail:\n{output[-4000:]}"
        return results
    assert proc.returncode == 0, f"{script} under mpiexec -n {n} exited with {proc.returncode}:\n{output[-4000:]}"
    assert all(r is not None for r in results), f"a rank wrote no results:\n{output[-4000:]}"
    return results


def _collect(out: Path, n: int) -> list:
    results = []
    for rank in range(n):
        path = out / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return results


def assert_all_ok(results: list[dict], expected: list[str]) -> None:
    """Every rank ran every expected check, and each passed."""
    failures = []
    for rank, checks in enumerate(results):
        missing = [name for name in expected if name not in checks]
        if missing:
            failures.append(f"rank {rank}: checks that did not run: {missing}")
        failures += [f"rank {rank}: {name}: {outcome}" for name, outcome in checks.items() if outcome != "ok"]
    assert not failures, "\n".join(failures)
