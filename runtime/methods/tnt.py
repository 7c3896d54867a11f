"""TNT and TNT-EF: Tensor-Normal Training (Ren's thesis, chapter 4, Algorithm 15; TNT-EF sec 4.7.3).

Why: K-FAC needs to know each layer's structure to factor its Fisher block. TNT needs only the shape of each
parameter tensor W [d_1, ..., d_k]: it models the gradient G = DW as tensor-normal, vec(G) ~ N(0, U_1 (x) ... (x)
U_k), so that the block's Fisher is F_W = U_1 (x) ... (x) U_k (sec 4.3.2) and F_W^-1 vec(g) is k mode products
(4.8): g x_1 U_1^-1 x_2 ... x_k U_k^-1. Every trainable parameter the engine has is one block (a bias is a
vector, k = 1; a matrix has 2 modes; no layer matching).

Conventions (sec 4.2.1, thesis line ~1800): vec is the ROW-major vectorisation (the last index fastest, torch's
``reshape(-1)``), mat_i(A) [d_i, prod_{j != i} d_j] has the mode-i slices' vecs as rows, G^(i) = mat_i(G) mat_i(G)^T,
and Proposition 1 (4.3): (U_1 (x) ... (x) U_k) vec(G) = vec(G x_1 U_1 ... x_k U_k) with torch.kron's order.

Modes: a tensor of order <= 3 keeps its shape; one of order >= 4 (a convolution's [out, in, kh, kw]) is viewed
as the 3-way tensor [out, in, kh * kw], as the thesis does (line 2249, and sec 4.6: "For convolutional layers,
TNT uses three matrices ... the size of filter, number of input channels, and number of output channels"); the
view keeps vec(W). A scalar is a vector of one. A mode larger than ``max_dense_dim`` keeps only the diagonal of
its G^(i) (an embedding's vocabulary axis): (4.10) and (4.8) are unchanged, with a diagonal U~_i.

One ``step(x, y)`` (Algorithm 15, thesis line 2005; its line numbers in brackets; steps t count from 1):
1. a forward-backward pass on the batch: the mean loss's gradient g_bar [5];
2. on statistics steps (t = 1 or t % stats_every == 0) [6-8]: fisher="mc": the outputs (one no-grad forward,
   batch-norm buffers kept), targets sampled from the model with the optimizer's generator, and a second
   gradient pass with them (buffers kept) [7]: G_bar = DW averaged across the batch; fisher="empirical" (TNT-EF,
   sec 4.7.3, line ~2308): G_bar = g_bar, no extra pass. Its contractions G_bar^(i) = mat_i(G_bar) mat_i(G_bar)^T
   are folded, G_hat^(i) = beta G_hat^(i) + (1 - beta) G_bar^(i) [12]. The thesis initialises G_hat^(i) with
   the whole data set's E[G^(i)] [2]; an optimizer sees only its batches, so the first fold (t = 1) REPLACES
   the empty estimate (decay 0), the statistics of the first batch standing for that warm start;
3. momentum g_hat = mu g_hat + g_bar [10] (no (1 - mu) factor; sec 4.7.2: "m = mu m + g");
4. on inverse steps (t = 1 or t % inverse_every == 0) [14-17]: U~_i from G_hat^(1..k) by (4.10),
   U~_i = G_hat^(i) / (c0^(k-1) prod_{j != i} d_j), c0 = (tr G_hat^(i) / prod_j d_j)^(1/k) (the trace is the
   same for every i for one batch; for the folded estimate it is too, the folds being linear), then
   (U~_i + eps I)^-1 (Cholesky, float64 retry, a non-finite or failed one is 1/eps I: runtime/inverse.py);
5. p = g_hat x_1 (U~_1 + eps I)^-1 ... x_k (U~_k + eps I)^-1 [18]; p = p + gamma W [19]; W = W - lr p [20].
   So momentum comes BEFORE preconditioning and weight decay is added AFTER it, unpreconditioned.

Scale of the statistics: G_bar is the gradient of the MEAN loss over the batch, as Alg. 15 line 7 says
("averaged across M_t"), and G_bar^(i) is its contraction with no batch-size factor: with sampled targets its
expectation is E[G^(i)] of one example divided by m. (4.10) is homogeneous of degree 1/k: scaling every
G_hat^(i) by s scales each U~_i by s^(1/k) (and F_TNT = (x) U~_i by s), so the scale matters against eps, and
the thesis's (lr, eps) pairs (Tables 4.3-4.6) hold for this scale. What (4.10) does make invariant is how a
scale is split between the modes: tr(U~_i) / d_i = c0 for every i, and for exact tensor-normal statistics
E[G^(i)] = U_i prod_{j != i} tr U_j, (x) U~_i = (x) U_i = F_W whatever multipliers the U_i carry.

per_example=True (the kfac-jax DenseTNT form): G_bar^(i) = sum_n mat_i(g_n / m) mat_i(g_n / m)^T, the
contractions of each example's share g_n / m of the mean gradient rather than the contraction of their sum. With
sampled targets the cross terms have mean zero (E_y[g_n | x_n] = 0, examples independent), so both forms have
the same expectation; the per-example one has less variance but costs one gradient pass per example (the
engine's ``gradient_pass`` on each example alone; batch norm then sees batches of one). With the labels (TNT-EF)
they differ by the mean gradient's square, which is why the thesis calls the EF not tensor-normal (sec 4.3.4).

A step is atomic: a batch whose loss, gradient, sampled gradient or update is not finite is skipped
(SkippedStepWarning, info["skipped"]) and leaves the weights and the whole state (generator included) as they were.
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
from kronograph.runtime.distributed import refuse_data_parallel
from kronograph.runtime.engines import make_engine
from kronograph.runtime.inverse import SkippedStepWarning, all_finite, damped_inverse
from kronograph.runtime.losses import get_loss
from kronograph.runtime.methods.settings import check, resolve, setting
from kronograph.runtime.statistics import make_generator, preserved_buffers

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TNTSettings:
    """Every TNT setting, with its thesis source (chapter 4)."""

    lr: float = setting(1e-4, "learning rate alpha (Alg. 15 line 20); default: Table 4.3's best for TNT on MNIST "
                        "(thesis line 2182, batch 1000), also Table 4.4's (line 2211)", low=0, low_open=True)
    damping: float = setting(0.1, "epsilon in (U~_i + epsilon I)^-1 (Alg. 15 line 16, sec 4.3.3); default: Table "
                             "4.3, MNIST (line 2182)", low=0, low_open=True)
    beta: float = setting(0.9, "decay of the moving averages of the mode statistics G^(i) (Alg. 15 lines 1, "
                          "12; thesis line 2009)",
                          low=0, high=1, high_open=True)
    momentum: float = setting(0.9, "mu in g_hat = mu g_hat + g (Alg. 15 lines 1, 10, thesis line 2009; no "
                              "(1 - mu) factor, line 2129)",
                              low=0, high=1, high_open=True)
    weight_decay: float = setting(0.0, "gamma in p = p + gamma W after the preconditioning (Alg. 15 line 19); "
                                  "default: none, as in the autoencoder experiments (line 2194)", low=0)
    stats_every: int = setting(1, "T1: the statistics are updated at steps t = 1 and t % T1 == 0 (Alg. 15 "
                               "lines 6, 11); default: the autoencoder experiments, thesis line 2082 (preset "
                               "'cnn': 10, line 2104)", low=1)
    inverse_every: int = setting(20, "T2: U~ and their inverses are recomputed at steps t = 1 and t % T2 == 0 "
                                 "(Alg. 15 line 14); default: the autoencoder experiments, thesis line 2082 "
                                 "(preset 'cnn': 100, line 2104)", low=1)
    fisher: str = setting("mc", "'mc': statistics of the gradient with targets sampled from the model (TNT, Alg. "
                          "15 line 7); 'empirical': of the labels' gradient (TNT-EF, sec 4.7.3)",
                          choices=("mc", "empirical"))
    per_example: bool = setting(False, "statistics as the sum of each example's contraction (kfac-jax DenseTNT) "
                                "instead of the batch gradient's: same expectation with sampled targets, one "
                                "gradient pass per example")
    max_dense_dim: int = setting(4096, "a mode larger than this keeps only the diagonal of its statistic (an "
                                 "embedding's vocabulary axis): a 4096-wide factor is 64 MiB in float32 and "
                                 "O(d^3) to invert, beyond every mode of the thesis's models (widths <= 2000)",
                                 low=1)
    factor_dtype: torch.dtype = setting(torch.float32, "dtype of the statistics and inverses, independent of the "
                                        "model's", choices=(torch.float32, torch.float64), cli=False)

    def __post_init__(self) -> None:
        check(self, "TNT")


# -- the tensor algebra of sec 4.2.1 -------------------------------------------------------------------------
def tensor_modes(shape: Sequence[int]) -> tuple[int, ...]:
    """The modes TNT gives a parameter of this shape: its own up to order 3, [d0, d1, prod(rest)] above
    (a convolution's [out, in, kh*kw], thesis line 2249); a scalar is a vector of one."""
    shape = tuple(int(d) for d in shape)
    if not shape:
        return (1,)
    if len(shape) >= 4:
        return (shape[0], shape[1], math.prod(shape[2:]))
    return shape


def contraction(g: torch.Tensor, mode: int, diagonal: bool = False) -> torch.Tensor:
    """G^(i) = mat_i(G) mat_i(G)^T (sec 4.2.1), or its diagonal, for mode i = ``mode`` (from 0)."""
    return _summed_contraction(g[None], mode, diagonal)


def mode_product(g: torch.Tensor, mode: int, u: torch.Tensor) -> torch.Tensor:
    """G x_mode U (sec 4.2.1): B[.., j', ..] = sum_j G[.., j, ..] U[j', j]; a 1-D ``u`` is diag(u)."""
    if u.dim() == 1:
        shape = [1] * g.dim()
        shape[mode] = -1
        return g * u.reshape(shape)
    return torch.movedim(torch.tensordot(u, g, dims=([1], [mode])), 0, mode)


def mode_products(g: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """G x_1 U_1 x_2 ... x_k U_k, equal to (U_1 (x) ... (x) U_k) vec(G) by Proposition 1 (4.3) / (4.8)."""
    for mode, u in enumerate(factors):
        g = mode_product(g, mode, u)
    return g


def normalized_factors(stats: Sequence[torch.Tensor], dims: Sequence[int]) -> list[torch.Tensor]:
    """U~_i by (4.10): G_hat^(i) / (c0^(k-1) prod_{j != i} d_j), c0 = (tr G_hat^(i) / prod_j d_j)^(1/k). The
    trace is the mean over the modes of tr G_hat^(i) (all equal in exact arithmetic). c0 = 0 (a zero gradient)
    gives U~_i = 0, so that the step is g_hat / eps^k (the bound of sec 4.3.3)."""
    k, total = len(dims), math.prod(dims)
    trace = sum(s.sum() if s.dim() == 1 else torch.diagonal(s).sum() for s in stats) / k
    c0 = (trace.clamp_min(0) / total) ** (1.0 / k)
    out = []
    for s, d in zip(stats, dims):
        denominator = c0 ** (k - 1) * (total // d)
        out.append(torch.where(denominator > 0, s / denominator, torch.zeros_like(s)))
    return out


def damped_inverses(factors: Sequence[torch.Tensor], damping: float) -> list[torch.Tensor]:
    """(U~_i + eps I)^-1 (Alg. 15 line 16); a diagonal U~_i gives the diagonal 1 / (u + eps). Never non-finite:
    a factor that is not finite or not invertible gives 1/eps I (runtime/inverse.damped_inverse)."""
    out = []
    for u in factors:
        if u.dim() == 1:
            inverse = 1.0 / (u.clamp_min(0) + damping)
            out.append(torch.where(torch.isfinite(inverse), inverse, torch.full_like(inverse, 1.0 / damping)))
        else:
            out.append(damped_inverse(u[None], damping)[0][0])
    return out


def mode_update(engine, momentum: Tensors, factors: Mapping[str, list[torch.Tensor]], lr: float,
                weight_decay: float) -> Tensors:
    """The last lines of Algorithms 15 and 16: -lr (g_hat x_1 F_1 ... x_k F_k + weight_decay W) for every parameter
    the engine does not hold frozen, F_i the mode factors (TNT's damped inverses, Shampoo's inverse roots)."""
    params, frozen = engine.parameters(), engine.frozen()
    update = {}
    for name, g_hat in momentum.items():
        if name in frozen:
            continue
        w = params[name]
        p = mode_products(g_hat.reshape(tensor_modes(w.shape)), factors[name]).reshape(w.shape)
        if weight_decay:
            p = p + weight_decay * w.to(p.dtype)
        update[name] = -lr * p
    return update


def refuse_foreign_statistics(owner: str, params: Mapping[str, torch.Tensor],
                              statistics: Mapping[str, Sequence[torch.Tensor]]) -> None:
    """A checkpoint's mode statistics must be of this model's parameters, mode for mode; else KronographError."""
    for name, stats in statistics.items():
        if name not in params or [s.shape[0] for s in stats] != list(tensor_modes(params[name].shape)):
            raise KronographError(f"{owner}: the optimizer state has a parameter {name!r} this model does not have "
                                  "(or of another shape); it is from another model")


class TNT:
    """Tensor-Normal Training (Algorithm 15) on a compiled model's engine (torch or onnxruntime)."""

    SUMMARY = "TNT (Ren's thesis, Algorithm 15): tensor-normal Fisher, one Kronecker factor per tensor mode"
    Settings = TNTSettings
    PRESETS: dict[str, TNTSettings] = {
        # The MNIST autoencoder (batch 1000): Table 4.3's (lr, eps) = (1e-4, 0.1), T1, T2 = 1, 20 (line 2082).
        "default": TNTSettings(),
        # The CNNs (batch 128): Table 4.4's VGG16 on CIFAR-10 (lr, weight decay, eps) = (1e-4, 10, 0.1), T1, T2 =
        # 10, 100 (line 2104); the thesis also decays lr by 0.1 every 50 epochs, which a step cannot know. VGG16, a
        # plain conv stack: ResNet-32's eps 0.01 made the built-in CNN's loss non-finite by step 7 (BENCHMARKS.md).
        "cnn": TNTSettings(weight_decay=10.0, damping=0.1, stats_every=10, inverse_every=100),
    }

    def __init__(self, compiled: CompiledModel, preset: str = "default", seed: int | None = None,
                 **settings: Any) -> None:
        refuse_data_parallel(type(self).__name__)
        self.settings = resolve(self.PRESETS, preset, settings, type(self).__name__)
        self.loss = get_loss(compiled.loss)
        self.engine = make_engine(compiled, self.loss)
        self.generator = make_generator(self.engine.device, seed)
        self.steps = 0
        self.momentum: Tensors = {}  # g_hat per parameter
        self.statistics: dict[str, list[torch.Tensor]] = {}  # G_hat^(i) per parameter ([d, d] or diagonal [d])
        self.inverses: dict[str, list[torch.Tensor]] = {}  # (U~_i + eps I)^-1 per parameter

    # -- the step -----------------------------------------------------------------------------------
    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
        """One iteration of Algorithm 15 on (x, y); returns {"loss": the mean loss before the step,
        "statistics_updated", "inverses_updated"}, and "skipped" (why) when the batch was skipped."""
        s = self.settings
        inputs = tuple(torch.as_tensor(t) for t in (x if isinstance(x, (tuple, list)) else (x,)))
        y = torch.as_tensor(y)
        t = self.steps + 1
        stats_due = t == 1 or t % s.stats_every == 0
        inverse_due = t == 1 or t % s.inverse_every == 0
        generator_state = self.generator.get_state()
        first = self.engine.gradient_pass(inputs, y, capture=False)  # line 5
        info: dict[str, Any] = {"loss": first.loss, "statistics_updated": False, "inverses_updated": False}
        grads = dict(first.grads)
        if not math.isfinite(first.loss) or not all_finite(grads.values()):
            return self._skip(info, generator_state, "non-finite loss or gradient")
        statistics, inverses = self.statistics, self.inverses
        if stats_due:  # lines 6-8, 11-13
            batch = self._statistics(inputs, y, grads)
            if batch is None or not all_finite(v for vs in batch.values() for v in vs):
                return self._skip(info, generator_state, "non-finite statistics")
            statistics = self._fold(batch)
        if inverse_due or any(name not in inverses for name in statistics):  # lines 14-17
            inverses = {**inverses, **{name: self._inverses(name, stats) for name, stats in statistics.items()
                                       if inverse_due or name not in inverses}}
        momentum = {name: g.to(s.factor_dtype) if name not in self.momentum
                    else s.momentum * self.momentum[name] + g.to(s.factor_dtype) for name, g in grads.items()}  # 10
        update = self._update(momentum, inverses)
        if not all_finite(update.values()):
            return self._skip(info, generator_state, "non-finite update")
        self.steps, self.momentum, self.statistics, self.inverses = t, momentum, statistics, inverses
        self.engine.add_(update)
        info["statistics_updated"], info["inverses_updated"] = stats_due, inverse_due
        return info

    def _skip(self, info: dict[str, Any], generator_state: torch.Tensor, why: str) -> dict[str, Any]:
        self.generator.set_state(generator_state)
        warnings.warn(f"TNT: a batch with a {why} (NaN or Inf in its inputs or targets?) was skipped; the weights "
                      "and the optimizer's state are as before it", SkippedStepWarning, stacklevel=3)
        return {**info, "skipped": f"{why}; the weights were left unchanged"}

    def _diagonal(self, d: int) -> bool:
        return d > self.settings.max_dense_dim

    # -- statistics (lines 7, 12) --------------------------------------------------------------------------
    def _passes(self, inputs: Sequence[torch.Tensor], targets: torch.Tensor):
        """A gradient pass that leaves batch-norm buffers as they were (torch engine)."""
        module = getattr(self.engine, "module", None)
        with preserved_buffers(module) if module is not None else contextlib.nullcontext():
            return self.engine.gradient_pass(inputs, targets, capture=False)

    def _statistics(self, inputs: Sequence[torch.Tensor], y: torch.Tensor, grads: Tensors
                    ) -> dict[str, list[torch.Tensor]] | None:
        """G_bar^(i) per parameter: of the sampled-target gradient (mc) or of the labels' (empirical)."""
        targets, scale = y, 1.0
        if self.settings.fisher == "mc":
            outputs = self.engine.outputs(inputs)
            targets = self.loss.sample_targets(outputs, self.generator)
            scale = self.loss.statistics_scale(targets)
        return self.statistics_of(inputs, targets, scale=scale, grads=None if self.settings.fisher == "mc" else grads)

    def statistics_of(self, inputs: Sequence[torch.Tensor], targets: torch.Tensor, scale: float = 1.0,
                      grads: Tensors | None = None) -> dict[str, list[torch.Tensor]] | None:
        """The batch statistics G_bar^(i) of every parameter for these targets (no state changes): of the mean
        loss's gradient times ``scale`` (``grads`` when already computed), or, with per_example, the sum over
        examples of the contractions of g_n / m. None when a pass is not finite."""
        dtype, per_example = self.settings.factor_dtype, self.settings.per_example
        inputs = tuple(inputs)
        if per_example:
            n = inputs[0].shape[0]
            shares: dict[str, list[torch.Tensor]] = {}
            for i in range(n):
                one = self._passes(tuple(t[i:i + 1] for t in inputs), targets[i:i + 1])
                if not math.isfinite(one.loss):
                    return None
                for name, g in one.grads.items():
                    shares.setdefault(name, []).append(g.to(dtype) * (scale / n))
            gradients = {name: torch.stack(parts) for name, parts in shares.items()}
        else:
            if grads is None:
                second = self._passes(inputs, targets)
                if not math.isfinite(second.loss):
                    return None
                grads = second.grads
            gradients = {name: (g.to(dtype) * scale)[None] for name, g in grads.items()}
        out = {}
        for name, g in gradients.items():
            modes = tensor_modes(g[0].shape)
            g = g.reshape(g.shape[0], *modes)
            out[name] = [_summed_contraction(g, i, self._diagonal(d)) for i, d in enumerate(modes)]
        return out

    def _fold(self, batch: Mapping[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """G_hat^(i) = beta G_hat^(i) + (1 - beta) G_bar^(i) (line 12); the first fold replaces (warm start)."""
        beta, folded = self.settings.beta, dict(self.statistics)
        for name, stats in batch.items():
            if name in self.statistics:
                folded[name] = [beta * old + (1 - beta) * new for old, new in zip(self.statistics[name], stats)]
            else:
                folded[name] = [new.clone() for new in stats]
        return folded

    def _inverses(self, name: str, stats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        dims = [s.shape[0] for s in stats]
        return damped_inverses(normalized_factors(stats, dims), self.settings.damping)

    # -- the update (lines 18-20) --------------------------------------------------------------------------
    def _update(self, momentum: Tensors, inverses: Mapping[str, list[torch.Tensor]]) -> Tensors:
        """-lr (g_hat x_1 (U~_1 + eps I)^-1 ... x_k (U~_k + eps I)^-1 + gamma W); frozen parameters stay."""
        return mode_update(self.engine, momentum, inverses, self.settings.lr, self.settings.weight_decay)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit (clones)."""
        return {"steps": self.steps, "generator": self.generator.get_state(),
                "momentum": {name: t.clone() for name, t in self.momentum.items()},
                "statistics": {name: [t.clone() for t in ts] for name, ts in self.statistics.items()},
                "inverses": {name: [t.clone() for t in ts] for name, ts in self.inverses.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (tensors cloned)."""
        refuse_foreign_statistics(type(self).__name__, self.engine.parameters(), state["statistics"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        self.momentum = {name: t.clone() for name, t in state["momentum"].items()}
        self.statistics = {name: [t.clone() for t in ts] for name, ts in state["statistics"].items()}
        self.inverses = {name: [t.clone() for t in ts] for name, ts in state["inverses"].items()}


def _summed_contraction(g: torch.Tensor, mode: int, diagonal: bool) -> torch.Tensor:
    """sum_n G_n^(mode) (or its diagonal) for G [n, d_1, ..., d_k]."""
    moved = torch.movedim(g, mode + 1, 1)
    rows = moved.reshape(moved.shape[0], moved.shape[1], -1)
    if diagonal:
        return (rows * rows).sum((0, 2))
    return torch.einsum("nik,njk->ij", rows, rows)


class TNTEF(TNT):
    """TNT-EF (sec 4.7.3): Algorithm 15 with the labels' gradient in the statistics, no extra pass."""

    SUMMARY = "TNT-EF (Ren's thesis, sec 4.7.3): TNT on the empirical Fisher (the labels' gradient)"
    PRESETS: dict[str, TNTSettings] = {
        # Table 4.5, TNT-EF on the MNIST autoencoder: (lr, eps) = (3e-6, 0.01), T1, T2 = 1, 20 (line 2082).
        "default": TNTSettings(fisher="empirical", lr=3e-6, damping=0.01),
        # Table 4.6, TNT-EF with VGG16 on CIFAR-10: (1e-4, 10, 0.1), T1, T2 = 10, 100.
        "cnn": TNTSettings(fisher="empirical", weight_decay=10.0, damping=0.1, stats_every=10, inverse_every=100),
    }
