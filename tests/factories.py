"""Factories named as package.module:factory by the CLI tests (PYTHONPATH=tests)."""

from pathlib import Path

import numpy as np
import torch
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def broken() -> nn.Module:
    raise RuntimeError("the config file is missing")


def not_a_module() -> str:
    return "model"


def tiny_classifier() -> nn.Module:
    """6 features -> 3 classes, small enough for train runs of a few steps in the CLI tests."""
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def tiny_wide_classifier() -> nn.Module:
    """Same data as tiny_classifier but other layer shapes: a checkpoint of one does not fit the other."""
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))


class _ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        return self.layer(x) if x.sum() > 0 else -self.layer(x)


def value_branch() -> nn.Module:
    """forward() branches on a tensor's value: torch.export cannot trace it (a failure with graph dumps)."""
    return _ValueBranch()


class _DictHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        hidden = self.body(x).tanh()
        return {"hidden": hidden, "logits": self.head(hidden)}


def dict_heads() -> nn.Module:
    """Returns a dict, the logits among other tensors: the loss goes on its 'logits'."""
    return _DictHeads()


def write_tiny_data(path: Path) -> Path:
    """200 examples of 6 features and 3 classes (``tiny_classifier``'s shapes; the label counts the positive
    first two features) as an .npz for the CLI tests."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    np.savez(path, x=x, y=((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)))
    return path


def curvature_with_random_factors(layers, seed: int = 5):
    """A BlockDiagonalCurvature of ``layers`` whose A and G are random SPD Grams, the same for a given seed (the
    distributed tests' ranks build the same factors without folding any statistics)."""
    from kronograph.runtime.curvature import BlockDiagonalCurvature

    curvature = BlockDiagonalCurvature(layers, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    for block in curvature.blocks.values():
        n, a, g = block.layer.groups, block.layer.a_dim, block.layer.g_dim
        x, y = torch.randn(n, 4 * a, a, generator=generator), torch.randn(n, 4 * g, g, generator=generator)
        block.a, block.g = x.transpose(1, 2) @ x / (4 * a), y.transpose(1, 2) @ y / (4 * g)
    return curvature


def teacher_problem(steps: int, batch: int, features: int = 6, classes: int = 3):
    """The distributed tests' MLP (features-16-16-classes, tanh) and ``steps`` batches of (inputs, a random
    teacher's labels, its outputs), the same on every process (seeded here)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, classes))
    model = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, classes))
    batches = []
    with torch.no_grad():
        for _ in range(steps):
            x = torch.randn(batch, features)
            outputs = teacher(x)
            batches.append((x, outputs.argmax(1), outputs))
    return model, batches


def teacher_classification(steps: int, batch: int, features: int = 6, classes: int = 3):
    """``teacher_problem``'s MLP and its batches as (inputs, labels)."""
    model, batches = teacher_problem(steps, batch, features, classes)
    return model, [(x, labels) for x, labels, _ in batches]


def conv_teacher_classification(steps: int, batch: int, classes: int = 3):
    """A small conv net (conv 1 -> 5 channels, 3 x 3; Linear 5 * 4 * 4 -> classes) and 6 x 6 images labelled by a
    random linear teacher, as (inputs, labels)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 5, 3), nn.Tanh(), nn.Flatten(), nn.Linear(80, classes))
    teacher = torch.randn(36, classes)
    images = [torch.randn(batch, 1, 6, 6) for _ in range(steps)]
    return model, [(x, (x.flatten(1) @ teacher).argmax(1)) for x in images]


def table_problem(steps: int, batch: int, classes: int = 3):
    """A 1100-row embedding table (a table of the plan: a block with a diagonal A) before a linear head."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(1100, 5), nn.Tanh(), nn.Flatten(), nn.Linear(20, classes))
    tokens = torch.randint(0, 40, (steps, batch, 4))  # rows that recur, so that the labels can be learnt
    return model, list(zip(tokens, tokens[..., 0] % classes))


class TiedTable(nn.Module):
    """An embedding table that is also the output layer's weight (runtime/tied.py)."""

    def __init__(self, rows: int = 12) -> None:
        super().__init__()
        self.emb, self.mix, self.out = nn.Embedding(rows, 5), nn.Linear(5, 5), nn.Linear(5, rows)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(tokens)))).flatten(0, 1)


def tied_problem(steps: int, batch: int):
    """``TiedTable`` and batches of one token, labelled by the next row: learnable through the tie."""
    torch.manual_seed(4)
    tokens = torch.randint(0, 12, (steps, batch, 1))
    return TiedTable(), list(zip(tokens, ((tokens + 1) % 12).flatten(1, 2)))


def layer_norm_problem(steps: int, batch: int, features: int = 6, classes: int = 3):
    """``teacher_classification``'s MLP with a layer norm after its first layer: an affine outside every block."""
    model, batches = teacher_classification(steps, batch, features, classes)
    model.insert(1, nn.LayerNorm(model[0].out_features))
    return model, batches


def normed_problem(steps: int, batch: int, features: int = 6, classes: int = 3):
    """``teacher_classification``'s MLP with weight norm (the parametrization) on its first layer."""
    from torch.nn.utils.parametrizations import weight_norm

    model, batches = teacher_classification(steps, batch, features, classes)
    model[0] = weight_norm(model[0])
    return model, batches
