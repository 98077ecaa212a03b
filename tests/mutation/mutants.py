"""The mutant catalog: single-token bugs planted in the numba CPU kernels and the NumPy reference.

Each entry of ``MUTANTS`` names the file (relative to the repository root), the exact original
snippet (it must occur exactly once in that file; context lines make it unique), its replacement,
a one-line description, a category (``CATEGORIES``) and the selection of tests that must kill it
(a key of ``SELECTIONS``: test files plus an optional ``-k`` expression). ``run.py`` plants each
mutant in a copy of the project and runs its selection; nothing here runs anything.

Rules for a mutant: it changes what the code computes (no equivalent rewrites), it still compiles
and runs (a mutant killed only by a syntax or typing error proves nothing), and it stays in bounds
(numba does not check indices, so an out-of-bounds mutant could crash instead of failing a test).
A "hyperparameter default" mutant hard-codes the value a user gets when not passing the argument,
so it survives every test that only runs that default: exactly the bug the sweeps must catch.
"""

from __future__ import annotations

from dataclasses import dataclass

NUMBA_OPTIM = "kernels/numba_cpu/optim.py"
NUMBA_MULTI = "kernels/numba_cpu/multi.py"
NUMBA_REDUCE = "kernels/numba_cpu/reduce.py"
NUMBA_BATCHNORM = "kernels/numba_cpu/batchnorm.py"
NUMBA_MIXED = "kernels/numba_cpu/mixed.py"
NUMBA_STATE8 = "kernels/numba_cpu/state8.py"
NUMBA_QUANTIZE = "kernels/numba_cpu/quantize.py"
REF_OPTIM = "fastopt/reference/optim.py"
REF_EXTRAS = "fastopt/reference/extras.py"
REF_BATCHNORM = "fastopt/reference/batchnorm.py"

CATEGORIES = {
    "swapped operands": "two operands of an expression exchanged",
    "dropped term": "a term or factor of an equation left out",
    "hyperparameter default": "a hyperparameter replaced by its default value (the user's value ignored)",
    "off-by-one": "a loop bound, chunk boundary, index or step count off by one",
    "layout stride": "an element read from the wrong row or sample of the array layout",
    "wrong operator": "a comparison, sign, function or variable replaced by a near neighbour",
}

# The areas a mutant belongs to (the catalog test checks that each is covered).
AREAS = ("optimizer", "extras", "batchnorm")


@dataclass(frozen=True)
class Selection:
    """The pytest arguments that must kill a mutant: test files (relative to the repository root)
    and an optional ``-k`` expression."""

    files: tuple[str, ...]
    k: str | None = None

    def args(self) -> list[str]:
        return [*self.files, *(["-k", self.k] if self.k else [])]

    def __str__(self) -> str:
        return " ".join(self.files) + (f' -k "{self.k}"' if self.k else "")


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    description: str
    category: str
    area: str  # one of AREAS
    selection: str  # a key of SELECTIONS

    @property
    def backend(self) -> str:
        return "numpy" if self.file.startswith("fastopt/reference/") else "numba"


def _optim(name: str) -> Selection:
    """The numba kernels of one optimizer against the float64 reference (all its cases, both
    dtypes; the 2**20 + 3 size left out: one part is enough for an element update)."""
    return Selection(("tests/test_optim_backends.py",), f"{name} and numba and not 1048579")


SWEEP_OPTIM = "tests/test_sweep_optim.py"
SWEEP_BATCHNORM = "tests/test_sweep_batchnorm.py"

