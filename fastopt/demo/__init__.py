"""The training demo behind ``fastopt train``: a multi-layer perceptron with batch normalization
on the scikit-learn digits, trained entirely on fastopt.

The MLP's forward and backward are NumPy (``mlp``); batch normalization (with the fused ReLU) and
the optimizer are fastopt's. ``data`` loads the digits (scikit-learn is an optional extra:
``pip install 'fastopt[demo]'``; without it loading raises ``MissingExtraError``),
``curriculum`` is the stochastic curriculum sampler, ``train`` the loop and the optimizer
comparison (matplotlib, same extra, for the plot).

    from fastopt.demo import train
    result = train(optimizer="adam", epochs=10, log=print)
    print(result.test_accuracy)
"""

from .curriculum import CurriculumSampler, confidence
from .data import Digits, MissingExtraError, load_digits
from .mlp import INITS, MLP, softmax_cross_entropy
from .train import DEFAULTS, DTYPES, OPTIMIZERS, STATE_DTYPES, TrainResult, compare, make_optimizer, plot_losses, train

__all__ = [
    "DEFAULTS",
    "DTYPES",
    "INITS",
    "MLP",
    "OPTIMIZERS",
    "STATE_DTYPES",
    "CurriculumSampler",
    "Digits",
    "MissingExtraError",
    "TrainResult",
    "compare",
    "confidence",
    "load_digits",
    "make_optimizer",
    "plot_losses",
    "softmax_cross_entropy",
    "train",
]
