"""Run the numba-cuda simulator suite (tests/cudasim) in a subprocess with NUMBA_ENABLE_CUDASIM=1.

numba reads NUMBA_ENABLE_CUDASIM once, when numba.cuda is first imported, so the suite needs a
fresh interpreter; each of its files runs in its own. Each passes only if that run passes and
actually ran tests (pytest's exit code 5, "no tests collected", is a failure here, and so is a run
whose summary counts no passes or any skip).
When this process already has the simulator on, the suite was collected here directly and is not
run a second time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

ROOT = Path(__file__).resolve().parents[1]


SIMULATOR_FILES = sorted(path.name for path in (ROOT / "tests" / "cudasim").glob("test_*.py"))


def test_the_simulator_suite_has_files():
    assert SIMULATOR_FILES, "tests/cudasim holds no test files"


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                    reason="NUMBA_ENABLE_CUDASIM=1 is set: tests/cudasim runs in this process already")
@pytest.mark.long
@pytest.mark.parametrize("name", SIMULATOR_FILES)
def test_simulator_suite_passes(name):
    """One subprocess per file, so that a parallel test run (pytest -n) spreads them."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    result = subprocess.run(
        # hypothesis's plugin costs each file 1.5 s at start and end; no file here uses it
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-o", "addopts=",
         str(ROOT / "tests" / "cudasim" / name)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    tail = output[-6000:]
    assert result.returncode != 5, f"{name} collected no tests under the simulator:\n{tail}"
    assert result.returncode == 0, f"{name} failed under the simulator (exit code {result.returncode}):\n{tail}"
    summary = [line for line in output.splitlines() if re.search(r"\d+ passed", line)]
    assert summary, f"no pytest summary with passed tests in the output:\n{tail}"
    passed = int(re.search(r"(\d+) passed", summary[-1]).group(1))
    assert passed > 0, summary[-1]
    assert "skipped" not in summary[-1], f"tests were skipped under the simulator: {summary[-1]}"
