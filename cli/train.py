"""`kronograph train`: train a model on data with K-FAC, SGD or Adam, with a log, checkpoints and plots.

Order of work, so that bad input costs nothing and writes nothing: settings (flags, --config, a resumed
run's own), data, model, a forward pass on two examples, compile, optimizer, checkpoint; only then is the
run folder created. A run is a pure function of its settings: --seed seeds torch before the model is
built, the optimizer's generator, and the data order (train_data.DataOrder); a checkpoint holds the
optimizer state and torch's RNG, so a resumed run writes the same metrics as one never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from tqdm import tqdm

import kronograph
from kronograph.cli.builtins import BUILTINS
from kronograph.cli.checkpoint import (atomic_write, check_same_model, load_checkpoint, rng_state, save_checkpoint,
                                       save_weights, set_rng_state)
from kronograph.cli.models import resolve_model
from kronograph.cli.optimizers import OPTION_KEYS, Optimizer, make_optimizer
from kronograph.cli.events import TensorBoard, check_tensorboard
from kronograph.cli.plots import METRICS, json_value, plot_metrics, read_metrics
from kronograph.cli.settings import DEFAULT_STEPS, given_settings, new_run_settings, resumed_settings, train_options
from kronograph.cli.train_data import (BUILTIN_DATA, DataOrder, TrainData, check_model_on_data, default_loss, evaluate,
                                       prepare_data)
from kronograph.errors import KronographError

_FIGURES = ("damping", "factor_damping", "alpha", "mu", "rho", "unmatched_scale", "model_decrease", "skipped")
_BAR = {"damping": "λ", "factor_damping": "γ", "alpha": "α", "mu": "μ"}


def check_engine(model: str, engine: str | None) -> None:
    """Training on onnxruntime-training is not there yet: say so before loading anything."""
    is_onnx = model not in BUILTINS and (model.endswith(".onnx") or Path(model).is_file())
    if is_onnx and not Path(model).is_file():
        raise KronographError(f"model file not found: {model}; give an existing .onnx path")
    if is_onnx or engine == "onnxruntime":
        raise KronographError(
            "training on the onnxruntime engine is not available yet; train the PyTorch module instead "
            "(MODEL as package.module:factory, with --engine torch)"
        )


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
    """First Ctrl-C: finish the step, checkpoint, stop (exit 130). A second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

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
    start: int = 0
    elapsed: float = 0.0

    @property
    def module(self) -> torch.nn.Module:
        return self.compiled.module

    def settings_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.settings.items()}

    def validation(self) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.settings["eval_examples"]
        return self.data.valid_x[:count], self.data.valid_y[:count]

    def checkpoint(self, step: int, seconds: float) -> None:
        epoch, batch = self.order.position(step)
        save_checkpoint(self.run_dir, self.module.state_dict(), {
            "step": step, "time": seconds, "settings": self.settings_json(), "model": self.model,
            "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
            "data": {"epoch": epoch, "batch": batch, "batches_per_epoch": self.order.per_epoch, "examples": self.order.n},
        })


def _settings(ctx: click.Context, model: str, flags: dict[str, Any]) -> tuple[dict[str, Any], Path, tuple | None]:
    """The run's settings and folder, and for --resume its checkpoint (weights, state)."""
    given = given_settings(ctx, flags)
    check_engine(model, given.get("engine"))
    resume: Path | None = flags["resume"]
    if resume is None:
        settings = new_run_settings(given)
        return with_data_defaults(model, settings), _new_run_dir(model, settings["out"]), None
    if given.get("out") is not None and Path(given["out"]).resolve() != resume.resolve():
        raise KronographError(f"--out {given['out']} differs from --resume {resume}; a resumed run continues in its own folder")
    weights, state = load_checkpoint(resume)
    return resumed_settings(given, state["settings"], resume), resume, (weights, state)


def with_data_defaults(model: str, settings: dict[str, Any]) -> dict[str, Any]:
    """A built-in model's own data set and target when none are given."""
    data, target = BUILTIN_DATA.get(model, (None, None))
    if settings["data"] is None:
        if data is None:
            raise KronographError(f"{model} needs --data: an .npz/.npy/.csv file or a data set name (mnist, digits, ...)")
        settings["data"] = data
    if settings["target"] is None:
        settings["target"] = target
    return settings


