"""Batch normalization: the functional forward and backward, and the ``BatchNorm`` layer.

The lecture notes' re-parametrization Ĥ = γ(H − μ)/σ + β, per channel, with the batch's
statistics in training and fixed (running) statistics at run time. The equations, forward and
backward, are in ``docs/algorithms.md``; in short, with x̂ = (x − μ)·invstd:

    forward   y = γx̂ + β,  y ← max(y, 0) with ``relu``
    backward  dβ = Σg,  dγ = Σg·x̂,  dx = γ·invstd·(g − dβ/m − x̂·dγ/m)

Sums run over every axis but ``channel_axis`` (m values per channel); g is dy, masked by the ReLU
with ``relu``. The functions check every argument before anything is written, allocate what
``out`` does not provide, pick a backend (``fastopt.dispatch``) and run its fused passes.

Design decisions
----------------
* Eval-mode forward (``training=False``) returns the statistics it used: ``saved_mean`` is a copy of
  ``running_mean`` and ``saved_invstd`` = 1/√(running_var + δ). So ``batchnorm_backward`` can run
  after either forward with the same arguments.
* ``batchnorm_backward(..., training=True)`` (the default) differentiates through the batch
  statistics. ``training=False`` treats μ and invstd as constants, which is the gradient of an
  eval-mode forward: dx = γ·invstd·g (dγ and dβ are the same sums as in training).
* ``dweight`` and ``dbias`` are always computed and returned: they are the gradients with respect to
  γ and β at the values used (γ = 1, β = 0 when ``weight``/``bias`` is None).
* With ``relu=True`` backward recomputes the mask γx̂ + β > 0 from x and the saved statistics, so
  it needs β: ``bias`` must then be passed to backward explicitly (``None`` when forward had no
  bias). Forgetting it raises instead of silently using β = 0.
* An empty batch (m = 0) in training returns an empty ``y``, leaves the running statistics alone
  (as ``torch.nn.functional.batch_norm`` does) and sets the saved statistics to NaN. m = 1 in
  training raises ``ValueError`` (one value has no variance), as torch does.
* ``running_mean`` and ``running_var`` are given together or not at all.
* 16-bit inputs (``docs/algorithms.md``, "16-bit inputs"): x (and dy) may be bfloat16 or float16
  NumPy arrays on the host backends, float16 (and, on "cupy", bfloat16) device arrays on the GPU
  backends; ``weight``, ``bias``, the running and saved statistics, ``dweight`` and ``dbias`` are
  then float32 (as in cuDNN and torch), y and dx have x's dtype, and dy must have x's dtype. The
  result is the float32 batch norm of x decoded exactly, with y and dx rounded to nearest even.
  A backend module takes them through ``batchnorm_forward_lowp``/``batchnorm_backward_lowp`` (same
  signatures as the float functions); on every backend these decode to float32 scratch, run the
  float32 kernels and encode (not fused).

Backend contract
----------------
A backend module implements::

    batchnorm_forward(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
                      training, momentum, eps, channel_axis, relu) -> None
    batchnorm_backward(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                       training, channel_axis, relu) -> None

and receives validated arguments only:

* every array is a C-contiguous NumPy array of one dtype, float32 or float64; ``x``, ``dy``, ``y``
  and ``dx`` have one shape of rank ≥ 2; the channel vectors (``weight``, ``bias``, the running and
  saved statistics, ``dweight``, ``dbias``) have shape (C,), C = x.shape[channel_axis];
* ``channel_axis`` is normalized to 0 ≤ channel_axis < x.ndim;
* ``weight`` and ``bias`` may be None (γ = 1, β = 0); ``running_mean`` and ``running_var`` are both
  None or both arrays, and both arrays when ``training`` is False; in forward's training mode they
  are updated in place when given; ``bias`` in backward is forward's β (used only with ``relu``);
* the outputs (``y``, ``saved_mean``, ``saved_invstd`` / ``dx``, ``dweight``, ``dbias``) are always
  preallocated and writeable, and no written array shares memory with any other array;
* in training m is 0 or at least 2; ``momentum`` is a float in [0, 1]; ``eps`` a finite float > 0;
  ``training`` and ``relu`` are bools.

The backend writes every element of every output (NaN saved statistics for m = 0 in training) and
returns None. Backward writes ``dweight``/``dbias`` even when ``weight``/``bias`` is None.

A host backend also implements ``batchnorm_forward_lowp`` and ``batchnorm_backward_lowp``, with
the same signatures and contract except that ``x``, ``dy``, ``y`` and ``dx`` are bfloat16 or float16
(one dtype) and every channel vector is float32.
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np

from . import dispatch
from ._checks import (
    FLOAT_DTYPES,
    check_array,
    check_bool,
    check_disjoint,
    check_like,
    check_real,
    check_same_kind,
    dtype_of,
    shape_of,
)

__all__ = ["BatchNorm", "batchnorm_backward", "batchnorm_forward"]


class _Unset:
    def __repr__(self):
        return "<unset>"


_UNSET = _Unset()  # ``bias`` not passed to batchnorm_backward


# ---------------------------------------------------------------------------------------------
# argument checks


# backend -> the kind of array its 16-bit batch norm takes (batchnorm_*_lowp)
_LOW_BACKENDS = {"numba": "host", "numpy": "host", "numba-cuda": "device", "cupy": "device"}


def _is_low(x) -> bool:
    """Whether ``x`` holds 16-bit floats (bfloat16 or float16): see "16-bit inputs" above."""
    dtype = dtype_of(x)
    return dtype.itemsize == 2 and dtype.name in ("bfloat16", "float16")


def _stat_dtype(x) -> np.dtype:
    """The dtype of the per-channel vectors for input ``x``: float32 for 16-bit x, else x's dtype."""
    return np.dtype(np.float32) if _is_low(x) else dtype_of(x)


