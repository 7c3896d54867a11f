"""An EmbeddingBag ("sum" or "mean") is an embedding read once a token (runtime/bags.py, compiler/bags.py): its
table is a table of the plan (a layer up to 1024 rows) on the torch engine, and K-FAC's block of it is the one of
the same model written with ``F.embedding`` and the weighted sum.

Independent references: torch's fused ``F.embedding_bag`` (values and gradient of the per-token form), and the
``nn.Embedding`` model, whose table the graph matcher finds, for the factors and the steps. Bags cut by offsets
(flat words) are not covered: their examples have ragged token rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph
from kronograph.runtime.bags import linear_call, per_token
from kronograph.runtime.inverse import CoverageWarning

ROWS, WIDTH, CLASSES, WORDS = 1100, 6, 5, 4


@pytest.mark.parametrize("options", [dict(mode="mean"), dict(mode="sum"), dict(mode="mean", padding_idx=3),
                                     dict(mode="sum", padding_idx=-2), dict(mode="sum", per_sample_weights=True)])
def test_the_per_token_form_is_the_fused_bag(options):
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(30, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    indices = torch.randint(0, 30, (6, 4), generator=generator)
    indices[1] = 3  # a bag of padding alone: empty
    indices[2, :2] = 28
    if options.pop("per_sample_weights", False):
        options["per_sample_weights"] = torch.rand(indices.shape, dtype=torch.float64, generator=generator)
    fused = F.embedding_bag(indices, table, **options)
    ours = per_token(linear_call((indices, table), options), lambda i: F.embedding(i, table))
    torch.testing.assert_close(ours, fused, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn(fused.shape, dtype=torch.float64, generator=generator)
    expected, = torch.autograd.grad(fused, table, cotangent)
    found, = torch.autograd.grad(ours, table, cotangent)
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)


def test_max_and_renormalising_bags_are_no_linear_map():
    table = torch.randn(30, 5)
    indices = torch.randint(0, 30, (2, 3))
    assert linear_call((indices, table), dict(mode="max")) is None
    assert linear_call((indices, table), dict(max_norm=1.0)) is None
    assert linear_call((indices, table, None, None, 2.0, True), {}) is None  # scale_grad_by_freq
    assert linear_call((indices, table), dict(sparse=True)) is None
    assert linear_call((indices.flatten(), table, torch.tensor([0, 3])), {}) is None  # a ragged batch


class Bag(nn.Module):
    """fastText's shape: the mean of the bag's word vectors, a tanh layer, a head."""

    def __init__(self, rows: int = ROWS, mode: str = "mean") -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(rows, WIDTH, mode=mode)
        self.body = nn.Sequential(nn.Linear(WIDTH, 8), nn.Tanh(), nn.Linear(8, CLASSES))

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        return self.body(self.bag(words))


class Gathered(Bag):
    """The same model with its table read by F.embedding and averaged: the graph matcher's table."""

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        return self.body(F.embedding(words, self.bag.weight).mean(1))


