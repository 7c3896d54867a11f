"""The settings of a `kronograph train` run: flags, the --config TOML file, defaults, and a resumed run's own.

Precedence: defaults < --config file < command-line flags. Every flag's default is None in click, so that
"given" is a fact (click's parameter source), not a guess from a value. A resumed run takes its settings
from its checkpoint: the flags that define the run (data, model loss, optimizer and its options, batch
size and schedule, --average, seed, ...) may be repeated but not changed; only the length of the run and
the bookkeeping (--steps/--epochs, --checkpoint-every, --eval-every, --eval-examples) may differ.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from kronograph.cli.optimizers import DEFAULTS, OPTION_KEYS, OPTIONS, OPTIMIZERS, resolve_options
from kronograph.compiler.compiled import ENGINES, LOSSES
from kronograph.runtime.methods import METHODS
from kronograph.errors import KronographError

_PATH = click.Path(path_type=Path)
DEFAULT_STEPS = 500
#: What --average means, in train and in bench; each command says what it does with the average.
AVERAGE = "Iterate averaging avg = xi avg + (1 - xi) theta after every step with this xi (the paper's 0.99; 0: off)"
#: key: (click type, default, help). The optimizer's own options come from optimizers.OPTIONS.
RUN_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "data": (str, None, "A data set name (mnist, fashion-mnist, digits, synthetic-...) or an .npz/.npy/.csv file "
                        "(default: the built-in model's own, mnist)."),
    "input": (str, "x", "Array (.npz) or comma-separated columns (.csv) holding the inputs (x)."),
    "target": (str, None, "Array or column holding the targets (y, or the last .csv column); 'input' trains an autoencoder."),
    "input_shape": (str, None, "Shape of one input batch, like 1,1,28,28: each data row is reshaped to it (the "
                               "leading batch size is ignored; default: the data's own, or the built-in's)."),
    "loss": (click.Choice(LOSSES), None, "Loss (default: the built-in's, else from the data: labels -> "
                                         "cross_entropy, targets in [0, 1] -> sigmoid_cross_entropy, else mse)."),
    "engine": (click.Choice(ENGINES), None, "Where training runs: torch (the module's own parameters) or onnxruntime "
                                           "(onnxruntime-training; an .onnx MODEL runs only there) [default: torch for "
                                           "a module, onnxruntime for an .onnx file]."),
    "optimizer": (click.Choice(OPTIMIZERS), "kfac", "; ".join(f"{name}: {cls.SUMMARY}" for name, cls in METHODS.items()) + "."),
    "batch_size": (click.IntRange(min=1), 512, "Examples per step (--batch-schedule fixed)."),
    "batch_schedule": (click.Choice(["fixed", "exp"]), "fixed", "fixed: --batch-size every step; exp: the paper's "
                                                               "m_k = min(m_1 exp((k-1)/b), |S|) (sec 13)."),
    "batch_start": (click.IntRange(min=1), 1000, "m_1 of --batch-schedule exp."),
    "batch_growth": (click.FloatRange(min=0, min_open=True), None,
                     "b of --batch-schedule exp [default: so that m_500 = |S|, the paper's]."),
    "average": (click.FloatRange(0, 1, max_open=True), 0.0, AVERAGE + "; metrics.jsonl then also has valid_loss_average "
                "(the average's validation loss) and model.onnx and model.safetensors hold the averaged weights "
                "(the checkpoint keeps the current ones)."),
    "steps": (click.IntRange(min=1), None, f"Total steps of the run, {DEFAULT_STEPS} unless --epochs (a resumed run counts the steps already done)."),
    "epochs": (click.IntRange(min=1), None, "Total passes over the training set instead of --steps."),
    "seed": (int, 0, "Fixes the data order, the initialisation and the optimizer's sampling."),
    "valid_fraction": (click.FloatRange(0, 1, min_open=True, max_open=True), 0.1,
                       "Part of a data file held out for validation (built-in data sets use their own split)."),
    "eval_every": (click.IntRange(min=0), 50, "Validation loss every N steps (0: never)."),
    "eval_examples": (click.IntRange(min=1), 1000, "Validation examples used each time (the first N)."),
    "checkpoint_every": (click.IntRange(min=0), 100, "Checkpoint every N steps (0: only at the end and on Ctrl-C)."),
    "out": (_PATH, None, "Run folder (new or empty): metrics.jsonl, checkpoint/, plots, model.onnx (default runs/MODEL-N)."),
    "tensorboard": (_PATH, None, "Also write the metrics as TensorBoard events to this folder (needs the tensorboard package)."),
}
#: The settings that define a run: a resumed run must keep them.
RUN_KEYS = ("data", "input", "target", "input_shape", "loss", "engine", "optimizer", "batch_size", "batch_schedule",
            "batch_start", "batch_growth", "average", "seed", "valid_fraction", *OPTION_KEYS)
#: The train command's parameters that are no settings of the run (not in --config, not in the checkpoint): the
#: number of processes (--nproc) is not part of what a run computes, a checkpoint resumes on any number of them.
NOT_SETTINGS = ("config", "resume", "model", "nproc", "dist_timeout")
#: Settings that only --batch-schedule exp reads.
_EXP_KEYS = ("batch_start", "batch_growth")


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown(value: Any) -> str:
    return "auto" if value is None else str(value)


def train_options(command: Callable) -> Callable:
    """Decorate the train command with every run and optimizer flag, plus --config and --resume."""
    decorators = [click.option(flag(key), key, type=kind, default=None, help=text + (
        f" [default: {default}]" if default is not None else "")) for key, (kind, default, text) in RUN_OPTIONS.items()]
    for spec in OPTIONS:
        defaults = ", ".join(f"{name} {_shown(DEFAULTS[name][spec.key])}" for name in spec.applies)
        text = f"{spec.help} [default: {defaults}]"
        if spec.switch:
            decorators.append(click.option(f"{spec.flag}/--no-{spec.flag[2:]}", spec.key, default=None, help=text))
        else:
            decorators.append(click.option(spec.flag, spec.key, type=spec.type, default=None, help=text))
    decorators.append(click.option("--resume", "resume", type=_PATH, default=None,
                                   help="Continue the run in DIR from its checkpoint (its settings; --steps is the total)."))
    decorators.append(click.option("--config", "config", type=_PATH, default=None,
                                   help="A TOML file of settings: keys are the flag names with underscores; flags override it."))
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def load_config(path: Path, ctx: click.Context) -> dict[str, Any]:
    """The settings of a TOML file, each checked and converted by its flag's own click type."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KronographError(f"--config {path}: no such file; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise KronographError(f"--config {path}: cannot read it ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise KronographError(f"--config {path} is not valid TOML ({error}); fix that line") from None
    params = {p.name: p for p in ctx.command.params if p.name not in NOT_SETTINGS}
    settings: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key.startswith("no_") and key[3:] in params and isinstance(value, bool):  # no_rescale = true
            key, value = key[3:], not value
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise KronographError(f"{path}: unknown key {raw_key!r}; {hint}keys are the train flags with "
                                  "underscores (batch_size, lr, damping, ...)")
        try:
            settings[key] = params[key].type.convert(value, params[key], ctx)
        except click.BadParameter as error:
            raise KronographError(f"{path}: {raw_key} = {value!r}: {error.format_message()}") from None
    return settings


