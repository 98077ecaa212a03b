"""``fastopt bench --op distributed``, run under mpiexec: the data-parallel Adam step against the
communication floor of the same run and against torch.distributed (gloo) with ZeRO.

Rows (each the median over ``--repeats`` rounds; a round starts with a ``Barrier`` and its time
is the slowest rank's, so every row is a whole-job time):

* ``sharded``: ``Adam(comm=, shard_state=True)`` over n parameters (``flat_arrays``, gradients
  written into ``grad_buffers()``): reduce-scatter, update of n/N elements, allgather;
* ``replicated``: ``shard_state=False``: allreduce, update of n elements;
* ``floor rs+ag``: MPI's own blocking ``Reduce_scatter`` + in-place ``Allgatherv`` of the same
  bytes, the floor of the sharded step; ``floor bucketed``: the sharded step's own collectives
  (``Ireduce_scatter``/``Iallgatherv`` per 25 MiB bucket) without the update; ``floor allreduce``:
  in-place ``Allreduce``, the floor of the replicated step;
* ``torch gloo``: ``torch.distributed.all_reduce`` of the gradient (gloo, TCP on this machine)
  then ``ZeroRedundancyOptimizer(Adam).step()``, when torch is installed (not with --no-torch).

Before timing, one sharded and one replicated step from the same parameters and gradients (values
whose sum over the ranks is exact in any order) must agree bit for bit: a disagreeing run is
reported and not timed. The table gives the
time, the bytes each rank sends in a ring (2·(N − 1)/N·n·itemsize for both steps), the optimizer
state each rank holds, and each step's time over its floor.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np

__all__ = ["run"]


def _timed(comm, fn, repeats: int) -> float:
    """Median over ``repeats`` rounds of the slowest rank's seconds for ``fn()``."""
    from mpi4py import MPI

    times = np.empty(repeats)
    elapsed = np.zeros(1)
    for i in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        fn()
        elapsed[0] = time.perf_counter() - start
        comm.Allreduce(MPI.IN_PLACE, elapsed, op=MPI.MAX)
        times[i] = elapsed[0]
    return float(np.median(times))


