"""`kronograph train`: train a model on data with K-FAC, SGD or Adam, with a log, checkpoints and plots.

Order of work, so that bad input costs nothing and writes nothing: settings (flags, --config, a resumed
run's own), data, model, a forward pass on two examples, compile (these in prepare.py, shared with bench),
optimizer, checkpoint; only then is the run folder created. The onnxruntime engine (an .onnx MODEL, or
--engine onnxruntime) writes its training artifacts to DIR/onnxruntime/ and its forward pass on two examples
runs there, so it comes after the folder is made; a failure removes what it wrote. A run is a pure function
of its settings: --seed seeds torch before the model is built, the optimizer's generator, and the data order
(train_data.DataOrder, or ScheduledOrder for --batch-schedule exp); a checkpoint holds the weights
(``CompiledModel.state_dict``: the module's, or the engine's by ONNX names), the optimizer state, the
iterate average (--average) and torch's RNG, so a resumed run writes the same metrics as one never
interrupted. The checkpoint keeps the current weights, which training continues from; the model written at
the end (model.onnx, model.safetensors) is the averaged one when --average is on.

Under torchrun (or --nproc N, which starts torchrun) the run is data-parallel K-FAC (cli/torchrun.py): every rank
builds the same run, steps on its rows of every global batch and takes the same step; rank 0 alone validates,
prints and writes (folder, log, checkpoints, plots, model), every rank gathering the checkpoint's state so that
all reach the same collectives. The checkpoint is a single process's, readable by any number of processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from tqdm import tqdm

import kronograph
from kronograph.cli.averaging import EngineAverage, IterateAverage, iterate_average
from kronograph.cli.builtins import BUILTINS
from kronograph.cli.checkpoint import (atomic_write, check_same_model, load_checkpoint, rng_state, save_checkpoint,
                                       save_weights, set_rng_state)
from kronograph.cli.models import is_onnx_model
from kronograph.cli.optimizers import OPTION_KEYS, Optimizer, make_optimizer
from kronograph.cli.events import TensorBoard, check_tensorboard
from kronograph.cli.plots import METRICS, json_value, plot_metrics, read_metrics
from kronograph.cli.prepare import (ONNXRUNTIME, engine_forward, load_source, removed_on_failure, resolve_engine,
                                    with_data_defaults)
from kronograph.cli.settings import DEFAULT_STEPS, given_settings, new_run_settings, resumed_settings, train_options
from kronograph.cli.torchrun import (DEFAULT_TIMEOUT, FAIL_AT, Ranks, check_batches, check_supported, failure_hook,
                                     failure_text, launch, without_nproc)
from kronograph.cli.train_data import DataOrder, ScheduledOrder, TrainData, batch_schedule, evaluate
from kronograph.errors import KronographError

_FIGURES = ("damping", "factor_damping", "alpha", "mu", "rho", "unmatched_scale", "model_decrease", "skipped",
            "rejected", "rejected_steps", "adam", "sgd", "batches", "gathered")
_BAR = {"damping": "λ", "factor_damping": "γ", "alpha": "α", "mu": "μ", "rejected_steps": "undone", "adam": "adam",
        "sgd": "sgd"}


def _new_run_dir(model: str, out: Path | None) -> Path:
    """--out (new or empty: another run's files are never touched), else the first free runs/MODEL-N."""
    if out is None:
        stem = Path(model.split(":")[-1]).stem or "run"
        return next(Path("runs") / f"{stem}-{i}" for i in range(1, 10**6) if not (Path("runs") / f"{stem}-{i}").exists())
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "already holds files (another run?)"
        raise KronographError(f"--out {out} {what}; continue a run with --resume {out}, or choose a new --out")
    return out


def _summary(rows: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in rows)


class _Interrupt:
    """First Ctrl-C: finish the step, checkpoint, stop (exit 130). A second one stops at once, unless it comes
    within ``grace`` seconds of the first: under torchrun a rank gets the terminal's SIGINT and torchrun's copy."""

    def __init__(self, grace: float = 0.0) -> None:
        self.requested = False
        self.previous: Any = None
        self.grace, self.first = grace, 0.0

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.requested:
            if time.monotonic() - self.first < self.grace:
                return
            raise KeyboardInterrupt
        self.requested, self.first = True, time.monotonic()

    def __enter__(self) -> _Interrupt:
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: a KeyboardInterrupt stops the run at once
            self.previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@dataclass
class _Run:
    """Everything a run needs once the input is checked: the settings, its folder, data, model, optimizer."""

    model: str
    settings: dict[str, Any]
    run_dir: Path
    data: TrainData
    compiled: kronograph.CompiledModel
    optimizer: Optimizer
    order: DataOrder
    average: IterateAverage | EngineAverage | None = None
    start: int = 0
    elapsed: float = 0.0
    ranks: Ranks | None = None  # the torchrun job this process is a rank of; None: one process

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files and prints (rank 0, or the one process)."""
        return self.ranks is None or self.ranks.writer

    def forward(self) -> torch.nn.Module | Callable[[torch.Tensor], torch.Tensor]:
        """What the validation loss is computed from: the module, or the engine's inference graph."""
        if self.compiled.engine == "torch":
            return self.compiled.module
        return engine_forward(self.compiled.onnxruntime())

    def select(self):
        """The output the loss is put on, out of what the module returns (the onnxruntime graph's first output
        is already that one)."""
        return self.compiled.select_output if self.compiled.engine == "torch" else None

    def valid_loss(self) -> float:
        valid_x, valid_y = self.validation()
        return evaluate(self.forward(), self.settings["loss"], valid_x, valid_y, self.order.batch_size, self.select())

    def valid_losses(self) -> dict[str, float]:
        """The validation loss, and with --average the averaged weights' too."""
        losses = {"valid_loss": self.valid_loss()}
        if self.average is not None:
            valid_x, valid_y = self.validation()
            losses["valid_loss_average"] = evaluate(self.average.module(), self.settings["loss"], valid_x, valid_y,
                                                    self.order.batch_size, self.select())
        return losses

    def settings_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.settings.items()}

    def validation(self) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.settings["eval_examples"]
        return self.data.valid_x[:count], self.data.valid_y[:count]

    def checkpoint(self, step: int, seconds: float) -> None:
        """Save the checkpoint of ``step``. Every rank gathers the state (were a state_dict ever to need the
        other ranks, all would be there); rank 0 alone writes it."""
        epoch, batch = self.order.position(step)
        weights, state = self.compiled.state_dict(), {
            "step": step, "time": seconds, "settings": self.settings_json(), "model": self.model,
            "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
            **({"average": self.average.state_dict()} if self.average is not None else {}),
            "data": {"epoch": epoch, "batch": batch, "batches_per_epoch": self.order.per_epoch, "examples": self.order.n},
        }
        if self.writer:
            save_checkpoint(self.run_dir, weights, state)


