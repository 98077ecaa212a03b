"""Batch normalization for torch tensors on fastopt's kernels: a ``torch.autograd.Function``,
drop-in ``BatchNorm1d/2d/3d`` modules, their fused-ReLU variants, and ``convert(model)``.

The equations are those of ``docs/algorithms.md`` ("Batch normalization"), which are torch's:
biased variance to normalize, unbiased in the running variance, ``momentum`` the weight of the
newest batch (``None``: the cumulative average, as in torch).

Layouts: a contiguous (N, C, ...) input runs with ``channel_axis=1``; a channels-last input
(``torch.channels_last`` / ``channels_last_3d``) runs on its permuted (N, ..., C) view with
``channel_axis=-1``, and the output keeps the input's memory format. Any other strides are made
contiguous first (a copy). CPU tensors are NumPy views (no copies); CUDA tensors go to the GPU
backends through ``__cuda_array_interface__``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import batchnorm as _bn
from .. import dispatch
from ._arrays import as_array, check_tensor

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d",
           "BatchNormReLU3d", "batch_norm", "convert"]

_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _layout(x: torch.Tensor):
    """(x in a layout fastopt takes, the permutation to a contiguous view or None, channel_axis)."""
    if x.is_contiguous():
        return x, None, 1
    fmt = _LAST_FORMATS.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return x, (0, *range(2, x.dim()), 1), -1
    return x.contiguous(), None, 1


def _view(t: torch.Tensor, perm):
    return as_array(t if perm is None else t.permute(*perm))


def _optional(t):
    return None if t is None else as_array(t)


def _span(t):
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _host_module(x, weight, bias, running_mean, running_var, training, momentum, eps, backend):
    """The backend module when a CPU call may skip ``fastopt.batchnorm``'s checks, which cost more
    than the kernels on small inputs; None sends the call through them (where anything unusual
    gets its error). Checked here: what those functions would check that the tensor checks above
    did not (channel vectors of shape (C,), the running statistics given together, one value per
    channel in training, ranges of eps and momentum, no written buffer sharing x's memory)."""
    if x.device.type != "cpu" or x.dim() < 2 or x.numel() == 0:
        return None
    channels = x.shape[1]
    vectors = (weight, bias, running_mean, running_var)
    if any(t is not None and (t.dim() != 1 or t.shape[0] != channels or not t.is_contiguous()) for t in vectors):
        return None
    if (running_mean is None) != (running_var is None) or (not training and running_mean is None):
        return None
    if (training and x.numel() == channels) or not (0 < eps < math.inf) or not 0 <= momentum <= 1:
        return None
    if training and running_mean is not None:  # written in place: must not overlap what is read
        lo, hi = _span(x)
        for t in (running_mean, running_var):
            a, b = _span(t)
            if a < hi and lo < b:
                return None
    return dispatch.resolve(backend, as_array(running_mean if running_mean is not None else x))


class BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x) on fastopt's kernels; backward is fastopt's ``batchnorm_backward``.
    Running statistics are updated in place in training, as ``torch.nn.functional.batch_norm``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, relu, backend):
        x, perm, axis = _layout(x)
        check_tensor("input", x if perm is None else x.permute(*perm))
        for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var)):
            if t is not None:
                check_tensor(name, t)
                if t.dtype != x.dtype or t.device != x.device:
                    raise TypeError(f"{name} must have the input's dtype and device ({x.dtype}, {x.device}), "
                                    f"got ({t.dtype}, {t.device})")
        channels = x.shape[1]
        y = torch.empty_like(x)
        saved_mean = x.new_empty(channels)
        saved_invstd = x.new_empty(channels)
        module = _host_module(x, weight, bias, running_mean, running_var, training, momentum, eps, backend)
        if module is not None:  # y and the saved statistics are new: nothing to check about them
            module.batchnorm_forward(_view(x, perm), _optional(weight), _optional(bias), _optional(running_mean),
                                     _optional(running_var), _view(y, perm),
                                     as_array(saved_mean), as_array(saved_invstd), training=training,
                                     momentum=momentum, eps=eps, channel_axis=axis % x.dim(), relu=relu)
        else:
            _bn.batchnorm_forward(_view(x, perm), _optional(weight), _optional(bias), _optional(running_mean),
                                  _optional(running_var), training=training, momentum=momentum, eps=eps,
                                  channel_axis=axis, relu=relu, backend=backend,
                                  out=(_view(y, perm), as_array(saved_mean), as_array(saved_invstd)))
        ctx.save_for_backward(x, weight, bias, saved_mean, saved_invstd)
        ctx.options = (perm, axis, training, relu, backend, module)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, saved_mean, saved_invstd = ctx.saved_tensors
        perm, axis, training, relu, backend, module = ctx.options
        dy = dy.contiguous(memory_format=_LAST_FORMATS[x.dim()] if perm is not None else torch.contiguous_format)
        dx = torch.empty_like(x)
        channels = x.shape[1]
        dweight = x.new_empty(channels)
        dbias = x.new_empty(channels)
        if module is not None and dy.dtype == x.dtype and dy.shape == x.shape:  # as forward chose; outputs new
            module.batchnorm_backward(_view(dy, perm), _view(x, perm), _optional(weight), _optional(bias),
                                      as_array(saved_mean), as_array(saved_invstd), _view(dx, perm),
                                      as_array(dweight), as_array(dbias), training=training,
                                      channel_axis=axis % x.dim(), relu=relu)
        else:
            _bn.batchnorm_backward(_view(dy, perm), _view(x, perm), _optional(weight), as_array(saved_mean),
                                   as_array(saved_invstd), bias=_optional(bias), training=training,
                                   channel_axis=axis, relu=relu, backend=backend,
                                   out=(_view(dx, perm), as_array(dweight), as_array(dbias)))
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (dx if need_x else None, dweight if need_w and weight is not None else None,
                dbias if need_b and bias is not None else None, None, None, None, None, None, None, None)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, relu=False, backend=None):
    """``torch.nn.functional.batch_norm`` on fastopt's kernels (``relu=True`` fuses max(y, 0))."""
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, bool(training),
                                   float(momentum), float(eps), bool(relu), backend)


