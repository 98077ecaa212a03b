"""What the ``"cupy"`` backend compiles: its CUDA C sources, compile options and kernel table.

Standard library and NumPy only, no CuPy: ``tests/test_cuda_sources.py`` compiles with NVRTC
exactly what the loader compiles, on machines with neither CuPy nor a GPU.

A module's translation unit is::

    preamble()  +  common.cuh  +  [prerequisites]  +  <module>.cu  +  layout_checks(<module>)

(prerequisites: lowp includes optim.cu, lowbits.cuh and the generated 8-bit tables; convert
includes lowbits.cuh.)

The preamble is short and generated: the constants the host also uses (threads per block, the
byte budget of a tensor list). The layout checks are ``static_assert``s generated from the tables
below, so a struct the host packs (an update's scalars, a tensor list) and its C++ declaration
cannot drift apart without the module failing to compile.
"""

from __future__ import annotations

import importlib.resources
from typing import NamedTuple

import numpy as np

from .. import _code_search

__all__ = [
    "BF16_STATE_SLOTS",
    "BLOCK",
    "COMPILE_OPTIONS",
    "CUPY_ADDED_OPTIONS",
    "DTYPES",
    "LOW_FORMATS",
    "STATE8_LOW_SLOTS",
    "STATE8_SLOTS",
    "STATE8_UPDATES",
    "FLOAT64_BY_DESIGN",
    "LIST_BYTES",
    "MODULES",
    "UPDATES",
    "VEC_BYTES",
    "Update",
    "aux_list_dtype",
    "bf16_state_kernel",
    "bn_kernel",
    "convert_kernel",
    "is_aligned",
    "keyed_list_capacity",
    "keyed_list_dtype",
    "layout_checks",
    "list_capacity",
    "list_dtype",
    "map8",
    "mixed_kernel",
    "mixed_sumsq_kernel",
    "name_expressions",
    "preamble",
    "reduce_kernel",
    "scalars_dtype",
    "source",
    "state8_kernel",
    "state8_scalars_dtype",
    "state8_tables",
    "thresholds8",
    "update_kernel",
    "vector_width",
]

BLOCK = 256  # threads per block of every kernel (FO_BLOCK)
LIST_BYTES = 3584  # bytes of a tensor list passed by value (FO_LIST_BYTES), within the 4 KiB
#                    kernel-parameter limit together with the update's scalars and the extras
STATE8_MAX_BLOCK = 256  # largest quantization block of the 8-bit kernels: one warp, FO_LANE elements a lane
VEC_BYTES = 16  # the vectorized paths move 16 bytes per load: float4 / double2

# NumPy dtype -> (C++ type, elements per 16-byte vector)
DTYPES = {np.dtype(np.float32): ("float", 4), np.dtype(np.float64): ("double", 2)}
_CTYPES = tuple(ctype for ctype, _ in DTYPES.values())
_WIDTH = {ctype: width for ctype, width in DTYPES.values()}

# Our options. --fmad=false: no contraction of a·b + c into an FMA, so each expression rounds as
# written, like the CPU backend (fma() is called explicitly where wanted). The others are NVRTC's
# defaults, written out: IEEE division and square root.
COMPILE_OPTIONS = ("--std=c++17", "--fmad=false", "--prec-div=true", "--prec-sqrt=true")

# What cupy.RawModule adds to every compilation (CuPy 13/14, cupy/cuda/compiler.py): -ftz=true
# (float subnormals flushed to zero, in inputs and results of float arithmetic; double is not
# affected) and -default-device. The NVRTC test compiles with them too, so it checks the code
# CuPy runs.
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")

MODULES = {"optim": "optim.cu", "reduce": "reduce.cu", "batchnorm": "batchnorm.cu", "lowp": "lowp.cu",
           "convert": "convert.cu"}
