"""fastopt's benchmark harness: ``fastopt bench``, ``python -m fastopt.benchmark`` and ``bench/``.

Every row first verifies the kernel against the NumPy reference on the very inputs it then times,
warms up, and times the median of repeated calls on inputs far larger than the last-level cache,
interleaved with an in-place STREAM kernel (``a[i] += s·b[i]``) that measures the memory bandwidth
alongside, the NumPy reference, and torch's fastest implementation where torch is installed.
Reported per row: median time, the compulsory bytes per element (``traffic``), achieved GB/s, % of
the measured bandwidth, speed-up over the reference and over torch. Output: a Markdown table,
``--json``, and ``--plot`` (matplotlib). Plus the first-ever compile time of every CPU kernel.

* ``add_arguments(parser)`` / ``run(args) -> int``: the ``fastopt bench`` subcommand.
* ``all_cases()``: the rows, shared with the pytest-benchmark suites in ``bench/``.
"""

from .cases import Case, Prepared, Settings, Skip, all_cases, resnet50_shapes
from .cli import add_arguments, main, run
from .timing import Stream, sample_interleaved, stream_in_place
from .verify import VerificationError, compare

__all__ = [
    "Case",
    "Prepared",
    "Settings",
    "Skip",
    "Stream",
    "VerificationError",
    "add_arguments",
    "all_cases",
    "compare",
    "main",
    "resnet50_shapes",
    "run",
    "sample_interleaved",
    "stream_in_place",
]
