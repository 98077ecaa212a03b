"""The NumPy reference optimizers against steps computed by hand.

Every expected value here is computed with plain Python ``math`` arithmetic, element by element,
from the equations of the lecture notes (and, where the notes are silent, of docs/algorithms.md),
never by calling NumPy versions of the same code. Arrays are tiny (1-3 elements) and runs are a
few steps long, in float64 with tight tolerances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastopt.reference.optim import (
    adadelta_step,
    adagrad_step,
    adam_step,
    delta_bar_delta_step,
    rmsprop_step,
    sgd_step,
)

REL = 1e-12  # float64 hand arithmetic vs NumPy: a few ulps apart at most


def f64(*values):
    return np.array(values, dtype=np.float64)


def approx(values):
    return pytest.approx(list(values), rel=REL, abs=1e-15)


def sgd(param, grad, velocity=None, *, lr, momentum=0.0, nesterov=False, weight_decay=0.0,
        convention="textbook"):
    sgd_step(param, grad, velocity, lr=lr, momentum=momentum, nesterov=nesterov,
             weight_decay=weight_decay, convention=convention)


def rmsprop(param, grad, square_avg, grad_avg=None, velocity=None, *, lr, rho, eps, momentum=0.0,
            nesterov=False, centered=False, weight_decay=0.0, convention="textbook"):
    rmsprop_step(param, grad, square_avg, grad_avg, velocity, lr=lr, rho=rho, eps=eps,
                 momentum=momentum, nesterov=nesterov, centered=centered,
                 weight_decay=weight_decay, convention=convention)


def adam(param, grad, m, v, v_max=None, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
         weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False):
    adam_step(param, grad, m, v, v_max, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
              weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
              amsgrad=amsgrad)


# --------------------------------------------------------------------------------------- SGD


def test_sgd_plain_two_steps():
    theta = [1.0, -2.0, 0.5]
    param = f64(*theta)
    for lr, g in [(0.1, [0.5, 3.0, -1.0]), (0.2, [-0.25, 1.0, 2.0])]:
        sgd(param, f64(*g), lr=lr)
        theta = [t - lr * gi for t, gi in zip(theta, g)]
        assert param.tolist() == approx(theta)
    assert theta == pytest.approx([1.0, -2.5, 0.2])  # [0.95, -2.3, 0.6], then [0.95 + 0.05, ...]


def test_sgd_plain_ignores_velocity_when_momentum_is_zero():
    param, velocity = f64(1.0), f64(7.0)
    sgd(param, f64(2.0), velocity, lr=0.5, momentum=0.0)
    assert param.tolist() == approx([0.0])
    assert velocity.tolist() == [7.0]


def test_sgd_weight_decay_is_l2_on_the_gradient():
    lr, lam = 0.1, 0.5
    param = f64(2.0, -4.0)
    sgd(param, f64(1.0, 1.0), lr=lr, weight_decay=lam)
    assert param.tolist() == approx([2.0 - lr * (1.0 + lam * 2.0), -4.0 - lr * (1.0 + lam * -4.0)])


def test_sgd_momentum_textbook_two_steps():
    lr, alpha = 0.1, 0.9
    param, velocity = f64(1.0, -1.0), f64(0.0, 0.0)
    theta, v = [1.0, -1.0], [0.0, 0.0]
    for g in ([0.5, 2.0], [-0.2, 1.0]):
        sgd(param, f64(*g), velocity, lr=lr, momentum=alpha)
        v = [alpha * vi - lr * gi for vi, gi in zip(v, g)]
        theta = [t + vi for t, vi in zip(theta, v)]
        assert velocity.tolist() == approx(v)
        assert param.tolist() == approx(theta)
    # written out once: v1 = -0.05, v2 = 0.9 * -0.05 + 0.02 = -0.025
    assert v[0] == pytest.approx(-0.025) and theta[0] == pytest.approx(0.925)


def test_sgd_momentum_textbook_lr_change_affects_only_new_gradients():
    alpha, lr1, g1 = 0.9, 0.1, 2.0
    finals = []
    for lr2 in (0.01, 5.0):
        param, velocity = f64(1.0), f64(0.0)
        sgd(param, f64(g1), velocity, lr=lr1, momentum=alpha)
        sgd(param, f64(0.0), velocity, lr=lr2, momentum=alpha)  # no new gradient: lr2 unused
        finals.append(param[0])
        v1 = -lr1 * g1
        v2 = alpha * v1
        assert velocity.tolist() == approx([v2])
        assert param.tolist() == approx([1.0 + v1 + v2])
    assert finals[0] == finals[1]

    # with a new gradient, the new lr scales only that gradient
    param, velocity = f64(1.0), f64(0.0)
    sgd(param, f64(g1), velocity, lr=lr1, momentum=alpha)
    sgd(param, f64(3.0), velocity, lr=0.5, momentum=alpha)
    v2 = alpha * (-lr1 * g1) - 0.5 * 3.0
    assert velocity.tolist() == approx([v2])
    assert param.tolist() == approx([1.0 - lr1 * g1 + v2])


def test_sgd_momentum_torch_lr_change_rescales_the_whole_buffer():
    # torch convention: b accumulates raw gradients, so a later lr scales the old ones too
    alpha, lr1, lr2, g1 = 0.9, 0.1, 5.0, 2.0
    param, buf = f64(1.0), f64(0.0)
    sgd(param, f64(g1), buf, lr=lr1, momentum=alpha, convention="torch")
    sgd(param, f64(0.0), buf, lr=lr2, momentum=alpha, convention="torch")
    b1 = g1
    b2 = alpha * b1
    assert buf.tolist() == approx([b2])
    assert param.tolist() == approx([1.0 - lr1 * b1 - lr2 * b2])


def _quadratic_grad(a, theta):
    """∇J for J(θ) = ½ a θ², element-wise."""
    return [ai * ti for ai, ti in zip(a, theta)]


def test_sgd_nesterov_textbook_is_the_notes_lookahead_form_reparametrized():
    # The notes: v ← αv − ε∇J(θ + αv); θ ← θ + v. The reference stores Θ = θ + αv and takes
    # the gradient at Θ. On J(θ) = ½aθ² both must describe the same trajectory.
    a = [1.0, 3.0, 0.5]
    lr, alpha = 0.1, 0.9
    theta, v = [1.0, -2.0, 4.0], [0.0, 0.0, 0.0]
    param = f64(*theta)  # Θ = θ + α·0
    velocity = f64(0.0, 0.0, 0.0)
    for _ in range(3):
        look = [t + alpha * vi for t, vi in zip(theta, v)]
        v = [alpha * vi - lr * gi for vi, gi in zip(v, _quadratic_grad(a, look))]
        theta = [t + vi for t, vi in zip(theta, v)]

        sgd(param, f64(*_quadratic_grad(a, param.tolist())), velocity, lr=lr, momentum=alpha,
            nesterov=True)
        assert velocity.tolist() == approx(v)
        assert param.tolist() == approx([t + alpha * vi for t, vi in zip(theta, v)])


def test_sgd_nesterov_textbook_one_step_by_the_doc_formula():
    lr, alpha = 0.1, 0.5
    param, velocity = f64(1.0), f64(0.2)
    sgd(param, f64(2.0), velocity, lr=lr, momentum=alpha, nesterov=True)
    v = alpha * 0.2 - lr * 2.0
    assert velocity.tolist() == approx([v])
    assert param.tolist() == approx([1.0 + alpha * v - lr * 2.0])


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_torch_matches_textbook_at_constant_lr(nesterov):
    # with constant ε, textbook v = −ε·b, so the θ trajectories coincide (up to rounding)
    a = [1.0, 3.0, 0.5]
    lr, alpha = 0.05, 0.8
    p_text, v_text = f64(1.0, -2.0, 4.0), f64(0.0, 0.0, 0.0)
    p_torch, b_torch = f64(1.0, -2.0, 4.0), f64(0.0, 0.0, 0.0)
    for _ in range(5):
        sgd(p_text, f64(*_quadratic_grad(a, p_text.tolist())), v_text, lr=lr, momentum=alpha,
            nesterov=nesterov)
        sgd(p_torch, f64(*_quadratic_grad(a, p_torch.tolist())), b_torch, lr=lr, momentum=alpha,
            nesterov=nesterov, convention="torch")
        np.testing.assert_allclose(p_torch, p_text, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(-lr * b_torch, v_text, rtol=1e-13, atol=1e-15)


def test_sgd_nesterov_torch_one_step():
    lr, alpha = 0.1, 0.5
    param, buf = f64(1.0), f64(0.2)
    sgd(param, f64(2.0), buf, lr=lr, momentum=alpha, nesterov=True, convention="torch")
    b = alpha * 0.2 + 2.0
    assert buf.tolist() == approx([b])
    assert param.tolist() == approx([1.0 - lr * (2.0 + alpha * b)])


# ------------------------------------------------------------------------------------ AdaGrad


@pytest.mark.parametrize("r0", [0.0, 0.5])
def test_adagrad_two_steps(r0):
    lr, eps = 0.1, 1e-7
    theta, r = [1.0, -1.0], [r0, r0]
    param, acc = f64(*theta), f64(r0, r0)
    for g in ([2.0, -0.5], [1.0, 0.25]):
        adagrad_step(param, f64(*g), acc, lr=lr, eps=eps, weight_decay=0.0)
        r = [ri + gi * gi for ri, gi in zip(r, g)]
        theta = [t - lr * gi / (eps + math.sqrt(ri)) for t, gi, ri in zip(theta, g, r)]
        assert acc.tolist() == approx(r)
        assert param.tolist() == approx(theta)


def test_adagrad_first_step_from_zero_is_lr_sized():
    param, acc = f64(0.0, 0.0, 0.0), f64(0.0, 0.0, 0.0)
    adagrad_step(param, f64(1e-3, -5.0, 300.0), acc, lr=0.1, eps=1e-10, weight_decay=0.0)
    np.testing.assert_allclose(param, [-0.1, 0.1, -0.1], rtol=1e-6)


def test_adagrad_weight_decay():
    lr, eps, lam = 0.1, 1e-7, 0.2
    param, acc = f64(3.0), f64(1.0)
    adagrad_step(param, f64(0.5), acc, lr=lr, eps=eps, weight_decay=lam)
    g = 0.5 + lam * 3.0
    r = 1.0 + g * g
    assert acc.tolist() == approx([r])
    assert param.tolist() == approx([3.0 - lr * g / (eps + math.sqrt(r))])


# ------------------------------------------------------------------------------------ RMSProp


def test_rmsprop_textbook_delta_inside_the_root():
    lr, rho, eps = 0.01, 0.9, 0.01  # a large δ so inside and outside the root differ clearly
    theta, r = [1.0, -2.0], [0.0, 0.0]
    param, sq = f64(*theta), f64(0.0, 0.0)
    for g in ([0.5, -0.1], [0.3, 0.2]):
        rmsprop(param, f64(*g), sq, lr=lr, rho=rho, eps=eps)
        r = [rho * ri + (1 - rho) * gi * gi for ri, gi in zip(r, g)]
        theta = [t - lr * gi / math.sqrt(eps + ri) for t, gi, ri in zip(theta, g, r)]
        assert sq.tolist() == approx(r)
        assert param.tolist() == approx(theta)
    outside = [1.0 - lr * 0.5 / (math.sqrt((1 - rho) * 0.25) + eps)]
    fresh = f64(1.0)
    rmsprop(fresh, f64(0.5), f64(0.0), lr=lr, rho=rho, eps=eps)
    assert fresh[0] != pytest.approx(outside[0], rel=1e-6)


def test_rmsprop_textbook_momentum():
    lr, rho, eps, alpha = 0.01, 0.9, 1e-6, 0.5
    theta, r, v = [1.0], [0.0], [0.0]
    param, sq, vel = f64(1.0), f64(0.0), f64(0.0)
    for g in (2.0, -1.0, 0.5):
        rmsprop(param, f64(g), sq, None, vel, lr=lr, rho=rho, eps=eps, momentum=alpha)
        r = [rho * r[0] + (1 - rho) * g * g]
        v = [alpha * v[0] - lr * g / math.sqrt(eps + r[0])]
        theta = [theta[0] + v[0]]
        assert sq.tolist() == approx(r)
        assert vel.tolist() == approx(v)
        assert param.tolist() == approx(theta)


def test_rmsprop_textbook_nesterov_is_the_notes_lookahead_form_reparametrized():
    # RMSProp with Nesterov momentum as the notes (after Goodfellow et al.) write it: the
    # gradient at θ + αv, r updated with it, v ← αv − εg/√(δ + r), θ ← θ + v. The reference
    # stores Θ = θ + αv. On J(θ) = ½aθ² both must give the same trajectory.
    a = [1.0, 4.0]
    lr, rho, eps, alpha = 0.05, 0.9, 1e-6, 0.7
    theta, r, v = [1.0, -0.5], [0.0, 0.0], [0.0, 0.0]
    param, sq, vel = f64(*theta), f64(0.0, 0.0), f64(0.0, 0.0)
    for _ in range(3):
        look = [t + alpha * vi for t, vi in zip(theta, v)]
        g = _quadratic_grad(a, look)
        r = [rho * ri + (1 - rho) * gi * gi for ri, gi in zip(r, g)]
        v = [alpha * vi - lr * gi / math.sqrt(eps + ri) for vi, gi, ri in zip(v, g, r)]
        theta = [t + vi for t, vi in zip(theta, v)]

        rmsprop(param, f64(*_quadratic_grad(a, param.tolist())), sq, None, vel, lr=lr, rho=rho,
                eps=eps, momentum=alpha, nesterov=True)
        assert sq.tolist() == approx(r)
        assert vel.tolist() == approx(v)
        assert param.tolist() == approx([t + alpha * vi for t, vi in zip(theta, v)])


def test_rmsprop_textbook_centered():
    lr, rho, eps = 0.01, 0.9, 1e-6
    theta, r, s = [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]
    param, sq, gavg = f64(*theta), f64(0.0, 0.0), f64(0.0, 0.0)
    for g in ([0.5, -3.0], [0.4, 1.0]):
        rmsprop(param, f64(*g), sq, gavg, lr=lr, rho=rho, eps=eps, centered=True)
        r = [rho * ri + (1 - rho) * gi * gi for ri, gi in zip(r, g)]
        s = [rho * si + (1 - rho) * gi for si, gi in zip(s, g)]
        theta = [t - lr * gi / math.sqrt(eps + ri - si * si) for t, gi, ri, si in zip(theta, g, r, s)]
        assert sq.tolist() == approx(r)
        assert gavg.tolist() == approx(s)
        assert param.tolist() == approx(theta)
    # first step by hand: r − s² = ρ(1−ρ)g²
    one = f64(1.0)
    rmsprop(one, f64(0.5), f64(0.0), f64(0.0), lr=lr, rho=rho, eps=eps, centered=True)
    assert one.tolist() == approx([1.0 - lr * 0.5 / math.sqrt(eps + rho * (1 - rho) * 0.25)])


def test_rmsprop_torch_delta_outside_the_root_with_centered_momentum():
    lr, rho, eps, alpha = 0.01, 0.9, 0.01, 0.5
    theta, r, s, b = [1.0], [0.0], [0.0], [0.0]
    param, sq, gavg, buf = f64(1.0), f64(0.0), f64(0.0), f64(0.0)
    for g in (2.0, -1.0):
        rmsprop(param, f64(g), sq, gavg, buf, lr=lr, rho=rho, eps=eps, momentum=alpha,
                centered=True, convention="torch")
        r = [rho * r[0] + (1 - rho) * g * g]
        s = [rho * s[0] + (1 - rho) * g]
        d = math.sqrt(r[0] - s[0] * s[0]) + eps
        b = [alpha * b[0] + g / d]
        theta = [theta[0] - lr * b[0]]
        assert buf.tolist() == approx(b)
        assert param.tolist() == approx(theta)

    param = f64(1.0)
    rmsprop(param, f64(0.5), f64(0.0), lr=lr, rho=rho, eps=eps, convention="torch")
    assert param.tolist() == approx([1.0 - lr * 0.5 / (math.sqrt((1 - rho) * 0.25) + eps)])


# ----------------------------------------------------------------------------------- AdaDelta


def _adadelta_by_hand(lr, convention, grads, *, rho=0.9, eps=1e-6):
    theta, r, u = [1.0, -1.0], [0.0, 0.0], [0.0, 0.0]
    for g in grads:
        r = [rho * ri + (1 - rho) * gi * gi for ri, gi in zip(r, g)]
        delta = [math.sqrt(ui + eps) / math.sqrt(ri + eps) * gi for ui, ri, gi in zip(u, r, g)]
        theta = [t - lr * d for t, d in zip(theta, delta)]
        if convention == "textbook":
            u = [rho * ui + (1 - rho) * (lr * d) * (lr * d) for ui, d in zip(u, delta)]
        else:
            u = [rho * ui + (1 - rho) * d * d for ui, d in zip(u, delta)]
    return theta, r, u


def _adadelta_reference(lr, convention, grads, *, rho=0.9, eps=1e-6):
    param, sq, acc = f64(1.0, -1.0), f64(0.0, 0.0), f64(0.0, 0.0)
    for g in grads:
        adadelta_step(param, f64(*g), sq, acc, lr=lr, rho=rho, eps=eps, weight_decay=0.0,
                      convention=convention)
    return param.tolist(), sq.tolist(), acc.tolist()


GRADS = ([0.5, -2.0], [0.3, 1.0], [-0.1, 0.5])


@pytest.mark.parametrize("convention", ["textbook", "torch"])
@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_adadelta_by_hand(lr, convention):
    theta, r, u = _adadelta_by_hand(lr, convention, GRADS)
    param, sq, acc = _adadelta_reference(lr, convention, GRADS)
    assert param == approx(theta)
    assert sq == approx(r)
    assert acc == approx(u)


def test_adadelta_conventions_agree_at_lr_one_and_differ_otherwise():
    text = _adadelta_reference(1.0, "textbook", GRADS)
    torch = _adadelta_reference(1.0, "torch", GRADS)
    for x, y in zip(text, torch):
        assert x == approx(y)

    lr = 0.5
    text = _adadelta_reference(lr, "textbook", GRADS[:1])
    torch = _adadelta_reference(lr, "torch", GRADS[:1])
    assert text[0] == approx(torch[0])  # first step: u = 0 in both, same θ
    assert text[2] == approx([lr * lr * ui for ui in torch[2]])  # textbook u holds (εΔ)²
    text = _adadelta_reference(lr, "textbook", GRADS[:2])
    torch = _adadelta_reference(lr, "torch", GRADS[:2])
    assert text[0] != approx(torch[0])


# --------------------------------------------------------------------------------------- Adam


def test_adam_first_step_is_lr_sized_for_any_gradient():
    # at t = 1, m̂ = g and v̂ = g², so Δθ = −εg/(δ + |g|) ≈ −ε·sign(g)
    lr, eps = 0.01, 1e-8
    g = [1e-3, -0.5, 1e3]
    param, m, v = f64(0.0, 0.0, 0.0), f64(0.0, 0.0, 0.0), f64(0.0, 0.0, 0.0)
    adam(param, f64(*g), m, v, step=1, lr=lr, eps=eps)
    assert param.tolist() == approx([-lr * gi / (eps + abs(gi)) for gi in g])
    np.testing.assert_allclose(param, [-lr, lr, -lr], rtol=1e-5)


def test_adam_two_steps_with_the_textbook_bias_corrections():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    theta, s, r = [1.0, -1.0], [0.0, 0.0], [0.0, 0.0]
    param, m, v = f64(*theta), f64(0.0, 0.0), f64(0.0, 0.0)
    for t, g in enumerate(([0.5, -2.0], [0.1, 1.0]), start=1):
        adam(param, f64(*g), m, v, step=t, lr=lr, beta1=b1, beta2=b2, eps=eps)
        s = [b1 * si + (1 - b1) * gi for si, gi in zip(s, g)]
        r = [b2 * ri + (1 - b2) * gi * gi for ri, gi in zip(r, g)]
        s_hat = [si / (1 - b1 ** t) for si in s]
        r_hat = [ri / (1 - b2 ** t) for ri in r]
        theta = [th - lr * sh / (eps + math.sqrt(rh)) for th, sh, rh in zip(theta, s_hat, r_hat)]
        assert m.tolist() == approx(s)
        assert v.tolist() == approx(r)
        assert param.tolist() == approx(theta)


def test_adam_amsgrad_uses_the_running_max():
    lr, b1, b2, eps = 0.01, 0.5, 0.9, 1e-8
    theta, s, r, r_max = 1.0, 0.0, 0.0, 0.0
    param, m, v, v_max = f64(theta), f64(0.0), f64(0.0), f64(0.0)
    for t, g in enumerate((1.0, 0.1), start=1):
        adam(param, f64(g), m, v, v_max, step=t, lr=lr, beta1=b1, beta2=b2, eps=eps, amsgrad=True)
        s = b1 * s + (1 - b1) * g
        r = b2 * r + (1 - b2) * g * g
        r_max = max(r_max, r)
        theta = theta - lr * (s / (1 - b1 ** t)) / (eps + math.sqrt(r_max / (1 - b2 ** t)))
        assert v.tolist() == approx([r])
        assert v_max.tolist() == approx([r_max])
        assert param.tolist() == approx([theta])
    assert r_max == pytest.approx(0.1) and r == pytest.approx(0.091)  # step 2 used the max, not v

    plain = f64(1.0)
    m, v = f64(0.0), f64(0.0)
    for t, g in enumerate((1.0, 0.1), start=1):
        adam(plain, f64(g), m, v, f64(123.0), step=t, lr=lr, beta1=b1, beta2=b2, eps=eps)
    assert plain[0] != pytest.approx(theta, rel=1e-9)  # without amsgrad v_max is ignored


def test_adamw_decoupled_decay_differs_from_adam_l2():
    lr, b1, b2, eps, lam = 0.01, 0.9, 0.999, 1e-8, 0.1
    theta0, g = 2.0, 0.1

    decoupled = f64(theta0)
    adam(decoupled, f64(g), f64(0.0), f64(0.0), step=1, lr=lr, beta1=b1, beta2=b2, eps=eps,
         weight_decay=lam, decoupled_weight_decay=True)
    theta = theta0 - lr * lam * theta0
    s_hat = (1 - b1) * g / (1 - b1)
    r_hat = (1 - b2) * g * g / (1 - b2)
    expected_w = theta - lr * s_hat / (eps + math.sqrt(r_hat))
    assert decoupled.tolist() == approx([expected_w])

    coupled = f64(theta0)
    adam(coupled, f64(g), f64(0.0), f64(0.0), step=1, lr=lr, beta1=b1, beta2=b2, eps=eps,
         weight_decay=lam)
    g2 = g + lam * theta0
    s_hat = (1 - b1) * g2 / (1 - b1)
    r_hat = (1 - b2) * g2 * g2 / (1 - b2)
    expected_l2 = theta0 - lr * s_hat / (eps + math.sqrt(r_hat))
    assert coupled.tolist() == approx([expected_l2])

    assert expected_w == pytest.approx(1.988, rel=1e-6)  # decay + a full lr-sized step
    assert expected_l2 == pytest.approx(1.99, rel=1e-6)  # the decay is normalized away


# ---------------------------------------------------------------------------- delta-bar-delta


def test_delta_bar_delta_rate_rules_and_order():
    kappa, phi, gamma, lr = 0.05, 0.2, 0.3, 0.1  # φ ≠ ½ so e(1−φ) ≠ eφ
    theta = [1.0, 1.0, 1.0]
    param = f64(*theta)
    rates, dbar = f64(lr, lr, lr), f64(0.0, 0.0, 0.0)

    # step 1: δ̄ = 0, so every product is 0 and the rates stay at lr
    g1 = [1.0, 1.0, 1.0]
    delta_bar_delta_step(param, f64(*g1), rates, dbar, kappa=kappa, phi=phi, gamma=gamma)
    theta = [t - lr * g for t, g in zip(theta, g1)]
    assert param.tolist() == approx(theta)
    assert rates.tolist() == approx([lr, lr, lr])
    assert dbar.tolist() == approx([(1 - gamma) * g for g in g1])

    # step 2: agree (+κ), disagree (×(1−φ)), zero gradient (unchanged); θ uses the old rates
    g2 = [0.5, -2.0, 0.0]
    old_dbar = dbar.tolist()
    delta_bar_delta_step(param, f64(*g2), rates, dbar, kappa=kappa, phi=phi, gamma=gamma)
    theta = [t - lr * g for t, g in zip(theta, g2)]
    e = [lr + kappa, lr - phi * lr, lr]
    assert param.tolist() == approx(theta)
    assert rates.tolist() == approx(e)
    assert dbar.tolist() == approx([(1 - gamma) * g + gamma * d for g, d in zip(g2, old_dbar)])

    # step 3: θ now moves with the changed rates
    g3 = [1.0, 1.0, 1.0]
    delta_bar_delta_step(param, f64(*g3), rates, dbar, kappa=kappa, phi=phi, gamma=gamma)
    theta = [t - ei * g for t, ei, g in zip(theta, e, g3)]
    assert param.tolist() == approx(theta)


def test_delta_bar_delta_compares_with_the_previous_delta_bar():
    # δ̄(t−1)·g < 0 but δ̄(t)·g > 0: the rate must shrink (the product uses the old δ̄)
    kappa, phi, gamma = 0.05, 0.25, 0.5
    param, rates, dbar = f64(0.0), f64(0.2), f64(-0.1)
    delta_bar_delta_step(param, f64(1.0), rates, dbar, kappa=kappa, phi=phi, gamma=gamma)
    new_dbar = (1 - gamma) * 1.0 + gamma * -0.1
    assert new_dbar > 0
    assert rates.tolist() == approx([0.2 * (1 - phi)])
    assert dbar.tolist() == approx([new_dbar])
    assert param.tolist() == approx([-0.2])


# ------------------------------------------------------- weight decay, dtype, grad read-only

L2_CASES = {
    "adagrad": lambda p, g, lam: adagrad_step(p[0], g, p[1], lr=0.1, eps=1e-7, weight_decay=lam),
    "rmsprop": lambda p, g, lam: rmsprop(p[0], g, p[1], p[2], p[3], lr=0.1, rho=0.9, eps=1e-6,
                                         momentum=0.5, centered=True, weight_decay=lam),
    "adadelta": lambda p, g, lam: adadelta_step(p[0], g, p[1], p[2], lr=0.5, rho=0.9, eps=1e-6,
                                                weight_decay=lam, convention="textbook"),
    "adam": lambda p, g, lam: adam(p[0], g, p[1], p[2], step=1, lr=0.1, weight_decay=lam),
}


@pytest.mark.parametrize("name", sorted(L2_CASES))
def test_weight_decay_is_the_gradient_plus_lambda_theta(name):
    lam, theta, g = 0.3, [1.5, -2.0], [0.2, 0.7]
    decayed = [f64(*theta), f64(0.1, 0.2), f64(0.0, 0.1), f64(0.0, 0.0)]
    L2_CASES[name](decayed, f64(*g), lam)
    by_hand = [f64(*theta), f64(0.1, 0.2), f64(0.0, 0.1), f64(0.0, 0.0)]
    L2_CASES[name](by_hand, f64(*[gi + lam * ti for gi, ti in zip(g, theta)]), 0.0)
    for x, y in zip(decayed, by_hand):
        np.testing.assert_allclose(x, y, rtol=1e-14, atol=0)


class Float32Only(np.ndarray):
    """A float32 array whose every ufunc must compute in float32 (or give bools): an upcast to
    float64 anywhere in an expression (say, an ``np.float64`` scalar) raises AssertionError."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        def plain(x):
            return x.view(np.ndarray) if isinstance(x, Float32Only) else x

        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(plain(o) for o in out)
        result = getattr(ufunc, method)(*(plain(x) for x in inputs), **kwargs)
        for r in result if isinstance(result, tuple) else (result,):
            dtype = np.result_type(r)
            if dtype not in (np.float32, np.bool_):
                raise AssertionError(f"{ufunc.__name__} computed in {dtype}")
        if out is not None:
            return out[0] if len(out) == 1 else out
        return result.view(Float32Only) if isinstance(result, np.ndarray) else result


