"""kronograph.optim.KFAC on an FSDP2-sharded model: two CPU processes (gloo), the distributed tests' MLP (and a
small conv net) compiled plain, then sharded in place by ``fully_shard``, each rank stepping on its slice of every
batch.

Inside each step the weights are gathered whole and FSDP runs no collective (runtime/sharded.py ``unsharded``);
KFAC sums the gradient, the factors and the quadratic model's products itself, as without FSDP, and writes its
update to the whole weights and to this rank's rows. So the run must be the single-process run on the full
batches, to float32 rounding, with the ranks' parameters identical, and the parameters still sharded after it
(the last MLP layer's 3 rows split 2 and 1). The unequal slices make the ranks run different numbers of passes
(a rank whose slice lies in one half of the batch passes it once), which FSDP's own collectives would hang on.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import kronograph
from kronograph.runtime.inverse import UntrustedModelWarning

from factories import (
    conv_teacher_classification,
    layer_norm_problem,
    normed_problem,
    table_problem,
    teacher_classification,
    tied_problem,
)
from ranks import on_one_thread, refusal, run_on_ranks, whole_state

WORLD, STEPS, BATCH, FEATURES, CLASSES = 2, 8, 32, 6, 3

#: scenario -> (problem, KFAC arguments, the ranks' slices of each batch, whether each layer is sharded on its
#: own before the root). reject_rise=0 with a tiny lambda undoes the first steps: the undo writes the shards too.
#: Its steps are ill-conditioned (alpha ~1e-5 later), so float32 rounding between one process and two grows past
#: the tolerance: that run is held to the unsharded two-rank run instead, bit for bit (``UNSHARDED_REFERENCE``). So
#: is the weight-normed MLP's: its quadratic model takes central differences (torch._weight_norm has no forward
#: mode), whose ~1e-4 of alpha between one process and two flips a discrete choice at its fifth step.
#: Gathered batches (``batches_per_step``) hold the examples in another order on the ranks than in one process
#: (each rank's slices of the batches, one after the other), so their sub-batches differ: one batch a step here.
ONE_BATCH_A_STEP = {"batches_per_step": 1}
SCENARIOS = {
    "paper": ("mlp", dict(preset="paper", seed=0), (16, 16), True),
    "default": ("mlp", dict(seed=0), (20, 12), True),
    "root only": ("mlp", dict(seed=0), (16, 16), False),
    "undone steps": ("mlp", dict(seed=0, reject_rise=0.0, relative_damping=1e-3), (16, 16), True),
    "conv": ("conv", dict(seed=0), (16, 16), True),
    "diagonal head G": ("mlp", dict(seed=0, diagonal_output_g=2), (20, 12), True),  # the 3-class head's G
    "table": ("table", dict(seed=0), (16, 16), True),
    "tied": ("tied", dict(seed=0), (16, 16), False),  # (FSDP refuses a tie split over two of its groups)
    "weight norm": ("normed", dict(seed=0), (16, 16), True),
    "layer norm": ("layer norm", dict(seed=0), (20, 12), True),  # its affine on the Fisher's diagonal
    # judged untrusted after 3 steps (any median rho is below 10): Adam's steps written to the shards after them
    "untrusted": ("mlp", dict(seed=0, untrusted_rho=10.0, untrusted_steps=3, untrusted_adam_lr=0.01), (20, 12), True),
    # the same with SGD's steps (Nesterov momentum), as a batch-norm net's untrusted_fallback would take
    "untrusted sgd": ("mlp", dict(seed=0, untrusted_rho=10.0, untrusted_steps=3, untrusted_fallback="sgd",
                                  untrusted_sgd_lr=0.05), (20, 12), True),
}
UNSHARDED_REFERENCE = ("undone steps", "weight norm")


def conv_problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    return conv_teacher_classification(STEPS, BATCH, CLASSES)


PROBLEMS = {"mlp": lambda: teacher_classification(STEPS, BATCH, FEATURES, CLASSES), "conv": conv_problem,
            "table": lambda: table_problem(STEPS, BATCH, CLASSES), "tied": lambda: tied_problem(STEPS, BATCH),
            "normed": lambda: normed_problem(STEPS, BATCH, FEATURES, CLASSES),
            "layer norm": lambda: layer_norm_problem(STEPS, BATCH, FEATURES, CLASSES)}


def train(model, cm, settings, batches, slices, rank: int, world: int) -> tuple[list[dict], kronograph.optim.KFAC]:
    opt = kronograph.optim.KFAC(cm, **{**ONE_BATCH_A_STEP, **settings})
    infos = []
    for x, y in batches:
        if world > 1:
            start = sum(slices[:rank])
            x, y = x[start:start + slices[rank]], y[start:start + slices[rank]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UntrustedModelWarning)  # (the untrusted scenario's, asked for)
            info = opt.step(x, y)
        assert "skipped" not in info, info
        infos.append({key: info[key] for key in ("loss", "alpha", "rejected_steps", "adam", "sgd") if key in info})
    infos[-1]["diagonal_g"] = sorted(name for name, block in opt.blocks.items() if block.layer.diagonal_g)
    return infos, opt


def run_ranks(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    results: dict = {}
    for scenario, (problem, settings, slices, per_layer) in SCENARIOS.items():
        model, batches = PROBLEMS[problem]()
        cm = kronograph.compile(model, (batches[0][0][:2],))  # the plain module, then sharded in place
        if per_layer:
            for layer in list(model.modules())[1:]:
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    fully_shard(layer)
        fully_shard(model)
        infos, opt = train(model, cm, settings, batches, slices, rank, world)
        results[scenario] = {"params": whole_state(model), "infos": infos, "blocks": sorted(opt.blocks),
                             "diagonal_a": sorted(name for name, block in opt.blocks.items() if block.layer.diagonal_a),
                             "normed": sorted(layer.name for layer in opt.normed),
                             "fisher": {name: t.clone() for name, t in opt.unmatched_fisher.items()},
                             "local": {name: (type(p).__name__, tuple(p.to_local().shape))
                                       for name, p in model.named_parameters()}}
        if scenario in UNSHARDED_REFERENCE:  # the same two ranks without FSDP
            model, batches = PROBLEMS[problem]()
            train(model, kronograph.compile(model, (batches[0][0][:2],)), settings, batches, slices, rank, world)
            results[f"{scenario} unsharded"] = copy.deepcopy(model.state_dict())
        if scenario == "paper":  # a sharded model KFAC cannot step: refused when made, not at the first step
            results["tridiagonal"] = refusal(lambda: kronograph.optim.KFAC(cm, structure="tridiagonal"))
            results["fsdp loop"] = _fsdp_loop_loss(model, cm, batches, rank, world)
    results["column sharded"] = _foreign_dtensor_refusal(world, dim=1)
    results["row sharded"] = _foreign_dtensor_refusal(world, dim=0)
    return results


def _foreign_dtensor_refusal(world: int, dim: int) -> str | None:
    """KFAC on a model whose last layer is FSDP2's and whose first weight is a DTensor that FSDP does not manage,
    sharded on ``dim`` (tensor parallelism's layouts): refused when made (columns) or at the first step, which
    finds it still sharded after FSDP's gather (rows)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    model, batches = PROBLEMS["mlp"]()
    cm = kronograph.compile(model, (batches[0][0][:2],))
    fully_shard(model[4])
    mesh = init_device_mesh("cpu", (world,))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(dim)]))
    x, y = batches[0]
    return refusal(lambda: kronograph.optim.KFAC(cm).step(x.chunk(world)[0], y.chunk(world)[0]))


