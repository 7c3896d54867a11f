"""kronograph.optim.KFAC data-parallel: two CPU processes (gloo), each stepping on its slice of every batch.

One spawn runs every scenario (process start-up and compile dominate the time) and saves what each rank ends
with; the tests compare the ranks with each other and with a single process stepping on the full batches.
The ranks all-reduce the gradient, the factors, the quadratic model's Fisher products and the loss after the
step, and draw subsets and sampled targets for the global batch from one shared generator, so the distributed
run must be the single-process run, to float32 rounding, whatever the slices. The inverse work is split: each
rank runs ``factored_inverses`` (counted by a wrapper in each process) for its own layers only, the assignment
``data_parallel.assign_inverses`` deals out, and one all_gather of the owners' triangles gives every rank every
layer's inverses, the same bits on every rank.
"""

from __future__ import annotations

import collections
import copy
import math
import random
import warnings
from unittest import mock

import pytest
import torch
from torch import nn

import kronograph
from kronograph.runtime import curvature as curvature_module
from kronograph.runtime.data_parallel import (
    BatchSlice,
    assign_inverses,
    inverse_cost,
    inverse_owners,
    invert_across_ranks,
    rank_loads,
)
from kronograph.runtime.inverse import InverseWarning, UntrustedModelWarning
from kronograph.runtime.losses import LOSSES

from factories import curvature_with_random_factors, teacher_problem
from ranks import on_one_thread, refusal, run_on_ranks

WORLD, STEPS, BATCH, FEATURES, CLASSES = 2, 10, 32, 6, 3

#: scenario -> (KFAC arguments, the ranks' slices of each batch of BATCH examples, loss). (27, 5): the second
#: rank often has no example of the paper's tau_1 subset (4 of 32) or tau_2 subset (8 of 32).
#: Gathered batches (``batches_per_step``) hold the examples in another order on the ranks than in one process
#: (each rank's slices of the batches, one after the other), so their sub-batches differ: one batch a step here.
ONE_BATCH_A_STEP = {"batches_per_step": 1}
SCENARIOS: dict[str, tuple[dict, tuple[int, ...], str]] = {
    "paper": (dict(preset="paper", seed=0), (16, 16), "cross_entropy"),
    "default": (dict(seed=0), (16, 16), "cross_entropy"),
    "paper_unequal": (dict(preset="paper", seed=0), (27, 5), "cross_entropy"),
    "default_unequal": (dict(seed=0), (20, 12), "cross_entropy"),
    # factors wider than 4 inverted in blocks, whose batch factors form those blocks alone (factors.batch_factors)
    "default_blocks": (dict(seed=0, max_factor_dim=4), (16, 16), "cross_entropy"),
    # rank 0's 17 rows are 16 of the first half and 1 of the second: a one-example piece (no batch norm here)
    "default_one_row_piece": (dict(seed=0), (17, 15), "cross_entropy"),
    # steps shortened to the largest logit change over both ranks' rows (one all_reduce of their maxima)
    "default_logit_bound": (dict(seed=0, max_logit_change=1e-3), (27, 5), "cross_entropy"),
    "empirical": (dict(preset="paper", fisher="empirical", seed=0), (16, 16), "cross_entropy"),
    "weight_decay": (dict(preset="paper", weight_decay=1e-3, seed=0), (16, 16), "cross_entropy"),
    "mse": (dict(preset="paper", damping=1.0, seed=0), (27, 5), "mse"),
    # judged untrusted after 3 steps (any median rho is below 10): Adam's steps on the all-reduced gradient after them
    "default_untrusted": (dict(seed=0, untrusted_rho=10.0, untrusted_steps=3, untrusted_adam_lr=0.01), (20, 12),
                          "cross_entropy"),
    # the same with SGD's steps (Nesterov momentum), as a batch-norm net's untrusted_fallback would take
    "default_untrusted_sgd": (dict(seed=0, untrusted_rho=10.0, untrusted_steps=3, untrusted_fallback="sgd",
                                   untrusted_sgd_lr=0.05), (20, 12), "cross_entropy"),
}


def problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The same MLP and batches on every process: inputs, a random teacher's labels and its outputs."""
    return teacher_problem(STEPS, BATCH, FEATURES, CLASSES)


