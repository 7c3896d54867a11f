"""`kronograph bench`: a run of three optimizers on a tiny model (table, results.json, plots, same initial
weights), the paper's set-up (growing batches, iterate averaging, reconstruction error), the batch schedule
and the averaging as units, and bad input (exit code 2, one `error:` line, nothing written)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kronograph.cli.bench_report import reach, value_at
from kronograph.cli.averaging import IterateAverage
from kronograph.cli.main import main
from kronograph.cli.train_data import DataOrder, ScheduledOrder, batch_schedule

TESTS = Path(__file__).parent
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_autoencoder() -> nn.Module:
    """8 inputs in [0, 1] -> code of 3 -> 8 logits: the paper's kind of problem, small."""
    return nn.Sequential(nn.Linear(8, 5), nn.Sigmoid(), nn.Linear(5, 3), nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 8))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("data")
    x = rng.normal(size=(200, 6)).astype(np.float32)
    np.savez(folder / "tiny.npz", x=x, y=((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)))
    pixels = (rng.random((240, 8)) < 0.3).astype(np.float32)
    np.savez(folder / "pixels.npz", x=pixels)
    return {"classes": folder / "tiny.npz", "pixels": folder / "pixels.npz"}


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))

    def invoke(model: str, data: Path | None, *args: str):
        given = ["--data", str(data)] if data else []
        return CliRunner().invoke(main, ["bench", model, *given, "--batch-size", "32", *args])

    return invoke


def test_bench_writes_table_results_and_plots_from_the_same_start(bench, data, tmp_path):
    out = tmp_path / "bench"
    result = bench("factories:tiny_classifier", data["classes"], "--optimizers", "kfac,kbfgs,tnt,smw-ng-bd,centered-sgd,adam,sgd",
                   "--steps", "12",
                   "--option", "adam.lr=0.01", "--option", "weight_decay=1e-5", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"table.md", "results.json", "loss_vs_time.png", "loss_vs_iterations.png"}
    for name in ("loss_vs_time.png", "loss_vs_iterations.png"):
        assert (out / name).read_bytes()[:8] == PNG
    table = (out / "table.md").read_text()
    assert table.strip() in result.stdout and str(out / "loss_vs_time.png") in result.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["kfac", "kbfgs", "tnt", "smw-ng-bd", "centered-sgd", "adam", "sgd"]
    assert "time to loss" in rows[0] and "x SGD step" in rows[0] and "reconstruction" not in rows[0]
    results = json.loads((out / "results.json").read_text())
    runs = results["optimizers"]
    assert runs["adam"]["options"]["lr"] == 0.01 and runs["sgd"]["options"]["weight_decay"] == 1e-5
    assert runs["kfac"]["options"]["weight_decay"] == 1e-5 and results["sgd_step_seconds"] > 0
    assert runs["kbfgs"]["options"]["weight_decay"] == runs["tnt"]["options"]["weight_decay"] == 1e-5  # every taker
    first = {run["curve"][0]["loss"] for run in runs.values()}
    assert len(first) == 1  # the same initial weights for every optimizer
    for run in runs.values():
        steps = [p["step"] for p in run["curve"]]
        assert run["steps"] == 12 and steps[0] == 0 and steps[-1] == 12 and steps == sorted(set(steps))
        assert run["time_to_target"] is not None and run["sgd_ratio"] > 0
        assert set(run["loss_at"]["step"]) == {"3", "6", "12"} and run["final"]["loss"] < run["curve"][0]["loss"]
    assert results["target_loss"] == max(run["final"]["loss"] for run in runs.values())


def test_paper_set_up_growing_batches_averaging_and_reconstruction_error(bench, data, tmp_path):
    out = tmp_path / "paper"
    result = bench("test_cli_bench:tiny_autoencoder", data["pixels"], "--target", "input", "--optimizers", "kfac,sgd",
                   "--steps", "8", "--average", "0.9", "--init", "sparse", "--option", "kfac.batch_schedule=exp",
                   "--option", "kfac.batch_start=16", "--option", "kfac.batch_growth=3", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "final reconstruction error" in result.stdout
    runs = json.loads((out / "results.json").read_text())["optimizers"]
    sizes = [p["batch_size"] for p in runs["kfac"]["curve"]]
    assert sizes[0] == 16 and sizes == sorted(sizes) and sizes[-1] == min(216, round(16 * math.exp(7 / 3)))
    assert {p["batch_size"] for p in runs["sgd"]["curve"]} == {32}
    for run in runs.values():
        for point in run["curve"]:
            assert point["loss"] == min(point["loss_current"], point["loss_averaged"])
            assert point["reconstruction"] == min(point["reconstruction_current"], point["reconstruction_averaged"])
        assert run["curve"][0]["loss_current"] == run["curve"][0]["loss_averaged"]


def test_batch_schedule_is_the_papers():
    exp = batch_schedule("exp", 512, 50_000, start=1000)
    assert exp(0) == 1000 and exp(499) == 50_000 and exp(2000) == 50_000
    assert all(exp(k) <= exp(k + 1) for k in range(600))
    assert exp(100) == round(1000 * math.exp(100 / (499 / math.log(50))))
    assert batch_schedule("exp", 512, 300, start=10, growth=2.0)(3) == round(10 * math.exp(1.5))
    assert batch_schedule("fixed", 512, 300)(7) == 300 and batch_schedule("fixed", 64, 300)(7) == 64


def test_scheduled_order_draws_whole_batches_from_seeded_epochs():
    fixed, plain = ScheduledOrder(100, lambda k: 30, seed=3), DataOrder(100, 30, seed=3)
    assert all(torch.equal(fixed.indices(k), plain.indices(k)) for k in range(10))
    growing = ScheduledOrder(100, lambda k: 10 * (k + 1), seed=3)
    batches = [growing.indices(k) for k in range(12)]
    assert [len(b) for b in batches] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 100, 100]
    assert all(len(set(b.tolist())) == len(b) for b in batches)  # no example twice in a batch
    assert sorted(batches[-1].tolist()) == list(range(100))
    assert torch.equal(growing.indices(4), batches[4])  # going back replays the same batch