def given_settings(ctx: click.Context, flags: dict[str, Any]) -> dict[str, Any]:
    """The --config file's settings overridden by the flags given on the command line."""
    command_line = {key: value for key, value in flags.items() if key not in ("config", "resume")
                    and ctx.get_parameter_source(key) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    config = load_config(flags["config"], ctx) if flags.get("config") else {}
    return {**config, **command_line}


def _check_steps(settings: dict[str, Any]) -> None:
    if settings.get("steps") is not None and settings.get("epochs") is not None:
        raise KronographError("--steps and --epochs both given; the run's length is one or the other")


def _check_schedule(given: dict[str, Any], schedule: str) -> None:
    """--batch-start and --batch-growth shape the exp schedule: given without it, they would be ignored."""
    for key in _EXP_KEYS:
        if key in given and schedule != "exp":
            raise KronographError(f"{flag(key)} applies to --batch-schedule exp; add --batch-schedule exp or drop it")


def new_run_settings(given: dict[str, Any]) -> dict[str, Any]:
    """A new run's settings: the defaults, the given ones, the optimizer's resolved options."""
    settings = {key: default for key, (_, default, _) in RUN_OPTIONS.items()}
    settings.update(given)
    _check_steps(given)
    _check_schedule(given, settings["batch_schedule"])
    options = resolve_options(settings["optimizer"], {key: given.get(key) for key in OPTION_KEYS})
    settings.update({key: options.get(key) for key in OPTION_KEYS})
    return settings


def resumed_settings(given: dict[str, Any], stored: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A resumed run's settings: its own, with a new length and bookkeeping; a changed setting is an error."""
    _check_steps(given)
    stored = {**{key: RUN_OPTIONS[key][1] for key in RUN_KEYS if key in RUN_OPTIONS}, **stored}  # older runs lack some
    for key in RUN_KEYS:
        if key not in given:
            continue
        value = given[key]
        if key in OPTION_KEYS:  # compare what the optimizer would use (e.g. --momentum "0.9" and 0.9)
            value = resolve_options(stored["optimizer"], {key: value})[key]
        if value != stored.get(key):
            raise KronographError(
                f"{flag(key)} {value} differs from the run in {run_dir} ({stored.get(key)}); drop it to continue "
                "that run, or start a new run with another --out"
            )
    settings = dict(stored)
    settings.update({key: value for key, value in given.items() if key not in RUN_KEYS})
    if "steps" in given or "epochs" in given:
        settings["steps"], settings["epochs"] = given.get("steps"), given.get("epochs")
    return settings
