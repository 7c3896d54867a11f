"""nn.Embedding as a Kronecker block: a linear layer on one-hot rows (passes/match/embedding.py).

The independent reference is the same model with the table as an explicit ``one_hot(t) @ W`` (a plain linear
layer, whose K-FAC the dense-maths tests pin down): K-FAC must take the same steps on both, and the embedding's
A must be the diagonal of how often each row was read.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kronograph
from equality import kfac_resumed
from kronograph.cli.optimizers import make_optimizer
from kronograph.passes.match.embedding import MAX_EMBEDDING_ROWS
from kronograph.passes.plan import LayerPlan
from kronograph.runtime.inverse import diagonal_damped_inverse

ROWS, DIM = 12, 6


class EmbeddingLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(ROWS, DIM)
        self.fc = nn.Linear(DIM, ROWS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(tokens)))


class OneHotLM(nn.Module):
    """A model of an ``emb`` table and an ``fc`` head (EmbeddingLM, TableLM) with the table applied as a linear layer
    on one-hot rows."""

    def __init__(self, twin: nn.Module) -> None:
        super().__init__()
        self.rows = twin.emb.num_embeddings
        self.table = nn.Linear(self.rows, twin.emb.embedding_dim, bias=False)
        self.fc = nn.Linear(twin.fc.in_features, twin.fc.out_features)
        with torch.no_grad():
            self.table.weight.copy_(twin.emb.weight.T)
            self.fc.load_state_dict(twin.fc.state_dict())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.table(nn.functional.one_hot(tokens, self.rows).float())))


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, ROWS, (8, 5), generator=generator), torch.randint(0, ROWS, (8, 5), generator=generator))
            for _ in range(count)]


def test_an_embedding_table_is_a_layer_on_one_hot_rows_in_its_own_layout():
    cm = kronograph.compile(EmbeddingLM(), (torch.randint(0, ROWS, (2, 5)),), loss="cross_entropy")
    layer = cm.plan.layer("emb")
    assert (layer.kind, layer.weight, layer.bias, layer.weight_layout) == ("embedding", "emb.weight", None, "in_out")
    assert (layer.in_features, layer.out_features, layer.a_dim, layer.g_dim) == (ROWS, DIM, ROWS, DIM)
    assert cm.unmatched == []


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_the_embeddings_a_is_the_diagonal_of_how_often_each_row_was_read(engine):
    torch.manual_seed(0)
    (x, y), = _batches(1)
    cm = kronograph.compile(EmbeddingLM(), (x[:2],), loss="cross_entropy", engine=engine)
    opt = kronograph.optim.KFAC(cm, seed=0)
    opt.step(x, y)  # 40 tokens, below the statistics' floor of 64 terms: all 8 sequences, first EMA = the batch's
    a = opt.blocks["emb"].a[0]
    expected = torch.diag(torch.bincount(x.flatten(), minlength=ROWS).float() / len(x))  # summed over a sequence
    torch.testing.assert_close(a, expected)


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_kfac_steps_an_embedding_as_its_one_hot_linear_layer(preset):
    torch.manual_seed(0)
    model = EmbeddingLM()
    twin = OneHotLM(model)
    batches = _batches(6)
    runs = []
    for net in (model, twin):
        cm = kronograph.compile(net, (batches[0][0][:2],), loss="cross_entropy")
        opt = kronograph.optim.KFAC(cm, preset=preset, seed=0)
        runs.append([opt.step(x, y)["loss"] for x, y in batches])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    torch.testing.assert_close(model.emb.weight, twin.table.weight.T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.fc.weight, twin.fc.weight, rtol=1e-4, atol=1e-6)


class Positions(nn.Module):
    """A position table read at indices made inside the model: the same rows for every example."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(5, DIM)
        self.register_buffer("index", torch.arange(5))
        self.fc = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + self.pos(self.index))


