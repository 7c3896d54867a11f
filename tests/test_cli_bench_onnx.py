"""`kronograph bench` on the onnxruntime engine: an .onnx MODEL benched with K-FAC, Adam and SGD from the same
weights, --engine onnxruntime on a factory (the torch engine's numbers, iterate averaging included), and the
inputs it refuses (exit code 2, one `error:` line, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kronograph.cli.bench_report import FILES
from test_cli_bench import PNG, bench, data  # noqa: F401 - bench and data are fixtures
from test_cli_train_onnx import onnx_model  # noqa: F401 - a fixture

pytest.importorskip("onnxruntime.training.api")


def test_an_onnx_file_benches_kfac_adam_and_sgd_from_the_same_weights(bench, data, onnx_model, tmp_path):
    out = tmp_path / "bench"
    result = bench(str(onnx_model), data["classes"], "--optimizers", "kfac,adam,sgd", "--steps", "10",
                   "--option", "kfac.damping=0.1", "--option", "adam.lr=0.05", "--option", "sgd.lr=0.2",
                   "--out", str(out))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == set(FILES)  # the engines' artifacts are removed at the end
    for name in ("loss_vs_time.png", "loss_vs_iterations.png"):
        assert (out / name).read_bytes()[:8] == PNG
    table = (out / "table.md").read_text()
    assert table.strip() in result.stdout and "engine onnxruntime" in table
    results = json.loads((out / "results.json").read_text())
    runs = results["optimizers"]
    assert results["engine"] == "onnxruntime" and list(runs) == ["kfac", "adam", "sgd"]
    assert len({run["curve"][0]["loss"] for run in runs.values()}) == 1  # the same initial weights for every optimizer
    for name, run in runs.items():
        losses = [point["loss"] for point in run["curve"]]
        assert run["steps"] == 10 and run["curve"][-1]["step"] == 10 and run["sgd_ratio"] > 0
        assert losses[-1] < 0.9 * losses[0], (name, losses)  # the loss falls


def test_engine_onnxruntime_on_a_factory_gives_the_torch_engines_numbers(bench, data, tmp_path):
    curves = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path / engine
        result = bench("factories:tiny_classifier", data["classes"], "--optimizers", "sgd", "--steps", "6",
                       "--option", "sgd.lr=0.2", "--average", "0.5", "--engine", engine, "--out", str(out))
        assert result.exit_code == 0, result.output
        assert f"engine {engine}" in result.stdout
        curves[engine] = json.loads((out / "results.json").read_text())["optimizers"]["sgd"]["curve"]
    keys = ("loss", "loss_current", "loss_averaged")
    for a, b in zip(curves["torch"], curves["onnxruntime"], strict=True):
        assert a["step"] == b["step"]
        np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=1e-4)
        np.testing.assert_allclose(a["batch_loss"] or 0, b["batch_loss"] or 0, rtol=1e-4)
    last = curves["onnxruntime"][-1]
    assert last["step"] == 6 and last["loss_averaged"] > last["loss_current"]  # the average lags the weights


def test_bad_inputs_for_an_onnx_bench_are_one_error_line_and_exit_2(bench, data, onnx_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "torch engine": (None, ["--engine", "torch"], "trains on the onnxruntime engine only"),
        "init of a module": (None, ["--init", "sparse"], "drop --init"),
        "missing file": (tmp_path / "absent.onnx", [], "model file not found"),
        "data the graph refuses": (None, ["--data", str(data["pixels"]), "--target", "input", "--input-shape", "1,8"],
                                   "Got: 8 Expected: 6"),
    }
    for name, (model, args, fragment) in cases.items():
        given = None if "--data" in args else data["classes"]
        for out in (tmp_path / "never" / "bench", empty):
            result = bench(str(model or onnx_model), given, *args, "--steps", "2", "--out", str(out))
            lines = result.stderr.strip().splitlines()
            assert result.exit_code == 2, (name, result.output)
            assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], (name, result.stderr)
        assert not (tmp_path / "never").exists() and not any(empty.iterdir()), name  # the engine's files included
