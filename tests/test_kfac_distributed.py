"""kronograph.optim.KFAC data-parallel: two CPU processes (gloo), each stepping on its slice of every batch.

One spawn runs every scenario (process start-up and compile dominate the time) and saves what each rank ends
with; the tests compare the ranks with each other and with a single process stepping on the full batches.
The ranks all-reduce the gradient, the factors, the quadratic model's Fisher products and the loss after the
step, and draw subsets and sampled targets for the global batch from one shared generator, so the distributed
run must be the single-process run, to float32 rounding, whatever the slices.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kronograph
from kronograph.errors import KronographError
from kronograph.runtime.losses import LOSSES

from ranks import on_one_thread, run_on_ranks

WORLD, STEPS, BATCH, FEATURES, CLASSES = 2, 10, 32, 6, 3

#: scenario -> (KFAC arguments, the ranks' slices of each batch of BATCH examples, loss). (27, 5): the second
#: rank often has no example of the paper's tau_1 subset (4 of 32) or tau_2 subset (8 of 32).
SCENARIOS: dict[str, tuple[dict, tuple[int, ...], str]] = {
    "paper": (dict(preset="paper", seed=0), (16, 16), "cross_entropy"),
    "default": (dict(seed=0), (16, 16), "cross_entropy"),
    "paper_unequal": (dict(preset="paper", seed=0), (27, 5), "cross_entropy"),
    "default_unequal": (dict(seed=0), (20, 12), "cross_entropy"),
    "empirical": (dict(preset="paper", fisher="empirical", seed=0), (16, 16), "cross_entropy"),
    "weight_decay": (dict(preset="paper", weight_decay=1e-3, seed=0), (16, 16), "cross_entropy"),
    "mse": (dict(preset="paper", damping=1.0, seed=0), (27, 5), "mse"),
}


def problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The same MLP and batches on every process: inputs, a random teacher's labels and its outputs."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    batches = []
    with torch.no_grad():
        for _ in range(STEPS):
            x = torch.randn(BATCH, FEATURES)
            batches.append((x, teacher(x).argmax(1), teacher(x)))
    return model, batches


def run_all(rank: int = 0, world: int = 1) -> dict[str, dict]:
    """Every scenario from the same weights on this rank's slice of every batch (world 1: the full batches);
    one compile for all."""
    model, batches = problem()
    initial = copy.deepcopy(model.state_dict())
    cm = kronograph.compile(model, (batches[0][0][:2],), loss="cross_entropy")
    results = {}
    for name, (settings, slices, loss) in SCENARIOS.items():
        model.load_state_dict(initial)
        compiled = copy.copy(cm)
        compiled.loss = loss
        opt = kronograph.optim.KFAC(compiled, **settings)
        infos = []
        for x, labels, outputs in batches:
            y = labels if loss == "cross_entropy" else outputs
            if world > 1:
                start = sum(slices[:rank])
                x, y = x[start:start + slices[rank]], y[start:start + slices[rank]]
            info = opt.step(x, y)
            assert "skipped" not in info, info
            infos.append({key: info[key] for key in ("loss", "alpha", "mu", "damping", "rho", "signal") if key in info})
        results[name] = {"params": copy.deepcopy(model.state_dict()), "infos": infos,
                         "factors": {layer: block.a.clone() for layer, block in opt.blocks.items()}}
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
    return results


def refusal(make) -> str | None:
    try:
        make()
    except KronographError as error:
        return str(error)
    return None


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
        for key, value in theirs.items():  # rho: a difference of two losses over M(delta), rounding grown most
            assert mine[key] == pytest.approx(value, rel=1e-3 if key == "rho" else 1e-4, abs=1e-6), (step, key)


def test_what_is_not_distributed_yet_is_refused_clearly(ranks):
    for r in ranks:
        onnxruntime, tridiagonal = r["refused"]
        assert "torch engine only" in onnxruntime and "onnxruntime" in onnxruntime
        assert "tridiagonal" in tridiagonal


def test_the_runs_train(single_process):
    for name, result in single_process.items():
        losses = [info["loss"] for info in result["infos"]]
        assert losses[-1] < losses[0], (name, losses)


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
