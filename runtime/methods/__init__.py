"""runtime/methods: one module per optimizer of the papers, on the shared runtime (capture, factors, engines,
losses, W_bar, the quadratic model), and the registry the command line is built from.

Every method is a class with the same face: ``Method(compiled, preset="default", seed=None, **settings)``,
``step(x, y) -> info``, ``state_dict`` / ``load_state_dict`` (exact resume); and three class attributes:
``SUMMARY`` (one line for --help), ``Settings`` (a typed frozen dataclass whose fields, declared with
``settings.setting``, carry their help and valid values) and ``PRESETS`` (named instances of it, "default"
first). `kronograph train` and `bench` build their flags, TOML keys and defaults from ``METHODS``: adding a
method is adding its module and one entry here.
"""

from kronograph.runtime.methods.centered import ACP, CenteredSGD
from kronograph.runtime.methods.first_order import SGD, Adam
from kronograph.runtime.methods.kbfgs import KBFGS, KBFGSL
from kronograph.runtime.methods.kfac import KFAC
from kronograph.runtime.methods.shampoo import Shampoo
from kronograph.runtime.methods.smw import SMWGN, SMWNG, SMWNGBD
from kronograph.runtime.methods.tnt import TNT, TNTEF

METHODS: dict[str, type] = {"kfac": KFAC, "kbfgs": KBFGS, "kbfgsl": KBFGSL, "tnt": TNT, "tnt-ef": TNTEF,
                            "shampoo": Shampoo, "smw-ng": SMWNG, "smw-gn": SMWGN, "smw-ng-bd": SMWNGBD,
                            "centered-sgd": CenteredSGD, "acp": ACP, "sgd": SGD, "adam": Adam}

__all__ = ["ACP", "METHODS", "KBFGS", "KBFGSL", "KFAC", "SGD", "SMWGN", "SMWNG", "SMWNGBD", "CenteredSGD", "Shampoo",
           "TNT", "TNTEF", "Adam"]
