"""KFACPreconditioner in an FSDP2 loop: two CPU processes (gloo), the distributed tests' MLP compiled plain, then
sharded by ``fully_shard`` (each Linear and the root, or the root alone; every inverse on every rank, or each on its
owner alone), and a small conv net, each rank taking half of every batch.

FSDP averages the ranks' gradients into each rank's rows, the preconditioner averages the halves' factors and
solves each layer's gathered whole gradient (runtime/sharded.py): the run must be the single-process run on the
full batches, to float32 rounding, with the ranks' parameters identical. The last layer (3 outputs) is split
unevenly (rows 2 and 1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kronograph

from factories import (
    conv_teacher_classification,
    normed_problem,
    table_problem,
    teacher_classification,
    tied_problem,
)
from ranks import on_one_thread, preconditioned_loop, run_on_ranks, whole_state

WORLD, STEPS, BATCH, FEATURES, CLASSES = 2, 8, 32, 6, 3
SETTINGS = dict(damping=0.03, inverse_every=3, seed=0)


def conv_problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    return conv_teacher_classification(STEPS, BATCH, CLASSES)


def mlp() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    return teacher_classification(STEPS, BATCH, FEATURES, CLASSES)


#: scenario -> (problem, fisher, whether each Linear / Conv2d is sharded on its own before the root, the
#: fraction of ranks holding a layer's inverses)
SCENARIOS = {"empirical": (mlp, "empirical", True, 1.0), "mc": (mlp, "mc", True, 1.0),
             "root only": (mlp, "empirical", False, 1.0), "conv": (conv_problem, "empirical", True, 1.0),
             "owners alone": (mlp, "empirical", True, 1 / WORLD),
             "table": (lambda: table_problem(STEPS, BATCH, CLASSES), "empirical", True, 1.0),
             "tied": (lambda: tied_problem(STEPS, BATCH), "empirical", False, 1.0),  # (FSDP refuses a split tie)
             "weight norm": (lambda: normed_problem(STEPS, BATCH, FEATURES, CLASSES), "empirical", True, 1.0)}


def run_ranks(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    results: dict = {}
    for scenario, (make, fisher, per_layer, fraction) in SCENARIOS.items():
        model, batches = make()
        cm = kronograph.compile(model, (batches[0][0][:2],))  # the plain module, then sharded in place
        if per_layer:
            for layer in list(model.modules())[1:]:
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    fully_shard(layer)
        fully_shard(model)
        precond = kronograph.optim.KFACPreconditioner(cm, fisher=fisher, grad_worker_fraction=fraction, **SETTINGS)
        losses = preconditioned_loop(model, model, precond, batches, rank, world)
        results[scenario] = {"params": whole_state(model), "losses": losses, "blocks": {
                                 name: block.layer.diagonal_a for name, block in precond.blocks.items()},
                             "local": {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}}
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(run_ranks, WORLD, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def single_process() -> dict:
    def run() -> dict:
        results = {}
        for scenario, (make, fisher, *_) in SCENARIOS.items():
            model, batches = make()
            precond = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (batches[0][0][:2],)),
                                                          fisher=fisher, **SETTINGS)
            results[scenario] = {"params": model.state_dict(), "losses": preconditioned_loop(model, model, precond, batches)}
        return results

    return on_one_thread(run)


def test_parameters_are_sharded_by_rows_unevenly(ranks):
    assert ranks[0]["empirical"]["local"]["4.weight"] == (2, 16)
    assert ranks[1]["empirical"]["local"]["4.weight"] == (1, 16)
    assert ranks[1]["conv"]["local"]["0.weight"] == (2, 1, 3, 3)  # output channels 3 and 2


@pytest.mark.parametrize("fisher", list(SCENARIOS))
def test_ranks_hold_identical_parameters(ranks, fisher):
    first, second = (r[fisher]["params"] for r in ranks)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("fisher", ["empirical", "root only", "conv", "owners alone", "table", "tied", "weight norm"])
def test_fsdp_run_equals_the_single_process_run_on_full_batches(ranks, single_process, fisher):
    """(Not fisher="mc": each rank draws its own sampled targets.)"""
    for name, value in single_process[fisher]["params"].items():
        torch.testing.assert_close(ranks[0][fisher]["params"][name], value, rtol=1e-4, atol=1e-5)
    full_batch_losses = [sum(pair) / WORLD for pair in zip(*(r[fisher]["losses"] for r in ranks))]
    assert full_batch_losses == pytest.approx(single_process[fisher]["losses"], rel=1e-4)


def test_a_table_a_tie_and_a_weight_normed_layer_keep_their_blocks_sharded(ranks):
    """Their blocks precondition every step (``preconditioned_loop`` checks each layer was solved), and the runs
    are the single process's (above)."""
    assert ranks[0]["table"]["blocks"] == {"0": True, "3": False}
    assert sorted(ranks[0]["tied"]["blocks"]) == ["emb[embedding]", "emb[output]", "mix"]
    assert sorted(ranks[0]["weight norm"]["blocks"]) == ["0", "2", "4"]


@pytest.mark.parametrize("fisher, by", [("empirical", 0.8), ("mc", 0.8), ("root only", 0.8), ("conv", 0.9),
                                        ("owners alone", 0.8)])  # the default kl_clip bounds the first steps
def test_loss_falls(ranks, fisher, by):
    losses = [sum(pair) / WORLD for pair in zip(*(r[fisher]["losses"] for r in ranks))]
    assert sum(losses[-2:]) < by * sum(losses[:2]), losses

