"""``kronograph.optim``: the optimizers of the contract in DESIGN.md (they live in runtime/)."""

from kronograph.runtime.methods.kfac import KFAC
from kronograph.runtime.preconditioner import KFACPreconditioner

__all__ = ["KFAC", "KFACPreconditioner"]
