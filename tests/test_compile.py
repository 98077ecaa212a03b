"""The house jit wrapper compiles a kernel per dtype, at the first call that needs it.

``kernels/numba_cpu/_jit.py``: one dispatcher per declared signature, picked by the dtype of one
argument; a call whose types match no declared signature raises instead of compiling a promoted
variant. ``KERNELS`` (what ``fastopt compile`` compiles) holds every kernel of the backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

import fastopt
from fastopt import precompile
from fastopt.kernels import numba_cpu
from fastopt.kernels.numba_cpu import _cache, _jit, batchnorm, bnstats, multi, optim, quantize, reduce, runners, tasks


def _axpy(x, a, y):
    for i in range(x.shape[0]):
        y[i] += a * x[i]


def _total(n, like):
    return like * n


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """numba's disk cache in a temporary directory (the toy kernels are cache=True)."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    return tmp_path


def axpy_kernel():
    return _jit.kernel(["void(float32[::1], float32, float32[::1])",
                        "void(float64[::1], float64, float64[::1])"], parallel=False)(_axpy)


def test_a_call_compiles_only_the_signature_of_its_dtype(cache_dir):
    k = axpy_kernel()
    assert k.dtypes == ("float32", "float64") and k.dispatchers == {}
    y = np.zeros(4, np.float32)
    k(np.ones(4, np.float32), np.float32(2), y)
    assert list(k.dispatchers) == ["float32"] and (y == 2).all()
    y64 = np.zeros(4)
    k(np.ones(4), 3.0, y64)
    assert list(k.dispatchers) == ["float32", "float64"] and (y64 == 3).all()
    assert all(len(d.signatures) == 1 for d in k.dispatchers.values())


@pytest.mark.parametrize("args", [
    (np.ones(4, np.int64), 2, np.zeros(4, np.int64)),  # no declared signature for int64
    (np.ones(4, np.float32), np.float32(2), np.zeros(4)),  # float64 output for float32 input
    (np.ones((2, 2), np.float32), np.float32(2), np.zeros(4, np.float32)),  # 2-D
])
def test_a_call_with_wrong_types_raises_instead_of_compiling(cache_dir, args):
    k = axpy_kernel()
    with pytest.raises(TypeError):
        k(*args)
    assert set(k.dispatchers) <= {"float32"}  # at most the signature the dtype named, never a new one
    assert all(len(d.signatures) == 1 for d in k.dispatchers.values())


def test_no_declared_dtype_says_which_were_declared(cache_dir):
    with pytest.raises(TypeError, match=r"_axpy: no declared signature for argument types \(array\(int64.*declared: "
                                        r"void\(float32\[::1\]"):
        axpy_kernel()(np.ones(4, np.int64), 2, np.zeros(4, np.int64))


def test_a_scalar_can_pick_the_signature_and_a_python_float_is_float64(cache_dir):
    k = _jit.kernel(["float64(int64, float32)", "float64(int64, float64)"], parallel=False)(_total)
    assert k(3, 0.5) == 1.5 and list(k.dispatchers) == ["float64"]
    assert k(3, np.float32(0.5)) == 1.5 and sorted(k.dispatchers) == ["float32", "float64"]
    with pytest.raises(TypeError, match="no declared signature"):
        k(3, 1)  # an int is no float


def test_compile_ahead_of_time_by_dtype(cache_dir):
    k = axpy_kernel()
    assert len(k.compile("float64")) == 1 and list(k.dispatchers) == ["float64"]
    assert k.compile(np.float64)[0] is k.dispatchers["float64"]  # compiled once
    assert k.compile("int8") == []
    assert len(k.compile()) == 2 and sorted(k.dispatchers) == ["float32", "float64"]


def test_signatures_must_differ_in_a_dtype():
    with pytest.raises(ValueError, match="must differ in the dtype of one argument"):
        _jit.kernel(["void(float32[::1], float32, float32[::1])", "void(float32[:], float32, float32[:])"])(_axpy)


