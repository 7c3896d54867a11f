"""What `kronograph bench` reports: the table (stdout and table.md), results.json and the two PNG plots.

Values between two evaluations are interpolated linearly in log(loss) (in the loss itself where a value is
not positive): "loss at 45 s" is the curve at 45 s, and "time to loss X" is where the curve first crosses X.
The marks are 1/4, 1/2 and all of the budget (a step budget's time marks: of the shortest run; a time
budget's step marks: of the run with the fewest steps), so that every row has a value in every column.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kronograph.cli.bench_run import Budget
from kronograph.cli.checkpoint import atomic_write
from kronograph.cli.plots import json_value, plot_curves

FRACTIONS = (0.25, 0.5, 1.0)
FILES = ("table.md", "results.json", "loss_vs_time.png", "loss_vs_iterations.png")
_AXES = {"time": ("loss_vs_time.png", "seconds (optimizer time)"), "step": ("loss_vs_iterations.png", "iterations")}


def _between(y0: float, y1: float, share: float) -> float:
    if y0 > 0 and y1 > 0:
        return math.exp(math.log(y0) + share * (math.log(y1) - math.log(y0)))
    return y0 + share * (y1 - y0)


def value_at(curve: Sequence[Mapping[str, Any]], axis: str, mark: float, key: str = "loss") -> float | None:
    """The curve's ``key`` at ``axis`` ("time" or "step") = ``mark``; None beyond its last point."""
    for before, after in zip(curve, curve[1:]):
        if before[axis] <= mark <= after[axis]:
            span = after[axis] - before[axis]
            return _between(before[key], after[key], (mark - before[axis]) / span if span else 1.0)
    return curve[0][key] if curve and mark <= curve[0][axis] else None


def reach(curve: Sequence[Mapping[str, Any]], target: float, key: str = "loss") -> tuple[float, float] | None:
    """(seconds, step) where the curve first comes down to ``target``; None if it never does."""
    for index, point in enumerate(curve):
        if point[key] is not None and point[key] <= target:
            if index == 0:
                return point["time"], point["step"]
            before = curve[index - 1]
            y0, y1 = before[key], point[key]
            if y0 > 0 and target > 0 and y1 > 0:
                share = (math.log(y0) - math.log(target)) / (math.log(y0) - math.log(y1)) if y0 != y1 else 1.0
            else:
                share = (y0 - target) / (y0 - y1) if y0 != y1 else 1.0
            return (before["time"] + share * (point["time"] - before["time"]),
                    before["step"] + share * (point["step"] - before["step"]))
    return None


def marks(results: Mapping[str, Mapping[str, Any]], budget: Budget) -> dict[str, list[float]]:
    """The wall-time and step marks of the table's columns."""
    seconds = budget.seconds if budget.seconds is not None else min(r["seconds"] for r in results.values())
    steps = budget.steps if budget.steps is not None else min(r["steps"] for r in results.values())
    return {"time": [float(f"{f * seconds:.3g}") for f in FRACTIONS],
            "step": sorted({max(1, round(f * steps)) for f in FRACTIONS})}


def summarise(results: dict[str, dict[str, Any]], budget: Budget, sgd_seconds: float, target: float | None) -> float:
    """Add each run's figures (per-step time, SGD ratio, loss at the marks, time to target, final values) to
    ``results``; returns the target used (default: the worst finite final loss, which every finite run reaches)."""
    if target is None:  # NaN when every run diverged: then no one reaches it
        finals = [r["curve"][-1]["loss"] for r in results.values() if math.isfinite(r["curve"][-1]["loss"])]
        target = max(finals, default=math.nan)
    columns = marks(results, budget)
    for result in results.values():
        curve = result["curve"]
        result["seconds_per_step"] = result["seconds"] / max(1, result["steps"])
        result["sgd_ratio"] = result["seconds_per_step"] / sgd_seconds if sgd_seconds > 0 else None
        result["loss_at"] = {axis: {f"{m:g}": value_at(curve, axis, m) for m in values} for axis, values in columns.items()}
        reached = reach(curve, target)
        result["time_to_target"], result["step_to_target"] = reached if reached else (None, None)
        result["final"] = {key: value for key, value in curve[-1].items() if key not in ("step", "time", "examples")}
    return target


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}g}"


def table(results: Mapping[str, Mapping[str, Any]], target: float) -> str:
    """The Markdown table: one row per optimizer."""
    any_result = next(iter(results.values()))
    columns = {axis: list(values) for axis, values in any_result["loss_at"].items()}
    recon = "reconstruction" in any_result["final"]
    header = ["optimizer", "steps", "ms/step", "x SGD step", *(f"loss at {m} s" for m in columns["time"]),
              *(f"loss at step {m}" for m in columns["step"]), f"time to loss {_number(target)}", "final loss"]
    header += ["final reconstruction error"] if recon else []
    rows = []
    for name, r in results.items():
        reached = "-" if r["time_to_target"] is None else f"{r['time_to_target']:.3g} s (step {r['step_to_target']:.0f})"
        row = [name, str(r["steps"]), _number(1000 * r["seconds_per_step"], 3), _number(r["sgd_ratio"], 3),
               *(_number(r["loss_at"]["time"][m]) for m in columns["time"]),
               *(_number(r["loss_at"]["step"][m]) for m in columns["step"]), reached, _number(r["final"]["loss"])]
        rows.append(row + ([_number(r["final"]["reconstruction"])] if recon else []))
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return json_value(value)


def write(out: Path, caption: str, results: dict[str, dict[str, Any]], target: float, about: dict[str, Any]) -> list[Path]:
    """DIR/table.md, DIR/results.json and the two plots (log y axis); returns their paths."""
    text = f"{caption}\n\n{table(results, target)}\n"
    paths = [atomic_write(out / "table.md", lambda temp: temp.write_text(text, encoding="utf-8"))]
    document = _clean({**about, "target_loss": target, "optimizers": results})
    paths.append(atomic_write(out / "results.json", lambda temp: temp.write_text(json.dumps(document, indent=1))))
    for axis, (filename, label) in _AXES.items():
        curves = {name: [(p[axis], p["loss"]) for p in r["curve"]] for name, r in results.items()}
        paths.append(plot_curves(curves, out / filename, label, f"training loss ({about['loss']})", about["title"]))
    return paths