def _settings(ctx: click.Context, model: str, flags: dict[str, Any]) -> tuple[dict[str, Any], Path, tuple | None]:
    """The run's settings and folder, and for --resume its checkpoint (weights, state)."""
    given = given_settings(ctx, flags)
    engine = resolve_engine(model, given.get("engine"))
    resume: Path | None = flags["resume"]
    if resume is None:
        settings = new_run_settings(given)
        settings["engine"] = engine
        return with_data_defaults(model, settings), _new_run_dir(model, settings["out"]), None
    if given.get("out") is not None and Path(given["out"]).resolve() != resume.resolve():
        raise KronographError(f"--out {given['out']} differs from --resume {resume}; a resumed run continues in its own folder")
    weights, state = load_checkpoint(resume)
    settings = resumed_settings(given, state["settings"], resume)
    settings["engine"] = settings.get("engine") or "torch"
    if is_onnx_model(model) and settings["engine"] != "onnxruntime":
        raise KronographError(f"the run in {resume} trained on the {settings['engine']} engine and {model} is an ONNX "
                              "file; resume it with the MODEL that started it")
    resolve_engine(model, settings["engine"])
    return settings, resume, (weights, state)


def _build(model: str, settings: dict[str, Any], run_dir: Path, checkpoint: tuple | None, ranks: Ranks | None = None,
           timeout: int = DEFAULT_TIMEOUT) -> _Run:
    """Data, model (seeded), one forward pass on two examples, compile, optimizer, and the checkpoint's state.
    Under torchrun the process group is initialised after compiling (its backend follows the model's device)
    and before the optimizer, which then runs data-parallel."""
    seed = int(settings["seed"])
    if ranks is not None:
        ranks.pin_device()
    source = load_source(model, settings)
    settings["loss"], data = source.loss, source.data
    compiled = source.compile(settings["engine"])
    order = _order(len(data.x), settings)
    settings["steps"] = settings["steps"] or (order.epoch_start(settings["epochs"]) if settings["epochs"] else DEFAULT_STEPS)
    start, elapsed = 0, 0.0
    if checkpoint is not None:
        weights, state = checkpoint
        check_same_model(weights, compiled.state_dict(), run_dir)
        if state["data"]["examples"] != order.n:
            raise KronographError(f"the training data now has {order.n} examples but had {state['data']['examples']} "
                                  f"when the run in {run_dir} started; resume with the same --data")
        start, elapsed = int(state["step"]), float(state["time"])
        if start > settings["steps"]:
            raise KronographError(f"the run in {run_dir} is at step {start}, beyond --steps {settings['steps']}; "
                                  "give a larger --steps")
    if ranks is not None:
        check_batches(order.size(start), ranks)  # the sizes only grow (--batch-schedule exp)
        ranks.connect(next(compiled.module.parameters(), torch.empty(0)).device, timeout)
    engine = None
    with removed_on_failure(run_dir, resumed=checkpoint is not None):
        if compiled.engine == "onnxruntime":
            workdir = run_dir / ONNXRUNTIME
            shutil.rmtree(workdir, ignore_errors=True)  # a resumed run's artifacts are rebuilt from the graph
            engine = source.open_engine(compiled, workdir)
        if checkpoint is not None:  # before the optimizer: the onnxruntime adapter copies the weights when built
            if engine is None:
                compiled.module.load_state_dict(weights)
            else:
                engine.set_parameters({name: weights[name] for name in engine.trainable})
        optimizer = make_optimizer(settings["optimizer"], compiled, {k: settings.get(k) for k in OPTION_KEYS}, seed=seed)
        average = iterate_average(compiled.module if engine is None else engine, settings["average"])
        if checkpoint is not None:
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            if average is not None:
                average.load_state_dict(state["average"])
    return _Run(model, settings, run_dir, data, compiled, optimizer, order, average, start, elapsed, ranks)


