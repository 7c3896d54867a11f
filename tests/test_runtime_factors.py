"""K-FAC / KFC factors of captured sites against explicit per-example computations (float64).

The expected values are built from DESIGN.md's definitions with autograd, per-example backward passes
and explicit loops over examples, positions and kernel offsets; nothing here calls the runtime's own
patch or factor formulas.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph
from kronograph.passes.plan import ConvGeometry, Layer, Site
from kronograph.runtime.blocks import KroneckerBlock
from kronograph.runtime.capture import Capture
from kronograph.runtime.factors import batch_factors
from kronograph.runtime.wbar import gather

from plan_helpers import conv_layer, linear_layer

ATOL = 1e-10



def vec(matrix: torch.Tensor) -> torch.Tensor:
    """The paper's vec: columns stacked."""
    return matrix.T.reshape(-1)


# -- n = 1: the Kronecker block IS the per-example Fisher block ---------------------------------------
class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 3, bias=False)
        self.w3 = nn.Parameter(torch.randn(2, 3))
        self.b3 = nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l2(torch.tanh(self.l1(x))))
        return F.linear(h, self.w3, self.b3)


def test_mlp_factors_equal_per_example_fisher_when_n_is_1() -> None:
    torch.manual_seed(0)
    model = TinyMLP().double()
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
    cm = kronograph.compile(model, example_inputs=(x,))
    assert {layer.weight for layer in cm.layers} == {"l1.weight", "l2.weight", "w3"}
    with Capture(model, cm.plan) as cap:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    params = dict(model.named_parameters())
    for layer in cm.layers:
        block = KroneckerBlock(layer, dtype=torch.float64)
        block.update(cap.records[layer.name], batch_size=1, decay=0.0)
        grad = params[layer.weight].grad
        if layer.bias is not None:
            grad = torch.cat([grad, params[layer.bias].grad[:, None]], dim=1)
        v = vec(grad)
        torch.testing.assert_close(block.to_dense(), torch.outer(v, v), rtol=0, atol=ATOL)


def test_conv_factors_equal_per_example_fisher_when_single_location() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, (3, 4), stride=2, padding=1, dilation=2).double()
    head = nn.Linear(3, 4).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head)
    x, y = torch.randn(1, 2, 4, 5, dtype=torch.float64), torch.tensor([2])
    assert conv(x).shape[2:] == (1, 1)  # T = 1: KFC is exact
    layer = conv_layer("0", conv)
    with Capture(model, (layer,)) as cap:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    block = KroneckerBlock(layer, dtype=torch.float64)
    block.update(cap.records["0"], batch_size=1, decay=0.0)
    v = vec(torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], dim=1))
    torch.testing.assert_close(block.to_dense(), torch.outer(v, v), rtol=0, atol=ATOL)


