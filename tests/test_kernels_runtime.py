"""The runtime on the kernels: K-FAC's factor statistics and damped inverses run on triton_kernels/ where the
dispatch picks Triton (CUDA tensors; here, forced under the interpreter that conftest.py turns on without a
GPU), and a K-FAC run on the kernels equals the same run on the torch references.

The kernels themselves are proven against float64 algebra in tests/test_kernels_*.py; this file proves the
wiring: which runtime calls reach which kernel (a conv layer's A from its feature map), the warm start of the
inverses from the ones in use, and that the steps agree.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kronograph
from kronograph.triton_kernels import conv_statistics as conv_kernels
from kronograph.triton_kernels import inverse as inverse_kernels
from kronograph.triton_kernels import statistics as statistics_kernels
from kronograph.triton_kernels.dispatch import forced_backend, triton_available, use_triton

from devices import DEVICE

pytestmark = [pytest.mark.usefixtures("one_thread", "on_kernel_device"),
              pytest.mark.skipif(not triton_available(), reason="needs the triton package")]


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    return {"mlp": mlp, "cnn": cnn}


def batches(name: str, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator(DEVICE).manual_seed(1)
    shape = (16, 6) if name == "mlp" else (16, 2, 5, 5)
    return [(torch.randn(*shape, generator=generator), torch.randint(0, 4, (16,), generator=generator))
            for _ in range(steps)]


def run(name: str, backend: str, steps: int = 3, **settings) -> list[torch.Tensor]:
    model = models()[name]
    data = batches(name, steps)
    optimizer = kronograph.optim.KFAC(kronograph.compile(model, (data[0][0][:2],), loss="cross_entropy"), seed=0,
                                      inverse_every=2, **settings)
    with forced_backend(backend):
        for x, y in data:
            optimizer.step(x, y)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name, preset", [("mlp", "paper"), ("cnn", "paper"), ("mlp", "default")])
def test_kfac_on_the_kernels_equals_kfac_on_the_references(name, preset, monkeypatch):
    calls = {"statistics": 0, "homogeneous": 0, "conv": 0, "inverse": 0, "warm": 0}
    statistics_kernel = statistics_kernels.factor_update_triton
    inverse_kernel = inverse_kernels.damped_inverse_ns_triton
    conv_kernel = conv_kernels.conv_factor_update_triton

    def counted_conv(*args, **kwargs):
        calls["conv"] += 1
        return conv_kernel(*args, **kwargs)

    def counted_statistics(out, rows, alpha, beta, homogeneous=False):
        calls["statistics"] += 1
        if homogeneous:  # a bias's ones column appended by the kernel: the rows were not copied to add it
            calls["homogeneous"] += 1
            assert rows.shape[-1] + 1 == out.shape[-1]
        return statistics_kernel(out, rows, alpha, beta, homogeneous)

    def counted_inverse(m, damping, previous=None, *args, **kwargs):
        calls["inverse"] += 1
        calls["warm"] += previous is not None
        return inverse_kernel(m, damping, previous, *args, **kwargs)

    monkeypatch.setattr(statistics_kernels, "factor_update_triton", counted_statistics)
    monkeypatch.setattr(inverse_kernels, "damped_inverse_ns_triton", counted_inverse)
    monkeypatch.setattr(conv_kernels, "conv_factor_update_triton", counted_conv)
    on_references = run(name, "torch", preset=preset)
    assert calls == {"statistics": 0, "homogeneous": 0, "conv": 0, "inverse": 0, "warm": 0}
    on_kernels = run(name, "triton", preset=preset)
    convs = 1 if name == "cnn" else 0  # a conv layer's A from its feature map, its G and the rest from rows
    assert calls["conv"] == 3 * convs and calls["statistics"] == 3 * (4 - convs)
    assert calls["homogeneous"] == 3 * (2 - convs)  # every linear layer's A (all have a bias), every step
    assert calls["inverse"] > 0 and calls["warm"] > 0  # refreshes after the first start from the inverses in use
    # Newton-Schulz stops at its residual tolerance, not at Cholesky's rounding: the paper's steps agree to
    # 1e-5; the default's (gamma candidates chosen by the model's values, signal scaling) to ~2e-4.
    tolerance = 1e-5 if preset == "paper" else 1e-3
    for kernel, reference in zip(on_kernels, on_references):
        assert torch.allclose(kernel, reference, rtol=tolerance, atol=tolerance)


def test_forced_backend_is_scoped_and_checked():
    x = torch.zeros(2, 2)
    auto = x.is_cuda  # "auto" outside any forcing: the statistics kernel on CUDA, the references on the CPU
    assert use_triton("auto", x, "statistics") == auto and not use_triton("auto", x, "inverse")
    with forced_backend("triton"):
        assert use_triton("auto", x, "inverse") and not use_triton("torch", x, "statistics")
        with forced_backend("torch"):
            assert not use_triton("auto", x, "statistics")
        assert use_triton("auto", x, "update")
    assert use_triton("auto", x, "statistics") == auto
    with pytest.raises(ValueError, match="choose one of"):
        use_triton("auto", x, "softmax")
    with pytest.raises(ValueError, match="choose one of"):
        with forced_backend("cuda"):
            pass
