"""The statistics pass shared by KFAC and KFACPreconditioner: subsets, sampled targets, the EMA schedule.

Section 5 of the paper: the factors' expectations are estimated on a random fraction tau_1 of the batch,
with targets drawn from the model's predictive distribution (the true Fisher, not the empirical one),
and folded into exponential moving averages whose decay is min(1 - 1/k, 0.95) at the k-th update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from kronograph.passes.plan import Layer, LayerPlan
from kronograph.runtime.capture import Capture, SiteRecord
from kronograph.runtime.factors import paper_decay
from kronograph.runtime.losses import Loss


@contextlib.contextmanager
def preserved_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Extra forward passes (statistics, rho, Fisher products) must not move batch-norm running statistics (nor a
    spectral norm's power-iteration vectors)."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """The optimizer's own generator, on the parameters' device (sampling needs it there); None seeds it
    from torch's global generator, so that torch.manual_seed makes runs repeatable (a host draw, at construction)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(torch.randint(0, 2**62, (1,), device="cpu").item()) if seed is None else int(seed))
    return generator


def on_device(state: Any, device: torch.device) -> Any:
    """A checkpoint's tensors (in nested dicts, lists and tuples) on ``device``: a state saved from, or mapped to,
    another device resumes on the model's."""
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {key: on_device(value, device) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_device(value, device) for value in state)
    return state


def subset(n: int, fraction: float, generator: torch.Generator, minimum: int = 1) -> torch.Tensor | None:
    """round(fraction * n) random examples out of n, but at least ``minimum`` (and one); None when that is
    the whole batch (no random draw is made then)."""
    if whole_batch(n, fraction, minimum):
        return None
    m = max(1, int(minimum), int(round(fraction * n)))
    return torch.randperm(n, generator=generator, device=generator.device)[:m]


def whole_batch(n: int, fraction: float, minimum: int = 1) -> bool:
    """Whether ``subset`` of a batch of n is the whole batch (known before any draw)."""
    if fraction >= 1:
        return True
    # (minimum 1 keeps the paper preset's draws exactly as they always were)
    return minimum > 1 and max(1, int(minimum), int(round(fraction * n))) >= n


def statistics_due(step: int, every: int) -> bool:
    """Statistics are folded at steps 1, 1 + every, 1 + 2 every, ... (steps count from 1)."""
    return (step - 1) % every == 0


def inverses_due(step: int, every: int) -> bool:
    """Inverses are refreshed at steps 1-3, while the factors settle, and every ``every`` steps (T_3)."""
    return step <= 3 or step % every == 0


def ema_decay(update: int, fixed: float | None) -> float:
    """Decay of the ``update``-th fold (from 1): the first replaces the empty estimate; then ``fixed`` or
    the paper's schedule."""
    if update == 1:
        return 0.0
    return paper_decay(update) if fixed is None else float(fixed)


def sampled_statistics(
    module: torch.nn.Module,
    plan: LayerPlan | Sequence[Layer],
    loss: Loss,
    inputs: Sequence[torch.Tensor],
    fraction: float,
    generator: torch.Generator,
    minimum: int = 1,
    select: Callable[[Any], torch.Tensor] | None = None,
    parameters: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, list[SiteRecord]], int, dict[str, torch.Tensor]]:
    """A forward pass on tau_1 of the batch and the backward of targets sampled from the model.

    ``select`` picks the tensor the loss is put on from what the module returns (compile's ``output=``).
    Returns the captured sites, the number of examples used and the statistics loss's gradient of the
    ``parameters`` (by name; for the diagonal Fisher of those outside every block). No .grad and no buffer
    changes: the gradients come from autograd.grad and batch norm's running statistics are restored.
    """
    index = subset(inputs[0].shape[0], fraction, generator, minimum)
    sub = tuple(inputs) if index is None else tuple(t[index] for t in inputs)
    records, grads = statistics_pass(module, plan, loss, sub, lambda outputs: loss.sample_targets(outputs, generator),
                                     select, parameters)
    return records, sub[0].shape[0], grads


def fisher_diagonal(passes: Sequence[tuple[Mapping[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """An unbiased estimate of the Fisher's diagonal from statistics passes' gradients, g the gradient of a pass's
    statistics loss on its n examples: N gbar^2, gbar = sum n g / N the mean gradient of all their N examples. The
    sampled targets' per-example gradients have mean zero and are independent, so E[gbar gbar^T] = F / N
    (``Loss.statistics_loss``); pooled this way, a batch's halves or the data-parallel ranks' shares give the
    whole batch's estimate."""
    total = sum(n for _, n in passes)
    return {name: sum(n * grads[name] for grads, n in passes).square() / total for name in passes[0][0]}


def statistics_pass(
    module: torch.nn.Module,
    plan: LayerPlan | Sequence[Layer],
    loss: Loss,
    inputs: Sequence[torch.Tensor],
    sample: Callable[[torch.Tensor], torch.Tensor],
    select: Callable[[Any], torch.Tensor] | None = None,
    parameters: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, list[SiteRecord]], dict[str, torch.Tensor]]:
    """The captured sites of a forward on ``inputs`` and the backward of the statistics loss of the targets
    ``sample(outputs)``, and that loss's gradient of the ``parameters`` (no .grad and no buffer changes)."""
    with torch.enable_grad(), preserved_buffers(module):
        with Capture(module, plan, hooks=False) as capture:
            outputs = module(*inputs)
            outputs = outputs if select is None else select(outputs)
        targets = sample(outputs)
        grads = capture.gradients_from(loss.statistics_loss(outputs, targets), parameters=parameters)
    capture.release_outputs()
    return capture.records, grads
