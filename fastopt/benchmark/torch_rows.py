"""Benchmark rows for fastopt.torch, in one process, interleaved with torch's own:

* ``resnet50-adamw``: ``fastopt.torch.AdamW.step()`` against ``torch.optim.AdamW(fused=True).step()``
  on the 161 parameter tensors of a ResNet-50-shaped model (25.6 M float32 values);
* ``overhead-200``: the same two steps over 200 tensors of 64 values (per-call overhead);
* ``cnn-train-step``: one training step (forward, backward, step) of ``fastopt.torch.demo.cnn`` on a
  batch of 64 digits, torch alone against fastopt's AdamW and fused batch norm;
* ``interleave``: a fastopt kernel timed on its own and right after a torch parallel op, to see
  whether one thread pool spinning slows the other.

Each row verifies first (both optimizers take the same first step and agree), warms up, then
alternates the two contenders for ``repeats`` rounds and reports medians and their ratio.

Run: ``python -m fastopt.benchmark.torch_rows [--repeats N] [--json FILE]`` or ``fastopt bench --torch``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

__all__ = ["main", "resnet50_shapes", "rows"]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's resnet50 (conv weights, batch-norm γ and β, fc)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if b == 0:
                shapes += [(width * 4, inplanes, 1, 1), (width * 4,), (width * 4,)]
            inplanes = width * 4
    return shapes + [(1000, 2048), (1000,)]


def _alternate(first, second, repeats: int) -> tuple[list[float], list[float]]:
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return a, b


def _optimizer_row(name, shapes, repeats):
    import torch

    import fastopt.torch as ft

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    ours_p = [torch.nn.Parameter(t.clone()) for t in start]
    theirs_p = [torch.nn.Parameter(t.clone()) for t in start]
    for p, g in zip(ours_p + theirs_p, grads + grads):
        p.grad = g.clone()
    ours = ft.AdamW(ours_p, lr=1e-3)
    theirs = torch.optim.AdamW(theirs_p, lr=1e-3, fused=True)
    ours.step()
    theirs.step()
    worst = max(((a - b).abs().max() / (b.abs().max() + 1e-30)).item() for a, b in zip(ours_p, theirs_p))
    if worst > 1e-5:
        raise AssertionError(f"{name}: fastopt.torch.AdamW and torch's fused AdamW disagree after one step ({worst:.2e})")
    for _ in range(3):
        ours.step()
        theirs.step()
    a, b = _alternate(ours.step, theirs.step, repeats)
    elements = sum(int(np.prod(s)) for s in shapes)
    return dict(row=name, tensors=len(shapes), elements=elements, fastopt_ms=1e3 * statistics.median(a),
                torch_fused_ms=1e3 * statistics.median(b),
                speedup=statistics.median(b) / statistics.median(a), max_rel_diff_first_step=worst)


def _cnn_row(repeats, batch=64):
    import torch
    from torch import nn

    import fastopt.torch as ft
    from fastopt.torch.demo import cnn

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    torch.manual_seed(0)
    plain = cnn()
    ours = ft.convert(cnn())
    ours.load_state_dict(plain.state_dict())
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-3, fused=True)
    opt_ours = ft.AdamW(ours.parameters(), lr=1e-3)

    def step(model, opt):
        def run():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss
        return run

    first = [step(plain, opt_plain)().item(), step(ours, opt_ours)().item()]
    if abs(first[0] - first[1]) > 1e-4 * abs(first[0]):
        raise AssertionError(f"cnn-train-step: the first losses differ: torch {first[0]}, fastopt {first[1]}")
    for _ in range(3):
        step(plain, opt_plain)()
        step(ours, opt_ours)()
    a, b = _alternate(step(ours, opt_ours), step(plain, opt_plain), repeats)
    return dict(row="cnn-train-step", batch=batch, fastopt_ms=1e3 * statistics.median(a),
                torch_ms=1e3 * statistics.median(b), speedup=statistics.median(b) / statistics.median(a))


def _interleave_row(repeats, n=1 << 20, size=384):
    """Each pool right after the other's parallel region, against right after its own:

    * a fastopt AdamW step on n float32 values, timed after another fastopt step ("alone": only
      numba's pool has just run) and after a torch matmul (torch's pool has just finished a
      parallel region and may still be spinning);
    * the torch matmul (size × size), timed after another matmul and after a fastopt step.

    Rounds alternate; no sleeps (on a shared machine a sleep hands the cores to other jobs)."""
    import numba
    import torch

    import fastopt

    rng = np.random.default_rng(0)
    w = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    opt = fastopt.AdamW([w], convention="torch")
    a_mat = torch.randn(size, size)
    opt.step([g])
    torch.mm(a_mat, a_mat)
    times = {"fastopt_alone": [], "fastopt_after_torch": [], "torch_alone": [], "torch_after_fastopt": []}

    def timed(key, fn):
        start = time.perf_counter()
        fn()
        times[key].append(time.perf_counter() - start)

    def fastopt_step():
        opt.step([g])

    def torch_op():
        torch.mm(a_mat, a_mat)

    for _ in range(repeats):
        fastopt_step()
        timed("fastopt_alone", fastopt_step)
        torch_op()
        timed("fastopt_after_torch", fastopt_step)
        torch_op()
        timed("torch_alone", torch_op)
        fastopt_step()
        timed("torch_after_fastopt", torch_op)
    med = {k: statistics.median(v) for k, v in times.items()}
    import os

    return dict(row="interleave", elements=n, numba_threading_layer=numba.threading_layer(),
                numba_threads=numba.get_num_threads(), torch_threads=torch.get_num_threads(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(unset)"),
                **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                fastopt_slowdown=med["fastopt_after_torch"] / med["fastopt_alone"],
                torch_slowdown=med["torch_after_fastopt"] / med["torch_alone"])


def rows(repeats: int = 15, which=("resnet50-adamw", "overhead-200", "cnn-train-step", "interleave")) -> list[dict]:
    out = []
    if "resnet50-adamw" in which:
        out.append(_optimizer_row("resnet50-adamw", resnet50_shapes(), repeats))
    if "overhead-200" in which:
        out.append(_optimizer_row("overhead-200", [(64,)] * 200, repeats * 4))
    if "cnn-train-step" in which:
        out.append(_cnn_row(repeats * 4))
    if "interleave" in which:
        out.append(_interleave_row(repeats * 2))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastopt.benchmark.torch_rows", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--row", action="append", help="only these rows (default: all)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    import numba
    import torch

    torch.set_num_threads(numba.get_num_threads())  # the same thread count for both
    results = rows(args.repeats, tuple(args.row) if args.row else
                   ("resnet50-adamw", "overhead-200", "cnn-train-step", "interleave"))
    for r in results:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
