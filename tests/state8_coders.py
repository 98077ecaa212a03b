"""The 8-bit state kernel's block coders (``kernels/numba_cpu/state8.py``: ``_requantize`` and
``_decode_vectors`` with their scalar tails) against the reference quantizer, on values planted on
the 255 midpoints of each map and on their float32 neighbours (the ties the count must send to the
smaller code), in blocks of 256 with a non-power-of-two absmax and ragged ends. Run as a script
(``python state8_coders.py``) it prints the mismatches as JSON, so the tests can run it on the
other code paths (``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` choose them at import)."""

from __future__ import annotations

import json

import numba
import numpy as np

from fastopt.kernels.numba_cpu import state8 as S
from fastopt.kernels.numba_cpu.lowbits import f32_bits
from fastopt.kernels.numba_cpu.quantize import THRESHOLDS, ZERO
from fastopt.reference import quantize as reference

_F32 = np.dtype(np.float32)
_ABS = np.uint32(0x7FFFFFFF)


@numba.njit(error_model="numpy")
def _round_trip(x, count, codes, absmax, thresholds, zero, lookup, values, decoded):
    """Blocks of ``count`` values of x requantized as the kernel does, then decoded back."""
    scratch = np.empty(count, np.float32)
    at = S._bytes(codes.ctypes.data)
    blocks = (x.shape[0] + count - 1) // count
    for b in range(blocks):
        n = min(count, x.shape[0] - b * count)
        bits = np.uint32(0)
        for j in range(n):
            scratch[j] = x[b * count + j]
            bits = max(bits, f32_bits(scratch[j]) & _ABS)
        S._requantize(scratch, n, bits, at, b * count, absmax, b, thresholds, zero, lookup)
    for b in range(blocks):
        n = min(count, x.shape[0] - b * count)
        full = n - (n & S._VECTOR_TAIL)
        S._decode_vectors(at, b * count, full, values, absmax[b], scratch)
        for j in range(full, n):
            scratch[j] = values[codes[b * count + j]] * absmax[b]
        for j in range(n):
            decoded[b * count + j] = scratch[j]


def mismatches() -> dict:
    """{case: what differs} (empty when every code, absmax and decoded value is the reference's)."""
    rng = np.random.default_rng(3)
    found = {}
    for signed in (True, False):
        t = THRESHOLDS[(signed, _F32)]
        rows = (signed, signed)
        thresholds, lookup, values = S._THRESHOLDS[rows][0], S._LOOKUPS[rows][0], S._VALUES[rows][0]
        for n in (256 * 24, 256 * 24 - 57, 256 * 3 + 200, 63):
            pick = rng.integers(0, 255, n)
            kind = rng.integers(0, 4, n)
            x = np.where(kind == 0, t[pick],
                         np.where(kind == 1, np.nextafter(t[pick], np.float32(np.inf)),
                                  np.where(kind == 2, np.nextafter(t[pick], np.float32(-np.inf)),
                                           rng.uniform(-1, 1, n)))).astype(np.float32)
            if not signed:
                x = np.abs(x)
            x[::256] = 1.0  # absmax 1: x̂ = x, the planted ties stay ties
            x[:512] *= np.float32(3.7)  # and two blocks whose absmax is not a power of two
            codes, absmax = np.zeros(n, np.uint8), np.zeros(-(-n // 256), np.float32)
            decoded = np.zeros(n, np.float32)
            _round_trip(x, 256, codes, absmax, thresholds, ZERO[signed], lookup, values, decoded)
            want_codes, want_absmax = np.zeros(n, np.uint8), np.zeros_like(absmax)
            want = np.zeros(n, np.float32)
            reference.quantize_blockwise(x, want_codes, want_absmax, signed=signed, block=256)
            reference.dequantize_blockwise(want_codes, want_absmax, want, signed=signed, block=256)
            case = f"signed={signed} n={n}"
            if not np.array_equal(codes, want_codes):
                found[case + " codes"] = int((codes != want_codes).sum())
            if not np.array_equal(absmax.view(np.uint32), want_absmax.view(np.uint32)):
                found[case + " absmax"] = int((absmax != want_absmax).sum())
            if not np.array_equal(decoded.view(np.uint32), want.view(np.uint32)):
                found[case + " decoded"] = int((decoded != want).sum())
    return found


if __name__ == "__main__":
    print(json.dumps({"vector": bool(S._AVX512), "vbmi": bool(S._VBMI), "mismatches": mismatches()}))
