"""Weight and bias initialization for fully connected layers, after the lecture notes' "Weight
Initialization Strategies" and "Bias Initialization Strategies".

A fully connected layer with m inputs and n outputs computes ``y = x @ W + b``, so ``W`` has shape
(m, n): row i holds the weights leaving input i, column j the weights entering unit j.

    uniform       heuristic #1: W ~ U(−1/√m, 1/√m)
    glorot        heuristic #2 (normalized initialization, Glorot & Bengio 2010):
                  W ~ U(−√(6/(m+n)), √(6/(m+n))), so Var(W) = 2/(m+n)
    sparse        sparse initialization (Martens 2010): each unit has exactly k non-zero incoming
                  weights, drawn from N(0, scale²); the others are 0
    orthogonal    a (semi-)orthogonal matrix times ``gain`` (Saxe et al. 2014): WᵀW = gain²·I when
                  m ≥ n, WWᵀ = gain²·I when m < n
    lsuv          layer-sequential unit variance (Mishkin & Matas 2016): orthogonal start, then,
                  layer by layer, W ← W/√Var(output) until each layer's output variance on one
                  batch is 1 within a tolerance
    zeros         biases 0 (works in most scenarios)
    constant      biases set to a constant, e.g. 0.1 for ReLU units "to avoid being in the
                  saturating regime"

Every function that draws random numbers takes ``rng``: a ``numpy.random.Generator`` (used, and
advanced, as is) or anything ``numpy.random.default_rng`` accepts as a seed (an int, a
``SeedSequence``). The same seed gives the same weights. Results are new C-contiguous arrays of
``dtype`` (float32 by default), except ``lsuv``, which writes the given arrays in place.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import numpy as np

__all__ = ["constant", "glorot", "lsuv", "orthogonal", "sparse", "uniform", "zeros"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------------
# argument checks


def _generator(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, bool) or not isinstance(rng, (numbers.Integral, np.random.SeedSequence)):
        raise TypeError("rng must be a numpy.random.Generator, an int seed or a numpy.random.SeedSequence, "
                        f"got {type(rng).__name__} {rng!r}")
    if isinstance(rng, numbers.Integral) and rng < 0:
        raise ValueError(f"rng as a seed must be >= 0, got {rng}")
    return np.random.default_rng(rng)


def _count(name: str, value, low: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _positive(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return value


def _dtype(dtype) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dtype not in _FLOATS:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


# ---------------------------------------------------------------------------------------------
# weights


def uniform(m, n, rng, *, dtype=np.float32) -> np.ndarray:
    """Heuristic #1: an (m, n) matrix with entries from U(−1/√m, 1/√m); Var(W) = 1/(3m)."""
    m, n = _count("m", m), _count("n", n)
    limit = 1.0 / math.sqrt(m)
    return _generator(rng).uniform(-limit, limit, (m, n)).astype(_dtype(dtype))


def glorot(m, n, rng, *, dtype=np.float32) -> np.ndarray:
    """Heuristic #2, normalized initialization: an (m, n) matrix with entries from
    U(−√(6/(m+n)), √(6/(m+n))); Var(W) = 2/(m+n), a compromise between keeping the activations'
    variance (1/m) and the gradients' variance (1/n) from layer to layer."""
    m, n = _count("m", m), _count("n", n)
    limit = math.sqrt(6.0 / (m + n))
    return _generator(rng).uniform(-limit, limit, (m, n)).astype(_dtype(dtype))


def sparse(m, n, rng, *, k=15, scale=1.0, dtype=np.float32) -> np.ndarray:
    """Sparse initialization: an (m, n) matrix in which every unit (column) has exactly
    min(k, m) non-zero incoming weights, at rows chosen uniformly without replacement, with
    values from N(0, scale²). Unlike the heuristics, the size of the individual weights does not
    shrink as the layer grows (Martens 2010 uses k = 15, scale = 1)."""
    m, n = _count("m", m), _count("n", n)
    k = min(_count("k", k), m)
    scale = _positive("scale", scale)
    dtype = _dtype(dtype)
    gen = _generator(rng)
    w = np.zeros((m, n), dtype)
    # k distinct rows per column: the first k of a random permutation of the m rows
    rows = np.argsort(gen.random((m, n)), axis=0)[:k]
    w[rows, np.arange(n)] = gen.normal(0.0, scale, (k, n))
    return w


