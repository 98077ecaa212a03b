"""Every optimizer x convention x switch x backend x dtype at randomized, non-default values of every
hyperparameter, several steps with the learning rate changed between steps, against the float64
reference; each drawn value is checked to matter at the tolerance used (see ``tests/sweep.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from sweep import EXTRAS, VARIANTS, case_id, run_functional, run_optimizer

BACKENDS = ["numpy", "numba"]
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["float32", "float64"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=case_id)
def test_functional_sweep(variant, backend, dtype):
    run_functional(variant, backend, dtype)


@pytest.mark.parametrize("extras", [(), EXTRAS], ids=["plain", "extras"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=case_id)
def test_optimizer_sweep(variant, backend, dtype, extras):
    run_optimizer(variant, backend, dtype, extras=extras)
