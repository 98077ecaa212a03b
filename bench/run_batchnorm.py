"""Benchmark fastopt's batch-normalization passes: verify, warm up, then time.

Bytes per element of x (channel vectors are negligible), b the dtype's size:

    forward, training   3b   statistics pass reads x; normalize pass reads x, writes y
    forward, eval       2b   reads x, writes y
    backward, training  5b   reduction pass reads dy and x; elementwise pass reads dy, x, writes dx

Reports the median time, achieved GB/s, % of the in-place bandwidth measured in this run
(``bench/traffic.py``), and the ratio to torch's fused CPU kernels (``aten.native_batch_norm`` and
``aten.native_batch_norm_backward``) on the same layout, measured in this run.

    python bench/run_batchnorm.py [--shape 64 64 56 56] [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import fastopt  # noqa: E402
from traffic import in_place_bandwidth, median_seconds  # noqa: E402

PASSES = {"forward-train": 3, "forward-eval": 2, "backward-train": 5}


def fastopt_runners(x, dy, axis, backend):
    c = x.shape[axis]
    w, b = np.ones(c, x.dtype), np.zeros(c, x.dtype)
    rm, rv = np.zeros(c, x.dtype), np.ones(c, x.dtype)
    fwd_out = (np.empty_like(x), np.empty(c, x.dtype), np.empty(c, x.dtype))
    bwd_out = (np.empty_like(x), np.empty(c, x.dtype), np.empty(c, x.dtype))
    kw = dict(channel_axis=axis, backend=backend)
    _, mean, invstd = fastopt.batchnorm_forward(x, w, b, rm, rv, training=True, out=fwd_out, **kw)
    mean, invstd = mean.copy(), invstd.copy()
    return {
        "forward-train": lambda: fastopt.batchnorm_forward(x, w, b, rm, rv, training=True, out=fwd_out, **kw),
        "forward-eval": lambda: fastopt.batchnorm_forward(x, w, b, rm, rv, training=False, out=fwd_out, **kw),
        "backward-train": lambda: fastopt.batchnorm_backward(dy, x, w, mean, invstd, out=bwd_out, **kw),
    }, (fwd_out, bwd_out)


def torch_runners(torch, x, dy, axis):
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    if axis == -1:  # the same memory viewed as NCHW in channels_last format
        tx, tdy = tx.permute(0, 3, 1, 2), tdy.permute(0, 3, 1, 2)
    c = tx.shape[1]
    w, b = torch.ones(c, dtype=tx.dtype), torch.zeros(c, dtype=tx.dtype)
    rm, rv = torch.zeros(c, dtype=tx.dtype), torch.ones(c, dtype=tx.dtype)
    aten = torch.ops.aten
    _, mean, invstd = aten.native_batch_norm(tx, w, b, rm, rv, True, 0.1, 1e-5)
    return {
        "forward-train": lambda: aten.native_batch_norm(tx, w, b, rm, rv, True, 0.1, 1e-5),
        "forward-eval": lambda: aten.native_batch_norm(tx, w, b, rm, rv, False, 0.1, 1e-5),
        "backward-train": lambda: aten.native_batch_norm_backward(tdy, tx, w, rm, rv, mean, invstd, True, 1e-5,
                                                                  [True, True, True]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 64, 56, 56], help="N C H W")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    dtype = np.dtype(args.dtype)
    try:
        import torch
    except ImportError:
        torch = None
    n, c, h, w = args.shape
    rng = np.random.default_rng(0)
    bandwidth = in_place_bandwidth(n * c * h * w, dtype, args.repeats)
    rows = []
    for layout, shape, axis in (("NCHW", (n, c, h, w), 1), ("NHWC", (n, h, w, c), -1)):
        x = rng.standard_normal(shape).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        ours, (fwd, bwd) = fastopt_runners(x, dy, axis, "numba")
        reference, (rfwd, rbwd) = fastopt_runners(x, dy, axis, "numpy")
        for name in PASSES:  # verify every pass against the reference before timing anything
            ours[name]()
            reference[name]()
            outs, routs = (fwd, rfwd) if name.startswith("forward") else (bwd, rbwd)
            for a, r in zip(outs, routs):
                np.testing.assert_allclose(a, r, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(r).max())))
        theirs = torch_runners(torch, x, dy, axis) if torch is not None else {}
        for name, per_element in PASSES.items():
            seconds = median_seconds(ours[name], args.repeats)
            nbytes = per_element * x.nbytes
            row = dict(layout=layout, passes=name, bytes_per_element=per_element * dtype.itemsize,
                       median_ms=seconds * 1e3, gbps=nbytes / seconds / 1e9,
                       pct_of_in_place=100 * nbytes / seconds / 1e9 / bandwidth)
            if name in theirs:
                t = median_seconds(theirs[name], args.repeats)
                row.update(torch_median_ms=t * 1e3, speedup_vs_torch=t / seconds)
            rows.append(row)
    print(f"x {args.shape} {dtype.name}, in-place bandwidth {bandwidth:.1f} GB/s, median of {args.repeats}")
    print("| layout | pass | B/elem | median ms | GB/s | % of in-place | torch ms | speed-up vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = (f"{r['torch_median_ms']:.2f} | {r['speedup_vs_torch']:.2f}×" if "torch_median_ms" in r else "— | —")
        print(f"| {r['layout']} | {r['passes']} | {r['bytes_per_element']} | {r['median_ms']:.2f} | "
              f"{r['gbps']:.1f} | {r['pct_of_in_place']:.0f}% | {t} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, dtype=dtype.name, in_place_gbps=bandwidth, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
