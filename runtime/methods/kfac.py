"""K-FAC (Martens & Grosse 2015, Algorithm 2) with the paper's damping scheme, on either engine.

The passes over the model come from an engine (``engines.torch.TorchEngine``: the user's own module;
``engines.onnxruntime_passes.OnnxRuntimePasses``: an ONNX graph on onnxruntime-training); everything
else is shared. One ``step(x, y)``:
1. statistics (every ``stats_every`` steps): a forward pass on a random fraction tau_1 of the batch,
   targets sampled from the model (``fisher="mc"``) or the labels, a backward pass of that loss;
   the factors' EMAs take the mini-batch factors (decay min(1 - 1/k, 0.95) unless ``ema_decay`` is set);
2. the gradient of h = mean loss + eta/2 |theta|^2 on the whole batch (a plain forward and backward; with
   ``signal_scaling`` one on each half of the batch, whose difference measures the gradient's noise);
3. damped inverses with strength gamma (steps 1-3 and every ``inverse_every``; every ``gamma_every`` steps, up
   to every ``max_gamma_every`` once gamma has settled, for the three candidates gamma, omega2 gamma and
   gamma / omega2, keeping the one whose update lowers the quadratic model most, sec 6.6);
4. the proposal Delta = -F^-1 grad h per layer; the unmatched parameters' direction is -grad h (the default
   preset divides it by the root of an EMA of grad^2, RMSprop's shape);
5. re-scaling and momentum (6.4, 7): the coefficients of Delta, of the unmatched direction and of the
   previous update minimise M(delta) with the exact Fisher on a fraction tau_2 of the batch;
   without re-scaling: delta = Delta (+ heavy-ball momentum) times lr;
6. theta += lr * delta (lr = 1 is the paper's algorithm; ``signal_scaling`` shortens it by (1 + s) / 2), then
   every ``damping_every`` steps the Levenberg-Marquardt rule moves lambda by omega1 = (19/20)^T1 from
   rho = (h(theta+delta) - h) / (M(delta) - M(0)) (by up to omega1^lm_acceleration while rho keeps its verdict),
   and a step that made h much worse is undone.
Where the median rho of the first 20 steps that measured it is below 0.1, or 1/2 on a model with batch norm
(``untrusted_steps``, ``untrusted_rho``, ``untrusted_rho_batch_norm``: the model does not describe the loss, as on
deep nets with batch norm in training mode), KFAC says so and the default preset steps on with SGD with Nesterov
momentum on a model with batch norm, Adam on any other (``untrusted_fallback``).
Non-finite losses, gradients or coefficients never reach the weights: the step is skipped and reported. A step
is atomic: a batch that raises (targets that do not fit, checked every step) or whose loss or gradient is not
finite leaves the weights and the whole optimizer state as they were.
The settings come from a preset (runtime/methods/kfac_settings.py): "default", the first try on any model, or "paper".

Devices: every tensor of a step (batch, factors, inverses, generator, temporaries, the quadratic model's small
matrices) is made on the model's device, factors and inverses in ``factor_dtype`` whatever the model's dtype
(tests/test_device_placement.py). Host synchronisations per step, the scalars the host's decisions need:
- the batch's loss (one per gradient pass: two with signal scaling's halves), the label range check (one),
  and whether the gradient is finite (one, ``inverse.all_finite``);
- statistics: per layer, the largest entry of the batch's rows (the overflow guard of ``fold_factors_``); with
  parameters outside every block (``unmatched_direction="fisher"``), whether their diagonal's estimate is finite
  (one; data-parallel, after one all_reduce that pools the ranks' gradients);
- the quadratic model: its k x k matrices copied to the host at once (one per gamma candidate), where the
  coefficients alpha, mu (and the unmatched scale) and M(delta) - M(0) are solved for;
- signal scaling: g^T F^-1 g and g_A^T F^-1 g_B (one); whether the update is finite (one);
- the damping rule, when it runs: h after the step for rho (one); with weight decay, |theta|^2 (one per h);
- steps that refresh the inverses: per layer, whether a group failed (one; its warning names it) and whether
  a float32 Cholesky must be retried in float64 (one per factor), plus the centred damping's check (one);
  the tridiagonal structure reads its pi's and checks each factorisation. At step 1, the curvature's scale for
  lambda_0; with ``fisher_products`` "differences" or "one-sided", each tensor's norm for the difference step; on
  the fused heavy ball (``runtime.fused_step``), the norms that bound its update (one).
- data-parallel (KFAC's docstring, "Distributed"): the ranks' batch sizes (one), and each subset's members (one
  per subset); a refresh's per-layer reads above happen on each layer's owner only.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from statistics import median
from typing import Any

import torch

from kronograph.compiler.compiled import CompiledModel
from kronograph.errors import KronographError
from kronograph.runtime import spectral_norm
from kronograph.runtime.capture import concatenated_records
from kronograph.runtime.curvature import (make_curvature, normed_blocks, reachable_ties, with_diagonal_g,
                                          within_reach)
from kronograph.runtime.data_parallel import (
    BatchSlice,
    batch_slice,
    fewest_to_halve,
    fold_across_ranks,
    invert_across_ranks,
    inverse_owners,
    shared_seed,
)
from kronograph.runtime.distributed import active_group, dtype_named
from kronograph.runtime.engines import make_engine
from kronograph.runtime.engines.torch import GradientPass
from kronograph.runtime.damping import (
    TRUSTED_RHO,
    accelerated_levenberg_marquardt,
    below_rounding,
    curvature_scale,
    gamma_candidates,
    gamma_interval,
    gamma_power,
    gamma_streak,
    largest_credible_decrease,
    lm_omega,
    rounding_of_h,
)
from kronograph.runtime.factors import (RowSubset, low_rank_pays, low_rank_rows, low_rank_rows_of_parts,
                                       rows_per_example)
from kronograph.runtime.fused_step import fused_heavy_ball_, fused_layers, heavy_ball
from kronograph.runtime.gathering import BatchGatherer, auto_count
from kronograph.runtime.inverse import (
    CoverageWarning,
    SkippedStepWarning,
    StatisticsWarning,
    UntrustedModelWarning,
    all_finite,
)
from kronograph.runtime.losses import get_loss
from kronograph.runtime.methods.first_order import adam_steps, nesterov_steps
from kronograph.runtime.methods.kfac_settings import PRESETS, SETTING_NAMES, KFACSettings
from kronograph.runtime.methods.settings import FROM_PRESET, resolve
from kronograph.runtime.statistics import (
    ema_decay,
    fisher_diagonal,
    inverses_due,
    make_generator,
    on_device,
    statistics_due,
    subset,
    whole_batch,
)
from kronograph.runtime.quadratic import (
    QuadraticSolution,
    curvature_gram,
    curvature_gram_sum,
    inner_tensor,
    scaled,
    solve_quadratic_model,
)
from kronograph.runtime.spectral_norm import held_power_iterations, spectral_sigmas
from kronograph.runtime.weight_norm import parameter_coordinates, weight_coordinates

UNMATCHED_DECAY = 0.999  # of the EMA of grad^2 behind unmatched_direction="rms" (Adam's beta2)
SIGNAL_DECAY = 0.9  # of the EMAs behind signal_scaling's share of signal s

Direction = dict[str, torch.Tensor]


def _warn_of_coverage(compiled: CompiledModel, params: Mapping[str, torch.Tensor], unmatched: Sequence[str]) -> None:
    """A CoverageWarning where the parameters outside every Kronecker block hold most of the weights (a GRU's or
    an LSTM's, say): they step along their own first-order direction at K-FAC's step cost, so Adam may train such
    a model faster (BENCHMARKS.md, the unseen GRU language model). Names the largest and why it has no block."""
    total = sum(p.numel() for p in params.values())
    outside = sorted(((params[name].numel(), name) for name in unmatched), reverse=True)
    count = sum(n for n, _ in outside)
    if not total or count <= total / 2:
        return
    reasons = {entry.name: entry.reason for entry in compiled.plan.unmatched}
    largest = outside[0][1]
    warnings.warn(f"K-FAC: {count:,} of the model's {total:,} parameters ({100 * count / total:.0f}%) lie outside "
                  f"every Kronecker block (the largest, {largest}: {reasons.get(largest, 'no block')}); they take "
                  "first-order steps (unmatched_direction) at K-FAC's step cost, so a first-order optimizer may "
                  "train this model faster", CoverageWarning, stacklevel=3)


#: The update's multiplier on a batch that batch norm normalises and signal scaling cannot halve (2-15 examples,
#: ``data_parallel.FEWEST_NORMALISED``), s never measured: 1/4 instead of the (1 + 0) / 2 of a batch counted as all
#: noise. The few examples' normalisation adds its own noise to the gradient's; a small ResNet at batch 4 went from
#: 2.0-3.1 to 1.3-1.5 after 200 steps (BENCHMARKS.md).
UNHALVED_NORMALISED_SCALE = 0.25


def _check_examples_first(inputs: Sequence[torch.Tensor]) -> None:
    """KronographError unless every input holds one row per example along dim 0: the statistics and the quadratic
    model take sub-batches by slicing every input there."""
    rows = [tuple(t.shape[:1]) for t in inputs]
    if any(r != rows[0] for r in rows) or rows[0] == ():
        raise KronographError(
            f"KFAC.step got inputs with {', '.join(str(r[0]) if r else 'no' for r in rows)} rows along dim 0: K-FAC "
            "takes sub-batches of the examples by slicing every input along dim 0, so each must hold one row per "
            "example (an EmbeddingBag's flat words and offsets: pass the bags as a 2-D tensor, padded with its "
            "padding_idx, instead)")


class KFAC:
    """K-FAC for a compiled model: on the torch engine it updates the module's parameters in place, on the
    onnxruntime engine the weights of ``compiled.onnxruntime()`` (read them with ``compiled.state_dict()``).

    ``KFAC(cm)`` with no other argument is the recommended first try (``preset="default"``, runtime/methods/kfac_settings.py):
    the paper's algorithm with lambda started from the curvature's scale (``relative_damping`` times the mean
    eigenvalue of the factored Fisher at step 1), LM every step and the gamma rule every 5, both accelerated
    while their verdict stays the same, steps that wreck h undone, tau_2 = 1 for small batches, and the quadratic
    model's coefficients bounded (no descent direction taken uphill, near-parallel directions not both used),
    and the factored damping applied in coordinates centred on each layer's mean input.
    ``KFAC(cm, preset="paper")`` is the paper's sec 13 exactly: lambda = 150 adapted every 5 steps, gamma
    adapted every 20 from three candidates, inverses every 20, tau_1 = 1/8, tau_2 = 1/4. Any argument given
    replaces the preset's value.

    Distributed (data parallel, runtime/data_parallel.py): when torch.distributed is initialised with more than one
    rank, or ``process_group`` is given (decided at construction), every rank calls ``step(x, y)`` with its own
    slice of each batch, the slices in rank order making the global batch of N examples (sizes may differ), and
    every rank takes the same step: the single process's on the whole batch, to float32 rounding
    (tests/test_kfac_distributed.py). No DistributedDataParallel wrapper is needed: KFAC sums the gradient itself;
    a model compiled already wrapped in DDP is seen through (compile plans and KFAC steps the module inside, so
    DDP's reducer never runs: the unwrapped run, bit for bit; give ``process_group`` DDP's group if it is not the
    default one). A model sharded by FSDP2's fully_shard after compile is stepped too: each step gathers its
    weights whole once and keeps FSDP from communicating (runtime/sharded.py), the update goes to the whole
    weights and to this rank's rows, and the run is the unsharded one (tests/test_kfac_fsdp.py); FSDP1 and other
    DTensor parameters are refused with a KronographError (compiler/wrappers.py).
    Collectives per step, each one all_reduce of one flat buffer: the ranks' n_r (one host read); the loss and the
    gradient, each rank's weighted by n_r / N (with ``signal_scaling`` the halves' difference too); on statistics
    steps the upper triangles of every layer's m A and m G, and its m (``distributed.average_statistics``; the
    factors come back mirrored, exactly symmetric); per gamma candidate the quadratic model's k x k Fisher sums over
    the tau_2 subset; when the damping rule runs, the loss after the step. The tau_1 and tau_2 subsets are drawn
    from the global batch by the generator every rank shares (``seed=None``: rank 0's seed, broadcast at
    construction), each rank using its rows, and the sampled targets from noise drawn for the whole subset
    (``Loss.sampling_noise``; on the CPU generator the single process's draws bit for bit; where a rank has no row
    of the tau_1 subset, one more all_reduce tells it the outputs' shape). The halves of ``signal_scaling`` are the
    global batch's, each rank passing its rows of each. So nothing depends on the number of ranks, except batch norm
    (each rank's pass normalises over its own rows; with batch norm, a rank boundary that leaves a piece of one
    example in a half makes that step pass whole slices, s keeping its value). The inverse work is split across the
    ranks, KAISA's way: each layer's A and G are inverted on one rank, ``inverse_owners`` (dealt out at construction
    by the cost groups * (a_dim^3 + g_dim^3), largest first to the least-loaded rank), and each inversion round
    (every gamma candidate of a refresh) is followed by one all_gather: each rank sends its own layers' upper
    triangles of a_inv and g_inv, pi and failed flags, zero-padded to the largest rank's share (where the padding
    would send more than an all_reduce of every layer's piece, that all_reduce instead), and every rank, the owner
    too, unpacks every layer from its owner's segment, the triangles mirrored. So every rank holds every inverse,
    the same bits on every rank, and the same failure decisions (a failed group keeps its previous inverse
    everywhere; the owner alone warns). KAISA's other mode, the owner preconditioning its layers' gradients and
    broadcasting them (less memory, more communication), is not built. Every decision (skipped steps, rho,
    rejections) comes from all-reduced values, the same on every rank. Not distributed yet: the low-rank products of
    sec 8 (off: the full solve, same result), structure="tridiagonal" and the onnxruntime engine (both raise a
    KronographError). A rank that raises leaves the others waiting in their next collective until the process
    group's timeout.

    Args:
        preset: "default" (first try) or "paper".
        lr: multiplies the final update (1.0 with re-scaling is the paper's algorithm).
        damping: lambda, the Tikhonov term of the quadratic model (initial value when adapted); None: chosen at
            step 1 as ``relative_damping`` times the mean eigenvalue of the factored Fisher.
        relative_damping: lambda_0 / mean eigenvalue when ``damping`` is None.
        factor_damping: gamma for the factored Tikhonov damping; None: sqrt(lambda + eta), following lambda
            when the gamma rule is off (sec 6.3).
        weight_decay: eta, the l2 coefficient in h.
        ema_decay: fixed EMA decay of the factors; None: the paper's min(1 - 1/k, 0.95).
        fisher: "mc" (targets sampled from the model) or "empirical" (the labels).
        stats_fraction, qmodel_fraction: tau_1 and tau_2, fractions of the batch for the statistics and
            for the exact-Fisher products; ``min_stats_examples`` and ``min_qmodel_examples`` are their
            floors (sec 8: small sub-batches give a wrong quadratic model). The statistics' floor counts loss
            terms with a sampled target of their own: a sequence of T tokens counts T.
        shared_statistics_forward: where the statistics take the whole batch (it is no larger than their floor),
            the sampled targets' backward runs on the gradient's own forward (its halves', with ``signal_scaling``,
            whose sites are joined into the batch's) before the gradient's backward: the same factors (dense test)
            for one forward a step less. Off, or data-parallel, tridiagonal, with low-rank products or on the
            onnxruntime engine: a statistics pass of its own (the paper preset's).
        table_blocks: embedding tables wider than 1024 rows (the plan's ``tables``: a word vocabulary) get blocks
            whose A, how often each row is read, is kept as its diagonal (one-hot inputs make it exactly diagonal):
            A^-1 scales each row of the gradient by its damped count, G^-1 as any layer's. Both engines,
            data-parallel and FSDP2 too, diagonal structure; elsewhere, and off (the paper preset's), such a
            table steps as the parameters outside every block.
        diagonal_output_g: an output layer (``CompiledModel.output_layers``, linear: a classifier's, a tagger's,
            an untied language model's head) whose G is wider than this keeps G as its diagonal
            (``Layer.diagonal_g``), A whole: G^-1 scales the gradient's rows, so preconditioning and inverting cost
            C, not C^2 (a 50257-wide G would be 10 GB a copy). The output Fisher of a softmax, diag(p) - p p^T, is
            nearly diagonal over many classes; a sigmoid's or squared error's is diagonal. Default 1024: 2048-class
            heads step as well per step and 15-25% cheaper (BENCHMARKS.md); None: dense, the paper's. Data-parallel
            and FSDP2 too, diagonal structure; a tied head's too (its tie's row side then inverts as a diagonal).
        diagonal_wide_g: any linear layer whose G alone is wider than ``max_kronecker_dim`` gets a block with G
            kept as its diagonal; off (the default), or elsewhere, such a layer has no block.
        tied_blocks: an embedding table tied to an output layer (the plan's ``ties``: GPT-2's head reads the
            table) gets one block, G_h (x) A_h + A_e (x) G_e, the two uses' Kronecker products summed as for any
            shared weight, each damped at gamma / sqrt(2) and inverted exactly by one generalized
            eigendecomposition a side (runtime/tied.py). Both engines, data-parallel too (every rank inverts the tie
            from the all-reduced factors) and FSDP2, diagonal structure; elsewhere, and off (the paper
            preset's), the table steps as the parameters outside every block.
        weight_norm_blocks: a layer whose weight weight norm computes (the plan's ``normed``: W = g v / |v|,
            PyTorch's weight_norm, old or parametrization, any dim) gets the block of its computed weight W: its a
            and g are those of any layer, the gradient is pushed forward to W and the block's step pulled back to
            (g, v), a step whose first-order change of W is the block's step exactly (runtime/weight_norm.py). Both
            engines, data-parallel and FSDP2 too, diagonal structure; elsewhere, and off (the paper
            preset's), v and g step as the parameters outside every block.
        spectral_norm_blocks: a layer whose weight spectral norm computes (W = W_o / sigma, PyTorch's spectral_norm,
            old or parametrization) gets the block of its computed weight W: sigma grad_{W_o} is W's gradient and
            the block's step is pulled back as sigma Delta W (runtime/spectral_norm.py). The torch engine, not
            FSDP2, diagonal structure; elsewhere, and off (the paper preset's), W_o steps as the parameters outside
            every block.
        stats_every, inverse_every: how often statistics and inverses are refreshed (T_3 = inverse_every).
        batches_per_step: gather this many of the caller's batches and step once on their union
            (runtime/gathering.py; while gathering, every call's batch gets one no-grad forward that checks it, a
            bad one refused at its own call, and gives the calls between their loss; they leave the weights alone;
            a union whose step still raises or is skipped is dropped whole, the weights as they were). On
            small noisy batches a K-FAC step on the union is worth more than the steps on its parts, and the
            step's own algebra costs the same (BENCHMARKS.md, "Gathered batches"). None (auto, the default; the
            paper preset's is 1): as many as the gradient's noise scale asks (``gathering.auto_count``), one where
            the batch is mostly signal. Data-parallel ranks gather alike as long as their batches' shapes do.
        momentum: "qmodel" (sec 7), a heavy-ball coefficient (float) without re-scaling, or None.
        rescale: re-scale by the exact Fisher (6.4).
        adapt_damping, adapt_gamma: the rules of 6.5 and 6.6 (None: on when re-scaling).
        damping_every, gamma_every: T_1 and T_2.
        max_gamma_every: the gamma rule's interval doubles after each round that keeps gamma or reverses the last
            move, up to this, and is T_2 again while one side keeps winning (None: always T_2). On the batch-60
            MNIST classifier gamma alternated between its smaller and larger candidates, re-tried every 5 steps
            at three inversions each (half the step's time).
        gamma_rule_min_signal: a round of the gamma rule is skipped (gamma kept, the next one an interval later)
            while the share of signal s (``signal_scaling``) is below this; None: a round whatever s. The
            candidates are ranked by the quadratic model's decrease on the batch, which is the noise's where s is
            small: on the batch-60 MNIST classifier (s ~ 0.002) gamma wandered between 1e-4 and 1e-1, and without
            the rounds the loss after 1200 steps was 0.045 / 0.050 against 0.056 / 0.051 at 24-29% less time a step
            (at 60 s: 0.0021 against 0.012; BENCHMARKS.md).
        lm_acceleration: the largest power of omega1 one LM move (and of omega2 one gamma-rule candidate) may
            take after consecutive equal verdicts (1: the paper's rules).
        refresh_ratio: also refresh the inverses when gamma has moved by this factor since they were made.
        reject_steps: undo a step whose h rose by more than ``reject_rise`` |h| (or, when ``reject_rho`` is set,
            whose rho is below it; checked where rho is computed), raise lambda and go on; ``info["rejected"]``
            says so. Judging by h's rise alone: on the default-init autoencoder a rho below -1/2 on a small
            rise of h was mostly the mini-batch's noise (19 of 110 steps undone against 10, loss 101.6
            against 79.0 after 110 steps); the other first-try problems reject the same steps either way.
        reject_damping_floor: after an undone step, lambda is at least this times the curvature's mean eigenvalue
            as the factors now hold it (``damping.curvature_scale``; None: the LM rule's rise alone). lambda starts
            on that scale at step 1, but a model that starts saturated (a tied LM's N(0, 1) table as its head: logits
            of std 8, F ~ 1e-18 at step 1) sets it at its floor; after one step the scale is 1e16 larger, and at
            ~2x a rise lambda took 13-25 undone steps to catch up (BENCHMARKS.md).
        keep_damping_at_rounding: leave lambda (and the LM streak) as they are when a step left h exactly as it
            was, or changed it, and the quadratic model predicted it would, by no more than 16 float32 roundings of h
            or of the loss's floor (``damping.below_rounding``, ``Loss.rounding_floor``): on a batch fitted to a
            loss of 1e-10 rho is rounding noise, and the paper's rule, reading it as distrust, grew lambda past
            1e260 in 4000 steps on scikit-learn's digits. A rho above 3/4 there still shrinks lambda (h fell as
            predicted: a lambda that undone steps raised just before the fit comes back down; gathered steps on the
            digits deep tanh net reached 0 in 4 s, not 4e-8 at 30 s). Likewise gamma stays when every candidate's
            predicted decrease is below that rounding, and a rise of h below it is not a step to undo.
        descent_only: keep the coefficients of K-FAC's proposal and of the unmatched parameters' gradient step
            >= 0 in the quadratic model (the exact bounded minimiser), so neither is taken uphill.
        max_momentum: keep the quadratic model's momentum coefficient mu in [0, max_momentum] (None: free, the
            paper's). The curvature along the previous update comes from a sub-batch that did not make it; where
            the batch is small against the model (784-500-10 at 60 examples) that curvature is mostly missing,
            and a free mu swings between -10 and +5 from step to step and the loss rises.
        unit_momentum_below: keep mu at most 1 (within ``max_momentum``) on batches of fewer than this many loss
            terms, examples times a sequence's positions (None: max_momentum alone). A mu above 1 makes the step
            longer than the previous update, fitted to the few examples that made it, from curvature measured on a
            few others: at batches of 1-4 examples on scikit-learn's digits and Fashion-MNIST it repeats their noise
            (digits at batch 2 after 300 steps: 0.24-1.60 with mu up to 2, 0.20-0.29 with mu <= 1); from 16 examples
            on it pays (BENCHMARKS.md).
        max_condition: treat the quadratic model's system as singular, dropping a direction, when its matrix
            scaled to a unit diagonal has a larger condition number (None: only exact singularity).
        relative_table_damping: scale a table's gamma (an embedding or bag wider than 1024 rows, A kept as its
            diagonal) by sqrt(s / S), s = sqrt(tr A / dim A x tr G / dim G) its block's scale and S the geometric
            mean of the other blocks' (curvature.table_damping_scales; block-diagonal only): a table's A counts the
            rows read (its trace is 1 a token), so its scale falls with the vocabulary and one gamma damps a
            2048-word table 16-50x harder relative to its scale than the model's other layers. Off: the paper's
            one gamma.
        centered_damping: damp each layer with a bias in coordinates centred on its mean input: A + pi gamma T T^T
            instead of A + pi gamma I, pi from the centred trace (inverse.centered_damped_inverse), which keeps
            the invariance to shifted inputs of paper sec 10 that Tikhonov damping breaks; block-diagonal only.
        factor_damping_floor: each factor's damping (pi gamma for A, gamma / pi for G) at least this fraction of
            the factor's mean eigenvalue tr / dim (0: none, the paper's; block-diagonal only). Where the batch's
            model rewards fitting it, the gamma rule can drive gamma to 1e-7 of the factors' scale (a deep tanh
            net near a perfect fit): the inverses then amplify directions the batch barely saw, each step fits
            its batch and undoes the others, and at float32's rounding the Cholesky fails.
        max_kronecker_dim: a layer with a factor wider than this gets no Kronecker block (None: every matched layer
            has one, the paper's): its parameters take the step of those outside every block, with a
            CoverageWarning naming it. An LM head over a 50257-word vocabulary would hold a 10 GB G (each copy),
            cost a 50257^2 product a token to form, and run out of memory before its first step.
        max_factor_dim: invert a factor wider than this as block-diagonal, in contiguous diagonal blocks of at most
            this width, the rest of the factor taken as 0 (None: whole, the paper's; block-diagonal structure
            only; inverse.block_diagonal_inverse). A Cholesky costs d^3: a 3137-wide A (a GroupNorm CNN's head)
            in four blocks of 785 costs a sixteenth, and its statistics form those blocks alone (and a centred
            A's border).
        bound_model_decrease: shorten a step whose quadratic model predicts h to fall by more than h / (1/4)
            (damping.largest_credible_decrease; off: the paper's) along its coefficients, to the point where the
            model predicts that fall (quadratic.shortened). h is nonnegative, so such a step has rho < 1/4 whatever
            it does: a batch whose Fisher misses the curvature (a saturated softmax on a wrong label), met with
            lambda near its floor. A fitted deep tanh net's outlier predicted falls of 1e4 h, was undone again and
            again and wrecked the fit at 60 s (0.02 against 0 with the bound; BENCHMARKS.md).
        max_logit_change: shorten the update (the quadratic model's coefficients times one t < 1, as
            ``bound_model_decrease`` does) so that its linearised change of no example's softmax logits, the spread
            max_c - min_c of lr sum_a c_a J d_a over a row of the quadratic model's rows, exceeds the row's room:
            the spread of its logits now, capped at the largest spread of the first step's rows, and at least this
            many nats (None: no bound, the paper's). A sigmoid's output is the softmax over (0, s): its spread
            |s|, its change |ds|; losses without logits (mse) are never bounded. The Fisher's curvature along a
            logit change is sum_c p_c dz_c^2 - (sum_c p_c dz_c)^2: blind to a class whose probability is ~0, so
            the quadratic model takes raising it as free, and the loss rises once its logit has climbed past the
            row's log-odds. On a bag-of-words model with a 2048-word head the model's steps moved some row's
            logits by 40-3000 nats (the loss from 5 to 60 on steps rho then undid, 42 of 500 steps); bounded by 10
            nats, none was undone and the loss after 500 steps fell from 4.6-4.9 to 3.7 (Adam: 4.4); with 2048
            sigmoid outputs (the next four words as tags) from 13.9 to 12.7-13.2. The room grows to a row's own
            spread for a model that starts saturated (a tied LM's N(0, 1) table as head spreads its first logits
            over ~100 nats, which the first steps must undo; 10 nats held it back), but not past the first step's:
            a room that grew with the spreads training makes let the bag of words' blind steps back in (3.9
            against 2.9 at 60 s). ``info["logit_change"]``: the update's largest change over its room (1: the
            bound shortened it).
        output_noise_damping: damp the output layer's G (the layers whose output the loss is put on,
            ``CompiledModel.output_layers``) by at least (1 - s) tr(G) / R: R its rows in the batch (examples times
            positions), s the share of signal in the batch's natural gradient (``signal_scaling``, which it needs).
            A softmax head's G has an eigenvalue per class near the class's frequency, and the natural gradient
            moves a rare class's row by its noise over that frequency; where the batch's gradient is mostly noise
            (s ~ 0) no direction is amplified past one row's share of the trace. A 2048-word LM: loss after 300
            steps 3.76 -> 3.34 (BENCHMARKS.md). The same bound on every factor, or on every G, slowed the CNNs and
            the batch-60 classifier (a 500-wide hidden G floored at 8x its mean eigenvalue).
        activation_rows: a layer's A from at most this many of its activation rows a statistics update, where it has
            more rows than examples (conv patches, tokens): a uniform random subset drawn by ``row_generator``, each
            row weighted so that A stays unbiased (factors.RowSubset), a conv's kept patches gathered alone; G from
            every row (None: every row, the paper's). The patches' im2col was most of a conv net's statistics cost.
        unmatched_direction: the direction of the parameters no Kronecker block covers (norms' affines, positions,
            class tokens, layer scales), a direction of their own whose length the quadratic model chooses (its
            coefficient >= 0 with ``descent_only``): "fisher" -g / (F_ii + gamma^2), F_ii an EMA (the factors'
            decay) of n g_s^2, g_s the statistics pass's gradient of their n examples' sampled targets (an unbiased
            estimate of the Fisher's diagonal, from the backward the factors take anyway), the same diagonal block
            also in K-FAC's proposal, so they step at least with the blocks' alpha (both engines,
            data-parallel and FSDP2 too, the ranks' gradients pooled; with re-scaling and the sampled Fisher;
            elsewhere "rms");
            "gradient" (-grad h) or "rms" (-grad h / sqrt(v), v an EMA of grad^2 with decay 0.999), "rms" with
            re-scaling only (without it the gradient).
            At 300 steps "fisher" against "rms" (the mean of two seeds): a ViT 0.41 against 0.48, text-words 2.87
            against 2.95, the character LM 1.52 against 1.58, text-tied-words 3.55 against 3.45 (BENCHMARKS.md).
        unmatched_backoff: after N zero coefficients in a row of the unmatched direction (its ``descent_only`` bound
            held), leave it out of the quadratic model for N steps, then try it again (None: in the model every
            step, the paper's). A coefficient at its bound adds nothing, so leaving the direction out changes
            nothing on those steps but one forward fewer (the products of three directions become two's): the
            GroupNorm CNN's affine parameters get 0 on every step (qmodel ~25 -> ~17 ms a step). A layer with no
            statistics yet (first called late) steps with the direction whatever the count.
        signal_scaling: multiply the update by (1 + s) / 2, s = EMA(g_A^T F^-1 g_B) / EMA(g^T F^-1 g) in [0, 1]
            (EMAs with decay 0.9; g_A, g_B the gradients of the two halves of the batch, computed by two half
            passes instead of one, F^-1 the damped K-FAC inverse): the share of signal in the natural gradient.
            The quadratic model's minimiser fits the mini-batch it was built on; where the batch's gradient is
            mostly noise (s ~ 0: small batches) its step is about twice too long, where it is signal (s ~ 1)
            the step is the model's own. Where the low-rank products of sec 8 pay, the halves' captured rows
            make them; the steps whose statistics come from the gradient's own pass (the empirical Fisher) take
            one pass and leave s as it was. Batches of 2 and 3 examples are halved too (halves of one example),
            except with batch norm, whose halves need 8 examples (``data_parallel.FEWEST_NORMALISED``: over two,
            BatchNorm1d's outputs are +-1, over four the ResNet still diverged); a batch that cannot be halved,
            before any has been, counts as all noise (s = 0; with batch norm the update is then a quarter of the
            model's step, ``UNHALVED_NORMALISED_SCALE``): without this a batch of 1-3 examples was fitted step after
            step and the loss on the data rose from 2.3 to 4.5 on Fashion-MNIST and scikit-learn's digits.
        signal_every: measure s (its EMAs) on every Nth step, once measured (the first measure is taken as soon
            as a batch is halved), with the EMAs' decay 0.9^N: each measure is a second solve, of the halves'
            difference (text-words' 2048-wide head: ~4 ms of a ~75 ms step), and s moves slowly. 300-1200 fixed
            steps of text-words, text-conv, digits-mlp and the batch-60 classifier: level with N = 1 (BENCHMARKS.md).
            The other steps take the gradient in one whole pass, not two halves (cheaper on small batches),
            unless the model has batch norm (its halves' statistics kept on every step).
        fisher_products: how the quadratic model's J d are computed on the torch engine: "auto" (the default
            preset's: "one-sided" where the model's forward calls scaled-dot-product or multi-head attention,
            group or instance norm, a recurrent layer or a convolution, "differences" where it calls batch norm in
            training mode, runtime/tangent_cost.py, when its weights are float32 or float64, "forward" elsewhere;
            the paper preset's is "forward"), "forward" (forward mode, exact; the math attention kernel), "differences"
            (central differences of two no-grad forwards per direction, relative error below 1e-3, fused kernels
            kept: 1.6x cheaper steps on a small transformer, 1.15x dearer on the MLP autoencoder; BENCHMARKS.md)
            or "one-sided" (one no-grad forward per direction beside one shared forward at theta, Gram entries
            within ~1e-4 of forward mode's: 10-23% cheaper steps than central on the first-try suite's attention,
            norm and recurrent models, as good a step; its O(h) error misleads the MLP autoencoder's nearly
            parallel directions, which "auto" keeps in forward mode, and a batch-norm ResNet at batch 8:
            BENCHMARKS.md).
            Every forward of a difference draws the same dropout masks. The onnxruntime engine always uses
            central differences.
        min_damping: floor of lambda.
        factor_dtype: dtype of factors and inverses, independent of the model's.
        communication_dtype: data-parallel: the dtype ("bfloat16", "float16", ...) the factors' all_reduce
            sends and sums (None: the factors' own); bfloat16 halves float32's bytes at a relative rounding of
            4e-3 in the averaged factors. Inverses and gradients travel in their own dtypes.
        structure: "diagonal" (sec 4.2) or "tridiagonal" (sec 4.3: a chain of linear layers in plan order).
        seed: seed of the generator for subsets and sampled targets (None: drawn from torch's global RNG).
        process_group: the data-parallel ranks (see Distributed above); None: torch.distributed's default group when
            it is initialised with more than one rank, else one process.
    """

    SUMMARY = "K-FAC with the paper's damping scheme (Martens & Grosse 2015); presets default (first try) and paper"
    Settings = KFACSettings
    PRESETS = PRESETS

    def __init__(
        self,
        compiled: CompiledModel,
        lr: float = FROM_PRESET,
        damping: float | None = FROM_PRESET,
        factor_damping: float | None = FROM_PRESET,
        weight_decay: float = FROM_PRESET,
        ema_decay: float | None = FROM_PRESET,
        fisher: str = FROM_PRESET,
        stats_fraction: float = FROM_PRESET,
        stats_every: int = FROM_PRESET,
        inverse_every: int = FROM_PRESET,
        momentum: str | float | None = FROM_PRESET,
        rescale: bool = FROM_PRESET,
        adapt_damping: bool | None = FROM_PRESET,
        adapt_gamma: bool | None = FROM_PRESET,
        qmodel_fraction: float = FROM_PRESET,
        damping_every: int = FROM_PRESET,
        gamma_every: int = FROM_PRESET,
        factor_dtype: torch.dtype = FROM_PRESET,
        min_damping: float = FROM_PRESET,
        seed: int | None = None,
        structure: str = FROM_PRESET,
        preset: str = "default",
        process_group: Any = None,
        **settings: Any,
    ) -> None:
        given = {name: value for name, value in locals().items() if name in SETTING_NAMES}
        self.settings = s = resolve(self.PRESETS, preset, {**given, **settings}, "KFAC")
        self.preset = preset
        fisher, momentum, rescale, structure = s.fisher, s.momentum, s.rescale, s.structure
        self.compiled = compiled
        self.module = compiled.module
        self._group = active_group(process_group)  # data-parallel ranks (runtime/data_parallel.py); None: one process
        if self._group is not None:
            if compiled.engine != "torch":
                raise KronographError("data-parallel K-FAC runs on the torch engine only so far, not on onnxruntime; "
                                      "compile the nn.Module (engine='torch'), or run one process")
            if structure != "diagonal":
                raise KronographError(f"data-parallel K-FAC has structure='diagonal' only so far, not {structure!r}")
        self.loss = get_loss(compiled.loss)
        self.engine = make_engine(compiled, self.loss, s.fisher_products, fsdp=True)
        if self.engine.sharded is not None:
            self.engine.sharded.check_ranks(self._group)
        self.lr, self.weight_decay = float(s.lr), float(s.weight_decay)
        self.damping = None if s.damping is None else float(s.damping)
        self.gamma = float(s.factor_damping) if s.factor_damping is not None else (
            None if self.damping is None else math.sqrt(self.damping + self.weight_decay))
        self.ema_decay, self.fisher = s.ema_decay, fisher
        self.stats_fraction, self.qmodel_fraction = float(s.stats_fraction), float(s.qmodel_fraction)
        self.stats_every, self.inverse_every = int(s.stats_every), int(s.inverse_every)
        self.gatherer = BatchGatherer(1 if s.batches_per_step is None else int(s.batches_per_step))
        self.auto_gathering = s.batches_per_step is None  # the count follows the noise (gathering.auto_count)
        self.momentum, self.rescale = momentum, bool(rescale)
        self.adapt_damping = self.rescale if s.adapt_damping is None else bool(s.adapt_damping)
        self.adapt_gamma = self.rescale if s.adapt_gamma is None else bool(s.adapt_gamma)
        self.damping_every, self.gamma_every = int(s.damping_every), int(s.gamma_every)
        self.min_damping = float(s.min_damping)
        self.structure = structure
        tables = self._tables(compiled, s.table_blocks)
        outputs = set(compiled.output_layers)  # (read from the graph once)
        ties = self._ties(compiled, s.tied_blocks, s.max_kronecker_dim, s.diagonal_output_g, outputs)
        views = tuple(view for tie in ties for view in tie.views)
        self.normed = self._normed(compiled, s.weight_norm_blocks, s.spectral_norm_blocks)
        if (tables or views or self.normed) and compiled.engine == "torch":  # onnxruntime's graph taps its own
            self.engine.capture_also((*tables, *views, *self.normed))
        candidates = (*compiled.layers, *tables, *self.normed)
        if structure == "diagonal":
            candidates = with_diagonal_g(candidates, s.diagonal_output_g, outputs)
            if s.diagonal_wide_g:
                candidates = with_diagonal_g(candidates, s.max_kronecker_dim)
        layers = within_reach(candidates, s.max_kronecker_dim) + list(views)
        self.curvature = make_curvature(structure, layers, s.factor_dtype, bool(s.centered_damping),
                                        float(s.factor_damping_floor), s.max_factor_dim, ties,
                                        bool(s.relative_table_damping))
        self.normed = tuple(layer for layer in layers if layer.computed)  # (those within max_kronecker_dim)
        covered = {n for layer in layers for n in layer.parameter_names}
        self.unmatched = [name for name in self.engine.parameters() if name not in covered]
        _warn_of_coverage(compiled, self.engine.parameters(), self.unmatched)
        if self._estimates_unmatched_fisher(s):  # each sampled backward takes their gradient too
            self.engine.fisher_parameters = list(self.unmatched)
        # data-parallel: layer -> the rank that inverts it (runtime/data_parallel.py; None: one process inverts all)
        self.inverse_owners: dict[str, int] | None = None
        if self._group is not None:
            seed = shared_seed(self._group, seed, self.engine.device)  # one generator's draws on every rank
            self.inverse_owners = inverse_owners([layer for layer in layers if layer not in views],  # (ties: all)
                                                 torch.distributed.get_world_size(self._group), s.max_factor_dim)
        self.generator = make_generator(self.engine.device, seed)
        # A's rows where a layer has many (activation_rows): a generator of their own, so that drawing them changes
        # no other draw; each rank draws its own rows (their factors are averaged), so no rank waits on another's.
        rank = 0 if self._group is None else torch.distributed.get_rank(self._group)
        self.row_generator = make_generator(self.engine.device, self.generator.initial_seed() + 1 + rank)
        self.row_subset = None if s.activation_rows is None else RowSubset(int(s.activation_rows), self.row_generator)
        self._slice: BatchSlice | None = None  # this step's slice of the global batch (data-parallel)
        # data-parallel halves may pass a one-example piece only where no batch norm normalises over the rows
        self._batch_norm = self.module is None or any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                                      for m in self.module.modules())
        # (the judgement's: from the graph, so that both engines judge alike)
        self._graph_batch_norm = any(node.op_type == "BatchNormalization" for node in compiled.graph.graph)
        self.steps = 0
        self.stats_updates = 0
        self.rejected = 0  # steps undone because they made h worse
        self._early_rhos: list[float] | None = []  # rho of the first steps that measured it (_watch_early_rho)
        # once those found the model untrusted (untrusted_fallback): Adam's (m, v, t) by parameter, or SGD's momentum
        # buffers; None: K-FAC steps
        self.fallback_adam: dict[str, tuple[torch.Tensor, torch.Tensor, int]] | None = None
        self.fallback_sgd: dict[str, torch.Tensor] | None = None
        self.streak = 0  # signed count of consecutive equal LM verdicts (damping.accelerated_levenberg_marquardt)
        self.gamma_streak = 0  # signed count of gamma-rule rounds won by the same side (damping.gamma_streak)
        self.gamma_interval = self.gamma_every  # steps between gamma-rule rounds now (damping.gamma_interval)
        self.next_gamma_round = self.gamma_every  # the step of the next round
        self.inverted_gamma: float | None = None  # the gamma of the inverses in use
        self.timings: dict[str, float] = {}
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # this step's (P, Q) where low rank pays
        self._rows_per_example: dict[str, float] = {}  # activation rows an example, as the last statistics saw
        self._examples = 0  # the examples of this step's batch (data-parallel: the global batch's)
        self._loss_terms = 0  # and its loss terms, examples times positions
        self.output_layers = outputs & set(self.curvature.blocks)  # output_noise_damping's
        self._difference_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the halves' difference's
        self.previous: Direction | None = None  # the last applied update (delta_0 of sec 7)
        self.unmatched_moments: dict[str, torch.Tensor] = {}  # EMA of grad^2 (unmatched_direction="rms")
        self.unmatched_fisher: dict[str, torch.Tensor] = {}  # EMA of n g_s^2 (unmatched_direction="fisher")
        self.unmatched_adam: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # (m, v, t) (unmatched_adam_lr)
        self.unmatched_zeros = 0  # the unmatched direction's coefficient: consecutive zeros (unmatched_backoff)
        self.unmatched_rest = 0  # steps it is still left out
        # the largest spread of a row's logits at the first step: the most room max_logit_change gives a row
        self.initial_logit_spread: float | None = None
        self.signal: tuple[float, float] | None = None  # EMAs of (g^T F^-1 g, g_A^T F^-1 g_B) (signal_scaling)
        self._half_difference: Direction | None = None  # (g_A - g_B) / 2 of this step's halves
        self._unhalved = False  # signal scaling is on but this step's batch could not be halved
        self._pass_outputs: torch.Tensor | None = None  # this step's gradient-pass outputs, where kept
        self._outputs_split_free: bool | None = None  # whether they equal a whole-batch forward's (checked once)
        # How this step's h was measured: the (start, stop, weight) parts of the batch the gradient passes took, and
        # the generators' state before them where they drew random numbers (dropout), for h after the step.
        self._parts: list[tuple[int, int, float]] = []
        self._randomness: Any = None

    def _tables(self, compiled, wanted: bool) -> tuple:
        """The plan's tables (embeddings wider than 1024 rows) K-FAC gives blocks with a diagonal A: with the diagonal
        structure (``table_blocks``), on both engines, data-parallel and FSDP2 too."""
        if not wanted or self.structure != "diagonal":
            return ()
        return compiled.plan.tables

    def _ties(self, compiled, wanted: bool, largest: int | None, diagonal_from: int | None,
              outputs: set[str]) -> tuple:
        """The plan's tied tables K-FAC gives blocks (``tied_blocks``): diagonal structure, the head's G kept as its
        diagonal above ``diagonal_output_g`` where the head is an output layer, both views within
        ``max_kronecker_dim`` (curvature.reachable_ties; data-parallel: every rank inverts them)."""
        if not wanted or self.structure != "diagonal":
            return ()
        return reachable_ties(compiled.plan.ties, largest, diagonal_from, outputs)

    def _normed(self, compiled, weight_normed: bool, spectral_normed: bool) -> tuple:
        """The plan's layers of a computed weight K-FAC gives blocks, diagonal structure: weight norm's
        (``weight_norm_blocks``; both engines, data-parallel and FSDP2 too: each rank pushes the summed gradient to
        W alike) and spectral norm's (``spectral_norm_blocks``; the torch engine, whose module holds the power
        iteration's sigma, PyTorch's spectral norm computing the weight, not FSDP2-sharded)."""
        if self.structure != "diagonal":
            return ()
        spectral = spectral_normed and compiled.engine == "torch" and self.engine.sharded is None
        return normed_blocks(compiled.plan.normed, compiled.module, weight_normed, spectral)

    @property
    def blocks(self) -> dict[str, Any]:
        """The layers' KroneckerBlocks (factors and block-diagonal inverses), by layer name."""
        return self.curvature.blocks

    # -- the step -----------------------------------------------------------------------------------
    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
        """One K-FAC iteration on the batch (x, y) (tensors or numpy arrays); returns {"loss", "alpha", "mu",
        "damping", ...}.

        Seconds spent per phase accumulate in ``self.timings`` (statistics: their pass and the fold, gradient —
        which includes the statistics' capture when they come from the same pass —, inverses, precondition,
        qmodel, update, damping).

        With ``batches_per_step`` N > 1, a call that gathers its batch returns {"loss": the batch's loss at the
        weights now (one no-grad forward, which also checks the batch), "gathered": how many are held, ...} and
        leaves the weights as they are; the Nth steps on the union of the N batches (K-FAC's own steps only: once
        the first-order steps of ``untrusted_fallback`` have taken over, every call steps).
        """
        device = self.engine.device  # a batch of numpy arrays or host tensors moves to the model's device
        inputs = tuple(torch.as_tensor(t, device=device) for t in (x if isinstance(x, (tuple, list)) else (x,)))
        y = torch.as_tensor(y, device=device)
        _check_examples_first(inputs)
        with self.engine.stepping():  # an FSDP2-sharded module's weights whole for the step (runtime/sharded.py)
            if self.fallback_adam is None and self.fallback_sgd is None and self.gatherer.count > 1:
                loss = self._batch_loss(inputs, y)  # (raises on bad targets: nothing is held)
                if not math.isfinite(loss):
                    warnings.warn("K-FAC: a batch whose loss is not finite (NaN or Inf in its inputs or targets?) was "
                                  "skipped; it is not gathered into the next step", SkippedStepWarning, stacklevel=2)
                    return {"loss": loss, "rejected_steps": self.rejected,
                            "skipped": "non-finite loss; the batch was not gathered"}
                union = self.gatherer.add(inputs, y)
                if union is None:
                    return {"loss": loss, "gathered": len(self.gatherer.held), "rejected_steps": self.rejected}
                inputs, y = union
            return self._step(inputs, y)

    def _batch_loss(self, inputs: tuple[torch.Tensor, ...], y: torch.Tensor) -> float:
        """A batch's mean loss at the weights now, its targets checked, before it is gathered: what a gathering
        call reports as a step's "loss", and a bad batch's call raises or skips at once, the held batches
        untouched (a run that never saw it). One no-grad forward, buffers untouched and dropout's draws put back
        (the union's step draws as it would on the batches given at once); over the ranks' batches where
        data-parallel."""
        now = self.engine.random_state() if hasattr(self.engine, "random_state") else None
        try:
            outputs = self.engine.outputs(inputs)
            self.loss.check_targets(outputs, y)
            value = float(self.loss(outputs, y))
        finally:
            if now is not None:
                now.replay()
        if self._group is None:
            return value
        part = batch_slice(self._group, inputs[0].shape[0], self.engine.device)
        return float(part.sum([torch.tensor(value * part.weight, dtype=torch.float64, device=self.engine.device)])[0])

    def _step(self, inputs: tuple[torch.Tensor, ...], y: torch.Tensor) -> dict[str, Any]:
        device = self.engine.device
        self._slice = None if self._group is None else batch_slice(self._group, inputs[0].shape[0], device)
        self._examples = self._batch_size(inputs[0].shape[0])
        self._loss_terms = self._examples * self.loss.positions(y)
        # (the model judged untrusted: one whole pass, then a first-order step)
        fallback = self.fallback_adam is not None or self.fallback_sgd is not None
        # Atomic until the statistics are folded: the passes change nothing of the optimizer's state but the
        # step count and the generator, which are put back when a pass raises (bad targets, say) or the
        # batch's loss or gradient is not finite.
        before = (self.steps, self.generator.get_state())
        if self.engine.fisher_parameters:
            self.engine.sampled_gradients.clear()  # (a pass that raised last step may have left some)
        self.steps += 1
        k = self.steps
        statistics = not fallback and statistics_due(k, self.stats_every)
        fused = statistics and self.fisher == "empirical"  # the labels' backward is the gradient's own
        shared = statistics and not fused and self._shares_forward(inputs, y)  # the sampled backward on its forward
        sampled = None
        try:
            if statistics and not fused and not shared:
                with self._timed("statistics"):
                    sampled = self._sampled_pass(inputs, y)
            with self._timed("gradient"):
                loss, objective, grads, records = self._gradient(inputs, y, capture=fused, sampled=shared,
                                                                 whole=fallback)
        except BaseException:
            self._restore(*before)
            raise
        if not math.isfinite(objective) or not all_finite(grads.values()):
            self._restore(*before)
            warnings.warn("K-FAC: a batch whose loss or gradient is not finite (NaN or Inf in its inputs or targets?) "
                          "was skipped; the weights and the optimizer's state are as before it", SkippedStepWarning,
                          stacklevel=2)
            return {"loss": loss, "damping": self.damping, "factor_damping": self.gamma,
                    "rejected_steps": self.rejected,
                    "skipped": "non-finite loss or gradient; the weights were left unchanged"}
        if fallback:
            return self._fallback_step(loss, grads)
        with self._timed("statistics"):
            if sampled is not None:
                self._fold(*sampled)
            elif shared and records is None:  # the halves' sites did not pair up (a data-dependent branch)
                self._fold(*self._sampled_pass(inputs, y))
            elif shared:  # every example's sites, g of the statistics loss over the whole batch
                self._fold(records, self._examples)
            elif fused:  # rows tau_1 of the labels' own pass; captured g is of the mean loss over n
                n = inputs[0].shape[0]
                index = subset(self._batch_size(n), self.stats_fraction, self.generator, self._min_stats_examples(y))
                if self._slice is not None:  # this rank's rows of the global batch's subset
                    index = self._slice.members(index).rows
                self._fold(records, n, index, grad_scale=n * self.loss.statistics_scale(y))
        if self.damping is None:
            self._initial_damping()
        floor = self.loss.rounding_floor(y)  # the loss's float32 error however small it gets
        frozen = self.engine.frozen()
        if frozen and self.previous is not None:  # a layer frozen since the last step keeps no momentum
            self.previous = {name: torch.zeros_like(v) if name in frozen else v for name, v in self.previous.items()}
        info: dict[str, Any] = {"loss": loss, "damping": self.damping, "factor_damping": self.gamma,
                                "rejected_steps": self.rejected}
        gammas = [self.gamma]
        if self.adapt_gamma and k >= self.next_gamma_round:
            if not self._batch_is_noise():
                power = gamma_power(self.gamma_streak, self.settings.lm_acceleration)
                gammas = gamma_candidates(self.gamma, self.gamma_interval, power)
            self.next_gamma_round = k + self.gamma_interval
        # A layer first seen late (a branch taken, a layer unfrozen) is inverted as soon as it has statistics.
        refresh = (inverses_due(k, self.inverse_every) or len(gammas) > 1 or self._gamma_moved()
                   or bool(self.curvature.uninverted()))
        # Parameters outside every block, and those of layers with no statistics yet, step on their own.
        uncovered = self.unmatched + [name for layer in self.curvature.unestimated() for name in layer.parameter_names]
        uncovered = [name for name in uncovered if name not in frozen]
        diagonal = [name for name in uncovered if name in self.unmatched_fisher]  # in K-FAC's proposal, diagonal F
        fallback = self._unmatched_direction(grads, [name for name in uncovered if name not in self.unmatched_fisher])
        fallback.update(self._diagonal_proposal(grads, diagonal, self.gamma))  # and a length of their own beside it
        left_out = set(uncovered) | frozen  # not in the blocks' proposal (a frozen layer's low-rank product is not 0)
        probe = self._probes_unmatched(fallback)
        # Without re-scaling, the bias-free layers' heavy ball runs fused on the kernel where Triton is picked (not
        # on FSDP's gathered weights, whose update must reach the shards too).
        unfused = self.rescale or self.engine.sharded is not None
        fused, rest = ([], self.curvature) if unfused else fused_layers(self.engine, self.curvature, grads, self._rows,
                                                                        left_out)
        weighted = grads  # the gradient where computed weights' blocks read it: in their W's coordinates
        params = self.engine.parameters() if self.normed else {}  # (the weights before this step: the maps' point)
        sigmas = spectral_sigmas(self.module, self.normed) if self.normed else {}
        if self.normed:
            weighted = self._weight_coordinates(grads, params, sigmas)
            if self._half_difference is not None:
                self._half_difference = self._weight_coordinates(self._half_difference, params, sigmas)
        best = kept = None
        tangent_cache: dict[str, Any] = {}
        lr = self.lr
        for gamma in gammas:
            with self._timed("inverses"):
                inverses = self._invert(gamma) if refresh else self.curvature.current()
            with self._timed("precondition"):
                # once a step at most, gamma's inverses; every signal_every-th step once measured
                signal = gamma == gammas[0] and self._half_difference is not None and self._measures_signal()
                right_rows: dict[str, torch.Tensor] | None = {} if signal else None
                proposal = {name: value for name, value in self._proposal(weighted, inverses, rest, right_rows).items()
                            if name not in left_out}
                if signal:
                    self._update_signal(weighted, proposal, inverses, right_rows)
                if self.normed:  # computed weights' Delta W as (dg, dv) or dW_o
                    proposal = spectral_norm.parameter_coordinates(proposal, sigmas, self.normed)
                    proposal = {name: value for name, value in parameter_coordinates(
                        proposal, params, self.normed).items() if name not in left_out}
                proposal.update(self._diagonal_proposal(grads, diagonal, gamma))
                share = self._signal_share()
                if share is not None:
                    lr = self.lr * (UNHALVED_NORMALISED_SCALE if self._unhalved_normalised() else (1 + share) / 2)
                    info["signal"] = share
            with self._timed("qmodel"):
                update, figures, decrease = self._final_update(inputs, grads, proposal, fallback if probe else {},
                                                               tangent_cache, lr, objective)
            if best is None or decrease < best[3]:
                best = (gamma, inverses, update, decrease, figures)
            if kept is None:
                kept = best
        if self.settings.keep_damping_at_rounding and -best[3] <= rounding_of_h(objective, floor):
            best = kept  # every candidate's predicted effect on h is rounding noise: the choice would be too
        gamma, inverses, update, decrease, figures = best
        if fallback:
            self._back_off_unmatched(probe, figures)
        if self.settings.unmatched_adam_lr is not None:
            update = self._with_unmatched_adam(update, grads, figures, frozen)
        if len(gammas) > 1:
            self.gamma_streak = gamma_streak(self.gamma_streak, gammas.index(gamma))
            self.gamma_interval = gamma_interval(self.gamma_interval, self.gamma_streak, self.gamma_every,
                                                 self.settings.max_gamma_every)
            self.next_gamma_round = k + self.gamma_interval
        info.update(figures, model_decrease=decrease)
        if not all_finite(update.values()):
            info["skipped"] = "non-finite update; the weights were left unchanged"
            return info
        self.gamma = gamma
        self.curvature.adopt(inverses)
        if refresh:
            self.inverted_gamma = gamma
        check = self.adapt_damping and k % self.damping_every == 0
        saved = {n: p.clone() for n, p in self.engine.parameters().items()} if check and self.settings.reject_steps else None
        with self._timed("update"):
            self.engine.add_(update)
            if fused:  # lr Delta + momentum previous and theta += it, in the kernel's epilogue (runtime/fused_step.py)
                momentum = self.momentum if isinstance(self.momentum, (int, float)) else 0.0
                update = {**update, **fused_heavy_ball_(self.engine, self.curvature, fused, grads, inverses,
                                                        self.previous, lr, momentum, self._rows)}
        self.previous = update
        if check:
            with self._timed("damping"):
                info["rho"], after = self._adapt_damping(inputs, y, objective, decrease, floor)
            if saved is not None and self._wrecks(info["rho"], objective, after, decrease, floor):
                self._reject(saved)
                info["rejected"] = True
            self._watch_early_rho(info["rho"])
        if not self.adapt_gamma and self.settings.factor_damping is None:
            self.gamma = math.sqrt(self.damping + self.weight_decay)  # sec 6.3: gamma follows lambda
        info["factor_damping"] = self.gamma
        info["damping"] = self.damping
        info["rejected_steps"] = self.rejected
        if self.auto_gathering or self.gatherer.count > 1:
            info["batches"] = self.gatherer.united
        share = self._signal_share() if self.auto_gathering else None
        if share is not None:  # the next union's size, from this one's noise
            self.gatherer.count = auto_count(self.gatherer.united, share)
        return info

    def _fallback_step(self, loss: float, grads: Direction) -> dict[str, Any]:
        """Adam's or SGD's step (``untrusted_fallback``) on every trainable parameter, once the first steps found the
        quadratic model untrusted (``_watch_early_rho``): after one gradient pass on the whole batch; no statistics,
        inverses or model. ``info`` says which ("adam" or "sgd": True)."""
        frozen = self.engine.frozen()
        grads = {name: grad for name, grad in grads.items() if name not in frozen}
        with self._timed("update"):
            if self.fallback_sgd is not None:
                self.engine.add_(nesterov_steps(self.fallback_sgd, grads, self.settings.untrusted_sgd_lr))
            else:
                self.engine.add_(adam_steps(self.fallback_adam, grads, self.settings.untrusted_adam_lr))
        return {"loss": loss, "sgd" if self.fallback_sgd is not None else "adam": True, "damping": self.damping,
                "factor_damping": self.gamma, "rejected_steps": self.rejected}

    def _weight_coordinates(self, grads: Direction, params: Direction, sigmas: Direction) -> Direction:
        """``grads`` with each computed weight's gradient added under its name (weight norm's, spectral norm's)."""
        return spectral_norm.weight_coordinates(weight_coordinates(grads, params, self.normed), sigmas, self.normed)

    def _invert(self, gamma: float) -> Any:
        """Every layer's damped inverses for gamma: here, or data-parallel each rank its share and one all_reduce."""
        shares = self._output_g_shares()
        if self._group is None:
            return self.curvature.invert(gamma, g_shares=shares)
        return invert_across_ranks(self.curvature, gamma, self.inverse_owners, self._group, shares)

    def _unhalved_normalised(self) -> bool:
        """Whether no batch has been halved yet and this one was not, on a module with batch norm: the step then
        takes ``UNHALVED_NORMALISED_SCALE`` of the quadratic model's, not the (1 + 0) / 2 of an unmeasured s."""
        return self.signal is None and self._unhalved and self.module is not None and self._batch_norm

    def _batch_is_noise(self) -> bool:
        """Whether the share of signal is below ``gamma_rule_min_signal`` (the gamma rule then skips its round)."""
        least, share = self.settings.gamma_rule_min_signal, self._signal_share()
        return least is not None and share is not None and share < least

    def _output_g_shares(self) -> dict[str, float] | None:
        """By output layer, the least fraction of its G's trace that damps G, (1 - s) / R (``output_noise_damping``;
        R its rows in this step's batch, s the share of signal, 0 on a batch of one); None with the setting off or s
        not yet measured."""
        share = self._signal_share()
        if not self.settings.output_noise_damping or share is None or not self._examples:
            return None
        noise = 1.0 - share
        return {name: noise / (self._examples * self._rows_per_example.get(name, 1.0)) for name in self.output_layers}

    def _batch_size(self, n: int) -> int:
        """The number of examples of the batch the step is on: n, or data-parallel the global batch's."""
        return n if self._slice is None else self._slice.total

    def _sampled_pass(self, inputs, y) -> tuple[Mapping[str, list], int]:
        """The statistics pass with sampled targets on tau_1 of the batch (data-parallel: this rank's members of
        the global batch's subset, runtime/data_parallel.py): the captured sites and their number of examples."""
        minimum = self._min_stats_examples(y)
        if self._slice is None:
            return self.engine.sampled_pass(inputs, self.stats_fraction, self.generator, minimum)
        return self.engine.sampled_pass_of_slice(inputs, self._slice, self.stats_fraction, self.generator, minimum)

    def _min_stats_examples(self, y: torch.Tensor) -> int:
        """The statistics' floor in examples: ``min_stats_examples`` loss terms, each position of a sequence
        one term (its target is sampled on its own). Measured on the first-try suite's character LM (batch
        32 x 64 tokens): 4 sequences instead of all 32 gave 1.71 against 1.88 at 60 s, no step rejected."""
        return max(1, math.ceil(self.settings.min_stats_examples / self.loss.positions(y)))

    def _restore(self, steps: int, generator_state: torch.Tensor) -> None:
        """Put back what a step's passes change before its statistics are folded (step() is atomic until then)."""
        self.steps = steps
        self.generator.set_state(generator_state)

    def _initial_damping(self) -> None:
        """lambda (and gamma = sqrt(lambda + eta)) from the curvature's own scale, at the first step."""
        scale = curvature_scale(self.blocks.values())
        if not math.isfinite(scale) or scale <= 0:
            scale = 1.0  # no layer has statistics yet (all unmatched, or every row refused)
        self.damping = max(self.min_damping, self.settings.relative_damping * scale)
        if self.gamma is None:
            self.gamma = math.sqrt(self.damping + self.weight_decay)

    def _gamma_moved(self) -> bool:
        """Whether gamma has moved by more than ``refresh_ratio`` since the inverses in use were made."""
        ratio = self.settings.refresh_ratio
        if ratio is None or self.inverted_gamma is None:
            return False
        return max(self.gamma / self.inverted_gamma, self.inverted_gamma / self.gamma) > ratio

    def _wrecks(self, rho: float, before: float, after: float, decrease: float, floor: float) -> bool:
        """A step is undone when h rose by more than ``reject_rise`` |h| (or rho is below ``reject_rho``, if set),
        unless the step and its prediction are below h's rounding (``keep_damping_at_rounding``): a fitted batch's
        h moves by its float32 steps, and rho with it."""
        s = self.settings
        if not math.isfinite(after):
            return True
        if s.keep_damping_at_rounding and below_rounding(before, after, decrease, floor):
            return False
        return (s.reject_rho is not None and rho < s.reject_rho) or after - before > s.reject_rise * abs(before)

    def _reject(self, saved: Direction) -> None:
        """Put the weights back as they were before the step, forget it as momentum, and raise lambda by
        1/omega1^lm_acceleration beyond the LM rule's own growth, to at least ``reject_damping_floor`` times the
        curvature's scale."""
        self.engine.set_(saved)
        self.previous = None
        self.rejected += 1
        self.damping /= lm_omega(self.damping_every) ** self.settings.lm_acceleration
        floor = self.settings.reject_damping_floor
        if floor is not None:
            self.damping = max(self.damping, floor * curvature_scale(self.blocks.values()))

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start

    # -- pieces -------------------------------------------------------------------------------------
    def _fold(self, records: Mapping[str, list], batch_size: int, index: torch.Tensor | None = None,
              grad_scale: float | None = None) -> None:
        """Fold the captured sites (rows ``index`` of the batch) into the factors' EMAs (data-parallel: the
        ranks' factors averaged, runtime/data_parallel.py)."""
        self.stats_updates += 1
        decay = ema_decay(self.stats_updates, self.ema_decay)
        self._fold_unmatched_fisher(decay)
        self._rows_per_example = {name: rows_per_example(sites, batch_size) for name, sites in records.items() if sites}
        if self._slice is None:
            self.curvature.fold(records, batch_size, decay, index, grad_scale, self.row_subset)
            seen = [name for name in self.blocks if records.get(name)]
        else:
            seen = fold_across_ranks(self.curvature.blocks, records, batch_size, index, grad_scale, decay, self._slice,
                                     self.settings.factor_dtype, self.engine.device,
                                     dtype_named(self.settings.communication_dtype), self.row_subset)
        if self.stats_updates == 1:
            unseen = [name for name in self.blocks if name not in seen]
            if unseen:
                warnings.warn(
                    f"K-FAC: the layers {unseen} of the plan were not seen in the forward pass (called inside a "
                    "function that dispatches on its own, such as nn.MultiheadAttention with bias_k/bias_v or "
                    "add_zero_attn, an embedding with sparse=True, max_norm or scale_grad_by_freq, which is not "
                    "the plan's linear map, or not called); they have no curvature and take the plain gradient "
                    "direction. compile(..., engine='onnxruntime') sees them in the graph",
                    StatisticsWarning,
                    stacklevel=3,
                )

    def _shares_forward(self, inputs, y) -> bool:
        """Whether this step's statistics pass takes the whole batch and can run on the gradient's own forward
        (``shared_statistics_forward``): the sampled targets' backward then runs before the gradient's on the same
        graph, one forward a step saved. Not data-parallel, not with the tridiagonal structure (its cross moments)
        nor where low-rank products capture the gradient's own sites; the torch engine only."""
        n = inputs[0].shape[0]
        return (self.settings.shared_statistics_forward and getattr(self.engine, "name", "") == "torch"
                and self._slice is None and self.structure == "diagonal"
                and whole_batch(n, self.stats_fraction, self._min_stats_examples(y)) and not self._low_rank_layers(n))

    def _statistics_loss(self, outputs: torch.Tensor) -> torch.Tensor:
        """The loss of targets sampled from the model at ``outputs`` (the statistics pass's, paper sec 5)."""
        return self.loss.statistics_loss(outputs, self.loss.sample_targets(outputs, self.generator))

    def _gradient(self, inputs, y, capture: bool = False, sampled: bool = False,
                  whole: bool = False) -> tuple[float, float, Direction, Any]:
        """Loss, objective h, grad h on the whole batch and the captured sites (with ``capture``, for
        fisher="empirical", whose statistics come from this same forward and backward; with ``sampled``, those
        of the sampled targets' backward on the same forward: ``_shares_forward``; with ``whole``, none: one pass,
        no halves)."""
        n = inputs[0].shape[0]
        low_rank = () if whole else self._low_rank_layers(n)
        statistics_loss = self._statistics_loss if sampled else None
        self._half_difference = None
        self._rows, self._difference_rows = {}, {}
        halves = self.settings.signal_scaling and self.rescale and not capture and not whole and (
            self._measures_signal() or self._batch_norm)  # (batch norm: the halves' statistics every step, one loss)
        keep = not whole and self._keep_outputs(n, halves)
        randomness = self.engine.random_state() if hasattr(self.engine, "random_state") else None
        self._parts = [(0, n, 1.0 if self._slice is None else self._slice.weight)]
        if self._slice is not None:
            pieces = self._slice.halves(self._batch_norm) if halves else None
            result = self._gradient_across_ranks(inputs, y, capture, pieces)
        elif halves and n >= fewest_to_halve(self._batch_norm):
            result = self._gradient_of_halves(inputs, y, low_rank, keep, statistics_loss)
        else:
            result = self.engine.gradient_pass(inputs, y, capture=capture or bool(low_rank), keep_outputs=keep,
                                               layers=None if capture or sampled else low_rank,
                                               **({"statistics_loss": statistics_loss} if sampled else {}))
            if low_rank:
                self._rows = low_rank_rows(self.curvature.blocks, result.records, n)
        self._unhalved = halves and self._half_difference is None
        self._pass_outputs = result.outputs
        self._randomness = randomness if randomness is not None and randomness.drawn() else None
        grads: Direction = {}
        for name, param in self.engine.parameters().items():
            grad = result.grads[name]
            if self.weight_decay:
                grad = grad + self.weight_decay * param
            grads[name] = grad
        return result.loss, result.loss + 0.5 * self.weight_decay * self._squared_norm(), grads, result.records

    def _squared_norm(self) -> float:
        """|theta|^2 for the weight decay's term of h (0 without weight decay): summed on the device, one host read."""
        if not self.weight_decay:
            return 0.0
        total = None
        for param in self.engine.parameters().values():
            square = param.double().pow(2).sum()
            total = square if total is None else total + square
        return 0.0 if total is None else float(total)

    def _gradient_of_halves(self, inputs, y, low_rank: tuple[str, ...], keep_outputs: bool = False,
                            statistics_loss: Any = None) -> GradientPass:
        """The batch's loss and gradient as the weighted mean of its two halves' (two half passes cost about
        one whole one); keeps (g_A - g_B) / 2 for the share of signal (``signal_scaling``). Batch norm sees
        each half as a batch. The ``low_rank`` layers' rows make this step's low-rank products; with
        ``keep_outputs`` the halves' outputs, stacked, where both kept them; with ``statistics_loss`` the halves'
        sites of the sampled targets' backward joined into the whole batch's (``capture.concatenated_records``;
        None where they do not pair up)."""
        n = inputs[0].shape[0]
        half = n // 2
        extra = {} if statistics_loss is None else {"statistics_loss": statistics_loss}
        layers = low_rank if statistics_loss is None else None  # the statistics capture every layer (low_rank is ())
        try:
            first, second = (
                self._pass_of_step(number, tuple(t[part] for t in inputs), y[part], capture=bool(low_rank),
                                   keep_outputs=keep_outputs, layers=layers, **extra)
                for number, part in enumerate((slice(None, half), slice(half, None)))
            )
        except KronographError:  # targets that do not fit: said of the whole batch, in the user's terms
            result = self.engine.gradient_pass(inputs, y, capture=bool(low_rank), layers=layers, **extra)
            if low_rank:
                self._rows = low_rank_rows(self.curvature.blocks, result.records, n)
            return result
        records = None if statistics_loss is None else concatenated_records([(first.records, half),
                                                                             (second.records, n - half)])
        w = half / n
        self._parts = [(0, half, w), (half, n, 1 - w)]
        if low_rank:
            self._rows, self._difference_rows = low_rank_rows_of_parts(
                self.curvature.blocks, [(first.records, half), (second.records, n - half)], [(w, 1 - w), (0.5, -0.5)])
        grads = {name: w * first.grads[name] + (1 - w) * second.grads[name] for name in first.grads}
        self._half_difference = {name: (first.grads[name] - second.grads[name]) / 2 for name in first.grads}
        outputs = (torch.cat([first.outputs, second.outputs])
                   if first.outputs is not None and second.outputs is not None else None)
        return GradientPass(w * first.loss + (1 - w) * second.loss, grads, records, outputs)

    def _pass_of_step(self, number: int, inputs, y, **options) -> GradientPass:
        """The step's ``number``-th gradient pass (from 0): after the first, the module's spectral norms run no power
        iteration, so that one step moves their vectors once however the batch is passed (halves, ranks' shares),
        and every pass divides by the same sigma."""
        held = number > 0 and self.module is not None
        with held_power_iterations(self.module) if held else contextlib.nullcontext():
            return self.engine.gradient_pass(inputs, y, **options)

    def _gradient_across_ranks(self, inputs, y, capture: bool, pieces: tuple[int, int] | None) -> GradientPass:
        """Data-parallel: the global batch's loss and gradient (and with ``pieces`` the halves' difference of
        ``signal_scaling``) from this rank's passes and one all_reduce of a flat buffer, each rank's shares weighted
        by its examples / N. The halves are the global batch's (``BatchSlice.halves``): this rank passes its
        rows of each, one pass where its slice lies in one half, so (g_A - g_B) / 2 is the single process's."""
        part = self._slice
        if pieces is None:
            result = self.engine.gradient_pass(inputs, y, capture=capture)
            shares = [(part.weight, 0.0, result)]
        else:
            total, half = part.total, part.total // 2
            bounds = [(0, pieces[0], 1 / half), (pieces[0], part.size, -1 / (total - half))]
            passed = [(start, stop, sign) for start, stop, sign in bounds if stop > start]
            shares = [((stop - start) / total, 0.5 * (stop - start) * sign,
                       self._pass_of_step(number, tuple(t[start:stop] for t in inputs), y[start:stop], capture=False))
                      for number, (start, stop, sign) in enumerate(passed)]
            self._parts = [(start, stop, (stop - start) / total) for start, stop, _ in passed]
        names = list(self.engine.parameters())
        loss = torch.tensor(sum(weight * result.loss for weight, _, result in shares), device=self.engine.device)
        grads = [sum(weight * result.grads[name] for weight, _, result in shares) for name in names]
        differences = [sum(weight * result.grads[name] for _, weight, result in shares) for name in names]
        summed = part.sum([loss, *grads, *(differences if pieces is not None else [])])
        if pieces is not None:
            self._half_difference = dict(zip(names, summed[1 + len(names):]))
        return GradientPass(float(summed[0]), dict(zip(names, summed[1:1 + len(names)])), shares[0][2].records)

    def _update_signal(self, grads: Direction, proposal: Direction, inverses, right_rows: Mapping[str, torch.Tensor]
                       ) -> None:
        """Fold this step's g^T F^-1 g and g_A^T F^-1 g_B into their EMAs. With Delta = -F^-1 g and
        d = (g_A - g_B) / 2: g^T F^-1 g - d^T F^-1 d = g_A^T F^-1 g_B, an unbiased estimate of the signal's part
        of g^T F^-1 g, whose expectation also holds the noise's tr(F^-1 Sigma) / n. d^T F^-1 d by the halves' rows
        where the proposal's low-rank product kept P A^-1 (``quadratic_form_by_rows``: no g x a solve), by the
        solve elsewhere."""
        difference = self._half_difference
        by_rows = {name: right for name, right in right_rows.items() if name in self._difference_rows
                   and all(p in proposal for p in (self.blocks[name].layer.weight, self.blocks[name].layer.bias) if p)}
        rest = self.curvature.restricted([name for name in self.blocks if name not in by_rows])
        solved = rest.direction(difference, inverses, self._difference_rows)
        products = [inner_tensor(grads, proposal), inner_tensor(difference, {n: solved[n] for n in proposal if n in solved})]
        if by_rows:
            products.append(-self.curvature.quadratic_form_by_rows(self._difference_rows, inverses, by_rows))
        together, *apart = torch.stack(products).tolist()  # one host read
        total = -together
        cross = total + sum(apart)
        if not (math.isfinite(total) and math.isfinite(cross)) or total <= 0:
            return
        if self.signal is None:
            self.signal = (total, cross)
        else:  # (the decay of signal_every steps: the EMAs keep their memory in steps)
            decay = SIGNAL_DECAY ** self.settings.signal_every
            self.signal = tuple(decay * old + (1 - decay) * new for old, new in zip(self.signal, (total, cross)))

    def _measures_signal(self) -> bool:
        """Whether this step measures s (``signal_every``). Only such steps need the gradient as two halves,
        whose two passes cost more than one whole one (0.9 ms against 1.9 on the batch-60 classifier, 17 against
        20 on the GroupNorm CNN); ``_gradient`` halves every step with batch norm, which would otherwise normalise
        over the halves on some steps and over the batch on others (two objectives: 200 fixed steps of the ResNet
        lost 0.01-0.03)."""
        return self.signal is None or self.steps % self.settings.signal_every == 0

    def _signal_share(self) -> float | None:
        """s = EMA(g_A^T F^-1 g_B) / EMA(g^T F^-1 g), clamped to [0, 1]; None before it is measured, or 0 (all
        noise, the cautious end) while no batch could be halved: a batch of one example (or of fewer than 16
        with batch norm), on which the quadratic model's step would otherwise fit that example alone."""
        if self.signal is None:
            return 0.0 if self._unhalved else None
        total, cross = self.signal
        return min(1.0, max(0.0, cross / total))

    def _keep_outputs(self, n: int, halves: bool) -> bool:
        """Whether the gradient pass keeps its outputs for the quadratic model: they are the outputs at theta
        that differences need beside their shifted forwards (one no-grad forward a step saved: 1/7 of the central
        products on the first-try transformer, 1/4 of the one-sided), where the products are differences on the
        whole batch and, where it is taken as ``halves``, the outputs have not been found to depend on how the
        batch is split (``_reusable_outputs``)."""
        return (self._slice is None and (self._outputs_split_free is not False or not halves)
                and getattr(self.engine, "resolved_products", None) in ("differences", "one-sided")
                and whole_batch(n, self.qmodel_fraction, self.settings.min_qmodel_examples))

    def _reusable_outputs(self, inputs) -> torch.Tensor | None:
        """This step's gradient-pass outputs where the quadratic model may use them for a forward at theta on
        ``inputs`` (the whole batch). The first time, a plain forward checks that they agree to rounding: a
        model whose outputs couple the examples (batch norm in training mode) gives other outputs on the halves
        than on the batch, and its outputs are then never kept again."""
        kept, self._pass_outputs = self._pass_outputs, None
        if kept is None or self._outputs_split_free or self._half_difference is None:  # (None: a whole pass's)
            return kept
        fresh = self.engine.outputs(inputs)
        if torch.isfinite(fresh).all():  # (non-finite outputs decide nothing: this step's products refuse them)
            self._outputs_split_free = bool(
                fresh.shape == kept.shape and (fresh - kept).abs().max() <= 1e-4 * fresh.abs().max())
        return kept if self._outputs_split_free else fresh

    def _low_rank_layers(self, n: int) -> tuple[str, ...]:
        """The layers that could use the low-rank product of sec 8 on a batch of n, with their rows an example as
        the last statistics pass counted them (weight decay adds a full-rank eta W to the gradient, which the
        trick cannot carry). Only these are captured on the gradient passes: a captured recurrent layer or
        attention runs rebuilt from its pieces (runtime/recurrent.py, attention.py), for nothing where the product
        does not pay."""
        if self.structure != "diagonal" or self.weight_decay or self._group is not None:  # (not data-parallel yet)
            return ()
        return tuple(name for name, block in self.curvature.blocks.items() if block.by_rows
                     and low_rank_pays(block.layer, math.ceil(n * self._rows_per_example.get(name, 1.0))))

    def _objective(self, inputs, y) -> float:
        """h at the current weights on this step's batch, measured as the gradient passes measured it: where they
        drew random numbers (dropout), with the same ones on the same parts of the batch, and where batch norm
        normalised each part on its own, on those parts; otherwise by one forward. A step's rise of h is then
        the step's own, not a new dropout mask's or batch statistics' (which undid every step of a dropout net
        once its loss was small)."""
        parts = self._parts
        split_normalised = self.module is not None and self._batch_norm and len(parts) > 1  # (torch engine only)
        if self._randomness is None and not split_normalised:  # the parts' sum is the whole batch's: one forward
            parts = [(0, inputs[0].shape[0], 1.0 if self._slice is None else self._slice.weight)]
        now = None if self._randomness is None else self.engine.random_state()
        if now is not None:
            self._randomness.replay()
        try:
            value = sum(w * self.engine.loss_value(tuple(t[a:b] for t in inputs), y[a:b]) for a, b, w in parts)
        finally:
            if now is not None:
                now.replay()  # the generators go on from where they were: this evaluation draws nothing for later
        if self._slice is not None:
            value = float(self._slice.sum([torch.tensor(value, dtype=torch.float64, device=self.engine.device)])[0])
        if self.weight_decay:
            value += 0.5 * self.weight_decay * self._squared_norm()
        return value

    def _proposal(self, grads: Direction, inverses, curvature: Any = None,
                  right_rows: dict[str, torch.Tensor] | None = None) -> Direction:
        """Delta = -F^-1 grad h for every layer of ``curvature`` (default: all; the low-rank product where this
        step's rows make it pay, keeping P A^-1 in ``right_rows`` when given)."""
        return (self.curvature if curvature is None else curvature).direction(grads, inverses, self._rows, right_rows)

    def _estimates_unmatched_fisher(self, s: KFACSettings) -> bool:
        """Whether the parameters outside every block get the diagonal of the Fisher (``unmatched_direction``
        "fisher"): with re-scaling, the sampled Fisher and no ``unmatched_adam_lr``; both engines (onnxruntime's
        sampled pass is a training step of its graph), data-parallel and FSDP2 too."""
        return (s.unmatched_direction == "fisher" and self.rescale and self.fisher == "mc" and bool(self.unmatched)
                and s.unmatched_adam_lr is None)

    def _fold_unmatched_fisher(self, decay: float) -> None:
        """Fold this step's estimate of the diagonal Fisher of the parameters outside every block into its EMA
        (the factors' decay). The sampled targets' per-example gradients have mean zero, so the mean gradient
        gbar of the statistics passes' N examples has E[N gbar^2] = diag F: unbiased, from the backward the factors
        take anyway (``statistics.fisher_diagonal``). A non-finite estimate is not folded."""
        if not self.engine.fisher_parameters:
            return
        passes = list(self.engine.sampled_gradients)
        self.engine.sampled_gradients.clear()
        if self._slice is not None:  # every rank joins, those without members of the subset too
            passes = self._pooled_across_ranks(passes)
        if not passes:
            return
        estimates = fisher_diagonal(passes)
        if not all_finite(estimates.values()):
            return
        for name, estimate in estimates.items():
            old = self.unmatched_fisher.get(name)
            self.unmatched_fisher[name] = estimate if old is None else old.mul(decay).add_(estimate, alpha=1 - decay)

    def _pooled_across_ranks(self, passes: list) -> list:
        """Data-parallel: the ranks' statistics gradients as one pass of the whole subset, sum n g / N over the
        ranks (one all_reduce), so that ``fisher_diagonal`` gives every rank the single process's estimate."""
        params, frozen = self.engine.parameters(), self.engine.frozen()  # (the same names on every rank)
        names = [name for name in self.engine.fisher_parameters if name not in frozen]
        weighted = [sum((n * grads[name] for grads, n in passes), torch.zeros_like(params[name])) for name in names]
        count = torch.tensor(float(sum(n for _, n in passes)), dtype=torch.float64, device=self.engine.device)
        *summed, total = self._slice.sum([*weighted, count])
        total = int(round(float(total)))
        return [({name: value / total for name, value in zip(names, summed)}, total)] if total else []

    def _diagonal_proposal(self, grads: Direction, names: Sequence[str], gamma: float) -> Direction:
        """K-FAC's proposal for the parameters outside every block with the diagonal Fisher (``unmatched_direction``
        "fisher"): -g / (F_ii + gamma^2). The blocks' factored damping stands in for the Tikhonov term gamma^2 I
        (gamma = sqrt(lambda + eta), sec 6.3) that a Kronecker product cannot take; a diagonal takes it exactly.
        (The factored form of a diagonal, (sqrt(F_ii) + gamma)^2, damps harder: the character LM 0.07 worse at 300
        steps; in the proposal alone, without the length of their own, the tied word LM 0.24 worse, BENCHMARKS.md.)"""
        return {name: -grads[name] / (self.unmatched_fisher[name] + gamma * gamma) for name in names}

    def _unmatched_direction(self, grads: Direction, names: Sequence[str]) -> Direction:
        """The step direction of the parameters outside every Kronecker block (norms, embeddings, tied
        weights): -grad h, or with ``unmatched_direction="rms"`` (and re-scaling on) -grad h / sqrt(v), v the
        EMA (decay 0.999) of grad^2: RMSprop's per-coordinate shape, whose length the quadratic model still
        chooses (its coefficient), so no learning rate enters. Updates v: call once per step."""
        if self.settings.unmatched_direction == "gradient" or not self.rescale:
            return {name: -grads[name] for name in names}
        direction = {}
        for name in names:
            grad = grads[name]
            v = self.unmatched_moments.get(name)
            if v is None:
                v = grad.square()
            else:  # starts again at the gradient while v is all zero (a layer not called had none): no host read
                v = torch.where(v.any(), torch.addcmul(v * UNMATCHED_DECAY, grad, grad, value=1 - UNMATCHED_DECAY),
                                grad.square())
            self.unmatched_moments[name] = v
            # |grad| / sqrt(v) <= 1 / sqrt(1 - decay) where v > 0; a coordinate that never had a gradient stays.
            direction[name] = torch.where(v > 0, -grad * v.rsqrt(), torch.zeros_like(grad))
        return direction

    def _with_unmatched_adam(self, update: Direction, grads: Direction, figures: dict, frozen: set[str]) -> Direction:
        """``update`` with Adam's step (``unmatched_adam_lr``; moments 0.9 / 0.999, bias-corrected) for the parameters
        outside every block where the quadratic model left them where they are (coefficient 0 or left out): the
        steady step a ViT's positions and class token need and the model does not give them on most batches (a
        character LM's positions, which the model moves on most steps, keep its steps). Updates the moments of every
        such parameter: call once per step."""
        names = [name for name in self.unmatched if name not in frozen]
        steps = adam_steps(self.unmatched_adam, {name: grads[name] for name in names}, self.settings.unmatched_adam_lr)
        if figures.get("unmatched_scale", 0.0) != 0.0 or not names:
            return update
        figures["unmatched_adam"] = True
        return {**update, **{name: update[name] + steps[name] for name in names}}

    def _probes_unmatched(self, fallback: Direction) -> bool:
        """Whether this step's quadratic model takes the unmatched direction (``unmatched_backoff``): always while
        it holds a layer's parameters that have no statistics yet (a layer first called late)."""
        return bool(fallback) and (self.settings.unmatched_backoff is None or not self.rescale
                                   or self.unmatched_rest == 0 or not set(fallback) <= set(self.unmatched))

    def _back_off_unmatched(self, probed: bool, figures: dict) -> None:
        """Count down a left-out step, or after a step that took the unmatched direction: when its coefficient
        has come out 0 (the bound of ``descent_only``) N times in a row, leave it out for the next N steps, then
        try it again. The model then finds the direction of no use beside the proposal and momentum (the
        GroupNorm CNN's affine parameters: 0 on every step), and each left-out step saves a forward. Where zeros
        come in shorter runs (a text LM's norms and positions: 0 on ~45% of steps) the direction stays in."""
        cap = self.settings.unmatched_backoff
        if cap is None or not self.rescale:  # (without re-scaling the direction is in every heavy-ball step)
            return
        if not probed:
            self.unmatched_rest -= 1
            figures["unmatched_scale"] = 0.0
            return
        self.unmatched_zeros = self.unmatched_zeros + 1 if figures["unmatched_scale"] == 0 else 0
        self.unmatched_rest = cap if self.unmatched_zeros >= cap else 0

    def _coefficient_bounds(self, labels: Sequence[str]) -> list[tuple[float, float]] | None:
        """Bounds of the quadratic model's coefficients: alpha and the unmatched step's >= 0 (``descent_only``),
        mu in [0, ``max_momentum``]; None for the paper's unbounded model."""
        s = self.settings
        if not s.descent_only and s.max_momentum is None:
            return None
        free = (-math.inf, math.inf)
        largest = s.max_momentum
        if largest is not None and s.unit_momentum_below is not None and self._loss_terms < s.unit_momentum_below:
            largest = min(largest, 1.0)
        return [(free if largest is None else (0.0, largest)) if label == "mu"
                else (0.0, math.inf) if s.descent_only else free for label in labels]

    def _final_update(self, inputs, grads: Direction, proposal: Direction, fallback: Direction,
                      cache: dict, lr: float, objective: float) -> tuple[Direction, dict, float]:
        """delta from Delta: re-scaled and with momentum (sec 6.4, 7), or lr * (Delta + heavy ball)."""
        if not self.rescale:
            momentum = self.momentum if isinstance(self.momentum, (int, float)) else 0.0
            return heavy_ball({**proposal, **fallback}, lr, momentum, self.previous), {}, 0.0
        directions: list[Direction] = [proposal]
        labels = ["alpha"]
        if fallback:
            directions.append(fallback)
            labels.append("unmatched_scale")
        if self.momentum == "qmodel" and self.previous is not None:
            directions.append(self.previous)
            labels.append("mu")
        gram_f = self._fisher_gram(inputs, directions, cache)
        gram_i = torch.stack([torch.stack([inner_tensor(a, b) for b in directions]) for a in directions])
        gradient = torch.stack([inner_tensor(grads, d) for d in directions])
        bounds = self._coefficient_bounds(labels)
        credible = largest_credible_decrease(objective) if self.settings.bound_model_decrease else None
        solution = solve_quadratic_model(gram_f, gram_i, gradient, self.damping + self.weight_decay, bounds,
                                         self.settings.max_condition, credible)
        solution, logit_change = self._within_logit_bound(solution, cache, lr, gram_f, gram_i, gradient)
        figures = dict(zip(labels, solution.coefficients))
        if logit_change is not None:
            figures["logit_change"] = logit_change
        figures.setdefault("mu", 0.0)
        update: Direction = {name: torch.zeros_like(param) for name, param in self.engine.parameters().items()}
        for coefficient, direction in zip(solution.coefficients, directions):
            for name, value in direction.items():
                update[name] += (lr * coefficient) * value
        # M(lr c) - M(0) = lr (2 - lr) (M(c) - M(0)) at the minimiser c: the decrease of the applied update.
        return update, figures, solution.decrease * lr * (2 - lr)

    def _within_logit_bound(self, solution: QuadraticSolution, cache: dict, lr: float, gram_f: torch.Tensor,
                            gram_i: torch.Tensor, gradient: torch.Tensor) -> tuple[QuadraticSolution, float | None]:
        """The solution shortened (its coefficients times one t < 1) so that the applied step's linearised change
        of no row's logits on the quadratic model's rows (lr sum_a c_a J d_a, J d_a in ``cache["tangents"]``)
        exceeds the row's room: its logits' own spread, capped at the largest spread of the first step's rows
        (``initial_logit_spread``), and at least ``max_logit_change``. Returns it with the largest change over its
        room after it (1: the bound shortened the step); (solution, None) where the bound is off or the loss has
        no logits (``Loss.saturates``). Data-parallel: the largest over the ranks' rows (one all_reduce; two on the
        first step), so every rank shortens alike."""
        least = self.settings.max_logit_change
        if least is None or not self.loss.saturates:
            return solution, None
        if "room" not in cache:  # the rows' room, shared by the gamma candidates (their outputs are the same)
            cache["room"] = self._logit_room(cache.get("outputs"), least)
        room = cache["room"]
        ratio = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        terms = [(lr * c) * t for c, t in zip(solution.coefficients, cache.get("tangents") or []) if c]
        if terms and room is not None:
            ratio = (self.loss.logit_spread(sum(terms[1:], terms[0])).double() / room).max()
        if self._slice is not None:
            ratio = self._slice.largest(ratio)
        value = float(ratio)
        if not value > 1:  # (a NaN change: the non-finite update is refused after the model)
            return solution, value
        return scaled(solution, 1 / value, gram_f, gram_i, gradient, self.damping + self.weight_decay), 1.0

    def _logit_room(self, outputs: torch.Tensor | None, least: float) -> torch.Tensor | None:
        """Each row's room (``_within_logit_bound``), None where this rank has no rows; the first call also keeps
        the largest spread of its rows (over the ranks: one all_reduce) as ``initial_logit_spread``."""
        spread = None if outputs is None else self.loss.logit_spread(outputs).double()
        if self.initial_logit_spread is None:
            first = torch.zeros((), dtype=torch.float64, device=self.engine.device)
            if spread is not None and spread.numel():
                first = spread.max()
            if self._slice is not None:
                first = self._slice.largest(first)
            if math.isfinite(float(first)):  # (non-finite logits: the step is refused after the model)
                self.initial_logit_spread = float(first)
        if spread is None:
            return None
        room = spread if self.initial_logit_spread is None else spread.clamp(max=self.initial_logit_spread)
        return room.clamp(min=least)

    def _fisher_gram(self, inputs, directions: list[Direction], cache: dict) -> torch.Tensor:
        """d_a^T F d_b on the tau_2 subset; ``cache`` keeps the subset, its outputs and the tangents of the
        directions after the first, which the gamma candidates share. Data-parallel: this rank's members' sums
        (zeros where it has none), added up by one all_reduce, over the subset's size."""
        if "inputs" not in cache:
            index = subset(self._batch_size(inputs[0].shape[0]), self.qmodel_fraction, self.generator,
                           self.settings.min_qmodel_examples)
            if self._slice is None:
                cache["inputs"] = inputs if index is None else tuple(t[index] for t in inputs)
            else:
                members = self._slice.members(index)
                cache["count"] = members.count
                cache["inputs"] = (inputs if members.rows is None else tuple(t[members.rows] for t in inputs)
                                   if members.local else None)
        cache["tangents"] = None  # J d of each direction on the rows, for _within_logit_bound
        if cache["inputs"] is None:
            local = torch.zeros(len(directions), len(directions), dtype=torch.float64, device=self.engine.device)
        else:
            if "outputs" not in cache:  # the first candidate: every direction in one pass
                reused = self._reusable_outputs(inputs) if cache["inputs"] is inputs else None
                outputs, tangents = self.engine.output_tangents(cache["inputs"], directions, reused)
                cache["outputs"], cache["shared"] = outputs, tangents[1:]  # shared by the other gamma candidates
            else:
                outputs, tangents = self.engine.output_tangents(cache["inputs"], directions[:1], cache["outputs"])
                tangents = tangents + cache["shared"]
            outputs = cache["outputs"]
            cache["tangents"] = tangents
            if self._slice is None:
                return curvature_gram(self.loss, outputs, tangents)
            local = curvature_gram_sum(self.loss, outputs, tangents)
        return self._slice.sum([local])[0] / cache["count"]

    def _watch_early_rho(self, rho: float) -> None:
        """Judge the quadratic model once, on the median rho of the first ``untrusted_steps`` steps that measured it:
        below ``untrusted_rho`` (``untrusted_rho_batch_norm`` on a model with batch norm) the model over-predicts its
        steps' decrease: near 0, lambda grows without end and the steps stay too short to train (torchvision's
        RegNet and ShuffleNet); at 0.3-0.4 on batch-norm nets they train but buy too little for a step that costs
        5-6 gradient passes (ResNet-18, MobileNetV3). Without batch norm a rho of 0.3-0.5 is the dropout CNN's, its
        model's products on fresh masks, and its steps pay (BENCHMARKS.md). Then first-order steps go on
        (``untrusted_fallback``: SGD with Nesterov momentum on batch-norm nets, where it trains further than Adam,
        Adam on others; with its learning rate off, K-FAC's), and the user is told (UntrustedModelWarning) rather
        than left with a slow loss. A rho that is not finite (no decrease was predicted) is not counted."""
        threshold, count = self.settings.untrusted_rho, self.settings.untrusted_steps
        if threshold is not None and self._graph_batch_norm and self.settings.untrusted_rho_batch_norm is not None:
            threshold = self.settings.untrusted_rho_batch_norm
        if self._early_rhos is None or threshold is None or not math.isfinite(rho):
            return
        self._early_rhos.append(rho)
        if len(self._early_rhos) < count:
            return
        middle = median(self._early_rhos)
        self._early_rhos = None  # judged once
        if middle >= threshold:
            return
        sgd = self.settings.untrusted_fallback == "sgd" or (self.settings.untrusted_fallback == "auto"
                                                            and self._graph_batch_norm)
        lr = self.settings.untrusted_sgd_lr if sgd else self.settings.untrusted_adam_lr
        name = "untrusted_sgd_lr" if sgd else "untrusted_adam_lr"
        if lr is not None and sgd:
            self.fallback_sgd = {}
        elif lr is not None:
            self.fallback_adam = {}
        then = (f"from the next step on it steps with {'SGD with Nesterov momentum 0.9' if sgd else 'Adam'} (lr "
                f"{lr:g}) on every parameter ({name}; None keeps K-FAC's steps)" if lr is not None
                else "train it with SGD with momentum or Adam")
        warnings.warn(
            f"K-FAC: over its first {count} steps the quadratic model predicted the loss badly (median rho "
            f"{middle:.3g}, lambda now {self.damping:.3g}): K-FAC's curvature does not describe this model's loss and "
            f"its steps buy too little for their cost, so {then}. Deep nets with batch norm in training mode do this "
            "(BENCHMARKS.md, torchvision's classifiers); K-FAC trains them with GroupNorm in place of BatchNorm",
            UntrustedModelWarning, stacklevel=4)

    def _adapt_damping(self, inputs, y, objective: float, decrease: float, floor: float) -> tuple[float, float]:
        """Levenberg-Marquardt (6.5): lambda *= omega1 when rho > 3/4, /= omega1 when rho < 1/4 (moves of up to
        omega1^lm_acceleration after consecutive equal verdicts). Returns rho and h after the step."""
        after = self._objective(inputs, y)
        rho = (after - objective) / decrease if decrease < 0 and math.isfinite(after) else -math.inf
        if (self.settings.keep_damping_at_rounding and below_rounding(objective, after, decrease, floor)
                and not rho > TRUSTED_RHO):
            return rho, after  # rho is rounding noise: lambda and the LM streak stay, unless h fell as predicted
        self.damping, self.streak = accelerated_levenberg_marquardt(
            self.damping, rho, lm_omega(self.damping_every), self.streak, self.settings.lm_acceleration,
            self.min_damping)
        return rho, after

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: factors, inverses, damping, momentum, RNG."""
        return {
            "steps": self.steps,
            "stats_updates": self.stats_updates,
            "damping": self.damping,
            "gamma": self.gamma,
            "rejected": self.rejected,
            "streak": self.streak,
            "gamma_streak": self.gamma_streak,
            "gamma_interval": self.gamma_interval,
            "next_gamma_round": self.next_gamma_round,
            "inverted_gamma": self.inverted_gamma,
            "previous": None if self.previous is None else {n: t.clone() for n, t in self.previous.items()},
            "unmatched_moments": {n: t.clone() for n, t in self.unmatched_moments.items()},
            "unmatched_fisher": {n: t.clone() for n, t in self.unmatched_fisher.items()},
            "unmatched_adam": {n: (m.clone(), v.clone(), t) for n, (m, v, t) in self.unmatched_adam.items()},
            "fallback_adam": None if self.fallback_adam is None else {
                n: (m.clone(), v.clone(), t) for n, (m, v, t) in self.fallback_adam.items()},
            "fallback_sgd": None if self.fallback_sgd is None else {n: b.clone() for n, b in self.fallback_sgd.items()},
            "unmatched_backoff": (self.unmatched_zeros, self.unmatched_rest),
            "signal": self.signal,
            "initial_logit_spread": self.initial_logit_spread,
            "curvature": self.curvature.state_dict(),
            "generator": self.generator.get_state(),
            "row_generator": self.row_generator.get_state(),
            "gathered": self.gatherer.state_dict(),
            "gather_count": self.gatherer.count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self.blocks) - set(state["curvature"]["blocks"])
        if missing:
            raise KronographError(f"the optimizer state has no blocks for layers {sorted(missing)}; it is from another model")
        device = self.engine.device  # the generator's state stays a host byte tensor, whatever its device
        state = {key: value if key.endswith("generator") else on_device(value, device) for key, value in state.items()}
        self.steps, self.stats_updates = int(state["steps"]), int(state["stats_updates"])
        self.damping = None if state["damping"] is None else float(state["damping"])
        self.gamma = None if state["gamma"] is None else float(state["gamma"])
        self.rejected, self.streak = int(state.get("rejected", 0)), int(state.get("streak", 0))
        self._early_rhos = [] if self.steps == 0 else None  # a resumed run is not judged on its first steps again
        self.inverted_gamma = state.get("inverted_gamma")
        self.gamma_streak = int(state.get("gamma_streak", 0))
        self.gamma_interval = int(state.get("gamma_interval", self.gamma_every))
        self.next_gamma_round = int(state.get("next_gamma_round", (self.steps // self.gamma_every + 1) * self.gamma_every))
        self.previous = None if state["previous"] is None else {n: t.clone() for n, t in state["previous"].items()}
        self.unmatched_moments = {n: t.clone() for n, t in state.get("unmatched_moments", {}).items()}
        self.unmatched_fisher = {n: t.clone() for n, t in state.get("unmatched_fisher", {}).items()}
        self.unmatched_adam = {n: (m.clone(), v.clone(), int(t))
                               for n, (m, v, t) in state.get("unmatched_adam", {}).items()}
        self.unmatched_zeros, self.unmatched_rest = (int(v) for v in state.get("unmatched_backoff", (0, 0)))
        fallback = state.get("fallback_adam")
        self.fallback_adam = None if fallback is None else {n: (m.clone(), v.clone(), int(t))
                                                            for n, (m, v, t) in fallback.items()}
        fallback = state.get("fallback_sgd")
        self.fallback_sgd = None if fallback is None else {n: b.clone() for n, b in fallback.items()}
        signal = state.get("signal")
        self.signal = None if signal is None else tuple(float(v) for v in signal)
        spread = state.get("initial_logit_spread")  # (an older checkpoint: taken afresh at the next step)
        self.initial_logit_spread = None if spread is None else float(spread)
        self.curvature.load_state_dict(state["curvature"])
        self.gatherer.load_state_dict(state.get("gathered", []))
        if self.auto_gathering:
            self.gatherer.count = int(state.get("gather_count", 1))
        self.generator.set_state(state["generator"])
        if "row_generator" in state:  # (a checkpoint from before activation_rows: the rows' draws start afresh)
            self.row_generator.set_state(state["row_generator"])
