"""The public API on numba device arrays, under the simulator: the optimizer classes with the
training-step extras, ``clip_grad_norm_``, ``LossScaler``, the batch-norm functions and layer.

The other files here test the backend's kernels one by one; this one goes through what a user
calls (argument checks, dispatch by array kind, the optimizer's bookkeeping) with simulated device
arrays, and compares with the same calls on float64 NumPy copies with ``backend="numpy"`` (the
reference). Sizes are tiny: the simulator runs every CUDA thread as a Python thread.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import fastopt
from conftest import TOLERANCE
from optim_cases import OPTIMIZER_CLASSES as OPTIMIZERS

from .helpers import device, host

SHAPES = [(40,), (3, 5), (1,), (0,)]  # several tensors (the tensor-list path), one empty

# each set fused into the update; "scale" is passed as step(grad_scale=...)
OPTIONS = [
    dict(clip_grad_norm=1.5, polyak="mean", scale=8.0),
    dict(clip_grad_value=0.8, polyak=0.9),
]


def optimizer_id(case):
    return case[0]


def options_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items())


def two_groups(params):
    return [{"params": params[:2]}, {"params": params[2:]}]


def host_arrays(rng, dtype, scale=1.0):
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES]


def on_device(arrays):
    return [device(a) for a in arrays]


def host_state(opt):
    """Params, averages and the state_dict, all as host copies."""
    return ([host(p) for p in opt._params()], [host(a) for a in opt.averaged_params()], opt.state_dict())


def assert_same_state(before, after):
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        np.testing.assert_array_equal(a, b, strict=True)
    sd_before, sd_after = before[2], after[2]
    assert sd_before["steps"] == sd_after["steps"]
    for k, state in sd_before["state"].items():
        assert state.keys() == sd_after["state"][k].keys()
        for name, value in state.items():
            np.testing.assert_array_equal(value, sd_after["state"][k][name], strict=True)


def test_device_arrays_go_to_the_numba_cuda_backend():
    p = device(np.zeros(3, np.float32))
    assert fastopt.dispatch.resolve(None, p).__name__ == "fastopt.kernels.numba_cuda"


@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
@pytest.mark.parametrize("case", OPTIMIZERS, ids=optimizer_id)
def test_optimizer_step_with_extras_matches_the_reference(case, options, rng):
    name, hyper = case
    options = dict(options)
    scale = options.pop("scale", 1.0)
    if name != "DeltaBarDelta" and "polyak" in options and options["polyak"] != "mean":
        hyper = {**hyper, "lr": fastopt.schedules.exponential(hyper["lr"], 0.8)}
    start = host_arrays(rng, np.float64)
    params = on_device([p.astype(np.float32) for p in start])
    expected_params = [p.copy() for p in start]
    opt = getattr(fastopt, name)(two_groups(params), **hyper, **options)
    expected = getattr(fastopt, name)(two_groups(expected_params), **hyper, **options, backend="numpy")
    # two steps: the second is the first with a state, a schedule's changed lr and a Polyak mean's
    # weight below 1 (a third step takes no branch the second does not)
    for _ in range(2):
        grads = host_arrays(rng, np.float32, scale=3.0 * scale)  # large enough that clipping acts
        d_grads = on_device(grads)
        step_options = {"grad_scale": scale} if scale != 1.0 else {}
        opt.step(d_grads, **step_options)
        expected.step([g.astype(np.float64) for g in grads], **step_options)
        for d, g in zip(d_grads, grads):
            np.testing.assert_array_equal(host(d), g, strict=True)  # the caller's gradients are never written
    tolerance = TOLERANCE[np.dtype(np.float32)]
    for k, (actual, wanted) in enumerate(zip(params, expected_params)):
        np.testing.assert_allclose(host(actual), wanted, err_msg=f"params[{k}]", **tolerance)
    for k, (actual, wanted) in enumerate(zip(opt.averaged_params(), expected.averaged_params())):
        assert fastopt.dispatch.resolve(None, actual).__name__ == "fastopt.kernels.numba_cuda"  # on the device
        np.testing.assert_allclose(host(actual), wanted, err_msg=f"average {k}", **tolerance)
    assert (opt.steps, opt.skipped_steps) == (2, 0)


def test_skip_leaves_everything_and_later_steps_ignore_the_bad_one(rng):
    start = host_arrays(rng, np.float32)
    options = dict(lr=1e-2, nonfinite="skip", polyak=0.5, clip_grad_norm=5.0)
    skipping = fastopt.Adam(two_groups(on_device(start)), **options)
    clean = fastopt.Adam(two_groups(on_device(start)), **options)
    good = [host_arrays(rng, np.float32) for _ in range(2)]  # one good step before the bad ones, one after
    skipping.step(on_device(good[0]))
    clean.step(on_device(good[0]))
    before = host_state(skipping)
    for bad_value in (np.nan, np.inf):
        bad = host_arrays(rng, np.float32)
        bad[1][2, 4] = bad_value
        skipping.step(on_device(bad))
        assert_same_state(before, host_state(skipping))
    assert (skipping.steps, skipping.skipped_steps) == (1, 2)
    for g in good[1:]:
        skipping.step(on_device(g))
        clean.step(on_device(g))
    assert_same_state(host_state(clean), host_state(skipping))


def test_raise_names_the_bad_tensor_and_changes_nothing(rng):
    opt = fastopt.RMSProp(two_groups(on_device(host_arrays(rng, np.float64))), lr=0.01, nonfinite="raise",
                          polyak="mean")
    opt.step(on_device(host_arrays(rng, np.float64)))
    before = host_state(opt)
    grads = host_arrays(rng, np.float64)
    grads[2][0] = -np.inf
    with pytest.raises(FloatingPointError, match=r"grads\[2\] contains NaN or Inf"):
        opt.step(on_device(grads))
    assert_same_state(before, host_state(opt))


def test_groups_update_only_the_named_groups(rng):
    start = host_arrays(rng, np.float64)
    params = on_device(start)
    expected_params = [p.copy() for p in start]
    opt = fastopt.Adam(two_groups(params), lr=0.1)
    expected = fastopt.Adam(two_groups(expected_params), lr=0.1, backend="numpy")
    grads = host_arrays(rng, np.float64)
    opt.step([None, None] + on_device(grads[2:]), groups=[1])
    expected.step([None, None] + grads[2:], groups=[1])
    for k, (actual, wanted) in enumerate(zip(params, expected_params)):
        np.testing.assert_allclose(host(actual), wanted, rtol=1e-12, atol=1e-15, err_msg=f"params[{k}]")
    for k in range(2):
        np.testing.assert_array_equal(host(params[k]), start[k], strict=True)


def test_host_and_device_arrays_cannot_be_mixed_and_nothing_changes(rng):
    start = host_arrays(rng, np.float32)
    params = on_device(start)
    opt = fastopt.SGD([params[0], params[1]], lr=0.1)
    with pytest.raises(TypeError, match="cannot be mixed"):
        opt.step([device(np.ones(40, np.float32)), np.ones((3, 5), np.float32)])
    for p, p0 in zip(params[:2], start[:2]):
        np.testing.assert_array_equal(host(p), p0, strict=True)
    assert opt.steps == 0
    with pytest.raises(TypeError, match="works on CUDA device arrays, got numpy.ndarray"):
        fastopt.SGD([np.ones(3, np.float32)], lr=0.1, backend="numba-cuda").step([np.ones(3, np.float32)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_clip_grad_norm_rewrites_device_gradients_and_returns_the_norm(dtype, rng):
    grads = host_arrays(rng, dtype, scale=2.0)
    d_grads = on_device(grads)
    norm = fastopt.clip_grad_norm_(d_grads, 1.0)
    wanted_norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads)))
    assert isinstance(norm, float)
    np.testing.assert_allclose(norm, wanted_norm, rtol=1e-12)
    coef = min(1.0, 1.0 / (wanted_norm + 1e-6))
    for k, (d, g) in enumerate(zip(d_grads, grads)):
        np.testing.assert_allclose(host(d), g.astype(np.float64) * coef, err_msg=f"grads[{k}]",
                                   **TOLERANCE[np.dtype(dtype)])
    single = device(grads[0])
    assert fastopt.clip_grad_norm_(single, 1e9) == pytest.approx(float(np.linalg.norm(grads[0].astype(np.float64))))


def test_loss_scaler_backs_off_on_overflow_and_divides_by_the_scale(rng):
    start = host_arrays(rng, np.float32)
    params = on_device(start)
    expected_params = [p.astype(np.float64) for p in start]
    opt = fastopt.SGD(params, lr=0.1, nonfinite="skip")
    expected = fastopt.SGD(expected_params, lr=0.1, backend="numpy")
    scaler = fastopt.LossScaler(init_scale=1024.0, growth_interval=2)
    grads = host_arrays(rng, np.float32)
    assert scaler.step(opt, on_device([g * np.float32(1024.0) for g in grads]))
    expected.step([g.astype(np.float64) for g in grads])
    overflow = [g * np.float32(1024.0) for g in host_arrays(rng, np.float32)]
    overflow[0][0] = np.inf
    assert not scaler.step(opt, on_device(overflow))
    assert scaler.scale == 512.0 and (opt.steps, opt.skipped_steps) == (1, 1)
    for k, (actual, wanted) in enumerate(zip(params, expected_params)):
        np.testing.assert_allclose(host(actual), wanted, err_msg=f"params[{k}]", **TOLERANCE[np.dtype(np.float32)])


# ---------------------------------------------------------------------------------------------
# batch normalization


@pytest.mark.parametrize("channel_axis", [1, -1], ids=["channel-first", "channels-last"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_batchnorm_functions_match_the_reference(channel_axis, relu, rng):
    shape = (3, 4, 5) if channel_axis == 1 else (3, 5, 4)
    channels = 4
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    running = [np.zeros(channels, np.float32), np.ones(channels, np.float32)]
    d_running = on_device(running)
    expected_running = [r.astype(np.float64) for r in running]
    f64 = lambda a: a.astype(np.float64)  # noqa: E731

    y, mean, invstd = fastopt.batchnorm_forward(device(x), device(weight), device(bias), *d_running,
                                                channel_axis=channel_axis, relu=relu)
    y_ref, mean_ref, invstd_ref = fastopt.batchnorm_forward(f64(x), f64(weight), f64(bias), *expected_running,
                                                            channel_axis=channel_axis, relu=relu, backend="numpy")
    tolerance = TOLERANCE[np.dtype(np.float32)]
    for what, actual, wanted in [("y", y, y_ref), ("saved_mean", mean, mean_ref), ("saved_invstd", invstd, invstd_ref),
                                 ("running_mean", d_running[0], expected_running[0]),
                                 ("running_var", d_running[1], expected_running[1])]:
        np.testing.assert_allclose(host(actual), wanted, err_msg=what, **tolerance)

    dx, dweight, dbias = fastopt.batchnorm_backward(device(dy), device(x), device(weight), mean, invstd,
                                                    bias=device(bias), channel_axis=channel_axis, relu=relu)
    dx_ref, dweight_ref, dbias_ref = fastopt.batchnorm_backward(
        f64(dy), f64(x), f64(weight), mean_ref, invstd_ref, bias=f64(bias), channel_axis=channel_axis, relu=relu,
        backend="numpy")
    for what, actual, wanted in [("dx", dx, dx_ref), ("grad_weight", dweight, dweight_ref), ("grad_bias", dbias, dbias_ref)]:
        np.testing.assert_allclose(host(actual), wanted, err_msg=what, **tolerance)

    y_eval, _, _ = fastopt.batchnorm_forward(device(x), device(weight), device(bias), *d_running, training=False,
                                             channel_axis=channel_axis, relu=relu)
    y_eval_ref, _, _ = fastopt.batchnorm_forward(f64(x), f64(weight), f64(bias), *expected_running, training=False,
                                                 channel_axis=channel_axis, relu=relu, backend="numpy")
    np.testing.assert_allclose(host(y_eval), y_eval_ref, err_msg="eval y", **tolerance)


def test_batchnorm_layer_on_the_device_trains_with_an_optimizer(rng):
    x = (rng.standard_normal((6, 3, 4)) * 3.0 + 1.0).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = fastopt.BatchNorm(3, backend="numba-cuda")
    expected = fastopt.BatchNorm(3, dtype=np.float64, backend="numpy")
    for array in (layer.weight, layer.bias, layer.running_mean, layer.running_var):
        assert fastopt.dispatch.resolve(None, array).__name__ == "fastopt.kernels.numba_cuda"
    opt = fastopt.SGD([layer.weight, layer.bias], lr=0.1)
    expected_opt = fastopt.SGD([expected.weight, expected.bias], lr=0.1, backend="numpy")
    for _ in range(2):
        y = layer.forward(device(x))
        y_ref = expected.forward(x.astype(np.float64))
        dx = layer.backward(device(dy))
        dx_ref = expected.backward(dy.astype(np.float64))
        opt.step([layer.grad_weight, layer.grad_bias])
        expected_opt.step([expected.grad_weight, expected.grad_bias])
    tolerance = TOLERANCE[np.dtype(np.float32)]
    np.testing.assert_allclose(host(y), y_ref, err_msg="y", **tolerance)
    np.testing.assert_allclose(host(dx), dx_ref, err_msg="dx", **tolerance)
    state, expected_state = layer.state_dict(), expected.state_dict()
    for key, value in expected_state.items():
        assert isinstance(state[key], np.ndarray), key
        np.testing.assert_allclose(state[key], value, err_msg=key, **tolerance)
    layer.eval()
    np.testing.assert_allclose(host(layer.forward(device(x))), expected.eval().forward(x.astype(np.float64)),
                               err_msg="eval y", **tolerance)
    weight = layer.weight
    layer.load_state_dict({**state, "running_var": np.full(3, 2.0)})  # in place: the optimizer keeps its arrays
    assert layer.weight is weight
    np.testing.assert_array_equal(host(layer.running_var), np.full(3, 2.0, np.float32), strict=True)
    np.testing.assert_array_equal(host(layer.weight), state["weight"], strict=True)
    with pytest.raises(TypeError, match="cannot be mixed"):
        layer.forward(x)


def test_device_arrays_of_this_process_are_simulated():
    """Guard: this file must never run against a real GPU by accident (it is the simulator suite)."""
    assert type(cuda.to_device(np.zeros(1))).__module__.startswith("numba.cuda.simulator")
