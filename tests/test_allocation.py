"""Rank allocation under a parameter budget (prehab.allocation), checked against brute force on small cases."""

import itertools

import pytest
import torch

from prehab.allocation import allocate_ranks, max_useful_rank, min_rank, predicted_loss, tail_energies
from prehab.linalg import factor_params, rank_from_ratio

SHAPES = [(8, 6), (6, 8), (10, 4), (5, 5)]


def _cost(shape, rank):
    m, n = shape
    return m * n if rank is None else rank * (m + n)


def _brute_force(spectra, shapes, budget, min_fraction, weights):
    """Smallest predicted loss over every combination of ranks (floor..top) and dense within the budget."""
    choices = [[*range(min_rank(m, n, min_fraction), max_useful_rank(m, n) + 1), None] for m, n in shapes]
    best = None
    for combo in itertools.product(*choices):
        if sum(_cost(s, r) for s, r in zip(shapes, combo, strict=True)) <= budget:
            loss = predicted_loss(spectra, combo, weights)
            best = loss if best is None else min(best, loss)
    return best


def _random_case(seed):
    g = torch.Generator().manual_seed(seed)
    spectra = [torch.rand(min(s), generator=g) ** (1 + 4 * seed % 3) * 10 * torch.rand(1, generator=g) for s in SHAPES]
    weights = torch.rand(len(SHAPES), generator=g).tolist()
    return spectra, weights


