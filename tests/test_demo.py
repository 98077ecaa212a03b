"""fastopt.demo: the digits split, the MLP's backward (against finite differences), LSUV on the
model, the curriculum sampler's documented order, and a short training run that learns."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

from fastopt.demo import (
    MLP,
    CurriculumSampler,
    confidence,
    load_digits,
    make_optimizer,
    softmax_cross_entropy,
    train,
)

sklearn = pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn (the demo extra)")
import sklearn.datasets  # noqa: E402  (after the skip: the demo extra)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split_is_stratified_and_fixed(digits):
    assert digits.x_train.shape[1] == 64 and digits.x_train.dtype == np.float32
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    train_counts = np.bincount(digits.y_train, minlength=10)
    test_counts = np.bincount(digits.y_test, minlength=10)
    np.testing.assert_allclose(test_counts / (train_counts + test_counts), 0.2, atol=0.01)
    again = load_digits()
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    np.testing.assert_array_equal(again.x_train, digits.x_train)


def test_digits_read_without_scikit_learn_are_its_loaders(digits, monkeypatch):
    """The file is read directly (no scikit-learn import, about 1 s); the split is the one of
    ``sklearn.datasets.load_digits``'s arrays, also where the file is not found."""
    data_module = importlib.import_module("fastopt.demo.data")
    code = ("import sys; from fastopt.demo import load_digits; load_digits(); "
            "assert 'sklearn' not in sys.modules, 'scikit-learn imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert data_module.digits_file() is not None
    bunch = sklearn.datasets.load_digits()
    pixels, labels = data_module._read_digits()
    np.testing.assert_array_equal(pixels, bunch.data)
    np.testing.assert_array_equal(labels, bunch.target)
    assert pixels.dtype == bunch.data.dtype and labels.dtype == np.int64
    monkeypatch.setattr(data_module, "DIGITS_FILE", ("no", "such", "file.csv.gz"))
    assert data_module.digits_file() is None
    loaded = load_digits()  # through scikit-learn's loader
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(digits, name))


def test_softmax_cross_entropy():
    logits = np.array([[0.0, 0.0], [2.0, 0.0]], np.float64)
    loss, grad = softmax_cross_entropy(logits, np.array([0, 1]))
    p = 1 / (1 + np.exp(-2.0))
    assert loss == pytest.approx((np.log(2) - np.log(1 - p)) / 2)
    np.testing.assert_allclose(grad, [[-0.25, 0.25], [p / 2, (1 - p) / 2 - 0.5]])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_mlp_backward_matches_finite_differences(backend, rng):
    """The NumPy backward and fastopt's batch-norm backward together give the loss's gradient."""
    model = MLP((5, 6, 4, 3), rng=rng, init="glorot", backend=backend, dtype=np.float64)
    x = rng.standard_normal((9, 5))
    y = rng.integers(0, 3, 9)
    for bn in model.norms:  # random γ, β so the test does not sit on a special point
        bn.weight[...] = rng.uniform(0.5, 1.5, bn.num_features)
        bn.bias[...] = rng.normal(0.0, 0.5, bn.num_features)
    model.out_bias[...] = rng.normal(0.0, 0.1, 3)

    def loss():
        return softmax_cross_entropy(model.forward(x), y)[0]

    _, dlogits = softmax_cross_entropy(model.forward(x), y)
    model.backward(dlogits)
    h = 1e-6
    for param, grad in zip(model.params, model.grads):
        numeric = np.empty_like(param)
        for i in np.ndindex(param.shape):
            saved = param[i]
            param[i] = saved + h
            up = loss()
            param[i] = saved - h
            down = loss()
            param[i] = saved
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_mlp_params_stay_the_same_objects(rng, digits):
    model = MLP(rng=rng)
    for bn in model.norms:  # the notes' ReLU bias: β starts at 0.1
        np.testing.assert_array_equal(bn.bias, np.float32(0.1))
    before = [id(p) for p in model.params]
    opt = make_optimizer("adam", model.params)
    for _ in range(3):
        _, dlogits = softmax_cross_entropy(model.forward(digits.x_train[:32]), digits.y_train[:32])
        model.backward(dlogits)
        opt.step(model.grads)
    assert [id(p) for p in model.params] == before
    assert len(model.params) == len(model.grads) == 8


