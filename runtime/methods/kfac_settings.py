"""K-FAC's settings as one typed frozen dataclass, and the two named presets users choose between.

- ``"default"``: the recommended first try on any model (issue 10): lambda starts from the curvature's own scale (so
  the loss's reduction and the batch size do not decide it), Levenberg-Marquardt every step and the gamma rule every
  5 steps (10, then 20 once gamma has settled), both with moves that grow while the verdict stays the same (up to
  omega^8), inverses also refreshed when gamma has moved by 2x, steps that make h worse undone, and sub-batches
  never smaller than the paper's own advice for small batches (sec 8: tau_2 = 1), and the quadratic model's
  coefficients bounded: K-FAC's proposal and the unmatched parameters' gradient step never taken uphill, the
  momentum coefficient in [0, 2] (a free one fits a small batch's noise), no example's softmax (or sigmoid) logits
  moved by more than the larger of 10 nats and their own spread (at most the first step's largest; linearised) in
  one step (the Fisher cannot see a class of probability ~0 rise), an ill-conditioned system (nearly parallel
  directions) solved without one of them, and gamma's damping of A applied in coordinates centred on the layer's
  mean input (sigmoid units near 1/2 no longer hide their variation under a damping sized by their mean; the paper's
  sec 10 invariance kept under damping), each factor's damping at least a thousandth of its mean eigenvalue (the
  gamma rule once drove a deep tanh net's gamma to 1e-7 of its scale: steps that fit one batch and undid the others,
  Cholesky failing at float32's rounding), and the parameters outside every block (norms, embeddings) stepping along
  RMSprop's shape of their gradient, and the update shortened by (1 + s) / 2 where s, the share of signal in the
  batch's natural gradient, says the quadratic model's step fits the mini-batch's noise (``signal_scaling``; a batch
  of one, which cannot be halved, counts as all noise) and the momentum coefficient at most 1 on batches of fewer
  than 8 loss terms, the statistics of a batch no larger than their floor taken on the gradient's own forward (one
  forward a step less), and the gamma rule's rounds skipped while s is below 0.1 (gamma kept: the candidates' fit to
  a batch that is noise ranks the noise), and the quadratic model's products by one-sided differences where the
  model calls attention, group or instance norm, a recurrent layer or a convolution, central ones with batch norm in
  training mode (forward mode needs attention's math kernel, a normalisation's tangent is many passes over the
  activations, a recurrent layer's leaves its fused kernel, a convolution's is two convolutions:
  runtime/tangent_cost.py), and embedding tables wider than 1024 rows given blocks whose A is kept as its diagonal
  (one-hot inputs make it exactly diagonal; a word vocabulary's dense A would be rows^2), their gamma scaled
  towards the typical block's damping relative to its scale (a table's A counts rows read, so its scale falls
  with the vocabulary and one gamma damps a word table 16-50x harder than the rest), and a table tied to an
  output layer one block over both uses (runtime/tied.py), and a weight-normed layer a block on its computed weight
  (runtime/weight_norm.py).
- ``"paper"``: Martens & Grosse (2015) sec 13 exactly (lambda = 150, T1 = 5, T2 = T3 = 20, tau_1 = 1/8,
  tau_2 = 1/4, the three-candidate gamma rule), the algorithm the dense-maths tests pin down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from kronograph.errors import KronographError
from kronograph.runtime.distributed import COMMUNICATION_DTYPES
from kronograph.runtime.methods.settings import check, setting

_UNIT = dict(low=0, high=1, low_open=True)  # a fraction of the batch, (0, 1]
_DECAY = dict(low=0, high=1, high_open=True)


def parse_momentum(value: Any) -> str | float | None:
    """K-FAC's momentum as text or value: "qmodel" (sec 7), "none" or a heavy-ball coefficient in [0, 1)."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        text = str(value).strip().lower()
        if text in ("qmodel", "none"):
            return None if text == "none" else "qmodel"
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"momentum {value!r} is not qmodel, none or a number") from None
    if number is not None and not 0 <= number < 1:
        raise ValueError(f"momentum {number} must lie in [0, 1)")
    return number


