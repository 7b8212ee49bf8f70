"""Closed-form low-rank factorization: the one solver behind every compression method.

Pure tensor math, no Lightning. For a layer ``y = W x`` (``W``: out x in) and two calibration input
streams ``X`` (what the layer sees in the original model) and ``X̂`` (what it sees in the partially
compressed model), every method solves

    min_{rank(W') <= r} ‖W X − W' X̂‖_F²

from covariances alone: ``H = X̂ X̂ᵀ = L Lᵀ`` (whitening) and a cross term ``K`` (``C = X X̂ᵀ`` for
AA-SVD, ``H`` for SVD-LLM). With ``M = W K L⁻ᵀ ≈ U_r Σ_r V_rᵀ`` the optimum is
``up = U_r Σ_r^½`` and ``down = Σ_r^½ V_rᵀ L⁻¹`` (AA-SVD, Theorem 3.1, with the transposes a
triangular Cholesky factor needs), and the minimum is ``‖WX‖² − ‖M‖² + Σ_{i>r} σ_i(M)²``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "AcesChoice",
    "all_finite",
    "CholeskyResult",
    "aces_beta",
    "aces_surrogate",
    "LowRankFactors",
    "damped_cholesky",
    "damping_schedule",
    "equal_tile_size",
    "reused_cholesky",
    "ridge_shift",
    "ridge_statistics",
    "factor_params",
    "gram",
    "lower_triangular_product",
    "output_error",
    "output_error_and_energy",
    "solver_output_error",
    "rank_from_ratio",
    "solve_lowrank",
    "truncated_svd",
]


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite, from one sum: a NaN makes the sum NaN and an infinity makes it
    infinite or NaN (inf - inf), so a finite sum proves every entry finite. Only when the sum itself overflows
    (finite entries too large to add up) is each entry tested. On a float64 11008 x 11008 matrix this is ~20x
    cheaper than ``torch.isfinite(tensor).all()``, which writes a boolean copy first."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


# The solver's two largest products go by column tiles of about this width on these devices: ``W L`` with ``L``
# lower triangular skips the zeros above its diagonal, ``Aᵀ A`` computes its upper triangle only (mirrored).
# ``bench_surgery.py --only solver`` (float64, 1 thread): the SVD-LLM solve 0.88x at 2048 x 5504 and 4096 x 4096.
# Devices not listed (GPUs: not measured) keep one product.
SOLVER_TILE_WIDTH: dict[str, int] = {"cpu": 512}


def equal_tile_size(n: int, width: int) -> int:
    """The size of equal tiles of about ``width`` over ``n`` columns (11008 by 512: 22 tiles of 501, not 21 of 512
    and a sliver of 256); ``n`` (one tile) when ``width`` is 0 or there would be fewer than two full tiles (one
    tile and a sliver was measured slower than one product)."""
    if not width or n < 2 * width:
        return n
    return math.ceil(n / math.ceil(n / width))


def _tiles(n: int, device: torch.device) -> list[tuple[int, int]]:
    """Equal column tiles ``[(start, stop), ...]`` of about the device's solver width over ``n`` columns."""
    size = equal_tile_size(n, SOLVER_TILE_WIDTH.get(device.type, 0))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def lower_triangular_product(matrix: Tensor, lower: Tensor) -> Tensor:
    """``matrix @ lower`` for a lower-triangular ``lower`` (a Cholesky factor, exact zeros above its diagonal):
    column tile ``[s, e)`` of the result only reads rows ``s:`` of ``lower`` (the rows above are zero), about
    ``(1 + 1/tiles) / 2`` of the multiply-adds of one product."""
    tiles = _tiles(lower.shape[-1], lower.device)
    if len(tiles) == 1:
        return matrix @ lower
    out = matrix.new_empty(matrix.shape[0], lower.shape[-1])
    for start, stop in tiles:
        torch.mm(matrix[:, start:], lower[start:, start:stop], out=out[:, start:stop])
    return out


