"""SAES-SVD (arXiv 2602.03051): CEALC's blended target with β per layer chosen by ACES."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from prehab.checks import is_real
from prehab.linalg import LowRankFactors, aces_beta, damped_cholesky, solve_lowrank

from .base import LowRankCompression

__all__ = ["SAESSVD"]

OBJECTIVES = ("ratio", "energy")


class SAESSVD(LowRankCompression):
    """Whiten with ``H = X̂X̂ᵀ`` and approximate ``W((1 − β) H + β C) L⁻ᵀ``: β = 0 is SVD-LLM on the shifted
    inputs, β = 1 is AA-SVD. With ``beta=None`` each layer's β comes from ACES (closed-form minimizer of
    the fixed-subspace tail surrogate, with the guardrails of the paper's appendix A.11).

    Args:
        beta: a fixed β in [0, 1] for every layer, or None for ACES.
        beta_min: lower end of ACES's search interval.
        beta_max: upper end of ACES's search interval.
        objective: ACES objective: ``"ratio"`` (tail / total energy) or ``"energy"`` (tail energy).
        beta_cap: guardrail: ACES never returns more than this (< 1 prevents over-alignment).
        beta_shrink: guardrail: ACES's β is multiplied by this factor in (0, 1].
        **kwargs: :class:`~prehab.callbacks.LowRankCompression`'s arguments (``ratio``, ``targets``, ...). Its
            ``ridge`` defaults to 0, the paper's exact form: ``ridge=0.01`` (the best on held-out WikiText-2 valid
            for SmolLM2-135M) gains 2-4% / 5-12% (WikiText-2 / PTB) at 20% removed but nothing reliable at 40%
            (benchmarks/RESULTS.md §7).
    """

    method = "saes_svd"
    two_stream = True
    anchored = True
    reads_original_covariance = False

    def __init__(
        self,
        beta: float | None = None,
        beta_min: float = 0.25,
        beta_max: float = 0.75,
        objective: str = "ratio",
        beta_cap: float = 0.95,
        beta_shrink: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if beta is not None and not (is_real(beta) and 0.0 <= beta <= 1.0):
            raise ValueError(
                f"beta={beta!r} is invalid: use a number in [0, 1] (0 = SVD-LLM, 1 = AA-SVD) or None for ACES."
            )
        if not (is_real(beta_min) and is_real(beta_max) and 0.0 <= beta_min <= beta_max <= 1.0):
            raise ValueError(
                f"beta_min={beta_min!r}, beta_max={beta_max!r} are invalid: need numbers with "
                "0 <= beta_min <= beta_max <= 1."
            )
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is invalid; valid values: {', '.join(map(repr, OBJECTIVES))}.")
        if not (is_real(beta_cap) and 0.0 < beta_cap <= 1.0):
            raise ValueError(f"beta_cap={beta_cap!r} is invalid: use a number in (0, 1], e.g. 0.95.")
        if not (is_real(beta_shrink) and 0.0 < beta_shrink <= 1.0):
            raise ValueError(f"beta_shrink={beta_shrink!r} is invalid: use a number in (0, 1].")
        self.beta, self.beta_min, self.beta_max = beta, beta_min, beta_max
        self.objective, self.beta_cap, self.beta_shrink = objective, beta_cap, beta_shrink

    def solve_layer(self, name: str, weight: Tensor, rank: int, stats: dict[str, Tensor]) -> LowRankFactors:
        h, c = stats["H"], stats["C"]
        cholesky = damped_cholesky(h, initial_damping=self.damping)
        beta = self.beta
        if beta is None:
            beta = aces_beta(
                weight,
                h,
                c,
                rank,
                self.beta_min,
                self.beta_max,
                self.objective,
                self.beta_cap,
                self.beta_shrink,
                cholesky=cholesky,
            ).beta
        cross = (1.0 - beta) * h.double() + beta * c.double()
        factors = solve_lowrank(weight, rank, whitening=h, cross=cross, cholesky=cholesky)
        return replace(factors, beta=beta)
