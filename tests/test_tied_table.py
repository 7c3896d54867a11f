"""A table tied to an output layer (GPT-2's head): one block over both uses (passes/match/tied.py, runtime/tied.py).

The independent references: the untied twin (the same model with the table and the head as two Parameters of
equal values), whose two layers' factors the dense-maths tests pin down and whose per-use gradients are autograd's;
the tie's block is their Kronecker products summed, built here with torch.kron, and its damped inverse is checked
against torch.linalg.solve of that dense matrix; K-FAC on the onnxruntime engine against the torch engine's steps
(data-parallel runs: tests/test_kfac_distributed.py, test_preconditioner_ddp.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import kronograph
from equality import kfac_resumed
from kronograph.passes.match.embedding import MAX_EMBEDDING_ROWS
from kronograph.passes.plan import LayerPlan
from kronograph.runtime.tied import tied_inverses

ROWS, DIM = 12, 6


class TiedLM(nn.Module):
    """Embedding, a hidden linear, and a head whose weight is the table (nn.Linear's, or F.linear's without bias)."""

    def __init__(self, rows: int = ROWS, bias: bool = True, functional: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.functional = functional
        if not functional:
            self.fc = nn.Linear(DIM, rows, bias=bias)
            self.fc.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(tokens)))
        return nn.functional.linear(h, self.emb.weight) if self.functional else self.fc(h)


class UntiedTwin(nn.Module):
    """TiedLM with the head's weight a Parameter of its own, equal to the table."""

    def __init__(self, tied: TiedLM) -> None:
        super().__init__()
        self.emb = copy.deepcopy(tied.emb)
        self.mix = copy.deepcopy(tied.mix)
        self.fc = nn.Linear(DIM, tied.emb.num_embeddings)
        with torch.no_grad():
            self.fc.weight.copy_(tied.emb.weight)
            self.fc.bias.copy_(tied.fc.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.mix(self.emb(tokens))))


class ReadElsewhere(TiedLM):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens) + self.emb.weight.sum()


def _batches(count: int, rows: int = 8, length: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, ROWS, (rows, length), generator=generator),
             torch.randint(0, ROWS, (rows, length), generator=generator)) for _ in range(count)]


def _compile(model: nn.Module, **kwargs) -> kronograph.CompiledModel:
    return kronograph.compile(model, (torch.randint(0, ROWS, (2, 5)),), loss="cross_entropy", **kwargs)


# -- the plan -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("functional", [False, True])
def test_a_table_read_by_the_head_is_a_tie_of_two_views_of_one_weight(functional):
    cm = _compile(TiedLM(functional=functional))
    (tie,) = cm.plan.ties
    assert (tie.name, tie.embedding.name, tie.output.name) == ("emb", "emb[embedding]", "emb[output]")
    assert (tie.embedding.kind, tie.embedding.weight_layout, tie.embedding.in_features) == ("embedding", "in_out", ROWS)
    assert (tie.output.kind, tie.output.weight_layout, tie.output.in_features, tie.output.out_features) == (
        "linear", "out_in", DIM, ROWS)
    assert tie.output.weight == tie.embedding.weight == "emb.weight"
    assert tie.output.bias == (None if functional else "fc.bias")
    reasons = {entry.name: entry.reason for entry in cm.plan.unmatched}
    assert reasons["emb.weight"].startswith("tied:") and "tied_blocks" in reasons["emb.weight"]
    assert [layer.name for layer in cm.plan.layers] == ["mix"]
    assert cm.output_layers == ("emb[output]",)
    assert LayerPlan.from_json(cm.plan.to_json()) == cm.plan
    assert cm.plan.layer("emb[output]") == tie.output


def test_a_table_also_read_by_anything_else_is_no_tie():
    cm = _compile(ReadElsewhere())
    assert cm.plan.ties == ()
    assert {entry.name for entry in cm.plan.unmatched} >= {"emb.weight", "fc.bias"}


