"""runtime/engines/kfac_onnxruntime: K-FAC on onnxruntime-training matches K-FAC on torch (issue 6).

Parity: the same model, initial weights and batches, trained 20 steps with K-FAC (empirical Fisher,
no re-scaling, no randomness) on the torch engine (``kronograph.optim.KFAC``) and on the onnxruntime
engine (``OnnxKFAC`` on the module's own exported .onnx) give the same losses and weights to float32
precision; with and without heavy-ball momentum, for an MLP and a small strided, padded convnet.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kronograph

pytest.importorskip("onnxruntime.training")

from kronograph.errors import KronographError  # noqa: E402
from kronograph.runtime.engines import OnnxRuntimeEngine  # noqa: E402
from kronograph.runtime.engines.kfac_onnxruntime import OnnxKFAC  # noqa: E402

STEPS = 20
RTOL = 1e-4
ATOL = 1e-5
SETTINGS = dict(lr=0.05, factor_damping=0.1, inverse_every=5)


def mlp() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), (6,)


def convnet() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    return module, (1, 6, 6)


def batches(shape: tuple[int, ...], count: int = STEPS, n: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, *shape, generator=generator), torch.randint(0, 3, (n,), generator=generator))
        for _ in range(count)
    ]


def engines(factory, tmp_path):
    module, shape = factory()
    cm_torch = kronograph.compile(module, example_inputs=(torch.randn(4, *shape),), loss="cross_entropy")
    path = cm_torch.export_onnx(tmp_path / "model.onnx")
    cm_onnx = kronograph.compile(str(path), loss="cross_entropy")
    assert cm_onnx.engine == "onnxruntime"
    engine = OnnxRuntimeEngine(cm_onnx, tmp_path / "artifacts")
    assert set(engine.trainable) == {name for name, _ in module.named_parameters()}
    return cm_torch, module, engine, shape


@pytest.mark.parametrize("momentum", [None, 0.9])
@pytest.mark.parametrize("factory", [mlp, convnet], ids=["mlp", "conv"])
def test_kfac_parity_with_torch(factory, momentum, tmp_path):
    cm_torch, module, engine, shape = engines(factory, tmp_path)
    for name, value in engine.parameters().items():
        np.testing.assert_array_equal(value, module.state_dict()[name].numpy(), err_msg=name)
    torch_opt = kronograph.optim.KFAC(
        cm_torch, fisher="empirical", stats_fraction=1.0, rescale=False, momentum=momentum,
        adapt_damping=False, adapt_gamma=False, seed=0, **SETTINGS,
    )
    onnx_opt = OnnxKFAC(engine, momentum=momentum, **SETTINGS)
    losses = []
    for step, (x, y) in enumerate(batches(shape)):
        expected = torch_opt.step(x, y)
        got = onnx_opt.step(x.numpy(), y.numpy())
        assert "skipped" not in expected and "skipped" not in got
        np.testing.assert_allclose(got["loss"], expected["loss"], rtol=RTOL, err_msg=f"loss, step {step}")
        current = engine.parameters()
        for name, param in module.named_parameters():
            np.testing.assert_allclose(
                current[name], param.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=f"{name}, step {step}"
            )
        losses.append(got["loss"])
    # the weights moved (random labels: the loss on each fresh batch is noise, parity is what is tested)
    initial, _ = factory()
    assert any(not torch.allclose(p, q) for p, q in zip(initial.parameters(), module.parameters()))
    # the factors agree too (layer names differ between the plans; compare in plan order)
    for torch_block, onnx_block in zip(torch_opt.blocks.values(), onnx_opt.blocks.values()):
        torch.testing.assert_close(onnx_block.a, torch_block.a, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(onnx_block.g, torch_block.g, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "kwargs",
    [dict(fisher="mc"), dict(rescale=True), dict(momentum="qmodel"), dict(adapt_damping=True),
     dict(adapt_gamma=True), dict(stats_fraction=0.5)],
)
def test_unavailable_features_are_refused(kwargs, tmp_path):
    _, _, engine, _ = engines(mlp, tmp_path)
    with pytest.raises(KronographError):
        OnnxKFAC(engine, lr=0.05, factor_damping=0.1, **kwargs)


def test_kfac_parity_with_weight_decay_and_sparse_statistics(tmp_path):
    """weight decay in the gradient, statistics every 2 steps with a fixed EMA decay: still the same weights."""
    extra = dict(momentum=0.5, weight_decay=1e-2, stats_every=2, ema_decay=0.9, **SETTINGS)
    cm_torch, module, engine, shape = engines(convnet, tmp_path)
    torch_opt = kronograph.optim.KFAC(
        cm_torch, fisher="empirical", stats_fraction=1.0, rescale=False, adapt_damping=False, adapt_gamma=False,
        seed=0, **extra,
    )
    onnx_opt = OnnxKFAC(engine, **extra)
    for x, y in batches(shape):
        np.testing.assert_allclose(onnx_opt.step(x.numpy(), y.numpy())["loss"], torch_opt.step(x, y)["loss"], rtol=RTOL)
    current = engine.parameters()
    for name, param in module.named_parameters():
        np.testing.assert_allclose(current[name], param.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=name)