def test_tables_too_large_are_tables_of_the_plan_and_those_at_the_models_own_indices_stay_unmatched():
    big = nn.Sequential(nn.Embedding(MAX_EMBEDDING_ROWS + 1, 4), nn.Linear(4, 3))
    cm = kronograph.compile(big, (torch.randint(0, 10, (2, 5)),), loss="cross_entropy")
    assert [layer.name for layer in cm.layers] == ["1"]
    assert [(t.name, t.kind, t.in_features, t.diagonal_a) for t in cm.plan.tables] == [
        ("0", "embedding", MAX_EMBEDDING_ROWS + 1, True)]
    assert "table of the plan" in dict((u.name, u.reason) for u in cm.plan.unmatched)["0.weight"]
    assert LayerPlan.from_json(cm.plan.to_json()) == cm.plan
    cm = kronograph.compile(Positions(), (torch.randn(2, 5, DIM),), loss="cross_entropy")
    assert [layer.name for layer in cm.layers] == ["fc"] and cm.unmatched == ["pos.weight"]


def test_the_padding_row_is_no_parameter_of_the_block():
    """torch gives nn.Embedding's padding_idx row no gradient; where sec 8's low-rank products rebuild the gradient
    from the rows (300 x 200 table, 20 rows a batch) it must not move either, and A does not count it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 200, padding_idx=0), nn.Linear(200, 5))
    x, y = torch.randint(0, 300, (4, 5)), torch.randint(0, 5, (4, 5))
    x[:, 0] = 0
    before = model[0].weight.detach().clone()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0)
    for _ in range(3):
        opt.step(x, y)
    assert opt._rows  # the low-rank products ran
    assert torch.equal(model[0].weight[0], before[0])
    assert not torch.equal(model[0].weight[1:], before[1:])
    assert opt.blocks["0"].a[0, 0, 0] == 0


@pytest.mark.parametrize("method", ["KFAC", "Adam"])
def test_the_padding_row_stays_on_the_onnxruntime_engine_too(method):
    """The ONNX export drops padding_idx, so onnxruntime's gradient of that row is not zero; the engine's passes zero
    it, as torch does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(ROWS, DIM, padding_idx=2), nn.Linear(DIM, 5))
    x, y = torch.randint(0, ROWS, (8, 5)), torch.randint(0, 5, (8, 5))
    x[:, 0] = 2
    cm = kronograph.compile(model, (x[:2],), loss="cross_entropy", engine="onnxruntime")
    before = torch.as_tensor(cm.state_dict()["0.weight"]).clone()
    opt = kronograph.optim.KFAC(cm, seed=0) if method == "KFAC" else make_optimizer("adam", cm, {}, seed=0)
    for _ in range(3):
        opt.step(x, y)
    after = torch.as_tensor(cm.state_dict()["0.weight"])
    assert torch.equal(after[2], before[2]) and not torch.equal(after, before)


# -- tables: embeddings wider than MAX_EMBEDDING_ROWS, whose A is kept as its diagonal -------------------------------

WORDS = MAX_EMBEDDING_ROWS + 76


class TableLM(nn.Module):
    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(WORDS, DIM, padding_idx=padding_idx)
        self.fc = nn.Linear(DIM, 7)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(tokens)))


