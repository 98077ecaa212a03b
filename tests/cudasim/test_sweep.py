"""The hyperparameter sweep of ``tests/sweep.py`` on the ``"numba-cuda"`` backend, under the
simulator: every optimizer variant through the functional API (both dtypes) and the optimizer
classes (float32) with the per-element training-step extras (value clipping, a Polyak EMA), on small device
arrays and two steps (the second runs from a state the kernel wrote, with a changed learning rate, which
is when the sweep checks that the learning rate matters; the host backends' sweep takes four). The
simulator runs each CUDA thread as a Python thread, which makes the norm's block reduction cost
seconds a step: ``clip_grad_norm`` at non-default values is swept on the host backends, and its
reduction on this backend is checked in ``test_reduce.py``."""

from __future__ import annotations

import numpy as np
import pytest

from sweep import VARIANTS, case_id, run_functional, run_optimizer

from .helpers import device, host

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["float32", "float64"]
# The sweep checks how each drawn value reaches the kernels, not the launch geometry (grid-stride
# loops that turn, tensors over several chunks: test_optim.py), and the simulator's cost is its
# threads (64 per block): one block per tensor here. SHAPE fills most of a block's threads; three
# tensors in two groups for the tensor-list kernel, one of a single element.
SHAPE = (61,)
GROUP_SHAPES = [[(23,)], [(2, 11), (1,)]]
STEPS = 2


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=case_id)
def test_functional_sweep(variant, dtype):
    run_functional(variant, "numba-cuda", dtype, shape=SHAPE, steps=STEPS, to_dev=device, to_host=host)


# float32 only: the class path checks how groups, extras and the tensor-list kernel are wired, which
# does not depend on the dtype; the functional sweep above runs every kernel in both dtypes (this
# halving keeps the simulator's share of the suite's 10 minutes down)
@pytest.mark.parametrize("dtype", [np.float32], ids=["float32"])
@pytest.mark.parametrize("variant", VARIANTS, ids=case_id)
def test_optimizer_sweep_with_extras(variant, dtype):
    run_optimizer(variant, "numba-cuda", dtype, extras=("clip_grad_value", "polyak"), to_dev=device, to_host=host,
                  group_shapes=GROUP_SHAPES, steps=STEPS)
