"""Small problems shared by the tests of the methods (K-BFGS, TNT, Shampoo): tiny float64 models for the dense
checks, scikit-learn's digits for a real run against SGD with momentum, the torch / onnxruntime comparison, and
the tensor methods' vec / mat / Kronecker conventions for their dense references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph

F64 = torch.float64


def tiny_mlp():
    """Linear 5->4, tanh, Linear 4->3 in float64, cross-entropy: (compiled, initial state, 6 batches of 8)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=generator, dtype=F64), torch.randint(0, 3, (8,), generator=generator))
               for _ in range(6)]
    cm = kronograph.compile(model, (batches[0][0][:2],), loss="cross_entropy")
    return cm, copy.deepcopy(model.state_dict()), batches


def tiny_cnn():
    """Conv2d(2, 3, 3, stride 2, padding 1), relu, flatten, Linear 27->4 in float64: (compiled, initial, 4 batches)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)).double()
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(6, 2, 5, 5, generator=generator, dtype=F64), torch.randint(0, 4, (6,), generator=generator))
               for _ in range(4)]
    cm = kronograph.compile(model, (batches[0][0][:2],), loss="cross_entropy")
    return cm, copy.deepcopy(model.state_dict()), batches


def digits_problem():
    """A 64-64-10 tanh MLP on scikit-learn's digits, 60 batches of 128 (~4 epochs):
    (model, initial state, x, y, batches as index tensors, compiled)."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    generator = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(len(x), generator=generator) for _ in range(5)])
    batches = [order[i * 128:(i + 1) * 128] for i in range(60)]
    cm = kronograph.compile(model, (x[:2],), loss="cross_entropy")
    return model, copy.deepcopy(model.state_dict()), x, y, batches, cm


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def best_sgd_momentum_loss(digits, lrs=(0.03, 0.1, 0.3, 1.0)) -> float:
    """The lowest training loss of SGD with momentum 0.9 over ``lrs`` on the digits batches (0.089, at lr 1)."""
    model, initial, x, y, batches, _ = digits
    losses = []
    for lr in lrs:
        model.load_state_dict(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        for index in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
        losses.append(training_loss(model, x, y))
    return min(losses)


def digits_on_onnxruntime(digits):
    """The digits model as its exported graph on onnxruntime-training (whose engine then holds the weights)."""
    pytest.importorskip("onnxruntime.training")
    model, initial, x = digits[:3]
    model.load_state_dict(initial)
    return kronograph.compile(model, (x[:2],), loss="cross_entropy", engine="onnxruntime")


def assert_engines_agree(method, digits, digits_onnx, steps: int = 3, **settings) -> None:
    """The same steps of ``method`` on the module and on its exported graph agree to float32 rounding."""
    model, initial, x, y, batches, torch_cm = digits
    model.load_state_dict(initial)
    digits_onnx.onnxruntime().set_parameters({name: value.numpy() for name, value in initial.items()})
    on_torch, on_onnx = method(torch_cm, **settings), method(digits_onnx, **settings)
    for index in batches[:steps]:
        on_torch.step(x[index], y[index])
        on_onnx.step(x[index], y[index])
    weights = digits_onnx.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(torch.as_tensor(weights[name]), value, rtol=1e-4, atol=1e-5)


# -- dense references of the tensor methods (TNT, Shampoo): the thesis's conventions written out ------------
def mat(g: torch.Tensor, i: int) -> torch.Tensor:
    """mat_i(G): the mode-i slices' row-major vecs as rows (sec 4.2.1)."""
    return torch.movedim(g, i, 0).reshape(g.shape[i], -1)


def kron_all(factors) -> torch.Tensor:
    """U_1 (x) ... (x) U_k by torch.kron, the order of the thesis's Proposition 1 with the row-major vec."""
    out = factors[0]
    for u in factors[1:]:
        out = torch.kron(out, u)
    return out


def modes_of(shape) -> tuple[int, ...]:
    """The thesis's modes (line 2249): a conv weight [out, in, kh, kw] as [out, in, kh * kw]."""
    return (shape[0], shape[1], shape[2] * shape[3]) if len(shape) == 4 else tuple(shape)
