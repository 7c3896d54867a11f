"""Capture each layer site's input a and pre-activation gradient g on the user's own nn.Module.

No module hooks: a TorchFunctionMode sees every call of ``F.linear``, ``torch.conv1d/2d/3d``,
``torch.matmul`` / ``Tensor.__matmul__`` / ``torch.mm`` and ``torch.addmm`` (GPT-2's Conv1D:
``addmm(b, x.view(-1, in), W)`` with W stored [in, out]), and ``F.embedding`` (an embedding layer's a is the
one-hot rows of its indices, ``layer_input``; a "sum" or "mean" ``F.embedding_bag`` on a table of the plan runs as
``F.embedding`` of its tokens and their weighted sum, runtime/bags.py). A call is a site of a layer when its weight
argument *is* (identity) that layer's weight Parameter, or its transpose taken inside the capture
(``W.t()``, ``W.T``, ``W.mT``, ``W.transpose(0, 1)``); functional code on raw Parameters works as well
as nn.Linear. A weight-normed layer's (``Layer.weight_norm``) weight is computed in the forward: the result of
``torch._weight_norm(v, g, dim)`` on its v is bound to it, and the calls that read it are its sites; a spectrally
normed layer's (``Layer.spectral_norm``) likewise the result of its W_o's division by sigma. Outside ``with
Capture(...)`` nothing is intercepted: the normal forward costs nothing.

torch.compile: dynamo cannot trace this mode (its site bookkeeping, weakrefs and gradient hooks fail inside
dynamo with internal errors), and a compiled graph hides the sites anyway. So while a Capture is open the
compiler's stance is "force_eager" (process-wide, restored on exit): a ``torch.compile``'d module or
function called inside runs its original Python code eagerly and is captured like any module, and outside
the capture it runs compiled as before. Entering a Capture inside a function being compiled raises
CaptureError (keep ``with precond.track():`` and ``KFAC.step`` outside compiled code).

``F.multi_head_attention_forward`` (nn.MultiheadAttention, the Transformer layers) dispatches to the mode
itself, which then no longer sees the F.linear calls inside it; Capture runs it as runtime/attention.py
rebuilds it, recording the in- and out-projections like any F.linear (inputs batch-major [n, T, E]). The fused
recurrent functions (nn.GRU, nn.LSTM, nn.RNN) likewise run as runtime/recurrent.py rebuilds them, step by step,
when one of their weights is a layer of the plan: the input map is one site over the sequence, the hidden map's
T steps are one site whose output is a zero tensor added to every step (its gradient: the steps' g, stacked).
A cell's call (nn.GRUCell, nn.LSTMCell, nn.RNNCell) is rebuilt as one site of each of its two maps.
Cases that module does not rebuild, and cross-attention whose packed in_proj_weight is a layer of the
plan (torch projects with slices of it, which cannot be its sites), run torch's function unrecorded.

Per site it records a (the op's input, detached, no copy; for addmm with alpha != 1 the input times
alpha) and the output s; a tensor hook on s stores g = dLoss/ds when a backward pass reaches it (each
backward that reaches s overwrites g: the last one wins), or ``gradients_from(loss)`` sets g without
touching any .grad (the sampled-target loss of the Fisher statistics). ``release_outputs`` drops the
references to s, and with them the graph, once the gradients are in.
g is the gradient of whatever was differentiated: for a MEAN loss over n examples it is
(1/n) dl_i/ds, and the statistics (runtime/factors.py) take the scale back explicitly.

Statistics on a random fraction of the batch: tensors are always captured whole; pass the chosen
example indices to the statistics functions (and build the sampled loss on those examples only).

Sites are counted per call, in call order. Decision on mismatches with the plan:
  * a weight called more often than the plan has sites raises CaptureError at that call (the program
    executed differs from the traced one, so the plan may be stale); ``strict=False`` pools the extra
    calls as further sites and lists them in ``report().extra``;
  * a layer never called (or called fewer times than it has sites) is not an error, since forwards may
    skip branches: ``report()`` lists it and ``check()`` raises; a caller updating statistics skips
    the layers in ``report().uncalled`` (``batch_factors`` raises on a layer without sites).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch._C._dynamo.eval_frame import get_eval_frame_callback
from torch.overrides import TorchFunctionMode

from kronograph.errors import KronographError
from kronograph.passes.plan import ConvGeometry, Layer, LayerPlan
from kronograph.runtime import attention, bags, recurrent, sharded
from kronograph.runtime.patches import call_geometry, transposed_call_geometry


def layer_input(layer: Layer, a: torch.Tensor, dtype: torch.dtype | None = None,
                padding_idx: int | None = None) -> torch.Tensor:
    """A site's input as its statistics read it: an embedding's indices become one-hot rows (in ``dtype``, by
    default float32), so that it is a linear layer on [..., rows] inputs, but a table's (``Layer.diagonal_a``) stay
    indices, the ``padding_idx`` row's as the index ``rows`` (counted by no row); any other layer's input as it is.
    The ``padding_idx`` row takes no gradient in torch (it is no parameter of the linear map): its column is
    zero, so neither its count in A nor a gradient made from the rows (sec 8's low-rank products) moves it."""
    if layer.kind != "embedding":
        return a
    if layer.diagonal_a:  # a table's statistics count the indices (factors.diagonal_counts): no [tokens, rows] one-hot
        indices = a.long()
        if padding_idx is None:
            return indices
        return indices.masked_fill(indices == padding_idx % layer.in_features, layer.in_features)  # a row none has
    rows = torch.nn.functional.one_hot(a.long(), layer.in_features).to(dtype or torch.float32)
    if padding_idx is not None:  # out of place: the record checks the version of what it holds
        rows = rows.index_fill(-1, torch.tensor([padding_idx % layer.in_features], device=rows.device), 0)
    return rows


class CaptureError(KronographError):
    """The executed program does not fit the LayerPlan (extra calls, a layout mismatch, a stale input)."""


@dataclass
class SiteRecord:
    """One executed site: ``a`` as the op saw it, ``output`` s, and ``g`` = dLoss/ds once backward ran.

    Linear sites: a [..., in], g [..., out]. Conv sites: a [N, C, *spatial], g [N, out, *out_spatial],
    ``geometry`` taken from the call's own arguments.
    """

    layer: str
    index: int
    a: torch.Tensor
    output: torch.Tensor | None
    geometry: ConvGeometry | None = None
    g: torch.Tensor | None = None
    a_version: int = 0

    def check_unchanged(self) -> None:
        if self.a._version != self.a_version:
            raise CaptureError(
                f"the input of layer {self.layer!r} (site {self.index}) was modified in place after the call; "
                "clone it before modifying, or compute the statistics before the in-place update"
            )


def batch_axis(x: torch.Tensor, examples: int) -> int:
    """The axis of a captured tensor that counts its ``examples``: 0 (batch-major, [n, ...] or a flattened
    [n * T, ...]) or 1 (sequence-first [T, n, ...], as attention's projections see their input, where dim 0
    does not split into the examples). A sequence-first tensor whose T is a multiple of n reads as batch-major."""
    return 1 if x.dim() >= 3 and x.shape[0] % examples and x.shape[1] == examples else 0


def concatenated_records(parts: Sequence[tuple[dict[str, list[SiteRecord]], int]]
                         ) -> dict[str, list[SiteRecord]] | None:
    """The sites of consecutive parts of one batch (each part's records and its number of examples) as those of
    one pass over the whole batch: each site's a and g joined along the examples' axis, g (of each part's mean
    loss) rescaled to the mean over the batch. None where the parts called a layer a different number of times
    (a data-dependent branch): their sites do not pair up."""
    total = sum(size for _, size in parts)
    names = list(parts[0][0])
    if any(list(records) != names or any(len(records[name]) != len(parts[0][0][name]) for name in names)
           for records, _ in parts):
        return None
    joined: dict[str, list[SiteRecord]] = {}
    for name in names:
        joined[name] = []
        for sites in zip(*(records[name] for records, _ in parts)):
            axis = batch_axis(sites[0].a, parts[0][1])
            a = torch.cat([site.a for site in sites], dim=axis)
            g = None
            if all(site.g is not None for site in sites):
                g = torch.cat([site.g * (size / total) for site, (_, size) in zip(sites, parts)],
                              dim=batch_axis(sites[0].g, parts[0][1]))
            joined[name].append(SiteRecord(name, sites[0].index, a, None, sites[0].geometry, g, a._version))
    return joined


@dataclass(frozen=True)
class CaptureReport:
    """Sites counted against the plan. ``partial`` maps a layer to (calls seen, sites in the plan)."""

    uncalled: tuple[str, ...] = ()
    partial: dict[str, tuple[int, int]] = field(default_factory=dict)
    extra: dict[str, tuple[int, int]] = field(default_factory=dict)
    no_gradient: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.uncalled or self.partial or self.extra)


