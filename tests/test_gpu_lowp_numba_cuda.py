"""float16 parameters, 8-bit and bfloat16 optimizer state (for float32 and float16 parameters) and
float16 batch norm of the numba-cuda backend on a real GPU, at large sizes, against
``fastopt.reference``: the runners and comparisons of ``tests/cudasim/test_lowp.py``,
``test_lowp_state8.py`` and ``helpers.run_batchnorm_f16`` (θ within one float16 code and bitwise
where the float32 values agree; 8-bit codes and absmax equal; bfloat16 states within one code and
bitwise in at least 98% of the elements; float32 values within float32 tolerance; a parameter
stepped in pieces with ``starts`` bit for bit as the whole; float16 batch norm bit for bit the
rounding of the float32 kernels, and within one float16 rounding of the reference).

Marked ``gpu``; skipped with the reason when numba-cuda finds no usable CUDA device (and under the
CUDA simulator, which tests/cudasim covers with small sizes).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

import fastopt.kernels.numba_cuda as backend  # noqa: E402

from cudasim.test_lowp import (MIXED_CASES, MIXED_OPTIONS, STATE8_CASES, _device,  # noqa: E402
                               _state8_id, run_mixed, run_state8)
from cudasim.helpers import run_batchnorm_f16  # noqa: E402
from cudasim.test_lowp_state8 import TABLE as STATE8_F16_TABLE  # noqa: E402
from cudasim.test_lowp_state8 import BF16_IDS_ALL, BF16_TABLE_ALL, run_pieces, run_state8_bf16, run_state8_f16  # noqa: E402
from fastopt.reference import mixed as ref_mixed  # noqa: E402
from optim_cases import case_id  # noqa: E402


def _skip_reason() -> str:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1: the simulator is not a GPU (tests/cudasim covers it)"
    return backend.unavailable_reason()


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_REASON), reason=f"no GPU: {_REASON}")]

SHAPES = [(2**20 + 3,), (1000,), (7,), (0,), (3, 5, 7)]


@pytest.mark.parametrize("options", MIXED_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("case", MIXED_CASES, ids=case_id)
def test_mixed_step_matches_reference(case, options, rng):
    name, hyper = case
    run_mixed(name, hyper, SHAPES, rng, steps=3, **options)


def test_mixed_sumsq_matches_reference(rng):
    grads = [rng.standard_normal(s).astype(np.float16) for s in SHAPES]
    got = backend.mixed_sumsq([_device(g) for g in grads])
    assert got == pytest.approx(ref_mixed.mixed_sumsq(grads), rel=1e-9)


@pytest.mark.parametrize("case", STATE8_CASES, ids=_state8_id)
def test_state8_step_matches_reference(case, rng):
    op, hyper = case
    run_state8(op, hyper, SHAPES, rng, steps=3, exact=False)


@pytest.mark.parametrize("options", [dict(grad_mul=0.5, grad_clip=1.0, avg=True),
                                     dict(nan_grad=True), dict(block=64), dict(block=2048)],
                         ids=["extras", "nan-block", "block64", "block2048"])
def test_state8_step_options(options, rng):
    op, hyper = STATE8_CASES[1]
    run_state8(op, hyper, SHAPES, rng, steps=2, exact=False, **options)


@pytest.mark.parametrize("case, options", STATE8_F16_TABLE,
                         ids=[_state8_id(c) + "-" + "-".join(f"{k}={v}" for k, v in o.items())
                              for c, o in STATE8_F16_TABLE])
def test_state8_f16_matches_reference(case, options, rng):
    """Every variant, each option set in several configurations (the simulator's table)."""
    op, hyper = case
    run_state8_f16(op, hyper, SHAPES, rng, steps=3, exact=False, **options)


@pytest.mark.parametrize("options", [dict(master=True, rounding="stochastic", grad32=False, nan_grad=True),
                                     dict(master=False, rounding="nearest", grad32=True, block=64),
                                     dict(master=True, rounding="nearest", grad32=False, block=2048)],
                         ids=["nan-block", "block64", "block2048"])
def test_state8_f16_options(options, rng):
    op, hyper = STATE8_CASES[0]
    run_state8_f16(op, hyper, SHAPES, rng, steps=2, exact=False, **options)


@pytest.mark.parametrize("case, options", BF16_TABLE_ALL, ids=BF16_IDS_ALL)
def test_state8_bf16_state_matches_reference(case, options, rng):
    """bfloat16 state (uint16 device arrays), float32 and float16 θ: the simulator's table."""
    op, hyper = case
    run_state8_bf16(op, hyper, SHAPES, rng, steps=3, exact=False, **options)


@pytest.mark.parametrize("options", [dict(low=False, nan_grad=True, avg=True, grad_mul=0.5, grad_clip=1.0),
                                     dict(low=True, master=True, rounding="stochastic", grad32=False, nan_grad=True)],
                         ids=["float32-nan-extras", "float16-nan"])
def test_state8_bf16_state_options(options, rng):
    op, hyper = STATE8_CASES[0]
    run_state8_bf16(op, hyper, SHAPES, rng, steps=2, exact=False, **options)


@pytest.mark.parametrize("state_dtype, cuts", [("bfloat16", [3 * 2**16 + 5, 2**20 - 1]), ("int8", [2**18, 2**19])],
                         ids=["bfloat16", "int8"])
def test_state8_starts_make_pieces_round_as_the_whole_parameter(state_dtype, cuts, rng):
    """Pieces across chunk boundaries (bfloat16 state) or on block boundaries (int8, blocks of 256)."""
    run_pieces(state_dtype, 2**20 + 3, cuts, 256, rng, exact=False)


BN_F16_SHAPES = [((64, 32, 28, 28), 1), ((64, 28, 28, 32), 3), ((4096, 100), 1), ((3, 5, 7), 1), ((2, 3), 1)]


@pytest.mark.parametrize("training, relu, affine", [(True, False, True), (True, True, False), (False, True, True)],
                         ids=["train-linear-affine", "train-relu-plain", "eval-relu-affine"])
@pytest.mark.parametrize("case", BN_F16_SHAPES, ids=lambda c: "x".join(map(str, c[0])) + f"-axis{c[1]}")
def test_batchnorm_f16_is_the_float32_kernels_rounded(case, training, relu, affine, rng):
    shape, axis = case
    run_batchnorm_f16(rng, shape, axis, training=training, relu=relu, affine=affine)
