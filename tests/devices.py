"""Device marks shared by the tests of the kernels and of the runtime on CUDA."""

import pytest
import torch

#: A test that needs a CUDA device: skipped cleanly without one (CI has none; the device machine has).
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