def orthogonal(m, n, rng, *, gain=1.0, dtype=np.float32) -> np.ndarray:
    """A scaled (semi-)orthogonal (m, n) matrix: the Q factor of a Gaussian matrix's QR
    decomposition, with the signs fixed so that Q is uniformly (Haar) distributed, times ``gain``.
    WᵀW = gain²·I (orthonormal columns) when m ≥ n, WWᵀ = gain²·I (orthonormal rows) when m < n.
    Use gain = √2 for ReLU layers to preserve the signal's scale."""
    m, n = _count("m", m), _count("n", n)
    gain = _positive("gain", gain)
    dtype = _dtype(dtype)
    a = _generator(rng).standard_normal((max(m, n), min(m, n)))
    q, r = np.linalg.qr(a)  # q: (max, min) with orthonormal columns
    q *= np.where(np.diag(r) < 0, -1.0, 1.0)  # sign of r's diagonal: Haar-uniform Q
    w = q if m >= n else q.T
    return np.ascontiguousarray(gain * w, dtype=dtype)


def lsuv(weights: Sequence[np.ndarray], forward: Callable, batch, rng, *, tol=0.1, max_iter=10,
         orthogonal_start=True) -> list[float]:
    """Layer-sequential unit variance (Mishkin & Matas 2016), in place.

    ``weights`` are the layers' (m, n) weight matrices in forward order (float arrays, written in
    place). ``forward(batch)`` runs the network on ``batch`` with the current weights and returns
    a sequence with one array per weight matrix: that layer's output (usually x @ W + b, before
    the nonlinearity), on which the variance is measured.

    1. With ``orthogonal_start`` (the method's first step), every weight matrix is set to
       ``orthogonal(m, n, rng)``.
    2. For each layer L in order: compute v = Var(output of L) over the batch; while |v − 1| > tol
       and fewer than ``max_iter`` rescalings were made, W_L ← W_L / √v and recompute. Layers
       before L are already fixed, so each layer sees inputs of settled scale.

    Returns the output variance of each layer after its rescaling. Raises ``ValueError`` if a
    layer's output variance is 0 or not finite (a dead layer cannot be rescaled to unit variance).
    """
    weights = list(weights)
    if not weights:
        raise ValueError("weights must not be empty")
    for i, w in enumerate(weights):
        if not isinstance(w, np.ndarray) or w.dtype not in _FLOATS or w.ndim != 2:
            got = f"{w.dtype} array of shape {w.shape}" if isinstance(w, np.ndarray) else type(w).__name__
            raise TypeError(f"weights[{i}] must be a 2-D float32 or float64 numpy.ndarray, got {got}")
        if not w.flags.writeable:
            raise ValueError(f"weights[{i}] must be writeable: lsuv rescales it in place")
    if not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")
    tol = _positive("tol", tol)
    max_iter = _count("max_iter", max_iter, low=0)
    gen = _generator(rng)
    if orthogonal_start:
        for w in weights:
            w[...] = orthogonal(w.shape[0], w.shape[1], gen, dtype=w.dtype)

    def variance(layer: int) -> float:
        outputs = forward(batch)
        if len(outputs) != len(weights):
            raise ValueError(f"forward must return one output per weight matrix ({len(weights)}), "
                             f"got {len(outputs)}")
        v = float(np.var(np.asarray(outputs[layer], dtype=np.float64)))
        if not math.isfinite(v) or v <= 0.0:
            raise ValueError(f"layer {layer}'s output variance is {v!r}: cannot rescale it to 1")
        return v

    variances = []
    for layer, w in enumerate(weights):
        v = variance(layer)
        for _ in range(max_iter):
            if abs(v - 1.0) <= tol:
                break
            w *= w.dtype.type(1.0 / math.sqrt(v))
            v = variance(layer)
        variances.append(v)
    return variances


# ---------------------------------------------------------------------------------------------
# biases (deterministic: no rng)


def zeros(n, *, dtype=np.float32) -> np.ndarray:
    """Biases of n units set to 0, which works in most scenarios."""
    return np.zeros(_count("n", n), _dtype(dtype))


def constant(n, value=0.1, *, dtype=np.float32) -> np.ndarray:
    """Biases of n units set to ``value``; 0.1 keeps ReLU units out of their flat (zero-gradient)
    region at the start."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"value must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got {value!r}")
    return np.full(_count("n", n), float(value), _dtype(dtype))