def _check_x(name: str, x, *, low_precision: bool = False) -> np.ndarray:
    check_array(name, x, writeable=False, low_precision=low_precision)
    if len(shape_of(x)) < 2:
        raise ValueError(f"{name} must have rank >= 2 (batch and channel axes, e.g. (N, C) or (N, C, H, W)), "
                         f"got shape {shape_of(x)}")
    return x


def _check_channel_axis(channel_axis, ndim: int) -> int:
    if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(channel_axis, numbers.Integral):
        raise TypeError(f"channel_axis must be an int, got {type(channel_axis).__name__} {channel_axis!r}")
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"channel_axis must be in [{-ndim}, {ndim}) for x of rank {ndim}, got {channel_axis}")
    return int(channel_axis) % ndim


def _check_low_backend(x, backend) -> None:
    """16-bit x: NumPy arrays on the host backends, device arrays on the GPU backends (which of
    the 16-bit formats a GPU backend takes, its ``batchnorm_*_lowp`` checks: numba-cuda float16)."""
    if _is_low(x):
        name = dispatch.default_backend(x) if backend is None else backend
        host = isinstance(x, np.ndarray)
        if _LOW_BACKENDS.get(name) != ("host" if host else "device"):
            kind = "NumPy arrays" if host else "device arrays"
            raise TypeError(f"backend {name!r} does not take {dtype_of(x)} x ({kind}) for batch norm: 16-bit "
                            "batch norm runs on 'numba' and 'numpy' for NumPy arrays and on 'numba-cuda' "
                            "(float16) and 'cupy' for device arrays")


def _check_channels(name: str, array, x: np.ndarray, axis: int, *, writeable: bool) -> np.ndarray:
    """A per-channel vector: shape (C,), the kind (host or device) of x, and x's dtype (float32 for
    16-bit x)."""
    check_array(name, array, writeable=writeable)
    channels = shape_of(x)[axis]
    if shape_of(array) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), one value per channel of x "
                         f"(shape {shape_of(x)}, channel_axis={axis}), got {shape_of(array)}")
    check_same_kind(name, array, "x", x)
    if _is_low(x):
        if dtype_of(array) != np.float32:
            raise TypeError(f"{name} must have dtype float32 (the per-channel dtype for {dtype_of(x)} x), "
                            f"got {dtype_of(array)}")
    elif dtype_of(array) != dtype_of(x):
        raise TypeError(f"{name} must have the dtype of x ({dtype_of(x)}), got {dtype_of(array)}")
    return array


def _check_like_x(name: str, array, x: np.ndarray, x_name: str = "x", *, writeable: bool) -> np.ndarray:
    check_array(name, array, writeable=writeable, low_precision=_is_low(x))
    check_like(name, array, x_name, x)
    return array