_HEADER = "common.cuh"
# sources a module's translation unit includes before its own (lowp reuses optim.cu's element updates;
# it instantiates none of optim.cu's kernels; lowp and convert share lowbits.cuh's 16-bit formats)
_LOWBITS = "lowbits.cuh"
_PREREQUISITES = {"lowp": ("optim.cu", _LOWBITS), "convert": (_LOWBITS,)}


# ---------------------------------------------------------------------------------------------
# optimizer updates


class Update(NamedTuple):
    """One update variant: its C++ struct (optim.cu), state arrays, and scalars in struct order."""

    struct: str
    states: int
    scalars: tuple[str, ...]


# The variants of kernels/numba_cpu/optim.py, by the same names (without the underscore).
UPDATES: dict[str, Update] = {
    "sgd": Update("Sgd", 0, ("lr", "weight_decay")),
    "sgd_momentum": Update("SgdMomentum", 1, ("momentum", "c", "k", "weight_decay")),
    "sgd_nesterov": Update("SgdNesterov", 1, ("lr", "momentum", "weight_decay")),
    "sgd_nesterov_torch": Update("SgdNesterovTorch", 1, ("lr", "momentum", "weight_decay")),
    "adagrad": Update("Adagrad", 1, ("lr", "eps", "weight_decay")),
    "rmsprop": Update("Rmsprop", 1, ("lr", "rho", "one_minus_rho", "eps_in", "eps_out", "weight_decay")),
    "rmsprop_centered": Update("RmspropCentered", 2,
                               ("lr", "rho", "one_minus_rho", "eps_in", "eps_out", "weight_decay")),
    "rmsprop_momentum": Update("RmspropMomentum", 2, ("rho", "one_minus_rho", "eps_in", "eps_out", "momentum",
                                                      "c", "k", "weight_decay")),
    "rmsprop_momentum_centered": Update("RmspropMomentumCentered", 3,
                                        ("rho", "one_minus_rho", "eps_in", "eps_out", "momentum", "c", "k",
                                         "weight_decay")),
    "rmsprop_nesterov": Update("RmspropNesterov", 2,
                               ("lr", "rho", "one_minus_rho", "eps", "momentum", "weight_decay")),
    "rmsprop_nesterov_centered": Update("RmspropNesterovCentered", 3,
                                        ("lr", "rho", "one_minus_rho", "eps", "momentum", "weight_decay")),
    "adadelta": Update("Adadelta", 2, ("lr", "rho", "one_minus_rho", "eps", "c", "weight_decay")),
    "adam": Update("Adam", 2, ("step_size", "inv_sqrt_bc2", "beta1", "one_minus_beta1", "beta2",
                               "one_minus_beta2", "eps", "weight_decay", "decay")),
    "adam_amsgrad": Update("AdamAmsgrad", 3, ("step_size", "inv_sqrt_bc2", "beta1", "one_minus_beta1", "beta2",
                                              "one_minus_beta2", "eps", "weight_decay", "decay")),
    "delta_bar_delta": Update("DeltaBarDelta", 2, ("kappa", "phi", "gamma", "one_minus_gamma")),
}


def _ctype(dtype) -> str:
    return DTYPES[np.dtype(dtype)][0]


def update_kernel(variant: str, dtype, width: int | None) -> str:
    """Name expression of an update kernel: ``width`` 1 or the vector width (single tensor), or
    None for the tensor-list kernel."""
    op = f"fo::{UPDATES[variant].struct}<{_ctype(dtype)}>"
    return f"fo::multi_update<{op}>" if width is None else f"fo::update<{op}, {width}>"


def scalars_dtype(variant: str, dtype) -> np.dtype:
    """The update's scalars as a NumPy struct: one field of ``dtype`` per scalar, in struct order."""
    return np.dtype([(name, np.dtype(dtype)) for name in UPDATES[variant].scalars])


# ---------------------------------------------------------------------------------------------
# tensor lists (common.cuh: TensorList<T, D>)


def list_capacity(slots: int) -> int:
    """Tensors per TensorList<T, slots> (``slots`` pointers per tensor, plus n and nvec)."""
    return (LIST_BYTES - 8) // (8 * slots + 16)


