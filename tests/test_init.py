"""fastopt.init: the heuristics' bounds and variances, sparsity counts, orthogonality, LSUV's unit
variance per layer, the bias helpers, reproducibility and argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastopt import init

SHAPES = [(400, 300), (64, 10), (10, 64), (1, 1)]


def shape_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", ["uniform", "glorot"])
def test_heuristics_bounds_and_variance(name, shape, rng):
    m, n = shape
    w = getattr(init, name)(m, n, rng)
    limit = 1 / math.sqrt(m) if name == "uniform" else math.sqrt(6 / (m + n))
    assert w.shape == (m, n) and w.dtype == np.float32 and w.flags.c_contiguous
    assert np.all(np.abs(w) <= np.float32(limit))
    if m * n >= 10_000:
        # U(−a, a) has variance a²/3: heuristic #1 1/(3m), heuristic #2 2/(m+n); the sample
        # variance of 120,000 draws is within 2% with overwhelming probability (sd ≈ 0.26%)
        expected = limit**2 / 3
        assert w.var() == pytest.approx(expected, rel=0.02)
        assert abs(w.mean()) < 0.02 * limit
        assert np.abs(w).max() > 0.99 * limit  # the whole interval is used


def test_heuristic_formulas():
    # the notes' numbers, e.g. m = 6, n = 10: heuristic #1 in ±1/√6, heuristic #2 in ±√(6/16)
    w1 = init.uniform(6, 10, 0, dtype=np.float64)
    w2 = init.glorot(6, 10, 0, dtype=np.float64)
    assert np.abs(w1).max() <= 1 / math.sqrt(6)
    assert np.abs(w2).max() <= math.sqrt(6 / 16)
    assert np.abs(w2).max() > 1 / math.sqrt(6)  # the normalized bound is wider here


@pytest.mark.parametrize("k", [1, 5, 15, 64, 100])
def test_sparse_has_exactly_k_nonzeros_per_unit(k, rng):
    m, n = 64, 200
    w = init.sparse(m, n, rng, k=k)
    assert w.shape == (m, n) and w.dtype == np.float32
    np.testing.assert_array_equal(np.count_nonzero(w, axis=0), np.full(n, min(k, m)))
    # the non-zero weights are N(0, scale²): their scale does not shrink with the layer size
    big = init.sparse(1000, 400, rng, k=15, scale=2.0)
    values = big[big != 0]
    assert values.size == 15 * 400
    assert values.std() == pytest.approx(2.0, rel=0.05)
    # which inputs are connected differs between units
    assert len({tuple(np.flatnonzero(big[:, j])) for j in range(400)}) > 390


@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (32, 32), (1, 7)], ids=shape_id)
@pytest.mark.parametrize("gain", [1.0, math.sqrt(2)])
def test_orthogonal(shape, gain, rng):
    m, n = shape
    w = init.orthogonal(m, n, rng, gain=gain, dtype=np.float64)
    assert w.shape == (m, n)
    gram = w.T @ w if m >= n else w @ w.T
    np.testing.assert_allclose(gram, gain**2 * np.eye(min(m, n)), atol=1e-12)
    w32 = init.orthogonal(m, n, rng, gain=gain)
    assert w32.dtype == np.float32
    gram32 = w32.T @ w32 if m >= n else w32 @ w32.T
    np.testing.assert_allclose(gram32, gain**2 * np.eye(min(m, n)), atol=1e-5)


def test_orthogonal_is_not_biased_in_sign(rng):
    # with the sign correction Q is Haar-distributed: diagonal entries are as often negative as positive
    diag = np.concatenate([np.diag(init.orthogonal(8, 8, rng, dtype=np.float64)) for _ in range(200)])
    assert 0.4 < np.mean(diag > 0) < 0.6


def mlp_forward(weights, activation):
    """A plain MLP x → act(x W1) → act(· W2) → ...; returns every layer's pre-activation."""
    def forward(x):
        outputs = []
        h = x
        for w in weights:
            z = h @ w
            outputs.append(z)
            h = activation(z)
        return outputs
    return forward


