"""K-BFGS and K-BFGS(L) (Ren's thesis, chapter 3, Algorithm 9; chapter 2's Algorithm 4 as variant="ema").

Why: K-FAC inverts its Kronecker factors every few steps, a cost cubic in a layer's widths. K-BFGS keeps the
inverses themselves, H_A ~ (A + lambda_A I)^-1 and H_G ~ (G + lambda_G I)^-1 per layer, and refreshes each with
one quasi-Newton (s, y) pair per curvature update: matrix products only, no inversion after the first step.

One ``step(x, y)`` (Algorithm 9, line numbers in brackets):
1. a forward-backward pass on the batch [6]; it captures the layers' inputs and pre-activation gradients only
   on the first step and on curvature steps (k % update_every == 0);
2. gradient momentum ghat = beta ghat + g [8] (chapter 3 has no (1 - beta) factor);
3. per Kronecker layer, on W_bar = [W b] per group: p = H_G ghat H_A [9] (K-BFGS(L): the L-BFGS matrix's
   compact "non-loop" product, sec 3.4.3), W_bar -= lr (p + weight_decay W_bar) [10, sec 3.7.2]. Parameters
   outside every Kronecker layer (norms, embeddings, tied weights) and layers with no curvature yet take the
   momentum gradient with learning rate lr / damping: sec 3.4.3's rule for batch-norm parameters;
4. on curvature steps, a second forward-backward pass on the same batch after the step [13] (batch-norm running
   statistics are kept as the first pass left them, torch engine), then per layer [14-22]:
   s_G = beta s_G + (1 - beta)(h_bar+ - h_bar), y_G = beta y_G + (1 - beta)(Dh_bar+ - Dh_bar) [19], with h_bar
   and Dh_bar the mean pre-activation and per-example pre-activation gradient over examples and locations
   (3.12, 3.13), damped by D_P D_LM [20, Alg. 8] before BFGS (3.11); K-BFGS(L) damps by D_P(I) D_LM (Alg. 11,
   the thesis's actual implementation, sec 3.6) and pushes the pair to L-BFGS [21]. H_A takes the
   "minibatched Hessian-action" pair s_A = H_A a_hat, y_A = A s_A + lambda_A s_A (3.14) [16-17], A never
   formed; A and a_hat are the FIRST pass's (the mini-batch before the step, the A the warm start used too).
   A pair that is not finite changes nothing of its layer (counted in ``info["skipped_pairs"]``).

Damping split [2]: lambda_A = sqrt|T| sqrt(lambda), lambda_G = sqrt(lambda) / sqrt|T| with |T| the rows per
example (1 for a plain linear layer, the output locations of a convolution, the positions of a sequence).
Warm start [3]: H_A = (A + lambda_A I)^-1, H_G = lambda_G^-1 I at a layer's first captured pass. The thesis
computes that A on the whole data set (sec 3.4.3); an optimizer sees only the batches it is given, so A is the
first mini-batch's. A layer never captured yet (not called) is stepped like the parameters outside the layers.

variant="ema" is chapter 2's K-BFGS (Algorithm 4, "K-BFGS-20"): gradient EMA ghat = beta ghat + (1 - beta) g,
lambda_A = lambda_G = sqrt(lambda), H_G starting at I, A kept as an EMA (decay beta) of the mini-batch A with
y_A = (A + lambda_A I) s_A, and double damping (Alg. 3) before BFGS or L-BFGS. Its curvature is updated on the
same schedule, every ``update_every`` steps (1, Algorithm 4's every step, by default).

A step is atomic: a batch whose loss or gradient is not finite is skipped (SkippedStepWarning, info["skipped"])
and leaves the weights and the whole optimizer state as they were.
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
from kronograph.runtime.capture import SiteRecord
from kronograph.runtime.distributed import refuse_data_parallel
from kronograph.runtime.engines import make_engine
from kronograph.runtime.factors import batch_factors, layer_rows
from kronograph.runtime.input_action import LayerRows, gather_rows, input_secant_pair, mean_input
from kronograph.runtime.inverse import SkippedStepWarning, all_finite, damped_inverse
from kronograph.runtime.losses import get_loss
from kronograph.runtime.methods.settings import check, resolve, setting
from kronograph.runtime.quasi_newton import (
    LBFGSMatrix,
    bfgs_update,
    double_damping,
    powell_identity_lm_damping,
    powell_lm_damping,
)
from kronograph.runtime.statistics import preserved_buffers
from kronograph.runtime.wbar import gather, scatter

Direction = dict[str, torch.Tensor]
Records = Mapping[str, Sequence[SiteRecord]]


@dataclass(frozen=True)
class KBFGSSettings:
    """Every K-BFGS setting, with its thesis source."""

    lr: float = setting(0.03, "learning rate alpha (Alg. 9 line 10); default: Table 3.5's best for K-BFGS and "
                        "K-BFGS(L) on the MNIST autoencoder", low=0, low_open=True)
    damping: float = setting(0.3, "lambda, split as lambda_A = sqrt|T| sqrt(lambda), lambda_G = sqrt(lambda) / "
                             "sqrt|T| (Alg. 9 line 2; variant 'ema': both sqrt(lambda)); parameters outside every "
                             "Kronecker layer step with lr / lambda (sec 3.4.3); default: Table 3.5 (MNIST)",
                             low=0, low_open=True)
    beta: float = setting(0.9, "decay of the gradient momentum and of the (s_G, y_G) moving averages (and of A for "
                          "variant 'ema'); default: Alg. 9 line 1", low=0, high=1, high_open=True)
    mu1: float = setting(0.2, "Powell's damping threshold mu1 (Alg. 8, 11 and 3); default: Alg. 9 line 1",
                         low=0, high=1, low_open=True, high_open=True)
    inverse_g: str = setting("bfgs", "how H_G is kept: 'bfgs' (K-BFGS) or 'lbfgs' over the last `history` pairs "
                             "(K-BFGS(L)); Alg. 9 line 21", choices=("bfgs", "lbfgs"))
    history: int = setting(100, "p, the (s, y) pairs L-BFGS keeps; default: sec 3.4.3", low=1)
    update_every: int = setting(1, "T, the curvature update frequency: H_A and H_G are updated, after a second "
                                "pass, at steps k with k % T == 0 (sec 3.4.3); default: Table 3.5's runs (T = 20 "
                                "is its dagger variant)", low=1)
    variant: str = setting("minibatch", "'minibatch': chapter 3's Algorithm 9; 'ema': chapter 2's Algorithm 4 "
                           "(gradient and A as EMAs, double damping, lambda_A = lambda_G = sqrt(lambda) <= 1)",
                           choices=("minibatch", "ema"))
    weight_decay: float = setting(0.0, "gamma in W -= lr (p + gamma W) (sec 3.7.2); default: none, as in the "
                                  "MLP experiments (sec 3.7.2)", low=0)
    factor_dtype: torch.dtype = setting(torch.float32, "dtype of H_A, H_G and the pairs, independent of the "
                                        "model's", choices=(torch.float32, torch.float64), cli=False)

    def __post_init__(self) -> None:
        check(self, "K-BFGS")
        if self.variant == "ema" and self.damping > 1:
            raise KronographError(f"K-BFGS: damping={self.damping} must be <= 1 with variant='ema' (Algorithm 3's "
                                  "mu2 = sqrt(damping) lies in (0, 1]); use variant='minibatch' for a larger one")


@dataclass
class LayerCurvature:
    """One Kronecker layer's K-BFGS state, batched over groups: H_A [groups, a_dim, a_dim]; H_G [groups, g, g]
    or one LBFGSMatrix per group; the moving averages s_G, y_G [groups, g]; variant "ema" also A's EMA."""

    lambda_a: float
    lambda_g: float
    h_a: torch.Tensor
    h_g: torch.Tensor | list[LBFGSMatrix]
    s_g: torch.Tensor
    y_g: torch.Tensor
    a_ema: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        h_g = [m.state_dict() for m in self.h_g] if isinstance(self.h_g, list) else self.h_g.clone()
        return {"lambda_a": self.lambda_a, "lambda_g": self.lambda_g, "h_a": self.h_a.clone(), "h_g": h_g,
                "s_g": self.s_g.clone(), "y_g": self.y_g.clone(),
                "a_ema": None if self.a_ema is None else self.a_ema.clone()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LayerCurvature:
        h_g = state["h_g"]
        if isinstance(h_g, list):
            matrices = []
            for entry in h_g:
                matrix = LBFGSMatrix(1, 1.0)
                matrix.load_state_dict(entry)
                matrices.append(matrix)
            h_g = matrices
        else:
            h_g = h_g.clone()
        a_ema = state["a_ema"]
        return cls(float(state["lambda_a"]), float(state["lambda_g"]), state["h_a"].clone(), h_g,
                   state["s_g"].clone(), state["y_g"].clone(), None if a_ema is None else a_ema.clone())


class _Operator:
    """An LBFGSMatrix as the H of ``double_damping``, which needs only H @ y."""

    def __init__(self, matrix: LBFGSMatrix) -> None:
        self.matrix = matrix

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix.matmul(v)


def mean_preactivation(layer: Layer, records: Sequence[SiteRecord] | LayerRows, weight: torch.Tensor,
                       bias: torch.Tensor | None, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """h_bar [groups, out_g], the layer's output averaged over examples and locations (3.12): the output is
    linear in the input rows, so h_bar = W_bar a_hat per group and needs no capture of the outputs. ``records``
    may be the rows already gathered."""
    a_hat = mean_input(layer, records, batch_size=batch_size, dtype=dtype).reshape(layer.groups, layer.a_dim, 1)
    return (gather(layer, weight, bias).to(dtype) @ a_hat).squeeze(-1)


def mean_output_gradient(layer: Layer, records: Sequence[SiteRecord] | LayerRows, batch_size: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """Dh_bar [groups, out_g], the per-example pre-activation gradient averaged over examples and locations
    (3.13): (1/R) sum over the R rows of m g, g captured for the mean loss over m examples. ``records`` may be
    the rows already gathered with their gradients."""
    rows = records if isinstance(records, LayerRows) else gather_rows(layer, records, batch_size, None, dtype, True)
    return sum(site.q.sum(dim=1).to(dtype) for site in rows.sites if site.q is not None) * (rows.m / rows.rows)


class KBFGS:
    """K-BFGS (Algorithm 9) for a compiled model, on either engine (the torch module's parameters in place, or
    ``compiled.onnxruntime()``'s weights). ``KBFGS(cm)`` uses Table 3.5's MNIST values; any setting given as a
    keyword replaces the preset's (``KBFGSSettings`` documents them). ``seed`` is accepted so that every method
    takes the same arguments; K-BFGS draws no random numbers."""

    SUMMARY = "K-BFGS (Ren's thesis, Algorithm 9): Kronecker-factored BFGS inverses, no matrix inversion"
    Settings = KBFGSSettings
    PRESETS: dict[str, KBFGSSettings] = {
        "default": KBFGSSettings(),  # Table 3.5, K-BFGS on MNIST: (lr, damping) = (0.03, 0.3)
        "chapter2": KBFGSSettings(variant="ema", lr=0.01, damping=0.1),  # Table 3.5, K-BFGS-20 on MNIST
    }

    def __init__(self, compiled: CompiledModel, preset: str = "default", seed: int | None = None,
                 **settings: Any) -> None:
        refuse_data_parallel(type(self).__name__)
        self.settings = resolve(self.PRESETS, preset, settings, type(self).__name__)
        self.engine = make_engine(compiled, get_loss(compiled.loss))
        self.layers = {layer.name: layer for layer in compiled.layers}
        self.steps = 0
        self.momentum: Direction = {}  # ghat per parameter (W_bar's is gathered from its weight and bias)
        self.curvature: dict[str, LayerCurvature] = {}

    # -- the step -----------------------------------------------------------------------------------
    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
        """One iteration on the batch (x, y); returns {"loss": the mean loss before the step,
        "curvature_updated": whether this was a curvature step (a second pass, new pairs), "skipped_pairs": the
        layers whose pairs were not finite}, and "skipped" (why) when the batch was skipped."""
        inputs = tuple(torch.as_tensor(t) for t in (x if isinstance(x, (tuple, list)) else (x,)))
        y = torch.as_tensor(y)
        n = inputs[0].shape[0]
        k = self.steps + 1
        due = k % self.settings.update_every == 0
        first = self.engine.gradient_pass(inputs, y, capture=due or k == 1)
        info: dict[str, Any] = {"loss": first.loss, "curvature_updated": False, "skipped_pairs": 0}
        if not math.isfinite(first.loss) or not all_finite(first.grads.values()):
            warnings.warn("K-BFGS: a batch whose loss or gradient is not finite (NaN or Inf in its inputs or "
                          "targets?) was skipped; the weights and the optimizer's state are as before it",
                          SkippedStepWarning, stacklevel=2)
            return {**info, "skipped": "non-finite loss or gradient; the weights were left unchanged"}
        # Nothing of the state changes until the update is known to be finite.
        records = first.records or {}
        curvature = {**self.curvature, **self._initialize(records, n)}
        rows = self._gather(curvature, records, n) if due else {}  # conv patches extracted once per pass
        before = self._layer_means(rows, n)  # h_bar = W_bar a_hat at the weights of the first pass
        momentum = self._accumulate_momentum(first.grads)
        update = self._update(self._precondition(curvature, momentum))
        if not all_finite(update.values()):
            return {**info, "skipped": "non-finite update; the weights were left unchanged"}
        self.steps, self.momentum, self.curvature = k, momentum, curvature
        self.engine.add_(update)
        if due:
            info["curvature_updated"] = True
            info["skipped_pairs"] = self._update_curvature(inputs, y, records, rows, before, n)
        return info

    def _seen(self, records: Records) -> list[str]:
        """The layers with a captured site that received a gradient in a pass."""
        return [name for name, sites in records.items()
                if name in self.layers and any(r.g is not None for r in sites)]

    def _initialize(self, records: Records, n: int) -> dict[str, LayerCurvature]:
        """Algorithm 9 line 3 (Algorithm 4 line 3) for the layers captured for the first time: H_A = (A +
        lambda_A I)^-1 with this mini-batch's A, H_G = lambda_G^-1 I (variant "ema": I), s_G = y_G = 0."""
        s, dtype = self.settings, self.settings.factor_dtype
        new = {}
        for name in self._seen(records):
            if name in self.curvature:
                continue
            layer, sites = self.layers[name], records[name]
            a = batch_factors(layer, sites, batch_size=n, dtype=dtype)[0]
            _, m, rows = layer_rows(layer, sites, n, None, dtype, with_gradient=False)
            root, positions = math.sqrt(s.damping), math.sqrt(rows / m)  # sqrt(lambda), sqrt|T|
            if s.variant == "minibatch":
                lambda_a, lambda_g = positions * root, root / positions
                gamma = 1 / lambda_g  # H_G's start
            else:
                lambda_a = lambda_g = root
                gamma = 1.0
            h_a = damped_inverse(a, lambda_a)[0]  # a non-finite A gives 1/lambda_A I
            groups, g = layer.groups, layer.g_dim
            if s.inverse_g == "lbfgs":
                h_g: torch.Tensor | list[LBFGSMatrix] = [LBFGSMatrix(s.history, gamma) for _ in range(groups)]
            else:
                h_g = gamma * torch.eye(g, dtype=dtype, device=a.device).expand(groups, g, g).clone()
            zeros = a.new_zeros(groups, g)
            new[name] = LayerCurvature(lambda_a, lambda_g, h_a, h_g, zeros, zeros.clone(),
                                       a.clone() if s.variant == "ema" else None)
        return new

    def _accumulate_momentum(self, grads: Direction) -> Direction:
        """ghat = beta ghat + g (Alg. 9 line 8); variant "ema": beta ghat + (1 - beta) g (Alg. 4 line 8).
        New tensors: the state is replaced only when the step is taken."""
        beta = self.settings.beta
        scale = 1.0 if self.settings.variant == "minibatch" else 1.0 - beta
        return {name: scale * g if name not in self.momentum else beta * self.momentum[name] + scale * g
                for name, g in grads.items()}

    def _precondition(self, curvature: Mapping[str, LayerCurvature], momentum: Direction) -> Direction:
        """p = H_G ghat H_A per Kronecker layer and group (Alg. 9 line 9); ghat / lambda for every other
        parameter (sec 3.4.3)."""
        dtype = self.settings.factor_dtype
        direction: Direction = {}
        for name, state in curvature.items():
            layer = self.layers[name]
            right = gather(layer, momentum[layer.weight], momentum.get(layer.bias)).to(dtype) @ state.h_a
            if isinstance(state.h_g, list):
                p = torch.stack([matrix.matmul(block) for matrix, block in zip(state.h_g, right)])
            else:
                p = state.h_g @ right
            weight, bias = scatter(layer, p)
            direction[layer.weight] = weight
            if bias is not None and layer.bias in momentum:
                direction[layer.bias] = bias
        for name, ghat in momentum.items():
            if name not in direction:
                direction[name] = ghat / self.settings.damping
        return direction

    def _update(self, direction: Direction) -> Direction:
        """-lr (p + weight_decay W) (Alg. 9 line 10 with sec 3.7.2's weight decay); frozen parameters stay."""
        lr, decay = self.settings.lr, self.settings.weight_decay
        params, frozen = self.engine.parameters(), self.engine.frozen()
        return {name: -lr * (p + decay * params[name] if decay else p)
                for name, p in direction.items() if name not in frozen}

    # -- the curvature --------------------------------------------------------------------------------
    def _gather(self, curvature: Mapping[str, LayerCurvature], records: Records, n: int) -> dict[str, LayerRows]:
        """The rows (activations and gradients) of every layer with curvature captured in a pass."""
        dtype = self.settings.factor_dtype
        return {name: gather_rows(self.layers[name], records[name], n, None, dtype, with_gradient=True)
                for name in self._seen(records) if name in curvature}

    def _layer_means(self, rows: Mapping[str, LayerRows], n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(h_bar, Dh_bar) of every layer of ``rows``, at the current weights."""
        params, dtype = self.engine.parameters(), self.settings.factor_dtype
        means = {}
        for name, gathered in rows.items():
            layer = self.layers[name]
            h_bar = mean_preactivation(layer, gathered, params[layer.weight], params.get(layer.bias), n, dtype)
            means[name] = (h_bar, mean_output_gradient(layer, gathered, n, dtype))
        return means

    def _update_curvature(self, inputs: Sequence[torch.Tensor], y: torch.Tensor, records: Records,
                          rows: Mapping[str, LayerRows], before: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                          n: int) -> int:
        """Lines 13-22: the second pass, then each layer's pairs and BFGS updates, from the first pass's rows and
        means (taken before the step) and the second's. A layer missing from either pass keeps its state. Returns
        the number of layers whose pairs were not finite (state kept)."""
        module = getattr(self.engine, "module", None)
        with preserved_buffers(module) if module is not None else contextlib.nullcontext():
            second = self.engine.gradient_pass(inputs, y, capture=True)
        after = self._layer_means(self._gather(self.curvature, second.records, n), n)
        skipped = 0
        for name, (h_bar, dh_bar) in before.items():
            if name not in after:
                continue
            state, layer = self.curvature[name], self.layers[name]
            s_g, y_g = self._secant_pair_g(state, (h_bar, dh_bar), after[name])
            s_a, y_a, a_ema = self._secant_pair_a(layer, state, records[name], rows[name], n)
            if not all_finite([s_g, y_g, s_a, y_a]):
                skipped += 1
                continue
            state.s_g, state.y_g, state.a_ema = s_g, y_g, a_ema
            self._update_input_inverse(state, s_a, y_a)
            self._update_output_inverse(state, s_g, y_g)
        return skipped

    def _secant_pair_g(self, state: LayerCurvature, before: tuple[torch.Tensor, torch.Tensor],
                       after: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The moving averages (line 19): s_G = beta s_G + (1 - beta)(h_bar+ - h_bar), y_G likewise with Dh_bar."""
        beta = self.settings.beta
        (h, dh), (h_plus, dh_plus) = before, after
        return beta * state.s_g + (1 - beta) * (h_plus - h), beta * state.y_g + (1 - beta) * (dh_plus - dh)

    def _secant_pair_a(self, layer: Layer, state: LayerCurvature, records: Sequence[SiteRecord], rows: LayerRows,
                       n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(s_A, y_A) [groups, a_dim] and the new EMA of A (variant "ema"). Chapter 3 (3.14): s_A = H_A a_hat,
        y_A = A s_A + lambda_A s_A with the mini-batch's A, never formed. Chapter 2 (Alg. 4 lines 20-22): A =
        beta A + (1 - beta) A_batch, y_A = (A + lambda_A I) s_A."""
        shape = (layer.groups, layer.a_dim)
        if self.settings.variant == "minibatch":
            h_a = state.h_a if layer.groups > 1 else state.h_a[0]
            s_a, y_a = input_secant_pair(layer, rows, h_a, state.lambda_a, batch_size=n)
            return s_a.reshape(shape), y_a.reshape(shape), None
        beta, dtype = self.settings.beta, self.settings.factor_dtype
        a_ema = beta * state.a_ema + (1 - beta) * batch_factors(layer, records, batch_size=n, dtype=dtype)[0]
        a_hat = mean_input(layer, rows, batch_size=n, dtype=dtype).reshape(*shape, 1)
        s_a = state.h_a @ a_hat
        return s_a.squeeze(-1), (a_ema @ s_a).squeeze(-1) + state.lambda_a * s_a.squeeze(-1), a_ema

    def _update_input_inverse(self, state: LayerCurvature, s_a: torch.Tensor, y_a: torch.Tensor) -> None:
        """H_A by BFGS (3.11) with (s_A, y_A), every group at once (Alg. 9 line 17)."""
        state.h_a = torch.vmap(bfgs_update)(state.h_a, s_a, y_a)

    def _update_output_inverse(self, state: LayerCurvature, s_g: torch.Tensor, y_g: torch.Tensor) -> None:
        """H_G from the damped pair (Alg. 9 lines 20-21): D_P D_LM (Alg. 8) then BFGS; K-BFGS(L) D_P(I) D_LM
        (Alg. 11) then L-BFGS. Variant "ema": double damping (Alg. 3) with H = H_G for both."""
        mu1, lambda_g = self.settings.mu1, state.lambda_g
        minibatch = self.settings.variant == "minibatch"
        if isinstance(state.h_g, list):
            for matrix, s, y in zip(state.h_g, s_g, y_g):
                if minibatch:
                    pair = powell_identity_lm_damping(s, y, mu1, lambda_g)
                else:
                    pair = double_damping(s, y, _Operator(matrix), mu1, lambda_g)
                matrix.push(*pair)
            return
        damping = powell_lm_damping if minibatch else double_damping
        s_t, y_t = torch.vmap(lambda s, y, h: damping(s, y, h, mu1, lambda_g))(s_g, y_g, state.h_g)
        state.h_g = torch.vmap(bfgs_update)(state.h_g, s_t, y_t)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit: the step count, momentum and every layer's
        H_A, H_G (or L-BFGS pairs), s_G, y_G (clones)."""
        return {"steps": self.steps, "momentum": {name: t.clone() for name, t in self.momentum.items()},
                "layers": {name: state.state_dict() for name, state in self.curvature.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (tensors cloned)."""
        owner = type(self).__name__
        unknown = sorted(set(state["layers"]) - set(self.layers))
        if unknown:
            raise KronographError(f"{owner}: the optimizer state has layers {unknown} this model does not have; "
                                  "it is from another model")
        curvature = {name: LayerCurvature.from_state(entry) for name, entry in state["layers"].items()}
        kinds = {"lbfgs" if isinstance(c.h_g, list) else "bfgs" for c in curvature.values()}
        if kinds - {self.settings.inverse_g}:
            raise KronographError(f"{owner}: the state holds H_G as {kinds.pop()}, this optimizer has "
                                  f"inverse_g={self.settings.inverse_g!r}; load it with the same inverse_g")
        self.steps = int(state["steps"])
        self.momentum = {name: t.clone() for name, t in state["momentum"].items()}
        self.curvature = curvature


class KBFGSL(KBFGS):
    """K-BFGS(L): H_G by L-BFGS over the last ``history`` pairs, applied in the compact (non-loop) form."""

    SUMMARY = "K-BFGS(L) (Ren's thesis, Algorithm 9): K-BFGS with L-BFGS for the output-side inverse"
    PRESETS: dict[str, KBFGSSettings] = {
        "default": KBFGSSettings(inverse_g="lbfgs"),  # Table 3.5, K-BFGS(L) on MNIST: (0.03, 0.3)
        "chapter2": KBFGSSettings(inverse_g="lbfgs", variant="ema", lr=0.003, damping=0.1),  # K-BFGS(L)-20, MNIST
    }