def list_dtype(slots: int) -> np.dtype:
    """TensorList<T, slots> as a NumPy struct: T* ptr[cap][slots]; i64 n[cap], nvec[cap]; i64 count."""
    cap = list_capacity(slots)
    return np.dtype([("ptr", np.uint64, (cap, slots)), ("n", np.int64, (cap,)), ("nvec", np.int64, (cap,)),
                     ("count", np.int64)])


def _list_slots() -> list[int]:
    """Every D of a TensorList<T, D> the kernels take: 1 (reductions), states + 3 (updates)."""
    return sorted({1} | {u.states + 3 for u in UPDATES.values()})


# ---------------------------------------------------------------------------------------------
# reductions and batch normalization


def reduce_kernel(name: str, dtype=None) -> str:
    """``sumsq_partial``, ``grad_multiplier``, ``scale_list`` (per dtype) or ``sum_partials``."""
    return f"fo::{name}" if dtype is None else f"fo::{name}<{_ctype(dtype)}>"


def bn_kernel(name: str, dtype, width: int | None = None) -> str:
    """A batch-norm kernel; ``width`` for the elementwise passes (1 or the vector width)."""
    args = _ctype(dtype) if width is None else f"{_ctype(dtype)}, {width}"
    return f"fo::{name}<{args}>"


_BN_REDUCTIONS = ("bn_stats_cf", "bn_stats_cl", "bn_finalize", "bn_eval_coefficients", "bn_grad_reduce_cf",
                  "bn_grad_reduce_cl", "bn_grad_finalize")
_BN_ELEMENTWISE = ("bn_normalize_cf", "bn_normalize_cl", "bn_input_grad_cf", "bn_input_grad_cl")


def name_expressions(module: str) -> tuple[str, ...]:
    """Every kernel of ``module``, as the loader looks it up (one instantiation per dtype and width)."""
    names = []
    for dtype, (_, width) in DTYPES.items():
        if module == "optim":
            for variant in UPDATES:
                names += [update_kernel(variant, dtype, 1), update_kernel(variant, dtype, width),
                          update_kernel(variant, dtype, None)]
        elif module == "reduce":
            names += [reduce_kernel(k, dtype) for k in ("sumsq_partial", "grad_multiplier", "scale_list")]
        elif module == "batchnorm":
            names += [bn_kernel(k, dtype) for k in _BN_REDUCTIONS]
            names += [bn_kernel(k, dtype, w) for k in _BN_ELEMENTWISE for w in (1, width)]
            names.append(bn_kernel("fill", dtype))
        elif module == "lowp":
            if dtype == np.dtype(np.float32):
                names += [mixed_kernel(v, h) for v in UPDATES for h in LOW_FORMATS]
                names += [state8_kernel(v) for v in STATE8_UPDATES]
                names += [state8_kernel(v, h) for v in STATE8_UPDATES for h in LOW_FORMATS]
                names += [bf16_state_kernel(v) for v in STATE8_UPDATES]
                names += [bf16_state_kernel(v, h) for v in STATE8_UPDATES for h in LOW_FORMATS]
                names += [f"fo::mixed_sumsq_partial<fo::{h}>" for h in LOW_FORMATS.values()]
        elif module == "convert":
            if dtype == np.dtype(np.float32):
                names += [convert_kernel(k, h) for k in ("decode16", "encode16") for h in LOW_FORMATS]
        else:
            raise KeyError(module)
    if module == "reduce":
        names.append(reduce_kernel("sum_partials"))
    return tuple(names)


# float instantiations that compute in double on purpose (the float64 accumulation of the
# contract); every other float kernel must compile to PTX without a single .f64 instruction.
FLOAT64_BY_DESIGN = frozenset(
    [reduce_kernel("sumsq_partial", np.float32), reduce_kernel("grad_multiplier", np.float32),
     reduce_kernel("sum_partials")]
    + [bn_kernel(k, np.float32) for k in _BN_REDUCTIONS]
)


