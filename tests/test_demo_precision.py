"""The digits demo in low precision: 16-bit parameters (``dtype``, with float32 master weights) and
8-bit optimizer state (``state_dtype="int8"``) each reach the float32 run's test accuracy, and
``fastopt train --dtype/--state-dtype/--[no-]master-weights`` run or fail as one line."""

from __future__ import annotations

import importlib
import re

import ml_dtypes
import numpy as np
import pytest

from fastopt import cli
from fastopt.demo import DEFAULTS, load_digits, train

pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn (the demo extra)")

train_module = importlib.import_module("fastopt.demo.train")  # ``fastopt.demo.train`` is the function

# 0.5 percentage points of the 359 test images: at most one image apart from the float32 run
TOLERANCE = 0.005
ACCURACY = re.compile(r"^test accuracy: (\d+\.\d)%$", re.M)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def float32_run(digits):
    """The reference: the default config (Adam, 10 epochs, seed 0) in float32."""
    return train(data=digits, seed=DEFAULTS["seed"])


@pytest.fixture
def optimizers(monkeypatch):
    """The optimizers ``train`` makes, in order: the run's first, then the warm-up's."""
    made = []
    make = train_module.make_optimizer

    def recording(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(train_module, "make_optimizer", recording)
    return made


def state_arrays(opt):
    return [value for state in opt.state for value in state.values() if isinstance(value, np.ndarray)]


def test_bfloat16_parameters_with_master_weights_match_float32(digits, float32_run, optimizers):
    result = train(data=digits, seed=DEFAULTS["seed"], dtype="bfloat16")
    opt = optimizers[0]
    params = [p for group in opt.param_groups for p in group["params"]]
    assert {p.dtype for p in params} == {np.dtype(ml_dtypes.bfloat16)}  # the optimizer holds the 16-bit params
    assert all(state["master"].dtype == np.float32 for state in opt.state)
    assert abs(result.test_accuracy - float32_run.test_accuracy) <= TOLERANCE, (result.test_accuracy,
                                                                                float32_run.test_accuracy)


def test_8bit_adam_state_matches_float32(digits, float32_run, optimizers):
    # the default MLP's two weight matrices (64x128, 128x64) pass min_8bit_size=4096: 8-bit state
    result = train(data=digits, seed=DEFAULTS["seed"], state_dtype="int8")
    opt = optimizers[0]
    codes = [a for a in state_arrays(opt) if a.dtype == np.uint8]
    assert len(codes) == 4, [a.dtype for a in state_arrays(opt)]  # m and v of each weight matrix
    assert sum(a.size for a in codes) == 2 * (64 * 128 + 128 * 64)
    assert abs(result.test_accuracy - float32_run.test_accuracy) <= TOLERANCE, (result.test_accuracy,
                                                                                float32_run.test_accuracy)


def test_demo_checks_its_precision_arguments(digits):
    with pytest.raises(ValueError, match="dtype must be one of"):
        train(data=digits, epochs=1, dtype="float64")
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        train(data=digits, epochs=1, state_dtype="int4")
    with pytest.raises(ValueError, match="master_weights applies to bfloat16 and float16"):
        train(data=digits, epochs=1, master_weights=True)


# ---------------------------------------------------------------------------------------------
# fastopt train


@pytest.mark.parametrize("args, note", [
    (["--dtype", "bfloat16"], "parameters bfloat16 (float32 master weights"),
    (["--state-dtype", "int8"], "optimizer state int8"),
    (["--dtype", "float16", "--no-master-weights"], "parameters float16 (no master weights"),
    (["--dtype", "bfloat16", "--state-dtype", "int8"], "optimizer state int8"),
], ids=["bfloat16", "int8-state", "float16-no-master", "bfloat16-int8-state"])
def test_train_low_precision_prints_its_accuracy(args, note, capsys):
    assert cli.main(["train", *args, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert note in out
    match = ACCURACY.search(out)
    assert match and float(match.group(1)) > 70.0, out  # one epoch: about 90%


@pytest.mark.parametrize("args, fragment", [
    (["--dtype", "float16", "--state-dtype", "int8", "--optimizer", "adadelta"], "not adadelta"),  # the optimizer's rule
    (["--optimizer", "adadelta", "--state-dtype", "int8"], "not adadelta"),
    (["--amsgrad", "--state-dtype", "int8"], "amsgrad"),
    (["--master-weights"], "--master-weights applies to --dtype bfloat16 or float16"),
    (["--framework", "torch", "--dtype", "bfloat16"], "--dtype apply to the NumPy MLP only"),
])
def test_train_precision_errors_are_one_line(args, fragment, capsys):
    assert cli.main(["train", *args, "--epochs", "1"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"fastopt( train)?: error: ", lines[0]), captured.err
    assert fragment in lines[0], lines[0]
    assert "digits:" not in captured.out  # rejected before any data is loaded
