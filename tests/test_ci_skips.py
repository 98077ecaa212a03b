"""In CI only tests marked ``gpu`` may skip: any other skip, at run time or a whole module at
import, fails the run (``tests/conftest.py``); outside CI skips stay skips. Checked by running
pytest on a few small test files in a subprocess with this suite's conftest loaded as a plugin."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

FILES = {
    "test_marks.py": '''
import pytest

@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no GPU here")

def test_needs_torch():
    pytest.skip("torch is not installed")

@pytest.mark.skipif(True, reason="a skipif mark")
def test_marked_skipif():
    pass

def test_runs():
    assert True
''',
    "test_module_skip.py": '''
import pytest
pytest.importorskip("a_module_that_does_not_exist", reason="the module is missing")

def test_never_collected():
    pass
''',
}


def run_pytest(tmp_path, ci: str | None, names=tuple(FILES)):
    for name in names:
        (tmp_path / name).write_text(FILES[name])
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-o", "addopts=",
         "-rA", "-W", "ignore::pytest.PytestUnknownMarkWarning", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def test_in_ci_only_gpu_tests_may_skip(tmp_path):
    code, out = run_pytest(tmp_path, "true", ["test_marks.py"])
    assert code == 1, out
    assert re.search(r"SKIPPED .*no GPU here", out), out
    for name in ("test_needs_torch", "test_marked_skipif"):
        assert re.search(rf"(FAILED|ERROR) .*{name}", out), out
    assert "torch is not installed" in out and "a skipif mark" in out
    assert "only tests marked 'gpu' may skip" in out
    assert "skips: 1 marked 'gpu' (no GPU here; expected), 0 other" in out, out


def test_in_ci_a_module_skipped_at_import_stops_the_run(tmp_path):
    code, out = run_pytest(tmp_path, "true")
    assert code == 2, out  # a collection error interrupts the run
    assert re.search(r"ERROR .*test_module_skip.py", out) and "the module is missing" in out, out


@pytest.mark.parametrize("ci", [None, "false", "0"])
def test_outside_ci_skips_are_skips_and_are_counted(tmp_path, ci):
    code, out = run_pytest(tmp_path, ci)
    assert code == 0, out
    assert "1 passed" in out and "4 skipped" in out, out
    assert "skips: 1 marked 'gpu' (no GPU here; expected), 3 other" in out, out
