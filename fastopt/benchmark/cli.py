"""``fastopt bench`` / ``python -m fastopt.benchmark``: verify, warm up, time, report.

Exit status: 0 when every selected row was verified (rows skipped with a printed reason included),
1 when some kernel disagreed with the reference (that row is reported and not timed), 2 for a usage
or environment error found before anything ran (unknown ``--op``, unusable ``--backend``,
``--plot`` without matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import os
import platform
import shlex
import sys

import numpy as np

from . import report
from .cases import Settings, Skip, all_cases
from .timing import STREAM_FORMULA, IdleGate, Stream, median, repeated, sample_interleaved, torch_wake
from .verify import VerificationError

__all__ = ["add_arguments", "main", "run"]

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
GROUPS = ("optimizer", "batchnorm", "many-tensors", "training-step", "low-precision")
SMALL = dict(n=4099, bn_shape=(3, 5, 7, 9))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser`` (the ``fastopt bench`` subcommand)."""
    parser.add_argument("--quick", action="store_true",
                        help="fewer rows (the ones the targets name), 5 repeats, no cold-start measurement")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="also draw %% of the in-place bandwidth per row "
                             "(needs matplotlib: pip install 'fastopt[demo]')")
    parser.add_argument("--backend", default="numba",
                        help="backend to benchmark (default: numba; numpy times the reference itself)")
    parser.add_argument("--op", action="append", metavar="NAME",
                        help=f"rows to run: a group ({', '.join(GROUPS)}), a row name, or a glob such as 'adam*'; "
                             "repeatable or comma-separated (default: all rows, or the --quick ones); 'distributed': "
                             "the data-parallel step, under mpiexec (docs/distributed.md)")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--repeats", type=int,
                        help="timed calls per row (default 15, --quick 5); the median is reported")
    parser.add_argument("--reference-repeats", type=int,
                        help="timed calls of the slow NumPy reference (default 5, --quick 2)")
    parser.add_argument("--n", type=int,
                        help=f"elements of the single-tensor optimizer rows (default 2**24 = {2**24:,})")
    parser.add_argument("--bn-shape", type=int, nargs=4, metavar=("N", "C", "H", "W"),
                        help="batch-norm input shape (default 64 64 56 56)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, help="numba threads (torch gets the same count); default: numba's")
    parser.add_argument("--no-torch", action="store_true", help="do not compare with torch even if it is installed")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each timing round, wait up to SECONDS for the rest of the machine to be idle "
                             "(Linux; for shared machines; default 0: do not wait)")
    cold = parser.add_mutually_exclusive_group()
    cold.add_argument("--cold-start", dest="cold_start", action="store_true", default=None,
                      help="measure the first-ever compile time of the CPU kernels (default unless --quick)")
    cold.add_argument("--no-cold-start", dest="cold_start", action="store_false")
    parser.add_argument("--torch", action="store_true",
                        help="run the fastopt.torch rows instead (fastopt.benchmark.torch_rows: AdamW on ResNet-50's "
                             "parameters and over 200 small tensors against torch's fused AdamW, a CNN training step, "
                             "thread-pool interleaving); needs the torch extra")
    parser.add_argument("--small", action="store_true",
                        help=f"tiny sizes (n={SMALL['n']}, batch norm {SMALL['bn_shape']}, many-tensor rows "
                             "scaled down): checks the harness, the timings mean nothing")


def _select(cases, ops, quick):
    if not ops:
        return [c for c in cases if c.quick] if quick else list(cases), []
    patterns = [p.strip() for op in ops for p in op.split(",") if p.strip()]
    unknown = [p for p in patterns
               if not any(p == c.group or fnmatch.fnmatchcase(c.name, p) for c in cases)]
    chosen = [c for c in cases if any(p == c.group or fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    return chosen, unknown


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    llc = None
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size", encoding="utf-8") as f:
            llc = f.read().strip()
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), last_level_cache=llc, system=platform.platform(),
                python=platform.python_version())


