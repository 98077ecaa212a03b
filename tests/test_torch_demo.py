"""The torch example (examples/torch_cnn.py, fastopt train --framework torch) learns the digits with
fastopt.torch's AdamW and fused batch norm, and the benchmark's ResNet-50 shapes are ResNet-50's."""

from __future__ import annotations

import pytest

from conftest import torch_or_skip

torch = torch_or_skip()
pytest.importorskip("sklearn", reason="the digits need scikit-learn (the demo extra)")

from fastopt import cli  # noqa: E402
from fastopt.benchmark.torch_rows import resnet50_shapes  # noqa: E402
from fastopt.torch import demo  # noqa: E402

pytestmark = pytest.mark.torch


def test_cnn_learns_the_digits_with_fastopt_parts():
    result = demo.train_cnn(epochs=2, seed=1)
    assert result.test_accuracy >= 0.9
    assert result.losses[1] < result.losses[0]


def test_framework_torch_refuses_numpy_only_options(capsys):
    assert cli.main(["train", "--framework", "torch", "--curriculum"]) == 2
    assert "--curriculum" in capsys.readouterr().err


def test_resnet50_shapes_count_its_parameters():
    sizes = [1] * len(resnet50_shapes())
    for k, shape in enumerate(resnet50_shapes()):
        for d in shape:
            sizes[k] *= d
    assert len(sizes) == 161 and sum(sizes) == 25_557_032  # torchvision.models.resnet50: 25,557,032
