"""The benchmark harness (``fastopt bench``, ``fastopt.benchmark``) on tiny sizes.

These tests check what the harness reports and how it fails: the JSON document, verification
before timing (a wrong kernel is reported and never timed), the bytes formulas, the exit status.
They never look at a time: the runs use ``--small`` and one repeat, and no assertion reads a value
that depends on how long anything took.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastopt import benchmark
from fastopt.benchmark import cli, coldstart, traffic
from fastopt.benchmark.cases import SMALL_CALLS_PER_SAMPLE
from fastopt.benchmark import Stream
from fastopt.benchmark.timing import IdleGate, repeated, sample_interleaved, torch_wake
from fastopt.benchmark.verify import VerificationError, compare

BASE = ["--small", "--no-cold-start", "--no-torch", "--repeats", "1", "--reference-repeats", "1"]
TIMING_FIELDS = ("median_ms", "q1_ms", "q3_ms", "gbps", "bandwidth_gbps", "pct_of_bandwidth")


def bench(argv, capsys=None) -> tuple[int, str]:
    code = benchmark.main(list(argv))
    out = capsys.readouterr().out if capsys is not None else ""
    return code, out


def run_json(tmp_path, argv, capsys) -> tuple[int, dict, str]:
    path = tmp_path / "out.json"
    code, out = bench([*BASE, "--json", str(path), *argv], capsys)
    return code, json.loads(path.read_text()), out


# ---------------------------------------------------------------------------------------------
# the JSON document


def test_json_document_of_a_small_run(tmp_path, capsys):
    code, doc, out = run_json(tmp_path, ["--op", "batchnorm"], capsys)
    assert code == 0, out
    assert doc["schema"] == "fastopt-bench/1"
    assert doc["exit_status"] == 0
    meta = doc["meta"]
    for key in ("command", "date", "machine", "backend", "dtype", "repeats", "reference_repeats", "threads",
                "threading_layer", "n", "bn_shape", "quick", "versions"):
        assert key in meta, key
    assert meta["backend"] == "numba" and meta["dtype"] == "float32" and meta["repeats"] == 1
    assert {"cpu", "cores"} <= set(meta["machine"])
    assert {"fastopt", "numpy", "numba", "torch"} <= set(meta["versions"])
    assert doc["bandwidth"]["bytes_per_element"] == 12
    assert doc["bandwidth"]["elements"] == meta["n"]
    assert doc["cold_start"] == {"skipped": "--no-cold-start"}
    names = [r["name"] for r in doc["rows"]]
    assert names == [c.name for c in benchmark.all_cases() if c.group == "batchnorm"]
    for row in doc["rows"]:
        assert row["verified"] is True and row["group"] == "batchnorm" and row["backend"] == "numba"
        assert row["elements"] == math.prod(meta["bn_shape"])
        for key in TIMING_FIELDS + ("reference_ms", "speedup_vs_numpy"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
        assert row["torch_skipped"] == "--no-torch" and "torch_ms" not in row
        # the derived columns are the documented arithmetic of the measured ones
        assert row["gbps"] == pytest.approx(row["bytes_per_element"] * row["elements"] / row["median_ms"] / 1e6)
        assert row["pct_of_bandwidth"] == pytest.approx(100 * row["gbps"] / row["bandwidth_gbps"])
        assert row["speedup_vs_numpy"] == pytest.approx(row["reference_ms"] / row["median_ms"])
        assert f"| {row['name']} |" in out  # and the table has a line for it
        samples = row["samples_ms"]  # the raw times, in round order, for recomputing any ratio
        assert len(samples["kernel"]) == len(samples["bandwidth"]) == meta["repeats"]
        assert row["median_ms"] == pytest.approx(float(np.median(samples["kernel"])))


@pytest.mark.long
def test_every_row_runs_on_small_sizes(tmp_path, capsys):
    """Each row (optimizers, batch norm, many tensors, training step) is verified or skipped with a reason."""
    code, doc, out = run_json(tmp_path, [], capsys)
    problems = [(r["name"], r.get("error")) for r in doc["rows"] if not (r.get("verified") or r.get("skipped"))]
    assert not problems and code == 0, problems
    assert {r["group"] for r in doc["rows"]} == set(cli.GROUPS)
    for row in doc["rows"]:
        if row.get("skipped"):
            assert row["skipped"] in out and not any(k in row for k in TIMING_FIELDS)
    many = {r["name"]: r for r in doc["rows"] if r["group"] == "many-tensors"}
    assert many["adam-resnet50-161-tensors"]["tensors"] == 161
    assert many["adam-resnet50-161-tensors"]["ratio_to_baseline"] == pytest.approx(
        many["adam-resnet50-161-tensors"]["median_ms"] / many["adam-resnet50-161-tensors"]["baseline_ms"])
    # the cache-resident row: blocks of back-to-back steps, and single steps after the STREAM kernel
    small = many["adam-200x1000"]
    assert small["calls_per_sample"] == SMALL_CALLS_PER_SAMPLE > 1 and small["cold_ms"] > 0
    assert "steps back to back" in small["note"] and "cold" in small["note"]
    assert len(small["samples_ms"]["cold"]) == len(small["samples_ms"]["kernel"]) == small["repeats"]
    others = [r for r in doc["rows"] if r.get("verified") and r["name"] != "adam-200x1000"]
    assert others and all(r["calls_per_sample"] == 1 and "cold_ms" not in r for r in others)


def test_training_step_row_is_skipped_with_its_reason_or_verified(tmp_path, capsys):
    code, doc, out = run_json(tmp_path, ["--op", "training-step"], capsys)
    (row,) = doc["rows"]
    if row.get("skipped"):
        assert "clip_grad_norm" in row["skipped"] and code == 0
        assert "skipped" in out and "clip_grad_norm" in out
    else:
        assert row["verified"] is True and row["bytes_per_element"] >= 40, row


# ---------------------------------------------------------------------------------------------
# verification before timing


def test_a_wrong_kernel_fails_verification_and_is_never_timed(tmp_path, capsys, monkeypatch):
    import fastopt.kernels.numba_cpu as numba_cpu

    real = numba_cpu.batchnorm_forward
    calls = []

    def wrong(x, weight, bias, running_mean, running_var, y, *args, **kwargs):
        calls.append(1)
        real(x, weight, bias, running_mean, running_var, y, *args, **kwargs)
        y.flat[y.size // 2] += 0.01  # one value off

    monkeypatch.setattr(numba_cpu, "batchnorm_forward", wrong)
    code, doc, out = run_json(tmp_path, ["--op", "batchnorm-forward-train-nchw,batchnorm-backward-train-nchw"], capsys)
    assert code == 1 and doc["exit_status"] == 1
    bad, good = doc["rows"]
    assert bad["verified"] is False and "y" in bad["error"] and "1 of" in bad["error"]
    assert not any(k in bad for k in TIMING_FIELDS)
    assert calls == [1], "the wrong kernel ran again after failing verification"
    assert good["verified"] is True  # the other rows still run
    assert "FAILED" in out


def test_a_kernel_that_raises_is_reported_as_a_failure(tmp_path, capsys, monkeypatch):
    import fastopt.kernels.numba_cpu as numba_cpu

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(numba_cpu, "batchnorm_backward", broken)
    code, doc, _ = run_json(tmp_path, ["--op", "batchnorm-backward-train-nhwc"], capsys)
    assert code == 1
    assert doc["rows"][0]["verified"] is False and "kernel exploded" in doc["rows"][0]["error"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compare_catches_one_wrong_value(dtype):
    expected = np.linspace(-3, 3, 1001).astype(dtype)
    compare("same", expected.copy(), expected)
    compare("rounding", expected * (1 + 10 * np.finfo(dtype).eps), expected)
    wrong = expected.copy()
    wrong[500] += 1e-3
    with pytest.raises(VerificationError, match=r"wrong: 1 of 1001 values .* index 500"):
        compare("wrong", wrong, expected)


def test_compare_nan_and_shape():
    a = np.array([1.0, np.nan], np.float32)
    compare("nan matches nan", a.copy(), a)
    with pytest.raises(VerificationError, match="1 of 2"):
        compare("nan vs value", np.array([1.0, 2.0], np.float32), a)
    with pytest.raises(VerificationError, match="shape"):
        compare("shape", np.zeros(3, np.float32), np.zeros(4, np.float32))


# ---------------------------------------------------------------------------------------------
# bytes per element


@pytest.mark.parametrize("state, expected", [(0, 12), (1, 20), (2, 28), (3, 36)])
def test_optimizer_bytes(state, expected):
    assert traffic.optimizer(state, 4).bytes_per_element == expected
    assert traffic.optimizer(state, 8).bytes_per_element == 2 * expected
    assert not traffic.optimizer(state, 4).write_allocate  # in place


@pytest.mark.parametrize("pass_name, expected", [("forward-train", 12), ("forward-eval", 8), ("backward-train", 20)])
def test_batchnorm_bytes(pass_name, expected):
    t = traffic.batchnorm(pass_name, 4)
    assert t.bytes_per_element == expected and t.write_allocate and "write-allocate" in t.formula
    assert traffic.batchnorm(pass_name, 8).bytes_per_element == 2 * expected


def test_stream_and_training_step_bytes():
    assert traffic.stream(4).bytes_per_element == 12 and traffic.stream(8).bytes_per_element == 24
    assert traffic.training_step(3, 4).bytes_per_element == 40  # norm pass reads g; update moves 9 arrays
    assert traffic.optimizer(2, 4).bytes(1000) == 28_000


def test_rows_report_the_bytes_of_their_kernel(tmp_path, capsys):
    code, doc, _ = run_json(tmp_path, ["--op", "batchnorm", "--dtype", "float64"], capsys)
    assert code == 0
    expected = {"forward-train": 24, "forward-eval": 16, "backward-train": 40}
    for row in doc["rows"]:
        pass_name = row["name"].removeprefix("batchnorm-").rsplit("-", 1)[0]
        assert row["bytes_per_element"] == expected[pass_name], row["name"]
        assert row["write_allocate"] is True
    assert doc["bandwidth"]["bytes_per_element"] == 24


def test_resnet50_has_161_tensors_of_25_6_million_values():
    shapes = benchmark.resnet50_shapes()
    assert len(shapes) == 161
    assert sum(math.prod(s) for s in shapes) == 25_557_032


# ---------------------------------------------------------------------------------------------
# exit status and options


@pytest.mark.parametrize("argv, message", [
    (["--op", "no-such-row"], "matches no row"),
    (["--backend", "no-such-backend"], "--backend must be one of"),
    (["--backend", "cupy"], "cupy"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_usage_errors_exit_2_before_running(argv, message, capsys):
    code = benchmark.main([*BASE, *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert "timing" not in err  # nothing ran


def test_plot_without_matplotlib_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code = benchmark.main([*BASE, "--op", "batchnorm-forward-eval-nchw", "--plot", str(tmp_path / "x.png")])
    assert code == 2 and "matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the optional demo extra)")
    path = tmp_path / "roofline.png"
    code = benchmark.main([*BASE, "--op", "batchnorm-forward-eval-*", "--plot", str(path)])
    capsys.readouterr()
    assert code == 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_numpy_backend_times_the_reference_itself(tmp_path, capsys):
    code, doc, _ = run_json(tmp_path, ["--op", "batchnorm-forward-eval-nhwc", "--backend", "numpy"], capsys)
    (row,) = doc["rows"]
    assert code == 0 and row["backend"] == "numpy" and row["verified"] is True
    assert "speedup_vs_numpy" not in row


def test_op_selects_groups_names_and_globs():
    cases = benchmark.all_cases()
    chosen, unknown = cli._select(cases, ["many-tensors", "adam,batchnorm-*-eval-*"], quick=False)
    assert unknown == []
    assert [c.name for c in chosen] == ["adam", "batchnorm-forward-eval-nchw", "batchnorm-forward-eval-nhwc",
                                        "adam-resnet50-161-tensors", "adam-200x1000"]
    quick, _ = cli._select(cases, None, quick=True)
    assert {"adam", "adamw", "batchnorm-forward-train-nchw", "batchnorm-backward-train-nhwc",
            "adam-resnet50-161-tensors", "adam-200x1000", "training-step"} <= {c.name for c in quick}


def test_add_arguments_makes_a_subcommand(capsys):
    """How ``fastopt bench`` is wired: a subparser gets the options, ``run`` gets the namespace."""
    parser = argparse.ArgumentParser(prog="fastopt")
    sub = parser.add_subparsers(dest="command", required=True)
    benchmark.add_arguments(sub.add_parser("bench"))
    args = parser.parse_args(["bench", "--list"])
    assert benchmark.run(args) == 0
    listing = capsys.readouterr().out
    assert all(c.name in listing for c in benchmark.all_cases())


def test_python_dash_m_runs_the_harness():
    proc = subprocess.run([sys.executable, "-m", "fastopt.benchmark", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--json" in proc.stdout


# ---------------------------------------------------------------------------------------------
# pieces


def test_sample_interleaved_calls_each_contestant_warmup_plus_repeats_times():
    calls = []
    contestants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = sample_interleaved(contestants, {"a": 3, "b": 3, "c": 1}, warmup=1)
    assert [len(samples[k]) for k in "abc"] == [3, 3, 1]
    assert calls[:3] == ["a", "b", "c"]  # warm-up first
    assert calls.count("a") == 4 and calls.count("c") == 2
    assert calls[3:6] == ["a", "b", "c"] and calls[6:8] == ["b", "a"]  # the order rotates per round


def test_setups_run_untimed_right_before_each_timed_call_of_their_contestant():
    calls = []
    contestants = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    sample_interleaved(contestants, {"a": 2, "b": 2}, warmup=1, setups={"b": lambda: calls.append("flush")})
    assert calls[:2] == ["a", "b"]  # no setup for warm-up calls
    assert calls[2:] == ["a", "flush", "b", "flush", "b", "a"]


def test_repeated_calls_back_to_back():
    calls = []
    repeated(lambda: calls.append(1), 3)()
    assert len(calls) == 3
    once = lambda: None  # noqa: E731
    assert repeated(once, 1) is once


def test_idle_gate_counts_rounds_and_never_blocks_past_its_patience():
    gate = IdleGate(patience=0.0, threshold=2.0)  # any machine is "idle" below 200% busy
    calls = []
    samples = sample_interleaved({"a": lambda: calls.append(1)}, {"a": 3}, warmup=0, before_round=gate)
    assert len(samples["a"]) == 3 and gate.rounds == 3
    assert gate.idle_rounds in (0, 3)  # 0 where /proc/stat is missing
    impatient = IdleGate(patience=0.0, threshold=-1.0)  # never idle: gives up at once
    impatient()
    assert impatient.rounds == 1 and impatient.idle_rounds == 0


def test_parallel_contestants_get_an_untimed_call_of_their_runtime_first(tmp_path, capsys, monkeypatch):
    """The kernel, the STREAM kernel and the baseline start each timed call with a small parallel
    numba call; the single-threaded reference gets none; the cold step gets the full STREAM kernel."""
    seen = []

    def spy(contestants, repeats, warmup=1, before_round=None, setups=None):
        seen.append((set(contestants), dict(setups or {})))
        return sample_interleaved(contestants, repeats, warmup, before_round, setups)

    monkeypatch.setattr(cli, "sample_interleaved", spy)
    code, _, _ = run_json(tmp_path, ["--op", "adam,adam-200x1000"], capsys)
    assert code == 0 and len(seen) == 2
    for names, setups in seen:
        assert {"kernel", "bandwidth", "reference"} <= names
        small, full = setups["kernel"], setups["cold"]
        assert isinstance(small, Stream) and small is not full and small.n == min(1 << 16, full.n)
        assert setups["bandwidth"] is small and setups["baseline"] is small and "reference" not in setups
    assert "cold" in seen[1][0] and "baseline" in seen[1][0]


def test_torch_wake_is_an_in_place_add_in_torchs_pool():
    calls = []

    class FakeTensor:
        def add_(self, value):
            calls.append(value)
            return self

    class FakeTorch:
        @staticmethod
        def zeros(n):
            calls.append(n)
            return FakeTensor()

    wake = torch_wake(FakeTorch)
    wake()
    wake()
    assert calls == [1 << 20, 0.0, 0.0]


def test_idle_gate_runs_its_wake_call_after_each_wait():
    events = []
    gate = IdleGate(patience=0.0, threshold=2.0, wake=lambda: events.append("wake"), wake_calls=2)
    gate._wait = lambda: events.append("wait")
    gate()
    gate()
    assert events == ["wait", "wake", "wake"] * 2 and gate.rounds == 2


def test_cold_start_compiles_every_kernel_of_a_package_in_fresh_processes(tmp_path):
    package = tmp_path / "fake_kernels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ops.py").write_text(textwrap.dedent("""
        from fastopt.kernels.numba_cpu._jit import kernel

        @kernel(["void(float32[::1])", "void(float64[::1])"], parallel=False)
        def double(a):
            for i in range(a.size):
                a[i] *= 2

        @kernel(["float64(float64[::1])"], parallel=False)
        def total(a):
            return a.sum()

        class Variants:  # kernels held by the package's own wrapper objects are found too
            def __init__(self):
                self.plain = kernel(["float64(float32[::1])"], parallel=False)(lambda a: a.sum())
                self.twice = kernel(["float64(float32[::1])"], parallel=False)(lambda a: 2 * a.sum())

        wrapped = Variants()
    """))
    result = coldstart.measure("fake_kernels", path=str(tmp_path), timeout=300)
    assert result["kernels"] == 4 and result["signatures"] == 5
    assert result["modules"]["ops"]["kernels"] == 4
    assert result["first_compile_s"] >= 0 and result["cached_load_s"] >= 0
    assert result["import_and_first_adam_step_s"] is None  # only for fastopt's own kernels
    assert result["first_train"] is None
    # each (kernel, dtype) timed, named by where the module holds it
    assert sorted((m, name, dtype) for m, name, dtype, _ in result["per_kernel"]) == [
        ("ops", "double", "float32"), ("ops", "double", "float64"), ("ops", "total", "float64"),
        ("ops", "wrapped.plain", "float32"), ("ops", "wrapped.twice", "float32")]


def test_first_train_is_skipped_with_the_reason_without_the_demo_extra(tmp_path, monkeypatch):
    blocked = tmp_path / "blocked" / "sklearn"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('sklearn is blocked for this test')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(blocked.parent), os.environ.get("PYTHONPATH")])))
    result = coldstart.first_train(timeout=300)
    assert "scikit-learn" in result["skipped"], result


def test_first_step_runs_import_and_one_adam_step_in_a_new_process():
    """The script fails unless the step updated its parameter (numba's default cache, as a user's)."""
    assert coldstart.first_step() > 0


def test_the_cold_start_line_reports_the_first_step():
    doc = {"meta": dict(dtype="float32", backend="numba", threads=2, threading_layer="omp", repeats=1,
                        reference_repeats=1),
           "bandwidth": dict(bytes_per_element=12, elements=1, median_gbps=1.0), "rows": [],
           "cold_start": dict(kernels=1, signatures=2, first_compile_s=3.0, cached_load_s=0.5,
                              import_numba_s=0.1, import_kernels_s=0.2, modules={"optim": dict(seconds=3.0)},
                              import_and_first_adam_step_s=0.4)}
    assert "`import fastopt` and the first Adam step take 0.40 s in a new process" in benchmark.report.markdown(doc)


def test_the_cold_start_section_reports_every_first_run():
    runs = [dict(command="fastopt " + " ".join(c), whole_s=2.0 + i, compile_s=1.0 + i, train_s=0.1)
            for i, c in enumerate(coldstart.TRAIN_COMMANDS)]
    doc = {"meta": dict(dtype="float32", backend="numba", threads=2, threading_layer="omp", repeats=1,
                        reference_repeats=1),
           "bandwidth": dict(bytes_per_element=12, elements=1, median_gbps=1.0), "rows": [],
           "cold_start": dict(kernels=1, signatures=2, first_compile_s=3.0, cached_load_s=0.5,
                              import_numba_s=0.1, import_kernels_s=0.2, modules={"optim": dict(seconds=3.0)},
                              first_train=dict(method="each a new process", runs=runs))}
    text = benchmark.report.markdown(doc)
    assert len(coldstart.TRAIN_COMMANDS) == 3
    for i, run in enumerate(runs):
        assert f"`{run['command']}` compiles for {1.0 + i:.1f} s, {2.0 + i:.1f} s in all" in text
    assert "`fastopt train --dtype bfloat16 --state-dtype int8` compiles for 3.0 s" in text


def test_a_case_builds_and_verifies_on_its_own():
    """What the bench/ suites do with a row: build, verify, read its traffic."""
    case = next(c for c in benchmark.all_cases() if c.name == "batchnorm-forward-train-nhwc")
    settings = benchmark.Settings(n=1000, bn_shape=(2, 3, 4, 5))
    prepared = case.build(settings, "numba")
    prepared.verify()
    assert prepared.elements == 120 and prepared.traffic().bytes_per_element == 12
    assert prepared.torch is None and prepared.torch_reason


def test_the_gpu_check_runs_every_gpu_test_file():
    """``bench/gpu_check.py`` (the one script run when a GPU is lent) lists every test file that holds
    a test marked ``gpu``, as pytest collects them, so a new GPU test cannot be left out of the only
    run that executes it."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_check", root / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    collected = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q",
                                "-p", "no:cacheprovider", "tests"], cwd=root, capture_output=True, text=True,
                               timeout=300)
    files = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert {"tests/test_gpu_cupy.py", "tests/test_gpu_numba_cuda.py"} <= files, collected.stdout[-2000:]
    assert set(module.GPU_TEST_FILES) == files
