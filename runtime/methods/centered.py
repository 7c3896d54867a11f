"""Centered gradient descent and the amortized covariance preconditioner (George's thesis, sec 3.4.1-3.4.2,
Algorithms 2 and 3).

Why: sec 3.3.3 keeps only the input side of a layer's Gauss-Newton block, F_in = A (x) alpha I with
A = mean_i [h_i; 1][h_i; 1]^T, and inverts A blockwise through the covariance of the layer's inputs
C = (1/n) sum_i (h_i - h_bar)(h_i - h_bar)^T. The W update then uses the CENTERED inputs h_i - h_bar (the old
"centering trick", derived) and, with C^-1, whitens them; C changes slowly, so its inverse is amortized.

``CenteredSGD`` is Algorithm 2, per Kronecker layer (lines 4-6, descent written with a minus):
    b <- b - lr (1/n) sum_i Delta_i,      W <- W - lr (1/n) sum_i Delta_i (h_i - h_bar)^T,
with Delta_i = dl_i/da_i and h_bar the mean input of the batch.

``ACP`` is Algorithm 3: at steps k with k % N == 0 (line 3; k counts the updates from 0) C of every layer is
re-estimated on the batch (lines 5-8); every step (lines 11-13), with this batch's Delta_i, h_i and h_bar:
    W <- W - lr (1/n) sum_i Delta_i (h_i - h_bar)^T (alpha C + lambda I)^-1,
    b <- b - lr (1/n) sum_i Delta_i / (alpha + lambda).
(alpha C + lambda I)^-1 = (1/alpha) (C + (lambda/alpha) I)^-1 is sec 3.4.2's damped F_in + lambda I =
(A + (lambda/alpha) I) (x) alpha I: Tikhonov lambda/alpha on C, and 1/alpha from the output block alpha I (the
1/alpha of (3.3.3)-(3.3.4)); b takes the same block's bias entry, alpha (1 + lambda/alpha). With alpha = 1 and
lambda -> 0 these are Algorithm 3's lines 12-13 exactly. alpha is fixed (``alpha=...``) or sec 3.4.2's heuristic
(``alpha=None``): alpha = max over the batch's examples i and outputs j of (dl_i/da_i)_j^2, per layer and batch.

What differs from the thesis:
- Algorithm 3 samples a separate mini-batch for the statistics (line 4); an optimizer sees only the batch it is
  given, so C comes from the batch of the refresh step. A layer first met after step 0 gets its C at once.
- C is kept as its eigendecomposition (line 7's inverse): the damping lambda/alpha changes with each batch under
  the heuristic alpha, and (alpha C + lambda I)^-1 is then a product, not a new factorisation.
- The 1/alpha and the damped bias entry above (Algorithm 3's lines show neither: for a fixed alpha, 1/alpha is the
  learning rate's; the heuristic's alpha changes per layer and batch, so it is applied as 3.4.2 says).
- Convolutions: "a standard MLP with the weight matrix sharing weight values between positions" (sec 1.4.2), so
  a conv layer is a linear layer on its KFC patches: rows are (example, location) pairs, h_bar the mean patch,
  C = (1/n) sum_{i,t} (p_it - h_bar)(p_it - h_bar)^T (the runtime's A convention, sum over locations), Delta the
  per-example gradient at each location. Grouped convolutions: one C per group; layers without a bias: W only.
- Parameters outside every Kronecker layer (norms, embeddings) and layers not reached by the batch take plain
  SGD, theta <- theta - lr grad, with the same learning rate. No momentum and no weight decay: the thesis has
  neither.

A step is atomic: a batch whose loss, gradient, covariance or update is not finite is skipped
(SkippedStepWarning, info["skipped"]) and leaves the weights and the optimizer's state as they were.
"""

from __future__ import annotations

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
from kronograph.runtime.input_action import LayerRows, gather_rows, mean_input
from kronograph.runtime.inverse import SkippedStepWarning, all_finite
from kronograph.runtime.losses import get_loss
from kronograph.runtime.methods.settings import check, resolve, setting
from kronograph.runtime.wbar import gather, scatter

Direction = dict[str, torch.Tensor]
_NO_VALUES = ("the thesis gives no value (sec 3.4.3, its experiments, has placeholder plots only; it tunes "
              "hyperparameters by its biased random search, sec 2.3)")