def test_float32_guard_catches_an_upcast():
    x = np.ones(2, dtype=np.float32).view(Float32Only)
    assert (2.0 * x + 1).dtype == np.float32
    with pytest.raises(AssertionError, match="float64"):
        x * np.float64(2.0)
    with pytest.raises(AssertionError, match="float64"):
        np.sqrt(x + np.ones(2))


# name -> (state array count, call(param, grad, *state))
CONFIGS = {
    "sgd": (1, lambda p, g, s: sgd(p, g, None, lr=0.1, weight_decay=0.1)),
    "sgd-momentum": (1, lambda p, g, s: sgd(p, g, s[0], lr=0.1, momentum=0.9, weight_decay=0.1)),
    "sgd-nesterov": (1, lambda p, g, s: sgd(p, g, s[0], lr=0.1, momentum=0.9, nesterov=True,
                                             weight_decay=0.1)),
    "sgd-torch-nesterov": (1, lambda p, g, s: sgd(p, g, s[0], lr=0.1, momentum=0.9, nesterov=True,
                                                   weight_decay=0.1, convention="torch")),
    "adagrad": (1, lambda p, g, s: adagrad_step(p, g, s[0], lr=0.1, eps=1e-7, weight_decay=0.1)),
    "rmsprop-nesterov-centered": (3, lambda p, g, s: rmsprop(
        p, g, s[0], s[1], s[2], lr=0.1, rho=0.9, eps=1e-6, momentum=0.5, nesterov=True,
        centered=True, weight_decay=0.1)),
    "rmsprop-torch-momentum-centered": (3, lambda p, g, s: rmsprop(
        p, g, s[0], s[1], s[2], lr=0.1, rho=0.9, eps=1e-6, momentum=0.5, centered=True,
        weight_decay=0.1, convention="torch")),
    "adadelta-textbook": (2, lambda p, g, s: adadelta_step(
        p, g, s[0], s[1], lr=0.5, rho=0.9, eps=1e-6, weight_decay=0.1, convention="textbook")),
    "adadelta-torch": (2, lambda p, g, s: adadelta_step(
        p, g, s[0], s[1], lr=0.5, rho=0.9, eps=1e-6, weight_decay=0.1, convention="torch")),
    "adam-amsgrad": (3, lambda p, g, s: adam(p, g, s[0], s[1], s[2], step=3, lr=0.1,
                                             weight_decay=0.1, amsgrad=True)),
    "adamw": (2, lambda p, g, s: adam(p, g, s[0], s[1], step=2, lr=0.1, weight_decay=0.1,
                                      decoupled_weight_decay=True)),
    "delta-bar-delta": (2, lambda p, g, s: delta_bar_delta_step(p, g, s[0], s[1], kappa=0.01,
                                                                phi=0.5, gamma=0.7)),
}