def _order(n: int, settings: dict[str, Any]) -> DataOrder:
    """The batches of the run: --batch-size every step, or the sizes of --batch-schedule exp."""
    if settings["batch_schedule"] == "fixed":
        return DataOrder(n, settings["batch_size"], int(settings["seed"]))
    sizes = batch_schedule(settings["batch_schedule"], settings["batch_size"], n, settings["batch_start"],
                           settings["batch_growth"])
    return ScheduledOrder(n, sizes, int(settings["seed"]))


def _batch_text(run: _Run, steps: int) -> str:
    """The batch size, or how it grows over the run's ``steps``."""
    if run.settings["batch_schedule"] == "fixed":
        return f"batch {run.order.batch_size}"
    return f"batch {run.order.size(0)} growing to {run.order.size(max(0, steps - 1))} (exp)"


def _open_run_dir(run: _Run) -> None:
    """Create a new run's folder, or cut a resumed run's log back to its checkpoint; write run.json."""
    if run.start:  # resumed
        kept = [r for r in read_metrics(run.run_dir / METRICS) if r["step"] <= run.start]  # steps after it are redone
        atomic_write(run.run_dir / METRICS, lambda temp: temp.write_text("".join(json.dumps(r) + "\n" for r in kept)))
    else:
        try:
            run.run_dir.mkdir(parents=True, exist_ok=True)  # the onnxruntime engine made it already
        except OSError as error:
            raise KronographError(f"cannot create the run folder {run.run_dir} ({error.strerror}); choose another --out") from None
    processes = {"processes": run.ranks.world} if run.ranks is not None else {}  # this leg's, not a setting
    text = json.dumps({"model": run.model, **run.settings_json(), **processes}, indent=2)
    atomic_write(run.run_dir / "run.json", lambda temp: temp.write_text(text))


@click.command(help="Train MODEL on data (K-FAC by default) with a progress bar, metrics.jsonl, checkpoints, "
                    "plots and the trained model.onnx in --out DIR. MODEL is an .onnx file (trained on "
                    "onnxruntime-training), package.module:factory or a built-in: " + ", ".join(BUILTINS) + ". "
                    "With --average XI the model written at the end (model.onnx, model.safetensors) is the iterate "
                    "average, not the last step's weights. The K-FAC paper's set-up (sec 13): kronograph train "
                    "mnist-autoencoder --batch-schedule exp --weight-decay 1e-5 --average 0.99")
@click.argument("model")
@train_options
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine: N > 1 runs this command under torchrun (python -m "
                   "torch.distributed.run --standalone --nproc-per-node N), data-parallel --optimizer kfac on the "
                   "torch engine: each process steps on its share of every --batch-size batch. Exit code: torchrun's.")
@click.option("--dist-timeout", type=click.IntRange(min=1), default=DEFAULT_TIMEOUT, show_default=True,
              help="Under torchrun (or --nproc): seconds a process waits for the others in a collective before it "
                   "fails the run (rank 0 validates, checkpoints and plots while they wait).")
