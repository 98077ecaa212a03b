"""Train a small logistic-regression model with fastopt's fused Adam, then check the kernel
against the NumPy reference on the same problem.

Run: python examples/quickstart.py
"""

import numpy as np

import fastopt


def loss_and_grads(w, b, x, y):
    """Mean logistic loss of a linear model and its gradients (plain NumPy)."""
    z = x @ w + b
    p = 1.0 / (1.0 + np.exp(-z))
    loss = -np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12))
    err = (p - y) / len(y)
    return loss, (x.T @ err).astype(w.dtype), np.array([err.sum()], dtype=b.dtype)


def train(backend, steps=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((512, 20)).astype(np.float32)
    true_w = rng.standard_normal(20).astype(np.float32)
    y = (x @ true_w > 0).astype(np.float32)
    w = np.zeros(20, np.float32)
    b = np.zeros(1, np.float32)
    opt = fastopt.Adam([w, b], lr=0.05, backend=backend)
    for step in range(steps):
        loss, gw, gb = loss_and_grads(w, b, x, y)
        opt.step([gw, gb])
        if backend == "numba" and step % 50 == 0:
            print(f"step {step:4d}  loss {loss:.4f}")
    loss, _, _ = loss_and_grads(w, b, x, y)
    accuracy = np.mean((x @ w + b > 0) == (y > 0.5))
    return w, loss, accuracy


def main():
    print("backends:", {name: info.available for name, info in fastopt.backends().items()})
    w_numba, loss, accuracy = train("numba")
    print(f"numba backend: final loss {loss:.4f}, training accuracy {accuracy:.3f}")
    w_ref, _, _ = train("numpy")
    diff = np.max(np.abs(w_numba - w_ref))
    print(f"max |numba - numpy reference| over the weights after 200 steps: {diff:.2e}")
    if not (accuracy > 0.9 and diff < 1e-3):
        raise SystemExit("quickstart check failed")
    print("ok")


if __name__ == "__main__":
    main()
