"""runtime/engines/onnxruntime: OnnxRuntimeEngine trains an .onnx model exactly as torch trains the module.

SGD parity: the same MLP, initial weights and batches, 5 steps of theta -= lr * grad on torch (mean
cross-entropy) and on the engine (gradients read from onnxruntime-training) give the same losses and
weights. The engine's weights round-trip through set_parameters and export_onnx. Every loss is
runtime.losses' (value, gradients, model output), and forward() runs the inference graph at the current
or at trial weights.
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
from kronograph.runtime.losses import get_loss  # noqa: E402

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


def targets_for(loss: str, n: int, generator: torch.Generator) -> torch.Tensor:
    if loss == "cross_entropy":
        return torch.randint(0, 3, (n,), generator=generator)
    if loss == "sigmoid_cross_entropy":
        return torch.rand(n, 3, generator=generator)
    return torch.randn(n, 3, generator=generator)


@pytest.mark.parametrize("loss", ["cross_entropy", "sigmoid_cross_entropy", "mse"])
def test_loss_is_the_runtime_loss(tmp_path, loss):
    """The engine's loss is runtime.losses' h = mean_i l_i (per-example sums for sigmoid CE and mse)."""
    module = mlp()
    path = kronograph.compile(module, example_inputs=(torch.randn(4, 6),), loss=loss).export_onnx(tmp_path / "m.onnx")
    engine = OnnxRuntimeEngine(kronograph.compile(str(path), loss=loss), tmp_path / "artifacts")
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(7, 6, generator=generator)
    y = targets_for(loss, 7, generator)
    outputs = module(x)
    reference = get_loss(loss)(outputs, y)
    reference.backward()

    result = engine.forward_backward([x], y)
    np.testing.assert_allclose(result.loss, reference.item(), rtol=1e-5)
    np.testing.assert_allclose(result.outputs, outputs.detach().numpy(), rtol=RTOL, atol=1e-6)
    for name, param in module.named_parameters():
        np.testing.assert_allclose(result.gradients[name], param.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    # The last layer's tap is dL/ds_i = (1/n) dl_i/ds_i.
    s = outputs.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(get_loss(loss)(s, y), s)
    tap = result.taps[(engine.compiled.plan.layers[-1].name, 0)][1]
    np.testing.assert_allclose(tap, expected.numpy(), rtol=1e-4, atol=1e-7)


def test_sigmoid_cross_entropy_is_finite_for_large_logits(tmp_path):
    """The loss block uses max(s, 0) - s t + log(1 + exp(-|s|)): no log(0) when the sigmoid saturates."""
    module = mlp()
    with torch.no_grad():
        module[2].weight.mul_(200.0)
    loss = "sigmoid_cross_entropy"
    path = kronograph.compile(module, example_inputs=(torch.randn(4, 6),), loss=loss).export_onnx(tmp_path / "m.onnx")
    engine = OnnxRuntimeEngine(kronograph.compile(str(path), loss=loss), tmp_path / "artifacts")
    x, _ = batches(1)[0]
    y = (torch.arange(21).reshape(7, 3) % 2).float()
    outputs = module(x)
    assert outputs.abs().max() > 50  # float32 sigmoid is 1 beyond about 17
    reference = get_loss(loss)(outputs, y)
    reference.backward()
    result = engine.forward_backward([x], y)
    np.testing.assert_allclose(result.loss, reference.item(), rtol=1e-5)
    for name, param in module.named_parameters():
        np.testing.assert_allclose(result.gradients[name], param.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_forward_at_the_current_weights(setup):
    module, engine = setup
    x, y = batches(1)[0]
    np.testing.assert_allclose(engine.forward([x.numpy()]), engine.forward_backward([x], y).outputs, rtol=1e-5)
    # set_parameters reaches forward() too.
    rng = np.random.default_rng(4)
    new = {name: rng.standard_normal(value.shape).astype(np.float32) for name, value in engine.parameters().items()}
    engine.set_parameters(new)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.from_numpy(new[name]))
        expected = module(x).numpy()
    np.testing.assert_allclose(engine.forward([x]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(engine.forward([x]), engine.forward_backward([x], y).outputs, rtol=1e-5)


def test_forward_with_trial_parameters(setup):
    module, engine = setup
    x, y = batches(1)[0]
    before = engine.parameters()
    generator = torch.Generator().manual_seed(5)
    trial = {
        "2.weight": module[2].weight.detach() + 0.3 * torch.randn(module[2].weight.shape, generator=generator),
        "0.bias": before["0.bias"] - 0.5,  # numpy and torch values alike
    }
    got = engine.forward([x], trial)
    with torch.no_grad():
        module[2].weight.copy_(trial["2.weight"])
        module[0].bias.copy_(torch.from_numpy(trial["0.bias"]))
        expected = module(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The trial values were not written anywhere.
    for name, value in engine.parameters().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    np.testing.assert_allclose(engine.forward([x]), engine.forward_backward([x], y).outputs, rtol=1e-5)


def test_forward_is_inference_mode(tmp_path):
    """forward_model.onnx is the graph as given: batch norm with its stored statistics, dropout off."""
    torch.manual_seed(6)
    module = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    with torch.no_grad():
        module[1].running_mean.uniform_(-1, 1)
        module[1].running_var.uniform_(0.5, 2)
    module.eval()
    path = kronograph.compile(module, example_inputs=(torch.randn(4, 6),), loss="mse").export_onnx(tmp_path / "m.onnx")
    engine = OnnxRuntimeEngine(kronograph.compile(str(path), loss="mse"), tmp_path / "artifacts")
    x, _ = batches(1)[0]
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(engine.forward([x]), expected, rtol=1e-5, atol=1e-6)


def test_forward_rejects_bad_arguments(setup):
    _, engine = setup
    x, _ = batches(1)[0]
    with pytest.raises(kronograph.KronographError, match="data input"):
        engine.forward([x, x])
    with pytest.raises(kronograph.KronographError, match="not a trainable parameter"):
        engine.forward([x], {"nope": np.zeros(3, np.float32)})
    with pytest.raises(kronograph.KronographError, match="shape"):
        engine.forward([x], {"2.bias": np.zeros(4, np.float32)})
    with pytest.raises(kronograph.KronographError, match="forward model"):
        engine.forward([x.numpy()[:, :5]])
