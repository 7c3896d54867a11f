"""`kronograph train`: a run through click's runner and a real process, exact resume (also after Ctrl-C),
--config, and every bad input (exit code 2, one `error:` line on stderr, nothing written)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import factories
from kronograph.cli import train as train_module
from kronograph.cli.checkpoint import load_checkpoint, save_checkpoint
from kronograph.cli.main import main
from kronograph.runtime.methods.kfac import KFAC

from factories import write_tiny_data

TESTS = Path(__file__).parent
ROOT = TESTS.parent
MODEL = "factories:tiny_classifier"
PNG = b"\x89PNG\r\n\x1a\n"
#: The paper's set-up (sec 13) at the tiny data's scale: batches of 8 growing e-fold every 2 steps, xi 0.9.
PAPER = ("--batch-schedule", "exp", "--batch-start", "8", "--batch-growth", "2", "--average", "0.9")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture
def train(monkeypatch, data):
    monkeypatch.syspath_prepend(str(TESTS))

    def invoke(*args: str, model: str = MODEL, with_data: bool = True):
        extra = ["--data", str(data)] if with_data and "--data" not in args and "--resume" not in args else []
        return CliRunner().invoke(main, ["train", model, *extra, "--batch-size", "32", *args])

    return invoke


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "step_time")} for r in records]


def test_train_writes_metrics_plots_model_and_checkpoint(train, tmp_path):
    out = tmp_path / "run"
    result = train("--steps", "6", "--eval-every", "3", "--checkpoint-every", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["time"] > 0 for r in records)
    assert all({"damping", "factor_damping", "alpha", "mu"} <= set(r) for r in records)
    assert [r["step"] for r in records if "valid_loss" in r] == [3, 6]
    assert records[4]["rho"] is not None  # the Levenberg-Marquardt rule runs every 5 steps
    for name in ("loss_vs_step.png", "loss_vs_time.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert {p.name for p in (out / "checkpoint").iterdir()} == {"model.safetensors", "state.pt"}
    assert "valid loss" in result.stdout and "kfac" in result.stdout
    # The ONNX model computes what the trained weights compute.
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    module = factories.tiny_classifier()
    module.load_state_dict(load_file(str(out / "model.safetensors")))
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, module(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_train_in_a_real_process(data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "kronograph.cli", "train", MODEL, "--data", str(data), "--optimizer", "adam",
               "--steps", "4", "--batch-size", "32", "--eval-every", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4] and "valid_loss" in metrics(out)[1]
    assert "alpha" not in metrics(out)[0]  # adam reports its loss only
    for name in ("loss_vs_step.png", "loss_vs_time.png", "model.onnx", "model.safetensors", "checkpoint/state.pt"):
        assert (out / name).is_file(), name
    assert "run" in done.stdout and "Traceback" not in done.stderr


def whole_and_resumed(train, tmp_path: Path, common: tuple, total: int, *, torn_log: bool = True) -> tuple[Path, Path]:
    """Run folders of ``total`` steps in one go, and of the same settings stopped after 3 steps and resumed
    to ``total``; with ``torn_log`` the stopped run's log also holds what a crash leaves: a step-4 line
    written before its checkpoint and a torn line."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train("--steps", str(total), "--out", str(whole), *common).exit_code == 0
    assert train("--steps", "3", "--out", str(parts), *common).exit_code == 0
    if torn_log:
        with open(parts / "metrics.jsonl", "a") as log:
            log.write(json.dumps({"step": 4, "loss": 0.0, "time": 9.0}) + '\n{"step": 5, "lo')
    result = train("--resume", str(parts), "--steps", str(total))
    assert result.exit_code == 0, result.output
    return whole, parts


