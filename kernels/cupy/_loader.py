"""Compile once per device, look kernels up, launch them.

``module(name)`` builds ``cupy.RawModule(code=_sources.source(name), options=COMPILE_OPTIONS,
name_expressions=_sources.name_expressions(name))`` the first time a kernel of that module is
needed on a device, compiles it then (NVRTC; CuPy keeps the binary in its on-disk kernel cache,
so a later process loads it instead of compiling), and keeps it. Importing the backend compiles
nothing and does not import CuPy. Kernels are looked up by the name expressions of ``_sources``
(``get_function``) and launched on the stream of the call's Place (``_device``).
"""

from __future__ import annotations

import threading

from . import _sources

__all__ = ["compiled", "grid", "kernel", "launch", "module", "resident"]

_lock = threading.Lock()
_modules: dict[tuple[int, str], object] = {}
_kernels: dict[tuple[int, str], object] = {}
_resident: dict[tuple[int, str, int], int] = {}


def compiled() -> list[tuple[int, str]]:
    """(device, module) pairs compiled so far in this process (the import test reads it)."""
    return sorted(_modules)


def module(name: str):
    """The compiled ``cupy.RawModule`` ``name`` ("optim", "reduce", "batchnorm") for the current
    device."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), name)
    found = _modules.get(key)
    if found is not None:
        return found
    with _lock:
        found = _modules.get(key)
        if found is None:
            found = cupy.RawModule(code=_sources.source(name), options=_sources.COMPILE_OPTIONS,
                                   name_expressions=_sources.name_expressions(name))
            found.compile()
            _modules[key] = found
    return found


def kernel(module_name: str, name_expression: str):
    """The kernel ``name_expression`` of ``module_name`` on the current device (a
    cupy.cuda.function.Function, launched with an explicit stream)."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), name_expression)
    found = _kernels.get(key)
    if found is None:
        found = module(module_name).get_function(name_expression).kernel
        _kernels[key] = found
    return found


def launch(module_name: str, name_expression: str, grid: int, block: int, args: tuple, stream) -> None:
    """Launch on ``stream`` (an object with the stream handle as ``ptr``, or None for CuPy's
    current stream, which ``_device.place`` has made the call's launch stream). Asynchronous: no
    host synchronization. During a CUDA graph capture the module must already be compiled (a
    warm-up step before the capture)."""
    kernel(module_name, name_expression)((max(1, int(grid)), 1, 1), (block, 1, 1), args, 0, stream)


def resident(module_name: str, name_expression: str, block: int) -> int:
    """How many blocks of ``block`` threads of this kernel the current device runs at once (SMs ×
    the occupancy calculator's blocks per SM, from the kernel's registers and shared memory): the
    grid of a grid-stride loop that fills the device in one wave, with no partial second wave."""
    import cupy

    device = cupy.cuda.runtime.getDevice()
    key = (device, name_expression, block)
    found = _resident.get(key)
    if found is None:
        runtime = cupy.cuda.runtime
        sms = runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device)
        try:
            from cupy_backends.cuda.api import driver

            per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel(module_name, name_expression).ptr,
                                                                      block, 0)
        except Exception:  # noqa: BLE001 - an older CuPy: bound by threads per SM only
            per_sm = runtime.deviceGetAttribute(runtime.cudaDevAttrMaxThreadsPerMultiProcessor, device) // block
        found = _resident[key] = sms * max(1, per_sm)
    return found


def grid(module_name: str, name_expression: str, units: int, block: int) -> int:
    """Blocks for a grid-stride loop over ``units`` work items, one per thread: enough for the
    work, at most one full wave of the device."""
    return max(1, min(-(-int(units) // block), resident(module_name, name_expression, block)))
