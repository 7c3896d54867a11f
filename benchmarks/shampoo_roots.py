"""Shampoo's inverse 4th roots (a matrix's two modes: p = 2k = 4) by the coupled Newton iteration against one
symmetric eigendecomposition, at the widths of the MNIST autoencoder's factors (issue 13).

    python benchmarks/shampoo_roots.py [--threads 2]

Each factor is (X^T X / 4d + eps I) with X's columns scaled over three decades (a condition number near the
damping's limit), float64 as Shampoo computes its roots. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from kronograph.runtime.methods.shampoo import coupled_newton_inverse_root, eigh_inverse_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eps", type=float, default=3e-4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| d | Newton s | iterations | eigh s | Newton / eigh | relative difference |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for d in (250, 500, 785, 1000):
        x = torch.randn(4 * d, d, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
        a = x.T @ x / (4 * d) + args.eps * torch.eye(d, dtype=torch.float64)
        start = time.perf_counter()
        newton, converged, iterations = coupled_newton_inverse_root(a, 4)
        t_newton = time.perf_counter() - start
        start = time.perf_counter()
        eigh = eigh_inverse_root(a, 4, args.eps)
        t_eigh = time.perf_counter() - start
        difference = float((newton - eigh).norm() / eigh.norm())
        print(f"| {d} | {t_newton:.2f} | {iterations}{'' if converged else ' (not converged)'} | {t_eigh:.3f} | "
              f"{t_newton / t_eigh:.0f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