def run_all(rank: int = 0, world: int = 1) -> dict[str, dict]:
    """Every scenario from the same weights on this rank's slice of every batch (world 1: the full batches);
    one compile for all. Each scenario's ``inverted`` counts this process's ``factored_inverses`` calls per layer."""
    counts: collections.Counter = collections.Counter()
    original = curvature_module.factored_inverses

    def counted(*args, name: str = "", **kwargs):
        counts[name] += 1
        return original(*args, name=name, **kwargs)

    with mock.patch.object(curvature_module, "factored_inverses", counted):
        return scenarios(rank, world, counts)


def scenarios(rank: int, world: int, counts: collections.Counter) -> dict[str, dict]:
    model, batches = problem()
    initial = copy.deepcopy(model.state_dict())
    cm = kronograph.compile(model, (batches[0][0][:2],), loss="cross_entropy")
    results = {}
    for name, (settings, slices, loss) in SCENARIOS.items():
        model.load_state_dict(initial)
        compiled = copy.copy(cm)
        compiled.loss = loss
        opt = kronograph.optim.KFAC(compiled, **{**ONE_BATCH_A_STEP, **settings})
        infos = []
        for x, labels, outputs in batches:
            y = labels if loss == "cross_entropy" else outputs
            if world > 1:
                start = sum(slices[:rank])
                x, y = x[start:start + slices[rank]], y[start:start + slices[rank]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UntrustedModelWarning)  # (the untrusted scenario's, asked for)
                info = opt.step(x, y)
            assert "skipped" not in info, info
            infos.append({key: info[key] for key in ("loss", "alpha", "mu", "damping", "rho", "signal", "logit_change",
                                                     "adam", "sgd") if key in info})
        results[name] = {"params": copy.deepcopy(model.state_dict()), "infos": infos,
                         "factors": {layer: block.a.clone() for layer, block in opt.blocks.items()},
                         "inverses": {layer: (block.inverses.a_inv.clone(), block.inverses.g_inv.clone(),
                                              block.inverses.pi.clone()) for layer, block in opt.blocks.items()},
                         "inverted": dict(counts), "owners": opt.inverse_owners}
        counts.clear()
    if world > 1:  # no seed: rank 0's is broadcast, so the ranks draw the same subsets and targets
        model.load_state_dict(initial)
        torch.manual_seed(1000 + rank)
        opt = kronograph.optim.KFAC(cm, preset="paper")
        for x, y, _ in batches[:3]:
            opt.step(x.chunk(world)[rank], y.chunk(world)[rank])
        results["unseeded"] = {"params": copy.deepcopy(model.state_dict()), "seed": opt.generator.initial_seed()}
        on_onnxruntime = copy.copy(cm)
        on_onnxruntime.engine = "onnxruntime"  # as compile(model, ..., engine="onnxruntime") makes it
        results["refused"] = [refusal(lambda: kronograph.optim.KFAC(on_onnxruntime)),
                              refusal(lambda: kronograph.optim.KFAC(cm, structure="tridiagonal"))]
        results["failure"] = failed_inversion(cm.layers, world)
        results["branch"] = branch_on_one_rank(rank, world)
        results["dropout"] = dropout_net(rank, world)
        results["conv_rows"] = conv_rows(rank, world)
    results["gathered"] = gathered_run(model, cm, initial, batches, rank, world)
    results["embedding"] = embedding_blocks(rank, world)
    results["table"] = embedding_blocks(rank, world, rows=1100)
    results["tied"] = tied_table(rank, world)
    results["tied, diagonal G"] = tied_table(rank, world, diagonal_output_g=4)  # the head's 12-wide G as a diagonal
    results["normed"] = normed(rank, world)
    results["spectral"] = normed(rank, world, spectral=True)
    results["wide_head"] = wide_head(rank, world)
    results["layer_norm"] = layer_norm(rank, world)
    return results


