"""runtime/engines/torch: the user's own nn.Module as the model K-FAC trains (parameters shared, in place).

``TorchEngine`` gives ``runtime.methods.kfac.KFAC`` the passes it needs, in torch terms; the onnxruntime engine
gives the same ones for an ONNX graph, so that one K-FAC serves both:

- ``gradient_pass``: loss, grad of the mean loss on the whole batch and, when asked, the captured sites
  (for statistics from the labels and the low-rank products of sec 8);
- ``sampled_pass``: the sites of a statistics pass on some examples with targets sampled from the model
  (``sampled_pass_of_slice``: a data-parallel rank's share of it, runtime/data_parallel.py);
- ``output_tangents``: the outputs and J d for directions d (forward mode, appendix C, or differences of plain
  forwards, central or one-sided: ``products``);
- ``loss_value``: the mean loss at the current weights (for rho);
- ``parameters`` and ``add_``: the weights, updated in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kronograph.compiler.wrappers import refuse_sharded
from kronograph.errors import KronographError
from kronograph.passes.plan import Layer
from kronograph.runtime import sharded, tangent_cost
from kronograph.runtime.capture import Capture, SiteRecord, dense, outside_compiled_code
from kronograph.runtime.data_parallel import sampled_statistics_of_slice
from kronograph.runtime.losses import Loss
from kronograph.runtime.pooling import FastPooling
from kronograph.runtime.quadratic import difference_products, output_tangents
from kronograph.runtime.spectral_norm import held_power_iterations
from kronograph.runtime.statistics import preserved_buffers, sampled_statistics

Records = dict[str, list[SiteRecord]]


@dataclass
class GradientPass:
    """One forward and backward on the whole batch.

    Attributes:
        loss: the mean loss (no weight decay).
        grads: parameter name -> d loss / d parameter (zeros for a parameter the loss does not reach).
        records: the captured sites (a, and g = d loss/ds of the mean loss), or None when not asked.
        outputs: the forward's outputs (detached) where asked and the forward drew no random numbers (the
            outputs of a plain forward at these weights then), else None.
    """

    loss: float
    grads: dict[str, torch.Tensor]
    records: Records | None = None
    outputs: torch.Tensor | None = None


def _own(outputs: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """``outputs``, or a copy where they share memory with one of ``others`` (a model that returns its input): the
    differences are taken in place in a forward's outputs."""
    memory = outputs.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == memory for t in others if isinstance(t, torch.Tensor)):
        return outputs.clone()
    return outputs


