"""The GPU check: the gpu tests of both GPU backends, then GPU benchmarks, in one run (< 5 min).

    python bench/gpu_check.py OUTDIR [--pytest-timeout 180] [--workers 8] [--skip-tests] [--adam-log2 28]
                                     [--repeats 20]

1. ``pytest -m gpu`` on tests/test_gpu_streams.py, tests/test_gpu_cupy.py,
   tests/test_gpu_numba_cuda.py and the low-precision tests/test_gpu_lowp_cupy.py and
   tests/test_gpu_lowp_numba_cuda.py, and the torch CUDA-tensor tests of tests/test_torch_optim.py and
   tests/test_torch_batchnorm.py (the files that exist), on ``--workers`` xdist processes with
   a wall-clock limit; its failures and summary are printed, every result line is in
   OUTDIR/gpu_tests.log and the tracebacks in OUTDIR/gpu_tests.xml. The stream checks run first: torch tensors on a side stream
   behind a slow producer (update, non-finite skip, clip_grad_norm_, batch norm), a step captured
   with torch.cuda.graph and replayed, CuPy arrays on a non-blocking stream, numba arrays bound to
   another stream than CuPy's, two host threads stepping at once (torch streams, CuPy's per-thread
   default stream); each against the host reference, on both GPU backends.
2. Benchmarks, the backend modules called directly (``fastopt.kernels.cupy``,
   ``fastopt.kernels.numba_cuda``), each first checked against the other implementations
   (torch where installed), then timed with CUDA events: median of ``--repeats`` after warm-up.
   * device-to-device copy of a 1 GiB buffer (CuPy): the bandwidth every row is compared with,
     counted as bytes read + written;
   * fused Adam over 2**28 float32 parameters: cupy, numba-cuda, ``torch.optim.Adam(fused=True)``
     (28 bytes per element: θ, g, m, v read, θ, m, v written);
   * the same with 8-bit block-wise quantized m and v (16 + 16/256 bytes per element), cupy and
     numba-cuda, against torch's fused Adam on float32 parameters (28) and on bfloat16 ones (14);
   * batch norm, training, float32 256×64×56×56, channel-first (NCHW, channel_axis=1) and
     channels-last (NHWC, channel_axis=3): forward (12 B/elem: x read twice, y written) and
     backward (20 B/elem: dy and x read twice, dx written); torch: ``F.batch_norm`` and autograd
     backward (``torch.autograd.grad`` on one retained graph), NHWC as channels_last memory.
3. A table, printed last: op, backend, time (ms), bytes/elem, GB/s, % of the copy bandwidth,
   speed-up vs torch (torch ms / ms); everything also in OUTDIR/gpu_check.json.

Every section is guarded: a failure is recorded with its error and the rest still runs.
Not a test module (pytest does not collect it).

On a lent machine that has the GPU packages but not fastopt installed, the tree runs in place:
``ln -sfn ../kernels fastopt/kernels; PYTHONPATH=$PWD python3 bench/gpu_check.py OUTDIR``
(the link stands in for the ``fastopt.kernels`` package-dir mapping of an install). On
2026-12-04 the lent H200's image had NumPy 2.5, under which numba-cuda 0.30.4 does not import;
a NumPy 2.4 wheel installed with ``pip install --target`` ahead on ``PYTHONPATH`` fixed that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_TEST_FILES = ["tests/test_gpu_streams.py", "tests/test_gpu_cupy.py", "tests/test_gpu_numba_cuda.py",
                  "tests/test_gpu_lowp_cupy.py", "tests/test_gpu_lowp_numba_cuda.py", "tests/test_torch_optim.py",
                  "tests/test_torch_batchnorm.py"]
BN_SHAPE = (256, 64, 56, 56)


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. the gpu tests


def run_gpu_tests(timeout: float, workers: int, outdir: Path) -> dict:
    """Run the gpu tests with ``workers`` xdist processes (0: in this process's child alone).

    Every result line goes to OUTDIR/gpu_tests.log as it happens, so a run cut short by the limit
    still says which tests passed and failed; OUTDIR/gpu_tests.xml (JUnit) has each failure's
    traceback when the run ends. On the limit the whole process group is killed: xdist workers
    would otherwise keep the GPU busy under the benchmarks."""
    files = [f for f in GPU_TEST_FILES if (ROOT / f).exists()]
    missing = [f for f in GPU_TEST_FILES if f not in files]
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-v", "-rfEs",
               f"--junitxml={outdir / 'gpu_tests.xml'}", *files]
    if workers > 0:
        command[3:3] = ["-n", str(workers)]
    log_path = outdir / "gpu_tests.log"
    log(f"$ {' '.join(command)}   (limit {timeout:.0f} s, log {log_path})")
    start = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode, timed_out = None, True
    seconds = time.perf_counter() - start
    lines = log_path.read_text(errors="replace").strip().splitlines()
    summary = lines[-1] if lines else ""
    if timed_out:
        done = sum(1 for line in lines if " PASSED " in line or " FAILED " in line or " SKIPPED " in line
                   or " ERROR " in line)
        summary = f"TIMED OUT after {timeout:.0f} s with {done} results; last line: {summary}"
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    log("\n".join(failures[:60]))
    log(summary)
    return dict(files=files, missing=missing, returncode=returncode, timed_out=timed_out, seconds=round(seconds, 1),
                summary=summary, failures=failures, tail="\n".join(lines[-200:]))


# ---------------------------------------------------------------------------------------------
# timing


def time_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median of ``repeats`` CUDA-event timings of fn() on the legacy default stream (which
    torch, numba and CuPy use unless told otherwise), after ``warmup`` calls."""
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def rel_diff(a, b) -> float:
    """max |a − b| / max |b| on the device (CuPy, torch or any device array)."""
    import cupy

    a, b = cupy.asarray(a, dtype=cupy.float64), cupy.asarray(b, dtype=cupy.float64)
    return float(cupy.abs(a - b).max() / max(float(cupy.abs(b).max()), 1e-30))


class Rows:
    def __init__(self):
        self.rows: list[dict] = []
        self.errors: list[dict] = []

    def add(self, op, backend, ms, bytes_per_elem, elements, check=""):
        gbs = bytes_per_elem * elements / (ms * 1e-3) / 1e9 if ms else None
        self.rows.append(dict(op=op, backend=backend, ms=ms, bytes_per_elem=bytes_per_elem, elements=elements,
                              gbs=gbs, check=check))
        log(f"  {op:24s} {backend:10s} {ms:9.3f} ms  {gbs or 0:8.1f} GB/s  {check}")

    def fail(self, section, exc):
        message = f"{type(exc).__name__}: {exc}"
        self.errors.append(dict(section=section, error=message, traceback=traceback.format_exc()))
        log(f"  !! {section}: {message}")


# ---------------------------------------------------------------------------------------------
# 2. benchmarks


def copy_bandwidth(rows: Rows, repeats: int) -> float | None:
    import cupy

    nbytes = 1 << 30
    src = cupy.ones(nbytes // 4, cupy.float32)
    dst = cupy.empty_like(src)
    ms = time_ms(lambda: dst.data.copy_from_device_async(src.data, nbytes), repeats)
    assert bool((dst[:1024] == 1).all())
    rows.add("copy 1 GiB", "cupy", ms, 8, nbytes // 4, "ok")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gpu_backends(rows: Rows, section: str) -> list:
    """(name, backend module, wrap) for each GPU backend that imports: ``wrap`` turns a CuPy array
    (or None) into what the backend takes. A backend that fails to import is recorded in ``rows``
    under ``section`` and left out."""
    backends = []
    try:
        import fastopt.kernels.cupy as cupy_backend

        backends.append(("cupy", cupy_backend, lambda a: a))
    except Exception as exc:
        rows.fail(f"{section}: import cupy backend", exc)
    try:
        import numba.cuda

        import fastopt.kernels.numba_cuda as numba_backend

        backends.append(("numba-cuda", numba_backend,
                         lambda a: None if a is None else numba.cuda.as_cuda_array(a, sync=False)))
    except Exception as exc:
        rows.fail(f"{section}: import numba-cuda backend", exc)
    return backends


def adam(rows: Rows, log2: int, repeats: int, torch) -> None:
    import cupy

    n = 1 << log2
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                 amsgrad=False)
    rng = cupy.random.default_rng(0)
    start = rng.standard_normal(n, dtype=cupy.float32)
    grad = rng.standard_normal(n, dtype=cupy.float32)
    param, m, v = start.copy(), cupy.zeros_like(start), cupy.zeros_like(start)
    results = {}
    op = f"adam 2^{log2} float32"

    # reference for the first step on a slice: m = 0.1 g, v = 0.001 g², θ − ε·m̂/(δ + √v̂) = θ − ε·sign(g)·…
    def expected_first_step(p0, g):
        import numpy as np

        import fastopt.reference as reference

        p, mm, vv = p0.astype(np.float64), np.zeros(p0.shape), np.zeros(p0.shape)
        reference.adam_step(p, g.astype(np.float64), mm, vv, None, step=1, **hyper)
        return p

    sample = slice(0, 1 << 20)
    expected = expected_first_step(cupy.asnumpy(start[sample]), cupy.asnumpy(grad[sample]))

    backends = gpu_backends(rows, "adam")

    for name, module, wrap in backends:
        try:
            param[...] = start
            m.fill(0)
            v.fill(0)
            args = [wrap(a) for a in (param, grad, m, v)]
            module.adam_step(*args, None, step=1, **hyper)
            cupy.cuda.Device().synchronize()
            error = rel_diff(param[sample], cupy.asarray(expected))
            check = f"vs reference {error:.1e}" + ("" if error < 1e-5 else " MISMATCH")
            step = [1]

            def one_step():
                step[0] += 1
                module.adam_step(*args, None, step=step[0], **hyper)

            results[name] = time_ms(one_step, repeats)
            rows.add(op, name, results[name], 28, n, check)
        except Exception as exc:
            rows.fail(f"adam: {name}", exc)

    if torch is not None:
        try:
            p = torch.as_tensor(start, device="cuda").clone().requires_grad_(True)
            p.grad = torch.as_tensor(grad, device="cuda").clone()
            opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, fused=True)
            opt.step()
            torch.cuda.synchronize()
            error = rel_diff(p.detach()[: 1 << 20], cupy.asarray(expected))
            check = f"vs reference {error:.1e}" + ("" if error < 1e-5 else " MISMATCH")
            results["torch"] = time_ms(opt.step, repeats)
            rows.add(op, "torch", results["torch"], 28, n, check)
            del opt, p
        except Exception as exc:
            rows.fail("adam: torch", exc)
    del start, grad, param, m, v
    cupy.get_default_memory_pool().free_all_blocks()


STATE8_BLOCK = 256


def adam8(rows: Rows, log2: int, repeats: int, torch) -> None:
    """Adam with 8-bit block-wise quantized m and v (blocks of 256) over 2**log2 float32
    parameters, on both GPU backends, against torch's fused Adam on float32 parameters in the same
    section (issue 13's ratio) and on bfloat16 parameters (bfloat16 m and v, as torch keeps them).

    Bytes per element: 8-bit state, θ 4 read + 4 written, g 4 read, m and v codes 1 + 1 each, and
    per block of 256 one float32 absmax read and written for each of m and v: 16 + 16/256; torch
    float32: 28; torch bfloat16: 14. The first step from zero state is checked against
    ``fastopt.reference.state8`` on the first 2**16 elements (whole blocks)."""
    import cupy
    import numpy as np

    from fastopt.reference import state8 as reference8

    n = 1 << log2
    blocks = -(-n // STATE8_BLOCK)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                 amsgrad=False)
    rng = cupy.random.default_rng(2)
    start = rng.standard_normal(n, dtype=cupy.float32)
    grad = rng.standard_normal(n, dtype=cupy.float32)
    op = f"adam 2^{log2} 8-bit state"
    bytes8 = 16 + 16 / STATE8_BLOCK

    sample = 1 << 16
    expected = [cupy.asnumpy(start[:sample])]
    zero_state = [((np.zeros(sample, np.uint8), np.zeros(sample // STATE8_BLOCK, np.float32)),
                   (np.zeros(sample, np.uint8), np.zeros(sample // STATE8_BLOCK, np.float32)), None)]
    reference8.state8_step("adam_step", expected, [cupy.asnumpy(grad[:sample])], zero_state, None, step=1,
                           block=STATE8_BLOCK, **hyper)

    backends = gpu_backends(rows, "adam 8-bit")

    param = cupy.empty_like(start)
    codes = [cupy.zeros(n, cupy.uint8) for _ in range(2)]
    absmax = [cupy.zeros(blocks, cupy.float32) for _ in range(2)]
    for name, module, wrap in backends:
        try:
            param[...] = start
            for a in (*codes, *absmax):
                a.fill(0)  # absmax 0: every value of the state is 0, whatever its code
            state = [((wrap(codes[0]), wrap(absmax[0])), (wrap(codes[1]), wrap(absmax[1])), None)]
            params, grads = [wrap(param)], [wrap(grad)]
            module.state8_step("adam_step", params, grads, state, None, step=1, block=STATE8_BLOCK, **hyper)
            cupy.cuda.Device().synchronize()
            error = rel_diff(param[:sample], cupy.asarray(expected[0]))
            check = f"vs reference {error:.1e}" + ("" if error < 1e-5 else " MISMATCH")
            step = [1]

            def one_step():
                step[0] += 1
                module.state8_step("adam_step", params, grads, state, None, step=step[0], block=STATE8_BLOCK,
                                   **hyper)

            rows.add(op, name, time_ms(one_step, repeats), bytes8, n, check)
        except Exception as exc:
            rows.fail(f"adam 8-bit: {name}", exc)
    del param, codes, absmax

    if torch is not None:
        for label, dtype, nbytes in (("torch", torch.float32, 28), ("torch-bf16", torch.bfloat16, 14)):
            try:
                p = torch.as_tensor(start, device="cuda").to(dtype).clone().requires_grad_(True)
                p.grad = torch.as_tensor(grad, device="cuda").to(dtype).clone()
                opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, fused=True)
                rows.add(op, label, time_ms(opt.step, repeats), nbytes, n, f"fused, {str(dtype)[6:]} state")
                del opt, p
            except Exception as exc:
                rows.fail(f"adam 8-bit: {label}", exc)
    del start, grad
    cupy.get_default_memory_pool().free_all_blocks()


def batchnorm(rows: Rows, layout: str, repeats: int, torch) -> None:
    import cupy

    n, c, h, w = BN_SHAPE
    shape, axis = ((n, c, h, w), 1) if layout == "NCHW" else ((n, h, w, c), 3)
    elements = n * c * h * w
    rng = cupy.random.default_rng(1)
    x = rng.standard_normal(shape, dtype=cupy.float32) * 2 + 0.5
    dy = rng.standard_normal(shape, dtype=cupy.float32)
    weight = rng.random(c, dtype=cupy.float32) + 0.5
    bias = rng.standard_normal(c, dtype=cupy.float32)
    outputs = {}

    backends = gpu_backends(rows, f"batchnorm {layout}")

    timings = []
    for name, module, wrap in backends:
        try:
            y, dx = cupy.empty_like(x), cupy.empty_like(x)
            rm, rv = cupy.zeros(c, cupy.float32), cupy.ones(c, cupy.float32)
            sm, si = cupy.empty(c, cupy.float32), cupy.empty(c, cupy.float32)
            dw, db = cupy.empty(c, cupy.float32), cupy.empty(c, cupy.float32)
            fwd_args = [wrap(a) for a in (x, weight, bias, rm, rv, y, sm, si)]
            bwd_args = [wrap(a) for a in (dy, x, weight, bias, sm, si, dx, dw, db)]

            def forward():
                module.batchnorm_forward(*fwd_args, training=True, momentum=0.1, eps=1e-5, channel_axis=axis,
                                         relu=False)

            def backward():
                module.batchnorm_backward(*bwd_args, training=True, channel_axis=axis, relu=False)

            forward()
            backward()
            cupy.cuda.Device().synchronize()
            outputs[name] = (y.copy(), dx.copy(), dw.copy())
            timings.append((name, time_ms(forward, repeats), time_ms(backward, repeats)))
        except Exception as exc:
            rows.fail(f"batchnorm {layout}: {name}", exc)

    if torch is not None:
        try:
            import torch.nn.functional as F

            def to_torch(a):
                t = torch.as_tensor(a, device="cuda")
                return t.permute(0, 3, 1, 2) if layout == "NHWC" else t  # NCHW logical, channels_last memory

            tx = to_torch(x).clone(memory_format=torch.preserve_format).requires_grad_(True)
            tw = torch.as_tensor(weight, device="cuda").clone().requires_grad_(True)
            tb = torch.as_tensor(bias, device="cuda").clone().requires_grad_(True)
            trm, trv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
            tdy = to_torch(dy)

            def forward():
                return F.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.1, eps=1e-5)

            ty = forward()
            grads = torch.autograd.grad(ty, (tx, tw, tb), tdy, retain_graph=True)
            torch.cuda.synchronize()

            def back(t):
                return t.permute(0, 2, 3, 1) if layout == "NHWC" else t

            outputs["torch"] = (cupy.asarray(back(ty.detach()).contiguous()),
                                cupy.asarray(back(grads[0]).contiguous()), cupy.asarray(grads[1]))
            timings.append(("torch", time_ms(forward, repeats),
                            time_ms(lambda: torch.autograd.grad(ty, (tx, tw, tb), tdy, retain_graph=True), repeats)))
        except Exception as exc:
            rows.fail(f"batchnorm {layout}: torch", exc)

    reference_name = "torch" if "torch" in outputs else next(iter(outputs), None)
    for name, fwd_ms, bwd_ms in timings:
        if reference_name is None or name == reference_name:
            fwd_check = bwd_check = "ok" if name == reference_name else ""
        else:
            ry, rdx, rdw = outputs[reference_name]
            y_err = rel_diff(outputs[name][0], ry)
            g_err = max(rel_diff(outputs[name][1], rdx), rel_diff(outputs[name][2], rdw))
            fwd_check = f"vs {reference_name} {y_err:.1e}" + ("" if y_err < 1e-3 else " MISMATCH")
            bwd_check = f"vs {reference_name} {g_err:.1e}" + ("" if g_err < 1e-3 else " MISMATCH")
        rows.add(f"bn fwd {layout}", name, fwd_ms, 12, elements, fwd_check)
        rows.add(f"bn bwd {layout}", name, bwd_ms, 20, elements, bwd_check)
    del x, dy, outputs
    cupy.get_default_memory_pool().free_all_blocks()


# ---------------------------------------------------------------------------------------------
# 3. report


def table(rows: list[dict], copy_gbs: float | None) -> str:
    torch_ms = {r["op"]: r["ms"] for r in rows if r["backend"] == "torch"}
    lines = ["| op | backend | time ms | B/elem | GB/s | % of copy | speed-up vs torch | check |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = f"{100 * r['gbs'] / copy_gbs:.0f}%" if copy_gbs and r["gbs"] else "—"
        ratio = f"{torch_ms[r['op']] / r['ms']:.2f}×" if r["op"] in torch_ms and r["ms"] else "—"
        lines.append(f"| {r['op']} | {r['backend']} | {r['ms']:.3f} | {r['bytes_per_elem']} | "
                     f"{r['gbs']:.1f} | {pct} | {ratio} | {r['check']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--pytest-timeout", type=float, default=180.0)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="pytest-xdist processes for the gpu tests (0: none)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--adam-log2", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = dict(python=platform.python_version(), argv=sys.argv)

    report["pytest"] = None if args.skip_tests else run_gpu_tests(args.pytest_timeout, args.workers, args.outdir)

    rows = Rows()
    copy_gbs = None
    torch = None
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        report["device"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        report["cupy"] = cupy.__version__
        report["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        report["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception as exc:
        rows.fail("device", exc)
    try:
        import torch as torch_module

        torch = torch_module if torch_module.cuda.is_available() else None
        report["torch"] = torch_module.__version__
    except Exception as exc:
        report["torch"] = f"unavailable: {exc}"
    try:
        import numba

        report["numba"] = numba.__version__
    except Exception:
        pass
    log(f"device: {report.get('device')}  cupy {report.get('cupy')}  torch {report.get('torch')}")

    for section, run in (("copy", lambda: copy_bandwidth(rows, args.repeats)),
                         ("adam", lambda: adam(rows, args.adam_log2, args.repeats, torch)),
                         ("adam 8-bit", lambda: adam8(rows, args.adam_log2, args.repeats, torch)),
                         ("batchnorm NCHW", lambda: batchnorm(rows, "NCHW", args.repeats, torch)),
                         ("batchnorm NHWC", lambda: batchnorm(rows, "NHWC", args.repeats, torch))):
        log(f"[{section}]")
        try:
            result = run()
            if section == "copy":
                copy_gbs = result
        except Exception as exc:
            rows.fail(section, exc)

    report.update(copy_gbs=copy_gbs, rows=rows.rows, errors=rows.errors,
                  seconds=round(time.perf_counter() - started, 1))
    (args.outdir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    log("")
    if report["pytest"] is not None:
        log(f"gpu tests ({report['pytest']['seconds']} s): {report['pytest']['summary']}"
            + (f"; missing: {', '.join(report['pytest']['missing'])}" if report["pytest"]["missing"] else ""))
    for error in rows.errors:
        log(f"ERROR {error['section']}: {error['error']}")
    log(f"copy bandwidth (read + write): {copy_gbs:.1f} GB/s" if copy_gbs else "copy bandwidth: not measured")
    log(f"total {report['seconds']} s; JSON: {args.outdir / 'gpu_check.json'}")
    log(table(rows.rows, copy_gbs))
    return 0 if not rows.errors and (report["pytest"] is None or report["pytest"]["returncode"] == 0) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
