"""Data-parallel training on MPI (mpi4py): what ``comm=`` on the optimizers and on batch norm runs.

* ``engine``: the optimizer's step with ``comm=``, replicated or ZeRO stage 1 (sharded state);
* ``partition``: which rank owns which elements (a pure function of sizes and world size);
* ``comm``: communicator checks and the agreement that keeps bad input from hanging a job;
* ``state``: ``state_dict``/``load_state_dict`` of a sharded optimizer, ``consolidate_state_dict``;
* ``checkpoint``: ``save``/``load`` on disk, one file per rank and a checksummed manifest;
* ``syncbn``: batch normalization with statistics over the global batch.

Importing this package does not import mpi4py; passing a communicator does. The design, the cost
model and how to start a job are in ``docs/distributed.md``.
"""

from __future__ import annotations

__all__ = ["consolidate_state_dict", "describe_mpi", "flat_arrays", "launched_comm", "load", "save"]


def flat_arrays(arrays) -> list:
    """Copies of ``arrays`` that are consecutive views of one flat buffer per dtype, in order.

    Parameters made this way let a sharded optimizer allgather the updated slices straight into
    them (otherwise a flat copy of the parameters is gathered and copied out every step)."""
    import numpy as np

    arrays = list(arrays)
    out = [None] * len(arrays)
    for dtype in {np.dtype(a.dtype) for a in arrays}:
        members = [k for k, a in enumerate(arrays) if np.dtype(a.dtype) == dtype]
        flat = np.empty(sum(arrays[k].size for k in members), dtype)
        at = 0
        for k in members:
            view = flat[at:at + arrays[k].size].reshape(arrays[k].shape)
            view[...] = arrays[k]
            out[k] = view
            at += arrays[k].size
    return out


def consolidate_state_dict(opt, root: int = 0):
    """The full optimizer state gathered on rank ``root`` (None on the other ranks); see ``state``."""
    from .state import consolidate_state_dict as run

    return run(opt, root)


def save(path, opt, params=None) -> None:
    """Write a checkpoint directory (see ``checkpoint``); a collective."""
    from .checkpoint import save as run

    run(path, opt, params)


def load(path, opt, params=None) -> None:
    """Load a checkpoint written by ``save`` at any world size (see ``checkpoint``); a collective."""
    from .checkpoint import load as run

    run(path, opt, params)


def describe_mpi() -> str:
    """One line for ``fastopt info``: mpi4py's version, the MPI library, the world size (this
    imports mpi4py, which initializes MPI: a singleton outside mpiexec)."""
    try:
        import mpi4py
        from mpi4py import MPI
    except ImportError:
        return "unavailable: mpi4py is not installed (pip install -e '.[mpi]')"
    except Exception as exc:  # an mpi4py built against an MPI library that cannot load here
        return f"unavailable: importing mpi4py.MPI failed: {exc}"
    library = " ".join(MPI.Get_library_version().split("\n", 1)[0].split())
    comm = MPI.COMM_WORLD
    return (f"mpi4py {mpi4py.__version__}, {library} (MPI {'.'.join(map(str, MPI.Get_version()))}); "
            f"world size {comm.Get_size()}, this is rank {comm.Get_rank()}")


LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")


def launched_comm():
    """``MPI.COMM_WORLD`` when an MPI launcher (mpiexec, mpirun, srun) started this process as one
    of several ranks, else None; mpi4py is imported only then. The launcher is recognized by the
    world size it puts in the environment (MPICH/Hydra and PMI: ``PMI_SIZE``; Open MPI:
    ``OMPI_COMM_WORLD_SIZE``)."""
    import os

    sizes = [os.environ.get(name, "") for name in LAUNCHER_SIZE_VARIABLES]
    if not any(size.isdigit() and int(size) > 1 for size in sizes):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None
