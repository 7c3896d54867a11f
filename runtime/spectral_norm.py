"""A spectrally normed layer's block works in the coordinates of its computed weight W = W_o / sigma (passes/match/
spectral_norm.py): the gradient is pushed forward to W, the block's step in W pulled back to W_o.

PyTorch's spectral norm runs its power iteration under no_grad, so with u and v fixed sigma = u^T mat(W_o) v and
dW = (dW_o - (u^T mat(dW_o) v) W) / sigma. So
- sigma grad_{W_o} = grad_W - <grad_W, W> u v^T: the gradient W's block reads (grad_W less the one direction, W's
  largest singular pair, along which W cannot move);
- a step Delta W is pulled back as dW_o = sigma Delta W, whose first-order change of W is Delta W - (u^T Delta W v) W,
  and grad_{W_o} . dW_o = (sigma grad_{W_o}) . Delta W: the quadratic model, rho and the signal share see the same
  numbers in either coordinates.
sigma is read from the module's own power-iteration vectors (the ones its last forward divided by), so only the
torch engine gives these layers blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm

from kronograph.passes.plan import Layer


def spectral_sigma(module: torch.nn.Module, original: str) -> torch.Tensor | None:
    """sigma = u^T mat(W_o) v of the spectral norm whose W_o is the parameter ``original`` of ``module``
    (``fc.parametrizations.weight.original`` or the older ``fc.weight_orig``), a detached 0-dim tensor; None where
    no PyTorch spectral norm computes that parameter's weight."""
    path = original.split(".")
    owner_name, name = ".".join(path[:-1]), path[-1]
    try:
        if len(path) >= 3 and path[-3] == "parametrizations" and name == "original":  # the chain's one _SpectralNorm
            chain = module.get_submodule(owner_name)
            if len(chain) != 1 or not isinstance(chain[0], _SpectralNorm):
                return None
            norm = chain[0]
            matrix, u, v = norm._reshape_weight_to_matrix(chain.original), norm._u, norm._v
        elif name.endswith("_orig"):  # owner.weight_orig, the older API's forward pre-hook on owner
            owner = module.get_submodule(owner_name)
            attribute = name[: -len("_orig")]
            hooks = [hook for hook in owner._forward_pre_hooks.values()
                     if isinstance(hook, SpectralNorm) and hook.name == attribute]
            if len(hooks) != 1:
                return None
            matrix = hooks[0].reshape_weight_to_matrix(getattr(owner, name))
            u, v = getattr(owner, f"{attribute}_u"), getattr(owner, f"{attribute}_v")
        else:
            return None
    except (AttributeError, KeyError, TypeError):  # (the name does not lead to such a module)
        return None
    with torch.no_grad():
        return torch.vdot(u, torch.mv(matrix, v)).detach()


@contextlib.contextmanager
def held_power_iterations(module: torch.nn.Module) -> Iterator[None]:
    """Within, ``module``'s spectral norms (either API) run no power iteration, as in eval mode: every forward
    divides by sigma = u^T W_o v of the vectors as they are."""
    norms = [m for m in module.modules() if isinstance(m, _SpectralNorm)
             or any(isinstance(hook, SpectralNorm) for hook in m._forward_pre_hooks.values())]
    modes = [m.training for m in norms]
    try:
        for m in norms:
            m.training = False
        yield
    finally:
        for m, mode in zip(norms, modes):
            m.training = mode


def has_sigma(module: torch.nn.Module | None, layer: Layer) -> bool:
    """Whether a PyTorch spectral norm of ``module`` computes ``layer``'s weight (its sigma can be read)."""
    return module is not None and spectral_sigma(module, layer.spectral_norm) is not None


def spectral_sigmas(module: torch.nn.Module, layers: Iterable[Layer]) -> dict[str, torch.Tensor]:
    """sigma by computed weight name (``layer.weight``) for the spectrally normed ``layers``."""
    return {layer.weight: spectral_sigma(module, layer.spectral_norm) for layer in layers if layer.spectral_norm}


def weight_coordinates(grads: Mapping[str, torch.Tensor], sigmas: Mapping[str, torch.Tensor],
                       layers: Iterable[Layer]) -> dict[str, torch.Tensor]:
    """``grads`` with each spectrally normed layer's sigma grad_{W_o} added under its computed weight's name."""
    found = dict(grads)
    for layer in layers:
        if layer.spectral_norm and layer.spectral_norm in grads:
            found[layer.weight] = sigmas[layer.weight] * grads[layer.spectral_norm]
    return found


def parameter_coordinates(step: Mapping[str, torch.Tensor], sigmas: Mapping[str, torch.Tensor],
                          layers: Iterable[Layer]) -> dict[str, torch.Tensor]:
    """``step`` with each spectrally normed layer's Delta W replaced by its dW_o = sigma Delta W."""
    found = dict(step)
    for layer in layers:
        if layer.spectral_norm and layer.weight in found:
            found[layer.spectral_norm] = sigmas[layer.weight] * found.pop(layer.weight)
    return found