# -- the damped inverse: torch.linalg.solve of the dense sum of Kronecker products ------------------------------------

def _spd(d: int, generator: torch.Generator, rank: int | None = None) -> torch.Tensor:
    x = torch.randn(d, rank or 2 * d, generator=generator, dtype=torch.float64)
    return (x @ x.T / x.shape[1])[None]


def _damped_factors(output, table, gamma: float, centered: bool = False) -> tuple[torch.Tensor, ...]:
    """(G_h', A_h', A_e', G_e' padded to c), each use damped by factored Tikhonov at gamma / sqrt 2."""
    each = gamma / math.sqrt(2)
    (a_h, g_h), (a_e, g_e) = [(a[0], g[0]) for a, g in (output, table)]
    a_e = a_e if a_e.dim() == 2 else torch.diag(a_e)
    g_h = g_h if g_h.dim() == 2 else torch.diag(g_h)
    c, rows, dim = a_h.shape[0], g_h.shape[0], g_e.shape[0]
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    if centered:  # A = T A~ T^T with T = [[I, mu], [0, 1]]: damping T T^T, pi from A~'s trace
        s = a_h[-1, -1]
        mu = a_h[:-1, -1] / s
        t = eye(c)
        t[:-1, -1] = mu
        tilde_trace = torch.trace(a_h[:-1, :-1] - s * torch.outer(mu, mu)) + s
        pi_h = torch.sqrt((tilde_trace / c) / (torch.trace(g_h) / rows))
        a_h = a_h + pi_h * each * (t @ t.T)
    else:
        pi_h = torch.sqrt((torch.trace(a_h) / c) / (torch.trace(g_h) / rows))
        a_h = a_h + pi_h * each * eye(c)
    g_h = g_h + each / pi_h * eye(rows)
    pi_e = torch.sqrt((torch.trace(a_e) / rows) / (torch.trace(g_e) / dim))
    a_e = a_e + pi_e * each * eye(rows)
    padded = each / pi_e * eye(c)
    padded[:dim, :dim] += g_e
    return g_h, a_h, a_e, padded


def _damped_dense(output, table, gamma: float, centered: bool = False) -> torch.Tensor:
    """G_h' (x) A_h' + A_e' (x) G_e' on the head's W_bar [rows, c] flattened row-major."""
    g_h, a_h, a_e, g_e = _damped_factors(output, table, gamma, centered)
    return torch.kron(g_h, a_h) + torch.kron(a_e, g_e)


@pytest.mark.parametrize("bias, diagonal, centered, diagonal_g", [
    (True, False, False, False), (False, False, False, False), (True, True, False, False), (True, False, True, False),
    (True, True, False, True), (True, False, False, True), (True, True, True, True), (False, True, False, True)])
def test_the_tied_solve_is_the_dense_sums_inverse(bias, diagonal, centered, diagonal_g):
    """``diagonal_g``: the head's G kept as its diagonal (diagonal_output_g), with a diagonal table A the row side
    a diagonal itself (runtime/tied.py), with a dense one the pencil of a dense and a diagonal matrix."""
    generator = torch.Generator().manual_seed(0)
    rows, dim = 7, 4
    c = dim + bias
    a_h = _spd(c, generator, rank=3)
    if centered:  # inputs [x; 1] with x far from zero mean (sigmoid units near 1/2)
        x = torch.rand(3, dim, generator=generator, dtype=torch.float64) + 0.5
        x = torch.cat([x, torch.ones(3, 1, dtype=torch.float64)], dim=1)
        a_h = (x.T @ x / 3)[None]
    output = (a_h, _spd(rows, generator, rank=2))  # low-rank factors: the damping matters
    if diagonal_g:
        output = (a_h, torch.rand(1, rows, generator=generator, dtype=torch.float64) * (torch.arange(rows) % 3 > 0))
    counts = torch.rand(1, rows, generator=generator, dtype=torch.float64)
    table = (counts if diagonal else torch.diag_embed(counts), _spd(dim, generator))
    gamma = 0.3
    inverses = tied_inverses(output, table, gamma, centered=centered)
    grad = torch.randn(1, rows, c, generator=generator, dtype=torch.float64)
    expected = torch.linalg.solve(_damped_dense(output, table, gamma, centered), grad.reshape(-1))
    torch.testing.assert_close(inverses.solve(grad).reshape(-1), expected)
    assert inverses.ok