def layer_norm(rank: int, world: int) -> dict:
    """KFAC (default preset) with a layer norm, whose affine lies outside every block: its diagonal Fisher from the
    ranks' statistics gradients pooled (one all_reduce), so the run is the single process's on the whole batches."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, CLASSES))
    inputs = torch.randn(STEPS, BATCH, 6)
    labels = (inputs[..., 0] > 0).long() + (inputs[..., 1] > 0).long()  # learnable
    opt, result = kfac_on_halves(model, inputs, labels, rank, world)
    fisher = {name: t.clone() for name, t in opt.unmatched_fisher.items()}
    return {**result, "unmatched": opt.unmatched, "fisher": fisher}


def wide_head(rank: int, world: int) -> dict:
    """KFAC (default preset) on a 1100-class head, wider than diagonal_output_g: its diagonal G is all-reduced and
    its inverse exchanged as a vector, so each rank's half of every batch gives the single process's run. The
    empirical Fisher: over 1100 near-equal probabilities a sampled target flips to its neighbour class with the
    logits' float32 rounding (the ranks' halves against the whole batch), which the comparison would not survive."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1100))
    inputs = torch.randn(STEPS, BATCH, 6)
    labels = (inputs[..., :4] > 0).long() @ torch.tensor([1, 2, 4, 8])  # 16 of the classes, learnable
    opt, result = kfac_on_halves(model, inputs, labels, rank, world, fisher="empirical")
    return {**result, "diagonal_g": sorted(name for name, block in opt.blocks.items() if block.layer.diagonal_g)}


def normed(rank: int, world: int, spectral: bool = False) -> dict:
    """KFAC (default preset) on weight-normed layers (runtime/weight_norm.py; with ``spectral``, spectrally normed
    ones: runtime/spectral_norm.py, every rank's power iteration on the same W_o and vectors), each rank its half of
    every batch: the summed gradients are pushed to W on every rank alike and the factors all-reduced like any
    layer's, so the run is the single process's on the whole batches."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    norm = spectral_norm if spectral else weight_norm
    torch.manual_seed(5)
    model = nn.Sequential(norm(nn.Linear(6, 8)), nn.Tanh(), norm(nn.Linear(8, CLASSES)))
    inputs = torch.randn(STEPS, BATCH, 6)
    labels = (inputs[..., 0] > 0).long() + (inputs[..., 1] > 0).long()  # learnable
    opt, result = kfac_on_halves(model, inputs, labels % CLASSES, rank, world)
    return {**result, "blocks": sorted(opt.blocks), "unmatched": opt.unmatched}


class TiedTable(nn.Module):
    """An embedding table that is also the output layer's weight (runtime/tied.py)."""

    def __init__(self, rows: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, 5)
        self.mix = nn.Linear(5, 5)
        self.out = nn.Linear(5, rows)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(tokens))))


def tied_table(rank: int, world: int, **options) -> dict:
    """KFAC (default preset, ``options``) on a tied table, each rank its half of every batch: the views' factors are
    all-reduced like any layer's and every rank inverts the tie, so the run is the single process's on the whole
    batches."""
    torch.manual_seed(4)
    model = TiedTable()
    tokens = torch.randint(0, 12, (STEPS, BATCH, 4))
    targets = (tokens + 1) % 12  # the next row: learnable through the tie
    opt, result = kfac_on_halves(model, tokens, targets, rank, world, **options)
    return {**result, "blocks": sorted(opt.blocks),
            "diagonal_g": sorted(name for name, block in opt.blocks.items() if block.layer.diagonal_g)}


def gathered_run(model: nn.Module, cm, initial: dict, batches, rank: int, world: int) -> dict:
    """KFAC gathering two batches a step on this rank's share of every batch: each call's loss, and the weights."""
    model.load_state_dict(initial)
    opt = kronograph.optim.KFAC(cm, seed=0, batches_per_step=2)
    infos = [{"loss": opt.step(x.chunk(world)[rank], y.chunk(world)[rank])["loss"]} for x, y, _ in batches[:4]]
    return {"infos": infos, "params": copy.deepcopy(model.state_dict())}


def kfac_on_halves(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, rank: int, world: int,
                   **options) -> tuple[kronograph.optim.KFAC, dict]:
    """KFAC (default preset, seed 0, ``options``) on this rank's share of every batch: the optimizer, and the
    weights and losses it ends with."""
    cm = kronograph.compile(model, (inputs[0][:2],), loss="cross_entropy")
    opt = kronograph.optim.KFAC(cm, seed=0, **{**ONE_BATCH_A_STEP, **options})
    infos = []
    for x, y in zip(inputs, targets):
        info = opt.step(x.chunk(world)[rank], y.chunk(world)[rank])
        assert "skipped" not in info, info
        infos.append({"loss": info["loss"]})
    return opt, {"params": copy.deepcopy(model.state_dict()), "infos": infos}


