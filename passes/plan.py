"""The LayerPlan: what the matcher found, in the model's own parameter names.

One plan serves both engines. Tensor names (``activation``, ``preactivation``) refer to the ONNX graph
the plan was built from; parameter names are the source model's ``state_dict`` keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: The widest embedding table whose A is kept dense (rows x rows). A wider one (a word vocabulary) is a ``table``:
#: its A, how often each row is read, is exactly diagonal (one-hot inputs) and kept as that diagonal.
MAX_DENSE_EMBEDDING_ROWS = 1024


@dataclass(frozen=True)
class ConvGeometry:
    """Convolution hyper-parameters needed to extract patches (F.unfold order).

    A transposed convolution is held as the convolution it equals (``transposed_geometry``): stride 1 over its
    input with ``input_dilation - 1`` zeros inserted between neighbours (its stride), kernel flipped, padded by
    dilation (kernel - 1) - pads (and output_padding at the end)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]  # ONNX order: begin pads of every spatial axis, then end pads
    dilation: tuple[int, ...]
    groups: int
    auto_pad: str = "NOTSET"
    input_dilation: tuple[int, ...] = ()  # a transposed convolution's stride; empty: an ordinary convolution


def transposed_geometry(kernel: Sequence[int], stride: Sequence[int], begin: Sequence[int], end: Sequence[int],
                        output_padding: Sequence[int], dilation: Sequence[int], groups: int) -> ConvGeometry | None:
    """The ConvGeometry of the convolution a transposed one equals (per axis: its stride as ``input_dilation``,
    pads d (k - 1) - begin and d (k - 1) - end + output_padding, stride 1); None where a pad would be negative
    (the transposed convolution crops more than its kernel adds: no such convolution)."""
    reach = [d * (k - 1) for k, d in zip(kernel, dilation)]
    low = [r - b for r, b in zip(reach, begin)]
    high = [r - e + o for r, e, o in zip(reach, end, output_padding)]
    if min(low + high) < 0:
        return None
    return ConvGeometry(tuple(kernel), (1,) * len(kernel), tuple(low + high), tuple(dilation), int(groups),
                        input_dilation=tuple(stride))


@dataclass(frozen=True)
class Site:
    """One application of a layer's weight in the graph.

    ``activation`` is the layer input a (without the homogeneous 1), ``preactivation`` the output s
    (bias included) whose gradient is g. ``activation_transposed`` is set when the graph consumes the
    input transposed (Gemm with transA=1): the tensor then holds a^T, shape [in, batch].
    ``module`` and ``call`` locate the site in the source PyTorch module where the exporter said so
    (module path, call name in the traced program); both are empty for ONNX files.
    """

    activation: str
    preactivation: str
    nodes: tuple[str, ...]
    activation_transposed: bool = False
    module: str = ""
    call: str = ""


