"""Task kernels: a parallel kernel's loop body compiled once, run by its parallel shell and its
serial twin through the body's address.

A parallel kernel written the plain way, ``for task in prange(n): <body>``, has its body compiled
twice: in the parallel kernel (after numba's parfor lowering, the costliest part of a compile) and
in its serial twin (``_jit``). Batch norm's eight parallel kernels cost 1.3-4.9 s each per dtype
that way, and their twins 0.6-1.6 s more.

Here the body is its own serial house kernel, ``body(lo, hi, *args)``, running tasks lo..hi-1, and
the parallel kernel is a small shell, ``shell(body_address, *args)``, that cuts the n tasks into
at most ``PARTS`` contiguous ranges and runs them in a ``prange``, calling the body through its
native entry point (``call_tasks``; the address is an argument, so the shell's compiled code
holds none and caches). The shell's serial twin runs the ranges in order on the calling thread.
Each task is computed as before, so the results are the same bits; a body runs a range of tasks,
so the call costs nothing per task.

``TaskKernel`` puts the two together under the kernel protocol the host code uses: called with
the kernel's arguments, it passes the body's address for their dtype to the shell; ``.serial``
is the same with the shell's twin.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.callconv import excinfo_t
from numba.extending import intrinsic


__all__ = ["PARTS", "TaskKernel", "call_tasks", "task_kernel"]

PARTS = 256  # task ranges per launch at most: enough for any thread count, a call per range


@intrinsic
def call_tasks(typingctx, body, lo, hi, args):
    """Call the compiled body at address ``body`` as ``body(lo, hi, *args)`` (numba's calling
    convention for a function returning nothing; ``args`` a tuple). The body is compiled with
    ``error_model="numpy"`` and raises nothing, so its status is not read."""
    signature = types.void(body, lo, hi, args)

    def codegen(context, builder, sig, llargs):
        arg_types = [sig.args[1], sig.args[2], *sig.args[3].types]
        values = [llargs[1], llargs[2], *cgutils.unpack_tuple(builder, llargs[3], len(sig.args[3].types))]
        call_conv = context.call_conv
        function_type = call_conv.get_function_type(types.none, arg_types)
        status_type = call_conv.get_return_type(types.none).pointee
        returned = cgutils.alloca_once(builder, status_type)
        builder.store(cgutils.get_null_value(status_type), returned)
        exception = cgutils.alloca_once(builder, ir.PointerType(excinfo_t))
        packed = list(call_conv._get_arg_packer(arg_types).as_arguments(builder, values))
        builder.call(builder.inttoptr(llargs[0], function_type.as_pointer()), [returned, exception, *packed])
        return context.get_dummy_value()

    return signature, codegen


class TaskKernel:
    """A body (a serial ``_jit`` kernel, ``body(lo, hi, *args)``) and its shell (a parallel
    ``_jit`` kernel, ``shell(body_address, *args)``), called as ``kernel(*args)``."""

    def __init__(self, body, shell):
        self.body = body
        self.shell = shell
        self.parallel = shell.parallel
        self.__name__ = shell.__name__
        self.__doc__ = body.__doc__
        self._at = body._at - 2  # the argument whose dtype picks the signature, among *args
        self.serial = TaskKernel(body, shell.serial) if shell.parallel else self

    def __call__(self, *args):
        return self.shell(self.body.address(args[self._at].dtype), *args)


def task_kernel(body):
    """Decorate a shell with the body it runs: a ``TaskKernel``."""
    return lambda shell: TaskKernel(body, shell)
