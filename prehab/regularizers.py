"""Spectral regularizers for Prehab: differentiable surrogates of the rank of a whitened weight ``A = W L``.

Pure torch functions, no Lightning. Each takes a 2-D tensor ``A`` (``out x in``; any orientation, any
device) and returns a 0-dim tensor in ``A``'s floating dtype (float32 for half/bfloat16 inputs) that
autograd can differentiate w.r.t. ``A``:

* :func:`stable_rank` — ``‖A‖_*² / ‖A‖_F²`` with ``‖A‖_*`` from a seeded randomized sketch (cheap; the
  paper's choice, eq. 5). :func:`stable_rank` with ``exact=True`` / :func:`nuclear_stable_rank` is the
  exact, SVD-based reference.
* :func:`nuclear` — exact ``Σ σ_i(A)`` (eq. 4; needs a full SVD, scales poorly).
* :func:`tail` — ``Σ_{i>r} σ_i² / ‖A‖_F²``, the relative energy a rank-``r`` truncation discards. With
  ``A = W L`` this is exactly the relative SVD-LLM truncation loss of the layer.

:func:`get_regularizer` maps a name (or a callable) to one of them; :func:`stable_rank_exact` is a
no-grad stable rank for logging.

How the sketched nuclear norm works (:func:`sketched_nuclear`)
--------------------------------------------------------------
Orient ``A`` wide (``m <= n``; transpose if needed) and let ``l = rank_sketch + oversample``.

1. Range finder, **without autograd**: ``Q = orth(A Ω)`` with a Gaussian ``Ω`` (``n x l``), then
   ``power_iters`` rounds of ``Q = orth(A orth(Aᵀ Q))`` (re-orthonormalised every half step, float32).
2. Head: ``B = Qᵀ A`` (``l x n``, differentiable); its singular values come from the float64
   eigenvalues of the small Gram ``B Bᵀ`` (``l x l``). ``head = Σ σ_i(B)``.
3. Tail: ``A = Q B + R`` with ``R = (I − QQᵀ) A``. Its energy is exact,
   ``E = ‖A‖_F² − ‖B‖_F²`` (differentiable), and its nuclear mass is modelled as
   ``‖R‖_* ≈ sqrt(E) · s`` with a detached shape factor ``s`` from moment matching on the ``N = m − l``
   squared singular values of ``R``: their mean ``E / N`` is exact and their second moment comes from
   ``tr((RRᵀ)²)``, estimated with ``probes`` Rademacher vectors (Hutchinson). ``s`` is the mean of two
   models fitted to these moments, which bracket the truth in every case measured: a Gamma law for
   ``λ = σ²`` (``E[√λ] = √θ Γ(κ+½)/Γ(κ)``; exact for bulk-like tails, **under**-estimates long
   power-law tails) and an ordered power law ``σ_i ∝ i^-α``, ``i = l+1..m`` (exact for power laws,
   **over**-estimates Marchenko–Pastur-like bulks). A flat tail gives ``s = √N`` for both.
4. ``‖A‖_* ≈ head + sqrt(E) · s``; ``‖A‖_F`` is exact.

If ``l >= m`` the sketch spans all of ``A`` and the result is the exact nuclear norm (up to float32
round-off in ``Q``), so small layers are handled exactly.

Gradient. ``Q`` is treated as a constant (it is built under ``no_grad``). At an exact top-``l``
singular subspace this is the true gradient of ``head`` and of ``E`` (the subspace is stationary for
both, an envelope argument), and it saves back-propagating through the QRs: the backward costs one
``m x l x n`` matmul. The head directions get the exact ``U_h V_hᵀ``; the tail gets
``(‖R‖_*/‖R‖_F²) · R``, i.e. tail singular directions are weighted ∝ ``σ_i`` instead of uniformly (the
smallest singular values are pushed less than by the exact gradient, which gives every direction unit
weight). Measured cosine similarity of the stable-rank gradient with the exact one: ≈ 0.985 on 256x1024
power-law spectra (tests), but only 0.80–0.87 on real whitened SmolLM2-135M weights (576x1536) and
0.5–0.65 on flat or fast-decaying spectra, where most of the exact gradient sits on the many tail
directions. It is still a descent direction for the stable rank (it shrinks the tail multiplicatively
instead of by a constant). Where the exact gradient matters and ``min(m, n)`` is at most ~1–2k,
``stable_rank(A, exact=True)`` (float64 Gram eigenvalues) costs about the same as the sketch.

Bias and error (measured; see ``tests/test_regularizers.py`` and ``benchmarks/RESULTS.md``).
The estimate is biased, not unbiased, with three sources:

* the split ``‖A‖_* ≈ ‖B‖_* + ‖R‖_*`` is the triangle-inequality upper bound: **≥ 0** bias, small
  when ``Q`` is close to the top singular subspace (power iterations make it so);
* the tail model (with exact moments, as a share of ``‖A‖_*``, head 136): Gamma −5% / power law 0%
  on ``σ_i ∝ i^-0.5`` at 4096 (their mean: −2.5%; −1% at the default head 264 there); +0.3% / +1%
  on real SmolLM2-135M MLP weights; +1.4% / +2.3% on a whitened attention projection; +0.4% / +1.6%
  on a 4096x11008 Gaussian matrix; +1.3% for a geometric (``e^{-i/60}``) spectrum;
* Hutchinson noise in the tail variance (a few % of the variance, mostly ≪ 1% of ``‖A‖_*``).

Net relative error of ``‖A‖_*`` at the defaults (head ``max(128, min(m,n)/16)`` + 8, 2 power
iterations, 16 probes), measured: |error| < 0.4% on 256x1024 matrices with ``σ_i ∝ i^-0.5`` or
``i^-1``; on 576x1536: −0.8% … +0.1% on pure power laws, ≤ 0.6% on a Gaussian matrix, ≤ 0.9% on real
whitened SmolLM2-135M MLP weights, ≤ 1.8% on a whitened attention projection, ≤ 3% on raw
(unwhitened) attention weights, ≈ +1% for a geometric spectrum; −1.7% at 4096x11008 with
``σ_i ∝ i^-0.5`` (benchmark). The stable rank (``‖A‖_*²``) doubles the relative error. Typically a
slight **over**-estimate on real weights, a slight **under**-estimate on long power-law tails;
seed-to-seed spread ≈ 0.1–0.5%.

Seed semantics. With ``generator=None`` a fresh ``torch.Generator`` on ``A``'s device is seeded with
``seed`` on every call: the same ``A`` and ``seed`` give bit-identical values (on the same device and
thread count); a different seed gives a slightly different value. Pass ``generator=`` to draw from (and
advance) your own stream instead. The random matrices never require grad.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "REGULARIZERS",
    "get_regularizer",
    "nuclear",
    "nuclear_stable_rank",
    "sketched_nuclear",
    "stable_rank",
    "stable_rank_exact",
    "tail",
]

_TINY = 1e-30


def _check_matrix(a: Tensor, name: str = "A") -> Tensor:
    if not isinstance(a, Tensor) or a.dim() != 2:
        shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        raise ValueError(f"{name} must be a 2-D tensor (out x in); got {shape}.")
    if not a.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got {a.dtype}.")
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()
    return a


def _check_positive_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return value


def _generator(a: Tensor, seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator(device=a.device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


@torch.no_grad()
def _range_finder(a: Tensor, width: int, power_iters: int, g: torch.Generator) -> Tensor:
    """Orthonormal ``m x width`` basis approximating the top left singular subspace of wide ``a``."""
    omega = torch.randn(a.shape[1], width, generator=g, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(a.mT @ q).Q
        q = torch.linalg.qr(a @ z).Q
    return q


def _gamma_sqrt_mean(mean: float, variance: float) -> float:
    """``E[√λ] / √E[λ]`` for a Gamma-distributed ``λ`` with the given mean and variance (1 when flat)."""
    if mean <= 0.0:
        return 1.0
    if variance <= 1e-12 * mean * mean:
        return 1.0
    kappa = mean * mean / variance  # shape; scale θ = variance / mean
    if kappa > 1e6:  # Γ(κ+½)/Γ(κ) ≈ √κ (1 − 1/(8κ))
        return 1.0 - 1.0 / (8.0 * kappa)
    # E[√λ] = √θ Γ(κ+½)/Γ(κ) and √E[λ] = √(κθ)
    return math.exp(math.lgamma(kappa + 0.5) - math.lgamma(kappa) - 0.5 * math.log(kappa))


def _power_law_shape(start: int, stop: int, ratio: float) -> float:
    """``Σσ_i / sqrt(Σσ_i²)`` for ``σ_i = i^-α``, ``i = start+1..stop``, with α chosen so that
    ``N Σσ⁴ / (Σσ²)²`` equals ``ratio`` (the tail's normalised fourth moment; 1 when flat)."""
    j = torch.arange(start + 1, stop + 1, dtype=torch.float64).log()
    alphas = torch.linspace(0.0, 4.0, 401, dtype=torch.float64)
    s2 = torch.exp(-2.0 * alphas[:, None] * j[None, :])  # σ² for every α on the grid
    fitted = j.numel() * s2.square().sum(1) / s2.sum(1).square()  # increasing in α
    index = max(int((fitted <= ratio).sum()) - 1, 0)
    return float(s2[index].sqrt().sum() / s2[index].sum().sqrt())


def _sketch_parts(
    a: Tensor,
    rank_sketch: int,
    oversample: int,
    power_iters: int,
    probes: int,
    g: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Sketched ``(‖A‖_*, ‖A‖_F²)`` of a wide float matrix, both differentiable, in float64."""
    m = a.shape[0]
    width = min(rank_sketch + oversample, m)
    q = _range_finder(a.detach(), width, power_iters, g)
    b = q.mT @ a  # width x n, differentiable (q is a constant)
    gram = b.double() @ b.double().mT
    eig = torch.linalg.eigvalsh(gram)
    top = eig.max().detach().clamp_min(_TINY)
    head = eig.clamp_min(1e-14 * top).sqrt().sum()  # clamp keeps the 1/σ in the backward finite
    fro2 = torch.linalg.vector_norm(a).double().square()
    tail_count = m - width
    if tail_count <= 0:
        return head, fro2
    energy = (fro2 - eig.sum()).clamp_min(1e-12 * fro2.detach().clamp_min(_TINY))
    with torch.no_grad():  # tail shape factor from moment matching (detached)
        ad = a.detach()
        omega = torch.randint(0, 2, (m, probes), generator=g, device=a.device).to(ad.dtype) * 2 - 1
        omega = omega - q @ (q.mT @ omega)  # probe the residual's column space only
        y = ad.mT @ omega - b.detach().mT @ (q.mT @ omega)  # Rᵀ ω
        z = ad @ y - q @ (b.detach() @ y)  # R Rᵀ ω
        fourth = float(z.double().square().sum()) / probes  # ≈ tr((R Rᵀ)²) = Σ σ_i(R)⁴
        e = float(energy)
        mean = e / tail_count
        gamma = math.sqrt(tail_count) * _gamma_sqrt_mean(mean, fourth / tail_count - mean * mean)
        power = _power_law_shape(width, m, tail_count * fourth / max(e * e, _TINY))
        shape = 0.5 * (gamma + power)
    return head + energy.sqrt() * shape, fro2


def _default_head(a: Tensor) -> int:
    """Default head size: 128, or ``min(m, n) / 16`` for large layers (256 for 4096x11008)."""
    return max(128, min(a.shape) // 16)


def _checked_sketch_args(
    A: Tensor, rank_sketch: int | None, oversample: int, power_iters: int, probes: int
) -> tuple[Tensor, int]:
    """Validate the sketch's arguments (naming the bad one); returns the checked matrix and head size."""
    a = _check_matrix(A)
    rank_sketch = _default_head(a) if rank_sketch is None else _check_positive_int(rank_sketch, "rank_sketch", 1)
    _check_positive_int(oversample, "oversample", 0)
    _check_positive_int(power_iters, "power_iters", 0)
    _check_positive_int(probes, "probes", 1)
    return a, rank_sketch


def _wide(a: Tensor) -> Tensor:
    return a.mT if a.shape[0] > a.shape[1] else a


def sketched_nuclear(
    A: Tensor,
    rank_sketch: int | None = None,
    oversample: int = 8,
    power_iters: int = 2,
    probes: int = 16,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Randomized, differentiable estimate of ``‖A‖_*`` (see the module docstring for method and bias).

    Args:
        A: 2-D tensor; float16/bfloat16 is computed in float32.
        rank_sketch: head size; the range finder has ``rank_sketch + oversample`` columns. When that
            reaches ``min(A.shape)`` the result is exact. Default ``max(128, min(A.shape) // 16)``.
        oversample: extra range-finder columns (they also count in the head).
        power_iters: subspace (power) iterations; 2 makes the head accurate for slowly decaying spectra.
        probes: Rademacher probes for the tail variance (no gradient flows through them).
        seed: seeds a fresh generator on ``A``'s device (``None``: nondeterministic).
        generator: use (and advance) this generator instead of ``seed``.
    """
    a, rank_sketch = _checked_sketch_args(A, rank_sketch, oversample, power_iters, probes)
    g = _generator(a, seed, generator)
    nuc, _ = _sketch_parts(_wide(a), rank_sketch, oversample, power_iters, probes, g)
    return nuc.to(a.dtype)


def stable_rank(
    A: Tensor,
    rank_sketch: int | None = None,
    oversample: int = 8,
    power_iters: int = 2,
    probes: int = 16,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    exact: bool = False,
) -> Tensor:
    """Stable rank ``‖A‖_*² / ‖A‖_F²`` (paper eq. 5), differentiable w.r.t. ``A``.

    ``‖A‖_*`` comes from :func:`sketched_nuclear` (randomized range finder + small float64 eigen-core +
    a moment-matched model of the tail; see the module docstring for bias, error and seed semantics);
    ``‖A‖_F`` is exact. It lies in ``[1, min(m, n)]`` (up to the sketch error) and is scale invariant.
    With ``exact=True`` it is ``nuclear_stable_rank(A, method="gram")``: exact value and gradient from the
    float64 eigenvalues of the small-side Gram matrix (cost ``m²n + m³``, fine up to ``min(m, n)`` ~ 2k).

    Cost at the defaults (head ``l = max(128, min(m,n)/16) + 8``): ``2·power_iters + 2`` products of
    ``A`` with ``l``-column matrices, QRs of those, two thin products with the probes, one ``l x l``
    float64 eigensolve, two Python-side scalars (a host sync on CUDA); backward is one product.
    Returns 0 for an all-zero ``A``. When the sketch would span ``A`` (``l >= min(m, n)``) the exact route is
    taken instead: same value, less work.
    """
    if exact:
        return nuclear_stable_rank(A, method="gram")
    a, rank_sketch = _checked_sketch_args(A, rank_sketch, oversample, power_iters, probes)
    if rank_sketch + oversample >= min(a.shape):
        # The sketch would span all of A: the exact small-Gram route gives the same value, several times faster.
        return nuclear_stable_rank(A, method="gram")
    g = _generator(a, seed, generator)
    nuc, fro2 = _sketch_parts(_wide(a), rank_sketch, oversample, power_iters, probes, g)
    return (nuc.square() / fro2.clamp_min(_TINY)).to(a.dtype)


def nuclear(A: Tensor) -> Tensor:
    """Exact nuclear norm ``Σ σ_i(A)`` (paper eq. 4) via ``torch.linalg.svdvals``; gradient ``U Vᵀ``."""
    a = _check_matrix(A)
    return torch.linalg.svdvals(a).sum()


def nuclear_stable_rank(A: Tensor, method: str = "svd") -> Tensor:
    """Exact stable rank ``(Σ σ_i)² / Σ σ_i²``, differentiable (the reference for :func:`stable_rank`).

    ``method="svd"``: ``torch.linalg.svdvals`` in ``A``'s dtype (slow when large; the backward needs a
    full SVD). ``method="gram"``: float64 eigenvalues ``λ`` of the small-side Gram matrix, ``σ = √λ``
    with ``λ`` clamped at ``1e-14·λ_max`` (keeps ``1/σ`` in the backward finite; singular values below
    ~1e-7·σ_1 are lost to round-off, a negligible change of ``‖A‖_*``); the eigenvalue-only backward
    has no eigenvector divisions. Returns ``A``'s dtype.
    """
    a = _check_matrix(A)
    if method == "svd":
        s = torch.linalg.svdvals(a)
        return s.sum().square() / s.square().sum().clamp_min(_TINY)
    if method == "gram":
        w = _wide(a).double()
        eig = torch.linalg.eigvalsh(w @ w.mT)
        top = eig.max().detach().clamp_min(_TINY)
        nuc = eig.clamp_min(1e-14 * top).sqrt().sum()
        return (nuc.square() / eig.sum().clamp_min(_TINY)).to(a.dtype)
    raise ValueError(f"method={method!r} is not one of 'svd', 'gram'.")


@torch.no_grad()
def stable_rank_exact(A: Tensor) -> Tensor:
    """Exact stable rank for logging: no gradient, float64 eigenvalues of the small-side Gram matrix.

    ``σ_i² = eig(A Aᵀ)`` on the smaller side (``min(m,n)³`` plus one Gram product: ~0.05 s for
    576x1536 on 2 CPU cores, several times cheaper than an SVD). Singular values below ~1e-7·σ_1 are
    lost to round-off, which changes ``‖A‖_*`` by < 1e-7·min(m,n) relative. Returns a float64 0-dim
    tensor (0 for an all-zero ``A``).
    """
    a = _wide(_check_matrix(A)).double()
    eig = torch.linalg.eigvalsh(a @ a.mT).clamp_min(0.0)
    fro2 = eig.sum()
    if float(fro2) <= 0.0:
        return fro2
    return eig.sqrt().sum().square() / fro2


def tail(A: Tensor, rank: int) -> Tensor:
    """Relative energy past rank ``rank``: ``Σ_{i>rank} σ_i² / ‖A‖_F²``, differentiable w.r.t. ``A``.

    Equals ``‖A − A_r‖_F² / ‖A‖_F²`` for the best rank-``rank`` approximation ``A_r`` (Eckart–Young);
    with ``A = W L`` it is the relative SVD-LLM truncation loss of that layer at that rank (get the
    rank from ``prehab.linalg.rank_from_ratio``). Computed as ``1 − Σ_{i<=r} λ_i / Σ λ_i`` from the float64
    eigenvalues ``λ`` of the small-side Gram matrix; the gradient ``−2/‖A‖_F² (P_r − t I) A`` (``P_r`` the
    top-``r`` left projector, ``t`` the value) needs no eigenvector division, so repeated singular
    values are harmless. Returns 0 for an all-zero ``A``.

    Raises:
        ValueError: if ``rank`` is not an integer in ``[1, min(A.shape)]``.
    """
    a = _check_matrix(A)
    limit = min(a.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"rank must be an integer in [1, min(A.shape)] = [1, {limit}] for A of shape {tuple(a.shape)}; "
            f"got rank={rank!r}."
        )
    w = _wide(a).double()
    eig = torch.linalg.eigvalsh(w @ w.mT)  # ascending
    total = eig.sum()
    kept = eig[-rank:].sum()
    value = (total - kept).clamp_min(0.0) / total.clamp_min(_TINY)
    return value.to(a.dtype)


REGULARIZERS: dict[str, Callable[..., Tensor]] = {
    "stable_rank": stable_rank,
    "nuclear": nuclear,
    "tail": tail,
}


def get_regularizer(regularizer: str | Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The regularizer function for a name in :data:`REGULARIZERS`, or the callable itself.

    Calling conventions: ``stable_rank(A, seed=...)``, ``nuclear(A)``, ``tail(A, rank)``; each returns a
    differentiable 0-dim tensor. A callable is returned unchanged (it should follow the same shape).

    Raises:
        ValueError: naming the argument and listing the valid names, for an unknown name or a non-callable.
    """
    if callable(regularizer):
        return regularizer
    if isinstance(regularizer, str) and regularizer in REGULARIZERS:
        return REGULARIZERS[regularizer]
    valid = ", ".join(repr(name) for name in REGULARIZERS)
    raise ValueError(f"regularizer={regularizer!r} is not a known regularizer; use one of {valid} or a callable.")
