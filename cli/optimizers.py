"""Build an optimizer by name with its options: K-FAC, and SGD (Nesterov) and Adam behind K-FAC's interface.

``train`` and ``bench`` both go through ``make_optimizer`` so that every optimizer is driven the same way:
``opt.step(x, y) -> {"loss": ..., ...}`` computes the loss of the compiled model (``cm.loss``, through
``kronograph.runtime.losses.get_loss``) on the batch before updating the module's parameters in place,
and ``state_dict`` / ``load_state_dict`` hold everything an exact resume needs. The option table
(``OPTIONS``) is the one source of the command-line flags, the config-file keys and the defaults; the
K-FAC defaults are read from its presets (runtime/presets.py): ``--preset`` picks the set, flags override it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import click
import torch

from kronograph.compiler.compiled import CompiledModel
from kronograph.errors import KronographError
from kronograph.runtime.kfac import KFAC, make_engine
from kronograph.runtime.losses import get_loss
from kronograph.runtime.presets import PRESETS


class Optimizer(Protocol):
    """What train and bench drive: one update per call, the loss before it, and an exact checkpoint."""

    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class OptionSpec:
    """One optimizer setting: its key (flag ``--key-with-dashes``), click type, help and which optimizers take it."""

    key: str
    type: Any
    help: str
    applies: tuple[str, ...]
    switch: bool = False  # a boolean with --key/--no-key

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


_K = ("kfac",)
_POSITIVE_INT = click.IntRange(min=1)
_FRACTION = click.FloatRange(min=0, max=1, min_open=True)
OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("preset", click.Choice(sorted(PRESETS)),
               "kfac: default (the first try: scale-free, safe) or paper (Martens & Grosse sec 13 exactly).", _K),
    OptionSpec("lr", click.FloatRange(min=0, min_open=True),
               "Learning rate (kfac: multiplies the re-scaled update; 1 is the paper's algorithm).",
               ("kfac", "sgd", "adam")),
    OptionSpec("momentum", str, "kfac: qmodel (sec 7), none, or a heavy-ball coefficient with --no-rescale; "
               "sgd: Nesterov momentum coefficient.", ("kfac", "sgd")),
    OptionSpec("weight_decay", click.FloatRange(min=0), "l2 coefficient eta of the objective.", ("kfac", "sgd", "adam")),
    OptionSpec("damping", click.FloatRange(min=0),
               "Initial Tikhonov damping lambda (default preset: relative to the curvature's scale).", _K),
    OptionSpec("relative_damping", click.FloatRange(min=0, min_open=True),
               "Initial lambda / mean eigenvalue of the factored Fisher, when --damping is not given.", _K),
    OptionSpec("reject_steps", bool, "Undo steps that make the objective much worse (default preset).", _K,
               switch=True),
    OptionSpec("factor_damping", click.FloatRange(min=0, min_open=True),
               "Factored-Tikhonov strength gamma (None: sqrt(lambda + eta)).", _K),
    OptionSpec("ema_decay", click.FloatRange(min=0, max=1, max_open=True),
               "Fixed EMA decay of the factors (None: the paper's min(1 - 1/k, 0.95)).", _K),
    OptionSpec("fisher", click.Choice(["mc", "empirical"]), "Fisher targets: mc (sampled) or empirical (labels).", _K),
    OptionSpec("stats_fraction", _FRACTION, "Fraction tau_1 of the batch for the statistics.", _K),
    OptionSpec("qmodel_fraction", _FRACTION, "Fraction tau_2 of the batch for the exact-Fisher products.", _K),
    OptionSpec("stats_every", _POSITIVE_INT, "Refresh the factor statistics every N steps.", _K),
    OptionSpec("inverse_every", _POSITIVE_INT, "Recompute the damped inverses every N steps (T_3).", _K),
    OptionSpec("damping_every", _POSITIVE_INT, "Levenberg-Marquardt update of lambda every N steps (T_1).", _K),
    OptionSpec("gamma_every", _POSITIVE_INT, "Try three gamma candidates every N steps (T_2).", _K),
    OptionSpec("rescale", bool, "Re-scale the update by the exact Fisher (sec 6.4).", _K, switch=True),
    OptionSpec("adapt_damping", bool, "Adapt lambda (sec 6.5; None: on with re-scaling).", _K, switch=True),
    OptionSpec("adapt_gamma", bool, "Adapt gamma (sec 6.6; None: on with re-scaling).", _K, switch=True),
    OptionSpec("fisher_products", click.Choice(["forward", "differences"]),
               "The quadratic model's J d: forward mode (exact) or central differences of two forwards (cheaper).", _K),
    OptionSpec("structure", click.Choice(["diagonal", "tridiagonal"]), "Inverse structure (sec 4.2 / 4.3).", _K),
    OptionSpec("beta1", click.FloatRange(min=0, max=1, max_open=True), "First-moment decay.", ("adam",)),
    OptionSpec("beta2", click.FloatRange(min=0, max=1, max_open=True), "Second-moment decay.", ("adam",)),
    OptionSpec("eps", click.FloatRange(min=0, min_open=True), "Denominator epsilon.", ("adam",)),
)
OPTION_KEYS = tuple(spec.key for spec in OPTIONS)


def _kfac_defaults(preset: str = "default") -> dict[str, Any]:
    """A preset's settings, as runtime/presets.py states them (one source of truth)."""
    settings = PRESETS[preset]
    values = {spec.key: getattr(settings, spec.key) for spec in OPTIONS if "kfac" in spec.applies and spec.key != "preset"}
    return {"preset": preset, **values}