def embedding_blocks(rank: int, world: int, rows: int = 12) -> dict:
    """KFAC (default preset) on a model whose nn.Embedding (with a padding row) is a Kronecker block: its one-hot
    rows fold into the all-reduced factors like any linear layer's, so each rank's half of every batch gives the
    single process's run on the whole batches. ``rows`` above 1024: a table, whose diagonal A is all-reduced and
    its inverse exchanged as a vector."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(rows, 5, padding_idx=0), nn.Tanh(), nn.Flatten(), nn.Linear(20, CLASSES))
    tokens = torch.randint(0, min(rows, 40), (STEPS, BATCH, 4))  # rows that recur (a table's 1100 are seen once)
    labels = tokens[..., 0] % CLASSES  # learnable from the first position's row
    opt, result = kfac_on_halves(model, tokens, labels, rank, world)
    return {**result, "kinds": sorted(opt.blocks[name].layer.kind for name in opt.blocks)}


def dropout_net(rank: int, world: int) -> dict:
    """KFAC (default preset) on an MLP with dropout, each rank its half of every batch: h after each step is
    measured on this rank's pieces with the gradient passes' masks replayed, then summed across the ranks (one
    all_reduce on every rank, whatever its pieces), so the run ends and the ranks agree."""
    _, batches = problem()
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, CLASSES))
    opt = kronograph.optim.KFAC(kronograph.compile(model, (batches[0][0][:2],), loss="cross_entropy"), seed=0)
    rhos = []
    for x, labels, _ in batches:
        info = opt.step(x.chunk(world)[rank], labels.chunk(world)[rank])
        assert "skipped" not in info, info
        rhos.append(info["rho"])
    return {"params": copy.deepcopy(model.state_dict()), "rhos": rhos, "rejected": opt.rejected}


def conv_rows(rank: int, world: int) -> dict:
    """KFAC (default preset) on a small conv net whose conv has 36 patch rows an example, A from at most 24 of a
    rank's rows: each rank draws its own rows (its own generator), the factors are averaged as ever, so the
    ranks agree on everything and no collective waits on a draw."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(144, CLASSES))
    x = torch.randn(STEPS, BATCH, 1, 6, 6, generator=torch.Generator().manual_seed(6))
    labels = (x[:, :, 0, :3].sum((2, 3)) > 0).long()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[0][:2],), loss="cross_entropy"), seed=0,
                                activation_rows=24)
    losses = []
    for inputs, y in zip(x, labels):
        info = opt.step(inputs.chunk(world)[rank], y.chunk(world)[rank])
        assert "skipped" not in info, info
        losses.append(info["loss"])
    return {"params": copy.deepcopy(model.state_dict()), "losses": losses, "a": opt.blocks["0"].a.clone(),
            "rows_drawn": opt.row_generator.get_state()}


class Branching(nn.Module):
    """An MLP whose middle layer is called only while ``use_middle`` holds (compiled with it on, so the layer is in
    the plan; rank 1 then turns it off: it has no gradient and no statistics for that layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.middle, self.last = nn.Linear(FEATURES, 16), nn.Linear(16, 16), nn.Linear(16, CLASSES)
        self.use_middle = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if self.use_middle:
            h = torch.tanh(self.middle(h))
        return self.last(h)


def branch_on_one_rank(rank: int, world: int) -> dict:
    """KFAC (default preset) where one rank's forward skips a layer: every collective still matches (that rank
    sends zeros for the layer's gradient and m = 0 for its statistics), so the run ends, the ranks agree, and the
    layer trains on the other rank's rows."""
    _, batches = problem()
    torch.manual_seed(2)
    model = Branching()
    before = model.middle.weight.detach().clone()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (batches[0][0][:2],), loss="cross_entropy"), seed=0)
    model.use_middle = rank == 0
    for x, labels, _ in batches:
        info = opt.step(x.chunk(world)[rank], labels.chunk(world)[rank])
        assert "skipped" not in info, info
    return {"params": copy.deepcopy(model.state_dict()), "moved": float((model.middle.weight - before).abs().max()),
            "estimated": [block.layer.name for block in opt.blocks.values() if block.estimated]}


