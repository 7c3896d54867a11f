"""Built-in models: the K-FAC paper's MNIST deep autoencoder and a small CNN classifier."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

#: Hinton & Salakhutdinov (2006) MNIST autoencoder, as in sec 13 of the K-FAC paper.
MNIST_AUTOENCODER_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def sparse_init_(module: nn.Module, nonzero: int = 15, generator: torch.Generator | None = None) -> nn.Module:
    """Martens (2010)'s sparse initialisation, used by the K-FAC paper's experiments (sec 13): every unit
    of every Linear layer gets ``nonzero`` incoming weights drawn from N(0, 1), all other weights and the
    biases are zero. Keeps deep logistic networks out of the plateau that dense random weights start in."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                out_features, in_features = layer.weight.shape
                layer.weight.zero_()
                for row in range(out_features):
                    chosen = torch.randperm(in_features, generator=generator)[: min(nonzero, in_features)]
                    layer.weight[row, chosen] = torch.randn(len(chosen), generator=generator)
                if layer.bias is not None:
                    layer.bias.zero_()
    return module


class DeepAutoencoder(nn.Sequential):
    """Logistic hidden units, a linear code layer and linear output logits (sigmoid cross-entropy loss),
    initialised sparsely as in the paper (``sparse=False`` keeps PyTorch's default initialisation)."""

    def __init__(self, sizes: tuple[int, ...] = MNIST_AUTOENCODER_SIZES, sparse: bool = True) -> None:
        code = len(sizes) // 2  # index of the code layer's width in ``sizes``
        modules: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            modules.append(nn.Linear(fan_in, fan_out))
            if i != code and i != len(sizes) - 1:
                modules.append(nn.Sigmoid())
        super().__init__(*modules)
        if sparse:
            sparse_init_(self)


class SmallCNN(nn.Sequential):
    """A small classifier for 1x28x28 images: two conv blocks and two linear layers."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(channels, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, classes),
        )


@dataclass(frozen=True)
class BuiltinModel:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    loss: str
    description: str


BUILTINS: dict[str, BuiltinModel] = {
    "mnist-autoencoder": BuiltinModel(
        DeepAutoencoder, (2, 784), "sigmoid_cross_entropy", "K-FAC paper sec 13: 784-1000-500-250-30-250-500-1000-784"
    ),
    "cnn": BuiltinModel(SmallCNN, (2, 1, 28, 28), "cross_entropy", "small CNN classifier for 28x28 images"),
}
