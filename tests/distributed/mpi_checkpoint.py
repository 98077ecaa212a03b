"""Under mpiexec: checkpoints of a sharded optimizer. Arguments: MODE DIRECTORY.

train-save   resume from this rank's state dict is bit-identical at the same N; the
             consolidated state equals a single process's; save(DIRECTORY) after 10 steps
load-continue  load(DIRECTORY) (written at another N) and continue to step 20: equal to an
             uninterrupted single-process run (sharded and replicated optimizers)
crash        save at step 5, then rank 1 dies in the middle of writing the save at step 8
after-crash  DIRECTORY still loads, as the step-5 checkpoint; a directory whose only save never
             finished does not load; a copy with one flipped byte fails its checksum
The global batch has 6 samples at every N (1, 2 and 3 ranks divide it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import fastopt
import fastopt.distributed
from fastopt.distributed import checkpoint
from cases import gradients, initial_params
from rank_checks import COMM, Checks, assert_close, assert_identical_on_all_ranks, digest

MODE, DIRECTORY = sys.argv[2], Path(sys.argv[3])
N, RANK = COMM.size, COMM.rank
TOTAL = 6
MINE = slice(RANK * TOTAL // N, (RANK + 1) * TOTAL // N)
DTYPES = [np.float64] * 4
HYPER = dict(lr=0.01, clip_grad_norm=1.0, polyak=0.9, backend="numpy")


def build(params, shard=True, bucket_bytes=200):
    return fastopt.AdamW(params, **HYPER, comm=COMM, shard_state=shard, bucket_bytes=bucket_bytes)


def run(opt, params, start, stop):
    for step in range(start, stop):
        opt.step(gradients(params, step, N, MINE, total=TOTAL))


def reference(steps):
    params = initial_params(DTYPES)
    opt = fastopt.AdamW(params, **HYPER)
    for step in range(steps):
        opt.step(gradients(params, step, 1, slice(None), total=TOTAL))
    return opt, params


def resume_bit_identical():
    a_params = initial_params(DTYPES)
    a = build(a_params)
    run(a, a_params, 0, 20)
    b_params = initial_params(DTYPES)
    b = build(b_params)
    run(b, b_params, 0, 10)
    saved, saved_params = b.state_dict(), [p.copy() for p in b_params]
    assert "shard" in saved and saved["shard"]["world_size"] == N
    c = build(saved_params)
    c.load_state_dict(saved)
    run(c, saved_params, 10, 20)
    assert digest(saved_params) == digest(a_params), "resumed parameters differ from the uninterrupted run"
    assert digest(c.averaged_params()) == digest(a.averaged_params())
    full_a, full_c = (fastopt.distributed.consolidate_state_dict(o) for o in (a, c))
    if RANK == 0:
        for k in full_a["state"]:
            for name, value in full_a["state"][k].items():
                assert np.array_equal(np.asarray(value), np.asarray(full_c["state"][k][name])), (k, name)


def consolidated_equals_single_process():
    params = initial_params(DTYPES)
    opt = build(params)
    run(opt, params, 0, 10)
    full = fastopt.distributed.consolidate_state_dict(opt, root=N - 1)
    if RANK != N - 1:
        assert full is None
        return
    ref_opt, _ = reference(10)
    expected = ref_opt.state_dict()
    assert full["steps"] == expected["steps"] == 10 and "shard" not in full
    for k, entry in expected["state"].items():
        assert sorted(full["state"][k]) == sorted(entry), (k, sorted(full["state"][k]), sorted(entry))
        for name, value in entry.items():
            if isinstance(value, np.ndarray):
                assert_close(full["state"][k][name], value, value.dtype, f"state[{k}][{name!r}]")
            else:
                assert full["state"][k][name] == value


def save_after_10():
    params = initial_params(DTYPES)
    opt = build(params)
    run(opt, params, 0, 10)
    fastopt.distributed.save(DIRECTORY, opt, params)
    names = sorted(os.listdir(DIRECTORY))
    assert "manifest.json" in names and len([n for n in names if n.endswith(".npz")]) == N, names
    assert not [n for n in names if n.endswith(".tmp")], names


def load_and_continue(shard):
    params = [np.zeros_like(p) for p in initial_params(DTYPES)]
    opt = build(params, shard=shard, bucket_bytes=None)
    fastopt.distributed.load(DIRECTORY, opt, params)
    assert opt.steps == 10
    run(opt, params, 10, 20)
    assert_identical_on_all_ranks(params, "after resuming")
    ref_opt, ref_params = reference(20)
    for k, (p, r) in enumerate(zip(params, ref_params)):
        assert_close(p, r, p.dtype, f"params[{k}]")
    for k, (p, r) in enumerate(zip(opt.averaged_params(), ref_opt.averaged_params())):
        assert_close(p, r, p.dtype, f"averaged_params()[{k}]")


def crash():
    params = initial_params(DTYPES)
    opt = build(params)
    run(opt, params, 0, 5)
    fastopt.distributed.save(DIRECTORY, opt, params)
    run(opt, params, 5, 8)
    if RANK == 1:
        def die_halfway(path, data):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data[: len(data) // 2])
            os._exit(1)  # killed in the middle of writing its file

        checkpoint._write_atomically = die_halfway
    COMM.Barrier()
    fastopt.distributed.save(DIRECTORY, opt, params)


def previous_checkpoint_loads():
    params = [np.zeros_like(p) for p in initial_params(DTYPES)]
    opt = build(params)
    fastopt.distributed.load(DIRECTORY, opt, params)
    assert opt.steps == 5
    _, ref_params = reference(5)
    for k, (p, r) in enumerate(zip(params, ref_params)):
        assert_close(p, r, p.dtype, f"params[{k}]")


def unfinished_first_save_does_not_load():
    empty = DIRECTORY.parent / "never-finished"
    if RANK == 0:
        empty.mkdir(exist_ok=True)
        (empty / "rank0-x.npz").write_bytes(b"half")
    COMM.Barrier()
    params = initial_params(DTYPES)
    opt = build(params)
    before = digest(params)
    try:
        fastopt.distributed.load(empty, opt, params)
    except (FileNotFoundError, RuntimeError) as exc:
        assert "manifest.json is missing" in str(exc) or "rank 0" in str(exc), str(exc)
    else:
        raise AssertionError("an unfinished checkpoint loaded")
    assert digest(params) == before and opt.steps == 0


def corrupt_file_does_not_load():
    """A flipped byte in one rank's file fails the checksum on every rank; nothing is loaded."""
    import shutil

    corrupt = DIRECTORY.parent / "corrupt"
    if RANK == 0:
        shutil.copytree(DIRECTORY, corrupt)
        victim = sorted(corrupt.glob("rank1-*.npz"))[0]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    COMM.Barrier()
    params = initial_params(DTYPES)
    opt = build(params)
    before = digest(params)
    try:
        fastopt.distributed.load(corrupt, opt, params)
    except ValueError as exc:
        assert "corrupt" in str(exc) and "sha256" in str(exc), str(exc)
    else:
        raise AssertionError("a corrupt checkpoint loaded")
    assert digest(params) == before and opt.steps == 0


checks = Checks()
if MODE == "train-save":
    checks.run("resume from the sharded state dict is bit-identical", resume_bit_identical)
    checks.run("consolidated state equals one process's", consolidated_equals_single_process)
    checks.run("save after 10 steps", save_after_10)
elif MODE == "load-continue":
    checks.run("load and continue, sharded", load_and_continue, True)
    checks.run("load and continue, replicated", load_and_continue, False)
elif MODE == "crash":
    checks.run("crash in the middle of save", crash)
elif MODE == "after-crash":
    checks.run("the previous checkpoint still loads", previous_checkpoint_loads)
    checks.run("an unfinished first save does not load", unfinished_first_save_does_not_load)
    checks.run("a corrupt file does not load", corrupt_file_does_not_load)
