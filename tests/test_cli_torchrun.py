"""`kronograph train` on two CPU processes (gloo): `--nproc 2` and `python -m torch.distributed.run` directly.

Process start-up and compiling dominate the time, so one module fixture starts three runs and the tests read
what they left: an uninterrupted run of 6 steps (torchrun); the same run through `--nproc 2` with rank 1 made
to fail as it starts step 5 (the test hook KRONOGRAPH_TEST_FAIL_AT, cli/torchrun.py), which leaves the
checkpoint of step 3; and that run resumed on two processes (torchrun). A copy of the failed run's folder is
resumed on one process in this one. What is refused on several processes is checked without starting any.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kronograph.cli.checkpoint import load_checkpoint
from kronograph.cli.main import main
from kronograph.cli.torchrun import FAIL_AT, without_nproc

from factories import write_tiny_data

TESTS = Path(__file__).parent
MODEL = "factories:tiny_classifier"
RUN = ("--batch-size", "32", "--steps", "6", "--checkpoint-every", "3", "--eval-every", "3", "--seed", "3")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
#: A run that hung until a collective's timeout would take --dist-timeout (300 s) past its start-up.
LIMIT = 240
FILES = {"metrics.jsonl", "run.json", "checkpoint", "loss_vs_step.png", "loss_vs_time.png", "model.onnx",
         "model.safetensors"}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "step_time")} for r in records]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _launch(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` in the empty folder ``cwd``; past LIMIT seconds it gets SIGTERM (which `--nproc` passes on
    to torchrun, which stops its ranks) and the result's returncode is None."""
    cwd.mkdir()
    began = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        out, err = child.communicate(timeout=LIMIT)
        code = child.returncode
    except subprocess.TimeoutExpired:
        child.terminate()
        try:
            out, err = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
        code = None
    return subprocess.CompletedProcess(command, code, out, err), time.perf_counter() - began


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("torchrun")
    env = {key: value for key, value in os.environ.items()
           if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", FAIL_AT)}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    train = ["-m", "kronograph.cli", "train", MODEL]
    whole, parts, single = root / "whole", root / "parts", root / "single"
    result = SimpleNamespace(root=root, whole=whole, parts=parts, single=single)
    result.whole_run, _ = _launch([*TORCHRUN, *train, "--data", str(data), *RUN, "--out", str(whole)],
                                  root / "cwd-whole", env)
    result.failed_run, result.failed_seconds = _launch(
        [sys.executable, *train, "--data", str(data), *RUN, "--out", str(parts), "--nproc", "2", "--dist-timeout", "300"],
        root / "cwd-failed", {**env, FAIL_AT: "1:5"})
    if parts.exists():
        shutil.copytree(parts, single)  # the failed run as it was left, for the one-process resume
    result.resumed_run, _ = _launch([*TORCHRUN, *train, "--resume", str(parts)], root / "cwd-resumed", env)
    return result


def test_a_two_process_run_writes_one_run_folder_with_one_checkpoint(runs):
    done, out = runs.whole_run, runs.whole
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == FILES  # no second folder, no staging or temp files
    assert {p.name for p in (out / "checkpoint").iterdir()} == {"model.safetensors", "state.pt"}
    assert not any((runs.root / "cwd-whole").iterdir())  # rank 1 wrote nothing anywhere
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # one line per step: rank 0's
    assert [r["step"] for r in records if "valid_loss" in r] == [3, 6]
    assert all(r["batch_size"] == 32 and np.isfinite(r["loss"]) for r in records)  # the global batch
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    _, state = load_checkpoint(out)
    assert state["step"] == 6 and "processes" not in state["settings"]  # a single process's checkpoint
    assert done.stdout.count("kfac on 2 processes") == 1 and done.stderr.count("training ") == 1
    assert "Traceback" not in done.stderr


def test_a_failing_rank_ends_the_run_with_its_error_instead_of_a_hang(runs):
    done = runs.failed_run
    assert done.returncode is not None, f"still running after {LIMIT} s: {done.stderr}"
    assert done.returncode != 0
    assert "error: rank 1 of 2: RuntimeError: KRONOGRAPH_TEST_FAIL_AT asked rank 1 of 2 to fail at step 5" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("error: the run on 2 processes failed")  # --nproc's
    _, state = load_checkpoint(runs.single)  # the copy of the failed run's folder: its checkpoint of step 3
    assert state["step"] == 3 and [r["step"] for r in metrics(runs.single)][:4] == [1, 2, 3, 4]


def test_resume_on_two_processes_ends_with_the_weights_of_the_uninterrupted_run(runs):
    done = runs.resumed_run
    assert done.returncode == 0, done.stderr
    assert "steps 4..6" in done.stderr
    assert without_time(metrics(runs.parts)) == without_time(metrics(runs.whole))  # step 4's line redone once
    for name in ("model.safetensors", "checkpoint/model.safetensors"):
        a, b = weights(runs.whole / name), weights(runs.parts / name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    assert {p.name for p in runs.parts.iterdir()} == FILES


def test_a_two_process_checkpoint_resumes_on_one_process(runs, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", FAIL_AT):
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(main, ["train", MODEL, "--resume", str(runs.single)])
    assert result.exit_code == 0, result.output
    assert "kfac on 2 processes" not in result.stdout
    records, whole = metrics(runs.single), metrics(runs.whole)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert without_time(records[:3]) == without_time(whole[:3])
    # the same steps, summed over one process instead of two: equal to float32 rounding
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in whole], rtol=1e-4)
    a, b = weights(runs.whole / "model.safetensors"), weights(runs.single / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)
    assert "processes" not in json.loads((runs.single / "run.json").read_text())


def test_only_kfac_on_the_torch_engine_runs_on_several_processes(data, tmp_path, monkeypatch):
    """Refused with exit code 2 and one `error:` line, before any process starts or any file is written."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nproc.toml").write_text("nproc = 2\n")

    def train(*args: str):
        return CliRunner().invoke(main, ["train", MODEL, "--data", str(data), "--out", str(tmp_path / "never"),
                                         "--steps", "2", *args])

    cases = [
        (["--optimizer", "adam", "--nproc", "2"], "runs --optimizer kfac on the torch engine only so far, not --optimizer adam"),
        (["--engine", "onnxruntime", "--nproc", "2"], "not the onnxruntime engine"),
        (["--config", str(tmp_path / "nproc.toml")], "unknown key 'nproc'"),
    ]
    for args, fragment in cases:
        result = train(*args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (args, result.output)
        assert fragment in lines[0], (args, lines[0])
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts rank 0 (nothing connects: refused before that)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for args, fragment in [(["--optimizer", "sgd"], "error: rank 0 of 2: kronograph train on 2 processes"),
                           (["--nproc", "2"], "already runs under it (WORLD_SIZE=2)"),
                           (["--batch-size", "1"], "batches of 1 examples are smaller than the 2 processes")]:
        result = train(*args)
        assert result.exit_code == 2 and fragment in result.stderr, (args, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nproc.toml"]


def test_nproc_is_taken_out_of_the_relaunched_command_line():
    assert without_nproc(["train", "m", "--nproc", "2", "--steps", "3", "--nproc=4"]) == ["train", "m", "--steps", "3"]
