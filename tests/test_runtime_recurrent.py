"""Recurrent layers as Kronecker blocks: Capture rebuilds torch.gru / lstm / rnn_tanh / rnn_relu step by step
(runtime/recurrent.py) with the same outputs and gradients as the fused kernels; the recorded sites are the
steps' inputs and pre-activation gradients of a GRU written out by hand; the factors are the explicit sums
over examples and steps; compile plans the maps of nn.GRU / nn.LSTM / nn.RNN on the torch engine only."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph
from kronograph.compiler.recurrent import RecurrentCalls
from kronograph.passes.plan import LayerPlan, Unmatched
from kronograph.runtime.capture import Capture
from kronograph.runtime.factors import batch_factors, capture_gradient

from plan_helpers import linear_layer

IN, H, T, N = 3, 4, 5, 6
MODULES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}


def recurrent(mode: str, **options) -> nn.Module:
    extra = {"nonlinearity": mode.removeprefix("rnn_")} if mode.startswith("rnn") else {}
    return MODULES[mode](IN, H, **extra, **options).double()


def map_layers(module: nn.Module) -> list:
    """Hand-made plan layers for every weight_ih / weight_hh of ``module`` (with their biases)."""
    layers = []
    for name, weight in module.named_parameters():
        if name.startswith("weight_"):
            bias = name.replace("weight_", "bias_")
            layers.append(linear_layer(name, name, bias if hasattr(module, bias) else None, tuple(weight.shape)))
    return layers


def forward_and_backward(module: nn.Module, x: torch.Tensor, state, layers, capture: bool):
    """(outputs, final states, gradients, capture) of a fixed random-weighted loss of everything returned."""
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    if capture:
        with Capture(module, layers) as cap:
            out, last = module(x, state)
    else:
        cap, (out, last) = None, module(x, state)
    lasts = last if isinstance(last, tuple) else (last,)
    loss = sum((torch.sin(t) * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in (out, *lasts))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return out.detach(), tuple(t.detach() for t in lasts), grads, cap


def assert_rebuilt_like_torch(module: nn.Module, x: torch.Tensor, state) -> tuple[list, Capture]:
    """The capture's step-by-step rebuild gives torch's outputs, final states and gradients, and each map's
    gradient is its site's sum_t g_t [a_t; 1]^T; returns the maps' layers and the capture."""
    layers = map_layers(module)
    want, want_last, want_grads, _ = forward_and_backward(module, x, state, layers, capture=False)
    got, got_last, grads, cap = forward_and_backward(module, x, state, layers, capture=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(got_last, want_last):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-12, msg=name)
    cap.check()
    for layer in layers:
        want_bar = torch.cat([want_grads[layer.weight], want_grads[layer.bias][:, None]], 1) if layer.bias \
            else want_grads[layer.weight]
        torch.testing.assert_close(capture_gradient(layer, cap.records[layer.name])[0], want_bar, rtol=0, atol=1e-12,
                                   msg=layer.name)
    return layers, cap


@pytest.mark.parametrize("mode", sorted(MODULES))
@pytest.mark.parametrize("layers_, bidirectional, batch_first, bias", [
    (1, False, True, True), (2, True, False, True), (2, False, False, False), (1, True, True, False)])
def test_rebuilt_layers_give_torchs_outputs_and_gradients_and_record_every_map(mode, layers_, bidirectional,
                                                                              batch_first, bias):
    torch.manual_seed(1)
    module = recurrent(mode, num_layers=layers_, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    x = torch.randn((N, T, IN) if batch_first else (T, N, IN), dtype=torch.float64)
    shape = (layers_ * (2 if bidirectional else 1), N, H)
    state = (torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)) if mode == "lstm" \
        else torch.randn(shape, dtype=torch.float64)
    layers, cap = assert_rebuilt_like_torch(module, x, state)
    for layer in layers:
        assert cap.records[layer.name][0].a.shape == (N, T, module.get_parameter(layer.weight).shape[1])


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("layers_, bidirectional, batch_first, bias", [(1, False, True, True), (2, True, False, False)])
def test_projected_lstms_are_rebuilt_with_a_block_for_the_projection(layers_, bidirectional, batch_first, bias):
    """An LSTM with proj_size: h_t = W_hr (o * tanh(c_t)), a third map a layer-direction recorded as W_hh is (the
    stack of its T calls); outputs, states and gradients are torch's, each map's gradient its site's sum g a^T."""
    torch.manual_seed(2)
    module = nn.LSTM(IN, H, num_layers=layers_, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                     proj_size=2).double()
    x = torch.randn((N, T, IN) if batch_first else (T, N, IN), dtype=torch.float64)
    count = layers_ * (2 if bidirectional else 1)
    state = (torch.randn(count, N, 2, dtype=torch.float64), torch.randn(count, N, H, dtype=torch.float64))
    layers, _ = assert_rebuilt_like_torch(module, x, state)
    assert sum(layer.weight.startswith("weight_hr") for layer in layers) == count


