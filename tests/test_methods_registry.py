"""The methods' home: every method's settings dataclass is the one source of its command-line flags, config
keys and defaults (runtime/methods/settings.py, cli/optimizers.py), so a new method adds no shared option."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import click
import pytest
import torch
from torch import nn

import kronograph

from kronograph.cli import optimizers
from kronograph.errors import KronographError
from kronograph.runtime.methods import METHODS
from kronograph.runtime.methods.settings import check, describe, setting


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_the_common_face_and_documented_settings(name):
    cls = METHODS[name]
    assert cls.SUMMARY and "default" in cls.PRESETS
    assert all(isinstance(preset, cls.Settings) for preset in cls.PRESETS.values())
    for field in dataclasses.fields(cls.Settings):
        assert field.metadata.get("help"), f"{name}.{field.name} has no help"
    for key, value in optimizers.DEFAULTS[name].items():
        if key != "preset":
            assert value == getattr(cls.PRESETS["default"], key)


@pytest.mark.parametrize("name", [name for name in METHODS if name not in ("sgd", "adam")])
def test_no_method_leaves_a_gradient_of_its_own_passes_in_grad(name):
    # The methods run their own passes (half batches, sampled targets, per-example ones): none may leave a
    # gradient other than the step's in .grad, so none is left (sgd and adam keep torch's own: the step's).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    optimizer = METHODS[name](kronograph.compile(model, (torch.randn(2, 4),), loss="cross_entropy"), seed=0)
    for _ in range(2):
        optimizer.step(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    assert all(param.grad is None for param in model.parameters())


@dataclass(frozen=True)
class _ToySettings:
    lr: float = setting(0.5, "Step length.", low=0, low_open=True)
    rank: int = setting(4, "Sketch rank.", low=1)
    mode: str = setting("fast", "fast or exact.", choices=("fast", "exact"))
    warm: bool = setting(False, "Warm start.")
    tag: str = setting("x", "Not on the command line.", cli=False)

    def __post_init__(self) -> None:
        check(self, "Toy")


class _Toy:
    SUMMARY = "a toy"
    Settings = _ToySettings
    PRESETS = {"default": _ToySettings(), "bold": _ToySettings(lr=2.0)}

    def __init__(self, compiled, preset="default", seed=None, **settings):
        self.compiled, self.preset, self.seed, self.settings = compiled, preset, seed, settings


def test_a_new_method_brings_its_flags_without_touching_a_shared_table(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", _Toy)
    specs = {spec.key: spec for spec in optimizers._options()}
    assert specs["rank"].applies == ("toy",) and isinstance(specs["rank"].type, click.IntRange)
    assert specs["mode"].type.choices == ("fast", "exact") and specs["warm"].switch
    assert "tag" not in specs
    assert "toy" in specs["lr"].applies and "kfac" in specs["lr"].applies  # one --lr for every method
    assert {"kfac", "toy"} <= set(specs["preset"].applies) and "sgd" not in specs["preset"].applies
    assert [field.name for field in describe(_ToySettings)] == ["lr", "rank", "mode", "warm"]


def test_options_are_converted_and_checked_by_the_methods_own_fields(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", _Toy)
    monkeypatch.setattr(optimizers, "_SPECS", {spec.key: spec for spec in optimizers._options()})
    resolved = optimizers.resolve_options("toy", {"preset": "bold", "rank": "8"})
    assert resolved == {"preset": "bold", "lr": 2.0, "rank": 8, "mode": "fast", "warm": False}
    # --momentum is text shared by methods of different kinds: each reads it with its own field
    assert optimizers.resolve_options("kfac", {"momentum": "none"})["momentum"] is None
    assert optimizers.resolve_options("sgd", {"momentum": "0.5"})["momentum"] == 0.5
    with pytest.raises(KronographError, match="--momentum qmodel"):
        optimizers.resolve_options("sgd", {"momentum": "qmodel"})
    with pytest.raises(KronographError, match="rank=0 must be >= 1"):
        optimizers.resolve_options("toy", {"rank": 0})
    with pytest.raises(KronographError, match="--rank applies to --optimizer toy, not adam"):
        optimizers.resolve_options("adam", {"rank": 3})
    with pytest.raises(KronographError, match="--no-rescale"):  # a rule across fields, said by the method
        optimizers.resolve_options("kfac", {"momentum": "0.9"})
    assert optimizers.resolve_options("kfac", {"rescale": False})["momentum"] is None  # qmodel needs re-scaling


def test_make_optimizer_builds_the_method_with_its_resolved_settings(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", _Toy)
    monkeypatch.setattr(optimizers, "_SPECS", {spec.key: spec for spec in optimizers._options()})
    built = optimizers.make_optimizer("toy", "CM", {"mode": "exact"}, seed=3)
    assert (built.compiled, built.preset, built.seed) == ("CM", "default", 3)
    assert built.settings == {"lr": 0.5, "rank": 4, "mode": "exact", "warm": False}


@pytest.fixture(scope="module")
def linear_model() -> kronograph.CompiledModel:
    return kronograph.compile(nn.Sequential(nn.Linear(4, 3)), (torch.randn(2, 4),), loss="cross_entropy")


@pytest.mark.parametrize("name", [name for name in METHODS if name != "kfac"])
def test_a_method_that_does_not_run_data_parallel_is_refused_under_several_ranks(name, linear_model):
    """Under torch.distributed with 2 ranks (faked: the group is found, no collective runs) each rank would
    train its own replica and the replicas would drift apart silently; only KFAC (and KFACPreconditioner) run there."""
    from unittest import mock

    import torch.distributed as dist

    from kronograph.runtime import distributed

    cm = linear_model
    with mock.patch.object(distributed, "active_group", return_value="the default group"), \
            mock.patch.object(dist, "get_world_size", return_value=2):
        with pytest.raises(KronographError, match=f"{METHODS[name].__name__} does not run data-parallel yet.*KFAC"):
            METHODS[name](cm)
    METHODS[name](cm)  # one process: made as before
