"""Models of the theses' experiments that the built-ins do not have, as factories for `kronograph bench`:

    PYTHONPATH=benchmarks kronograph bench thesis_models:mnist_classifier --data mnist --batch-size 60 ...
"""

from __future__ import annotations

from torch import nn


def mnist_classifier() -> nn.Module:
    """Ren's thesis, sec 5.8 (MNIST): one hidden layer of 500 logistic units, 784-500-10, softmax cross-entropy."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.Sigmoid(), nn.Linear(500, 10))