# ---------------------------------------------------------------------------------------------
# the translation units


def preamble() -> str:
    return (
        "// generated by fastopt.kernels.cupy._sources\n"
        f"#define FO_BLOCK {BLOCK}\n"
        f"#define FO_LIST_BYTES {LIST_BYTES}\n"
        f"#define FO_LANE {STATE8_MAX_BLOCK // 32}\n"
    )


def layout_checks(module: str) -> str:
    """``static_assert``s that the C++ structs have the layout the host packs."""
    lines = ["// generated by fastopt.kernels.cupy._sources: the host's layouts"]
    for ctype in _CTYPES:
        if module in ("optim", "reduce"):
            for slots in _list_slots() if module == "optim" else [1]:
                size = list_dtype(slots).itemsize
                lines.append(f"static_assert(sizeof(fo::TensorList<{ctype}, {slots}>) == {size}, "
                             f"\"TensorList<{ctype}, {slots}> != _sources.list_dtype({slots})\");")
        if module == "optim":
            for update in UPDATES.values():
                struct = f"fo::{update.struct}<{ctype}>"
                k = len(update.scalars)
                values = ", ".join(str(i) for i in range(k))
                lines.append(f"static_assert(sizeof({struct}) == {k} * sizeof({ctype}), "
                             f"\"{struct}: {k} scalars\");")
                lines.append(f"static_assert({struct}::states == {update.states}, \"{struct}: states\");")
                for i, name in enumerate(update.scalars):
                    lines.append(f"static_assert({struct}{{{values}}}.{name} == {i}, "
                                 f"\"{struct}: scalar {i} is {name}\");")
    if module == "lowp":
        lines += _lowp_layout_checks()
    return "\n".join(lines) + "\n"


def _read(name: str) -> str:
    return importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def source(module: str) -> str:
    """The full translation unit of ``module`` ("optim", "reduce", "batchnorm", "lowp", "convert")."""
    before = [_read(name) for name in _PREREQUISITES.get(module, ())]
    if module == "lowp":
        before.append(state8_tables())
    return "\n".join([preamble(), _read(_HEADER), *before, _read(MODULES[module]), layout_checks(module)])


def vector_width(dtype) -> int:
    return DTYPES[np.dtype(dtype)][1]


def is_aligned(pointer: int) -> bool:
    return pointer % VEC_BYTES == 0


# ---------------------------------------------------------------------------------------------
# low precision (lowp.cu): 16-bit parameters and 8-bit state

# storage dtype name -> the C++ format struct of lowp.cu (CuPy has no bfloat16 dtype: a bfloat16
# array is recognized by its dtype's name, e.g. ml_dtypes.bfloat16 or a torch tensor's)
LOW_FORMATS = {"float16": "Half", "bfloat16": "BFloat16"}

# the 8-bit updates: optim.cu's structs where the CPU's 8-bit update evaluates the same expressions,
# Adam8 (lowp.cu) for Adam (the reference's expression order)
STATE8_UPDATES: dict[str, Update] = {
    "adam": Update("Adam8", 2, ("lr", "bc1", "bc2", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
                                "eps", "weight_decay", "decay")),
    **{v: UPDATES[v] for v in ("sgd_momentum", "sgd_nesterov", "sgd_nesterov_torch", "adagrad", "rmsprop",
                               "rmsprop_momentum", "rmsprop_nesterov")},
}
STATE8_SLOTS = 7  # θ, g, θ̂, codes₀, absmax₀, codes₁, absmax₁
STATE8_LOW_SLOTS = 8  # the same and the master (16-bit θ: state8_update_low, a KeyedList)
BF16_STATE_SLOTS = 6  # bfloat16 state (bf16_state_update[_low], an AuxList): θ, g, θ̂, s₀, s₁, master