def hand_gru(module: nn.GRU, x: torch.Tensor) -> tuple[torch.Tensor, list, list, list, list]:
    """torch's GRU equations written out (batch-first, one layer, both directions): the outputs and, per
    direction, the steps' inputs h_{t-1} and the pre-activations W_ih x_t + b_ih and W_hh h_{t-1} + b_hh."""
    outputs, before, pre_ih, pre_hh = [], [], [], []
    for suffix, order in (("", range(T)), ("_reverse", range(T - 1, -1, -1))):
        w_ih, w_hh = module.get_parameter(f"weight_ih_l0{suffix}"), module.get_parameter(f"weight_hh_l0{suffix}")
        b_ih, b_hh = module.get_parameter(f"bias_ih_l0{suffix}"), module.get_parameter(f"bias_hh_l0{suffix}")
        h, hs, ys, gis, ghs = torch.zeros(N, H, dtype=x.dtype), [None] * T, [None] * T, [None] * T, [None] * T
        for t in order:
            hs[t] = h
            gis[t] = x[:, t] @ w_ih.T + b_ih
            ghs[t] = h @ w_hh.T + b_hh
            for p in (gis[t], ghs[t]):
                p.retain_grad()
            r = torch.sigmoid(gis[t][:, :H] + ghs[t][:, :H])
            z = torch.sigmoid(gis[t][:, H:2 * H] + ghs[t][:, H:2 * H])
            n = torch.tanh(gis[t][:, 2 * H:] + r * ghs[t][:, 2 * H:])
            h = (1 - z) * n + z * h
            ys[t] = h
        outputs.append(torch.stack(ys, 1))
        before.append(hs), pre_ih.append(gis), pre_hh.append(ghs)
    return torch.cat(outputs, -1), before, pre_ih, pre_hh


