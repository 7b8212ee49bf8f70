"""The solver against its theorem, on small float64 problems (references computed independently)."""

import math
import weakref

import pytest
import torch

from prehab import linalg
from prehab.linalg import (
    all_finite,
    damped_cholesky,
    factor_params,
    gram,
    lower_triangular_product,
    output_error,
    output_error_and_energy,
    rank_from_ratio,
    ridge_shift,
    ridge_statistics,
    solve_lowrank,
    solver_output_error,
    truncated_svd,
)

torch.set_default_dtype(torch.float32)


def _problem(out=6, inp=8, n=40, shift=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64)
    x = mix @ torch.randn(inp, n, generator=g, dtype=torch.float64)  # correlated features
    x_hat = x + shift * torch.randn(inp, n, generator=g, dtype=torch.float64)
    return w, x, x_hat


def _objective(w, approx, x, x_hat):
    return float(((w @ x - approx @ x_hat) ** 2).sum())


def _theorem_minimum(w, x, x_hat, rank):
    """Theorem 3.1 with the symmetric square root B = R R (R = Rᵀ), where the paper's algebra holds."""
    b = x_hat @ x_hat.T
    evals, evecs = torch.linalg.eigh(b)
    root_inv = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    m = w @ (x @ x_hat.T) @ root_inv
    s = torch.linalg.svdvals(m)
    return float((w @ x).pow(2).sum() - m.pow(2).sum() + s[rank:].pow(2).sum())


