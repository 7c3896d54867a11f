"""Device marks shared by the tests of the kernels and of the runtime on CUDA."""

import pytest
import torch

#: A test that needs a CUDA device: skipped cleanly without one (CI has none; the device machine has).
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Where the kernel tests put their tensors: the compiled kernels on a CUDA machine, Triton's interpreter on
#: the CPU otherwise (conftest.py sets TRITON_INTERPRET only where there is no CUDA device).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