def failed_inversion(layers, world: int) -> dict:
    """``invert_across_ranks`` on factors made the same on every rank, then again with one layer's A poisoned
    (NaN): what each rank gets, the local one-process inverses to compare with, and the warnings raised here."""
    owners = inverse_owners(layers, world)
    curvature = curvature_with_random_factors(layers)
    local = {name: (r.a_inv.clone(), r.g_inv.clone(), r.pi.clone()) for name, r in curvature.invert(0.1).items()}
    first = invert_across_ranks(curvature, 0.1, owners, torch.distributed.group.WORLD)
    curvature.adopt(first)
    poisoned = max(owners, key=owners.get)  # a layer of the last rank's
    curvature.blocks[poisoned].a = torch.full_like(curvature.blocks[poisoned].a, float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = invert_across_ranks(curvature, 0.2, owners, torch.distributed.group.WORLD)
    return {"owners": owners, "poisoned": poisoned, "local": local,
            "first": {name: (r.a_inv, r.g_inv, r.pi, r.failed) for name, r in first.items()},
            "second": {name: (r.a_inv, r.g_inv, r.pi, r.failed) for name, r in second.items()},
            "warnings": [str(w.message) for w in caught if issubclass(w.category, InverseWarning)]}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(run_all, WORLD, tmp_path_factory.mktemp("kfac_ddp"))


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict]:
    """Every scenario on the full batches in one process (torch.distributed not initialised)."""
    return on_one_thread(run_all)


@pytest.mark.parametrize("name", [*SCENARIOS, "unseeded"])
def test_ranks_hold_identical_parameters(ranks, name):
    first, second = (r[name] for r in ranks)
    for key in first["params"]:
        assert torch.equal(first["params"][key], second["params"][key]), key
    for layer in first.get("factors", {}):
        assert torch.equal(first["factors"][layer], second["factors"][layer]), layer
    assert first.get("seed") == second.get("seed")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_distributed_run_equals_the_single_process_run_on_full_batches(ranks, single_process, name):
    distributed, single = ranks[0][name], single_process[name]
    for key, value in single["params"].items():  # float32 rounding, grown by 10 steps of a tiny damping
        error = (distributed["params"][key] - value).abs().max() / value.abs().max()
        assert error < 2e-5, (key, float(error))
    assert len(distributed["infos"]) == len(single["infos"])
    for step, (mine, theirs) in enumerate(zip(distributed["infos"], single["infos"])):
        assert set(mine) == set(theirs), step
        for key, value in theirs.items():  # rho: a difference of two losses over M(delta), rounding grown most;
            # mu: the 2 x 2 model's solve, as far (1.4e-4 at step 7 of "paper" on an AVX-512 machine's MKL)
            loose = key in ("rho", "mu")
            assert mine[key] == pytest.approx(value, rel=1e-3 if loose else 1e-4, abs=1e-6), (step, key)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_layer_is_inverted_by_its_owner_only(ranks, single_process, name):
    owners = ranks[0][name]["owners"]
    layers = set(single_process[name]["inverted"])
    assert owners == ranks[1][name]["owners"] and set(owners) == layers == {"0", "2", "4"}
    assert owners == {"2": 0, "4": 1, "0": 1}  # costs 9009, 4940, 4439: the largest to rank 0, the others to 1
    rounds = set(single_process[name]["inverted"].values())  # one process inverts every layer every round
    assert len(rounds) == 1 and rounds.pop() > 1
    covered = set()
    for rank, result in enumerate(ranks):
        mine = {layer for layer, owner in owners.items() if owner == rank}
        assert mine and set(result[name]["inverted"]) == mine, (rank, result[name]["inverted"])
        for layer in mine:  # as often as one process inverts it: every round, on its owner alone
            assert result[name]["inverted"][layer] == single_process[name]["inverted"][layer], (rank, layer)
        covered |= mine
    assert covered == layers


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_hold_identical_inverses(ranks, single_process, name):
    first, second = (r[name]["inverses"] for r in ranks)
    assert set(first) == set(second) == set(single_process[name]["inverses"])
    for layer in first:
        for mine, theirs in zip(first[layer], second[layer]):
            assert torch.equal(mine, theirs) and mine.view(torch.int32).equal(theirs.view(torch.int32)), layer
        for mine, theirs in zip(first[layer], single_process[name]["inverses"][layer]):
            assert torch.allclose(mine, theirs, rtol=1e-3, atol=1e-5), layer


