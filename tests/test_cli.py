"""The ``fastopt`` command: each subcommand run in a subprocess with small settings, its output
and exit status checked, the error cases included (one line, exit 2, never a traceback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import fastopt
from fastopt import cli

ACCURACY = re.compile(r"^test accuracy: (\d+\.\d)%$", re.M)


def fastopt_cmd(*args, env_extra=None, timeout=300):
    """Run ``python -m fastopt ARGS`` with pipes (not a terminal) and return the completed process."""
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fastopt", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def fastopt_main(capsys, *args):
    """``cli.main(ARGS)`` in this process, as a completed process (returncode, stdout, stderr).

    For the error cases of the parametrized tables: ``python -m fastopt`` is ``SystemExit(main())``
    and ``main`` turns argparse's exits into a status, so the status and the output are those of the
    subprocess, without an interpreter start and fastopt's imports (~2 s) per case; an exception
    main does not handle fails the test as the traceback would. The subprocess path itself is checked
    by the tests that use ``fastopt_cmd``, usage errors and fastopt's errors included."""
    capsys.readouterr()
    status = cli.main(list(args))
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=status, stdout=out.out, stderr=out.err)


def assert_usage_error(proc, *fragments):
    """Exit 2 and one argparse-style line on stderr, ``fastopt COMMAND: error: ...``."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"fastopt( \w+)?: error: ", lines[0]), proc.stderr
    assert lines[0].endswith("--help')")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_one_line_error(proc, *fragments):
    """Exit 2 and one line ``fastopt: error: <fastopt's message>`` (never a traceback)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastopt: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def blocked(tmp_path):
    """PYTHONPATH entries that make ``import NAME`` fail, as if the package were not installed."""
    def block(*names):
        for name in names:
            package = tmp_path / "blocked" / name
            package.mkdir(parents=True)
            (package / "__init__.py").write_text(f"raise ImportError('{name} is blocked for this test')\n")
        return {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "blocked"), os.environ.get("PYTHONPATH")]))}
    return block


# ---------------------------------------------------------------------------------------------
# the command itself


def test_no_command_is_a_usage_error():
    assert_usage_error(fastopt_cmd(), "required")


def test_help_lists_the_commands():
    proc = fastopt_cmd("--help")
    assert proc.returncode == 0
    for command in ("info", "verify", "bench", "train", "compile"):
        assert command in proc.stdout


def test_console_script_runs():
    script = Path(sys.executable).with_name("fastopt")
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable} (fastopt is not pip-installed here)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: fastopt" in proc.stdout


