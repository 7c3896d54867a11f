"""KFACPreconditioner.step() and update_statistics() are atomic (issue 11, items 5 and 3).

A call that raises (misuse, an exception in a later layer, a warning turned into an error) leaves ``state_dict()``
and every .grad exactly as before, and the call, retried once its cause is fixed, gives what a run that never
failed gives. A mini-batch whose statistics are not finite is skipped with a warning and the run goes on as a
run that never saw it. k ``track()`` blocks of ``(loss / k).backward()`` without ``loss_scale`` give the factors
of one ``track()`` around the k micro-batches, and of the whole batch, with a LossScaleWarning once.
Every expectation is a before/after snapshot or another run, never the implementation's formulas.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph
from kronograph.runtime.inverse import InverseWarning, StatisticsWarning
from kronograph.runtime.preconditioner import LossScaleWarning

from equality import same

N = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)
    ).double()  # layers "0", "3", "5"


def batch(seed: int, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,), generator=generator)


def setup(fisher: str = "empirical", loss: str = "cross_entropy", **settings) -> tuple[nn.Module, object]:
    model = mlp()
    settings = {"damping": 0.1, "stats_fraction": 0.5, "seed": 0, "factor_dtype": torch.float64, **settings}
    cm = kronograph.compile(model, batch(0, 2)[:1], loss=loss)
    return model, kronograph.optim.KFACPreconditioner(cm, fisher=fisher, **settings)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> None:
    (scale * F.cross_entropy(model(x), y)).backward()


def good_step(model: nn.Module, precond, seed: int) -> dict:
    """The README loop's step on batch ``seed`` (track() does nothing in mc mode; step(x) ignores x in empirical)."""
    x, y = batch(seed)
    model.zero_grad()
    with precond.track():
        backward(model, x, y)
    return precond.step(x)




def snapshot(model: nn.Module, precond) -> tuple[dict, list]:
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return copy.deepcopy(precond.state_dict()), grads


def unchanged_after(model: nn.Module, precond, call, error, match: str) -> None:
    before = snapshot(model, precond)
    with pytest.raises(error, match=match):
        call()
    after = snapshot(model, precond)
    assert same(after[0], before[0])
    assert same(after[1], before[1])


def boom(*args, **kwargs):
    raise RuntimeError("boom")


# -- a call that raises changes nothing ------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_misuse_changes_nothing(fisher):
    model, precond = setup(fisher, stats_every=1)
    good_step(model, precond, 1)
    x, y = batch(2)
    model.zero_grad()
    backward(model, x, y)  # outside track(): nothing pending (empirical), and no inputs given (mc)
    unchanged_after(model, precond, precond.step, kronograph.KronographError, "track|inputs")


def test_a_forward_without_backward_raises_and_the_retry_after_the_backward_is_the_clean_step():
    model, precond = setup()
    good_step(model, precond, 1)
    x, y = batch(2)
    model.zero_grad()
    with precond.track():
        loss = F.cross_entropy(model(x), y)
    unchanged_after(model, precond, precond.step, kronograph.KronographError, "backward")
    loss.backward()  # the tracked micro-batch is still pending: the retry uses it
    precond.step()

    clean_model, clean = setup()
    good_step(clean_model, clean, 1)
    good_step(clean_model, clean, 2)
    assert same(snapshot(model, precond), snapshot(clean_model, clean))


@pytest.mark.parametrize("fisher, separate", [("empirical", False), ("mc", False), ("mc", True)])
def test_an_exception_in_the_last_layer_leaves_every_grad_and_the_state_and_the_retry_is_the_clean_step(
        fisher, separate, monkeypatch):
    """Statistics are folded and every block inverted before the last layer's solve raises; the layers before it
    were already solved. ``separate``: update_statistics(x) ran before step(), which then must not lose it."""
    def run(fail: bool):
        model, precond = setup(fisher)
        good_step(model, precond, 1)
        x, y = batch(2)
        model.zero_grad()
        with precond.track():
            backward(model, x, y)
        if separate:
            precond.update_statistics(x)
        if fail:
            monkeypatch.setattr(precond.blocks["5"], "precondition", boom)
            unchanged_after(model, precond, lambda: precond.step(None if separate else x), RuntimeError, "boom")
            monkeypatch.undo()
        info = precond.step(None if separate else x)
        assert info["statistics_updated"] and info["preconditioned"] == 3
        return snapshot(model, precond)

    assert same(run(fail=True), run(fail=False))


