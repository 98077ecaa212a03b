"""The communicator: what ``comm=`` accepts, and how the ranks agree before a collective.

Two rules keep a bad input on one rank from hanging the others:

1. every check that can fail runs on every rank *before* the operation's first collective;
2. the ranks then agree on the outcome with one small ``Allreduce`` (``agree``): the flag is the
   rank's own number when its checks failed, the world size when they passed, reduced with MIN.
   All ranks pass, or all raise: a rank whose checks failed its own error, every other rank a
   ``RuntimeError`` naming the (lowest) failing rank. Nothing has been modified anywhere.

``check_same`` is the construction-time check that every rank describes the same thing (the
same parameter shapes, dtypes and order, the same hyperparameters): one ``Allgather`` of a
64-bit digest per rank; only when the digests differ are the descriptions themselves gathered
(pickled, off the hot path) to say what differs and on which rank.

mpi4py is imported here only when a communicator is actually passed in; importing fastopt never
imports it.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["agree", "check_comm", "check_same", "mpi"]


def mpi():
    """The ``mpi4py.MPI`` module (imported on first use)."""
    from mpi4py import MPI

    return MPI


def check_comm(comm):
    """``comm`` if it is an intracommunicator of mpi4py, else ``TypeError``/``ValueError``."""
    module = type(comm).__module__ or ""
    if not module.startswith("mpi4py"):
        raise TypeError(f"comm must be an mpi4py.MPI.Comm (e.g. mpi4py.MPI.COMM_WORLD) or None, got "
                        f"{type(comm).__module__}.{type(comm).__name__}")
    MPI = mpi()
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an mpi4py.MPI.Intracomm, got {type(comm).__name__}")
    if comm == MPI.COMM_NULL:
        raise ValueError("comm must not be MPI.COMM_NULL")
    return comm


class Agreement:
    """``agree`` with its one-element flag allocated once (an optimizer agrees every step)."""

    def __init__(self, comm):
        self.comm = comm
        self._flag = np.zeros(1, np.int64)

    def __call__(self, error: BaseException | None, what: str) -> None:
        """Raise on every rank when ``error`` is not None on some rank (see the module docstring)."""
        comm, flag = self.comm, self._flag
        flag[0] = comm.Get_size() if error is None else comm.Get_rank()
        comm.Allreduce(mpi().IN_PLACE, flag, op=mpi().MIN)
        failed = int(flag[0])
        if failed == comm.Get_size():
            return
        if error is not None:  # every rank whose own checks failed raises its own error
            raise error
        raise RuntimeError(f"{what} failed on rank {failed} (bad input there; see that rank's error); "
                           f"nothing was modified on rank {comm.Get_rank()}")


def agree(comm, error: BaseException | None, what: str) -> None:
    """One-off ``Agreement(comm)(error, what)``."""
    Agreement(comm)(error, what)


def _digest(description) -> int:
    text = repr(description).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


def check_same(comm, description: list[tuple[str, object]], what: str) -> None:
    """``ValueError`` on every rank unless every rank's ``description`` (a list of (name, value)
    pairs, compared through their ``repr``) equals rank 0's; the message names the first entry
    that differs and the ranks where it does."""
    digests = np.empty(comm.Get_size(), np.int64)
    comm.Allgather(np.array([_digest(description)], np.int64), digests)
    if np.all(digests == digests[0]):
        return
    everyone = comm.allgather([(name, repr(value)) for name, value in description])  # error path only
    reference = everyone[0]
    for rank, other in enumerate(everyone[1:], start=1):
        if other == reference:
            continue
        if len(other) != len(reference):
            names = [n for n, _ in other]
            ref_names = [n for n, _ in reference]
            raise ValueError(f"{what} differs between ranks: rank {rank} has {len(other)} entries "
                             f"({names}), rank 0 has {len(reference)} ({ref_names})")
        for (name, value), (_, ref_value) in zip(other, reference):
            if value != ref_value:
                raise ValueError(f"{what} differs between ranks: {name} is {value} on rank {rank} but "
                                 f"{ref_value} on rank 0; every rank must build it over the same "
                                 "parameters (shapes, dtypes, order) with the same hyperparameters")
    raise ValueError(f"{what} differs between ranks (descriptions hash differently)")