def _torch_gloo(comm, n, dtype, repeats):
    """(seconds, state bytes per rank) of torch's gloo all_reduce + ZeroRedundancyOptimizer(Adam)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.Get_rank(),
                            world_size=comm.Get_size())
    try:
        param = torch.nn.Parameter(torch.zeros(n, dtype=getattr(torch, dtype.name)))
        opt = ZeroRedundancyOptimizer([param], optimizer_class=torch.optim.Adam, lr=1e-3)
        grad = torch.from_numpy(np.random.default_rng(comm.Get_rank()).standard_normal(n).astype(dtype))

        def step():
            param.grad = grad.clone() if param.grad is None else param.grad.copy_(grad)
            dist.all_reduce(param.grad)
            param.grad.div_(comm.Get_size())
            opt.step()

        step()  # warm-up: creates the state
        seconds = _timed(comm, step, repeats)
        state = sum(t.numel() * t.element_size() for s in opt.optim.state.values() for t in s.values()
                    if torch.is_tensor(t) and t.numel() > 1)
        return seconds, state
    finally:
        dist.destroy_process_group()


def run(args) -> int:
    """Run the distributed benchmark (``args`` from ``fastopt.benchmark.cli.add_arguments``)."""
    try:
        from mpi4py import MPI
    except ImportError:
        print("fastopt bench: error: --op distributed needs mpi4py (pip install -e '.[mpi]') and a run under "
              "mpiexec, e.g. mpiexec -n 2 fastopt bench --op distributed", flush=True)
        return 2
    import fastopt
    from fastopt.distributed import flat_arrays

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    n = args.n or (2**12 if args.small else 2**24)
    dtype = np.dtype(args.dtype)
    repeats = args.repeats or (5 if args.quick else 15)
    backend = None if args.backend == "numba" else args.backend
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.threads:
        import numba

        numba.set_num_threads(args.threads)

    rng = np.random.default_rng(rank)
    # multiples of 2**-8 below 2**4: their sums over the ranks are exact in any order, so the
    # sharded and the replicated step must agree bit for bit
    local_grad = (rng.integers(-2**12, 2**12, n) / 2**8).astype(dtype)
    start_params = np.random.default_rng(12345).standard_normal(n).astype(dtype)

    def build(shard):
        (param,) = flat_arrays([start_params])
        opt = fastopt.Adam([param], lr=1e-3, backend=backend, comm=comm, shard_state=shard)
        (buffer,) = opt.grad_buffers()

        def step():
            buffer[...] = local_grad  # the backward pass writing its gradient
            opt.step([buffer])
        return param, opt, step

    sharded_param, sharded, sharded_step = build(True)
    replicated_param, replicated, replicated_step = build(False)
    sharded_step()
    replicated_step()
    ok = np.array_equal(sharded_param, replicated_param)
    ok = comm.allreduce(bool(ok), op=MPI.LAND)
    library = " ".join(MPI.Get_library_version().splitlines()[0].split())
    say(f"fastopt bench --op distributed: Adam over n = {n:,} {dtype.name} parameters on {world} ranks "
        f"({library}), median of {repeats}")
    if not ok:
        say("FAILED: the sharded and the replicated step disagree; not timed")
        return 1
    say("verified: one sharded step equals one replicated step, bit for bit")

    grads = np.empty(n, dtype)
    cuts = (n * np.arange(world + 1)) // world
    counts, displs = tuple(int(c) for c in np.diff(cuts)), tuple(int(d) for d in cuts[:-1])
    recv = np.empty(counts[rank], dtype)
    params = start_params.copy()
    mpitype = MPI.FLOAT if dtype == np.float32 else MPI.DOUBLE

    def floor_rs_ag():
        grads[...] = local_grad
        comm.Reduce_scatter(grads, recv, counts, op=MPI.SUM)
        comm.Allgatherv(MPI.IN_PLACE, [params, (counts, displs), mpitype])

    from .engine import DEFAULT_BUCKET_BYTES
    from .partition import bucket_bounds, bucket_parts, rank_bounds

    buckets = []  # as the sharded step: rank r owns [⌊n·r/N⌋, ⌊n·(r+1)/N⌋), each bucket holds parts of it
    for lo, hi in bucket_bounds(n, DEFAULT_BUCKET_BYTES // dtype.itemsize):
        bucket_counts, bucket_displs = bucket_parts(lo, hi, rank_bounds(n, world))
        buckets.append((lo, hi, bucket_counts, bucket_displs, bucket_displs[rank]))
    bucket_recv = np.empty(n, dtype)

    def floor_bucketed():
        """The sharded step's own collectives (per 25 MiB bucket, non-blocking), without the update."""
        grads[...] = local_grad
        reductions = [comm.Ireduce_scatter(grads[lo:hi], bucket_recv[lo + mine:lo + mine + counts_[rank]], counts_,
                                           op=MPI.SUM) for lo, hi, counts_, _, mine in buckets]
        gathers = []
        for (lo, hi, counts_, displs_, _), request in zip(buckets, reductions):
            request.Wait()
            gathers.append(comm.Iallgatherv(MPI.IN_PLACE, [params[lo:hi], (counts_, displs_), mpitype]))
        MPI.Request.Waitall(gathers)

    def floor_allreduce():
        grads[...] = local_grad
        comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)

    rows = {}
    for name, fn in (("floor rs+ag", floor_rs_ag), ("floor bucketed", floor_bucketed), ("sharded", sharded_step),
                     ("floor allreduce", floor_allreduce), ("replicated", replicated_step)):
        fn()
        rows[name] = _timed(comm, fn, repeats)
    state = {"sharded": comm.allreduce(sharded._dist.state_bytes(), op=MPI.MAX),
             "replicated": replicated._dist.state_bytes()}
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            say("torch gloo: skipped (torch is not installed)")
        else:
            del sharded, replicated
            rows["torch gloo"], state["torch gloo"] = _torch_gloo(comm, n, dtype, repeats)
            state["torch gloo"] = comm.allreduce(state["torch gloo"], op=MPI.MAX)
    sent = 2 * (world - 1) / world * n * dtype.itemsize
    floor_of = {"sharded": "floor rs+ag", "replicated": "floor allreduce", "torch gloo": "floor allreduce"}
    say(f"\n{'row':16s} {'time ms':>9s} {'sent/rank MB':>13s} {'state/rank MB':>14s} {'vs floor':>9s} "
        f"{'vs sharded':>10s}")
    results = []
    for name, seconds in rows.items():
        floor = rows.get(floor_of.get(name, ""), None)
        row = dict(row=name, ms=1e3 * seconds, sent_per_rank_bytes=sent, state_per_rank_bytes=state.get(name),
                   over_floor=None if floor is None else seconds / floor, over_sharded=seconds / rows["sharded"])
        results.append(row)
        state_text = "" if row["state_per_rank_bytes"] is None else f"{row['state_per_rank_bytes'] / 1e6:.1f}"
        floor_text = "" if row["over_floor"] is None else f"{row['over_floor']:.2f}x"
        say(f"{name:16s} {row['ms']:9.1f} {sent / 1e6:13.1f} {state_text:>14s} {floor_text:>9s} "
            f"{row['over_sharded']:9.2f}x")
    say(f"sharded step / its own collectives without the update (floor bucketed): "
        f"{rows['sharded'] / rows['floor bucketed']:.2f}x")
    if args.json and rank == 0:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(n=n, dtype=dtype.name, world_size=world, repeats=repeats, rows=results), f, indent=1)
    return 0
