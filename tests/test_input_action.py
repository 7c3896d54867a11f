"""A s and a_hat of runtime/input_action.py against a dense A built here (float64).

The expected A is built explicitly: linear rows [x_i, 1], conv patches from F.unfold written in this file
(not runtime/patches.py); A = (1/m) sum_rows a a^T (thesis (3.9)/(3.15): summed over locations). It is
also compared with kronograph's own mini-batch factor ``batch_factors`` times s.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kronograph.runtime.capture import Capture, SiteRecord
from kronograph.runtime.factors import batch_factors
from kronograph.runtime.input_action import gather_rows, input_factor_action, input_secant_pair, mean_input

from plan_helpers import conv_layer, linear_layer

TOL = dict(rtol=1e-12, atol=1e-12)
F64 = torch.float64


def ones_column(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


def vectors(d: int, gen: torch.Generator, groups: int | None = None) -> list[torch.Tensor]:
    lead = () if groups is None else (groups,)
    return [torch.randn(*lead, d, generator=gen, dtype=F64), torch.randn(*lead, d, 3, generator=gen, dtype=F64)]


def check(layer, records, dense_a, rows_by_group, n, gen, index=None) -> None:
    """A s == dense_a s == batch_factors' A s for s [d] and [d, 3]; a_hat == mean of the rows."""
    groups = layer.groups
    kron_a = batch_factors(layer, records, batch_size=n, index=index, dtype=F64)[0]
    torch.testing.assert_close(kron_a, dense_a, **TOL)  # sanity: the test's dense A is kronograph's A
    for s in vectors(layer.a_dim, gen, groups if groups > 1 else None):
        got = input_factor_action(layer, records, s, batch_size=n, index=index)
        assert got.shape == s.shape and got.dtype == F64
        if groups == 1:
            torch.testing.assert_close(got, dense_a[0] @ s, **TOL)
            torch.testing.assert_close(got, kron_a[0] @ s, **TOL)
        else:
            col = s if s.dim() == 3 else s.unsqueeze(-1)
            want = (dense_a @ col).reshape(s.shape)
            torch.testing.assert_close(got, want, **TOL)
            torch.testing.assert_close(got, (kron_a @ col).reshape(s.shape), **TOL)
    a_hat = mean_input(layer, records, batch_size=n, index=index, dtype=F64)
    want = torch.stack([rows.mean(dim=0) for rows in rows_by_group])
    torch.testing.assert_close(a_hat, want if groups > 1 else want[0], **TOL)


# -- linear ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["plain", "sequence", "flattened sequence"])
def test_linear_action_equals_dense_a(bias: bool, layout: str) -> None:
    gen = torch.Generator().manual_seed(1)
    n, t, d_in = 5, 3, 4
    x = torch.randn(n, t, d_in, generator=gen, dtype=F64)
    if layout == "plain":
        x = x[:, 0]
    elif layout == "flattened sequence":
        x = x.reshape(n * t, d_in)  # batch-major, as GPT-2's x.view(-1, in)
    g = torch.randn(*x.shape[:-1], 2, generator=gen, dtype=F64)
    layer = linear_layer("l", "w", "b" if bias else None, (2, d_in))
    records = [SiteRecord("l", 0, x, None, g=g)]
    rows = x.reshape(-1, d_in)
    rows = ones_column(rows) if bias else rows
    dense = sum(torch.outer(r, r) for r in rows) / n  # (1/m) sum_i sum_t a a^T, m = n examples
    check(layer, records, dense[None], [rows], n, gen)


def test_linear_subset_and_shared_weight() -> None:
    """index keeps some examples (m = 2); two sites of one weight pool their rows as more positions."""
    gen = torch.Generator().manual_seed(2)
    n = 4
    x1, x2 = torch.randn(n, 3, generator=gen, dtype=F64), torch.randn(n, 2, 3, generator=gen, dtype=F64)
    layer = linear_layer("l", "w", "b", (2, 3), sites=2)
    records = [SiteRecord("l", 0, x1, None, g=torch.randn(n, 2, generator=gen, dtype=F64)),
               SiteRecord("l", 1, x2, None, g=torch.randn(n, 2, 2, generator=gen, dtype=F64))]
    index = torch.tensor([1, 3])
    rows = ones_column(torch.cat([x1[index], x2[index].reshape(-1, 3)]))
    dense = rows.T @ rows / len(index)
    check(layer, records, dense[None], [rows], n, gen, index=index)