_LINEAR = {torch.nn.functional.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_ADDMM = {torch.addmm, torch.Tensor.addmm}
_CONV = {torch.conv1d, torch.conv2d, torch.conv3d}
_CONV_TRANSPOSE = {torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}
_EMBEDDING = {torch.nn.functional.embedding}
_DIVIDE = {torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.true_divide}  # spectral norm's W_o / sigma
_TRANSPOSE_METHODS = {torch.Tensor.t}
_TRANSPOSE_PROPERTIES = (torch.Tensor.T, torch.Tensor.mT)


INSIDE_COMPILED = (
    "a kronograph capture (precond.track(), KFAC.step) was entered inside a torch.compile'd function; compile "
    "the model only (torch.compile(model)) and keep the track() block and the optimizer's step outside compiled "
    "code, or mark your step function with @torch.compiler.disable"
)


def dense(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as a dense tensor (nn.Embedding(sparse=True) gives a sparse one): the steps' algebra is dense."""
    return grad.to_dense() if grad.is_sparse else grad


def outside_compiled_code() -> None:
    """Raise CaptureError inside a torch.compile'd function, before dynamo meets the capture's own code (where
    it fails with internal errors). While dynamo traces the caller, is_compiling() holds: with fullgraph=True this
    error is the cause of dynamo's Unsupported, otherwise dynamo gives up on the frame and runs it eagerly, with
    its frame callback still installed (what set_stance refuses, and what is checked here), so it raises then.
    Under ``torch.compiler.disable`` or the "force_eager" stance there is no callback: capturing is allowed."""
    if torch.compiler.is_compiling() or get_eval_frame_callback() not in (None, False):
        raise CaptureError(INSIDE_COMPILED)


def _read_weight(layer: Layer) -> str:
    """The parameter a layer's sites are found by: its weight, or the v or W_o its computed weight is made of."""
    return layer.weight_norm[0] if layer.weight_norm else layer.spectral_norm or layer.weight


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


class Capture(TorchFunctionMode):
    """Context manager recording the sites of every Layer of ``plan`` on ``module``.

    Example::

        with Capture(module, plan) as cap:
            loss = loss_fn(module(x), y)      # a recorded per site
        loss.backward()                        # g recorded by tensor hooks (hooks=True)
        # or: cap.gradients_from(sampled_loss, retain_graph=True)  (no .grad written)
        records = cap.records                  # {layer name: [SiteRecord, ...]}

    Sites are counted from the start of the Capture, or of the last ``begin_pass()`` (one Capture around
    several micro-batches: ``passes()`` splits the records by pass). Calls made with gradients disabled
    (a validation forward under ``torch.no_grad()``) are not recorded: they have no g.

    Args:
        module: the user's module (its ``named_parameters()`` names are the plan's parameter names).
        plan: the LayerPlan, or the Layers to capture (a subset is fine).
        hooks: register a gradient hook on every site output (else use ``gradients_from``).
        strict: raise on more calls of a weight than the plan has sites (else pool and report them).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        plan: LayerPlan | Sequence[Layer],
        *,
        hooks: bool = True,
        strict: bool = True,
    ) -> None:
        super().__init__()
        chosen = plan.layers if isinstance(plan, LayerPlan) else tuple(plan)
        self.layers: dict[str, Layer] = {layer.name: layer for layer in chosen}
        params = dict(module.named_parameters())
        # Layers by the id of their weight: embedding tables apart, so that a table tied to an output layer (a Tie's
        # two views of one weight) is found as the table by F.embedding and as the output layer by F.linear.
        self._by_weight: dict[int, Layer] = {}
        self._tables: dict[int, Layer] = {}
        # Layers of a computed weight by the id of their v (weight norm: the W that torch._weight_norm(v, g, dim)
        # returns is bound to them) or of their W_o (spectral norm: the W of W_o / sigma).
        self._normed: dict[int, Layer] = {}
        for layer in self.layers.values():
            weight = _read_weight(layer)
            if weight not in params:
                raise CaptureError(f"layer {layer.name!r}: the module has no parameter {weight!r}")
            kind = self._normed if layer.computed else self._tables if layer.kind == "embedding" else self._by_weight
            kind[id(params[weight])] = layer
        self._weights = {id(params[layer.weight]): params[layer.weight] for layer in self.layers.values()
                         if not layer.computed}
        self._module = module
        self._rebinding: list[Any] = []  # forward pre-hooks following FSDP2's unsharded weights (``_follow_unsharded``)
        self.hooks = hooks
        self.strict = strict
        self.records: dict[str, list[SiteRecord]] = {}
        self._transposed: dict[int, tuple[weakref.ref, Layer]] = {}
        self._hooks_live = True
        self._marks: list[dict[str, int]] = []  # records per layer at the start of each pass

    def begin_pass(self) -> None:
        """A new forward pass (micro-batch) starts: its sites are counted afresh against the plan."""
        self._marks.append({name: len(sites) for name, sites in self.records.items()})

    def passes(self) -> list[dict[str, list[SiteRecord]]]:
        """The records split by pass: those before the first ``begin_pass`` (if any call came first), then one
        dict per ``begin_pass``; a pass that recorded nothing (a forward under no_grad) gives an empty dict."""
        bounds = [{}, *self._marks]
        found = []
        for start, end in zip(bounds, [*bounds[1:], None]):
            part = {}
            for name, sites in self.records.items():
                chunk = sites[start.get(name, 0): len(sites) if end is None else end.get(name, 0)]
                if chunk:
                    part[name] = chunk
            found.append(part)
        return found

    # -- interception -------------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is attention.MULTI_HEAD_ATTENTION:
            call = self._attention_call(args, kwargs)
            if call is not None:
                return attention.multi_head_attention(call, self._project)
        if func in recurrent.FUNCTIONS:
            call = self._recurrent_call(func, args, kwargs)
            if call is not None:
                return recurrent.run(call, self._project, self._probe, self._record_steps)
        if func is bags.FUNCTION and torch.is_grad_enabled():
            call = bags.linear_call(args, kwargs)
            layer = self._tables.get(id(call.weight)) if call is not None else None
            if layer is not None and self._weights[id(call.weight)] is call.weight:
                return bags.per_token(call, lambda indices: self._bag_tokens(layer, call, indices))
        if func in recurrent.CELLS and torch.is_grad_enabled():
            weights = recurrent.cell_weights(args, kwargs)
            if weights is not None and any(self._find(weight)[0] is not None for weight in weights):
                return recurrent.cell_step(func, args, kwargs, self._project)
        result = func(*args, **kwargs)
        if func in _LINEAR:  # F.linear(input, weight, bias): weight used as [out, in]
            self._linear(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), result, used_out_in=True)
        elif func in _MATMUL:  # x @ W: W used as [in, out]
            self._linear(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other"), result, used_out_in=False)
        elif func in _ADDMM:  # addmm(bias, x, W, beta=, alpha=): W used as [in, out]
            self._addmm(args, kwargs, result)
        elif func in _CONV:
            self._conv(args, kwargs, result)
        elif func in _CONV_TRANSPOSE:
            self._conv_transpose(args, kwargs, result)
        elif func in _EMBEDDING:
            self._embedding(args, kwargs, result)
        elif func is torch._weight_norm and args and id(args[0]) in self._normed:
            # this forward's W = g v / |v| of a weight-normed layer (the plan matched its dim on g's shape)
            self._bind(self._normed[id(args[0])], result)
        elif func in _DIVIDE and args and id(args[0]) in self._normed and self._normed[id(args[0])].spectral_norm:
            self._bind(self._normed[id(args[0])], result)  # this forward's W = W_o / sigma of a spectral norm
        elif self._is_transpose(func, args, kwargs):
            self._transposed[id(result)] = (weakref.ref(result), self._by_weight.get(id(args[0]))
                                            or self._tables[id(args[0])])
        return result

    def _attention_call(self, args: tuple, kwargs: dict) -> dict[str, Any] | None:
        """The bound arguments of a multi-head attention call Capture can rebuild and record, else None."""
        call = attention.bind(args, kwargs)
        if call is None:
            return None
        sliced = attention.sliced_weight(call)
        if sliced is not None and self._find(sliced)[0] is not None:
            return None
        return call

    def _recurrent_call(self, func: Callable, args: tuple, kwargs: dict) -> recurrent.RecurrentCall | None:
        """The bound arguments of a recurrent call with a layer of the plan among its weights, else None (torch's
        fused function then runs: nothing to record, or under no_grad nothing to learn)."""
        if not torch.is_grad_enabled():
            return None
        call = recurrent.bind(func, args, kwargs)
        if call is None or all(self._find(weight)[0] is None for weight in call.params):
            return None
        return call

    def _probe(self, weight: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """The zero tensor whose gradient is a recurrent hidden map's per-step g (runtime/recurrent.py), or None
        when ``weight`` is no layer of the plan."""
        if self._find(weight)[0] is None:
            return None
        return torch.zeros(shape, dtype=like.dtype, device=like.device, requires_grad=True)

    def _record_steps(self, weight: torch.Tensor, a: torch.Tensor, zeros: torch.Tensor) -> None:
        """Record a recurrent hidden map's steps as one site: a [n, T, H], output the probe ``zeros``."""
        self._linear(a, weight, zeros, used_out_in=True)

    def _project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear inside a handled call (the mode is off there, so it is recorded here, once)."""
        result = torch.nn.functional.linear(x, weight, bias)
        self._linear(x, weight, result, used_out_in=True)
        return result

    def _is_transpose(self, func: Callable, args: tuple, kwargs: dict) -> bool:
        """Whether the call transposes a layer's 2-D weight (W.t(), W.T, W.mT, W.transpose(0, 1))."""
        if not args or not isinstance(args[0], torch.Tensor) or id(args[0]) not in self._weights:
            return False
        if args[0].dim() != 2:
            return False
        if func in _TRANSPOSE_METHODS or getattr(func, "__self__", None) in _TRANSPOSE_PROPERTIES:
            return True
        if func is torch.Tensor.transpose or func is torch.transpose:
            return {_arg(args, kwargs, 1, "dim0") % 2, _arg(args, kwargs, 2, "dim1") % 2} == {0, 1}
        return False

    def _find(self, weight: Any) -> tuple[Layer | None, bool]:
        """(layer, transposed) for a weight argument; (None, False) when it is no layer's weight."""
        if not isinstance(weight, torch.Tensor):
            return None, False
        layer = self._by_weight.get(id(weight)) or self._tables.get(id(weight))
        if layer is not None and self._weights[id(weight)] is weight:
            return layer, False
        entry = self._transposed.get(id(weight))
        if entry is not None and entry[0]() is weight:
            return entry[1], True
        return None, False

    def _linear(self, x: Any, weight: Any, result: Any, *, used_out_in: bool, alpha: float = 1.0) -> Layer | None:
        layer, transposed = self._find(weight)
        if layer is None:
            other, _ = self._find(x)
            if other is not None and not used_out_in:
                raise CaptureError(
                    f"layer {other.name!r}: its weight is the left operand of a matmul (W @ x); "
                    "only x @ W, F.linear and addmm are captured"
                )
            return None
        stored_out_in = used_out_in != transposed
        if (layer.weight_layout == "out_in") != stored_out_in:
            raise CaptureError(
                f"layer {layer.name!r}: the plan says weight_layout={layer.weight_layout!r} but the call uses it "
                f"as {'[out, in]' if stored_out_in else '[in, out]'}; recompile the model"
            )
        self._record(layer, x if alpha == 1 else x * alpha, result, None)  # s = (alpha x) W + b
        return layer

    def _addmm(self, args: tuple, kwargs: dict, result: Any) -> None:
        layer, _ = self._find(_arg(args, kwargs, 2, "mat2"))
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        if layer is not None and beta != 1 and layer.bias is not None:
            raise CaptureError(f"layer {layer.name!r}: addmm with beta={beta} scales the bias; only beta=1 works")
        x, weight = _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
        self._linear(x, weight, result, used_out_in=False, alpha=alpha)

    def _conv(self, args: tuple, kwargs: dict, result: Any) -> None:
        layer, _ = self._find(_arg(args, kwargs, 1, "weight"))
        if layer is None:
            return
        weight = _arg(args, kwargs, 1, "weight")
        geometry = call_geometry(
            weight.shape[2:],
            _arg(args, kwargs, 3, "stride", 1),
            _arg(args, kwargs, 4, "padding", 0),
            _arg(args, kwargs, 5, "dilation", 1),
            _arg(args, kwargs, 6, "groups", 1),
        )
        self._record_conv(layer, _arg(args, kwargs, 0, "input"), result, geometry, transposed=False)

    def _conv_transpose(self, args: tuple, kwargs: dict, result: Any) -> None:
        """conv_transposeNd(input, weight, bias, stride, padding, output_padding, groups, dilation): a site of the
        convolution it equals (plan.transposed_geometry), on the input with zeros between neighbours."""
        layer, _ = self._find(_arg(args, kwargs, 1, "weight"))
        if layer is None:
            return
        padding = _arg(args, kwargs, 4, "padding", 0)
        geometry = transposed_call_geometry(
            _arg(args, kwargs, 1, "weight").shape[2:],
            _arg(args, kwargs, 3, "stride", 1),
            padding,
            _arg(args, kwargs, 5, "output_padding", 0),
            _arg(args, kwargs, 6, "groups", 1),
            _arg(args, kwargs, 7, "dilation", 1),
        )
        if geometry is None:
            raise CaptureError(f"layer {layer.name!r}: a transposed convolution whose padding {padding} exceeds "
                               "dilation (kernel - 1) has no equal convolution; recompile the model")
        self._record_conv(layer, _arg(args, kwargs, 0, "input"), result, geometry, transposed=True)

    def _record_conv(self, layer: Layer, x: torch.Tensor, result: Any, geometry: ConvGeometry,
                     transposed: bool) -> None:
        if (layer.weight_layout == "transposed") != transposed:
            raise CaptureError(f"layer {layer.name!r}: the plan has a {'transposed ' if not transposed else ''}"
                               f"convolution but the call is {'a transposed' if transposed else 'an ordinary'} one; "
                               "recompile the model")
        if layer.geometry is not None and geometry.groups != layer.groups:
            raise CaptureError(
                f"layer {layer.name!r}: called with groups={geometry.groups}, the plan has {layer.groups}"
            )
        self._record(layer, x, result, geometry)

    def _embedding(self, args: tuple, kwargs: dict, result: Any) -> None:
        """F.embedding(indices, table): a site with one-hot rows. A call that renormalises the table in place
        (max_norm), scales its gradient by frequency or makes it sparse is not the plan's linear map: unrecorded,
        the layer then steps as an unmatched parameter."""
        weight = _arg(args, kwargs, 1, "weight")
        layer = self._tables.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        if layer is None or self._weights[id(weight)] is not weight:
            return
        if (_arg(args, kwargs, 3, "max_norm") is not None or _arg(args, kwargs, 5, "scale_grad_by_freq", False)
                or _arg(args, kwargs, 6, "sparse", False)):
            return
        self._record(layer, _arg(args, kwargs, 0, "input"), result, None, _arg(args, kwargs, 2, "padding_idx"))

    def _bag_tokens(self, layer: Layer, call: bags.BagCall, indices: torch.Tensor) -> torch.Tensor:
        """An EmbeddingBag's tokens' rows, F.embedding of its table, recorded as a site of its embedding layer
        (runtime/bags.py sums them into the bags)."""
        rows = torch.nn.functional.embedding(indices, call.weight)
        self._record(layer, indices, rows, None, call.padding_idx)
        return rows

    def _record(self, layer: Layer, a: torch.Tensor, output: torch.Tensor, geometry: ConvGeometry | None,
                padding_idx: int | None = None) -> None:
        if not torch.is_grad_enabled():
            return  # no backward will reach it: nothing to learn from this call
        sites = self.records.setdefault(layer.name, [])
        calls = len(sites) - (self._marks[-1].get(layer.name, 0) if self._marks else 0)
        if self.strict and calls >= len(layer.sites):
            raise CaptureError(
                f"layer {layer.name!r} ({layer.weight}) was called {calls + 1} times but the plan has "
                f"{len(layer.sites)} site(s): the forward differs from the traced one; recompile with inputs that "
                "take the same path, or capture with strict=False to pool the extra calls"
            )
        a = layer_input(layer, a.detach(), output.dtype if isinstance(output, torch.Tensor) else None, padding_idx)
        record = SiteRecord(layer.name, len(sites), a, output, geometry, a_version=a._version)
        sites.append(record)
        if self.hooks and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._make_hook(record))

    def _make_hook(self, record: SiteRecord) -> Callable[[torch.Tensor], None]:
        live = weakref.ref(self)

        def hook(grad: torch.Tensor) -> None:
            capture = live()
            if capture is not None and capture._hooks_live:
                record.g = grad.detach()

        return hook

    def __enter__(self) -> Capture:
        outside_compiled_code()
        self._stance = torch.compiler.set_stance("force_eager")  # applies now; its __exit__ restores the previous
        try:
            self._follow_unsharded()
            return super().__enter__()
        except BaseException:
            self._unfollow()
            self._stance.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> Any:
        self._transposed.clear()
        self._unfollow()
        try:
            return super().__exit__(*exc)
        finally:
            self._stance.__exit__(None, None, None)

    def _follow_unsharded(self) -> None:
        """On a module sharded by FSDP2, a layer's sites are calls with the unsharded Parameter FSDP sets on the
        layer's module around its forward (runtime/sharded.py), not with the DTensor of ``named_parameters()``: a
        forward pre-hook on each layer's module (after FSDP's own, which unshards) binds the layer to it."""
        if not sharded.any_sharded(self._module):
            return
        for layer in self.layers.values():
            # a computed weight's layer is followed by its v or W_o, whose W is bound in the forward
            holder, attribute = sharded.parameter_holder(self._module, _read_weight(layer))

            def bind(module: torch.nn.Module, _args: tuple, layer: Layer = layer, attribute: str = attribute) -> None:
                weight = getattr(module, attribute, None)
                if layer.computed:
                    self._follow_direction(layer, weight)
                else:
                    self._bind(layer, weight)

            self._rebinding.append(holder.register_forward_pre_hook(bind))

    def _unfollow(self) -> None:
        for handle in self._rebinding:
            handle.remove()
        self._rebinding.clear()

    def _bind(self, layer: Layer, weight: Any) -> None:
        """Make ``weight`` the tensor whose calls are ``layer``'s sites (its previous one no longer is)."""
        if not isinstance(weight, torch.Tensor):
            return
        found = self._tables if layer.kind == "embedding" else self._by_weight
        for key in [key for key, known in found.items() if known is layer]:
            del found[key]
            self._weights.pop(key, None)  # (a tie's other view, bound first, may have taken it already)
        found[id(weight)], self._weights[id(weight)] = layer, weight

    def _follow_direction(self, layer: Layer, direction: Any) -> None:
        """Make ``direction`` the v (or W_o) whose computed W is ``layer``'s (FSDP2's unsharded one inside the
        forward)."""
        if not isinstance(direction, torch.Tensor):
            return
        for key in [key for key, known in self._normed.items() if known is layer]:
            del self._normed[key]
        self._normed[id(direction)] = layer

    # -- results ------------------------------------------------------------------------------------
    def gradients_from(self, loss: torch.Tensor, *, retain_graph: bool = False,
                       parameters: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Set every site's g to dloss/ds with torch.autograd.grad (no .grad is written, hooks stay quiet).

        A site whose output does not reach ``loss`` gets g = 0. Returns dloss/dp of the ``parameters`` (by name)
        that require grad, from the same backward (zeros for one ``loss`` does not reach).
        """
        records = [
            r for sites in self.records.values() for r in sites if r.output is not None and r.output.requires_grad
        ]
        wanted = {name: p for name, p in (parameters or {}).items() if p.requires_grad}
        if not records and not wanted:  # no site of this pass reaches a gradient (every layer frozen or not called)
            return {}
        self._hooks_live = False
        try:
            grads = torch.autograd.grad(loss, [r.output for r in records] + list(wanted.values()),
                                        retain_graph=retain_graph, allow_unused=True)
        finally:
            self._hooks_live = True
        for record, grad in zip(records, grads):
            record.g = torch.zeros_like(record.output) if grad is None else grad.detach()
        return {name: torch.zeros_like(p) if grad is None else dense(grad.detach())
                for (name, p), grad in zip(wanted.items(), grads[len(records):])}

    def release_outputs(self) -> None:
        """Drop the references to the outputs s (and so to the graph) once the gradients are in."""
        for sites in self.records.values():
            for record in sites:
                record.output = None

    def report(self) -> CaptureReport:
        uncalled, partial, extra, no_gradient = [], {}, {}, []
        for name, layer in self.layers.items():
            calls = len(self.records.get(name, ()))
            if calls == 0:
                uncalled.append(name)
            elif calls < len(layer.sites):
                partial[name] = (calls, len(layer.sites))
            elif calls > len(layer.sites):
                extra[name] = (calls, len(layer.sites))
            if calls and all(r.g is None for r in self.records[name]):
                no_gradient.append(name)
        return CaptureReport(tuple(uncalled), partial, extra, tuple(no_gradient))

    def check(self) -> None:
        """Raise CaptureError unless every layer was called exactly as many times as it has sites."""
        report = self.report()
        if not report.ok:
            raise CaptureError(
                f"the forward did not match the plan: never called {list(report.uncalled)}, "
                f"fewer calls than sites {report.partial}, more calls than sites {report.extra}"
            )