def test_recorded_sites_are_the_steps_inputs_and_gradients_of_a_gru_written_out():
    """a of the hidden map is h_{t-1} at every step (the reverse direction's from step t + 1), g the gradient of
    that step's W_hh h_{t-1} + b_hh; the factors are (1/n) sum_(i,t) a_bar a_bar^T and (1/(nT)) sum q q^T."""
    torch.manual_seed(2)
    module = nn.GRU(IN, H, batch_first=True, bidirectional=True).double()
    x = torch.randn(N, T, IN, dtype=torch.float64)
    weights = torch.randn(N, T, 2 * H, dtype=torch.float64)
    out, before, pre_ih, pre_hh = hand_gru(module, x)
    (out * weights).square().mean(0).sum().backward()  # a mean over the examples
    layers = map_layers(module)
    with Capture(module, layers, hooks=False) as cap:
        got = module(x)[0]
    torch.testing.assert_close(got, out.detach(), rtol=0, atol=1e-12)
    cap.gradients_from((got * weights).square().mean(0).sum())
    for d, suffix in enumerate(("", "_reverse")):
        for kind, a_rows, pre in (("ih", [x[:, t] for t in range(T)], pre_ih[d]), ("hh", before[d], pre_hh[d])):
            layer = next(lay for lay in layers if lay.name == f"weight_{kind}_l0{suffix}")
            (record,) = cap.records[layer.name]
            a_bar = torch.stack([torch.cat([a.detach(), torch.ones(N, 1, dtype=a.dtype)], 1) for a in a_rows], 1)
            q = torch.stack([p.grad for p in pre], 1) * N  # per-example gradients of the mean loss
            torch.testing.assert_close(record.a, a_bar[..., :-1], rtol=0, atol=1e-12)
            torch.testing.assert_close(record.g * N, q, rtol=0, atol=1e-12)
            want_a = sum(torch.outer(a_bar[i, t], a_bar[i, t]) for i in range(N) for t in range(T)) / N
            want_g = sum(torch.outer(q[i, t], q[i, t]) for i in range(N) for t in range(T)) / (N * T)
            a, g = batch_factors(layer, cap.records[layer.name], batch_size=N, dtype=torch.float64)
            torch.testing.assert_close(a[0], want_a, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(g[0], want_g, rtol=1e-12, atol=1e-12)


def test_no_grad_and_calls_without_plan_weights_run_the_fused_kernel():
    module, other = nn.GRU(IN, H).double(), nn.GRU(IN, H).double()
    x = torch.randn(T, N, IN, dtype=torch.float64)
    with Capture(module, map_layers(module)) as cap:
        with torch.no_grad():
            module(x)  # no gradient: nothing to learn from the call
        other(x)  # not the plan's weights: nothing to record
    assert cap.records == {}


class Sequences(nn.Module):
    """A two-layer bidirectional LSTM then a GRU and an RNN (one with bias=False) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(IN, H, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(2 * H, H, batch_first=True)
        self.rnn = nn.RNN(H, H, batch_first=True, bias=False)
        self.head = nn.Linear(H, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.gru(self.lstm(x)[0])[0])[0][:, -1])


def test_compile_plans_every_recurrent_map_on_the_torch_engine_only():
    torch.manual_seed(3)
    model = Sequences()
    cm = kronograph.compile(model, (torch.randn(2, T, IN),), loss="cross_entropy")
    names = [layer.name for layer in cm.plan.layers]
    maps = [f"lstm.{k}_l{n}{s}" for n in (0, 1) for s in ("", "_reverse") for k in ("ih", "hh")]
    assert names == [*maps, "gru.ih_l0", "gru.hh_l0", "rnn.ih_l0", "rnn.hh_l0", "head"]
    lstm = cm.plan.layer("lstm.hh_l1_reverse")
    assert (lstm.weight, lstm.bias, lstm.in_features, lstm.out_features) == (
        "lstm.weight_hh_l1_reverse", "lstm.bias_hh_l1_reverse", H, 4 * H)
    assert cm.plan.layer("rnn.ih_l0").bias is None
    assert cm.plan.unmatched == ()
    assert kronograph.compile(model, (torch.randn(2, T, IN),), engine="onnxruntime").plan.layers[-1].name == "head"


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_compile_plans_a_projected_lstms_three_maps():
    torch.manual_seed(3)
    model = nn.Sequential(nn.LSTM(IN, H, proj_size=2, batch_first=True, bidirectional=True))
    cm = kronograph.compile(model, (torch.randn(2, T, IN),), loss="mse", output=0)
    names = [layer.name for layer in cm.plan.layers]
    assert names == [f"0.{k}_l0{s}" for s in ("", "_reverse") for k in ("ih", "hh", "hr")]
    projection = cm.plan.layer("0.hr_l0_reverse")
    assert (projection.weight, projection.bias, projection.in_features, projection.out_features) == (
        "0.weight_hr_l0_reverse", None, H, 2)
    assert cm.plan.layer("0.hh_l0").in_features == 2 and cm.plan.unmatched == ()


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_packed_sequences_are_not_rebuilt_and_say_why():
    """torch.export cannot trace a PackedSequence, so the planning is checked on the counted calls directly; the
    capture runs such calls as torch's fused function (same outputs, nothing recorded)."""
    torch.manual_seed(5)
    model = nn.ModuleDict({"gru": nn.GRU(IN, H), "lstm": nn.LSTM(IN, H, proj_size=2)})
    x = torch.randn(T, 2, IN)

    def forward() -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, [T, T - 1])
        gru = nn.utils.rnn.pad_packed_sequence(model["gru"](packed)[0])[0].sum()
        return gru + nn.utils.rnn.pad_packed_sequence(model["lstm"](packed)[0])[0].sum()

    with RecurrentCalls() as calls:
        want = forward()
    params = dict(model.named_parameters())
    unmatched = tuple(Unmatched(name, tuple(p.shape), "sliced") for name, p in params.items())
    plan = LayerPlan(layers=(), unmatched=unmatched, parameters=tuple(params))
    reasons = {entry.name: entry.reason for entry in calls.plan_with_layers(model, plan).unmatched}
    assert "packed sequence" in reasons["gru.weight_hh_l0"] and "packed sequence" in reasons["lstm.weight_hr_l0"]
    assert set(reasons) == set(params)
    layers = [linear_layer(f"{name}.{w}", f"{name}.{w}", None, tuple(params[f"{name}.{w}"].shape))
              for name in ("gru", "lstm") for w in ("weight_ih_l0", "weight_hh_l0")]
    with Capture(model, layers) as cap:
        got = forward()
    torch.testing.assert_close(got, want)
    assert cap.records == {}


