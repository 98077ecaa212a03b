"""The training-step extras of the optimizer classes: clipping, non-finite policy, Polyak averaging,
loss scaling, schedules as lr, and stepping a subset of the param groups.

The expected trajectories are computed here, independently of the extras' code: the test
transforms the gradients itself (norm, scale, clamp, in float64) and feeds them to the same
optimizer class without options on the reference backend in float64, and averages the iterates
itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt
from conftest import TOLERANCE
from optim_cases import OPTIMIZER_CLASSES as OPTIMIZERS

BACKENDS = ["numpy", "numba"]
DTYPES = [np.float32, np.float64]

OPTIONS = [
    dict(clip_grad_norm=1.5),
    dict(clip_grad_value=0.8),
    dict(clip_grad_norm=2.0, clip_grad_value=0.5, scale=8.0),  # scale: passed as step(grad_scale=...)
    dict(polyak="mean"),
    dict(polyak=0.9, clip_grad_norm=3.0),
]
SHAPES = [(40,), (0,), (3, 5), (1,), (257,)]  # several tensors: the multi-tensor path, a 0-size one


def optimizer_id(case):
    return case[0] + "".join(f"-{k}={v}" for k, v in case[1].items())


def options_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items())


def make_params(rng, dtype, shapes=SHAPES):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def make_grads(rng, dtype, shapes=SHAPES, scale=1.0):
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in shapes]


def two_groups(params):
    """Two param groups; the second has its own lr when the optimizer has one."""
    return [{"params": params[:2]}, {"params": params[2:]}]


def build(name, hyper, params, **options):
    return getattr(fastopt, name)(two_groups(params), **hyper, **options)


def transformed(grads, *, clip_grad_norm=None, clip_grad_value=None, scale=1.0):
    """The gradients the update must see, computed in float64 from the docs' equations."""
    g64 = [g.astype(np.float64) / scale for g in grads]
    if clip_grad_norm is not None:
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in g64))
        coef = min(1.0, clip_grad_norm / (norm + 1e-6))
        g64 = [g * coef for g in g64]
    if clip_grad_value is not None:
        g64 = [np.clip(g, -clip_grad_value, clip_grad_value) for g in g64]
    return g64


def snapshot(opt):
    return [np.array(p, copy=True) for p in opt._params()], opt.state_dict()


def assert_same_state(before, after):
    params_before, sd_before = before
    params_after, sd_after = after
    for a, b in zip(params_before, params_after):
        np.testing.assert_array_equal(a, b, strict=True)
    assert sd_before["steps"] == sd_after["steps"]
    assert sd_before["state"].keys() == sd_after["state"].keys()
    for k in sd_before["state"]:
        assert sd_before["state"][k].keys() == sd_after["state"][k].keys()
        for name, value in sd_before["state"][k].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, sd_after["state"][k][name], strict=True)
            else:
                assert value == sd_after["state"][k][name]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
@pytest.mark.parametrize("case", OPTIMIZERS, ids=optimizer_id)
def test_extras_follow_the_equations(case, options, backend, dtype, rng):
    name, hyper = case
    options = dict(options)
    scale = options.pop("scale", 1.0)
    start = make_params(rng, np.float64)
    params = [p.astype(dtype) for p in start]
    opt = build(name, hyper, params, backend=backend, **options)
    expected_params = [p.copy() for p in start]
    expected = build(name, hyper, expected_params, backend="numpy")
    polyak = options.get("polyak")
    averages = None
    for t in range(1, 7):
        grads = make_grads(rng, dtype, scale=3.0 * scale)  # large enough that clipping acts
        originals = [g.copy() for g in grads]
        opt.step(grads, **({"grad_scale": scale} if scale != 1.0 else {}))
        for g, g0 in zip(grads, originals):
            np.testing.assert_array_equal(g, g0, strict=True)  # the caller's gradients are never written
        expected.step(transformed(grads, clip_grad_norm=options.get("clip_grad_norm"),
                                  clip_grad_value=options.get("clip_grad_value"), scale=scale))
        if polyak is not None:
            if averages is None:
                averages = [p.copy() for p in expected_params]
            else:
                w = 1.0 / t if polyak == "mean" else 1.0 - polyak
                averages = [a + w * (p - a) for a, p in zip(averages, expected_params)]
    tolerance = TOLERANCE[np.dtype(dtype)]
    for k, (actual, wanted) in enumerate(zip(params, expected_params)):
        np.testing.assert_allclose(actual, wanted, err_msg=f"params[{k}]", **tolerance)
    if polyak is not None:
        for k, (actual, wanted) in enumerate(zip(opt.averaged_params(), averages)):
            assert actual.dtype == dtype
            np.testing.assert_allclose(actual, wanted, err_msg=f"average {k}", **tolerance)
    assert opt.steps == 6 and opt.skipped_steps == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OPTIMIZERS, ids=optimizer_id)
