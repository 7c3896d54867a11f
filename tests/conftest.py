"""Shared test set-up.

torchvision on the CPU torch build: torchvision 0.28's wheel ships C++ ops (``torchvision/_C.so``) built
against another torch build than the CPU torch 2.13 installed here. Loading them fails quietly, and then
``import torchvision`` dies in ``torchvision/_meta_registrations.py``, which registers fake kernels for
``torchvision::nms`` / ``torchvision::qnms`` and raises "operator torchvision::nms does not exist". timm
imports torchvision too. The tests only build architectures (no detection op is ever called), so
declaring the two schemas is enough for the import to succeed.

This runs when pytest loads this file, before any test module is collected: the test modules call
``pytest.importorskip("torchvision")`` (or "timm") at collection time, so a fixture would come too late.
The stand-ins are declared only after a real import failed with that error: on a torchvision build whose
C++ ops load, declaring them first would make its own registration of the same ops fail.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _declare_nms_stand_ins() -> None:
    """Declare ``torchvision::nms`` and ``torchvision::qnms`` where they do not exist (idempotent)."""
    for op in ("nms", "qnms"):
        try:
            getattr(torch.ops.torchvision, op)
        except (AttributeError, RuntimeError):
            torch.library.define(f"torchvision::{op}", _NMS_SCHEMA)


def import_torchvision() -> None:
    """Import torchvision, with stand-ins for its missing C++ ops if the plain import fails for them.

    Does nothing when torchvision is not installed (its tests are then skipped by importorskip).
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the failed import left half-initialised modules behind
        _declare_nms_stand_ins()
        import torchvision  # noqa: F401


def _interpret_triton_without_a_gpu() -> None:
    """Without CUDA, the Triton kernels (triton_kernels/) run in Triton's CPU interpreter. Triton reads
    TRITON_INTERPRET when triton.language is first imported (its own helpers, tl.zeros and the like, are
    built then), and importing torchvision imports it: so this runs before import_torchvision()."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_a_gpu()
import_torchvision()


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (``-n 2`` in pyproject.toml), each worker takes its share of the cores for torch's
    threads, so that two workers on a 2-core machine do not fight over four OpenMP threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores_between_workers()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread (on a busy 2-core machine, OpenMP hand-offs cost more than they save). A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def on_kernel_device():
    """Tensors and modules made without a device land on ``devices.DEVICE``: on a CUDA machine the kernel tests
    then check the compiled kernels, on a CPU one Triton's interpreter. A module opts in through pytestmark;
    a test that is about CPU tensors names ``device="cpu"``."""
    from devices import DEVICE

    with torch.device(DEVICE):
        yield
