"""Every tensor a K-FAC step creates lives on the model's device, in the factor dtype asked for (issue 15, item 1).

The CPU proof runs the optimizer inside ``with torch.device("meta")``: a factory call that names no device
(torch.eye, zeros, tensor, as_tensor, randint, ...) then makes a meta tensor, which raises as soon as it meets
the model's cpu tensors or is read by float(), and shows up in the state_dict if it is only stored. That context
is itself a TorchFunctionMode over exactly those factories (torch.utils._device._device_constructors); a mode
recording the device of every new tensor would flag the same calls, but only after the step, whereas this one
fails at the line that misplaces the tensor. Neither sees ``torch.Generator()`` (a class, not a torch function):
the generator's device is checked directly. ``*_like`` and ``new_*`` follow their input by construction. An
explicit ``device="cpu"`` or ``.cpu()`` is invisible on a cpu-only machine: the CUDA tests below catch those.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kronograph
from kronograph.runtime.statistics import on_device

from devices import requires_cuda

STEPS = 5


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 4))


class GRU(nn.Module):
    """A GRU on 5-step sequences and a head on its last state (the capture rebuilds the GRU step by step)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru, self.head = nn.GRU(6, 8, batch_first=True), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])


MODELS = {"mlp": mlp, "cnn": cnn, "gru": GRU}
SHAPES = {"mlp": (64, 6), "cnn": (64, 2, 6, 6), "gru": (64, 5, 6)}


def batch(name: str, device: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPES[name], generator=generator)
    y = (x.reshape(64, -1)[:, :4] * torch.arange(1.0, 5.0)).argmax(1)
    return x.to(device, dtype), y.to(device)


@pytest.fixture(scope="module")
def compiled():
    """compiled(name, device, dtype): one compile per model (tracing takes seconds), its weights reset per test."""
    cache = {}

    def get(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
        key = (name, device, dtype)
        if key not in cache:
            torch.manual_seed(0)
            model = MODELS[name]().to(device, dtype)
            cache[key] = kronograph.compile(model, (batch(name, device, dtype)[0][:2],)), copy.deepcopy(model.state_dict())
        cm, initial = cache[key]
        cm.module.load_state_dict(initial)
        return cm

    return get


def unplaced_factories_fail(device: str):
    """On cpu: tensors created without a device go to "meta" (module docstring). On cuda nothing is needed: they
    go to cpu and meet the model's cuda tensors."""
    return torch.device("meta") if device == "cpu" else contextlib.nullcontext()


def tensors(obj):
    """Every tensor in a (nested) state dict, with its path; a generator's state (``generator``, KFAC's
    ``row_generator``) is always a cpu byte tensor."""
    if isinstance(obj, torch.Tensor):
        yield "", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if not key.endswith("generator"):
                yield from ((f"{key}/{path}", t) for path, t in tensors(value))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from ((f"{i}/{path}", t) for path, t in tensors(value))


def check_state(optimizer, device: str) -> None:
    found = list(tensors(optimizer.state_dict()))
    assert found
    misplaced = [(path, t.device) for path, t in found if t.device.type != device]
    assert not misplaced
    assert optimizer.generator.device.type == device
    assert getattr(optimizer, "row_generator", optimizer.generator).device.type == device


def kfac_steps(cm, name: str, device: str, dtype: torch.dtype = torch.float32, **settings) -> list[float]:
    """STEPS steps of KFAC on one batch; returns the losses and checks the weights moved and stayed finite, the
    state is on ``device`` and the factors and inverses are float32."""
    x, y = batch(name, device, dtype)
    before = [p.detach().clone() for p in cm.module.parameters()]
    with unplaced_factories_fail(device):
        torch.manual_seed(0)
        optimizer = kronograph.optim.KFAC(cm, **settings)
        infos = [optimizer.step(x, y) for _ in range(STEPS)]
    assert not any("skipped" in info for info in infos)
    assert all(torch.isfinite(p).all() for p in cm.module.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, cm.module.parameters()))
    check_state(optimizer, device)
    for block in optimizer.blocks.values():
        assert block.a.dtype == block.g.dtype == torch.float32
        assert block.inverses is None or block.inverses.a_inv.dtype == torch.float32
    return [info["loss"] for info in infos]


