"""Which optimizer configurations keep 8-bit (or bfloat16) state, for every backend's kernels.

Pure Python, shared by ``numba_cpu/state8.py``, ``numba_cuda/state8.py`` and ``cupy/lowp.py`` so
the backends cannot disagree; the reference (``fastopt/reference/state8.py``) states the same rules
on its own, and ``tests/test_state8.py`` checks that they agree. Why each configuration is
refused: ``docs/algorithms.md``, "Optimizers with 8-bit state".
"""

from __future__ import annotations

__all__ = ["SUPPORTED", "state8_layout", "state8_supported"]

SUPPORTED = {
    "adam_step": "Adam and AdamW (m signed, v unsigned); not amsgrad",
    "sgd_step": "SGD with momentum or Nesterov, both conventions (velocity signed); not momentum = 0",
    "adagrad_step": "AdaGrad (accumulator unsigned)",
    "rmsprop_step": "RMSProp, plain or with momentum / Nesterov (textbook) (square_avg unsigned, "
                    "velocity signed); not centered",
}

_KEYWORDS = {
    "adam_step": {"step", "lr", "beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad"},
    "sgd_step": {"lr", "momentum", "nesterov", "weight_decay", "convention"},
    "adagrad_step": {"lr", "eps", "weight_decay"},
    "rmsprop_step": {"lr", "rho", "eps", "momentum", "nesterov", "centered", "weight_decay", "convention"},
}


def state8_supported(op, **hyper) -> str | None:
    """None when ``op`` with these hyperparameters runs with 8-bit state, else the reason why not."""
    if op not in _KEYWORDS:
        return (f"op {op!r} has no 8-bit state; supported: {', '.join(_KEYWORDS)} (AdaDelta's two "
                "second moments and delta-bar-delta's rates are not quantized, see docs/algorithms.md)")
    missing = _KEYWORDS[op] - set(hyper)
    extra = set(hyper) - _KEYWORDS[op]
    if missing or extra:
        return (f"{op} takes the hyperparameters {sorted(_KEYWORDS[op])}; missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}")
    if op == "adam_step" and hyper["amsgrad"]:
        return ("amsgrad=True: v_max ← max(v_max, v) of two independently quantized states is "
                "not monotone after requantization; not supported in 8 bits")
    if op == "sgd_step" and hyper["momentum"] == 0:
        return "sgd_step with momentum=0 has no state to quantize"
    if op == "rmsprop_step":
        if hyper["centered"]:
            return ("centered=True: the variance r − s⊙s is a difference of two 8-bit states whose "
                    "quantization errors (up to 0.7% of their block's absmax) exceed it when the "
                    "gradient's mean dominates, giving √ of a negative number; not supported")
        if hyper["momentum"] != 0 and hyper["nesterov"] and hyper["convention"] != "textbook":
            return "nesterov=True is defined for convention='textbook' only"
    return None


def state8_layout(op, **hyper) -> tuple[tuple[int, bool], ...]:
    """The (state-tuple index, signed map) pairs of the 8-bit states ``op`` uses with these
    hyperparameters (raises ValueError for an unsupported configuration)."""
    reason = state8_supported(op, **hyper)
    if reason is not None:
        raise ValueError(reason)
    if op == "adam_step":
        return ((0, True), (1, False))  # m, v
    if op == "sgd_step":
        return ((0, True),)  # velocity
    if op == "adagrad_step":
        return ((0, False),)  # accumulator
    if hyper["momentum"] == 0:
        return ((0, False),)  # square_avg
    return ((0, False), (2, True))  # square_avg, velocity