def test_skip_leaves_everything_and_later_steps_ignore_the_bad_one(case, backend, rng):
    name, hyper = case
    if name != "DeltaBarDelta":
        hyper = {**hyper, "lr": fastopt.schedules.exponential(hyper["lr"], 0.9)}
    start = make_params(rng, np.float32)
    a = [p.copy() for p in start]
    b = [p.copy() for p in start]
    options = dict(nonfinite="skip", polyak=0.5, clip_grad_norm=5.0)
    skipping = build(name, hyper, a, backend=backend, **options)
    clean = build(name, hyper, b, backend=backend, **options)
    good = [make_grads(rng, np.float32) for _ in range(4)]
    for g in good[:2]:
        skipping.step(g)
        clean.step(g)
    before = snapshot(skipping)
    for bad_value in (np.nan, np.inf, -np.inf):
        bad = make_grads(rng, np.float32)
        bad[4][17] = bad_value
        skipping.step(bad)
        assert_same_state(before, snapshot(skipping))
    assert skipping.skipped_steps == 3 and skipping.steps == 2
    for g in good[2:]:
        skipping.step(g)
        clean.step(g)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y, strict=True)
    for x, y in zip(skipping.averaged_params(), clean.averaged_params()):
        np.testing.assert_array_equal(x, y, strict=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raise_names_the_bad_tensor_and_changes_nothing(backend, rng):
    params = make_params(rng, np.float64)
    opt = build("Adam", dict(lr=0.1), params, backend=backend, nonfinite="raise", polyak="mean")
    opt.step(make_grads(rng, np.float64))
    before = snapshot(opt)
    grads = make_grads(rng, np.float64)
    grads[2][1, 3] = np.nan
    with pytest.raises(FloatingPointError, match=r"grads\[2\] contains NaN or Inf"):
        opt.step(grads)
    assert_same_state(before, snapshot(opt))
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_propagate_is_the_default_and_lets_nan_through(backend, rng):
    params = make_params(rng, np.float32)
    opt = build("SGD", dict(lr=0.1), params, backend=backend)
    assert opt.nonfinite == "propagate"
    grads = make_grads(rng, np.float32)
    grads[0][3] = np.nan
    opt.step(grads)
    assert np.isnan(params[0][3]) and np.isfinite(np.delete(params[0], 3)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_value_clamps_inf_but_keeps_nan(backend):
    param = np.zeros(4, np.float32)
    opt = fastopt.SGD([param], lr=1.0, clip_grad_value=0.5, backend=backend)
    opt.step([np.array([np.inf, -np.inf, np.nan, 0.25], np.float32)])
    np.testing.assert_array_equal(param, np.array([-0.5, 0.5, np.nan, -0.25], np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_power_of_two_grad_scale_is_exact(backend, dtype, rng):
    start = make_params(rng, dtype)
    a = [p.copy() for p in start]
    b = [p.copy() for p in start]
    scaled = build("Adam", dict(lr=1e-2), a, backend=backend)
    plain = build("Adam", dict(lr=1e-2), b, backend=backend)
    for _ in range(3):
        grads = make_grads(rng, dtype)
        scaled.step([g * dtype(1024.0) for g in grads], grad_scale=1024.0)
        plain.step(grads)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y, strict=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_update_only_the_named_groups(backend, rng):
    params = make_params(rng, np.float64)
    opt = build("Adam", dict(lr=0.1), params, backend=backend, polyak="mean")
    first = [p.copy() for p in params[:2]]
    grads = make_grads(rng, np.float64)
    opt.step([None, None] + grads[2:], groups=[1])
    for p, p0 in zip(params[:2], first):
        np.testing.assert_array_equal(p, p0, strict=True)
    assert all(opt.state[k] == {"step": 0} for k in range(2))
    assert all(opt.state[k]["step"] == 1 for k in range(2, len(params)))
    # group 0's first update is Adam's step t = 1, whatever group 1 did before
    reference = [p.copy() for p in first]
    lone = fastopt.Adam(reference, lr=0.1, backend="numpy")
    lone.step(grads[:2])
    opt.step(grads[:2] + [None] * (len(params) - 2), groups=[0])
    for p, q in zip(params[:2], reference):
        np.testing.assert_allclose(p, q, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_norm_with_groups_uses_only_the_stepped_gradients(backend, rng):
    params = make_params(rng, np.float64)
    opt = build("SGD", dict(lr=1.0), params, backend=backend, clip_grad_norm=1.0)
    before = [p.copy() for p in params]
    grads = make_grads(rng, np.float64)
    grads[0][...] = 1e6  # huge, but in the group that is not stepped
    opt.step(grads, groups=[1])
    stepped = transformed(grads[2:], clip_grad_norm=1.0)
    for p, p0, g in zip(params[2:], before[2:], stepped):
        np.testing.assert_allclose(p, p0 - g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_schedule_equals_setting_lr_by_hand(backend, rng):
    schedule = fastopt.schedules.chain([fastopt.schedules.linear_warmup(0.1, 3),
                                        fastopt.schedules.cosine(0.1, 5, lr_min=0.01)], [3])
    start = make_params(rng, np.float32)
    a = [p.copy() for p in start]
    b = [p.copy() for p in start]
    scheduled = build("AdamW", dict(lr=schedule), a, backend=backend)
    manual = build("AdamW", dict(lr=0.0), b, backend=backend)
    for k in range(10):
        for group in manual.param_groups:
            group["lr"] = schedule(k)
        grads = make_grads(rng, np.float32)
        scheduled.step(grads)
        manual.step(grads)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y, strict=True)


def test_a_schedule_returning_a_bad_lr_raises_before_anything_changes(rng):
    params = make_params(rng, np.float64)
    opt = build("SGD", dict(lr=lambda k: 0.1 - 0.1 * k), params)
    opt.step(make_grads(rng, np.float64))  # k = 0: lr 0.1
    opt.step(make_grads(rng, np.float64))  # k = 1: lr 0
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 0: the lr schedule returned a bad value at k=2"):
        opt.step(make_grads(rng, np.float64))
    assert_same_state(before, snapshot(opt))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_resumes_averages_and_counts_bit_for_bit(backend, rng):
    start = make_params(rng, np.float32)
    a = [p.copy() for p in start]
    opt = build("RMSProp", dict(lr=fastopt.schedules.step_decay(0.01, 2, 0.5)), a, backend=backend,
                polyak="mean", nonfinite="skip")
    grads = [make_grads(rng, np.float32) for _ in range(6)]
    for g in grads[:3]:
        opt.step(g)
    bad = make_grads(rng, np.float32)
    bad[0][0] = np.inf
    opt.step(bad)
    saved, saved_params = opt.state_dict(), [p.copy() for p in a]
    for g in grads[3:]:
        opt.step(g)
    b = saved_params
    resumed = build("RMSProp", dict(lr=fastopt.schedules.step_decay(0.01, 2, 0.5)), b, backend=backend,
                    polyak="mean", nonfinite="skip")
    resumed.load_state_dict(saved)
    assert resumed.steps == 3 and resumed.skipped_steps == 1
    for g in grads[3:]:
        resumed.step(g)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y, strict=True)
    for x, y in zip(opt.averaged_params(), resumed.averaged_params()):
        np.testing.assert_array_equal(x, y, strict=True)


def test_averaged_params_before_any_step_and_without_polyak(rng):
    params = make_params(rng, np.float64)
    opt = build("SGD", dict(lr=0.1), params, polyak=0.99)
    assert all(a is p for a, p in zip(opt.averaged_params(), params))
    with pytest.raises(RuntimeError, match="polyak"):
        build("SGD", dict(lr=0.1), params).averaged_params()


# --- loss scaling -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_scaler_backs_off_on_overflow_and_grows_after_good_steps(backend, rng):
    params = make_params(rng, np.float32)
    opt = build("SGD", dict(lr=0.1), params, backend=backend, nonfinite="skip")
    scaler = fastopt.LossScaler(init_scale=1024.0, growth_interval=2)
    scales, applied = [], []
    for overflow in (False, True, False, False, False, True):
        grads = make_grads(rng, np.float32, scale=scaler.scale)
        if overflow:
            grads[3][0] = np.inf
        applied.append(scaler.step(opt, grads))
        scales.append(scaler.scale)
    assert applied == [True, False, True, True, True, False]
    assert scales == [1024.0, 512.0, 512.0, 1024.0, 1024.0, 512.0]
    assert opt.skipped_steps == 2 and opt.steps == 4


def test_loss_scaler_needs_the_skip_policy(rng):
    opt = build("SGD", dict(lr=0.1), make_params(rng, np.float32))
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        fastopt.LossScaler().step(opt, make_grads(rng, np.float32))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(init_scale=0.0), ValueError, "init_scale"),
    (dict(growth_factor=1.0), ValueError, "growth_factor"),
    (dict(backoff_factor=1.0), ValueError, "backoff_factor"),
    (dict(growth_interval=0), ValueError, "growth_interval"),
    (dict(growth_interval=2.5), TypeError, "growth_interval"),
])
def test_loss_scaler_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastopt.LossScaler(**kwargs)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options, error, match", [
    (dict(clip_grad_norm=0.0), ValueError, "clip_grad_norm must be > 0"),
    (dict(clip_grad_norm="1"), TypeError, "clip_grad_norm must be a real number"),
    (dict(clip_grad_value=-1.0), ValueError, "clip_grad_value must be > 0"),
    (dict(clip_grad_value=math.inf), ValueError, "clip_grad_value must be finite"),
    (dict(nonfinite="ignore"), ValueError, "nonfinite must be one of"),
    (dict(polyak=1.0), ValueError, "polyak must be < 1"),
    (dict(polyak="median"), ValueError, "polyak must be None, 'mean' or a float"),
    (dict(polyak=True), TypeError, "polyak must be a real number"),
    (dict(clip_norm=1.0), TypeError, "clip_norm"),
])
def test_bad_options_raise_at_construction(options, error, match, rng):
    with pytest.raises(error, match=match):
        build("Adam", {}, make_params(rng, np.float64), **options)


