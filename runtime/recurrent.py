"""Recurrent layers from recorded projections: ``torch.gru``, ``torch.lstm``, ``torch.rnn_tanh`` and
``torch.rnn_relu`` (what nn.GRU, nn.LSTM and nn.RNN call) rebuilt step by step from F.linear, so that a
TorchFunctionMode (runtime/capture.py) can record the two linear maps inside the fused kernel.

Each layer and direction has two Kronecker blocks (Martens, Ba & Johnson 2018, with time steps treated as
independent, as KFAC-expand treats a sequence's positions; DESIGN.md's token convention):
- the input map W_ih: one F.linear over the whole sequence, [n, T, in] -> [n, T, gates * H], recorded like
  any linear site with T rows an example;
- the hidden map W_hh: applied once a step to h_{t-1}, so its site is the stack of those T calls: a is
  [h_0 .. h_{T-1}] as [n, T, H], and its output is a zero tensor added to every step's W_hh h_{t-1} + b_hh
  (``probe``), whose gradient is the stack of the steps' pre-activation gradients g_t, [n, T, gates * H].

The arithmetic is ATen's cells (gates in torch's order: GRU r, z, n; LSTM i, f, g, o), dropout between layers
as torch applies it; the layout is batch-major inside ([n, T, ...], examples along dim 0 as the statistics
expect) whatever ``batch_first`` says. An LSTM with ``proj_size`` has a third map a layer-direction, W_hr from
o * tanh(c_t) to h_t, recorded the way W_hh is (its site the stack of its T calls). ``bind`` returns None (the
caller runs torch's function) for packed sequences and inputs that are not [T, n, in] / [n, T, in].

The cells (``torch.gru_cell`` and the others: nn.GRUCell, nn.LSTMCell, nn.RNNCell in the user's own loop) are one
step: ``cell_step`` makes both maps with ``project``, so each call is one site of W_ih and one of W_hh, as the graph
matcher plans them (a cell called T times is a layer with T sites).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

FUNCTIONS = {torch.gru: "gru", torch.lstm: "lstm", torch.rnn_tanh: "rnn_tanh", torch.rnn_relu: "rnn_relu"}
CELLS = {torch.gru_cell: "gru", torch.lstm_cell: "lstm", torch.rnn_tanh_cell: "rnn_tanh",
         torch.rnn_relu_cell: "rnn_relu"}  # one step: nn.GRUCell, nn.LSTMCell, nn.RNNCell
_CELL_ARGUMENTS = ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh")

PACKED = "a packed sequence (PackedSequence); pad the batch instead"  # ``examine``'s reason for a packed call

Project = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
Probe = Callable[[torch.Tensor, tuple[int, ...], torch.Tensor], torch.Tensor | None]
RecordSteps = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class RecurrentCall:
    """A call of a fused recurrent function, by name (the ``.input`` overload: a padded [T, n, in] batch)."""

    mode: str
    input: torch.Tensor
    hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    params: tuple[torch.Tensor, ...]
    has_biases: bool
    num_layers: int
    dropout: float
    train: bool
    bidirectional: bool
    batch_first: bool

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def projected(self) -> bool:
        """Whether the layers have a projection W_hr (an LSTM with ``proj_size``: a fifth or third weight each)."""
        return len(self.params) == self.num_layers * self.directions * (5 if self.has_biases else 3)

    def weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(W_ih, W_hh, b_ih, b_hh) of layer-direction ``k`` (layer * directions + direction)."""
        group = self._group(k)
        return (group[0], group[1], group[2], group[3]) if self.has_biases else (group[0], group[1], None, None)

    def projection(self, k: int) -> torch.Tensor | None:
        """W_hr of layer-direction ``k``, or None without ``proj_size``."""
        return self._group(k)[-1] if self.projected else None

    def _group(self, k: int) -> tuple[torch.Tensor, ...]:
        per = (4 if self.has_biases else 2) + self.projected
        return self.params[k * per: (k + 1) * per]


def examine(func: Callable, args: tuple, kwargs: dict) -> RecurrentCall | str:
    """The call by name, or why it is not rebuilt (a phrase for the plan's unmatched reasons)."""
    mode = FUNCTIONS[func]
    if kwargs or len(args) != 9:
        return "a call with other arguments than those nn.GRU / nn.LSTM / nn.RNN pass"
    if isinstance(args[1], torch.Tensor) and not args[1].is_floating_point():
        return PACKED
    data, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
    params = tuple(params)
    directions = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if len(params) != num_layers * directions * per and (mode != "lstm"
                                                          or len(params) != num_layers * directions * (per + 1)):
        return "an unexpected number of weights"
    if not isinstance(data, torch.Tensor) or data.dim() != 3:
        return "an input that is not a [T, n, features] batch"
    if (mode == "lstm") != isinstance(hx, (tuple, list)):
        return "an unexpected hidden state"
    hx = tuple(hx) if mode == "lstm" else hx
    return RecurrentCall(mode, data, hx, params, bool(has_biases), int(num_layers), float(dropout), bool(train),
                         bool(bidirectional), bool(batch_first))


