"""Weight-normed layers (W = g v / |v|): K-FAC's and KFACPreconditioner's block on the computed weight
(passes/match/weight_norm.py, runtime/weight_norm.py).

The independent references: autograd's Jacobian of torch._weight_norm (the coordinate maps must push a gradient
to W and pull a step back to (g, v) through it), and the plain twin (the same model with W a Parameter of equal
value), whose factors and K-FAC steps the dense-maths tests pin down: the weight-normed model's factors must equal
the twin's, its first step must change W as the twin's step does, to first order, and the preconditioner's new
.grad of v and g must move W as the twin's new W.grad.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import weight_norm as old_weight_norm
from torch.nn.utils.parametrizations import weight_norm

import kronograph
from equality import kfac_resumed
from sequence_batches import batch, learnable_batch
from kronograph.passes.plan import LayerPlan
from kronograph.runtime.inverse import CoverageWarning
from kronograph.runtime.weight_norm import parameter_coordinates, weight_coordinates


#: the norms' dim of ``normed_net``'s three layers: PyTorch's default; the whole norm (None) and a linear weight's
#: columns (dim=1, g [1, in]) beside it; a conv's input channels (dim=1, g [1, in, 1]: the export transposes v,
#: flattens, reduces and transposes back)
DIMS = [(0, 0, 0), (None, 1, None), (1, 0, 1)]


def normed_net(dims: tuple = (0, 0, 0)) -> nn.Module:
    """A weight-normed conv (parametrization), a weight-normed linear (parametrization) and a head normed the old
    way, each normed over ``dims``' entry (weight_norm's dim)."""
    return nn.Sequential(weight_norm(nn.Conv1d(2, 4, 3), dim=dims[0]), nn.Tanh(), nn.Flatten(),
                         weight_norm(nn.Linear(12, 6), dim=dims[1]), nn.Tanh(),
                         old_weight_norm(nn.Linear(6, 3), dim=dims[2]))


def computed(v: torch.Tensor, g: torch.Tensor, dim: int | None) -> torch.Tensor:
    """W = g v / |v| as PyTorch computes it for weight_norm's ``dim`` (None: -1, the whole norm)."""
    return torch._weight_norm(v, g, -1 if dim is None else dim)


def plain_twin(normed: nn.Module) -> nn.Module:
    """``normed`` with each computed weight a Parameter of equal value."""
    twin = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for i in (0, 3, 5):
            twin[i].weight.copy_(normed[i].weight)
            twin[i].bias.copy_(normed[i].bias)
    return twin


def direction_and_magnitude(index: int) -> tuple[str, str]:
    """The names of v and g of ``normed_net()``'s layer ``index`` (0 and 3 by parametrization, 5 by the old hook)."""
    if index == 5:
        return "5.weight_v", "5.weight_g"
    return f"{index}.parametrizations.weight.original1", f"{index}.parametrizations.weight.original0"


def test_the_plan_holds_each_weight_normed_layer_with_its_v_and_g():
    torch.manual_seed(0)
    cm = kronograph.compile(normed_net(), (batch()[0][:2],), loss="cross_entropy")
    normed = {layer.name: layer for layer in cm.plan.normed}
    assert sorted(normed) == ["0", "3", "5"]
    assert normed["0"].kind == "conv1d" and normed["0"].weight == "0.weight" and normed["0"].bias == "0.bias"
    assert normed["0"].weight_norm == ("0.parametrizations.weight.original1", "0.parametrizations.weight.original0")
    assert normed["3"].kind == "linear" and (normed["3"].in_features, normed["3"].out_features) == (12, 6)
    assert normed["5"].weight_norm == ("5.weight_v", "5.weight_g")
    assert cm.plan.layers == ()  # every other method steps them outside every block, as before
    reasons = {entry.name: entry.reason for entry in cm.plan.unmatched}
    assert "weight norm's magnitude g of 3.weight" in reasons["3.parametrizations.weight.original0"]
    assert "remove_parametrizations" in reasons["3.parametrizations.weight.original1"]
    assert "weight norm's bias of 5.weight" in reasons["5.bias"]
    assert cm.output_layers == ("5",)
    assert LayerPlan.from_json(cm.plan.to_json()) == cm.plan


