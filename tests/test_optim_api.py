"""The optimizer classes: param groups, hyperparameter changes, state_dict, backends, threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastopt
from fastopt import functional
from fastopt.dispatch import resolve

from optim_cases import CASES, case_id

CLASSES = {
    "sgd": fastopt.SGD,
    "adagrad": fastopt.AdaGrad,
    "rmsprop": fastopt.RMSProp,
    "adadelta": fastopt.AdaDelta,
    "adam": fastopt.Adam,
    "adamw": fastopt.AdamW,
    "delta_bar_delta": fastopt.DeltaBarDelta,
}


def make(name, hyper, params, **kw):
    hyper = dict(hyper)
    convention = hyper.pop("convention", "textbook")
    if name == "delta_bar_delta":
        hyper["lr"] = 0.01
    return CLASSES[name](params, **hyper, convention=convention, **kw)


def arrays(rng, shapes, dtype=np.float64):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


SHAPES = [(10,), (3, 4), (1,), (0,)]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_class_equals_functional_calls(case, rng):
    """The class is the functional update applied per array, with per-group hyperparameters."""
    name, hyper = case
    spec = functional.SPECS[name]
    params = arrays(rng, SHAPES)
    manual = [p.copy() for p in params]
    opt = make(name, hyper, [{"params": params[:2]}, {"params": params[2:]}])
    opt.param_groups[1]["lr"] = opt.param_groups[1]["lr"] * 0.5  # takes effect at the next step
    manual_state = [{} for _ in params]
    for t in range(1, 6):
        grads = arrays(rng, SHAPES)
        opt.step(grads)
        for k, (p, g) in enumerate(zip(manual, grads)):
            group = opt.param_groups[0 if k < 2 else 1]
            kw = dict(hyper)
            if name in ("adam", "adamw"):
                kw["step"] = t
            if name != "delta_bar_delta":  # its lr only seeds the rates
                kw["lr"] = group["lr"]
            st = manual_state[k]
            for s in spec.state:
                if s not in st:
                    st[s] = np.zeros_like(p)
                    if s == "rates":
                        st[s][...] = group["lr"]
            getattr(functional, f"{name}_step")(p, g, **st, **kw)
    for k, (p, m) in enumerate(zip(params, manual)):
        np.testing.assert_array_equal(p, m, err_msg=f"param {k}")


def test_lr_change_takes_effect_at_next_step(rng):
    p = np.zeros(5)
    opt = fastopt.SGD([p], lr=0.1)
    g = np.ones(5)
    opt.step([g])
    np.testing.assert_array_equal(p, -0.1 * g)
    opt.param_groups[0]["lr"] = 0.5
    opt.step([g])
    np.testing.assert_allclose(p, -0.6 * g, rtol=1e-15)


def test_textbook_momentum_lr_change_affects_only_new_gradients():
    p = np.zeros(1)
    opt = fastopt.SGD([p], lr=1.0, momentum=0.5)
    opt.step([np.ones(1)])  # v = -1, θ = -1
    opt.param_groups[0]["lr"] = 0.0
    opt.step([np.ones(1)])  # v = 0.5·(-1) - 0 = -0.5 → θ = -1.5 (old velocity keeps its lr)
    np.testing.assert_array_equal(p, [-1.5])
    torch_style = np.zeros(1)
    opt = fastopt.SGD([torch_style], lr=1.0, momentum=0.5, convention="torch")
    opt.step([np.ones(1)])
    opt.param_groups[0]["lr"] = 0.0
    opt.step([np.ones(1)])  # torch scales the whole buffer by the new lr: no movement
    np.testing.assert_array_equal(torch_style, [-1.0])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_dict_resume_is_bit_identical(case, backend, rng):
    name, hyper = case
    start = arrays(rng, SHAPES, np.float32)
    grads = [arrays(rng, SHAPES, np.float32) for _ in range(10)]

    straight = [a.copy() for a in start]
    opt = make(name, hyper, [{"params": straight[:1]}, {"params": straight[1:]}], backend=backend)
    for g in grads:
        opt.step(g)

    interrupted = [a.copy() for a in start]
    opt1 = make(name, hyper, [{"params": interrupted[:1]}, {"params": interrupted[1:]}], backend=backend)
    for g in grads[:5]:
        opt1.step(g)
    saved = opt1.state_dict()
    replay = [a.copy() for a in interrupted]  # the parameters as they were at the save point
    opt1.step(grads[5])  # a later step must not leak into the saved copy

    other_hyper = {**hyper, "lr": 123.0} if "lr" in hyper else hyper  # overwritten by the load
    opt2 = make(name, other_hyper, [{"params": replay[:1]}, {"params": replay[1:]}], backend=backend)
    opt2.load_state_dict(saved)
    for g in grads[5:]:
        opt2.step(g)
    for k, (a, b) in enumerate(zip(straight, replay)):
        np.testing.assert_array_equal(a, b, err_msg=f"param {k}")
    assert opt2.param_groups[0].get("lr") == opt.param_groups[0].get("lr")


def test_load_state_dict_rejects_mismatch_and_changes_nothing(rng):
    params = arrays(rng, [(4,), (3,)])
    opt = fastopt.Adam(params, lr=0.1)
    opt.step(arrays(rng, [(4,), (3,)]))
    before = opt.state_dict()
    other = fastopt.Adam(arrays(rng, [(4,), (5,)]), lr=0.1)
    other.step(arrays(rng, [(4,), (5,)]))
    with pytest.raises(ValueError, match=r"state\[1\]\['m'\].*shape"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="for SGD, not Adam"):
        opt.load_state_dict(fastopt.SGD(params, lr=0.1).state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k in before["state"]:
        for name, value in before["state"][k].items():
            np.testing.assert_array_equal(after["state"][k][name], value)


def test_param_groups_override_defaults_and_reject_unknown_keys(rng):
    a, b = arrays(rng, [(3,), (3,)])
    opt = fastopt.RMSProp([{"params": [a]}, {"params": [b], "rho": 0.5}], lr=0.1)
    assert opt.param_groups[0]["rho"] == 0.9 and opt.param_groups[1]["rho"] == 0.5
    with pytest.raises(ValueError, match="unknown key 'rhoo'"):
        fastopt.RMSProp([{"params": [a], "rhoo": 0.5}], lr=0.1)


def test_backends_report_and_default_choice():
    report = fastopt.backends()
    assert set(report) == {"numpy", "numba", "numba-cuda", "cupy"}
    assert report["numpy"].available and report["numba"].available
    for name in ("cupy", "numba-cuda"):  # without a CUDA device (CI): unavailable, with the reason
        assert report[name].available or report[name].reason
    assert resolve(None, np.zeros(1)).__name__ == "fastopt.kernels.numba_cpu"
    assert resolve("numpy", np.zeros(1)).__name__ == "fastopt.reference"


def test_a_gpu_backend_on_host_arrays_raises_without_fallback():
    with pytest.raises(TypeError, match="backend 'cupy' works on CUDA device arrays, got numpy.ndarray"):
        fastopt.SGD([np.zeros(3)], lr=0.1, backend="cupy")
    with pytest.raises(TypeError, match="backend 'numba-cuda' works on CUDA device arrays"):
        functional.sgd_step(np.zeros(3), np.zeros(3), lr=0.1, backend="numba-cuda")


def test_concurrent_steps_from_threads_match_serial_runs(rng):
    """numba's workqueue layer aborts on concurrent parallel calls; fastopt must not crash or mix up."""
    n_threads, steps, size = 4, 20, 2**16 + 1
    starts = [rng.standard_normal(size).astype(np.float32) for _ in range(n_threads)]
    grads = [[rng.standard_normal(size).astype(np.float32) for _ in range(steps)] for _ in range(n_threads)]

    def run(i, params):
        opt = fastopt.Adam([params], lr=1e-2, backend="numba") if i % 2 else fastopt.SGD(
            [params], lr=1e-2, momentum=0.9, backend="numba")
        for g in grads[i]:
            opt.step([g])

    serial = [s.copy() for s in starts]
    for i in range(n_threads):
        run(i, serial[i])
    concurrent = [s.copy() for s in starts]
    errors = []

    def target(i):
        try:
            run(i, concurrent[i])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(n_threads):
        np.testing.assert_array_equal(concurrent[i], serial[i], err_msg=f"thread {i}")


def test_workqueue_threading_layer_falls_back_to_serialized_calls(tmp_path):
    """With numba's workqueue layer (no thread-safe layer installed, or forced by the user), the
    kernels serialize instead of letting workqueue abort the process on concurrent launches."""
    # Not "concurrent.py": the script's folder comes first on sys.path, and that name would shadow
    # the standard library's concurrent package (numba's first compile imports concurrent.futures).
    script = tmp_path / "workqueue_threads.py"
    script.write_text(
        "import faulthandler; faulthandler.dump_traceback_later(240, exit=True)\n"
        "import threading, numba, numpy as np, fastopt\n"
        "from fastopt.kernels.numba_cpu._jit import calls_serialized\n"
        "def run(seed):\n"
        "    rng = np.random.default_rng(seed)\n"
        "    p = rng.standard_normal(2**16).astype(np.float32)\n"
        "    opt = fastopt.Adam([p], lr=1e-2)\n"
        "    for _ in range(30):\n"
        "        opt.step([rng.standard_normal(2**16).astype(np.float32)])\n"
        "threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(numba.threading_layer(), calls_serialized())\n"
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["workqueue", "True"]