@pytest.mark.parametrize("step_kwargs, error, match", [
    (dict(grad_scale=0.0), ValueError, "grad_scale must be > 0"),
    (dict(grad_scale=math.nan), ValueError, "grad_scale must be finite"),
    (dict(grad_scale=1e-320), ValueError, "grad_scale must have a finite nonzero reciprocal"),
    (dict(grad_scale="2"), TypeError, "grad_scale must be a real number"),
    (dict(groups=[2]), ValueError, r"groups holds 2, but the optimizer has param groups 0..1"),
    (dict(groups=[0, 0]), ValueError, "must not repeat"),
    (dict(groups=[]), ValueError, "at least one"),
    (dict(groups=0), TypeError, "groups must be a list"),
    (dict(groups=[0.0]), TypeError, "int indices"),
])
def test_bad_step_arguments_change_nothing(step_kwargs, error, match, rng):
    params = make_params(rng, np.float64)
    opt = build("Adam", {}, params, polyak="mean")
    opt.step(make_grads(rng, np.float64))
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step(make_grads(rng, np.float64), **step_kwargs)
    assert_same_state(before, snapshot(opt))


def test_none_gradient_of_a_stepped_group_is_refused(rng):
    params = make_params(rng, np.float64)
    opt = build("SGD", dict(lr=0.1), params)
    grads = make_grads(rng, np.float64)
    grads[3] = None
    with pytest.raises(TypeError, match=r"grads\[3\] must be a numpy.ndarray or a CUDA device array, got None"):
        opt.step(grads, groups=[1])