def _word_batches(count: int, rows: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    # A Zipf-like draw: a few rows read often, most rarely or never, as a vocabulary's.
    weights = 1.0 / torch.arange(1, WORDS + 1, dtype=torch.float64)
    return [(torch.multinomial(weights, rows * 5, replacement=True, generator=generator).reshape(rows, 5),
             torch.randint(0, 7, (rows, 5), generator=generator)) for _ in range(count)]


def test_kfac_steps_a_table_as_its_one_hot_linear_layer_with_a_dense_a():
    """The diagonal A's block against the one-hot twin's dense WORDS x WORDS A (inverted whole, as the dense-maths
    tests pin down): the same factors, the same steps."""
    torch.manual_seed(0)
    model = TableLM()
    twin = OneHotLM(model)
    batches = _word_batches(6)
    runs, blocks = [], []
    for net in (model, twin):
        cm = kronograph.compile(net, (batches[0][0][:2],), loss="cross_entropy")
        # (one gamma for both: a table's own is scaled, the twin's linear layer's not; tests/test_table_damping.py)
        opt = kronograph.optim.KFAC(cm, seed=0, max_factor_dim=None, relative_table_damping=False)
        runs.append([opt.step(x, y)["loss"] for x, y in batches])
        blocks.append(opt.blocks["emb" if net is model else "table"])
    assert set(kronograph.optim.KFAC(kronograph.compile(model, (batches[0][0][:2],), loss="cross_entropy"),
                                     seed=0).blocks) == {"emb", "fc"}
    table, dense = blocks
    assert table.a.shape == (1, WORDS) and dense.a.shape == (1, WORDS, WORDS)
    torch.testing.assert_close(torch.diag_embed(table.a), dense.a)
    torch.testing.assert_close(table.g, dense.g)
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    torch.testing.assert_close(model.emb.weight, twin.table.weight.T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.fc.weight, twin.fc.weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_a_tables_a_counts_each_rows_reads_but_the_padding_rows_and_that_row_stays(engine):
    torch.manual_seed(0)
    model = TableLM(padding_idx=5)
    (x, y), = _word_batches(1)
    x[:, 0] = 5
    cm = kronograph.compile(model, (x[:2],), loss="cross_entropy", engine=engine)
    before = torch.as_tensor(cm.state_dict()["emb.weight"]).clone()
    opt = kronograph.optim.KFAC(cm, seed=0)
    opt.step(x, y)  # 40 tokens, below the statistics' floor of 64 terms: all 8 sequences, first EMA = the batch's
    counts = torch.bincount(x.flatten(), minlength=WORDS).float() / len(x)
    counts[5] = 0
    torch.testing.assert_close(opt.blocks["emb"].a[0], counts)
    after = torch.as_tensor(cm.state_dict()["emb.weight"])
    assert torch.equal(after[5], before[5]) and not torch.equal(after, before)


def test_kfac_with_a_table_resumes_exactly():
    data = _word_batches(10)
    resumed, tail, again = kfac_resumed(TableLM, data, data[0][0][:2])
    assert resumed.blocks["emb"].a.shape == (1, WORDS)
    assert again == tail


def test_the_preconditioner_solves_a_tables_gradient_as_its_one_hot_linear_twins():
    """KFACPreconditioner in a user's loop: the table's new .grad against the twin's (dense WORDS-wide A)."""
    torch.manual_seed(0)
    model = TableLM()
    twin = OneHotLM(model)
    plain = copy.deepcopy(model)
    batches = _word_batches(4)
    grads = []
    runs = ((model, "emb.weight", True), (twin, "table.weight", True), (plain, "emb.weight", False))
    for net, weight, blocks in runs:
        cm = kronograph.compile(net, (batches[0][0][:2],), loss="cross_entropy")
        precond = kronograph.optim.KFACPreconditioner(cm, max_factor_dim=None, seed=0, table_blocks=blocks)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for x, y in batches:
            opt.zero_grad()
            with precond.track():
                nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten()).backward()
            precond.step()
            opt.step()
        grads.append(dict(net.named_parameters())[weight].grad)
    torch.testing.assert_close(grads[0], grads[1].T, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grads[0], grads[2], rtol=1e-2)  # without the table's block: its raw gradient
    torch.testing.assert_close(model.emb.weight, twin.table.weight.T, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore::kronograph.runtime.inverse.CoverageWarning")  # the table's parameters are most
def test_the_paper_preset_and_the_other_structure_leave_a_table_outside_every_block():
    (x, _), = _word_batches(1)
    cm = kronograph.compile(TableLM(), (x[:2],), loss="cross_entropy")
    assert set(kronograph.optim.KFAC(cm, preset="paper").blocks) == {"fc"}
    assert set(kronograph.optim.KFAC(cm, table_blocks=False).blocks) == {"fc"}
    assert set(kronograph.optim.KFAC(cm, structure="tridiagonal").blocks) == {"fc"}


def test_a_diagonal_factors_damped_inverse_is_the_dense_one_and_nan_safe():
    diagonal = torch.tensor([[0.0, 1.0, 3.0], [2.0, float("nan"), 1.0]], dtype=torch.float64)
    inverse, failed = diagonal_damped_inverse(diagonal, torch.tensor([0.5, 0.25], dtype=torch.float64))
    dense = torch.linalg.inv(torch.diag(diagonal[0]) + 0.5 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(torch.diag(inverse[0]), dense)
    assert failed.tolist() == [False, True]
    assert torch.equal(inverse[1], torch.full((3,), 4.0, dtype=torch.float64))  # the damping's inverse alone