def test_a_failed_inversion_keeps_the_previous_inverse_on_every_rank_and_warns_on_its_owner(ranks):
    results = [r["failure"] for r in ranks]
    owners, poisoned = results[0]["owners"], results[0]["poisoned"]
    for result in results:
        for layer, (a_inv, g_inv, pi, failed) in result["first"].items():  # the owner's, as one process makes it
            local = result["local"][layer]
            assert torch.equal(a_inv, local[0]) and torch.equal(g_inv, local[1]) and torch.equal(pi, local[2])
            assert not failed.any()
        for layer, (a_inv, g_inv, pi, failed) in result["second"].items():
            assert failed.tolist() == [layer == poisoned], layer
            if layer == poisoned:  # kept the previous pair and pi, on every rank
                previous = result["first"][layer]
                assert torch.equal(a_inv, previous[0]) and torch.equal(g_inv, previous[1])
                assert torch.equal(pi, previous[2])
    for layer in results[0]["second"]:
        for mine, theirs in zip(results[0]["second"][layer], results[1]["second"][layer]):
            assert torch.equal(mine, theirs), layer
    for rank, result in enumerate(results):
        expected = 1 if owners[poisoned] == rank else 0
        assert len(result["warnings"]) == expected, (rank, result["warnings"])
        assert all(f"block {poisoned}" in message for message in result["warnings"])


def test_inverse_assignment_greedy_by_cost():
    # costs in plan order; the largest first, each to the least-loaded rank, ties to the lowest rank / plan order
    assert assign_inverses([4439, 9009, 4940], 2) == [1, 0, 1]
    assert assign_inverses([5, 5, 5, 5], 2) == [0, 1, 0, 1]
    assert assign_inverses([1, 8, 3, 3, 2], 3) == [2, 0, 1, 2, 1]
    assert assign_inverses([7, 7], 4) == [0, 1]  # more ranks than layers: the others own nothing
    assert assign_inverses([3, 1, 2], 1) == [0, 0, 0]
    assert assign_inverses([], 2) == []
    assert inverse_cost(2, 3, 4) == 2 * (27 + 64)
    assert inverse_cost(1, 3137, 10, max_dim=1024) == 3 * 785 ** 3 + 782 ** 3 + 10 ** 3  # A in four blocks
    assert inverse_cost(1, 256, 2048, max_dim=1024, diagonal_g=True) == 256 ** 3 + 2048  # a wide head's G
    rng = random.Random(0)
    for world in (2, 3, 4, 8, 16):
        costs = [inverse_cost(rng.choice([1, 1, 2]), rng.randint(2, 2000), rng.randint(2, 1000)) for _ in range(60)]
        owners = assign_inverses(costs, world)
        assert owners == assign_inverses(list(costs), world)  # deterministic
        loads = rank_loads(costs, owners, world)
        assert sum(loads) == sum(costs)
        assert max(loads) - min(loads) <= max(costs)  # greedy list scheduling's bound
        assert max(loads) <= sum(costs) / world + max(costs)


def test_what_is_not_distributed_yet_is_refused_clearly(ranks):
    for r in ranks:
        onnxruntime, tridiagonal = r["refused"]
        assert "torch engine only" in onnxruntime and "onnxruntime" in onnxruntime
        assert "tridiagonal" in tridiagonal


def test_a_layer_one_rank_never_calls_hangs_nobody_and_trains_on_the_others_rows(ranks):
    first, second = (r["branch"] for r in ranks)
    for key, value in first["params"].items():
        assert torch.equal(second["params"][key], value), key
    assert first["moved"] == second["moved"] > 0
    assert first["estimated"] == second["estimated"] == ["first", "middle", "last"]


def test_the_runs_train(single_process):
    for name, result in single_process.items():
        losses = [info["loss"] for info in result["infos"]]
        assert losses[-1] < losses[0], (name, losses)


@pytest.mark.parametrize("scenario, fallback", [("default_untrusted", "adam"), ("default_untrusted_sgd", "sgd")])
def test_an_untrusted_start_turns_every_rank_to_the_fallback_at_the_same_step(ranks, single_process, scenario,
                                                                              fallback):
    """The judgement reads rho of the global batch, so both ranks and the single process switch after the same
    step (the infos' equality above holds the rest)."""
    switched = [[bool(info.get(fallback)) for info in run[scenario]["infos"]]
                for run in (*ranks, single_process)]
    assert switched[0] == switched[1] == switched[2] and 0 < sum(switched[0]) < STEPS, switched