SELECTIONS: dict[str, Selection] = {
    # numba optimizer kernels against the reference
    "optim-sgd": _optim("sgd"),
    "optim-adagrad": _optim("adagrad"),
    "optim-rmsprop": _optim("rmsprop"),
    "optim-adadelta": _optim("adadelta"),
    "optim-adam": _optim("adam"),
    "optim-delta-bar-delta": _optim("delta_bar_delta"),
    # several parts per kernel call: chunk boundaries of the tensor table
    "optim-large": Selection(("tests/test_optim_backends.py",), "sgd and numba and 131075"),
    # the NumPy reference against steps computed by hand (no numba)
    "reference-optim": Selection(("tests/test_reference_optim.py",)),
    # torch's maximize, dampening and lr_decay: the reference and the kernels' lowering against torch.optim
    "torch-options": Selection(("tests/test_torch_options.py",)),
    # an infinite parameter with zero weight decay, both backends (the L2 term must be skipped)
    "zero-decay": Selection(("tests/test_optim_backends.py",), "zero_weight_decay"),
    # every optimizer x convention x switch x dtype at random non-default hyperparameters, numba
    # against the reference (the numpy-backend cases compare the reference with itself: a mutant
    # of the reference is killed by the numba cases too)
    "sweep-adagrad": Selection((SWEEP_OPTIM,), "adagrad and numba"),
    "sweep-rmsprop": Selection((SWEEP_OPTIM,), "rmsprop and numba"),
    "sweep-adadelta": Selection((SWEEP_OPTIM,), "adadelta and numba"),
    "sweep-adam": Selection((SWEEP_OPTIM,), "adam and numba"),  # adam and adamw
    # training-step extras: numba kernels against the reference (grad_mul, clip with NaN/inf, Polyak)
    "extras-numba": Selection(("tests/test_numba_extras.py",),
                              "(extras_match and sgd and not 1048579) or clip_passes_nan"),
    # extras through the optimizer classes on the reference backend (no numba)
    "extras-numpy": Selection(("tests/test_step_extras.py",), "numpy"),
    # the compiled test of a step's gradients against the full checks
    "grads-match": Selection(("tests/test_numba_extras.py",), "grads_match"),
    # gradient reductions and scaling (numba), against the reference and float64 sums
    "reduce": Selection(("tests/test_numba_extras.py",), "grad_sumsq or grad_multiplier or scale_grads"),
    # block-wise quantization (numba) against the reference, code for code
    "quantize": Selection(("tests/test_quantize.py",), "numba"),
    # batch norm against the float64 reference
    "batchnorm-numba": Selection(("tests/test_batchnorm.py",),
                                         "test_backend_matches_float64_reference and numba and not axis-1"),
    "batchnorm-channels-last": Selection(("tests/test_batchnorm.py",),
                                         "test_backend_matches_float64_reference and numba and axis-1"),
    "batchnorm-medium": Selection(("tests/test_batchnorm.py",), "medium_shapes"),
    # the streaming-store paths at small sizes and at every alignment of the output (the head and
    # tail loops around the streamed lines run only when the output does not start or end on a
    # 64-byte line, which for test_batchnorm's arrays depends on the allocator)
    "batchnorm-streaming": Selection(("tests/test_allocations_batchnorm.py",), "streaming"),
    # the reference batch norm: numba against it, finite differences of its backward
    "batchnorm-reference": Selection(("tests/test_batchnorm.py",),
                                     "(test_backend_matches_float64_reference and numba) or finite_differences"),
    # batch norm eps and momentum away from their defaults (numba against the reference)
    "sweep-batchnorm": Selection((SWEEP_BATCHNORM,), "numba"),
    # 16-bit parameters (mixed.py): every optimizer with master weights, Adam's variants, the
    # Polyak average and norm clipping of 16-bit gradients, against the reference
    "mixed": Selection(("tests/test_mixed_precision.py",),
                       "every_optimizer or adam_variants or polyak or norm_clipping"),
    # 8-bit state (state8.py): codes, absmax and parameters bit for bit against the reference
    "state8": Selection(("tests/test_state8.py",), "kernel_matches_reference or extras_match or parallel_kernel"),
    # 8-bit state with 16-bit parameters (state8.py's 16-bit variants), bit for bit against the reference
    "state8-16bit": Selection(("tests/test_state8_optim.py",), "16_bit_parameters_with_8_bit_state"),
}


def _m(id, file, original, replacement, description, category, area, selection):
    return Mutant(id, file, original, replacement, description, category, area, selection)