def gram(matrix: Tensor) -> Tensor:
    """``matrixᵀ matrix``: tiles on and above the diagonal, the lower triangle mirrored from them (about
    ``(1 + 1/tiles) / 2`` of the multiply-adds of one product; exactly symmetric)."""
    tiles = _tiles(matrix.shape[-1], matrix.device)
    if len(tiles) == 1:
        return matrix.mT @ matrix
    n = matrix.shape[-1]
    out = matrix.new_empty(n, n)
    for start, stop in tiles:
        row = matrix[:, start:stop].mT @ matrix[:, start:]  # tile rows [start, stop), columns from the diagonal on
        out[start:stop, start:] = row
        out[stop:, start:stop] = row[:, stop - start:].mT
    return out


def rank_from_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Rank that removes ``ratio`` of a dense ``out x in`` layer's weight parameters.

    ``r = floor((1 − ratio) · m · n / (m + n))``, at least 1.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie in (0, 1) (the fraction of parameters removed); got {ratio!r}.")
    return max(1, math.floor((1.0 - ratio) * out_features * in_features / (out_features + in_features)))


def factor_params(out_features: int, in_features: int, rank: int) -> int:
    """Weight parameters of a rank-``rank`` factorization ``(out x r) @ (r x in)``."""
    return rank * (out_features + in_features)


@dataclass
class CholeskyResult:
    """Lower Cholesky factor of a (possibly damped) covariance and the damping that made it work."""

    factor: Tensor
    damping: float  # absolute value added to the diagonal (0.0 when none was needed)
    relative_damping: float  # damping / (trace / n)
    singular: bool  # True when the undamped matrix was not numerically positive definite


MAX_DAMPING_TRIES = 100  # bounds the escalation of damped_cholesky (the default schedule takes 8 tries)