@dataclass(frozen=True)
class CenteredSGDSettings:
    """Algorithm 2's one setting."""

    lr: float = setting(1.0, f"learning rate lambda of Algorithm 2 (lines 5-6), also plain SGD's for parameters "
                        f"outside the Kronecker layers; {_NO_VALUES}: default the best of 0.3, 1, 2 on the digits MLP "
                        "of the tests after 60 steps (2 is better there but plain SGD diverges at 2)",
                        low=0, low_open=True)
    factor_dtype: torch.dtype = setting(torch.float32, "dtype of the centering's arithmetic, independent of the "
                                        "model's", choices=(torch.float32, torch.float64), cli=False)

    def __post_init__(self) -> None:
        check(self, "CenteredSGD")


@dataclass(frozen=True)
class ACPSettings:
    """Every ACP setting, with where it comes from."""

    lr: float = setting(1.0, f"learning rate lambda of Algorithm 3 (lines 12-13), also plain SGD's for parameters "
                        f"outside the Kronecker layers; {_NO_VALUES}: default the best of 0.1, 0.3, 1 (x damping "
                        "0.01, 0.1, 1, heuristic alpha) on the digits MLP of the tests after 60 steps",
                        low=0, low_open=True)
    damping: float = setting(0.1, f"Tikhonov lambda of sec 3.4.2, added to C as lambda/alpha; {_NO_VALUES}: "
                             "default chosen with lr on the digits MLP of the tests", low=0, low_open=True)
    alpha: float | None = setting(None, "alpha of F_in = A (x) alpha I (sec 3.3.3): a fixed value (tuned, sec "
                                  "3.4.2's first approach) or none/auto for sec 3.4.2's heuristic, the largest "
                                  "squared output gradient max_ij (dl_i/da_i)_j^2 per layer and batch (the "
                                  "thesis: 'worked very well experimentally')", low=0, low_open=True)
    inverse_every: int = setting(20, f"N of Algorithm 3: C is re-estimated and decomposed at updates k with "
                                 f"k % N == 0 (line 3); {_NO_VALUES}: default 20, K-FAC's inverse period",
                                 low=1)
    factor_dtype: torch.dtype = setting(torch.float32, "dtype of C, its decomposition and the preconditioned "
                                        "update, independent of the model's", choices=(torch.float32, torch.float64),
                                        cli=False)

    def __post_init__(self) -> None:
        check(self, "ACP")


# -- per-layer quantities from the captured rows -------------------------------------------------------------
def mean_layer_input(layer: Layer, rows: LayerRows, dtype: torch.dtype) -> torch.Tensor:
    """h_bar [groups, in]: the mean input row (patch for a convolution), without the homogeneous 1."""
    mean = mean_input(layer, rows, batch_size=rows.m, dtype=dtype).reshape(layer.groups, layer.a_dim)
    return mean[:, : layer.in_features]


def output_gradient_sum(layer: Layer, rows: LayerRows, dtype: torch.dtype) -> torch.Tensor:
    """sum over the rows of the captured dLoss/da [groups, out]: (1/n) sum_i Delta_i for a mean loss."""
    total = torch.zeros(layer.groups, layer.out_features, dtype=dtype)
    for site in rows.sites:
        if site.q is not None:
            total = total + site.q.sum(dim=1).to(dtype)
    return total


def input_covariance(layer: Layer, rows: LayerRows, dtype: torch.dtype) -> torch.Tensor:
    """C [groups, in, in] = (1/n) sum over the rows of (h - h_bar)(h - h_bar)^T (sec 3.4.2; for a convolution the
    rows are its patches, summed over locations)."""
    mean = mean_layer_input(layer, rows, dtype)
    c = torch.zeros(layer.groups, layer.in_features, layer.in_features, dtype=dtype)
    for site in rows.sites:
        centered = site.p[..., : layer.in_features].to(dtype) - mean[:, None, :]
        c = c + centered.transpose(1, 2) @ centered
    return c / rows.m


def heuristic_alpha(rows: LayerRows) -> float:
    """Sec 3.4.2's alpha: max over examples (and locations) i and outputs j of (dl_i/da_i)_j^2; the captured
    gradient of a mean loss over n examples is dl_i/da_i / n."""
    largest = 0.0
    for site in rows.sites:
        if site.q is not None and site.q.numel():
            largest = max(largest, float(site.q.abs().max()) * rows.m)
    return largest * largest


