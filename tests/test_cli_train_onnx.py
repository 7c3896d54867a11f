"""`kronograph train` on the onnxruntime engine: an .onnx MODEL trained with K-FAC, SGD and Adam, --engine
onnxruntime on a factory (the same numbers as the torch engine), exact resume, and the inputs it refuses
(exit code 2, one `error:` line, nothing written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import factories
import kronograph
from kronograph.cli import train as train_module
from kronograph.cli.main import main
from kronograph.cli.optimizers import make_optimizer
from test_cli_train import PAPER, PNG, TESTS, data, metrics, whole_and_resumed, without_time  # noqa: F401 - data is a fixture

pytest.importorskip("onnxruntime.training.api")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    """tests/factories.py's tiny classifier (seed 0) as an .onnx file with a free batch axis."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    kronograph.compile(factories.tiny_classifier(), example_inputs=(torch.zeros(2, 6),)).export_onnx(path)
    return path


@pytest.fixture
def train(monkeypatch, data, onnx_model):
    monkeypatch.syspath_prepend(str(TESTS))

    def invoke(*args: str, model: str | None = None):
        extra = ["--data", str(data)] if "--data" not in args and "--resume" not in args else []
        return CliRunner().invoke(main, ["train", model or str(onnx_model), *extra, "--batch-size", "32", *args])

    return invoke


def _engine_output(model: Path, weights: dict[str, torch.Tensor], x: np.ndarray, workdir: Path) -> np.ndarray:
    """The onnxruntime engine's output for ``x`` with the given weights."""
    engine = kronograph.compile(str(model)).onnxruntime(workdir)
    engine.set_parameters({name: weights[name] for name in engine.trainable})
    return engine.forward([x])


@pytest.mark.parametrize("optimizer", [["kfac", "--damping", "0.1"], ["kbfgs", "--lr", "0.1"], ["sgd", "--lr", "0.2"],
                                       ["adam", "--lr", "0.05"]], ids=["kfac", "kbfgs", "sgd", "adam"])
def test_an_onnx_file_trains_with_each_optimizer(train, tmp_path, onnx_model, optimizer):
    out = tmp_path / "run"
    result = train("--optimizer", *optimizer, "--steps", "12", "--eval-every", "6", "--out", str(out))
    assert result.exit_code == 0, result.output
    records = metrics(out)
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 13)) and all(map(math.isfinite, losses))
    assert np.mean(losses[-4:]) < 0.9 * losses[0], losses  # the loss falls
    assert [r["step"] for r in records if "valid_loss" in r] == [6, 12]
    assert json.loads((out / "run.json").read_text())["engine"] == "onnxruntime"
    assert "engine onnxruntime" in result.stdout
    for name in ("loss_vs_step.png", "loss_vs_time.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert (out / "onnxruntime").is_dir()  # the engine's artifacts stay in the run folder
    # model.safetensors holds the trained weights by ONNX names; model.onnx computes what the engine computes.
    weights = load_file(str(out / "model.safetensors"))
    initial = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(onnx_model)).graph.initializer}
    assert set(initial) <= set(weights) and not np.allclose(weights["0.weight"].numpy(), initial["0.weight"])
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, _engine_output(onnx_model, weights, x, tmp_path / "engine"), rtol=1e-5, atol=1e-6)


def test_engine_onnxruntime_on_a_factory_matches_the_torch_engine(train, tmp_path, onnx_model):
    runs = {}
    for engine in ("torch", "onnxruntime"):
        runs[engine] = tmp_path / engine
        result = train("--optimizer", "sgd", "--lr", "0.2", "--steps", "6", "--eval-every", "3", "--engine", engine,
                       "--out", str(runs[engine]), model="factories:tiny_classifier")
        assert result.exit_code == 0, result.output
        assert f"engine {engine}" in result.stdout
    torch_run, ort_run = (without_time(metrics(runs[e])) for e in ("torch", "onnxruntime"))
    for a, b in zip(torch_run, ort_run, strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        np.testing.assert_allclose([a["loss"], a.get("valid_loss", 0)], [b["loss"], b.get("valid_loss", 0)], rtol=1e-4)
    a, b = (load_file(str(runs[e] / "model.safetensors")) for e in ("torch", "onnxruntime"))
    assert set(a) <= set(b)  # the engine's names are the module's
    for name in a:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=1e-4, atol=1e-6)
    assert not (runs["torch"] / "onnxruntime").exists()
    # A torch run does not continue on the ONNX file, which trains on onnxruntime only.
    result = train("--resume", str(runs["torch"]), "--steps", "8", model=str(onnx_model))
    assert result.exit_code == 2 and "trained on the torch engine" in result.stderr, result.output


