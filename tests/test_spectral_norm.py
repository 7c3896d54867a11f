"""Spectrally normed layers (W = W_o / sigma): K-FAC's and KFACPreconditioner's block on the computed weight
(passes/match/spectral_norm.py, runtime/spectral_norm.py).

The independent references: autograd through W(W_o) = W_o / (u^T mat(W_o) v) with the power iteration's u and v
held (PyTorch runs it under no_grad), whose vector-Jacobian product gives grad_{W_o} and whose Jacobian-vector
product the first-order change of W; the plain twin (the same model with W a Parameter of equal value, in eval mode
so that sigma stays put), whose factors the dense-maths tests pin down; and the damped Kronecker solve written out.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import spectral_norm as old_spectral_norm
from torch.nn.utils.parametrizations import spectral_norm

import kronograph
from equality import kfac_resumed
from sequence_batches import batch, learnable_batch
from kronograph.runtime.inverse import CoverageWarning
from kronograph.runtime.spectral_norm import spectral_sigma

#: the W_o of ``normed_net``'s three layers: a conv and a linear normed by parametrization, a head the old way
ORIGINALS = {0: "0.parametrizations.weight.original", 3: "3.parametrizations.weight.original", 5: "5.weight_orig"}


def normed_net() -> nn.Module:
    return nn.Sequential(spectral_norm(nn.Conv1d(2, 4, 3)), nn.Tanh(), nn.Flatten(),
                         spectral_norm(nn.Linear(12, 6)), nn.Tanh(), old_spectral_norm(nn.Linear(6, 3)))


def plain_twin(normed: nn.Module) -> nn.Module:
    """``normed`` with each computed weight a Parameter of equal value (read in eval mode: no power iteration)."""
    twin = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        normed(torch.zeros(1, 2, 5, dtype=normed[3].bias.dtype))  # (the old API sets .weight in the forward)
        for i in ORIGINALS:
            twin[i].weight.copy_(normed[i].weight)
            twin[i].bias.copy_(normed[i].bias)
    return twin


def held_vectors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The power iteration's u, v and dim of ``module``'s spectral norm (either API)."""
    if hasattr(module, "parametrizations"):
        norm = module.parametrizations.weight[0]
        return norm._u, norm._v, norm.dim
    return module.weight_u, module.weight_v, 0


