"""Cold start: the first-ever compile time of every CPU kernel, and what a new user waits for.

A fresh Python process with ``NUMBA_CACHE_DIR`` pointing at an empty temporary directory imports
``fastopt.kernels.numba_cpu``, finds every kernel in its modules (the objects the house decorator
``fastopt.kernels.numba_cpu._jit.kernel`` makes) and compiles all their declared signatures, timing
each module and each (kernel, dtype). A second process with the same, now filled, cache directory
measures the start a user sees from the second run on (loading from numba's on-disk cache), and a
third one what a user's program pays before its first update: ``import fastopt`` and one Adam step
(``first_step``).

``first_train`` is the README's first command as a new user runs it: ``fastopt train`` (Adam and
batch norm) in a new process with an empty cache, timed as a whole process and by its own
"compile" line, then the first uses of other configurations with the cache the first run filled:
``fastopt train --optimizer sgd --momentum 0.9`` (another optimizer) and ``fastopt train --dtype
bfloat16 --state-dtype int8`` (bfloat16 parameters with master weights and 8-bit Adam state).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

__all__ = ["first_step", "first_train", "measure"]

PACKAGE = "fastopt.kernels.numba_cpu"

_SCRIPT = r"""
import importlib, json, pkgutil, sys, time

def is_kernel(obj):
    return all(hasattr(type(obj), a) or hasattr(obj, a) for a in ("compile", "dtypes", "signatures", "py_func")) \
        and not isinstance(obj, type)

def kernels_in(obj, name, package, seen, depth=0):
    # the house kernels, also inside the package's own wrapper objects (e.g. a kernel's variants)
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if is_kernel(obj):
        yield name, obj
        return
    if depth >= 2:
        return
    if isinstance(obj, (list, tuple)):
        values = [(f"{name}[{i}]", v) for i, v in enumerate(obj)]
    elif type(obj).__module__.startswith(package) and hasattr(obj, "__dict__") and not isinstance(obj, type):
        values = [(f"{name}.{k}", v) for k, v in vars(obj).items()]
    else:
        return
    for label, value in values:
        yield from kernels_in(value, label, package, seen, depth + 1)

t0 = time.perf_counter()
import numba
t1 = time.perf_counter()
package = importlib.import_module(sys.argv[1])
t2 = time.perf_counter()
modules = {}
per_kernel = []
seen = set()
for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
    start = time.perf_counter()
    module = importlib.import_module(package.__name__ + "." + info.name)  # may compile eager kernels
    imported = time.perf_counter()
    kernels = signatures = 0
    for attr, obj in list(vars(module).items()):
        if type(obj).__module__ != module.__name__ and not is_kernel(obj):
            continue
        for name, k in kernels_in(obj, attr, package.__name__, seen):
            for dtype in k.dtypes:  # compiles (or loads from the cache) each declared signature
                t = time.perf_counter()
                k.compile(dtype)
                per_kernel.append([info.name, name, dtype, time.perf_counter() - t])
            kernels += 1
            signatures += len(k.signatures)
    done = time.perf_counter()
    if kernels or done - start > 0.05:
        modules[info.name] = dict(kernels=kernels, signatures=signatures, seconds=done - start,
                                  import_seconds=imported - start)
print(json.dumps(dict(import_numba_s=t1 - t0, import_kernels_s=t2 - t1, modules=modules,
                      compile_s=sum(m["seconds"] for m in modules.values()), per_kernel=per_kernel)))
"""


_FIRST_STEP = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
import fastopt
param = np.zeros(1000, np.float32)
fastopt.Adam([param], lr=1e-3).step([np.ones(1000, np.float32)])
t1 = time.perf_counter()
if not np.all(param < 0):
    raise SystemExit("the first Adam step did not update the parameter")
print(json.dumps(dict(seconds=t1 - t0)))
"""


def _run(cache_dir: str | None, package: str, timeout: float, path: str | None,
         script: str = _SCRIPT) -> dict:
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    if path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script, package], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the subprocess failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_step(cache_dir: str | None = None, *, timeout: float = 300.0) -> float:
    """Seconds from the start of a new process to the end of its first Adam step (1,000 float32
    parameters, backend "numba"), ``import fastopt`` included, with numba's cache at ``cache_dir``
    (None: numba's default, as a user has it)."""
    return _run(cache_dir, "", timeout, None, _FIRST_STEP)["seconds"]


# the README's first command, then the first uses of other configurations
TRAIN_COMMANDS = (("train",), ("train", "--optimizer", "sgd", "--momentum", "0.9"),
                  ("train", "--dtype", "bfloat16", "--state-dtype", "int8"))
_COMPILE_LINE = re.compile(r"^compile ([0-9.]+) s, train ([0-9.]+) s", re.M)


def first_train(commands=TRAIN_COMMANDS, *, timeout: float = 900.0) -> dict:
    """``python -m fastopt`` with each of ``commands`` in turn, each in a new process, sharing one
    numba cache that starts empty: per command its whole wall time (interpreter start to exit)
    and the compile and train seconds it prints. ``skipped`` (with the reason) when fastopt train
    cannot run here (the demo extra, scikit-learn, is missing)."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="fastopt-numba-cache-") as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        for command in commands:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "fastopt", *command], env=env, capture_output=True,
                                  text=True, timeout=timeout)
            whole = time.perf_counter() - start
            if proc.returncode == 2 and not runs:
                return dict(skipped=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "exit 2")
            if proc.returncode != 0:
                raise RuntimeError(f"fastopt {' '.join(command)} failed (exit {proc.returncode}): "
                                   f"{proc.stderr.strip()[-2000:]}")
            match = _COMPILE_LINE.search(proc.stdout)
            runs.append(dict(command="fastopt " + " ".join(command), whole_s=whole,
                             compile_s=float(match.group(1)) if match else None,
                             train_s=float(match.group(2)) if match else None))
    return dict(method="each a new process; one NUMBA_CACHE_DIR, empty before the first", runs=runs)


def measure(package: str = PACKAGE, *, timeout: float = 1800.0, path: str | None = None,
            train: bool = True) -> dict:
    """First-ever compile (empty cache) and cached start of every kernel of ``package`` (the CPU
    kernels by default), each in a new process; ``path`` is prepended to its ``PYTHONPATH``. For
    fastopt's own kernels, with ``train``, also ``first_train()``."""
    with tempfile.TemporaryDirectory(prefix="fastopt-numba-cache-") as cache_dir:
        cold = _run(cache_dir, package, timeout, path)
        warm = _run(cache_dir, package, timeout, path)
        # a user's start from the second run on: the kernels' cache is now filled
        start = first_step(cache_dir, timeout=timeout) if package == PACKAGE else None
    return dict(
        package=package,
        method="each in a new process; NUMBA_CACHE_DIR an empty temporary directory, then the same one filled",
        kernels=sum(m["kernels"] for m in cold["modules"].values()),
        signatures=sum(m["signatures"] for m in cold["modules"].values()),
        first_compile_s=cold["compile_s"],
        cached_load_s=warm["compile_s"],
        import_numba_s=cold["import_numba_s"],
        import_kernels_s=cold["import_kernels_s"],  # importing the package (kernels declared eagerly compile here)
        modules=cold["modules"],
        import_and_first_adam_step_s=start,
        per_kernel=cold["per_kernel"],  # [module, kernel, dtype, seconds] in compile order
        first_train=first_train(timeout=timeout) if train and package == PACKAGE else None,
    )