@pytest.mark.parametrize("rank", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_anchored_solver_reaches_theorem_minimum(rank, seed):
    w, x, x_hat = _problem(seed=seed)
    f = solve_lowrank(w, rank, whitening=x_hat @ x_hat.T, cross=x @ x_hat.T)
    approx = f.up @ f.down
    assert torch.linalg.matrix_rank(approx) == rank
    achieved = _objective(w, approx, x, x_hat)
    minimum = _theorem_minimum(w, x, x_hat, rank)
    assert f.damping == 0.0
    assert achieved == pytest.approx(minimum, rel=1e-8)
    # No random rank-r candidate, nor a small perturbation of the optimum, does better.
    g = torch.Generator().manual_seed(123)
    for _ in range(200):
        cand = torch.randn(6, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, 8, generator=g, dtype=torch.float64
        )
        assert _objective(w, cand, x, x_hat) >= minimum
        nudged = (f.up + 1e-3 * torch.randn(f.up.shape, generator=g, dtype=torch.float64)) @ f.down
        assert _objective(w, nudged, x, x_hat) >= minimum * (1 - 1e-12)


@pytest.mark.parametrize("width", [0, 2, 3])
@pytest.mark.parametrize("columns", [6, 7])
def test_tiled_solver_products_match_one_product(width, columns, monkeypatch):
    """The solver's tiled products (``W L`` skipping L's zeros, ``AᵀA`` on its upper tiles) against one plain
    product, with tiles of 2-3 columns (uneven at 7); the zeros above L's diagonal tiles are NaN here, so reading
    one would show. Width 0: one product."""
    monkeypatch.setitem(linalg.SOLVER_TILE_WIDTH, "cpu", width)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, columns, generator=g, dtype=torch.float64)
    lower = torch.tril(torch.randn(columns, columns, generator=g, dtype=torch.float64))
    tiles = linalg._tiles(columns, torch.device("cpu"))
    poisoned = lower.clone()
    for start, stop in tiles:
        poisoned[:start, start:stop] = float("nan")  # the zeros above each diagonal tile are skipped, not read
    torch.testing.assert_close(lower_triangular_product(a, poisoned), a @ lower, rtol=1e-14, atol=1e-14)
    product = gram(a)
    torch.testing.assert_close(product, a.T @ a, rtol=1e-14, atol=1e-14)
    assert torch.equal(product, product.T)
    assert [edge for tile in tiles for edge in tile] == [0, *(e for _, e in tiles[:-1] for _ in (0, 1)), columns]
    assert len(tiles) == (1 if not width or columns < 2 * width else -(-columns // width))


@pytest.mark.parametrize(
    ("columns", "width", "size"),
    [(11008, 512, 501), (1024, 512, 512), (1023, 512, 1023), (1025, 512, 342), (7, 3, 3), (8, 3, 3), (6, 0, 6)],
)
def test_equal_tile_size(columns, width, size):
    """Equal tiles no wider than asked, as few as that allows (11008 by 512: 22 of 501 rather than 21 of 512 and
    256); fewer than two full tiles, or width 0, is one tile. The solver and the statistics share this rule."""
    assert linalg.equal_tile_size(columns, width) == size
    if size < columns:
        assert size <= width and -(-columns // size) == -(-columns // width)


def test_reused_cholesky_returns_the_last_factor_while_its_covariance_is_unchanged():
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h, other = x @ x.T, x[:, :10] @ x[:, :10].T
    assert damped_cholesky(h) is not damped_cholesky(h)  # outside: factored at every call
    with linalg.reused_cholesky():
        first = damped_cholesky(h)
        with linalg.reused_cholesky():  # an inner context shares the outer one's factor
            assert damped_cholesky(h) is first
        assert damped_cholesky(h, initial_damping=1e-3) is not first  # other arguments: factored again
        first = damped_cholesky(h)
        assert damped_cholesky(h.clone()) is not first  # another tensor with the same values
        kept = damped_cholesky(other)
        assert damped_cholesky(other) is kept and damped_cholesky(h) is not first  # only the last one is kept
        h.mul_(2.0)  # modified in place: its factor is stale
        scaled = damped_cholesky(h)
        torch.testing.assert_close(scaled.factor, torch.linalg.cholesky(h), rtol=1e-12, atol=0)
        temporary = h.to(torch.float32)
        alive = weakref.ref(temporary)
        damped_cholesky(temporary)
        del temporary
        assert alive() is None  # the cache does not keep a covariance alive
    with linalg.reused_cholesky():
        assert damped_cholesky(h) is not scaled  # nothing survives the context
    with torch.inference_mode():
        frozen = h.clone()
    with linalg.reused_cholesky():  # no version counter to tell an in-place change by: factored at every call
        assert damped_cholesky(frozen) is not damped_cholesky(frozen)


def test_tiled_solver_gives_the_same_factors(monkeypatch):
    w, x, x_hat = _problem()
    plain = solve_lowrank(w, 3, whitening=x @ x.T)
    monkeypatch.setitem(linalg.SOLVER_TILE_WIDTH, "cpu", 2)
    tiled = solve_lowrank(w, 3, whitening=x @ x.T)
    torch.testing.assert_close(tiled.up @ tiled.down, plain.up @ plain.down, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tiled.singular_values, plain.singular_values, rtol=1e-12, atol=0)


def test_covariance_error_formula_matches_activations():
    w, x, x_hat = _problem()
    approx = torch.randn(6, 8, dtype=torch.float64)
    formula = output_error(w, approx, x @ x.T, x @ x_hat.T, x_hat @ x_hat.T)
    assert formula == pytest.approx(_objective(w, approx, x, x_hat), rel=1e-10)
    assert output_error(w, approx, x @ x.T) == pytest.approx(_objective(w, approx, x, x), rel=1e-10)
    # ‖WX‖² known from the layer's outputs (the two-stream pipeline's dense pass): G is not needed
    dense = float((w @ x).square().sum())
    without_g = output_error(w, approx, None, x @ x_hat.T, x_hat @ x_hat.T, dense=dense)
    assert without_g == pytest.approx(_objective(w, approx, x, x_hat), rel=1e-10)
    with pytest.raises(ValueError, match="without original_cov, pass dense, cross and shifted_cov"):
        output_error(w, approx, None, x @ x_hat.T, x_hat @ x_hat.T)


def test_covariance_error_from_factors_matches_activations():
    """``W'`` given as its factors ``(up, down)`` (the cheaper route the callbacks take) gives the same error,
    and ``output_error_and_energy`` returns ``‖WX‖²`` beside it, with and without ``G``."""
    w, x, x_hat = _problem()
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    two_stream = (x @ x.T, x @ x_hat.T, x_hat @ x_hat.T)
    error, dense = output_error_and_energy(w, (up, down), *two_stream)
    assert error == pytest.approx(_objective(w, up @ down, x, x_hat), rel=1e-10)
    assert dense == pytest.approx(float((w @ x).square().sum()), rel=1e-12)
    error, dense = output_error_and_energy(w, (up, down), x @ x.T)  # one stream: X̂ = X
    assert error == pytest.approx(_objective(w, up @ down, x, x), rel=1e-10)
    assert dense == pytest.approx(float((w @ x).square().sum()), rel=1e-12)
    given = output_error_and_energy(w, (up, down), None, *two_stream[1:], dense=123.0)
    assert given[1] == 123.0
    assert given[0] == pytest.approx(_objective(w, up @ down, x, x_hat) - float((w @ x).square().sum()) + 123.0)


@pytest.mark.parametrize("ridge", [0.0, 0.05])
@pytest.mark.parametrize("samples", [40, 3], ids=["full-rank", "singular-damped"])
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_solver_output_error_matches_activations(samples, rank, ridge):
    """The report's error from the solver's spectrum (no ``out x in x in`` product) equals ``‖WX − W'X̂‖²``
    computed from the activations, for SVD-LLM (one stream; damping shifts its cross term too) and AA-SVD (two
    streams, cross term ``C``), with and without damping (3 samples of 8 features: singular covariances) and a
    ridge (the solver then reads shifted covariances; the error is still measured on the activations)."""
    w, x, x_hat = _problem(n=samples)
    dense = float((w @ x).square().sum())
    one_stats = ridge_statistics({"G": x @ x.T}, ridge)
    two_stats = ridge_statistics({"H": x_hat @ x_hat.T, "C": x @ x_hat.T}, ridge)
    one_shift, two_shift = ridge_shift({"G": x @ x.T}, ridge), ridge_shift({"H": x_hat @ x_hat.T}, ridge)
    assert (one_shift > 0) == (two_shift > 0) == (ridge > 0)
    one = solve_lowrank(w, rank, whitening=one_stats["G"])
    two = solve_lowrank(w, rank, whitening=two_stats["H"], cross=two_stats["C"])
    assert (one.damping > 0) == (two.damping > 0) == (samples < 8 and ridge == 0)  # the damped terms are exercised
    assert one.cross_shift == one.damping and two.cross_shift == 0.0
    error, energy = solver_output_error(w, one, shift=one_shift)
    assert energy == pytest.approx(dense, rel=1e-10)
    assert error == pytest.approx(_objective(w, one.up @ one.down, x, x), rel=1e-8, abs=1e-10 * dense)
    error, energy = solver_output_error(w, two, dense=dense, shift=two_shift)
    assert energy == dense
    assert error == pytest.approx(_objective(w, two.up @ two.down, x, x_hat), rel=1e-8, abs=1e-10 * dense)


@pytest.mark.parametrize("shape", [(6, 8), (8, 6)], ids=["wide", "tall"])
@pytest.mark.parametrize("samples", [40, 3], ids=["full-rank", "singular-damped"])
def test_inner_product_with_the_optimum_from_its_factors(shape, samples):
    """Without a cross term ``⟨W, W'⟩ = Σ σ_i ‖down_i‖²`` (from ``W' = U_r Σ_r V_rᵀ L⁻¹`` and ``M = W L``), and
    ``‖W'‖²`` is that sum with any cross term: equal to the direct products, on both sides of ``truncated_svd``'s
    Gram route and with a damped ``L``."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = torch.randn(shape[1], samples, generator=g, dtype=torch.float64)
    for rank in (1, 3, 5):
        factors = solve_lowrank(w, rank, whitening=x @ x.T)
        assert factors.cross is None and (factors.damping > 0) == (samples < shape[1])
        direct = float((w * (factors.up @ factors.down)).sum())
        assert linalg._inner_with_optimum(w, factors.up, factors.down, factors) == pytest.approx(direct, rel=1e-10)
        # ‖W'‖² = Σ σ_i ‖down_i‖², with a cross term too (it needs only U_r's orthonormal columns)
        anchored = solve_lowrank(w, rank, whitening=x @ x.T, cross=x @ (x + 0.1).T)
        for f in (factors, anchored):
            norm = float((f.up @ f.down).square().sum())
            assert linalg._weighted_rows(f.singular_values, f.down) == pytest.approx(norm, rel=1e-10)


def test_solver_output_error_needs_a_whitened_solve():
    w, x, x_hat = _problem()
    with pytest.raises(ValueError, match="needs factors from solve_lowrank with a whitening covariance"):
        solver_output_error(w, solve_lowrank(w, 3))
    with pytest.raises(ValueError, match=r"pass dense \(‖WX‖²\) for factors solved with a cross term"):
        solver_output_error(w, solve_lowrank(w, 3, whitening=x_hat @ x_hat.T, cross=x @ x_hat.T))


@pytest.mark.parametrize("shape", [(8, 6), (6, 8)])
def test_identity_whitening_is_eckart_young(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :3] * s[:3] @ vh[:3]
    plain = solve_lowrank(w, 3)
    whitened = solve_lowrank(w, 3, whitening=torch.eye(shape[1], dtype=torch.float64))
    torch.testing.assert_close(plain.up @ plain.down, best, rtol=0, atol=1e-10)
    torch.testing.assert_close(whitened.up @ whitened.down, best, rtol=0, atol=1e-10)
    torch.testing.assert_close(plain.singular_values, s[:3], rtol=1e-10, atol=0)


def test_same_stream_is_svd_llm_and_optimal():
    w, x, _ = _problem()
    g = x @ x.T
    anchored = solve_lowrank(w, 3, whitening=g, cross=g)
    svd_llm = solve_lowrank(w, 3, whitening=g)  # M = W L
    torch.testing.assert_close(anchored.up @ anchored.down, svd_llm.up @ svd_llm.down, rtol=0, atol=1e-9)
    assert _objective(w, svd_llm.up @ svd_llm.down, x, x) == pytest.approx(_theorem_minimum(w, x, x, 3), rel=1e-8)


def test_factors_are_balanced():
    """up = U Σ^½ and down = Σ^½ Vᵀ L⁻¹: up's columns have norms √σ (LoRA rehab relies on the split)."""
    w, x, _ = _problem()
    f = solve_lowrank(w, 4, whitening=x @ x.T)
    torch.testing.assert_close(f.up.norm(dim=0), f.singular_values.sqrt(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("shape", [(8, 6), (6, 8), (7, 7)])
def test_truncated_svd_matches_lapack(shape):
    m = torch.randn(*shape, dtype=torch.float64)
    u, s, vh = truncated_svd(m, 4)
    ref_u, ref_s, ref_vh = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(s, ref_s[:4], rtol=1e-10, atol=0)
    torch.testing.assert_close(u * s @ vh, ref_u[:, :4] * ref_s[:4] @ ref_vh[:4], rtol=0, atol=1e-10)
    torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)


def test_truncated_svd_rank_deficient_matrix_has_zero_tail():
    m = torch.randn(8, 2, dtype=torch.float64) @ torch.randn(2, 6, dtype=torch.float64)
    u, s, vh = truncated_svd(m, 4)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert (s[2:] == 0).all()  # below the resolvable floor: exact zeros, not noise
    torch.testing.assert_close(u * s @ vh, m, rtol=0, atol=1e-10)


def test_damped_cholesky_plain_and_singular():
    a = torch.randn(8, 20, dtype=torch.float64)
    spd = a @ a.T
    ok = damped_cholesky(spd)
    assert ok.damping == 0.0 and not ok.singular
    torch.testing.assert_close(ok.factor @ ok.factor.T, spd)
    thin = torch.randn(8, 3, dtype=torch.float64)
    singular = thin @ thin.T  # rank 3 < 8: fewer samples than features
    res = damped_cholesky(singular)
    assert res.singular and res.damping > 0 and res.relative_damping >= 1e-6
    assert res.damping == pytest.approx(res.relative_damping * float(singular.trace()) / 8)
    torch.testing.assert_close(res.factor @ res.factor.T, singular + res.damping * torch.eye(8, dtype=torch.float64))
    # Every try is factored in place in one buffer (through its transpose): the factor of the damped matrix, exact
    # zeros above its diagonal, and the covariance left as it was.
    before = singular.clone()
    again = damped_cholesky(singular, min_pivot=1e-2)  # escalates: several tries in one buffer
    assert torch.equal(singular, before) and again.relative_damping >= 1e-4
    expected = torch.linalg.cholesky(singular + again.damping * torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(again.factor, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(again.factor.triu(1), torch.zeros(8, 8, dtype=torch.float64)) and again.factor.is_contiguous()
    # The damped solve is still the optimum for the damped covariance, and finite.
    f = solve_lowrank(torch.randn(6, 8, dtype=torch.float64), 2, whitening=singular)
    assert f.singular and torch.isfinite(f.up @ f.down).all()


def test_damped_cholesky_rejects_nan():
    bad = torch.eye(4, dtype=torch.float64)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        damped_cholesky(bad)


def test_rank_from_ratio_formula_and_errors():
    assert rank_from_ratio(768, 3072, 0.4) == math.floor(0.6 * 768 * 3072 / (768 + 3072))
    assert rank_from_ratio(4, 4, 0.99) == 1
    for m, n, ratio in [(768, 3072, 0.2), (64, 32, 0.5), (4096, 4096, 0.8)]:
        r = rank_from_ratio(m, n, ratio)
        assert factor_params(m, n, r) <= (1 - ratio) * m * n < factor_params(m, n, r + 1)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            rank_from_ratio(4, 4, bad)


def test_ridge_statistics_are_the_calibration_set_plus_pseudo_inputs():
    """ε·s·I on H, C (G alone for one stream) is exactly the statistics of X, X̂ with n extra columns
    √(ε s) e_i in both streams."""
    w, x, x_hat = _problem(seed=3)
    stats = {"G": x @ x.T, "H": x_hat @ x_hat.T, "C": x @ x_hat.T}
    ridge = 0.05
    s = float(torch.trace(stats["H"])) / 8
    pseudo = math.sqrt(ridge * s) * torch.eye(8, dtype=torch.float64)
    x_aug, x_hat_aug = torch.cat([x, pseudo], 1), torch.cat([x_hat, pseudo], 1)
    ridged = ridge_statistics(stats, ridge)
    assert ridged["G"] is stats["G"]  # no solver reads G when H is there
    torch.testing.assert_close(ridged["H"], x_hat_aug @ x_hat_aug.T)
    torch.testing.assert_close(ridged["C"], x_aug @ x_hat_aug.T)
    assert ridge_statistics(stats, 0.0) is stats and ridge_statistics({}, 0.1) == {}
    # one-stream statistics (SVD-LLM): G alone, scaled by its own trace
    only_g = ridge_statistics({"G": stats["G"]}, ridge)["G"]
    shift = ridge * float(torch.trace(stats["G"])) / 8
    torch.testing.assert_close(only_g, stats["G"] + shift * torch.eye(8, dtype=torch.float64))
    # the anchored solve on ridged statistics reaches Theorem 3.1's minimum of the augmented problem, i.e. the
    # minimum of ‖WX − W'X̂‖² + ε s ‖W − W'‖²
    for rank in (1, 3, 5):
        f = solve_lowrank(w, rank, whitening=ridged["H"], cross=ridged["C"])
        achieved = _objective(w, f.up @ f.down, x, x_hat) + ridge * s * float((w - f.up @ f.down).pow(2).sum())
        assert achieved == pytest.approx(_theorem_minimum(w, x_aug, x_hat_aug, rank), rel=1e-8)


def test_ridge_keeps_weights_where_the_compressed_inputs_have_no_variance():
    """A channel the compressed stream has (nearly) lost: the exact anchored solution regresses W X on that
    channel's noise with huge coefficients, which fit the calibration set and nothing else; the ridge keeps the
    weight near W and does better on new samples from the same distribution."""
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(6, 8, generator=g, dtype=torch.float64)

        def sample(n, g=g):
            x = torch.randn(8, n, generator=g, dtype=torch.float64)
            x_hat = x + 0.1 * torch.randn(8, n, generator=g, dtype=torch.float64)
            x_hat[0] = 1e-3 * torch.randn(n, generator=g, dtype=torch.float64)  # channel 0 lost upstream
            return x, x_hat

        x, x_hat = sample(30)
        stats = {"H": x_hat @ x_hat.T / 30, "C": x @ x_hat.T / 30}
        exact = solve_lowrank(w, 4, whitening=stats["H"], cross=stats["C"])
        ridged_stats = ridge_statistics(stats, 1e-2)
        ridged = solve_lowrank(w, 4, whitening=ridged_stats["H"], cross=ridged_stats["C"])
        a_exact, a_ridged = exact.up @ exact.down, ridged.up @ ridged.down
        assert a_exact.norm() > 5 * w.norm()  # the blow-up
        assert a_ridged.norm() < 2 * w.norm()
        assert _objective(w, a_exact, x, x_hat) < _objective(w, a_ridged, x, x_hat)  # exact wins in sample ...
        new_x, new_x_hat = sample(2000)
        assert _objective(w, a_ridged, new_x, new_x_hat) < _objective(w, a_exact, new_x, new_x_hat)  # ... not out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_agrees_with_the_elementwise_test_on_8x6_matrices(dtype):
    """One sum decides, except when finite entries overflow the sum: then the elementwise test does."""
    big = torch.finfo(dtype).max
    cases = {"plain": torch.randn(8, 6, generator=torch.Generator().manual_seed(0)).to(dtype)}
    for name, value in [("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))]:
        cases[name] = cases["plain"].clone()
        cases[name][3, 2] = value
    cases["inf and -inf"] = cases["inf"].clone()
    cases["inf and -inf"][0, 0] = float("-inf")  # the sum is NaN, not inf
    cases["sum overflows"] = torch.full((8, 6), big, dtype=dtype)  # every entry finite, the sum is not
    cases["empty"] = torch.empty(0, 6, dtype=dtype)
    for name, matrix in cases.items():
        assert all_finite(matrix) == bool(torch.isfinite(matrix).all()), name
    assert all_finite(cases["sum overflows"]) and not all_finite(cases["inf and -inf"])
    assert all_finite(torch.arange(48).reshape(8, 6))  # integers are always finite


@pytest.mark.parametrize("chunk_elements", [1, 12, 13, 10**6], ids=["row-by-row", "two-rows", "partial", "whole"])
def test_squared_norm_by_row_blocks_equals_the_float64_sum(chunk_elements):
    """The report's ‖W‖² goes a block of rows at a time (no float64 copy of W): the same float64 sum for any block,
    a last block shorter than the others included (7 rows of 6)."""
    w = torch.randn(7, 6, generator=torch.Generator().manual_seed(5)) * 1e3  # float32, as a model's weight
    assert linalg._squared_norm(w, chunk_elements) == pytest.approx(float(w.double().square().sum()), rel=1e-15)
