"""Benchmark fastopt's fused optimizer steps: verify, warm up, then time.

For each configuration: check 3 steps of the numba kernel against the NumPy reference (and against
torch.optim with convention="torch" when torch is installed), then time one step over n elements
(median of repeats) and report achieved GB/s from the bytes-per-element formula in
``bench/traffic.py``, the % of the in-place bandwidth measured in this same run, and the ratio to
torch's fastest CPU implementation (fused where torch has one, else foreach), also measured in
this run.

    python bench/run_optim.py [--n 16777216] [--dtype float32] [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import fastopt  # noqa: E402
from traffic import bytes_per_element, in_place_bandwidth, median_seconds  # noqa: E402

# (label, fastopt class, kwargs, torch class, torch kwargs); torch None where torch has no equivalent
CONFIGS = [
    ("sgd", "SGD", dict(lr=0.01), "SGD", dict(lr=0.01)),
    ("sgd-momentum", "SGD", dict(lr=0.01, momentum=0.9), "SGD", dict(lr=0.01, momentum=0.9)),
    ("sgd-nesterov", "SGD", dict(lr=0.01, momentum=0.9, nesterov=True), "SGD",
     dict(lr=0.01, momentum=0.9, nesterov=True)),
    ("adagrad", "AdaGrad", dict(lr=0.01), "Adagrad", dict(lr=0.01, eps=1e-7)),
    ("rmsprop", "RMSProp", dict(lr=0.01), "RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-6)),
    ("rmsprop-centered-momentum", "RMSProp", dict(lr=0.01, momentum=0.9, centered=True), "RMSprop",
     dict(lr=0.01, alpha=0.9, eps=1e-6, momentum=0.9, centered=True)),
    ("adadelta", "AdaDelta", dict(lr=1.0), "Adadelta", dict(lr=1.0, rho=0.9, eps=1e-6)),
    ("adam", "Adam", dict(lr=1e-3), "Adam", dict(lr=1e-3)),
    ("adam-amsgrad", "Adam", dict(lr=1e-3, amsgrad=True), "Adam", dict(lr=1e-3, amsgrad=True)),
    ("adamw", "AdamW", dict(lr=1e-3), "AdamW", dict(lr=1e-3)),
    ("delta-bar-delta", "DeltaBarDelta", dict(lr=1e-3, kappa=1e-4, phi=0.1, gamma=0.7), None, None),
]

SPEC_NAME = {"SGD": "sgd", "AdaGrad": "adagrad", "RMSProp": "rmsprop", "AdaDelta": "adadelta",
             "Adam": "adam", "AdamW": "adamw", "DeltaBarDelta": "delta_bar_delta"}


def spec_hyper(cls_name: str, kwargs: dict) -> dict:
    hyper = {k: v for k, v in kwargs.items() if k not in ("betas", "initial_accumulator_value")}
    if cls_name == "DeltaBarDelta":
        hyper.pop("lr")
    return hyper


def verify(cls_name, kwargs, torch_name, torch_kwargs, dtype, torch) -> str:
    rng = np.random.default_rng(0)
    start = rng.standard_normal(4099).astype(dtype)
    grads = [rng.standard_normal(4099).astype(dtype) for _ in range(3)]
    runs = {}
    for backend in ("numba", "numpy"):
        p = start.copy()
        opt = getattr(fastopt, cls_name)([p], **kwargs, backend=backend)
        for g in grads:
            opt.step([g])
        runs[backend] = p
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(runs["numba"], runs["numpy"], **tol)
    if torch is None or torch_name is None:
        return "reference"
    p = start.copy()
    opt = getattr(fastopt, cls_name)([p], **kwargs, convention="torch", backend="numba")
    tp = torch.tensor(start.copy())
    topt = getattr(torch.optim, torch_name)([tp], **torch_kwargs, foreach=False)
    for g in grads:
        opt.step([g])
        tp.grad = torch.tensor(g.copy())
        topt.step()
    np.testing.assert_allclose(p, tp.numpy(), **tol)
    return "reference+torch"


def torch_seconds(torch, torch_name, torch_kwargs, n, dtype, repeats):
    """Median step time of torch's fastest CPU implementation, and which one it was."""
    results = {}
    for impl in ("fused", "foreach"):
        tp = torch.zeros(n, dtype=getattr(torch, np.dtype(dtype).name))
        tp.grad = torch.full_like(tp, 1e-3)
        try:
            topt = getattr(torch.optim, torch_name)([tp], **torch_kwargs, **{impl: True})
            topt.step()
        except (RuntimeError, TypeError, ValueError):
            continue  # this torch optimizer has no such implementation on the CPU
        results[impl] = median_seconds(topt.step, repeats)
    best = min(results, key=results.get)
    return results[best], best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2**24, help="elements per parameter array")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    dtype = np.dtype(args.dtype)
    try:
        import torch
    except ImportError:
        torch = None
    import numba

    bandwidth = in_place_bandwidth(args.n, dtype, args.repeats)
    rows = []
    for label, cls_name, kwargs, torch_name, torch_kwargs in CONFIGS:
        checked = verify(cls_name, kwargs, torch_name, torch_kwargs, dtype, torch)
        p = np.zeros(args.n, dtype)
        g = np.full(args.n, 1e-3, dtype)
        opt = getattr(fastopt, cls_name)([p], **kwargs, backend="numba")
        seconds = median_seconds(lambda: opt.step([g]), args.repeats)
        nbytes = bytes_per_element(SPEC_NAME[cls_name], spec_hyper(cls_name, kwargs), dtype.itemsize) * args.n
        row = dict(config=label, verified=checked, median_ms=seconds * 1e3,
                   bytes_per_element=nbytes // args.n, gbps=nbytes / seconds / 1e9,
                   pct_of_in_place=100 * nbytes / seconds / 1e9 / bandwidth)
        if torch is not None and torch_name is not None:
            t_seconds, impl = torch_seconds(torch, torch_name, torch_kwargs, args.n, dtype, args.repeats)
            row.update(torch_impl=impl, torch_median_ms=t_seconds * 1e3, speedup_vs_torch=t_seconds / seconds)
        rows.append(row)

    meta = dict(n=args.n, dtype=dtype.name, repeats=args.repeats, in_place_gbps=bandwidth,
                cpu=platform.processor() or platform.machine(), threads=numba.get_num_threads(),
                numba=numba.__version__, numpy=np.__version__,
                torch=None if torch is None else torch.__version__,
                threading_layer=numba.threading_layer())
    print(f"n={args.n} {dtype.name}, {meta['threads']} threads ({meta['threading_layer']}), "
          f"in-place bandwidth {bandwidth:.1f} GB/s, median of {args.repeats}")
    print("| config | B/elem | median ms | GB/s | % of in-place | torch impl | torch ms | speed-up vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        torch_cols = (f"{r['torch_impl']} | {r['torch_median_ms']:.2f} | {r['speedup_vs_torch']:.2f}×"
                      if "torch_impl" in r else "— | — | —")
        print(f"| {r['config']} | {r['bytes_per_element']} | {r['median_ms']:.2f} | {r['gbps']:.1f} | "
              f"{r['pct_of_in_place']:.0f}% | {torch_cols} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
