"""Data-parallel K-FAC: how evenly the inverse work splits across ranks, and the bytes each inversion round moves
(issue 16).

    python benchmarks/inverse_balance.py [--ranks 1,2,4,8,16] [--check]

``kronograph.optim.KFAC`` under torch.distributed inverts each layer's damped A and G on one rank, assigned by
``runtime.data_parallel.assign_inverses`` (cost groups * (a_dim^3 + g_dim^3), largest first to the least-loaded
rank), and shares the results by one all_gather of the owners' buffers, each the upper triangles of its layers'
inverses, pi and failed flags, zero-padded to the largest rank's share (``invert_across_ranks``). This prints, for
the MNIST autoencoder (784-1000-500-250-30 and mirror, biases: a_dim = in + 1) and a ResNet-50's layers (53
convolutions without bias, a_dim = in * k * k, and the 2048 -> 1000 head with bias), at each number of ranks: every
rank's cost (in units of 10^9 n^3), max / mean (1: perfect balance; the slowest rank sets the round's time) and the
largest single layer's cost against the mean (no assignment of whole layers beats max(1, that)); then the bytes of
every layer's triangles, pi and flags per inversion round (float32), and at each number of ranks the largest rank's
share (the buffer every rank contributes, padded to it) and what a ring all_gather sends per rank, (W - 1) times
that share (the gathered buffer, W shares, less the rank's own), against what a ring all_reduce of every layer's
triangles would send, 2 (W - 1) / W of them (the padding makes the all_gather the dearer one once W times the
largest share passes twice the total; ``invert_across_ranks`` then takes the all_reduce, last column). No timing: a cost model only. ``--check`` also compiles the two models (the
ResNet-50 built here, torchvision's layout: torchvision itself is not needed) with kronograph.compile and checks
that the layers it finds are the ones listed.
"""

from __future__ import annotations

import argparse
import sys

from kronograph.runtime.data_parallel import assign_inverses, inverse_cost, inverse_entries, rank_loads

#: (groups, a_dim, g_dim) per layer, plan order
Shapes = list[tuple[int, int, int]]


def autoencoder_shapes() -> Shapes:
    widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    return [(1, n_in + 1, n_out) for n_in, n_out in zip(widths, widths[1:])]


def resnet50_shapes() -> Shapes:
    """torchvision's resnet50: a 7x7 stem, bottleneck stages of (width, blocks) (64, 3), (128, 4), (256, 6),
    (512, 3) (1x1 in -> width, 3x3 width -> width, 1x1 width -> 4 width; a 1x1 projection in -> 4 width in each
    stage's first block), the 2048 -> 1000 head. Convolutions have no bias (batch norm follows)."""
    shapes = [(1, 3 * 7 * 7, 64)]
    channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(1, channels, width), (1, width * 9, width), (1, width, 4 * width)]
            if block == 0:
                shapes.append((1, channels, 4 * width))
            channels = 4 * width
    shapes.append((1, 2048 + 1, 1000))
    return shapes


def resnet50_module():
    """The ResNet-50 of ``resnet50_shapes`` as an nn.Module (torchvision's layout; ``--check`` only)."""
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, channels: int, width: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(4 * width)
            self.downsample = None
            if stride != 1 or channels != 4 * width:
                self.downsample = nn.Sequential(nn.Conv2d(channels, 4 * width, 1, stride, bias=False),
                                                nn.BatchNorm2d(4 * width))

        def forward(self, x):
            out = self.bn1(self.conv1(x)).relu()
            out = self.bn2(self.conv2(out)).relu()
            out = self.bn3(self.conv3(out))
            return (out + (x if self.downsample is None else self.downsample(x))).relu()

    layers, channels = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for block in range(blocks):
            layers.append(Bottleneck(channels, width, 2 if block == 0 and stage > 0 else 1))
            channels = 4 * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))


def check(name: str, shapes: Shapes) -> None:
    import torch
    from torch import nn

    import kronograph

    if name == "mnist-autoencoder":
        widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
        model = nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.Sigmoid())])
        example = torch.randn(2, 784)
    else:
        model, example = resnet50_module(), torch.randn(2, 3, 64, 64)
    found = [(layer.groups, layer.a_dim, layer.g_dim) for layer in kronograph.compile(model, (example,)).layers]
    if found != shapes:
        sys.exit(f"{name}: kronograph.compile finds {found}, the list has {shapes}")
    print(f"{name}: kronograph.compile finds the {len(found)} layers listed")


def report(name: str, shapes: Shapes, ranks: list[int]) -> None:
    costs = [inverse_cost(*shape) for shape in shapes]
    total = sum(costs)
    sizes = [inverse_entries(*shape) for shape in shapes]
    entries = sum(sizes)
    matrices = sum(groups * (a * (a + 1) // 2 + g * (g + 1) // 2) for groups, a, g in shapes)
    print(f"\n{name}: {len(shapes)} layers, total cost {total / 1e9:.2f}e9 n^3, largest layer {max(costs) / 1e9:.2f}e9")
    print(f"bytes per inversion round (float32, upper triangles): {4 * entries:,} ({4 * matrices:,} of inverses, "
          f"{4 * (entries - matrices):,} of pi and flags)\n")
    print("| ranks | per-rank cost (1e9 n^3) | max / mean | largest layer / mean | largest share bytes "
          "| all_gather bytes sent per rank | all_reduce of the triangles | the round's collective |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for world in ranks:
        owners = assign_inverses(costs, world)
        loads = rank_loads(costs, owners, world)
        share = 4 * int(max(rank_loads(sizes, owners, world)))  # every rank's buffer is padded to the largest
        mean = total / world
        reduced = round(2 * (world - 1) / world * 4 * entries)
        print(f"| {world} | {' '.join(f'{load / 1e9:.2f}' for load in loads)} | {max(loads) / mean:.3f} | "
              f"{max(costs) / mean:.3f} | {share:,} | {(world - 1) * share:,} | {reduced:,} | "
              f"{'-' if world == 1 else 'all_gather' if world * share <= 2 * 4 * entries else 'all_reduce'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4,8,16")
    parser.add_argument("--check", action="store_true", help="compare the lists with kronograph.compile's layers")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    models = {"mnist-autoencoder": autoencoder_shapes(), "resnet50": resnet50_shapes()}
    if args.check:
        for name, shapes in models.items():
            check(name, shapes)
    for name, shapes in models.items():
        report(name, shapes, ranks)


if __name__ == "__main__":
    main()