def preconditioner_steps(cm, name: str, device: str, fisher: str, dtype: torch.dtype = torch.float32) -> list[float]:
    """STEPS steps of SGD on K-FAC's preconditioned gradients; returns the losses."""
    x, y = batch(name, device, dtype)
    model = cm.module
    losses = []
    with unplaced_factories_fail(device):
        precond = kronograph.optim.KFACPreconditioner(cm, damping=0.03, fisher=fisher, inverse_every=2,
                                                      stats_fraction=0.5, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(STEPS):
            optimizer.zero_grad()
            with precond.track():
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            info = precond.step(x if fisher == "mc" else None)
            assert info["preconditioned"] == len(precond.blocks) and not info["non_finite_grad"]
            optimizer.step()
            losses.append(float(loss.detach()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    check_state(precond, device)
    for block in precond.blocks.values():
        assert block.a.dtype == block.inverses.a_inv.dtype == torch.float32
    return losses


SETTINGS = {
    "default": {},
    "paper": {"preset": "paper"},
    "tridiagonal": {"structure": "tridiagonal"},
}


@pytest.mark.parametrize("name, settings", [
    ("mlp", "default"), ("mlp", "paper"), ("mlp", "tridiagonal"), ("cnn", "default"), ("cnn", "paper"),
    ("gru", "default"),
])
def test_kfac_creates_nothing_off_the_model_device(compiled, name, settings):
    losses = kfac_steps(compiled(name), name, "cpu", **SETTINGS[settings])
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name, fisher", [("mlp", "empirical"), ("cnn", "empirical"), ("cnn", "mc"), ("gru", "mc")])
def test_preconditioner_creates_nothing_off_the_model_device(compiled, name, fisher):
    losses = preconditioner_steps(compiled(name), name, "cpu", fisher)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_trains_with_float32_factors(compiled, dtype):
    """Factors and inverses keep float32 whatever the model's dtype; the weights keep theirs."""
    cm = compiled("mlp", "cpu", dtype)
    losses = kfac_steps(cm, "mlp", "cpu", dtype, factor_dtype=torch.float32, seed=0)
    assert losses[-1] < losses[0]
    assert all(p.dtype == dtype for p in cm.module.parameters())
    losses = preconditioner_steps(compiled("mlp", "cpu", dtype), "mlp", "cpu", "empirical", dtype)
    assert losses[-1] < losses[0]


@requires_cuda
@pytest.mark.parametrize("name, settings", [
    ("mlp", "default"), ("mlp", "paper"), ("mlp", "tridiagonal"), ("cnn", "default"), ("gru", "default"),
])
def test_kfac_trains_on_cuda(compiled, name, settings):
    losses = kfac_steps(compiled(name, "cuda"), name, "cuda", **SETTINGS[settings])
    assert losses[-1] < losses[0]


@requires_cuda
@pytest.mark.parametrize("name, fisher", [("cnn", "empirical"), ("cnn", "mc"), ("gru", "mc")])
def test_preconditioner_trains_on_cuda(compiled, name, fisher):
    losses = preconditioner_steps(compiled(name, "cuda"), name, "cuda", fisher)
    assert losses[-1] < losses[0]


@requires_cuda
def test_bfloat16_model_on_cuda_trains_with_float32_factors(compiled):
    cm = compiled("mlp", "cuda", torch.bfloat16)
    losses = kfac_steps(cm, "mlp", "cuda", torch.bfloat16, factor_dtype=torch.float32)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.bfloat16 for p in cm.module.parameters())
    losses = preconditioner_steps(compiled("mlp", "cuda", torch.bfloat16), "mlp", "cuda", "empirical", torch.bfloat16)
    assert losses[-1] < losses[0]


@requires_cuda
def test_kfac_resumes_on_cuda_from_a_host_checkpoint(compiled):
    """A state saved to the host (``torch.load(..., map_location="cpu")``) resumes on the model's device."""
    cm = compiled("mlp", "cuda")
    x, y = batch("mlp", "cuda")
    optimizer = kronograph.optim.KFAC(cm, seed=0)
    for _ in range(3):
        optimizer.step(x, y)
    resumed = kronograph.optim.KFAC(cm, seed=1)
    resumed.load_state_dict(on_device(optimizer.state_dict(), torch.device("cpu")))
    assert "skipped" not in resumed.step(x, y)
    check_state(resumed, "cuda")
