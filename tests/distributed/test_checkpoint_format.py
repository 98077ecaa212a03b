"""The checkpoint archive's 16-bit arrays (``fastopt.distributed.checkpoint``): ``.npz`` keeps no
bfloat16 dtype, so such arrays travel as bits with their dtype's name."""

from __future__ import annotations

import io
import json

import ml_dtypes
import numpy as np

from fastopt.distributed import checkpoint

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_bfloat16_state_pieces_and_parameters_come_back_with_their_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    m = rng.standard_normal(300).astype(BF16)
    piece_m = rng.standard_normal(44).astype(BF16)
    codes, absmax = rng.integers(0, 256, 512, dtype=np.uint8), rng.random(2).astype(np.float32)
    params = [rng.standard_normal((3, 4)).astype(np.float16), rng.standard_normal(5).astype(BF16)]
    state_dict = {"optimizer": "Adam", "steps": 2, "param_groups": [{"lr": 0.1, "params": [0, 1]}],
                  "state": {0: {"step": 2, "m": m}},
                  "shard": {"world_size": 2, "rank": 1, "bucket_bytes": 1024,
                            "pieces": [{"param": 1, "start": 256, "stop": 768,
                                        "state": {"m": codes, "m_absmax": absmax, "v": piece_m}}]}}
    path = tmp_path / "rank1.npz"
    path.write_bytes(checkpoint._pack(state_dict, params))
    loaded, loaded_params = checkpoint._unpack(path)
    assert loaded["state"][0]["m"].dtype == BF16
    np.testing.assert_array_equal(loaded["state"][0]["m"].view(np.uint16), m.view(np.uint16))
    got = loaded["shard"]["pieces"][0]["state"]
    assert got["v"].dtype == BF16 and got["m"].dtype == np.uint8 and got["m_absmax"].dtype == np.float32
    np.testing.assert_array_equal(got["v"].view(np.uint16), piece_m.view(np.uint16))
    np.testing.assert_array_equal(got["m"], codes)
    for k, p in enumerate(params):
        assert loaded_params[k].dtype == p.dtype
        np.testing.assert_array_equal(loaded_params[k].view(np.uint16), p.view(np.uint16))


def test_an_archive_of_the_earlier_format_names_its_parameter_dtypes(tmp_path):
    """Saves before state arrays could be bfloat16 named only the parameters' dtypes."""
    param = np.arange(6, dtype=np.float32).astype(BF16)
    meta = {"optimizer": "Adam", "steps": 1, "param_groups": [], "state": {}, "param_dtypes": {"0": "bfloat16"}}
    buffer = io.BytesIO()
    np.savez(buffer, **{"param/0": param.view(np.uint16), "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    path = tmp_path / "rank0.npz"
    path.write_bytes(buffer.getvalue())
    _, params = checkpoint._unpack(path)
    assert params[0].dtype == BF16
    np.testing.assert_array_equal(params[0].view(np.uint16), param.view(np.uint16))