class LastState(nn.Module):
    """A GRU over the sequence and a linear head on its last state."""

    def __init__(self, hidden: int, outputs: int) -> None:
        super().__init__()
        self.gru, self.head = nn.GRU(IN, hidden, batch_first=True), nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])


def test_kfac_trains_a_gru_with_its_maps_blocks():
    """K-FAC's defaults on a GRU sequence classifier: the recurrent maps have blocks and the loss falls."""
    torch.manual_seed(4)
    model = LastState(16, 3)
    x = torch.randn(96, T, IN)
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, 0, 1] > 1).long()
    cm = kronograph.compile(model, (x[:2],), loss="cross_entropy")
    opt = kronograph.optim.KFAC(cm)
    assert {"gru.ih_l0", "gru.hh_l0"} <= set(opt.blocks)
    first = F.cross_entropy(model(x), y).item()
    for step in range(30):
        opt.step(x[(step % 3) * 32:(step % 3 + 1) * 32], y[(step % 3) * 32:(step % 3 + 1) * 32])
    assert F.cross_entropy(model(x), y).item() < 0.6 * first


def test_gradient_passes_capture_only_the_layers_whose_low_rank_product_pays():
    """Sec 8's low-rank product needs the gradient passes' sites; a GRU's maps have T rows an example (never
    cheaper by rows here) and capturing them runs the GRU step by step, so once a statistics pass has counted
    their rows only the head is captured there."""
    torch.manual_seed(6)
    model = LastState(64, 64)
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 16, IN),)), seed=0)
    passes, real = [], opt.engine.gradient_pass

    def spy(*args, **kwargs):
        passes.append((kwargs.get("capture"), kwargs.get("layers")))
        return real(*args, **kwargs)

    opt.engine.gradient_pass = spy
    x, y = torch.randn(8, 16, IN), torch.randint(0, 64, (8,))
    for _ in range(2):
        opt.step(x, y)
    first, last = passes[0], passes[-1]  # step 1's halves, before its statistics are folded; step 2's
    assert first[0] and set(first[1]) == {"gru.hh_l0", "head"}  # rows not yet counted: one an example assumed
    assert last[0] and tuple(last[1]) == ("head",)


CELL_MODULES = {"gru": nn.GRUCell, "lstm": nn.LSTMCell, "rnn_tanh": nn.RNNCell, "rnn_relu": nn.RNNCell}