class TorchEngine:
    """The compiled module's trainable parameters (those of the plan), trained in place."""

    name = "torch"

    def __init__(self, compiled: Any, loss: Loss, products: str = "forward", fsdp: bool = False) -> None:
        """``products``: how ``output_tangents`` computes J d, "forward" (forward mode, exact), "differences"
        (central differences of two no-grad forwards a direction, which keep the fused attention kernels),
        "one-sided" (one no-grad forward a direction beside the shared forward at theta) or "auto" (where the
        model calls attention, group or instance norm, a recurrent layer or a convolution one-sided, with batch
        norm in training mode central, runtime/tangent_cost.py, when its weights are float32 or float64; forward
        mode elsewhere, central differences where PyTorch has no forward-mode derivative for something the model
        calls: weight norm, spectral norm, EmbeddingBag, a custom autograd.Function; decided at the first call,
        ``resolved_products``).
        ``fsdp``: the method takes a module sharded by FSDP2 (each of its steps inside ``stepping()``); otherwise
        one is refused."""
        self.products = products
        self.resolved_products: str | None = None if products == "auto" else products
        if compiled.module is None:
            raise KronographError("the torch engine trains an nn.Module; this CompiledModel has none")
        self.compiled, self.module, self.loss = compiled, compiled.module, loss
        named = dict(self.module.named_parameters())
        self.params = {name: named[name] for name in compiled.plan.parameters if name in named}
        self.sharded: sharded.ShardedWeights | None = None
        if fsdp and sharded.fsdp_modules(self.module):
            self.sharded = sharded.ShardedWeights(self.module, list(self.params))
        else:  # compile refuses a sharded module; this catches one sharded after compile (fully_shard works in place)
            refuse_sharded(compiled.module)
        # What the capture records where no layers are named: the plan's layers, and its tables (embeddings with a
        # diagonal A) and tied tables' views once a method covers them (``capture_also``; K-FAC does).
        self.captured: Any = compiled.plan
        self.fast_pooling = FastPooling()  # the no-grad forwards' max pools (runtime/pooling.py)
        # The parameters whose statistics-loss gradient each sampled backward also takes (K-FAC's diagonal Fisher
        # of those outside every block), and those gradients with each pass's examples, appended until cleared.
        self.fisher_parameters: list[str] = []
        self.sampled_gradients: list[tuple[dict[str, torch.Tensor], int]] = []

    def capture_also(self, layers: Sequence[Layer]) -> None:
        """Capture ``layers`` beside the plan's layers: its tables (their records hold indices:
        capture.layer_input) or the views of its tied tables."""
        self.captured = (*self.compiled.plan.layers, *layers)

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """The span of one optimizer step: on an FSDP2-sharded module every parameter is whole in it, and FSDP
        runs no collective (runtime/sharded.py), so the passes and updates below work as on a plain module."""
        if self.sharded is None:
            yield
            return
        idle = self.params
        with sharded.unsharded(self.module):
            named = dict(self.module.named_parameters())  # FSDP's unsharded Parameters while unsharded
            self.params = {name: named[name] for name in idle}
            try:
                sharded.ShardedWeights.check_whole(self.params)
                yield
            finally:
                self.params = idle

    @property
    def device(self) -> torch.device:
        parameter = next(iter(self.params.values()), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def parameters(self) -> dict[str, torch.Tensor]:
        """The trainable weights by name (the module's own tensors, detached: no copy)."""
        return {name: param.detach() for name, param in self.params.items()}

    def frozen(self) -> set[str]:
        """The plan's parameters the user has frozen since compile (requires_grad=False): left as they are."""
        return {name for name, param in self.params.items() if not param.requires_grad}

    def write_back(self) -> None:
        """Nothing to do: ``parameters()`` are the module's own tensors (in-place changes are already there)."""

    def add_(self, update: Mapping[str, torch.Tensor]) -> None:
        """theta += update, in place in the module."""
        with torch.no_grad():
            for name, delta in update.items():
                self.params[name].add_(delta.to(self.params[name].dtype))
        if self.sharded is not None:  # the whole weights are FSDP's gathered copies: this rank's rows too
            self.sharded.add_(update)

    def set_(self, values: Mapping[str, torch.Tensor]) -> None:
        """theta = values (copies of ``parameters()`` taken earlier), in place in the module."""
        with torch.no_grad():
            for name, value in values.items():
                self.params[name].copy_(value)
        if self.sharded is not None:
            self.sharded.copy_(values)

    def gradient_pass(self, inputs: Sequence[torch.Tensor], targets: torch.Tensor, capture: bool,
                      keep_outputs: bool = False, layers: Collection[str] | None = None,
                      statistics_loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GradientPass:
        """Forward and backward of the mean loss on the whole batch; with ``capture`` the sites too (of ``layers``
        only, where given: a recurrent layer's capture runs it step by step); with ``keep_outputs`` the outputs,
        unless the forward drew random numbers (dropout). With ``statistics_loss`` (the outputs' loss of targets
        sampled from the model) the sites are captured with g = d statistics_loss / ds, from a backward of that
        loss on this same forward before the gradient's own (the statistics pass without a forward of its own)."""
        outside_compiled_code()  # KFAC.step inside a torch.compile'd function: our error, not dynamo's
        randomness = _RandomState(self.device) if keep_outputs else None
        self.module.zero_grad(set_to_none=True)
        plan = self.captured if layers is None else [self.compiled.plan.layer(name) for name in layers]
        sampled = statistics_loss is not None
        capture = capture or sampled
        capturing = Capture(self.module, plan, hooks=not sampled) if capture else contextlib.nullcontext()
        with capturing:
            outputs = self.compiled.forward(*inputs)
        self.loss.check_targets(outputs, targets)  # every step: a batch of another shape must not broadcast
        loss = self.loss(outputs, targets)
        if sampled:
            grads = capturing.gradients_from(statistics_loss(outputs), retain_graph=True,
                                             parameters=self._fisher_parameters())
            if grads:
                self.sampled_gradients.append((grads, outputs.shape[0]))
        loss.backward()
        records = None
        if capture:
            capturing.release_outputs()
            records = capturing.records
        grads = {  # a sparse gradient (nn.Embedding(sparse=True)) made dense: the step's algebra is dense
            name: dense(param.grad.detach()) if param.grad is not None else torch.zeros_like(param)
            for name, param in self.params.items()
        }
        # The pass's gradients are returned, not left in .grad: an optimizer's later pass (a half batch, sampled
        # targets) would otherwise leave a gradient other than the step's there, and .grad's memory is freed.
        self.module.zero_grad(set_to_none=True)
        kept = outputs.detach() if randomness is not None and not randomness.drawn() else None
        return GradientPass(float(loss.detach()), grads, records, kept)

    def sampled_pass(self, inputs: Sequence[torch.Tensor], fraction: float, generator: torch.Generator,
                     minimum: int = 1) -> tuple[Records, int]:
        """Sites of a statistics pass on a fraction of the batch with targets sampled from the model."""
        outside_compiled_code()
        records, n, grads = sampled_statistics(self.module, self.captured, self.loss, inputs, fraction, generator,
                                               minimum, select=self.compiled.select_output,
                                               parameters=self._fisher_parameters())
        if grads:
            self.sampled_gradients.append((grads, n))
        return records, n

    def _fisher_parameters(self) -> dict[str, torch.Tensor]:
        """The parameters named in ``fisher_parameters``, for the statistics backward."""
        return {name: self.params[name] for name in self.fisher_parameters}

    def sampled_pass_of_slice(self, inputs: Sequence[torch.Tensor], part: Any, fraction: float,
                              generator: torch.Generator, minimum: int = 1) -> tuple[Records, int]:
        """``sampled_pass`` of a global batch whose slice ``part`` (data_parallel.BatchSlice) this rank holds: the
        sites of this rank's members of the subset, and their number."""
        outside_compiled_code()
        records, n, grads = sampled_statistics_of_slice(self.module, self.captured, self.loss, inputs, part, fraction,
                                                        generator, minimum, select=self.compiled.select_output,
                                                        parameters=self._fisher_parameters())
        if grads:
            self.sampled_gradients.append((grads, n))
        return records, n

    def output_tangents(self, inputs: Sequence[torch.Tensor], directions: Sequence[Mapping[str, torch.Tensor]],
                        outputs: torch.Tensor | None = None):
        """(outputs, [J d for d in directions]) by forward mode (quadratic.output_tangents) or differences.

        ``outputs``: the outputs at these weights on these inputs where the caller has them (the differences
        then skip that forward). Every forward of the differences draws the same random numbers (dropout's
        masks), as forward mode's directions share one: otherwise the differences would be of two masks."""
        if self.resolved_products is None:  # "auto"; a half-precision weight cannot carry a difference's small shift
            wide = all(p.dtype in (torch.float32, torch.float64) for p in self.params.values())
            dear = self._dear_for_forward_mode(inputs) if wide else []
            self.resolved_products = tangent_cost.products_for(dear)
        if self.resolved_products == "forward":
            before = _RandomState(self.device) if self.products == "auto" else None
            try:
                return output_tangents(self.module, self.params, inputs, directions, select=self.compiled.select_output)
            except (NotImplementedError, RuntimeError) as error:
                if not tangent_cost.lacks_forward_mode(error):
                    raise
                if before is None:
                    raise KronographError(
                        f"fisher_products='forward': PyTorch has no forward-mode derivative for an operation of this "
                        f"model ({str(error).splitlines()[0]}); choose fisher_products='differences', or 'auto', which "
                        "takes them where forward mode is missing") from None
                self.resolved_products = "differences"  # exact to O(h^2), as forward mode would have been
                before.replay()  # the failed pass's draws (dropout's masks) are drawn again by the differences
        theta = self.parameters()
        randomness = _RandomState(self.device)
        saved: dict[str, torch.Tensor] = {}  # theta's shifted tensors as they were: one copy for all the forwards

        def forward_at(direction: Mapping[str, torch.Tensor] | None, h: float) -> torch.Tensor:
            names = list(direction or {})
            shifted = [theta[name] for name in names]
            for name in names:
                if name not in saved:
                    saved[name] = theta[name].clone()
            try:
                if names:
                    torch._foreach_add_(shifted, [direction[name].to(theta[name].dtype) for name in names], alpha=h)
                randomness.replay()
                with self._extra_forward():
                    return _own(self.compiled.forward(*inputs).detach(), (*inputs, *theta.values()))
            finally:
                if names:  # bit for bit as before
                    torch._foreach_copy_(shifted, [saved[name] for name in names])

        scheme = "one-sided" if self.resolved_products == "one-sided" else "central"
        with torch.no_grad():
            return difference_products(forward_at, theta, directions, scheme, outputs)

    def _dear_for_forward_mode(self, inputs: Sequence[torch.Tensor]) -> list[str]:
        """What the model's forward calls that makes forward-mode tangents dear (fused attention, batch, group or
        instance norm in training mode, a recurrent layer: runtime/tangent_cost.py), in the order first called;
        one no-grad forward, buffers and the random generators left as they were."""
        randomness = _RandomState(self.device)
        try:
            with torch.no_grad(), preserved_buffers(self.module):
                return tangent_cost.dear_for_forward_mode(lambda: self.compiled.forward(*inputs))
        finally:
            randomness.replay()

    def outputs(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The outputs the loss is put on, at the current weights (no grad, buffers untouched)."""
        with torch.no_grad(), self._extra_forward():
            return self.compiled.forward(*inputs).detach()

    @contextlib.contextmanager
    def _extra_forward(self) -> Iterator[None]:
        """A forward after the step's gradient pass (the quadratic model's, rho's): buffers left as they were, max
        pools as strided maxima, and spectral norms dividing by the sigma that pass left (no power iteration: a
        difference of two forwards must not hold a change of sigma)."""
        with preserved_buffers(self.module), held_power_iterations(self.module), self.fast_pooling():
            yield

    def random_state(self) -> _RandomState:
        """The global generators' state now; its ``replay`` makes the next forwards draw the same random numbers
        (dropout's masks) again, its ``drawn`` says whether any were drawn since."""
        return _RandomState(self.device)

    def loss_value(self, inputs: Sequence[torch.Tensor], targets: torch.Tensor) -> float:
        """The mean loss at the current weights (buffers untouched)."""
        with torch.no_grad(), self._extra_forward():
            return float(self.loss(self.compiled.forward(*inputs), targets))


class _RandomState:
    """The global generators' state (the CPU's, and the device's on an accelerator) when made; ``replay`` puts it
    back, so that each forward of a finite difference draws the same dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accelerator = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def drawn(self) -> bool:
        """Whether a random number was drawn since (the generators' state moved)."""
        if not torch.equal(torch.get_rng_state(), self.cpu):
            return True
        return self.accelerator is not None and not torch.equal(torch.cuda.get_rng_state(self.device), self.accelerator)

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            torch.cuda.set_rng_state(self.accelerator, self.device)
