"""A table's block (an embedding wider than 1024 rows, A kept as its diagonal) has its gamma scaled towards the
model's typical damping relative to its own scale (``relative_table_damping``, runtime/curvature.py
``table_damping_scales``).

Independent reference: the damped inverses written out densely with numpy from the blocks' factors: each block's
scale sqrt(tr A / dim A x tr G / dim G), the geometric mean of the non-table blocks' scales, the table's gamma
times the square root of their ratio, then (diag(a) + pi gamma I)^-1 and (G + gamma / pi I)^-1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph
from kronograph.runtime.methods.kfac_settings import PRESETS

ROWS, WIDTH, CLASSES, WORDS = 1100, 6, 5, 4
GAMMA = 0.05


class Words(nn.Module):
    """The mean of four word vectors of a 1100-word table, a tanh layer, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(ROWS, WIDTH)
        self.body = nn.Sequential(nn.Linear(WIDTH, 8), nn.Tanh(), nn.Linear(8, CLASSES))

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        return self.body(F.embedding(words, self.embed.weight).mean(1))


def _kfac(**options) -> kronograph.optim.KFAC:
    torch.manual_seed(0)
    cm = kronograph.compile(Words(), torch.randint(0, ROWS, (2, WORDS)), loss="cross_entropy")
    opt = kronograph.optim.KFAC(cm, seed=0, factor_dtype=torch.float64, factor_damping_floor=0.0, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        labels = torch.randint(0, CLASSES, (64,), generator=generator)
        words = (labels.unsqueeze(-1) * 8 + torch.randint(0, 8, (64, WORDS), generator=generator)) * 7 % ROWS
        opt.step(words, labels)
    return opt


def _mean_eigenvalue(factor: np.ndarray) -> float:
    return float((factor.sum() if factor.ndim == 1 else np.trace(factor)) / factor.shape[-1])


def _expected_table_inverses(opt: kronograph.optim.KFAC, scaled: bool) -> tuple[np.ndarray, np.ndarray]:
    factors = {name: (block.a[0].numpy(), block.g[0].numpy()) for name, block in opt.blocks.items()}
    scale = {name: math.sqrt(_mean_eigenvalue(a) * _mean_eigenvalue(g)) for name, (a, g) in factors.items()}
    typical = math.exp(np.mean([math.log(scale[name]) for name in ("body.0", "body.2")]))
    gamma = GAMMA * math.sqrt(scale["embed"] / typical) if scaled else GAMMA
    a, g = factors["embed"]
    pi = math.sqrt(_mean_eigenvalue(a) / _mean_eigenvalue(g))
    return 1.0 / (a + pi * gamma), np.linalg.inv(g + gamma / pi * np.eye(len(g)))


@pytest.mark.parametrize("scaled", [True, False])
def test_a_tables_gamma_is_scaled_towards_the_typical_blocks_relative_damping(scaled):
    opt = _kfac(relative_table_damping=scaled)
    assert opt.blocks["embed"].layer.diagonal_a and opt.blocks["embed"].a.shape == (1, ROWS)
    inverses = opt.curvature.invert(GAMMA)
    a_inv, g_inv = _expected_table_inverses(opt, scaled)
    np.testing.assert_allclose(inverses["embed"].a_inv[0].numpy(), a_inv, rtol=1e-9)
    np.testing.assert_allclose(inverses["embed"].g_inv[0].numpy(), g_inv, rtol=1e-7, atol=1e-9)
    # the other blocks keep gamma: theirs are those of the same factors unscaled
    opt.curvature.relative_tables = False
    plain = opt.curvature.invert(GAMMA)
    for name in ("body.0", "body.2"):
        torch.testing.assert_close(inverses[name].a_inv, plain[name].a_inv, rtol=1e-12, atol=0)
        torch.testing.assert_close(inverses[name].g_inv, plain[name].g_inv, rtol=1e-12, atol=0)


def test_a_word_table_is_damped_less_than_one_gamma_would():
    """The case the rule is for: a table's scale (1 / rows of A's mean eigenvalue) is far below its model's other
    blocks', so its scaled gamma is smaller than the one gamma: its rows' damping falls."""
    opt = _kfac()
    scaled = opt.curvature.invert(GAMMA)["embed"]
    opt.curvature.relative_tables = False
    assert (scaled.a_inv > opt.curvature.invert(GAMMA)["embed"].a_inv).all()


def test_the_paper_preset_and_a_model_without_tables_keep_one_gamma():
    assert PRESETS["paper"].relative_table_damping is False and PRESETS["default"].relative_table_damping is True
    runs = []
    for scaled in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(50, WIDTH), nn.Flatten(), nn.Linear(WIDTH * WORDS, CLASSES))
        cm = kronograph.compile(model, torch.randint(0, 50, (2, WORDS)), loss="cross_entropy")
        opt = kronograph.optim.KFAC(cm, seed=0, relative_table_damping=scaled)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            words = torch.randint(0, 50, (32, WORDS), generator=generator)
            opt.step(words, torch.randint(0, CLASSES, (32,), generator=generator))
        runs.append([p.detach().clone() for p in cm.module.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # a 50-row embedding is a dense layer, no table: the setting changes nothing