def test_the_logit_bound_shortens_the_data_parallel_steps(ranks):
    """The scenario's bound is met, not idle: some of its steps report the bound as their largest change (1)."""
    infos = ranks[0]["default_logit_bound"]["infos"]
    assert any(info.get("logit_change") == pytest.approx(1.0) for info in infos), infos


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_targets_from_the_whole_subsets_noise_are_the_single_process_draws(loss):
    """On the CPU generator, noise drawn alone makes the targets sample_targets draws, bit for bit."""
    fn = LOSSES[loss]
    outputs = torch.randn(12, 5, 4) * 3
    expected = fn.sample_targets(outputs, torch.Generator().manual_seed(3))
    noise = fn.sampling_noise(outputs.shape, outputs.dtype, torch.Generator().manual_seed(3))
    assert torch.equal(fn.targets_from_noise(outputs, noise), expected)
    # the rows of a sub-batch's noise make those rows' targets (a rank's members of the subset)
    rows = torch.tensor([1, 4, 5, 11])
    assert torch.equal(fn.targets_from_noise(outputs[rows], noise[rows]), expected[rows])


def one_rank_fails(rank: int, world: int) -> None:
    """Rank 1 steps on a batch whose labels do not fit the model (KFAC raises before its first collective);
    rank 0 steps on a good batch and waits in the gradient's all_reduce for a peer that is gone."""
    model, batches = problem()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (batches[0][0][:2],), loss="cross_entropy"), seed=0)
    x, labels, _ = batches[0]
    x, labels = x.chunk(world)[rank], labels.chunk(world)[rank]
    opt.step(x, labels + CLASSES if rank == 1 else labels)


def test_an_exception_on_one_rank_ends_the_python_api_run_with_that_error_instead_of_a_hang(tmp_path):
    """The peer's exit breaks rank 0's collective at once (gloo: connection closed), well before the group's
    60 s timeout (tests/ranks.py), and the launcher reports the failing rank's own error."""
    import time

    from torch.multiprocessing import ProcessRaisedException

    start = time.monotonic()
    with pytest.raises(ProcessRaisedException, match="KronographError"):
        run_on_ranks(one_rank_fails, WORLD, tmp_path)
    assert time.monotonic() - start < 40


def test_a_gathering_call_reports_the_global_batchs_loss(ranks, single_process):
    """Gathering two batches a step data-parallel, a call that holds its batch reports the loss of the global batch
    (the ranks' means weighted by their shares, one all_reduce), as one process does on the whole batch; the ranks
    report and step alike."""
    first, second, single = ranks[0]["gathered"], ranks[1]["gathered"], single_process["gathered"]
    assert first["infos"] == second["infos"]
    assert first["infos"][0]["loss"] == pytest.approx(single["infos"][0]["loss"], rel=1e-6)
    assert first["infos"][2] != first["infos"][0]  # (the step between moved the weights)
    for key, value in first["params"].items():
        assert torch.equal(value, second["params"][key]), key


@pytest.mark.parametrize("name", ["embedding", "table"])
def test_an_embedding_block_trains_data_parallel_as_in_one_process(ranks, single_process, name):
    first, second = (r[name] for r in ranks)
    assert first["kinds"] == ["embedding", "linear"]
    assert_the_single_process_weights(first, second, single_process[name])
    assert torch.equal(first["params"]["0.weight"][0], torch.zeros(5))  # the padding row never moves


@pytest.mark.parametrize("name", ["tied", "tied, diagonal G"])
def test_a_tied_table_trains_data_parallel_as_in_one_process(ranks, single_process, name):
    first, second = (r[name] for r in ranks)
    assert first["blocks"] == ["emb[embedding]", "emb[output]", "mix"]
    assert first["diagonal_g"] == (["emb[output]"] if "diagonal" in name else [])
    assert_the_single_process_weights(first, second, single_process[name])


def test_a_wide_heads_diagonal_g_trains_data_parallel_as_in_one_process(ranks, single_process):
    first, second = (r["wide_head"] for r in ranks)
    assert first["diagonal_g"] == ["2"]
    assert first["infos"][-1]["loss"] < first["infos"][0]["loss"]
    assert_the_single_process_weights(first, second, single_process["wide_head"])