@pytest.mark.parametrize("optimizer", ["kfac", "kbfgsl", "smw-gn", "acp", "sgd"])
def test_resume_gives_the_metrics_of_an_uninterrupted_run(train, tmp_path, optimizer):
    common = ("--optimizer", optimizer, "--eval-every", "2", "--checkpoint-every", "3", "--seed", "3")
    whole, parts = whole_and_resumed(train, tmp_path, common, 6)
    assert without_time(metrics(parts)) == without_time(metrics(whole))
    assert metrics(parts)[3]["time"] > metrics(parts)[2]["time"]  # time adds up across the resume
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(parts / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resume_mid_gathering_gives_the_metrics_of_an_uninterrupted_run(train, tmp_path):
    """K-FAC gathering two batches a step, stopped after three (one batch held in the checkpoint): the gathered
    calls log their batch's loss and the resumed run's metrics and weights are the uninterrupted run's."""
    common = ("--optimizer", "kfac", "--batches-per-step", "2", "--eval-every", "2", "--checkpoint-every", "3",
              "--seed", "3")
    whole, parts = whole_and_resumed(train, tmp_path, common, 6)
    assert without_time(metrics(parts)) == without_time(metrics(whole))
    assert [r.get("gathered") for r in metrics(whole)] == [1, None] * 3
    assert all(isinstance(r["loss"], float) for r in metrics(whole))
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(parts / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("value, code", [("auto", 0), ("none", 0), ("2", 0), ("0", 2), ("two", 2)])
def test_an_optional_setting_takes_auto_on_the_command_line(train, tmp_path, value, code):
    """A setting whose None means auto (--batches-per-step) takes auto or none, else a number in its range; any
    other value is refused with exit code 2, no traceback."""
    result = train("--steps", "2", "--optimizer", "kfac", "--batches-per-step", value, "--out", str(tmp_path / "r"))
    assert result.exit_code == code, result.output
    assert code == 0 or ("--batches-per-step" in result.output and "Traceback" not in result.output)


def test_resume_with_growing_batches_and_averaging_gives_the_metrics_of_an_uninterrupted_run(train, tmp_path):
    common = (*PAPER, "--eval-every", "2", "--checkpoint-every", "3", "--seed", "3")
    whole, parts = whole_and_resumed(train, tmp_path, common, 7, torn_log=False)
    assert without_time(metrics(parts)) == without_time(metrics(whole))
    assert "valid_loss_average" in metrics(parts)[5] and metrics(parts)[6]["batch_size"] > metrics(parts)[3]["batch_size"]
    for name in ("model.safetensors", "checkpoint/model.safetensors"):  # the averaged model and the current weights
        a, b = load_file(str(whole / name)), load_file(str(parts / name))
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_matches(train, tmp_path, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train("--steps", "6", "--eval-every", "2", "--out", str(whole)).exit_code == 0
    step = KFAC.step

    def interrupted_step(self, x, y):
        info = step(self, x, y)
        if self.steps == 4:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the step in progress completes
        return info

    monkeypatch.setattr(KFAC, "step", interrupted_step)
    result = train("--steps", "6", "--eval-every", "2", "--out", str(cut))
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr and "--resume" in result.stderr
    assert [r["step"] for r in metrics(cut)] == [1, 2, 3, 4]
    monkeypatch.setattr(KFAC, "step", step)
    assert train("--resume", str(cut)).exit_code == 0  # the run's own --steps 6
    assert without_time(metrics(cut)) == without_time(metrics(whole))


def run_with_config(train, tmp_path: Path, text: str, *args: str) -> tuple[object, Path, dict]:
    """A run with a --config file of ``text`` and the flags ``args``: (click's result, its folder, run.json)."""
    config, out = tmp_path / "run.toml", tmp_path / "run"
    config.write_text(text)
    result = train("--config", str(config), *args, "--out", str(out))
    assert result.exit_code == 0, result.output
    return result, out, json.loads((out / "run.json").read_text())


def test_config_file_with_a_flag_overriding_it(train, tmp_path):
    _, out, settings = run_with_config(train, tmp_path, 'optimizer = "sgd"\nlr = 0.05\nmomentum = 0.5\nsteps = 5\n'
                                       'batch_size = 16\n', "--steps", "3")
    assert len(metrics(out)) == 3  # the flag wins over the file
    assert (settings["optimizer"], settings["lr"], settings["momentum"], settings["steps"]) == ("sgd", 0.05, 0.5, 3)
    assert settings["batch_size"] == 32  # the flag again (the test's runner passes --batch-size 32)


def test_exp_batch_schedule_sizes_every_step_and_comes_from_the_config_file(train, tmp_path):
    result, out, settings = run_with_config(
        train, tmp_path, 'batch_schedule = "exp"\nbatch_start = 8\nbatch_growth = 2.0\noptimizer = "sgd"\n', "--steps", "9")
    expected = [min(180, round(8 * math.exp(k / 2))) for k in range(9)]  # 180 training examples
    assert [r["batch_size"] for r in metrics(out)] == expected and expected[-1] == 180
    assert [r["epoch"] for r in metrics(out)][-3:] == [2, 3, 4]  # a batch of the whole set is an epoch
    assert (settings["batch_schedule"], settings["batch_start"], settings["batch_growth"]) == ("exp", 8, 2.0)
    assert "batch 8 growing to 180" in result.stderr
    fixed = tmp_path / "fixed"
    assert train("--steps", "2", "--optimizer", "sgd", "--out", str(fixed)).exit_code == 0
    assert [r["batch_size"] for r in metrics(fixed)] == [32, 32]
    epochs = tmp_path / "epochs"  # --epochs 2: the steps before the schedule's batches start a third epoch
    assert train("--epochs", "2", "--optimizer", "sgd", *PAPER[:6], "--out", str(epochs)).exit_code == 0
    assert [r["epoch"] for r in metrics(epochs)] == [0, 0, 0, 0, 0, 1]  # 8+13+22+36+59 fit in 180, 97 not, nor 97+161


@pytest.mark.parametrize("optimizer", ["kfac", "adam"])
def test_averaging_writes_the_exponential_average_of_the_steps_weights(train, tmp_path, monkeypatch, optimizer):
    steps, xi = [], 0.9
    save = train_module.save_checkpoint

    def recording(run_dir, weights, state):  # --checkpoint-every 1: the current weights after every step
        steps.append({name: tensor.clone() for name, tensor in weights.items()})
        return save(run_dir, weights, state)

    monkeypatch.setattr(train_module, "save_checkpoint", recording)
    out = tmp_path / "run"
    result = train("--optimizer", optimizer, *PAPER, "--steps", "6", "--eval-every", "3", "--checkpoint-every", "1",
                   "--seed", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    torch.manual_seed(2)  # the run's initial weights: its factory built after seeding torch
    average = dict(factories.tiny_classifier().state_dict())
    assert len(steps) == 6
    for weights in steps:
        average = {name: xi * average[name] + (1 - xi) * weights[name] for name in average}
    written, current = load_file(str(out / "model.safetensors")), load_file(str(out / "checkpoint/model.safetensors"))
    for name in average:
        torch.testing.assert_close(written[name], average[name], rtol=1e-5, atol=1e-6)
        assert torch.equal(current[name], steps[-1][name]) and not torch.allclose(current[name], written[name])
    assert [r["step"] for r in metrics(out) if "valid_loss_average" in r] == [3, 6]
    assert "valid loss, average" in result.stdout
    module = factories.tiny_classifier()  # model.onnx computes what the averaged weights compute
    module.load_state_dict(written)
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, module(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def _write(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _bad_inputs(tmp: Path, data: Path) -> dict[str, tuple[list[str], str]]:
    """name: (arguments after MODEL, a fragment the error line must hold)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=40)
    nan = x.copy()
    nan[7, 2] = np.nan
    (tmp / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("someone else's files")
    (tmp / "model.onnx").write_bytes(b"")
    (tmp / "no-checkpoint").mkdir()
    (tmp / "unknown.toml").write_text("steps = 3\nlearning_rate = 0.1\n")
    (tmp / "bad-value.toml").write_text('batch_size = "many"\n')
    (tmp / "broken.toml").write_text("steps = = 3\n")
    (tmp / "average.toml").write_text("average = 1.5\n")
    return {
        "missing data file": (["--data", str(tmp / "absent.npz")], "no such file"),
        "corrupt data file": (["--data", str(tmp / "garbage.npz")], "corrupt"),
        "inputs of the wrong shape": (["--data", str(_write(tmp / "wide.npz", x=np.ones((40, 4), np.float32), y=labels))],
                                      "cannot run on"),
        "float targets for cross-entropy": (["--data", str(_write(tmp / "float.npz", x=x, y=labels.astype(np.float32) + 0.5)),
                                             "--loss", "cross_entropy"], "integer class labels"),
        "labels out of range": (["--data", str(_write(tmp / "labels.npz", x=x, y=np.where(labels == 2, 5, labels)))],
                                "labels must lie in [0, 2]"),
        "NaN in the data": (["--data", str(_write(tmp / "nan.npz", x=nan, y=labels))], "NaN/Inf"),
        "unknown option": (["--data", str(data), "--frobnicate", "1"], "No such option"),
        "option of another optimizer": (["--data", str(data), "--optimizer", "adam", "--damping", "3"],
                                        "--damping applies to --optimizer kfac"),
        "steps and epochs": (["--data", str(data), "--steps", "3", "--epochs", "1"], "--steps and --epochs"),
        "out holds another run": (["--data", str(data), "--out", str(tmp / "other")], "--resume"),
        "no checkpoint to resume": (["--resume", str(tmp / "no-checkpoint")], "holds no checkpoint"),
        "unknown config key": (["--data", str(data), "--config", str(tmp / "unknown.toml")], "'learning_rate'"),
        "bad config value": (["--data", str(data), "--config", str(tmp / "bad-value.toml")], "batch_size"),
        "config that is not TOML": (["--data", str(data), "--config", str(tmp / "broken.toml")], "not valid TOML"),
        "empty onnx file": (["--data", str(data), "--model-is-onnx"], "holds no ONNX graph"),
        "onnx file on the torch engine": (["--data", str(data), "--model-is-onnx", "--engine", "torch"],
                                          "trains on the onnxruntime engine only"),
        "no data for a factory": (["--steps", "2"], "needs --data"),
        "average of 1": (["--data", str(data), "--average", "1"], "'--average': 1.0 is not in the range 0<=x<1"),
        "unknown batch schedule": (["--data", str(data), "--batch-schedule", "linear"], "'linear' is not one of"),
        "batch start without exp": (["--data", str(data), "--batch-start", "64"], "applies to --batch-schedule exp"),
        "batch growth of 0": (["--data", str(data), "--batch-schedule", "exp", "--batch-growth", "0"], "range x>0"),
        "average out of range in the config": (["--data", str(data), "--config", str(tmp / "average.toml")],
                                               "average = 1.5"),
    }


def test_every_bad_input_is_one_error_line_and_exit_2(train, tmp_path, data):
    for name, (args, fragment) in _bad_inputs(tmp_path, data).items():
        model = MODEL
        if "--model-is-onnx" in args:
            args, model = [a for a in args if a != "--model-is-onnx"], str(tmp_path / "model.onnx")
        out = ["--out", str(tmp_path / "never")] if "--out" not in args and "--resume" not in args else []
        result = train(*args, *out, model=model, with_data=False)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, result.stderr)
        assert fragment in lines[0], (name, lines[0])
        assert not (tmp_path / "never").exists(), name  # a failed run writes nothing
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_resume_refuses_another_model_a_changed_setting_and_a_corrupt_checkpoint(train, tmp_path):
    run = tmp_path / "run"
    assert train("--steps", "2", "--out", str(run)).exit_code == 0
    before = (run / "metrics.jsonl").read_text()
    cases = [
        (dict(model="factories:tiny_wide_classifier"), [], "from a different model: '0.weight' has shape [5, 6]"),
        ({}, ["--lr", "0.5"], "--lr 0.5 differs from the run"),
        ({}, ["--average", "0.5"], "--average 0.5 differs from the run"),
        ({}, ["--batch-schedule", "exp"], "--batch-schedule exp differs from the run"),
        ({}, ["--out", str(tmp_path / "elsewhere")], "continues in its own folder"),
        ({}, ["--steps", "1"], "at step 2, beyond --steps 1"),
    ]
    for kwargs, args, fragment in cases:
        result = train("--resume", str(run), *(args if "--steps" in args else ["--steps", "4", *args]), **kwargs)
        assert result.exit_code == 2 and result.stderr.startswith("error:") and fragment in result.stderr, result.output
    (run / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    result = train("--resume", str(run), "--steps", "4")
    assert result.exit_code == 2 and "state.pt is corrupt" in result.stderr, result.output
    assert (run / "metrics.jsonl").read_text() == before  # nothing of the run was touched


def test_checkpoint_swap_leaves_one_checkpoint_and_survives_a_crash_between_renames(tmp_path):
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    for step in (1, 2):
        save_checkpoint(tmp_path, weights, {"step": step, "optimizer": {"m": torch.ones(2)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temp or old folders left
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old")  # the crash: old moved aside, new not in place
    loaded, state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and torch.equal(loaded["w"], weights["w"])


def test_tensorboard_events_hold_the_metrics(train, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "board"
    result = train("--steps", "3", "--optimizer", "sgd", "--out", str(tmp_path / "run"), "--tensorboard", str(board))
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(board))
    events.Reload()
    losses = [(event.step, event.value) for event in events.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in metrics(tmp_path / "run")]
    assert [step for step, _ in losses] == [step for step, _ in expected]
    assert np.allclose([v for _, v in losses], [v for _, v in expected], rtol=1e-6)


def test_a_model_returning_a_dict_trains_and_validates_on_its_logits(train, tmp_path):
    """Validation (and the averaged weights' validation) puts the loss on the output compile chose."""
    out = tmp_path / "run"
    result = train("--optimizer", "kfac", "--steps", "4", "--eval-every", "2", "--average", "0.9", "--out", str(out),
                   model="factories:dict_heads")
    assert result.exit_code == 0, result.output
    records = [r for r in metrics(out) if "valid_loss" in r]
    assert records and all(math.isfinite(r["valid_loss"]) and math.isfinite(r["valid_loss_average"]) for r in records)
