"""The 8-bit state kernel's block coders equal the reference quantizer on planted ties, on every
code path this CPU can run (``tests/state8_coders.py``): the host's (the AVX-512 VBMI coders on a
CPU that has them), AVX-512 without VBMI, and the scalar loops of CPUs without AVX-512 (numba
compiling for a generic x86-64). Paths the host cannot execute are not listed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from llvmlite import binding

import state8_coders

SCRIPT = Path(__file__).with_name("state8_coders.py")


def _paths() -> list:
    features = binding.get_host_cpu_features().flatten().split(",")
    paths = [pytest.param({"NUMBA_CPU_NAME": "generic"}, (False, False), id="scalar")]
    if "+avx512f" in features and "+avx512vbmi" in features:
        without = ",".join("-avx512vbmi" if f == "+avx512vbmi" else f for f in features)
        paths.append(pytest.param({"NUMBA_CPU_FEATURES": without}, (True, False), id="avx512-without-vbmi"))
    return paths


def test_the_host_path_matches_the_reference():
    features = binding.get_host_cpu_features().flatten().split(",")
    if not os.environ.get("NUMBA_CPU_NAME") and not os.environ.get("NUMBA_CPU_FEATURES"):
        assert state8_coders.S._AVX512 == ("+avx512f" in features)  # the vector coders where they can run
    assert state8_coders.mismatches() == {}


@pytest.mark.parametrize("env, expected_path", _paths())
def test_every_other_path_matches_the_reference(env, expected_path, tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300,
                         cwd=SCRIPT.parent, env={**os.environ, **env, "NUMBA_CACHE_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert (result["vector"], result["vbmi"]) == expected_path, result
    assert result["mismatches"] == {}
