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

``KFAC`` runs its own passes (statistics, the halves' gradients, the exact-Fisher products, rho's forward), a
different number on each rank where the slices differ, so inside its step FSDP must not communicate at all:
``unsharded`` gathers every parameter once (each FSDP module's ``unshard``) and keeps them whole, with FSDP's
reduce-scatter off, for the step; KFAC all-reduces the gradient itself as it does without FSDP, and its update
goes to the whole weights (for the rest of the step) and to this rank's rows (``ShardedWeights.add_``), which
FSDP keeps when it reshards at the end. The step holds the whole model, as FSDP's forward does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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
                              f"{param.device_mesh.ndim}-D mesh; kronograph supports FSDP2's fully_shard "
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
                              f"{mesh.size()} of a {tuple(value.shape)} tensor; kronograph supports "
                              "FSDP2's fully_shard with its default row sharding")
    return rows


def fsdp_class() -> type | None:
    """FSDP2's FSDPModule class when torch.distributed.fsdp is imported (a sharded model has imported it)."""
    module = sys.modules.get("torch.distributed.fsdp")
    return None if module is None else module.FSDPModule


def fsdp_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``module`` that FSDP2's ``fully_shard`` manages (the root among them)."""
    cls = fsdp_class()
    return [] if cls is None else [m for m in module.modules() if isinstance(m, cls)]


@contextmanager
def unsharded(module: torch.nn.Module) -> Iterator[None]:
    """Every parameter of the FSDP2-sharded ``module`` whole, and FSDP silent, for the span: one all_gather per
    FSDP module on entry (``unshard``), then forwards and backwards that run no collective (no reshard after
    forward or backward, no gradient reduce-scatter: the unsharded Parameters keep their own ``.grad``), so ranks
    may run different numbers of passes. On exit FSDP's settings are put back and the parameters resharded; what
    was written to the whole Parameters is dropped (write this rank's rows too: ``ShardedWeights``).

    FSDP2 has setters but no getters for these settings; they are read from its param groups (torch 2.13's
    attributes ``post_forward_mesh_info``, ``reduce_grads``, ``all_reduce_grads``, ``reshard_after_backward``)."""
    managed = fsdp_modules(module)
    saved = []
    for fsdp_module in managed:
        state = fsdp_module._get_fsdp_state()
        saved.append((state, state._auto_reshard_after_forward,
                      [(group, group.post_forward_mesh_info, group.reduce_grads, group.all_reduce_grads,
                        group.reshard_after_backward) for group in state._fsdp_param_groups]))
    try:
        for fsdp_module in managed:
            fsdp_module.set_reshard_after_forward(False, recurse=False)
            fsdp_module.set_reshard_after_backward(False, recurse=False)
            fsdp_module.set_requires_gradient_sync(False, recurse=False)
        for fsdp_module in managed:
            fsdp_module.unshard()
        yield
    finally:
        for state, automatic, groups in saved:
            state._auto_reshard_after_forward = automatic
            for group, mesh_info, reduce, all_reduce, after_backward in groups:
                group.post_forward_mesh_info, group.reshard_after_backward = mesh_info, after_backward
                group.reduce_grads, group.all_reduce_grads = reduce, all_reduce
        for fsdp_module in managed:
            fsdp_module.reshard()


class ShardedWeights:
    """The row-sharded DTensor parameters of an FSDP2 model, by name, checked once: updates to the whole weights
    inside ``unsharded`` are written to this rank's rows as well (``add_``, ``copy_``)."""

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        named = dict(module.named_parameters())
        self.params = {name: named[name] for name in names if is_sharded(named.get(name))}
        for name, param in self.params.items():
            check_row_sharded(name, param)

    def check_ranks(self, group) -> None:
        """Raise KronographError unless the shards' mesh spans the ranks of ``group`` (the data-parallel ranks
        K-FAC steps with; None: this process alone)."""
        if not self.params:
            return
        sharded_over = sorted(next(iter(self.params.values())).device_mesh.mesh.flatten().tolist())
        ranks = [torch.distributed.get_rank()] if group is None else torch.distributed.get_process_group_ranks(group)
        if sharded_over != sorted(ranks):
            raise KronographError(f"the model is sharded over the ranks {sharded_over} but K-FAC steps with the ranks "
                                  f"{sorted(ranks)}; give process_group the group fully_shard's mesh spans (its "
                                  "data-parallel ranks)")

    @staticmethod
    def check_whole(params: Mapping[str, torch.Tensor]) -> None:
        """Raise KronographError where a parameter is still a DTensor inside ``unsharded``: FSDP2 does not manage
        it (a DTensor made otherwise, tensor parallelism's), so nothing gathered it."""
        left = sorted(name for name, param in params.items() if is_sharded(param))
        if left:
            raise KronographError(f"the parameters {left} are DTensors that FSDP2's fully_shard does not manage "
                                  "(tensor parallelism?); K-FAC supports models sharded by fully_shard only")

    def add_(self, update: Mapping[str, torch.Tensor]) -> None:
        """This rank's rows of each sharded parameter += its rows of the whole ``update``."""
        with torch.no_grad():
            for name, delta in update.items():
                param = self.params.get(name)
                if param is not None:
                    local = param.to_local()
                    local.add_(local_rows(param, delta).to(local.dtype))

    def copy_(self, values: Mapping[str, torch.Tensor]) -> None:
        """This rank's rows of each sharded parameter = its rows of the whole ``values``."""
        with torch.no_grad():
            for name, value in values.items():
                param = self.params.get(name)
                if param is not None:
                    param.to_local().copy_(local_rows(param, value))