def _fsdp_loop_loss(model, cm, batches, rank: int, world: int) -> float:
    """After KFAC's steps FSDP is as it was: a plain FSDP loop (forward, backward, FSDP's reduce-scatter) runs on
    the same model; returns its loss."""
    x, y = batches[0][0].chunk(world)[rank], batches[0][1].chunk(world)[rank]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(type(p.grad).__name__ == "DTensor" for p in model.parameters())
    model.zero_grad()
    return float(loss)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(run_ranks, WORLD, tmp_path_factory.mktemp("kfac_fsdp"))


@pytest.fixture(scope="module")
def single_process() -> dict:
    def run() -> dict:
        results = {}
        for scenario, (problem, settings, slices, _) in SCENARIOS.items():
            model, batches = PROBLEMS[problem]()
            cm = kronograph.compile(model, (batches[0][0][:2],))
            infos, opt = train(model, cm, settings, batches, slices, 0, 1)
            results[scenario] = {"infos": infos, "params": copy.deepcopy(model.state_dict()),
                                 "fisher": {name: t.clone() for name, t in opt.unmatched_fisher.items()}}
        return results

    return on_one_thread(run)


def test_parameters_stay_sharded_by_rows(ranks):
    assert ranks[0]["default"]["local"]["4.weight"] == ("DTensor", (2, 16))
    assert ranks[1]["default"]["local"]["4.weight"] == ("DTensor", (1, 16))
    assert ranks[1]["conv"]["local"]["0.weight"] == ("DTensor", (2, 1, 3, 3))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ranks_hold_identical_parameters(ranks, scenario):
    first, second = (r[scenario]["params"] for r in ranks)
    for name in first:
        assert torch.equal(first[name], second[name]), name


