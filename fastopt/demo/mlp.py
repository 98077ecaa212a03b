"""A multi-layer perceptron whose forward and backward are NumPy and whose batch normalization is
fastopt's: Linear → BatchNorm → ReLU for every hidden layer, then a Linear output layer.

    z_l = h_{l−1} @ W_l                      (no bias: batch norm's β is the layer's bias)
    h_l = max(γ_l (z_l − μ_l)·invstd_l + β_l, 0)   fastopt.BatchNorm(relu=True), one fused pass
    logits = h_L @ W_out + b_out
    loss = mean over the batch of −log softmax(logits)[label]

Backward is the chain rule written out: dlogits = (softmax − onehot)/B, dW_out = h_Lᵀ dlogits,
db_out = Σ dlogits, dh_L = dlogits W_outᵀ; each BatchNorm's ``backward`` turns dh_l into dz_l
(through the ReLU mask and the batch statistics) and writes dγ_l, dβ_l; dW_l = h_{l−1}ᵀ dz_l and
dh_{l−1} = dz_l W_lᵀ.
"""

from __future__ import annotations

import math

import numpy as np

from .. import init as initializers
from ..batchnorm import BatchNorm

__all__ = ["INITS", "MLP", "softmax_cross_entropy"]

INITS = ("uniform", "glorot", "sparse", "orthogonal", "lsuv")


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, labels]))
    grad = exp / total
    grad[rows, labels] -= 1.0
    grad /= len(labels)
    return loss, grad.astype(logits.dtype, copy=False)


class MLP:
    """``sizes`` = (inputs, hidden..., classes). ``params`` and ``grads`` are aligned lists of
    arrays that stay the same objects for the model's life: hand ``params`` to a fastopt
    optimizer once and call ``opt.step(model.grads)`` after every ``backward``."""

    def __init__(self, sizes=(64, 128, 64, 10), *, rng, init="glorot", relu_bias=0.1, backend=None,
                 dtype=np.float32):
        if len(sizes) < 2:
            raise ValueError(f"sizes must list the inputs and the classes at least, got {sizes!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.sizes = tuple(int(s) for s in sizes)
        self.dtype = np.dtype(dtype)
        self.init = init
        rng = np.random.default_rng(rng)
        pairs = list(zip(self.sizes[:-1], self.sizes[1:]))
        self.weights = [self._weight(m, n, rng) for m, n in pairs]
        self.out_bias = initializers.zeros(self.sizes[-1], dtype=self.dtype)
        self.norms = [BatchNorm(n, relu=True, dtype=self.dtype, backend=backend) for _, n in pairs[:-1]]
        for bn in self.norms:  # β feeds the ReLU: the notes' 0.1 keeps units out of the flat region
            bn.bias[...] = initializers.constant(bn.num_features, relu_bias, dtype=self.dtype)
        self.weight_grads = [np.zeros_like(w) for w in self.weights]
        self.out_bias_grad = np.zeros_like(self.out_bias)
        self.params, self.grads = [], []
        for w, gw, bn in zip(self.weights, self.weight_grads, self.norms + [None]):
            self.params.append(w)
            self.grads.append(gw)
            if bn is not None:
                self.params += [bn.weight, bn.bias]
                self.grads += [bn.grad_weight, bn.grad_bias]
        self.params.append(self.out_bias)
        self.grads.append(self.out_bias_grad)
        self._inputs: list[np.ndarray] = []

    def _weight(self, m: int, n: int, rng) -> np.ndarray:
        if self.init == "uniform":
            return initializers.uniform(m, n, rng, dtype=self.dtype)
        if self.init == "glorot":
            return initializers.glorot(m, n, rng, dtype=self.dtype)
        if self.init == "sparse":
            return initializers.sparse(m, n, rng, k=15, dtype=self.dtype)
        # orthogonal, and LSUV's starting point (``lsuv_`` rescales it given data)
        return initializers.orthogonal(m, n, rng, dtype=self.dtype)

    def lsuv_(self, batch: np.ndarray, rng, tol=0.1) -> list[float]:
        """Layer-sequential unit variance on ``batch``: every Linear output gets variance 1. The
        LSUV passes run batch norm in training mode; its running statistics are restored after."""
        saved = [bn.state_dict() for bn in self.norms]
        variances = initializers.lsuv(self.weights, self.linear_outputs, batch, rng, tol=tol)
        for bn, state in zip(self.norms, saved):
            bn.load_state_dict(state)
        return variances

    def train(self) -> "MLP":
        for bn in self.norms:
            bn.train()
        return self

    def eval(self) -> "MLP":
        for bn in self.norms:
            bn.eval()
        return self

    def linear_outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """The output of every Linear layer (z_1, ..., logits) for ``x``."""
        outputs = []
        h = np.ascontiguousarray(x, dtype=self.dtype)
        for w, bn in zip(self.weights[:-1], self.norms):
            z = h @ w
            outputs.append(z)
            h = bn.forward(z)
        outputs.append(h @ self.weights[-1] + self.out_bias)
        return outputs

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits for ``x`` (B, inputs); keeps what backward needs."""
        h = np.ascontiguousarray(x, dtype=self.dtype)
        self._inputs = []
        for w, bn in zip(self.weights[:-1], self.norms):
            self._inputs.append(h)
            h = bn.forward(h @ w)
        self._inputs.append(h)
        return h @ self.weights[-1] + self.out_bias

    __call__ = forward

    def backward(self, dlogits: np.ndarray) -> None:
        """Fill ``grads`` from the gradient of the loss with respect to the latest logits."""
        if not self._inputs:
            raise RuntimeError("backward needs a forward first")
        np.matmul(self._inputs[-1].T, dlogits, out=self.weight_grads[-1])
        np.sum(dlogits, axis=0, out=self.out_bias_grad)
        dh = dlogits @ self.weights[-1].T
        for layer in range(len(self.norms) - 1, -1, -1):
            dz = self.norms[layer].backward(dh)
            np.matmul(self._inputs[layer].T, dz, out=self.weight_grads[layer])
            if layer:
                dh = dz @ self.weights[layer].T

    def predict(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Class predictions with the running statistics (eval mode); the mode is restored."""
        modes = [bn.training for bn in self.norms]
        self.eval()
        try:
            return np.concatenate([self.forward(x[i:i + batch_size]).argmax(axis=1)
                                   for i in range(0, max(len(x), 1), batch_size)])
        finally:
            for bn, mode in zip(self.norms, modes):
                bn.train(mode)

    @property
    def parameter_count(self) -> int:
        return int(sum(math.prod(p.shape) for p in self.params))
