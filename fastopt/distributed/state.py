"""Checkpoints of a data-parallel optimizer: this rank's slice, the consolidated whole, resharding.

A *sharded* state dict (``opt.state_dict()`` with ``shard_state=True``) is the ordinary format
(``optimizer``, ``convention``, ``steps``, ``skipped_steps``, ``param_groups``, and ``state`` with
every parameter's counters ``step``/``avg_steps``) plus ``shard``: where this rank's slice sits,

    shard = {"world_size": N, "rank": r, "bucket_bytes": B,
             "pieces": [{"param": k, "start": a, "stop": b, "state": {name: array of b − a}}, ...]}

(elements [a, b) of parameter k, flat in C order; ``partition`` says why a parameter may be cut).
A piece's 8-bit state is its codes (b − a bytes) and ``name + "_absmax"``: the absmax of the
parameter's blocks ⌊a/256⌋ … ⌈b/256⌉ − 1 (an 8-bit piece starts on a block, ``partition.aligned``).
The pieces of all ranks cover every stepped parameter's state exactly once, so they can be
reassembled at any world size:

* ``consolidate_state_dict(opt, root)`` gathers every rank's pieces on ``root`` and returns the
  ordinary single-process state dict there (None elsewhere): equal to a single-process
  optimizer's after the same steps;
* ``load_state_dict`` takes an ordinary (consolidated or single-process) state dict, this rank's
  own sharded one from the same world size and bucket size, or the list of every rank's sharded
  dicts (from any world size: a 3-rank checkpoint resumes on 2 ranks and on 1).

Loading checks everything on every rank, then the ranks agree (``comm.Agreement``); a bad state
dict on any rank leaves every rank's optimizer untouched. A replicated optimizer's state dict is
the ordinary one (its state is the same on every rank).
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import precision
from .engine import work_dtype

__all__ = ["averaged_params", "consolidate_state_dict", "load_state_dict", "merge_shards", "state_dict"]


def _pieces(engine):
    for space in engine.spaces:
        for bucket in space.buckets:
            yield from bucket.pieces


def state_dict(engine, base: dict) -> dict:
    """``base`` (the ordinary state dict of the optimizer, whose state holds only counters when
    sharded) plus this rank's ``shard``."""
    if not engine.sharded:
        return base
    pieces = [{"param": p.k, "start": p.start, "stop": p.stop,
               "state": {name: np.array(a, copy=True) for name, a in p.state.items()}}
              for p in _pieces(engine)]
    return {**base, "shard": {"world_size": engine.world, "rank": engine.rank,
                              "bucket_bytes": engine.bucket_bytes, "pieces": pieces}}


def merge_shards(shards: list[dict], params: list) -> dict:
    """Every rank's sharded state dicts (any world size) -> the ordinary state dict: each piece's
    arrays copied into full arrays shaped like the parameters. ``ValueError`` unless the pieces
    of every array cover it exactly once."""
    if not shards or not all(isinstance(s, dict) and "shard" in s for s in shards):
        raise TypeError("state_dict must be a list of the sharded state dicts of every rank")
    world = shards[0]["shard"].get("world_size")
    ranks = sorted(s["shard"].get("rank") for s in shards)
    if ranks != list(range(world if isinstance(world, int) else -1)) or any(
            s["shard"].get("world_size") != world for s in shards):
        raise ValueError(f"state_dict must hold the sharded state dicts of all ranks 0..N-1 of one job, got ranks "
                         f"{ranks} of world sizes {sorted({s['shard'].get('world_size') for s in shards})}")
    merged = {key: value for key, value in shards[0].items() if key not in ("shard", "state")}
    state = {k: dict(entry) for k, entry in shards[0]["state"].items()}
    covered: dict[tuple, int] = {}
    for shard in shards:
        for piece in shard["shard"]["pieces"]:
            k, a, b = piece["param"], piece["start"], piece["stop"]
            if not (isinstance(k, numbers.Integral) and 0 <= k < len(params)):
                raise ValueError(f"a piece names param {k!r}; the optimizer has {len(params)} params")
            size = params[k].size
            if not (isinstance(a, numbers.Integral) and isinstance(b, numbers.Integral) and 0 <= a < b <= size):
                raise ValueError(f"a piece of param {k} covers [{a}, {b}), outside [0, {size})")
            entry = state.setdefault(k, {"step": 0})
            work = work_dtype(params[k].dtype)
            for name, value in piece["state"].items():
                value = np.asarray(value)
                whole, lo, hi = _span(name, a, b, size)
                if value.dtype == np.uint8 and name + precision.ABSMAX in piece["state"]:
                    dtype = value.dtype  # 8-bit codes
                elif value.dtype.name == "bfloat16" and not name.endswith(precision.ABSMAX):
                    dtype = value.dtype  # bfloat16 state
                else:
                    dtype = np.dtype(np.float32) if name.endswith(precision.ABSMAX) else work
                if value.shape != (hi - lo,) or value.dtype != dtype:
                    raise ValueError(f"piece [{a}, {b}) of state[{k}][{name!r}] must have shape ({hi - lo},) and "
                                     f"dtype {dtype}, got {value.shape} {value.dtype}")
                full = entry.get(name)
                if full is None:
                    shape = params[k].shape if whole == size else (whole,)
                    full = entry[name] = np.zeros(shape, dtype) if dtype == np.uint8 else np.full(shape, np.nan, dtype)
                if full.dtype != dtype:
                    raise ValueError(f"the pieces of state[{k}][{name!r}] have dtypes {full.dtype} and {dtype}")
                full.reshape(-1)[lo:hi] = value
                covered[(k, name)] = covered.get((k, name), 0) + (hi - lo)
    for (k, name), count in covered.items():
        whole = _span(name, 0, params[k].size, params[k].size)[0]
        if count != whole:
            raise ValueError(f"the pieces of state[{k}][{name!r}] cover {count} of its {whole} elements")
    merged["state"] = state
    return merged