#: The conv net's quadratic model takes one-sided differences (a convolution's forward-mode tangent is dear), which
#: divide the two batchings' float32 rounding of the outputs (~1e-7 relative) by the step h (3e-4 relative): its
#: alpha and mu differ by ~1e-4 relative a step, its weights by up to 5e-5 after 8 steps.
TOLERANCES = {"conv": dict(rtol=1e-3, atol=2e-4)}


@pytest.mark.parametrize("scenario", [name for name in SCENARIOS if name not in UNSHARDED_REFERENCE])
def test_fsdp_run_equals_the_single_process_run_on_full_batches(ranks, single_process, scenario):
    for name, value in single_process[scenario]["params"].items():
        torch.testing.assert_close(ranks[0][scenario]["params"][name], value,
                                   **TOLERANCES.get(scenario, dict(rtol=1e-4, atol=1e-5)))
    for sharded, single in zip(ranks[0][scenario]["infos"], single_process[scenario]["infos"]):
        assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-4)
        assert sharded.get("rejected_steps") == single.get("rejected_steps")
        # (the untrusted scenarios: Adam's or SGD's steps from the same one)
        assert (sharded.get("adam"), sharded.get("sgd")) == (single.get("adam"), single.get("sgd"))


@pytest.mark.parametrize("scenario, fallback", [("untrusted", "adam"), ("untrusted sgd", "sgd")])
def test_an_untrusted_start_steps_with_the_fallback_under_fsdp(ranks, scenario, fallback):
    assert 0 < sum(bool(info.get(fallback)) for info in ranks[0][scenario]["infos"]) < STEPS


def test_the_blocks_with_a_diagonal_factor_or_two_views_are_kept_sharded(ranks, single_process):
    """A diagonal head G, a table's diagonal A, a tie's two views and a weight-normed layer have their blocks under
    FSDP as in one process (the runs' equality is checked above)."""
    assert ranks[0]["diagonal head G"]["infos"][-1]["diagonal_g"] == ["4"]
    assert single_process["diagonal head G"]["infos"][-1]["diagonal_g"] == ["4"]
    assert ranks[0]["default"]["infos"][-1]["diagonal_g"] == []
    assert ranks[0]["table"]["blocks"] == ["0", "3"] and ranks[0]["table"]["diagonal_a"] == ["0"]
    assert ranks[0]["tied"]["blocks"] == ["emb[embedding]", "emb[output]", "mix"]
    assert ranks[0]["weight norm"]["blocks"] == ["0", "2", "4"] and ranks[0]["weight norm"]["normed"] == ["0"]


def test_a_layer_norms_diagonal_fisher_is_the_single_processs_under_fsdp(ranks, single_process):
    """The layer norm's affine (sharded by rows like any weight) steps along its diagonal Fisher, estimated from
    the whole weights' statistics gradients pooled over the ranks: every rank holds the single process's."""
    single = single_process["layer norm"]["fisher"]
    assert sorted(single) == sorted(ranks[0]["layer norm"]["fisher"]) == ["1.bias", "1.weight"]
    for name, value in single.items():
        assert torch.equal(ranks[0]["layer norm"]["fisher"][name], ranks[1]["layer norm"]["fisher"][name]), name
        torch.testing.assert_close(ranks[0]["layer norm"]["fisher"][name], value, rtol=1e-4, atol=1e-9)
    assert ranks[0]["layer norm"]["local"]["1.weight"] == ("DTensor", (8,))


def test_undone_steps_restore_the_shards(ranks, single_process):
    assert ranks[0]["undone steps"]["infos"][-1]["rejected_steps"] == single_process["undone steps"]["infos"][-1][
        "rejected_steps"] > 0


@pytest.mark.parametrize("scenario", UNSHARDED_REFERENCE)
def test_the_run_is_the_unsharded_two_rank_run_bit_for_bit(ranks, scenario):
    for r in ranks:
        for name, value in r[f"{scenario} unsharded"].items():
            assert torch.equal(r[scenario]["params"][name], value), name


def test_the_runs_train(ranks):
    for scenario in SCENARIOS:
        losses = [info["loss"] for info in ranks[0][scenario]["infos"]]
        assert losses[-1] < losses[0], (scenario, losses)


def test_fsdp_runs_as_before_after_the_steps_and_unsupported_settings_are_refused(ranks):
    for r in ranks:
        assert r["fsdp loop"] > 0
        assert r["tridiagonal"] is not None and "tridiagonal" in r["tridiagonal"]
        assert r["column sharded"] is not None and "'0.weight'" in r["column sharded"]
        assert "Shard(dim=1)" in r["column sharded"] and "tensor parallelism" in r["column sharded"]
        assert r["row sharded"] is not None and "['0.weight']" in r["row sharded"]
        assert "fully_shard does not manage" in r["row sharded"]
