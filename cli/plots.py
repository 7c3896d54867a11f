"""The run's metrics file (JSON lines) and the PNG plots drawn from it: loss against steps and against seconds;
and the comparison plots of `kronograph bench` (one line per optimizer).

The plots are drawn from ``metrics.jsonl`` alone, so a resumed run's plots cover the whole run and any
run folder can be re-plotted. matplotlib's Agg backend: no display is needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kronograph.cli.checkpoint import atomic_write

METRICS = "metrics.jsonl"
PLOTS = {"step": "loss_vs_step.png", "time": "loss_vs_time.png"}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (a crash while writing it) is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def json_value(value: Any) -> Any:
    """Numbers as JSON takes them: non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return json_value(value.item())
    return value


def _finite(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _save_plot(path: Path, draw: Callable[[Any], list[float]], xlabel: str, ylabel: str, title: str) -> Path:
    """One PNG: ``draw(axis)`` plots and returns the values on the y axis, which is logarithmic when all are
    positive; grid, labels, legend; written atomically (matplotlib's Agg backend: no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    try:
        values = draw(axis)
        if values and min(values) > 0:
            axis.set_yscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
        figure.tight_layout()
        return atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=110))
    finally:
        plt.close(figure)


def plot_metrics(records: Sequence[dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """Write DIR/loss_vs_step.png and DIR/loss_vs_time.png (training loss, and validation loss where
    evaluated); the loss axis is logarithmic when every value is positive."""
    train = [r for r in records if _finite([r.get("loss")])]
    valid = [r for r in records if _finite([r.get("valid_loss")])]
    written = []
    for axis_key, filename in PLOTS.items():
        def draw(axis: Any, key: str = axis_key) -> list[float]:
            axis.plot([r[key] for r in train], [r["loss"] for r in train], label="training loss (batch)", lw=1)
            if valid:
                axis.plot([r[key] for r in valid], [r["valid_loss"] for r in valid], "o-", label="validation loss", ms=3)
            return [r["loss"] for r in train] + [r["valid_loss"] for r in valid]

        written.append(_save_plot(out_dir / filename, draw, "step" if axis_key == "step" else "seconds", "loss", title))
    return written


def plot_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: Path, xlabel: str, ylabel: str,
                title: str = "") -> Path:
    """One line per name through its (x, y) points (non-finite y left out), e.g. one per optimizer."""
    def draw(axis: Any) -> list[float]:
        values = []
        for name, points in curves.items():
            kept = [(x, y) for x, y in points if _finite([x, y])]
            axis.plot([x for x, _ in kept], [y for _, y in kept], "o-", label=name, ms=2.5, lw=1.2)
            values += [y for _, y in kept]
        return values

    return _save_plot(path, draw, xlabel, ylabel, title)