def _span(name: str, a: int, b: int, size: int) -> tuple[int, int, int]:
    """(length of the whole array, lo, hi): where piece [a, b) of a parameter of ``size``
    elements sits in the whole state array ``name``; an absmax has one entry per block."""
    if not name.endswith(precision.ABSMAX):
        return size, a, b
    if a % precision.BLOCK:
        raise ValueError(f"a piece [{a}, {b}) with 8-bit state {name!r} must start on a block of "
                         f"{precision.BLOCK} elements")
    return -(-size // precision.BLOCK), a // precision.BLOCK, -(-b // precision.BLOCK)


def consolidate_state_dict(opt, root: int = 0):
    """The ordinary state dict of the whole optimizer on rank ``root``, None on the others (a
    collective). For a replicated optimizer it is ``opt.state_dict()`` on ``root``."""
    engine = opt._dist
    if engine is None:
        raise RuntimeError("consolidate_state_dict needs an optimizer built with comm=")
    if isinstance(root, bool) or not isinstance(root, numbers.Integral) or not 0 <= root < engine.world:
        raise ValueError(f"root must be a rank in [0, {engine.world}), got {root!r}")
    mine = opt.state_dict()
    if not engine.sharded:
        return mine if engine.rank == root else None
    everyone = engine.comm.gather(mine, root=root)  # off the hot path: pickled dicts
    if engine.rank != root:
        return None
    return merge_shards(everyone, opt._params())


def _full_state_dict(engine, state_dict, params):
    """Any accepted form -> (the ordinary state dict, or None for this rank's own shard)."""
    if isinstance(state_dict, (list, tuple)):
        return merge_shards(list(state_dict), params)
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict (or the list of every rank's sharded dicts), "
                        f"got {type(state_dict).__name__}")
    shard = state_dict.get("shard")
    if shard is None:
        return state_dict
    same = (engine.sharded and shard.get("world_size") == engine.world and shard.get("rank") == engine.rank
            and shard.get("bucket_bytes") == engine.bucket_bytes)
    if same:
        return None
    raise ValueError(f"state_dict is rank {shard.get('rank')}'s slice of a {shard.get('world_size')}-rank job "
                     f"(bucket_bytes={shard.get('bucket_bytes')}); this is rank {engine.rank} of {engine.world} "
                     f"(bucket_bytes={engine.bucket_bytes}, sharded={engine.sharded}): pass the list of every "
                     "rank's sharded state dicts, or a consolidated one, to reshard")


def load_state_dict(engine, state_dict, load_local) -> None:
    """Load any accepted form (module docstring) on every rank; ``load_local(sd)`` is the
    single-process loader, which checks everything and replaces the optimizer's state."""
    opt = engine.opt
    saved = (opt.param_groups, opt.state, opt.steps, opt.skipped_steps,
             getattr(opt, "_layout", None), getattr(opt, "_bucket_cache", None))
    error = None
    pieces = None
    try:
        params = opt._params()
        full = _full_state_dict(engine, state_dict, params)
        if full is None:  # this rank's own slice: the counters through the ordinary loader
            pieces = _own_pieces(engine, state_dict["shard"]["pieces"])
            counters = {k: {"step": entry.get("step")} for k, entry in state_dict["state"].items()}
            load_local({**{key: value for key, value in state_dict.items() if key != "shard"}, "state": counters})
            for k, entry in state_dict["state"].items():
                if "avg_steps" in entry:
                    opt.state[k]["avg_steps"] = _count(entry["avg_steps"], f"state[{k}]['avg_steps']")
        else:
            load_local(full)
    except Exception as exc:  # agreed on below
        error = exc
        opt.param_groups, opt.state, opt.steps, opt.skipped_steps = saved[:4]
        opt._layout, opt._bucket_cache = saved[4], saved[5]
    try:
        engine.agree(error, "load_state_dict")
    except Exception:
        opt.param_groups, opt.state, opt.steps, opt.skipped_steps = saved[:4]
        opt._layout, opt._bucket_cache = saved[4], saved[5]
        raise
    engine.reset_piece_state()
    if not engine.sharded:
        return
    for piece in _pieces(engine):
        entry = opt.state[piece.k]
        if pieces is not None:
            piece.state = pieces[(piece.k, piece.start, piece.stop)]
        else:
            size = opt._params()[piece.k].size
            piece.state = {}
            for name, value in entry.items():
                if isinstance(value, np.ndarray):
                    _, lo, hi = _span(name, piece.start, piece.stop, size)
                    piece.state[name] = np.array(value.reshape(-1)[lo:hi], copy=True)
    for entry in opt.state:  # the full arrays are not kept: only this rank's slice is
        for name in [n for n, v in entry.items() if isinstance(v, np.ndarray)]:
            del entry[name]


def _count(value, what) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"state_dict {what} must be an int >= 0, got {value!r}")
    return int(value)


