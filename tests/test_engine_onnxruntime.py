"""runtime/engines/onnxruntime: OnnxRuntimeEngine trains an .onnx model exactly as torch trains the module.

SGD parity: the same MLP, initial weights and batches, 5 steps of theta -= lr * grad on torch (mean
cross-entropy) and on the engine (gradients read from onnxruntime-training) give the same losses and
weights. The engine's weights round-trip through set_parameters and export_onnx.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph

pytest.importorskip("onnxruntime.training")
import onnxruntime  # noqa: E402

from kronograph.runtime.engines import OnnxRuntimeEngine, StepResult  # noqa: E402

RTOL = 1e-5
ATOL = 1e-5
LR = 0.1


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(count: int = 5, n: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)) for _ in range(count)
    ]


@pytest.fixture
def setup(tmp_path):
    """(torch module, engine): the engine runs the module's own eval-mode ONNX export (eval = train here)."""
    module = mlp()
    x = torch.randn(4, 6)
    path = kronograph.compile(module, example_inputs=(x,), loss="cross_entropy").export_onnx(tmp_path / "mlp.onnx")
    cm = kronograph.compile(path, loss="cross_entropy")
    assert cm.engine == "onnxruntime"
    engine = OnnxRuntimeEngine(cm, tmp_path / "artifacts")
    assert set(engine.trainable) == {name for name, _ in module.named_parameters()}
    return module, engine


def test_sgd_parity_with_torch(setup):
    module, engine = setup
    for name, value in engine.parameters().items():
        np.testing.assert_array_equal(value, module.state_dict()[name].numpy(), err_msg=name)
    for step, (x, y) in enumerate(batches()):
        module.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        with torch.no_grad():
            for param in module.parameters():
                param -= LR * param.grad

        result = engine.forward_backward([x.numpy()], y.numpy())
        assert isinstance(result, StepResult)
        np.testing.assert_allclose(result.loss, loss.item(), rtol=RTOL, err_msg=f"step {step}")
        assert set(result.taps) == {(layer.name, 0) for layer in engine.compiled.plan.layers}
        for name, param in module.named_parameters():
            np.testing.assert_allclose(result.gradients[name], param.grad.numpy(), rtol=RTOL, atol=ATOL)
        current = engine.parameters()
        engine.set_parameters({name: value - LR * result.gradients[name] for name, value in current.items()})

        for name, param in module.named_parameters():
            np.testing.assert_allclose(
                engine.parameters()[name], param.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=f"{name} step {step}"
            )


def test_gradients_do_not_accumulate(setup):
    _, engine = setup
    x, y = batches(1)[0]
    first = engine.forward_backward([x], y)  # torch tensors are accepted too
    second = engine.forward_backward([x.numpy()], y.numpy())
    assert first.loss == pytest.approx(second.loss, rel=1e-7)
    for name in engine.trainable:
        np.testing.assert_allclose(second.gradients[name], first.gradients[name], rtol=1e-6, atol=1e-7)


def test_set_parameters_round_trip_and_takes_effect(setup):
    module, engine = setup
    x, y = batches(1)[0]
    before = engine.forward_backward([x.numpy()], y.numpy()).loss
    rng = np.random.default_rng(3)
    new = {name: rng.standard_normal(value.shape).astype(np.float32) for name, value in engine.parameters().items()}
    engine.set_parameters(new)
    for name, value in engine.parameters().items():
        np.testing.assert_array_equal(value, new[name], err_msg=name)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.from_numpy(new[name]))
        expected = F.cross_entropy(module(x), y).item()
    after = engine.forward_backward([x.numpy()], y.numpy()).loss
    assert after != pytest.approx(before)
    np.testing.assert_allclose(after, expected, rtol=RTOL)
    with pytest.raises(kronograph.KronographError):
        engine.set_parameters({"nope": new[engine.trainable[0]]})
    with pytest.raises(kronograph.KronographError):
        engine.set_parameters({engine.trainable[0]: np.zeros((1, 1), np.float32)})


def test_export_onnx_has_the_engine_weights(setup, tmp_path):
    module, engine = setup
    x, y = batches(1)[0]
    result = engine.forward_backward([x.numpy()], y.numpy())
    engine.set_parameters({name: value - LR * result.gradients[name] for name, value in engine.parameters().items()})
    path = engine.export_onnx(tmp_path / "trained.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert len(session.get_outputs()) == 1  # the inference graph: no loss, no taps
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.from_numpy(engine.parameters()[name]))
        expected = module(x).numpy()
    np.testing.assert_allclose(logits, expected, rtol=RTOL, atol=1e-6)
    reloaded = kronograph.compile(path, loss="cross_entropy").state_dict()
    for name, value in engine.parameters().items():
        np.testing.assert_array_equal(reloaded[name].numpy(), value, err_msg=name)
