"""SVD-LLM (arXiv 2403.07378): truncation-aware whitening with the input covariance."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from prehab.linalg import LowRankFactors, solve_lowrank

from .base import LowRankCompression

__all__ = ["SVDLLM"]


class SVDLLM(LowRankCompression):
    """SVD of ``W L`` with ``L Lᵀ`` the input covariance: minimizes each layer's output error on its inputs.

    Args:
        propagate: whiten with the inputs of the *partially compressed* model (``H = X̂X̂ᵀ``, collected
            block by block with the two-stream pipeline) instead of the original model's (``G = XXᵀ``,
            one forward pass). It is SAES-SVD with β = 0.
        **kwargs: see :class:`~prehab.callbacks.LowRankCompression` (``ratio``, ``targets``, ...).
    """

    method = "svd_llm"
    reads_original_covariance = False  # with propagate=True it whitens with H

    def __init__(self, propagate: bool = False, **kwargs: Any) -> None:
        if not isinstance(propagate, bool):
            raise ValueError(f"propagate={propagate!r} is invalid: use true (two-stream) or false (one pass).")
        self.propagate = propagate
        self.two_stream = propagate  # before the base's checks: refine_steps needs the two streams
        super().__init__(**kwargs)

    def solve_layer(self, name: str, weight: Tensor, rank: int, stats: dict[str, Tensor]) -> LowRankFactors:
        whitening = stats["H"] if self.propagate else stats["G"]
        return solve_lowrank(weight, rank, whitening=whitening, initial_damping=self.damping)
