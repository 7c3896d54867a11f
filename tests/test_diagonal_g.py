"""An output layer wider than ``diagonal_output_g`` (default 1024: a vocabulary's head) keeps its G as its diagonal,
and with ``diagonal_wide_g=True`` any linear layer whose G alone is wider than ``max_kronecker_dim`` does.

Independent references: the same model's dense G (max_kronecker_dim raised) on the same batch, whose diagonal the
diagonal G must be, and the proposal from torch.linalg.inv of the damped A and the damped diagonal.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kronograph
from kronograph.errors import KronographError
from kronograph.runtime.inverse import CoverageWarning

CLASSES, WIDTH = 40, 8


def head_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, WIDTH), nn.Tanh(), nn.Linear(WIDTH, CLASSES))


class Tied(nn.Module):
    """A head tied to its table (GPT-2's): one weight read by both."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(CLASSES, 5), nn.Linear(5, CLASSES)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(tokens)))


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """48 inputs and a fixed linear teacher's classes of them."""
    teacher = torch.randn(6, CLASSES, generator=torch.Generator().manual_seed(99))
    x = torch.randn(48, 6, generator=torch.Generator().manual_seed(seed))
    return x, (x @ teacher).argmax(dim=1)


def _kfac(largest: int | None, **options) -> kronograph.optim.KFAC:
    cm = kronograph.compile(head_model(), (torch.randn(2, 6),), loss="cross_entropy")
    return kronograph.optim.KFAC(cm, seed=0, fisher="empirical", max_kronecker_dim=largest, centered_damping=False,
                                factor_damping_floor=0.0, output_noise_damping=False, factor_dtype=torch.float64,
                                diagonal_wide_g=True, **options)


def test_a_head_wider_than_max_kronecker_dim_keeps_the_diagonal_of_its_dense_g():
    wide, dense = _kfac(16), _kfac(None)
    assert wide.blocks["2"].layer.diagonal_g and not dense.blocks["2"].layer.diagonal_g
    assert not wide.blocks["0"].layer.diagonal_g
    x, y = _batch()
    wide.step(x, y)
    dense.step(x, y)  # 48 examples, below the statistics' floor: the whole batch, the EMAs are the batch's factors
    assert wide.blocks["2"].g.shape == (1, CLASSES)
    torch.testing.assert_close(wide.blocks["2"].g[0], torch.diagonal(dense.blocks["2"].g[0]))
    torch.testing.assert_close(wide.blocks["2"].a, dense.blocks["2"].a)


def test_an_output_layer_wider_than_diagonal_output_g_keeps_the_diagonal_of_its_dense_g_and_a_hidden_one_not():
    def kfac(threshold):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, CLASSES))  # the hidden G 24 wide too
        cm = kronograph.compile(model, (torch.randn(2, 6),), loss="cross_entropy")
        return kronograph.optim.KFAC(cm, seed=0, fisher="empirical", diagonal_output_g=threshold,
                                    factor_dtype=torch.float64)

    diagonal, dense = kfac(16), kfac(None)
    assert [diagonal.blocks[name].layer.diagonal_g for name in ("0", "2")] == [False, True]
    assert not any(block.layer.diagonal_g for block in dense.blocks.values())
    x, y = _batch()
    diagonal.step(x, y)
    dense.step(x, y)
    torch.testing.assert_close(diagonal.blocks["2"].g[0], torch.diagonal(dense.blocks["2"].g[0]))
    torch.testing.assert_close(diagonal.blocks["0"].g, dense.blocks["0"].g)


def test_the_onnxruntime_engine_keeps_the_diagonal_of_its_dense_g_too():
    def kfac(threshold):
        torch.manual_seed(0)
        cm = kronograph.compile(head_model(), (torch.randn(2, 6),), loss="cross_entropy", engine="onnxruntime")
        return kronograph.optim.KFAC(cm, seed=0, fisher="empirical", diagonal_output_g=threshold,
                                    factor_dtype=torch.float64)

    diagonal, dense = kfac(16), kfac(None)
    assert diagonal.blocks["2"].layer.diagonal_g and not dense.blocks["2"].layer.diagonal_g
    x, y = _batch()
    diagonal.step(x, y)
    dense.step(x, y)
    torch.testing.assert_close(diagonal.blocks["2"].g[0], torch.diagonal(dense.blocks["2"].g[0]))
    losses = [diagonal.step(*_batch(k))["loss"] for k in range(1, 20)]
    assert losses[-1] < 0.5 * losses[0]


def test_diagonal_output_g_is_on_by_default_off_in_the_paper_preset_and_covers_a_tied_head():
    from kronograph.runtime.methods.kfac_settings import PRESETS

    assert PRESETS["default"].diagonal_output_g == 1024 and PRESETS["paper"].diagonal_output_g is None

    cm = kronograph.compile(Tied(), (torch.randint(0, CLASSES, (2, 3)),), loss="cross_entropy")
    opt = kronograph.optim.KFAC(cm, seed=0, diagonal_output_g=4)
    assert {name: block.layer.diagonal_g for name, block in opt.blocks.items() if block.tied} == {
        "emb[embedding]": False, "emb[output]": True}  # (tests/test_tied_table.py checks the tie's solve)


