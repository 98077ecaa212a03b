"""The table of optimizer configurations every backend test runs: (operation, hyperparameters)."""

import numpy as np
import pytest

from fastopt import functional

CASES = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, weight_decay=0.01)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd", dict(lr=0.1, momentum=0.9, convention="torch")),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, convention="torch")),
    ("adagrad", dict(lr=0.1)),
    ("adagrad", dict(lr=0.1, eps=1e-3, weight_decay=0.01)),
    ("rmsprop", dict(lr=0.01)),
    ("rmsprop", dict(lr=0.01, momentum=0.9)),
    ("rmsprop", dict(lr=0.01, momentum=0.9, nesterov=True)),
    ("rmsprop", dict(lr=0.01, centered=True, weight_decay=0.01)),
    ("rmsprop", dict(lr=0.01, centered=True, momentum=0.5, nesterov=True)),
    ("rmsprop", dict(lr=0.01, convention="torch")),
    ("rmsprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01, convention="torch")),
    ("adadelta", dict()),
    ("adadelta", dict(lr=0.5, weight_decay=0.01)),
    ("adadelta", dict(lr=0.5, convention="torch")),
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=1e-2, weight_decay=0.01, amsgrad=True)),
    ("adamw", dict(lr=1e-2)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("delta_bar_delta", dict(kappa=1e-3, phi=0.1, gamma=0.7)),
]

# float64 runs at the parallel size for these configurations only, one or two per family with the
# most options on: the parallel launch around the update loop is the same code for every
# configuration and dtype (the numba backend's ``runners.launch_parts``); float32 runs every
# configuration at that size, and float64 every one at the serial sizes.
FLOAT64_PARALLEL = [CASES[i] for i in (5, 7, 12, 14, 16, 19, 22)]


def case_grid(dtypes, sizes, parallel, backends=(None,), size_ids=None):
    """pytest parameters (case, [backend,] dtype, size) in the order of stacked parametrize marks
    (case outermost), without float64 at a size where ``parallel(backend, size)`` holds for the
    configurations outside ``FLOAT64_PARALLEL``; ids as the stacked marks gave them (``size_ids``:
    the last axis's, in the order of ``sizes``)."""
    grid = []
    for case in CASES:
        for backend in backends:
            for dtype in dtypes:
                for size in sizes:
                    if np.dtype(dtype) == np.float64 and parallel(backend, size) and case not in FLOAT64_PARALLEL:
                        continue
                    size_id = "x".join(map(str, size)) if isinstance(size, tuple) else str(size)
                    if size_ids is not None:
                        size_id = size_ids[sizes.index(size)]
                    parts = [case_id(case)] + ([backend] if backend else []) + [np.dtype(dtype).name, size_id]
                    values = (case,) + ((backend,) if backend else ()) + (dtype, size)
                    grid.append(pytest.param(*values, id="-".join(parts)))
    return grid


# The optimizer classes as the extras tests build them: (class name, hyperparameters), one per
# algorithm family.
OPTIMIZER_CLASSES = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("AdaGrad", dict(lr=0.1, initial_accumulator_value=0.1)),
    ("RMSProp", dict(lr=0.01, momentum=0.5, centered=True)),
    ("AdaDelta", dict(lr=0.5, weight_decay=0.01)),
    ("Adam", dict(lr=1e-2, weight_decay=0.01, amsgrad=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("DeltaBarDelta", dict(lr=0.01, kappa=1e-3, phi=0.1, gamma=0.7)),
]


def case_id(case) -> str:
    name, hyper = case
    return name + "".join(f"-{k}={v}" for k, v in hyper.items())


def initial_state(name: str, shape, dtype, rng) -> dict:
    """Every state array of the operation, filled as its optimizer would start it (AdaGrad from a
    non-zero accumulator, delta-bar-delta's rates from a learning rate)."""
    spec = functional.SPECS[name]
    state = {s: np.zeros(shape, dtype) for s in spec.state}
    if name == "adagrad":
        state["accumulator"][...] = 0.1
    if name == "delta_bar_delta":
        state["rates"][...] = 0.01
    return state