def mixed_kernel(variant: str, low: str) -> str:
    """``fo::mixed_update<Op<float>, H>`` for an update variant and a storage dtype name."""
    return f"fo::mixed_update<fo::{UPDATES[variant].struct}<float>, fo::{LOW_FORMATS[low]}>"


def mixed_sumsq_kernel(low: str) -> str:
    return f"fo::mixed_sumsq_partial<fo::{LOW_FORMATS[low]}>"


def state8_kernel(variant: str, low: str | None = None) -> str:
    """``fo::state8_update<Op<float>>`` (float32 θ, ``low`` None) or
    ``fo::state8_update_low<Op<float>, H>`` (θ of the 16-bit dtype named ``low``)."""
    op = f"fo::{STATE8_UPDATES[variant].struct}<float>"
    if low is None:
        return f"fo::state8_update<{op}>"
    return f"fo::state8_update_low<{op}, fo::{LOW_FORMATS[low]}>"


def bf16_state_kernel(variant: str, low: str | None = None) -> str:
    """``fo::bf16_state_update<Op<float>>`` (float32 θ, ``low`` None) or
    ``fo::bf16_state_update_low<Op<float>, H>`` (θ of the 16-bit dtype named ``low``): the 8-bit
    updates of ``STATE8_UPDATES`` with bfloat16 state arrays."""
    op = f"fo::{STATE8_UPDATES[variant].struct}<float>"
    if low is None:
        return f"fo::bf16_state_update<{op}>"
    return f"fo::bf16_state_update_low<{op}, fo::{LOW_FORMATS[low]}>"


def convert_kernel(name: str, low: str) -> str:
    """``fo::decode16<H, float>`` / ``fo::encode16<H, float>`` (convert.cu) for a 16-bit dtype name."""
    return f"fo::{name}<fo::{LOW_FORMATS[low]}, float>"


def state8_scalars_dtype(variant: str) -> np.dtype:
    return np.dtype([(name, np.float32) for name in STATE8_UPDATES[variant].scalars])


def aux_list_dtype(slots: int) -> np.dtype:
    """AuxList<slots> (lowp.cu): void* ptr[cap][slots]; i64 n[cap], aux[cap]; i64 count (the layout
    of TensorList, the second array holding a 64-bit extra per tensor)."""
    cap = list_capacity(slots)
    return np.dtype([("ptr", np.uint64, (cap, slots)), ("n", np.int64, (cap,)), ("aux", np.int64, (cap,)),
                     ("count", np.int64)])


def keyed_list_capacity(slots: int) -> int:
    """Tensors per KeyedList<slots> (``slots`` pointers per tensor, plus n, aux and key)."""
    return (LIST_BYTES - 8) // (8 * slots + 24)


def keyed_list_dtype(slots: int) -> np.dtype:
    """KeyedList<slots> (lowp.cu): void* ptr[cap][slots]; i64 n[cap], aux[cap], key[cap]; i64 count."""
    cap = keyed_list_capacity(slots)
    return np.dtype([("ptr", np.uint64, (cap, slots)), ("n", np.int64, (cap,)), ("aux", np.int64, (cap,)),
                     ("key", np.int64, (cap,)), ("count", np.int64)])


def _lowp_slots() -> list[int]:
    return sorted({1, STATE8_SLOTS, BF16_STATE_SLOTS} | {u.states + 4 for u in UPDATES.values()})


def map8(signed: bool) -> np.ndarray:
    """The dynamic map (docs/algorithms.md, "The dynamic map"), float32, ascending: 0, 1 and
    ±10^(e−6)·(2n + 18k + 9)/(20n), k < n, n = 2^e (signed) or 2^(e+1); as the quantizers build it."""
    values = [0.0, 1.0]
    for e in range(7):
        n = 2 ** e if signed else 2 ** (e + 1)
        for k in range(n):
            v = (2 * n + 18 * k + 9) / (20 * n * 10 ** (6 - e))
            values += [v, -v] if signed else [v]
    return np.array(sorted(values), dtype=np.float32)


