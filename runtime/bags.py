"""An EmbeddingBag (``F.embedding_bag``, mode "sum" or "mean", on 2-D bags) as an embedding read once a token.

A bag's output is the (weighted) sum of its tokens' rows, o_b = sum_i w_i W[k_i] (w_i = 1 / |bag| for "mean", the
per-sample weight or 1 for "sum", 0 for ``padding_idx``): the linear map of an embedding applied to each token,
then a fixed weighted sum. Its Kronecker block is the table's, one row a token (as a sequence's tokens are rows):
A the diagonal of how often each row is read, G from each token's output gradient w_i g_b. The fused kernel has
no per-token output to take that gradient at, so the torch engine's capture runs a bag as ``F.embedding`` of its
tokens and the weighted sum (``per_token``): the same values and gradient up to float rounding, at the fused
kernel's cost on the first-try suite's bag model (forward and backward 5.6 ms either way, batch 256 of 8 words).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

#: F.embedding_bag's arguments in order (its keywords are the same names)
_ARGUMENTS = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
              "per_sample_weights", "include_last_offset", "padding_idx")
_DEFAULTS = {"offsets": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "mode": "mean",
             "sparse": False, "per_sample_weights": None, "include_last_offset": False, "padding_idx": None}
FUNCTION = torch.nn.functional.embedding_bag


@dataclass(frozen=True)
class BagCall:
    """A linear bag call's arguments: indices [bags, n], a bag a row."""

    input: torch.Tensor
    weight: torch.Tensor
    mode: str
    per_sample_weights: torch.Tensor | None
    padding_idx: int | None


def linear_call(args: tuple, kwargs: dict) -> BagCall | None:
    """The call's arguments where the bag is a weighted sum of its rows ("sum" or "mean") over 2-D bags, else
    None: "max" is no linear map; max_norm (renormalising the table in place), scale_grad_by_freq and sparse
    gradients are not the table's plain linear map either; and flat words cut by ``offsets`` give each example a
    different number of token rows, which the statistics cannot split into examples."""
    bound = {**_DEFAULTS, **dict(zip(_ARGUMENTS, args)), **kwargs}
    if (bound["mode"] not in ("sum", "mean") or bound["max_norm"] is not None or bound["scale_grad_by_freq"]
            or bound["sparse"] or bound["offsets"] is not None or not isinstance(bound["input"], torch.Tensor)
            or bound["input"].dim() != 2 or not isinstance(bound["weight"], torch.Tensor)
            or bound["weight"].dim() != 2):
        return None
    padding = bound["padding_idx"]
    if padding is not None and padding < 0:
        padding += bound["weight"].shape[0]
    return BagCall(bound["input"], bound["weight"], bound["mode"], bound["per_sample_weights"], padding)


def per_token(call: BagCall, embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``F.embedding_bag``'s result computed from ``embed(indices)``, the tokens' rows [bags, n, dim]
    (``F.embedding`` of the table, which the caller records), and each token's weight in its bag."""
    indices = call.input
    rows = embed(indices)
    members = (torch.ones_like(indices, dtype=torch.bool) if call.padding_idx is None
               else indices != call.padding_idx)  # a padding token is no member of its bag
    weights = members.to(rows.dtype)
    if call.per_sample_weights is not None:
        weights = weights * call.per_sample_weights.to(rows.dtype)
    if call.mode == "mean":
        weights = weights / members.sum(-1, keepdim=True).clamp(min=1).to(rows.dtype)
    return (rows * weights.unsqueeze(-1)).sum(-2)
