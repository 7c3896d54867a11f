"""One rule for every kernel: Triton for CUDA tensors where it measured faster, the torch reference elsewhere; a
setting forces either.

Each kernel module pairs ``<name>_triton`` with ``<name>_reference`` (same signature, same result up to
rounding) and exposes ``<name>(..., backend="auto")``, which calls ``use_triton(backend, tensor, kernel)`` to pick.
On a CPU, Triton runs only under its interpreter (``TRITON_INTERPRET=1``, read when a kernel module is first
imported): that is how CI proves the kernels correct without a GPU. The interpreter is far too slow to train
with, so "auto" never picks it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_forced: str | None = None  # what "auto" means inside ``forced_backend``


@contextlib.contextmanager
def forced_backend(backend: str) -> Iterator[None]:
    """Inside it, every ``backend="auto"`` choice (the runtime's own calls included) is ``backend``: the tests
    run a whole K-FAC step on the kernels under the interpreter, or keep a CUDA run on the references."""
    global _forced
    _check(backend)
    saved, _forced = _forced, None if backend == "auto" else backend
    try:
        yield
    finally:
        _forced = saved


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {', '.join(BACKENDS)}")


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (set before the kernel modules are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


#: The kernels "auto" takes on a CUDA tensor: those that beat the torch way they replace on an H200 (BENCHMARKS.md,
#: "The Triton kernels and K-FAC on an H200"). There the Newton-Schulz inverse (a 1.7 ms floor per call against
#: Cholesky's 0.13-5.6 ms) made K-FAC's default step 58 ms against 32 ms on torch's kernels; the fused update and
#: the conv statistics lost to cuBLAS and unfold in every shape measured. They run only when asked for ("triton").
AUTO_ON_CUDA = frozenset({"statistics"})
KERNELS = ("statistics", "conv_statistics", "inverse", "update")


def use_triton(backend: str, tensor: torch.Tensor, kernel: str) -> bool:
    """True to run Triton's ``kernel`` (one of KERNELS) on ``tensor``'s device: "auto" picks it for CUDA tensors
    when Triton is installed and the kernel is in AUTO_ON_CUDA, "triton" demands it (a CUDA tensor, or the
    interpreter on a CPU one), "torch" never; inside ``forced_backend`` "auto" is the forced one."""
    _check(backend)
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; choose one of {', '.join(KERNELS)}")
    if backend == "auto" and _forced is not None:
        backend = _forced
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda and kernel in AUTO_ON_CUDA and triton_available()
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if not (tensor.is_cuda or interpreting()):
        raise RuntimeError("backend='triton' on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before kronograph is imported, or use backend='torch'")
    return True
