"""FSDP2 (``fully_shard``) parameters as K-FAC meets them: the weight a layer computes with, its whole gradient,
and this rank's rows of a preconditioned gradient.

FSDP2 keeps each parameter as a DTensor sharded by rows (``Shard(0)`` over a 1-D device mesh: rank r holds
``torch.chunk(W, world)[r]``). Around a module's forward it all-gathers them and sets the module's attributes
to plain unsharded Parameters (the same objects at every forward), so a layer's site is a call with that
Parameter, not with the DTensor ``named_parameters()`` returns (``parameter_holder``). After the backward each
rank holds its rows of the ranks' mean gradient. K-FAC's solve G^-1 grad_W A^-1 mixes every row (G is
out x out), so ``KFACPreconditioner`` gathers one layer's whole gradient at a time (``whole``: an all_gather,
the size of the layer, which FSDP's own forward also pays), solves it as DDP would and keeps this rank's rows
(``local_rows``): the result is K-FAC's, exactly, not a per-shard approximation. The factors and inverses
are not sharded: every rank holds all of them, as under DDP.
"""

from __future__ import annotations

import sys

import torch

from kronograph.errors import KronographError


def dtensor_class() -> type | None:
    """torch's DTensor class when torch.distributed.tensor is imported (a sharded model has imported it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_sharded(tensor: torch.Tensor | None) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def any_sharded(module: torch.nn.Module) -> bool:
    """Whether some parameter of ``module`` is a DTensor (FSDP2 or tensor parallelism)."""
    return dtensor_class() is not None and any(is_sharded(p) for p in module.parameters())


def parameter_holder(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """The submodule holding parameter path ``name`` of ``module`` and its attribute there: inside FSDP2's forward
    that attribute is the unsharded Parameter the layer computes with."""
    owner, _, attribute = name.rpartition(".")
    return (module.get_submodule(owner) if owner else module), attribute


def check_row_sharded(name: str, param: torch.Tensor) -> None:
    """Raise KronographError unless the DTensor ``param`` is sharded by rows over a 1-D mesh (FSDP2's
    default); other layouts (HSDP's 2-D mesh, tensor parallelism's column shards) are not supported."""
    from torch.distributed.tensor import Shard

    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise KronographError(f"parameter {name!r} is a DTensor placed {tuple(param.placements)} over a "
                              f"{param.device_mesh.ndim}-D mesh; KFACPreconditioner supports FSDP2's fully_shard "
                              "over one mesh dimension (Shard(0)), not HSDP or tensor parallelism")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a row-sharded DTensor (an all_gather every rank of its mesh joins); a plain tensor as
    it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_rows(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The rows of a whole ``value`` shaped like ``param`` that this rank's shard of ``param`` holds."""
    mesh = param.device_mesh
    pieces = torch.chunk(value, mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    rows = pieces[rank] if rank < len(pieces) else value[:0]
    if rows.shape != param.to_local().shape:  # not torch.chunk's split: a sharding this module does not know
        raise KronographError(f"a shard of shape {tuple(param.to_local().shape)} is not rows {rank} of "
                              f"{mesh.size()} of a {tuple(value.shape)} tensor; KFACPreconditioner supports "
                              "FSDP2's fully_shard with its default row sharding")
    return rows
