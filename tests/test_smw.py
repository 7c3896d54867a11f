"""SMW-NG, SMW-GN and SMW-NG-BD (runtime/methods/smw.py) against Ren's thesis, chapter 5, written out densely here.

The reference forms J_i = d yhat_i / d theta explicitly (torch.func.jacrev through the module, every parameter),
the loss's output Hessian H_i by torch.func.hessian of the per-example loss written in this file, B = (1/N_2)
sum J_i^T H_i J_i (GN) or (1/N_2) sum grad f_i grad f_i^T (NG, (5.3)), and solves (lambda I + B) p = -g densely
(block-diagonal for NG-BD, B zero outside the Kronecker layers' parameters); rho of (5.5) and the LM rule of sec
5.2.3 are evaluated here too. None of SMW's own Gram, product or solve code is used by the reference.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import kronograph
from kronograph.errors import KronographError
from kronograph.runtime.inverse import SkippedStepWarning
from kronograph.runtime.methods.smw import SMWGN, SMWNG, SMWNGBD, gram, lm_update
from equality import same
from method_problems import (
    assert_engines_agree,
    digits_on_onnxruntime,
    digits_problem,
    tiny_cnn,
    tiny_mlp,
    training_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
BOOST, DROP, EPS, TAU = 1.01, 0.99, 0.25, 1e-3


# -- the dense reference --------------------------------------------------------------------------------
def example_loss(name: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """l_i of one example's outputs s (runtime/losses.py's conventions, written out)."""
    if name == "cross_entropy":
        return -torch.log_softmax(s, dim=-1)[t]
    if name == "sigmoid_cross_entropy":
        return (F.softplus(s) - t * s).sum()  # binary cross-entropy with logits, summed over the units
    return 0.5 * ((s - t) ** 2).sum()


class Dense:
    """theta flattened over the module's parameters, and everything of Algorithm 23 as dense matrices."""

    def __init__(self, model: nn.Module, loss: str) -> None:
        self.model, self.loss = model, loss
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()]).clone()
        owner = []
        for index, (name, p) in enumerate(model.named_parameters()):
            owner += [index] * p.numel()
        self.owner = torch.tensor(owner)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(theta, [math.prod(s) for s in self.shapes])
        return {name: part.reshape(shape) for name, part, shape in zip(self.names, parts, self.shapes)}

    def output(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.unflatten(theta), (x[None],))[0].reshape(-1)

    def mean_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.example(theta, x[i], y[i]) for i in range(len(x))]).mean()

    def example(self, theta, x, t):
        s = self.output(theta, x)
        return example_loss(self.loss, s, t.reshape(-1) if t.dim() else t)

    def jacobians(self, x: torch.Tensor) -> torch.Tensor:
        """J [N_2, m_L, n], formed explicitly."""
        return torch.stack([jacrev(self.output)(self.theta, x[i]) for i in range(len(x))])

    def curvature(self, kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """B of (5.2) (GN) or (5.3) (NG) on these examples."""
        jac = self.jacobians(x)
        terms = []
        for i in range(len(x)):
            s = self.output(self.theta, x[i])
            t = y[i].reshape(-1) if y[i].dim() else y[i]
            if kind == "gn":
                h = hessian(lambda out: example_loss(self.loss, out, t))(s)
                terms.append(jac[i].T @ h @ jac[i])
            else:
                grad_i = jac[i].T @ torch.func.grad(lambda out: example_loss(self.loss, out, t))(s)
                terms.append(torch.outer(grad_i, grad_i))
        return torch.stack(terms).mean(0)

    def mask(self, covered: list[str], blocks: list[list[str]] | None = None) -> torch.Tensor:
        """Which entries of B the method keeps: the Kronecker layers' parameters (all of them together, or each
        layer's own block)."""
        index = {name: i for i, name in enumerate(self.names)}
        block = torch.full((len(self.names),), -1)
        for b, names in enumerate(blocks or [covered]):
            for name in names:
                block[index[name]] = b
        entry = block[self.owner]
        return (entry[:, None] == entry[None, :]) & (entry[:, None] >= 0)

    def step(self, kind, x, y, s2, lam, lr, covered, blocks=None):
        """(theta + lr p, rho, p) with p = -(lambda I + B)^-1 g, g on (x, y), B on S_2."""
        g = torch.func.grad(self.mean_loss)(self.theta, x, y)
        b = self.curvature(kind, x[s2], y[s2]) * self.mask(covered, blocks)
        p = -torch.linalg.solve(lam * torch.eye(len(g), dtype=F64) + b, g)
        f0, f1 = self.mean_loss(self.theta, x, y), self.mean_loss(self.theta + p, x, y)
        rho = float((f0 - f1) / (-g @ p - 0.5 * p @ b @ p))
        return self.theta + lr * p, rho


def lm_rule(lambda_lm: float, rho: float) -> float:
    """Sec 5.2.3 with sec 5.8's constants."""
    if rho < EPS:
        return BOOST * lambda_lm
    if rho > 1 - EPS:
        return DROP * lambda_lm
    return lambda_lm


def kronecker_names(cm) -> list[list[str]]:
    return [[n for n in (layer.weight, layer.bias) if n is not None] for layer in cm.layers]


@functools.cache
def _compiled_mlp(loss: str, layer_norm: bool):
    """Linear 5->4, (LayerNorm,) tanh, Linear 4->3 in float64, compiled once per module (compiling costs ~1 s)."""
    torch.manual_seed(0)
    middle = [nn.LayerNorm(4)] if layer_norm else []
    model = nn.Sequential(nn.Linear(5, 4), *middle, nn.Tanh(), nn.Linear(4, 3)).double()
    if layer_norm:
        with torch.no_grad():  # not the identity, so that its gradient is not special
            model[1].weight.uniform_(0.5, 1.5)
            model[1].bias.uniform_(-0.5, 0.5)
    cm = kronograph.compile(model, (torch.zeros(2, 5, dtype=F64),), loss=loss)
    return model, cm, copy.deepcopy(model.state_dict())


def mlp(loss: str, layer_norm: bool = False):
    """The MLP for ``loss`` at its initial weights and a float64 batch of 8: (model, compiled, x, y)."""
    model, cm, initial = _compiled_mlp(loss, layer_norm)
    model.load_state_dict(initial)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=generator, dtype=F64)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (8,), generator=generator)
    elif loss == "sigmoid_cross_entropy":
        y = torch.rand(8, 3, generator=generator, dtype=F64)
    else:
        y = torch.randn(8, 3, generator=generator, dtype=F64)
    return model, cm, x, y