def test_lsuv_on_the_mlp_gives_unit_linear_output_variance(rng, digits):
    model = MLP(rng=rng, init="lsuv")
    running = [bn.running_mean.copy() for bn in model.norms]
    batch = digits.x_train[:256]
    variances = model.lsuv_(batch, rng, tol=0.05)
    # LSUV's passes must not leave their statistics in the running averages
    for bn, before in zip(model.norms, running):
        assert bn.num_batches_tracked == 0
        np.testing.assert_array_equal(bn.running_mean, before)
    assert len(variances) == 3
    for out in model.linear_outputs(batch):
        assert abs(out.var() - 1) <= 0.05


# ---------------------------------------------------------------------------------------------
# curriculum


def test_confidence_ranks_typical_examples_above_mislabelled_ones(rng):
    x = np.concatenate([rng.normal(-2, 0.5, (100, 2)), rng.normal(2, 0.5, (100, 2))]).astype(np.float32)
    y = np.repeat([0, 1], 100)
    y[:5] = 1  # five examples of the first blob labelled as the second: the hardest
    scores = confidence(x, y, 2)
    assert scores.shape == (200,)
    assert np.all((0 <= scores) & (scores <= 1))
    hardest = set(np.argsort(scores)[:5])
    assert hardest == set(range(5))
    assert np.median(scores[5:]) > 0.9


def make_sampler(rng, n=100, ramp=4, start_hard=0.1):
    scores = rng.permutation(n) / n  # distinct confidences, unordered indices
    return scores, CurriculumSampler(scores, ramp_epochs=ramp, rng=rng, start_hard=start_hard)


def test_curriculum_pools_follow_the_confidence_ranking(rng):
    scores, sampler = make_sampler(rng)
    np.testing.assert_array_equal(sampler.ranking, np.argsort(-scores))
    assert len(sampler.easy) == len(sampler.hard) == 50
    assert scores[sampler.easy].min() > scores[sampler.hard].max()  # easy = most confident half
    assert sampler.natural_hard == 0.5


def test_curriculum_hard_share_grows_linearly_then_stays(rng):
    _, sampler = make_sampler(rng, ramp=4, start_hard=0.1)
    shares = [sampler.hard_share(t) for t in range(8)]
    np.testing.assert_allclose(shares, [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5])
    assert [sampler.hard_count(t) for t in range(6)] == [10, 20, 30, 40, 50, 50]


def test_curriculum_epochs_mix_as_documented(rng):
    _, sampler = make_sampler(rng, n=100, ramp=4)
    for t in range(4):
        epoch = sampler.epoch(t)
        assert len(epoch) == 100
        is_hard = np.isin(epoch, sampler.hard)
        assert is_hard.sum() == sampler.hard_count(t)
        # the hard examples: distinct; the easy ones: each ⌊n_E/|E|⌋ or ⌈n_E/|E|⌉ times
        assert len(set(epoch[is_hard])) == is_hard.sum()
        counts = np.bincount(epoch[~is_hard], minlength=100)[sampler.easy]
        n_easy = 100 - sampler.hard_count(t)
        assert counts.min() == n_easy // 50 and counts.max() == -(-n_easy // 50)
    # early epochs are mostly easy, and the hard share never falls
    hard_counts = [sampler.hard_count(t) for t in range(10)]
    assert hard_counts == sorted(hard_counts)
    # from ramp_epochs on, an epoch is a plain shuffled pass over all the data
    for t in (4, 5, 9):
        epoch = sampler.epoch(t)
        np.testing.assert_array_equal(np.sort(epoch), np.arange(100))


def test_curriculum_is_shuffled_within_an_epoch(rng):
    _, sampler = make_sampler(rng, n=200, ramp=2)
    epoch = sampler.epoch(0)
    hard = np.isin(epoch, sampler.hard)
    # the hard examples are spread through the epoch, not appended at the end
    assert hard[:100].any() and hard[100:].any()


