"""`kronograph --verbose` and `kronograph.compile(..., verbose=True)` (issue 11, item 6): torch's exporter output is
silenced by default and shown on request; a failure still ends with one error line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import mlp, value_branch

import kronograph
from kronograph.cli.main import main

TESTS = Path(__file__).parent

BRANCH = "x.sum() > 0"  # the line of factories.value_branch's forward that torch's graph dumps quote


def _kronograph(*args: str) -> subprocess.CompletedProcess:
    """A real process: torch's loggers write to the process's stderr, which click's runner does not capture."""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "kronograph.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_failed_trace_is_one_line_by_default_and_torchs_dump_with_verbose():
    args = ("inspect", "factories:value_branch", "--input-shape", "4,3")
    quiet = _kronograph(*args)
    assert quiet.returncode == 2 and quiet.stdout == ""
    lines = quiet.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "torch.where or torch.cond" in lines[0], quiet.stderr
    assert BRANCH not in quiet.stderr and "def forward" not in quiet.stderr

    loud = _kronograph("--verbose", *args)
    assert loud.returncode == 2 and loud.stdout == ""
    *torch_output, last = loud.stderr.strip().splitlines()
    assert last == lines[0], loud.stderr  # the same clean error, last
    assert any(BRANCH in line for line in torch_output), loud.stderr  # torch's graph dump of the failed trace
    assert "Traceback" not in loud.stderr


def test_verbose_output_goes_to_stderr_and_json_stays_parseable():
    result = CliRunner().invoke(main, ["--verbose", "inspect", "cnn", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["layers"] == 4
    assert result.stderr.strip(), "torch's progress lines should show on stderr"
    quiet = CliRunner().invoke(main, ["inspect", "cnn", "--json"])
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.output


def test_compile_is_quiet_by_default_and_verbose_on_request(capfd, tmp_path):
    x = torch.randn(4, 6)
    kronograph.compile(mlp(), (x,)).export_onnx(tmp_path / "quiet.onnx")
    assert capfd.readouterr().err == ""
    cm = kronograph.compile(mlp(), (x,), verbose=True)
    assert capfd.readouterr().err != ""
    cm.export_onnx(tmp_path / "loud.onnx")  # exporting again keeps compile's choice
    assert capfd.readouterr().err != ""
    with pytest.raises(kronograph.KronographError, match="torch.where or torch.cond"):
        kronograph.compile(value_branch(), (torch.randn(4, 3),), verbose=True)
    assert BRANCH in capfd.readouterr().err
