"""K-FAC's no-re-scaling heavy ball on the fused update kernel (runtime/fused_step.py): which layers take it, and
that a run on it equals the torch path's run.

The kernel itself is proven in tests/test_kernels_update.py; this file proves the wiring. Without a GPU the kernel
runs under Triton's interpreter (conftest.py), reached either by ``forced_backend("triton")`` (every kernel of the
step: statistics, Newton-Schulz inverses, the fused update) or by forcing only the fused step's choice (everything
else on torch), which isolates it: that run must match the torch path to float32 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kronograph
from kronograph.runtime import fused_step
from kronograph.triton_kernels import update as update_kernels
from kronograph.triton_kernels.dispatch import forced_backend, triton_available

from devices import DEVICE

pytestmark = [pytest.mark.usefixtures("one_thread", "on_kernel_device"),
              pytest.mark.skipif(not triton_available(), reason="needs the triton package")]

LR, MOMENTUM = 0.1, 0.9


def models() -> dict[str, nn.Module]:
    """Bias-free layers beside one with a bias (which must stay on the torch path)."""
    torch.manual_seed(0)
    return {
        "mlp": nn.Sequential(nn.Linear(6, 9, bias=False), nn.Tanh(), nn.Linear(9, 4)),
        "cnn": nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                             nn.Linear(3 * 5 * 5, 4, bias=False)),
        "biased": nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)),
    }


def batches(name: str, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator(DEVICE).manual_seed(1)
    shape = (16, 2, 5, 5) if name == "cnn" else (16, 6)
    return [(torch.randn(*shape, generator=generator), torch.randint(0, 4, (16,), generator=generator))
            for _ in range(steps)]


def optimizer(model: nn.Module, x: torch.Tensor, **settings) -> kronograph.optim.KFAC:
    compiled = kronograph.compile(model, (x[:2],), loss="cross_entropy")
    return kronograph.optim.KFAC(compiled, rescale=False, momentum=MOMENTUM, lr=LR, seed=0, **settings)


def run(name: str, backend: str, steps: int, **settings) -> tuple[nn.Module, list[list[torch.Tensor]],
                                                                  kronograph.optim.KFAC]:
    """The model, its parameters after each step, and the optimizer."""
    model = models()[name]
    data = batches(name, steps)
    opt = optimizer(model, data[0][0], **settings)
    after = []
    with forced_backend(backend):
        for x, y in data:
            opt.step(x, y)
            after.append([p.detach().clone() for p in model.parameters()])
    return model, after, opt


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """data_ptr of the weight each call of ``fused_update`` wrote."""
    calls: list[int] = []
    kernel = update_kernels.fused_update

    def counted(*args, **kwargs):
        calls.append(kwargs["param"].data_ptr())
        return kernel(*args, **kwargs)

    monkeypatch.setattr(update_kernels, "fused_update", counted)
    return calls


def bias_free_weights(model: nn.Module) -> list[int]:
    return [m.weight.data_ptr() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is None]


@pytest.mark.parametrize("name, steps", [("mlp", 3), ("cnn", 2)])
def test_kfac_heavy_ball_on_the_kernels_equals_the_torch_path(name, steps, kernel_calls):
    # The paper's lambda = 150: the Newton-Schulz inverses (which stop at their residual tolerance, not at
    # Cholesky's rounding) then agree with Cholesky's to ~1e-7, as in tests/test_kernels_runtime.py.
    _, on_torch, _ = run(name, "torch", steps, preset="paper")
    assert kernel_calls == []
    model, on_kernels, opt = run(name, "triton", steps, preset="paper")
    fused = bias_free_weights(model)
    assert sorted(kernel_calls) == sorted(fused * steps)  # each bias-free weight once a step, no biased layer
    for kernels, references in zip(on_kernels, on_torch):
        for kernel, reference in zip(kernels, references):
            assert torch.allclose(kernel, reference, rtol=1e-5, atol=1e-5)
    params = dict(model.named_parameters())
    assert set(opt.previous) == set(params)  # previous: per-parameter updates shaped like the parameters
    assert all(opt.previous[n].shape == p.shape for n, p in params.items())


def only_the_fused_step_on_the_kernel(monkeypatch) -> None:
    """The fused step takes the kernel (interpreted on CPU tensors); every other choice stays on torch."""
    monkeypatch.setattr(fused_step, "use_triton", lambda backend, tensor, kernel: True)


def test_the_fused_step_equals_the_torch_path_to_rounding_and_resumes(kernel_calls, monkeypatch):
    model_torch, on_torch, opt_torch = run("mlp", "torch", 3)
    only_the_fused_step_on_the_kernel(monkeypatch)
    model, on_kernel, opt = run("mlp", "torch", 3)
    assert len(kernel_calls) == 3 and set(kernel_calls) == {model[0].weight.data_ptr()}
    for kernels, references in zip(on_kernel, on_torch):
        for kernel, reference in zip(kernels, references):
            assert torch.allclose(kernel, reference, rtol=1e-6, atol=1e-6)
    assert set(opt.previous) == set(opt_torch.previous)
    for name, update in opt_torch.previous.items():
        assert torch.allclose(opt.previous[name], update, rtol=1e-6, atol=1e-7)
    # Exact resume: one optimizer stepped 3 times equals one stepped once, saved and loaded into a fresh one.
    data = batches("mlp", 3)
    resumed_model = models()["mlp"]
    first = optimizer(resumed_model, data[0][0])
    with forced_backend("torch"):
        first.step(*data[0])
    state = first.state_dict()
    second = optimizer(resumed_model, data[0][0])
    second.load_state_dict(state)
    with forced_backend("torch"):  # as run() stepped (on CUDA, "auto" would take the other kernels too)
        for x, y in data[1:]:
            second.step(x, y)
    for resumed, straight in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(resumed, straight)


def test_a_model_with_biases_trains_exactly_as_before(kernel_calls, monkeypatch):
    _, before, _ = run("biased", "torch", 2)
    only_the_fused_step_on_the_kernel(monkeypatch)
    _, after, _ = run("biased", "torch", 2)
    assert kernel_calls == []
    for a, b in zip(after, before):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_fused_step_equals_a_dense_heavy_ball_in_float32(kernel_calls, monkeypatch):
    """Step 2 (momentum on) against (G + gamma/pi I)^-1 grad W (A + pi gamma I)^-1 from torch.linalg.inv in float64."""
    only_the_fused_step_on_the_kernel(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3, bias=False))
    (x1, y1), (x2, y2) = batches("mlp", 2)
    x1, x2, y1, y2 = x1[:, :5], x2[:, :5], y1 % 3, y2 % 3
    opt = optimizer(model, x1)
    with forced_backend("torch"):  # Cholesky inverses, as the dense check; the fused step alone on the kernel
        opt.step(x1, y1)
    theta = [p.detach().clone() for p in model.parameters()]
    previous = {name: t.clone() for name, t in opt.previous.items()}
    loss = nn.functional.cross_entropy(model(x2), y2)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with forced_backend("torch"):
        opt.step(x2, y2)
    assert len(kernel_calls) == 4  # both layers, both steps
    gamma = opt.inverted_gamma
    for (name, param), before, grad in zip(model.named_parameters(), theta, grads):
        block = opt.blocks[name.split(".")[0]]
        a, g = block.a[0].double(), block.g[0].double()  # one group
        pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
        a_inv = torch.linalg.inv(a + pi * gamma * torch.eye(a.shape[0], dtype=torch.float64))
        g_inv = torch.linalg.inv(g + gamma / pi * torch.eye(g.shape[0], dtype=torch.float64))
        update = -LR * (g_inv @ grad.double() @ a_inv) + MOMENTUM * previous[name].double()
        assert param.dtype == torch.float32 and opt.previous[name].dtype == torch.float32
        assert torch.allclose(opt.previous[name].double(), update, rtol=1e-4, atol=1e-6)
        assert torch.allclose(param.detach().double(), before.double() + update, rtol=1e-5, atol=1e-6)


def test_which_layers_take_the_fused_step(monkeypatch):
    model = models()["cnn"]
    x, y = batches("cnn", 1)[0]
    opt = optimizer(model, x)
    opt.step(x, y)  # statistics: the blocks are estimated
    grads = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    names = list(opt.blocks)
    assert fused_step.fused_layers(opt.engine, opt.curvature, grads, {}, set())[0] == []  # auto: torch (AUTO_ON_CUDA)
    with forced_backend("triton"):
        chosen, rest = fused_step.fused_layers(opt.engine, opt.curvature, grads, {}, set())
        assert [layer.name for layer in chosen] == names and rest.blocks == {} and len(opt.blocks) == 2
        chosen, rest = fused_step.fused_layers(opt.engine, opt.curvature, grads, {names[0]: None}, set())
        assert [layer.name for layer in chosen] == names[1:] and list(rest.blocks) == names[:1]  # low-rank rows
        left_out = {opt.blocks[names[1]].layer.weight}  # frozen, or no statistics yet
        assert [layer.name for layer in fused_step.fused_layers(opt.engine, opt.curvature, grads, {}, left_out)[0]] \
            == names[:1]
        double = {name: g.double() for name, g in grads.items()}
        assert fused_step.fused_layers(opt.engine, opt.curvature, double, {}, set())[0] == []
        tridiagonal = optimizer(models()["mlp"], batches("mlp", 1)[0][0], structure="tridiagonal")
        assert fused_step.fused_layers(tridiagonal.engine, tridiagonal.curvature, grads, {}, set()) == (
            [], tridiagonal.curvature)


def test_a_layer_whose_update_is_not_provably_finite_takes_the_torch_formulas(kernel_calls, monkeypatch):
    """With no bound small enough, the chosen layers take the torch path's own formulas: the same run, bit for bit."""
    _, before, opt_before = run("mlp", "torch", 2)
    only_the_fused_step_on_the_kernel(monkeypatch)
    monkeypatch.setattr(fused_step, "_LIMIT", 0.0)
    _, after, opt = run("mlp", "torch", 2)
    assert kernel_calls == []
    for a, b in zip(after, before):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(opt.previous[name], update) for name, update in opt_before.previous.items())