def test_curriculum_argument_checks(rng):
    with pytest.raises(ValueError, match="start_hard"):
        CurriculumSampler(np.arange(10.0), ramp_epochs=2, rng=rng, start_hard=0.9)
    with pytest.raises(ValueError, match="ramp_epochs"):
        CurriculumSampler(np.arange(10.0), ramp_epochs=0, rng=rng)
    with pytest.raises(ValueError, match="confidence"):
        CurriculumSampler(np.arange(1.0), ramp_epochs=1, rng=rng)


# ---------------------------------------------------------------------------------------------
# training


def test_short_training_learns(digits):
    lines = []
    result = train(epochs=2, data=digits, log=lines.append, seed=1)
    assert len(result.history) == 2 and len(lines) == 2
    assert result.history[1]["loss"] < result.history[0]["loss"]
    assert result.test_accuracy > 0.85  # chance is 0.10


@pytest.mark.parametrize("init_name", ["uniform", "sparse", "orthogonal", "lsuv"])
def test_every_init_trains(init_name, digits):
    result = train(epochs=2, data=digits, init=init_name, seed=2)
    assert result.test_accuracy > 0.7


def test_curriculum_training_learns_and_reports_the_hard_share(digits):
    result = train(epochs=4, data=digits, curriculum=True, seed=3)
    n = len(digits.y_train)
    natural = (n - round(n / 2)) / n
    shares = [h["hard_share"] for h in result.history]  # ramp over epochs // 2 = 2 epochs
    np.testing.assert_allclose(shares, [0.1, (0.1 + natural) / 2, natural, natural])
    assert result.test_accuracy > 0.8


def test_training_is_reproducible(digits):
    a = train(epochs=1, data=digits, seed=5)
    b = train(epochs=1, data=digits, seed=5)
    assert a.history[0]["loss"] == b.history[0]["loss"]


def test_the_warm_up_changes_nothing_in_the_run(digits, monkeypatch):
    """The warm-up trains a throwaway model: the run is the same without it."""
    train_module = importlib.import_module("fastopt.demo.train")  # ``fastopt.demo.train`` is the function
    warm = train(optimizer="adagrad", epochs=2, data=digits, seed=6, curriculum=True)
    monkeypatch.setattr(train_module, "_warm_up", lambda *args, **kwargs: 0.0)
    cold = train(optimizer="adagrad", epochs=2, data=digits, seed=6, curriculum=True)
    assert [h["loss"] for h in warm.history] == [h["loss"] for h in cold.history]
    assert warm.test_accuracy == cold.test_accuracy


# Counts numba's compiler-lock events (taken to compile a kernel or to load it from the disk cache)
# before, during and after ``train``'s warm-up, in a fresh process where no kernel has run yet.
_COUNT_FIRST_CALLS = """
import importlib, json, sys
from numba.core import event
from fastopt.demo import load_digits
train_module = importlib.import_module("fastopt.demo.train")
phase, counts = ["before"], {"before": 0, "warm-up": 0, "after": 0}

class Count(event.Listener):
    def on_start(self, event):
        counts[phase[0]] += 1

    def on_end(self, event):
        pass

warm_up = train_module._warm_up

def marked(*args, **kwargs):
    phase[0] = "warm-up"
    try:
        return warm_up(*args, **kwargs)
    finally:
        phase[0] = "after"

train_module._warm_up = marked
data = load_digits()
with event.install_listener("numba:compiler_lock", Count()):
    train_module.train(epochs=2, hidden=(16,), data=data, **json.loads(sys.argv[1]))
print(json.dumps(counts))
"""


@pytest.mark.parametrize("options", [dict(optimizer="adagrad"), dict(optimizer="sgd", init="lsuv", curriculum=True)],
                         ids=["adagrad", "sgd-lsuv-curriculum"])
def test_every_kernel_is_ready_before_the_training_clock_starts(options):
    """``compile_seconds`` holds every kernel's first call, ``seconds`` none: after the warm-up,
    numba compiles (or loads from its cache) nothing, and the warm-up did the compiling."""
    proc = subprocess.run([sys.executable, "-c", _COUNT_FIRST_CALLS, json.dumps(options)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["warm-up"] > 0, counts
    assert counts["after"] == 0, f"kernels first called while training is timed: {counts}"


def test_training_restores_numba_threads(digits):
    numba = pytest.importorskip("numba")
    before = numba.get_num_threads()
    train(epochs=1, data=digits, threads=1)
    assert numba.get_num_threads() == before