def test_large_input_without_forming_a() -> None:
    """a_dim = 200001: a dense A would need 320 GB in float64; the action needs the rows only."""
    gen = torch.Generator().manual_seed(3)
    n, d_in = 3, 200_000
    x = torch.randn(n, d_in, generator=gen, dtype=F64)
    layer = linear_layer("l", "w", "b", (2, d_in))
    s = torch.randn(d_in + 1, 2, generator=gen, dtype=F64)
    rows = ones_column(x)
    want = sum(torch.outer(r, r @ s) for r in rows) / n
    got = input_factor_action(layer, [SiteRecord("l", 0, x, None)], s, batch_size=n)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)  # sums of 2e5 terms


# -- convolutions --------------------------------------------------------------------------------------
def unfold_rows(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Patch rows [N * T, C * K] of conv1d/conv2d, from F.unfold (conv1d as a conv2d of height 1)."""
    kernel, stride, padding, dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if x.dim() == 3:
        x = x.unsqueeze(2)
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C*K, T]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


CONVS = [
    ("conv2d stride 2 pad 1 dilation 2", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), (7, 8)),
    ("conv2d no bias", lambda: nn.Conv2d(2, 3, (2, 3), stride=2, padding=1, dilation=2, bias=False), (6, 7)),
    ("conv2d groups=2", lambda: nn.Conv2d(4, 6, 2, stride=2, padding=1, dilation=2, groups=2), (5, 6)),
    ("conv1d", lambda: nn.Conv1d(3, 2, 3, stride=2, padding=2, dilation=2), (11,)),
]


@pytest.mark.parametrize("make, spatial", [c[1:] for c in CONVS], ids=[c[0] for c in CONVS])
def test_conv_action_equals_dense_a_from_unfold(make, spatial: tuple[int, ...]) -> None:
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    n = 3
    conv = make().double()
    x = torch.randn(n, conv.in_channels, *spatial, generator=gen, dtype=F64)
    layer = conv_layer("0", conv)  # the geometry used is the call's own, recorded by Capture
    with Capture(nn.Sequential(conv), (layer,)) as cap:  # parameter names "0.weight", "0.bias"
        out = conv(x)
    (out**2).sum().backward()
    records = cap.records["0"]
    t = math.prod(out.shape[2:])
    assert t > 1

    patches = unfold_rows(x, conv)  # [n * T, C * K], channel-major columns
    assert patches.shape[0] == n * t
    per_group = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    rows_by_group = []
    for k in range(conv.groups):
        rows = patches[:, k * per_group : (k + 1) * per_group]
        rows_by_group.append(ones_column(rows) if conv.bias is not None else rows)
    # thesis (3.9)/(3.15): A = E_n[sum_t a_t a_t^T], summed (not averaged) over locations
    dense = torch.stack([rows.T @ rows / n for rows in rows_by_group])
    check(layer, records, dense, rows_by_group, n, gen)


def test_secant_pair_matches_dense_formula() -> None:
    """(3.14): s_A = H_A a_hat, y_A = A s_A + lambda_A s_A, with the dense A and a_hat of the test."""
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    n = 2
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2).double()
    x = torch.randn(n, 2, 7, 7, generator=gen, dtype=F64)
    layer = conv_layer("0", conv)
    with Capture(nn.Sequential(conv), (layer,)) as cap:
        conv(x)
    rows = ones_column(unfold_rows(x, conv))
    dense = rows.T @ rows / n
    m = torch.randn(layer.a_dim, layer.a_dim, generator=gen, dtype=F64)
    h_a = m @ m.T + torch.eye(layer.a_dim, dtype=F64)
    want_s = h_a @ rows.mean(dim=0)
    gathered = gather_rows(layer, cap.records["0"], n, dtype=F64)  # the patches extracted once, used twice
    for records in (cap.records["0"], gathered):
        s_a, y_a = input_secant_pair(layer, records, h_a, 0.3, batch_size=n)
        torch.testing.assert_close(s_a, want_s, **TOL)
        torch.testing.assert_close(y_a, dense @ want_s + 0.3 * want_s, **TOL)


def test_rejects_a_mis_shaped_vector() -> None:
    x = torch.randn(2, 3, dtype=F64)
    layer = linear_layer("l", "w", "b", (2, 3))
    with pytest.raises(ValueError, match="does not fit"):
        input_factor_action(layer, [SiteRecord("l", 0, x, None)], torch.randn(3, dtype=F64), batch_size=2)
