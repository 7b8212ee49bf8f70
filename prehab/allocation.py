"""Non-uniform rank allocation under a parameter budget: pure tensor math, no Lightning.

A layer ``W`` (``m x n``) kept at rank ``r`` costs ``r (m + n)`` parameters and loses its whitened tail
energy ``Σ_{i>r} σ_i²`` (``σ_i`` the singular values of ``W L``, ``L Lᵀ`` its input covariance: exactly the
SVD-LLM truncation loss ``‖WX − W'X‖²`` per calibration row). Kept dense, it costs ``m n`` and loses nothing.
Given every layer's spectrum, :func:`allocate_ranks` chooses the ranks that minimize the (weighted) total
predicted loss with at most ``budget`` parameters.

Algorithm (greedy over singular values per parameter, on each layer's convex hull):

* Each layer's options are its ranks from a floor (the minimum kept fraction) up to the largest rank that
  still saves parameters, plus "dense". Loss against cost is convex along the ranks (each step costs
  ``m + n`` and gains ``σ_{r+1}²``, non-increasing); only the jump to dense can break convexity, so the
  options are reduced to their lower convex hull.
* Starting from every layer at its floor, hull segments are taken in order of loss removed per parameter,
  over all layers, until the next one does not fit. That allocation is **exactly optimal for the number of
  parameters it spends** (it solves the Lagrangian relaxation; Everett's theorem), and that number is
  within one segment of the budget.
* The leftover (less than one rank step of the widest layer, unless the hull merged a dense jump) is
  filled with single moves (one more rank, or going dense) by the same loss-per-parameter order, as long
  as one fits. The final count never exceeds the budget and is within one rank step of it.

:func:`allocate_equal_error` solves the other objective the package offers: the smallest *largest* relative
error ``Σ_{i>r} σ_i² / Σ_i σ_i²`` over the layers (every layer as good as the budget allows the worst one to
be), by bisection on that error; a minimax allocation cannot leave one layer far worse than the rest, which
a sum of errors happily does (it buys many layers' zero error by keeping them dense and pays with a few
layers cut to the floor; on SmolLM2 at 40% that multiplied perplexity by 3).

An exact solution (a knapsack over every layer's ranks) would cost ``layers x budget / gcd(m + n)`` states
(hundreds of millions for a 135M-parameter model); the greedy is exact up to that last partial step, which
is what the brute-force test checks on small cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Allocation",
    "allocate_equal_error",
    "allocate_ranks",
    "max_useful_rank",
    "min_rank",
    "predicted_loss",
    "relative_errors",
    "tail_energies",
]


def tail_energies(singular_values: Tensor, length: int | None = None) -> Tensor:
    """``t[r] = Σ_{i>r} σ_i²`` for ``r = 0 .. length`` (float64; singular values beyond the given ones are 0)."""
    energy = singular_values.detach().to(torch.float64).flatten() ** 2
    length = energy.numel() if length is None else length
    padded = torch.zeros(max(length, energy.numel()), dtype=torch.float64, device=energy.device)
    padded[: energy.numel()] = energy
    tails = torch.cat([padded.flip(0).cumsum(0).flip(0), padded.new_zeros(1)])
    return tails[: length + 1]


def max_useful_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose factors hold fewer parameters than the dense ``out x in`` weight (0: none)."""
    return (out_features * in_features - 1) // (out_features + in_features)


def min_rank(out_features: int, in_features: int, min_fraction: float) -> int:
    """Smallest rank that keeps at least ``min_fraction`` of the dense weight's parameters (at least 1)."""
    return max(1, math.ceil(min_fraction * out_features * in_features / (out_features + in_features) - 1e-9))


@dataclass
class Allocation:
    """Ranks chosen by :func:`allocate_ranks` (``None``: keep dense) and what they cost and lose."""

    ranks: list[int | None]
    params: int  # parameters of the chosen ranks (dense layers count m n)
    loss: float  # weighted predicted loss Σ_ℓ w_ℓ Σ_{i>r_ℓ} σ_i²
    budget: int


def relative_errors(singular_values: Tensor, length: int) -> Tensor:
    """``e[r] = Σ_{i>r} σ_i² / Σ_i σ_i²`` for ``r = 0 .. length`` (zeros for an all-zero spectrum)."""
    values = torch.sort(singular_values.detach().to(torch.float64).flatten().abs(), descending=True).values
    tails = tail_energies(values, max(length, values.numel()))[: length + 1]
    return tails / tails[0] if tails[0] > 0 else torch.zeros_like(tails)


