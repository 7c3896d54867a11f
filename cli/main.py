"""The `kronograph` command: inspect, compile, train and bench."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import click

import kronograph
from kronograph.cli.bench import bench
from kronograph.cli.builtins import BUILTINS
from kronograph.cli.models import resolve_model, verbose
from kronograph.cli.report import format_plan, summary
from kronograph.cli.torchrun import rank_prefix
from kronograph.cli.train import train
from kronograph.errors import KronographError
from kronograph.passes.instrument import instrument

_MODEL_HELP = "MODEL is an .onnx path, package.module:factory (with --input-shape), or a built-in: " + ", ".join(
    BUILTINS
)
_input_shape = click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    help="Shape of an example input, like 1,3,32,32 (repeat for several inputs).",
)
_input_dtype = click.option(
    "--input-dtype",
    type=click.Choice(["float32", "float64", "int64"]),
    default="float32",
    show_default=True,
    help="Element type of the example inputs (int64 for token ids).",
)
_loss = click.option(
    "--loss",
    type=click.Choice(["cross_entropy", "sigmoid_cross_entropy", "mse"]),
    default=None,
    help="Loss the model is trained with (default: the built-in's own, else cross_entropy).",
)


def _compile(model: str, input_shapes: tuple[str, ...], input_dtype: str, loss: str | None):
    resolved = resolve_model(model, input_shapes, input_dtype)
    return kronograph.compile(resolved.model, example_inputs=resolved.example_inputs, loss=loss or resolved.default_loss,
                              verbose=verbose())


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Command(click.Group):
    """The root group: bad input ends with one line on stderr and exit code 2, never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ARG002
        self.argv = list(sys.argv[1:] if args is None else args)  # what `train --nproc N` runs again under torchrun
        try:
            return super().main(args, prog_name or "kronograph", complete_var, standalone_mode=False, **extra)
        except KronographError as error:
            click.echo(f"error: {rank_prefix()}{error}", err=True)
            sys.exit(2)
        except _NO_ARGS_IS_HELP as error:
            click.echo(error.ctx.get_help() if error.ctx else str(error))
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx else "kronograph"
            click.echo(f"error: {error.format_message().rstrip('.')}; see `{command} --help`", err=True)
            sys.exit(2)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)


@click.group(cls=_Command, help=f"Compile models into Kronecker-factored graphs and train them with K-FAC.\n\n{_MODEL_HELP}")
@click.version_option(package_name="kronograph")
@click.option("--verbose", is_flag=True,
              help="Show torch's exporter output: warnings, progress and the graph dumps of a failed trace.")
def main(verbose: bool) -> None:  # noqa: ARG001 - the commands read it through cli.models.verbose()
    pass


@main.command(help=f"List the layers that get a Kronecker-factored block and the parameters that do not. {_MODEL_HELP}")
@click.argument("model")
@_input_shape
@_input_dtype
@_loss
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def inspect(model: str, input_shapes: tuple[str, ...], input_dtype: str, loss: str | None, as_json: bool) -> None:
    compiled = _compile(model, input_shapes, input_dtype, loss)
    if as_json:
        click.echo(json.dumps({"model": model, "engine": compiled.engine, "loss": compiled.loss,
                               "summary": summary(compiled.plan), **compiled.plan.to_dict()}, indent=2))
    else:
        click.echo(format_plan(compiled.plan, f"{model} (engine {compiled.engine})"))


@main.command(help=f"Write the plan, the graph and the instrumented onnxruntime-training graphs to DIR. {_MODEL_HELP}")
@click.argument("model")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@_input_shape
@_input_dtype
@_loss
def compile(model: str, out_dir: Path, input_shapes: tuple[str, ...], input_dtype: str, loss: str | None) -> None:  # noqa: A001
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise KronographError(f"output folder {out_dir} exists and is not empty; choose a new folder or empty it")
    compiled = _compile(model, input_shapes, input_dtype, loss)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build everything in a sibling folder and move it into place at the end: a failure leaves nothing half-written.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (staging / "plan.json").write_text(compiled.plan.to_json(indent=2))
        compiled.export_onnx(staging / "model.onnx")
        instrument(compiled.graph, compiled.plan, compiled.loss, staging / "training")
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    click.echo(
        f"wrote {out_dir}/: plan.json, model.onnx (inference) and training/ (onnxruntime-training graphs with taps); "
        f"{len(compiled.layers)} layers, {len(compiled.unmatched)} unmatched parameters"
    )


main.add_command(train)  # train and bench live in their own modules (they are most of the CLI)
main.add_command(bench)