def _split_out(out, names: tuple[str, str, str], x: np.ndarray, axis: int) -> tuple:
    """``out`` as three entries, each None (allocate it) or a checked, writeable array: the first
    shaped like ``x``, the other two per-channel vectors."""
    if out is None:
        return (None, None, None)
    if isinstance(out, np.ndarray) or not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError(f"out must be None or a tuple of 3 arrays (or None) for ({', '.join(names)}), "
                        f"got {type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    for i, (name, array) in enumerate(zip(names, out)):
        if array is None:
            continue
        if i == 0:
            _check_like_x(f"out[0] ({name})", array, x, writeable=True)
        else:
            _check_channels(f"out[{i}] ({name})", array, x, axis, writeable=True)
    return tuple(out)


def _values_per_channel(x: np.ndarray, axis: int) -> int:
    shape = shape_of(x)
    return math.prod(shape[:axis] + shape[axis + 1:])


# ---------------------------------------------------------------------------------------------
# functional API


def batchnorm_forward(x, weight, bias, running_mean, running_var, *, training=True, momentum=0.1,
                      eps=1e-5, channel_axis=1, relu=False, backend=None, out=None, comm=None):
    """Batch normalization forward; returns ``(y, saved_mean, saved_invstd)``.

    training:  μ, σ² = mean and biased variance of x per channel, invstd = 1/√(σ² + eps);
               running_mean ← (1 − momentum)·running_mean + momentum·μ and running_var likewise with
               the unbiased variance σ²·m/(m − 1), in place (when given).
    eval:      μ = running_mean, invstd = 1/√(running_var + eps) (both required).
    both:      y = weight·(x − μ)·invstd + bias, then max(y, 0) with ``relu``.

    ``x`` has rank ≥ 2 with channels on ``channel_axis`` (1: NCHW and the like, −1: channels-last);
    ``weight``/``bias`` (shape (C,)) may be None. ``out=(y, saved_mean, saved_invstd)`` writes into
    preallocated arrays (any entry may be None). ``saved_mean``/``saved_invstd`` are the μ and
    invstd used, for ``batchnorm_backward``. ``comm`` (an mpi4py communicator): training statistics
    over the global batch of all ranks, a collective (``fastopt.distributed.syncbn``).
    """
    if comm is not None:
        from .distributed.syncbn import batchnorm_forward as synchronized

        return synchronized(x, weight, bias, running_mean, running_var, comm=comm, training=training,
                            momentum=momentum, eps=eps, channel_axis=channel_axis, relu=relu, backend=backend, out=out)
    dispatch.check_backend_name(backend)
    _check_x("x", x, low_precision=True)
    _check_low_backend(x, backend)
    axis = _check_channel_axis(channel_axis, len(shape_of(x)))
    training = check_bool("training", training)
    relu = check_bool("relu", relu)
    momentum = check_real("momentum", momentum, low=0.0, high=1.0)
    eps = check_real("eps", eps, low=0.0, low_open=True)
    for name, array in (("weight", weight), ("bias", bias)):
        if array is not None:
            _check_channels(name, array, x, axis, writeable=False)
    if (running_mean is None) != (running_var is None):
        given, missing = ("running_mean", "running_var") if running_var is None else ("running_var", "running_mean")
        raise ValueError(f"running_mean and running_var must be given together: {given} is an array "
                         f"but {missing} is None")
    if running_mean is None and not training:
        raise ValueError("running_mean and running_var are required with training=False (eval mode "
                         "normalizes with the running statistics), got None")
    if running_mean is not None:
        _check_channels("running_mean", running_mean, x, axis, writeable=training)
        _check_channels("running_var", running_var, x, axis, writeable=training)
    y, saved_mean, saved_invstd = _split_out(out, ("y", "saved_mean", "saved_invstd"), x, axis)
    m = _values_per_channel(x, axis)
    if training and m == 1 and shape_of(x)[axis] > 0:
        raise ValueError(f"training needs more than 1 value per channel to compute a variance, got x of "
                         f"shape {shape_of(x)} (1 value per channel along channel_axis={axis})")
    running = {"running_mean": running_mean, "running_var": running_var}
    written = {"y": y, "saved_mean": saved_mean, "saved_invstd": saved_invstd}
    read = {"x": x, "weight": weight, "bias": bias}
    if training:
        written.update(running)
    else:
        read.update(running)
    check_disjoint(written, read)
    module = dispatch.resolve(backend, x)

    channels = shape_of(x)[axis]
    stat_dtype = _stat_dtype(x)
    y = module.empty_like(x) if y is None else y
    saved_mean = module.empty((channels,), stat_dtype, x) if saved_mean is None else saved_mean
    saved_invstd = module.empty((channels,), stat_dtype, x) if saved_invstd is None else saved_invstd
    run = module.batchnorm_forward_lowp if _is_low(x) else module.batchnorm_forward
    run(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd,
        training=training, momentum=momentum, eps=eps, channel_axis=axis, relu=relu)
    return y, saved_mean, saved_invstd


def batchnorm_backward(dy, x, weight, saved_mean, saved_invstd, *, bias=_UNSET, training=True, channel_axis=1,
                       relu=False, backend=None, out=None, comm=None):
    """Batch normalization backward; returns ``(dx, dweight, dbias)``.

    With x̂ = (x − saved_mean)·saved_invstd and g = dy (masked by weight·x̂ + bias > 0 with ``relu``):
    dbias = Σg, dweight = Σg·x̂, and dx = weight·invstd·(g − Σg/m − x̂·Σg·x̂/m) when ``training``
    (the forward used batch statistics), dx = weight·invstd·g when not (statistics constant).

    ``saved_mean``/``saved_invstd`` come from ``batchnorm_forward``. ``bias`` is needed only with
    ``relu=True``, and then must be passed (None if forward had none). ``dweight``/``dbias`` are
    returned even when ``weight`` is None. ``out=(dx, dweight, dbias)`` writes into preallocated
    arrays (any entry may be None). ``comm``: through the global statistics of a synchronized
    forward (``fastopt.distributed.syncbn``; dweight/dbias are then this rank's sums), a collective.
    """
    if comm is not None:
        from .distributed.syncbn import batchnorm_backward as synchronized

        return synchronized(dy, x, weight, saved_mean, saved_invstd, comm=comm, bias=bias, training=training,
                            channel_axis=channel_axis, relu=relu, backend=backend, out=out)
    dispatch.check_backend_name(backend)
    _check_x("x", x, low_precision=True)
    _check_low_backend(x, backend)
    axis = _check_channel_axis(channel_axis, len(shape_of(x)))
    _check_like_x("dy", dy, x, writeable=False)
    training = check_bool("training", training)
    relu = check_bool("relu", relu)
    if weight is not None:
        _check_channels("weight", weight, x, axis, writeable=False)
    if bias is _UNSET:
        if relu:
            raise TypeError("bias must be passed with relu=True: the ReLU mask is recomputed from "
                            "weight·x̂ + bias (pass bias=None if the forward had no bias)")
        bias = None
    elif bias is not None:
        _check_channels("bias", bias, x, axis, writeable=False)
    _check_channels("saved_mean", saved_mean, x, axis, writeable=False)
    _check_channels("saved_invstd", saved_invstd, x, axis, writeable=False)
    dx, dweight, dbias = _split_out(out, ("dx", "dweight", "dbias"), x, axis)
    check_disjoint({"dx": dx, "dweight": dweight, "dbias": dbias},
                   {"dy": dy, "x": x, "weight": weight, "bias": bias, "saved_mean": saved_mean,
                    "saved_invstd": saved_invstd})
    module = dispatch.resolve(backend, x)

    channels = shape_of(x)[axis]
    stat_dtype = _stat_dtype(x)
    dx = module.empty_like(x) if dx is None else dx
    dweight = module.empty((channels,), stat_dtype, x) if dweight is None else dweight
    dbias = module.empty((channels,), stat_dtype, x) if dbias is None else dbias
    run = module.batchnorm_backward_lowp if _is_low(x) else module.batchnorm_backward
    run(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, training=training, channel_axis=axis,
        relu=relu)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# layer


def _references(holder, name: str) -> int:
    """References to ``holder.name`` as ``sys.getrefcount`` counts them from here."""
    return sys.getrefcount(getattr(holder, name))


class _Probe:
    held = None


def _unshared_references() -> int:
    """What ``_references`` returns for an object only an attribute holds (measured, since the
    count of temporary references differs between Python versions); −1 where the interpreter
    cannot count references, so that nothing is ever reused there."""
    if not hasattr(sys, "getrefcount"):
        return -1
    probe = _Probe()
    probe.held = np.empty(0)
    return _references(probe, "held")


_UNSHARED = _unshared_references()


class BatchNorm:
    """A batch-normalization layer over ``num_features`` channels, with explicit forward/backward.

    ``weight`` (γ, ones) and ``bias`` (β, zeros) exist when ``affine``; they and ``grad_weight``/
    ``grad_bias`` are allocated once and only ever updated in place (``load_state_dict`` included),
    so they can be handed to a fastopt optimizer once: ``opt = Adam([bn.weight, bn.bias])`` and
    ``opt.step([bn.grad_weight, bn.grad_bias])`` after each ``backward``. ``running_mean`` (zeros)
    and ``running_var`` (ones) are updated in place by every training-mode forward, as in
    ``torch.nn.BatchNorm*d`` (``momentum=None``, torch's cumulative average, is not supported).

    ``forward(x)`` keeps a reference to ``x`` (not a copy) and the statistics it used;
    ``backward(dy)`` differentiates the latest forward (through the batch statistics after a
    training-mode forward, with constant statistics after an eval-mode one), returns dx and writes
    ``grad_weight``/``grad_bias``. It uses the current ``weight`` and ``bias``, so call it before the
    optimizer step. Both take ``out=`` for a preallocated result.

    Results without ``out=``: a caller may keep every result it is given, as long as it likes. A
    result the program no longer references (no variable, container, view or saved input holds
    it) is written again by the next call of the same shape instead of allocating fresh memory,
    which on large inputs spares the first-touch page faults of new memory (1.3× to 8× slower
    calls measured). The layer tells from the result's reference count, so reuse is never
    visible; code that keeps only a raw address (``ctypes``, ``__array_interface__``) must copy.
    For NumPy arrays of the layer's dtype and channel count, ``forward`` and ``backward`` check
    ``x``/``dy`` alone: the layer's own arrays were checked when it made them.

    16-bit input: a float32 layer takes bfloat16 or float16 ``x`` (and ``dy`` of x's dtype) where its
    backend does (``batchnorm_forward``, "16-bit inputs") and returns y and dx in that dtype; such
    calls take the full checks of the functions and allocate their results.

    The layer's arrays are NumPy arrays, unless ``backend`` names a GPU backend: ``"numba-cuda"``
    allocates numba device arrays and ``"cupy"`` CuPy arrays, on the current CUDA device, and the
    layer then takes device arrays. ``state_dict`` returns NumPy copies either way.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, channel_axis=1, relu=False,
                 dtype=np.float32, backend=None, comm=None):
        if isinstance(num_features, (bool, np.bool_)) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__} {num_features!r}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(channel_axis, numbers.Integral):
            raise TypeError(f"channel_axis must be an int, got {type(channel_axis).__name__} {channel_axis!r}")
        try:
            dtype = np.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        dispatch.check_backend_name(backend)
        self.num_features = int(num_features)
        self.eps = check_real("eps", eps, low=0.0, low_open=True)
        self.momentum = check_real("momentum", momentum, low=0.0, high=1.0)
        self.affine = check_bool("affine", affine)
        self.channel_axis = int(channel_axis)
        self.relu = check_bool("relu", relu)
        self.dtype = dtype
        self.backend = backend
        self.comm = comm  # an mpi4py communicator: synchronized batch norm (fastopt.distributed.syncbn)
        if comm is not None:
            from .distributed.syncbn import check_layer

            check_layer(comm, backend)
        self.training = True
        self._device = dispatch.allocating_module(backend)  # None: the arrays are NumPy arrays
        place = (lambda host: host) if self._device is None else self._device.from_numpy
        c = self.num_features
        self.weight = place(np.ones(c, dtype)) if self.affine else None
        self.bias = place(np.zeros(c, dtype)) if self.affine else None
        self.grad_weight = place(np.zeros(c, dtype)) if self.affine else None
        self.grad_bias = place(np.zeros(c, dtype)) if self.affine else None
        self.running_mean = place(np.zeros(c, dtype))
        self.running_var = place(np.ones(c, dtype))
        self.num_batches_tracked = 0
        self._saved_mean = place(np.empty(c, dtype))
        self._saved_invstd = place(np.empty(c, dtype))
        # backward writes dγ and dβ somewhere even without affine parameters
        self._grad_scratch = None if self.affine else (place(np.empty(c, dtype)), place(np.empty(c, dtype)))
        self._forward_input = None  # (x, training) of the latest forward
        # the host fast path (forward/backward without out=): the backend module once resolved,
        # the byte spans of the arrays the layer writes, and its previous results for reuse
        self._module = None
        owned = [self.running_mean, self.running_var, self._saved_mean, self._saved_invstd,
                 *((self.grad_weight, self.grad_bias) if self.affine else self._grad_scratch)]
        self._owned_spans = [] if self._device is not None else [
            (a.__array_interface__["data"][0], a.__array_interface__["data"][0] + a.nbytes) for a in owned]
        self._y = None
        self._dx = None

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"channel_axis={self.channel_axis}, relu={self.relu}, dtype={self.dtype.name}, "
                f"backend={self.backend!r})")

    def train(self, mode: bool = True) -> "BatchNorm":
        """Training mode (batch statistics, running statistics updated); returns self."""
        self.training = check_bool("mode", mode)
        return self

    def eval(self) -> "BatchNorm":
        """Eval mode (running statistics used, not updated); returns self."""
        return self.train(False)

    def _check_input(self, name: str, array) -> None:
        if isinstance(array, np.ndarray) and array.dtype != self.dtype and array.dtype in FLOAT_DTYPES:
            raise TypeError(f"{name} must have the layer's dtype {self.dtype}, got {array.dtype}")
        if isinstance(array, np.ndarray) and _is_low(array) and self.dtype != np.float32:
            raise TypeError(f"{name} of dtype {array.dtype} needs a layer of dtype float32 (the parameters and "
                            f"statistics of 16-bit batch norm are float32), this layer's dtype is {self.dtype}")
        if isinstance(array, np.ndarray) and array.ndim >= 2:
            axis = self.channel_axis
            if -array.ndim <= axis < array.ndim and array.shape[axis] != self.num_features:
                raise ValueError(f"{name} must have {self.num_features} channels along channel_axis={axis}, "
                                 f"got shape {array.shape}")

    def _host_module(self, x):
        """The backend module for the host fast path, or None when ``x`` must take the full
        checks of ``batchnorm_forward``/``batchnorm_backward`` (not a C-contiguous NumPy array of
        the layer's dtype and channel count, or an edge case those functions raise or handle)."""
        if (self._device is not None or self.comm is not None or type(x) is not np.ndarray
                or x.dtype != self.dtype or not x.flags.c_contiguous or x.ndim < 2 or x.size == 0):
            return None
        axis = self.channel_axis
        if not -x.ndim <= axis < x.ndim or x.shape[axis] != self.num_features or x.size == self.num_features:
            return None
        module = self._module
        if module is None:
            module = self._module = dispatch.resolve(self.backend, x)
        return module

    def _shares_owned_memory(self, array) -> bool:
        """Whether ``array`` overlaps any array this layer writes (its statistics and gradients)."""
        start = array.__array_interface__["data"][0]
        end = start + array.nbytes
        return any(start < hi and lo < end for lo, hi in self._owned_spans)

    def _reusable(self, name: str, like):
        """The layer's previous result ``name`` when no one else references it any more and it has
        ``like``'s shape, else a new array: the caller can never see its result change."""
        previous = getattr(self, name)
        # any reference beyond the attribute's (the caller's variable, a view's base, the layer's
        # saved input) means the caller may still read it; ``previous`` itself is one more
        if previous is not None and previous.shape == like.shape and _references(self, name) <= _UNSHARED + 1:
            return previous
        fresh = np.empty_like(like)
        setattr(self, name, fresh)
        return fresh

    def forward(self, x, out=None):
        """y = weight·(x − μ)·invstd + bias (ReLU'd with ``relu``), batch or running statistics.

        Without ``out``, y is a new array or, once the caller holds no reference to the layer's
        previous result any more, that result's memory again (see the class docstring)."""
        module = self._host_module(x) if out is None else None
        if module is not None and not self._shares_owned_memory(x):
            y = self._reusable("_y", x)
            if y is x:  # x is the previous result itself, held only by the caller's argument
                y = self._y = np.empty_like(x)
            module.batchnorm_forward(x, self.weight, self.bias, self.running_mean, self.running_var, y,
                                     self._saved_mean, self._saved_invstd, training=self.training,
                                     momentum=self.momentum, eps=self.eps,
                                     channel_axis=self.channel_axis % x.ndim, relu=self.relu)
            if self.training:
                self.num_batches_tracked += 1
            self._forward_input = (x, self.training)
            return y
        if self.comm is None:  # with comm every check runs before the ranks agree (syncbn)
            self._check_input("x", x)
        y, _, _ = batchnorm_forward(
            x, self.weight, self.bias, self.running_mean, self.running_var, training=self.training,
            momentum=self.momentum, eps=self.eps, channel_axis=self.channel_axis, relu=self.relu,
            backend=self.backend, out=(out, self._saved_mean, self._saved_invstd), comm=self.comm)
        if self.training:
            self.num_batches_tracked += 1
        self._forward_input = (x, self.training)
        return y

    __call__ = forward

    def backward(self, dy, out=None):
        """dx for the latest forward; writes ``grad_weight`` and ``grad_bias`` in place."""
        if self._forward_input is None:
            raise RuntimeError("backward needs a forward first: the layer has not seen an input")
        x, training = self._forward_input
        grads = (self.grad_weight, self.grad_bias) if self.affine else self._grad_scratch
        module = self._host_module(dy) if out is None else None
        if (module is not None and dy.shape == x.shape and type(x) is np.ndarray and x.dtype == dy.dtype
                and not self._shares_owned_memory(dy)):
            dx = self._reusable("_dx", dy)
            if dx is dy or dx is x:
                dx = self._dx = np.empty_like(dy)
            module.batchnorm_backward(dy, x, self.weight, self.bias, self._saved_mean, self._saved_invstd, dx,
                                      *grads, training=training, channel_axis=self.channel_axis % x.ndim,
                                      relu=self.relu)
            return dx
        if self.comm is None:
            self._check_input("dy", dy)
        dx, _, _ = batchnorm_backward(
            dy, x, self.weight, self._saved_mean, self._saved_invstd, bias=self.bias, training=training,
            channel_axis=self.channel_axis, relu=self.relu, backend=self.backend, out=(out, *grads), comm=self.comm)
        return dx

    def state_dict(self) -> dict:
        """NumPy copies of the layer's state, under torch's names (``weight``/``bias`` only when
        affine); on a GPU backend this waits for the device."""
        copy = (lambda array: array.copy()) if self._device is None else self._device.to_numpy
        state = {}
        if self.affine:
            state["weight"] = copy(self.weight)
            state["bias"] = copy(self.bias)
        state["running_mean"] = copy(self.running_mean)
        state["running_var"] = copy(self.running_var)
        state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state) -> None:
        """Copy ``state`` into the layer's arrays in place (they stay the same objects).

        Keys as ``state_dict`` writes them (``num_batches_tracked`` optional); values are array-likes
        of shape (num_features,), cast to the layer's dtype. Everything is checked before anything
        is copied: a bad ``state`` leaves the layer unchanged.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        targets = {"running_mean": self.running_mean, "running_var": self.running_var}
        if self.affine:
            targets = {"weight": self.weight, "bias": self.bias, **targets}
        missing = [k for k in targets if k not in state]
        unexpected = [k for k in state if k not in targets and k != "num_batches_tracked"]
        if missing or unexpected:
            raise ValueError(f"state must have exactly the keys {sorted(targets)} (and optionally "
                             f"'num_batches_tracked'); missing {missing}, unexpected {unexpected}")
        values = {}
        for key in targets:
            value = np.asarray(state[key])
            if value.dtype.kind not in "fiu":
                raise TypeError(f"state[{key!r}] must hold real numbers, got dtype {value.dtype}")
            if value.shape != (self.num_features,):
                raise ValueError(f"state[{key!r}] must have shape ({self.num_features},), got {value.shape}")
            values[key] = value
        tracked = self.num_batches_tracked
        if "num_batches_tracked" in state:
            count = np.asarray(state["num_batches_tracked"])
            if count.shape != () or count.dtype.kind not in "iu" or int(count) < 0:
                raise ValueError(f"state['num_batches_tracked'] must be a non-negative integer, got {state['num_batches_tracked']!r}")
            tracked = int(count)
        for key, value in values.items():
            if self._device is None:
                np.copyto(targets[key], value, casting="unsafe")
            else:
                self._device.copy_from_numpy(targets[key], value.astype(self.dtype))
        self.num_batches_tracked = tracked
