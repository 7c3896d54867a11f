"""Factories named as package.module:factory by the CLI tests (PYTHONPATH=tests)."""

from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def broken() -> nn.Module:
    raise RuntimeError("the config file is missing")


def not_a_module() -> str:
    return "model"
