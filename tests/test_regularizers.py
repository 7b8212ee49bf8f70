"""Spectral regularizers against independent float64 SVD references."""

import pytest
import torch

from prehab.regularizers import (
    REGULARIZERS,
    get_regularizer,
    nuclear,
    nuclear_stable_rank,
    sketched_nuclear,
    stable_rank,
    stable_rank_exact,
    tail,
)


def _spectrum_matrix(m, n, alpha, seed=0):
    """``U diag(σ) Vᵀ`` with Haar-like orthonormal ``U``, ``V`` and ``σ_i = i^-alpha`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float64) ** (-alpha)
    return (u * sigma) @ v.T, sigma


def _exact_stable_rank(a):
    s = torch.linalg.svdvals(a)
    return s.sum() ** 2 / (a**2).sum()


@pytest.fixture(scope="module")
def spectra():
    return {alpha: _spectrum_matrix(256, 1024, alpha, seed=int(10 * alpha))[0] for alpha in (0.5, 1.0)}


@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("rank_sketch", [32, 128])
def test_sketched_nuclear_norm_within_5_percent(spectra, alpha, rank_sketch):
    a = spectra[alpha]
    exact = float(torch.linalg.svdvals(a).sum())
    for seed in range(3):
        estimate = float(sketched_nuclear(a.float(), rank_sketch=rank_sketch, seed=seed))
        assert abs(estimate / exact - 1) < 0.05, (alpha, rank_sketch, seed, estimate, exact)
    # the stable rank inherits it (squared: within ~10%), and the Frobenius part is exact
    estimate = float(stable_rank(a.float(), rank_sketch=rank_sketch))
    assert abs(estimate / float(_exact_stable_rank(a)) - 1) < 0.1


def test_tail_of_the_sketch_matters(spectra):
    """With a short head, dropping the modelled tail would miss most of the nuclear norm."""
    a = spectra[0.5]
    exact = float(torch.linalg.svdvals(a).sum())
    head_only = float(torch.linalg.svdvals(a)[:40].sum())
    assert head_only / exact < 0.6  # so the < 5% accuracy above is the tail model's doing
    assert abs(float(sketched_nuclear(a.float(), rank_sketch=32)) / exact - 1) < 0.05


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_stable_rank_gradient_points_like_the_exact_one(spectra, alpha):
    a = spectra[alpha].float().requires_grad_()
    stable_rank(a, seed=1).backward()
    reference = spectra[alpha].clone().requires_grad_()
    _exact_stable_rank(reference).backward()
    cosine = torch.nn.functional.cosine_similarity(a.grad.double().flatten(), reference.grad.flatten(), dim=0)
    assert cosine > 0.95


def test_seed_semantics():
    a, _ = _spectrum_matrix(200, 500, 0.7, seed=4)
    a = a.float()
    first = stable_rank(a, rank_sketch=24, seed=3)
    assert torch.equal(first, stable_rank(a, rank_sketch=24, seed=3))
    other = stable_rank(a, rank_sketch=24, seed=4)
    assert not torch.equal(first, other)
    assert abs(float(other) / float(first) - 1) < 0.05
    # an explicit generator is used (and advanced) instead of the seed
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(stable_rank(a, rank_sketch=24, generator=g1), stable_rank(a, rank_sketch=24, generator=g2))
    assert not torch.equal(stable_rank(a, rank_sketch=24, generator=g1), stable_rank(a, rank_sketch=24, seed=9))
    # the global RNG is untouched
    state = torch.get_rng_state()
    stable_rank(a, rank_sketch=24, seed=5)
    assert torch.equal(state, torch.get_rng_state())


def test_sketch_is_differentiable_and_only_w_r_t_a():
    a, _ = _spectrum_matrix(64, 160, 0.5, seed=5)
    plain = stable_rank(a.float(), rank_sketch=16)
    assert not plain.requires_grad
    leaf = a.float().requires_grad_()
    value = stable_rank(leaf, rank_sketch=16)
    (grad,) = torch.autograd.grad(value, leaf)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # scale invariance: the gradient is orthogonal to A itself (d/dt SR(tA) = 0)
    assert abs(float((grad * leaf.detach()).sum())) < 1e-3 * float(grad.norm() * leaf.detach().norm())


def test_sketch_is_exact_when_it_spans_the_matrix():
    a, _ = _spectrum_matrix(40, 90, 1.0, seed=6)
    reference = float(_exact_stable_rank(a))
    assert float(stable_rank(a.float(), rank_sketch=64)) == pytest.approx(reference, rel=1e-4)
    # orientation does not matter
    assert float(stable_rank(a.T.float(), rank_sketch=64)) == pytest.approx(reference, rel=1e-4)
    # half precision is computed in float32
    assert stable_rank(a.to(torch.bfloat16), rank_sketch=64).dtype == torch.float32


def test_zero_matrix_is_finite():
    zero = torch.zeros(30, 50, requires_grad=True)
    value = stable_rank(zero, rank_sketch=8)
    value.backward()
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-6) and torch.isfinite(zero.grad).all()
    assert float(tail(zero.detach(), 3)) == 0.0
    assert float(stable_rank_exact(zero)) == 0.0


def test_exact_stable_rank_paths_agree():
    a, sigma = _spectrum_matrix(48, 120, 0.8, seed=7)
    reference = float(sigma.sum() ** 2 / (sigma**2).sum())
    assert float(stable_rank_exact(a.float())) == pytest.approx(reference, rel=1e-5)
    assert float(nuclear_stable_rank(a)) == pytest.approx(reference, rel=1e-10)
    assert float(nuclear_stable_rank(a, method="gram")) == pytest.approx(reference, rel=1e-9)
    leaf = a.clone().requires_grad_()
    stable_rank(leaf, exact=True).backward()
    ref_leaf = a.clone().requires_grad_()
    _exact_stable_rank(ref_leaf).backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-6, atol=1e-9)
    assert not stable_rank_exact(a.clone().requires_grad_()).requires_grad
    with pytest.raises(ValueError, match="method='qr'"):
        nuclear_stable_rank(a, method="qr")


def test_nuclear_is_the_sum_of_singular_values_with_gradient_u_vt():
    a, _ = _spectrum_matrix(20, 35, 0.5, seed=8)
    assert float(nuclear(a)) == pytest.approx(float(torch.linalg.svdvals(a).sum()), rel=1e-12)
    leaf = a.clone().requires_grad_()
    nuclear(leaf).backward()
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(leaf.grad, u @ vh, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("rank", [1, 7, 19, 20])
def test_tail_is_the_relative_truncation_error(rank):
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(20, 33, generator=g, dtype=torch.float64) @ torch.diag(
        torch.linspace(2, 0.1, 33, dtype=torch.float64)
    )
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    expected = float((s[rank:] ** 2).sum() / (s**2).sum())
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    truncation = float(((a - best) ** 2).sum() / (a**2).sum())
    assert float(tail(a, rank)) == pytest.approx(expected, rel=1e-9, abs=1e-14)
    assert float(tail(a, rank)) == pytest.approx(truncation, rel=1e-8, abs=1e-14)
    assert float(tail(a.T.float(), rank)) == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_tail_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: tail(x, 2), (a,))


@pytest.mark.parametrize("rank", [0, -1, 21, 2.0, True])
def test_tail_rejects_bad_ranks(rank):
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, min\(A.shape\)\] = \[1, 20\].*rank="):
        tail(torch.randn(20, 33), rank)


def test_registry_and_bad_names():
    assert list(REGULARIZERS) == ["stable_rank", "nuclear", "tail"]
    assert get_regularizer("stable_rank") is stable_rank
    assert get_regularizer("nuclear") is nuclear
    assert get_regularizer("tail") is tail

    def custom(a):
        return a.norm()

    assert get_regularizer(custom) is custom
    with pytest.raises(ValueError, match=r"regularizer='rank'.*'stable_rank', 'nuclear', 'tail'"):
        get_regularizer("rank")
    with pytest.raises(ValueError, match=r"regularizer=3"):
        get_regularizer(3)


def test_bad_sketch_arguments():
    with pytest.raises(ValueError, match="rank_sketch"):
        stable_rank(torch.randn(8, 9), rank_sketch=0)
    with pytest.raises(ValueError, match="A must be a 2-D tensor"):
        stable_rank(torch.randn(8))
    # Checked before the exact shortcut that small matrices take, for both entry points.
    for bad in ({"oversample": -1}, {"power_iters": -1}, {"probes": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            stable_rank(torch.randn(8, 9), **bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            sketched_nuclear(torch.randn(8, 9), **bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sketch_runs_on_cuda():
    a, _ = _spectrum_matrix(128, 384, 0.5, seed=12)
    leaf = a.float().cuda().requires_grad_()
    value = stable_rank(leaf, rank_sketch=32)
    value.backward()
    assert value.device.type == "cuda" and leaf.grad.device.type == "cuda"
    assert float(value) == pytest.approx(float(_exact_stable_rank(a)), rel=0.1)
