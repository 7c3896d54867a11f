"""`kronograph inspect` and `kronograph compile`, through click's runner and through a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from click.testing import CliRunner

from kronograph import LayerPlan, Unmatched
from kronograph.cli.main import main
from kronograph.cli.report import format_plan

TESTS = Path(__file__).parent


@pytest.fixture
def run(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))

    def invoke(*args: str):
        return CliRunner().invoke(main, list(args))

    return invoke


def test_inspect_table_of_the_builtin_autoencoder(run):
    result = run("inspect", "mnist-autoencoder")
    assert result.exit_code == 0, result.output
    assert "8 Kronecker-factored layers, 0 unmatched parameters" in result.output
    assert "1000x784 +b" in result.output and "785x785" in result.output


def test_inspect_json_of_a_factory(run):
    result = run("inspect", "factories:mlp", "--input-shape", "4,6", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [layer["name"] for layer in data["layers"]] == ["0", "2"]
    assert data["summary"]["layers"] == 2 and data["engine"] == "torch"
    assert data["layers"][0]["weight_shape"] == [8, 6]


def test_inspect_lists_unmatched_with_reasons(run):
    result = run("inspect", "cnn")
    assert result.exit_code == 0, result.output
    assert "4 Kronecker-factored layers" in result.output


def test_compile_writes_plan_graph_and_training_artifacts(run, tmp_path):
    out = tmp_path / "compiled"
    result = run("compile", "factories:mlp", "--input-shape", "4,6", "-o", str(out))
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["layers"]) == 2
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    training = [path.name for path in (out / "training").iterdir()]
    assert any(name.startswith("training_model") for name in training), training
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_the_plan_records_the_output_the_loss_is_put_on(run, tmp_path):
    out = tmp_path / "compiled"
    result = run("compile", "factories:dict_heads", "--input-shape", "4,6", "-o", str(out))
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["output"] == "'logits' of the model's dict"
    assert LayerPlan.from_json(json.dumps(plan)).output == plan["output"]
    shown = run("inspect", "factories:dict_heads", "--input-shape", "4,6")
    assert shown.exit_code == 0 and "loss on: 'logits' of the model's dict" in shown.output, shown.output


def test_an_old_plan_without_output_still_loads():
    old = LayerPlan((), (Unmatched("w", (2, 3), "not matched"),), parameters=("w",)).to_dict()
    del old["output"]  # plans written before the field existed
    plan = LayerPlan.from_json(json.dumps(old))
    assert plan.output == "" and plan.unmatched[0].shape == (2, 3)
    assert "loss on" not in format_plan(plan, "old")


def test_compile_refuses_a_non_empty_folder_and_keeps_it(run, tmp_path):
    out = tmp_path / "compiled"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("compile", "factories:mlp", "--input-shape", "4,6", "-o", str(out))
    assert result.exit_code == 2
    assert "not empty" in result.output
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "missing.onnx"], "model file not found"),
        (["inspect", "no-such-model"], "unknown MODEL"),
        (["inspect", "factories:mlp"], "needs --input-shape"),
        (["inspect", "factories:mlp", "--input-shape", "4,x"], "not a list of integers"),
        (["inspect", "factories:mlp", "--input-shape", "4,5"], "could not trace"),
        (["inspect", "factories:broken", "--input-shape", "4,6"], "config file is missing"),
        (["inspect", "factories:not_a_module", "--input-shape", "4,6"], "not a torch.nn.Module"),
        (["inspect", "no_such_package:build", "--input-shape", "4,6"], "cannot import"),
        (["inspect", "cnn", "--no-such-flag"], "No such option"),
        (["inspect", "cnn", "--loss", "hinge"], "hinge"),
        (["compile", "cnn"], "Missing option"),
    ],
)
def test_bad_input_exits_2_with_one_line(run, args, message):
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]


def test_not_an_onnx_file(run, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("this is text")
    result = run("inspect", str(path))
    assert result.exit_code == 2 and "ONNX" in result.output


def test_compile_of_an_op_without_gradient_fails_cleanly(run, tmp_path):
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Swish", ["h"], ["y"], domain="my.ops")]
    graph = helper.make_graph(
        nodes,
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "custom.onnx"))
    assert run("inspect", str(tmp_path / "custom.onnx")).exit_code == 0  # the plan does not need the op
    result = run("compile", str(tmp_path / "custom.onnx"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "my.ops:Swish" in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"], "a failed compile left files behind"


def test_real_process_exit_codes_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    command = [sys.executable, "-m", "kronograph.cli", "inspect", "factories:broken", "--input-shape", "2,6"]
    failed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.strip().startswith("error: ") and "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    command = [sys.executable, "-m", "kronograph.cli", "inspect", "factories:mlp", "--input-shape", "2,6", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["layers"] == 2