def test_resume_of_an_onnxruntime_kfac_run_gives_the_metrics_of_an_uninterrupted_run(train, tmp_path):
    common = ("--damping", "0.1", "--eval-every", "2", "--checkpoint-every", "3", "--seed", "3")
    whole, parts = whole_and_resumed(train, tmp_path, common, 7)
    assert without_time(metrics(parts)) == without_time(metrics(whole))
    assert any("rho" in r for r in metrics(parts)[3:])  # the adaptive damping ran after the resume point
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(parts / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_growing_batches_and_averaging_on_onnxruntime_resume_exactly_and_write_the_average(train, tmp_path, onnx_model,
                                                                                         monkeypatch):
    steps, xi = [], 0.9
    save = train_module.save_checkpoint

    def recording(run_dir, weights, state):  # the current weights at every checkpoint
        steps.append({name: tensor.clone() for name, tensor in weights.items()})
        return save(run_dir, weights, state)

    monkeypatch.setattr(train_module, "save_checkpoint", recording)
    common = (*PAPER, "--damping", "0.1", "--eval-every", "2", "--seed", "3")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train("--steps", "7", "--checkpoint-every", "1", "--out", str(whole), *common).exit_code == 0
    assert train("--steps", "3", "--checkpoint-every", "3", "--out", str(parts), *common).exit_code == 0
    result = train("--resume", str(parts), "--steps", "7")
    assert result.exit_code == 0, result.output
    assert without_time(metrics(parts)) == without_time(metrics(whole))
    assert [r["batch_size"] for r in metrics(whole)] == [round(8 * math.exp(k / 2)) for k in range(7)]
    assert [r["step"] for r in metrics(whole) if "valid_loss_average" in r] == [2, 4, 6]
    written = load_file(str(whole / "model.safetensors"))
    assert all(torch.equal(written[name], value) for name, value in load_file(str(parts / "model.safetensors")).items())
    average = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
               for t in onnx.load(str(onnx_model)).graph.initializer}
    for weights in steps[:7]:  # the uninterrupted run's steps 1..7
        average = {name: xi * value + (1 - xi) * weights[name] for name, value in average.items()}
    for name, value in average.items():
        torch.testing.assert_close(written[name], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(written["0.weight"], steps[6]["0.weight"])  # not the last step's weights
    session = onnxruntime.InferenceSession(str(whole / "model.onnx"))
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, _engine_output(onnx_model, written, x, tmp_path / "engine"), rtol=1e-5, atol=1e-6)


def test_bad_inputs_for_an_onnx_model_are_one_error_line_and_exit_2(train, tmp_path, onnx_model):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=40)
    np.savez(tmp_path / "wide.npz", x=rng.normal(size=(40, 4)).astype(np.float32), y=labels)
    np.savez(tmp_path / "labels.npz", x=rng.normal(size=(40, 6)).astype(np.float32), y=labels + 3)
    fixed = tmp_path / "fixed.onnx"
    proto = onnx.load(str(onnx_model))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a batch size of 1 baked in
    onnx.save(proto, str(fixed))
    cases = {
        "torch engine": (["--engine", "torch"], None, "trains on the onnxruntime engine only"),
        "examples of another size": (["--data", str(tmp_path / "wide.npz")], None, "each example has 4 values"),
        "input shape onnxruntime refuses": (["--data", str(tmp_path / "wide.npz"), "--input-shape", "1,4"], None,
                                            "Got: 4 Expected: 6"),
        "labels out of range": (["--data", str(tmp_path / "labels.npz")], None, "labels must lie in [0, 2]"),
        "fixed batch axis": ([], str(fixed), "fixed batch size of 1"),
        "missing file": ([], str(tmp_path / "absent.onnx"), "model file not found"),
    }
    for name, (args, model, fragment) in cases.items():
        result = train(*args, "--out", str(tmp_path / "never" / "run"), model=model)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], (name, result.stderr)
        assert not (tmp_path / "never").exists(), name  # a failed run leaves nothing, the engine's files included


def test_adam_on_onnxruntime_skips_a_non_finite_step(onnx_model, tmp_path):
    compiled = kronograph.compile(str(onnx_model))
    optimizer = make_optimizer("adam", compiled)
    before = {name: value.clone() for name, value in compiled.state_dict().items()}
    x = torch.zeros(4, 6)
    x[1, 2] = float("nan")
    info = optimizer.step(x, torch.tensor([0, 1, 2, 0]))
    assert "non-finite" in info["skipped"]
    assert all(torch.equal(before[name], value) for name, value in compiled.state_dict().items())
    info = optimizer.step(torch.ones(4, 6), torch.tensor([0, 1, 2, 0]))
    assert "skipped" not in info and not torch.equal(before["0.weight"], compiled.state_dict()["0.weight"])