@dataclass(frozen=True)
class KFACSettings:
    """Every K-FAC setting; ``KFAC``'s docstring says more of what each one does."""

    lr: float = setting(1.0, "Multiplies the re-scaled update (1 is the paper's algorithm).", low=0, low_open=True)
    damping: float | None = setting(None, "Initial Tikhonov damping lambda (auto: relative_damping times the "
                                    "curvature's mean eigenvalue at step 1).", low=0)
    relative_damping: float = setting(1.0, "Initial lambda / mean eigenvalue of the factored Fisher, when damping "
                                      "is auto.", low=0, low_open=True)
    factor_damping: float | None = setting(None, "Factored-Tikhonov strength gamma (auto: sqrt(lambda + eta)).",
                                           low=0, low_open=True)
    weight_decay: float = setting(0.0, "l2 coefficient eta of the objective.", low=0)
    ema_decay: float | None = setting(None, "Fixed EMA decay of the factors (auto: the paper's min(1 - 1/k, 0.95)).",
                                      **_DECAY)
    fisher: str = setting("mc", "Fisher targets: mc (sampled from the model) or empirical (the labels).",
                          choices=("mc", "empirical"))
    stats_fraction: float = setting(1 / 8, "Fraction tau_1 of the batch for the statistics.", **_UNIT)
    qmodel_fraction: float = setting(1 / 4, "Fraction tau_2 of the batch for the exact-Fisher products.", **_UNIT)
    shared_statistics_forward: bool = setting(True, "Where the statistics take the whole batch, run their sampled "
                                              "targets' backward on the gradient's own forward (one forward a step "
                                              "saved; off: a pass of their own, the paper's).")
    min_stats_examples: int = setting(64, "Floor of the statistics' sub-batch in loss terms (a sequence of T "
                                      "tokens counts T).", low=1)
    min_qmodel_examples: int = setting(256, "Floor of the exact-Fisher products' sub-batch in examples (sec 8).",
                                       low=1)
    batches_per_step: int | None = setting(None, "Gather N of the caller's batches and take one step on their "
                                           "union: the step's mini-batch is then N batches (sec 13 takes 1000 "
                                           "examples and more; K-FAC's step is worth more on a larger batch, and its "
                                           "own algebra costs the same); the calls between return their batch's "
                                           "loss without a step. Batches whose shapes do not stack end a gathering "
                                           "early (auto: N = sqrt(B / n), at most 16, B the gradient's noise scale "
                                           "in K-FAC's metric from the share of signal s, n the caller's batch; one "
                                           "batch a step without signal_scaling).", low=1)
    stats_every: int = setting(1, "Refresh the factor statistics every N steps.", low=1)
    inverse_every: int = setting(20, "Recompute the damped inverses every N steps (T_3).", low=1)
    momentum: str | float | None = setting("qmodel", "qmodel (sec 7), none, or a heavy-ball coefficient with "
                                           "--no-rescale (none when re-scaling is off and momentum is not given).",
                                           parse=parse_momentum)
    rescale: bool = setting(True, "Re-scale the update by the exact Fisher (sec 6.4).")
    adapt_damping: bool | None = setting(None, "Adapt lambda (sec 6.5; auto: on with re-scaling).")
    adapt_gamma: bool | None = setting(None, "Adapt gamma (sec 6.6; auto: on with re-scaling).")
    damping_every: int = setting(1, "Levenberg-Marquardt update of lambda every N steps (T_1).", low=1)
    gamma_every: int = setting(5, "Try the gamma candidates every N steps (T_2).", low=1)
    max_gamma_every: int | None = setting(20, "Double the gamma rule's interval after each round that keeps gamma "
                                          "or reverses its last move, up to N steps (auto: always gamma_every, the "
                                          "paper's).", low=1)
    gamma_rule_min_signal: float | None = setting(0.1, "Skip the gamma rule's rounds while the share of signal s "
                                                  "is below this: the candidates would be ranked by how well they fit "
                                                  "the batch's noise (auto: a round whatever s).", low=0, high=1)
    lm_acceleration: int = setting(8, "Largest power of omega one LM move or gamma candidate may take after "
                                   "equal verdicts (1: the paper's rules).", low=1)
    refresh_ratio: float | None = setting(2.0, "Also refresh the inverses when gamma has moved by this factor "
                                          "(auto: never).", low=1, low_open=True)
    reject_steps: bool = setting(True, "Undo steps that make the objective much worse, raise lambda, go on.")
    keep_damping_at_rounding: bool = setting(True, "Keep lambda and gamma when a step changed h, and was predicted "
                                             "to, by no more than h's float32 rounding (a fitted batch: rho is noise "
                                             "there), and undo no step for a rise below it.")
    reject_rho: float | None = setting(None, "Also undo a step whose rho is below this (auto: judge by h's rise "
                                       "alone, which wins on the first-try suite).")
    reject_rise: float = setting(0.25, "A step that raises h by more than this times |h| is undone.", low=0)
    reject_damping_floor: float | None = setting(1.0, "After an undone step lambda is at least this times the "
                                                 "curvature's mean eigenvalue now (auto: the LM rule's rise alone).",
                                                 low=0, low_open=True)
    descent_only: bool = setting(True, "Never take K-FAC's proposal or the unmatched gradient step uphill in the "
                                 "quadratic model.")
    unmatched_backoff: int | None = setting(8, "When the quadratic model has given the unmatched parameters' step "
                                            "a zero coefficient N times in a row, leave that direction out of the "
                                            "model for the next N steps, then try it again (one forward a step "
                                            "fewer; auto: in the model every step).", low=1)
    unmatched_adam_lr: float | None = setting(None, "When the quadratic model leaves the parameters outside every "
                                              "block where they are (their coefficient 0, or their direction left "
                                              "out), give them Adam's step at this learning rate instead (moments "
                                              "0.9 / 0.999, bias-corrected; auto: no step, the default for now).",
                                              low=0, low_open=True)
    untrusted_rho: float | None = setting(0.1, "Judge the quadratic model once, on the median rho of its first "
                                          "untrusted_steps steps that measure rho: below this it is untrusted (it "
                                          "does not describe the loss), which UntrustedModelWarning says, and "
                                          "untrusted_fallback's steps follow (auto: never judged, with or without "
                                          "batch norm). The first-try suite's medians are 0.41-1.20 (0.41-0.50: "
                                          "the dropout CNN, whose model's products draw fresh masks).", low=0,
                                          low_open=True)
    untrusted_rho_batch_norm: float | None = setting(0.5, "untrusted_rho for a model with batch norm, whose "
                                                     "curvature misses the coupling of the batch's examples: less "
                                                     "than half of each predicted decrease comes (torchvision's "
                                                     "ResNet-18 0.40-0.46, MobileNetV3 0.32-0.43, RegNet and "
                                                     "ShuffleNet 0.03-0.07; the suite's batch-norm nets 0.78-0.95; "
                                                     "auto: untrusted_rho's).", low=0, low_open=True)
    untrusted_steps: int = setting(20, "How many steps that measured rho the judgement of untrusted_rho takes.",
                                   low=1)
    untrusted_fallback: str = setting("auto", "The first-order steps that follow once the quadratic model is judged "
                                      "untrusted (untrusted_rho, untrusted_rho_batch_norm), in place of K-FAC steps "
                                      "that buy too little for their cost: sgd (Nesterov momentum 0.9, "
                                      "untrusted_sgd_lr), adam (untrusted_adam_lr) or auto: sgd on a model with batch "
                                      "norm (on torchvision's nets ahead of Adam's steps on three of four, level on "
                                      "ResNet-18), adam on any other (its rate is closer to scale-free).",
                                      choices=("auto", "sgd", "adam"))
    untrusted_adam_lr: float | None = setting(1e-3, "Learning rate of untrusted_fallback's Adam (moments 0.9 / "
                                              "0.999; auto: K-FAC steps throughout where Adam's would follow, the "
                                              "paper's).", low=0, low_open=True)
    untrusted_sgd_lr: float | None = setting(0.01, "Learning rate of untrusted_fallback's SGD with Nesterov momentum "
                                             "0.9 (auto: K-FAC steps throughout where SGD's would follow, the "
                                             "paper's).", low=0, low_open=True)
    max_momentum: float | None = setting(2.0, "Keep the quadratic model's momentum coefficient mu in [0, "
                                         "max_momentum] (auto: free, the paper's).", low=0, low_open=True)
    unit_momentum_below: int | None = setting(8, "Keep mu at most 1 on batches of fewer than N loss terms (a sequence "
                                              "of T tokens counts T): a step longer than the last update, fitted to "
                                              "a few examples, repeats their noise (auto: max_momentum alone).", low=1)
    bound_model_decrease: bool = setting(True, "Shorten a step whose quadratic model predicts h to fall by more "
                                         "than 4 h (h >= 0: its rho would be below 1/4 whatever it did) to "
                                         "predict that fall (off: the paper's).")
    max_logit_change: float | None = setting(10.0, "Shorten a step whose linearised change of any example's "
                                             "softmax or sigmoid logits (their spread, max - min) exceeds this "
                                             "many nats or, if larger, the spread of its logits now (at most the "
                                             "largest of the first step's), to that change (auto: no bound, the "
                                             "paper's).", low=0, low_open=True)
    factor_damping_floor: float = setting(1e-3, "Floor of each Kronecker factor's damping, as a fraction of the "
                                          "factor's mean eigenvalue (0: none, the paper's).", low=0)
    output_noise_damping: bool = setting(True, "Damp the output layer's G by at least (1 - s) times one of the "
                                         "batch's rows' share of its trace, s the share of signal in the batch's "
                                         "natural gradient (needs signal_scaling; off: the paper's).")
    activation_rows: int | None = setting(1024, "Form a layer's A from at most N of its activation rows per "
                                          "statistics update, a random subset weighted to stay unbiased, where "
                                          "it has more rows than examples (conv patches, tokens; a conv's other "
                                          "patches are never formed); G keeps every row (auto: every row, the "
                                          "paper's).", low=1)
    max_kronecker_dim: int | None = setting(8192, "A layer with a factor wider than this gets no Kronecker block: "
                                            "its parameters step as those outside every block (auto: every "
                                            "matched layer has one, the paper's).", low=1)
    diagonal_wide_g: bool = setting(False, "Give any linear layer whose G alone is wider than max_kronecker_dim a "
                                    "block with G kept as its diagonal (off: it gets no block; an output layer's G is "
                                    "diagonal_output_g's). Data-parallel and FSDP2 too; diagonal structure.")
    diagonal_output_g: int | None = setting(1024, "Keep the G of an output layer (a linear layer the loss is put on: "
                                            "a classifier's, a tagger's, a language model's head, tied or not) wider "
                                            "than this as its diagonal: the output Fisher of a softmax is diag(p) - "
                                            "p p^T, of a sigmoid or squared error diagonal; the step's cost grows "
                                            "as the classes, not their square (auto: dense, the paper's). "
                                            "Data-parallel and FSDP2 too; diagonal structure.", low=1)
    max_factor_dim: int | None = setting(1024, "Invert a Kronecker factor wider than this as block-diagonal, "
                                         "in contiguous diagonal blocks of at most this width (auto: whole, the "
                                         "paper's).", low=1)
    table_blocks: bool = setting(True, "Give embedding tables wider than 1024 rows (a word vocabulary) Kronecker "
                                 "blocks with a diagonal A, the count of each row's reads (off: they step as "
                                 "parameters outside every block, the paper's). Data-parallel and FSDP2 too; "
                                 "diagonal structure.")
    tied_blocks: bool = setting(True, "Give an embedding table tied to an output layer (GPT-2's head) one Kronecker "
                                "block over both uses, their Kronecker products summed and inverted exactly (off: it "
                                "steps as the parameters outside every block, the paper's). Both engines, "
                                "data-parallel and FSDP2 too, diagonal structure.")
    weight_norm_blocks: bool = setting(True, "Give a layer whose weight is computed by weight norm (W = g v / |v|, "
                                       "PyTorch's weight_norm) a Kronecker block on W, the step pulled back to g "
                                       "and v (off: they step as the parameters outside every block, the paper's). "
                                       "Both engines, data-parallel and FSDP2 too, diagonal structure.")
    spectral_norm_blocks: bool = setting(True, "Give a layer whose weight is computed by spectral norm (W = W_o / "
                                         "sigma, PyTorch's spectral_norm) a Kronecker block on W, the step pulled "
                                         "back to W_o (off: W_o steps as the parameters outside every block, the "
                                         "paper's). The torch engine, not FSDP2, diagonal structure.")
    relative_table_damping: bool = setting(True, "Scale a table's gamma (an embedding or bag wider than 1024 rows) "
                                           "by sqrt(s / S), s = sqrt(mean eig A x mean eig G) its block's scale "
                                           "and S the other blocks' geometric mean: one gamma damps a word table "
                                           "16-50x harder relative to its scale than the rest (off: one gamma for "
                                           "all, the paper's). Block-diagonal structure.")
    centered_damping: bool = setting(True, "Damp A in coordinates centred on the layer's mean input (sec 10's "
                                     "invariance kept under damping).")
    unmatched_direction: str = setting("fisher", "Direction of the parameters outside every block, its length the "
                                       "quadratic model's: fisher (the diagonal of the sampled Fisher, from the "
                                       "statistics' backward, also in K-FAC's proposal), rms (RMSprop's shape) "
                                       "or gradient.",
                                       choices=("fisher", "rms", "gradient"))
    signal_scaling: bool = setting(True, "Shorten the update by (1 + s) / 2, s the share of signal in the batch's "
                                   "natural gradient.")
    signal_every: int = setting(4, "Measure the share of signal s on every Nth step (the gradient as two halves' "
                                "and a second solve, of their difference; its EMAs' decay taken to the Nth power).",
                                low=1)
    fisher_products: str = setting("auto", "The quadratic model's J d: forward (forward mode, exact), "
                                   "differences (central: two plain forwards a direction), one-sided (one a "
                                   "direction beside a shared forward; the cheapest) or auto (one-sided where "
                                   "the model calls attention, group or instance norm, a recurrent layer or a "
                                   "convolution, central with batch norm in training mode: their tangents are dear "
                                   "in forward mode; forward mode elsewhere).",
                                   choices=("auto", "forward", "differences", "one-sided"))
    max_condition: float | None = setting(1e8, "Drop a direction of the quadratic model when its scaled system is "
                                          "worse conditioned than this (auto: only when singular).", low=1)
    min_damping: float = setting(1e-8, "Floor of lambda.", low=0)
    factor_dtype: torch.dtype = setting(torch.float32, "dtype of factors and inverses.", cli=False)
    communication_dtype: str | None = setting(None, "dtype the factors are all-reduced in across data-parallel "
                                              "ranks: bfloat16 or float16 halve float32's bytes (auto: the factors' "
                                              "dtype).", choices=COMMUNICATION_DTYPES)
    structure: str = setting("diagonal", "Inverse structure: diagonal (sec 4.2) or tridiagonal (sec 4.3).",
                             choices=("diagonal", "tridiagonal"))

    def __post_init__(self) -> None:
        check(self, "KFAC")
        try:
            parse_momentum(self.momentum)
        except ValueError as error:
            raise KronographError(f"KFAC: {error}; choose 'qmodel', a float in [0, 1) or None") from None
        if self.momentum == "qmodel" and not self.rescale:
            raise KronographError("KFAC: momentum='qmodel' needs rescale=True; pass a float for heavy-ball momentum "
                                  "(--momentum 0.9 with --no-rescale) or none")
        if isinstance(self.momentum, float) and self.rescale:
            raise KronographError(f"KFAC: momentum={self.momentum} is heavy-ball momentum, which K-FAC takes only "
                                  "with rescale=False (--no-rescale); with re-scaling use 'qmodel' (the paper's) or none")
        adapting = self.adapt_damping or self.adapt_gamma
        if adapting and not self.rescale:
            raise KronographError("KFAC: adapting lambda or gamma needs rescale=True (both use the exact-F quadratic model)")

    def complete(self, given: dict[str, Any]) -> dict[str, Any]:
        """The given settings, completed: without re-scaling there is no quadratic model for momentum, so a
        preset's "qmodel" becomes none unless momentum was asked for."""
        if not given.get("rescale", self.rescale) and "momentum" not in given and self.momentum == "qmodel":
            return {**given, "momentum": None}
        return given


PRESETS: dict[str, KFACSettings] = {
    "default": KFACSettings(),
    "paper": KFACSettings(
        damping=150.0, min_stats_examples=1, min_qmodel_examples=1, damping_every=5, gamma_every=20,
        max_gamma_every=None, lm_acceleration=1, refresh_ratio=None, reject_steps=False,
        keep_damping_at_rounding=False,
        descent_only=False, max_momentum=None, max_condition=None, centered_damping=False, factor_damping_floor=0.0,
        relative_table_damping=False,
        activation_rows=None, max_factor_dim=None, max_kronecker_dim=None, diagonal_output_g=None,
        output_noise_damping=False,
        reject_damping_floor=None,
        bound_model_decrease=False, max_logit_change=None, unit_momentum_below=None, gamma_rule_min_signal=None,
        shared_statistics_forward=False, table_blocks=False, tied_blocks=False, weight_norm_blocks=False,
        spectral_norm_blocks=False,
        unmatched_direction="gradient", signal_scaling=False, fisher_products="forward", unmatched_backoff=None,
        untrusted_adam_lr=None, untrusted_sgd_lr=None, batches_per_step=1,
    ),
}
SETTING_NAMES = tuple(field.name for field in dataclasses.fields(KFACSettings))