def test_the_diagonal_blocks_proposal_is_the_damped_kronecker_solve():
    opt = _kfac(16)
    opt.step(*_batch())
    block, gamma = opt.blocks["2"], opt.inverted_gamma
    a, g = block.a[0], block.g[0]
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (g.sum() / g.shape[0]))
    generator = torch.Generator().manual_seed(1)
    grads = {name: torch.randn(p.shape, generator=generator, dtype=torch.float64)
             for name, p in opt.engine.parameters().items()}
    proposal = opt.curvature.direction(grads, opt.curvature.current(), {})
    bar = torch.cat([grads["2.weight"], grads["2.bias"][:, None]], dim=1)
    expected = (bar / (g + gamma / pi)[:, None]) @ torch.linalg.inv(a + pi * gamma * torch.eye(a.shape[0],
                                                                                                dtype=a.dtype))
    torch.testing.assert_close(proposal["2.weight"], -expected[:, :WIDTH])
    torch.testing.assert_close(proposal["2.bias"], -expected[:, WIDTH])


def test_kfac_trains_with_the_diagonal_g_and_without_it_the_head_has_no_block():
    losses = {}
    for wanted in (True, False):
        cm = kronograph.compile(head_model(), (torch.randn(2, 6),), loss="cross_entropy")
        with pytest.warns(CoverageWarning) if not wanted else _no_coverage_warning():
            opt = kronograph.optim.KFAC(cm, seed=0, max_kronecker_dim=16, diagonal_wide_g=wanted)
        assert ("2" in opt.blocks) == wanted
        losses[wanted] = [opt.step(*_batch(k))["loss"] for k in range(30)]
    assert all(math.isfinite(value) for run in losses.values() for value in run)
    assert losses[True][-1] < 0.5 * losses[True][0]


class _no_coverage_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", CoverageWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def _preconditioned(threshold: int | None, **options) -> tuple[nn.Module, kronograph.optim.KFACPreconditioner, dict]:
    """One step of KFACPreconditioner (raw solve, no bound) on the head model: the module, the preconditioner and the
    gradients before it rewrote them."""
    model = head_model()
    precond = kronograph.optim.KFACPreconditioner(
        kronograph.compile(model, (torch.randn(2, 6),), loss="cross_entropy"), graft=None, kl_clip=None,
        factor_dtype=torch.float64, diagonal_output_g=threshold, **options)
    x, y = _batch()
    with precond.track():
        nn.functional.cross_entropy(model(x), y).backward()
    raw = {name: p.grad.clone() for name, p in model.named_parameters()}
    precond.step()
    return model, precond, raw


def test_the_preconditioner_keeps_a_wide_heads_g_diagonal_and_solves_with_it():
    (model, diagonal, raw), (_, dense, _) = _preconditioned(16), _preconditioned(None)
    assert diagonal.blocks["2"].layer.diagonal_g and not diagonal.blocks["0"].layer.diagonal_g
    assert not dense.blocks["2"].layer.diagonal_g
    a, g = diagonal.blocks["2"].a[0], diagonal.blocks["2"].g[0]
    torch.testing.assert_close(g, torch.diagonal(dense.blocks["2"].g[0]))  # the same batch's factors
    gamma = diagonal.damping
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (g.sum() / g.shape[0]))
    bar = torch.cat([raw["2.weight"], raw["2.bias"][:, None]], dim=1).double()
    expected = (bar / (g + gamma / pi)[:, None]) @ torch.linalg.inv(a + pi * gamma * torch.eye(a.shape[0],
                                                                                                dtype=a.dtype))
    torch.testing.assert_close(model[2].weight.grad.double(), expected[:, :WIDTH], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(model[2].bias.grad.double(), expected[:, WIDTH], rtol=1e-5, atol=1e-8)


def test_the_preconditioners_diagonal_output_g_is_on_by_default_and_covers_a_tied_head():
    cm = kronograph.compile(Tied(), (torch.randint(0, CLASSES, (2, 3)),), loss="cross_entropy")
    precond = kronograph.optim.KFACPreconditioner(cm, diagonal_output_g=4)
    assert {name: block.layer.diagonal_g for name, block in precond.blocks.items() if block.tied} == {
        "emb[embedding]": False, "emb[output]": True}
    tokens = torch.randint(0, CLASSES, (16, 3), generator=torch.Generator().manual_seed(0))
    with precond.track():
        nn.functional.cross_entropy(cm.module(tokens).flatten(0, 1), tokens.roll(1, 1).flatten()).backward()
    raw = cm.module.emb.weight.grad.clone()
    precond.step()  # the tie's row side a diagonal pencil (runtime/tied.py): solved, finite, not the raw gradient
    solved = cm.module.emb.weight.grad
    assert torch.isfinite(solved).all() and not torch.allclose(solved, raw)
    default = kronograph.optim.KFACPreconditioner(kronograph.compile(head_model(), (torch.randn(2, 6),),
                                                                     loss="cross_entropy"))
    assert not default.blocks["2"].layer.diagonal_g  # 40 classes: below the default 1024


@pytest.mark.parametrize("threshold", [0, -5, 2.5, "wide"])
def test_the_preconditioner_names_a_bad_diagonal_output_g(threshold):
    cm = kronograph.compile(head_model(), (torch.randn(2, 6),), loss="cross_entropy")
    with pytest.raises(KronographError, match="diagonal_output_g"):
        kronograph.optim.KFACPreconditioner(cm, diagonal_output_g=threshold)
