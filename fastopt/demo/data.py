"""The scikit-learn digits data set (1,797 8×8 grey images of the digits 0–9), split for training.

scikit-learn ships the data inside the package, so loading needs no network; it is an optional
extra of fastopt (``pip install 'fastopt[demo]'``). The file its ``load_digits`` reads is read
here directly, found without importing scikit-learn: the import takes about 1 s (SciPy's
statistics), a tenth of a first ``fastopt train``. Where the file is not where scikit-learn keeps
it, ``sklearn.datasets.load_digits`` loads it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Digits", "MissingExtraError", "load_digits", "require"]

DEMO_EXTRA = "pip install 'fastopt[demo]'"


class MissingExtraError(ImportError):
    """An optional dependency of the demo (scikit-learn, matplotlib) is not installed."""


def require(module: str, purpose: str):
    """Import ``module`` or raise ``MissingExtraError`` naming the pip command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = {"sklearn": "scikit-learn"}.get(module.split(".")[0], module.split(".")[0])
        raise MissingExtraError(f"{purpose} needs {package}, which could not be imported ({exc}); "
                                f"install it with: {DEMO_EXTRA}") from None


@dataclass(frozen=True)
class Digits:
    """Images as rows of 64 pixels scaled to [0, 1] (float32) and labels 0–9 (int64)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    classes: int = 10


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Digits:
    """The digits with a held-out test split, stratified: ``test_fraction`` of each class (rounded)
    goes to the test set. The split depends only on ``split_seed``, so runs that differ in their
    training seed are scored on the same test images."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    pixels, labels = _read_digits()
    x = (np.asarray(pixels, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(split_seed)
    test = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        test.append(rng.choice(members, size=round(test_fraction * len(members)), replace=False))
    is_test = np.zeros(len(y), bool)
    is_test[np.concatenate(test)] = True
    train_idx = rng.permutation(np.flatnonzero(~is_test))
    test_idx = np.flatnonzero(is_test)
    return Digits(np.ascontiguousarray(x[train_idx]), y[train_idx], np.ascontiguousarray(x[test_idx]), y[test_idx])


# where scikit-learn keeps the digits, relative to its package: rows of 64 pixels (0-16) and the label
DIGITS_FILE = ("datasets", "data", "digits.csv.gz")


def digits_file() -> Path | None:
    """scikit-learn's digits file, found without importing scikit-learn; None when it is not
    installed or keeps no such file."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root).joinpath(*DIGITS_FILE)
        if path.is_file():
            return path
    return None


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixels, labels) as ``sklearn.datasets.load_digits`` gives them."""
    path = digits_file()
    if path is None:
        bunch = require("sklearn.datasets", "the digits data set").load_digits()
        return bunch.data, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)