def test_a_failed_inverse_turned_into_an_error_unfolds_the_statistics_and_the_other_inverses():
    model, precond = setup()
    good_step(model, precond, 1)
    precond.blocks["5"].a.fill_(float("inf"))  # its inverse fails at the next refresh, after "0" and "3"
    x, y = batch(2)
    model.zero_grad()
    with precond.track():
        backward(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InverseWarning)
        unchanged_after(model, precond, precond.step, InverseWarning, "raise damping")
    with pytest.warns(InverseWarning):
        assert precond.step()["failed_inverses"] == ["5"]  # without the filter, the step goes on


def test_non_finite_statistics_turned_into_an_error_give_back_the_random_draws():
    model, precond = setup("mc")
    good_step(model, precond, 1)
    x, _ = batch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StatisticsWarning)
        unchanged_after(model, precond, lambda: precond.update_statistics(torch.full_like(x, float("nan"))),
                        StatisticsWarning, "non-finite")
        unchanged_after(model, precond, lambda: precond.step(torch.full_like(x, float("nan"))),
                        StatisticsWarning, "non-finite")


def test_inputs_that_do_not_fit_the_model_change_nothing_and_the_retry_is_the_clean_step():
    model, precond = setup("mc")
    good_step(model, precond, 1)
    x, y = batch(2)
    model.zero_grad()
    backward(model, x, y)
    unchanged_after(model, precond, lambda: precond.step(x[:, :2]), RuntimeError, "shape")
    precond.step(x)

    clean_model, clean = setup("mc")
    good_step(clean_model, clean, 1)
    good_step(clean_model, clean, 2)
    assert same(snapshot(model, precond), snapshot(clean_model, clean))


def test_an_input_modified_in_place_after_its_forward_changes_nothing():
    """Two micro-batches in one track(): the first is reduced (its subset drawn) before the second raises."""
    model, precond = setup()
    good_step(model, precond, 1)
    (x1, y1), (x2, y2) = batch(2), batch(3)
    model.zero_grad()
    with precond.track():
        backward(model, x1, y1, 0.5)
        backward(model, x2, y2, 0.5)
    x2.mul_(2.0)
    unchanged_after(model, precond, precond.step, kronograph.KronographError, "modified in place")


# -- a non-finite mini-batch is skipped, and the run goes on as without it --------------------------------------
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "sigmoid_cross_entropy"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_mc_batch_is_skipped_with_a_warning_and_the_next_good_step_works(loss, value):
    def run(bad: bool):
        model, precond = setup("mc", loss=loss)
        for seed in (1, 2):
            if seed == 2 and bad:
                x, _ = batch(7)
                model.zero_grad()
                model(x).pow(2).mean().backward()  # the user's own (finite) gradient
                before = snapshot(model, precond)[0]
                with pytest.warns(StatisticsWarning):
                    info = precond.step(torch.full_like(x, value))
                assert not info["statistics_updated"] and info["preconditioned"] == 3
                after = precond.state_dict()
                assert same({**after, "steps": 0}, {**before, "steps": 0})  # all but the step count
                assert all(torch.isfinite(p.grad).all() for p in model.parameters())
            x, _ = batch(seed)
            model.zero_grad()
            model(x).pow(2).mean().backward()
            info = precond.step(x)
            assert info["statistics_updated"] and not info["rejected_statistics"]
        return snapshot(model, precond)

    bad, clean = run(bad=True), run(bad=False)
    assert bad[0]["steps"] == clean[0]["steps"] + 1
    assert same({**bad[0], "steps": 0}, {**clean[0], "steps": 0})
    assert same(bad[1], clean[1])


def test_a_non_finite_tracked_batch_is_skipped_with_a_warning_and_the_run_goes_on_as_without_it():
    def run(bad: bool):
        model, precond = setup()
        good_step(model, precond, 1)
        if bad:
            x, y = batch(7)
            x[:, 1] = float("nan")  # in every example: whatever the subset tau_1 draws
            model.zero_grad()
            with precond.track():
                backward(model, x, y)
            before = snapshot(model, precond)[0]
            with pytest.warns(StatisticsWarning):
                info = precond.step()
            assert not info["statistics_updated"] and sorted(info["non_finite_grad"]) == ["0", "3", "5"]
            assert same({**precond.state_dict(), "steps": 0}, {**before, "steps": 0})
        good_step(model, precond, 2)
        return snapshot(model, precond)

    bad, clean = run(bad=True), run(bad=False)
    assert same({**bad[0], "steps": 0}, {**clean[0], "steps": 0})
    assert same(bad[1], clean[1])


