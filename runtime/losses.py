"""The three losses, each with its Fisher: per-example loss, sampled targets and the curvature H of the output.

Per-example losses l_i (h = mean_i l_i), for model outputs s of shape [n, ...]:

- ``cross_entropy``: s is [n, C] or [n, ..., C] (logits, classes last), targets are int64 class indices of
  shape [n] or [n, ...]; l_i is the mean over positions of -log softmax(s)[y] (the usual token mean).
- ``sigmoid_cross_entropy``: targets in [0, 1] with the shape of s; l_i is the *sum* over the output units
  of the binary cross-entropy with logits, as in the K-FAC paper's autoencoders.
- ``mse``: l_i = 1/2 |s_i - t_i|^2 summed over the output units: the negative log-likelihood of a
  Gaussian with unit variance, so its Fisher is the identity on the outputs.

For each, H_i is the Hessian of l_i with respect to s_i (the Fisher of the predictive distribution in
its natural parameters): F = mean_i J_i^T H_i J_i is both the exact Fisher and the Gauss-Newton matrix.
``statistics_loss`` gives the loss whose backward feeds the K-FAC G factors: with targets sampled from
the model (``fisher="mc"``) its per-example gradients q_i satisfy E[q_i q_i^T] = H_i exactly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kronograph.errors import KronographError


class Loss(ABC):
    name: str
    #: whether the outputs are logits of a softmax or a sigmoid, whose saturation hides curvature from the Fisher
    #: (``logit_spread``)
    saturates: bool = False

    @abstractmethod
    def per_example(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """l_i for every example, shape [n]."""

    @abstractmethod
    def sample_targets(self, outputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution at ``outputs`` (paper sec 5)."""

    @abstractmethod
    def sampling_noise(self, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        """The random numbers ``sample_targets`` draws for outputs of ``shape`` and ``dtype``, drawn alone.

        Data-parallel K-FAC draws them for a sub-batch spread over ranks (every rank the whole, from the shared
        generator) and each rank makes its rows' targets with ``targets_from_noise``: the targets do not depend
        on the number of ranks. On the CPU generator the draws are those of ``sample_targets`` itself, bit for
        bit (tests/test_kfac_distributed.py); elsewhere they have the same distribution."""

    @abstractmethod
    def targets_from_noise(self, outputs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``sample_targets`` with its random numbers given (``sampling_noise``'s rows of these outputs)."""

    @abstractmethod
    def curvature(self, outputs: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u_i^T H_i v_i for every example, shape [n]; u and v have the shape of ``outputs``."""

    def curvature_gram_sum(self, outputs: torch.Tensor, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        """[k, k] matrix of sum_i t_a,i^T H_i t_b,i for the k tangents (each of the outputs' shape), in float64:
        the quadratic model's Gram. Here a pair at a time through ``curvature``; each built-in loss writes
        H_i = diag(w) - q q^T and forms its root once for all the pairs (one softmax, not k(k+1)/2)."""
        return _symmetric(len(tangents), lambda a, b: self.curvature(outputs, tangents[a], tangents[b]).double().sum(),
                          outputs.device)

    def logit_spread(self, outputs: torch.Tensor) -> torch.Tensor:
        """For each softmax of the outputs (a softmax's row; each output of a sigmoid, the softmax over (0, s)), the
        spread of a tensor of the outputs' shape that the loss can tell apart, max_c - min_c: the measure of a
        step's change of the outputs that ``max_logit_change`` bounds. Only the losses that ``saturates``."""
        raise NotImplementedError(f"{type(self).__name__} has no logits to bound")

    @abstractmethod
    def check_targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Raise KronographError when targets cannot go with these outputs."""

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """h without weight decay: the mean of the per-example losses."""
        return self.per_example(outputs, targets).mean()

    def positions(self, targets: Any) -> int:
        """Loss terms per example with a target of their own (sampled independently for the statistics):
        1 except for cross-entropy over positions (a sequence's tokens). Read from the targets' shape."""
        return 1

    def rounding_floor(self, targets: Any) -> float:
        """The float32 error an example's loss keeps however small the loss gets, in units of float32's roundoff
        2^-24 (runtime/damping.rounding_of_h): 0 where there is none (mse: the square of a small difference is
        exact to its own size). Read from the targets' shape."""
        return 0.0

    def statistics_scale(self, targets: Any) -> float:
        """The factor between ``statistics_loss`` and the loss: 1 except for cross-entropy over positions.

        Read from the targets' shape (a tensor or an array), so that engines without the outputs at hand
        (onnxruntime) scale their statistics the same way."""
        return 1.0

    def statistics_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A mean loss whose per-example gradients (times n) have second moment H_i under sampled targets.

        It equals the loss itself except for cross-entropy over T > 1 positions, where the token mean
        is replaced by a sum scaled by 1/sqrt(T): the positions' sampled targets are independent, so the
        gradient outer products then add up to H_i = (1/T) sum_t (diag p_t - p_t p_t^T).
        """
        return self(outputs, targets) * self.statistics_scale(targets)


class CrossEntropy(Loss):
    name = "cross_entropy"
    saturates = True

    def per_example(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, classes = outputs.shape[0], outputs.shape[-1]
        losses = F.cross_entropy(outputs.reshape(-1, classes), targets.reshape(-1), reduction="none")
        return losses.reshape(n, -1).mean(dim=1)

    def positions(self, targets: Any) -> int:
        return math.prod(targets.shape[1:])  # targets [n, positions...]: one label per position

    def statistics_scale(self, targets: Any) -> float:
        return math.sqrt(self.positions(targets))

    def rounding_floor(self, targets: Any) -> float:
        # a log-sum-exp minus the label's logit: near a perfect fit a multiple of 2^-24 (the positions' mean too)
        return 1.0

    def sample_targets(self, outputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One class a row by inverting its softmax's cumulative sum at one uniform draw: torch.multinomial draws an
        exponential for every class, this one number a row (CPU-2: 128 rows of 2048 classes 7.5 -> 0.6 ms, 5 ms
        of a word LM's 109 ms step; 1024 rows of a 50257-word vocabulary 1.95 -> 0.37 s; BENCHMARKS.md)."""
        if generator is None:  # torch's global generator of the outputs' device
            noise = torch.rand((*outputs.shape[:-1], 1), dtype=torch.float64, device=outputs.device)
        else:
            noise = self.sampling_noise(outputs.shape, outputs.dtype, generator)
        return self.targets_from_noise(outputs, noise)

    def sampling_noise(self, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        # one uniform number a row (the class axis kept, of size 1)
        shape = torch.Size((*shape[:-1], 1))
        return torch.rand(shape, dtype=torch.float64, device=generator.device, generator=generator)

    def targets_from_noise(self, outputs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # The first class whose cumulative weight exp(s - max s) exceeds u times the row's total (u < 1, so one
        # always does; a class of weight 0 never: its cumulative sum equals the one before it); summed in float64,
        # no normalised probabilities formed. A row with a non-finite output gets some class in range: its
        # gradient is not finite, so the statistics refuse it (factors.fold_factors_).
        classes = outputs.shape[-1]
        logits = outputs.detach().reshape(-1, classes)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        cumulative = torch.cumsum(torch.exp(logits - logits.max(dim=-1, keepdim=True).values), dim=-1,
                                  dtype=torch.float64)
        drawn = noise.reshape(-1, 1).to(torch.float64) * cumulative[:, -1:]
        chosen = torch.searchsorted(cumulative, drawn, right=True).clamp_(max=classes - 1)
        return chosen.reshape(outputs.shape[:-1])

    def curvature(self, outputs: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(outputs, dim=-1)
        per_position = (p * u * v).sum(-1) - (p * u).sum(-1) * (p * v).sum(-1)
        return per_position.reshape(outputs.shape[0], -1).mean(dim=1)

    def curvature_gram_sum(self, outputs: torch.Tensor, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        # H = (diag p - p p^T) / positions: t_a^T H t_b = sum_c p_c (t_a - <p, t_a>)_c (t_b - <p, t_b>)_c, each row's
        # tangents centred on their mean under p first, so nothing cancels and the outputs' own float32 holds the
        # products (the sums are float64). In chunks of rows that stay in cache: whole-batch float64 temporaries
        # were 107 ms of memory traffic a Gram for 2048 sequence positions of 2048 classes, 21 ms this way.
        classes = outputs.shape[-1]
        dtype = torch.promote_types(outputs.dtype, torch.float32)
        flat, rows = outputs.reshape(-1, classes), [t.reshape(-1, classes) for t in tangents]
        gram = torch.zeros(len(tangents), len(tangents), dtype=torch.float64, device=outputs.device)
        chunk = max(1, _CHUNK_ENTRIES // classes)
        for start in range(0, flat.shape[0], chunk):
            p = torch.softmax(flat[start:start + chunk].to(dtype), dim=-1)
            t = torch.stack([r[start:start + chunk].to(dtype) for r in rows], dim=1)  # [rows, k, classes]
            centred = (t - t @ p[:, :, None]) * p.sqrt()[:, None, :]
            gram += (centred @ centred.transpose(1, 2)).sum(dim=0, dtype=torch.float64)
        return gram / math.prod(outputs.shape[1:-1])

    def logit_spread(self, outputs: torch.Tensor) -> torch.Tensor:
        # softmax is blind to a shift common to a row: the measure is the spread max_c - min_c of a row
        rows = outputs.detach().reshape(-1, outputs.shape[-1])
        return rows.amax(dim=-1) - rows.amin(dim=-1)

    def check_targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise KronographError(
                f"cross_entropy needs integer class labels, got {targets.dtype}; convert the labels to int64"
            )
        if tuple(targets.shape) != tuple(outputs.shape[:-1]):
            if outputs.dim() > 2 and tuple(targets.shape) == (outputs.shape[0], *outputs.shape[2:]):
                raise KronographError(
                    f"labels of shape {tuple(targets.shape)} fit model outputs {tuple(outputs.shape)} with the classes "
                    "on dim 1 (F.cross_entropy's layout for images and sequences); cross_entropy here takes them on "
                    "the last dim: compile with output=lambda out: out.movedim(1, -1) (or return them last from the "
                    "model's forward)"
                )
            raise KronographError(
                f"labels of shape {tuple(targets.shape)} do not fit model outputs {tuple(outputs.shape)}; "
                f"cross_entropy needs one label per output row (shape {tuple(outputs.shape[:-1])})"
            )
        classes = outputs.shape[-1]
        low, high = _extremes(targets)
        if low < 0 or high >= classes:
            raise KronographError(
                f"labels range over [{low}, {high}] but the model has {classes} "
                f"classes; labels must lie in [0, {classes - 1}]"
            )


class SigmoidCrossEntropy(Loss):
    name = "sigmoid_cross_entropy"
    saturates = True

    def per_example(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype), reduction="none")
        return losses.reshape(outputs.shape[0], -1).sum(dim=1)

    def rounding_floor(self, targets: Any) -> float:
        return float(math.prod(targets.shape[1:]))  # one log(1 + e^-|s|) term, rounded on its own, per output

    def sample_targets(self, outputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = torch.sigmoid(outputs.detach())
        return torch.bernoulli(torch.nan_to_num(p, nan=0.5), generator=generator)  # NaN outputs: see CrossEntropy

    def sampling_noise(self, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(shape, dtype=dtype, device=generator.device, generator=generator)  # bernoulli's: u < p

    def targets_from_noise(self, outputs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        p = torch.nan_to_num(torch.sigmoid(outputs.detach()), nan=0.5)
        return (noise < p).to(p.dtype)

    def curvature(self, outputs: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(outputs)
        return (p * (1 - p) * u * v).reshape(outputs.shape[0], -1).sum(dim=1)

    def curvature_gram_sum(self, outputs: torch.Tensor, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        p = torch.sigmoid(outputs.double())
        root = (p * (1 - p)).sqrt()
        return _pairs([(root * t).reshape(-1) for t in tangents])

    def logit_spread(self, outputs: torch.Tensor) -> torch.Tensor:
        # each output is the softmax over the logits (0, s): their spread is |s|
        return outputs.detach().abs().reshape(-1)

    def check_targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        _same_shape(self.name, outputs, targets)
        low, high = _extremes(targets)
        if low < 0 or high > 1:
            raise KronographError("sigmoid_cross_entropy needs targets in [0, 1]; rescale the data (for images: / 255)")


class MeanSquaredError(Loss):
    name = "mse"

    def per_example(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * (outputs - targets.to(outputs.dtype)).pow(2).reshape(outputs.shape[0], -1).sum(dim=1)

    def sample_targets(self, outputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device)
        return outputs.detach() + noise

    def sampling_noise(self, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)

    def targets_from_noise(self, outputs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return outputs.detach() + noise

    def curvature(self, outputs: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u * v).reshape(outputs.shape[0], -1).sum(dim=1)

    def curvature_gram_sum(self, outputs: torch.Tensor, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        return _pairs([t.reshape(-1) for t in tangents])

    def check_targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        _same_shape(self.name, outputs, targets)


#: entries of a chunk of output rows in the cross-entropy Gram: a few [rows, classes] temporaries stay in cache.
_CHUNK_ENTRIES = 1 << 17


def _symmetric(k: int, entry: Callable[[int, int], torch.Tensor], device: torch.device | None) -> torch.Tensor:
    """[k, k] float64 matrix whose (a, b) and (b, a) entries are ``entry(a, b)``, each pair computed once."""
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    for a in range(k):
        for b in range(a, k):
            gram[a, b] = gram[b, a] = entry(a, b)
    return gram


def _pairs(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[k, k] matrix of the vectors' dot products in float64 (no [k, n] stack: an LM's outputs are large)."""
    return _symmetric(len(vectors), lambda a, b: torch.dot(vectors[a].double(), vectors[b].double()),
                      vectors[0].device if vectors else None)


def _extremes(targets: torch.Tensor) -> tuple[float, float]:
    """(min, max) of the targets, read by the host at once (one synchronisation on a GPU); (0, 0) when empty."""
    if not targets.numel():
        return 0, 0
    return tuple(torch.stack([targets.min(), targets.max()]).tolist())


def _same_shape(name: str, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    if not targets.dtype.is_floating_point:
        raise KronographError(f"{name} needs floating-point targets, got {targets.dtype}; convert them to float32")
    if tuple(targets.shape) != tuple(outputs.shape):
        raise KronographError(
            f"targets of shape {tuple(targets.shape)} do not match model outputs {tuple(outputs.shape)} for {name}"
        )


LOSSES: dict[str, Loss] = {loss.name: loss for loss in (CrossEntropy(), SigmoidCrossEntropy(), MeanSquaredError())}


def get_loss(name: str) -> Loss:
    if name not in LOSSES:
        raise KronographError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