@click.pass_context
def train(ctx: click.Context, model: str, nproc: int, dist_timeout: int, **flags: Any) -> None:
    ranks = Ranks.from_env()
    if nproc > 1:
        if ranks is not None:
            raise KronographError(f"--nproc {nproc} starts torchrun itself, and this process already runs under it "
                                  f"(WORLD_SIZE={ranks.world}); drop --nproc, or run without torchrun")
        settings, _, _ = _settings(ctx, model, flags)  # what is refused is refused here, before any process starts
        check_supported(settings, nproc)
        check_tensorboard(settings.get("tensorboard"))
        code = launch(without_nproc(_command_line(ctx)), nproc)
        if code not in (0, 130):  # 130: interrupted, rank 0 said where its checkpoint is
            click.echo(f"error: the run on {nproc} processes failed (torchrun's exit code {code}); the ranks' own "
                       "`error:` lines above name the cause", err=True)
        sys.exit(code)
    if ranks is None:
        _train(ctx, model, flags)
        return
    try:
        _train(ctx, model, flags, ranks, dist_timeout)
    except (KronographError, click.ClickException, click.Abort):
        raise  # main's one `error:` line (it names the rank), exit code 2
    except Exception as error:  # noqa: BLE001 - any failure of this rank ends the job with its message
        traceback.print_exc()
        click.echo(f"error: {ranks}: {failure_text(error)}", err=True)
        sys.exit(1)
    ranks.close()


def _command_line(ctx: click.Context) -> list[str]:
    """The arguments this `kronograph` command was given (main records them; else the process's own)."""
    argv = getattr(ctx.find_root().command, "argv", None)
    return list(sys.argv[1:] if argv is None else argv)


def _train(ctx: click.Context, model: str, flags: dict[str, Any], ranks: Ranks | None = None,
           timeout: int = DEFAULT_TIMEOUT) -> None:
    settings, run_dir, checkpoint = _settings(ctx, model, flags)
    if ranks is not None:
        check_supported(settings, ranks.world)
    check_tensorboard(settings.get("tensorboard"))
    run = _build(model, settings, run_dir, checkpoint, ranks, timeout)
    if ranks is not None:  # every rank has read what it needs (a resumed run's checkpoint) before rank 0 writes
        torch.distributed.barrier()
        run.run_dir = run_dir = Path(ranks.share(str(run_dir)))
    if run.writer:
        _open_run_dir(run)
    total = settings["steps"]
    span = f"steps {run.start + 1}..{total}" if run.start < total else f"nothing: it already has its {total} steps"
    processes = f" on {ranks.world} processes" if ranks is not None else ""
    if run.writer:
        click.echo(f"training {model} with {settings['optimizer']}{processes} on {settings['data']} ({run.order.n} "
                   f"examples, {_batch_text(run, total)}), {span} -> {run_dir}", err=True)
    _loop(run)
    if run.writer:
        _finish(run)


