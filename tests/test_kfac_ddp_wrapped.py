"""kronograph.compile of a wrapped model: DistributedDataParallel seen through, FSDP refused (compiler/wrappers.py).

One spawn of two CPU processes (gloo) runs every scenario and saves what each rank ends with:

* KFAC (paper preset) on ``compile(DDP(model))`` against KFAC on ``compile(model)``, both data parallel, each
  rank stepping on its half of every batch: compile plans and K-FAC trains the module inside DDP, so DDP's
  reducer never runs and KFAC's own gradient all_reduce is the only one; the parameters must be the unwrapped
  run's, and the same on both ranks. The DDP wrapper still trains afterwards (no reduction left pending).
* KFACPreconditioner in the user's DDP loop, compiled from the DDP module, against one compiled from the
  inner module.
* FSDP2 (``fully_shard``, which runs on CPU and gloo): compile refuses a sharded module, naming the fix (compile
  the plain module, then shard it); KFAC steps a module one of whose layers was sharded after compile, as the
  unwrapped run (tests/test_kfac_fsdp.py holds whole sharded models to one process). FSDP1 cannot be built
  without an accelerator; its detection is tested on an instance made without FullyShardedDataParallel's
  constructor.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kronograph
from kronograph.errors import KronographError

from factories import teacher_problem
from ranks import refusal, run_on_ranks

WORLD, STEPS, BATCH, FEATURES, CLASSES = 2, 5, 32, 6, 3


def problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same MLP and batches on every process (labels from a random teacher)."""
    model, batches = teacher_problem(STEPS, BATCH, FEATURES, CLASSES)
    return model, [(x, labels) for x, labels, _ in batches]


def kfac(model: nn.Module, compiled, batches, rank: int, world: int) -> dict:
    opt = kronograph.optim.KFAC(compiled, preset="paper", seed=0)
    losses = [opt.step(x.chunk(world)[rank], y.chunk(world)[rank])["loss"] for x, y in batches]
    return {"params": copy.deepcopy(model.state_dict()), "losses": losses, "plan": list(compiled.plan.parameters)}


def preconditioned(model: nn.Module, forward: nn.Module, compiled, batches, rank: int, world: int) -> dict:
    """The README's DDP loop: SGD on the preconditioned gradient, DDP averaging the gradient."""
    precond = kronograph.optim.KFACPreconditioner(compiled, damping=0.03, inverse_every=2, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches:
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        with precond.track():
            F.cross_entropy(forward(x), y).backward()
        assert precond.step(x)["preconditioned"] == 3
        opt.step()
    return {"params": copy.deepcopy(model.state_dict())}


def run_ranks(rank: int, world: int) -> dict:
    """Every scenario on this rank (tests/ranks.py spawns the processes)."""
    model, batches = problem()
    initial = copy.deepcopy(model.state_dict())
    example = (batches[0][0][:2],)
    results: dict = {}

    results["unwrapped"] = kfac(model, kronograph.compile(model, example), batches, rank, world)
    model.load_state_dict(initial)
    ddp = DistributedDataParallel(model)
    compiled = kronograph.compile(ddp, example)
    results["ddp_module_is_inner"] = compiled.module is model
    results["ddp"] = kfac(model, compiled, batches, rank, world)
    # torch.compile around DDP and DDP around torch.compile: both seen through (nothing is compiled by dynamo)
    results["nested_plans"] = [list(kronograph.compile(torch.compile(ddp), example).plan.parameters),
                               list(kronograph.compile(DistributedDataParallel(torch.compile(model)),
                                                       example).plan.parameters)]
    # the DDP wrapper still trains after KFAC: no reduction left pending, its averaged gradient the same on both
    x, y = batches[0]
    F.cross_entropy(ddp(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    results["ddp_grad_after"] = model[0].weight.grad.clone()

    model.load_state_dict(initial)
    results["precond_unwrapped"] = preconditioned(model, ddp, kronograph.compile(model, example), batches, rank,
                                                  world)
    model.load_state_dict(initial)
    results["precond_ddp"] = preconditioned(model, ddp, kronograph.compile(ddp, example), batches, rank, world)

    from torch.distributed.fsdp import fully_shard

    sharded, _ = problem()
    fully_shard(sharded)
    results["fsdp2_compile"] = refusal(lambda: kronograph.compile(sharded, example))
    later, _ = problem()
    compiled_first = kronograph.compile(later, example)
    later.load_state_dict(initial)
    fully_shard(later[2])  # one layer sharded after compile: its parameters become DTensors in place
    run = kfac(later, compiled_first, batches, rank, world)
    run["params"] = {name: value.full_tensor() if hasattr(value, "full_tensor") else value
                     for name, value in run["params"].items()}
    results["fsdp2_after_compile"] = run
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(run_ranks, WORLD, tmp_path_factory.mktemp("kfac_ddp_wrapped"))


def test_kfac_on_a_ddp_wrapped_model_is_the_unwrapped_data_parallel_run(ranks):
    for r in ranks:
        assert r["ddp_module_is_inner"]
        assert r["ddp"]["plan"] == r["unwrapped"]["plan"] == ["0.weight", "0.bias", "2.weight", "2.bias",
                                                              "4.weight", "4.bias"]
        assert r["ddp"]["losses"] == r["unwrapped"]["losses"]
        for name, value in r["unwrapped"]["params"].items():  # the same computation: the same bits
            assert torch.equal(r["ddp"]["params"][name], value), name
        assert r["ddp"]["losses"][-1] < r["ddp"]["losses"][0]
        assert r["nested_plans"] == [r["unwrapped"]["plan"]] * 2
    for name, value in ranks[0]["ddp"]["params"].items():
        assert torch.equal(ranks[1]["ddp"]["params"][name], value), name
    assert torch.equal(ranks[0]["ddp_grad_after"], ranks[1]["ddp_grad_after"])


def test_preconditioner_compiled_from_the_ddp_module_is_the_inner_modules(ranks):
    for r in ranks:
        for name, value in r["precond_unwrapped"]["params"].items():
            assert torch.equal(r["precond_ddp"]["params"][name], value), name
    for name, value in ranks[0]["precond_ddp"]["params"].items():
        assert torch.equal(ranks[1]["precond_ddp"]["params"][name], value), name


def test_compile_refuses_fsdp2_with_the_fix_and_kfac_steps_a_model_sharded_after_compile(ranks):
    for r in ranks:
        message = r["fsdp2_compile"]
        assert message is not None and "FSDP" in message and "fully_shard" in message
        assert "compile the plain module first" in message and "KFACPreconditioner" in message
        later = r["fsdp2_after_compile"]
        assert later["losses"] == r["unwrapped"]["losses"]
        for name, value in r["unwrapped"]["params"].items():
            assert torch.equal(later["params"][name], value), name


def test_fsdp1_is_refused_with_the_fix():
    """FullyShardedDataParallel needs an accelerator to be built ("FSDP needs a non-CPU accelerator device");
    the check is an isinstance test, so an instance made without the constructor stands in for one."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    stand_in = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(stand_in)
    model = nn.Sequential(nn.Linear(FEATURES, 4), stand_in)
    with pytest.raises(KronographError, match=r"submodule '1' is wrapped in FullyShardedDataParallel.*fully_shard"):
        kronograph.compile(model, (torch.randn(2, FEATURES),))
