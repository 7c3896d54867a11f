"""KFACPreconditioner in the README's DDP-ready loop: two CPU processes (gloo), a small MLP in
DistributedDataParallel, each rank taking half of every batch.

One spawn runs every distributed scenario (process start-up and compile dominate the time) and saves what
each rank ends with; the tests compare the ranks with each other and with a single process on the full
batches. DDP averages the ranks' gradients of their half-batch mean losses, which is the full batch's
gradient, and the preconditioner averages the halves' factors, which are the full batch's factors: the
distributed run must be the single-process run, to float32 rounding.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import kronograph
from kronograph.runtime import blocks as blocks_module
from kronograph.runtime import curvature as curvature_module
from kronograph.runtime.data_parallel import inverse_owners
from kronograph.runtime.distributed import average_statistics
from kronograph.runtime.inverse import StatisticsWarning

from factories import teacher_classification
from ranks import on_one_thread, preconditioned_loop, refusal, run_on_ranks

WORLD, STEPS, BATCH, FEATURES, CLASSES = 2, 8, 32, 6, 3
SETTINGS = dict(damping=0.03, inverse_every=3, seed=0)


@contextlib.contextmanager
def counted_inversions() -> Iterator[collections.Counter]:
    """Counts this process's ``factored_inverses`` calls per layer (a single process inverts through the blocks,
    data-parallel ranks through the curvature's split)."""
    counts: collections.Counter = collections.Counter()
    patches = []
    for module in (blocks_module, curvature_module):
        original = module.factored_inverses

        def counted(*args, name: str = "", original=original, **kwargs):
            counts[name] += 1
            return original(*args, name=name, **kwargs)

        patches.append(mock.patch.object(module, "factored_inverses", counted))
    with patches[0], patches[1]:
        yield counts


def run_ranks(rank: int, world: int) -> dict:
    """Every distributed scenario on this rank (tests/ranks.py spawns the processes)."""
    model, batches = teacher_classification(STEPS, BATCH, FEATURES, CLASSES)
    initial = copy.deepcopy(model.state_dict())
    cm = kronograph.compile(model, (batches[0][0][:2],))  # the unwrapped module
    ddp = DistributedDataParallel(model)
    results: dict = {}
    for fisher in ("empirical", "mc"):
        model.load_state_dict(initial)
        precond = kronograph.optim.KFACPreconditioner(cm, fisher=fisher, **SETTINGS)
        with counted_inversions() as counts:
            losses = preconditioned_loop(model, ddp, precond, batches, rank, world)
        results[fisher] = {"params": copy.deepcopy(model.state_dict()), "losses": losses,
                           "factors": {name: block.a.clone() for name, block in precond.blocks.items()},
                           "inverses": {name: (block.inverses.a_inv.clone(), block.inverses.g_inv.clone())
                                        for name, block in precond.blocks.items()},
                           "inverted": dict(counts)}

    # each layer's inverses on its owner alone, which solves the layer's gradient for every rank
    model.load_state_dict(initial)
    precond = kronograph.optim.KFACPreconditioner(cm, grad_worker_fraction=1 / world, **SETTINGS)
    losses = preconditioned_loop(model, ddp, precond, batches, rank, world)
    results["owners_alone"] = {"params": copy.deepcopy(model.state_dict()), "losses": losses,
                               "holds": sorted(name for name, block in precond.blocks.items() if block.inverses)}
    results["between"] = refusal(lambda: kronograph.optim.KFACPreconditioner(cm, grad_worker_fraction=0.75))

    # the factors all-reduced in bfloat16 (half the bytes)
    model.load_state_dict(initial)
    precond = kronograph.optim.KFACPreconditioner(cm, communication_dtype="bfloat16", **SETTINGS)
    preconditioned_loop(model, ddp, precond, batches, rank, world)
    results["bfloat16"] = {"params": copy.deepcopy(model.state_dict()),
                           "factors": {name: block.a.clone() for name, block in precond.blocks.items()}}

    # a rank's non-finite statistics: every rank rejects them, and keeps its previous factors
    precond = kronograph.optim.KFACPreconditioner(cm, fisher="mc", **SETTINGS)
    x = batches[0][0].chunk(world)[rank]
    precond.update_statistics(x)
    before = {name: block.a.clone() for name, block in precond.blocks.items()}
    with pytest.warns(StatisticsWarning):
        info = precond.update_statistics(torch.full_like(x, math.nan) if rank == 1 else x)
    kept = all(torch.equal(before[name], block.a) for name, block in precond.blocks.items())
    results["non_finite"] = {"rejected": sorted(info["rejected_statistics"]), "kept": kept}

    # a rank without statistics for a layer joins the same collective; the others' factors count
    layers = {name: block.layer for name, block in precond.blocks.items()}

    def stats(name: str, value: float, m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        layer = layers[name]
        return (torch.full((1, layer.a_dim, layer.a_dim), value), torch.ones(1, layer.g_dim, layer.g_dim), m)

    local = {"2": stats("2", 1.0, 10)} if rank == 0 else {"2": stats("2", 4.0, 30), "4": stats("4", 2.0, 5)}
    averaged = average_statistics(local, layers, None, torch.float32, torch.device("cpu"))
    results["missing"] = {name: (a[0, 0, 0].item(), g[0, 0, 0].item(), m) for name, (a, g, m) in averaged.items()}
    for fraction in (1.0, 1 / world):  # every rank inverts, or each layer's owner alone
        results[f"table {fraction}"] = table_loop(rank, world, grad_worker_fraction=fraction)
        results[f"tied {fraction}"] = tied_loop(rank, world, grad_worker_fraction=fraction)
        results[f"normed {fraction}"] = normed_loop(rank, world, grad_worker_fraction=fraction)
        results[f"spectral {fraction}"] = normed_loop(rank, world, spectral=True, grad_worker_fraction=fraction)
    return results


def normed_loop(rank: int = 0, world: int = 1, spectral: bool = False, **settings) -> dict:
    """The loop on weight-normed layers (runtime/weight_norm.py; with ``spectral``, spectrally normed ones:
    runtime/spectral_norm.py, DDP broadcasting rank 0's power-iteration vectors): v's and g's (W_o's) .grad are
    pushed to W, solved (by the layer's owner alone with grad_worker_fraction 1/W, in W's coordinates) and pulled
    back on every rank alike."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    norm = spectral_norm if spectral else weight_norm
    torch.manual_seed(7)
    model = torch.nn.Sequential(norm(torch.nn.Linear(FEATURES, 8)), torch.nn.Tanh(), norm(torch.nn.Linear(8, CLASSES)))
    inputs = torch.randn(STEPS, BATCH, FEATURES)
    batches = list(zip(inputs, (inputs[..., 0] > 0).long() % CLASSES))
    precond = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (inputs[0][:2],)), **SETTINGS, **settings)
    forward = DistributedDataParallel(model) if world > 1 else model
    losses = preconditioned_loop(model, forward, precond, batches, rank, world)
    return {"params": copy.deepcopy(model.state_dict()), "losses": losses, "blocks": sorted(precond.blocks)}


class TiedTable(torch.nn.Module):
    """An embedding table that is also the output layer's weight (one block over both uses: runtime/tied.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(CLASSES + 5, 4)
        self.mix = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, CLASSES + 5)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(tokens))))