DEFAULTS: dict[str, dict[str, Any]] = {
    "kfac": _kfac_defaults(),
    "sgd": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},  # the paper's baseline (sec 13)
    "adam": {"lr": 1e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
}
OPTIMIZERS = tuple(DEFAULTS)


def _momentum(name: str, value: Any) -> str | float | None:
    """--momentum as the optimizer takes it: kfac "qmodel" / None / a float, sgd a float in [0, 1)."""
    text = str(value).strip().lower()
    if name == "kfac" and text in ("qmodel", "none"):
        return None if text == "none" else "qmodel"
    try:
        number = float(text)
    except ValueError:
        choices = "qmodel, none or a number" if name == "kfac" else "a number in [0, 1)"
        raise KronographError(f"--momentum {value!r} is not valid for {name}; use {choices}") from None
    if not 0 <= number < 1:
        raise KronographError(f"--momentum {number} must lie in [0, 1)")
    return number


def resolve_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The optimizer's full settings: its defaults overridden by the given (non-None) ``options``.

    Raises KronographError for an unknown optimizer, an unknown key, or a setting that another
    optimizer takes (e.g. --damping with adam), naming the flag and the fix.
    """
    if name not in DEFAULTS:
        raise KronographError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    given = {key: value for key, value in (options or {}).items() if value is not None}
    specs = {spec.key: spec for spec in OPTIONS}
    for key in given:
        if key not in specs:
            raise KronographError(f"unknown optimizer option {key!r}; the options are {', '.join(OPTION_KEYS)}")
        if name not in specs[key].applies:
            users = " or ".join(specs[key].applies)
            raise KronographError(f"{specs[key].flag} applies to --optimizer {users}, not {name}; drop it")
    defaults = _kfac_defaults(given.get("preset", "default")) if name == "kfac" else DEFAULTS[name]
    resolved = {**defaults, **given}
    if name == "kfac" and not resolved["rescale"] and "momentum" not in given:
        resolved["momentum"] = "none"  # qmodel momentum needs re-scaling; plain K-FAC then has none
    if "momentum" in resolved:
        momentum = _momentum(name, resolved["momentum"])
        resolved["momentum"] = "none" if momentum is None else momentum
        if name == "kfac" and resolved["rescale"] and isinstance(momentum, float):
            raise KronographError(f"--momentum {momentum} is heavy-ball momentum, which K-FAC takes only with --no-rescale; "
                                  "with re-scaling use --momentum qmodel (the paper's) or none")
        if name == "kfac" and not resolved["rescale"] and momentum == "qmodel":
            raise KronographError("--momentum qmodel needs re-scaling; drop --no-rescale, or give a number or none")
    return resolved


class FirstOrder:
    """A torch optimizer behind K-FAC's interface, so that all optimizers are compared on the same loss:
    ``step(x, y)`` does forward, ``cm.loss`` (plus eta/2 |theta|^2 through the gradient), backward, update.

    The passes come from K-FAC's engine adapter (``runtime.kfac.make_engine``), so SGD and Adam run on
    either engine: the torch optimizer updates the adapter's tensors (the module's own on torch, a copy on
    onnxruntime) and ``write_back`` hands them to the engine.
    """

    def __init__(self, compiled: CompiledModel, build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> None:
        self.engine = make_engine(compiled, get_loss(compiled.loss))
        self.named = self.engine.parameters()
        if not self.named:
            raise KronographError("the model has no trainable parameters; nothing for sgd or adam to train")
        self.params = list(self.named.values())
        self.optimizer = build(self.params)
        self.steps = 0

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


def make_optimizer(name: str, compiled: CompiledModel, options: Mapping[str, Any] | None = None,
                   seed: int | None = None) -> Optimizer:
    """``name`` ("kfac", "sgd", "adam") on ``compiled`` with ``options`` (keys of OPTIONS; None = default).

    ``seed`` seeds K-FAC's own generator (subsets and sampled Fisher targets).
    """
    opts = resolve_options(name, options)
    if name == "kfac":
        kwargs = {key: value for key, value in opts.items()}
        kwargs["momentum"] = _momentum("kfac", opts["momentum"])
        return KFAC(compiled, seed=seed, **kwargs)
    if name == "sgd":
        momentum = float(opts["momentum"])
        return FirstOrder(compiled, lambda params: torch.optim.SGD(
            params, lr=opts["lr"], momentum=momentum, nesterov=momentum > 0, weight_decay=opts["weight_decay"]))
    return FirstOrder(compiled, lambda params: torch.optim.Adam(
        params, lr=opts["lr"], betas=(opts["beta1"], opts["beta2"]), eps=opts["eps"], weight_decay=opts["weight_decay"]))
