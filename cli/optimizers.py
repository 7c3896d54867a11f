"""The command line's optimizers: every method of runtime/methods by name, its flags built from its settings.

``train`` and ``bench`` both go through ``make_optimizer`` so that every optimizer is driven the same way:
``opt.step(x, y) -> {"loss": ..., ...}`` computes the loss of the compiled model on the batch before updating
the module's parameters in place, and ``state_dict`` / ``load_state_dict`` hold everything an exact resume
needs. ``OPTIONS`` (the flags, the config-file keys, each with the methods that take it) and ``DEFAULTS`` are
derived from the methods' settings dataclasses (``runtime.methods.METHODS``): no method is named here. A key
several methods share (--lr, --momentum) is one flag; when their kinds differ it is read as text and each
method converts it with its own field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import click
import torch

from kronograph.compiler.compiled import CompiledModel
from kronograph.errors import KronographError
from kronograph.runtime.methods import METHODS
from kronograph.runtime.methods.settings import SettingInfo, describe, resolve


class Optimizer(Protocol):
    """What train and bench drive: one update per call, the loss before it, and an exact checkpoint."""

    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class OptionSpec:
    """One flag: its key (flag ``--key-with-dashes``), click type, help, and each taking method's own field."""

    key: str
    type: Any
    help: str
    fields: dict[str, SettingInfo]
    switch: bool = False  # a boolean with --key/--no-key

    @property
    def applies(self) -> tuple[str, ...]:
        return tuple(self.fields)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def _method_fields(cls: type) -> list[SettingInfo]:
    """A method's command-line settings; ``preset`` first when it has more than one."""
    fields = describe(cls.Settings)
    if len(cls.PRESETS) > 1:
        names = tuple(cls.PRESETS)
        preset = SettingInfo("preset", names[0], f"Named set of defaults: {', '.join(names)}; the other flags override it.",
                             str, False, choices=names)
        fields = [preset, *fields]
    return fields


class _NumberOrAuto(click.ParamType):
    """A number in the setting's range, or auto (also none): the setting's None, passed on as the text "auto"
    (``resolve_options`` drops None values as not given)."""

    def __init__(self, number: click.ParamType) -> None:
        self.number = number
        self.name = f"{number.name}|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("auto", "none"):
            return "auto"
        return self.number.convert(value, param, ctx)

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        return f"{'INTEGER' if isinstance(self.number, click.IntRange) else 'FLOAT'}|auto"


def _click_type(field: SettingInfo) -> Any:
    if field.parse is not None:
        return str
    if field.choices is not None:
        return click.Choice(field.choices)
    if field.kind in (int, float):
        kind = click.IntRange if field.kind is int else click.FloatRange
        number = kind(min=field.low, max=field.high, min_open=field.low_open, max_open=field.high_open)
        return _NumberOrAuto(number) if field.optional else number
    return field.kind


def _signature(field: SettingInfo) -> tuple:
    return (field.kind, field.choices, field.low, field.high, field.low_open, field.high_open, field.parse)


def _options() -> tuple[OptionSpec, ...]:
    by_key: dict[str, dict[str, SettingInfo]] = {}
    for name, cls in METHODS.items():
        for field in _method_fields(cls):
            by_key.setdefault(field.name, {})[name] = field
    specs = []
    for key, fields in by_key.items():
        first = next(iter(fields.values()))
        same_kind = len({_signature(field) for field in fields.values()}) == 1
        helps = {field.help for field in fields.values()}
        text = first.help if len(helps) == 1 else " ".join(f"{name}: {field.help}" for name, field in fields.items())
        switch = same_kind and first.kind is bool
        specs.append(OptionSpec(key, _click_type(first) if same_kind else str, text, fields, switch))
    return tuple(specs)


OPTIONS: tuple[OptionSpec, ...] = _options()
OPTION_KEYS = tuple(spec.key for spec in OPTIONS)
_SPECS = {spec.key: spec for spec in OPTIONS}
OPTIMIZERS = tuple(METHODS)
#: Each method's default settings (its "default" preset), by key.
DEFAULTS: dict[str, dict[str, Any]] = {
    name: {field.name: field.default if field.name == "preset" else getattr(cls.PRESETS["default"], field.name)
           for field in _method_fields(cls)}
    for name, cls in METHODS.items()
}


def resolve_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The optimizer's full settings: its preset's, overridden by the given (non-None) ``options``.

    Raises KronographError for an unknown optimizer, an unknown key, a setting that another optimizer
    takes (e.g. --damping with adam) or a value the method refuses, naming the flag and the fix.
    """
    if name not in METHODS:
        raise KronographError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    given = {key: value for key, value in (options or {}).items() if value is not None}
    for key in given:
        if key not in _SPECS:
            raise KronographError(f"unknown optimizer option {key!r}; the options are {', '.join(OPTION_KEYS)}")
        if name not in _SPECS[key].fields:
            users = " or ".join(_SPECS[key].applies)
            raise KronographError(f"{_SPECS[key].flag} applies to --optimizer {users}, not {name}; drop it")
    converted = {}
    for key, value in given.items():
        try:
            converted[key] = _SPECS[key].fields[name].convert(value)
        except ValueError as error:
            raise KronographError(f"{_SPECS[key].flag} {value}: {error} (for --optimizer {name})") from None
    preset = converted.pop("preset", "default")
    cls = METHODS[name]
    settings = resolve(cls.PRESETS, preset, converted, name)
    return {field.name: preset if field.name == "preset" else getattr(settings, field.name)
            for field in _method_fields(cls)}


def make_optimizer(name: str, compiled: CompiledModel, options: Mapping[str, Any] | None = None,
                   seed: int | None = None) -> Optimizer:
    """The method ``name`` (a key of ``runtime.methods.METHODS``) on ``compiled`` with ``options`` (keys of
    OPTIONS; None = the preset's). ``seed`` seeds the method's own generator (subsets, sampled targets)."""
    settings = resolve_options(name, options)
    preset = settings.pop("preset", "default")
    return METHODS[name](compiled, preset=preset, seed=seed, **settings)
