"""Data-parallel K-FAC's collectives send symmetric matrices as one triangle (issue 16): the factors' all_reduce
(``distributed.average_statistics``) and the owners' inverses by one all_gather (``data_parallel.invert_across_ranks``,
through ``exchange_from_owners``).

The packing is tested in this process; the byte counts and the ranks' identical inverses on two CPU processes
(gloo, one spawn for the module): a tiny two-layer MLP under ``kronograph.optim.KFAC``, every ``dist.all_reduce``
and ``dist.all_gather_into_tensor`` recorded with the function that issued it, and ``invert_across_ranks`` fed
owners' inverses made slightly asymmetric on purpose (as the Triton Newton-Schulz path can leave them).
"""

from __future__ import annotations

import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

import kronograph
from kronograph.passes.plan import Layer
from kronograph.runtime.data_parallel import inverse_entries, inverse_owners, invert_across_ranks
from kronograph.runtime.distributed import average_statistics, pack_triangle, triangle_entries, unpack_triangle
from kronograph.runtime.inverse import DampedInverses

from factories import curvature_with_random_factors
from ranks import run_on_ranks

WORLD, BATCH, STEPS = 2, 16, 3
WIDTHS = (5, 7, 3)  # Linear(5, 7), Tanh, Linear(7, 3): layers "0" and "2", with biases
ISSUERS = ("average_statistics", "exchange_from_owners")