@functools.cache
def _cached(problem):
    return problem()


def fresh(problem):
    """tiny_mlp / tiny_cnn / digits_problem compiled once per module, their module back at its initial weights."""
    result = _cached(problem)
    if problem is digits_problem:
        result[0].load_state_dict(result[1])
    else:
        result[0].module.load_state_dict(result[1])
    return result


def check_against_dense(method, kind, model, cm, x, y, block_diagonal=False, **settings):
    """One step of ``method`` against the dense solve, rho and the next lambda."""
    settings = {"lambda_init": 0.3, "lr": 0.7, "n1": None, "n2": 5, "factor_dtype": F64, **settings}
    dense = Dense(model, cm.loss)
    opt = method(cm, seed=3, **settings)
    info = opt.step(x, y)
    assert "skipped" not in info
    lam = settings["lambda_init"] + TAU
    assert info["damping"] == pytest.approx(lam)
    names = kronecker_names(cm)
    covered = [n for block in names for n in block]
    expected, rho = dense.step(kind, x, y, info["s2"], lam, settings["lr"], covered,
                               names if block_diagonal else None)
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    assert info["rho"] == pytest.approx(rho, rel=1e-7, abs=1e-9)
    assert opt.lambda_lm == pytest.approx(lm_rule(settings["lambda_init"], rho), rel=1e-12)


# -- the direction against the dense solve --------------------------------------------------------------
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "sigmoid_cross_entropy"])
@pytest.mark.parametrize("method,kind", [(SMWNG, "ng"), (SMWGN, "gn")])
def test_direction_is_the_dense_solve(method, kind, loss):
    model, cm, x, y = mlp(loss)
    check_against_dense(method, kind, model, cm, x, y)


