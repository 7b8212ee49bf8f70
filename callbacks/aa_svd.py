"""AA-SVD (arXiv 2604.02119): the anchored objective ``min ‖W X − W' X̂‖``, solved in closed form."""

from __future__ import annotations

from torch import Tensor

from prehab.linalg import LowRankFactors, solve_lowrank

from .base import LowRankCompression

__all__ = ["AASVD"]


class AASVD(LowRankCompression):
    """Each layer reproduces the *original* model's output (``W X``) from the inputs it really gets in
    the partially compressed model (``X̂``): Theorem 3.1, whitening with ``H = X̂X̂ᵀ`` and cross term
    ``C = XX̂ᵀ``, statistics from the two-stream block-sequential pipeline.

    Takes the arguments of :class:`~prehab.callbacks.LowRankCompression` (``ratio``, ``targets``, ...). Its
    ``ridge`` defaults to ``0.1`` (chosen on held-out WikiText-2 valid for SmolLM2-135M; ``ridge=0`` is the paper's
    exact closed form, which regresses ``WX`` on ``X̂`` with huge coefficients wherever ``X̂`` has almost no
    variance: benchmarks/RESULTS.md §7).
    """

    method = "aa_svd"
    two_stream = True
    anchored = True
    default_ridge = 0.1
    reads_original_covariance = False

    def solve_layer(self, name: str, weight: Tensor, rank: int, stats: dict[str, Tensor]) -> LowRankFactors:
        return solve_lowrank(weight, rank, whitening=stats["H"], cross=stats["C"], initial_damping=self.damping)