def test_weight_normed_layers_train_data_parallel_as_in_one_process(ranks, single_process):
    first, second = (r["normed"] for r in ranks)
    assert first["blocks"] == ["0", "2"] and first["unmatched"] == []
    # torch._weight_norm has no forward mode: the quadratic model's products are central differences, whose quotient
    # carries float32's rounding of each batching's outputs divided by the step (~1e-4 of alpha)
    assert_the_single_process_weights(first, second, single_process["normed"], tolerance=1e-3)


def test_spectrally_normed_layers_train_data_parallel_as_in_one_process(ranks, single_process):
    first, second = (r["spectral"] for r in ranks)
    assert first["blocks"] == ["0", "2"] and first["unmatched"] == []
    assert first["infos"][-1]["loss"] < first["infos"][0]["loss"]
    assert_the_single_process_weights(first, second, single_process["spectral"], tolerance=1e-3)


def test_a_layer_norms_diagonal_fisher_is_the_single_processs_data_parallel(ranks, single_process):
    first, second = (r["layer_norm"] for r in ranks)
    assert first["unmatched"] == ["1.weight", "1.bias"]
    single = single_process["layer_norm"]["fisher"]
    assert sorted(single) == sorted(first["fisher"]) == ["1.bias", "1.weight"]
    for name, value in single.items():
        assert torch.equal(first["fisher"][name], second["fisher"][name]), name
        torch.testing.assert_close(first["fisher"][name], value, rtol=1e-4, atol=1e-9)
    assert first["infos"][-1]["loss"] < first["infos"][0]["loss"]
    assert_the_single_process_weights(first, second, single_process["layer_norm"])


def assert_the_single_process_weights(first: dict, second: dict, single: dict, tolerance: float = 2e-5) -> None:
    """Both ranks hold the same weights bit for bit, the single process's to float32 rounding."""
    for key, value in single["params"].items():
        assert torch.equal(first["params"][key], second["params"][key]), key
        error = (first["params"][key] - value).abs().max() / value.abs().max()
        assert error < tolerance, (key, float(error))


def test_a_dropout_net_trains_data_parallel_with_h_after_each_step_on_its_own_masks(ranks):
    """Every rank ends the run, holds the same weights and the same rho (h before and after each step summed
    over the ranks, each rank's part measured with its passes' dropout masks); no step is undone for the masks."""
    first, second = (r["dropout"] for r in ranks)
    for name, value in first["params"].items():
        assert torch.equal(value, second["params"][name]), name
    assert first["rhos"] == second["rhos"] and all(math.isfinite(rho) for rho in first["rhos"])
    assert first["rejected"] == second["rejected"] == 0


def test_a_conv_net_with_a_from_a_subset_of_its_rows_trains_data_parallel(ranks):
    """Each rank draws its own rows (different generators' states at the end), the averaged A and the weights
    are the same on both ranks, and the loss falls."""
    first, second = (r["conv_rows"] for r in ranks)
    assert not torch.equal(first["rows_drawn"], second["rows_drawn"])
    assert torch.equal(first["a"], second["a"])
    for name, value in first["params"].items():
        assert torch.equal(value, second["params"][name]), name
    assert first["losses"] == second["losses"] and first["losses"][-1] < first["losses"][0]


@pytest.mark.parametrize(("counts", "batch_norm", "pieces"), [
    ((1, 1), False, [(1, 0), (0, 1)]),  # two ranks of one example: one half each
    ((3,), False, [(1, 2)]),
    ((1,), False, [None]),  # one example: no halves
    ((1, 1), True, [None, None]),  # batch norm: halves of eight examples at least
    ((4, 4), True, [None, None]),
    ((8, 8), True, [(8, 0), (0, 8)]),
    ((9, 8), True, [None, None]),  # rank 0 would pass a piece of one example of the second half
    ((12, 12), True, [(12, 0), (0, 12)]),
    ((14, 10), True, [None, None]),  # rank 0's piece of the second half: two examples
])
def test_the_global_batchs_halves_as_each_rank_passes_them(counts, batch_norm, pieces):
    """``BatchSlice.halves``: this rank's rows of the global batch's first N // 2 examples and of the rest, the
    single process's split; batches of 2 and 3 examples are halved unless batch norm normalises the halves."""
    for rank, expected in enumerate(pieces):
        assert BatchSlice(None, counts, rank, torch.device("cpu")).halves(batch_norm) == expected