def _own_pieces(engine, saved_pieces) -> dict:
    """This rank's saved pieces keyed by (param, start, stop), checked against the partition."""
    expected = {(p.k, p.start, p.stop): p for p in _pieces(engine)}
    found = {}
    for piece in saved_pieces:
        key = (piece["param"], piece["start"], piece["stop"])
        if key not in expected:
            raise ValueError(f"state_dict has a piece {key} that this rank does not own")
        mine = expected[key]
        arrays = {}
        for name, value in piece["state"].items():
            wanted = engine.piece_array(mine, name)
            if wanted is None:
                raise ValueError(f"state_dict piece {key} has an entry {name!r} this optimizer does not keep")
            shape, dtype = wanted
            if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype:
                raise ValueError(f"state_dict piece {key} entry {name!r} must be an array of shape "
                                 f"{shape} and dtype {dtype}")
            arrays[name] = np.array(value, copy=True)
        found[key] = arrays
    for key in expected:
        found.setdefault(key, {})
    return found


def averaged_params(engine) -> list:
    """The full Polyak averages on every rank (a collective when sharded): each rank's slices of
    θ̂, allgathered; a parameter not stepped yet is its own average. The averages of 16-bit
    parameters are float32, as in one process."""
    opt = engine.opt
    params = opt._params()
    out = [np.array(p, copy=True) for p in params]
    MPI = __import__("mpi4py.MPI", fromlist=["MPI"])
    for space in engine.spaces:
        flat = np.empty(space.total, space.work)
        for j, k in enumerate(space.ks):
            flat[space.offsets[j]:space.offsets[j + 1]] = params[k].reshape(-1)
        for bucket in space.buckets:
            for piece in bucket.pieces:
                if "avg" in piece.state:
                    flat[piece.flat:piece.flat + piece.stop - piece.start] = piece.state["avg"]
            region = flat[bucket.lo:bucket.hi]
            mpitype = MPI.FLOAT if space.work == np.float32 else MPI.DOUBLE
            engine.comm.Allgatherv(MPI.IN_PLACE, [region, (bucket.counts, bucket.displs), mpitype])
        for j, k in enumerate(space.ks):
            if space.work == space.dtype or opt.state[k].get("avg_steps", 0) > 0:
                out[k] = flat[space.offsets[j]:space.offsets[j + 1]].reshape(params[k].shape).copy()
    return out