def _house_kernels():
    """Every house kernel in the backend's modules, also inside the optimizer kernels' wrappers."""
    found = {}
    for module in (optim, runners, batchnorm, bnstats, reduce, quantize):
        for name, obj in vars(module).items():
            if isinstance(obj, _jit._Kernel):
                found[id(obj)] = f"{module.__name__}.{name}"
            elif isinstance(obj, optim._UpdateKernel):
                for variant in ("plain", "averaged"):
                    found[id(getattr(obj, variant))] = f"{module.__name__}.{name}.{variant}"
            elif isinstance(obj, tasks.TaskKernel):  # its body is a module-level house kernel too
                found[id(obj.shell)] = f"{module.__name__}.{name}"
            elif isinstance(obj, runners.Launched):  # a part runner of its own (the reductions)
                found[id(obj.runner)] = f"{module.__name__}.{name}"
    for k in [k for table in numba_cpu.KERNELS.values() for k in table.values()]:
        if id(k) in found and k.serial is not k:
            found[id(k.serial)] = f"{found[id(k)]}.serial"
    for name, obj in vars(multi).items():  # the tensor-table readers
        if isinstance(obj, multi._Reader):
            found[id(obj)] = f"{multi.__name__}.{name}"
    return found


def test_the_compile_table_holds_every_kernel_for_both_dtypes():
    found = _house_kernels()
    listed = {id(k): k for table in numba_cpu.KERNELS.values() for k in table.values()}
    # 30 optimizer part runners (15 × plain/averaged), 2 reductions' and 2 quantization part
    # runners, and their launcher; batch norm's 8 task kernels (a body and a shell each), 5 other
    # kernels and the statistics' merge; the 9 parallel ones each with a serial twin; the 2
    # tensor-table readers, one signature for every dtype
    assert len(found) == 68
    assert sum(1 for k in listed.values() if k.parallel) == 9
    assert sum(1 for k in listed.values() if isinstance(k, runners.Runner)) == 34
    assert set(found) == set(listed), sorted(found[i] for i in set(found) ^ set(listed) if i in found)
    readers = {id(multi._gather_objects), id(multi._grads_match_objects)}
    assert all(k.dtypes == ("float32", "float64") for i, k in listed.items() if i not in readers)
    assert all(listed[i].dtypes == ("int64",) for i in readers)
    assert numba_cpu.KERNELS["adamw"] == numba_cpu.KERNELS["adam"]
    # every operation whose launch goes through the tensor table lists the readers it runs
    for op, table in numba_cpu.KERNELS.items():
        gathers = op in precompile.kernels() and not op.startswith(("batchnorm", "quantize"))
        assert (table.get("gather_objects") is multi._gather_objects) is gathers, op
        assert (table.get("grads_match_objects") is multi._grads_match_objects) is (
            gathers and op not in ("grad_sumsq", "scale_grads_")), op


def test_jobs_list_each_kernel_once_per_dtype():
    jobs = precompile.jobs(["adam", "adamw"], ["float32"])
    assert [(j.name, j.dtype, j.ops) for j in jobs] == [
        (f"{kernel}.{variant}", "float32", ("adam", "adamw"))
        for kernel in ("adam", "adam_amsgrad") for variant in ("plain", "averaged")] + [
        (name, "float32", ("adam", "adamw")) for name in ("launch_parts", "launch_parts.serial")] + [
        (name, "int64", ("adam", "adamw")) for name in ("gather_objects", "grads_match_objects")]
    assert [j.label() for j in jobs][-2:] == ["any", "any"] and not any(j.any_dtype for j in jobs[:-2])
    # the readers once, whichever dtypes are selected
    assert len(precompile.jobs(["adam"])) == len(precompile.jobs(["adam"], ["float32"])) + 6
    assert len(precompile.jobs()) == 134
    with pytest.raises(ValueError, match="unknown operation 'nope'"):
        precompile.jobs(["nope"])
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        precompile.jobs(None, ["int8"])
    with pytest.raises(ValueError, match="not float64"):
        precompile.jobs(["adam"], ["float64"], "int8")
    with pytest.raises(ValueError, match="unknown state dtype 'int4'"):
        precompile.jobs(["adam"], None, "int4")


