"""SMW-NG, SMW-GN and SMW-NG-BD: subsampled natural gradient / Gauss-Newton by Sherman-Morrison-Woodbury (Ren's
thesis, chapter 5, Algorithm 23, thesis line ~2712).

Why: a damped mini-batch curvature G = lambda I + (1/N_2) J^T H J is an n x n matrix, but of rank at most N_2 m_L.
SMW (5.6) inverts it EXACTLY through the small matrix D = lambda I + (1/N_2) J J^T, N_2 x N_2 for the natural
gradient and N_2 m_L x N_2 m_L for Gauss-Newton: G^-1 g = (1/lambda)(g - (1/N_2) J^T D^-1 J g). J is never formed.

One ``step(x, y)`` (Algorithm 23, its line numbers in brackets):
1. S_1: ``n1`` random examples of the batch (all of it when it has no more), S_2 ⊆ S_1 of ``n2`` [3], drawn with
   the optimizer's generator;
2. g, the gradient of the mean loss on S_1 [4], and f(theta) on S_1;
3. the rows of J~ on S_2 from captured passes [5]: per Kronecker layer its input rows a (a conv layer's KFC patches,
   one row per output location) and output-gradient rows q (Algorithms 20-21: J_i^T V backpropagated to every
   layer's pre-activations). NG: J~_i = grad f_i, the per-example gradient with the labels (5.3), H = I: one pass.
   GN: J~ = L J with H_i = L_i^T L_i, so that J^T H J = J~^T J~ and D = lambda I + (1/N_2) J~ J~^T is symmetric
   even where H is singular (softmax cross-entropy: the thesis's (5.7) is the same inverse written with H itself).
   The rows of L_i are backpropagated through the loss's own gradient pass, one pass per output unit k:
   mse (H = I): targets yhat - e_k, whose gradient is e_k; softmax cross-entropy (H = diag p - p p^T, L's row
   k = sqrt(p_k)(e_k - p)): label k, whose gradient is p - e_k; sigmoid cross-entropy (H = diag p(1 - p)): the
   gradient p - t is linear in t, so e_k = grad(t = 0) - grad(t = e_k), scaled by sqrt(p_k(1 - p_k)). The input
   rows are the first pass's (every pass runs the same forward);
4. D's J~ J~^T by the layer-wise Gram trick (5.4.7, Algorithm 22): per layer, the input Gram times the
   output-gradient Gram, summed over layers. A layer with several rows per example (conv locations, sequence
   positions) takes sum over the example's rows of (a a'^T)(q q'^T) (KFC's rows, the trick at the row level), or
   where that is larger, the inner products of the per-example gradients sum_t q_t a_t^T;
5. z = D^-1 J~ g (a dense solve), p = -(1/lambda)(g - (1/N_2) J~^T z) [5], J~ g and J~^T z per layer from the
   same rows (Algorithm 21's products, no further pass);
6. the LM rule of sec 5.2.3 [6]: rho = (f(theta) - f(theta + p)) / (m(0) - m(p)) (5.5) with f on S_1 and
   m(0) - m(p) = -g^T p - (1/2) p^T B p, B = (1/N_2) J~^T J~ undamped; lambda_LM *= boost if rho < epsilon,
   *= drop if rho > 1 - epsilon; lambda = lambda_LM + tau for the next step;
7. theta += lr * p [7].

SMW-NG-BD (sec 5.8): D and the solve per Kronecker layer (B block-diagonal over the layers, each block by SMW).

What the curvature covers: the Kronecker layers of the plan (linear and convolution, grouped too, W_bar = [W b]).
Every other trainable parameter (norms, embeddings) has no rows: G = lambda I there, so it steps lr * g / lambda,
and it adds nothing to p^T B p. A layer whose weight is frozen is left out and not updated.

Differences from the thesis: rho uses p itself as (5.5) says (a forward at theta + p on S_1), while the step taken is
lr * p [7]; the thesis's MLPs have no layer beyond the Kronecker ones. GN needs one pass per output unit (m_L passes on
S_2) and, for softmax cross-entropy, outputs [n, classes] (one label per example): cross-entropy over positions is
refused. Both engines run it (onnxruntime: the outputs for the GN targets come from the forward graph, the
inference graph for models with batch norm or dropout).

A step is atomic: a batch whose loss, gradient, rows or direction is not finite is skipped (SkippedStepWarning,
info["skipped"]) and leaves the weights and the whole state (generator, lambda) as they were.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kronograph.compiler.compiled import CompiledModel
from kronograph.errors import KronographError
from kronograph.passes.plan import Layer
from kronograph.runtime.distributed import refuse_data_parallel
from kronograph.runtime.engines import make_engine
from kronograph.runtime.input_action import gather_rows
from kronograph.runtime.inverse import SkippedStepWarning, all_finite
from kronograph.runtime.losses import get_loss
from kronograph.runtime.methods.settings import check, resolve, setting
from kronograph.runtime.statistics import make_generator, preserved_buffers
from kronograph.runtime.wbar import gather, scatter

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SMWSettings:
    """Every SMW setting, with its thesis source (chapter 5)."""

    lr: float = setting(0.1, "learning rate alpha, theta += alpha p (Alg. 23 line 7); default: the MNIST experiment "
                        "(sec 5.8, every second-order method at 0.1)", low=0, low_open=True)
    n1: int | None = setting(60, "N_1: the examples of the batch that make S_1, the gradient's and rho's sample "
                             "(Alg. 23 lines 3-4; None: the whole batch); default: MNIST (sec 5.8)", low=1)
    n2: int = setting(30, "N_2: the examples of S_2 ⊆ S_1 that make the curvature and D (Alg. 23 lines 3, 5); "
                      "default: MNIST (sec 5.8)", low=1)
    lambda_init: float = setting(1.0, "lambda_LM's first value; lambda = lambda_LM + tau (sec 5.2.3); default: "
                                 "sec 5.8", low=0)
    tau: float = setting(1e-3, "tau, the floor of lambda = lambda_LM + tau (sec 5.2.3); default: sec 5.8",
                         low=0, low_open=True)
    boost: float = setting(1.01, "lambda_LM *= boost when rho < epsilon (sec 5.2.3); default: sec 5.8",
                           low=1, low_open=True)
    drop: float = setting(0.99, "lambda_LM *= drop when rho > 1 - epsilon (sec 5.2.3); default: sec 5.8",
                          low=0, high=1, low_open=True, high_open=True)
    epsilon: float = setting(0.25, "epsilon of the LM rule's thresholds, 0 < epsilon < 1/2 (sec 5.2.3); default: "
                             "sec 5.8", low=0, high=0.5, low_open=True, high_open=True)
    factor_dtype: torch.dtype = setting(torch.float32, "dtype of the rows, D and the solve, independent of the "
                                        "model's", choices=(torch.float32, torch.float64), cli=False)

    def __post_init__(self) -> None:
        check(self, "SMW")


def lm_update(lambda_lm: float, rho: float, boost: float, drop: float, epsilon: float) -> float:
    """The LM rule of sec 5.2.3: boost below epsilon, drop above 1 - epsilon, else keep (a NaN rho keeps)."""
    if rho < epsilon:
        return lambda_lm * boost
    if rho > 1 - epsilon:
        return lambda_lm * drop
    return lambda_lm


@dataclass
class LayerJacobian:
    """One layer's rows of J~ on S_2: P [groups, m, T, a_dim] the input rows (T per example), Q [groups, r, m, T,
    g_dim] the backpropagated rows of the r row sets (J~'s row (k, i) is sum_t q_{k,i,t} a_{i,t}^T in W_bar)."""

    p: torch.Tensor
    q: torch.Tensor


def gram(rows: LayerJacobian, form: str | None = None) -> torch.Tensor:
    """J~_l J~_l^T [r m, r m] (rows ordered (k, i)) by the layer-wise Gram trick. form "rows": sum over an example
    pair's rows of (a a'^T)(q q'^T) (T = 1: the input Gram times the output-gradient Gram, sec 5.4.7); "examples":
    inner products of the per-example gradients sum_t q_t a_t^T. Default: whichever needs less memory."""
    groups, r, m, t, g = rows.q.shape
    a = rows.p.shape[-1]
    if form is None:
        form = "rows" if (r * m * t) ** 2 <= r * m * g * a else "examples"
    if form == "examples":
        per_example = torch.einsum("grmtq,gmta->grmqa", rows.q, rows.p).reshape(groups, r * m, g * a)
        return (per_example @ per_example.transpose(1, 2)).sum(0)
    p = rows.p.reshape(groups, 1, m * t, a).expand(groups, r, m * t, a).reshape(groups, r * m * t, a)
    q = rows.q.reshape(groups, r * m * t, g)
    products = (p @ p.transpose(1, 2)) * (q @ q.transpose(1, 2))
    return products.sum(0).reshape(r * m, t, r * m, t).sum((1, 3))


def jacobian_product(rows: LayerJacobian, v: torch.Tensor) -> torch.Tensor:
    """J~_l v [r m] for v in W_bar's layout [groups, out_g, a_dim]: sum_t q_{k,i,t}^T V a_{i,t} (Alg. 19's product)."""
    return torch.einsum("grmtq,gqa,gmta->rm", rows.q, v, rows.p).reshape(-1)


def transpose_product(rows: LayerJacobian, z: torch.Tensor) -> torch.Tensor:
    """J~_l^T z in W_bar's layout: sum_{k,i,t} z_{k,i} q_{k,i,t} a_{i,t}^T (Algorithm 21)."""
    r, m = rows.q.shape[1:3]
    return torch.einsum("rm,grmtq,gmta->gqa", z.reshape(r, m), rows.q, rows.p)


def _by_example(x: torch.Tensor, m: int, sequence_first: bool) -> torch.Tensor:
    """Rows [groups, R, d] of m examples as [groups, m, T, d]."""
    groups, rows, d = x.shape
    if sequence_first:
        return x.reshape(groups, rows // m, m, d).transpose(1, 2)
    return x.reshape(groups, m, rows // m, d)


class SMWNG:
    """SMW natural gradient (Algorithm 23 with the empirical Fisher of (5.3)) on a compiled model's engine."""

    SUMMARY = ("SMW-NG (Ren's thesis, Algorithm 23): subsampled natural gradient inverted exactly by "
               "Sherman-Morrison-Woodbury")
    Settings = SMWSettings
    PRESETS: dict[str, SMWSettings] = {
        "default": SMWSettings(),  # sec 5.8, MNIST: N_1, N_2 = 60, 30, lr 0.1
        "cifar10": SMWSettings(n1=100, n2=50, lr=0.01),  # sec 5.8, CIFAR-10
        "webspam": SMWSettings(lr=0.1),  # sec 5.8, webspam: 60, 30, lr 0.1 for SMW-NG(-BD)
    }
    curvature = "ng"
    block_diagonal = False

    def __init__(self, compiled: CompiledModel, preset: str = "default", seed: int | None = None,
                 **settings: Any) -> None:
        refuse_data_parallel(type(self).__name__)
        self.settings = resolve(self.PRESETS, preset, settings, type(self).__name__)
        self.loss = get_loss(compiled.loss)
        self.engine = make_engine(compiled, self.loss)
        self.layers = {layer.name: layer for layer in compiled.layers}
        self.generator = make_generator(self.engine.device, seed)
        self.steps = 0
        self.lambda_lm = self.settings.lambda_init

    @property
    def damping(self) -> float:
        """lambda = lambda_LM + tau (sec 5.2.3)."""
        return self.lambda_lm + self.settings.tau

    # -- the step -----------------------------------------------------------------------------------
    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
        """One iteration of Algorithm 23 on (x, y); returns {"loss": f on S_1 before the step, "damping": the
        lambda used, "rho", "s2": S_2's indices in the batch}, and "skipped" (why) when the batch was skipped."""
        s = self.settings
        inputs = tuple(torch.as_tensor(t) for t in (x if isinstance(x, (tuple, list)) else (x,)))
        y = torch.as_tensor(y)
        generator_state = self.generator.get_state()
        s1, s2 = self._subsets(inputs[0].shape[0])
        inputs1, y1 = (inputs, y) if s1 is None else (tuple(t[s1] for t in inputs), y[s1])
        lam = self.damping
        first = self.engine.gradient_pass(inputs1, y1, capture=False)  # line 4
        info: dict[str, Any] = {"loss": first.loss, "damping": lam, "rho": math.nan, "s2": s2}
        if not math.isfinite(first.loss) or not all_finite(first.grads.values()):
            return self._skip(info, generator_state, "non-finite loss or gradient")
        rows = self.jacobian_rows(tuple(t[s2] for t in inputs), y[s2])  # line 5
        if not all_finite(t for r in rows.values() for t in (r.p, r.q)):
            return self._skip(info, generator_state, "non-finite curvature rows")
        direction, quadratic = self._direction(rows, first.grads, lam, len(s2))
        if not all_finite(direction.values()) or not math.isfinite(quadratic):
            return self._skip(info, generator_state, "non-finite direction")
        rho = self._rho(inputs1, y1, first.loss, first.grads, direction, quadratic)  # line 6
        self.lambda_lm = lm_update(self.lambda_lm, rho, s.boost, s.drop, s.epsilon)
        self.steps += 1
        self.engine.add_({name: s.lr * p for name, p in direction.items()})  # line 7
        info["rho"] = rho
        return info

    def _subsets(self, n: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(S_1 as indices, or None for the whole batch; S_2 ⊆ S_1 as indices), sorted (Alg. 23 line 3)."""
        s = self.settings
        perm = torch.randperm(n, generator=self.generator, device=self.generator.device).cpu()
        n1 = n if s.n1 is None else min(s.n1, n)
        s1 = None if n1 == n else perm[:n1].sort().values
        return s1, perm[:min(s.n2, n1)].sort().values

    def _skip(self, info: dict[str, Any], generator_state: torch.Tensor, why: str) -> dict[str, Any]:
        self.generator.set_state(generator_state)
        warnings.warn(f"{type(self).__name__}: a batch with a {why} (NaN or Inf in its inputs or targets?) was "
                      "skipped; the weights and the optimizer's state are as before it", SkippedStepWarning,
                      stacklevel=3)
        return {**info, "skipped": f"{why}; the weights were left unchanged"}

    # -- the rows of J~ (Algorithms 20-22) ----------------------------------------------------------------
    def _pass(self, inputs: Sequence[torch.Tensor], targets: torch.Tensor):
        """A captured gradient pass that leaves batch-norm buffers as they were (torch engine)."""
        module = getattr(self.engine, "module", None)
        with preserved_buffers(module) if module is not None else contextlib.nullcontext():
            return self.engine.gradient_pass(inputs, targets, capture=True)

    def _layer_rows(self, records, m: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(P [groups, m, T, a_dim], Q [groups, m, T, g_dim]) of every covered layer, Q per example (times m)."""
        dtype, frozen = self.settings.factor_dtype, self.engine.frozen()
        out = {}
        for name, sites in (records or {}).items():
            layer = self.layers.get(name)
            if layer is None or layer.weight in frozen or all(r.g is None for r in sites):
                continue
            gathered = gather_rows(layer, sites, m, None, dtype, with_gradient=True)
            ps, qs = [], []
            for record, site in zip(sites, gathered.sites):
                a = record.a
                sequence_first = a.dim() >= 3 and a.shape[0] % m != 0 and a.shape[1] == m
                ps.append(_by_example(site.p, m, sequence_first))
                q = site.q if site.q is not None else site.p.new_zeros(*site.p.shape[:2], layer.out_features)
                qs.append(_by_example(q, m, sequence_first) * m)
            out[name] = (torch.cat(ps, dim=2), torch.cat(qs, dim=2))
        return out

    def jacobian_rows(self, inputs: Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, LayerJacobian]:
        """The rows of J~ on these examples (S_2) for every covered layer (no state changes). NG: J~_i = grad f_i.
        GN: J~_(k,i) = L_i[k] J_i with H_i = L_i^T L_i, k over the output units."""
        m = inputs[0].shape[0]
        if self.curvature == "ng":
            rows = self._layer_rows(self._pass(inputs, y).records, m)
            return {name: LayerJacobian(p, q[:, None]) for name, (p, q) in rows.items()}
        outputs = self.engine.outputs(inputs)
        flat = outputs.reshape(m, -1)
        units = flat.shape[1]
        name = self.loss.name
        dtype = self.settings.factor_dtype
        base = None
        if name == "cross_entropy":
            if outputs.dim() != 2:
                raise KronographError(f"{type(self).__name__}: Gauss-Newton for cross_entropy needs outputs [n, "
                                      f"classes], got {tuple(outputs.shape)} (cross-entropy over positions is not "
                                      "covered); use SMWNG")
            weights = -torch.softmax(outputs.to(torch.float64), dim=-1).sqrt().to(dtype)  # -sqrt(p_k): L's row k
        elif name == "sigmoid_cross_entropy":
            p = torch.sigmoid(flat.to(torch.float64))
            weights = (p * (1 - p)).sqrt().to(dtype)
            base = self._layer_rows(self._pass(inputs, torch.zeros_like(outputs)).records, m)  # grad at t = 0: p
        elif name == "mse":
            weights = torch.ones(m, units, dtype=dtype)
        else:
            raise KronographError(f"{type(self).__name__}: no Gauss-Newton factor for the loss {name!r}")
        p_rows, q_sets = None, {}
        for k in range(units):
            if name == "cross_entropy":
                targets = torch.full((m,), k, dtype=torch.int64, device=outputs.device)
            else:
                unit = torch.zeros_like(flat)
                unit[:, k] = 1
                targets = (unit if name == "sigmoid_cross_entropy" else flat - unit).reshape(outputs.shape)
            rows = self._layer_rows(self._pass(inputs, targets).records, m)
            for layer, (p, q) in rows.items():
                if base is not None:
                    q = base[layer][1] - q  # grad(t = 0) - grad(t = e_k) = e_k backpropagated
                w = weights[:, k].to(q.device).reshape(1, m, 1, 1)
                q_sets.setdefault(layer, []).append(q * w)
            p_rows = p_rows or {layer: p for layer, (p, _) in rows.items()}
        return {layer: LayerJacobian(p_rows[layer], torch.stack(q_sets[layer], dim=1)) for layer in q_sets}

    # -- the direction (5.6) ----------------------------------------------------------------------------
    def _direction(self, rows: Mapping[str, LayerJacobian], grads: Tensors, lam: float, n2: int
                   ) -> tuple[Tensors, float]:
        """(p = -G^-1 g per parameter, p^T B p): SMW on the covered layers (all at once, or per layer for the
        block-diagonal variant), -g / lambda on every other parameter."""
        dtype, frozen = self.settings.factor_dtype, self.engine.frozen()
        g_bar = {name: gather(self.layers[name], grads[self.layers[name].weight],
                              grads.get(self.layers[name].bias)).to(dtype) for name in rows}
        blocks = [list(rows)] if not self.block_diagonal else [[name] for name in rows]
        p_bar, quadratic = {}, 0.0
        for block in blocks:
            if not block:
                continue
            k = sum(gram(rows[name]) for name in block)
            u = sum(jacobian_product(rows[name], g_bar[name]) for name in block)
            d = lam * torch.eye(k.shape[0], dtype=dtype, device=k.device) + k / n2
            z = torch.linalg.solve(d, u)
            jp = 0
            for name in block:
                p_bar[name] = -(g_bar[name] - transpose_product(rows[name], z) / n2) / lam
                jp = jp + jacobian_product(rows[name], p_bar[name])
            quadratic += float((jp * jp).sum()) / n2  # p^T B p = |J~ p|^2 / N_2
        direction: Tensors = {}
        for name, p in p_bar.items():
            layer = self.layers[name]
            weight, bias = scatter(layer, p)
            direction[layer.weight] = weight
            if bias is not None and layer.bias in grads:
                direction[layer.bias] = bias
        for name, g in grads.items():
            if name not in direction:
                direction[name] = -g.to(dtype) / lam
        return {name: p for name, p in direction.items() if name not in frozen}, quadratic

    def _rho(self, inputs: Sequence[torch.Tensor], y: torch.Tensor, f0: float, grads: Tensors,
             direction: Tensors, quadratic: float) -> float:
        """rho of (5.5) on S_1: (f(theta) - f(theta + p)) / (m(0) - m(p)), m(0) - m(p) = -g^T p - p^T B p / 2.
        theta is restored bit for bit after the probe at theta + p. A non-finite f(theta + p) gives -inf (boost);
        a model reduction that is not positive (g = 0) gives NaN (lambda kept)."""
        params = self.engine.parameters()
        saved = {name: params[name].clone() for name in direction}
        self.engine.add_(direction)
        try:
            f1 = self.engine.loss_value(inputs, y)
        finally:
            self.engine.set_(saved)
        reduction = -sum(float((grads[name].to(p.dtype) * p).sum()) for name, p in direction.items()) - quadratic / 2
        if not math.isfinite(f1):
            return -math.inf
        return (f0 - f1) / reduction if reduction > 0 else math.nan

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit."""
        return {"method": type(self).__name__, "steps": self.steps, "lambda_lm": self.lambda_lm,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned; a state of another method is refused."""
        owner = type(self).__name__
        if state.get("method") != owner or not {"steps", "lambda_lm", "generator"} <= set(state):
            raise KronographError(f"{owner}: the optimizer state is not an {owner} state (it holds "
                                  f"{sorted(state)} of {state.get('method')!r}); it is from another run")
        self.steps = int(state["steps"])
        self.lambda_lm = float(state["lambda_lm"])
        self.generator.set_state(state["generator"])


class SMWGN(SMWNG):
    """SMW Gauss-Newton (Algorithm 23 with (5.2), H_i the loss's output Hessian, through its factor L_i)."""

    SUMMARY = ("SMW-GN (Ren's thesis, Algorithm 23): subsampled Gauss-Newton inverted exactly by "
               "Sherman-Morrison-Woodbury")
    PRESETS: dict[str, SMWSettings] = {
        "default": SMWSettings(),  # sec 5.8, MNIST: N_1, N_2 = 60, 30, lr 0.1
        "cifar10": SMWSettings(n1=100, n2=50, lr=0.01),  # sec 5.8, CIFAR-10
        "webspam": SMWSettings(lr=0.05),  # sec 5.8, webspam: lr 0.05 for SMW-GN
    }
    curvature = "gn"


class SMWNGBD(SMWNG):
    """SMW-NG-BD (sec 5.8): the natural gradient's B block-diagonal over the Kronecker layers, each block by SMW."""

    SUMMARY = "SMW-NG-BD (Ren's thesis, sec 5.8): block-diagonal SMW natural gradient, one D per layer"
    block_diagonal = True
