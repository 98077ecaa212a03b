"""The data-parallel step of an optimizer built with ``comm=``: replicated or ZeRO stage 1.

Every rank holds the same parameters and passes its own gradients (of its share of the batch).
Per dtype the parameters form one flat index space (``partition``), and so does the gradient
buffer the optimizer hands out (``grad_buffers()``: one flat array per dtype, one view per
parameter). Collectives run per bucket, non-blocking, on that memory:

sharded (``shard_state=True``): rank r owns one contiguous 1/N of each dtype's space,
[⌊T·r/N⌋, ⌊T·(r+1)/N⌋), whatever the bucket size; a bucket covers parts of one or several
ranks' ranges (``partition``), and per bucket j:
    1. ``Ireduce_scatter`` with per-rank counts: rank r receives Σ_ranks g over its part of the
       bucket (possibly empty), into the matching place of its receive buffer of T/N elements;
    2. the fused update of the part's pieces, with gradient multiplier
           grad_mul = (1/N for ``grad_reduce="mean"``) · (1/grad_scale) · clip factor
       where the clip factor min(1, c/(‖g‖ + 1e-6)) uses the global norm ‖g‖² = Allreduce(Σ over
       this rank's range of g²), and ``nonfinite`` acts on that same allreduced sum (so every
       rank skips or raises together); Polyak averaging runs on the part;
    3. ``Iallgatherv`` (in place, the same counts) of the updated parts into the bucket.
    Optimizer state exists only for this rank's range: T/N elements per state array.
replicated (``shard_state=False``), per bucket j:
    1. ``Iallreduce`` in place on the gradient bucket; 2. every rank updates the whole bucket
    with the same grad_mul. State is replicated, in the ordinary per-parameter layout.

Without clipping or a non-finite policy the update of bucket j starts as soon as its own
reduction has completed, while later buckets are still in flight; with them, the global norm
needs every bucket first, and the overlap is between updates and the allgathers.

Parameters: when the parameters of a dtype are consecutive views of one buffer
(``fastopt.distributed.flat_arrays`` makes such parameters) the allgather writes into them
directly. Otherwise it goes through a flat copy: this rank's range is copied in (T/N elements)
and the gathered parameters are copied out (T elements) — one extra read and write of the
parameters per step. Gradients given as separate arrays (not the views of ``grad_buffers()``) are
packed into the buffer first: one copy of T elements.

Every rank's parameters are bit-identical after each step: each element is computed by exactly
one rank (sharded) or from the same reduced bytes by every rank (replicated).

8-bit or bfloat16 state (``state_dtype``), sharded: as above, each piece's state being 8-bit codes
with one float32 absmax per block of 256 (or bfloat16 values) of the piece, stepped by the
backend's ``state8_step``. With 8-bit state the rank cuts and bucket bounds are moved down to block
boundaries of the parameters they fall in (``partition.aligned``), so every piece starts on a
block of its parameter: its blocks are the parameter's, and the ranks quantize exactly what one
process would. Replicated: the reductions run as above; once all have completed, every rank runs
the single-process step on the whole reduced buffer, with grad_scale·N for the mean, so the state
keeps the single-process layout (and state dict) and no update overlaps a reduction.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np

from .. import dispatch, precision
from .._checks import check_real, dtype_of
from ..functional import SPECS, with_host_options
from . import partition
from .comm import Agreement, check_comm, check_same, mpi

__all__ = ["DataParallel", "DEFAULT_BUCKET_BYTES", "GRAD_REDUCES", "attach"]

DEFAULT_BUCKET_BYTES = 25 * 2**20  # as torch's DistributedDataParallel
GRAD_REDUCES = ("mean", "sum")
CPU_BACKENDS = (None, "numpy", "numba")


def _root_buffer(array: np.ndarray) -> np.ndarray:
    base = array
    while isinstance(base.base, np.ndarray):
        base = base.base
    return base


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


class _Bucket:
    """One bucket [lo, hi) of a dtype's space: every rank's part of it (MPI's counts and
    displacements, ``partition.bucket_parts``), this rank's part [my_lo, my_hi) (possibly empty;
    the whole bucket when replicated), its pieces, and where the part sits in the receive buffer."""

    def __init__(self, lo, hi, counts, displs, my_lo, my_hi, pieces, recv_at):
        self.lo, self.hi = lo, hi
        self.counts, self.displs = counts, displs
        self.my_lo, self.my_hi = my_lo, my_hi
        self.pieces = pieces  # list of _Piece
        self.recv_at = recv_at  # where this rank's part sits in the space's receive buffer


class _Piece:
    """A parameter's part that this rank updates: views of parameter, reduced gradient, state."""

    __slots__ = ("k", "group", "start", "stop", "flat", "param", "grad", "state")

    def __init__(self, k, group, start, stop, flat, param, grad):
        self.k, self.group, self.start, self.stop, self.flat = k, group, start, stop, flat
        self.param, self.grad = param, grad
        self.state = {}  # name -> array of this piece's size (a view of the full array when replicated)