def test_iterate_average_is_the_papers_exponential_average():
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    initial = module[0].weight.detach().clone()
    average = IterateAverage(module, xi=0.9)
    with torch.no_grad():
        module[0].weight.add_(1.0)
        average.update()
        module[0].weight.add_(1.0)
        average.update()
        module[1].running_mean.fill_(5.0)
    expected = 0.9 * (0.9 * initial + 0.1 * (initial + 1)) + 0.1 * (initial + 2)
    averaged = average.module()
    assert torch.allclose(averaged[0].weight, expected)
    assert torch.equal(averaged[1].running_mean, torch.full((2,), 5.0)) and averaged is not module


def test_interpolation_of_the_curve():
    curve = [{"time": 0.0, "step": 0, "loss": 100.0}, {"time": 2.0, "step": 10, "loss": 1.0}]
    assert value_at(curve, "time", 1.0) == pytest.approx(10.0)  # halfway in log(loss)
    assert value_at(curve, "step", 10) == 1.0 and value_at(curve, "time", 3.0) is None
    assert reach(curve, 10.0) == pytest.approx((1.0, 5.0)) and reach(curve, 0.5) is None
    assert reach(curve, 100.0) == (0.0, 0)


def _bad_inputs(data: dict[str, Path], full: Path) -> dict[str, tuple[list[str], str]]:
    return {
        "unknown optimizer": (["--optimizers", "kfac,lbfgs"], "unknown optimizer 'lbfgs'"),
        "optimizer twice": (["--optimizers", "adam,adam"], "twice"),
        "both budgets": (["--seconds", "5", "--steps", "3"], "--seconds and --steps both given"),
        "option without =": (["--option", "kfac.damping"], "KEY=VALUE"),
        "unknown option key": (["--option", "adam.learning_rate=1"], "unknown key 'learning_rate'"),
        "option of another optimizer": (["--optimizers", "adam", "--option", "adam.damping=3"], "setting of kfac"),
        "optimizer not listed": (["--optimizers", "adam", "--option", "sgd.lr=0.1"], "not in --optimizers"),
        "bad option value": (["--option", "kfac.stats_every=0"], "stats_every=0"),
        "out holds files": (["--out", str(full)], "already holds files"),
        "no data for a factory": (["--no-data"], "needs --data"),
        "data that does not fit": (["--data", str(data["pixels"]), "--target", "input"], "cannot run on --data"),
    }


def test_every_bad_input_is_one_error_line_and_exit_2(bench, data, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    for name, (args, fragment) in _bad_inputs(data, full).items():
        given = None if "--no-data" in args or "--data" in args else data["classes"]
        args = [a for a in args if a != "--no-data"] + ([] if "--out" in args else ["--out", str(tmp_path / "never")])
        budget = [] if "--seconds" in args else ["--steps", "2"]
        result = bench("factories:tiny_classifier", given, *budget, *args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], (name, result.stderr)
        assert not (tmp_path / "never").exists(), name
    assert [p.name for p in full.iterdir()] == ["notes.txt"]


def test_bad_input_in_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kronograph.cli", "bench", "mnist-autoencoder", "--seconds", "1",
                           "--steps", "1", "--out", str(tmp_path / "never")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error:"), done.stderr


def test_a_model_returning_a_dict_is_evaluated_on_its_logits(bench, data, tmp_path):
    """The evaluation puts the loss on the output compile chose ('logits' of the dict), averaged weights too."""
    out = tmp_path / "bench"
    result = bench("factories:dict_heads", data["classes"], "--optimizers", "kfac,adam", "--steps", "6",
                   "--average", "0.9", "--out", str(out))
    assert result.exit_code == 0, result.output
    for run in json.loads((out / "results.json").read_text())["optimizers"].values():
        assert all(math.isfinite(point["loss"]) for point in run["curve"])
        assert run["final"]["loss"] < run["curve"][0]["loss"]