def symmetric(groups: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(groups, d, d, generator=torch.Generator().manual_seed(seed))
    return x + x.transpose(1, 2)


@pytest.mark.parametrize("groups, d", [(1, 1), (1, 6), (3, 5), (2, 33)])
def test_a_triangle_round_trips_a_symmetric_stack_exactly(groups, d):
    m = symmetric(groups, d, seed=d)
    packed = pack_triangle(m)
    assert packed.shape == (groups, d * (d + 1) // 2) == (groups, triangle_entries(d))
    assert torch.equal(unpack_triangle(packed, d), m)
    assert torch.equal(unpack_triangle(packed.reshape(-1), d), m)  # a flat slice of a buffer, as unpacked
    m64 = m.double()
    assert torch.equal(unpack_triangle(pack_triangle(m64), d), m64)


def test_unpacking_mirrors_the_upper_triangle():
    m = torch.randn(2, 4, 4)  # not symmetric: the lower triangle is dropped, the upper one mirrored
    out = unpack_triangle(pack_triangle(m), 4)
    assert torch.equal(out, out.transpose(1, 2))
    assert torch.equal(out.triu(), m.triu())


def test_the_factor_buffer_holds_triangles_and_counts():
    """``average_statistics`` with the all_reduce replaced by the identity (one rank's sums): the buffer's size is
    sum groups * (a (a + 1) / 2 + g (g + 1) / 2) plus one count per layer, and the factors come back exactly."""
    shapes = {"x": (1, 6, 7), "y": (2, 8, 3), "z": (1, 4, 4)}  # (groups, a_dim, g_dim); "z" without statistics
    layers = {name: mock.Mock(spec=Layer, groups=n, a_dim=a, g_dim=g, diagonal_a=False, diagonal_g=False)
              for name, (n, a, g) in shapes.items()}
    stats = {name: (symmetric(n, a, 1), symmetric(n, g, 2), 4) for name, (n, a, g) in shapes.items() if name != "z"}
    sent = []
    with mock.patch.object(dist, "all_reduce", lambda buffer, **_: sent.append(buffer.clone())):
        averaged = average_statistics(stats, layers, None, torch.float32, "cpu")
    expected = sum(n * (a * (a + 1) // 2 + g * (g + 1) // 2) for n, a, g in shapes.values()) + len(shapes)
    assert len(sent) == 1 and sent[0].numel() == expected
    assert sent[0][-3:].tolist() == [4.0, 4.0, 0.0]
    assert set(averaged) == {"x", "y"}
    for name, (a, g, m) in averaged.items():  # m = 4: m * A / m is exact
        assert torch.equal(a, stats[name][0]) and torch.equal(g, stats[name][1]) and m == 4


def test_a_tables_diagonal_a_and_a_heads_diagonal_g_travel_as_their_diagonals():
    """A table's A (``Layer.diagonal_a``) and a wide head's G (``Layer.diagonal_g``), kept as [groups, width],
    take width entries of the buffer, not a triangle, and come back as those diagonals."""
    layers = {"table": mock.Mock(spec=Layer, groups=1, a_dim=5, g_dim=3, diagonal_a=True, diagonal_g=False),
              "head": mock.Mock(spec=Layer, groups=1, a_dim=3, g_dim=4, diagonal_a=False, diagonal_g=True)}
    stats = {"table": (torch.tensor([[0.5, 0.0, 1.25, 2.0, 0.25]]), symmetric(1, 3, 2), 4),
             "head": (symmetric(1, 3, 3), torch.tensor([[0.75, 0.0, 1.5, 0.125]]), 4)}
    sent = []
    with mock.patch.object(dist, "all_reduce", lambda buffer, **_: sent.append(buffer.clone())):
        averaged = average_statistics(stats, layers, None, torch.float32, "cpu")
    assert sent[0].numel() == (5 + 6) + (6 + 4) + 2
    for name, (a, g, _) in stats.items():
        assert torch.equal(averaged[name][0], a) and torch.equal(averaged[name][1], g)


def test_factors_travel_in_bfloat16_and_their_counts_apart():
    """``communication_dtype=bfloat16``: the triangles in one bfloat16 all_reduce (half of float32's bytes), the
    counts in a float64 one (bfloat16 holds integers exactly only up to 256); the averaged factors are back in
    float32, exactly symmetric, within bfloat16's rounding of the float32 result."""
    torch.manual_seed(0)
    shapes = {"x": (1, 6, 7), "y": (2, 8, 3)}
    layers = {name: mock.Mock(spec=Layer, groups=n, a_dim=a, g_dim=g, diagonal_a=False, diagonal_g=False)
              for name, (n, a, g) in shapes.items()}
    stats = {name: (symmetric(n, a, 1), symmetric(n, g, 2), 300) for name, (n, a, g) in shapes.items()}
    sent = []
    with mock.patch.object(dist, "all_reduce", lambda buffer, **_: sent.append(buffer.clone())):
        averaged = average_statistics(stats, layers, None, torch.float32, "cpu", torch.bfloat16)
    entries = sum(n * (a * (a + 1) // 2 + g * (g + 1) // 2) for n, a, g in shapes.values())
    assert [(b.dtype, b.numel()) for b in sent] == [(torch.bfloat16, entries), (torch.float64, 2)]
    assert sent[1].tolist() == [300.0, 300.0]
    for name, (a, g, m) in averaged.items():
        assert m == 300 and a.dtype == torch.float32
        assert torch.equal(a, a.transpose(-1, -2)) and torch.equal(g, g.transpose(-1, -2))
        torch.testing.assert_close(a, stats[name][0], rtol=8e-3, atol=1e-6)
        torch.testing.assert_close(g, stats[name][1], rtol=8e-3, atol=1e-6)
        assert not torch.equal(a, stats[name][0])  # it did travel narrower


def test_inverse_entries_are_triangles_pi_and_flags():
    assert inverse_entries(2, 6, 7) == 2 * (21 + 28 + 2)
    assert inverse_entries(2, 6, 7, diagonal_a=True) == 2 * (6 + 28 + 2)
    assert inverse_entries(2, 6, 7, diagonal_g=True) == 2 * (21 + 7 + 2)


def recorded(kind: str, calls: list):
    """``dist.<kind>`` recording (issuing function, entries, bytes) of the buffer this rank sends."""
    original = getattr(dist, kind)

    def wrapper(*args, **kwargs):
        sent = args[0] if kind == "all_reduce" else args[1]
        calls.append((kind, sys._getframe(1).f_code.co_name, sent.numel(), sent.numel() * sent.element_size()))
        return original(*args, **kwargs)

    return wrapper


def run_ranks(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTHS[0], WIDTHS[1]), nn.Tanh(), nn.Linear(WIDTHS[1], WIDTHS[2]))
    batches = [(torch.randn(BATCH, WIDTHS[0]), torch.randint(0, WIDTHS[2], (BATCH,))) for _ in range(STEPS)]
    cm = kronograph.compile(model, (batches[0][0][:2],), loss="cross_entropy")
    opt = kronograph.optim.KFAC(cm, preset="paper", seed=0)
    calls: list = []
    with mock.patch.object(dist, "all_reduce", recorded("all_reduce", calls)), \
            mock.patch.object(dist, "all_gather_into_tensor", recorded("all_gather_into_tensor", calls)):
        for x, y in batches:
            opt.step(x.chunk(world)[rank], y.chunk(world)[rank])
    inverses = {name: (block.inverses.a_inv.clone(), block.inverses.g_inv.clone(), block.inverses.pi.clone())
                for name, block in opt.blocks.items()}
    return {"calls": [call for call in calls if call[1] in ISSUERS], "inverses": inverses,
            "owners": opt.inverse_owners, "asymmetric": asymmetric_owners(cm.layers, rank, world)}


def asymmetric_owners(layers, rank: int, world: int) -> dict:
    """``invert_across_ranks`` where each owner's inverses are made asymmetric: what every rank gets, and the
    owner's own (asymmetric) inverses."""
    owners = inverse_owners(layers, world)
    curvature = curvature_with_random_factors(layers)
    invert = curvature.invert
    made = {}

    def skewed(gamma, only=None, g_shares=None):
        result = invert(gamma, only=only, g_shares=g_shares)
        for name, r in result.items():
            if r is not None:
                noise = torch.Generator().manual_seed(rank)
                skew_a = 1e-3 * torch.randn(r.a_inv.shape, generator=noise).triu(1)
                skew_g = 1e-3 * torch.randn(r.g_inv.shape, generator=noise).tril(-1)
                result[name] = made[name] = DampedInverses(r.a_inv + skew_a, r.g_inv + skew_g, r.pi, r.failed)
        return result

    curvature.invert = skewed
    got = invert_across_ranks(curvature, 0.1, owners, dist.group.WORLD)
    return {"owners": owners, "made": {name: (r.a_inv, r.g_inv) for name, r in made.items()},
            "got": {name: (r.a_inv, r.g_inv, r.pi, r.failed) for name, r in got.items()}}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(run_ranks, WORLD, tmp_path_factory.mktemp("triangles"))


def test_collectives_send_triangles(ranks):
    (d0, d1, d2) = WIDTHS
    shapes = [(1, d0 + 1, d1), (1, d1 + 1, d2)]  # (groups, a_dim = inputs + bias, g_dim = outputs), plan order
    factors = sum(n * (a * (a + 1) // 2 + g * (g + 1) // 2) for n, a, g in shapes) + len(shapes)  # + the counts
    shares = [n * (a * (a + 1) // 2 + g * (g + 1) // 2 + 2) for n, a, g in shapes]
    # costs 6^3 + 7^3 = 559 and 8^3 + 3^3 = 539: the first layer is rank 0's, the second rank 1's
    assert ranks[0]["owners"] == {"0": 0, "2": 1}
    for r in ranks:
        kinds = {(kind, issuer) for kind, issuer, _, _ in r["calls"]}
        assert kinds == {("all_reduce", "average_statistics"), ("all_gather_into_tensor", "exchange_from_owners")}
        for kind, issuer, entries, size in r["calls"]:
            expected = factors if issuer == "average_statistics" else max(shares)  # padded to the largest share
            assert entries == expected and size == 4 * expected, (kind, issuer, entries)
        assert sum(issuer == "average_statistics" for _, issuer, _, _ in r["calls"]) == STEPS
    assert [c[:3] for c in ranks[0]["calls"]] == [c[:3] for c in ranks[1]["calls"]]


def test_every_rank_holds_bit_identical_inverses(ranks):
    first, second = (r["inverses"] for r in ranks)
    assert set(first) == set(second) == {"0", "2"}
    for name in first:
        for mine, theirs in zip(first[name], second[name]):
            assert torch.equal(mine, theirs) and mine.view(torch.int32).equal(theirs.view(torch.int32)), name
        a_inv, g_inv, _ = first[name]
        assert torch.equal(a_inv, a_inv.transpose(1, 2)) and torch.equal(g_inv, g_inv.transpose(1, 2)), name


def test_an_owners_asymmetric_inverse_reaches_every_rank_mirrored(ranks):
    results = [r["asymmetric"] for r in ranks]
    owners = results[0]["owners"]
    for name, owner in owners.items():
        made_a, made_g = results[owner]["made"][name]
        assert not torch.equal(made_a, made_a.transpose(1, 2))  # the owner's own inverse is asymmetric
        for result in results:  # the owner too uses the mirrored upper triangle
            a_inv, g_inv, _, failed = result["got"][name]
            assert torch.equal(a_inv.triu(), made_a.triu()) and torch.equal(a_inv, a_inv.transpose(1, 2))
            assert torch.equal(g_inv.triu(), made_g.triu()) and torch.equal(g_inv, g_inv.transpose(1, 2))
            assert not failed.any()
        for mine, theirs in zip(results[0]["got"][name], results[1]["got"][name]):
            assert torch.equal(mine, theirs), name


def run_uneven(rank: int, world: int) -> dict:
    """Four ranks, two layers: the shares (963 and 501 entries, two ranks owning none) are too uneven for the
    padded all_gather, so each inversion round is one all_reduce of every layer's piece."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 2))
    batches = [(torch.randn(BATCH, 30), torch.randint(0, 2, (BATCH,))) for _ in range(STEPS)]
    opt = kronograph.optim.KFAC(kronograph.compile(model, (batches[0][0][:2],), loss="cross_entropy"),
                                preset="paper", seed=0)
    calls: list = []
    with mock.patch.object(dist, "all_reduce", recorded("all_reduce", calls)), \
            mock.patch.object(dist, "all_gather_into_tensor", recorded("all_gather_into_tensor", calls)):
        for x, y in batches:
            opt.step(x.chunk(world)[rank], y.chunk(world)[rank])
    return {"calls": [call for call in calls if call[1] == "exchange_from_owners"],
            "inverses": {name: (b.inverses.a_inv, b.inverses.g_inv, b.inverses.pi) for name, b in opt.blocks.items()},
            "parameters": {name: p.detach().clone() for name, p in model.named_parameters()}}


def test_uneven_shares_take_one_all_reduce_with_the_same_bits_everywhere(tmp_path):
    results = run_on_ranks(run_uneven, 4, tmp_path)
    entries = [31 * 32 // 2 + 30 * 31 // 2 + 2, 31 * 32 // 2 + 2 * 3 // 2 + 2]  # 963, 501: 4 x 963 > 2 x 1464
    for result in results:
        assert result["calls"] and all(kind == "all_reduce" and count == sum(entries)
                                       for kind, _, count, _ in result["calls"])
    for result in results[1:]:
        for name, tensors in result["inverses"].items():
            for mine, theirs in zip(tensors, results[0]["inverses"][name]):
                assert torch.equal(mine, theirs), name
        for name, value in result["parameters"].items():
            assert torch.equal(value, results[0]["parameters"][name]), name