def thresholds8(signed: bool) -> np.ndarray:
    """The 255 midpoints of ``map8``, each rounded down to float32 (the same count for every float32)."""
    m = map8(signed)
    lo, hi = m[:-1].astype(np.float64), m[1:].astype(np.float64)
    mid = (lo + hi) / 2
    down = mid.astype(np.float32)
    above = down.astype(np.float64) > mid
    down[above] = np.nextafter(down[above], np.float32(-np.inf))
    return down


def _float_literal(v) -> str:
    return float(v).hex() + "f"


def _bits_literal(v) -> str:
    return f"0x{int(np.float32(v).view(np.uint32)):08X}u"


def state8_tables() -> str:
    """fo_map8[2][256] (exact hexadecimal float literals), fo_thresholds8[2][256] (the 255 midpoints
    and +Inf, as float32 bit patterns), fo_lut8[2][FO_LUT_SIZE] (the encode's bucket table, q' of
    each bucket: ``kernels/_code_search.py``, with its FO_LUT_LOW, FO_LUT_HIGH, FO_LUT_RANGE) and
    fo_zero8[2]; row 0 the unsigned map, row 1 the signed one."""
    maps = [map8(False), map8(True)]
    thresholds = [np.append(thresholds8(s), np.float32(np.inf)) for s in (False, True)]
    luts = [_code_search.table(thresholds8(s)) for s in (False, True)]
    zeros = [int(np.flatnonzero(m == 0)[0]) for m in maps]

    def rows(table, literal):
        return ",\n".join("    {" + ", ".join(literal(v) for v in row) + "}" for row in table)

    return ("// generated by fastopt.kernels.cupy._sources: the 8-bit maps (row 0 unsigned, row 1 signed);\n"
            "// the thresholds as float bit patterns (the last, +Inf, has no float literal); the encode's\n"
            "// bucket tables (kernels/_code_search.py)\n"
            f"#define FO_LUT_LOW {_code_search.LOW}\n"
            f"#define FO_LUT_HIGH {_code_search.HIGH}\n"
            f"#define FO_LUT_RANGE {_code_search.RANGE}\n"
            f"#define FO_LUT_SIZE {2 * _code_search.RANGE}\n"
            f"__device__ const float fo_map8[2][256] = {{\n{rows(maps, _float_literal)}\n}};\n"
            f"__device__ const unsigned int fo_thresholds8[2][256] = {{\n{rows(thresholds, _bits_literal)}\n}};\n"
            f"__device__ const unsigned char fo_lut8[2][FO_LUT_SIZE] = {{\n{rows(luts, str)}\n}};\n"
            f"__device__ const unsigned char fo_zero8[2] = {{{zeros[0]}, {zeros[1]}}};\n")


def _lowp_layout_checks() -> list[str]:
    lines = []
    for slots in _lowp_slots():
        lines.append(f"static_assert(sizeof(fo::AuxList<{slots}>) == {aux_list_dtype(slots).itemsize}, "
                     f"\"AuxList<{slots}> != _sources.aux_list_dtype({slots})\");")
    lines.append(f"static_assert(sizeof(fo::KeyedList<{STATE8_LOW_SLOTS}>) == "
                 f"{keyed_list_dtype(STATE8_LOW_SLOTS).itemsize}, "
                 f"\"KeyedList<{STATE8_LOW_SLOTS}> != _sources.keyed_list_dtype({STATE8_LOW_SLOTS})\");")
    update = STATE8_UPDATES["adam"]
    struct = f"fo::{update.struct}<float>"
    k = len(update.scalars)
    values = ", ".join(str(i) for i in range(k))
    lines.append(f"static_assert(sizeof({struct}) == {k} * sizeof(float), \"{struct}: {k} scalars\");")
    for i, name in enumerate(update.scalars):
        lines.append(f"static_assert({struct}{{{values}}}.{name} == {i}, \"{struct}: scalar {i} is {name}\");")
    return lines
