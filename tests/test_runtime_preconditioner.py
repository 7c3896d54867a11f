"""kronograph.optim.KFACPreconditioner against dense algebra, and in the user's own training loop.

The oracle builds each layer's factors from scratch: the layers' inputs and per-example output gradients
are read by forward hooks and autograd on a copy of the model (per-example losses summed, so that row i
of dL/ds is dl_i/ds_i), conv patches come from F.unfold here, and the damped Kronecker system is solved
densely with torch.kron on the column-stacked vec of grad W_bar.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph
from kronograph.runtime.inverse import CoverageWarning, InverseWarning, StatisticsWarning
from kronograph.runtime.losses import get_loss

N, CLASSES = 8, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, CLASSES)
    ).double()


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2, bias=False),
        nn.Flatten(), nn.Linear(2 * 3 * 3, CLASSES),
    ).double()


def batch(model: nn.Module, seed: int, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (n, 3) if isinstance(model[0], nn.Linear) else (n, 2, 7, 7)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (n,), generator=generator)


def oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, stats_targets: torch.Tensor | None = None) -> dict:
    """{layer module index: (A, G, grad W_bar of the mean loss on (x, y))} by explicit per-example algebra.

    G uses ``stats_targets`` when given (sampled targets of the MC Fisher), else the labels.
    """
    model = copy.deepcopy(model)
    layers = {i: m for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv2d))}
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, (inp[0].detach(), out)))
             for i, m in layers.items()]
    outputs = model(x)
    for hook in hooks:
        hook.remove()
    grads = torch.autograd.grad(F.cross_entropy(outputs, y), [m.weight for m in layers.values()] +
                                [m.bias for m in layers.values() if m.bias is not None], retain_graph=True)
    grads = dict(zip([(i, "w") for i in layers] + [(i, "b") for i, m in layers.items() if m.bias is not None], grads))
    targets = y if stats_targets is None else stats_targets
    per_example = F.cross_entropy(outputs, targets, reduction="none")
    rows = torch.autograd.grad(per_example.sum(), [seen[i][1] for i in layers])  # row i: dl_i/ds_i
    result = {}
    for (i, layer), g in zip(layers.items(), rows):
        a = seen[i][0]
        if isinstance(layer, nn.Conv2d):  # KFC: patches [N, D, T], A = mean_i sum_t, G = mean_i mean_t
            a = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            if layer.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, a.shape[2], dtype=a.dtype)], dim=1)
            g = g.reshape(g.shape[0], g.shape[1], -1)
            big_a = torch.einsum("ndt,net->de", a, a) / a.shape[0]
            big_g = torch.einsum("nit,njt->ij", g, g) / (g.shape[0] * g.shape[2])
        else:
            if layer.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            big_a, big_g = a.T @ a / a.shape[0], g.T @ g / g.shape[0]
        grad_bar = grads[(i, "w")].reshape(layer.weight.shape[0], -1)
        if layer.bias is not None:
            grad_bar = torch.cat([grad_bar, grads[(i, "b")][:, None]], dim=1)
        result[i] = (big_a, big_g, grad_bar)
    return result


def damped_solve(a: torch.Tensor, g: torch.Tensor, grad_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """((A + pi gamma I) kron (G + gamma/pi I))^-1 vec(grad W_bar), vec stacking columns, as a matrix."""
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    eye_a, eye_g = torch.eye(a.shape[0], dtype=a.dtype), torch.eye(g.shape[0], dtype=g.dtype)
    matrix = torch.kron(a + pi * gamma * eye_a, g + gamma / pi * eye_g)
    solved = torch.linalg.solve(matrix, grad_bar.T.reshape(-1))
    return solved.reshape(grad_bar.shape[1], grad_bar.shape[0]).T


def assert_preconditioned(model: nn.Module, factors: dict, gamma: float, scale: float = 1.0,
                          graft: str | None = None, kl_clip: float | None = None, lr: float = 0.1) -> float:
    """Each layer's .grad against the dense damped solve (grafted, then scaled by the KL bound's nu); returns nu."""
    solves = {}
    for i, (a, g, grad_bar) in factors.items():
        solves[i] = scale * damped_solve(a, g, grad_bar, gamma)
        if graft == "norm":  # the solve's direction with the layer gradient's norm
            solves[i] = solves[i] * (scale * grad_bar.norm() / solves[i].norm())
    nu = 1.0
    if kl_clip is not None:  # one factor for all layers: lr^2 sum_l v_l . g_l at most kl_clip
        total = sum(lr ** 2 * float((solves[i] * scale * grad_bar).sum()) for i, (*_, grad_bar) in factors.items())
        nu = min(1.0, math.sqrt(kl_clip / abs(total)))
    for i, expected in solves.items():
        layer, expected = model[i], nu * expected
        weight = expected[:, : layer.weight[0].numel()].reshape(layer.weight.shape)
        assert torch.allclose(layer.weight.grad, weight, rtol=1e-9, atol=1e-12), i
        if layer.bias is not None:
            assert torch.allclose(layer.bias.grad, expected[:, -1], rtol=1e-9, atol=1e-12), i
    return nu


def user_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> None:
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction=reduction).backward()


@pytest.mark.parametrize("make, reduction, graft, kl_clip", [
    (mlp, "mean", None, None), (mlp, "sum", None, None), (convnet, "mean", None, None), (mlp, "sum", "norm", None),
    (convnet, "mean", "norm", None), (mlp, "mean", None, 1e-3), (mlp, "sum", "norm", 1e-4), (convnet, "mean", "norm", 1e-4),
])
def test_grad_is_the_dense_damped_solve(make, reduction, graft, kl_clip):
    model, gamma = make(), 0.1
    precond = kronograph.optim.KFACPreconditioner(
        kronograph.compile(model, batch(model, 0)[:1]), damping=gamma, ema_decay=0.5, factor_dtype=torch.float64,
        loss_reduction=reduction, graft=graft, kl_clip=kl_clip,
    )
    scale = N if reduction == "sum" else 1.0
    norm = next(m for m in model if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)))
    previous = None
    for seed in (1, 2):  # step 2 checks the EMA: 0.5 * batch 1 + 0.5 * batch 2
        x, y = batch(model, seed)
        factors = oracle(model, x, y)
        if previous is not None:
            factors = {i: (0.5 * (a + previous[i][0]), 0.5 * (g + previous[i][1]), grad)
                       for i, (a, g, grad) in factors.items()}
        with precond.track():
            user_backward(model, x, y, reduction)
        unmatched = [p.grad.clone() for p in norm.parameters()]
        info = precond.step()
        assert info["statistics_updated"] and info["inverses_updated"] and info["preconditioned"] == 3
        nu = assert_preconditioned(model, factors, gamma, scale, graft, kl_clip)
        if kl_clip is not None:  # the bound binds in these cases, and the step reports it
            assert nu < 0.9 and info["kl_scale"] == pytest.approx(nu, rel=1e-9)
        for before, p in zip(unmatched, norm.parameters()):
            assert torch.equal(p.grad, before)  # LayerNorm / BatchNorm weights keep their own .grad
        previous = factors


def test_mc_statistics_touch_no_grad_or_running_stats_and_use_sampled_targets():
    model, gamma = convnet(), 0.05
    x, y = batch(model, 1)
    precond = kronograph.optim.KFACPreconditioner(
        kronograph.compile(model, (x,)), damping=gamma, fisher="mc", factor_dtype=torch.float64, seed=4, graft=None,
        kl_clip=None,
    )
    user_backward(model, x, y)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    generator = torch.Generator().manual_seed(0)
    generator.set_state(precond.generator.get_state())
    sampled = get_loss("cross_entropy").sample_targets(copy.deepcopy(model)(x), generator)
    factors = oracle(model, x, y, stats_targets=sampled)
    info = precond.update_statistics(x)
    assert info["statistics_updated"]
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    info = precond.step()  # no inputs needed: update_statistics already ran for this step
    assert info["statistics_updated"] and info["preconditioned"] == 3
    assert_preconditioned(model, factors, gamma)
    with pytest.raises(kronograph.KronographError, match="step\\(x\\)"):
        precond.step()  # statistics due at step 2 and no inputs


@pytest.mark.parametrize("fisher, make_optimizer", [
    ("empirical", lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9)),
    ("mc", lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9)),
    ("empirical", lambda ps: torch.optim.Adam(ps, lr=0.01)),
])
def test_training_loop_lowers_the_loss(fisher, make_optimizer):
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(256, 10)
    y = teacher(x).argmax(1).detach()
    model = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
    precond = kronograph.optim.KFACPreconditioner(
        kronograph.compile(model, (x[:2],)), damping=0.03, fisher=fisher, inverse_every=5, stats_fraction=0.5, seed=0
    )
    optimizer = make_optimizer(model.parameters())
    losses = []
    for step in range(40):
        xb, yb = x[step % 4 * 64 : (step % 4 + 1) * 64], y[step % 4 * 64 : (step % 4 + 1) * 64]
        optimizer.zero_grad()
        with precond.track():
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
        info = precond.step(xb if fisher == "mc" else None)
        assert info["preconditioned"] == 2 and not info["non_finite_grad"]
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])


@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_kl_bound_keeps_sgds_usual_loop_from_diverging(batch_size):
    """SGD lr 0.1, momentum 0.9, Nesterov, no clipping, on batches of 1 and 4: without the bound the grafted steps
    diverge (the gradient grows step after step); with the default bound the loss falls (BENCHMARKS.md)."""
    def final_loss(kl_clip: float | None) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(512, 20, generator=generator)
        y = (x @ torch.randn(20, 5, generator=generator)).argmax(1)
        precond = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (x[:2],)), kl_clip=kl_clip, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        for _ in range(200):
            index = torch.randint(512, (batch_size,), generator=generator)
            optimizer.zero_grad()
            with precond.track():
                F.cross_entropy(model(x[index]), y[index]).backward()
            precond.step()
            optimizer.step()
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unbounded run's non-finite statistics and inverses
        unbounded = final_loss(None)
    assert not unbounded < 10  # NaN, or far above the start (1.6)
    assert final_loss(1e-3) < 1.2


def test_the_kl_bound_reads_each_layers_learning_rate_from_the_optimizer():
    """lr=optimizer: the bound's sum weighs each layer by the rate of its weight's parameter group, read at the step
    (a schedule's change is followed); nu scales every matched layer alike and leaves the LayerNorm's .grad."""
    model = mlp()
    x, y = batch(model, 1)
    unbounded = copy.deepcopy(model)
    groups = [{"params": list(model[0].parameters()), "lr": 0.3}, {"params": list(model[1:].parameters())}]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    optimizer.param_groups[0]["lr"] = 0.5  # as a scheduler would, after construction
    settings = dict(damping=0.1, factor_dtype=torch.float64)
    bounded = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (x,)), kl_clip=1e-4, lr=optimizer,
                                                  **settings)
    reference = kronograph.optim.KFACPreconditioner(kronograph.compile(unbounded, (x,)), kl_clip=None, **settings)
    infos = {}
    for net, precond in ((model, bounded), (unbounded, reference)):
        with precond.track():
            user_backward(net, x, y)
        raw = {n: p.grad.clone() for n, p in net.named_parameters()}  # the same gradients in both nets
        infos[precond] = precond.step()
    rates = {"0": 0.5, "3": 0.1, "5": 0.1}  # the matched layers' groups' rates now
    total = sum(rates[name.split(".")[0]] ** 2 * float((p.grad * raw[name]).sum())
                for name, p in unbounded.named_parameters() if not name.startswith("1."))
    nu = min(1.0, math.sqrt(1e-4 / abs(total)))
    assert nu < 0.9 and infos[bounded]["kl_scale"] == pytest.approx(nu, rel=1e-9)  # the bound binds, reported
    assert "kl_scale" not in infos[reference]
    for (name, p), q in zip(model.named_parameters(), unbounded.parameters()):
        want = q.grad if name.startswith("1.") else nu * q.grad  # the LayerNorm keeps its gradient
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12)

    stranger = torch.optim.SGD(model[0].parameters(), lr=0.1)
    other = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (x,)), lr=stranger)
    with other.track():
        user_backward(model, x, y)
    with pytest.raises(kronograph.KronographError, match="does not hold every preconditioned layer"):
        other.step()


@pytest.mark.parametrize("activation_rows", [None, 20])  # 20 of a convolution's 8 x 49 or 8 x 9 patch rows
def test_state_dict_round_trip_gives_identical_next_grad(activation_rows):
    def setup():
        model = convnet()
        precond = kronograph.optim.KFACPreconditioner(
            kronograph.compile(model, batch(model, 0)[:1]), fisher="mc", stats_fraction=0.5, inverse_every=2,
            ema_decay=None, damping=0.1, seed=9, activation_rows=activation_rows,
        )
        return model, precond, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def run(model, precond, optimizer, seeds):
        grads = []
        for seed in seeds:
            x, y = batch(model, seed, 16)
            user_backward(model, x, y)
            precond.step(x)
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
        return grads

    model, precond, optimizer = setup()
    run(model, precond, optimizer, [1, 2, 3])
    saved = copy.deepcopy((model.state_dict(), precond.state_dict(), optimizer.state_dict()))
    expected = run(model, precond, optimizer, [4, 5, 6])
    model, precond, optimizer = setup()
    model.load_state_dict(saved[0])
    precond.load_state_dict(saved[1])
    optimizer.load_state_dict(saved[2])
    for got, want in zip(run(model, precond, optimizer, [4, 5, 6]), expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_activation_rows_thin_a_convolutions_a_only():
    """With activation_rows, the convolutions' A (8 x 49 and 8 x 9 rows) come from 20 rows and differ from every
    row's; their G and the linear layer's factors (a row an example) are those of every row."""
    factors = []
    for rows in (None, 20):
        model = convnet()
        precond = kronograph.optim.KFACPreconditioner(kronograph.compile(model, batch(model, 0)[:1]), seed=3,
                                                      factor_dtype=torch.float64, activation_rows=rows)
        x, y = batch(model, 1, 8)
        with precond.track():
            user_backward(model, x, y)
        precond.step()
        factors.append({name: (block.a, block.g) for name, block in precond.blocks.items()})
    every, thinned = factors
    convolutions = [name for name, block in precond.blocks.items() if block.layer.geometry is not None]
    assert len(convolutions) == 2
    for name in every:
        assert torch.equal(every[name][1], thinned[name][1])
        assert torch.equal(every[name][0], thinned[name][0]) == (name not in convolutions), name


def test_non_finite_grad_and_statistics_are_left_out_and_reported():
    model = mlp()
    x, y = batch(model, 1)
    precond = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (x,)), factor_dtype=torch.float64)
    with precond.track():
        user_backward(model, x, y)
    model[0].weight.grad[0, 0] = float("nan")
    poisoned = model[0].weight.grad.clone()
    info = precond.step()
    assert info["non_finite_grad"] == ["0"] and info["preconditioned"] == 2
    assert torch.equal(model[0].weight.grad.isnan(), poisoned.isnan())
    factors = {name: block.a.clone() for name, block in precond.blocks.items()}
    bad = x.clone()
    bad[0, 0] = float("nan")
    with precond.track():
        user_backward(model, bad, y)
    with pytest.warns(StatisticsWarning):
        info = precond.step()
    assert not info["statistics_updated"] and sorted(info["rejected_statistics"]) == ["0", "3", "5"]
    assert all(torch.equal(block.a, factors[name]) for name, block in precond.blocks.items())


def test_a_failed_inverse_names_the_preconditioners_own_knob():
    """KFACPreconditioner's damping is ``damping`` (KFAC's is ``factor_damping``): the warning says which to raise."""
    model = mlp()
    x, y = batch(model, 1)
    precond = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (x,)))
    with precond.track():
        user_backward(model, x, y)
    precond.step()
    precond.blocks["0"].a.fill_(float("inf"))  # a poisoned estimate: its inverse fails at the next refresh
    with precond.track():
        user_backward(model, x, y)
    with pytest.warns(InverseWarning, match="raise damping if") as caught:
        info = precond.step()
    assert info["failed_inverses"] == ["0"] and not any("factor_damping" in str(w.message) for w in caught)


def test_schedule_and_misuse():
    model = mlp()
    x, y = batch(model, 1)
    compiled = kronograph.compile(model, (x,))
    precond = kronograph.optim.KFACPreconditioner(compiled, stats_every=2)
    with pytest.raises(kronograph.KronographError, match="track"):
        user_backward(model, x, y)
        precond.step()  # statistics due at step 1, nothing tracked
    infos = []
    for _ in range(3):
        with precond.track():
            user_backward(model, x, y)
        infos.append(precond.step())
    assert [i["statistics_updated"] for i in infos] == [True, False, True]
    assert [i["inverses_updated"] for i in infos] == [True, True, True]  # steps 1-3
    with pytest.raises(kronograph.KronographError, match="track"):
        precond.update_statistics(x)
    for kwargs, message in [({"fisher": "exact"}, "fisher"), ({"loss_reduction": "none"}, "loss_reduction"),
                            ({"damping": 0.0}, "damping"), ({"stats_fraction": 2.0}, "stats_fraction"),
                            ({"activation_rows": 0}, "activation_rows"), ({"kl_clip": 0.0}, "kl_clip"),
                            ({"lr": -1.0}, "lr="), ({"lr": "0.1"}, "lr=")]:
        with pytest.raises(kronograph.KronographError, match=message):
            kronograph.optim.KFACPreconditioner(compiled, **kwargs)


@pytest.mark.parametrize("bounds, one_block", [((0, N // 2, N), False), ((0, N // 2, N), True),
                                               ((0, N // 4, 3 * N // 4, N), False)])
def test_accumulated_parts_equal_one_batch(bounds, one_block):
    """track(loss_scale=share) blocks on parts of a batch (halves; a quarter, a half and a quarter: each capture
    weighted by its examples), or one track() around both halves (the 1/2 is derived from the two forwards seen; a
    no_grad validation forward inside is ignored), pool into the factors of the whole batch."""
    whole, parted = mlp(), mlp()
    x, y = batch(whole, 1)
    settings = dict(damping=0.1, factor_dtype=torch.float64)
    precond_whole = kronograph.optim.KFACPreconditioner(kronograph.compile(whole, (x,)), **settings)
    precond_parts = kronograph.optim.KFACPreconditioner(kronograph.compile(parted, (x,)), **settings)
    with precond_whole.track():
        user_backward(whole, x, y)
    precond_whole.step()
    parted.zero_grad()
    parts = [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]
    if one_block:
        with precond_parts.track():
            for part in parts:
                (0.5 * F.cross_entropy(parted(x[part]), y[part])).backward()
            with torch.no_grad():
                parted(x[:3])  # a validation forward
    else:
        for part in parts:
            share = (part.stop - part.start) / N
            with precond_parts.track(loss_scale=share):
                (share * F.cross_entropy(parted(x[part]), y[part])).backward()
    precond_parts.step()
    for a, b in zip(precond_whole.blocks.values(), precond_parts.blocks.values()):
        torch.testing.assert_close(a.a, b.a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.g, b.g, rtol=1e-10, atol=1e-12)
    for p, q in zip(whole.parameters(), parted.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_layer_wider_than_max_kronecker_dim_keeps_its_gradient(fisher):
    """max_kronecker_dim=8 on a 5-8-3 MLP: the second layer (a 9-wide A) is named in a CoverageWarning, gets no
    block and is not captured; its .grad stays the loss's gradient while the first layer's is rewritten."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    compiled = kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy")
    first, second = compiled.layers
    with pytest.warns(CoverageWarning, match="9-wide A factor"):
        precond = kronograph.optim.KFACPreconditioner(compiled, fisher=fisher, max_kronecker_dim=8, seed=0)
    assert list(precond.blocks) == [first.name]
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    model.zero_grad()
    with precond.track():
        nn.functional.cross_entropy(model(x), y).backward()
    raw = {name: p.grad.clone() for name, p in model.named_parameters()}
    precond.step(x)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, raw[name]) == (name in (second.weight, second.bias))