START = ([1.0, -2.0, 0.5], [0.3, -1.0, 2.0], [[0.1, 0.2, 0.05], [0.01, 0.3, 0.2], [0.5, 0.5, 0.5]])
# (state values are ones a run can reach: second moments >= 0, and r - s*s >= 0 for RMSProp)


def _run_config(name, dtype, steps=3):
    count, call = CONFIGS[name]
    theta, g, state = START
    param = np.array(theta, dtype=dtype)
    states = [np.array(s, dtype=dtype) for s in state[:count]]
    grad = np.array(g, dtype=dtype)
    if dtype == np.float32:
        param, grad = param.view(Float32Only), grad.view(Float32Only)
        states = [s.view(Float32Only) for s in states]
    grad_before = np.array(grad, copy=True)
    grad.setflags(write=False)
    for _ in range(steps):
        call(param, grad, states)
        np.testing.assert_array_equal(grad, grad_before)  # grad is only read
    return param, states


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_stays_float32_and_grad_is_untouched(name):
    param32, states32 = _run_config(name, np.float32)
    param64, states64 = _run_config(name, np.float64)
    for x32, x64 in zip([param32, *states32], [param64, *states64]):
        assert x32.dtype == np.float32
        assert x64.dtype == np.float64
        assert np.all(np.isfinite(x64))
        np.testing.assert_allclose(x32.view(np.ndarray), x64, rtol=2e-5, atol=1e-6)