def test_tail_energies_are_suffix_sums_of_squares():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert tail_energies(s).tolist() == [14.0, 5.0, 1.0, 0.0]
    assert tail_energies(s, 5).tolist() == [14.0, 5.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("seed", range(6))
def test_allocation_equals_brute_force_optimum(seed):
    spectra, weights = _random_case(seed)
    dense = sum(m * n for m, n in SHAPES)
    for budget in range(52, dense + 1, 9):
        allocation = allocate_ranks(spectra, SHAPES, budget, 0.1, weights)
        assert allocation.params <= budget
        assert allocation.params == sum(_cost(s, r) for s, r in zip(SHAPES, allocation.ranks, strict=True))
        assert allocation.loss == pytest.approx(_brute_force(spectra, SHAPES, budget, 0.1, weights), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_alone_is_optimal_for_the_parameters_it_spends(seed):
    """Everett: the Lagrangian greedy (window=0, no final search) is the optimum at its own parameter count."""
    spectra, weights = _random_case(seed)
    for budget in range(52, 170, 13):
        greedy = allocate_ranks(spectra, SHAPES, budget, 0.1, weights, window=0)
        assert greedy.loss == pytest.approx(_brute_force(spectra, SHAPES, greedy.params, 0.1, weights), abs=1e-12)
        assert allocate_ranks(spectra, SHAPES, budget, 0.1, weights).loss <= greedy.loss + 1e-12


def test_budget_is_met_within_one_rank_step_and_beats_uniform_on_different_spectra():
    """Layers with very different spectra: fast-decaying ones give rank to slowly decaying ones."""
    g = torch.Generator().manual_seed(0)
    shapes = [(24, 16), (16, 24), (32, 16), (16, 16)] * 3
    spectra = [torch.linspace(1, 0.01, min(s)) ** (0.2 if i % 2 else 6.0) * (1 + i) for i, s in enumerate(shapes)]
    spectra = [s * (1 + 0.01 * torch.rand(s.shape, generator=g)) for s in spectra]
    for ratio in (0.2, 0.4, 0.6):
        uniform = [rank_from_ratio(m, n, ratio) for m, n in shapes]
        budget = sum(factor_params(m, n, r) for (m, n), r in zip(shapes, uniform, strict=True))
        allocation = allocate_ranks(spectra, shapes, budget, 0.05)
        assert budget - max(m + n for m, n in shapes) < allocation.params <= budget
        assert allocation.loss < 0.9 * predicted_loss(spectra, uniform)
        kept = [_cost(s, r) / (s[0] * s[1]) for s, r in zip(shapes, allocation.ranks, strict=True)]
        assert min(kept) >= 0.05
        slow = sum(k for i, k in enumerate(kept) if i % 2)
        fast = sum(k for i, k in enumerate(kept) if not i % 2)
        assert slow > fast  # the slowly decaying spectra keep more


def test_a_layer_goes_dense_when_that_is_cheaper_than_useful_ranks():
    flat = torch.ones(6)  # every rank step of this layer removes the same energy: dense is best at a large budget
    allocation = allocate_ranks([flat, torch.tensor([1.0, 0, 0, 0, 0, 0])], [(8, 6), (8, 6)], 48 + 14, 0.1)
    assert allocation.ranks == [None, 1]
    assert allocation.loss == 0.0


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="below the .* minimum kept fraction"):
        allocate_ranks([torch.ones(6)], [(8, 6)], 10, 0.5)
    with pytest.raises(ValueError, match="one per layer"):
        allocate_ranks([torch.ones(6)], [(8, 6), (8, 6)], 100)
    with pytest.raises(ValueError, match="weights"):
        allocate_ranks([torch.ones(6)], [(8, 6)], 100, weights=[-1.0])


def _brute_force_minimax(spectra, shapes, budget, min_fraction):
    """Smallest largest relative error (factorized layers) over every allocation within the budget."""
    from prehab.allocation import relative_errors

    errors = [relative_errors(s, max_useful_rank(m, n)) for s, (m, n) in zip(spectra, shapes, strict=True)]
    choices = [[*range(min_rank(m, n, min_fraction), max_useful_rank(m, n) + 1), None] for m, n in shapes]
    best = None
    for combo in itertools.product(*choices):
        if sum(_cost(s, r) for s, r in zip(shapes, combo, strict=True)) <= budget:
            worst = max((float(e[r]) for e, r in zip(errors, combo, strict=True) if r is not None), default=0.0)
            best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_equal_error_allocation_equals_the_brute_force_minimax(seed):
    from prehab.allocation import allocate_equal_error, relative_errors

    spectra, _ = _random_case(seed)
    dense = sum(m * n for m, n in SHAPES)
    for budget in range(52, dense + 1, 9):
        allocation = allocate_equal_error(spectra, SHAPES, budget, 0.1)
        assert allocation.params <= budget
        assert allocation.params == sum(_cost(s, r) for s, r in zip(SHAPES, allocation.ranks, strict=True))
        assert allocation.loss == pytest.approx(_brute_force_minimax(spectra, SHAPES, budget, 0.1), abs=1e-12)
        # the leftover went to the worst layers: no factorized layer can take one more rank step within budget
        left = budget - allocation.params
        for (m, n), rank in zip(SHAPES, allocation.ranks, strict=True):
            assert rank is None or rank == max_useful_rank(m, n) or m + n > left
        worst = [
            float(relative_errors(s, max_useful_rank(*shape))[r])
            for s, shape, r in zip(spectra, SHAPES, allocation.ranks, strict=True)
            if r is not None
        ]
        assert max(worst, default=0.0) == pytest.approx(allocation.loss)


def test_equal_error_is_never_worse_than_uniform_ranks_in_its_worst_layer():
    from prehab.allocation import allocate_equal_error, relative_errors

    g = torch.Generator().manual_seed(3)
    shapes = [(64, 48), (48, 64), (96, 32), (40, 40), (64, 64)]
    spectra = [torch.rand(min(s), generator=g) ** p for s, p in zip(shapes, (1, 4, 8, 0.5, 2), strict=True)]
    for ratio in (0.2, 0.4, 0.6):
        uniform = [rank_from_ratio(m, n, ratio) for m, n in shapes]
        budget = sum(factor_params(m, n, r) for (m, n), r in zip(shapes, uniform, strict=True))
        allocation = allocate_equal_error(spectra, shapes, budget, 0.05)
        uniform_worst = max(
            float(relative_errors(s, max_useful_rank(*shape))[r])
            for s, shape, r in zip(spectra, shapes, uniform, strict=True)
        )
        assert allocation.params <= budget
        assert allocation.loss <= uniform_worst + 1e-12  # uniform ranks are one feasible allocation


def test_equal_error_refuses_a_budget_below_the_floors():
    from prehab.allocation import allocate_equal_error

    with pytest.raises(ValueError, match="budget=10 parameters is below"):
        allocate_equal_error([torch.ones(6)] * 2, [(8, 6), (8, 6)], 10, 0.5)
