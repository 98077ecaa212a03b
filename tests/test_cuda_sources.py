"""Every CUDA source of the "cupy" backend compiles with NVRTC, cleanly, on any machine.

No GPU and no CuPy needed: NVRTC comes from ``cuda-bindings`` and ``nvidia-cuda-nvrtc-cu12`` (the
``test`` extra). Each module is compiled exactly as the loader has CuPy compile it: the same generated
translation unit, the same name expressions (every template instantiated for float and double and
each vector width), our options plus the ones ``cupy.RawModule`` adds (``-ftz=true``,
``-default-device``). Checks:

* cubin for sm_80 and sm_90 (ptxas runs, ``--ptxas-options=-v``): no warning or error in the log
  (NVRTC has no -Werror; the log is the check), and every kernel reports 0 bytes of stack frame,
  spill stores and spill loads (the tensor lists passed by value are read in place, not copied);
* PTX for compute_90: the float instantiations contain no ``.f64`` instruction, except the
  reductions that accumulate in double by design (``_sources.FLOAT64_BY_DESIGN``, each of which
  must really use double), and the vectorized instantiations move 16 bytes per access;
* the checks can fail: a planted double literal, a planted warning, a forced spill and a planted
  layout mismatch are each caught.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.resources
import json
import re

from pathlib import Path

import numpy as np
import pytest

from fastopt.kernels.cupy import _sources as S  # imports no CuPy

ARCHES = ("sm_80", "sm_90")


def _nvrtc():
    try:
        from cuda.bindings import nvrtc  # cuda-bindings >= 12.6
    except ImportError:
        try:
            from cuda import nvrtc  # older cuda-python layout
        except ImportError as exc:
            pytest.fail(f"NVRTC through cuda-bindings is needed (pip install 'cuda-bindings<13' "
                        f"nvidia-cuda-nvrtc-cu12, the test extra): {exc}")
    return nvrtc


class Compiled:
    """One NVRTC compilation: success, log, cubin or PTX, and the lowered name of each expression."""

    def __init__(self, ok: bool, log: str, output: str, lowered: dict[str, str]):
        self.ok, self.log, self.output, self.lowered = ok, log, output, lowered


def compile_source(source: str, names, target: str, extra=(), *, ptx_too: bool = False) -> Compiled:
    """Compile with NVRTC for ``target``; ``output`` is the PTX for a compute_ target, and for an
    sm_ target too with ``ptx_too`` (the PTX NVRTC hands to ptxas), else empty."""
    nvrtc = _nvrtc()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"fastopt.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    try:
        for name in names:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, name.encode())
            assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, (name, err)
        options = list(S.COMPILE_OPTIONS + S.CUPY_ADDED_OPTIONS) + [f"-arch={target}"]
        if target.startswith("sm_"):
            options.append("--ptxas-options=-v")
        options += list(extra)
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
        ok = result == nvrtc.nvrtcResult.NVRTC_SUCCESS
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        log = log.decode(errors="replace").rstrip("\x00")
        output, lowered = "", {}
        if ok:
            if target.startswith("compute_") or ptx_too:
                _, size = nvrtc.nvrtcGetPTXSize(prog)
                ptx = b" " * size
                nvrtc.nvrtcGetPTX(prog, ptx)
                output = ptx.decode().rstrip("\x00")
            for name in names:
                err, low = nvrtc.nvrtcGetLoweredName(prog, name.encode())
                assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, (name, err)
                lowered[name] = low.decode()
        return Compiled(ok, log, output, lowered)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# Where compilations are shared between the processes of one run (pytest-xdist workers): set by
# the session fixture below to the run's common temporary directory.
_SHARED: dict[str, Path] = {}


@pytest.fixture(scope="session", autouse=True)
def _share_compilations_between_workers(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's basetemp is <run>/popen-gwN; the run's directory is common to all
    shared = (base.parent if base.name.startswith("popen-gw") else base) / "nvrtc-compilations"
    shared.mkdir(exist_ok=True)
    _SHARED["dir"] = shared
    yield
    _SHARED.clear()


def _compile_shared(module: str, target: str) -> Compiled:
    """``module`` for ``target`` (sm_ targets keep their PTX), compiled once per test run: the
    first process to need it compiles it under a file lock and stores the result, the others wait
    for the lock and read it (an optim compilation takes ~20 s; xdist would otherwise repeat it in
    every worker that draws one of its tests)."""
    source, names = S.source(module), S.name_expressions(module)
    key = hashlib.sha256(json.dumps([source, list(names), target, list(S.COMPILE_OPTIONS),
                                     list(S.CUPY_ADDED_OPTIONS), list(_nvrtc().nvrtcVersion())],
                                    default=str).encode()).hexdigest()[:24]
    shared = _SHARED.get("dir")
    if shared is None:
        return compile_source(source, names, target, ptx_too=True)
    path = shared / f"{module}-{target}-{key}.json"
    with open(shared / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return Compiled(**json.loads(path.read_text()))
        result = compile_source(source, names, target, ptx_too=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(vars(result)))
        tmp.rename(path)
        return result


@functools.lru_cache(maxsize=None)
def compiled(module: str, target: str) -> Compiled:
    """A module as the loader compiles it (cached: each compilation takes seconds).

    ``compute_90``: the PTX of the ``sm_90`` compilation, which is the PTX NVRTC produces for
    compute_90 and hands to ptxas (``test_the_ptx_of_an_sm_90_compilation_is_the_compute_90_ptx``),
    so the cubin and PTX checks share one compilation per module."""
    if target == "compute_90":
        return _compile_shared(module, "sm_90")
    return _compile_shared(module, target)


# ---------------------------------------------------------------------------------------------
# what the checks look for


def problems(log: str) -> list[str]:
    """Warning and error lines of an NVRTC/ptxas log."""
    return [line for line in log.splitlines() if re.search(r"\b(warning|error)\b", line, re.IGNORECASE)]


_PROPERTIES = re.compile(r"Function properties for (\S+)\n\s*ptxas\s+\.\s+(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def function_properties(log: str) -> dict[str, tuple[int, int, int]]:
    """ptxas -v: mangled function name -> (stack frame, spill stores, spill loads) bytes."""
    return {name: tuple(map(int, sizes)) for name, *sizes in _PROPERTIES.findall(log)}


def ptx_entries(ptx: str) -> dict[str, str]:
    """Mangled kernel name -> its PTX body."""
    entries = {}
    for match in re.finditer(r"\.entry (\S+)\(", ptx):
        end = ptx.find("\n}\n", match.start())
        entries[match.group(1)] = ptx[match.start():end]
    return entries


def f64_instructions(body: str) -> list[str]:
    """Instructions (not declarations) of a PTX body that operate on or produce float64."""
    return [line.strip() for line in body.splitlines()
            if ".f64" in line and not line.strip().startswith((".reg", ".param", "//"))]


def vector_accesses(body: str) -> list[str]:
    return re.findall(r"(?:ld|st)\.global(?:\.nc)?\.v[24]\.f(?:32|64)", body)


def _float_names(module: str) -> list[str]:
    return [n for n in S.name_expressions(module) if "<float" in n or "float>" in n]


def _vector_width_of(name: str) -> int | None:
    """The W of a name expression with a width argument (update<Op, W>, bn_*<T, W>), else None."""
    match = re.search(r", (\d)>$", name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# the sources compile cleanly


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("module", list(S.MODULES))
def test_module_compiles_without_warnings(module, arch):
    result = compiled(module, arch)
    assert result.ok, result.log
    assert problems(result.log) == [], result.log


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("module", list(S.MODULES))
def test_every_kernel_compiles_with_no_spills_and_no_stack(module, arch):
    result = compiled(module, arch)
    assert result.ok, result.log
    properties = function_properties(result.log)
    for name, mangled in result.lowered.items():
        assert mangled in properties, f"{name} ({mangled}) missing from the ptxas report"
        stack, stores, loads = properties[mangled]
        assert (stack, stores, loads) == (0, 0, 0), (
            f"{name} on {arch}: {stack} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads")


def test_name_expressions_cover_every_kernel_in_the_sources():
    """Every __global__ template of the .cu files is instantiated (so it is compiled and checked)."""
    for module, filename in S.MODULES.items():
        text = importlib.resources.files("fastopt.kernels.cupy").joinpath(filename).read_text()
        kernels = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", text))
        assert kernels, filename
        named = {re.match(r"fo::(\w+)", n).group(1) for n in S.name_expressions(module)}
        assert kernels == named, f"{filename}: kernels {sorted(kernels ^ named)} not matched by name expressions"


def test_every_update_variant_is_instantiated_for_both_dtypes_and_widths():
    names = set(S.name_expressions("optim"))
    for variant in S.UPDATES:
        for dtype, (_, width) in S.DTYPES.items():
            for w in (1, width, None):
                assert S.update_kernel(variant, dtype, w) in names


# ---------------------------------------------------------------------------------------------
# float kernels compute in float; vectorized kernels move 16 bytes


@pytest.mark.parametrize("module", list(S.MODULES))
def test_float_kernels_have_no_float64_instructions(module):
    result = compiled(module, "compute_90")
    assert result.ok, result.log
    entries = ptx_entries(result.output)
    checked = 0
    for name in _float_names(module):
        body = entries[result.lowered[name]]
        if name in S.FLOAT64_BY_DESIGN:
            continue
        checked += 1
        assert f64_instructions(body) == [], f"{name}: float64 in a float kernel: {f64_instructions(body)[:5]}"
    assert checked > 0 or module == "reduce"


@pytest.mark.parametrize("module", list(S.MODULES))
def test_float64_by_design_list_is_exact(module):
    """Each kernel listed as accumulating in double does (the list hides nothing it need not)."""
    result = compiled(module, "compute_90")
    entries = ptx_entries(result.output)
    for name in S.FLOAT64_BY_DESIGN & set(S.name_expressions(module)):
        assert f64_instructions(entries[result.lowered[name]]), f"{name} is listed but uses no float64"


def test_float64_by_design_covers_only_reductions():
    assert all(re.match(r"fo::(sumsq_partial|sum_partials|grad_multiplier|bn_(stats|finalize|eval_coefficients|"
                        r"grad_reduce|grad_finalize))", n) for n in S.FLOAT64_BY_DESIGN)
    assert not any("update" in n or "normalize" in n or "input_grad" in n for n in S.FLOAT64_BY_DESIGN)


@pytest.mark.parametrize("module", ["optim", "batchnorm"])
def test_vectorized_instantiations_use_16_byte_accesses(module):
    result = compiled(module, "compute_90")
    entries = ptx_entries(result.output)
    widths = 0
    for name in S.name_expressions(module):
        width = _vector_width_of(name)
        if width is None:
            continue
        accesses = vector_accesses(entries[result.lowered[name]])
        if width == 1:
            assert accesses == [], f"{name}: vector accesses in the scalar variant"
        else:
            widths += 1
            assert any(a.startswith("ld") for a in accesses) and any(a.startswith("st") for a in accesses), (
                f"{name}: no 16-byte loads and stores")
    assert widths > 0


def test_tensor_list_kernels_vectorize_aligned_tensors():
    result = compiled("optim", "compute_90")
    entries = ptx_entries(result.output)
    for variant in S.UPDATES:
        for dtype in S.DTYPES:
            name = S.update_kernel(variant, dtype, None)
            assert vector_accesses(entries[result.lowered[name]]), name


def test_the_ptx_of_an_sm_90_compilation_is_the_compute_90_ptx():
    """What lets ``compiled(module, "compute_90")`` reuse the sm_90 compilation (on the smallest
    module: a compute_90 compilation of optim alone takes seconds)."""
    direct = compile_source(S.source("reduce"), S.name_expressions("reduce"), "compute_90")
    assert direct.ok, direct.log
    shared = compiled("reduce", "compute_90")
    assert shared.output and shared.output == direct.output
    assert shared.lowered == direct.lowered


# ---------------------------------------------------------------------------------------------
# the checks can fail


def test_a_planted_double_literal_is_caught():
    """``+ 1e-8`` in Adam's float update promotes it to double; the check above finds it."""
    planted = S.source("optim").replace("(eps + sqrt(v) * inv_sqrt_bc2)", "(eps + sqrt(v) * inv_sqrt_bc2 + 1e-8)", 1)
    assert planted != S.source("optim")
    name = S.update_kernel("adam", np.float32, 4)
    result = compile_source(planted, [name], "compute_90")
    assert result.ok, result.log
    found = f64_instructions(ptx_entries(result.output)[result.lowered[name]])
    assert found and any(op in " ".join(found) for op in ("cvt.f64.f32", "add.f64", "add.rn.f64")), found


