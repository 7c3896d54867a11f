"""``kronograph.optim``: the optimizers of the contract in DESIGN.md (they live in runtime/methods/)."""

from kronograph.runtime.methods import ACP, KBFGS, KBFGSL, KFAC, SMWGN, SMWNG, SMWNGBD, TNT, CenteredSGD, Shampoo
from kronograph.runtime.preconditioner import KFACPreconditioner

__all__ = ["ACP", "KBFGS", "KBFGSL", "KFAC", "KFACPreconditioner", "SMWGN", "SMWNG", "SMWNGBD", "CenteredSGD",
           "Shampoo", "TNT"]