def test_block_diagonal_is_the_dense_block_solve():
    model, cm, x, y = mlp("cross_entropy")
    check_against_dense(SMWNGBD, "ng", model, cm, x, y, block_diagonal=True)


@pytest.mark.parametrize("method,kind,block", [(SMWGN, "gn", False), (SMWNGBD, "ng", True)])
def test_convolution_through_its_patches(method, kind, block):
    cm, _, batches = fresh(tiny_cnn)
    x, y = batches[0]
    check_against_dense(method, kind, cm.module, cm, x, y, block_diagonal=block, n2=4)


@pytest.mark.parametrize("method,kind", [(SMWNG, "ng"), (SMWGN, "gn")])
def test_parameters_outside_the_layers_step_with_g_over_lambda(method, kind):
    """LayerNorm's weight and bias have no rows: B is zero on them, so they step -lr g / lambda."""
    model, cm, x, y = mlp("mse", layer_norm=True)
    assert "1.weight" in cm.plan.parameters and all(layer.weight != "1.weight" for layer in cm.layers)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grad = torch.autograd.grad(0.5 * ((model(x) - y) ** 2).sum(1).mean(), [model[1].weight])[0]
    check_against_dense(method, kind, model, cm, x, y)
    torch.testing.assert_close(model[1].weight.detach() - before["1.weight"], -0.7 * grad / (0.3 + TAU))


# -- the layer-wise Gram ---------------------------------------------------------------------------------
def test_gram_is_j_j_transpose_for_gauss_newton():
    """mse (H = I): J~ = J, rows ordered (output unit k, example i); per layer and summed over the layers."""
    model, cm, x, y = mlp("mse")
    opt = SMWGN(cm, factor_dtype=F64)
    rows = opt.jacobian_rows((x[:5],), y[:5])
    dense = Dense(model, "mse")
    jac = dense.jacobians(x[:5]).transpose(0, 1).reshape(15, -1)  # [(k, i), n]
    total = 0
    for layer in cm.layers:
        columns = dense.mask([layer.weight, layer.bias]).diagonal()
        j_layer = jac[:, columns]
        torch.testing.assert_close(gram(rows[layer.name]), j_layer @ j_layer.T, rtol=1e-10, atol=1e-12)
        total = total + gram(rows[layer.name])
    torch.testing.assert_close(total, jac @ jac.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["rows", "examples"])
def test_gram_of_a_convolution_is_the_per_example_gradients_gram(form):
    """NG on the CNN: J~ rows are the per-example gradients; both forms of the conv Gram give J~ J~^T."""
    cm, _, batches = fresh(tiny_cnn)
    x, y = batches[0]
    opt = SMWNG(cm, factor_dtype=F64)
    rows = opt.jacobian_rows((x,), y)
    dense = Dense(cm.module, "cross_entropy")
    grads = torch.stack([torch.func.grad(dense.example)(dense.theta, x[i], y[i]) for i in range(len(x))])
    for layer in cm.layers:
        columns = dense.mask([layer.weight, layer.bias]).diagonal()
        g_layer = grads[:, columns]
        torch.testing.assert_close(gram(rows[layer.name], form), g_layer @ g_layer.T, rtol=1e-10, atol=1e-12)


# -- the Levenberg-Marquardt rule -------------------------------------------------------------------------
@pytest.mark.parametrize("rho,factor", [(-3.0, BOOST), (0.0, BOOST), (0.2499, BOOST), (0.25, 1.0), (0.5, 1.0),
                                        (0.75, 1.0), (0.7501, DROP), (2.0, DROP), (-math.inf, BOOST),
                                        (math.nan, 1.0)])
def test_lm_rule_moves_lambda_as_sec_5_2_3(rho, factor):
    assert lm_update(0.8, rho, BOOST, DROP, EPS) == 0.8 * factor


def test_lambda_follows_rho_over_steps():
    """lambda = lambda_LM + tau, lambda_LM updated after each step from that step's rho."""
    cm, _, batches = fresh(tiny_mlp)
    opt = SMWGN(cm, seed=0, n2=4, factor_dtype=F64)
    lambda_lm = 1.0
    for x, y in batches[:4]:
        info = opt.step(x, y)
        assert info["damping"] == pytest.approx(lambda_lm + TAU, rel=1e-14)
        lambda_lm = lm_rule(lambda_lm, info["rho"])
    assert opt.damping == pytest.approx(lambda_lm + TAU, rel=1e-14)