def _build(model: str, settings: dict[str, Any], run_dir: Path, checkpoint: tuple | None) -> _Run:
    """Data, model (seeded), one forward pass on two examples, compile, optimizer, and the checkpoint's state."""
    seed = int(settings["seed"])
    data = prepare_data(model, settings["data"], settings["input"], settings["target"], settings["input_shape"],
                        settings["valid_fraction"])
    torch.manual_seed(seed)  # before the model is built: its initialisation is part of the run
    resolved = resolve_model(model, (",".join(map(str, (2, *data.row_shape))),))
    module = resolved.model
    settings["loss"] = settings["loss"] or (resolved.default_loss if model in BUILTINS else default_loss(data))
    check_model_on_data(module, settings["loss"], data, f"--data {settings['data']}")
    compiled = kronograph.compile(module, example_inputs=(data.x[:2],), loss=settings["loss"])
    optimizer = make_optimizer(settings["optimizer"], compiled, {k: settings[k] for k in OPTION_KEYS}, seed=seed)
    order = DataOrder(len(data.x), settings["batch_size"], seed)
    settings["steps"] = settings["steps"] or (settings["epochs"] * order.per_epoch if settings["epochs"] else DEFAULT_STEPS)
    run = _Run(model, settings, run_dir, data, compiled, optimizer, order)
    if checkpoint is not None:
        weights, state = checkpoint
        check_same_model(weights, module.state_dict(), run_dir)
        if state["data"]["examples"] != order.n:
            raise KronographError(f"the training data now has {order.n} examples but had {state['data']['examples']} "
                                  f"when the run in {run_dir} started; resume with the same --data")
        run.start, run.elapsed = int(state["step"]), float(state["time"])
        if run.start > settings["steps"]:
            raise KronographError(f"the run in {run_dir} is at step {run.start}, beyond --steps {settings['steps']}; "
                                  "give a larger --steps")
        module.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
    return run


def _open_run_dir(run: _Run) -> None:
    """Create a new run's folder, or cut a resumed run's log back to its checkpoint; write run.json."""
    if run.start:  # resumed
        kept = [r for r in read_metrics(run.run_dir / METRICS) if r["step"] <= run.start]  # steps after it are redone
        atomic_write(run.run_dir / METRICS, lambda temp: temp.write_text("".join(json.dumps(r) + "\n" for r in kept)))
    else:
        try:
            run.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise KronographError(f"cannot create the run folder {run.run_dir} ({error.strerror}); choose another --out") from None
    text = json.dumps({"model": run.model, **run.settings_json()}, indent=2)
    atomic_write(run.run_dir / "run.json", lambda temp: temp.write_text(text))


@click.command(help="Train MODEL on data (K-FAC by default) with a progress bar, metrics.jsonl, checkpoints, "
                    "plots and the trained model.onnx in --out DIR. MODEL is package.module:factory or a built-in: "
                    + ", ".join(BUILTINS) + ".")
@click.argument("model")
@train_options
@click.pass_context
def train(ctx: click.Context, model: str, **flags: Any) -> None:
    settings, run_dir, checkpoint = _settings(ctx, model, flags)
    check_tensorboard(settings.get("tensorboard"))
    run = _build(model, settings, run_dir, checkpoint)
    _open_run_dir(run)
    total = settings["steps"]
    span = f"steps {run.start + 1}..{total}" if run.start < total else f"nothing: it already has its {total} steps"
    click.echo(f"training {model} with {settings['optimizer']} on {settings['data']} ({run.order.n} examples, batch "
               f"{run.order.batch_size}), {span} -> {run_dir}", err=True)
    _loop(run)
    _finish(run)


