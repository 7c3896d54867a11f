"""An operation torch.onnx has no ONNX function for is compiled as an opaque node (compiler/opaque.py): the torch
engine trains the model, the weights computed through it step outside every block, onnxruntime refuses it.

Independent checks: the opaque node's outputs carry the shapes torch computes; an orthogonal parametrization's
weight stays orthogonal while K-FAC trains through it (W W^T = I), which holds only if the step went to its
``original`` through PyTorch's own parametrization."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

import kronograph
from kronograph.compiler.opaque import DOMAIN, OpaqueOperationWarning, opaque_nodes
from kronograph.errors import KronographError


def orthogonal_mlp(orthogonal_map: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), orthogonal(nn.Linear(8, 8), orthogonal_map=orthogonal_map),
                         nn.Tanh(), nn.Linear(8, 3))


def _batches(count: int = 24) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(count, 64, 6, generator=generator)
    return list(zip(x, (x[..., :2] > 0).long().sum(-1)))


@pytest.mark.parametrize(("orthogonal_map", "operation"), [("matrix_exp", "linalg_matrix_exp"),
                                                           ("householder", "linalg_householder_product")])
def test_an_orthogonal_layer_compiles_with_an_opaque_node_and_trains_outside_every_block(orthogonal_map, operation):
    model = orthogonal_mlp(orthogonal_map)
    with pytest.warns(OpaqueOperationWarning, match=rf"forward\(\) calls aten\.{operation}, which torch\.onnx has no"):
        cm = kronograph.compile(model, torch.randn(2, 6), loss="cross_entropy")
    assert opaque_nodes(cm.graph) == [f"{operation}.default"]
    node = next(node for node in cm.graph.graph if node.domain == DOMAIN)
    assert [tuple(output.shape) for output in node.outputs] == [(8, 8)]
    assert [layer.name for layer in cm.layers] == ["0", "4"]
    assert set(cm.unmatched) == {"2.bias", "2.parametrizations.weight.original"}
    opt = kronograph.optim.KFAC(cm, seed=0)
    before = model[2].parametrizations.weight.original.detach().clone()
    losses = [opt.step(x, y)["loss"] for x, y in _batches()]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < 0.6 * losses[0]
    assert not torch.equal(model[2].parametrizations.weight.original, before)  # it trained
    weight = model[2].weight.detach()
    torch.testing.assert_close(weight @ weight.T, torch.eye(8), atol=1e-5, rtol=0)


class TwoOutputs(nn.Module):
    """torch.linalg.qr of a parameter: an operation without an ONNX function that returns two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.p, self.head = nn.Linear(6, 8), nn.Parameter(torch.randn(8, 5)), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, r = torch.linalg.qr(self.p)
        return self.head(torch.tanh(self.inp(x)) @ q + r.diagonal())


def test_an_operation_with_two_outputs_gets_an_opaque_node_with_both_shapes():
    torch.manual_seed(0)
    with pytest.warns(OpaqueOperationWarning, match="aten.linalg_qr"):
        cm = kronograph.compile(TwoOutputs(), torch.randn(2, 6), loss="cross_entropy")
    node = next(node for node in cm.graph.graph if node.domain == DOMAIN)
    q, r = torch.linalg.qr(torch.randn(8, 5))
    assert [tuple(output.shape) for output in node.outputs] == [tuple(q.shape), tuple(r.shape)]
    assert [layer.name for layer in cm.layers] == ["inp", "head"] and cm.unmatched == ["p"]
    opt = kronograph.optim.KFAC(cm, seed=0)
    losses = [opt.step(x, y)["loss"] for x, y in _batches(12)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


def test_onnxruntime_and_an_inference_file_refuse_an_opaque_operation_by_name(tmp_path):
    with pytest.warns(OpaqueOperationWarning), \
            pytest.raises(KronographError, match=r"linalg_matrix_exp.*engine='onnxruntime'.*torch engine"):
        kronograph.compile(orthogonal_mlp("matrix_exp"), torch.randn(2, 6), loss="cross_entropy",
                           engine="onnxruntime")
    with pytest.warns(OpaqueOperationWarning):
        cm = kronograph.compile(orthogonal_mlp("matrix_exp"), torch.randn(2, 6), loss="cross_entropy")
    with pytest.raises(KronographError, match=r"aten\.linalg_matrix_exp.*remove_parametrizations"):
        cm.export_onnx(tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_the_cayley_map_is_named_with_the_maps_that_compile():
    """Its torch.linalg.solve checks its result as a side effect of the traced graph, which no translation
    reaches: the error names the check, the map and the two that compile."""
    with pytest.raises(KronographError, match=r"aten\._linalg_check_errors.*'cayley'.*'matrix_exp' and 'householder'"):
        kronograph.compile(orthogonal_mlp("cayley"), torch.randn(2, 6), loss="cross_entropy")