def allocate_equal_error(
    spectra: Sequence[Tensor], shapes: Sequence[tuple[int, int]], budget: int, min_fraction: float = 0.0
) -> Allocation:
    """Per-layer ranks minimizing the largest relative error ``max_ℓ e_ℓ(r_ℓ)`` with ``Σ_ℓ params_ℓ <= budget``.

    For an error level ε each layer takes the smallest rank (from its floor, see :func:`allocate_ranks`) whose
    relative error is at most ε, or stays dense when no rank that saves parameters reaches ε; the cost falls
    as ε grows, so bisection over the layers' attainable error values finds the smallest ε that fits. The
    leftover parameters then go, one rank step at a time, to the layer with the largest error whose step
    still fits. Returns the ranks with ``loss`` = the largest relative error among the factorized layers.

    Raises:
        ValueError: mismatched lengths, or a budget below what the floors already cost.
    """
    if len(spectra) != len(shapes):
        raise ValueError(f"got {len(spectra)} spectra for {len(shapes)} shapes: give one per layer.")
    floors = [min_rank(m, n, min_fraction) for m, n in shapes]
    tops = [max_useful_rank(m, n) for m, n in shapes]
    errors = [relative_errors(s, top) for s, top in zip(spectra, tops, strict=True)]
    floor_cost = sum(
        _cost(shape, floor if floor <= top else None) for shape, floor, top in zip(shapes, floors, tops, strict=True)
    )
    if floor_cost > budget:
        raise ValueError(
            f"budget={budget} parameters is below the {floor_cost} that the minimum kept fraction "
            f"{min_fraction:g} already needs: lower min_fraction or raise the budget."
        )

    def ranks_at(level: float) -> list[int | None]:
        ranks: list[int | None] = []
        for error, floor, top in zip(errors, floors, tops, strict=True):
            if floor > top:
                ranks.append(None)  # no rank at the floor saves parameters
                continue
            reached = torch.nonzero(error[floor : top + 1] <= level)
            ranks.append(floor + int(reached[0]) if reached.numel() else None)
        return ranks

    def cost(ranks: list[int | None]) -> int:
        return sum(_cost(shape, rank) for shape, rank in zip(shapes, ranks, strict=True))

    levels = torch.unique(torch.cat([e[f : t + 1] for e, f, t in zip(errors, floors, tops, strict=True) if f <= t]))
    low, high = 0, levels.numel() - 1  # the largest level: every layer at its floor, which fits
    while low < high:
        middle = (low + high) // 2
        if cost(ranks_at(float(levels[middle]))) <= budget:
            high = middle
        else:
            low = middle + 1
    ranks = ranks_at(float(levels[low]) if levels.numel() else 0.0)  # no levels: every layer dense
    remaining = budget - cost(ranks)
    while True:  # spend the leftover on the worst layers, one rank step each
        steps = [
            (float(errors[i][rank]), i)
            for i, rank in enumerate(ranks)
            if rank is not None and rank < tops[i] and sum(shapes[i]) <= remaining
        ]
        if not steps:
            break
        _, index = max(steps)
        ranks[index] += 1
        remaining -= sum(shapes[index])
    worst = max((float(errors[i][r]) for i, r in enumerate(ranks) if r is not None), default=0.0)
    return Allocation(ranks, cost(ranks), worst, budget)


def _cost(shape: tuple[int, int], rank: int | None) -> int:
    m, n = shape
    return m * n if rank is None else rank * (m + n)


def predicted_loss(
    spectra: Sequence[Tensor], ranks: Sequence[int | None], weights: Sequence[float] | None = None
) -> float:
    """``Σ_ℓ w_ℓ Σ_{i>r_ℓ} σ_i²`` with each spectrum sorted descending (a dense layer, ``r = None``, loses nothing)."""
    weights = [1.0] * len(spectra) if weights is None else weights
    total = 0.0
    for spectrum, rank, weight in zip(spectra, ranks, weights, strict=True):
        if rank is not None:
            values = torch.sort(spectrum.detach().flatten().abs(), descending=True).values
            total += weight * float(tail_energies(values, max(rank, values.numel()))[rank])
    return total