def computed(original: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """W = W_o / (u^T mat(W_o) v), mat(W_o) W_o with ``dim`` first, flattened to a matrix (PyTorch's)."""
    matrix = original.movedim(dim, 0).reshape(original.shape[dim], -1)
    return original / (u @ matrix @ v)


def test_the_plan_holds_each_spectrally_normed_layer_with_its_w_o():
    torch.manual_seed(0)
    net = normed_net()
    for mode in ("train", "eval"):
        getattr(net, mode)()
        plan = kronograph.compile(net, (batch()[0][:2],), loss="cross_entropy").plan
        assert {layer.name: layer.spectral_norm for layer in plan.normed} == {str(i): w for i, w in ORIGINALS.items()}
        for layer in plan.normed:
            assert layer.weight == f"{layer.name}.weight" and layer.weight_norm is None and layer.computed
            assert layer.parameter_names == (layer.spectral_norm, f"{layer.name}.bias")
        assert {u.name for u in plan.unmatched} == {n for layer in plan.normed for n in layer.parameter_names}
        assert "spectral norm's W_o" in next(u.reason for u in plan.unmatched if u.name == ORIGINALS[3])


def test_a_w_o_read_elsewhere_too_or_divided_by_a_constant_gets_no_block():
    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = spectral_norm(nn.Linear(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + x @ self.fc.parametrizations.weight.original

    class Scaled(nn.Module):  # W_o / 2: a scalar, but not computed from W_o
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ (self.weight / torch.tensor(2.0)).T

    class Frobenius(nn.Module):  # a model's own W / |W|: a scalar from W_o, but no PyTorch spectral norm
        def __init__(self, name: str = "weight") -> None:
            super().__init__()
            self.name = name
            self.register_parameter(name, nn.Parameter(torch.randn(4, 4)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = getattr(self, self.name)
            return x @ (weight / weight.norm()).T

    for model in (Reused(), Scaled(), Frobenius()):
        assert kronograph.compile(model, (torch.randn(2, 4),), loss="mse").plan.normed == ()
    # named as the older API names W_o, but without its hook: in the plan, yet no block (no sigma to read)
    cm = kronograph.compile(Frobenius("weight_orig"), (torch.randn(2, 4),), loss="mse")
    assert [layer.spectral_norm for layer in cm.plan.normed] == ["weight_orig"]
    with pytest.warns(CoverageWarning):
        opt = kronograph.optim.KFAC(cm)
    assert opt.blocks == {} and opt.unmatched == ["weight_orig"]
    assert math.isfinite(opt.step(torch.randn(8, 4), torch.randn(8, 4))["loss"])
    assert kronograph.optim.KFACPreconditioner(cm).blocks == {}  # (its .grad kept as the loss's)


@pytest.mark.parametrize("kind", ["conv_transpose", "linear_old"])
def test_sigma_is_the_one_the_last_forward_divided_by(kind):
    torch.manual_seed(0)
    if kind == "conv_transpose":  # spectral norm's dim=1: the matrix is W_o with its output axis first
        module, x, original = spectral_norm(nn.ConvTranspose1d(3, 5, 2)), torch.randn(4, 3, 6), "original"
    else:
        module, x, original = old_spectral_norm(nn.Linear(6, 3)), torch.randn(4, 6), "weight_orig"
    name = f"parametrizations.weight.{original}" if original == "original" else original
    for _ in range(3):  # each training forward moves u and v one power iteration
        module(x)
    module.eval()  # no iteration: the weight is W_o / the sigma of the last forward
    weight_o = module.get_parameter(name).detach()
    sigma = spectral_sigma(module, name)
    torch.testing.assert_close(weight_o / sigma, module.weight.detach())
    assert spectral_sigma(nn.Linear(2, 2), "weight") is None


@pytest.mark.parametrize("index", [0, 3, 5])
def test_the_coordinate_maps_follow_autograd_through_the_held_power_iteration(index):
    """sigma grad_{W_o} is grad_W less its component along u v^T, and dW_o = sigma Delta W moves W by Delta W less
    (u^T Delta W v) W: autograd's VJP and JVP of W(W_o) with u and v held, against those closed forms."""
    torch.manual_seed(0)
    net = normed_net().double()
    net(batch()[0].double())
    module = net[index]
    original = module.get_parameter(ORIGINALS[index].split(".", 1)[1]).detach()
    u, v, dim = held_vectors(module)
    sigma = spectral_sigma(module, ORIGINALS[index].split(".", 1)[1])
    weight = computed(original, u, v, dim)
    generator = torch.Generator().manual_seed(1)
    grad_w = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
    delta_w = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
    _, grad_o = torch.autograd.functional.vjp(lambda w: computed(w, u, v, dim), original, grad_w)
    _, moved = torch.autograd.functional.jvp(lambda w: computed(w, u, v, dim), original, sigma * delta_w)
    outer = torch.outer(u, v).reshape(weight.shape)  # (dim is 0 here: mat(W) is W flattened)
    torch.testing.assert_close(sigma * grad_o, grad_w - (grad_w * weight).sum() * outer)
    torch.testing.assert_close(moved, delta_w - (delta_w * outer).sum() * weight)

    layer = next(layer for layer in kronograph.compile(net, (batch()[0][:2].double(),), loss="cross_entropy"
                                                       ).plan.normed if layer.name == str(index))
    from kronograph.runtime.spectral_norm import parameter_coordinates, weight_coordinates

    sigmas = {layer.weight: sigma}
    pushed = weight_coordinates({layer.spectral_norm: grad_o}, sigmas, [layer])
    torch.testing.assert_close(pushed[layer.weight], sigma * grad_o)
    pulled = parameter_coordinates({layer.weight: delta_w}, sigmas, [layer])
    assert set(pulled) == {layer.spectral_norm}
    torch.testing.assert_close(pulled[layer.spectral_norm], sigma * delta_w)
    # the same inner product in either coordinates: the quadratic model sees the same numbers
    assert float((grad_o * pulled[layer.spectral_norm]).sum()) == pytest.approx(
        float((pushed[layer.weight] * delta_w).sum()), rel=1e-12)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_factors_equal_the_plain_twins_and_the_step_is_the_damped_solve_of_the_projected_gradient():
    """In eval mode (sigma held), the factors equal the twin's, and the paper preset's first step (alpha times the
    proposal, no momentum yet) changes W_o by sigma alpha times minus the damped Kronecker solve of sigma grad_{W_o}
    (grad_W less its u v^T component: the twin's gradient projected), written out from the factors."""
    torch.manual_seed(0)
    net = normed_net().double().eval()
    twin = plain_twin(net).double()
    x, y = batch()
    x = x.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        opt = kronograph.optim.KFAC(kronograph.compile(net, (x[:2],), loss="cross_entropy"), preset="paper",
                                    spectral_norm_blocks=True, factor_dtype=torch.float64, seed=0)
    reference = kronograph.optim.KFAC(kronograph.compile(twin, (x[:2],), loss="cross_entropy"), preset="paper",
                                      factor_dtype=torch.float64, seed=0)
    assert sorted(opt.blocks) == sorted(reference.blocks) == ["0", "3", "5"] and opt.unmatched == []
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    loss = nn.functional.cross_entropy(twin(x), y)
    twin_grads = torch.autograd.grad(loss, [twin[i].weight for i in ORIGINALS] + [twin[i].bias for i in ORIGINALS])
    sigmas = {i: spectral_sigma(net[i], original.split(".", 1)[1]) for i, original in ORIGINALS.items()}
    weights = {i: net[i].weight.detach().clone() for i in ORIGINALS}  # (sigma and W at the step's point)
    info = opt.step(x, y)
    reference.step(x, y)
    for name in opt.blocks:
        torch.testing.assert_close(opt.blocks[name].a, reference.blocks[name].a)
        torch.testing.assert_close(opt.blocks[name].g, reference.blocks[name].g)
    gamma, alpha = opt.inverted_gamma, info["alpha"]
    for number, (i, original) in enumerate(ORIGINALS.items()):
        module = net[i]
        u, v, _ = held_vectors(module)
        sigma, weight = sigmas[i], weights[i]
        grad_w, grad_b = twin_grads[number], twin_grads[number + 3]
        outer = torch.outer(u, v).reshape(weight.shape)
        projected = grad_w - (grad_w * weight).sum() * outer
        a, g = opt.blocks[str(i)].a[0], opt.blocks[str(i)].g[0]
        pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
        bar = torch.cat([projected.reshape(projected.shape[0], -1), grad_b[:, None]], dim=1)
        solve = torch.linalg.solve(g + gamma / pi * torch.eye(g.shape[0], dtype=g.dtype),
                                   torch.linalg.solve(a + pi * gamma * torch.eye(a.shape[0], dtype=a.dtype),
                                                      bar.T).T)
        expected_w = -alpha * sigma * solve[:, :-1].reshape(weight.shape)
        torch.testing.assert_close(net.get_parameter(original) - before[original], expected_w)
        torch.testing.assert_close(module.bias.detach() - before[f"{i}.bias"], -alpha * solve[:, -1])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_off_and_in_the_paper_preset_w_o_steps_outside_every_block():
    x, _ = batch()
    for options in ({"spectral_norm_blocks": False}, {"preset": "paper"}):
        cm = kronograph.compile(normed_net(), (x[:2],), loss="cross_entropy")
        with pytest.warns(CoverageWarning):
            opt = kronograph.optim.KFAC(cm, **options)
        assert opt.blocks == {} and ORIGINALS[3] in opt.unmatched


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_spectrally_normed_net_trains_and_resumes_exactly():
    batches = [batch(32, seed) for seed in range(8)]
    resumed, tail, again = kfac_resumed(normed_net, batches, batches[0][0][:2])
    assert sorted(resumed.blocks) == ["0", "3", "5"]
    assert tail == again
    x, y = learnable_batch()
    losses = {}
    for blocks in (True, False):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CoverageWarning)  # (off: every parameter outside every block)
            # (against the RMS-shaped direction of their own; the default's diagonal Fisher: level on this net)
            opt = kronograph.optim.KFAC(kronograph.compile(normed_net(), (x[:2],), loss="cross_entropy"), seed=0,
                                        spectral_norm_blocks=blocks, unmatched_direction="rms")
        losses[blocks] = [opt.step(x, y)["loss"] for _ in range(20)]
    assert losses[True][-1] < 0.5 * losses[True][0]
    assert losses[True][-1] < losses[False][-1]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("settings", [{"graft": None, "kl_clip": None}, {}])
def test_the_preconditioner_rewrites_w_o_grad_as_sigma_times_the_solve_of_the_projected_gradient(settings):
    """KFACPreconditioner in a user's loop, eval mode (sigma held): W_o's new .grad is sigma times the damped
    Kronecker solve of sigma W_o.grad (in W's coordinates: the twin's gradient projected), the same factor nu of the
    KL clip on every layer, and the bias's the solve's last column."""
    torch.manual_seed(0)
    net = normed_net().double().eval()
    twin = plain_twin(net).double()
    x, y = batch()
    x = x.double()
    precond = kronograph.optim.KFACPreconditioner(kronograph.compile(net, (x[:2],), loss="cross_entropy"),
                                                  factor_dtype=torch.float64, **settings)
    assert sorted(precond.blocks) == ["0", "3", "5"]
    with precond.track():
        nn.functional.cross_entropy(net(x), y).backward()
    raw = {name: p.grad.clone() for name, p in net.named_parameters()}
    info = precond.step()
    loss = nn.functional.cross_entropy(twin(x), y)
    twin_grads = torch.autograd.grad(loss, [twin[i].weight for i in ORIGINALS])
    ratios = []
    for number, (i, original) in enumerate(ORIGINALS.items()):
        module = net[i]
        u, v, _ = held_vectors(module)
        sigma = spectral_sigma(module, original.split(".", 1)[1])
        weight = module.weight.detach()
        outer = torch.outer(u, v).reshape(weight.shape)
        projected = twin_grads[number] - (twin_grads[number] * weight).sum() * outer
        torch.testing.assert_close(sigma * raw[original], projected)  # the gradient W's block reads
        a, g = precond.blocks[str(i)].a[0], precond.blocks[str(i)].g[0]
        gamma = precond.damping
        pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
        bar = torch.cat([projected.reshape(projected.shape[0], -1), raw[f"{i}.bias"][:, None]], dim=1)
        solve = torch.linalg.solve(g + gamma / pi * torch.eye(g.shape[0], dtype=g.dtype),
                                   torch.linalg.solve(a + pi * gamma * torch.eye(a.shape[0], dtype=a.dtype),
                                                      bar.T).T)
        if settings:  # raw F^-1 g: no grafting, no clip
            torch.testing.assert_close(net.get_parameter(original).grad, sigma * solve[:, :-1].reshape(weight.shape),
                                       rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(module.bias.grad, solve[:, -1], rtol=1e-5, atol=1e-8)
        else:  # grafted to the gradient's norm per layer, then one KL factor: each layer a multiple of its solve
            ratios.append(float(module.bias.grad.norm() / solve[:, -1].norm()))
            torch.testing.assert_close(net.get_parameter(original).grad / ratios[-1],
                                       sigma * solve[:, :-1].reshape(weight.shape), rtol=1e-5, atol=1e-8)
    assert info["preconditioned"] == 3


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("options", [{}, {"preset": "paper", "spectral_norm_blocks": True}])
def test_a_step_moves_the_power_iteration_once_however_many_forwards_it_runs(options):
    """A training-mode step (the batch passed as two halves, the statistics, the quadratic model's products by
    differences or by forward mode, rho: many forwards) leaves u and v one power iteration on from where they were,
    at the weights before the step: u = normalize(W_o v), then v = normalize(W_o^T u) (the old API: v first), as one
    forward of the user's own loop would."""
    torch.manual_seed(0)
    net = normed_net()
    x, y = batch()
    opt = kronograph.optim.KFAC(kronograph.compile(net, (x[:2],), loss="cross_entropy"), seed=0, **options)
    for step in range(3):
        expected = {}
        for i in ORIGINALS:
            u, v, dim = held_vectors(net[i])
            original = net.get_parameter(ORIGINALS[i]).detach()
            matrix = original.movedim(dim, 0).reshape(original.shape[dim], -1)
            if i == 5:
                v_next = nn.functional.normalize(matrix.T @ u, dim=0, eps=1e-12)
                expected[i] = (nn.functional.normalize(matrix @ v_next, dim=0, eps=1e-12), v_next)
            else:
                u_next = nn.functional.normalize(matrix @ v, dim=0, eps=1e-12)
                expected[i] = (u_next, nn.functional.normalize(matrix.T @ u_next, dim=0, eps=1e-12))
        info = opt.step(*batch(32, step))
        assert "skipped" not in info
        for i, (u_next, v_next) in expected.items():
            u, v, _ = held_vectors(net[i])
            torch.testing.assert_close(u, u_next)
            torch.testing.assert_close(v, v_next)
