"""The small batches of 2-channel sequences (length 5, 3 classes) the computed-weight tests (weight norm, spectral
norm) train their conv-linear-linear nets on."""

from __future__ import annotations

import torch


def batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences and random labels."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def learnable_batch(n: int = 256, seed: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences and labels that are a function of them (a loss that can fall)."""
    x, _ = batch(n, seed)
    return x, (x.flatten(1) @ torch.linspace(-1, 1, 30).reshape(10, 3)).argmax(1)
