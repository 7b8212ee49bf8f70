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

    Takes the arguments of :class:`~prehab.callbacks.LowRankCompression` (``ratio``, ``targets``, ...).
    """

    method = "aa_svd"
    two_stream = True

    def solve_layer(self, name: str, weight: Tensor, rank: int, stats: dict[str, Tensor]) -> LowRankFactors:
        return solve_lowrank(weight, rank, whitening=stats["H"], cross=stats["C"], initial_damping=self.damping)