class CellLoop(nn.Module):
    """A cell stepped over the sequence in the user's own loop, as a decoder does: (outputs, last state)."""

    def __init__(self, mode: str, bias: bool) -> None:
        super().__init__()
        extra = {"nonlinearity": mode.removeprefix("rnn_")} if mode.startswith("rnn") else {}
        self.cell, self.lstm = CELL_MODULES[mode](IN, H, bias=bias, **extra), mode == "lstm"

    def forward(self, x: torch.Tensor, state: None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = c = torch.zeros(x.shape[0], H, dtype=x.dtype)
        outputs = []
        for t in range(x.shape[1]):
            if self.lstm:
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
            outputs.append(h)
        return torch.stack(outputs, 1), h


@pytest.mark.parametrize("mode", sorted(CELL_MODULES))
@pytest.mark.parametrize("bias", [True, False])
def test_cells_in_a_users_loop_are_rebuilt_with_one_site_a_call(mode, bias):
    """torch.gru_cell and the others: the same outputs and gradients as torch's; each call records W_ih's site
    (x_t) and W_hh's (h_{t-1}), and every map's gradient is the sum of its sites' g a_bar^T."""
    torch.manual_seed(7)
    module = CellLoop(mode, bias).double()
    x = torch.randn(N, T, IN, dtype=torch.float64)
    layers = [linear_layer(f"cell.{w}", f"cell.{w}", f"cell.{w.replace('weight', 'bias')}" if bias else None,
                           tuple(module.get_parameter(f"cell.{w}").shape), sites=T) for w in ("weight_ih", "weight_hh")]
    want, _, want_grads, _ = forward_and_backward(module, x, None, layers, capture=False)
    got, _, grads, cap = forward_and_backward(module, x, None, layers, capture=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-12, msg=name)
    cap.check()
    steps = [x[:, t] for t in range(T)]
    hidden = [torch.zeros(N, H, dtype=x.dtype), *want.unbind(1)[:-1]]
    for layer, inputs in zip(layers, (steps, hidden)):
        torch.testing.assert_close(torch.stack([r.a for r in cap.records[layer.name]]), torch.stack(inputs),
                                   rtol=0, atol=1e-12)
        want_bar = torch.cat([want_grads[layer.weight], want_grads[layer.bias][:, None]], 1) if bias \
            else want_grads[layer.weight]
        torch.testing.assert_close(capture_gradient(layer, cap.records[layer.name])[0], want_bar, rtol=0, atol=1e-12)


def test_kfac_sees_the_cells_of_a_compiled_decoder():
    """The graph matcher plans a cell called T times as two layers of T sites; the torch engine's capture now
    records them (before, torch.gru_cell hid its maps: K-FAC warned and stepped them along the gradient)."""
    from kronograph.runtime.inverse import StatisticsWarning

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loop, self.head = CellLoop("gru", True), nn.Linear(H, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.loop(x)[1])

    torch.manual_seed(8)
    x = torch.randn(32, T, IN)
    y = (x[:, :, 0].sum(1) > 0).long()
    cm = kronograph.compile(Decoder(), (x[:2],))
    assert {layer.name: len(layer.sites) for layer in cm.plan.layers} == {
        "loop.cell.weight_ih": T, "loop.cell.weight_hh": T, "head": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error", StatisticsWarning)
        opt = kronograph.optim.KFAC(cm, seed=0)
        for _ in range(3):
            opt.step(x, y)
    assert all(block.a is not None for block in opt.blocks.values())


def test_cells_make_forward_mode_dear_so_auto_takes_differences():
    """fisher_products="auto" sees a cell stepped in the model's loop as it sees nn.GRU (runtime/tangent_cost.py)."""
    from kronograph.runtime.tangent_cost import dear_for_forward_mode

    x = torch.randn(N, T, IN)
    for mode in sorted(CELL_MODULES):
        assert dear_for_forward_mode(lambda: CellLoop(mode, True)(x)) == ["a recurrent layer"]
    assert dear_for_forward_mode(lambda: nn.Linear(IN, H)(x)) == []
