"""Checkpoints on disk: one file per rank, a checksummed manifest written last, atomic renames.

``save(path, opt, params)`` (a collective) writes into the directory ``path``:

    rank<r>-<id>.npz   this rank's sharded state dict (every rank; for a replicated optimizer rank
                       0 alone, the state being the same everywhere), and on rank 0 the parameters
    manifest.json      {"format", "id", "world_size", "sharded", "steps", "files": {name: sha256}}

``<id>`` is new for every save. Each file is written under a temporary name, flushed to disk and
renamed when complete; rank 0 writes the manifest (the same way) only after every rank reported
its file and checksum, and only then removes the previous checkpoint's files (and those of saves
that never finished). Until that rename
the old manifest names the old, complete files: a save interrupted anywhere (a rank killed, a full
disk) leaves the previous checkpoint loadable, and a directory whose first save never finished
has no manifest and does not load.

``load(path, opt, params)`` (a collective) reads the manifest, verifies every file's checksum,
and loads the state through ``opt.load_state_dict`` with the list of every rank's sharded dicts,
so a checkpoint from any world size resumes at any other (``fastopt.distributed.state``). Every
rank reads every file (each needs the slices that now fall to it). Any failure on any rank makes
every rank raise (``comm.Agreement``) before anything is modified.

Files are ``numpy.savez`` archives read with ``allow_pickle=False``; the non-array part of the
state dict travels as JSON. ``.npz`` keeps no bfloat16 dtype, so a 16-bit array (a parameter, a
bfloat16 state) is stored as its bits (uint16) and the JSON names its dtype. Hyperparameters that are not JSON (an ``lr`` schedule) are not saved:
the optimizer keeps its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from pathlib import Path

import numpy as np

from .. import precision
from .comm import Agreement

__all__ = ["load", "save"]

FORMAT = "fastopt.distributed/1"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(value):
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class _Arrays(dict):
    """The archive's arrays; a 16-bit float is put in as its bits, its dtype named in ``dtypes``."""

    def __init__(self):
        super().__init__()
        self.dtypes = {}

    def put(self, name: str, value: np.ndarray) -> None:
        if precision.is_low(value.dtype):
            self.dtypes[name] = value.dtype.name
            value = value.view(np.uint16)
        self[name] = value