def test_a_side_wider_than_max_dim_is_solved_in_diagonal_blocks():
    """max_dim 4 splits 10 rows into blocks of 4, 4 and 2 and 6 columns into two of 3: both matrices of a side are
    taken block-diagonal (damped as the whole ones, pi from the whole traces)."""
    generator = torch.Generator().manual_seed(1)
    rows, dim = 10, 5
    output = (_spd(dim + 1, generator), _spd(rows, generator))
    table = (torch.rand(1, rows, generator=generator, dtype=torch.float64) + 0.1, _spd(dim, generator))
    row_blocks = torch.block_diag(torch.ones(4, 4), torch.ones(4, 4), torch.ones(2, 2)).double()
    column_blocks = torch.block_diag(*[torch.ones(3, 3)] * 2).double()
    g_h, a_h, a_e, g_e = _damped_factors(output, table, 0.2)
    dense = (torch.kron(g_h * row_blocks, a_h * column_blocks) + torch.kron(a_e * row_blocks, g_e * column_blocks))
    grad = torch.randn(1, rows, dim + 1, generator=generator, dtype=torch.float64)
    solved = tied_inverses(output, table, 0.2, max_dim=4).solve(grad)
    torch.testing.assert_close(solved.reshape(-1), torch.linalg.solve(dense, grad.reshape(-1)))
    whole = tied_inverses(output, table, 0.2).solve(grad)
    assert not torch.allclose(solved, whole, rtol=1e-3)


def test_factors_that_are_not_finite_keep_the_previous_inverse_and_warn():
    generator = torch.Generator().manual_seed(2)
    output, table = (_spd(5, generator), _spd(7, generator)), (_spd(7, generator), _spd(4, generator))
    first = tied_inverses(output, table, 0.1)
    poisoned = (output[0].clone(), output[1])
    poisoned[0][0, 0, 0] = float("nan")
    with pytest.warns(kronograph.runtime.inverse.InverseWarning, match="tied block"):
        kept = tied_inverses(poisoned, table, 0.1, first)
    assert not kept.ok and torch.equal(kept.rows, first.rows) and torch.equal(kept.columns, first.columns)


# -- K-FAC on the model: the twin's factors, the dense solve, the training ----------------------------------------

def _plain_settings() -> dict:
    """Damping without centring, floors or the head's noise share (the factored Tikhonov the dense sum builds), in
    float64 (the generalized eigendecompositions' float32 rounding is ~1e-6 of the step)."""
    return dict(centered_damping=False, factor_damping_floor=0.0, output_noise_damping=False, seed=0,
                factor_dtype=torch.float64)