def _loop(run: _Run) -> None:
    """Steps start+1..total: one metrics line each, validation and checkpoints on schedule, Ctrl-C handled.
    Under torchrun every rank steps on its rows of each batch and the ranks agree after every step on whether
    one was interrupted, so that all stop at the same step; rank 0 alone validates, logs and writes."""
    settings, order, data, ranks, writer = run.settings, run.order, run.data, run.ranks, run.writer
    total, every, eval_every = settings["steps"], settings["checkpoint_every"], settings["eval_every"]
    step, saved, in_step, began, examples = run.start, run.start, False, time.perf_counter(), 0
    fail_at = failure_hook(ranks)
    bar = tqdm(total=total, initial=step, desc=settings["optimizer"], unit="step", file=sys.stderr,
               disable=None if writer else True, dynamic_ncols=True)
    board = TensorBoard(settings.get("tensorboard") if writer else None)
    log = open(run.run_dir / METRICS, "a", encoding="utf-8") if writer else contextlib.nullcontext()
    try:
        with _Interrupt(grace=0.0 if ranks is None else 2.0) as interrupt, log, board:
            while step < total:
                index = order.indices(step)
                rows = index if ranks is None else ranks.rows(index)
                x = data.x[rows]
                y = x if data.task == "autoencoder" else data.y[rows]
                if step + 1 == fail_at:
                    raise RuntimeError(f"{FAIL_AT} asked {ranks} to fail at step {fail_at} (a test hook)")
                tick = time.perf_counter()
                in_step = True
                info = run.optimizer.step(x, y)
                if run.average is not None:
                    run.average.update()
                in_step, step, examples = False, step + 1, examples + len(index)
                now = time.perf_counter()
                if writer:
                    record: dict[str, Any] = {"step": step, "loss": info["loss"], "time": run.elapsed + now - began,
                                              "epoch": order.position(step - 1)[0], "batch_size": len(index),
                                              "step_time": now - tick}
                    record.update({k: info[k] for k in _FIGURES if k in info})
                    if eval_every and step % eval_every == 0:
                        record.update(run.valid_losses())
                    log.write(json.dumps({k: json_value(v) for k, v in record.items()}) + "\n")
                    log.flush()
                    board.write(record)
                    rate = examples / max(now - began, 1e-9)
                    bar.set_postfix({"loss": f"{info['loss']:.4g}", "ex/s": f"{rate:.0f}",
                                     **{_BAR[k]: f"{info[k]:.3g}" for k in _BAR if k in info}}, refresh=False)
                    bar.update(1)
                stop = interrupt.requested if ranks is None else ranks.any_rank(interrupt.requested)
                if stop or (every and step % every == 0) or step == total:
                    if writer:
                        os.fsync(log.fileno())  # the log up to the checkpoint's step is on disk before it
                    run.checkpoint(step, run.elapsed + time.perf_counter() - began)
                    saved = step
                if stop:
                    bar.close()
                    if writer:
                        click.echo(f"interrupted: checkpoint of step {step} saved in {run.run_dir / 'checkpoint'}; "
                                   f"continue with `kronograph train {run.model} --resume {run.run_dir}`", err=True)
                    sys.exit(130)
    except KeyboardInterrupt:
        bar.close()
        where = "during a step" if in_step else f"after step {step}"
        if writer:
            click.echo(f"stopped {where}; the checkpoint of step {saved} in {run.run_dir / 'checkpoint'} is kept "
                       f"(continue with --resume {run.run_dir})", err=True)
        sys.exit(130)
    bar.close()


def _number(value: Any) -> str:
    return "nan" if value is None else f"{value:.6g}"


def _finish(run: _Run) -> None:
    """The trained model (safetensors and ONNX; with --average the averaged weights, copied into the model once
    the last checkpoint holds the current ones), the plots, and the summary table on stdout."""
    settings, order, run_dir = run.settings, run.order, run.run_dir
    valid = run.valid_losses()
    if run.average is not None:
        run.average.apply()
    save_weights(run_dir / "model.safetensors", run.compiled.state_dict())
    atomic_write(run_dir / "model.onnx", run.compiled.export_onnx)
    records = read_metrics(run_dir / METRICS)
    plot_metrics(records, run_dir, f"{run.model}: {settings['optimizer']} on {settings['data']}")
    valid_x, _ = run.validation()
    last = [r["loss"] for r in records[-10:]]
    step_time = sum(r.get("step_time") or 0.0 for r in records) / max(1, len(records))
    batch = sum(r.get("batch_size") or order.batch_size for r in records) / max(1, len(records))
    epochs = (settings["steps"] / order.per_epoch if settings["batch_schedule"] == "fixed"
              else sum(order.size(step) for step in range(settings["steps"])) / order.n)
    rows = [
        ("run", str(run_dir)),
        ("model", f"{run.model} ({len(run.compiled.layers)} Kronecker-factored layers, loss {settings['loss']}, "
                  f"engine {run.compiled.engine})"),
        ("optimizer", settings["optimizer"] + (f" on {run.ranks.world} processes (torchrun)" if run.ranks else "")),
        ("data", f"{settings['data']} ({order.n} training examples, {len(valid_x)} for validation)"),
        ("steps", f"{settings['steps']} ({_batch_text(run, settings['steps'])}, {epochs:.2f} epochs)"),
        ("time", f"{records[-1]['time'] if records else 0.0:.1f} s ({step_time:.3f} s/step, "
                 f"{batch / max(step_time, 1e-9):.0f} examples/s)"),
        ("loss", f"{_number(records[0]['loss'])} at step 1 -> {_number(records[-1]['loss'])} at step "
                 f"{records[-1]['step']} (mean of the last {len(last)}: {_number(sum(last) / len(last) if last else None)})"
         if records else "-"),
        ("valid loss", _number(valid["valid_loss"])),
        *([("valid loss, average", f"{_number(valid['valid_loss_average'])} (xi {settings['average']}: the written "
                                    "model)")] if "valid_loss_average" in valid else []),
        ("files", "metrics.jsonl, loss_vs_step.png, loss_vs_time.png, model.onnx, model.safetensors, checkpoint/"
                  + (f", {ONNXRUNTIME}/" if run.compiled.engine == "onnxruntime" else "")),
    ]
    click.echo(_summary(rows))