def test_low_precision_jobs_are_the_kernels_a_step_launches():
    """``fastopt compile --dtype float16`` (and ``--state-dtype int8``) lists the variants that a
    default 16-bit step (master weights, nearest, gradients of θ's dtype) and an 8-bit step launch:
    after such steps in this process, every low-precision kernel that compiled is one of the jobs."""
    from fastopt.kernels.numba_cpu import mixed, state8

    # 16-bit parameters: gradients of their dtype, then float32 gradients
    grads = ("", "float32-grads.")
    # the low-precision variants are part runners, run by the launcher of the float32 optimizers
    # (listed once, where it is first met)
    f16 = precompile.jobs(["adagrad"], ["float16"])
    variants = [(f"adagrad.float16.{g}{v}", "float16") for g in grads for v in ("plain", "averaged")]
    assert [(j.name, j.label()) for j in f16] == variants[:1] + [("launch_parts", "float16"),
                                                                  ("launch_parts.serial", "float16")] + \
        variants[1:] + [("grads_match_objects", "any")]
    int8 = precompile.jobs(["adagrad"], ["float32", "float16"], "int8")
    launcher = [("launch_parts", "float32/int8-state"), ("launch_parts.serial", "float32/int8-state")]
    expected = {d: [(f"adagrad8.{d}.int8-state.{g}{v}", f"{d}/int8-state")
                    for g in (grads if d == "float16" else ("",)) for v in ("plain", "averaged")]
                for d in ("float32", "float16")}
    # then what the tensors under min_8bit_size run (float32 state); the readers and launcher once
    small = {"float32": [("adagrad.plain", "float32"), ("adagrad.averaged", "float32"), ("gather_objects", "any")],
             "float16": variants}
    assert [(j.name, j.label()) for j in int8] == expected["float32"][:1] + launcher + expected["float32"][1:] + \
        [("grads_match_objects", "any")] + small["float32"] + expected["float16"] + small["float16"]
    bn = precompile.jobs(["batchnorm_forward"], ["bfloat16"])
    assert {j.name for j in bn} >= {"decode_bf16", "encode_bf16.serial", "stats_channels_last.serial"}
    assert precompile.jobs(["adadelta"], None, "int8") == []

    called = []
    real_call = _jit._Kernel.__call__
    real_address = runners.Runner.address

    def recording(self, *args):
        called.append(self)
        return real_call(self, *args)

    def recording_address(self, dtype):
        called.append(self)
        return real_address(self, dtype)

    rng = np.random.default_rng(0)
    # another variant compiled first (as other tests of this process may have): not counted
    fastopt.AdaGrad([np.ones(10, np.float16)], lr=0.1, polyak=0.5).step([np.ones(10, np.float16)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_jit._Kernel, "__call__", recording)
        patch.setattr(runners.Runner, "address", recording_address)
        for options in ({}, {"state_dtype": "int8"}):
            p = rng.standard_normal(5000).astype(np.float16)
            fastopt.AdaGrad([p], lr=0.1, **options).step([np.ones(5000, np.float16)])
    used = [k for k in called if k.py_func.__module__ in (mixed.__name__, state8.__name__, runners.__name__)]
    # the 16-bit update's runner and the 8-bit update's, each run by the launcher's serial twin
    # (5,000 elements)
    assert len(used) == 4, used
    jobs = {id(j.kernel) for j in f16 + int8}
    assert all(id(k) in jobs for k in used)

    # 8-bit state with a tensor under min_8bit_size, which keeps float32 state, with gradients of
    # the parameters' dtype and float32 ones: the int8 jobs alone hold every kernel the step launches
    int8_jobs = {id(j.kernel) for j in int8}
    for grad_dtype in (np.float16, np.float32):
        called.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_jit._Kernel, "__call__", recording)
            patch.setattr(runners.Runner, "address", recording_address)
            params = [rng.standard_normal(n).astype(np.float16) for n in (5000, 100)]
            fastopt.AdaGrad(params, lr=0.1, state_dtype="int8").step([np.ones(p.size, grad_dtype) for p in params])
        used = [k for k in called if k.py_func.__module__ in (mixed.__name__, state8.__name__, runners.__name__)]
        assert len(used) == 4, used  # an 8-bit and a float32-state runner, each with the launcher's twin
        assert all(id(k) in int8_jobs for k in used), (grad_dtype, used)


