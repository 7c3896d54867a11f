"""``kronograph.optim``: the optimizers of the contract in DESIGN.md (they live in runtime/methods/)."""

from kronograph.runtime.methods import KBFGS, KBFGSL, KFAC, TNT, Shampoo
from kronograph.runtime.preconditioner import KFACPreconditioner

__all__ = ["KBFGS", "KBFGSL", "KFAC", "KFACPreconditioner", "Shampoo", "TNT"]