class CenteredSGD:
    """Centered gradient descent (Algorithm 2) for a compiled model, on either engine. ``seed`` is accepted so
    that every method takes the same arguments; the method draws no random numbers."""

    SUMMARY = "centered gradient descent (George's thesis, Algorithm 2): W updated with the centered inputs"
    Settings = CenteredSGDSettings
    PRESETS: dict[str, Any] = {"default": CenteredSGDSettings()}

    def __init__(self, compiled: CompiledModel, preset: str = "default", seed: int | None = None,
                 **settings: Any) -> None:
        refuse_data_parallel(type(self).__name__)
        self.settings = resolve(self.PRESETS, preset, settings, type(self).__name__)
        self.engine = make_engine(compiled, get_loss(compiled.loss))
        if not self.engine.parameters():
            raise KronographError(f"the model has no trainable parameters; nothing for {type(self).__name__} to train")
        self.layers = {layer.name: layer for layer in compiled.layers}
        self.steps = 0

    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
        """One update on the batch (x, y); returns {"loss": the mean loss before it}, and "skipped" (why) when the
        batch was not finite (weights and state unchanged)."""
        inputs = tuple(torch.as_tensor(t) for t in (x if isinstance(x, (tuple, list)) else (x,)))
        result = self.engine.gradient_pass(inputs, torch.as_tensor(y), capture=True)
        info: dict[str, Any] = {"loss": result.loss}
        if not math.isfinite(result.loss) or not all_finite(result.grads.values()):
            return self._skip(info, "non-finite loss or gradient")
        rows = self._gather(result.records or {}, inputs[0].shape[0])
        prepared = self._prepare(rows, info)
        if prepared is None:
            return self._skip(info, "non-finite input covariance")
        update = self._update(result.grads, rows, prepared, info)
        if not all_finite(update.values()):
            return self._skip(info, "non-finite update")
        self._commit(prepared)
        self.steps += 1
        self.engine.add_(update)
        return info

    def _skip(self, info: dict[str, Any], why: str) -> dict[str, Any]:
        warnings.warn(f"{type(self).__name__}: a batch with a {why} (NaN or Inf in its inputs or targets?) was "
                      "skipped; the weights and the optimizer's state are as before it", SkippedStepWarning,
                      stacklevel=3)
        return {**info, "skipped": f"{why}; the weights were left unchanged"}

    def _gather(self, records: Mapping[str, Sequence[Any]], n: int) -> dict[str, LayerRows]:
        """The rows (inputs or patches, output gradients) of every Kronecker layer the batch reached."""
        dtype = self.settings.factor_dtype
        return {name: gather_rows(self.layers[name], sites, n, None, dtype, with_gradient=True)
                for name, sites in records.items()
                if name in self.layers and any(site.g is not None for site in sites)}

    def _prepare(self, rows: Mapping[str, LayerRows], info: dict[str, Any]) -> Any:
        """The new state this batch brings (Algorithm 2: none); None when it is not finite."""
        return {}

    def _commit(self, prepared: Any) -> None:
        """Keep the state ``_prepare`` made, once the step is known to be finite."""

    def _layer_step(self, layer: Layer, centered: torch.Tensor, bias_grad: torch.Tensor, rows: LayerRows,
                    prepared: Any, info: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(W step, b step) before the learning rate: Algorithm 2 lines 5-6."""
        return centered, bias_grad

    def _update(self, grads: Mapping[str, torch.Tensor], rows: Mapping[str, LayerRows], prepared: Any,
                info: dict[str, Any]) -> Direction:
        """-lr times each layer's step; -lr grad for every other parameter; frozen parameters left out."""
        dtype, lr = self.settings.factor_dtype, self.settings.lr
        direction: Direction = {}
        for name, layer_rows in rows.items():
            layer = self.layers[name]
            w_bar = gather(layer, grads[layer.weight], grads.get(layer.bias) if layer.bias else None).to(dtype)
            bias_grad = output_gradient_sum(layer, layer_rows, dtype)  # = the bias's gradient when it has one
            mean = mean_layer_input(layer, layer_rows, dtype)
            # (1/n) sum_i Delta_i (h_i - h_bar)^T = grad_W - ((1/n) sum_i Delta_i) h_bar^T
            centered = w_bar[..., : layer.in_features] - bias_grad[:, :, None] * mean[:, None, :]
            w_step, b_step = self._layer_step(layer, centered, bias_grad, layer_rows, prepared, info)
            step = torch.cat([w_step, b_step[:, :, None]], dim=2) if layer.bias is not None else w_step
            weight, bias = scatter(layer, step)
            direction[layer.weight] = weight
            if bias is not None:
                direction[layer.bias] = bias
        params, frozen = self.engine.parameters(), self.engine.frozen()
        update = {}
        for name, grad in grads.items():
            if name in frozen:
                continue
            step = direction.get(name, grad)
            update[name] = (-lr * step).to(params[name].dtype)
        return update

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue bit for bit (Algorithm 2: the update count only)."""
        return {"steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.steps = int(state["steps"])
        except (KeyError, TypeError, ValueError) as error:
            raise KronographError(f"{type(self).__name__}: the optimizer state has no valid step count ({error}); "
                                  "it is from another method") from None


@dataclass
class Covariance:
    """One layer's C as its eigendecomposition C = Q diag(values) Q^T, per group: values [groups, in] (clamped at
    0), vectors [groups, in, in]."""

    values: torch.Tensor
    vectors: torch.Tensor

    @classmethod
    def of(cls, c: torch.Tensor) -> Covariance | None:
        """The decomposition of C; None when C or its decomposition is not finite."""
        if not all_finite([c]):
            return None
        try:
            values, vectors = torch.linalg.eigh((c + c.transpose(1, 2)) / 2)
        except RuntimeError:  # torch.linalg.LinAlgError: no convergence
            return None
        if not all_finite([values, vectors]):
            return None
        return cls(values.clamp_min(0), vectors)

    def solve(self, g: torch.Tensor, alpha: float, damping: float) -> torch.Tensor:
        """g (alpha C + damping I)^-1 for g [groups, out, in]: (1/alpha) g (C + (damping/alpha) I)^-1."""
        scaled = (g @ self.vectors) / (alpha * self.values + damping)[:, None, :]
        return scaled @ self.vectors.transpose(1, 2)


class ACP(CenteredSGD):
    """The amortized covariance preconditioner (Algorithm 3) for a compiled model, on either engine.
    ``ACP(cm)`` uses the heuristic alpha; ``ACP(cm, alpha=1.0)`` a fixed one (``ACPSettings`` documents all)."""

    SUMMARY = ("amortized covariance preconditioner (George's thesis, Algorithm 3): centered update times the "
               "damped inverse input covariance, re-estimated every N steps")
    Settings = ACPSettings
    PRESETS: dict[str, Any] = {"default": ACPSettings()}

    def __init__(self, compiled: CompiledModel, preset: str = "default", seed: int | None = None,
                 **settings: Any) -> None:
        super().__init__(compiled, preset, seed, **settings)
        self.covariances: dict[str, Covariance] = {}

    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
        """One update on the batch (x, y); returns {"loss": the mean loss before it, "refreshed": the layers whose
        C was re-estimated on this batch, "layer_alpha": {layer: the alpha used}}, and "skipped" (why) when the batch
        was not finite (weights and state unchanged)."""
        return super().step(x, y)

    def _prepare(self, rows: Mapping[str, LayerRows], info: dict[str, Any]) -> dict[str, Covariance] | None:
        """Lines 3-8: C of every layer at k % N == 0, and of a layer met for the first time."""
        due = self.steps % self.settings.inverse_every == 0
        fresh = {}
        for name, layer_rows in rows.items():
            if due or name not in self.covariances:
                covariance = Covariance.of(input_covariance(self.layers[name], layer_rows, self.settings.factor_dtype))
                if covariance is None:
                    return None
                fresh[name] = covariance
        info["refreshed"] = sorted(fresh)
        info["layer_alpha"] = {}
        return {**self.covariances, **fresh}

    def _commit(self, prepared: dict[str, Covariance]) -> None:
        self.covariances = prepared

    def _layer_step(self, layer: Layer, centered: torch.Tensor, bias_grad: torch.Tensor, rows: LayerRows,
                    prepared: dict[str, Covariance], info: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Lines 12-13 with sec 3.4.2's damped preconditioner: centered (alpha C + lambda I)^-1 for W,
        bias gradient / (alpha + lambda) for b."""
        alpha = self.settings.alpha if self.settings.alpha is not None else heuristic_alpha(rows)
        damping = self.settings.damping
        info["layer_alpha"][layer.name] = alpha
        return prepared[layer.name].solve(centered, alpha, damping), bias_grad / (alpha + damping)

    def state_dict(self) -> dict[str, Any]:
        """The update count and every layer's decomposed C (clones): enough to continue bit for bit."""
        return {"steps": self.steps,
                "layers": {name: {"values": c.values.clone(), "vectors": c.vectors.clone()}
                           for name, c in self.covariances.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned; a state of another model is refused."""
        owner = type(self).__name__
        if "layers" not in state or "steps" not in state:
            raise KronographError(f"{owner}: the optimizer state has no 'steps' or 'layers'; it is from another method")
        covariances = {}
        for name, entry in state["layers"].items():
            layer = self.layers.get(name)
            expected = None if layer is None else (layer.groups, layer.in_features)
            if layer is None or tuple(entry["values"].shape) != expected or \
                    tuple(entry["vectors"].shape) != (*expected, layer.in_features):
                raise KronographError(f"{owner}: the optimizer state's layer {name!r} does not fit this model; it is "
                                      "from another model")
            covariances[name] = Covariance(entry["values"].clone(), entry["vectors"].clone())
        self.steps = int(state["steps"])
        self.covariances = covariances
