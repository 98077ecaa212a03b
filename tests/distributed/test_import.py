"""Importing fastopt (and fastopt.distributed) never imports mpi4py; only passing comm= does."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fastopt


def test_import_fastopt_does_not_import_mpi4py():
    code = ("import sys, fastopt, fastopt.distributed, fastopt.distributed.engine, fastopt.distributed.syncbn; "
            "print('mpi4py' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_distributed_options_need_comm():
    w = np.zeros(3)
    before = w.copy()
    for options in (dict(shard_state=True), dict(grad_reduce="sum"), dict(bucket_bytes=1024)):
        with pytest.raises(ValueError, match="need comm="):
            fastopt.Adam([w], **options)
    with pytest.raises(TypeError, match="comm must be an mpi4py.MPI.Comm"):
        fastopt.Adam([w], comm="world")
    with pytest.raises(RuntimeError, match="grad_buffers"):
        fastopt.Adam([w]).grad_buffers()
    np.testing.assert_array_equal(w, before)
