"""`kronograph bench`: several optimizers on one problem from the same initial weights, each with the same
time or step budget; a table, results.json and plots of loss against seconds and against iterations.

Order of work, so that bad input costs nothing and writes nothing: flags (optimizers, --option, budget,
--out), engine, data, model (seeded), one forward pass on two examples; then an SGD step is timed for the
ratio column, the optimizers run one after another (bench_run), and the files are written at the end
(bench_report). On the onnxruntime engine (an .onnx MODEL, or --engine onnxruntime) each optimizer's engine
writes its training artifacts to DIR/onnxruntime/<optimizer>/ and runs its forward check there, so the
folder is made first; DIR/onnxruntime/ is removed at the end, and everything the bench wrote on a failure.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from kronograph.cli.bench_report import FILES, summarise, table, write
from kronograph.cli.bench_run import INITS, Budget, Contender, Problem, initialise, run, sgd_step_seconds
from kronograph.cli.builtins import BUILTINS
from kronograph.cli.models import is_onnx_model
from kronograph.cli.optimizers import OPTIMIZERS, OPTIONS, resolve_options
from kronograph.cli.prepare import ONNXRUNTIME, load_source, removed_on_failure, resolve_engine, with_data_defaults
from kronograph.cli.settings import AVERAGE, RUN_OPTIONS, flag
from kronograph.errors import KronographError

DEFAULT_SECONDS = 60.0
#: Settings of a run that --option may also give per optimizer (besides the optimizer's own, optimizers.OPTIONS).
PER_RUN = ("batch_size", "batch_schedule", "batch_start", "batch_growth", "average")
_SPECS = {spec.key: spec for spec in OPTIONS}
_OPTION_HELP = (
    "An optimizer setting, repeatable: OPT.KEY=VALUE for one optimizer (kfac.damping=100, adam.lr=3e-3, "
    "sgd.momentum=0.95), KEY=VALUE for every listed optimizer that takes KEY (weight_decay=1e-5). KEY is a "
    "`kronograph train` optimizer flag with underscores (lr, momentum, damping, factor_damping, ...) or one of "
    + ", ".join(PER_RUN) + " (kfac.batch_schedule=exp: the paper's set-up, K-FAC with growing batches)."
)


def _shared(key: str, text: str | None = None) -> Callable:
    """A flag of `kronograph train` (settings.RUN_OPTIONS) with the same type, default and help (or ``text``)."""
    kind, default, shared = RUN_OPTIONS[key]
    return click.option(flag(key), key, type=kind, default=default, show_default=default is not None,
                        help=text or shared)


def _names(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise KronographError("--optimizers is empty; list some of " + ", ".join(OPTIMIZERS) + ", like kfac,adam")
    for name in names:
        if name not in OPTIMIZERS:
            raise KronographError(f"--optimizers: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)} "
                                  "(like kfac,adam)")
    if len(set(names)) < len(names):
        raise KronographError(f"--optimizers {text} names an optimizer twice; list each once")
    return names


def _convert(ctx: click.Context, text: str, key: str, value: str) -> Any:
    """VALUE through the click type of KEY's own flag."""
    params = {param.name: param for param in ctx.command.params}
    param = params.get(key) if key in PER_RUN else None
    kind = param.type if param else (click.BOOL if _SPECS[key].switch else _SPECS[key].type)
    try:
        return kind.convert(value, param, ctx) if isinstance(kind, click.ParamType) else kind(value)
    except (click.BadParameter, ValueError) as error:
        reason = error.format_message() if isinstance(error, click.BadParameter) else str(error)
        raise KronographError(f"--option {text}: {reason}") from None