def tied_loop(rank: int = 0, world: int = 1, **settings) -> dict:
    """The loop on a model with a tied table: every rank inverts the tie and solves its gradient."""
    torch.manual_seed(6)
    model = TiedTable()
    tokens = torch.randint(0, CLASSES + 5, (STEPS, BATCH))
    batches = list(zip(tokens, (tokens + 1) % (CLASSES + 5)))
    precond = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (tokens[0][:2],)), **SETTINGS, **settings)
    forward = DistributedDataParallel(model) if world > 1 else model
    losses = preconditioned_loop(model, forward, precond, batches, rank, world)
    return {"params": copy.deepcopy(model.state_dict()), "losses": losses, "blocks": sorted(precond.blocks)}


def table_loop(rank: int = 0, world: int = 1, **settings) -> dict:
    """The loop on a model with a table (an embedding of more than 1024 rows, a block with a diagonal A)."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Embedding(1100, 4), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(12, CLASSES))
    tokens = torch.randint(0, 1100, (STEPS, BATCH, 3))
    batches = list(zip(tokens, tokens[..., 0] % CLASSES))
    precond = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (tokens[0][:2],)), **SETTINGS, **settings)
    forward = DistributedDataParallel(model) if world > 1 else model
    losses = preconditioned_loop(model, forward, precond, batches, rank, world)
    return {"params": copy.deepcopy(model.state_dict()), "losses": losses,
            "a": precond.blocks["0"].a.clone()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(run_ranks, WORLD, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def single_process() -> dict:
    """The same loop on the full batches in one process (torch.distributed not initialised)."""
    def run() -> dict:
        model, batches = teacher_classification(STEPS, BATCH, FEATURES, CLASSES)
        precond = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (batches[0][0][:2],)), **SETTINGS)
        with counted_inversions() as counts:
            losses = preconditioned_loop(model, model, precond, batches)
        return {"params": model.state_dict(), "losses": losses, "inverted": dict(counts),
                "layers": [layer for layer in precond.compiled.layers]}

    return on_one_thread(run)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_ranks_hold_identical_factors_and_parameters(ranks, fisher):
    first, second = (r[fisher] for r in ranks)
    for name in first["factors"]:
        assert torch.equal(first["factors"][name], second["factors"][name]), name
    for name in first["params"]:
        assert torch.equal(first["params"][name], second["params"][name]), name


def test_each_layer_is_inverted_by_its_owner_only_and_the_ranks_hold_the_same_inverses(ranks, single_process):
    owners = inverse_owners(single_process["layers"], WORLD)
    assert set(owners.values()) == {0, 1}  # both ranks have work
    assert set(single_process["inverted"]) == set(owners) and min(single_process["inverted"].values()) > 1
    for rank, result in enumerate(ranks):
        mine = {layer: count for layer, count in single_process["inverted"].items() if owners[layer] == rank}
        assert result["empirical"]["inverted"] == mine, rank  # as often as one process, on the owner alone
    first, second = (r["empirical"]["inverses"] for r in ranks)
    for name in first:
        assert all(torch.equal(x, y) for x, y in zip(first[name], second[name])), name


def test_owners_alone_hold_their_layers_inverses_and_take_the_same_steps(ranks, single_process):
    owners = inverse_owners(single_process["layers"], WORLD)
    for rank, result in enumerate(ranks):
        assert result["owners_alone"]["holds"] == sorted(name for name, owner in owners.items() if owner == rank)
        # the steps of every rank holding every inverse, to rounding (theirs are mirrored from the upper triangles)
        for name, value in result["empirical"]["params"].items():
            torch.testing.assert_close(result["owners_alone"]["params"][name], value, rtol=1e-5, atol=1e-6)
        assert result["owners_alone"]["losses"] == pytest.approx(result["empirical"]["losses"], rel=1e-6)
    for name, value in ranks[0]["owners_alone"]["params"].items():  # the ranks identical
        assert torch.equal(ranks[1]["owners_alone"]["params"][name], value), name


def test_a_grad_worker_fraction_between_one_rank_and_all_is_refused(ranks):
    for r in ranks:
        assert r["between"] is not None and "grad_worker_fraction=0.75" in r["between"] and "1/2" in r["between"]


def test_factors_all_reduced_in_bfloat16_are_the_same_on_every_rank_and_near_float32s(ranks):
    first, second = (r["bfloat16"] for r in ranks)
    for name in first["factors"]:
        assert torch.equal(first["factors"][name], second["factors"][name]), name
        want = ranks[0]["empirical"]["factors"][name]
        assert float((first["factors"][name] - want).norm() / want.norm()) < 2e-2, name
    for name in first["params"]:
        assert torch.equal(first["params"][name], second["params"][name]), name


def test_ddp_run_equals_the_single_process_run_on_full_batches(ranks, single_process):
    for name, value in single_process["params"].items():
        torch.testing.assert_close(ranks[0]["empirical"]["params"][name], value, rtol=1e-4, atol=1e-5)
    full_batch_losses = [sum(pair) / WORLD for pair in zip(*(r["empirical"]["losses"] for r in ranks))]
    assert full_batch_losses == pytest.approx(single_process["losses"], rel=1e-4)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_loss_falls(ranks, fisher):
    losses = [sum(pair) / WORLD for pair in zip(*(r[fisher]["losses"] for r in ranks))]
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses  # the default kl_clip bounds the first steps


def test_non_finite_statistics_on_one_rank_are_rejected_on_every_rank(ranks):
    for r in ranks:
        assert r["non_finite"] == {"rejected": ["0", "2", "4"], "kept": True}


def test_a_rank_missing_a_layer_takes_part_and_the_others_statistics_count(ranks):
    for r in ranks:
        assert r["missing"] == {"2": (3.25, 1.0, 40), "4": (2.0, 1.0, 5)}  # (10 * 1 + 30 * 4) / 40


@pytest.mark.parametrize("fraction", [1.0, 1 / WORLD])
def test_a_tables_block_trains_data_parallel_as_in_one_process(ranks, fraction):
    first, second = (r[f"table {fraction}"] for r in ranks)
    assert first["a"].shape == (1, 1100) and torch.equal(first["a"], second["a"])
    assert_the_single_process_weights(first, second, on_one_thread(table_loop))


@pytest.mark.parametrize("fraction", [1.0, 1 / WORLD])
def test_a_tied_tables_block_trains_data_parallel_as_in_one_process(ranks, fraction):
    first, second = (r[f"tied {fraction}"] for r in ranks)
    assert first["blocks"] == ["emb[embedding]", "emb[output]", "mix"]
    assert_the_single_process_weights(first, second, on_one_thread(tied_loop))
    assert first["losses"][-1] < first["losses"][0]


@pytest.mark.parametrize("fraction", [1.0, 1 / WORLD])
def test_weight_normed_blocks_train_data_parallel_as_in_one_process(ranks, fraction):
    first, second = (r[f"normed {fraction}"] for r in ranks)
    assert first["blocks"] == ["0", "2"]
    assert_the_single_process_weights(first, second, on_one_thread(normed_loop))
    assert first["losses"][-1] < first["losses"][0]


@pytest.mark.parametrize("fraction", [1.0, 1 / WORLD])
def test_spectrally_normed_blocks_train_data_parallel_as_in_one_process(ranks, fraction):
    first, second = (r[f"spectral {fraction}"] for r in ranks)
    assert first["blocks"] == ["0", "2"]
    assert_the_single_process_weights(first, second, on_one_thread(lambda: normed_loop(spectral=True)))
    assert first["losses"][-1] < first["losses"][0]


def assert_the_single_process_weights(first: dict, second: dict, alone: dict) -> None:
    """Both ranks hold the same weights bit for bit, the single process's to float32 rounding."""
    for name, value in alone["params"].items():
        assert torch.equal(first["params"][name], second["params"][name]), name
        torch.testing.assert_close(first["params"][name], value, rtol=1e-4, atol=1e-5)