# a float32 Adam step in a new process with an empty cache: which kernels, in which dtypes, compiled?
_FIRST_STEP = """
import sys
import numpy as np
import fastopt
from fastopt.kernels.numba_cpu import KERNELS
assert not any(k.dispatchers for table in KERNELS.values() for k in table.values()), "compiled at import"
p = np.zeros(100, np.float32)
fastopt.Adam([p], lr=1e-3).step([np.ones(100, np.float32)])
assert (p < 0).all()
assert "ml_dtypes" not in sys.modules, "a float32 step imported ml_dtypes (~0.6 s)"
compiled = {name: sorted(k.dispatchers) for table in KERNELS.values() for name, k in table.items() if k.dispatchers}
print(compiled)
"""


def test_a_first_float32_adam_step_compiles_one_kernel_in_one_dtype(tmp_path):
    """100 elements: Adam's plain part runner for float32 and the launcher's serial twin; the
    parallel launcher is never compiled. The tensor-table readers compile at the first step too, not when the backend is imported, and nothing imports
    ml_dtypes, which only 16-bit arrays need."""
    run = subprocess.run([sys.executable, "-c", _FIRST_STEP], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ("{'launch_parts.serial': ['float32'], 'gather_objects': ['int64'], "
                                  "'grads_match_objects': ['int64'], 'adam.plain': ['float32']}")


def _sum_into(x, out):
    for i in numba.prange(x.shape[0]):
        out[i] = x[i] + 1


def test_a_parallel_kernel_has_a_serial_twin_with_its_own_cache_files(cache_dir):
    k = _jit.kernel(["void(float64[::1], float64[::1])"])(_sum_into)
    twin = k.serial
    assert k.parallel and not twin.parallel and twin.serial is twin
    assert twin.py_func.__qualname__ == "_sum_into_serial" and twin.py_func.__code__ is _sum_into.__code__
    x = np.arange(5.0)
    for kernel in (k, twin):
        out = np.zeros(5)
        kernel(x, out)
        assert (out == x + 1).all()
    # numba's cache index does not record the parallel flag: one name for both would share files
    names = sorted(p.name.split("-")[0] for p in cache_dir.rglob("*.nbi"))
    assert names == ["test_compile._sum_into", "test_compile._sum_into_serial"], names
    assert _jit.kernel(["void(float64[::1], float64[::1])"], parallel=False)(_sum_into).serial.parallel is False


# scale_grads_ in the dtypes given on the command line; prints whether numba compiled anything
_SCALE = """
import sys
import numpy as np
from fastopt.kernels import numba_cpu
from fastopt.kernels.numba_cpu import reduce, runners
for dtype in sys.argv[1:]:
    g = np.ones(3, dtype)
    numba_cpu.scale_grads_([g], 2.0)
    assert g.dtype == dtype and (g == 2).all(), g
runner = sum(c.stats.cache_misses for c in reduce._scale.runner.dispatchers.values())
launcher = sum(sum(d.stats.cache_misses.values()) for d in runners.launch_parts.serial.dispatchers.values())
print(runner + launcher)  # 3 elements: the launcher's serial twin
"""


def test_dtypes_compiled_by_different_processes_load_together(tmp_path):
    """Each dtype's compiled code (the part runner's and the launcher's) adds its entry to the
    function's one cache index; a third process loads both."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    for dtypes, compiled in ((["float32"], "2"), (["float64"], "2"), (["float32", "float64"], "0")):
        run = subprocess.run([sys.executable, "-c", _SCALE, *dtypes], capture_output=True, text=True,
                             timeout=300, env=env)
        assert run.returncode == 0, f"{dtypes}: {run.stderr[-2000:]}"
        assert run.stdout.strip() == compiled, dtypes


# an optimizer's part runner and batch norm's task kernels, at a serial and a parallel size; prints
# the digest of every result and the kernels numba compiled (rather than loaded) in this process
_SHARED_LOOPS = """
import hashlib, json
import numpy as np
import fastopt
from fastopt.kernels.numba_cpu import KERNELS
digest = hashlib.sha256()
for n in (100, 70_000):
    rng = np.random.default_rng(n)
    params = [rng.standard_normal(n).astype(np.float32)]
    opt = fastopt.Adam(params, lr=1e-2, polyak=0.5)
    for _ in range(2):  # the average starts after the first step; the second runs the averaged runner
        opt.step([rng.standard_normal(n).astype(np.float32)])
    x = rng.standard_normal((n // 10, 10)).astype(np.float32)
    for arrays in (params, opt.averaged_params(), fastopt.batchnorm_forward(x, None, None, None, None),
                   fastopt.batchnorm_forward(x.reshape(n // 100, 10, 10), None, None, None, None)):
        for a in arrays:
            digest.update(np.ascontiguousarray(a).tobytes())
compiled = sorted({k.__name__ for table in KERNELS.values() for k in table.values()
                   for d in k.dispatchers.values() if d.stats.cache_misses})
print(json.dumps([digest.hexdigest(), compiled]))
"""


def test_runners_and_task_kernels_load_from_the_cache_and_give_the_same_bits(tmp_path):
    """The optimizer's part runner (a C function, ``runners.py``) and batch norm's bodies and shells
    (``tasks.py``) are found through addresses taken at run time; a second process loads every one
    of them from the disk cache, compiles nothing, and computes the same bits."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    results = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _SHARED_LOOPS], capture_output=True, text=True, timeout=600,
                             env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    (first, compiled_first), (second, compiled_second) = results
    assert {"_adam_run_averaged", "launch_parts", "launch_parts_serial", "_stats_channels_last_tasks",
            "_normalize_channel_first_tasks", "_normalize_channel_first"} <= set(compiled_first), compiled_first
    assert compiled_second == [] and second == first


# two updates on 16-bit parameters and two with 8-bit state, at a serial and a parallel size: each
# pair's bodies share one shell per variant; prints the digest of the parameters after two steps
# and the low-precision kernels numba compiled (rather than loaded) in this process
_LOW_PRECISION_LOOPS = """
import hashlib, json
import ml_dtypes
import numpy as np
import fastopt
from fastopt.kernels.numba_cpu import low_precision_kernels
BF16 = ml_dtypes.bfloat16
runs = [(fastopt.Adam, {}, BF16), (fastopt.AdaGrad, {}, BF16),
        (fastopt.Adam, {"state_dtype": "int8"}, np.float32), (fastopt.AdaGrad, {"state_dtype": "int8"}, np.float32)]
digest = hashlib.sha256()
for n in (5_000, 70_000):
    for cls, options, dtype in runs:
        rng = np.random.default_rng(n)
        params = [rng.standard_normal(n).astype(dtype)]
        opt = cls(params, lr=1e-2, **options)
        for _ in range(2):
            opt.step([rng.standard_normal(n).astype(dtype)])
        digest.update(params[0].tobytes())
kernels = {}
for op, dtype, state_dtype in (("adam", "bfloat16", "float32"), ("adagrad", "bfloat16", "float32"),
                               ("adam", "float32", "int8"), ("adagrad", "float32", "int8")):
    kernels.update(low_precision_kernels(op, dtype, state_dtype))
compiled = sorted({name for name, k in kernels.items() for d in k.dispatchers.values() if d.stats.cache_misses})
print(json.dumps([digest.hexdigest(), compiled]))
"""


def test_low_precision_runners_load_from_the_cache_and_give_the_same_bits(tmp_path):
    """The part runners of 16-bit and 8-bit updates are copies of one template under each update's
    and variant's name, run by the float32 optimizers' launcher: a second process loads each
    runner and the launcher from the disk cache (none taken for another update's), compiles
    nothing, and computes the same bits."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    results = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _LOW_PRECISION_LOOPS], capture_output=True, text=True,
                             timeout=600, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    (first, compiled_first), (second, compiled_second) = results
    expected = {f"{op}.bfloat16.plain" for op in ("adam", "adagrad")}
    expected |= {f"{op}8.float32.int8-state.plain" for op in ("adam", "adagrad")}
    expected |= {"launch_parts", "launch_parts.serial"}
    assert expected <= set(compiled_first), compiled_first
    assert compiled_second == [] and second == first


def test_a_runner_or_body_refuses_a_dtype_it_was_not_declared_for():
    with pytest.raises(TypeError, match=r"_adam_run: no runner for dtype int32 \(declared: float32, float64\)"):
        optim._adam.plain.address(np.dtype(np.int32))
    with pytest.raises(TypeError, match="_stats_channels_last_tasks: no declared signature for dtype int32"):
        batchnorm._stats_channels_last.body.address(np.dtype(np.int32))


_STAMPED = """
import sys
from fastopt.kernels.numba_cpu import _cache
_cache.package_digest = lambda: sys.argv[1]  # as if the kernel package's sources were these
""" + _SCALE.replace("for dtype in sys.argv[1:]:", "for dtype in ['float32']:")


def test_a_change_to_any_kernel_source_invalidates_every_cached_kernel(tmp_path):
    """numba stamps a kernel's cache with its own file; a kernel inlining a helper from another
    file would load stale code after the helper changed. The stamp also holds a digest of every
    kernel source: the same digest loads, another recompiles."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    for digest, compiled in (("a", "2"), ("a", "0"), ("b", "2")):
        run = subprocess.run([sys.executable, "-c", _STAMPED, digest], capture_output=True, text=True,
                             timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip() == compiled, f"digest {digest}"


def test_the_sources_digest_follows_content_not_file_times(tmp_path):
    root = tmp_path / "kernels"
    (root / "numba_cpu").mkdir(parents=True)
    helper = root / "numba_cpu" / "lowbits.py"
    helper.write_text("X = 1\n")
    (root / "__init__.py").write_text("")
    (root / "notes.txt").write_text("not a source")
    first = _cache.sources_digest(root)
    os.utime(helper, ns=(0, 10**9))
    (root / "notes.txt").write_text("changed")
    assert _cache.sources_digest(root) == first
    helper.write_text("X = 2\n")
    assert _cache.sources_digest(root) != first
    helper.write_text("X = 1\n")
    (root / "numba_cpu" / "new.py").write_text("")
    assert _cache.sources_digest(root) != first
    second = _cache.sources_digest(root)
    for gpu in _cache.GPU_SUBPACKAGES:  # GPU kernel sources never reach a CPU kernel
        (root / gpu).mkdir()
        (root / gpu / "launch.py").write_text("Y = 1\n")
    assert _cache.sources_digest(root) == second
    assert _cache.package_digest() == _cache.sources_digest(_cache.PACKAGE_ROOT)


def test_the_cache_survives_a_reinstall_that_only_changes_file_times(tmp_path):
    """A reinstall of the same version writes the same sources with new modification times; numba
    keys its cache by the source's content hash, so a cache outside the package still loads."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    source = reduce.__file__
    before = os.stat(source)
    try:
        for touch, compiled in ((False, "2"), (True, "0")):
            if touch:
                os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
            run = subprocess.run([sys.executable, "-c", _SCALE, "float32"], capture_output=True, text=True,
                                 timeout=300, env=env)
            assert run.returncode == 0, run.stderr[-2000:]
            assert run.stdout.strip() == compiled, f"touched={touch}"
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_compile_uses_a_process_per_core_for_many_kernels_and_one_for_a_few(monkeypatch):
    """``fastopt compile`` without ``--jobs``: every kernel on a 2-core machine compiles in 2
    processes, on 16 cores in at most 8; a few kernels (a worker's start would cost more than it
    saves) and a 1-core machine compile in this process."""
    everything = precompile.jobs()
    few = precompile.jobs(["scale_grads_"])
    for cores, expected in [(1, 1), (2, 2), (16, 8)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert precompile.default_workers(everything) == expected, cores
        assert precompile.default_workers(few) == 1, cores
