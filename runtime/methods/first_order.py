"""SGD with Nesterov momentum and Adam behind the methods' interface, so that every optimizer is compared on
the same loss and engine: ``step(x, y)`` does forward, ``cm.loss`` (plus eta/2 |theta|^2 through the
gradient), backward, update; ``state_dict`` holds what an exact resume needs.

The passes come from the shared engine adapter (``runtime.engines.make_engine``), so both run on either
engine: the torch optimizer updates the adapter's tensors (the module's own on torch, a copy on onnxruntime)
and ``write_back`` hands them to the engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kronograph.compiler.compiled import CompiledModel
from kronograph.errors import KronographError
from kronograph.runtime.distributed import refuse_data_parallel
from kronograph.runtime.engines import make_engine
from kronograph.runtime.losses import get_loss
from kronograph.runtime.methods.settings import check, resolve, setting

_POSITIVE = dict(low=0, low_open=True)
_DECAY = dict(low=0, high=1, high_open=True)


@dataclass(frozen=True)
class SGDSettings:
    """The K-FAC paper's baseline (sec 13): SGD with Nesterov momentum."""

    lr: float = setting(0.01, "Learning rate.", **_POSITIVE)
    momentum: float = setting(0.9, "Nesterov momentum coefficient (0: plain SGD).", **_DECAY)
    weight_decay: float = setting(0.0, "l2 coefficient eta of the objective.", low=0)

    def __post_init__(self) -> None:
        check(self, "SGD")


@dataclass(frozen=True)
class AdamSettings:
    """Adam with PyTorch's defaults (Kingma & Ba)."""

    lr: float = setting(1e-3, "Learning rate.", **_POSITIVE)
    weight_decay: float = setting(0.0, "l2 coefficient eta of the objective.", low=0)
    beta1: float = setting(0.9, "First-moment decay.", **_DECAY)
    beta2: float = setting(0.999, "Second-moment decay.", **_DECAY)
    eps: float = setting(1e-8, "Denominator epsilon.", **_POSITIVE)

    def __post_init__(self) -> None:
        check(self, "Adam")


def adam_steps(moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]], grads: Mapping[str, torch.Tensor],
               lr: float) -> dict[str, torch.Tensor]:
    """Adam's step -lr m_hat / (sqrt(v_hat) + 1e-8) for each gradient by name (moments 0.9 / 0.999, bias-corrected),
    its (m, v, t) in ``moments`` advanced: for the optimizers that move the weights by an update of their own
    (K-FAC's ``engine.add_``), not by a torch optimizer that owns them."""
    steps = {}
    for name, grad in grads.items():
        m, v, t = moments.get(name, (torch.zeros_like(grad), torch.zeros_like(grad), 0))
        m, v, t = m.mul(0.9).add_(grad, alpha=0.1), v.mul(0.999).addcmul_(grad, grad, value=0.001), t + 1
        moments[name] = (m, v, t)
        steps[name] = -(lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8))
    return steps


def nesterov_steps(buffers: dict[str, torch.Tensor], grads: Mapping[str, torch.Tensor], lr: float,
                   momentum: float = 0.9) -> dict[str, torch.Tensor]:
    """SGD's step with Nesterov momentum, -lr (g + momentum b) with b = momentum b + g (b = g at first: PyTorch's
    ``SGD(nesterov=True)``, no dampening), for each gradient by name, its buffer b in ``buffers`` advanced: as
    ``adam_steps``, for the optimizers that move the weights themselves."""
    steps = {}
    for name, grad in grads.items():
        buffer = buffers.get(name)
        buffer = grad.clone() if buffer is None else buffer.mul(momentum).add_(grad)
        buffers[name] = buffer
        steps[name] = grad.add(buffer, alpha=momentum).mul_(-lr)
    return steps


class FirstOrder:
    """A torch optimizer on a compiled model, built by ``build(params, settings)``."""

    SUMMARY: str
    Settings: type
    PRESETS: dict[str, Any]

    def __init__(self, compiled: CompiledModel, preset: str = "default", seed: int | None = None,
                 **settings: Any) -> None:
        refuse_data_parallel(type(self).__name__)
        self.settings = resolve(self.PRESETS, preset, settings, type(self).__name__)
        self.engine = make_engine(compiled, get_loss(compiled.loss))
        self.named = self.engine.parameters()
        if not self.named:
            raise KronographError(f"the model has no trainable parameters; nothing for {type(self).__name__} to train")
        self.params = list(self.named.values())
        self.optimizer = self.build(self.params)
        self.steps = 0

    def build(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
        """One update on the batch; returns {"loss": mean loss before the update}. A non-finite loss or
        gradient is skipped (the moments of Adam would keep the NaN forever)."""
        inputs = tuple(torch.as_tensor(t) for t in (x if isinstance(x, (tuple, list)) else (x,)))
        self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        result = self.engine.gradient_pass(inputs, torch.as_tensor(y), capture=False)
        info: dict[str, Any] = {"loss": result.loss}
        if not math.isfinite(result.loss):
            info["skipped"] = "non-finite loss; the weights were left unchanged"
            return info
        if not all(bool(torch.isfinite(grad).all()) for grad in result.grads.values()):
            info["skipped"] = "non-finite gradient; the weights were left unchanged"
            return info
        for name, param in self.named.items():
            param.grad = result.grads[name].to(param.dtype)
        self.optimizer.step()
        self.engine.write_back()
        return info

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as error:
            raise KronographError(f"the optimizer state does not fit this model ({error}); it is from another run") from None
        self.steps = int(state["steps"])


class SGD(FirstOrder):
    SUMMARY = "SGD with Nesterov momentum (the K-FAC paper's baseline)"
    Settings = SGDSettings
    PRESETS = {"default": SGDSettings()}

    def build(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        s = self.settings
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=s.momentum > 0,
                               weight_decay=s.weight_decay)


class Adam(FirstOrder):
    SUMMARY = "Adam"
    Settings = AdamSettings
    PRESETS = {"default": AdamSettings()}

    def build(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        s = self.settings
        return torch.optim.Adam(params, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.eps, weight_decay=s.weight_decay)