def test_a_planted_warning_is_caught():
    planted = S.source("reduce") + "\n__device__ int fo_planted() { int unused; return 0; }\n"
    result = compile_source(planted, [S.reduce_kernel("sum_partials")], "sm_90")
    assert result.ok, result.log
    assert problems(result.log), result.log


def test_a_forced_spill_is_caught():
    """64 values live at once in a kernel limited to 32 registers must spill."""
    planted = S.source("reduce") + r"""
__global__ void __launch_bounds__(1024, 2) fo_planted_spill(float* __restrict__ p, const int n) {
    float v[64];
    #pragma unroll
    for (int i = 0; i < 64; ++i) v[i] = p[i * n + threadIdx.x];
    float s = 0.0f;
    #pragma unroll
    for (int i = 0; i < 64; ++i) {
        #pragma unroll
        for (int j = 0; j < 64; ++j) s += v[i] * v[(i * 7 + j) & 63];
    }
    p[threadIdx.x] = s;
}
"""
    result = compile_source(planted, ["fo_planted_spill"], "sm_90")
    assert result.ok, result.log
    stack, stores, loads = function_properties(result.log)[result.lowered["fo_planted_spill"]]
    assert stores > 0 and loads > 0, result.log


def test_a_planted_layout_mismatch_fails_to_compile(monkeypatch):
    """Swapping two scalars in the host's table breaks the generated static_asserts."""
    adam = S.UPDATES["adam"]
    swapped = (adam.scalars[1], adam.scalars[0]) + adam.scalars[2:]
    monkeypatch.setitem(S.UPDATES, "adam", adam._replace(scalars=swapped))
    result = compile_source(S.source("optim"), [S.update_kernel("adam", np.float32, 1)], "compute_90")
    assert not result.ok
    assert "scalar 0 is inv_sqrt_bc2" in result.log, result.log


def test_host_struct_layouts_match_the_tables():
    """The NumPy structs the host packs have the sizes the static_asserts compare against."""
    for variant, update in S.UPDATES.items():
        for dtype in S.DTYPES:
            assert S.scalars_dtype(variant, dtype).itemsize == len(update.scalars) * np.dtype(dtype).itemsize
    for slots in range(1, 7):
        capacity = S.list_capacity(slots)
        assert S.list_dtype(slots).itemsize == (8 * slots + 16) * capacity + 8 <= S.LIST_BYTES