@pytest.mark.parametrize("tol", [0.1, 0.01])
@pytest.mark.parametrize("activation", [np.tanh, lambda z: np.maximum(z, 0)], ids=["tanh", "relu"])
def test_lsuv_gives_unit_output_variance_per_layer(activation, tol, rng):
    sizes = [30, 100, 80, 60, 10]
    weights = [np.zeros((m, n), np.float64) for m, n in zip(sizes[:-1], sizes[1:])]
    batch = rng.normal(3.0, 5.0, (256, sizes[0]))  # far from unit variance on purpose
    forward = mlp_forward(weights, activation)
    variances = init.lsuv(weights, forward, batch, rng, tol=tol)
    assert len(variances) == len(weights)
    for layer, (reported, output) in enumerate(zip(variances, forward(batch))):
        assert abs(output.var() - 1) <= tol, f"layer {layer}: variance {output.var()}"
        assert reported == pytest.approx(output.var())
    # the orthogonal start: every matrix is a rescaled semi-orthogonal one
    for w in weights:
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        scale = gram[0, 0]
        np.testing.assert_allclose(gram, scale * np.eye(len(gram)), atol=1e-10 * scale)


def test_lsuv_without_orthogonal_start_keeps_directions(rng):
    w = [rng.standard_normal((20, 15)), rng.standard_normal((15, 5))]
    before = [a.copy() for a in w]
    batch = rng.standard_normal((128, 20))
    init.lsuv(w, mlp_forward(w, np.tanh), batch, rng, orthogonal_start=False)
    for a, b in zip(w, before):
        ratio = a / b
        np.testing.assert_allclose(ratio, ratio.flat[0])  # only a rescaling


def test_lsuv_reports_a_dead_layer(rng):
    w = [np.ones((4, 3))]
    with pytest.raises(ValueError, match="variance"):
        init.lsuv(w, lambda x: [np.zeros((8, 3))], np.ones((8, 4)), rng)
    with pytest.raises(ValueError, match="one output per weight"):
        init.lsuv(w, lambda x: [], np.ones((8, 4)), rng)


def test_same_seed_same_weights():
    for name in ("uniform", "glorot", "sparse", "orthogonal"):
        fn = getattr(init, name)
        np.testing.assert_array_equal(fn(30, 20, 7), fn(30, 20, 7))
        np.testing.assert_array_equal(fn(30, 20, np.random.default_rng(7)), fn(30, 20, 7))
        gen = np.random.default_rng(7)
        assert not np.array_equal(fn(30, 20, gen), fn(30, 20, gen)), f"{name}: a Generator must advance"


def test_bias_helpers():
    z = init.zeros(5)
    assert z.dtype == np.float32 and z.shape == (5,) and not z.any()
    c = init.constant(4)
    np.testing.assert_array_equal(c, np.full(4, 0.1, np.float32))
    assert init.constant(3, 0.5, dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("call, error, match", [
    (lambda: init.uniform(0, 3, 0), ValueError, "m must be >= 1"),
    (lambda: init.glorot(3, 2.5, 0), TypeError, "n must be an int"),
    (lambda: init.uniform(3, 3, "seed"), TypeError, "rng must be"),
    (lambda: init.uniform(3, 3, None), TypeError, "rng must be"),
    (lambda: init.uniform(3, 3, 0, dtype=np.int32), TypeError, "dtype"),
    (lambda: init.sparse(3, 3, 0, k=0), ValueError, "k must be >= 1"),
    (lambda: init.sparse(3, 3, 0, scale=0), ValueError, "scale"),
    (lambda: init.orthogonal(3, 3, 0, gain=-1), ValueError, "gain"),
    (lambda: init.constant(3, float("nan")), ValueError, "value"),
    (lambda: init.lsuv([np.zeros(3)], lambda x: [x], np.ones(3), 0), TypeError, "2-D"),
    (lambda: init.lsuv([np.zeros((3, 3))], None, np.ones(3), 0), TypeError, "forward"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