def _error(message: str) -> int:
    print(f"fastopt bench: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (from ``add_arguments``); returns the exit status."""
    if getattr(args, "torch", False):
        from .torch_rows import main as torch_main

        return torch_main([*(["--repeats", str(args.repeats)] if args.repeats else []),
                           *(["--json", args.json] if args.json else [])])
    if args.op and "distributed" in [p.strip() for op in args.op for p in op.split(",")]:
        from ..distributed.bench import run as run_distributed  # under mpiexec (docs/distributed.md)

        return run_distributed(args)
    cases = all_cases()
    if args.list:
        for c in cases:
            print(f"{c.name:28s} {c.group:14s} {'quick ' if c.quick else '      '}{c.description}")
        return EXIT_OK
    chosen, unknown = _select(cases, args.op, args.quick)
    if unknown:
        return _error(f"--op {', '.join(unknown)} matches no row; rows: {', '.join(c.name for c in cases)}; "
                      f"groups: {', '.join(GROUPS)}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _error("--plot needs matplotlib, which is not installed (pip install 'fastopt[demo]')")

    import numba

    import fastopt
    from fastopt import dispatch

    if args.backend not in dispatch.BACKEND_NAMES:
        return _error(f"--backend must be one of {', '.join(dispatch.BACKEND_NAMES)}, got {args.backend!r}")
    info = fastopt.backends()[args.backend]
    if not info.available:
        return _error(f"backend {args.backend!r} is unavailable: {info.reason}")
    if info.array_type != "numpy.ndarray":
        return _error(f"backend {args.backend!r} works on {info.array_type}s; this harness times NumPy arrays only")
    if args.threads is not None:
        if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
            return _error(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}], got {args.threads}")
        numba.set_num_threads(args.threads)
    for name in ("repeats", "reference_repeats", "n"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.bn_shape is not None and min(args.bn_shape) < 1:
        return _error(f"--bn-shape must be positive, got {args.bn_shape}")

    dtype = np.dtype(args.dtype)
    settings = Settings(dtype=dtype)
    if args.small:
        settings.n, settings.bn_shape, settings.full_size_many_tensors = SMALL["n"], SMALL["bn_shape"], False
    if args.n is not None:
        settings.n = args.n
    if args.bn_shape is not None:
        settings.bn_shape = tuple(args.bn_shape)
    if args.no_torch:
        settings.torch_reason = "--no-torch"
    else:
        try:
            import torch
        except ImportError:
            settings.torch_reason = "torch is not installed"
        else:
            torch.set_num_threads(numba.get_num_threads())
            settings.torch = torch
    repeats = args.repeats or (5 if args.quick else 15)
    ref_repeats = args.reference_repeats or min(repeats, 2 if args.quick else 5)
    cold_start = (not args.quick) if args.cold_start is None else args.cold_start

    if args.wait_idle < 0:
        return _error(f"--wait-idle must be >= 0, got {args.wait_idle}")
    stream = Stream(settings.n, dtype)
    stream()  # compile (or load) before any row
    wake = Stream(min(1 << 16, settings.n), dtype)  # gets the threads running: see timing's docstring
    setups = {"kernel": wake, "bandwidth": wake, "baseline": wake, "cold": stream}
    if settings.torch is not None:
        setups["torch"] = torch_wake(settings.torch)
    gate = IdleGate(args.wait_idle, wake=stream) if args.wait_idle > 0 else None
    rows, stream_samples, failures = [], [], 0
    for index, case in enumerate(chosen, 1):
        tag = f"[{index}/{len(chosen)}] {case.name}"
        row = dict(name=case.name, group=case.group, backend=args.backend, description=case.description)
        rows.append(row)
        prepared = None
        try:
            prepared = case.build(settings, args.backend)
            prepared.verify()
        except Skip as exc:
            row["skipped"] = str(exc)
            _progress(f"{tag}: skipped: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - a mismatch, or a kernel that failed to run: reported
            message = str(exc) if isinstance(exc, VerificationError) else f"{type(exc).__name__}: {exc}"
            row.update(verified=False, error=message)
            failures += 1
            _progress(f"{tag}: FAILED verification, not timed: {message}")
            del prepared
            gc.collect()
            continue
        traffic = prepared.traffic()
        row.update(verified=True, elements=prepared.elements, bytes_per_element=traffic.bytes_per_element,
                   traffic=traffic.formula, write_allocate=traffic.write_allocate, **prepared.info)
        checked = "the reference"
        if prepared.torch_check is not None:
            try:
                prepared.torch_check()
                checked += " and torch"
            except VerificationError as exc:  # torch is a comparison, not the specification
                prepared.torch, prepared.torch_reason = None, f"torch disagrees, not timed: {exc}"
        _progress(f"{tag}: matches {checked}; timing")
        calls = prepared.calls_per_sample
        contestants = {"kernel": repeated(prepared.run, calls), "bandwidth": stream}
        counts = {"kernel": repeats, "bandwidth": repeats}
        if prepared.reference is not None and args.backend != "numpy":
            contestants["reference"], counts["reference"] = repeated(prepared.reference, calls), ref_repeats
        if prepared.torch is not None:
            contestants["torch"], counts["torch"] = repeated(prepared.torch, calls), repeats
        if prepared.baseline is not None:
            contestants["baseline"], counts["baseline"] = repeated(prepared.baseline, calls), repeats
        if prepared.time_cold:
            contestants["cold"], counts["cold"] = prepared.run, repeats
        idle_before = (gate.rounds, gate.idle_rounds) if gate else None
        samples = sample_interleaved(contestants, counts, warmup=1, before_round=gate, setups=setups)
        samples = {name: [t / calls for t in values] if name not in ("bandwidth", "cold") else values
                   for name, values in samples.items()}
        if gate:
            row["idle_rounds"] = gate.idle_rounds - idle_before[1]
        seconds = median(samples["kernel"])
        bandwidth = stream.gbps(median(samples["bandwidth"]))
        stream_samples += samples["bandwidth"]
        gbps = traffic.bytes(prepared.elements) / seconds / 1e9
        q1, q3 = np.percentile(samples["kernel"], [25, 75])
        row.update(median_ms=seconds * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3, repeats=repeats, gbps=gbps,
                   bandwidth_gbps=bandwidth, pct_of_bandwidth=100.0 * gbps / bandwidth)
        if "reference" in samples:
            t = median(samples["reference"])
            row.update(reference_ms=t * 1e3, speedup_vs_numpy=t / seconds)
        if "torch" in samples:
            t = median(samples["torch"])
            row.update(torch_impl=prepared.torch_impl, torch_ms=t * 1e3, speedup_vs_torch=t / seconds)
        else:
            row["torch_skipped"] = prepared.torch_reason
        if "baseline" in samples:
            t = median(samples["baseline"])
            row.update(baseline=prepared.baseline_label, baseline_ms=t * 1e3, ratio_to_baseline=seconds / t)
            if prepared.baseline_competes:  # another library's implementation of the same step
                row["note"] = f"{prepared.baseline_label} {t * 1e3:.2f} ms: {t / seconds:.2f}×"
            else:
                row["note"] = f"{seconds / t:.2f}× the step over {prepared.baseline_label}"
        row["calls_per_sample"] = calls
        if calls > 1:
            row["note"] = (f"mean of {calls} steps back to back; " + row.get("note", "")).rstrip("; ")
        if "cold" in samples:
            t = median(samples["cold"])
            row["cold_ms"] = t * 1e3
            row["note"] = row.get("note", "") + f"; cold (a step right after the STREAM kernel): {t * 1e6:.0f} µs"
        row["samples_ms"] = {name: [t * 1e3 for t in values] for name, values in samples.items()}
        _progress(f"{tag}: {seconds * 1e3:.3f} ms, {row['pct_of_bandwidth']:.0f}% of {bandwidth:.1f} GB/s")
        del prepared, contestants
        gc.collect()

    cold = None
    if cold_start:
        _progress("cold start: compiling every CPU kernel in a new process with an empty cache")
        from . import coldstart

        try:
            cold = coldstart.measure()
        except Exception as exc:  # noqa: BLE001 - reported, the timings above still stand
            cold = dict(error=f"{type(exc).__name__}: {exc}")
    else:
        cold = dict(skipped="--quick" if args.quick and args.cold_start is None else "--no-cold-start")

    torch_version = settings.torch.__version__ if settings.torch is not None else None
    doc = dict(
        schema=report.SCHEMA,
        meta=dict(command=_command_line(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=_machine(), backend=args.backend, dtype=dtype.name, repeats=repeats,
                  reference_repeats=ref_repeats, threads=numba.get_num_threads(),
                  threading_layer=_threading_layer(numba), n=settings.n, bn_shape=list(settings.bn_shape),
                  quick=bool(args.quick), wait_idle=args.wait_idle,
                  idle_rounds=None if gate is None else f"{gate.idle_rounds} of {gate.rounds}",
                  torch=settings.torch_reason if settings.torch is None else None,
                  versions=dict(fastopt=fastopt.__version__, numpy=np.__version__, numba=numba.__version__,
                                torch=torch_version)),
        bandwidth=dict(kernel=STREAM_FORMULA, bytes_per_element=3 * dtype.itemsize, elements=stream.n,
                       median_gbps=stream.gbps(median(stream_samples)) if stream_samples else None,
                       samples=len(stream_samples)),
        rows=rows,
        cold_start=cold,
        exit_status=EXIT_MISMATCH if failures else EXIT_OK,
    )
    verified = sum(1 for r in rows if r.get("verified"))
    print(f"{verified} of {len(rows)} rows verified against the NumPy reference before timing"
          + (f"; {failures} FAILED" if failures else "")
          + (f"; {sum(1 for r in rows if r.get('skipped'))} skipped" if any(r.get("skipped") for r in rows) else ""))
    print(report.markdown(doc))
    if args.json:
        report.write_json(doc, args.json)
    if args.plot:
        report.plot(doc, args.plot)
    return doc["exit_status"]


def _command_line() -> str:
    program = os.path.basename(sys.argv[0])
    if program == "__main__.py":  # python -m fastopt.benchmark
        program = "python -m fastopt.benchmark"
    return " ".join([program] + [shlex.quote(a) for a in sys.argv[1:]])


def _threading_layer(numba) -> str:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "not yet chosen"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastopt.benchmark",
                                     description="Verify, warm up and time fastopt's CPU kernels against the "
                                                 "memory bandwidth, the NumPy reference and torch.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
