"""kernels/ installs as fastopt.kernels (editable and wheel), and no top-level 'kernels' ships."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_installed_package_maps_kernels_under_fastopt(tmp_path):
    out = run_python(
        "import importlib.util, fastopt.kernels.numba_cpu as k;"
        "print(importlib.util.find_spec('kernels')); print(k.__file__)",
        cwd=tmp_path,
    )
    top_level, location = out.splitlines()
    assert top_level == "None", "a top-level 'kernels' package is importable"
    assert Path(location).name == "__init__.py" and Path(location).parent.name == "numba_cpu"


def test_wheel_contains_kernels_only_as_fastopt_kernels(tmp_path):
    # pip builds in an isolated environment with the build-system requirements of pyproject.toml,
    # so the check does not depend on the setuptools (or wheel) this environment happens to have.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("fastopt-*.whl")
    out = wheel.name
    names = zipfile.ZipFile(tmp_path / out).namelist()
    assert "fastopt/kernels/numba_cpu/optim.py" in names
    assert "fastopt/kernels/numba_cpu/batchnorm.py" in names
    assert "fastopt/reference/optim.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "the wheel ships a top-level kernels/"