def test_main_returns_the_exit_status(capsys):
    assert cli.main(["train", "--optimizer", "nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0


# ---------------------------------------------------------------------------------------------
# info


def test_info_reports_versions_backends_threads_cache_gpu():
    proc = fastopt_cmd("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(rf"^fastopt\s+{re.escape(fastopt.__version__)}", out, re.M)
    for name in ("numpy", "numba", "numba-cuda", "cupy", "torch"):
        assert re.search(rf"^{re.escape(name)}\s+\S", out, re.M), f"no version line for {name}"
    backend_lines = out[out.index("backends:"):].splitlines()[1:]
    for name, info in fastopt.backends().items():
        line = next(line for line in backend_lines if line.startswith(f"  {name} "))
        assert ("unavailable: " in line) != info.available, line
    assert re.search(r"^threads\s+\d+", out, re.M)
    assert re.search(r"^threading layer\s+(omp|tbb|workqueue)", out, re.M)
    assert re.search(r"^numba cache\s+\S", out, re.M)
    assert re.search(r"^GPU\s+\S", out, re.M)


# numba alone: the import system finds no numba_cuda, and numba.cuda is numba's own (numba-cuda's
# redirector is taken off the import path), as on a machine where numba-cuda was never installed
_WITHOUT_NUMBA_CUDA = """
import importlib.abc, importlib.machinery, sys

class PathFinderWithoutNumbaCuda(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "numba_cuda":
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()

sys.meta_path[:] = [PathFinderWithoutNumbaCuda() if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path if type(finder).__module__ != "_numba_cuda_redirector"]
from fastopt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_info_without_numba_cuda_says_it_is_not_installed_and_how_to_install_it():
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_NUMBA_CUDA, "info"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("  numba-cuda "))
    assert re.search(r"unavailable: numba-cuda is not installed \(.*\); pip install 'numba-cuda\[cu12\]'$", line), line
    assert "importing" not in line and "cgutils" not in line, line  # not the import error it causes
    gpu = next(line for line in proc.stdout.splitlines() if line.startswith("GPU "))
    assert "numba-cuda finds" not in gpu, gpu  # numba's own numba.cuda is not numba-cuda


# ---------------------------------------------------------------------------------------------
# verify

ROW = re.compile(r"^(\w+)\s+(\S+)\s+(float32|float64|bfloat16|float16|int8-state)\s+(\S+)\s+(\S+)\s+(PASS|FAIL)$", re.M)


def test_verify_prints_a_table_and_passes():
    proc = fastopt_cmd("verify", "--op", "adam", "--op", "batchnorm_backward", "--dtype", "float32", "--seed", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "seed 1" in proc.stdout
    assert re.search(r"op\s+backend\s+dtype\s+max rel error\s+tolerance\s+result", proc.stdout)
    rows = ROW.findall(proc.stdout)
    available = [name for name, info in fastopt.backends().items() if info.available]
    assert {(op, backend) for op, backend, *_ in rows} == {
        (op, b) for op in ("adam", "batchnorm_backward") for b in available}
    for op, backend, dtype, error, tolerance, verdict in rows:
        assert dtype == "float32" and verdict == "PASS"
        assert float(error) <= float(tolerance)
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal


def test_verify_one_backend_every_dtype():
    """Without --dtype: float32 and float64 for every op, the 16-bit rows for the optimizers, and
    no int8-state row for an optimizer without 8-bit state. (Which rows run does not depend on the
    backend: the numpy one compiles nothing; the numba rows are verified by the tests around.)"""
    proc = fastopt_cmd("verify", "--backend", "numpy", "--op", "delta_bar_delta", "--op", "batchnorm_forward",
                       "--seed", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = ROW.findall(proc.stdout)
    assert sorted((op, dtype) for op, _, dtype, *_ in rows) == [
        ("batchnorm_forward", "float32"), ("batchnorm_forward", "float64"), ("delta_bar_delta", "bfloat16"),
        ("delta_bar_delta", "float16"), ("delta_bar_delta", "float32"), ("delta_bar_delta", "float64")]
    assert all(backend == "numpy" for _, backend, *_ in rows)


@pytest.mark.parametrize("row", ["bfloat16", "int8-state"])
def test_verify_fails_a_wrong_low_precision_kernel(monkeypatch, row):
    """A 16-bit step whose master copy is off by a little more than the tolerance, or an 8-bit step
    that writes one code one too high, turns its row into FAIL."""
    import numpy as np

    import fastopt.kernels.numba_cpu as numba_cpu
    from fastopt import verify

    real_mixed, real_state8 = numba_cpu.mixed_step, numba_cpu.state8_step

    def mixed_off(op, params, grads, masters, *args, **kwargs):
        real_mixed(op, params, grads, masters, *args, **kwargs)
        for m in masters:
            m *= np.float32(1 + 1e-4)

    def state8_off(op, params, grads, states, *args, **kwargs):
        real_state8(op, params, grads, states, *args, **kwargs)
        codes = next(entry for entry in states[0] if entry is not None)[0].reshape(-1)
        if codes.size:
            codes[0] = min(int(codes[0]) + 1, 255) if codes[0] < 255 else 254

    monkeypatch.setattr(numba_cpu, "mixed_step", mixed_off)
    monkeypatch.setattr(numba_cpu, "state8_step", state8_off)
    (result,) = verify.run(["numba"], ["adagrad"], [row], rng=np.random.default_rng(0))  # one kernel to compile
    assert not result.passed
    assert ("master" if row == "bfloat16" else "codes") in result.failures[0]


def test_verify_fails_with_exit_1_when_a_kernel_is_wrong(monkeypatch, capsys):
    """A kernel that is off by a little more than the tolerance turns its row into FAIL."""
    import fastopt.kernels.numba_cpu as numba_cpu

    real = numba_cpu.adam_step

    def off_by_a_bit(param, grad, *args, **kwargs):
        real(param, grad, *args, **kwargs)
        param *= param.dtype.type(1 + 1e-4)

    monkeypatch.setattr(numba_cpu, "adam_step", off_by_a_bit)
    status = cli.main(["verify", "--backend", "numba", "--op", "adam", "--dtype", "float32", "--seed", "3"])
    out = capsys.readouterr().out
    assert status == 1
    assert re.search(r"^adam\s+numba\s+float32\s+\S+\s+\S+\s+FAIL$", out, re.M), out
    assert "FAIL adam on numba (float32)" in out and "param" in out
    assert "1 of 1 rows FAILED" in out


def test_verify_catches_an_unwritten_element_and_a_raising_kernel(monkeypatch):
    import numpy as np

    import fastopt.kernels.numba_cpu as numba_cpu
    from fastopt import verify

    real = numba_cpu.batchnorm_backward

    def leaves_one_out(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, **kwargs):
        real(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, **kwargs)
        dx.reshape(-1)[-1] = np.nan  # as if the last element had not been written

    def raises(*args, **kwargs):
        raise FloatingPointError("boom")

    monkeypatch.setattr(numba_cpu, "batchnorm_backward", leaves_one_out)
    monkeypatch.setattr(numba_cpu, "sgd_step", raises)
    results = verify.run(["numba"], ["batchnorm_backward", "sgd"], ["float64"], rng=np.random.default_rng(0))
    by_op = {r.op: r for r in results}
    assert not by_op["batchnorm_backward"].passed
    assert all("dx" in line for line in by_op["batchnorm_backward"].failures)
    assert not by_op["sgd"].passed and "raised FloatingPointError: boom" in by_op["sgd"].failures[0]


def test_verify_usage_errors(capsys):
    assert_usage_error(fastopt_main(capsys, "verify", "--op", "nope"), "invalid choice")
    assert_usage_error(fastopt_main(capsys, "verify", "--dtype", "int4"), "invalid choice")
    unavailable = [name for name, info in fastopt.backends().items() if not info.available]
    if unavailable:
        assert_one_line_error(fastopt_main(capsys, "verify", "--backend", unavailable[0]),
                              f"backend {unavailable[0]!r}", "unavailable")


# ---------------------------------------------------------------------------------------------
# bench (the harness lives in fastopt.benchmark; this checks the wiring)


def test_bench_passes_its_arguments_to_the_harness(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("fastopt.benchmark")
    fake.add_arguments = lambda parser: parser.add_argument("--quick", action="store_true")
    fake.run = lambda args: calls.append(args) or 7
    monkeypatch.setitem(sys.modules, "fastopt.benchmark", fake)
    monkeypatch.setattr(fastopt, "benchmark", fake, raising=False)
    assert cli.main(["bench", "--quick"]) == 7
    assert calls and calls[0].quick is True
    assert cli.main(["bench", "--no-such-option"]) == 2
    assert capsys.readouterr().err.startswith("fastopt bench: error: unrecognized arguments: --no-such-option")


def test_bench_help():
    """``fastopt bench --help`` is the harness's own help (needs fastopt.benchmark's harness)."""
    import fastopt.benchmark as benchmark

    if not hasattr(benchmark, "add_arguments"):
        pytest.skip("fastopt.benchmark has no add_arguments() yet: the harness is not in this tree")
    proc = fastopt_cmd("bench", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fastopt bench")


# ---------------------------------------------------------------------------------------------
# compile (one small kernel: compiling every kernel takes minutes)

COMPILE_HEADER = re.compile(r"^compiling (\d+) signatures of (\d+) kernels \((.*); (.*)\) into numba's cache at (.*)$")
COMPILE_LINE = re.compile(r"^(\S+)\s+(float32|float64|any)\s+\d+\.\d\d s  (compiled|loaded from the cache)$")
COMPILE_SUMMARY = re.compile(r"^(\d+) of (\d+) signatures ready in \d+\.\d s \((\d+) compiled, (\d+) loaded from the "
                             r"cache\)$")

# the first call of scale_grads_ in a new process: did numba load the float32 kernel from the cache?
_LOADS_FROM_CACHE = """
import numpy as np
from fastopt.kernels import numba_cpu
from fastopt.kernels.numba_cpu import multi, reduce, runners
g = np.ones(3, np.float32)
numba_cpu.scale_grads_([g], 2.0)
assert (g == 2).all()
stats = reduce._scale.runner.dispatchers["float32"].stats  # the part runner
print(sorted(reduce._scale.runner.dispatchers), stats.cache_hits, stats.cache_misses)
stats = runners.launch_parts.serial.dispatchers["float32"].stats  # 3 elements: the launcher's serial twin
print(sorted(runners.launch_parts.serial.dispatchers), sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
stats = multi._gather_objects.dispatchers["int64"].stats  # the tensor-table reader
print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
"""


def compile_output(proc) -> tuple[re.Match, list[re.Match], re.Match]:
    """The header, one line per signature and the summary of ``fastopt compile``'s stdout."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    header, summary = COMPILE_HEADER.match(lines[0]), COMPILE_SUMMARY.match(lines[-1])
    assert header and summary, proc.stdout
    rows = [COMPILE_LINE.match(line) for line in lines[1:-1]]
    assert all(rows), proc.stdout
    return header, rows, summary


def test_compile_fills_numbas_cache_and_a_new_process_loads_from_it(tmp_path):
    cache = tmp_path / "cache"
    env = {"NUMBA_CACHE_DIR": str(cache)}
    header, rows, summary = compile_output(fastopt_cmd("compile", "--op", "scale_grads_", "--dtype", "float32",
                                                       env_extra=env))
    assert header.groups() == ("4", "4", "scale_grads_", "float32", f"{cache} (NUMBA_CACHE_DIR)")
    assert [r.groups() for r in rows] == [("scale", "float32", "compiled"), ("launch_parts", "float32", "compiled"),
                                          ("launch_parts.serial", "float32", "compiled"),
                                          ("gather_objects", "any", "compiled")]
    assert summary.groups() == ("4", "4", "4", "0")
    for name in ("reduce.scale_run", "runners.launch_parts", "runners.launch_parts_serial", "multi._gather_objects"):
        assert list(cache.glob(f"*/{name}-*.nbi")) and list(cache.glob(f"*/{name}-*.nbc"))
    assert not list(cache.glob("*/reduce.sumsq_run-*")), "another operation's kernel was compiled"

    run = subprocess.run([sys.executable, "-c", _LOADS_FROM_CACHE], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, **env))
    assert run.returncode == 0, run.stderr
    # loaded, not compiled; float32 only
    assert run.stdout.split() == ["['float32']", "1", "0", "['float32']", "1", "0", "1", "0"], run.stdout

    _, rows, summary = compile_output(fastopt_cmd("compile", "--op", "scale_grads_", "--dtype", "float32",
                                                  env_extra=env))
    assert [r.groups() for r in rows] == [(name, dtype, "loaded from the cache") for name, dtype in (
        ("scale", "float32"), ("launch_parts", "float32"), ("launch_parts.serial", "float32"),
        ("gather_objects", "any"))]
    assert summary.groups() == ("4", "4", "0", "4")


def test_compile_in_worker_processes(tmp_path):
    cache = tmp_path / "cache"
    header, rows, summary = compile_output(fastopt_cmd(
        "compile", "--op", "scale_grads_", "--op", "grad_sumsq", "--dtype", "float32", "--jobs", "2",
        env_extra={"NUMBA_CACHE_DIR": str(cache)}))
    assert header.group(4) == "float32, 2 processes"
    assert sorted(r.groups() for r in rows) == [("gather_objects", "any", "compiled")] + [
        (name, "float32", "compiled") for name in ("launch_parts", "launch_parts.serial", "scale", "sumsq")]
    assert summary.groups() == ("5", "5", "5", "0")
    assert list(cache.glob("*/reduce.scale_run-*.nbc")) and list(cache.glob("*/reduce.sumsq_run-*.nbc"))


def test_compile_list_names_every_operation_and_compiles_nothing(tmp_path):
    cache = tmp_path / "cache"
    proc = fastopt_cmd("compile", "--list", env_extra={"NUMBA_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["operation", "kernels", "(each", "for", "float32", "and", "float64)"]
    table = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert set(table) == {"sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "delta_bar_delta",
                          "batchnorm_forward", "batchnorm_backward", "batchnorm_statistics", "grad_sumsq",
                          "scale_grads_", "quantize_blockwise"}
    assert table["adam"] == ("adam.plain, adam.averaged, adam_amsgrad.plain, adam_amsgrad.averaged, launch_parts, "
                             "launch_parts.serial, gather_objects, grads_match_objects")
    assert "stats_channels_last" in table["batchnorm_forward"]
    assert not list(cache.rglob("*.nbi")), "importing the backend compiled something"


@pytest.mark.parametrize("args, fragments", [
    (["--op", "nope"], ["--op: unknown operation 'nope'", "choose from sgd,"]),
    (["--op", "adam", "--op", "Adam"], ["unknown operation 'Adam'"]),
    (["--all", "--op", "adam"], ["not allowed with argument --all"]),
    (["--dtype", "int8"], ["invalid choice"]),
    (["--dtype", "float64", "--state-dtype", "int8"], ["--state-dtype: state_dtype 'int8' is for float32"]),
    (["--op", "adadelta", "--state-dtype", "int8"], ["--state-dtype: adadelta has no kernels for float32 "
                                                       "parameters with int8 state"]),
    (["--jobs", "0"], ["--jobs must be >= 1, got 0"]),
])
def test_compile_usage_errors(args, fragments, capsys):
    assert_usage_error(fastopt_main(capsys, "compile", *args), *fragments)


# ---------------------------------------------------------------------------------------------
# train


def test_train_learns_and_reports_test_accuracy():
    pytest.importorskip("sklearn", reason="fastopt train needs scikit-learn (the demo extra)")
    proc = fastopt_cmd("train", "--epochs", "2", "--seed", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^epoch\s+1/2\s+loss \d+\.\d+\s+train\s+[\d.]+%\s+test\s+[\d.]+%", proc.stdout, re.M)
    assert re.search(r"^epoch\s+2/2", proc.stdout, re.M)
    *_, times, last = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"compile \d+\.\d\d s, train \d+\.\d\d s \(compile: .*numba's cache; train: the epochs "
                        r"alone\)", times), times  # the compile and train times apart, each explained
    assert last.startswith("test accuracy: ")
    accuracy = float(ACCURACY.search(proc.stdout).group(1))
    assert accuracy > 80.0  # chance is 10%
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal


def test_train_with_options():
    pytest.importorskip("sklearn", reason="fastopt train needs scikit-learn (the demo extra)")
    proc = fastopt_cmd("train", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--nesterov",
                       "--epochs", "3", "--batch-size", "32", "--init", "lsuv", "--curriculum", "--hidden", "32",
                       "--backend", "numpy", "--seed", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "optimizer sgd (lr=0.05, momentum=0.9, nesterov=True)" in proc.stdout
    assert "MLP 64-32-10" in proc.stdout and "init lsuv, curriculum; backend numpy" in proc.stdout
    assert re.search(r"^epoch\s+1/3 .* hard\s+10%", proc.stdout, re.M)
    assert float(ACCURACY.search(proc.stdout).group(1)) > 50.0


@pytest.mark.parametrize("args, fragments", [
    (["--optimizer", "nope"], ["invalid choice: 'nope'"]),
    (["--momentum", "0.9"], ["--momentum does not apply to adam"]),
    (["--optimizer", "sgd", "--kappa", "1"], ["--kappa does not apply to sgd"]),
    (["--no-such-option"], ["unrecognized arguments: --no-such-option"]),
    (["--lr", "abc"], ["invalid float value"]),
    (["--epochs", "0"], ["--epochs must be >= 1"]),
    (["--batch-size", "1"], ["--batch-size must be >= 2"]),
    (["--init", "he"], ["invalid choice: 'he'"]),
    (["--backend", "cupy"], ["invalid choice: 'cupy'"]),  # the demo's arrays live on the host
    (["--compare", "--lr", "0.1"], ["--compare trains each optimizer with its own demo hyperparameters"]),
    (["--compare", "adam,nope"], ["unknown optimizer 'nope'"]),
])
def test_train_usage_errors(args, fragments, capsys):
    assert_usage_error(fastopt_main(capsys, "train", *args), *fragments)


@pytest.mark.parametrize("args, fragments", [
    (["--lr", "-1"], ["adam: lr must be >= 0.0, got -1.0"]),
    (["--optimizer", "sgd", "--lr", "nan"], ["sgd: lr must be finite"]),
    (["--betas", "0.9", "1.5"], ["adam: beta2 must be < 1.0"]),
    (["--optimizer", "sgd", "--momentum", "0", "--nesterov"], ["nesterov=True requires momentum > 0"]),
    (["--optimizer", "delta_bar_delta", "--convention", "torch"], ["delta_bar_delta", "textbook"]),
])
def test_train_bad_hyperparameters_are_fastopts_errors(args, fragments, capsys):
    assert_one_line_error(fastopt_main(capsys, "train", *args), *fragments)


def test_train_without_scikit_learn_names_the_pip_command(blocked):
    proc = fastopt_cmd("train", "--epochs", "1", env_extra=blocked("sklearn"))
    assert_one_line_error(proc, "scikit-learn", "pip install 'fastopt[demo]'")


def test_compare_without_matplotlib_fails_before_training(blocked):
    proc = fastopt_cmd("train", "--compare", "adam", "--epochs", "1", env_extra=blocked("matplotlib"))
    assert_one_line_error(proc, "matplotlib", "pip install 'fastopt[demo]'")
    assert "epoch" not in proc.stdout


def test_compare_writes_a_png_and_a_table(tmp_path):
    pytest.importorskip("sklearn", reason="fastopt train needs scikit-learn (the demo extra)")
    pytest.importorskip("matplotlib", reason="--compare needs matplotlib (the demo extra)")
    png = tmp_path / "curves.png"
    proc = fastopt_cmd("train", "--compare", "adam,sgd", "--epochs", "2", "--hidden", "32", "--output", str(png))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = proc.stdout[proc.stdout.index("optimizer  "):]
    assert re.match(r"optimizer\s+hyperparameters\s+final loss\s+test accuracy\s+compile\s+train\n", table), table
    for name in ("adam", "sgd"):  # compile and train times in columns of their own
        assert re.search(rf"^{name}\s+.*\s+\d+\.\d{{4}}\s+\d+\.\d%\s+\d+\.\d\ds\s+\d+\.\d\ds$", table, re.M), table
    assert re.search(r"^\(compile: the first call of each kernel.*; train: the epochs alone; .*\)$", table, re.M)
    assert f"loss curves written to {png}" in proc.stdout


def test_progress_bars_show_on_a_terminal(monkeypatch, capsys):
    """The bars are tqdm's on stderr; they appear when stderr is a terminal."""
    pytest.importorskip("sklearn", reason="fastopt train needs scikit-learn (the demo extra)")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.main(["train", "--epochs", "1", "--hidden", "16"]) == 0
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.err and "step" in captured.err
    assert ACCURACY.search(captured.out)
