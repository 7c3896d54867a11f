"""Shampoo as Ren's thesis runs it (chapter 4, sec 4.7.2, Algorithm 16, thesis lines 2135-2170).

Why: the baseline TNT (Algorithm 15, runtime/methods/tnt.py) is compared with. Like TNT it needs only the shape of
each parameter tensor W [d_1, ..., d_k]; unlike TNT it takes its statistics from the EMPIRICAL minibatch gradient
(the empirical Fisher, sec 4.3.4 (i)) and preconditions with the -1/(2k)-th power of each damped statistic rather
than with the inverse of the trace-normalised one (sec 4.3.4 (iii)).

Conventions: TNT's (sec 4.2.1): vec is row-major (torch's ``reshape(-1)``), mat_i(G) has the mode-i slices' vecs as
rows, G^(i) = mat_i(G) mat_i(G)^T, and G x_1 U_1 ... x_k U_k = (U_1 (x) ... (x) U_k) vec(G) (Proposition 1); the
helpers ``tensor_modes``, ``contraction`` and ``mode_products`` are TNT's. Modes as TNT's: order <= 3 keeps its
shape, a convolution [out, in, kh, kw] is the 3-way [out, in, kh * kw] (thesis line 2249: "in TNT and Shampoo ...
we view it as a 3-way tensor"), a scalar is a vector of one; a mode larger than ``max_dense_dim`` keeps only the
diagonal of its statistic, whose root is then elementwise.

One ``step(x, y)`` (Algorithm 16, its line numbers in brackets, thesis lines 2146-2163; steps t count from 1):
1. a forward-backward pass on the batch: the mean loss's gradient g_bar [5];
2. momentum g_hat = mu g_hat + g_bar [7] (no (1 - mu) factor, thesis line 2129: "m = mu m + g");
3. on statistics steps (t = 1 or t % stats_every == 0) [8-10]: G_hat^(i) = beta G_hat^(i) + (1 - beta) G_bar^(i)
   with G_bar^(i) = mat_i(g_bar) mat_i(g_bar)^T, the contractions of the MINIBATCH gradient [9]. The thesis
   initialises G_hat^(i) with the data set's E[G^(i)] [2]; as in TNT, the first fold (t = 1) replaces the empty
   estimate, the first batch's statistics standing for that warm start;
4. on inverse steps (t = 1 or t % inverse_every == 0) [11-13]: R_i = (G_hat^(i) + eps I)^(-1/(2k)) by the coupled
   Newton iteration (Guo and Higham 2006, as in Anil et al.'s Shampoo; thesis line 2140: at most 100 iterations,
   tolerance 1e-6); when it does not reach the tolerance, or gives a non-finite matrix, the root comes from an
   eigendecomposition instead (eigenvalues floored at eps, the smallest an exact G_hat + eps I has), and a matrix
   that is not finite at all gives eps^(-1/(2k)) I: a root is never non-finite;
5. p = g_hat x_1 R_1 x_2 ... x_k R_k [14]; p = p + gamma W [15]; W = W - lr p [16]: momentum before the
   preconditioning, weight decay after it, unpreconditioned (as TNT).

Grafting: none. The thesis's Shampoo has no grafting (nor Anil et al.'s lambda_max-relative damping, the diagonal
variant or blocking: thesis lines 2166-2169 list what was left out to keep the comparison with TNT fair), so the
step's size is the preconditioned direction's own.

Where Algorithm 16 is ambiguous:
- line 9 says G_bar_l = overline(grad_{W_l} L), and line 2 initialises "overline(grad_{W_l} L) = 0", which in
  Algorithm 15 (line 2, thesis line 2010) is the momentum's hat. Read here as in Algorithm 15 (line 5) and Gupta
  et al.: the overline is the minibatch gradient (line 5), so the statistics are of g_bar, not of the momentum;
  line 2's overline is taken to be a typo for the momentum's hat;
- Algorithm 16 updates the statistics only at t % T1 == 0 and the roots at t % T2 == 0, after a warm start of the
  statistics (line 2) that an optimizer fed batch by batch cannot do: as in TNT, t = 1 is also a statistics and an
  inverse step, so that the roots exist from the first step;
- the coupled Newton iteration's start and stopping rule are not given; Anil et al.'s (its published PyTorch
  form): z = (1 + p) / (2 ||A||_F), X_0 = z^(1/p) I, M_0 = z A, T = ((p + 1) I - M) / p, X <- X T, M <- T^p M,
  error = max |M - I|, stopping when error <= tolerance, after max_iterations, or when the error grows by more
  than 20% (stagnation at rounding level; the previous iterate is kept). Here reaching the tolerance is what
  counts as convergence, the other two stops fall back to the eigendecomposition. The iteration runs in float64
  whatever factor_dtype is (a 1e-6 tolerance on max |M - I| is at float32's rounding level for d >= 10) and the
  root is stored in factor_dtype. ``roots="eigh"`` takes the eigendecomposition's root directly: the same root,
  about ten times cheaper on a CPU for the widest factors (the Newton iteration is the GPU's way).

Scale of the statistics: g_bar is the gradient of the MEAN loss, G_bar^(i) its contraction with no batch-size
factor (as TNT's); eps is added to that scale, so the thesis's (lr, eps) pairs (Tables 4.3, 4.4) hold for it.

A step is atomic: a batch whose loss, gradient or update is not finite is skipped (SkippedStepWarning,
info["skipped"]) and leaves the weights and the whole state as they were.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kronograph.compiler.compiled import CompiledModel
from kronograph.runtime.distributed import refuse_data_parallel
from kronograph.runtime.engines import make_engine
from kronograph.runtime.inverse import SkippedStepWarning, all_finite
from kronograph.runtime.losses import get_loss
from kronograph.runtime.methods.settings import check, resolve, setting
from kronograph.runtime.methods.tnt import contraction, mode_update, refuse_foreign_statistics, tensor_modes

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ShampooSettings:
    """Every Shampoo setting, with its thesis source (chapter 4, Algorithm 16)."""

    lr: float = setting(3e-4, "learning rate alpha (Alg. 16 line 16); default: Table 4.3's best for Shampoo on "
                        "MNIST, FACES and CURVES alike (thesis line 2184, batch 1000); the CNN runs used 1e-3 to "
                        "0.01 (Table 4.4, line 2213)", low=0, low_open=True)
    damping: float = setting(3e-4, "epsilon in (G_hat^(i) + epsilon I)^(-1/2k) (Alg. 16 lines 12, 14); default: "
                             "Table 4.3 (line 2184); the CNN runs set 0.01 (line 2104)", low=0, low_open=True)
    beta: float = setting(0.9, "decay of the moving averages of the mode statistics G^(i) (Alg. 16 lines 1, 9; "
                          "thesis lines 2146, 2139)", low=0, high=1, high_open=True)
    momentum: float = setting(0.9, "mu in g_hat = mu g_hat + g (Alg. 16 lines 1, 7, thesis line 2146; no (1 - mu) "
                              "factor, line 2129)", low=0, high=1, high_open=True)
    weight_decay: float = setting(0.0, "gamma in p = p + gamma W after the preconditioning (Alg. 16 line 15); "
                                  "default: none, as in the autoencoder experiments (line 2194)", low=0)
    stats_every: int = setting(1, "T1: the statistics are updated at steps t = 1 and t % T1 == 0 (Alg. 16 line "
                               "8); default: the autoencoder experiments, thesis line 2082 (preset 'cnn': 10, "
                               "line 2104)", low=1)
    inverse_every: int = setting(20, "T2: the inverse roots are recomputed at steps t = 1 and t % T2 == 0 (Alg. "
                                 "16 line 11); default: the autoencoder experiments, thesis line 2082 (preset "
                                 "'cnn': 100, line 2104)", low=1)
    roots: str = setting("newton", "how the inverse roots are computed: 'newton', the coupled Newton iteration the "
                         "thesis used (line 2140, matrix products only: the GPU's way), or 'eigh', one symmetric "
                         "eigendecomposition per factor (the same root to ~1e-8; ~10x cheaper on a CPU for a 1000 x "
                         "1000 factor: benchmarks/shampoo_roots.py)", choices=("newton", "eigh"))
    max_iterations: int = setting(100, "most coupled Newton iterations for one inverse root (thesis line 2140); "
                                  "one that does not reach the tolerance falls back to an eigendecomposition",
                                  low=1)
    tolerance: float = setting(1e-6, "the coupled Newton iteration stops when max |M - I| <= tolerance (thesis "
                               "line 2140)", low=0, low_open=True)
    max_dense_dim: int = setting(4096, "a mode larger than this keeps only the diagonal of its statistic (as "
                                 "TNT's), whose root is elementwise", low=1)
    factor_dtype: torch.dtype = setting(torch.float32, "dtype of the statistics and roots, independent of the "
                                        "model's (the Newton iteration itself runs in float64)",
                                        choices=(torch.float32, torch.float64), cli=False)

    def __post_init__(self) -> None:
        check(self, "Shampoo")


# -- inverse p-th roots (Alg. 16 line 12) ----------------------------------------------------------------------
def coupled_newton_inverse_root(a: torch.Tensor, p: int, max_iterations: int = 100, tolerance: float = 1e-6
                                ) -> tuple[torch.Tensor, bool, int]:
    """A^(-1/p) of a symmetric positive definite ``a`` by the coupled Newton iteration (Guo and Higham 2006, in
    Anil et al.'s form: see the module's docstring), in float64. Returns (root, converged, iterations): converged
    is False when max |M - I| did not reach ``tolerance`` (iteration limit, or the error grew: stagnation or an
    input that is not positive definite) or the root is not finite; the root is then the last good iterate,
    which the caller should not use."""
    a = a.to(torch.float64)
    a = 0.5 * (a + a.T)
    d = a.shape[0]
    identity = torch.eye(d, dtype=a.dtype, device=a.device)
    norm = torch.linalg.matrix_norm(a)
    if not bool(torch.isfinite(norm)) or float(norm) <= 0:
        return identity, False, 0
    z = (1 + p) / (2 * norm)
    root = identity * z ** (1.0 / p)
    m = a * z
    error = float((m - identity).abs().max())
    iterations = 0
    while error > tolerance and iterations < max_iterations:
        t = ((p + 1) * identity - m) / p
        new_root = root @ t
        new_m = torch.linalg.matrix_power(t, p) @ m
        new_error = float((new_m - identity).abs().max())
        if not math.isfinite(new_error) or new_error > 1.2 * error:
            break
        root, m, error = new_root, new_m, new_error
        iterations += 1
    converged = error <= tolerance and bool(torch.isfinite(root).all())
    return root, converged, iterations


def eigh_inverse_root(a: torch.Tensor, p: int, floor: float) -> torch.Tensor:
    """V diag(max(lambda, floor)^(-1/p)) V^T of the symmetric part of ``a`` (float64), or floor^(-1/p) I when
    ``a`` is not finite or the decomposition fails: always finite for floor > 0."""
    a = a.to(torch.float64)
    d = a.shape[0]
    fallback = torch.eye(d, dtype=a.dtype, device=a.device) * floor ** (-1.0 / p)
    if not bool(torch.isfinite(a).all()):
        return fallback
    try:
        values, vectors = torch.linalg.eigh(0.5 * (a + a.T))
    except RuntimeError:
        return fallback
    root = (vectors * values.clamp_min(floor) ** (-1.0 / p)) @ vectors.T
    return root if bool(torch.isfinite(root).all()) else fallback


def damped_inverse_root(statistic: torch.Tensor, p: int, damping: float, max_iterations: int = 100,
                        tolerance: float = 1e-6, method: str = "newton") -> tuple[torch.Tensor, bool]:
    """(G + eps I)^(-1/p) (Alg. 16 line 12), in ``statistic``'s dtype, and whether the chosen ``method`` gave it
    (False: the Newton iteration failed and the eigendecomposition did). A 1-D ``statistic`` is a diagonal one:
    (g + eps)^(-1/p) elementwise."""
    if statistic.dim() == 1:
        root = (statistic.to(torch.float64).clamp_min(0) + damping) ** (-1.0 / p)
        good = torch.isfinite(root)
        root = torch.where(good, root, torch.full_like(root, damping ** (-1.0 / p)))
        return root.to(statistic.dtype), bool(good.all())
    damped = statistic.to(torch.float64) + damping * torch.eye(statistic.shape[0], dtype=torch.float64,
                                                               device=statistic.device)
    if method == "eigh":
        return eigh_inverse_root(damped, p, damping).to(statistic.dtype), True
    root, converged, _ = coupled_newton_inverse_root(damped, p, max_iterations, tolerance)
    if not converged:
        root = eigh_inverse_root(damped, p, damping)
    return root.to(statistic.dtype), converged


class Shampoo:
    """Shampoo (Algorithm 16 of Ren's thesis) on a compiled model's engine (torch or onnxruntime)."""

    SUMMARY = "Shampoo (Ren's thesis, Algorithm 16): empirical mode statistics, coupled-Newton -1/2k roots, no grafting"
    Settings = ShampooSettings
    PRESETS: dict[str, ShampooSettings] = {
        # The MNIST autoencoder (batch 1000): Table 4.3's (lr, eps) = (3e-4, 3e-4), T1, T2 = 1, 20 (line 2082).
        "default": ShampooSettings(),
        # The CNNs (batch 128): Table 4.4's VGG16 on CIFAR-10 (lr, weight decay, eps) = (0.001, 1, 0.1), T1, T2 =
        # 10, 100 (line 2104); VGG16 as TNT's preset (a plain conv stack, like the built-in CNN).
        "cnn": ShampooSettings(lr=0.001, weight_decay=1.0, damping=0.1, stats_every=10, inverse_every=100),
    }

    def __init__(self, compiled: CompiledModel, preset: str = "default", seed: int | None = None,
                 **settings: Any) -> None:
        refuse_data_parallel(type(self).__name__)
        self.settings = resolve(self.PRESETS, preset, settings, type(self).__name__)
        self.loss = get_loss(compiled.loss)
        self.engine = make_engine(compiled, self.loss)
        self.seed = seed  # Shampoo draws nothing; kept for the methods' common signature
        self.steps = 0
        self.momentum: Tensors = {}  # g_hat per parameter
        self.statistics: dict[str, list[torch.Tensor]] = {}  # G_hat^(i) per parameter ([d, d] or diagonal [d])
        self.roots: dict[str, list[torch.Tensor]] = {}  # (G_hat^(i) + eps I)^(-1/2k) per parameter

    # -- the step -----------------------------------------------------------------------------------
    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
        """One iteration of Algorithm 16 on (x, y); returns {"loss": the mean loss before the step,
        "statistics_updated", "inverses_updated", "root_fallbacks": how many roots of this step came from the
        eigendecomposition}, and "skipped" (why) when the batch was skipped."""
        s = self.settings
        inputs = tuple(torch.as_tensor(t) for t in (x if isinstance(x, (tuple, list)) else (x,)))
        y = torch.as_tensor(y)
        t = self.steps + 1
        stats_due = t == 1 or t % s.stats_every == 0
        inverse_due = t == 1 or t % s.inverse_every == 0
        first = self.engine.gradient_pass(inputs, y, capture=False)  # line 5
        info: dict[str, Any] = {"loss": first.loss, "statistics_updated": False, "inverses_updated": False,
                                "root_fallbacks": 0}
        grads = {name: g.to(s.factor_dtype) for name, g in first.grads.items()}
        if not math.isfinite(first.loss) or not all_finite(grads.values()):
            return self._skip(info, "non-finite loss or gradient")
        momentum = {name: g if name not in self.momentum else s.momentum * self.momentum[name] + g
                    for name, g in grads.items()}  # line 7
        statistics = self._fold(grads) if stats_due else self.statistics  # lines 8-10
        roots, fallbacks = self.roots, 0
        due = [name for name in statistics if inverse_due or name not in roots]
        if due:  # lines 11-13
            roots = dict(roots)
            for name in due:
                roots[name], failed = self._roots(statistics[name])
                fallbacks += failed
        update = self._update(momentum, roots)  # lines 14-16
        if not all_finite(update.values()):
            return self._skip(info, "non-finite update")
        self.steps, self.momentum, self.statistics, self.roots = t, momentum, statistics, roots
        self.engine.add_(update)
        info.update(statistics_updated=stats_due, inverses_updated=inverse_due, root_fallbacks=fallbacks)
        return info

    def _skip(self, info: dict[str, Any], why: str) -> dict[str, Any]:
        warnings.warn(f"Shampoo: a batch with a {why} (NaN or Inf in its inputs or targets?) was skipped; the "
                      "weights and the optimizer's state are as before it", SkippedStepWarning, stacklevel=3)
        return {**info, "skipped": f"{why}; the weights were left unchanged"}

    # -- statistics (line 9) and roots (line 12) ------------------------------------------------------------
    def _fold(self, grads: Mapping[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """G_hat^(i) = beta G_hat^(i) + (1 - beta) mat_i(g_bar) mat_i(g_bar)^T; the first fold replaces."""
        beta, folded = self.settings.beta, dict(self.statistics)
        for name, g in grads.items():
            modes = tensor_modes(g.shape)
            g = g.reshape(modes)
            new = [contraction(g, i, d > self.settings.max_dense_dim) for i, d in enumerate(modes)]
            old = self.statistics.get(name)
            folded[name] = new if old is None else [beta * a + (1 - beta) * b for a, b in zip(old, new)]
        return folded

    def _roots(self, stats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        s, p = self.settings, 2 * len(stats)
        out, fallbacks = [], 0
        for statistic in stats:
            root, converged = damped_inverse_root(statistic, p, s.damping, s.max_iterations, s.tolerance, s.roots)
            out.append(root)
            fallbacks += not converged
        return out, fallbacks

    # -- the update (lines 14-16) --------------------------------------------------------------------------
    def _update(self, momentum: Tensors, roots: Mapping[str, list[torch.Tensor]]) -> Tensors:
        """-lr (g_hat x_1 R_1 ... x_k R_k + gamma W); frozen parameters stay."""
        return mode_update(self.engine, momentum, roots, self.settings.lr, self.settings.weight_decay)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit (clones)."""
        return {"steps": self.steps,
                "momentum": {name: t.clone() for name, t in self.momentum.items()},
                "statistics": {name: [t.clone() for t in ts] for name, ts in self.statistics.items()},
                "roots": {name: [t.clone() for t in ts] for name, ts in self.roots.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (tensors cloned)."""
        refuse_foreign_statistics(type(self).__name__, self.engine.parameters(), state["statistics"])
        self.steps = int(state["steps"])
        self.momentum = {name: t.clone() for name, t in state["momentum"].items()}
        self.statistics = {name: [t.clone() for t in ts] for name, ts in state["statistics"].items()}
        self.roots = {name: [t.clone() for t in ts] for name, ts in state["roots"].items()}
