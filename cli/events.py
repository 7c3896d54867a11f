"""`--tensorboard FOLDER`: the metrics of a run also as TensorBoard scalars, for people who watch runs there."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from kronograph.errors import KronographError


def check_tensorboard(folder: Path | None) -> None:
    """Fail before anything is written when --tensorboard is asked for without the package."""
    if folder is None:
        return
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise KronographError(
            "--tensorboard needs the tensorboard package; install it with `pip install tensorboard`"
        ) from None


class TensorBoard(contextlib.AbstractContextManager):
    """Writes each metrics record's numbers as scalars at its step; does nothing without a folder."""

    def __init__(self, folder: Path | None) -> None:
        self.writer = None
        if folder is not None:
            check_tensorboard(folder)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, record["step"])

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()
