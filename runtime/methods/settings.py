"""A method's settings: one typed frozen dataclass whose fields carry their own help and valid values.

Distributed Shampoo's style: the dataclass is the one source of a method's settings. The Python class takes
them as keyword arguments, and the command line builds its flags, its TOML keys and its defaults from the
fields (cli/optimizers.py), so a new method adds its dataclass and nothing to a shared table. Declare a field
with ``setting(default, help, ...)``; ``describe(cls)`` reads the fields back as ``SettingInfo`` and
``check(settings)`` rejects a value outside its declared range with an error that names the argument, and
``resolve`` gives a preset's settings with the caller's arguments in place.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kronograph.errors import KronographError


def setting(default: Any, help: str, *, choices: tuple[Any, ...] | None = None, low: float | None = None,
            high: float | None = None, low_open: bool = False, high_open: bool = False,
            parse: Callable[[str], Any] | None = None, cli: bool = True) -> Any:
    """A dataclass field with its help and valid values: ``choices`` for a string, the interval ``low``..``high``
    (open ends with ``low_open``/``high_open``) for a number; ``parse`` reads a value given as text when the field
    takes more than one kind (K-FAC's momentum: "qmodel", "none" or a number); ``cli=False`` keeps it off the
    command line (a torch dtype, say)."""
    metadata = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open,
                "high_open": high_open, "parse": parse, "cli": cli}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SettingInfo:
    """One field of a settings dataclass as the command line needs it."""

    name: str
    default: Any
    help: str
    kind: type  # bool, int, float or str (str also for a field of several kinds, read by ``parse``)
    optional: bool  # None is a valid value ("auto")
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    parse: Callable[[str], Any] | None = None

    def convert(self, value: Any) -> Any:
        """A value given as text (or already typed) as the field holds it; ValueError names what is valid."""
        if value is None or (self.optional and isinstance(value, str) and value.strip().lower() in ("none", "auto")):
            if self.optional:
                return None
            raise ValueError(f"{self.name} needs a value")
        if self.parse is not None:
            return self.parse(value)
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{value!r} is not true or false")
        if self.kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        try:
            converted = self.kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not {'a number' if self.kind in (int, float) else 'a ' + self.kind.__name__}") from None
        return converted

    def violation(self, value: Any) -> str | None:
        """Why ``value`` is not valid for this field (None when it is)."""
        if value is None:
            return None if self.optional else "must be given"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(str(choice) for choice in self.choices)}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value) and not (self.high is None and value == math.inf):
                return "must be a finite number"
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                return f"must be {'>' if self.low_open else '>='} {self.low:g}"
            if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
                return f"must be {'<' if self.high_open else '<='} {self.high:g}"
        return None


def _kind(annotation: Any) -> tuple[type, bool]:
    """(kind, optional) of an annotation such as ``float``, ``float | None`` or ``str | float | None``."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) == 1 and kinds[0] in (bool, int, float, str):
        return kinds[0], optional
    return str, optional


def _info(field: dataclasses.Field, hints: dict[str, Any]) -> SettingInfo:
    meta = field.metadata
    kind, optional = _kind(hints[field.name])
    return SettingInfo(field.name, field.default, meta["help"], kind, optional, meta["choices"], meta["low"],
                       meta["high"], meta["low_open"], meta["high_open"], meta["parse"])


def describe(cls: type) -> list[SettingInfo]:
    """The command-line settings of a settings dataclass, in field order (fields with ``cli=False`` left out)."""
    hints = typing.get_type_hints(cls)
    return [_info(field, hints) for field in dataclasses.fields(cls) if "help" in field.metadata and field.metadata["cli"]]


def check(settings: Any, owner: str) -> None:
    """Raise KronographError for the first field of ``settings`` outside its declared values, naming it."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        if "help" not in field.metadata:
            continue
        value = getattr(settings, field.name)
        reason = _info(field, hints).violation(value)
        if reason is not None:
            raise KronographError(f"{owner}: {field.name}={value!r} {reason}")


class _FromPreset:
    """The default of a method's keyword arguments: "take the value of the chosen preset"."""

    def __repr__(self) -> str:
        return "<from preset>"


FROM_PRESET: Any = _FromPreset()


def resolve(presets: dict[str, Any], preset: str, given: dict[str, Any], owner: str) -> Any:
    """The preset's settings with the given ones (those not ``FROM_PRESET``) replacing them. A settings class
    may complete what was given (``complete(self, given) -> given``) before its ``__post_init__`` checks the
    whole; an unknown preset or setting name is an error that lists the valid ones."""
    if preset not in presets:
        raise KronographError(f"{owner}: preset={preset!r}; choose one of {', '.join(presets)}")
    base = presets[preset]
    given = {key: value for key, value in given.items() if value is not FROM_PRESET}
    names = [field.name for field in dataclasses.fields(base)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise KronographError(f"{owner} got unknown arguments {unknown}; the settings are {', '.join(names)}")
    complete = getattr(base, "complete", None)
    if complete is not None:
        given = complete(given)
    return dataclasses.replace(base, **given)