def test_the_ties_views_hold_the_untied_twins_factors_and_its_step_is_the_dense_sums_solve():
    torch.manual_seed(0)
    model = TiedLM()
    twin = UntiedTwin(model)
    (x, y), = _batches(1)
    tied = kronograph.optim.KFAC(_compile(model), **_plain_settings())
    untied = kronograph.optim.KFAC(_compile(twin), **_plain_settings())
    assert set(tied.blocks) == {"mix", "emb[embedding]", "emb[output]"} and set(untied.blocks) == {"mix", "emb", "fc"}
    tied.step(x, y)
    untied.step(x, y)  # 40 tokens, below the statistics' floor: the whole batch, the EMAs are the batch's factors
    for view, layer in (("emb[embedding]", "emb"), ("emb[output]", "fc")):
        torch.testing.assert_close(tied.blocks[view].a, untied.blocks[layer].a)
        torch.testing.assert_close(tied.blocks[view].g, untied.blocks[layer].g)
    generator = torch.Generator().manual_seed(3)
    grads = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
    inverses = tied.curvature.current()
    proposal = tied.curvature.direction(grads, inverses, {})
    output = [untied.blocks["fc"].a.double(), untied.blocks["fc"].g.double()]
    table = [untied.blocks["emb"].a.double(), untied.blocks["emb"].g.double()]
    bar = torch.cat([grads["emb.weight"], grads["fc.bias"][:, None]], dim=1).double()
    dense = _damped_dense(output, table, tied.inverted_gamma)
    solved = torch.linalg.solve(dense, bar.reshape(-1)).reshape(ROWS, DIM + 1)
    torch.testing.assert_close(proposal["emb.weight"].double(), -solved[:, :DIM], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(proposal["fc.bias"].double(), -solved[:, DIM], rtol=1e-4, atol=1e-6)


def test_the_undamped_block_is_the_sum_of_the_two_uses_exact_fisher_on_one_token():
    """One example, one position, the labels' (empirical) Fisher: each use's Kronecker product is its gradient's
    outer product exactly, autograd's per-use gradients read off the untied twin; the tie drops their cross terms."""
    torch.manual_seed(1)
    model = TiedLM()
    twin = UntiedTwin(model)
    x, y = torch.tensor([[3]]), torch.tensor([[5]])
    tied = kronograph.optim.KFAC(_compile(model), fisher="empirical", **_plain_settings())
    tied.step(x, y)
    nn.functional.cross_entropy(twin(x).flatten(0, 1), y.flatten()).backward()
    head = torch.cat([twin.fc.weight.grad, twin.fc.bias.grad[:, None]], dim=1).reshape(-1)
    table = torch.cat([twin.emb.weight.grad, torch.zeros(ROWS, 1)], dim=1).reshape(-1)
    expected = torch.outer(head, head) + torch.outer(table, table)
    output_block, table_block = tied.blocks["emb[output]"], tied.blocks["emb[embedding]"]
    pad = torch.zeros(DIM + 1, DIM + 1, dtype=torch.float64)
    pad[:DIM, :DIM] = table_block.g[0]
    dense = torch.kron(output_block.g[0], output_block.a[0]) + torch.kron(table_block.a[0], pad)
    torch.testing.assert_close(dense, expected.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore::kronograph.runtime.inverse.CoverageWarning")  # the tie outside: 67% outside
def test_kfac_trains_a_tied_model_better_with_the_ties_block_and_the_paper_preset_leaves_it_out():
    batches = _batches(30)
    losses = {}
    # (outside: the RMS-shaped direction of its own; with the default's diagonal Fisher the table is level here)
    for label, options in (("tied", {}), ("outside", {"tied_blocks": False, "unmatched_direction": "rms"})):
        torch.manual_seed(0)
        model = TiedLM()
        opt = kronograph.optim.KFAC(_compile(model), seed=0, batches_per_step=1, **options)
        losses[label] = [opt.step(x, y)["loss"] for x, y in batches]
        assert ("emb[output]" in opt.blocks) == (label == "tied")
    assert all(math.isfinite(value) for run in losses.values() for value in run)
    assert sum(losses["tied"][-5:]) < sum(losses["outside"][-5:])
    paper = kronograph.optim.KFAC(_compile(TiedLM()), preset="paper")
    assert "emb[output]" not in paper.blocks


def test_a_wide_tied_table_keeps_its_a_as_the_diagonal_and_trains():
    rows = MAX_EMBEDDING_ROWS + 76
    torch.manual_seed(0)
    model = TiedLM(rows=rows, functional=True)
    cm = kronograph.compile(model, (torch.randint(0, rows, (2, 5)),), loss="cross_entropy")
    opt = kronograph.optim.KFAC(cm, seed=0)
    generator = torch.Generator().manual_seed(4)
    losses = [opt.step(torch.randint(0, rows, (8, 5), generator=generator),
                       torch.randint(0, rows, (8, 5), generator=generator))["loss"] for _ in range(6)]
    assert opt.blocks["emb[embedding]"].a.shape == (1, rows)
    assert opt.blocks["emb[output]"].g.shape == (1, rows)  # wider than diagonal_output_g: the head's G as its diagonal
    assert opt.blocks["emb[output]"].inverses.rows.shape == (rows,)  # the row side a diagonal
    assert all(math.isfinite(value) for value in losses)


def test_kfac_with_a_tie_resumes_exactly():
    resumed, tail, again = kfac_resumed(TiedLM, _batches(9), torch.randint(0, ROWS, (2, 5)))
    assert resumed.blocks["emb[embedding]"].inverses is resumed.blocks["emb[output]"].inverses
    assert again == tail


def test_the_preconditioner_rewrites_the_tied_grad_with_the_dense_sums_solve():
    """KFACPreconditioner in a user's loop: the table's new .grad (and the head's bias's) is the dense sum's solve
    from the untied twin's factors (the same batch, so the same factors)."""
    torch.manual_seed(0)
    model = TiedLM()
    twin = UntiedTwin(model)
    (x, y), = _batches(1)
    blocks, raw = [], {}
    for net in (model, twin):
        precond = kronograph.optim.KFACPreconditioner(_compile(net), damping=1e-3, graft=None, kl_clip=None,
                                                      factor_dtype=torch.float64)
        with precond.track():
            nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten()).backward()
        raw = {name: p.grad.clone() for name, p in net.named_parameters()}  # (the twin's, kept last)
        precond.step()
        blocks.append(precond.blocks)
    tied, untied = blocks
    assert set(tied) == {"mix", "emb[embedding]", "emb[output]"}
    raw_bar = torch.cat([raw["emb.weight"] + raw["fc.weight"], raw["fc.bias"][:, None]], dim=1)
    output = [untied["fc"].a, untied["fc"].g]
    table = [untied["emb"].a, untied["emb"].g]
    solved = torch.linalg.solve(_damped_dense(output, table, 1e-3), raw_bar.double().reshape(-1)).reshape(ROWS, DIM + 1)
    torch.testing.assert_close(model.emb.weight.grad.double(), solved[:, :DIM], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(model.fc.bias.grad.double(), solved[:, DIM], rtol=1e-5, atol=1e-8)


def test_kfac_on_onnxruntime_steps_a_tie_as_the_torch_engine_does(tmp_path):
    """The module's own exported .onnx on onnxruntime-training (taps on both views' sites) against the torch engine:
    the same losses and weights over 8 deterministic steps (the labels' Fisher, no re-scaling)."""
    pytest.importorskip("onnxruntime.training")
    torch.manual_seed(0)
    model = TiedLM()
    cm_torch = _compile(model)
    cm_onnx = kronograph.compile(str(cm_torch.export_onnx(tmp_path / "tied.onnx")), loss="cross_entropy")
    cm_onnx.onnxruntime(tmp_path / "artifacts")
    settings = dict(fisher="empirical", stats_fraction=1.0, rescale=False, adapt_damping=False, adapt_gamma=False,
                    lr=0.05, factor_damping=0.1, inverse_every=3, centered_damping=False, seed=0)
    optimizers = [kronograph.optim.KFAC(cm, **settings) for cm in (cm_torch, cm_onnx)]
    assert all(sum(block.tied for block in opt.blocks.values()) == 2 for opt in optimizers)
    for x, y in _batches(8):
        expected, got = (opt.step(x, y)["loss"] for opt in optimizers)
        assert got == pytest.approx(expected, rel=1e-4)
    weights = cm_onnx.state_dict()
    table = cm_onnx.plan.ties[0].output.weight  # the exporter kept one of the tied names ("fc.weight")
    for name, param in model.named_parameters():
        torch.testing.assert_close(torch.as_tensor(weights[table if name == "emb.weight" else name]), param.detach(),
                                   rtol=1e-4, atol=1e-5)