def _check_damping_args(initial_damping: float, max_damping: float, growth: float, min_pivot: float) -> None:
    """Reject arguments with which the damping escalation would not terminate or would make no sense."""

    def real(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    for name, value in (("initial_damping", initial_damping), ("max_damping", max_damping)):
        if not real(value) or value <= 0:
            raise ValueError(
                f"{name}={value!r} is invalid: use a finite relative damping > 0 (x trace/n), e.g. 1e-6; "
                "0 or a negative value would never make a singular covariance positive definite."
            )
    if not real(growth) or growth <= 1:
        raise ValueError(
            f"growth={growth!r} is invalid: the damping escalates by this factor; use a number > 1, e.g. 10."
        )
    if not real(min_pivot) or min_pivot < 0:
        raise ValueError(f"min_pivot={min_pivot!r} is invalid: use a finite number >= 0, e.g. 1e-12.")


def damping_schedule(initial_damping: float, max_damping: float, growth: float) -> list[float]:
    """Relative dampings tried, in order: 0 (none), then ``initial_damping · growthᵏ`` up to ``max_damping``.

    Finite by construction (``growth > 1``, both ends positive); an ``initial_damping`` above
    ``max_damping`` is tried once.
    """
    _check_damping_args(initial_damping, max_damping, growth, 0.0)
    tries = math.log(max(max_damping / initial_damping, 1.0)) / math.log(growth)
    if tries > MAX_DAMPING_TRIES:
        raise ValueError(
            f"growth={growth!r} is invalid: escalating from initial_damping={initial_damping!r} to "
            f"max_damping={max_damping!r} would take {tries:.0f} Cholesky attempts (at most {MAX_DAMPING_TRIES}); "
            "use a larger growth, e.g. 10."
        )
    schedule = [0.0, float(initial_damping)]
    # Bounded: growth > 1 reaches max_damping in log(max / initial) / log(growth) steps.
    while schedule[-1] * growth <= max_damping:
        schedule.append(schedule[-1] * growth)
    return schedule


# (id, version, arguments) of the last covariance -> (a weak reference to it, its factor), inside reused_cholesky
_CHOLESKY_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("prehab_cholesky_cache", default=None)


@contextlib.contextmanager
def reused_cholesky() -> Iterator[None]:
    """Inside, :func:`damped_cholesky` of the covariance it factored last (the same tensor, not modified since,
    same arguments) returns that factor again: q/k/v and gate/up share one input covariance, solved one after
    another, which then is factored once per group instead of once per layer. One factor is kept, until the
    next covariance or the outermost exit (an inner ``reused_cholesky`` shares the outer one's)."""
    if _CHOLESKY_CACHE.get() is not None:
        yield
        return
    token = _CHOLESKY_CACHE.set({})
    try:
        yield
    finally:
        _CHOLESKY_CACHE.reset(token)


def damped_cholesky(
    matrix: Tensor,
    initial_damping: float = 1e-6,
    max_damping: float = 1.0,
    growth: float = 10.0,
    min_pivot: float = 1e-12,
) -> CholeskyResult:
    """Cholesky factor ``L`` (lower) of a symmetric PSD matrix, damped until it is positive definite.

    The matrix is factored as-is first. If that fails, or a pivot is below ``min_pivot · trace/n``
    (a singular matrix can pass Cholesky with tiny round-off pivots, which would blow up ``L⁻¹``),
    ``δ · trace/n`` is added to the diagonal with ``δ = initial_damping`` escalated by ``growth`` up to
    ``max_damping`` (:func:`damping_schedule`: a bounded number of tries). Always works in float64.

    Args:
        matrix: symmetric PSD ``n x n`` matrix (a covariance).
        initial_damping: first relative damping tried, > 0.
        max_damping: largest relative damping tried, > 0.
        growth: escalation factor, > 1.
        min_pivot: smallest accepted squared pivot, relative to ``trace/n``.

    Raises:
        ValueError: if an argument is out of range, the matrix has NaN/Inf entries, or no damping up to
            ``max_damping`` works.
    """
    _check_damping_args(initial_damping, max_damping, growth, min_pivot)
    cache = _CHOLESKY_CACHE.get()
    if cache is None or matrix.is_inference():  # an inference tensor has no version counter to tell a change by
        return _damped_cholesky(matrix, initial_damping, max_damping, growth, min_pivot)
    # The latest factor only (layers sharing a covariance come one after another): memory of one factor. A weak
    # reference, so that a temporary (a covariance moved to the weight's device) is not kept alive by the cache.
    key = (id(matrix), matrix._version, initial_damping, max_damping, growth, min_pivot)
    entry = cache.get(key)
    if entry is None or entry[0]() is not matrix:
        cache.clear()  # the previous factor goes before the next one is made
        entry = cache[key] = (
            weakref.ref(matrix),
            _damped_cholesky(matrix, initial_damping, max_damping, growth, min_pivot),
        )
    return entry[1]


def _damped_cholesky(
    matrix: Tensor, initial_damping: float, max_damping: float, growth: float, min_pivot: float
) -> CholeskyResult:
    matrix = matrix.to(torch.float64)
    n = matrix.shape[-1]
    if not all_finite(matrix):
        raise ValueError("covariance has NaN or Inf entries; cannot factor it.")
    scale = float(torch.diagonal(matrix).sum()) / n
    if scale <= 0.0:  # all-zero inputs: any whitening is optimal, take the identity
        eye = torch.eye(n, dtype=torch.float64, device=matrix.device)
        return CholeskyResult(eye, damping=1.0, relative_damping=float("inf"), singular=True)
    schedule = damping_schedule(initial_damping, max_damping, growth)
    # Every try is factored in place in one buffer: no n x n identity, no damped copy beside it, no factor beside
    # that. LAPACK works in column-major order, and the upper factor of the buffer's transpose (the same symmetric
    # matrix), written in column-major order, is the lower factor in the buffer's own row-major order.
    buffer = torch.empty_like(matrix, memory_format=torch.contiguous_format)
    info = torch.empty((), dtype=torch.int32, device=matrix.device)
    for relative in schedule:
        buffer.copy_(matrix)
        if relative:
            buffer.diagonal().add_(relative * scale)
        torch.linalg.cholesky_ex(buffer.mT, upper=True, out=(buffer.mT, info))
        if int(info) == 0 and float(torch.diagonal(buffer).min()) ** 2 >= min_pivot * scale:
            return CholeskyResult(buffer, relative * scale, relative, singular=relative > 0.0)
    raise ValueError(
        f"covariance is not positive definite even with damping {schedule[-1]:g} x trace/n; "
        "the calibration inputs are degenerate (check for constant or all-zero activations)."
    )


def ridge_statistics(stats: dict[str, Tensor], ridge: float) -> dict[str, Tensor]:
    """``stats`` with ``ε·s·I`` added to the covariances a solver reads: ``H`` and ``C`` (two streams), else ``G``.

    ``s = trace/n`` of ``H`` (else ``G``). This is the statistics of the calibration inputs plus ``n``
    pseudo-inputs ``x = x̂ = √(ε s) e_i`` on which the compressed layer must reproduce the original one, so every
    solver's objective gains ``ε s ‖W − W'‖_F²``: the anchored objective ``‖WX − W'X̂‖² + ε s ‖W − W'‖²``
    (AA-SVD; SAES-SVD's cross term ``(1−β)H + βC`` shifts alike), SVD-LLM's ``‖(W − W')X‖² + ε s ‖W − W'‖²``.
    Directions the calibration inputs barely reach then keep ``W`` instead of whatever coefficients fit the
    calibration set (the Tikhonov factor of the AA-SVD paper's Remark 3.3, with ``ε`` kept above zero). ``G`` of a
    two-stream group is left as it is (no solver reads it; it would be one more ``n x n`` copy). ``ridge = 0``
    returns ``stats`` itself.
    """
    if ridge == 0.0 or not stats:
        return stats
    keys = ("H", "C") if "H" in stats else ("G",)
    base = stats[keys[0]]
    shift = ridge_shift(stats, ridge)
    eye = torch.eye(base.shape[-1], dtype=base.dtype, device=base.device)
    return {key: value + shift * eye if key in keys else value for key, value in stats.items()}


def ridge_shift(stats: dict[str, Tensor], ridge: float) -> float:
    """The ``ε s`` that :func:`ridge_statistics` adds to the diagonal (``s = trace/n`` of ``H``, else ``G``)."""
    if ridge == 0.0 or not stats:
        return 0.0
    base = stats["H"] if "H" in stats else stats["G"]
    return ridge * float(torch.diagonal(base).sum()) / base.shape[-1]


def truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets ``(U_r, S_r, V_rᵀ)`` of ``matrix``, in float64.

    Works on the tall orientation: the eigendecomposition of the small Gram matrix
    (``min(m, n)`` squared) gives one side, one matrix product the other. In float64 the top
    singular vectors are accurate to round-off relative to ``σ_1``; singular values below
    ``1e-7 · σ_1`` (where the Gram route cannot resolve them) come back as exact zeros. It is
    several times faster than a full ``gesdd`` on CPU (see ``benchmarks/bench_solver.py``).
    """
    matrix = matrix.to(torch.float64)
    m, n = matrix.shape
    rank = min(rank, m, n)
    wide = m < n
    tall = matrix.mT if wide else matrix  # (big x small)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram(tall))
    order = torch.argsort(eigenvalues, descending=True)[:rank]
    singular = eigenvalues[order].clamp_min(0.0).sqrt()
    right = eigenvectors[:, order]  # small side
    # Fix each vector's sign (largest entry positive) so factors do not flip under tiny perturbations.
    pivot = right.gather(0, right.abs().argmax(dim=0, keepdim=True))
    right = right * torch.where(pivot < 0, -1.0, 1.0)
    # From the Gram matrix, σ below ~sqrt(eps)·σ_1 ≈ 1e-8·σ_1 is round-off: such directions carry
    # < 1e-14 of the energy, so zero them rather than divide by noise.
    safe = singular > singular.max().clamp_min(1e-300) * 1e-7
    left = (tall @ right) / torch.where(safe, singular, torch.ones_like(singular))
    left = left * safe
    singular = singular * safe
    if wide:
        return right, singular, left.mT
    return left, singular, right.mT


@dataclass
class LowRankFactors:
    """``W' = up @ down`` (float64) and how it was obtained."""

    up: Tensor  # out x r
    down: Tensor  # r x in
    singular_values: Tensor  # top-r singular values of the target M
    damping: float
    relative_damping: float
    singular: bool
    beta: float | None = None  # SAES-SVD's β, when one was used
    # What the solver factored, for :func:`solver_output_error`: the covariances it was given (references, no
    # copies; None for plain SVD), ‖M‖² of its target M = W K L⁻ᵀ, and the shift of its cross term K over the one
    # given (the damping when K was H itself, SVD-LLM; 0 when K was given, AA-SVD and SAES-SVD).
    whitening: Tensor | None = field(default=None, repr=False, compare=False)
    cross: Tensor | None = field(default=None, repr=False, compare=False)
    target_energy: float | None = None
    cross_shift: float = 0.0


def solve_lowrank(
    weight: Tensor,
    rank: int,
    whitening: Tensor | None = None,
    cross: Tensor | None = None,
    initial_damping: float = 1e-6,
    cholesky: CholeskyResult | None = None,
) -> LowRankFactors:
    """Optimal rank-``rank`` factors of ``weight`` for ``min ‖W X − W' X̂‖``, from covariances.

    Args:
        weight: ``W``, out x in.
        rank: target rank ``r``.
        whitening: ``H = X̂ X̂ᵀ`` (in x in), or None for plain SVD (identity whitening).
        cross: cross term ``K`` (in x in), ``C = X X̂ᵀ`` for the anchored objective. None means
            ``K = H`` (SVD-LLM), i.e. ``M = W L`` with the damped ``L``.
        initial_damping: first relative damping tried if ``H`` is not positive definite.
        cholesky: a precomputed :func:`damped_cholesky` of ``whitening`` (saves one factorization).

    Returns:
        Factors in float64 on ``weight``'s device.
    """
    w = weight.to(torch.float64)
    if whitening is None:
        if cross is not None:
            raise ValueError("cross term given without a whitening covariance.")
        u, s, vh = truncated_svd(w, rank)
        root = s.sqrt()
        return LowRankFactors(u * root, root[:, None] * vh, s, 0.0, 0.0, False)
    chol = cholesky or damped_cholesky(whitening.to(w.device), initial_damping=initial_damping)
    lower = chol.factor.to(w.device)
    if cross is None:
        target = lower_triangular_product(w, lower)
    else:
        # M = W K L⁻ᵀ, so Mᵀ = L⁻¹ (W K)ᵀ: one triangular solve, no inverse.
        kw = (w @ cross.to(device=w.device, dtype=torch.float64)).mT
        target = torch.linalg.solve_triangular(lower, kw, upper=False).mT
    u, s, vh = truncated_svd(target, rank)
    root = s.sqrt()
    # down = Σ^½ V_rᵀ L⁻¹, so downᵀ = L⁻ᵀ (V_r Σ^½): a solve with the upper factor Lᵀ.
    down = torch.linalg.solve_triangular(lower.mT, vh.mT * root, upper=True).mT
    return LowRankFactors(
        u * root, down, s, chol.damping, chol.relative_damping, chol.singular,
        whitening=whitening, cross=cross, target_energy=float(torch.linalg.vector_norm(target)) ** 2,
        cross_shift=chol.damping if cross is None else 0.0,
    )


def output_error(
    weight: Tensor,
    approx: Tensor | tuple[Tensor, Tensor],
    original_cov: Tensor | None,
    cross: Tensor | None = None,
    shifted_cov: Tensor | None = None,
    dense: float | None = None,
) -> float:
    """``‖W X − W' X̂‖_F²`` from covariances ``G = XXᵀ``, ``C = XX̂ᵀ``, ``H = X̂X̂ᵀ``.

    With ``cross``/``shifted_cov`` omitted, ``X̂ = X`` (one stream). ``dense``: ``‖W X‖² = tr(W G Wᵀ)`` when it
    is known otherwise (e.g. from the layer's outputs); ``original_cov`` may then be None (two streams only).
    ``approx``: ``W'``, or its factors ``(up, down)`` (``W' = up @ down``), which is cheaper (see
    :func:`output_error_and_energy`).
    """
    return output_error_and_energy(weight, approx, original_cov, cross, shifted_cov, dense)[0]


def output_error_and_energy(
    weight: Tensor,
    approx: Tensor | tuple[Tensor, Tensor],
    original_cov: Tensor | None,
    cross: Tensor | None = None,
    shifted_cov: Tensor | None = None,
    dense: float | None = None,
) -> tuple[float, float]:
    """:func:`output_error` and ``‖W X‖²`` (``dense``, or ``tr(W G Wᵀ)``), for a relative error.

    ``‖WX‖² − 2 tr(W C W'ᵀ) + tr(W' H W'ᵀ)`` costs one ``out x in x in`` product (``W C``, which also gives
    ``tr(W G Wᵀ)`` when ``C = G``) and, with factors, ``r x in x in`` for ``tr(W' H W'ᵀ) = ⟨down H downᵀ,
    upᵀ up⟩``: at 20% removed from a square layer about 0.5x the three ``out x in x in`` products of the plain
    formula.
    """
    w = weight.to(torch.float64)
    if original_cov is None and (dense is None or cross is None or shifted_cov is None):
        raise ValueError("output_error: without original_cov, pass dense, cross and shifted_cov.")
    g = None if original_cov is None else original_cov.to(torch.float64)
    c = g if cross is None else cross.to(torch.float64)
    h = g if shifted_cov is None else shifted_cov.to(torch.float64)
    wc = w @ c
    if dense is None:
        dense = float((wc * w).sum()) if cross is None else float((w @ g * w).sum())
    if isinstance(approx, tuple):
        up, down = (f.to(torch.float64) for f in approx)
        mixed = ((wc @ down.mT) * up).sum()  # tr(W C downᵀ upᵀ)
        compressed = ((down @ h @ down.mT) * (up.mT @ up)).sum()  # tr(up down H downᵀ upᵀ)
    else:
        a = approx.to(torch.float64)
        mixed = (wc * a).sum()  # tr(W C W'ᵀ)
        compressed = (a @ h * a).sum()
    return float(dense - 2.0 * mixed + compressed), dense


def solver_output_error(
    weight: Tensor, factors: LowRankFactors, dense: float | None = None, shift: float = 0.0
) -> tuple[float, float]:
    """:func:`output_error_and_energy` of the solver's own optimum, from the spectrum it already computed.

    Valid when the solver factored the report's statistics, up to ``shift`` (a ridge, :func:`ridge_statistics`)
    on the diagonal: ``factors.whitening`` is ``H`` (or ``G``, one stream) plus ``shift``, ``factors.cross`` is
    ``C`` plus ``shift`` (None with one stream: the solver's cross term is its damped whitening). The solver
    minimized ``F(W') = E − 2 tr(W (C + a I) W'ᵀ) + tr(W' (H + b I) W'ᵀ)`` for some constant ``E``, whose minimum
    over rank ``r`` is ``E − Σ_{i≤r} σ_i(M)²`` (AA-SVD, Theorem 3.1); ``F`` is the report's error plus
    ``E − ‖WX‖² − 2a ⟨W, W'⟩ + b ‖W'‖²``, so at the optimum the error is
    ``‖WX‖² − Σ_{i≤r} σ_i² + 2a ⟨W, W'⟩ − b ‖W'‖²``, with ``b`` = damping + ``shift`` and ``a`` =
    ``factors.cross_shift`` + ``shift``. No ``out x in x in`` product: ``⟨W, W'⟩`` costs ``out x in x r`` with a
    cross term and ``r x in`` without (only when ``a ≠ 0``), ``‖W'‖² = Σ σ_i ‖down_i‖²`` costs ``r x in``.

    Args:
        weight: ``W``, out x in.
        factors: :func:`solve_lowrank`'s result for ``weight`` with a whitening covariance.
        dense: ``‖WX‖²``. None: one stream (no cross term), where ``‖WX‖² = ‖W L‖² − b‖W‖²``
            (``L Lᵀ = G + b I``).
        shift: what was added to the report's covariances' diagonal before solving (0: nothing).

    Returns:
        ``(error, dense)`` as :func:`output_error_and_energy` returns them, equal to round-off.
    """
    if factors.target_energy is None:
        raise ValueError("solver_output_error needs factors from solve_lowrank with a whitening covariance.")
    if dense is None and factors.cross is not None:
        raise ValueError("solver_output_error: pass dense (‖WX‖²) for factors solved with a cross term.")
    up, down = (f.to(torch.float64) for f in (factors.up, factors.down))  # solve_lowrank's are float64 already
    cross_shift, whitening_shift = factors.cross_shift + shift, factors.damping + shift
    if dense is None:
        dense = factors.target_energy - whitening_shift * _squared_norm(weight)
    error = dense - float(factors.singular_values.to(torch.float64).square().sum())
    if cross_shift:
        error += 2.0 * cross_shift * _inner_with_optimum(weight, up, down, factors)
    if whitening_shift:
        # ‖up down‖² = tr(downᵀ Σ_r down) (up = U_r Σ_r^½ with orthonormal U_r): r x in work, not r² (out + in)
        error -= whitening_shift * _weighted_rows(factors.singular_values, down)
    return error, dense


def _inner_with_optimum(w: Tensor, up: Tensor, down: Tensor, factors: LowRankFactors) -> float:
    """``⟨W, W'⟩`` for the solver's ``W' = up down``. Without a cross term the target is ``M = W L`` and
    ``W' = U_r Σ_r V_rᵀ L⁻¹``, so ``Wᵀ W' = L⁻ᵀ Mᵀ U_r Σ_r V_rᵀ L⁻¹ = L⁻ᵀ V_r Σ_r² V_rᵀ L⁻¹`` and the inner product
    is ``Σ σ_i² ‖L⁻ᵀ v_i‖² = Σ σ_i ‖down_i‖²`` (``downᵀ = L⁻ᵀ V_r Σ_r^½``): ``r x in`` work instead of the
    ``out x in x r`` product a cross term needs."""
    if factors.cross is None:
        return _weighted_rows(factors.singular_values, down)
    return float(((w.to(torch.float64) @ down.mT) * up).sum())


def _squared_norm(matrix: Tensor, chunk_elements: int = 1 << 20) -> float:
    """``‖matrix‖²`` accumulated in float64 a block of rows at a time: no float64 copy of a whole ``out x in``
    weight (``vector_norm(..., dtype=float64)`` casts the whole input first)."""
    rows = max(1, chunk_elements // max(1, matrix.shape[-1]))
    return sum(float(matrix[i : i + rows].to(torch.float64).square().sum()) for i in range(0, matrix.shape[0], rows))


def _weighted_rows(singular_values: Tensor, down: Tensor) -> float:
    """``Σ σ_i ‖down_i‖²``."""
    return float((singular_values.to(torch.float64) * down.square().sum(dim=1)).sum())


@dataclass
class AcesChoice:
    """β chosen by ACES and the surrogate's pieces (for reports and tests)."""

    beta: float
    candidates: list[float]
    scores: list[float]
    coefficients: tuple[float, float, float, float, float, float]  # a, b, c, A, B, C


def aces_surrogate(beta: Tensor | float, coefficients: tuple[float, ...], objective: str = "ratio") -> Tensor | float:
    """Fixed-subspace first-order tail ratio ``(a + 2bβ + cβ²)/(A + 2Bβ + Cβ²)`` (or the tail energy).

    Where the total energy ``A + 2Bβ + Cβ²`` (``‖S + βD‖²``) is zero, e.g. for an all-zero weight, the tail
    (a projection of the same matrix) is zero too and the ratio is defined as 0: nothing can be lost.
    """
    a, b, c, big_a, big_b, big_c = coefficients
    tail = a + 2 * b * beta + c * beta * beta
    if objective == "energy":
        return tail
    total = big_a + 2 * big_b * beta + big_c * beta * beta
    if isinstance(total, Tensor):
        return torch.where(total > 0, tail / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
    return tail / total if total > 0 else 0.0


def aces_beta(
    weight: Tensor,
    whitening: Tensor,
    cross: Tensor,
    rank: int,
    beta_min: float = 0.25,
    beta_max: float = 0.75,
    objective: str = "ratio",
    beta_cap: float = 0.95,
    shrink: float = 1.0,
    cholesky: CholeskyResult | None = None,
) -> AcesChoice:
    """SAES-SVD's ACES (Algorithm 3): β minimizing the fixed-subspace tail surrogate, in closed form.

    ``S = W H L⁻ᵀ`` (= ``W L``) and ``D = W (C − H) L⁻ᵀ`` (SAES's ``Δ = (X − X̂) X̂ᵀ = C − H``). With
    ``P_L, P_R`` the projectors off the top-``rank`` singular subspaces of ``S``, the tail surrogate is
    ``‖P_L (S + βD) P_R‖²``; its ratio to ``‖S + βD‖²`` is stationary at the roots of
    ``(cB − bC)β² + (cA − aC)β + (bA − aB)``. Candidates are those roots and the interval ends (ratio),
    or ``−b/c`` (energy); each is clipped to ``[beta_min, beta_max]``, capped at ``beta_cap`` and
    multiplied by ``shrink`` (the guardrails of appendix A.11), and the best-scoring one wins (ties: the
    smallest β).

    A layer whose ``S`` and ``D`` are both zero (an all-zero weight, or all-zero inputs) has no tail to
    minimize: every score is 0 and β is ``beta_min`` (after the guardrails); the solve then gives zero factors.
    """
    w = weight.to(torch.float64)
    chol = cholesky or damped_cholesky(whitening)
    lower = chol.factor.to(w.device)
    h = whitening.to(device=w.device, dtype=torch.float64)
    s = lower_triangular_product(w, lower)
    difference = w @ (cross.to(device=w.device, dtype=torch.float64) - h)
    d = torch.linalg.solve_triangular(lower, difference.mT, upper=False).mT  # W (C − H) L⁻ᵀ
    u, _, vh = truncated_svd(s, rank)
    v = vh.mT
    # ⟨P_L A P_R, P_L B P_R⟩ = ⟨A, B⟩ − ⟨UᵀA, UᵀB⟩ − ⟨AV, BV⟩ + ⟨UᵀAV, UᵀBV⟩ (P = I − UUᵀ, I − VVᵀ projectors;
    # U's columns are orthonormal or zero): four out x in x r products instead of forming P_L S P_R and P_L D P_R.
    left = {"s": u.mT @ s, "d": u.mT @ d}
    right = {"s": s @ v, "d": d @ v}
    both = {key: value @ v for key, value in left.items()}
    full = {"s": s, "d": d}

    def inner(x: str, y: str) -> float:
        return float(
            (full[x] * full[y]).sum()
            - (left[x] * left[y]).sum()
            - (right[x] * right[y]).sum()
            + (both[x] * both[y]).sum()
        )

    coefficients = (  # squared norms cannot be negative; round-off in the differences above could make them so
        max(inner("s", "s"), 0.0),
        inner("s", "d"),
        max(inner("d", "d"), 0.0),
        float((s * s).sum()),
        float((s * d).sum()),
        float((d * d).sum()),
    )
    a, b, c, big_a, big_b, big_c = coefficients
    if objective == "ratio":
        raw = [beta_min, beta_max]
        quad, lin, const = c * big_b - b * big_c, c * big_a - a * big_c, b * big_a - a * big_b
        scale = max(abs(quad), abs(lin), abs(const), 1e-300)
        if abs(quad) > 1e-12 * scale:
            disc = lin * lin - 4 * quad * const
            if disc >= 0:
                root = math.sqrt(disc)
                raw += [(-lin + root) / (2 * quad), (-lin - root) / (2 * quad)]
        elif abs(lin) > 1e-12 * scale:
            raw.append(-const / lin)
    elif objective == "energy":
        raw = [-b / c if c > 0 else beta_min]
    else:
        raise ValueError(f"objective={objective!r} is invalid; valid values: 'ratio', 'energy'.")
    candidates = [shrink * min(min(max(beta, beta_min), beta_max), beta_cap) for beta in raw]
    scores = [float(aces_surrogate(beta, coefficients, objective)) for beta in candidates]
    best = min(range(len(candidates)), key=lambda i: (scores[i], candidates[i]))
    return AcesChoice(candidates[best], candidates, scores, coefficients)
