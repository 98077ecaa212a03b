"""The stream rule of both GPU backends (``docs/backends.md``, "Streams"), as pure functions.

``__cuda_array_interface__`` version 3: an array that names a stream must be used on that stream,
or after the consumer's stream has waited on it; no ``stream`` entry (version 2) or ``None`` needs
nothing; 1 is the legacy default stream, 2 the calling thread's per-thread default stream; 0 is
forbidden and read here as no stream. torch: work on a tensor goes to torch's current stream of its
device (torch tensors export version 2, without a stream). ``kernels/numba_cuda/_arrays.py`` and
``kernels/cupy/_device.py`` gather what a call's arrays advertise and act on the plan; the choice
itself is here, once, so the two backends cannot drift apart.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["LEGACY_STREAM", "PER_THREAD_STREAM", "StreamPlan", "advertised_stream", "device_arrays",
           "stream_plan"]

LEGACY_STREAM = 1  # the v3 handle of the legacy default stream
PER_THREAD_STREAM = 2  # the v3 handle of the calling thread's per-thread default stream


class StreamPlan(NamedTuple):
    """Where a call's kernels go: ``launch`` None (no array names a stream: the backend's default,
    numba's default stream or CuPy's current stream) or a stream handle (1 legacy, 2 per-thread,
    else that stream); ``waits`` the other streams the arrays name, which ``launch`` must wait on
    first (distinct, in argument order)."""

    launch: int | None
    waits: tuple[int, ...]


def advertised_stream(interface: dict) -> int | None:
    """The stream a ``__cuda_array_interface__`` names: None when it names none (version 2, or
    ``"stream": None``). A 0, which version 3 forbids as ambiguous, is read as none too: numba-cuda
    before fastopt's fix exported it for arrays on the default stream."""
    stream = interface.get("stream")
    return int(stream) if stream else None


def stream_plan(array_kind: str, advertised, torch_stream: int | None = None) -> StreamPlan:
    """The stream plan of one call, from the kind of its arrays and the streams they advertise.

    ``array_kind`` "torch": the tensors name no stream; the work goes to torch's current stream of
    their device, whose handle ``torch_stream`` is (``torch.cuda.current_stream(device).cuda_stream``;
    0, torch's default stream, is the legacy default stream), and waits on nothing: torch orders
    its own work on that stream. Any other kind: ``advertised`` holds each array's stream (None or
    0: none); the first named stream is launched on and every other one is waited on; none named:
    the backend's default.
    """
    if array_kind == "torch":
        if torch_stream is None:
            raise ValueError("torch_stream is required for torch tensors")
        return StreamPlan(int(torch_stream) or LEGACY_STREAM, ())
    named = [int(s) for s in advertised if s]
    if not named:
        return StreamPlan(None, ())
    launch = named[0]
    return StreamPlan(launch, tuple(dict.fromkeys(s for s in named if s != launch)))


def device_arrays(arrays) -> list:
    """The arrays of a call, without None entries and host numbers (a host ``grad_mul``)."""
    return [a for a in arrays if a is not None and not isinstance(a, (int, float, np.number))]