# -- checkpoints, NaN, settings ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", [SMWNG, SMWGN, SMWNGBD])
def test_exact_resume(method):
    cm, initial, batches = fresh(tiny_mlp)
    opt = method(cm, seed=5, n1=6, n2=3)
    for x, y in batches:
        opt.step(x, y)
    straight = copy.deepcopy(cm.module.state_dict())

    cm.module.load_state_dict(initial)
    first = method(cm, seed=5, n1=6, n2=3)
    for x, y in batches[:3]:
        first.step(x, y)
    state, weights = copy.deepcopy(first.state_dict()), copy.deepcopy(cm.module.state_dict())
    for x, y in batches[3:4]:  # the run goes on elsewhere; the checkpoint is restored over it
        first.step(x, y)
    cm.module.load_state_dict(weights)
    resumed = method(cm, seed=99, n1=6, n2=3)
    resumed.load_state_dict(state)
    for x, y in batches[3:]:
        resumed.step(x, y)
    assert same(cm.module.state_dict(), straight)


def test_a_state_of_another_method_is_refused():
    cm, _, _ = fresh(tiny_mlp)
    with pytest.raises(KronographError, match="SMWGN"):
        SMWGN(cm).load_state_dict(SMWNG(cm).state_dict())


@pytest.mark.parametrize("method", [SMWNG, SMWGN])
def test_a_nan_batch_never_reaches_the_weights(method):
    cm, _, batches = fresh(tiny_mlp)
    opt = method(cm, seed=0, n2=4)
    opt.step(*batches[0])
    weights, state = copy.deepcopy(cm.module.state_dict()), copy.deepcopy(opt.state_dict())
    x, y = batches[1]
    x = x.clone()
    x[2, 1] = math.nan
    with pytest.warns(SkippedStepWarning):
        info = opt.step(x, y)
    assert "skipped" in info
    assert same(cm.module.state_dict(), weights)
    assert same(opt.state_dict(), state)


@pytest.mark.parametrize("argument,value", [("n2", 0), ("epsilon", 0.5), ("boost", 1.0), ("drop", 1.0),
                                            ("tau", 0.0), ("lr", -1.0)])
def test_a_settings_error_names_the_argument(argument, value):
    cm, _, _ = fresh(tiny_mlp)
    with pytest.raises(KronographError, match=argument):
        SMWNG(cm, **{argument: value})


def test_gauss_newton_refuses_cross_entropy_over_positions():
    model = nn.Linear(4, 3).double()
    cm = kronograph.compile(model, (torch.randn(2, 5, 4, dtype=F64),), loss="cross_entropy")
    x, y = torch.randn(6, 5, 4, dtype=F64), torch.randint(0, 3, (6, 5))
    with pytest.raises(KronographError, match="positions"):
        SMWGN(cm, n2=3).step(x, y)


# -- a real problem --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [SMWNG, SMWGN])
def test_digits_training_reduces_the_loss(method):
    """N_1 = 60 of each batch of 128, N_2 = 30 (the thesis's MNIST settings) on scikit-learn's digits, 20 steps at
    lr 1 (Theorem 6's alpha; the thesis's lr 0.1 needs its 10 epochs). With the thesis's lr the loss falls too."""
    model, initial, x, y, batches, cm = fresh(digits_problem)
    start = training_loss(model, x, y)
    for lr, bound in ((1.0, 0.3 * start), (0.1, start - 0.1)):
        model.load_state_dict(initial)
        opt = method(cm, seed=0, lr=lr)
        for index in batches[:20]:
            info = opt.step(x[index], y[index])
            assert "skipped" not in info and len(info["s2"]) == 30
        assert training_loss(model, x, y) < bound


def test_both_engines_take_the_same_steps():
    """The module and its exported graph on onnxruntime-training: the same S_1, S_2, rows and steps (NG and GN)."""
    digits = fresh(digits_problem)
    on_onnx = digits_on_onnxruntime(digits)
    for method in (SMWNG, SMWGN):
        assert_engines_agree(method, digits, on_onnx, steps=3, seed=0)