def work_dtype(dtype) -> np.dtype:
    """The dtype of the gradients, reductions and state of parameters of ``dtype``: float32 for
    bfloat16 and float16 parameters (``fastopt.precision``), else ``dtype`` itself."""
    return np.dtype(np.float32) if precision.is_low(dtype) else np.dtype(dtype)


class _Space:
    """The parameters of one dtype as a flat index space, with the buffers collectives run on.

    16-bit parameters (bfloat16, float16): the gradient buffer, the reductions and the state are
    float32 (``work``); only the allgather of the updated parameters moves 16-bit values."""

    def __init__(self, dtype, ks, params, world, rank, bucket_elems, sharded, group_of, block=None):
        self.dtype = dtype
        self.work = work_dtype(dtype)
        self.ks = ks  # optimizer-wide parameter indices, in order
        self.offsets = partition.offsets_of([params[k].size for k in ks])
        self.total = int(self.offsets[-1])
        self.grad = np.zeros(self.total, self.work)  # the buffer handed out, one view per parameter
        self.views = [self.grad[self.offsets[j]:self.offsets[j + 1]].reshape(params[k].shape)
                      for j, k in enumerate(ks)]
        self.flat_params = self._flat_view([params[k] for k in ks])
        self.staging = None
        if sharded and self.flat_params is None:
            self.staging = np.empty(self.total, dtype)
        flat_param_views = [params[k].reshape(-1) for k in ks]
        cuts = partition.rank_bounds(self.total, world)
        bounds = partition.bucket_bounds(self.total, bucket_elems)
        if block is not None:  # 8-bit state: no piece may cut a quantization block
            cuts = partition.aligned(cuts, self.offsets, block)
            bounds = partition.aligned_buckets(bounds, self.offsets, block)
        # this rank's range of the space: one contiguous 1/N sharded, everything replicated
        self.range = (int(cuts[rank]), int(cuts[rank + 1])) if sharded else (0, self.total)
        range_lo, range_hi = self.range
        self.owned = range_hi - range_lo  # elements this rank updates (T/N sharded, T replicated)
        self.recv = np.zeros(self.owned, self.work) if sharded else None  # Ireduce_scatter's output
        self.buckets = []
        for lo, hi in bounds:
            counts, displs = partition.bucket_parts(lo, hi, cuts)
            my_lo = min(max(range_lo, lo), hi)
            my_hi = max(min(range_hi, hi), my_lo)
            at = my_lo - range_lo
            pieces = []
            for p in partition.pieces_in(self.offsets, my_lo, my_hi):
                k = ks[p.param]
                if sharded:
                    grad = self.recv[p.flat - range_lo:p.flat - range_lo + p.size]
                else:
                    grad = self.grad[p.flat:p.flat + p.size]
                pieces.append(_Piece(k, group_of[k], p.start, p.stop, p.flat,
                                     flat_param_views[p.param][p.start:p.stop], grad))
            self.buckets.append(_Bucket(lo, hi, counts, displs, my_lo, my_hi, pieces, at))

    def _flat_view(self, params):
        """The parameters as one flat array when they are consecutive views of one buffer, else None."""
        if not params:
            return None
        root = _root_buffer(params[0])
        if not (root.flags.c_contiguous and root.dtype == self.dtype and root.flags.writeable):
            return None
        start = _address(params[0]) - _address(root)
        if start % self.dtype.itemsize:
            return None
        start //= self.dtype.itemsize
        if start + self.total > root.size:
            return None
        for j, p in enumerate(params):
            expected = _address(root) + (start + int(self.offsets[j])) * self.dtype.itemsize
            if _root_buffer(p) is not root or _address(p) != expected:
                return None
        return root.reshape(-1)[start:start + self.total]


