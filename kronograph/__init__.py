"""kronograph: compile a model into a graph with Kronecker-factored curvature, then train it.

The code lives in the subpackages ``kronograph.compiler``, ``kronograph.passes``, ``kronograph.runtime``,
``kronograph.triton_kernels`` and ``kronograph.cli`` (top-level folders of the repository).
"""

from kronograph import optim
from kronograph.compiler import CompiledModel, compile
from kronograph.errors import KronographError
from kronograph.passes.plan import ConvGeometry, Layer, LayerPlan, Site, Unmatched

__all__ = [
    "CompiledModel",
    "ConvGeometry",
    "KronographError",
    "Layer",
    "LayerPlan",
    "Site",
    "Unmatched",
    "compile",
    "optim",
]
__version__ = "0.1.0"