def _loop(run: _Run) -> None:
    """Steps start+1..total: one metrics line each, validation and checkpoints on schedule, Ctrl-C handled."""
    settings, order, data = run.settings, run.order, run.data
    total, every, eval_every = settings["steps"], settings["checkpoint_every"], settings["eval_every"]
    valid_x, valid_y = run.validation()
    step, saved, in_step, began = run.start, run.start, False, time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=settings["optimizer"], unit="step", file=sys.stderr,
               disable=None, dynamic_ncols=True)
    board = TensorBoard(settings.get("tensorboard"))
    try:
        with _Interrupt() as interrupt, open(run.run_dir / METRICS, "a", encoding="utf-8") as log, board:
            while step < total:
                index = order.indices(step)
                x = data.x[index]
                y = x if data.task == "autoencoder" else data.y[index]
                tick = time.perf_counter()
                in_step = True
                info = run.optimizer.step(x, y)
                in_step, step = False, step + 1
                now = time.perf_counter()
                record: dict[str, Any] = {"step": step, "loss": info["loss"], "time": run.elapsed + now - began,
                                          "epoch": order.position(step - 1)[0], "step_time": now - tick}
                record.update({k: info[k] for k in _FIGURES if k in info})
                if eval_every and step % eval_every == 0:
                    record["valid_loss"] = evaluate(run.module, settings["loss"], valid_x, valid_y, order.batch_size)
                log.write(json.dumps({k: json_value(v) for k, v in record.items()}) + "\n")
                log.flush()
                board.write(record)
                rate = (step - run.start) * order.batch_size / max(now - began, 1e-9)
                bar.set_postfix({"loss": f"{info['loss']:.4g}", "ex/s": f"{rate:.0f}",
                                 **{_BAR[k]: f"{info[k]:.3g}" for k in _BAR if k in info}}, refresh=False)
                bar.update(1)
                if interrupt.requested or (every and step % every == 0) or step == total:
                    os.fsync(log.fileno())  # the log up to the checkpoint's step is on disk before it
                    run.checkpoint(step, run.elapsed + time.perf_counter() - began)
                    saved = step
                if interrupt.requested:
                    bar.close()
                    click.echo(f"interrupted: checkpoint of step {step} saved in {run.run_dir / 'checkpoint'}; continue "
                               f"with `kronograph train {run.model} --resume {run.run_dir}`", err=True)
                    sys.exit(130)
    except KeyboardInterrupt:
        bar.close()
        where = "during a step" if in_step else f"after step {step}"
        click.echo(f"stopped {where}; the checkpoint of step {saved} in {run.run_dir / 'checkpoint'} is kept "
                   f"(continue with --resume {run.run_dir})", err=True)
        sys.exit(130)
    bar.close()


def _number(value: Any) -> str:
    return "nan" if value is None else f"{value:.6g}"


def _finish(run: _Run) -> None:
    """The trained model (safetensors and ONNX), the plots, and the summary table on stdout."""
    settings, order, run_dir = run.settings, run.order, run.run_dir
    save_weights(run_dir / "model.safetensors", run.module.state_dict())
    atomic_write(run_dir / "model.onnx", run.compiled.export_onnx)
    records = read_metrics(run_dir / METRICS)
    plot_metrics(records, run_dir, f"{run.model}: {settings['optimizer']} on {settings['data']}")
    valid_x, valid_y = run.validation()
    valid = evaluate(run.module, settings["loss"], valid_x, valid_y, order.batch_size)
    last = [r["loss"] for r in records[-10:] if r["loss"] is not None]
    step_time = sum(r.get("step_time") or 0.0 for r in records) / max(1, len(records))
    rows = [
        ("run", str(run_dir)),
        ("model", f"{run.model} ({len(run.compiled.layers)} Kronecker-factored layers, loss {settings['loss']})"),
        ("optimizer", settings["optimizer"]),
        ("data", f"{settings['data']} ({order.n} training examples, {len(valid_x)} for validation)"),
        ("steps", f"{settings['steps']} (batch {order.batch_size}, {settings['steps'] / order.per_epoch:.2f} epochs)"),
        ("time", f"{records[-1]['time'] if records else 0.0:.1f} s ({step_time:.3f} s/step, "
                 f"{order.batch_size / max(step_time, 1e-9):.0f} examples/s)"),
        ("loss", f"{_number(records[0]['loss'])} at step 1 -> {_number(records[-1]['loss'])} at step "
                 f"{records[-1]['step']} (mean of the last {len(last)}: {_number(sum(last) / len(last) if last else None)})"
         if records else "-"),
        ("valid loss", _number(valid)),
        ("files", "metrics.jsonl, loss_vs_step.png, loss_vs_time.png, model.onnx, model.safetensors, checkpoint/"),
    ]
    click.echo(_summary(rows))
