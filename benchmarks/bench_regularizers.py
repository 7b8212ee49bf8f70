"""Stable-rank regularizer benchmark: randomized sketch vs exact nuclear-norm stable rank (forward + backward).

    python benchmarks/bench_regularizers.py            # 768x3072 (3 repeats) and 4096x11008 (1 repeat); minutes
    python benchmarks/bench_regularizers.py --smoke    # 256x1024 only, seconds

Test matrices have a realistic power-law spectrum: ``A = U diag(σ) Gᵀ/√n`` with Haar ``U``, Gaussian ``G``
and ``σ_i = i^-0.5`` (the Gaussian factor perturbs the spectrum slightly; the error is measured against the
exact singular values of ``A`` itself). Timings are the best of the repeats, float32, on this CPU.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from prehab.regularizers import nuclear_stable_rank, stable_rank


def _matrix(m: int, n: int, alpha: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g)).Q
    sigma = torch.arange(1, m + 1, dtype=torch.float32) ** (-alpha)
    return (u * sigma) @ torch.randn(n, m, generator=g).T / n**0.5


def _fwd_bwd(fn, a: torch.Tensor, repeats: int) -> tuple[float, float]:
    best, value = float("inf"), float("nan")
    for _ in range(repeats):
        leaf = a.clone().requires_grad_()
        start = time.perf_counter()
        out = fn(leaf)
        out.backward()
        best = min(best, time.perf_counter() - start)
        value = float(out.detach())
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="256x1024 only")
    parser.add_argument("--alpha", type=float, default=0.5, help="spectrum exponent σ_i = i^-alpha")
    args = parser.parse_args()
    sizes = [(256, 1024, 3)] if args.smoke else [(768, 3072, 3), (4096, 11008, 1)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("command: python " + " ".join(sys.argv))
    print()
    print(
        "| A (out x in) | repeats | sketch fwd+bwd (s) | exact svdvals fwd+bwd (s) | speed-up | exact Gram fwd+bwd (s) "
        "| SR exact | SR sketch | SR error | ‖A‖_* error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, n, repeats in sizes:
        a = _matrix(m, n, args.alpha)
        t_sketch, sr_sketch = _fwd_bwd(lambda x: stable_rank(x, seed=0), a, repeats)
        t_exact, sr_exact = _fwd_bwd(nuclear_stable_rank, a, repeats)
        t_gram, _ = _fwd_bwd(lambda x: nuclear_stable_rank(x, method="gram"), a, repeats)
        sr_error = sr_sketch / sr_exact - 1
        nuc_error = (sr_sketch / sr_exact) ** 0.5 - 1  # same ‖A‖_F in both
        print(
            f"| {m}x{n} | {repeats} | {t_sketch:.2f} | {t_exact:.2f} | {t_exact / t_sketch:.1f}x | {t_gram:.2f} "
            f"| {sr_exact:.1f} | {sr_sketch:.1f} | {100 * sr_error:+.2f}% | {100 * nuc_error:+.2f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