def test_a_norm_the_export_takes_through_transposes_is_read_by_its_values():
    """A conv normed per input channel (dim=1): PyTorch's export transposes v, flattens, reduces and transposes back.
    The matcher evaluates that chain on a random v (onnx's reference evaluator) against the norm over the axes where
    g has size 1: a block. The same chain over the wrong axes (output channels, placed where g's input channels are:
    the shapes agree) is no norm of weight norm's: no block."""
    cm = kronograph.compile(normed_net((1, 1, None)), (batch()[0][:2],), loss="cross_entropy")
    assert sorted(layer.name for layer in cm.plan.normed) == ["0", "3", "5"]
    assert cm.plan.normed[0].weight_norm == ("0.parametrizations.weight.original1",
                                             "0.parametrizations.weight.original0")

    class WrongAxes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.v = nn.Parameter(torch.randn(4, 4, 3))
            self.g = nn.Parameter(torch.ones(1, 4, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            norm = self.v.reshape(4, -1).norm(dim=1).reshape(4, 1, 1).transpose(0, 1)  # per output channel
            return nn.functional.conv1d(x, self.v * (self.g / norm)).flatten(1)

    assert kronograph.compile(WrongAxes(), (torch.randn(2, 4, 5),), loss="mse").plan.normed == ()


def test_a_v_read_elsewhere_too_gets_no_block():
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = weight_norm(nn.Linear(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + self.fc.parametrizations.weight.original1.sum()

    cm = kronograph.compile(Leaky(), (torch.randn(2, 4),), loss="cross_entropy")
    assert cm.plan.normed == ()


@pytest.mark.parametrize(("index", "dim", "g_shape"), [(0, 0, (4, 1, 1)), (0, None, ()), (3, 1, (1, 12)),
                                                     (0, 1, (1, 2, 1))],
                         ids=["conv-dim0", "conv-whole", "linear-dim1", "conv-dim1"])
def test_the_coordinate_maps_are_autograd_jacobians_of_weight_norm(index, dim, g_shape):
    """grad_(g, v) = J^T grad_W is pushed back to grad_W, and a step Delta W pulled back to (dg, dv) has J (dg, dv)
    = Delta W, J autograd's Jacobian of torch._weight_norm at (v, g), for the norm of each output row (dim=0), of
    all of v (dim=None, g a scalar) and of each input column (dim=1) or input channel (a conv's dim=1)."""
    torch.manual_seed(1)
    dims = (dim, 0, 0) if index == 0 else (0, dim, 0)
    cm = kronograph.compile(normed_net(dims), (batch()[0][:2],), loss="cross_entropy")
    layer = next(layer for layer in cm.plan.normed if layer.name == str(index))
    v_name, g_name = layer.weight_norm
    shape = (4, 2, 3) if index == 0 else (6, 12)
    v, g = torch.randn(shape, dtype=torch.float64), torch.rand(g_shape, dtype=torch.float64) + 0.5
    jv, jg = torch.autograd.functional.jacobian(lambda v_, g_: computed(v_, g_, dim), (v, g))
    size = v.numel()
    jacobian = torch.cat([jv.reshape(size, size), jg.reshape(size, g.numel())], 1)  # d vec(W) / d (vec v, vec g)
    params = {v_name: v, g_name: g}
    grad_w = torch.randn(shape, dtype=torch.float64)
    pulled = jacobian.T @ grad_w.reshape(-1)
    grads = {v_name: pulled[:size].reshape(shape), g_name: pulled[size:].reshape(g_shape), "other": torch.ones(2)}
    pushed = weight_coordinates(grads, params, [layer])
    torch.testing.assert_close(pushed[layer.weight], grad_w)
    assert pushed["other"] is grads["other"] and pushed[v_name] is grads[v_name]
    step = parameter_coordinates({layer.weight: grad_w, "other": torch.ones(2)}, params, [layer])
    assert layer.weight not in step and step["other"].equal(torch.ones(2)) and step[g_name].shape == g_shape
    torch.testing.assert_close((jacobian @ torch.cat([step[v_name].reshape(-1), step[g_name].reshape(-1)])
                                ).reshape(shape), grad_w)
    axes = tuple(axis for axis, size in enumerate(g_shape) if size == 1) or tuple(range(v.dim()))  # (g's 1s)
    assert float((step[v_name] * v).sum(axes).abs().max()) < 1e-12  # dv orthogonal to v, group by group


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dims", DIMS)
def test_factors_and_first_step_equal_the_plain_twins(dims):
    torch.manual_seed(0)
    normed = normed_net(dims)
    twin = plain_twin(normed)
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        opt = kronograph.optim.KFAC(kronograph.compile(normed, (x[:2],), loss="cross_entropy"), seed=0)
    reference = kronograph.optim.KFAC(kronograph.compile(twin, (x[:2],), loss="cross_entropy"), seed=0)
    assert sorted(opt.blocks) == sorted(reference.blocks) == ["0", "3", "5"] and opt.unmatched == []
    before = {i: normed[i].weight.detach().clone() for i in (0, 3, 5)}
    parameters = {name: p.detach().clone() for name, p in normed.named_parameters()}
    reference_before = {i: twin[i].weight.detach().clone() for i in (0, 3, 5)}
    info, reference_info = opt.step(x, y), reference.step(x, y)
    for name in opt.blocks:
        torch.testing.assert_close(opt.blocks[name].a, reference.blocks[name].a)
        torch.testing.assert_close(opt.blocks[name].g, reference.blocks[name].g)
    assert info["alpha"] == pytest.approx(reference_info["alpha"], rel=1e-3)
    for i in (0, 3, 5):  # W's change to first order: J (dg, dv), J autograd's Jacobian at the weights before
        v_name, g_name = direction_and_magnitude(i)
        v, g = parameters[v_name], parameters[g_name]
        dv, dg = normed.get_parameter(v_name).detach() - v, normed.get_parameter(g_name).detach() - g
        dim = dims[(0, 3, 5).index(i)]
        _, first_order = torch.autograd.functional.jvp(lambda v_, g_: computed(v_, g_, dim), (v, g), (dv, dg))
        change = twin[i].weight.detach() - reference_before[i]
        torch.testing.assert_close(first_order, change, rtol=1e-3, atol=1e-3 * float(change.abs().max()))
        assert not torch.equal(normed[i].weight.detach(), before[i])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_off_and_in_the_paper_preset_v_and_g_step_outside_every_block():
    x, _ = batch()
    for options in ({"weight_norm_blocks": False}, {"preset": "paper"}):
        cm = kronograph.compile(normed_net(), (x[:2],), loss="cross_entropy")
        with pytest.warns(CoverageWarning):
            opt = kronograph.optim.KFAC(cm, **options)
        assert opt.blocks == {} and "0.parametrizations.weight.original1" in opt.unmatched


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_weight_normed_net_trains_and_resumes_exactly():
    batches = [batch(32, seed) for seed in range(8)]
    resumed, tail, again = kfac_resumed(normed_net, batches, batches[0][0][:2])
    assert sorted(resumed.blocks) == ["0", "3", "5"]
    assert tail == again
    x, y = learnable_batch()
    torch.manual_seed(0)
    model = normed_net()
    twin = plain_twin(model)
    losses = {}
    for name, net in (("normed", model), ("twin", twin)):
        opt = kronograph.optim.KFAC(kronograph.compile(net, (x[:2],), loss="cross_entropy"), seed=0)
        losses[name] = [opt.step(x, y)["loss"] for _ in range(20)]
    assert losses["normed"][-1] < 0.5 * losses["normed"][0]
    assert losses["normed"][-1] < 1.5 * losses["twin"][-1]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_mlp_normed_whole_takes_differences_where_forward_mode_breaks():
    """An MLP's quadratic model takes forward mode ("auto"), whose derivative of weight norm over all of v gives a
    misshapen tangent in PyTorch; "auto" then takes central differences, and the layer trains in its block."""
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(10, 16), dim=None), nn.Tanh(), old_weight_norm(nn.Linear(16, 3),
                                                                                                  dim=None))
    x = torch.randn(64, 10)
    y = (x[:, :3] * 2).argmax(1)
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0)
    assert sorted(opt.blocks) == ["0", "2"] and opt.unmatched == []
    losses = [opt.step(x, y)["loss"] for _ in range(10)]
    assert opt.engine.resolved_products == "differences"
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("settings", [{"graft": None, "kl_clip": None}, {}])
@pytest.mark.parametrize("dims", DIMS)
def test_the_preconditioner_rewrites_v_and_g_so_that_the_step_moves_w_as_the_twins(settings, dims):
    """KFACPreconditioner in a user's loop: the new .grad of v and g, through autograd's Jacobian of
    torch._weight_norm, equals the plain twin's new W.grad (the same batch, so the same factors), with and without
    the grafting and the KL clip (both read W's coordinates); the bias's .grad equals the twin's."""
    torch.manual_seed(0)
    # float64: a softmax head's G is singular along the all-ones direction, where float32's rounding of the two
    # models' gradients (4e-9 apart) is multiplied by 1 / damping
    normed = normed_net(dims).double()
    twin = plain_twin(normed).double()
    x, y = batch()
    x = x.double()
    for net in (normed, twin):
        precond = kronograph.optim.KFACPreconditioner(kronograph.compile(net, (x[:2],), loss="cross_entropy"),
                                                      factor_dtype=torch.float64, **settings)
        assert sorted(precond.blocks) == ["0", "3", "5"]
        with precond.track():
            nn.functional.cross_entropy(net(x), y).backward()
        precond.step()
    parameters = dict(normed.named_parameters())
    for i in (0, 3, 5):
        v_name, g_name = direction_and_magnitude(i)
        v, g = parameters[v_name].detach(), parameters[g_name].detach()
        dim = dims[(0, 3, 5).index(i)]
        _, moved = torch.autograd.functional.jvp(lambda v_, g_: computed(v_, g_, dim), (v, g),
                                                 (parameters[v_name].grad, parameters[g_name].grad))
        torch.testing.assert_close(moved, twin[i].weight.grad, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(normed[i].bias.grad, twin[i].bias.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dims", [(0, 0, 0), (0, 1, 0)])
def test_kfac_on_onnxruntime_steps_weight_normed_layers_as_the_torch_engine_does(tmp_path, dims):
    """The module's own exported .onnx on onnxruntime-training (taps on the computed weights' sites, the gradient of
    v and g from its training graph) against the torch engine: the same losses and weights over 8 steps. (A whole
    norm, dim=None, is not built by onnxruntime-training 1.19's gradient builder, whatever the optimizer: its
    ReduceL2 to a scalar has no typed gradient.)"""
    pytest.importorskip("onnxruntime.training")
    torch.manual_seed(0)
    model = normed_net(dims)
    x, _ = batch()
    cm_torch = kronograph.compile(model, (x[:2],), loss="cross_entropy")
    cm_onnx = kronograph.compile(str(cm_torch.export_onnx(tmp_path / "normed.onnx")), loss="cross_entropy")
    cm_onnx.onnxruntime(tmp_path / "artifacts")
    settings = dict(fisher="empirical", stats_fraction=1.0, rescale=False, adapt_damping=False, adapt_gamma=False,
                    lr=0.05, factor_damping=0.1, inverse_every=3, centered_damping=False, seed=0)
    optimizers = [kronograph.optim.KFAC(cm, **settings) for cm in (cm_torch, cm_onnx)]
    assert all(sorted(opt.blocks) == ["0", "3", "5"] and opt.unmatched == [] for opt in optimizers)
    for seed in range(8):
        x, y = batch(32, seed)
        expected, got = (opt.step(x, y)["loss"] for opt in optimizers)
        assert got == pytest.approx(expected, rel=1e-4)
    weights = cm_onnx.state_dict()
    for name, param in model.named_parameters():
        torch.testing.assert_close(torch.as_tensor(weights[name]), param.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_weight_normed_transposed_convolution_and_embedding_get_blocks_and_train():
    """The maps work on the stored tensor's rows whatever its layout: a transposed convolution's [in, out, k, k]
    (normed over the input channel's rows) and an embedding table's rows."""
    torch.manual_seed(0)
    y = torch.randint(0, 3, (32,))
    deconv = nn.Sequential(weight_norm(nn.Conv2d(1, 4, 3, padding=1)), nn.ReLU(),
                           weight_norm(nn.ConvTranspose2d(4, 2, 2, stride=2)), nn.Flatten(), nn.Linear(512, 3))
    table = nn.Sequential(weight_norm(nn.Embedding(10, 4)), nn.Flatten(), nn.Linear(12, 3))
    for model, x, kinds in ((deconv, torch.randn(32, 1, 8, 8), {"0": "out_in", "2": "transposed"}),
                            (table, torch.randint(0, 10, (32, 3)), {"0": "in_out"})):
        cm = kronograph.compile(model, (x[:2],), loss="cross_entropy")
        assert {layer.name: layer.weight_layout for layer in cm.plan.normed} == kinds
        opt = kronograph.optim.KFAC(cm, seed=0)
        assert opt.unmatched == [] and set(kinds) < set(opt.blocks)
        losses = [opt.step(x, y)["loss"] for _ in range(5)]
        assert losses[-1] < 0.7 * losses[0]