@dataclass(frozen=True)
class Layer:
    """A parameter block with Kronecker-factored curvature: A (a_dim x a_dim) and G (g_dim x g_dim).

    ``weight_layout`` is ``"out_in"`` when the stored weight is [out, in, ...] (PyTorch, ONNX Conv,
    Gemm with transB=1), ``"in_out"`` when it is [in, out] (MatMul weights from other frameworks) and
    ``"transposed"`` for a transposed convolution's [in, out / groups, *kernel] (its kernel flipped too);
    W_bar is always built in [out, in] order. For grouped convolutions there is one (A, G) pair per
    group: ``groups`` blocks of sizes ``a_dim`` and ``g_dim``. More than one site means the weight is
    shared (the statistics of all sites are pooled, as in KFAC-expand).
    """

    name: str
    kind: str  # "linear", "conv1d", "conv2d", "conv3d", "embedding" (a linear layer on one-hot rows)
    weight: str
    bias: str | None
    weight_shape: tuple[int, ...]
    weight_layout: str
    in_features: int  # per group, without the homogeneous coordinate
    out_features: int  # per group
    sites: tuple[Site, ...]
    geometry: ConvGeometry | None = None
    # G kept as its diagonal: set by K-FAC (``curvature.with_diagonal_g``) on an output layer too wide for a dense G
    # (a word or BPE vocabulary's head), never by the matcher.
    diagonal_g: bool = False
    # (direction v, magnitude g) where the weight is computed by weight norm, W = g v / |v| with |v| over every axis
    # where g has size 1 (PyTorch's weight_norm: all but dim, or all for dim=None): ``weight`` then names the computed
    # W (``fc.weight``), which is no parameter, and v and g are the parameters (a layer of the plan's ``normed``).
    weight_norm: tuple[str, str] | None = None
    # The parameter W_o where the weight is computed by spectral norm, W = W_o / sigma with sigma = u^T W_o v from the
    # power iteration's vectors (PyTorch's spectral_norm, old or parametrization): ``weight`` names the computed W.
    spectral_norm: str | None = None

    @property
    def computed(self) -> bool:
        """Whether the weight is computed from the parameters in the forward (weight norm, spectral norm)."""
        return bool(self.weight_norm or self.spectral_norm)

    @property
    def groups(self) -> int:
        return self.geometry.groups if self.geometry else 1

    @property
    def a_dim(self) -> int:
        return self.in_features + (1 if self.bias is not None else 0)

    @property
    def g_dim(self) -> int:
        return self.out_features

    @property
    def diagonal_a(self) -> bool:
        """Whether A is kept as its diagonal: an embedding table wider than ``MAX_DENSE_EMBEDDING_ROWS`` (its
        one-hot inputs make A exactly diagonal; a dense one would be rows^2, 10 GB for 50257 words)."""
        return self.kind == "embedding" and self.in_features > MAX_DENSE_EMBEDDING_ROWS

    @property
    def factor_bytes(self) -> int:
        """Memory of the A and G factors in float32 (inverses double it)."""
        return 4 * self.groups * ((self.a_dim if self.diagonal_a else self.a_dim**2)
                                  + (self.g_dim if self.diagonal_g else self.g_dim**2))

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The trainable parameters the layer's block covers: weight and bias, v, g and bias under weight norm, W_o
        and bias under spectral norm."""
        weights = self.weight_norm or (self.spectral_norm or self.weight,)
        return tuple(name for name in (*weights, self.bias) if name)

    @property
    def num_params(self) -> int:
        return math.prod(self.weight_shape) + (self.groups * self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Tie:
    """A table read both as an embedding (a Gather at the graph's own indices) and as the weight of an output
    layer (F.linear(h, W): GPT-2's tied head), as two Layers of the one [rows, dim] weight: ``embedding`` (in_out,
    in = rows) and ``output`` ([rows, dim] as [out, in], with the head's own bias where it has one). Its Fisher
    block is the sum of the two uses' Kronecker products (runtime/tied.py); the names of the views are the tie's
    with ``[embedding]`` and ``[output]``."""

    name: str
    embedding: Layer
    output: Layer

    @property
    def views(self) -> tuple[Layer, Layer]:
        return self.embedding, self.output


@dataclass(frozen=True)
class Unmatched:
    """A trainable parameter without a Kronecker block, and why (it gets the first-order update)."""

    name: str
    shape: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class LayerPlan:
    layers: tuple[Layer, ...]
    unmatched: tuple[Unmatched, ...]
    parameters: tuple[str, ...] = field(default=())  # every trainable parameter, in model order
    inputs: tuple[str, ...] = field(default=())  # data inputs of the graph
    outputs: tuple[str, ...] = field(default=())
    # In words, the model output the loss is put on (compile's ``output=``); "" in plans written before it was kept.
    output: str = ""
    # Embedding tables wider than MAX_DENSE_EMBEDDING_ROWS, as layers with a diagonal A (``Layer.diagonal_a``). They
    # stay in ``unmatched`` too: K-FAC on the torch engine gives them blocks, the other methods step them as they
    # step every parameter outside the plan's layers.
    tables: tuple[Layer, ...] = field(default=())
    # Tables tied to an output layer (``Tie``): their weight (and the head's bias) stay in ``unmatched`` too; K-FAC and
    # KFACPreconditioner give each one block over both uses.
    ties: tuple[Tie, ...] = field(default=())
    # Layers whose weight is computed by weight norm or spectral norm (``Layer.computed``): their parameters stay in
    # ``unmatched`` too; K-FAC and KFACPreconditioner give each a block on the computed weight.
    normed: tuple[Layer, ...] = field(default=())

    @property
    def all_layers(self) -> tuple[Layer, ...]:
        """Every Layer a method may give a block: the layers, the tables, the ties' views and the normed."""
        return (*self.layers, *self.tables, *(view for tie in self.ties for view in tie.views), *self.normed)

    def layer(self, name: str) -> Layer:
        for layer in self.all_layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerPlan":
        def layer(d: dict[str, Any]) -> Layer:
            geometry = d.get("geometry")
            return Layer(
                **{
                    **d,
                    "weight_shape": tuple(d["weight_shape"]),
                    "weight_norm": tuple(d["weight_norm"]) if d.get("weight_norm") else None,
                    "sites": tuple(Site(**{**s, "nodes": tuple(s["nodes"])}) for s in d["sites"]),
                    "geometry": ConvGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in geometry.items()})
                    if geometry
                    else None,
                }
            )

        return cls(
            layers=tuple(layer(d) for d in data["layers"]),
            unmatched=tuple(Unmatched(u["name"], tuple(u["shape"]), u["reason"]) for u in data["unmatched"]),
            parameters=tuple(data.get("parameters", ())),
            inputs=tuple(data.get("inputs", ())),
            outputs=tuple(data.get("outputs", ())),
            output=data.get("output", ""),
            tables=tuple(layer(d) for d in data.get("tables", ())),
            ties=tuple(Tie(d["name"], layer(d["embedding"]), layer(d["output"])) for d in data.get("ties", ())),
            normed=tuple(layer(d) for d in data.get("normed", ())),
        )

    @classmethod
    def from_json(cls, text: str) -> "LayerPlan":
        return cls.from_dict(json.loads(text))
