"""TNT and TNT-EF (runtime/methods/tnt.py) against Ren's thesis, chapter 4, written out densely in this file.

Conventions of sec 4.2.1 used by the references here: vec is ROW-major (torch's reshape(-1)), mat_i(G) is
movedim(G, i, 0).reshape(d_i, -1), G^(i) = mat_i(G) mat_i(G)^T, and Proposition 1 (4.3) says
(U_1 (x) ... (x) U_k) vec(G) = vec(G x_1 U_1 ... x_k U_k) with (x) = torch.kron. The reference Algorithm 15
builds the Kronecker product (U~_1 + eps I) (x) ... (x) (U~_k + eps I) explicitly and solves with it; gradients
come from autograd on the model itself; only the sampling of targets (loss.sample_targets, with a generator
seeded as the optimizer's) is shared with the implementation.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import kronograph
from kronograph.runtime.inverse import SkippedStepWarning
from kronograph.runtime.losses import get_loss
from kronograph.runtime.methods.tnt import TNT, TNTEF, mode_products, normalized_factors
from equality import same
from method_problems import (
    assert_engines_agree,
    best_sgd_momentum_loss,
    digits_on_onnxruntime,
    digits_problem,
    kron_all,
    mat,
    modes_of,
    tiny_cnn,
    tiny_mlp,
    training_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


# -- 1: mode products are the Kronecker product (Proposition 1) --------------------------------------------
@pytest.mark.parametrize("dims", [(5,), (3, 4), (2, 3, 4), (2, 3, 4, 3)])
def test_mode_products_are_the_kronecker_product(dims) -> None:
    generator = torch.Generator().manual_seed(len(dims))
    g = torch.randn(*dims, generator=generator, dtype=F64)
    factors = [torch.randn(d, d, generator=generator, dtype=F64) for d in dims]  # not symmetric: orientation
    want = kron_all(factors) @ g.reshape(-1)
    torch.testing.assert_close(mode_products(g, factors).reshape(-1), want, rtol=1e-12, atol=1e-12)


# -- 2: (4.10) ---------------------------------------------------------------------------------------------
def test_trace_normalisation_equalises_the_modes() -> None:
    """(4.10): tr(U~_i) / d_i = c0 for every i, so that tr((x) U~_i) = prod_i d_i c0 = D c0^k = tr G^(i)
    = |G|^2; scaling the statistics by s scales each U~_i by s^(1/k) (not scale-free: eps sees the scale)."""
    generator = torch.Generator().manual_seed(0)
    dims = (2, 5, 3)
    g = torch.randn(*dims, generator=generator, dtype=F64)
    stats = [mat(g, i) @ mat(g, i).T for i in range(3)]
    u = normalized_factors(stats, dims)
    c0 = (g.square().sum() / math.prod(dims)) ** (1 / 3)
    for ui, d in zip(u, dims):
        assert float(torch.trace(ui) / d) == pytest.approx(float(c0), rel=1e-12)
    assert float(torch.trace(kron_all(u))) == pytest.approx(float(g.square().sum()), rel=1e-12)
    for ui, vi in zip(u, normalized_factors([8.0 * s for s in stats], dims)):
        torch.testing.assert_close(vi, 2.0 * ui)  # 8^(1/3)


def test_trace_normalisation_recovers_a_tensor_normal_covariance() -> None:
    """G ~ TN(0, U_1, U_2, U_3), drawn as vec(G) = (L_1 (x) L_2 (x) L_3) z with U_i = L_i L_i^T: the U~_i of
    (4.10) from the Monte-Carlo E[G^(i)] multiply to E[vec(G) vec(G)^T] = U_1 (x) U_2 (x) U_3, whatever scale
    each U_i carries (here U_1 is 10 times larger than the others)."""
    generator = torch.Generator().manual_seed(1)
    dims, samples = (2, 3, 2), 40000
    covariances = []
    for scale, d in zip((10.0, 1.0, 0.3), dims):
        a = torch.randn(d, d, generator=generator, dtype=F64)
        covariances.append(scale * (a @ a.T + 0.5 * torch.eye(d, dtype=F64)))
    root = kron_all([torch.linalg.cholesky(c) for c in covariances])
    vecs = torch.randn(samples, math.prod(dims), generator=generator, dtype=F64) @ root.T
    gs = vecs.reshape(samples, *dims)
    stats = []  # the Monte-Carlo E[G^(i)] = mean_n mat_i(G_n) mat_i(G_n)^T
    for i, d in enumerate(dims):
        rows = torch.movedim(gs, i + 1, 1).reshape(samples, d, -1)
        stats.append(torch.einsum("nik,njk->ij", rows, rows) / samples)
    got = kron_all(normalized_factors(stats, dims))
    want = kron_all(covariances)
    assert float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) < 0.05
    empirical = vecs.T @ vecs / samples
    assert float(torch.linalg.norm(got - empirical) / torch.linalg.norm(empirical)) < 0.05


# -- 3: Algorithm 15 step by step, densely ---------------------------------------------------------------
def reference(model: nn.Module, batches, *, lr, damping, beta=0.9, momentum=0.9, weight_decay=0.0, stats_every=1,
              inverse_every=1, fisher="mc", max_dense_dim=10**9, seed=0):
    """Algorithm 15 with dense Kronecker products; returns [(weights, loss)] after each step."""
    loss_fn = get_loss("cross_entropy")
    generator = torch.Generator().manual_seed(seed)
    w = {name: p.detach().clone() for name, p in model.named_parameters()}
    g_hat, g_hat_stats, inverses, out = {}, {}, {}, []

    def grad(x, y):
        params = {name: t.clone().requires_grad_() for name, t in w.items()}
        loss = F.cross_entropy(functional_call(model, params, (x,)), y)
        return float(loss.detach()), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    for t, (x, y) in enumerate(batches, 1):
        loss, g = grad(x, y)
        if t == 1 or t % stats_every == 0:
            if fisher == "mc":
                with torch.no_grad():
                    outputs = functional_call(model, w, (x,))
                _, stat_g = grad(x, loss_fn.sample_targets(outputs, generator))
            else:
                stat_g = g
            for name, gs in stat_g.items():
                dims = modes_of(gs.shape)
                gs = gs.reshape(dims)
                new = []
                for i, d in enumerate(dims):
                    c = mat(gs, i) @ mat(gs, i).T
                    new.append(torch.diag(torch.diag(c)) if d > max_dense_dim else c)
                old = g_hat_stats.get(name)
                g_hat_stats[name] = new if old is None else [beta * a + (1 - beta) * b for a, b in zip(old, new)]
        for name, gi in g.items():  # line 10
            g_hat[name] = gi.clone() if name not in g_hat else momentum * g_hat[name] + gi
        if t == 1 or t % inverse_every == 0:
            for name, stats in g_hat_stats.items():
                dims, k = modes_of(w[name].shape), len(g_hat_stats[name])
                total = math.prod(dims)
                c0 = (torch.trace(stats[0]) / total) ** (1 / k)
                tilde = [s / (c0 ** (k - 1) * total / d) for s, d in zip(stats, dims)]
                inverses[name] = kron_all([u + damping * torch.eye(u.shape[0], dtype=F64) for u in tilde])
        for name in w:
            p = torch.linalg.solve(inverses[name], g_hat[name].reshape(-1)).reshape(w[name].shape)
            p = p + weight_decay * w[name]
            w[name] = w[name] - lr * p
        out.append(({name: t.clone() for name, t in w.items()}, loss))
    return out


@pytest.fixture(scope="module")
def mlp():
    return tiny_mlp()


@pytest.fixture(scope="module")
def cnn():
    return tiny_cnn()


def run(cm, initial, batches, method=TNT, seed=0, **settings):
    cm.module.load_state_dict(initial)
    optimizer = method(cm, seed=seed, factor_dtype=F64, **settings)
    trajectory = []
    for x, y in batches:
        info = optimizer.step(x, y)
        trajectory.append(({n: p.detach().clone() for n, p in cm.module.named_parameters()}, info))
    return optimizer, trajectory


CASES = {
    "mlp mc": ("mlp", dict(lr=0.05, damping=0.1)),
    "mlp mc, T1=2, T2=3, weight decay": ("mlp", dict(lr=0.05, damping=0.1, stats_every=2, inverse_every=3,
                                                     weight_decay=0.01)),
    "mlp empirical, beta 0.5, mu 0.7": ("mlp", dict(lr=0.05, damping=0.1, fisher="empirical", beta=0.5,
                                                    momentum=0.7)),
    "cnn mc": ("cnn", dict(lr=0.05, damping=0.1)),
    "cnn empirical, T1=2, diagonal modes > 4": ("cnn", dict(lr=0.05, damping=0.1, fisher="empirical",
                                                            stats_every=2, max_dense_dim=4)),
}


@pytest.mark.parametrize("model, settings", CASES.values(), ids=CASES.keys())
def test_steps_equal_dense_algorithm_15(request, model, settings) -> None:
    cm, initial, batches = request.getfixturevalue(model)
    batches, settings = batches[:4], {"stats_every": 1, "inverse_every": 1, **settings}
    _, got = run(cm, initial, batches, **settings)
    cm.module.load_state_dict(initial)
    want = reference(cm.module, batches, **settings)
    for k, ((got_w, info), (want_w, want_loss)) in enumerate(zip(got, want), 1):
        assert info["loss"] == pytest.approx(want_loss, rel=1e-12)
        assert "skipped" not in info
        for name in want_w:
            torch.testing.assert_close(got_w[name], want_w[name], rtol=0, atol=1e-10,
                                       msg=lambda m: f"step {k}, {name}: {m}")
        assert info["statistics_updated"] == (k == 1 or k % settings["stats_every"] == 0)
        assert info["inverses_updated"] == (k == 1 or k % settings["inverse_every"] == 0)


# -- 4: the per-example statistics ------------------------------------------------------------------------
def test_per_example_statistics_have_the_batch_form_expectation(mlp) -> None:
    """Over every assignment of sampled targets to 3 examples (3 classes: 27, weighted by the model's
    probabilities), the expected per-example statistics sum_n mat_i(g_n / m) mat_i(g_n / m)^T equal the
    expected contraction of the mean gradient: the cross terms vanish as E_y[g_n | x_n] = 0. For the labels
    (one assignment) they differ. The per-example form is also checked against g_n from autograd here."""
    cm, initial, batches = mlp
    cm.module.load_state_dict(initial)
    x = batches[0][0][:3]
    batch, per = TNT(cm, factor_dtype=F64), TNT(cm, factor_dtype=F64, per_example=True)
    with torch.no_grad():
        probs = torch.softmax(cm.module(x), -1)
    expected_batch = expected_per = None
    for combo in itertools.product(range(3), repeat=3):
        y = torch.tensor(combo)
        weight = float(probs[torch.arange(3), y].prod())
        a, b = batch.statistics_of((x,), y), per.statistics_of((x,), y)
        if expected_batch is None:
            expected_batch = {n: [0 * s for s in ss] for n, ss in a.items()}
            expected_per = {n: [0 * s for s in ss] for n, ss in b.items()}
        for n in a:
            expected_batch[n] = [e + weight * s for e, s in zip(expected_batch[n], a[n])]
            expected_per[n] = [e + weight * s for e, s in zip(expected_per[n], b[n])]
    for n in expected_batch:
        for e_batch, e_per in zip(expected_batch[n], expected_per[n]):
            torch.testing.assert_close(e_per, e_batch, rtol=1e-10, atol=1e-14)
    y = batches[0][1][:3]
    got = per.statistics_of((x,), y)
    params = {n: p.detach().clone().requires_grad_() for n, p in cm.module.named_parameters()}
    for n_ex in range(3):
        loss = F.cross_entropy(functional_call(cm.module, params, (x[n_ex:n_ex + 1],)), y[n_ex:n_ex + 1])
        for (name, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            g = g / 3
            for i in range(g.dim()):
                got[name][i] = got[name][i] - mat(g, i) @ mat(g, i).T
    for name, ss in got.items():
        for s in ss:
            torch.testing.assert_close(s, torch.zeros_like(s), rtol=0, atol=1e-14)
    labels = batch.statistics_of((x,), y)["0.weight"][0]
    assert not torch.allclose(labels, per.statistics_of((x,), y)["0.weight"][0])
    per_step = TNT(cm, factor_dtype=F64, per_example=True, lr=0.01)
    assert "skipped" not in per_step.step(*batches[0])


# -- 5: checkpoints, atomic steps, settings --------------------------------------------------------------
@pytest.mark.parametrize("method", [TNT, TNTEF])
def test_resume_is_exact(cnn, method) -> None:
    cm, initial, batches = cnn
    settings = dict(lr=0.05, stats_every=2, inverse_every=3, seed=5)
    _, straight = run(cm, initial, batches, method, **settings)
    first, _ = run(cm, initial, batches[:2], method, **settings)
    state, weights = first.state_dict(), copy.deepcopy(cm.module.state_dict())
    cm.module.load_state_dict(initial)
    resumed = method(cm, factor_dtype=F64, lr=0.05, stats_every=2, inverse_every=3, seed=99)
    cm.module.load_state_dict(weights)
    resumed.load_state_dict(state)
    for (want, want_info), (x, y) in zip(straight[2:], batches[2:]):
        assert resumed.step(x, y) == want_info
        for name, p in cm.module.named_parameters():
            assert torch.equal(p.detach(), want[name])


def test_state_of_another_model_is_refused(mlp, cnn) -> None:
    conv, _ = run(*cnn[:2], cnn[2][:1])
    with pytest.raises(kronograph.KronographError, match="another model"):
        TNT(mlp[0]).load_state_dict(conv.state_dict())


@pytest.mark.parametrize("method", [TNT, TNTEF])
def test_nan_batch_changes_nothing(mlp, method) -> None:
    cm, initial, batches = mlp
    optimizer, _ = run(cm, initial, batches[:2], method, lr=0.05)
    weights, state = copy.deepcopy(cm.module.state_dict()), optimizer.state_dict()
    x, y = batches[2]
    poisoned = x.clone()
    poisoned[3, 1] = math.nan
    with pytest.warns(SkippedStepWarning, match="not finite|non-finite"):
        info = optimizer.step(poisoned, y)
    assert "skipped" in info
    assert same(cm.module.state_dict(), weights)
    assert same(optimizer.state_dict(), state)
    assert math.isfinite(optimizer.step(x, y)["loss"])


@pytest.mark.parametrize("arguments, message", [
    (dict(damping=0.0), "damping=0.0 must be > 0"),
    (dict(lr=-1.0), "lr=-1.0 must be > 0"),
    (dict(beta=1.0), "beta=1.0 must be < 1"),
    (dict(momentum=1.5), "momentum=1.5 must be < 1"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1 must be >= 0"),
    (dict(stats_every=0), "stats_every=0 must be >= 1"),
    (dict(inverse_every=0), "inverse_every=0 must be >= 1"),
    (dict(max_dense_dim=0), "max_dense_dim=0 must be >= 1"),
    (dict(fisher="exact"), "fisher='exact' must be one of mc, empirical"),
    (dict(factor_dtype=torch.float16), "factor_dtype=torch.float16"),
    (dict(bogus=1), r"unknown arguments \['bogus'\]"),
    (dict(preset="fast"), "preset='fast'; choose one of default"),
])
def test_invalid_settings_name_the_argument(mlp, arguments, message) -> None:
    with pytest.raises(kronograph.KronographError, match=message):
        TNT(mlp[0], **arguments)


def test_presets(mlp) -> None:
    s = TNT(mlp[0]).settings
    assert (s.lr, s.damping, s.beta, s.momentum, s.stats_every, s.inverse_every, s.fisher) == (
        1e-4, 0.1, 0.9, 0.9, 1, 20, "mc")  # Table 4.3, MNIST autoencoder; T1, T2 of the autoencoders
    s = TNT(mlp[0], preset="cnn").settings
    assert (s.lr, s.damping, s.weight_decay, s.stats_every, s.inverse_every) == (1e-4, 0.1, 10.0, 10, 100)  # Table 4.4
    s = TNTEF(mlp[0]).settings
    assert (s.fisher, s.lr, s.damping, s.stats_every, s.inverse_every) == ("empirical", 3e-6, 0.01, 1, 20)  # Table 4.5
    assert TNTEF(mlp[0], preset="cnn").settings.fisher == "empirical"


# -- 6: a real small problem -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return digits_problem()


DIGITS_TNT = dict(lr=0.01, damping=0.1, stats_every=1, inverse_every=5)


def test_digits_beats_tuned_sgd_momentum(digits) -> None:
    """TNT and TNT-EF at DIGITS_TNT (T1 = 1, T2 = 5 for a 60-step run; eps = 0.1 as Table 4.3) against SGD with
    momentum 0.9 at the best lr of {0.03, 0.1, 0.3, 1} (measured: 0.089 at lr 1). Measured for TNT / TNT-EF after
    60 steps over lr {1e-3, 3e-3, 0.01, 0.03} x eps {1e-3, 0.01, 0.1}: 0.038 / 0.036 at (0.01, 0.1), 0.085 / 0.090
    at (3e-3, 0.1), 0.14 / 0.072 at (0.03, 0.1); eps <= 0.01 diverges except (1e-3, 0.01): 0.11 / 0.020."""
    model, initial, x, y, batches, cm = digits
    sgd = best_sgd_momentum_loss(digits)
    for method in (TNT, TNTEF):
        model.load_state_dict(initial)
        optimizer = method(cm, seed=0, **DIGITS_TNT)
        for index in batches:
            optimizer.step(x[index], y[index])
        assert training_loss(model, x, y) < sgd, (method.__name__, training_loss(model, x, y), sgd)


# -- 7: the onnxruntime engine (its ``outputs`` verb for the sampled targets) ---------------------------------
@pytest.fixture(scope="module")
def digits_onnx(digits):
    return digits_on_onnxruntime(digits)


@pytest.mark.parametrize("method", [TNT, TNTEF])
def test_onnxruntime_engine_follows_torch(digits, digits_onnx, method) -> None:
    """The same three steps (statistics and inverses every step, the same seed: the same sampled targets) on
    the module and on its exported graph agree to float32 rounding."""
    assert_engines_agree(method, digits, digits_onnx, seed=3, lr=0.01, damping=0.1, stats_every=1, inverse_every=1)