# -- k track() blocks before one step() ------------------------------------------------------------------------
K = 4


def accumulated(style: str) -> tuple[nn.Module, object, list]:
    """Two steps of K micro-batches each: one track() around them ("one"), K blocks without loss_scale
    ("blocks"), K blocks with loss_scale=1/K ("scaled"), K undivided losses summed with loss_scale=1 ("summed")."""
    model, precond = setup(stats_fraction=1.0)
    caught = []
    for seed in (1, 2):
        x, y = batch(seed)
        parts = [slice(i * N // K, (i + 1) * N // K) for i in range(K)]
        model.zero_grad()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if style == "one":
                with precond.track():
                    for part in parts:
                        backward(model, x[part], y[part], 1 / K)
            else:
                for part in parts:
                    scale = {"blocks": None, "scaled": 1 / K, "summed": 1.0}[style]
                    with precond.track(loss_scale=scale):
                        backward(model, x[part], y[part], 1.0 if style == "summed" else 1 / K)
            precond.step()
        caught.append([w for w in seen if issubclass(w.category, LossScaleWarning)])
    return model, precond, caught


@pytest.mark.parametrize("style", ["blocks", "scaled", "summed"])
def test_k_tracked_blocks_give_the_factors_of_one_block_and_of_the_whole_batch(style):
    model, precond, caught = accumulated(style)
    one_model, one, none = accumulated("one")
    whole_model, whole = setup(stats_fraction=1.0)
    for seed in (1, 2):
        good_step(whole_model, whole, seed)
    for reference in (one, whole):
        for a, b in zip(precond.blocks.values(), reference.blocks.values()):
            torch.testing.assert_close(a.a, b.a, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a.g, b.g, rtol=1e-10, atol=1e-12)
    if style != "summed":  # the same gradients (the summed losses' is K times larger)
        for p, q in zip(model.parameters(), one_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    assert none == [[], []]
    if style == "blocks":  # once, naming both fixes in the loop's own terms
        assert len(caught[0]) == 1 and caught[1] == []
        message = str(caught[0][0].message)
        assert f"loss_scale=1/{K}" in message and "loss_scale=1)" in message and f"(loss / {K})" in message
    else:
        assert caught == [[], []]


@pytest.mark.parametrize("max_factor_dim", [None, 2])
def test_the_next_batchs_factors_reuse_the_replaced_emas_and_change_nothing(max_factor_dim, monkeypatch):
    """A step writes the next batch's factors into the EMAs it replaced (no fresh d x d a step; with
    ``max_factor_dim`` 2 the factors are formed as diagonal blocks, 0 elsewhere): the factors and .grad equal bit
    for bit those of a run that makes every batch's factors anew, and a state_dict taken earlier is a snapshot."""
    model, precond = setup(stats_fraction=1.0, max_factor_dim=max_factor_dim)
    fresh_model, fresh = setup(stats_fraction=1.0, max_factor_dim=max_factor_dim)
    monkeypatch.setattr(fresh, "_keep_spares", lambda before: None)

    def step_both(k: int) -> None:
        good_step(model, precond, seed=k)
        good_step(fresh_model, fresh, seed=k)
        assert same(precond.state_dict()["blocks"], fresh.state_dict()["blocks"])
        assert same([p.grad for p in model.parameters()], [p.grad for p in fresh_model.parameters()])

    storages = set()
    for k in range(6):
        step_both(k)
        storages.add(precond.blocks["0"].a.data_ptr())
        if k == 2:
            held, kept = precond.state_dict(), copy.deepcopy(precond.state_dict())
    assert len(storages) == 2  # two tensors take turns as the EMA and the next batch's factors
    assert same(held, kept)
    # A checkpoint's factors need not be 0 outside the blocks (one of whole factors): loading makes them so, and the
    # runs stay equal.
    state = copy.deepcopy(held)
    for block in state["blocks"].values():
        block["a"] = block["a"] + 0.01 * torch.ones_like(block["a"])
    for p in (precond, fresh):
        p.load_state_dict(state)
    for k in range(6, 10):
        step_both(k)