# -- n > 1: the scaling of a mean loss, sum losses and sub-batches ------------------------------------
def _per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per example: the activation a_bar of l1 and g = dl_i/ds (the bias gradient of l1)."""
    a_bars, gs = [], []
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        gs.append(model.l1.bias.grad.clone())
        a_bars.append(torch.cat([x[i], torch.ones(1, dtype=x.dtype)]))
    model.zero_grad()
    return a_bars, gs


def test_mean_loss_gradients_are_rescaled_to_per_example() -> None:
    torch.manual_seed(2)
    model = TinyMLP().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    layer = linear_layer("l1", "l1.weight", "l1.bias", (4, 3))
    a_bars, gs = _per_example(model, x, y)
    want_a = sum(torch.outer(a, a) for a in a_bars) / 5
    want_g = sum(torch.outer(g, g) for g in gs) / 5

    with Capture(model, (layer,)) as cap:
        mean_loss = F.cross_entropy(model(x), y)
    mean_loss.backward()
    a, g = batch_factors(layer, cap.records["l1"], batch_size=5, dtype=torch.float64)
    torch.testing.assert_close(a[0], want_a, rtol=0, atol=ATOL)
    torch.testing.assert_close(g[0], want_g, rtol=0, atol=ATOL)

    with Capture(model, (layer,)) as cap:
        sum_loss = F.cross_entropy(model(x), y, reduction="sum")
    cap.gradients_from(sum_loss)
    _, g_sum = batch_factors(layer, cap.records["l1"], batch_size=5, grad_scale=1.0, dtype=torch.float64)
    torch.testing.assert_close(g_sum[0], want_g, rtol=0, atol=ATOL)


def test_statistics_on_a_subset_of_the_batch() -> None:
    torch.manual_seed(3)
    model = TinyMLP().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    layer = linear_layer("l1", "l1.weight", "l1.bias", (4, 3))
    index = torch.tensor([1, 4, 5])
    a_bars, gs = _per_example(model, x[index], y[index])
    with Capture(model, (layer,)) as cap:
        out = model(x)
    cap.gradients_from(F.cross_entropy(out[index], y[index]))  # a mean over the 3 chosen examples
    a, g = batch_factors(layer, cap.records["l1"], batch_size=6, index=index, dtype=torch.float64)
    torch.testing.assert_close(a[0], sum(torch.outer(v, v) for v in a_bars) / 3, rtol=0, atol=ATOL)
    torch.testing.assert_close(g[0], sum(torch.outer(v, v) for v in gs) / 3, rtol=0, atol=ATOL)


def test_float32_factors_from_a_float64_model() -> None:
    torch.manual_seed(4)
    model = TinyMLP().double()
    layer = linear_layer("l1", "l1.weight", "l1.bias", (4, 3))
    with Capture(model, (layer,)) as cap:
        model(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    a, g = batch_factors(layer, cap.records["l1"], batch_size=2)
    assert a.dtype == g.dtype == torch.float32 and a.shape == (1, 4, 4) and g.shape == (1, 4, 4)


# -- sequences: positions like KFC locations (A = mean_i sum_t, G = mean_i (1/T) sum_t) -----------------
class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], y = addmm(b, x.view(-1, in), W)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def test_sequence_linear_and_gpt2_conv1d_factors() -> None:
    torch.manual_seed(5)
    n, t = 3, 4
    linear = nn.Linear(2, 3).double()
    target = torch.randn(n, t, 3, dtype=torch.float64)
    x = torch.randn(n, t, 2, dtype=torch.float64)

    def example_loss(s: torch.Tensor, i: int) -> torch.Tensor:
        return (torch.tanh(s) * target[i]).sum() ** 2

    want_a = torch.zeros(3, 3, dtype=torch.float64)
    want_g = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(n):
        s = linear(x[i])
        (g,) = torch.autograd.grad(example_loss(s, i), s)
        for j in range(t):
            a_bar = torch.cat([x[i, j], torch.ones(1, dtype=torch.float64)])
            want_a += torch.outer(a_bar, a_bar) / n
            want_g += torch.outer(g[j], g[j]) / (n * t)

    def run(module: nn.Module, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        with Capture(module, (layer,)) as cap:
            s = module(x)
        (sum(example_loss(s[i], i) for i in range(n)) / n).backward()
        return batch_factors(layer, cap.records[layer.name], batch_size=n, dtype=torch.float64)

    a, g = run(linear, linear_layer("lin", "weight", "bias", (3, 2)))
    torch.testing.assert_close(a[0], want_a, rtol=0, atol=ATOL)
    torch.testing.assert_close(g[0], want_g, rtol=0, atol=ATOL)

    gpt2 = Conv1D(2, 3)
    with torch.no_grad():
        gpt2.weight.copy_(linear.weight.T)
        gpt2.bias.copy_(linear.bias)
    a, g = run(gpt2, linear_layer("c", "weight", "bias", (2, 3), layout="in_out"))
    torch.testing.assert_close(a[0], want_a, rtol=0, atol=ATOL)
    torch.testing.assert_close(g[0], want_g, rtol=0, atol=ATOL)


# -- convolutions against loops over examples, locations and kernel offsets ---------------------------
def loop_patches(
    x: torch.Tensor, conv: nn.Module, begin: tuple[int, ...], out_spatial: tuple[int, ...]
) -> list[torch.Tensor]:
    """Patch vectors (all input channels, kernel offsets row-major) of one example, per output location."""
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    patches = []
    for o in itertools.product(*map(range, out_spatial)):
        values = []
        for c in range(x.shape[0]):
            for k in itertools.product(*map(range, kernel)):
                idx = [o[j] * stride[j] - begin[j] + k[j] * dilation[j] for j in range(len(kernel))]
                inside = all(0 <= v < size for v, size in zip(idx, x.shape[1:]))
                values.append(x[(c, *idx)] if inside else torch.zeros((), dtype=x.dtype))
        patches.append(torch.stack(values))
    return patches


CASES = [
    ("conv2d stride+pad+dilation", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), (5, 6), (1, 1)),
    ("conv2d same, asymmetric pads", lambda: nn.Conv2d(2, 3, (2, 3), padding="same", bias=False), (4, 5), (0, 1)),
    ("conv1d", lambda: nn.Conv1d(3, 2, 3, stride=2, padding=2), (7,), (2,)),
    ("conv3d", lambda: nn.Conv3d(1, 2, 2, stride=(1, 2, 1), padding=1), (3, 3, 2), (1, 1, 1)),
    ("conv2d groups=2", lambda: nn.Conv2d(4, 6, 2, stride=1, padding=1, groups=2), (3, 3), (1, 1)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("make, spatial, begin", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_conv_factors_against_loops(make, spatial: tuple[int, ...], begin: tuple[int, ...]) -> None:
    torch.manual_seed(6)
    n = 2
    conv = make().double()
    x = torch.randn(n, conv.in_channels, *spatial, dtype=torch.float64)
    out_spatial = tuple(conv(x).shape[2:])
    t = math.prod(out_spatial)
    head = nn.Linear(conv.out_channels * t, 3).double()
    y = torch.tensor([0, 2])
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head)
    groups, c_g, o_g = conv.groups, conv.in_channels // conv.groups, conv.out_channels // conv.groups
    d_a = c_g * math.prod(conv.kernel_size) + (conv.bias is not None)
    want_a = torch.zeros(groups, d_a, d_a, dtype=torch.float64)
    want_g = torch.zeros(groups, o_g, o_g, dtype=torch.float64)
    for i in range(n):
        s = conv(x[i : i + 1])
        (g,) = torch.autograd.grad(F.cross_entropy(model[1:](s), y[i : i + 1]), s)
        g = g[0].reshape(conv.out_channels, t)
        patches = loop_patches(x[i], conv, begin, out_spatial)
        for j, patch in enumerate(patches):
            w = conv.weight.reshape(conv.out_channels, -1)
            for k in range(groups):
                p = patch.reshape(conv.in_channels, -1)[k * c_g : (k + 1) * c_g].reshape(-1)
                rows = slice(k * o_g, (k + 1) * o_g)
                # the loop's patches reproduce the convolution itself (checks `begin` and the order)
                expected = w[rows] @ p + (conv.bias[rows] if conv.bias is not None else 0)
                torch.testing.assert_close(expected, s[0].reshape(conv.out_channels, t)[rows, j], rtol=0, atol=ATOL)
                if conv.bias is not None:
                    p = torch.cat([p, torch.ones(1, dtype=torch.float64)])
                want_a[k] += torch.outer(p, p) / n
                want_g[k] += torch.outer(g[rows, j], g[rows, j]) / (n * t)
    layer = conv_layer("0", conv)
    with Capture(model, (layer,)) as cap:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    a, g = batch_factors(layer, cap.records["0"], batch_size=n, dtype=torch.float64)
    torch.testing.assert_close(a, want_a, rtol=0, atol=ATOL)
    torch.testing.assert_close(g, want_g, rtol=0, atol=ATOL)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("make, spatial, begin", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_patches_of_chosen_rows_equal_the_loops_rows(make, spatial: tuple[int, ...], begin: tuple[int, ...]) -> None:
    """``conv_patches_at`` (the rows a RowSubset keeps, gathered without an im2col) against the loops' patches of
    those (example, location) rows."""
    from kronograph.runtime.patches import call_geometry, conv_patches_at

    torch.manual_seed(7)
    conv = make().double()
    x = torch.randn(3, conv.in_channels, *spatial, dtype=torch.float64)
    out_spatial = tuple(conv(x).shape[2:])
    every = torch.stack([p for example in x for p in loop_patches(example, conv, begin, out_spatial)])
    rows = torch.randperm(every.shape[0], generator=torch.Generator().manual_seed(8))[: max(1, every.shape[0] // 3)]
    geometry = call_geometry(conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert torch.equal(conv_patches_at(x, geometry, rows), every[rows])


def test_transposed_conv_factors_against_its_own_outputs() -> None:
    """A transposed convolution's factors without its equal convolution: for any weight-shaped V and bias b,
    sum over groups of tr(V_bar A V_bar^T) = (1/n) sum of conv_transpose2d(x, V, b)^2 over examples, channels and
    locations (the layer's output along (V, b): the sum over locations of (V_bar a_t)^2); G = (1/(n T)) sum of
    g_t g_t^T per group, g the per-example loss's gradient of the layer's output (autograd)."""
    torch.manual_seed(9)
    n = 3
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2).double()
    x = torch.randn(n, 4, 3, 2, dtype=torch.float64)
    out = conv(x)
    t = math.prod(out.shape[2:])
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(6 * t, 3).double())
    y = torch.tensor([0, 2, 1])
    layer = conv_layer("0", conv)
    with Capture(model, (layer,)) as cap:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    a, g = batch_factors(layer, cap.records["0"], batch_size=n, dtype=torch.float64)
    for _ in range(3):
        v, b = torch.randn_like(conv.weight), torch.randn(6, dtype=torch.float64)
        v_bar = gather(layer, v, b)
        ours = sum(torch.trace(v_bar[k] @ a[k] @ v_bar[k].T) for k in range(2))
        along = F.conv_transpose2d(x, v, b, stride=2, padding=1, output_padding=1, groups=2, dilation=2)
        torch.testing.assert_close(ours, along.square().sum() / n, rtol=1e-12, atol=0)
    from kronograph.runtime.patches import conv_patches, conv_patches_at  # a RowSubset's rows: those rows
    geometry = cap.records["0"][0].geometry
    rows = torch.randperm(n * t, generator=torch.Generator().manual_seed(3))[:7]
    assert torch.equal(conv_patches_at(x, geometry, rows), conv_patches(x, geometry)[rows])
    s = conv(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(model[1:](s), y), s)
    rows = (n * grad).flatten(2).transpose(1, 2).reshape(-1, 6)  # per-example gradients, [n t, channels]
    for k in range(2):
        group = rows[:, 3 * k:3 * (k + 1)]
        torch.testing.assert_close(g[k], group.T @ group / (n * t), rtol=0, atol=ATOL)


# -- the in-place EMA of Grams (the statistics' hot path) ----------------------------------------------
@pytest.mark.parametrize("d", [5, 300])  # one full product / four panels mirrored
def test_accumulated_grams_equal_the_dense_ema(d: int) -> None:
    from kronograph.runtime.factors import accumulate_grams

    gen = torch.Generator().manual_seed(7)
    parts = [torch.randn(2, r, d, generator=gen, dtype=torch.float64) for r in (7, 3)]
    old = torch.randn(2, d, d, generator=gen, dtype=torch.float64)
    old = old + old.transpose(1, 2)
    want = 0.9 * old + 0.25 * sum(torch.einsum("gri,grj->gij", p, p) for p in parts)
    got = accumulate_grams(old.clone(), parts, alpha=0.25, beta=0.9)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, got.transpose(1, 2))
    fresh = accumulate_grams(None, parts[:1], alpha=1.0, beta=0.5)  # beta is ignored for a new tensor
    torch.testing.assert_close(fresh, torch.einsum("gri,grj->gij", parts[0], parts[0]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("homogeneous,blocks,d", [(False, (4, 4, 2), 10), (True, (4, 4, 3), 11), (True, (3, 3, 3), 10),
                                                  (False, (300, 300, 299), 899)])
def test_grams_of_diagonal_blocks_equal_the_dense_emas_there_and_touch_nothing_else(homogeneous, blocks, d) -> None:
    """Only the diagonal blocks (and, with the ones column past them, its border: the column sums and the count) are
    formed, each equal to the dense EMA of [X, 1]'s Gram there (``formed_by_blocks`` is their mask); the rest keeps
    its old value (0 in a new tensor)."""
    from kronograph.runtime.factors import accumulate_grams, formed_by_blocks

    gen = torch.Generator().manual_seed(3)
    width = d - homogeneous  # (3, 3, 3) of a 10-wide [X, 1]: the ones column is the border past the blocks
    parts = [torch.randn(2, r, width, generator=gen, dtype=torch.float64) for r in (7, 5)]
    rows = [torch.cat([p, torch.ones(2, p.shape[1], 1, dtype=torch.float64)], 2) if homogeneous else p for p in parts]
    dense = sum(torch.einsum("gri,grj->gij", r, r) for r in rows)
    formed = torch.zeros(d, d, dtype=torch.bool)
    start = 0
    for w in blocks:
        formed[start:start + w, start:start + w] = True
        start += w
    formed[start:, :] = formed[:, start:] = True  # the border (none where the blocks cover d)
    assert torch.equal(formed_by_blocks(d, blocks), formed)
    old = torch.randn(2, d, d, generator=gen, dtype=torch.float64)
    old = old + old.transpose(1, 2)
    got = accumulate_grams(old.clone(), parts, alpha=0.25, beta=0.9, homogeneous=homogeneous, blocks=blocks)
    torch.testing.assert_close(got[:, formed], (0.9 * old + 0.25 * dense)[:, formed], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:, ~formed], old[:, ~formed])
    fresh = accumulate_grams(None, parts, alpha=1.0, beta=0.5, homogeneous=homogeneous, blocks=blocks)
    torch.testing.assert_close(fresh[:, formed], dense[:, formed], rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(fresh[:, ~formed]) == 0
    with pytest.raises(ValueError, match="do not cover"):
        accumulate_grams(None, parts, alpha=1.0, beta=0.0, homogeneous=homogeneous, blocks=blocks[1:])


def test_block_update_equals_the_ema_of_batch_factors_and_refuses_bad_rows() -> None:
    torch.manual_seed(8)
    model = TinyMLP().double()
    layer = linear_layer("l1", "l1.weight", "l1.bias", (4, 3))
    batches = []
    for scale in (1.0, 2.0):
        with Capture(model, (layer,)) as cap:
            F.cross_entropy(model(scale * torch.randn(5, 3, dtype=torch.float64)), torch.tensor([0, 1, 1, 0, 1])).backward()
        batches.append(cap.records["l1"])
    block = KroneckerBlock(layer, dtype=torch.float64)
    for records, decay in zip(batches, (0.0, 0.75)):
        assert block.update(records, batch_size=5, decay=decay)
    (a1, g1), (a2, g2) = (batch_factors(layer, r, batch_size=5, dtype=torch.float64) for r in batches)
    torch.testing.assert_close(block.a, 0.75 * a1 + 0.25 * a2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block.g, 0.75 * g1 + 0.25 * g2, rtol=1e-12, atol=1e-12)
    late = KroneckerBlock(layer, dtype=torch.float64)  # a layer first seen at a later update: its first
    assert late.update(batches[1], batch_size=5, decay=0.75)  # estimate is the batch factor, not 1/4 of it
    torch.testing.assert_close(late.a, a2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(late.g, g2, rtol=1e-12, atol=1e-12)

    a, g = block.a.clone(), block.g.clone()
    for poison in (float("nan"), 1e200):  # NaN rows, and finite rows whose Gram overflows float64
        with Capture(model, (layer,)) as cap:
            model(torch.full((5, 3), poison, dtype=torch.float64)).sum().backward()
        with pytest.warns(RuntimeWarning, match="non-finite statistics"):
            assert not block.update(cap.records["l1"], batch_size=5, decay=0.5)
        assert torch.equal(block.a, a) and torch.equal(block.g, g)


def test_sequence_first_inputs_give_the_factors_of_their_examples() -> None:
    """Attention projections see [T, n, d]: the same rows as [n, T, d], and a subset keeps whole examples."""
    from kronograph.runtime.capture import SiteRecord

    gen = torch.Generator().manual_seed(9)
    a, g = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64), torch.randn(5, 3, 2, generator=gen, dtype=torch.float64)
    layer = linear_layer("l", "w", "b", (2, 4))
    index = torch.tensor([0, 2])
    seq_first = [SiteRecord("l", 0, a, None, g=g)]
    batch_first = [SiteRecord("l", 0, a.transpose(0, 1).contiguous(), None, g=g.transpose(0, 1).contiguous())]
    for chosen in (None, index):
        got = batch_factors(layer, seq_first, batch_size=3, index=chosen, dtype=torch.float64)
        want = batch_factors(layer, batch_first, batch_size=3, index=chosen, dtype=torch.float64)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


# -- A from a random subset of the activation rows (factors.RowSubset) ----------------------------------
class TwiceConv(nn.Module):
    """One conv called on two inputs of different sizes: two sites, 36 and 18 positions an example."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * (36 + 18), 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = [self.conv(x).flatten(1), self.conv(x[..., ::2]).flatten(1)]
        return self.head(torch.tanh(torch.cat(both, 1)))


def _twice_conv_records(n: int = 3):
    torch.manual_seed(10)
    model = TwiceConv().double()
    x = torch.randn(n, 2, 6, 6, dtype=torch.float64)
    layer = conv_layer("conv", model.conv)
    with Capture(model, (layer,), strict=False) as cap:  # the hand-made plan names one site
        F.cross_entropy(model(x), torch.arange(n) % 4).backward()
    return model, x, layer, cap.records["conv"]


def _site_patches(conv: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Every (example, position) patch of a padding-1 conv with the homogeneous 1, examples major (loops)."""
    out_spatial = tuple(conv(inputs).shape[2:])
    rows = [torch.cat([p, torch.ones(1, dtype=p.dtype)]) for x in inputs for p in loop_patches(x, conv, (1, 1), out_spatial)]
    return torch.stack(rows)


def test_a_from_a_subset_of_the_rows_is_the_weighted_gram_of_the_kept_rows_and_g_keeps_all():
    from kronograph.runtime.factors import RowSubset

    n, limit = 3, 40
    model, x, layer, records = _twice_conv_records(n)
    sites = [_site_patches(model.conv, x), _site_patches(model.conv, x[..., ::2])]
    assert [s.shape[0] for s in sites] == [108, 54]
    generator = torch.Generator().manual_seed(11)
    drawn = torch.Generator().set_state(generator.get_state())
    want = torch.zeros(19, 19, dtype=torch.float64)
    for patches in sites:  # k_s = ceil(R_s limit / R): 27 of 108, 14 of 54, each weighted R_s / k_s
        keep = -(-patches.shape[0] * limit // 162)
        kept = patches[torch.randperm(patches.shape[0], generator=drawn)[:keep]]
        want += patches.shape[0] / keep * kept.T @ kept / n
    a, g = batch_factors(layer, records, batch_size=n, dtype=torch.float64, subset=RowSubset(limit, generator))
    torch.testing.assert_close(a[0], want, rtol=0, atol=ATOL)
    # the homogeneous corner: every row counted once on average (14 rows weighted 54 / 14: exact to rounding)
    assert float(a[0, -1, -1]) == pytest.approx(162 / n, rel=1e-13)
    full_a, full_g = batch_factors(layer, records, batch_size=n, dtype=torch.float64)
    assert torch.equal(g, full_g) and not torch.allclose(a, full_a)
    torch.testing.assert_close(full_a[0], sum(s.T @ s for s in sites) / n, rtol=0, atol=ATOL)


def test_a_from_a_subset_of_the_rows_is_unbiased_and_every_row_is_used_below_the_limit():
    """Tokens of a linear layer on sequences, two sites of 3 x 10 and 3 x 4 rows: the mean of many subset
    estimates is the A of every row (written out here), one estimate is not."""
    from kronograph.runtime.capture import SiteRecord
    from kronograph.runtime.factors import RowSubset

    gen = torch.Generator().manual_seed(12)
    n, inputs = 3, [torch.randn(3, t, 4, generator=gen, dtype=torch.float64) for t in (10, 4)]
    records = [SiteRecord("l", i, x, None, g=torch.randn(3, x.shape[1], 2, generator=gen, dtype=torch.float64))
               for i, x in enumerate(inputs)]
    layer = linear_layer("l", "w", "b", (2, 4))
    rows = torch.cat([torch.cat([x.reshape(-1, 4), torch.ones(x.shape[0] * x.shape[1], 1, dtype=x.dtype)], 1)
                      for x in inputs])
    full = rows.T @ rows / n
    torch.testing.assert_close(batch_factors(layer, records, batch_size=n, dtype=torch.float64)[0][0], full,
                               rtol=0, atol=ATOL)
    draws = [batch_factors(layer, records, batch_size=n, dtype=torch.float64, subset=RowSubset(11, gen))[0][0]
             for _ in range(1000)]
    one, mean = draws[0], torch.stack(draws).mean(0)
    assert torch.linalg.matrix_norm(one - full) > 0.1 * torch.linalg.matrix_norm(full)  # one draw is noisy
    assert torch.linalg.matrix_norm(mean - full) < 0.03 * torch.linalg.matrix_norm(full)  # their mean is A (0.012)
    same, _ = batch_factors(layer, records, batch_size=n, dtype=torch.float64, subset=RowSubset(42, gen))
    assert torch.equal(same[0], batch_factors(layer, records, batch_size=n, dtype=torch.float64)[0][0])  # all rows

    model = TinyMLP().double()  # one row an example: the limit does not apply, whatever it is
    linear = linear_layer("l1", "l1.weight", "l1.bias", (4, 3))
    with Capture(model, (linear,)) as cap:
        F.cross_entropy(model(torch.randn(5, 3, dtype=torch.float64)), torch.tensor([0, 1, 1, 0, 1])).backward()
    kept, _ = batch_factors(linear, cap.records["l1"], batch_size=5, dtype=torch.float64, subset=RowSubset(2, gen))
    assert torch.equal(kept, batch_factors(linear, cap.records["l1"], batch_size=5, dtype=torch.float64)[0])


def test_a_block_folds_a_subset_of_the_rows_like_batch_factors():
    from kronograph.runtime.factors import RowSubset

    n = 3
    _, _, layer, records = _twice_conv_records(n)
    block = KroneckerBlock(layer, dtype=torch.float64)
    generator = torch.Generator().manual_seed(13)
    replay = torch.Generator().set_state(generator.get_state())
    assert block.update(records, batch_size=n, decay=0.0, subset=RowSubset(40, generator))
    assert block.update(records, batch_size=n, decay=0.5, subset=RowSubset(40, generator))
    first, second = (batch_factors(layer, records, batch_size=n, dtype=torch.float64, subset=RowSubset(40, replay))[0]
                     for _ in range(2))
    torch.testing.assert_close(block.a, 0.5 * first + 0.5 * second, rtol=1e-12, atol=1e-12)


def test_a_layer_called_several_times_folds_every_calls_rows_in_one_product() -> None:
    """A weight applied at T calls (a recurrent cell's loop) has T sites; the block's fold, which forms one Gram
    of all their rows, equals the explicit sums over every call's rows (A over the examples, G over the rows)."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x[:, 0]
            for t in range(1, x.shape[1]):
                h = torch.tanh(self.l1(h)[:, :3] + x[:, t])
            return h

    torch.manual_seed(9)
    model = Shared().double()
    layer = linear_layer("l1", "l1.weight", "l1.bias", (4, 3))
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    with Capture(model, (layer,), strict=False) as cap:  # the plan helper's layer has one site
        model(x).pow(2).sum(1).mean().backward()
    records = cap.records["l1"]
    assert len(records) == 3
    a_rows = torch.cat([torch.cat([r.a, torch.ones(5, 1, dtype=torch.float64)], 1) for r in records])
    g_rows = torch.cat([r.g for r in records]) * 5  # per example: the mean over 5 examples scaled back
    block = KroneckerBlock(layer, dtype=torch.float64)
    assert block.update(records, batch_size=5, decay=0.0)
    torch.testing.assert_close(block.a, (a_rows.T @ a_rows / 5)[None], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block.g, (g_rows.T @ g_rows / 15)[None], rtol=1e-12, atol=1e-12)
