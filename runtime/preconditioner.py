"""KFACPreconditioner: K-FAC for users who keep their own loop, loss, backward and torch optimizer.

It only rewrites the ``.grad`` of the matched layers with F^-1 grad; the user's optimizer steps::

    precond = kronograph.optim.KFACPreconditioner(cm)          # fisher="empirical"
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        with precond.track():                  # records a and g of this forward and backward
            loss = criterion(model(x), y)
            loss.backward()                    # (the backward may also come after the block)
        precond.step()                         # statistics, inverses when due; rewrites .grad
        opt.step()

Two sources of statistics (``fisher``):
* ``"empirical"``: the user's own forward/backward inside ``track()``; g is the gradient of the user's
  loss, a mean over the batch (``loss_reduction="mean"``: per-example g = n * captured) or a sum.
  ``track()`` captures only at steps whose statistics are due (otherwise it costs nothing); the k
  micro-batches of an accumulation step pool as one mini-batch, whether inside one ``track()`` (each forward
  is one) or in k ``track()`` blocks before one ``step()``; without ``loss_scale``, 1/k is assumed either way.
* ``"mc"`` (paper sec 5): targets sampled from the model's predictive distribution (``cm.loss``) on a
  random fraction tau_1 of the inputs, in an extra forward/backward of the preconditioner's own that
  touches no ``.grad`` and no batch-norm running statistic. Pass the inputs: ``precond.step(x)`` folds
  them when statistics are due; ``precond.update_statistics(x)`` folds them now, whatever the schedule.
  ``track()`` does nothing in this mode and ``step(x)`` ignores x in the empirical one, so one loop
  (``with precond.track(): ...; precond.step(x)``) serves both modes.

Damping: ``damping`` is gamma, the factored Tikhonov strength of DESIGN.md (``KFAC``'s ``factor_damping``):
each block is solved with (A + pi gamma I) kron (G + gamma/pi I), which is about A kron G + gamma^2 I
plus cross terms, so gamma ~ sqrt(lambda) of a plain Tikhonov term. Setting ``precond.damping`` takes
effect at the next inversion. The default is 0.03: at kfac-pytorch's 1e-3 the grafted directions of a bag-of-words
model with a 2048-class head (the first-try suite's text-bag) lost far to the plain optimizer they fed (SGD 6.84
against 4.55 after 400 steps, AdamW 5.95 against 4.50), where 0.03 gives 4.53 and 4.56, and the ResNet's loops gain
too (BENCHMARKS.md). Weight decay is the user's optimizer's (and is not preconditioned).

Step size (``graft``): the solve F^-1 g of a weakly damped block can be orders of magnitude longer than g
(its small eigenvalues are inverted), so an SGD or AdamW learning rate tuned for gradients blows up on
the first try, and a user's ``clip_grad_norm_`` then shrinks every parameter, the unmatched ones too, to
make room for the matched layers' long directions. With ``graft="norm"`` (the default) each layer's new
.grad keeps K-FAC's direction and the norm of the layer's own gradient (layer-wise grafting, as Distributed
Shampoo grafts its directions onto another optimizer's step sizes): the user's learning rate, schedule and
clipping mean what they meant for the raw gradients. kfac-pytorch's answer alone, a KL bound on the raw
solve, still diverged on the built-in CNN at damping 1e-3 (BENCHMARKS.md); with the graft it is the step bound
below. ``graft=None`` gives the raw F^-1 g.

Step bound (``kl_clip``): the graft fixes each step's length to the gradient's, not the step's effect. Along the
directions the factors call flat, K-FAC's direction moves further than SGD would; with SGD's usual lr 0.1 and
momentum 0.9 and no clipping in the loop, the gradient then grows step after step and the run diverges (the
built-in CNN on Fashion-MNIST at batches of 1 to 128: NaN, where plain SGD reaches 0.35 at batch 128;
BENCHMARKS.md). As kfac-pytorch does, every matched layer's new .grad v is scaled by one factor
nu = min(1, sqrt(kl_clip / sum_l lr_l^2 v_l . g_l)), g the layer's gradient. For the raw solve the sum is the
step's squared length in the damped Fisher metric (about twice its KL divergence: kfac-pytorch's reading); for
the grafted step it is lr times the step's first-order decrease of the loss. The learning rate comes from ``lr``: a number,
or the user's optimizer (each layer's from its weight's parameter group, read every step, so schedules are
followed). Without one, 0.1 (SGD's usual rate) is assumed; Adam-type optimizers, which divide by the gradient's
own scale, hardly feel the bound. Parameters outside every block keep their .grad: the bound starves none of them.
``kl_clip=None``: no bound.

Distributed (DDP): when torch.distributed is initialised with more than one rank (or a ``process_group`` is
given), each statistics step's mini-batch factors are averaged across the ranks, weighted by their numbers of
examples, in one all_reduce before they are folded into the EMAs (runtime/distributed.py). Every rank then
holds the same factors; the inverse work is split as KFAC splits it (runtime/data_parallel.py): each layer's
A and G are inverted on one rank, its owner (a greedy cost model over the plan), and one all_gather of the
owners' triangles gives every rank every inverse, the same bits everywhere, so DDP's averaged .grad is
preconditioned identically and the replicas stay in step. Every rank must take part in every statistics step
(``step()`` at a due step, ``update_statistics(x)``) and in every step that refreshes inverses.

FSDP2 (``fully_shard``, applied in place after ``kronograph.compile`` of the plain module): the capture follows
the unsharded weights FSDP computes with (runtime/capture.py), the statistics are averaged as under DDP, and
``step()`` gathers each layer's row-sharded gradient whole (one all_gather a layer, in the plan's order: every
rank calls every ``step()``), solves it as under DDP and writes this rank's rows (runtime/sharded.py): K-FAC's
result exactly. The factors and inverses are not sharded.

With ``grad_worker_fraction=1/W`` each layer's inverses stay on their owner, which solves that layer's averaged
gradient at every step; one all_gather (``exchange_from_owners``) then gives every rank every solve, the same on
every rank, and the same steps to rounding as when every rank holds every inverse (those are mirrored from their
upper triangles; KAISA's memory-optimal mode; tests/test_preconditioner_ddp.py). ``failed_inverses`` then names
the layers that failed on this rank, and every rank must load the same state (rank 0's checkpoint: the layers
whose inverses it lacks are inverted again at the next step).

Safety: a mini-batch's non-finite statistics are not folded in (KroneckerBlock), a failed inverse keeps
the previous one (factored_inverses), and a layer whose .grad is not finite is left untouched; all three
are named in the dict ``step()`` returns. A mini-batch refused by every layer (NaN inputs, say) is skipped
whole: it is no EMA update and gives back its random draws. Parameters without a Kronecker block keep their
.grad. ``step()`` and ``update_statistics()`` are atomic: when they raise (misuse, a warning turned into an
error, an exception in a layer), the counters, factors, inverses, generator, pending ``track()`` captures
and every .grad are as before the call, so the call can be retried once its cause is fixed (under DDP on every
rank: a statistics step's all_reduce is part of it).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from kronograph.compiler.compiled import CompiledModel
from kronograph.errors import KronographError
from kronograph.passes.plan import Layer
from kronograph.runtime import spectral_norm
from kronograph.runtime.capture import Capture, outside_compiled_code
from kronograph.runtime.curvature import (BlockDiagonalCurvature, normed_blocks, reachable_ties, with_diagonal_g,
                                          within_reach)
from kronograph.runtime.data_parallel import exchange_from_owners, invert_across_ranks, inverse_owners
from kronograph.runtime.distributed import (
    COMMUNICATION_DTYPES,
    Statistics,
    active_group,
    average_statistics,
    dtype_named,
)
from kronograph.runtime.factors import RowSubset, batch_factors, formed_by_blocks
from kronograph.runtime.inverse import CurvatureWarning
from kronograph.runtime.statistics import (
    ema_decay,
    inverses_due,
    make_generator,
    on_device,
    sampled_statistics,
    subset,
)
from kronograph.runtime.statistics import statistics_due as statistics_due_at
from kronograph.runtime.losses import get_loss
from kronograph.runtime.sharded import any_sharded, check_row_sharded, is_sharded, local_rows, whole
from kronograph.runtime.spectral_norm import spectral_sigmas
from kronograph.runtime.wbar import gather, scatter
from kronograph.runtime.weight_norm import parameter_coordinates, weight_coordinates


ASSUMED_LR = 0.1  # the learning rate kl_clip's bound assumes when none is given (SGD's usual; kfac-pytorch's default)


class LossScaleWarning(CurvatureWarning):
    """Several ``track()`` blocks before one ``step()`` gave no ``loss_scale``; 1/k was assumed."""


class KFACPreconditioner:
    """Rewrites the matched layers' .grad with the damped K-FAC solve; any torch optimizer then steps.

    Args:
        compiled: a model compiled on the torch engine (its module's parameters are the ones rewritten).
        damping: gamma, the factored Tikhonov strength (see the module docstring; 0.03, not kfac-pytorch's 1e-3).
        ema_decay: fixed decay of the factor EMAs; None: the paper's min(1 - 1/k, 0.95).
        stats_every: statistics are folded at steps 1, 1 + stats_every, ... (step counts ``step()`` calls).
        inverse_every: inverses are recomputed at steps 1-3 and every ``inverse_every`` steps (and for a
            block as soon as it has statistics but no inverse).
        fisher: "empirical" (the user's loss, through ``track()``) or "mc" (sampled targets, own forward).
        stats_fraction: tau_1, the random fraction of the batch whose examples enter the statistics.
        loss_reduction: "mean" or "sum": how the user's loss reduces over the batch (empirical mode).
        factor_dtype: dtype of factors and inverses (float32 or float64), independent of the model's.
        seed: seed of the generator for subsets and sampled targets (None: drawn from torch's global RNG).
        graft: "norm" (each layer's new .grad has the norm of its gradient; module docstring) or None.
        kl_clip: the bound on sum_l lr_l^2 v_l . g_l over the matched layers (module docstring); None: none.
        lr: the learning rate the bound assumes: a number, or the optimizer that steps with these gradients (each
            layer's from its weight's parameter group at every step); None: ``ASSUMED_LR`` (0.1, SGD's usual), or
            the Trainer's optimizer under KFACTrainerCallback.
        process_group: the data-parallel ranks whose statistics are averaged and who share the inverse work
            (module docstring); None: the default group whenever torch.distributed is initialised with more than
            one rank (checked at each statistics step and refresh). Under pipeline or tensor parallelism pass the
            data-parallel group.
        communication_dtype: the dtype ("bfloat16", "float16", ...) the factors' all_reduce sends and sums (None:
            the factors' own); bfloat16 halves float32's bytes at a relative rounding of 4e-3.
        grad_worker_fraction: KAISA's trade of memory for communication, data-parallel: 1 (every rank holds every
            layer's inverses and solves every gradient) or 1/W on W ranks (each layer's inverses live on its owner
            alone, which solves the layer's gradient and shares the solve: 1/W of the inverses' memory a rank, the
            gradients' bytes every step instead of the inverses' at refreshes); fractions between are refused.
        activation_rows: form a layer's A from at most this many of its activation rows a statistics step (a random
            subset drawn by the generator, weighted to stay unbiased: factors.RowSubset) where the layer has more
            rows than examples (conv patches, tokens; a conv's other patches are never formed); G from every row.
            None: every row. 1024 made a ResNet's preconditioned SGD step 2.9x cheaper (BENCHMARKS.md).
        max_factor_dim: invert a factor wider than this as block-diagonal, in contiguous diagonal blocks of at most
            this width (inverse.block_diagonal_inverse); None: whole. A d-wide Cholesky costs d^3: a flattened
            conv map of 25088 into a head would take minutes an inversion whole.
        max_kronecker_dim: a layer with a factor wider than this gets no block and keeps its .grad, with a
            CoverageWarning naming it (curvature.within_reach); None: every matched layer has one. A 32000-word
            head's G would be 4 GB a copy.
        table_blocks: give the plan's tables (embeddings wider than 1024 rows: a word vocabulary) blocks whose A,
            how often each row is read, is kept as its diagonal (data-parallel and FSDP2 too). False: they keep
            their .grad.
        tied_blocks: give a table tied to an output layer (the plan's ``ties``: GPT-2's head reads the table) one
            block over both uses, the two Kronecker products summed and inverted exactly (runtime/tied.py), which
            rewrites the table's (and the head's bias's) .grad; data-parallel too (every rank inverts the tie and
            solves its gradient, whatever ``grad_worker_fraction``) and FSDP2. False: they keep their .grad.
        weight_norm_blocks: give a layer whose weight weight norm computes (the plan's ``normed``: W = g v / |v|)
            the block of W: v's and g's .grad are pushed forward to W's, solved, and pulled back (runtime/
            weight_norm.py), so that your optimizer's step -lr .grad changes W by -lr F^-1 grad_W to first order.
            Data-parallel too (an owner alone solves in W's coordinates, every rank pulls back) and FSDP2.
            False: v and g keep their .grad.
        spectral_norm_blocks: give a layer whose weight spectral norm computes (W = W_o / sigma) the block of W:
            sigma W_o.grad is W's gradient, solved and pulled back as sigma times the solve (runtime/
            spectral_norm.py; not on an FSDP2-sharded module). False: W_o keeps its .grad.
        diagonal_output_g: an output layer (a tied head too) wider than this keeps its G as its diagonal
            (curvature.with_diagonal_g; KFAC's setting of the name): a vocabulary's softmax Fisher is nearly
            diagonal, and its dense G costs C^2 a copy and C^3 an inversion. On the first-try suite's bag model
            (2048 classes) the loop's loss is level with the dense G's and a step 4x cheaper (BENCHMARKS.md).
            None: dense.
    """

    def __init__(
        self,
        compiled: CompiledModel,
        damping: float = 0.03,
        ema_decay: float | None = 0.95,
        stats_every: int = 1,
        inverse_every: int = 20,
        fisher: str = "empirical",
        stats_fraction: float = 1.0,
        loss_reduction: str = "mean",
        factor_dtype: torch.dtype = torch.float32,
        seed: int | None = None,
        graft: str | None = "norm",
        kl_clip: float | None = 1e-3,
        lr: float | torch.optim.Optimizer | None = None,
        process_group: dist.ProcessGroup | None = None,
        communication_dtype: str | None = None,
        grad_worker_fraction: float = 1.0,
        activation_rows: int | None = 1024,
        max_factor_dim: int | None = 1024,
        max_kronecker_dim: int | None = 8192,
        table_blocks: bool = True,
        tied_blocks: bool = True,
        weight_norm_blocks: bool = True,
        spectral_norm_blocks: bool = True,
        diagonal_output_g: int | None = 1024,
    ) -> None:
        if graft not in ("norm", None):
            raise KronographError(f"graft={graft!r}; choose 'norm' (the gradient's norm per layer) or None (raw F^-1 g)")
        if compiled.engine != "torch" or compiled.module is None:
            raise KronographError("KFACPreconditioner needs the torch engine; compile an nn.Module (engine='torch')")
        if fisher not in ("empirical", "mc"):
            raise KronographError(f"fisher={fisher!r}; choose 'empirical' (your loss) or 'mc' (sampled targets)")
        if loss_reduction not in ("mean", "sum"):
            raise KronographError(f"loss_reduction={loss_reduction!r}; choose 'mean' or 'sum' (how your loss reduces)")
        if communication_dtype not in (None, *COMMUNICATION_DTYPES):
            raise KronographError(f"communication_dtype={communication_dtype!r}; choose one of "
                                  f"{', '.join(COMMUNICATION_DTYPES)} or None (the factors' dtype)")
        if not 0 < grad_worker_fraction <= 1:
            raise KronographError(f"grad_worker_fraction={grad_worker_fraction} must lie in (0, 1]: 1 (every rank holds "
                                  "every inverse) or 1/world (each layer's inverses on one rank)")
        if not damping > 0:
            raise KronographError(f"damping={damping} must be positive (try 1e-3 to 1e-1)")
        if diagonal_output_g is not None and not (isinstance(diagonal_output_g, int) and diagonal_output_g >= 1):
            raise KronographError(f"diagonal_output_g={diagonal_output_g!r}: pass a number of classes (1024 keeps a "
                                  "vocabulary's head G diagonal) or None for a dense G")
        if kl_clip is not None and not kl_clip > 0:
            raise KronographError(f"kl_clip={kl_clip} must be positive (1e-3 is kfac-pytorch's and ours), or None for "
                                  "no bound on the step")
        if lr is not None and not isinstance(lr, torch.optim.Optimizer) and not (isinstance(lr, (int, float))
                                                                                 and lr > 0):
            raise KronographError(f"lr={lr!r}: pass your optimizer's learning rate (a positive number) or the "
                                  "optimizer itself, whose parameter groups' rates are read at every step")
        if activation_rows is not None and int(activation_rows) < 1:
            raise KronographError(f"activation_rows={activation_rows} must be a positive number of rows, or None "
                                  "for every row")
        if max_factor_dim is not None and int(max_factor_dim) < 1:
            raise KronographError(f"max_factor_dim={max_factor_dim} must be a positive width, or None for whole "
                                  "factors")
        if max_kronecker_dim is not None and int(max_kronecker_dim) < 1:
            raise KronographError(f"max_kronecker_dim={max_kronecker_dim} must be a positive width, or None for a "
                                  "block for every matched layer")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise KronographError(f"ema_decay={ema_decay} must lie in [0, 1), or be None for the paper's schedule")
        if not 0 < stats_fraction <= 1:
            raise KronographError(f"stats_fraction={stats_fraction} must lie in (0, 1]")
        for name, value in (("stats_every", stats_every), ("inverse_every", inverse_every)):
            if int(value) < 1:
                raise KronographError(f"{name}={value} must be a positive number of steps")
        self.compiled, self.module, self.loss = compiled, compiled.module, get_loss(compiled.loss)
        self.damping, self.ema_decay, self.graft = float(damping), ema_decay, graft
        self.kl_clip, self.lr = None if kl_clip is None else float(kl_clip), lr
        self.stats_every, self.inverse_every = int(stats_every), int(inverse_every)
        self.fisher, self.stats_fraction, self.loss_reduction = fisher, float(stats_fraction), loss_reduction
        self.factor_dtype = factor_dtype
        # the layers with a block: captures, statistics and inverses are of these alone
        largest = None if max_kronecker_dim is None else int(max_kronecker_dim)
        tables = compiled.plan.tables if table_blocks else ()
        outputs = set(compiled.output_layers)  # (the wide ones keep their G diagonal: ``diagonal_output_g``)
        ties = reachable_ties(compiled.plan.ties, largest, diagonal_output_g, outputs) if tied_blocks else ()
        views = tuple(view for tie in ties for view in tie.views)
        normed = normed_blocks(compiled.plan.normed, compiled.module, weight_norm_blocks,
                               spectral_norm_blocks and not any_sharded(compiled.module))
        candidates = with_diagonal_g([*compiled.layers, *tables, *normed], diagonal_output_g, outputs)
        self.layers = (*within_reach(candidates, largest), *views)
        self.curvature = BlockDiagonalCurvature(self.layers, factor_dtype, knob="damping",
                                                max_dim=None if max_factor_dim is None else int(max_factor_dim),
                                                ties=ties)
        self.blocks = self.curvature.blocks
        self.generator = make_generator(next(self.module.parameters()).device, seed)
        self.process_group = process_group
        self.communication_dtype = dtype_named(communication_dtype)
        self.grad_worker_fraction = float(grad_worker_fraction)
        self._inverted: set[str] = set()  # layers with inverses (with owners alone: on their owner)
        if (group := active_group(process_group)) is not None:  # each rank its own subsets and sampled targets
            self.generator.manual_seed(self.generator.initial_seed() + dist.get_rank(group))
            self._owners_alone()  # a fraction between 1/world and 1 is refused now
        # A's rows drawn by the same generator: put back with it when a step fails, in the checkpoint with it
        self.row_subset = None if activation_rows is None else RowSubset(int(activation_rows), self.generator)
        self.steps = 0  # step() calls so far
        self.stats_updates = 0  # statistics folded so far (the EMA schedule counts these)
        self._pending: list[tuple[Capture, dict, int, float | None]] = []  # tracked passes of the coming step
        # The EMAs a step replaced, by layer, with the statistics blocks they were formed with: the next batch's
        # factors are written into them (a fresh wide factor a step costs page faults: BENCHMARKS.md)
        self._spares: dict[str, tuple[torch.Tensor, torch.Tensor, tuple]] = {}
        self._folded: dict[str, Any] | None = None  # what update_statistics folded since the last step()
        self._warned_scale = False  # LossScaleWarning is given once

    @property
    def statistics_due(self) -> bool:
        """Whether the coming ``step()`` folds statistics (steps 1, 1 + stats_every, ...)."""
        return statistics_due_at(self.steps + 1, self.stats_every)

    # -- statistics ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def track(self, batch_size: int | None = None, loss_scale: float | None = None) -> Iterator[None]:
        """Capture a and g of the forwards (and backwards) run inside, when statistics are due.

        Each forward of the module inside the block is one micro-batch, so one ``track()`` may hold all the
        micro-batches of an accumulation step; they pool as one mini-batch. Forwards with gradients disabled
        (a validation pass under ``torch.no_grad()``) are ignored. A ``torch.compile``'d model (of the same
        module) runs eagerly inside the block when statistics are due (runtime/capture.py) and compiled otherwise.

        Args:
            batch_size: examples in each forward; default: dim 0 of the module's first tensor input.
            loss_scale: what each differentiated loss was multiplied by, divided out of the captured g (an AMP
                GradScaler's ``get_scale()``, times 1/k for k accumulated micro-batches); default: 1/k for the
                k micro-batches tracked without loss_scale before the coming ``step()``, in this block or in
                several (the accumulation idiom ``(loss / k).backward()``), 1 for one.

        Why 1/k also across blocks, with a LossScaleWarning once: the captured g cannot tell k undivided
        losses summed (``loss.backward()`` per micro-batch; loss_scale=1 is right) from the idiom's k divided
        ones (1/k is right): they differ by k, so G by k^2. 1/k is what one block around the k micro-batches
        assumes and what the common loops (Hugging Face's Trainer) do, so a loop gets the same factors in
        either form; the warning names the fix for a loop that sums, and is silenced by any loss_scale.
        """
        outside_compiled_code()  # before dynamo meets this generator: our error, not an internal one
        if self.fisher != "empirical" or not self.statistics_due:
            yield
            return
        capture = Capture(self.module, self.layers)
        sizes: list[int | None] = [None]  # examples of each pass (the first: calls before any forward)

        def new_pass(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not torch.is_grad_enabled():
                return
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0]
            capture.begin_pass()
            sizes.append(tensors[0].shape[0] if tensors else None)

        handle = self.module.register_forward_pre_hook(new_pass, with_kwargs=True)
        try:
            with capture:
                yield
        finally:
            handle.remove()
        passes = [(part, n) for part, n in zip(capture.passes(), sizes) if part]
        scale = None if loss_scale is None else float(loss_scale)  # None: 1/k, k counted at step()
        for part, n in passes:
            n = batch_size or n or min(r.a.shape[0] for sites in part.values() for r in sites)
            self._pending.append((capture, part, int(n), scale))

    def update_statistics(self, x: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, Any]:
        """Fold MC-Fisher statistics of the inputs x now (fisher="mc"): a forward on a fraction tau_1 of x,
        targets sampled from the model, gradients by autograd.grad; no .grad or buffer is changed."""
        if self.fisher != "mc":
            raise KronographError("update_statistics(x) is for fisher='mc'; with 'empirical' use precond.track()")
        inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        with self._atomic() as drawn:
            records, m, _ = sampled_statistics(
                self.module, self.layers, self.loss, inputs, self.stats_fraction, self.generator,
                select=self.compiled.select_output,
            )
            stats = {
                name: (*batch_factors(self.blocks[name].layer, records, batch_size=m, dtype=self.factor_dtype,
                                      subset=self.row_subset, blocks=self.blocks[name].statistics_blocks), m)
                for name, records in records.items()
                if records and any(r.g is not None for r in records)
            }
            self._folded = self._fold(stats, collective=True, drawn=drawn)
        return self._folded

    def _tracked_factors(self) -> Statistics:
        """The mini-batch factors of the pending tracked captures, pooled weighted by examples, with the
        number of examples of each layer."""
        pending, self._pending = self._pending, []
        unscaled = [capture for capture, _, _, loss_scale in pending if loss_scale is None]
        blocks = len(set(map(id, unscaled)))
        if blocks > 1 and not self._warned_scale:
            k = len(unscaled)
            warnings.warn(f"{blocks} `with precond.track():` blocks before one step() gave no loss_scale, so each of "
                          f"their {k} micro-batches was taken as `(loss / {k}).backward()`, as in one track() around "
                          f"them: pass track(loss_scale=1/{k}) to confirm, or track(loss_scale=1) if each backward is "
                          f"of the undivided loss (a sum over micro-batches; else G is {k * k} times too large)",
                          LossScaleWarning, stacklevel=3)
            self._warned_scale = True
        sums: dict[str, list[Any]] = {}
        for capture, part, n, loss_scale in pending:
            loss_scale = 1.0 / len(unscaled) if loss_scale is None else loss_scale
            capture.release_outputs()
            index = subset(n, self.stats_fraction, self.generator)
            m = n if index is None else int(index.numel())
            scale = (n if self.loss_reduction == "mean" else 1.0) / loss_scale  # per-example g from the captured
            for name, records in part.items():
                if not records or all(r.g is None for r in records):
                    continue
                block, total = self.blocks[name], sums.get(name)
                spare = self._spares.pop(name, None) if total is None else None
                reuse = spare is not None and spare[2] == block.statistics_blocks
                a, g = batch_factors(block.layer, records, batch_size=n, grad_scale=scale, index=index,
                                     dtype=self.factor_dtype, subset=self.row_subset, blocks=block.statistics_blocks,
                                     out=spare[:2] if reuse else None)
                if total is None:  # (one capture a step, the usual loop: its factors as they are, no pass over them)
                    sums[name] = [a, g, m]
                else:  # the running mean weighted by examples, in the first capture's own tensors
                    weight = m / (total[2] + m)
                    total[0].mul_(1 - weight).add_(a, alpha=weight)
                    total[1].mul_(1 - weight).add_(g, alpha=weight)
                    total[2] += m
        if pending and not sums:
            raise KronographError("track() saw a forward but no backward reached its layers; run loss.backward()")
        return {name: (a, g, m) for name, (a, g, m) in sums.items()}

    def _fold(self, stats: Statistics, collective: bool = False, drawn: torch.Tensor | None = None) -> dict[str, Any]:
        """Fold one mini-batch's factors into the EMAs (the first estimate replaces the empty one).

        ``collective``: this is a statistics step, so under torch.distributed the factors are first averaged
        across the ranks (one all_reduce, which every rank joins, with or without statistics of its own).
        A batch that every layer rejects (not finite) is skipped whole: not counted as an update, and the
        generator goes back to ``drawn``, its state before the batch's draws, so the statistics go on as if
        the batch had not been seen (on every rank alike: the ranks reject the same averaged factors).
        The EMAs are replaced, not written in place, so that ``_atomic`` can put the old ones back.
        """
        if collective and (group := active_group(self.process_group)) is not None:
            layers = {name: block.layer for name, block in self.blocks.items()}
            device = next(self.module.parameters()).device
            stats = average_statistics(stats, layers, group, self.factor_dtype, device, self.communication_dtype)
        if not stats:
            return {"statistics_updated": False, "rejected_statistics": []}
        decay = ema_decay(self.stats_updates + 1, self.ema_decay)
        rejected = [name for name, (a, g, _) in stats.items()
                    if not self.blocks[name].update_factors(a, g, decay, in_place=False)]
        if len(rejected) < len(stats):
            self.stats_updates += 1
        elif drawn is not None:
            self.generator.set_state(drawn)
        return {"statistics_updated": len(rejected) < len(stats), "rejected_statistics": rejected}

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[torch.Tensor]:
        """Put back everything a step or a statistics update changes if it raises; yields the generator's state.
        Cheap: the blocks' factors and inverses are replaced, never written in place, so references are kept,
        not copies; .grad is written only at the very end of a step (``_precondition`` computes first)."""
        blocks = {name: (block.a, block.g, block.inverses, block.updates) for name, block in self.blocks.items()}
        saved = (self.steps, self.stats_updates, self.generator.get_state(), list(self._pending), self._folded,
                 set(self._inverted))
        try:
            yield saved[2]
        except BaseException:
            self.steps, self.stats_updates, generator_state, self._pending, self._folded, self._inverted = saved
            self.generator.set_state(generator_state)
            for name, (a, g, inverses, updates) in blocks.items():
                block = self.blocks[name]
                block.a, block.g, block.inverses, block.updates = a, g, inverses, updates
            raise

    # -- the step -----------------------------------------------------------------------------------
    def step(self, x: torch.Tensor | Sequence[torch.Tensor] | None = None) -> dict[str, Any]:
        """Fold statistics and refresh inverses when due, then rewrite the matched layers' .grad with F^-1 grad.

        Args:
            x: the batch's inputs; used by fisher="mc" when statistics are due and update_statistics(x)
                did not run since the last step (ignored by "empirical", so one loop serves both modes).
        Returns:
            {"step", "statistics_updated", "inverses_updated", "preconditioned" (layers rewritten),
            "rejected_statistics", "failed_inverses", "non_finite_grad", "no_curvature"}: lists of layer
            names; "no_curvature" holds layers with a .grad but no statistics yet (left as they are); with
            ``kl_clip``, "kl_scale": the factor nu the new .grads were scaled by (1: the bound did not bind).
        """
        due = self.statistics_due
        before = {name: (block.a, block.g) for name, block in self.blocks.items()}
        with self._atomic() as drawn:
            if self.fisher == "empirical":
                if due and not self._pending:
                    raise KronographError(f"statistics are due at step {self.steps + 1}: run the forward and "
                                          "backward inside `with precond.track():` before precond.step()")
                info = self._fold(self._tracked_factors(), collective=due, drawn=drawn)
            elif self._folded is not None:  # update_statistics(x) ran since the last step
                info = dict(self._folded)
            elif due and x is not None:
                info = self.update_statistics(x)
            elif due:
                raise KronographError(f"fisher='mc' needs the inputs at step {self.steps + 1}: precond.step(x), "
                                      "or precond.update_statistics(x) before precond.step()")
            else:
                info = self._fold({})
            self._folded = None
            self.steps += 1
            inverted, failed = self._invert()
            info.update(step=self.steps, inverses_updated=inverted, failed_inverses=failed)
            counts, writes = self._precondition()
            info.update(counts)
            for grad, value in writes:  # last: nothing after this can raise and leave some layers rewritten
                grad.copy_(value)
        self._keep_spares(before)
        return info

    def _keep_spares(self, before: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]]) -> None:
        """After a step that succeeded: the dense EMAs it replaced are the next batch's tensors (nothing else holds
        them: ``state_dict`` copies, the inverses are their own tensors). They are 0 outside the statistics blocks,
        which a batch's factors leave as they find them (``load_state_dict`` makes a checkpoint's so)."""
        for name, (a, g) in before.items():
            block = self.blocks[name]
            if a is not None and a.dim() == 3 and g.dim() == 3 and block.a is not a and block.g is not g:
                self._spares[name] = (a, g, block.statistics_blocks)

    def _invert(self) -> tuple[bool, list[str]]:
        """Damped inverses of the blocks with statistics, when due (or missing); failures keep the previous.
        Data-parallel: each layer on its owner, then one all_gather gives every rank every inverse, or, with
        ``grad_worker_fraction`` 1/W, the owner keeps them (the layers due are the same on every rank)."""
        due = inverses_due(self.steps, self.inverse_every)
        names = [name for name, block in self.blocks.items() if block.a is not None and (due or name not in self._inverted)]
        group = active_group(self.process_group)
        if group is not None and not names:
            return False, []
        alone = None if group is None else self._owners_alone()
        if group is not None and alone is None:  # from the plan: the same everywhere
            owners = inverse_owners(self._owned_layers(), dist.get_world_size(group), self.curvature.max_dim)
            mine, inverses = names, invert_across_ranks(self.curvature.restricted(names), self.damping, owners, group)
        else:  # here (a tie's views together), or each owner its own layers' and every rank every tie's (no owner)
            rank = None if alone is None else dist.get_rank(group)
            mine = names if alone is None else [name for name in names if alone.get(name, rank) == rank]
            inverses = self.curvature.invert(self.damping, only=mine)
        for name in mine:
            self.blocks[name].inverses = inverses[name]
        self._inverted.update(names)
        return bool(names), [name for name in mine if not inverses[name].ok]

    def _owners_alone(self) -> dict[str, int] | None:
        """Each layer's owner when it alone holds the layer's inverses and solves its gradient (data-parallel with
        ``grad_worker_fraction`` <= 1/W: KAISA's memory-optimal mode); None when every rank holds every inverse."""
        group = active_group(self.process_group)
        if group is None or self.grad_worker_fraction == 1:
            return None
        world = dist.get_world_size(group)
        if self.grad_worker_fraction * world > 1 + 1e-9:
            raise KronographError(f"grad_worker_fraction={self.grad_worker_fraction} on {world} ranks: choose 1 (every "
                                  f"rank holds every inverse) or 1/{world} (each layer's inverses on one rank, which "
                                  "solves its gradient for all); the fractions between are not built")
        return inverse_owners(self._owned_layers(), world, self.curvature.max_dim)

    def _owned_layers(self) -> list[Layer]:
        """The layers an owner inverts data-parallel: all but a tie's views, which every rank inverts and solves."""
        return [layer for layer in self.layers if not self.blocks[layer.name].tied]

    def _precondition(self) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Each matched layer's .grad and its damped Kronecker solve, for step() to write once every layer is
        computed (a layer that raises then leaves all .grad as they were); others are left alone. A layer sharded
        by FSDP2 is solved whole and each rank writes its rows (runtime/sharded.py)."""
        params = dict(self.module.named_parameters())  # read now: fully_shard replaces them with DTensors
        done, bad, missing, writes, ready, frames = 0, [], [], [], [], {}
        for name in self.curvature.solving:  # (a tie's output view solves the table's gradient)
            block = self.blocks[name]
            layer = block.layer
            weights = layer.weight_norm or (layer.spectral_norm or layer.weight,)  # (v, g) or W_o of a computed W
            targets = [params[key] for key in weights] + ([params[layer.bias]] if layer.bias else [None])
            if all(p is None or p.grad is None for p in targets):
                continue  # no gradient to rewrite (frozen or unused layer)
            if name not in self._inverted:
                missing.append(name)
                continue
            grads = {key: self._whole_grad(key, params[key]) for key in weights}
            if layer.weight_norm:  # v and g whole (FSDP2 shards them by rows) for the map between them and W
                frames[name] = {key: whole(params[key].detach()) for key in weights}
                weight_grad = weight_coordinates(grads, frames[name], [layer])[layer.weight]
            elif layer.spectral_norm:  # sigma grad W_o, sigma of the power iteration's last forward
                frames[name] = spectral_sigmas(self.module, [layer])
                weight_grad = spectral_norm.weight_coordinates(grads, frames[name], [layer])[layer.weight]
            else:
                weight_grad = grads[layer.weight]
            bias_grad = self._whole_grad(layer.bias, params[layer.bias]) if layer.bias else None
            ready.append((name, block, targets, gather(layer, weight_grad, bias_grad)))
        # which gradients are finite: read by the host once for all layers (one synchronisation on a GPU)
        checks = [torch.isfinite(grad_bar).all().to(ready[0][3].device) for *_, grad_bar in ready]
        finite = torch.stack(checks).tolist() if checks else []
        alone = self._owners_alone()
        rank = None if alone is None else dist.get_rank(active_group(self.process_group))
        solved = {}
        for (name, block, _, grad_bar), ok in zip(ready, finite):
            if not ok:
                bad.append(name)
            elif alone is None or alone.get(name, rank) == rank:  # (a tie: every rank)
                solved[name] = self._grafted(grad_bar, block.precondition(grad_bar))
            else:
                solved[name] = None  # solved by its owner
        if alone is not None:
            exchanged = self._from_owners({name: value for name, value in solved.items() if name in alone},
                                          {name: grad_bar.shape for name, _, _, grad_bar in ready}, alone)
            solved = {name: exchanged.get(name, value) for name, value in solved.items()}
        nu = self._kl_scale([(solved[name], grad_bar, targets[0]) for name, _, targets, grad_bar in ready
                             if name in solved])
        for name, block, targets, _ in ready:
            if name not in solved:
                continue
            weight, bias = scatter(block.layer, solved[name] if nu is None else solved[name] * nu)
            if block.layer.weight_norm:  # Delta W as (dv, dg)
                pulled = parameter_coordinates({block.layer.weight: weight}, frames[name], [block.layer])
                values = [pulled[key] for key in block.layer.weight_norm] + [bias]
            elif block.layer.spectral_norm:  # Delta W as dW_o
                pulled = spectral_norm.parameter_coordinates({block.layer.weight: weight}, frames[name], [block.layer])
                values = [pulled[block.layer.spectral_norm], bias]
            else:
                values = [weight, bias]
            for param, value in zip(targets, values):
                if param is not None and param.grad is not None:
                    sharded = is_sharded(param.grad)
                    writes.append((param.grad.to_local() if sharded else param.grad,
                                   local_rows(param.grad, value) if sharded else value))
            done += 1
        counts = {"preconditioned": done, "non_finite_grad": bad, "no_curvature": missing}
        if nu is not None:
            counts["kl_scale"] = float(nu)
        return counts, writes

    def _kl_scale(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """nu = min(1, sqrt(kl_clip / sum_l lr_l^2 v_l . g_l)) over (v, g, weight) of the preconditioned layers
        (module docstring); None without a bound or a layer. The same on every rank: v and g are."""
        if self.kl_clip is None or not layers:
            return None
        if isinstance(self.lr, torch.optim.Optimizer):
            rates = {id(p): group["lr"] for group in self.lr.param_groups for p in group["params"]}
            if any(id(weight) not in rates for *_, weight in layers):
                raise KronographError("lr is an optimizer that does not hold every preconditioned layer's weight; "
                                      "pass the optimizer that steps this model, or its learning rate as a number")
        else:
            rates = None
        rate = ASSUMED_LR if self.lr is None else self.lr
        terms = [float(rate if rates is None else rates[id(weight)]) ** 2 * torch.sum(v * g.to(v.dtype))
                 for v, g, weight in layers]
        total = torch.stack(terms).sum().abs()
        return torch.clamp(torch.sqrt(self.kl_clip / total), max=1.0)

    def _from_owners(self, solved: Mapping[str, torch.Tensor | None], shapes: Mapping[str, torch.Size],
                     owners: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Every layer's solve from its owner (``solved``: this rank's layers', None for the others'), by one
        ``exchange_from_owners`` a step: the gradients' size in bytes instead of the inverses' at refreshes."""
        sizes = {name: shapes[name].numel() for name in solved}  # plan order, the same on every rank
        device = next(self.module.parameters()).device
        pieces = {name: value.reshape(-1).to(self.factor_dtype) for name, value in solved.items() if value is not None}
        flat = exchange_from_owners(pieces, sizes, owners, active_group(self.process_group), self.factor_dtype, device)
        return {name: flat[name].reshape(shapes[name]) for name in solved}

    @staticmethod
    def _whole_grad(name: str, param: torch.Tensor) -> torch.Tensor:
        """A parameter's whole .grad (zeros when it has none; a sharded one gathered from the ranks)."""
        if is_sharded(param):
            check_row_sharded(name, param)
        if param.grad is None:
            return torch.zeros(param.shape, dtype=param.dtype, device=param.device)
        return whole(param.grad)

    def _grafted(self, grad_bar: torch.Tensor, solved: torch.Tensor) -> torch.Tensor:
        """K-FAC's direction with the gradient's norm (graft="norm"), or the raw solve."""
        if self.graft is None:
            return solved
        norm = torch.linalg.vector_norm(solved)
        usable = torch.isfinite(norm) & (norm != 0)  # else the gradient itself; chosen on the device, no host read
        return torch.where(usable, solved * (torch.linalg.vector_norm(grad_bar) / norm), grad_bar)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors, inverses, counters, damping and the generator: a resumed run continues exactly."""
        blocks = {name: block.state_dict() for name, block in self.blocks.items()}
        return {"steps": self.steps, "stats_updates": self.stats_updates, "damping": self.damping,
                "blocks": blocks, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self.blocks) - set(state["blocks"])
        if missing:
            raise KronographError(f"the state has no blocks for layers {sorted(missing)}; it is from another model")
        blocks = on_device(state["blocks"], next(self.module.parameters()).device)
        self.steps, self.stats_updates = int(state["steps"]), int(state["stats_updates"])
        self.damping = float(state["damping"])
        self.curvature.load_state_dict({"blocks": blocks})
        # with owners alone, rank 0's checkpoint holds its layers' inverses: the others are made at the next step
        self._inverted = {name for name, block in self.blocks.items() if block.inverses is not None}
        self.generator.set_state(state["generator"])
        self._pending, self._folded = [], None
        for block in self.blocks.values():  # (a checkpoint of whole factors: what the blocks' inversion never reads)
            for factor, widths in zip((block.a, block.g), block.statistics_blocks):
                if factor is not None and factor.dim() == 3 and widths is not None:
                    factor.masked_fill_(~formed_by_blocks(factor.shape[-1], widths, factor.device), 0.0)