def _given_options(ctx: click.Context, names: list[str], texts: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """--option texts as {optimizer: {key: value}}, each checked: format, optimizer, key, value."""
    given: dict[str, dict[str, Any]] = {name: {} for name in names}
    for text in texts:
        left, equals, value = text.partition("=")
        owner, _, key = left.rpartition(".")
        key = key.strip().replace("-", "_")
        if not equals or not key:
            raise KronographError(f"--option {text!r} is not KEY=VALUE or OPTIMIZER.KEY=VALUE; "
                                  "write it like kfac.damping=100")
        if key not in _SPECS and key not in PER_RUN:
            raise KronographError(f"--option {text}: unknown key {key!r}; keys are {', '.join([*_SPECS, *PER_RUN])}")
        owner = owner.strip().lower()
        if owner and owner not in names:
            raise KronographError(f"--option {text}: {owner} is not in --optimizers {','.join(names)}; "
                                  "add it or drop the option")
        takers = [n for n in ([owner] if owner else names) if key in PER_RUN or n in _SPECS[key].applies]
        if not takers:
            users = " and ".join(_SPECS[key].applies)
            raise KronographError(f"--option {text}: {key} is a setting of {users}, not of "
                                  f"{owner or ','.join(names)}; drop it")
        for name in takers:
            given[name][key] = _convert(ctx, text, key, value.strip())
    return given


def contenders(ctx: click.Context, flags: dict[str, Any]) -> list[Contender]:
    """One Contender per --optimizers name: the bench-wide flags, overridden by its --option settings."""
    names = _names(flags["optimizers"])
    given = _given_options(ctx, names, flags["option_texts"])
    return [Contender(name, resolve_options(name, {k: v for k, v in opts.items() if k not in PER_RUN}),
                      **{key: opts.get(key, flags[key]) for key in PER_RUN}) for name, opts in given.items()]


def budget_of(flags: dict[str, Any]) -> Budget:
    if flags["seconds"] is not None and flags["steps"] is not None:
        raise KronographError("--seconds and --steps both given; a bench's budget is one or the other")
    if flags["steps"] is not None:
        return Budget(steps=flags["steps"])
    return Budget(seconds=flags["seconds"] or DEFAULT_SECONDS)


def bench_dir(out: Path | None) -> Path:
    """--out (new or empty: no other run's files are touched), else the first free runs/bench-N."""
    if out is None:
        return next(Path("runs") / f"bench-{i}" for i in range(1, 10**6) if not (Path("runs") / f"bench-{i}").exists())
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "already holds files"
        raise KronographError(f"--out {out} {what}; choose a new or empty folder")
    return out


def problem_of(model: str, flags: dict[str, Any], out: Path) -> Problem:
    """The engine, the data, the initial model (seeded, --init), the loss; one forward pass checks that they
    fit. On onnxruntime the model is compiled once here, to check its graph and read the initial weights."""
    engine = resolve_engine(model, flags["engine"])
    if flags["init"] and is_onnx_model(model):
        raise KronographError(f"--init {flags['init']} re-initialises a PyTorch module's layers and {model} is an "
                              "ONNX file, which starts from its own weights; drop --init")
    settings = with_data_defaults(model, dict(flags))
    source = load_source(model, settings, init=lambda module: initialise(module, flags["init"]))
    initial = source.compile(engine).state_dict() if engine == "onnxruntime" else None
    return Problem(source, engine, flags["seed"], min(flags["eval_examples"], len(source.data.x)), settings["data"],
                   out / ONNXRUNTIME, initial)


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KronographError(f"cannot create --out {out} ({error.strerror}); choose another folder") from None


@click.command(help="Compare optimizers on MODEL from the same initial weights and batches, each with the same "
                    "budget (optimizer time: evaluation is not charged); writes table.md, results.json, "
                    "loss_vs_time.png and loss_vs_iterations.png to --out DIR. MODEL is an .onnx file (run on "
                    "onnxruntime-training), package.module:factory or a built-in: " + ", ".join(BUILTINS) + ". For "
                    "autoencoders (sigmoid_cross_entropy) the reconstruction error (the papers' figure) is reported "
                    "too. The K-FAC paper's set-up (sec 13): kronograph bench mnist-autoencoder --optimizers kfac,sgd "
                    "--batch-size 500 --option kfac.batch_schedule=exp --option weight_decay=1e-5 --average 0.99")
@click.argument("model")
@click.option("--optimizers", default="kfac,adam,sgd", show_default=True,
              help=f"Comma-separated optimizers to compare: {', '.join(OPTIMIZERS)}.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"Optimizer seconds per optimizer [default: {DEFAULT_SECONDS:g} unless --steps].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps per optimizer, instead of --seconds.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="New or empty folder for the table, results.json and plots [default: runs/bench-N].")
@_shared("data")
@_shared("input")
@_shared("target")
@_shared("input_shape")
@_shared("loss")
@_shared("batch_size")
@_shared("seed")
@_shared("valid_fraction")
@_shared("engine")
@_shared("batch_schedule")
@_shared("batch_start")
@_shared("batch_growth")
@_shared("average", AVERAGE + "; the reported loss is then the smaller of the current and the averaged parameters'.")
@click.option("--init", type=click.Choice(INITS), default=None,
              help="Initial weights of a PyTorch module: sparse (Martens 2010, Linear layers) or default (PyTorch's) "
                   "[default: the model's own; the built-in autoencoder's is sparse].")
@click.option("--eval-examples", type=click.IntRange(min=1), default=10000, show_default=True,
              help="The loss is evaluated on the first N training examples, about 20 times per optimizer.")
@click.option("--target-loss", type=float, default=None,
              help="Loss of the time-to-reach column [default: the worst final loss, which every optimizer reaches].")
@click.option("--option", "option_texts", multiple=True, metavar="[OPT.]KEY=VALUE", help=_OPTION_HELP)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads [default: torch's].")
@click.pass_context
def bench(ctx: click.Context, model: str, **flags: Any) -> None:
    runs, budget, out = contenders(ctx, flags), budget_of(flags), bench_dir(flags["out"])
    if flags["threads"]:
        torch.set_num_threads(flags["threads"])
    problem = problem_of(model, flags, out)
    with removed_on_failure(out, resumed=False):
        if problem.engine == "onnxruntime":
            _make_dir(out)  # the engines' artifacts go there
        built = {c.name: problem.fresh(c) for c in runs}  # an optimizer that refuses its options does so before any run
        click.echo(f"bench {model}: {', '.join(built)} on {problem.name} ({len(problem.data.x)} examples), "
                   f"{budget.describe()} each, engine {problem.engine} -> {out}", err=True)
        sgd = next((c for c in runs if c.name == "sgd"), Contender("sgd", resolve_options("sgd"), flags["batch_size"]))
        sgd_seconds = sgd_step_seconds(problem, sgd)
        results = {c.name: {"options": c.options, "batch": {key: getattr(c, key) for key in PER_RUN},
                            **run(problem, c, budget, built.pop(c.name))} for c in runs}
        shutil.rmtree(out / ONNXRUNTIME, ignore_errors=True)
    target = summarise(results, budget, sgd_seconds, flags["target_loss"])
    caption = (f"kronograph bench {model}: {problem.name} ({len(problem.data.x)} training examples), loss "
               f"{problem.loss} on the first {problem.eval_examples}, {budget.describe()} per optimizer; SGD step "
               f"{1000 * sgd_seconds:.1f} ms at batch {sgd.batch_size}, {torch.get_num_threads()} threads, engine "
               f"{problem.engine}")
    about = {"model": model, "data": problem.name, "loss": problem.loss, "examples": len(problem.data.x),
             "eval_examples": problem.eval_examples, "budget": {"seconds": budget.seconds, "steps": budget.steps},
             "seed": flags["seed"], "threads": torch.get_num_threads(), "sgd_step_seconds": sgd_seconds,
             "sgd_batch_size": sgd.batch_size, "engine": problem.engine, "title": f"{model} on {problem.name}",
             "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}}
    _make_dir(out)
    write(out, caption, results, target, about)
    click.echo(f"{caption}\n\n{table(results, target)}\n")
    click.echo("wrote " + ", ".join(str(out / name) for name in FILES))