def test_delta_bar_delta_refuses_a_schedule(rng):
    with pytest.raises(TypeError, match="initial per-element rate"):
        fastopt.DeltaBarDelta(make_params(rng, np.float64), lr=lambda k: 0.1, kappa=0.1, phi=0.1, gamma=0.5)


# --- the per-step checks after the first step (cached layout) ------------------------------------


def test_later_steps_still_refuse_gradients_that_alias_params_or_state(rng):
    buffer = rng.standard_normal(20)
    params = [buffer[:10], rng.standard_normal(5)]  # a view of a larger buffer, and an owner
    opt = fastopt.Adam(params, lr=0.1)
    opt.step([rng.standard_normal(10), rng.standard_normal(5)])
    opt.step([buffer[10:], rng.standard_normal(5)])  # same buffer, no overlap: allowed
    before = snapshot(opt)
    for grads, match in [
        ([params[0], rng.standard_normal(5)], r"grads\[0\] and params\[0\] must not share memory|params\[0\] and grads\[0\]"),
        ([buffer[5:15], rng.standard_normal(5)], "must not share memory"),
        ([rng.standard_normal(10), opt.state[1]["m"]], "must not share memory"),
        ([rng.standard_normal(10), opt.state[1]["v"][::-1]], "must be C-contiguous"),
        ([rng.standard_normal(10), rng.standard_normal(5).astype(np.float32)], "must have the dtype"),
        ([rng.standard_normal(10), rng.standard_normal(6)], "must have the shape"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            opt.step(grads)
        assert_same_state(before, snapshot(opt))


def test_replacing_a_param_list_is_checked_again(rng):
    params = make_params(rng, np.float64)
    opt = build("SGD", dict(lr=0.1), params)
    opt.step(make_grads(rng, np.float64))
    opt.param_groups[0]["params"][0] = params[2]  # now two groups share one array
    grads = make_grads(rng, np.float64)
    grads[0] = rng.standard_normal(params[2].shape)
    with pytest.raises(ValueError, match="must not share memory"):
        opt.step(grads)
