"""The wrappers users put around a module before ``kronograph.compile``: which are seen through, which refused.

* ``torch.compile(model)`` and ``DistributedDataParallel(model)`` are seen through (``unwrapped``): compile
  plans, and K-FAC trains, the module inside, whose parameters are the wrapper's (shared, updated in place).
  For DDP this is the whole design: ``kronograph.optim.KFAC`` is data parallel by itself (it all-reduces the
  gradient, weighted by each rank's share of the global batch, and the statistics: runtime/data_parallel.py),
  so DDP's reducer must not run too. Running K-FAC's passes on the inner module means DDP's forward (which
  arms the reducer for the next backward) is never called: no second all_reduce of the gradient, no
  collective from a backward only some ranks run (a statistics pass on a rank with no member of the subset),
  no equal-weight average where the ranks' slices differ; the result is the unwrapped data-parallel run's, bit
  for bit. ``KFACPreconditioner`` in the user's DDP loop hooks the inner module, which DDP's forward calls.
  The plan, ``cm.state_dict()`` and the parameter names are the inner module's (no ``module.`` prefix).
* Sharded parameters are refused (``refuse_sharded``): FSDP2's ``fully_shard``, FSDP1's
  ``FullyShardedDataParallel`` and any other DTensor parameter (tensor parallelism) leave each rank a shard
  of a layer's weight (or gather it only inside forward and backward), and the export fails on the DTensors
  with an unrelated message. The fix the message names: compile the plain module, then ``fully_shard`` it in
  place; ``KFAC`` steps it (each step gathers the weights whole, runtime/sharded.py) and ``KFACPreconditioner``
  preconditions the user's FSDP loop (it gathers one layer's gradient at a time). FSDP1 and tensor parallelism
  stay refused by both.
"""

from __future__ import annotations

import sys

import torch

from kronograph.errors import KronographError
from kronograph.runtime.sharded import is_sharded

_SHARDED_FIX = (
    "compile the plain module first, then shard it with FSDP2's fully_shard (it works in place): "
    "kronograph.optim.KFAC steps the sharded module (each step gathers its weights whole) and "
    "kronograph.optim.KFACPreconditioner preconditions your FSDP loop; FSDP1 (FullyShardedDataParallel) and "
    "tensor parallelism are not supported"
)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module K-FAC trains inside ``torch.compile`` and ``DistributedDataParallel`` wrappers (either order,
    nested): see the module docstring."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod  # torch.compile(model): its parameters are the original module's
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # DDP: KFAC sums the gradient itself, so DDP's reducer must not run
        else:
            return model


def refuse_sharded(model: torch.nn.Module) -> None:
    """Raise KronographError when ``model`` (or a submodule) is FSDP-wrapped or holds DTensor parameters.

    The FSDP and DTensor classes are looked up only where their modules are already imported: a model built
    with them has imported them, and compile does not pay for importing torch.distributed's packages."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        for name, module in model.named_modules():
            where = f"submodule {name!r}" if name else "the model"
            if isinstance(module, fsdp.FSDPModule):
                raise KronographError(f"{where} is sharded by FSDP (fully_shard); {_SHARDED_FIX}")
            if isinstance(module, fsdp.FullyShardedDataParallel):
                raise KronographError(f"{where} is wrapped in FullyShardedDataParallel, which shards the "
                                      f"parameters; {_SHARDED_FIX}")
    for name, param in model.named_parameters():
        if is_sharded(param):
            raise KronographError(f"parameter {name!r} is a DTensor (FSDP or tensor parallelism shards it "
                                  f"over a device mesh); {_SHARDED_FIX}")