def _mpi_type(dtype):
    """The MPI datatype that moves ``dtype``'s values: 16-bit floats as their bits (they are only
    gathered, never reduced)."""
    MPI = mpi()
    if precision.is_low(dtype):
        return MPI.UINT16_T
    return MPI.FLOAT if dtype == np.float32 else MPI.DOUBLE


def _check_group(opt, i, group, k):
    """(hyper, host options or None): works before and after the optimizer grew host options."""
    result = opt._check_group(i, group, k)
    if isinstance(result, tuple):
        return result
    return result, None


class DataParallel:
    """The distributed side of one optimizer (``opt._dist``); see the module docstring."""

    def __init__(self, opt, comm, shard_state, grad_reduce, bucket_bytes):
        self.opt = opt
        self.comm = comm
        self.world = comm.Get_size()
        self.rank = comm.Get_rank()
        self.sharded = shard_state
        self.grad_reduce = grad_reduce
        self.bucket_bytes = bucket_bytes
        self.agree = Agreement(comm)
        self._sumsq = np.zeros(1, np.float64)
        self._bad = np.zeros(1, np.int64)
        params = opt._params()
        self.params = list(params)
        group_of = {}
        k = 0
        for i, group in enumerate(opt.param_groups):
            for _ in group["params"]:
                group_of[k] = i
                k += 1
        self.group_of = group_of
        self.spaces = []
        block = precision.BLOCK if shard_state and opt.precision.state_dtype == "int8" else None
        dtypes = [np.dtype(np.float32), np.dtype(np.float64)]
        dtypes += [d for d in dict.fromkeys(dtype_of(p) for p in params) if d not in dtypes]
        for dtype in dtypes:
            ks = [k for k, p in enumerate(params) if dtype_of(p) == dtype]
            if ks:  # a bucket's reduction moves bucket_bytes (16-bit parameters: float32 gradients)
                elems = max(1, bucket_bytes // work_dtype(dtype).itemsize)
                self.spaces.append(_Space(dtype, ks, params, self.world, self.rank, elems, shard_state, group_of,
                                          block))
        self.views = [None] * len(params)
        for space in self.spaces:
            for k, view in zip(space.ks, space.views):
                self.views[k] = view

    # -- the step ------------------------------------------------------------------------------

    def _check_step(self, grads, grad_scale, groups):
        """Everything ``step`` checks before its first collective; returns (plan, inv_scale, packed)."""
        opt = self.opt
        params = opt._params()
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            raise ValueError("the param groups no longer hold the parameters this optimizer was built over; "
                             "build a new optimizer (on every rank) to change the parameters")
        if isinstance(grads, np.ndarray) or not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list of arrays, one per param, got {type(grads).__name__}")
        if len(grads) != len(params):
            raise ValueError(f"grads must have one array per param ({len(params)}, in group order), got {len(grads)}")
        selected = opt._selected(groups)
        inv_scale = 1.0
        if grad_scale is not None:
            inv_scale = 1.0 / check_real("grad_scale", grad_scale, low=0.0, low_open=True)
            if not math.isfinite(inv_scale) or inv_scale == 0.0:
                raise ValueError(f"grad_scale must have a finite nonzero reciprocal, got {grad_scale!r}")
        if self.grad_reduce == "mean":
            inv_scale /= self.world
        plan = {}
        for i in selected:
            plan[i] = _check_group(opt, i, opt.param_groups[i], opt.steps)
            opt._check_compact(i, plan[i][0])
        packed = True
        for k, (param, grad) in enumerate(zip(params, grads)):
            if self.group_of[k] not in plan:
                continue
            if grad is self.views[k]:
                continue
            packed = False
            precision.check_grad(f"grads[{k}]", grad, f"params[{k}]", param)
            if not isinstance(grad, np.ndarray):
                raise TypeError(f"grads[{k}] must be a numpy.ndarray with comm=, got {type(grad).__name__}")
        return plan, inv_scale, packed

    def step(self, grads, grad_scale=None, groups=None) -> None:
        error = None
        try:
            plan, inv_scale, packed = self._check_step(grads, grad_scale, groups)
        except Exception as exc:  # agreed on below: every rank raises, none waits
            error = exc
        self.agree(error, "step")
        opt = self.opt
        if not packed:
            for k, grad in enumerate(grads):
                if self.group_of[k] in plan and grad is not self.views[k]:
                    np.copyto(self.views[k], grad)
        module = dispatch.resolve(opt.backend, opt._params()[0])
        requests = self._start_reductions()
        if opt.precision.state_dtype != "float32" and not self.sharded:  # every rank steps the whole
            # parameters once every reduction is done, as one process would on the reduced gradients
            mpi().Request.Waitall([r for rs in requests for r in rs])
            scale = (1.0 if grad_scale is None else grad_scale) * (self.world if self.grad_reduce == "mean" else 1)
            opt._step_local(self.views, grad_scale=scale, groups=groups)
            return
        global_decision = opt.clip_grad_norm is not None or opt.nonfinite != "propagate"
        multipliers = {space.dtype: inv_scale for space in self.spaces}
        if global_decision:
            mpi().Request.Waitall([r for rs in requests for r in rs])
            sumsq = self._global_sumsq(module, plan)
            if opt.nonfinite != "propagate" and not math.isfinite(sumsq):
                if opt.nonfinite == "skip":
                    opt.skipped_steps += 1
                    return
                bad = self._first_nonfinite(module, plan)
                raise FloatingPointError(f"grads[{bad}] (summed over the ranks) contains NaN or Inf "
                                         "(nonfinite='raise'); nothing was updated on any rank")
            if opt.clip_grad_norm is not None:
                multipliers = {space.dtype: module.grad_multiplier(sumsq, opt.clip_grad_norm, inv_scale, space.work)
                               for space in self.spaces}
        grad_clip = math.inf if opt.clip_grad_value is None else opt.clip_grad_value
        gathers = []
        for space, reqs in zip(self.spaces, requests):
            for bucket, req in zip(space.buckets, reqs):
                if not global_decision:
                    req.Wait()
                self._update_bucket(module, space, bucket, plan, multipliers[space.dtype], grad_clip)
                if self.sharded:
                    gathers.append(self._start_gather(space, bucket))
        mpi().Request.Waitall(gathers)
        if self.sharded:
            self._copy_out()
        for k, state in enumerate(opt.state):
            if self.group_of[k] in plan:
                state["step"] += 1
                if opt.polyak is not None:
                    state["avg_steps"] = state.get("avg_steps", 0) + 1
        opt.steps += 1

    def _start_reductions(self) -> list[list]:
        comm, MPI = self.comm, mpi()
        out = []
        for space in self.spaces:
            reqs = []
            for bucket in space.buckets:
                send = space.grad[bucket.lo:bucket.hi]
                if self.sharded:
                    recv = space.recv[bucket.recv_at:bucket.recv_at + bucket.my_hi - bucket.my_lo]
                    reqs.append(comm.Ireduce_scatter(send, recv, bucket.counts, op=MPI.SUM))
                else:
                    reqs.append(comm.Iallreduce(MPI.IN_PLACE, send, op=MPI.SUM))
            out.append(reqs)
        return out

    def _start_gather(self, space, bucket):
        MPI = mpi()
        target = space.flat_params if space.flat_params is not None else space.staging
        if space.flat_params is None:  # this rank's new values into the staging copy
            for piece in bucket.pieces:
                np.copyto(target[piece.flat:piece.flat + piece.stop - piece.start], piece.param)
        region = target[bucket.lo:bucket.hi]
        return self.comm.Iallgatherv(MPI.IN_PLACE, [region, (bucket.counts, bucket.displs), _mpi_type(space.dtype)])

    def _copy_out(self) -> None:
        params = self.opt._params()
        for space in self.spaces:
            if space.flat_params is not None:
                continue
            for j, k in enumerate(space.ks):
                np.copyto(params[k].reshape(-1), space.staging[space.offsets[j]:space.offsets[j + 1]])

    def _stepped_pieces(self, plan):
        for space in self.spaces:
            for bucket in space.buckets:
                for piece in bucket.pieces:
                    if piece.group in plan:
                        yield piece

    def _global_sumsq(self, module, plan) -> float:
        grads = [piece.grad for piece in self._stepped_pieces(plan)]
        self._sumsq[0] = module.grad_sumsq(grads) if grads else 0.0
        if self.sharded:
            self.comm.Allreduce(mpi().IN_PLACE, self._sumsq, op=mpi().SUM)
        return float(self._sumsq[0])

    def _first_nonfinite(self, module, plan) -> int:
        """The lowest parameter index whose reduced gradient is non-finite, agreed by all ranks."""
        bad = min((piece.k for piece in self._stepped_pieces(plan)
                   if not math.isfinite(module.grad_sumsq([piece.grad]))), default=len(self.views))
        self._bad[0] = bad
        if self.sharded:
            self.comm.Allreduce(mpi().IN_PLACE, self._bad, op=mpi().MIN)
        return int(self._bad[0])

    def _state_for(self, piece, name, group, module=None, signed=None):
        """The piece's state array ``name``, created on first use: at the optimizer's initial
        value, or for ``"master"`` the float32 copy of the parameter. Float32 for 16-bit
        parameters (``work_dtype``). A state in ``signed`` (sharded 8-bit or bfloat16 state: the
        name's map is signed or not) is created compact by ``module``: bfloat16, or 8-bit codes
        with ``name + "_absmax"`` beside them, and returned as the backend takes it (a pair
        (codes, absmax) for 8-bit)."""
        array = piece.state.get(name)
        if array is not None:
            absmax = piece.state.get(name + precision.ABSMAX)
            return array if absmax is None else (array, absmax)
        opt = self.opt
        work = work_dtype(piece.param.dtype)
        if self.sharded:
            value = 0.0 if name == "avg" else opt._initial_value(name, group)
            if name == "master":
                array = piece.param.astype(work)
            elif signed is not None and name in signed and opt.precision.state_dtype == "bfloat16":
                array = precision.bfloat16_state(module, piece.param, value)
            elif signed is not None and name in signed:
                array, absmax = precision.quantized_state(module, piece.param, value, signed[name])
                piece.state[name], piece.state[name + precision.ABSMAX] = array, absmax
                return array, absmax
            else:
                array = np.full(piece.stop - piece.start, value, work)
        else:
            state = opt.state[piece.k]
            if name not in state:
                param = opt._params()[piece.k]
                if name == "master":
                    state[name] = param.astype(work)
                else:
                    state[name] = np.full(param.shape, 0.0 if name == "avg" else opt._initial_value(name, group),
                                          work)
            array = state[name].reshape(-1)[piece.start:piece.stop]
        piece.state[name] = array
        return array

    def piece_array(self, piece, name):
        """(shape, dtype) of the piece's state array ``name`` (as the step creates it), or None
        when the optimizer keeps no such array."""
        opt = self.opt
        spec = SPECS[opt._spec]
        work = work_dtype(piece.param.dtype)
        size = piece.stop - piece.start
        if name == "avg" and opt.polyak is not None or name == "master" and opt.precision.master(piece.param.dtype):
            return (size,), work
        base = name[:-len(precision.ABSMAX)] if name.endswith(precision.ABSMAX) else name
        if base not in spec.state:
            return None
        signed = {}
        if opt.precision.compact(opt._params()[piece.k]):
            hyper = _check_group(opt, piece.group, opt.param_groups[piece.group], opt.steps)[0]
            signed = self._signed(dispatch.resolve(opt.backend, piece.param), spec, hyper)
        eight_bit = base in signed and opt.precision.state_dtype == "int8"
        if base != name:
            return ((-(-size // precision.BLOCK),), np.dtype(np.float32)) if eight_bit else None
        if eight_bit:
            return (size,), np.dtype(np.uint8)
        return (size,), precision.bfloat16_dtype() if base in signed else work

    def _signed(self, module, spec, hyper) -> dict:
        """{state name: whether its 8-bit map is signed} of the states a compact piece keeps compact."""
        layout = module.state8_layout(spec.kernel, **(dict(hyper, step=1) if spec.step_count else hyper))
        return {spec.state[slot]: sign for slot, sign in layout}

    def _update_bucket(self, module, space, bucket, plan, grad_mul, grad_clip) -> None:
        """The fused update of this rank's pieces of one bucket, batched by (group, step count,
        compact state or not)."""
        opt = self.opt
        spec = SPECS[opt._spec]
        runs: dict[tuple, list] = {}
        params = opt._params()
        for piece in bucket.pieces:
            if piece.group not in plan:
                continue
            state = opt.state[piece.k]
            compact = self.sharded and opt.precision.compact(params[piece.k])
            runs.setdefault((piece.group, state["step"], state.get("avg_steps", 0), compact), []).append(piece)
        for (i, step, avg_steps, compact), pieces in runs.items():
            hyper, host = plan[i]
            group = opt.param_groups[i]
            used = spec.uses(hyper)
            signed = self._signed(module, spec, hyper) if compact else None
            states = [tuple(self._state_for(p, name, group, module, signed) if name in used else p.state.get(name)
                            for name in spec.state) for p in pieces]
            avgs = None
            keywords = dict(hyper)
            if spec.step_count:
                keywords["step"] = step + 1
            keywords["grad_mul"] = grad_mul
            keywords["grad_clip"] = grad_clip
            if opt.polyak is not None:
                avgs = [self._state_for(p, "avg", group) for p in pieces]
                keywords["avg_weight"] = opt._avg_weight(avg_steps + 1)
            keywords = with_host_options(module, host, keywords, step + 1)
            params, grads = [p.param for p in pieces], [p.grad for p in pieces]
            low = precision.is_low(space.dtype)
            extra = {}
            if low:  # float32 gradients and state (or compact state), 16-bit θ
                masters = ([self._state_for(p, "master", group) for p in pieces]
                           if opt.precision.master(space.dtype) else None)
                # starts: a piece's elements draw the stochastic-rounding stream of their places in
                # the whole parameter, so the ranks round as one process would
                extra = dict(masters=masters, rounding=opt.precision.rounding, seed=opt.precision.seed,
                             counter=step + 1, indices=[p.k for p in pieces], starts=[p.start for p in pieces])
            if compact:
                if opt.precision.state_dtype != "int8":
                    extra["state_dtype"] = opt.precision.state_dtype
                module.state8_step(spec.kernel, params, grads, states, avgs, block=precision.BLOCK, **extra,
                                   **keywords)
            elif low:
                precision.mixed_module(module, opt.backend).mixed_step(
                    spec.kernel, params, grads, extra.pop("masters"), states, avgs, **extra, **keywords)
            else:
                module.multi_step(spec.kernel, params, grads, states, avgs, **keywords)

    # -- what the optimizer exposes ------------------------------------------------------------

    def grad_buffers(self) -> list:
        """One view per parameter (in group order) of the flat gradient buffer of its dtype."""
        return list(self.views)

    def state_bytes(self) -> int:
        """Bytes of optimizer state arrays this rank holds."""
        if self.sharded:
            return sum(a.nbytes for piece in self._all_pieces() for a in piece.state.values())
        return sum(v.nbytes for s in self.opt.state for v in s.values() if isinstance(v, np.ndarray))

    def _all_pieces(self):
        for space in self.spaces:
            for bucket in space.buckets:
                yield from bucket.pieces

    def state_dict(self, base: dict) -> dict:
        from .state import state_dict

        return state_dict(self, base)

    def load_state_dict(self, state_dict, load_local) -> None:
        from .state import load_state_dict

        load_state_dict(self, state_dict, load_local)

    def averaged_params(self) -> list:
        from .state import averaged_params

        return averaged_params(self)

    def reset_piece_state(self) -> None:
        """Forget cached state views (after the replicated state was replaced by load_state_dict)."""
        for piece in self._all_pieces():
            piece.state = {}


def _describe(opt, shard_state, grad_reduce, bucket_bytes) -> list:
    """What must be equal on every rank: hyperparameters, options, parameter shapes and dtypes."""
    out = [("optimizer", type(opt).__name__), ("convention", opt.convention), ("backend", opt.backend),
           ("clip_grad_norm", opt.clip_grad_norm), ("clip_grad_value", opt.clip_grad_value),
           ("nonfinite", opt.nonfinite), ("polyak", opt.polyak), ("master_weights", opt.precision.master_weights),
           ("rounding", opt.precision.rounding), ("seed", opt.precision.seed),
           ("state_dtype", opt.precision.state_dtype), ("min_8bit_size", opt.precision.min_8bit_size),
           ("shard_state", shard_state),
           ("grad_reduce", grad_reduce), ("bucket_bytes", bucket_bytes),
           ("param groups", len(opt.param_groups))]
    k = 0
    for i, group in enumerate(opt.param_groups):
        for key in sorted(k for k in group if k != "params"):
            value = group[key]
            if callable(value):
                value = f"<schedule {getattr(value, '__qualname__', type(value).__name__)}>"
            out.append((f"param group {i} {key}", value))
        out.append((f"param group {i} size", len(group["params"])))
        for p in group["params"]:
            out.append((f"params[{k}]", (tuple(p.shape), str(p.dtype))))
            k += 1
    return out


def _check_options(comm, shard_state, grad_reduce, bucket_bytes):
    check_comm(comm)
    if shard_state is None:
        shard_state = comm.Get_size() > 1
    elif not isinstance(shard_state, (bool, np.bool_)):
        raise TypeError(f"shard_state must be a bool or None, got {type(shard_state).__name__}")
    if grad_reduce not in GRAD_REDUCES:
        raise ValueError(f"grad_reduce must be one of {GRAD_REDUCES}, got {grad_reduce!r}")
    if bucket_bytes is None:
        bucket_bytes = DEFAULT_BUCKET_BYTES
    elif isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, numbers.Integral) or bucket_bytes < 8:
        raise ValueError(f"bucket_bytes must be an int >= 8 or None, got {bucket_bytes!r}")
    return bool(shard_state), grad_reduce, int(bucket_bytes)


def attach(opt, init_local, comm, shard_state, grad_reduce, bucket_bytes, backend) -> None:
    """Build ``opt`` on every rank of ``comm``: ``init_local()`` (the single-process constructor)
    and the option checks run on every rank, the ranks agree on the outcome, then check that they
    all describe the same optimizer, then the distributed step is attached as ``opt._dist``."""
    check_comm(comm)  # a bad communicator cannot be agreed over: it raises at once
    error = None
    try:
        options = _check_options(comm, shard_state, grad_reduce, bucket_bytes)
        device = TypeError("device arrays are not yet supported for comm=: MPI runs on host (NumPy) arrays, "
                           f"with backend None, 'numpy' or 'numba' (got backend={backend!r})")
        if backend not in CPU_BACKENDS:
            raise device
        init_local()
        if not all(isinstance(p, np.ndarray) for p in opt._params()):
            raise device
    except Exception as exc:  # every local failure is agreed on, so no rank waits in a collective
        error = exc
    Agreement(comm)(error, f"building {type(opt).__name__}")
    check_same(comm, _describe(opt, *options), f"{type(opt).__name__}")
    opt._dist = DataParallel(opt, comm, *options)