def bind(func: Callable, args: tuple, kwargs: dict) -> RecurrentCall | None:
    """The call by name when ``run`` rebuilds it, else None (torch's function then runs unrecorded)."""
    call = examine(func, args, kwargs)
    return call if isinstance(call, RecurrentCall) else None


def _cell(mode: str, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of ATen's cell from the two projections gi = W_ih x_t + b_ih and gh = W_hh h + b_hh."""
    if mode == "gru":
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        reset, update = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        new = torch.tanh(i_n + reset * h_n)
        return (h - new) * update + new, None
    if mode == "lstm":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    pre = gi + gh
    return (torch.tanh(pre) if mode == "rnn_tanh" else torch.relu(pre)), None


def _direction(call: RecurrentCall, k: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None,
               project: Project, probe: Probe, record_steps: RecordSteps
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer-direction over a batch-major x [n, T, in]: (outputs [n, T, H] ([n, T, proj_size] projected), h_T,
    c_T)."""
    w_ih, w_hh, b_ih, b_hh = call.weights(k)
    w_hr = call.projection(k)
    gi = project(x, w_ih, b_ih)
    n, steps = gi.shape[0], gi.shape[1]
    zeros = probe(w_hh, (n, steps, w_hh.shape[0]), gi)
    projected = None if w_hr is None else probe(w_hr, (n, steps, w_hr.shape[0]), gi)
    # unbind, not gi[:, t]: its backward stacks the steps' gradients once, where T selects would each make a
    # whole-sequence gradient
    gi_steps, zero_steps = gi.unbind(1), (None if zeros is None else zeros.unbind(1))
    projected_steps = None if projected is None else projected.unbind(1)
    before: list[torch.Tensor] = [h] * steps
    unprojected: list[torch.Tensor] = [h] * steps  # o * tanh(c_t), what W_hr maps to h_t
    outputs: list[torch.Tensor] = [h] * steps
    order = range(steps - 1, -1, -1) if k % call.directions else range(steps)
    for t in order:
        before[t] = h
        gh = F.linear(h, w_hh, b_hh)
        if zero_steps is not None:
            gh = gh + zero_steps[t]
        h, c = _cell(call.mode, gi_steps[t], gh, h, c)
        if w_hr is not None:
            unprojected[t] = h
            h = F.linear(h, w_hr)
            if projected_steps is not None:
                h = h + projected_steps[t]
        outputs[t] = h
    if zeros is not None:
        record_steps(w_hh, torch.stack(before, 1), zeros)
    if projected is not None:
        record_steps(w_hr, torch.stack(unprojected, 1), projected)
    return torch.stack(outputs, 1), h, c


def run(call: RecurrentCall, project: Project, probe: Probe, record_steps: RecordSteps) -> tuple[torch.Tensor, ...]:
    """What the fused function returns ((output, h_n), and c_n for an LSTM), computed step by step with
    ``project(x, W, b)`` making the input maps, ``probe(W_hh, shape, like)`` a zero tensor to add to the hidden
    map's outputs (None: not recorded) and ``record_steps(W_hh, a, zeros)`` recording its site."""
    x = call.input if call.batch_first else call.input.transpose(0, 1)
    lstm = call.mode == "lstm"
    h0 = call.hx[0] if lstm else call.hx
    c0 = call.hx[1] if lstm else None
    last_h, last_c = [], []
    for layer in range(call.num_layers):
        outputs = []
        for direction in range(call.directions):
            k = layer * call.directions + direction
            y, h, c = _direction(call, k, x, h0[k], c0[k] if lstm else None, project, probe, record_steps)
            outputs.append(y)
            last_h.append(h)
            last_c.append(c)
        x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, -1)
        if call.dropout > 0 and call.train and layer < call.num_layers - 1:
            x = F.dropout(x, call.dropout, training=True)
    output = (x if call.batch_first else x.transpose(0, 1)).contiguous()
    if lstm:
        return output, torch.stack(last_h), torch.stack(last_c)
    return output, torch.stack(last_h)


def cell_weights(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W_ih, W_hh) of a cell call, or None when its arguments are not the cell's."""
    call = dict(zip(_CELL_ARGUMENTS, args), **kwargs)
    weights = call.get("w_ih"), call.get("w_hh")
    return weights if all(isinstance(w, torch.Tensor) for w in weights) else None


def cell_step(func: Callable, args: tuple, kwargs: dict, project: Project) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """What the cell function returns (h', or (h', c') for an LSTM), with ``project`` making its two maps."""
    call = dict(zip(_CELL_ARGUMENTS, args), **kwargs)
    mode, x, hx = CELLS[func], call["input"], call["hx"]
    h, c = (hx[0], hx[1]) if mode == "lstm" else (hx, None)
    gi = project(x, call["w_ih"], call.get("b_ih"))
    gh = project(h, call["w_hh"], call.get("b_hh"))
    h, c = _cell(mode, gi, gh, h, c)
    return (h, c) if mode == "lstm" else h
