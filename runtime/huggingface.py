"""KFACPreconditioner inside Hugging Face's ``Trainer``: a callback, no change to the Trainer's loop.

The Trainer runs forward and backward for each micro-batch, clips the gradients, then steps its optimizer. The
callback opens ``precond.track()`` when a step begins (so every micro-batch of a gradient-accumulation step is
captured; the Trainer's ``loss / gradient_accumulation_steps`` is the 1/k that track() assumes) and, just before
the optimizer steps, closes it and rewrites the matched layers' ``.grad`` (``precond.step()``). With the default
``graft="norm"`` each layer keeps the norm its clipped gradient had, so ``max_grad_norm`` and the learning rate
mean what they meant for AdamW. A preconditioner made without ``lr`` bounds its step (``kl_clip``) at the
Trainer's optimizer's rates, read at every step (its schedule followed).

    precond = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (example_ids,)))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[KFACTrainerCallback(precond)])
    trainer.train()

transformers is imported only when this module is: kronograph does not depend on it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from transformers import TrainerCallback

from kronograph.runtime.preconditioner import KFACPreconditioner


class KFACTrainerCallback(TrainerCallback):
    """Tracks each training step's micro-batches and preconditions the gradients before the optimizer steps.

    ``last_info`` holds what the latest ``precond.step()`` returned (statistics, inverses, layers rewritten)."""

    def __init__(self, precond: KFACPreconditioner) -> None:
        self.precond = precond
        self._tracking: AbstractContextManager | None = None
        self.last_info: dict[str, Any] = {}

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()
        self._tracking = self.precond.track()
        self._tracking.__enter__()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()
        if self.precond.lr is None and kwargs.get("optimizer") is not None:
            self.precond.lr = kwargs["optimizer"]  # the rates the Trainer steps with, not SGD's assumed 0.1
        self.last_info = self.precond.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._tracking is not None:
            tracking, self._tracking = self._tracking, None
            tracking.__exit__(None, None, None)
