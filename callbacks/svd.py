"""Plain truncated SVD of each weight (Eckart–Young): the baseline every other method beats."""

from __future__ import annotations

from torch import Tensor

from prehab.linalg import LowRankFactors, solve_lowrank

from .base import LowRankCompression

__all__ = ["SVD"]


class SVD(LowRankCompression):
    """Truncate each targeted weight to its top singular triplets; needs no calibration data.

    With calibration data available (the datamodule's or the training batches) the report still
    shows each layer's output error on it, for comparison with the activation-aware methods.
    """

    method = "svd"
    requires_calibration = False

    def solve_layer(self, name: str, weight: Tensor, rank: int, stats: dict[str, Tensor]) -> LowRankFactors:
        return solve_lowrank(weight, rank)

    def allocation_spectrum(self, weight: Tensor, stats: dict[str, Tensor]) -> Tensor:
        """Plain SVD loses ``Σ_{i>r} σ_i(W)²`` (unwhitened), so that is what ``rank_allocation="global"`` weighs."""
        return super().allocation_spectrum(weight, {})
