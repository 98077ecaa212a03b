"""torch tensors as the arrays fastopt's backends take, with no copy.

* CPU tensors become NumPy views of the same storage (``tensor.detach().numpy()``); writing the
  view writes the tensor. They run on the ``"numba"`` backend (or ``"numpy"``, the reference).
* CUDA tensors are handed to the GPU backends as they are (detached): the backends read
  ``__cuda_array_interface__``, which torch provides. They run on ``"numba-cuda"`` (the default)
  or ``"cupy"``.

Only dense float32/float64 tensors are accepted: C-contiguous, or dense in another order of their
axes (a channels-last weight), which then runs on the permuted view that is C-contiguous; the
optimizers' updates are element-wise, so a parameter, its gradient and its state only need the same
strides. Anything else raises ``TypeError`` or ``ValueError`` naming the argument, before anything
is written.
"""

from __future__ import annotations

import torch

from .. import dispatch

__all__ = ["CPU_BACKENDS", "GPU_BACKENDS", "as_array", "backend_module", "check_tensor"]

DTYPES = (torch.float32, torch.float64)
CPU_BACKENDS = ("numba", "numpy")
GPU_BACKENDS = ("numba-cuda", "cupy")


def check_tensor(name: str, tensor, like=None) -> None:
    """A dense, C-contiguous float32/float64 tensor (on ``like``'s device, of its dtype and shape)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout is not torch.strided:
        raise TypeError(f"{name} is a {tensor.layout} tensor; fastopt.torch takes dense tensors only "
                        "(sparse gradients are not supported)")
    if tensor.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {tensor.dtype}")
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on device {tensor.device}; fastopt.torch runs on cpu and cuda tensors")
    if not tensor.is_contiguous() and not _dense_view(tensor).is_contiguous():
        raise ValueError(f"{name} must be dense (contiguous in some order of its axes), got strides "
                         f"{tensor.stride()} for shape {tuple(tensor.shape)}; call .contiguous() on it first")
    if like is not None:
        if tensor.device != like.device:
            raise ValueError(f"{name} is on {tensor.device} but its parameter is on {like.device}")
        if tensor.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but its parameter {like.dtype}")
        if tensor.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but its parameter {tuple(like.shape)}")
        if not tensor.is_contiguous() or not like.is_contiguous():
            if tensor.stride() != like.stride():
                raise ValueError(f"{name} has strides {tensor.stride()} but its parameter {like.stride()}: "
                                 "an element-wise update needs one memory layout")


def _dense_view(tensor):
    """``tensor`` with its axes ordered by decreasing stride (contiguous when the tensor is dense)."""
    order = sorted(range(tensor.dim()), key=lambda axis: -tensor.stride(axis))
    return tensor.permute(*order)


def as_array(tensor):
    """The backend array for a checked tensor: a NumPy view (CPU) or the detached tensor (CUDA); a
    dense non-contiguous tensor is first permuted to its contiguous view."""
    if not tensor.is_contiguous():
        tensor = _dense_view(tensor)
    if tensor.device.type == "cpu":
        return tensor.detach().numpy()
    return tensor.detach()


def backend_module(backend: str | None, tensor):
    """The fastopt backend module for a checked tensor: ``backend`` when named (it must work on that
    kind of tensor), else ``"numba"`` for CPU and ``"numba-cuda"`` for CUDA."""
    dispatch.check_backend_name(backend)
    device = tensor.device
    if device.type == "cpu":
        name = backend or "numba"
        if name not in CPU_BACKENDS:
            raise TypeError(f"backend {name!r} runs on CUDA tensors, but this tensor is on the cpu; "
                            f"use one of {CPU_BACKENDS}")
    else:
        name = backend or "numba-cuda"
        if name not in GPU_BACKENDS:
            raise TypeError(f"backend {name!r} runs on CPU tensors, but this tensor is on {device}; "
                            f"use one of {GPU_BACKENDS}")
    return dispatch.resolve(name, as_array(tensor))