MUTANTS: list[Mutant] = [
    # ----------------------------------------------------------------- numba optimizer kernels
    _m("numba-sgd-l2-swapped", NUMBA_OPTIM,
       "return p - lr * _l2(g, p, weight_decay)",
       "return p - lr * _l2(p, g, weight_decay)",
       "plain SGD: the L2 term computed as θ + λg instead of g + λθ",
       "swapped operands", "optimizer", "optim-sgd"),
    _m("numba-sgd-momentum-dropped", NUMBA_OPTIM,
       "v = momentum * velocity[i] + c * g\n",
       "v = c * g\n",
       "SGD momentum: the αv term of the velocity update dropped",
       "dropped term", "optimizer", "optim-sgd"),
    _m("numba-sgd-nesterov-step-dropped", NUMBA_OPTIM,
       "return p + momentum * v - step",
       "return p + momentum * v",
       "textbook Nesterov: the −εg term of the look-ahead update dropped",
       "dropped term", "optimizer", "optim-sgd"),
    _m("numba-sgd-nesterov-torch-swapped", NUMBA_OPTIM,
       "return p - lr * (g + momentum * b)",
       "return p - lr * (b + momentum * g)",
       "torch Nesterov: θ − ε(b + αg) instead of θ − ε(g + αb)",
       "swapped operands", "optimizer", "optim-sgd"),
    _m("numba-adagrad-accumulator-dropped", NUMBA_OPTIM,
       "r = accumulator[i] + g * g",
       "r = g * g",
       "AdaGrad: the accumulated r dropped from r ← r + g²",
       "dropped term", "optimizer", "optim-adagrad"),
    _m("numba-adagrad-eps-default", NUMBA_OPTIM,
       "return _adagrad, (0,), (lr, eps, weight_decay)",
       "return _adagrad, (0,), (lr, 1e-7, weight_decay)",
       "AdaGrad: δ hard-coded to its default 1e-7",
       "hyperparameter default", "optimizer", "optim-adagrad"),
    _m("numba-rmsprop-rho-default", NUMBA_OPTIM,
       "    one_minus_rho = 1.0 - rho\n    eps_in, eps_out",
       "    rho = 0.9\n    one_minus_rho = 1.0 - rho\n    eps_in, eps_out",
       "RMSProp (every kernel): ρ hard-coded to its default 0.9",
       "hyperparameter default", "optimizer", "sweep-rmsprop"),
    _m("numba-rmsprop-eps-default", NUMBA_OPTIM,
       "    one_minus_rho = 1.0 - rho\n    eps_in, eps_out",
       "    eps = 1e-6\n    one_minus_rho = 1.0 - rho\n    eps_in, eps_out",
       "RMSProp (every kernel): δ hard-coded to its default 1e-6",
       "hyperparameter default", "optimizer", "sweep-rmsprop"),
    _m("numba-rmsprop-eps-convention-swapped", NUMBA_OPTIM,
       'eps_in, eps_out = (eps, 0.0) if convention == "textbook" else (0.0, eps)',
       'eps_in, eps_out = (0.0, eps) if convention == "textbook" else (eps, 0.0)',
       "RMSProp: δ outside the root for textbook and inside for torch",
       "swapped operands", "optimizer", "optim-rmsprop"),
    _m("numba-rmsprop-centered-dropped", NUMBA_OPTIM,
       "d = math.sqrt(eps_in + r - a * a) + eps_out",
       "d = math.sqrt(eps_in + r) + eps_out",
       "centered RMSProp with momentum: the −s⊙s term dropped from the denominator",
       "dropped term", "optimizer", "optim-rmsprop"),
    _m("numba-rmsprop-nesterov-swapped", NUMBA_OPTIM,
       "math.sqrt(eps + r)\n    v = momentum * velocity[i] - u\n    velocity[i] = v\n    return p + momentum * v - u",
       "math.sqrt(eps + r)\n    v = momentum * velocity[i] - u\n    velocity[i] = v\n    return p + momentum * u - v",
       "RMSProp Nesterov: θ + αu − v instead of θ + αv − u",
       "swapped operands", "optimizer", "optim-rmsprop"),
    _m("numba-adadelta-rho-default", NUMBA_OPTIM,
       "return _adadelta, (0, 1), (lr, rho, 1.0 - rho, eps, c, weight_decay)",
       "return _adadelta, (0, 1), (lr, 0.9, 1.0 - 0.9, eps, c, weight_decay)",
       "AdaDelta: ρ hard-coded to its default 0.9 (the bug of issue 15)",
       "hyperparameter default", "optimizer", "sweep-adadelta"),
    _m("numba-adadelta-eps-default", NUMBA_OPTIM,
       "return _adadelta, (0, 1), (lr, rho, 1.0 - rho, eps, c, weight_decay)",
       "return _adadelta, (0, 1), (lr, rho, 1.0 - rho, 1e-6, c, weight_decay)",
       "AdaDelta: δ hard-coded to its default 1e-6",
       "hyperparameter default", "optimizer", "sweep-adadelta"),
    _m("numba-adadelta-ratio-swapped", NUMBA_OPTIM,
       "delta = math.sqrt(u + eps) / math.sqrt(r + eps) * g",
       "delta = math.sqrt(r + eps) / math.sqrt(u + eps) * g",
       "AdaDelta: Δ = √(r + δ)/√(u + δ)·g, the ratio upside down",
       "swapped operands", "optimizer", "optim-adadelta"),
    _m("numba-adadelta-convention-swapped", NUMBA_OPTIM,
       'c = lr if convention == "textbook" else 1.0',
       'c = 1.0 if convention == "textbook" else lr',
       "AdaDelta: u accumulates Δ² for textbook and (εΔ)² for torch",
       "swapped operands", "optimizer", "optim-adadelta"),
    _m("numba-adam-eps-default", NUMBA_OPTIM,
       "beta2, 1.0 - beta2, eps, l2, decay)",
       "beta2, 1.0 - beta2, 1e-8, l2, decay)",
       "Adam/AdamW: δ hard-coded to its default 1e-8",
       "hyperparameter default", "optimizer", "sweep-adam"),
    _m("numba-adam-beta1-default", NUMBA_OPTIM,
       "amsgrad):\n    step_size = lr / (1.0 - beta1 ** step)",
       "amsgrad):\n    beta1 = 0.9\n    step_size = lr / (1.0 - beta1 ** step)",
       "Adam/AdamW: β1 hard-coded to its default 0.9",
       "hyperparameter default", "optimizer", "sweep-adam"),
    _m("numba-adam-beta2-default", NUMBA_OPTIM,
       "amsgrad):\n    step_size = lr / (1.0 - beta1 ** step)",
       "amsgrad):\n    beta2 = 0.999\n    step_size = lr / (1.0 - beta1 ** step)",
       "Adam/AdamW: β2 hard-coded to its default 0.999",
       "hyperparameter default", "optimizer", "sweep-adam"),
    _m("numba-adam-bias-correction-step", NUMBA_OPTIM,
       "inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - beta2 ** step)",
       "inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - beta2 ** (step + 1))",
       "Adam: the second-moment bias correction one step ahead, 1 − β2^(t+1)",
       "off-by-one", "optimizer", "optim-adam"),
    _m("numba-adamw-decay-lr-dropped", NUMBA_OPTIM,
       "l2, decay = 0.0, lr * weight_decay",
       "l2, decay = 0.0, weight_decay",
       "AdamW: the decoupled decay θ ← θ − λθ, without the factor ε",
       "dropped term", "optimizer", "optim-adam"),
    _m("numba-adam-amsgrad-max-dropped", NUMBA_OPTIM,
       "return p - step_size * mi / (eps + math.sqrt(vmax) * inv_sqrt_bc2)",
       "return p - step_size * mi / (eps + math.sqrt(vi) * inv_sqrt_bc2)",
       "amsgrad: the update divides by √v instead of √v_max",
       "dropped term", "optimizer", "optim-adam"),
    _m("numba-dbd-new-rate-used", NUMBA_OPTIM,
       "return p - e * g",
       "return p - new_e * g",
       "delta-bar-delta: θ moves with this step's changed rate instead of the previous one",
       "wrong operator", "optimizer", "optim-delta-bar-delta"),
    _m("numba-dbd-gamma-swapped", NUMBA_OPTIM,
       "delta_bar[i] = one_minus_gamma * g + gamma * db",
       "delta_bar[i] = gamma * g + one_minus_gamma * db",
       "delta-bar-delta: δ̄ ← γg + (1 − γ)δ̄",
       "swapped operands", "optimizer", "optim-delta-bar-delta"),
    # --------------------------------------------------------- numba extras, tensor table, reductions
    _m("numba-clip-sign", NUMBA_OPTIM,
       "elif g < -grad_clip:\n        g = -grad_clip",
       "elif g < -grad_clip:\n        g = grad_clip",
       "grad_clip: a gradient below −c is clamped to +c",
       "wrong operator", "extras", "extras-numba"),
    _m("numba-clip-nan-clamped", NUMBA_OPTIM,
       "    if g > grad_clip:\n        g = grad_clip",
       "    if not g <= grad_clip:\n        g = grad_clip",
       "grad_clip: NaN is clamped to +c instead of passing through (non-finite handling)",
       "wrong operator", "extras", "extras-numba"),
    _m("numba-grad-mul-index", NUMBA_OPTIM,
       "grad_mul = hyper[_SCALARS]\n",
       "grad_mul = hyper[_SCALARS + 1]\n",
       "the part runner reads grad_clip as grad_mul (scalar index one too far)",
       "off-by-one", "extras", "extras-numba"),
    _m("numba-polyak-swapped", NUMBA_OPTIM,
       "avg[i] = a + avg_weight * (p - a)",
       "avg[i] = a + avg_weight * (a - p)",
       "Polyak average moved away from θ: θ̂ + w(θ̂ − θ)",
       "swapped operands", "extras", "extras-numba"),
    _m("numba-l2-zero-decay-nonfinite", NUMBA_OPTIM,
       "    if weight_decay != 0:\n        return g + weight_decay * p",
       "    if weight_decay >= 0:\n        return g + weight_decay * p",
       "L2 term added even when λ = 0: g + 0·θ turns an infinite θ into NaN (non-finite handling)",
       "wrong operator", "extras", "zero-decay"),
    _m("numba-piece-tail-skip", NUMBA_OPTIM,
       "j0, j1 = (i0, split) if piece == 0 else (split, i1)",
       "j0, j1 = (i0, split) if piece == 0 else (split + 1, i1)",
       "update loop: the aligned piece starts one element late (one element per piece skipped)",
       "off-by-one", "optimizer", "optim-sgd"),
    _m("numba-part-range-skip", NUMBA_MULTI,
       "return total * part // parts, total * (part + 1) // parts",
       "return total * part // parts + 1, total * (part + 1) // parts",
       "tensor table: every part starts one element late (the first element of each part skipped)",
       "off-by-one", "optimizer", "optim-large"),
    _m("numba-gather-offsets-short", NUMBA_MULTI,
       "offsets[t + 1] = offsets[t] + size\n        if grads != 0:",
       "offsets[t + 1] = offsets[t] + size - 1\n        if grads != 0:",
       "tensor table: each tensor's extent one element short (its last element never updated)",
       "off-by-one", "optimizer", "optim-sgd"),
    _m("numba-grads-match-16bit-width", NUMBA_MULTI,
       "            size = 4\n",
       "            size = 2\n",
       "gradient test: a 16-bit parameter's float32 gradient measured at 2 bytes an element (an overlap "
       "with a written array missed)", "wrong operator", "optimizer", "grads-match"),
    _m("numba-sumsq-span-skip", NUMBA_REDUCE,
       "for i in range(i0, i1):\n        value",
       "for i in range(i0 + 1, i1):\n        value",
       "grad_sumsq: each span's first element left out of Σg²",
       "off-by-one", "extras", "reduce"),
    _m("numba-sumsq-parts-skip", NUMBA_REDUCE,
       "for value in sums.tolist():",
       "for value in sums.tolist()[1:]:",
       "grad_sumsq: the first part's partial sum left out when there are several parts",
       "off-by-one", "extras", "reduce"),
    _m("numba-scale-tail-short", NUMBA_REDUCE,
       "for i in range(split, i1):",
       "for i in range(split, i1 - 1):",
       "scale_grads_: the last element of each tensor piece not scaled",
       "off-by-one", "extras", "reduce"),
    _m("numba-quantize-last-block-dropped", NUMBA_QUANTIZE,
       "(first + block - 1) // block, (end + block - 1) // block)",
       "(first + block - 1) // block, end // block)",
       "quantize_blockwise: a part's blocks end at the last whole block (a short last block never quantized)",
       "off-by-one", "extras", "quantize"),
    _m("numba-multiplier-inv-scale-dropped", NUMBA_REDUCE,
       "coef = max_norm / (math.sqrt(sumsq) * inv_scale + 1e-6)",
       "coef = max_norm / (math.sqrt(sumsq) + 1e-6)",
       "clip-by-norm factor: the norm not unscaled by inv_scale before comparing with max_norm",
       "dropped term", "extras", "reduce"),
    _m("numba-multiplier-nan", NUMBA_REDUCE,
       "if math.isnan(coef):",
       "if math.isinf(coef):",
       "clip-by-norm factor: a NaN norm gives the factor inv_scale instead of NaN (non-finite handling)",
       "wrong operator", "extras", "reduce"),
    # --------------------------------------------- numba 16-bit parameters and 8-bit state
    _m("numba-mixed-master-not-written", NUMBA_MIXED,
       "            if _MASTER is not None:\n                copy[i] = p",
       "            if _MASTER is not None:\n                copy[i] = copy[i]",
       "16-bit parameters: the float32 master copy never updated (θ rounded from the new value once)",
       "dropped term", "optimizer", "mixed"),
    _m("numba-mixed-average-swapped", NUMBA_MIXED,
       "avg[i] = a + avg_weight * (p - a)",
       "avg[i] = a + avg_weight * (a - p)",
       "16-bit parameters: the Polyak average moves away from the parameter",
       "swapped operands", "extras", "mixed"),
    _m("numba-mixed-grad-transform-dropped", NUMBA_MIXED,
       "g = _optim._transformed(g, grad_mul, grad_clip)",
       "g = g",
       "16-bit parameters: the gradient multiplier (loss scale, norm clipping) and clamp not applied",
       "dropped term", "extras", "mixed"),
    _m("numba-mixed-stochastic-first-key", NUMBA_MIXED,
       "key = table[t, KEY]",
       "key = table[0, KEY]",
       "16-bit parameters, stochastic rounding: every tensor draws with the first tensor's key",
       "layout stride", "optimizer", "mixed"),
    _m("numba-state8-stochastic-first-key", NUMBA_STATE8,
       "key = table[t, _KEY]",
       "key = table[0, _KEY]",
       "8-bit state, 16-bit parameters rounded stochastically: every tensor draws with the first tensor's key",
       "layout stride", "optimizer", "state8-16bit"),
    _m("numba-state8-absmax-sign-kept", NUMBA_STATE8,
       "bits0 = larger(bits0, f32_bits(s0) & _ABS_BITS)",
       "bits0 = larger(bits0, f32_bits(s0))",
       "8-bit state: a block's absmax taken over the signed bit patterns (a negative value reads as NaN)",
       "dropped term", "optimizer", "state8"),
    _m("numba-state8-second-absmax", NUMBA_STATE8,
       "a1 = absmax1[b] if _STATES8 > 1 else zero_f",
       "a1 = absmax0[b] if _STATES8 > 1 else zero_f",
       "8-bit state: the second state decoded with the first state's block absmax",
       "wrong operator", "optimizer", "state8"),
    # ------------------------------------------------------------------- numba batch norm
    _m("numba-bn-eps-default", NUMBA_BATCHNORM,
       "outer, span, float(eps), float(momentum),",
       "outer, span, 1e-5, float(momentum),",
       "batch norm training: eps hard-coded to its default 1e-5",
       "hyperparameter default", "batchnorm", "sweep-batchnorm"),
    _m("numba-bn-momentum-default", NUMBA_BATCHNORM,
       "outer, span, float(eps), float(momentum),",
       "outer, span, float(eps), 0.1,",
       "batch norm: momentum of the running statistics hard-coded to its default 0.1",
       "hyperparameter default", "batchnorm", "sweep-batchnorm"),
    _m("numba-bn-eval-eps-default", NUMBA_BATCHNORM,
       "_running_statistics(running_mean, running_var, float(eps), stats)",
       "_running_statistics(running_mean, running_var, 1e-5, stats)",
       "batch norm eval: eps hard-coded to its default 1e-5",
       "hyperparameter default", "batchnorm", "sweep-batchnorm"),
    _m("numba-bn-running-mean-swapped", NUMBA_BATCHNORM,
       "running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c]",
       "running_mean[c] = momentum * running_mean[c] + (1.0 - momentum) * mean[c]",
       "batch norm: running_mean ← α·running_mean + (1 − α)·μ",
       "swapped operands", "batchnorm", "batchnorm-numba"),
    _m("numba-bn-running-var-biased", NUMBA_BATCHNORM,
       "momentum * (m2[c] / (count - 1.0))",
       "momentum * (m2[c] / count)",
       "batch norm: running_var takes the biased variance M2/m instead of M2/(m − 1)",
       "off-by-one", "batchnorm", "batchnorm-numba"),
    _m("numba-bn-backward-last-chunk", NUMBA_BATCHNORM,
       "        sum_gx = 0.0\n        for k in range(chunks):",
       "        sum_gx = 0.0\n        for k in range(chunks - 1):",
       "batch norm backward: the last reduction chunk's Σg and Σg·(x − μ) left out",
       "off-by-one", "batchnorm", "batchnorm-numba"),
    _m("numba-bn-block-skip", NUMBA_BATCHNORM,
       "b1 = min(b0 + _BLOCK, e1)",
       "b1 = min(b0 + _BLOCK - 1, e1)",
       "channel-first statistics: a full block stops one value early (one value per block skipped)",
       "off-by-one", "batchnorm", "batchnorm-numba"),
    _m("numba-bn-backward-invstd-dropped", NUMBA_BATCHNORM,
       "coef[1, c] = -k1 * invstd * sum_g_xhat / m",
       "coef[1, c] = -k1 * sum_g_xhat / m",
       "batch norm backward: the x̂·Σg·x̂/m term without its factor invstd",
       "dropped term", "batchnorm", "batchnorm-numba"),
    _m("numba-bn-backward-eval-as-training", NUMBA_BATCHNORM,
       "if training and m > 0:",
       "if m > 0:",
       "batch norm backward with training=False: μ and σ treated as depending on x",
       "dropped term", "batchnorm", "batchnorm-channels-last"),
    _m("numba-bn-grad-sample-stride", NUMBA_BATCHNORM,
       "seg_g, seg_gx = _sum_grad(dy[n, c, i:stop], x[n, c, i:stop], mean)",
       "seg_g, seg_gx = _sum_grad(dy[0, c, i:stop], x[n, c, i:stop], mean)",
       "channel-first backward reduction: dy read from sample 0 for every sample (batch stride 0)",
       "layout stride", "batchnorm", "batchnorm-numba"),
    _m("numba-bn-row-stride", NUMBA_BATCHNORM,
       "x2 = x[n + 2]",
       "x2 = x[n + 1]",
       "channels-last float64 statistics: row n + 1 read twice, row n + 2 never (row stride)",
       "layout stride", "batchnorm", "batchnorm-channels-last"),
    _m("numba-bn-tail-channels-row", NUMBA_BATCHNORM,
       "                        x0 = x[n]\n                        for j in range(c, channels):\n"
       "                            d0 = x0[j] - base[j]",
       "                        x0 = x[r0]\n                        for j in range(c, channels):\n"
       "                            d0 = x0[j] - base[j]",
       "channels-last float32 statistics, last C mod 8 channels: the block's first row read for every row",
       "layout stride", "batchnorm", "batchnorm-channels-last"),
    _m("numba-bn-reduce-rows-short", NUMBA_BATCHNORM,
       "n1 = (k + 1) * rows // chunks\n        acc_g = part_g[k]",
       "n1 = (k + 1) * rows // chunks - 1\n        acc_g = part_g[k]",
       "channels-last backward reduction: the last row of each chunk left out",
       "off-by-one", "batchnorm", "batchnorm-channels-last"),
    _m("numba-bn-normalize-rows-short", NUMBA_BATCHNORM,
       "n1 = min(n0 + per_task, rows)\n        if stream:\n            src = x[n0:n1].reshape(-1)",
       "n1 = min(n0 + per_task - 1, rows)\n        if stream:\n            src = x[n0:n1].reshape(-1)",
       "channels-last normalize: the last row of each task left unwritten",
       "off-by-one", "batchnorm", "batchnorm-medium"),
    _m("numba-bn-stream-channel-phase", NUMBA_BATCHNORM,
       "j = body % channels  # the task starts a row, so element i is channel i mod C\n"
       "            for i in range(body, m):\n                v = ",
       "j = (body + 1) % channels  # the task starts a row, so element i is channel i mod C\n"
       "            for i in range(body, m):\n                v = ",
       "channels-last streaming normalize: the tail after the streamed lines starts one channel off",
       "off-by-one", "batchnorm", "batchnorm-streaming"),
    # ----------------------------------------------------------------- NumPy reference optimizers
    _m("numpy-l2-swapped", REF_OPTIM,
       "return grad + weight_decay * param",
       "return param + weight_decay * grad",
       "reference L2: θ + λg instead of g + λθ",
       "swapped operands", "optimizer", "reference-optim"),
    _m("numpy-sgd-momentum-dropped", REF_OPTIM,
       "velocity[...] = momentum * velocity - lr * g",
       "velocity[...] = velocity - lr * g",
       "reference SGD textbook momentum: the factor α of v ← αv − εg dropped",
       "dropped term", "optimizer", "reference-optim"),
    _m("numpy-sgd-nesterov-torch-swapped", REF_OPTIM,
       "param[...] = param - lr * (g + momentum * velocity)",
       "param[...] = param - lr * (velocity + momentum * g)",
       "reference torch Nesterov: θ − ε(b + αg)",
       "swapped operands", "optimizer", "reference-optim"),
    _m("numpy-adagrad-eps-default", REF_OPTIM,
       "param[...] = param - lr * g / (eps + np.sqrt(accumulator))",
       "param[...] = param - lr * g / (1e-7 + np.sqrt(accumulator))",
       "reference AdaGrad: δ hard-coded to its default 1e-7",
       "hyperparameter default", "optimizer", "sweep-adagrad"),
    _m("numpy-rmsprop-rho-default", REF_OPTIM,
       "    g = _l2(_ascent(grad, maximize), param, weight_decay)\n"
       "    square_avg[...] = rho * square_avg + (1 - rho) * g * g\n"
       "    r = square_avg",
       "    rho = 0.9\n    g = _l2(_ascent(grad, maximize), param, weight_decay)\n"
       "    square_avg[...] = rho * square_avg + (1 - rho) * g * g\n    r = square_avg",
       "reference RMSProp: ρ hard-coded to its default 0.9",
       "hyperparameter default", "optimizer", "sweep-rmsprop"),
    _m("numpy-rmsprop-centered-dropped", REF_OPTIM,
       "d = np.sqrt(r - s * s) + eps",
       "d = np.sqrt(r) + eps",
       "reference torch centered RMSProp: the −s⊙s term dropped",
       "dropped term", "optimizer", "reference-optim"),
    _m("numpy-adadelta-rho-default", REF_OPTIM,
       "    g = _l2(_ascent(grad, maximize), param, weight_decay)\n"
       "    square_avg[...] = rho * square_avg + (1 - rho) * g * g\n"
       "    delta =",
       "    rho = 0.9\n    g = _l2(_ascent(grad, maximize), param, weight_decay)\n"
       "    square_avg[...] = rho * square_avg + (1 - rho) * g * g\n    delta =",
       "reference AdaDelta: ρ hard-coded to its default 0.9",
       "hyperparameter default", "optimizer", "sweep-adadelta"),
    _m("numpy-adadelta-eps-default", REF_OPTIM,
       "delta = np.sqrt(acc_delta + eps) / np.sqrt(square_avg + eps) * g",
       "delta = np.sqrt(acc_delta + 1e-6) / np.sqrt(square_avg + 1e-6) * g",
       "reference AdaDelta: δ hard-coded to its default 1e-6",
       "hyperparameter default", "optimizer", "sweep-adadelta"),
    _m("numpy-adadelta-applied-dropped", REF_OPTIM,
       "applied = lr * delta",
       "applied = delta",
       "reference textbook AdaDelta: u accumulates Δ² instead of the applied step (εΔ)²",
       "dropped term", "optimizer", "reference-optim"),
    _m("numpy-sgd-dampening-first-step", REF_OPTIM,
       "    if dampening != 0 and step > 1:",
       "    if dampening != 0:",
       "reference SGD: dampening applied on the first update too (torch copies g undamped)",
       "off-by-one", "optimizer", "torch-options"),
    _m("numpy-adagrad-lr-decay-from-zero", REF_OPTIM,
       "    lr = lr / (1 + (int(step) - 1) * float(lr_decay))",
       "    lr = lr / (1 + int(step) * float(lr_decay))",
       "reference AdaGrad: lr_decay counted from t instead of t − 1",
       "off-by-one", "optimizer", "torch-options"),
    _m("numpy-adam-eps-default", REF_OPTIM,
       "param[...] = param - lr * m_hat / (eps + np.sqrt(v_hat))",
       "param[...] = param - lr * m_hat / (1e-8 + np.sqrt(v_hat))",
       "reference Adam: δ hard-coded to its default 1e-8",
       "hyperparameter default", "optimizer", "sweep-adam"),
    _m("numpy-adam-beta1-bias-default", REF_OPTIM,
       "bias_correction1 = float(1 - beta1 ** int(step))",
       "bias_correction1 = float(1 - 0.9 ** int(step))",
       "reference Adam: the first bias correction uses the default β1 = 0.9",
       "hyperparameter default", "optimizer", "sweep-adam"),
    _m("numpy-adam-beta2-default", REF_OPTIM,
       "        g = _l2(grad, param, weight_decay)\n\n    m[...] = beta1 * m",
       "        g = _l2(grad, param, weight_decay)\n    beta2 = 0.999\n\n    m[...] = beta1 * m",
       "reference Adam: β2 hard-coded to its default 0.999",
       "hyperparameter default", "optimizer", "sweep-adam"),
    _m("numpy-adam-bias-correction-step", REF_OPTIM,
       "bias_correction1 = float(1 - beta1 ** int(step))",
       "bias_correction1 = float(1 - beta1 ** (int(step) + 1))",
       "reference Adam: the first bias correction one step ahead, 1 − β1^(t+1)",
       "off-by-one", "optimizer", "reference-optim"),
    _m("numpy-adamw-decay-lr-dropped", REF_OPTIM,
       "param[...] = param - lr * weight_decay * param",
       "param[...] = param - weight_decay * param",
       "reference AdamW: the decoupled decay without the factor ε",
       "dropped term", "optimizer", "reference-optim"),
    _m("numpy-amsgrad-minimum", REF_OPTIM,
       "np.maximum(v_max, v, out=v_max)",
       "np.minimum(v_max, v, out=v_max)",
       "reference amsgrad: a running minimum instead of the maximum",
       "wrong operator", "optimizer", "reference-optim"),
    _m("numpy-dbd-gamma-swapped", REF_OPTIM,
       "delta_bar[...] = (1 - gamma) * grad + gamma * delta_bar",
       "delta_bar[...] = gamma * grad + (1 - gamma) * delta_bar",
       "reference delta-bar-delta: δ̄ ← γg + (1 − γ)δ̄",
       "swapped operands", "optimizer", "reference-optim"),
    _m("numpy-dbd-phi-rate-dropped", REF_OPTIM,
       "rates - phi * rates, rates",
       "rates - phi, rates",
       "reference delta-bar-delta: a disagreeing rate shrinks by φ instead of φe",
       "dropped term", "optimizer", "reference-optim"),
    # ----------------------------------------------------------------- NumPy reference extras
    _m("numpy-clip-nan-clamped", REF_EXTRAS,
       "g = np.where(g > c, c, np.where(g < -c, -c, g))",
       "g = np.where(g > c, c, np.where(g >= -c, g, -c))",
       "reference grad_clip: NaN is clamped to −c instead of passing through (non-finite handling)",
       "wrong operator", "extras", "extras-numba"),
    _m("numpy-grad-mul-skipped-below-one", REF_EXTRAS,
       "if grad_mul != 1.0:",
       "if grad_mul > 1.0:",
       "reference grad_mul: a factor below 1 (unscaling, clip by norm) is not applied",
       "wrong operator", "extras", "extras-numpy"),
    _m("numpy-polyak-swapped", REF_EXTRAS,
       "avg[...] = avg + param.dtype.type(avg_weight) * (param - avg)",
       "avg[...] = avg + param.dtype.type(avg_weight) * (avg - param)",
       "reference Polyak average moved away from θ",
       "swapped operands", "extras", "extras-numpy"),
    _m("numpy-multiplier-inv-scale-dropped", REF_EXTRAS,
       "coef = max_norm / (math.sqrt(sumsq) * inv_scale + 1e-6)",
       "coef = max_norm / (math.sqrt(sumsq) + 1e-6)",
       "reference clip-by-norm factor: the norm not unscaled by inv_scale",
       "dropped term", "extras", "extras-numpy"),
    _m("numpy-l2-zero-decay-nonfinite", REF_OPTIM,
       "if weight_decay == 0:\n        return grad",
       "if weight_decay < 0:\n        return grad",
       "reference L2 term added even when λ = 0: g + 0·θ turns an infinite θ into NaN (non-finite handling)",
       "wrong operator", "extras", "zero-decay"),
    # ----------------------------------------------------------------- NumPy reference batch norm
    _m("numpy-bn-eps-default", REF_BATCHNORM,
       "invstd = 1.0 / np.sqrt(var + eps)",
       "invstd = 1.0 / np.sqrt(var + 1e-5)",
       "reference batch norm training: eps hard-coded to its default 1e-5",
       "hyperparameter default", "batchnorm", "sweep-batchnorm"),
    _m("numpy-bn-eval-eps-default", REF_BATCHNORM,
       "invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)",
       "invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + 1e-5)",
       "reference batch norm eval: eps hard-coded to its default 1e-5",
       "hyperparameter default", "batchnorm", "sweep-batchnorm"),
    _m("numpy-bn-momentum-default", REF_BATCHNORM,
       "        if running_mean is not None:\n            running_mean[...]",
       "        if running_mean is not None:\n            momentum = 0.1\n            running_mean[...]",
       "reference batch norm: momentum hard-coded to its default 0.1",
       "hyperparameter default", "batchnorm", "sweep-batchnorm"),
    _m("numpy-bn-bessel-swapped", REF_BATCHNORM,
       "momentum * var * (m / (m - 1))",
       "momentum * var * ((m - 1) / m)",
       "reference batch norm: running_var scaled by (m − 1)/m instead of m/(m − 1)",
       "swapped operands", "batchnorm", "batchnorm-reference"),
    _m("numpy-bn-backward-mean-term-dropped", REF_BATCHNORM,
       "dx[...] = scale * (g - sum_g.reshape(shape) / m - x_hat",
       "dx[...] = scale * (g - x_hat",
       "reference batch norm backward: the −Σg/m term of dx dropped",
       "dropped term", "batchnorm", "batchnorm-reference"),
    _m("numpy-bn-relu-mask-bias-dropped", REF_BATCHNORM,
       "g = np.where(gamma.reshape(shape) * x_hat + beta.reshape(shape) > 0.0, g, 0.0)",
       "g = np.where(gamma.reshape(shape) * x_hat > 0.0, g, 0.0)",
       "reference batch norm backward: the ReLU mask computed without β",
       "dropped term", "batchnorm", "batchnorm-reference"),
    _m("numpy-bn-normalize-mean-stride", REF_BATCHNORM,
       "x_hat = (x64 - mean.reshape(shape)) * invstd.reshape(shape)\n    out",
       "x_hat = (x64 - mean.reshape(shape)[..., :1]) * invstd.reshape(shape)\n    out",
       "reference batch norm forward: channel 0's mean broadcast to every channel when channels are last "
       "(the last axis sliced instead of the channel axis)",
       "layout stride", "batchnorm", "batchnorm-reference"),
]