def _pack(state_dict: dict, params) -> bytes:
    """A state dict (sharded or ordinary) and optionally the parameters as one .npz archive."""
    arrays = _Arrays()
    meta = {key: value for key, value in state_dict.items() if key not in ("state", "shard", "param_groups")}
    meta["param_groups"] = [{key: value for key, value in group.items() if _jsonable(value)}
                            for group in state_dict["param_groups"]]
    meta["state"] = {}
    for k, entry in state_dict["state"].items():
        meta["state"][str(k)] = {name: value for name, value in entry.items() if not isinstance(value, np.ndarray)}
        for name, value in entry.items():
            if isinstance(value, np.ndarray):
                arrays.put(f"state/{k}/{name}", value)
    if "shard" in state_dict:
        shard = state_dict["shard"]
        meta["shard"] = {key: value for key, value in shard.items() if key != "pieces"}
        meta["shard"]["pieces"] = []
        for i, piece in enumerate(shard["pieces"]):
            meta["shard"]["pieces"].append({"param": piece["param"], "start": piece["start"], "stop": piece["stop"],
                                            "names": sorted(piece["state"])})
            for name, value in piece["state"].items():
                arrays.put(f"piece/{i}/{name}", value)
    if params is not None:
        for k, p in enumerate(params):
            arrays.put(f"param/{k}", p)
    meta["array_dtypes"] = arrays.dtypes
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _unpack(path: Path) -> tuple[dict, dict]:
    """(state dict, {k: parameter array}) from one archive."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    low = meta.pop("array_dtypes", {})
    low.update({f"param/{k}": dtype for k, dtype in meta.pop("param_dtypes", {}).items()})  # earlier saves' key
    for name, dtype in low.items():
        arrays[name] = arrays[name].view(_low_dtype(dtype))
    state = {}
    for k, entry in meta["state"].items():
        state[int(k)] = dict(entry)
    for name, value in arrays.items():
        kind, *rest = name.split("/")
        if kind == "state":
            state[int(rest[0])][rest[1]] = value
    state_dict = {key: value for key, value in meta.items() if key not in ("state", "shard")}
    state_dict["state"] = state
    if "shard" in meta:
        shard = dict(meta["shard"])
        shard["pieces"] = [{"param": p["param"], "start": p["start"], "stop": p["stop"],
                            "state": {name: arrays[f"piece/{i}/{name}"] for name in p["names"]}}
                           for i, p in enumerate(meta["shard"]["pieces"])]
        state_dict["shard"] = shard
    params = {int(name.split("/")[1]): value for name, value in arrays.items() if name.startswith("param/")}
    return state_dict, params


def _low_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return precision.bfloat16_dtype()
    if name == "float16":
        return np.dtype(np.float16)
    raise ValueError(f"checkpoint names an unknown parameter dtype {name!r}")


def save(path, opt, params=None) -> None:
    """Write ``opt``'s state (and ``params``, from rank 0) to the directory ``path`` (module docstring)."""
    engine = opt._dist
    if engine is None:
        raise RuntimeError("fastopt.distributed.save needs an optimizer built with comm=")
    comm, rank = engine.comm, engine.rank
    agree = Agreement(comm)
    directory = Path(path)
    error = None
    try:
        if params is not None:
            params = list(params)
            _check_params(params, opt._params())
    except Exception as exc:
        error = exc
    agree(error, "fastopt.distributed.save (checking params)")
    save_id = comm.bcast(uuid.uuid4().hex if rank == 0 else None, root=0)
    error = None
    try:
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
    except Exception as exc:
        error = exc
    agree(error, f"fastopt.distributed.save (creating {directory})")
    error = name = digest = None
    try:
        if engine.sharded or rank == 0:
            name = f"rank{rank}-{save_id}.npz"
            _write_atomically(directory / name, _pack(opt.state_dict(), params if rank == 0 else None))
            digest = _sha256(directory / name)
    except Exception as exc:
        error = exc
    agree(error, "fastopt.distributed.save (writing the rank files)")
    files = comm.gather((name, digest), root=0)
    error = None
    try:
        if rank == 0:
            manifest = {"format": FORMAT, "id": save_id, "world_size": engine.world, "sharded": engine.sharded,
                        "steps": opt.steps, "files": {n: d for n, d in files if n is not None}}
            _write_atomically(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
            # the old checkpoint, and the debris of saves that never finished, are unreachable now
            for old in list(directory.glob("rank*-*.npz")) + list(directory.glob(".rank*-*.npz.tmp")):
                if old.name not in manifest["files"]:
                    old.unlink(missing_ok=True)
    except Exception as exc:
        error = exc
    agree(error, "fastopt.distributed.save (writing the manifest)")


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{directory} holds no complete checkpoint: {MANIFEST} is missing (a save that "
                                "never finished leaves none)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


def _check_params(given, mine) -> None:
    if len(given) != len(mine):
        raise ValueError(f"params must hold the optimizer's {len(mine)} parameters, got {len(given)}")
    for k, (a, b) in enumerate(zip(given, mine)):
        if not isinstance(a, np.ndarray) or a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"params[{k}] must be an array of shape {b.shape} and dtype {b.dtype}, got "
                             f"{getattr(a, 'shape', None)} {getattr(a, 'dtype', type(a).__name__)}")
        if not a.flags.writeable:
            raise ValueError(f"params[{k}] must be writeable: load copies the saved values into it")


def load(path, opt, params=None) -> None:
    """Verify and load the checkpoint in ``path`` into ``opt`` (and ``params``), resharding."""
    engine = opt._dist
    if engine is None:
        raise RuntimeError("fastopt.distributed.load needs an optimizer built with comm=")
    directory = Path(path)
    error = None
    saved_params = None
    state = None
    try:
        manifest = _read_manifest(directory)
        shards = []
        for name, digest in sorted(manifest["files"].items()):
            actual = _sha256(directory / name)
            if actual != digest:
                raise ValueError(f"checkpoint file {directory / name} is corrupt: sha256 {actual}, manifest {digest}")
            state_dict, file_params = _unpack(directory / name)
            if file_params:
                saved_params = file_params
            shards.append(state_dict)
        state = shards if manifest["sharded"] else shards[0]
        if params is not None:
            params = list(params)
            _check_params(params, opt._params())
            if saved_params is None or sorted(saved_params) != list(range(len(params))):
                raise ValueError(f"checkpoint {directory} holds no parameters (saved without params=)")
            for k, p in enumerate(params):
                if saved_params[k].shape != p.shape or saved_params[k].dtype != p.dtype:
                    raise ValueError(f"checkpoint param {k} has shape {saved_params[k].shape} and dtype "
                                     f"{saved_params[k].dtype}; params[{k}] has {p.shape} {p.dtype}")
    except Exception as exc:
        error = exc
    Agreement(engine.comm)(error, "fastopt.distributed.load (reading the checkpoint)")
    opt.load_state_dict(state)  # a collective with its own agreement; raises before modifying anything
    if params is not None:
        for k, p in enumerate(params):
            np.copyto(p, saved_params[k])
