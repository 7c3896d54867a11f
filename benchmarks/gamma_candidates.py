"""Damped inverses for several gamma candidates: Cholesky per candidate against one eigendecomposition (issue 10).

    python benchmarks/gamma_candidates.py [--threads 2] [--sizes 250,500,1000] [--candidates 3]

The gamma rule (paper sec 6.6) needs (F + c I)^-1 for a few strengths c of every factor F. Two ways:
- Cholesky: ``cholesky_ex`` and ``cholesky_inverse`` (LAPACK potrf + potri) once per candidate, what
  runtime/inverse.py does;
- eigenbasis: ``eigh`` once, then Q diag(1 / (lambda + c)) Q^T for each candidate (one product each).
Both on the same symmetric positive semi-definite factor (a Gram of 4 d random rows, float32), median of
``--repeats`` runs. Prints a Markdown table: milliseconds per factor for one round of ``--candidates``
strengths, and the break-even number of candidates above which one eigendecomposition pays.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def median_ms(run, repeats: int) -> float:
    run()  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def cholesky_inverse(factor: torch.Tensor, c: float) -> torch.Tensor:
    lower, _ = torch.linalg.cholesky_ex(factor + c * torch.eye(factor.shape[0], dtype=factor.dtype))
    return torch.cholesky_inverse(lower)


def from_eigenbasis(values: torch.Tensor, vectors: torch.Tensor, c: float) -> torch.Tensor:
    return (vectors * (1.0 / (values + c))) @ vectors.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="250,500,1000")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    strengths = [1e-3 * 3**k for k in range(args.candidates)]
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, float32")
    print(f"| d | Cholesky x {args.candidates} ms | eigh ms | + products x {args.candidates} ms | eigenbasis total ms "
          "| largest difference (relative) | break-even candidates |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for d in (int(s) for s in args.sizes.split(",")):
        rows = torch.randn(4 * d, d, generator=generator)
        factor = rows.T @ rows / (4 * d)
        cholesky = median_ms(lambda: [cholesky_inverse(factor, c) for c in strengths], args.repeats)
        eigh = median_ms(lambda: torch.linalg.eigh(factor), args.repeats)
        values, vectors = torch.linalg.eigh(factor)
        products = median_ms(lambda: [from_eigenbasis(values, vectors, c) for c in strengths], args.repeats)
        difference = max(float((cholesky_inverse(factor, c) - from_eigenbasis(values, vectors, c)).abs().max()
                               / from_eigenbasis(values, vectors, c).abs().max()) for c in strengths)
        per_cholesky, per_product = cholesky / len(strengths), products / len(strengths)
        saving = per_cholesky - per_product
        even = "never" if saving <= 0 else f"{eigh / saving:.1f}"
        print(f"| {d} | {cholesky:.1f} | {eigh:.1f} | {products:.1f} | {eigh + products:.1f} | {difference:.1e} "
              f"| {even} |")


if __name__ == "__main__":
    main()
