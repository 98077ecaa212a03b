"""The ``BatchNorm`` layer: against torch.nn.BatchNorm2d over training steps and eval, its state,
and its parameters handed to a fastopt optimizer."""

from __future__ import annotations

import numpy as np
import pytest

from fastopt.batchnorm import BatchNorm
from fastopt.optim import SGD

BACKENDS = ["numpy", "numba"]
TOL = {np.dtype(np.float32): dict(rtol=1e-4, atol=1e-5), np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12)}


def torch_or_skip():
    return pytest.importorskip("torch", reason="torch is not installed; parity with torch cannot be checked")


# relu only in float64: in float32 a pre-activation within rounding of 0 may be masked differently
# by torch and by us (the functional tests draw inputs away from the kink instead)
DTYPE_RELU = [(np.float32, False), (np.float64, False), (np.float64, True)]


@pytest.mark.torch
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype, relu", DTYPE_RELU, ids=["float32", "float64", "float64-relu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_torch_batchnorm2d_over_training_steps_then_eval(backend, dtype, relu, layout, rng):
    torch = torch_or_skip()
    channels, lr, steps = 3, 0.1, 5
    tdtype = getattr(torch, np.dtype(dtype).name)
    theirs = torch.nn.BatchNorm2d(channels, momentum=0.2, dtype=tdtype)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=lr)
    axis = 1 if layout == "nchw" else -1
    ours = BatchNorm(channels, momentum=0.2, channel_axis=axis, relu=relu, dtype=dtype, backend=backend)
    opt_ours = SGD([ours.weight, ours.bias], lr=lr)
    weight, bias = ours.weight, ours.bias
    tol = TOL[np.dtype(dtype)]

    def to_ours(a):  # torch's NCHW -> our layout
        return np.ascontiguousarray(a if layout == "nchw" else np.moveaxis(a, 1, -1))

    for step in range(steps + 2):
        training = step < steps
        ours.train(training)
        theirs.train(training)
        x = (rng.standard_normal((4, channels, 5, 6)) * rng.uniform(0.5, 2, (1, channels, 1, 1))
             + rng.normal(0, 2, (1, channels, 1, 1))).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        xt = torch.tensor(x, requires_grad=True)
        yt = theirs(xt)
        if relu:
            yt = torch.relu(yt)
        opt_theirs.zero_grad()
        yt.backward(torch.tensor(dy))
        y = ours.forward(to_ours(x))
        dx = ours.backward(to_ours(dy))
        np.testing.assert_allclose(y, to_ours(yt.detach().numpy()), err_msg=f"y, step {step}", **tol)
        np.testing.assert_allclose(dx, to_ours(xt.grad.numpy()), err_msg=f"dx, step {step}", **tol)
        np.testing.assert_allclose(ours.grad_weight, theirs.weight.grad.numpy(), err_msg=f"dweight {step}", **tol)
        np.testing.assert_allclose(ours.grad_bias, theirs.bias.grad.numpy(), err_msg=f"dbias {step}", **tol)
        opt_theirs.step()
        opt_ours.step([ours.grad_weight, ours.grad_bias])
        np.testing.assert_allclose(ours.weight, theirs.weight.detach().numpy(), **tol)
        np.testing.assert_allclose(ours.bias, theirs.bias.detach().numpy(), **tol)
        np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), **tol)
        np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), **tol)
        assert ours.num_batches_tracked == int(theirs.num_batches_tracked)
    assert ours.weight is weight and ours.bias is bias  # updated in place throughout