def _hull(points: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """Lower convex hull of (cost, loss, rank) points sorted by cost with decreasing loss."""
    hull: list[tuple[int, float, int | None]] = []
    for point in points:
        while len(hull) >= 2:
            (c0, l0, _), (c1, l1, _) = hull[-2], hull[-1]
            # drop hull[-1] when it lies on or above the segment hull[-2] -> point
            if (l1 - l0) * (point[0] - c0) >= (point[1] - l0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def allocate_ranks(
    spectra: Sequence[Tensor],
    shapes: Sequence[tuple[int, int]],
    budget: int,
    min_fraction: float = 0.0,
    weights: Sequence[float] | None = None,
    window: int = 4,
) -> Allocation:
    """Per-layer ranks minimizing ``Σ_ℓ w_ℓ Σ_{i>r_ℓ} σ_{ℓ,i}²`` with ``Σ_ℓ params_ℓ <= budget`` (see module doc).

    Args:
        spectra: each layer's singular values (sorted here; the whitened ``σ(W L)``).
        shapes: each layer's ``(out_features, in_features)``.
        budget: the most weight parameters the layers may hold together.
        min_fraction: every factorized layer keeps at least this fraction of its dense parameters
            (rank ``>= ceil(min_fraction m n / (m + n))``, at least 1); a layer for which that rank saves
            nothing can only stay dense.
        weights: per-layer weight ``w_ℓ >= 0`` of its loss (None: all 1).
        window: the final exact step searches this many options (ranks, then dense) either side of
            each layer's greedy choice; a window covering every option makes the result the exact optimum.

    Returns:
        The ranks (None: dense), their parameter count (``<= budget``) and their weighted predicted loss.

    Raises:
        ValueError: mismatched lengths, a negative weight, or a budget below what the floors already cost.
    """
    if len(spectra) != len(shapes):
        raise ValueError(f"got {len(spectra)} spectra for {len(shapes)} shapes: give one per layer.")
    weights = [1.0] * len(spectra) if weights is None else [float(w) for w in weights]
    if len(weights) != len(spectra):
        raise ValueError(f"got {len(weights)} weights for {len(spectra)} layers: give one per layer.")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights={weights!r} are invalid: use finite numbers >= 0.")
    every: list[list[tuple[int, float, int | None]]] = []  # per layer: (cost, loss, rank), floor..top, dense
    for spectrum, (m, n), weight in zip(spectra, shapes, weights, strict=True):
        top = max_useful_rank(m, n)
        values = torch.sort(spectrum.detach().to(torch.float64).flatten().abs(), descending=True).values
        tails = tail_energies(values, max(top, values.numel()))
        points: list[tuple[int, float, int | None]] = [
            (r * (m + n), weight * float(tails[r]), r) for r in range(min_rank(m, n, min_fraction), top + 1)
        ]
        every.append([*points, (m * n, 0.0, None)])
    hulls = [_hull(points) for points in every]
    floor_cost = sum(points[0][0] for points in every)
    if floor_cost > budget:
        raise ValueError(
            f"budget={budget} parameters is below the {floor_cost} that the minimum kept fraction "
            f"{min_fraction:g} already needs: lower min_fraction or raise the budget."
        )
    position = [0] * len(hulls)
    remaining = budget - floor_cost
    # Hull segments in order of loss removed per parameter; within a layer that order is the hull's own.
    segments = [
        ((hull[k][1] - hull[k + 1][1]) / (hull[k + 1][0] - hull[k][0]), index, k)
        for index, hull in enumerate(hulls)
        for k in range(len(hull) - 1)
    ]
    segments.sort(key=lambda s: (-s[0], s[1], s[2]))
    for _, index, k in segments:
        hull = hulls[index]
        step = hull[k + 1][0] - hull[k][0]
        if step > remaining:
            break  # the Lagrangian phase ends at the first segment that does not fit
        position[index] = k + 1
        remaining -= step
    greedy = [hull[p][2] for hull, p in zip(hulls, position, strict=True)]
    centres = [next(i for i, o in enumerate(points) if o[2] == r) for points, r in zip(every, greedy, strict=True)]
    ranks = _polish(every, centres, remaining, window)
    params = sum(_cost(shape, rank) for shape, rank in zip(shapes, ranks, strict=True))
    return Allocation(ranks, params, predicted_loss(spectra, ranks, weights), budget)


def _polish(
    every: list[list[tuple[int, float, int | None]]], centres: list[int], remaining: int, window: int
) -> list[int | None]:
    """Exact best allocation within ``window`` options of each layer's greedy choice (``centres``).

    A dynamic program over the net change of the parameter count, in units of the gcd of every cost
    change involved, keeping the net change at most ``remaining``: it spends the greedy's leftover and
    repairs its last partial step. With a window covering every option it is the exact optimum.
    """
    layers = []  # per layer: the options in the window, the greedy's index among them
    for points, centre in zip(every, centres, strict=True):
        low, high = max(0, centre - window), min(len(points), centre + window + 1)
        layers.append((points[low:high], centre - low))
    unit = 0
    for options, centre in layers:
        for cost, _, _ in options:
            unit = math.gcd(unit, abs(cost - options[centre][0]))
    unit = max(unit, 1)
    deltas = [[(cost - options[centre][0]) // unit for cost, _, _ in options] for options, centre in layers]
    low = sum(min(d) for d in deltas)
    size = sum(max(d) for d in deltas) - low + 1
    best = torch.full((size,), math.inf, dtype=torch.float64)
    best[-low] = 0.0  # state s: net change (s + low) * unit
    choices = []
    for (options, centre), delta in zip(layers, deltas, strict=True):
        candidates = torch.full((len(options), size), math.inf, dtype=torch.float64)
        for k, ((_, loss, _), shift) in enumerate(zip(options, delta, strict=True)):
            gain = loss - options[centre][1]
            if shift >= 0:
                candidates[k, shift:] = best[: size - shift] + gain
            else:
                candidates[k, :shift] = best[-shift:] + gain
        best, choice = candidates.min(dim=0)
        choices.append(choice)
    feasible = best[: min(size, remaining // unit - low + 1)]
    state = int(torch.nonzero(feasible <= feasible.min()).max())  # ties: the one that spends the most
    ranks: list[int | None] = [None] * len(layers)
    for index in range(len(layers) - 1, -1, -1):
        options, _ = layers[index]
        k = int(choices[index][state])
        ranks[index] = options[k][2]
        state -= deltas[index][k]
    return ranks