class _FusedBatchNorm:
    """Mixin: ``forward`` of torch's ``_BatchNorm`` with the call to fastopt's function."""

    _relu = False

    def _init_backend(self, backend):
        from .. import dispatch

        dispatch.check_backend_name(backend)
        self.backend = backend

    def forward(self, input):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if use_running else None,
                          self.running_var if use_running else None, self.weight, self.bias, bn_training,
                          factor, self.eps, relu=self._relu, backend=self.backend)

    def extra_repr(self):
        return super().extra_repr() + (", relu=True" if self._relu else "") + (
            f", backend={self.backend!r}" if self.backend else "")


def _module(torch_class, relu, dims):
    name = f"BatchNorm{'ReLU' if relu else ''}{dims}d"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, backend=None):
        self._init_backend(backend)  # before torch's constructor: nn.Module.__setattr__ is not needed
        torch_class.__init__(self, num_features, eps=eps, momentum=momentum, affine=affine,
                             track_running_stats=track_running_stats, device=device, dtype=dtype)

    doc = (f"``torch.nn.BatchNorm{dims}d`` on fastopt's kernels"
           + (", with the ReLU fused: y = max(γx̂ + β, 0)" if relu else "")
           + ". Same constructor (plus ``backend``), parameters, buffers and state_dict as torch's.")
    return type(name, (_FusedBatchNorm, torch_class), {"__init__": __init__, "_relu": relu, "__doc__": doc,
                                                       "__module__": __name__})


BatchNorm1d = _module(nn.BatchNorm1d, False, 1)
BatchNorm2d = _module(nn.BatchNorm2d, False, 2)
BatchNorm3d = _module(nn.BatchNorm3d, False, 3)
BatchNormReLU1d = _module(nn.BatchNorm1d, True, 1)
BatchNormReLU2d = _module(nn.BatchNorm2d, True, 2)
BatchNormReLU3d = _module(nn.BatchNorm3d, True, 3)

_PLAIN = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_FUSED = {nn.BatchNorm1d: BatchNormReLU1d, nn.BatchNorm2d: BatchNormReLU2d, nn.BatchNorm3d: BatchNormReLU3d}


def _replacement(old, fused: bool, backend):
    cls = (_FUSED if fused else _PLAIN)[type(old)]
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in old.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
    new._parameters = old._parameters  # the same Parameter objects: optimizers built before keep working
    new._buffers = old._buffers
    new._modules = old._modules
    new.backend = backend
    return new


def convert(model: nn.Module, *, backend=None) -> nn.Module:
    """Swap every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` (in place, recursively) for fastopt's,
    sharing the same parameter and buffer tensors. In an ``nn.Sequential``, a batch norm directly
    followed by ``nn.ReLU`` becomes the fused ``BatchNormReLU*d`` and the ReLU an ``nn.Identity``.
    Returns ``model``."""
    from .. import dispatch

    dispatch.check_backend_name(backend)
    if type(model) in _PLAIN:
        return _replacement(model, False, backend)
    for parent in list(model.modules()):
        names = list(parent._modules)
        for k, name in enumerate(names):
            child = parent._modules[name]
            if type(child) not in _PLAIN:
                continue
            following = parent._modules[names[k + 1]] if k + 1 < len(names) else None
            fused = isinstance(parent, nn.Sequential) and type(following) is nn.ReLU
            parent._modules[name] = _replacement(child, fused, backend)
            if fused:
                parent._modules[names[k + 1]] = nn.Identity()
    return model