@pytest.mark.torch
def test_layer_without_affine_matches_torch(rng):
    torch = torch_or_skip()
    theirs = torch.nn.BatchNorm1d(4, affine=False, dtype=torch.float64)
    ours = BatchNorm(4, affine=False, dtype=np.float64)
    assert ours.weight is None and ours.bias is None and ours.grad_weight is None
    x = rng.standard_normal((6, 4, 3))
    dy = rng.standard_normal(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(ours.forward(x), yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.backward(dy), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-12)


@pytest.mark.torch
def test_layer_loads_a_torch_state_dict(rng):
    torch = torch_or_skip()
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
        theirs.running_mean.normal_()
        theirs.running_var.uniform_(0.5, 2.0)
        theirs.num_batches_tracked.fill_(7)
    theirs.eval()
    ours = BatchNorm(3, dtype=np.float64).eval()
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    assert ours.num_batches_tracked == 7
    x = rng.standard_normal((2, 3, 4, 4))
    np.testing.assert_allclose(ours.forward(x), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_keeps_the_arrays(backend, rng):
    bn = BatchNorm(3, backend=backend)
    arrays = [bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.grad_weight, bn.grad_bias]
    for _ in range(3):
        bn.forward(rng.standard_normal((4, 3, 2, 2)).astype(np.float32))
        bn.backward(np.ones((4, 3, 2, 2), np.float32))
        bn.weight -= 0.1 * bn.grad_weight
        bn.bias -= 0.1 * bn.grad_bias
    state = bn.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert int(state["num_batches_tracked"]) == 3
    state["weight"][0] = 123.0  # a copy: the layer does not change
    assert bn.weight[0] != 123.0
    other = BatchNorm(3, backend=backend)
    kept = [other.weight, other.bias, other.running_mean, other.running_var]
    other.load_state_dict(bn.state_dict())
    assert [other.weight, other.bias, other.running_mean, other.running_var] == kept  # same objects
    assert all(a is b for a, b in zip([other.weight, other.bias, other.running_mean, other.running_var], kept))
    x = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(other.eval().forward(x), bn.eval().forward(x))
    assert all(a is b for a, b in zip(arrays, [bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                               bn.grad_weight, bn.grad_bias]))


@pytest.mark.parametrize("state, exc, match", [
    ({"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3)}, ValueError, "missing"),
    ({"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3),
      "extra": 1}, ValueError, "unexpected"),
    ({"weight": np.ones(4), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3)},
     ValueError, r"state\['weight'\] must have shape \(3,\)"),
    ({"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3),
      "num_batches_tracked": -1}, ValueError, "num_batches_tracked"),
    ({"weight": np.array(["a"] * 3), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3)},
     TypeError, "real numbers"),
    ([1, 2], TypeError, "state must be a dict"),
], ids=["missing", "unexpected", "shape", "count", "strings", "not-a-dict"])
def test_load_state_dict_rejects_bad_state_and_changes_nothing(state, exc, match):
    bn = BatchNorm(3)
    bn.weight[...] = 2.0
    before = bn.state_dict()
    with pytest.raises(exc, match=match):
        bn.load_state_dict(state)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_train_eval_switches_statistics(rng):
    bn = BatchNorm(2, dtype=np.float64, backend="numba")
    assert bn.training and bn.eval() is bn and not bn.training and bn.train() is bn and bn.training
    x = rng.standard_normal((8, 2)) * 3 + 5
    y = bn.forward(x)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)  # batch statistics
    np.testing.assert_allclose(bn.running_mean, 0.1 * x.mean(axis=0), rtol=1e-12)
    running = bn.running_mean.copy()
    bn.eval()
    y = bn.forward(x)
    np.testing.assert_allclose(y, (x - running) / np.sqrt(bn.running_var + 1e-5), rtol=1e-12)
    np.testing.assert_array_equal(bn.running_mean, running)  # eval does not update
    assert bn.num_batches_tracked == 1
    dx = bn.backward(np.ones_like(x))  # statistics constant after an eval forward
    np.testing.assert_allclose(dx, np.broadcast_to(1 / np.sqrt(bn.running_var + 1e-5), x.shape), rtol=1e-12)


def test_backward_before_forward_raises():
    with pytest.raises(RuntimeError, match="forward first"):
        BatchNorm(3).backward(np.ones((2, 3), np.float32))


def test_forward_rejects_wrong_dtype_and_channel_count():
    bn = BatchNorm(3, dtype=np.float32)
    with pytest.raises(TypeError, match="layer's dtype float32, got float64"):
        bn.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="3 channels along channel_axis=1"):
        bn.forward(np.ones((2, 4), np.float32))
    assert bn.num_batches_tracked == 0 and (bn.running_mean == 0).all()


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_features=0), ValueError, "num_features must be >= 1"),
    (dict(num_features=2.0), TypeError, "num_features must be an int"),
    (dict(num_features=3, dtype=np.int32), TypeError, "dtype must be float32 or float64"),
    (dict(num_features=3, momentum=2.0), ValueError, "momentum"),
    (dict(num_features=3, eps=-1.0), ValueError, "eps"),
    (dict(num_features=3, affine=1), TypeError, "affine must be a bool"),
    (dict(num_features=3, channel_axis="last"), TypeError, "channel_axis must be an int"),
    (dict(num_features=3, backend="gpu"), ValueError, "backend"),
])
def test_constructor_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BatchNorm(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_out_buffers_and_relu_backward(backend, rng):
    bn = BatchNorm(4, channel_axis=-1, relu=True, dtype=np.float64, backend=backend)
    bn.bias[...] = [0.5, -0.5, 0.0, 1.0]
    x = rng.standard_normal((3, 5, 4))
    y_out = np.full_like(x, np.nan)
    dx_out = np.full_like(x, np.nan)
    y = bn.forward(x, out=y_out)
    assert y is y_out and (y >= 0).all()
    dx = bn.backward(np.ones_like(x), out=dx_out)
    assert dx is dx_out and np.isfinite(dx).all()
    np.testing.assert_allclose(bn.grad_bias, (y > 0).sum(axis=(0, 1)))


def _reference_layer(x, dy, **kwargs):
    """y and dx of a fresh numpy-backend layer: the values a reused buffer must hold."""
    ref = BatchNorm(x.shape[1], dtype=x.dtype, backend="numpy", **kwargs)
    return ref.forward(x).copy(), ref.backward(dy).copy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_result_is_reused_only_once_nothing_references_it(backend, rng):
    bn = BatchNorm(4, dtype=np.float64, backend=backend)
    x1, x2 = rng.standard_normal((2, 6, 4))
    address = bn.forward(x1).__array_interface__["data"][0]
    y2 = bn.forward(x2)  # the first result was dropped: its memory is written again
    assert y2.__array_interface__["data"][0] == address
    kept = y2.copy()
    y3 = bn.forward(x1)  # y2 is still held: a new array, y2 untouched
    assert y3 is not y2
    np.testing.assert_array_equal(y2, kept)
    view = bn.forward(x2)[:, :2]  # only a view is held: its base must not be written either
    kept_view = view.copy()
    bn.forward(x1)
    np.testing.assert_array_equal(view, kept_view)
    dx1 = bn.backward(x1)
    kept_dx = dx1.copy()
    dx2 = bn.backward(x2)
    assert dx2 is not dx1
    np.testing.assert_array_equal(dx1, kept_dx)
    assert bn.backward(x1).__array_interface__["data"][0] != 0  # dropped results still fine
    del dx1, dx2
    address = bn.backward(x1).__array_interface__["data"][0]
    assert bn.backward(x2).__array_interface__["data"][0] == address


@pytest.mark.parametrize("backend", BACKENDS)
def test_feeding_a_result_back_as_the_input_is_correct(backend, rng):
    """``forward(forward(x))``: the inner result is the outer input and the saved x of backward."""
    bn = BatchNorm(3, dtype=np.float64, backend=backend, momentum=0.0)
    x = rng.standard_normal((5, 3)) * 2 + 1
    dy = rng.standard_normal((5, 3))
    bn.forward(x)  # a previous result exists, unreferenced
    y = bn.forward(bn.forward(x))
    inner, _ = _reference_layer(x, dy)
    expected, expected_dx = _reference_layer(inner, dy)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.backward(dy), expected_dx, rtol=1e-10, atol=1e-12)
    dx = bn.backward(bn.backward(dy))  # dy fed back as the result of the previous backward
    assert np.isfinite(dx).all()