def _batches(rows: int = ROWS, count: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Bags of 4 of the 8 words of their class (40 words that recur), labelled by the class."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (count, 64), generator=generator)
    words = labels.unsqueeze(-1) * 8 + torch.randint(0, 8, (count, 64, WORDS), generator=generator)
    return list(zip(words % rows, labels))


def _compiled(cls: type, rows: int = ROWS, **options) -> kronograph.CompiledModel:
    torch.manual_seed(0)
    return kronograph.compile(cls(rows, **options), torch.randint(0, rows, (2, WORDS)), loss="cross_entropy")


@pytest.mark.parametrize("rows", [ROWS, 50])
def test_a_bags_table_is_a_table_of_the_plan_or_a_layer(rows):
    cm = _compiled(Bag, rows)
    if rows > 1024:
        assert [(t.name, t.weight, t.diagonal_a) for t in cm.plan.tables] == [("bag", "bag.weight", True)]
        assert [layer.name for layer in cm.layers] == ["body.0", "body.2"]
        assert "EmbeddingBag's table of 1100 rows" in {e.name: e.reason for e in cm.plan.unmatched}["bag.weight"]
    else:
        assert cm.plan.tables == ()
        assert [layer.name for layer in cm.layers] == ["bag", "body.0", "body.2"] and cm.unmatched == []
        assert cm.layers[0].kind == "embedding" and not cm.layers[0].diagonal_a


def test_a_max_bag_a_bag_read_elsewhere_and_onnxruntime_keep_the_table_unmatched():
    assert _compiled(Bag, mode="max").plan.tables == ()

    class ReadTwice(Bag):
        def forward(self, words):
            return self.body(self.bag(words)) + self.bag.weight[:CLASSES, :CLASSES].sum()

    assert _compiled(ReadTwice).plan.tables == ()
    torch.manual_seed(0)
    on_onnxruntime = kronograph.compile(Bag(), torch.randint(0, ROWS, (2, WORDS)), loss="cross_entropy",
                                        engine="onnxruntime")
    assert on_onnxruntime.plan.tables == () and "bag.weight" in on_onnxruntime.unmatched


@pytest.mark.parametrize("rows", [ROWS, 50])
def test_kfac_steps_a_bag_as_the_embedding_model_it_equals(rows):
    """The same batches from the same weights: the bag's factors after the first step are the gathered table's,
    and so are the steps (to float rounding: the per-token sum and the fused kernel add in different orders)."""
    runs = {}
    for cls in (Bag, Gathered):
        cm = _compiled(cls, rows)
        opt = kronograph.optim.KFAC(cm, seed=0, factor_dtype=torch.float64)
        batches = _batches(rows)
        losses = [opt.step(*batches[0])["loss"]]
        first = {name: (block.a.clone(), block.g.clone()) for name, block in opt.blocks.items()}
        losses += [opt.step(x, y)["loss"] for x, y in batches[1:]]
        runs[cls] = (opt, first, losses)
    (bag, bag_first, bag_losses), (gathered, gathered_first, gathered_losses) = runs[Bag], runs[Gathered]
    assert sorted(bag.blocks) == sorted(gathered.blocks) and bag.unmatched == gathered.unmatched == []
    assert bag.blocks["bag"].layer.diagonal_a == (rows > 1024)
    for name, (a, g) in gathered_first.items():
        torch.testing.assert_close(bag_first[name][0], a, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(bag_first[name][1], g, rtol=1e-5, atol=1e-10)
    assert bag_losses == pytest.approx(gathered_losses, rel=1e-3)
    assert bag_losses[-1] < 0.9 * bag_losses[0] and all(math.isfinite(loss) for loss in bag_losses)


def test_the_preconditioner_solves_a_bags_table():
    cm = _compiled(Bag)
    model = cm.module
    precond = kronograph.optim.KFACPreconditioner(cm, damping=0.03, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    assert "bag" in precond.blocks and precond.blocks["bag"].layer.diagonal_a
    losses = []
    for x, y in _batches(count=30):
        optimizer.zero_grad()
        with precond.track():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        assert precond.step()["preconditioned"] == 3  # the table's block among them
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses


class OffsetBag(nn.Module):
    """A bag of flat words cut by offsets, weighted per word (mode "sum")."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(ROWS, WIDTH, mode="sum")
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, words: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bag(words, offsets, per_sample_weights=weights)))


def _offset_batches(count: int) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """Bags of 0-5 words of their class (8 words a class), cut by offsets, weighted at random."""
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(count):
        labels = torch.randint(0, CLASSES, (64,), generator=generator)
        sizes = torch.randint(0, 6, (64,), generator=generator)
        words = torch.cat([label * 8 + torch.randint(0, 8, (int(n),), generator=generator)
                           for label, n in zip(labels, sizes)])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
        batches.append(((words, offsets, torch.rand(words.shape, generator=generator)), labels))
    return batches


def test_bags_cut_by_offsets_keep_their_table_unmatched_and_kfac_names_the_layout_it_needs():
    """Flat words cut by offsets give each example its own number of token rows, which the statistics cannot
    split into examples: the table stays outside every block (the preconditioner's loop trains it on its .grad),
    and KFAC, which slices every input into sub-batches, names the 2-D layout it needs."""
    torch.manual_seed(0)
    batches = _offset_batches(30)
    model = OffsetBag()
    cm = kronograph.compile(model, batches[0][0], loss="cross_entropy")
    assert cm.plan.tables == () and "bag.weight" in cm.unmatched
    with pytest.warns(CoverageWarning, match="bag.weight"):
        opt = kronograph.optim.KFAC(cm, seed=0)
    with pytest.raises(kronograph.KronographError, match=r"inputs with \d+, 64, \d+ rows along dim 0.*2-D tensor"):
        opt.step(*batches[0])
    precond = kronograph.optim.KFACPreconditioner(cm, damping=0.03, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    losses = []
    for inputs, labels in batches:
        optimizer.zero_grad()
        with precond.track(batch_size=len(labels)):  # (the first input holds words, not bags)
            loss = F.cross_entropy(model(*inputs), labels)
            loss.backward()
        assert precond.step()["preconditioned"] == 1  # the head
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
