"""AA-SVD, SAES-SVD (CEALC + ACES) and the two-stream block-sequential pipeline."""

import copy
import re
import warnings

import pytest
import torch
from conftest import TinyModule, loader_for
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prehab import LowRankLinear
from prehab.callbacks import AASVD, SAESSVD, SVDLLM
from prehab.linalg import aces_beta, aces_surrogate, solve_lowrank


def _stats(seed=0, inp=8, n=60, shift=0.4):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64)
    x = mix @ torch.randn(inp, n, generator=g, dtype=torch.float64)
    x_hat = x + shift * torch.randn(inp, n, generator=g, dtype=torch.float64)
    w = torch.randn(6, inp, generator=g, dtype=torch.float64)
    return w, x, x_hat, {"G": x @ x.T / n, "H": x_hat @ x_hat.T / n, "C": x @ x_hat.T / n}


# ------------------------------------------------------------------------------------------ per-layer math
def test_saes_endpoints_are_aa_svd_and_shifted_whitening():
    w, _, _, stats = _stats()
    aa = AASVD(ratio=0.5).solve_layer("l", w, 3, stats)
    beta_one = SAESSVD(ratio=0.5, beta=1.0).solve_layer("l", w, 3, stats)
    torch.testing.assert_close(beta_one.up @ beta_one.down, aa.up @ aa.down, rtol=0, atol=1e-10)
    assert beta_one.beta == 1.0
    beta_zero = SAESSVD(ratio=0.5, beta=0.0).solve_layer("l", w, 3, stats)
    shifted = SVDLLM(ratio=0.5, propagate=True).solve_layer("l", w, 3, stats)
    reference = solve_lowrank(w, 3, whitening=stats["H"])  # whitening on X̂, K = H
    torch.testing.assert_close(beta_zero.up @ beta_zero.down, reference.up @ reference.down, rtol=0, atol=1e-10)
    torch.testing.assert_close(shifted.up @ shifted.down, reference.up @ reference.down, rtol=0, atol=1e-10)


def test_aa_svd_layer_solve_reaches_theorem_minimum():
    w, x, x_hat, stats = _stats(seed=3)
    f = AASVD(ratio=0.5).solve_layer("l", w, 2, stats)
    achieved = float(((w @ x - f.up @ f.down @ x_hat) ** 2).sum())
    # Theorem 3.1 with the symmetric root of B = X̂X̂ᵀ
    evals, evecs = torch.linalg.eigh(x_hat @ x_hat.T)
    m = w @ (x @ x_hat.T) @ (evecs * evals.rsqrt()) @ evecs.T
    s = torch.linalg.svdvals(m)
    minimum = float((w @ x).pow(2).sum() - m.pow(2).sum() + s[2:].pow(2).sum())
    assert achieved == pytest.approx(minimum, rel=1e-8)


def _reference_coefficients(w, h, c, rank):
    """a, b, c, A, B, C from explicit projectors and a symmetric-root-free whitening (independent path)."""
    lower = torch.linalg.cholesky(h)
    s = w @ lower
    d = w @ (c - h) @ torch.linalg.inv(lower).T
    u, _, vh = torch.linalg.svd(s)
    p_left = torch.eye(s.shape[0], dtype=s.dtype) - u[:, :rank] @ u[:, :rank].T
    p_right = torch.eye(s.shape[1], dtype=s.dtype) - vh[:rank].T @ vh[:rank]
    sp, dp = p_left @ s @ p_right, p_left @ d @ p_right
    return (
        s,
        d,
        p_left,
        p_right,
        [
            float(v)
            for v in ((sp * sp).sum(), (sp * dp).sum(), (dp * dp).sum(), (s * s).sum(), (s * d).sum(), (d * d).sum())
        ],
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("objective", ["ratio", "energy"])
def test_aces_minimizes_surrogate_over_dense_grid(seed, objective):
    w, _, _, stats = _stats(seed=seed, shift=0.3 + 0.3 * seed)
    h, c = stats["H"], stats["C"]
    s, d, p_left, p_right, reference = _reference_coefficients(w, h, c, 3)
    choice = aces_beta(w, h, c, 3, beta_min=0.0, beta_max=1.0, objective=objective, beta_cap=1.0)
    assert choice.coefficients == pytest.approx(reference, rel=1e-8, abs=1e-10)

    def surrogate(beta):  # straight from the definition, ‖P_L G(β) P_R‖² / ‖G(β)‖²
        g = s + beta * d
        tail = float((p_left @ g @ p_right).pow(2).sum())
        return tail if objective == "energy" else tail / float(g.pow(2).sum())

    grid = torch.linspace(0.0, 1.0, 2001).tolist()
    best = min(surrogate(b) for b in grid)
    assert 0.0 <= choice.beta <= 1.0
    assert surrogate(choice.beta) <= best + 1e-9 * max(1.0, abs(best))
    assert aces_surrogate(choice.beta, choice.coefficients, objective) == pytest.approx(
        surrogate(choice.beta), rel=1e-8
    )


def test_aces_guardrails():
    w, _, _, stats = _stats(seed=1, shift=1.0)
    h, c = stats["H"], stats["C"]
    for lo, hi in [(0.25, 0.75), (0.4, 0.5), (0.0, 0.1)]:
        assert lo <= aces_beta(w, h, c, 3, beta_min=lo, beta_max=hi).beta <= hi
    assert aces_beta(w, h, c, 3, beta_min=0.0, beta_max=1.0, beta_cap=0.3).beta <= 0.3
    free = aces_beta(w, h, c, 3, beta_min=0.0, beta_max=1.0, beta_cap=1.0)
    shrunk = aces_beta(w, h, c, 3, beta_min=0.0, beta_max=1.0, beta_cap=1.0, shrink=0.5)
    assert all(b <= 0.5 for b in shrunk.candidates) and shrunk.beta <= 0.5
    assert free.beta != shrunk.beta or free.beta == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 1.5}, "beta=1.5"),
        ({"beta_min": 0.8, "beta_max": 0.2}, "beta_min=0.8"),
        ({"objective": "tail"}, "'ratio', 'energy'"),
        ({"beta_cap": 0}, "beta_cap=0"),
        ({"beta_shrink": 2}, "beta_shrink=2"),
        ({"ratio": 1.0}, "ratio=1.0"),
    ],
)
def test_saes_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAESSVD(**kwargs)


# ------------------------------------------------------------------------------ pipeline vs slow reference
class Recording(AASVD):
    """AA-SVD that records the statistics each layer was solved from, in processing order (no ridge: the raw
    pipeline statistics, with G, which the built-in solvers do not read)."""

    reads_original_covariance = True

    def __init__(self, **kwargs):
        super().__init__(**{"ridge": 0.0, **kwargs})
        self.seen = []

    def solve_layer(self, name, weight, rank, stats):
        self.seen.append((name, {k: v.clone() for k, v in stats.items()}, stats["H"]))
        return super().solve_layer(name, weight, rank, stats)


def _inputs_of(module, name, loader):
    """Inputs of `name` over the loader, from a full forward of `module` (no caching of any kind)."""
    rows = []
    handle = module.get_submodule(name).register_forward_pre_hook(
        lambda _m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        module.eval()
        for batch in loader:
            module.calibration_step(batch)
    handle.remove()
    return torch.cat(rows).double()


def _block_of(name):
    return int(re.search(r"\.(\d+)\.", name).group(1))


@pytest.mark.parametrize("true_sequential", [True, False])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_pipeline_statistics_equal_slow_full_model_reference(kind, true_sequential):
    """Each group's H, C, G against full forwards of an uncached model: true-sequential, every earlier group
    compressed; without it (GPTQ's option), every layer of earlier blocks compressed and its own block dense."""
    torch.manual_seed(0)
    dense = TinyModule(kind)
    loader = loader_for(kind, n=12, batch_size=4)
    compressed = copy.deepcopy(dense)
    callback = Recording(ratio=0.5, calibration_batches=3, true_sequential=true_sequential)
    callback.compress(compressed, loader, progress=False)
    assert len(callback.seen) == (14 if kind == "llama" else 12)
    # Groups: consecutive layers solved from the very same statistics (q/k/v share one input).
    order, group_of, group = [], {}, -1
    for i, (name, _, h) in enumerate(callback.seen):
        if i == 0 or h is not callback.seen[i - 1][2]:
            group += 1
        order.append(name)
        group_of[name] = group
    if kind == "llama":
        assert group_of["model.model.layers.0.self_attn.q_proj"] == group_of["model.model.layers.0.self_attn.v_proj"]
        assert group_of["model.model.layers.0.self_attn.o_proj"] > group_of["model.model.layers.0.self_attn.q_proj"]
        assert group_of["model.model.layers.0.mlp.down_proj"] > group_of["model.model.layers.0.mlp.up_proj"]

    shifted = [name for name, stats, _ in callback.seen if (stats["H"] - stats["G"]).norm() > 1e-6 * stats["G"].norm()]
    if true_sequential:
        assert len(shifted) >= len(order) - 3  # only block 0's first group sees unshifted inputs
    else:  # block 0 is calibrated on the dense model's inputs, every later block on shifted ones
        assert shifted == [name for name in order if _block_of(name) > 0]
    for name, stats, _ in callback.seen:
        partial = copy.deepcopy(dense)  # the model with every earlier group (or block) replaced, nothing cached
        for other in order:
            earlier = group_of[other] < group_of[name] if true_sequential else _block_of(other) < _block_of(name)
            if earlier:
                parent, _, child = other.rpartition(".")
                setattr(partial.get_submodule(parent), child, copy.deepcopy(compressed.get_submodule(other)))
        x, x_hat = _inputs_of(dense, name, loader), _inputs_of(partial, name, loader)
        n = len(x)
        torch.testing.assert_close(stats["H"], x_hat.T @ x_hat / n, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats["C"], x.T @ x_hat / n, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats["G"], x.T @ x / n, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_shift_aware_methods_not_worse_than_svd_llm_at_the_output(kind):
    torch.manual_seed(0)
    base = TinyModule(kind)
    loader = loader_for(kind, n=32, batch_size=8)

    def outputs(module):
        with torch.no_grad():
            module.eval()
            return torch.cat([module.calibration_step(b).reshape(8, -1) for b in loader])

    dense = outputs(base)
    errors = {}
    for callback in (
        SVDLLM(ratio=0.5, calibration_batches=4),
        AASVD(ratio=0.5, calibration_batches=4),
        SAESSVD(ratio=0.5, calibration_batches=4),
    ):
        module = copy.deepcopy(base)
        report = callback.compress(module, loader, progress=False)
        assert report.totals()["layers_compressed"] == (14 if kind == "llama" else 12)
        errors[callback.method] = float((outputs(module) - dense).norm() / dense.norm())
        if callback.method == "saes_svd":
            assert all(0.25 <= layer.beta <= 0.75 for layer in report.layers)
            assert "beta" in [c.header for c in report.table().columns]
    assert errors["aa_svd"] <= errors["svd_llm"] and errors["saes_svd"] <= errors["svd_llm"], errors


def test_ridge_shrinks_the_solution_and_reports_errors_on_the_real_data():
    """AASVD(ridge=...) solves on ridged statistics (smaller weights than the exact closed form), while the
    report's error stays measured on the calibration data: for block 0's q_proj (X̂ = X, nothing upstream is
    compressed) the exact solution is the in-sample optimum, so the ridged one cannot report less."""
    torch.manual_seed(0)
    base = TinyModule("llama")
    loader = loader_for("llama", n=16, batch_size=8)
    reports, norms = {}, {}
    for ridge in (0.0, 0.3):
        module = copy.deepcopy(base)
        report = AASVD(ratio=0.5, ridge=ridge).compress(module, loader, progress=False)
        assert report.to_dict()["ridge"] == ridge and (f"Ridge {ridge:g}" in report.to_markdown()) == (ridge > 0)
        reports[ridge] = {layer.name: layer for layer in report.layers}
        norms[ridge] = {
            name: float(m.weight.detach().norm()) for name, m in module.named_modules() if isinstance(m, LowRankLinear)
        }
    assert sum(norms[0.3].values()) < sum(norms[0.0].values())
    first = next(name for name in reports[0.0] if name.endswith("layers.0.self_attn.q_proj"))
    assert reports[0.3][first].relative_error > reports[0.0][first].relative_error
    with pytest.raises(ValueError, match=r"ridge=-1 is invalid"):
        AASVD(ratio=0.5, ridge=-1)
    # compare= runs plain SVD beside a ridged method without handing it the ridge
    module = copy.deepcopy(base)
    report = AASVD(ratio=0.5, ridge=0.3, compare=["svd"], evaluate=False).sweep(module, loader, progress=False)
    assert {row.method for row in report.sweep} == {"svd", "aa_svd"}


def test_ridge_defaults_per_method_and_compare_inherits_only_an_explicit_ridge():
    """ridge=None is each method's measured default (AA-SVD 0.1, the others 0); 0 is the papers' exact form.
    compare= methods run with their own default unless the ridge was set explicitly."""
    from prehab.callbacks import SVD

    assert (AASVD().ridge, SAESSVD().ridge, SVDLLM().ridge, SVD().ridge) == (0.1, 0.0, 0.0, 0.0)
    assert AASVD(ridge=0).ridge == 0.0 and SAESSVD(ridge=0.3).ridge == 0.3
    torch.manual_seed(0)
    base = TinyModule("llama")
    loader = loader_for("llama", n=16, batch_size=8)

    def error(callback) -> float:
        return callback.compress(copy.deepcopy(base), loader, progress=False).totals()["mean_relative_error"]

    default, exact = error(AASVD(ratio=0.5)), error(AASVD(ratio=0.5, ridge=0.0))
    assert default > exact  # the exact form is the in-sample optimum of the anchored objective

    def compared(**kwargs) -> float:
        report = SVDLLM(ratio=0.5, compare=["aa_svd", "svd"], evaluate=False, **kwargs).sweep(
            copy.deepcopy(base), loader, progress=False
        )
        return next(row.mean_relative_error for row in report.sweep if row.method == "aa_svd")

    # (rel 1e-6, not 1e-9: without plots the report's ‖WX‖² comes from the dense outputs, not from G)
    assert compared() == pytest.approx(default, rel=1e-6)  # SVD-LLM's ridge is its default: AA-SVD keeps its own
    assert compared(ridge=0.0) == pytest.approx(exact, rel=1e-6)  # an explicit ridge is shared
    assert abs(default - exact) > 1e-3 * exact


def test_failure_midway_restores_every_layer():
    class Failing(AASVD):
        def solve_layer(self, name, weight, rank, stats):
            if name.endswith("layers.1.mlp.gate_proj"):
                raise RuntimeError("solver failed")
            return super().solve_layer(name, weight, rank, stats)

    module = TinyModule("llama")
    state = {k: v.clone() for k, v in module.state_dict().items()}
    modules_before = dict(module.named_modules())
    with pytest.raises(RuntimeError, match="solver failed"):
        Failing(ratio=0.5).compress(module, loader_for("llama"), progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in module.modules())
    assert all(module.get_submodule(n) is m for n, m in modules_before.items() if n)
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key])


def test_model_without_blocks_uses_per_layer_fallback():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    loader = DataLoader(TensorDataset(torch.randn(64, 12)), batch_size=16)
    dense = copy.deepcopy(net)
    with pytest.warns(UserWarning, match="no repeated transformer blocks"):
        report = AASVD(ratio=0.5, targets=None, calibration_batches=4).compress(net, loader, progress=False)
    assert isinstance(net[0], LowRankLinear) and isinstance(net[2], LowRankLinear)
    # The second layer's statistics come from the first layer's compressed output: its X̂ differs from X.
    x = torch.cat([b[0] for b in loader])
    assert report.calibration_samples == 64
    assert not torch.allclose(net[1](net[0](x)), dense[1](dense[0](x)))
    # true_sequential=False has no block to calibrate in one pass: it says so and gives the same factors
    again = copy.deepcopy(dense)
    with pytest.warns(UserWarning, match="true_sequential=False needs a repeated block list"):
        AASVD(ratio=0.5, calibration_batches=4, true_sequential=False).compress(again, loader, progress=False)
    torch.testing.assert_close(again[2].up.weight, net[2].up.weight)


def test_unknown_blocks_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"blocks='model\.decoder' is not a submodule.*model\.model\.layers"):
        AASVD(ratio=0.5, blocks="model.decoder").compress(TinyModule("llama"), loader_for("llama"), progress=False)


def test_targets_outside_blocks_are_refused_by_two_stream_methods():
    module = TinyModule("llama")
    with pytest.raises(ValueError, match="outside the repeated blocks"):
        AASVD(ratio=0.5, targets=["lm_head", "q_proj"]).compress(module, loader_for("llama"), progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in module.modules())


class ScaledBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, hidden, scale=None):
        return hidden + self.fc2(torch.relu(self.fc1(hidden * scale)))


class PerLayerInputs(nn.Module):
    """Each block gets its own `scale` tensor, like per-layer sliding-window masks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(ScaledBlock() for _ in range(3))

    def forward(self, x):
        for index, layer in enumerate(self.layers):
            x = layer(x, scale=torch.full((16,), 1.0 + index))
        return x


def test_blocks_with_per_layer_inputs_are_refused_before_any_change():
    model = PerLayerInputs()
    loader = DataLoader(TensorDataset(torch.randn(32, 5, 16)), batch_size=8)
    with pytest.raises(ValueError, match=r"block 1 is called with a different 'scale'.*one-stream SVDLLM"):
        AASVD(ratio=0.5).compress(model, loader, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    SVDLLM(ratio=0.5).compress(model, loader, progress=False)  # the one-stream method is fine
    assert isinstance(model.layers[2].fc2, LowRankLinear)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "vit"])
def test_dense_block_runs_once_per_block_with_the_same_factors_and_errors(kind):
    """The dense-input cache (the default) against ``dense_cache_gb=0`` (the dense block rerun for every group of
    layers, ``G`` collected): the same factors, the report's errors from the dense layers' outputs (bias taken
    off: GPT-2's Conv1D, BERT's and the ViT's biased Linears) equal those from ``G``, and every block runs
    ``(groups - 1) x batches`` fewer times."""
    from prehab.targets import find_block_stacks

    torch.manual_seed(0)
    base = TinyModule(kind)
    loader = loader_for(kind, n=12, batch_size=4)
    results = {}
    for cache in (0.0, 4.0):
        model = copy.deepcopy(base)
        calls = []
        (_, stack), *_ = find_block_stacks(model)
        handle = stack[0].register_forward_pre_hook(lambda *_, _calls=calls: _calls.append(1))
        report = AASVD(ratio=0.5, ridge=0.0, plots=False, dense_cache_gb=cache).compress(model, loader, progress=False)
        handle.remove()
        results[cache] = (model, report, len(calls))
    (cached, cached_report, cached_calls), (rerun, rerun_report, rerun_calls) = results[4.0], results[0.0]
    for name, module in rerun.named_modules():
        if isinstance(module, LowRankLinear):
            other = cached.get_submodule(name)
            torch.testing.assert_close(other.up.weight, module.up.weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(other.down.weight, module.down.weight, rtol=1e-5, atol=1e-6)
    pairs = zip(cached_report.layers, rerun_report.layers, strict=True)
    errors = [(a.relative_error, b.relative_error) for a, b in pairs]
    # the same to float round-off of ‖WX‖² (~1e-7 of it: absolute on the relative error, visible where it is tiny)
    assert all(a == pytest.approx(b, rel=1e-5, abs=1e-7) for a, b in errors) and max(b for _, b in errors) > 1e-2
    groups = {"llama": 4, "gpt2": 4, "bert": 4, "vit": 4}[kind]  # q/k/v (or fused qkv), o, up (or up/gate), down
    assert rerun_calls - cached_calls == (groups - 1) * len(loader)


def test_without_true_sequential_the_compressed_stream_runs_once_per_block():
    """``true_sequential=False``: one compressed-stream pass per block instead of one per group (3 x batches fewer
    block calls for 4 groups), block 0's first group solved as before and a later group differently; when both
    streams' inputs do not fit ``dense_cache_gb`` it warns and runs true-sequential (the same factors)."""
    from prehab.targets import find_block_stacks

    torch.manual_seed(0)
    base = TinyModule("llama")
    loader = loader_for("llama", n=12, batch_size=4)
    runs = {}
    for sequential, cache in ((True, 4.0), (False, 4.0), (True, 0.0), (False, 0.0)):
        model, calls = copy.deepcopy(base), []
        (_, stack), *_ = find_block_stacks(model)
        handle = stack[0].register_forward_pre_hook(lambda *_, _calls=calls: _calls.append(1))
        callback = AASVD(ratio=0.5, plots=False, true_sequential=sequential, dense_cache_gb=cache)
        if not sequential and not cache:
            too_small = r"true_sequential=False: a block's layer inputs .* do not fit dense_cache_gb=0"
            with pytest.warns(UserWarning, match=too_small):
                callback.compress(model, loader, progress=False)
        else:
            callback.compress(model, loader, progress=False)
        handle.remove()
        runs[sequential, cache] = (model, len(calls))
    (exact, exact_calls), (one_pass, one_pass_calls) = runs[True, 4.0], runs[False, 4.0]
    assert exact_calls - one_pass_calls == 3 * len(loader)
    first, later = "model.model.layers.0.self_attn.q_proj", "model.model.layers.0.mlp.down_proj"
    torch.testing.assert_close(one_pass.get_submodule(first).up.weight, exact.get_submodule(first).up.weight)
    assert not torch.allclose(one_pass.get_submodule(later).up.weight, exact.get_submodule(later).up.weight)
    for name, module in runs[True, 0.0][0].named_modules():
        if isinstance(module, LowRankLinear):
            torch.testing.assert_close(runs[False, 0.0][0].get_submodule(name).up.weight, module.up.weight)
    # compare= one-stream methods get the default (they have no groups in sequence), two-stream ones the option
    sweep = AASVD(ratio=0.5, compare=["svd_llm", "saes_svd"], true_sequential=False, plots=False)
    report = sweep.sweep(copy.deepcopy(base), loader, progress=False)
    assert [row.method for row in report.sweep] == ["svd_llm", "saes_svd", "aa_svd"]
    # the anchored solvers are told what the option costs them (RESULTS §9); whitening-only SVD-LLM is not
    with pytest.warns(UserWarning, match=r"true_sequential=False with SAESSVD.*suits SVDLLM\(propagate=True\)"):
        SAESSVD(ratio=0.5, true_sequential=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SVDLLM(ratio=0.5, propagate=True, true_sequential=False)


def test_only_the_spectrum_layers_carry_the_original_covariance():
    """Built-in two-stream solvers read H and C: G (a third product per group) is collected only where the
    spectrum plot needs it; a method that reads G (``reads_original_covariance``) gets it everywhere."""

    class Seen(AASVD):
        reads_original_covariance = False

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.with_g = {}

        def solve_layer(self, name, weight, rank, stats):
            self.with_g[name] = "G" in stats
            return super().solve_layer(name, weight, rank, stats)

    torch.manual_seed(0)
    base = TinyModule("llama")
    loader = loader_for("llama", n=8, batch_size=4)
    for plots in (True, False):
        callback = Seen(ratio=0.5, plots=plots, evaluate=False)
        callback.compress(copy.deepcopy(base), loader, progress=False)
        with_g = {n for n, g in callback.with_g.items() if g}
        if plots:  # the spectrum layers and their group mates (q/k/v share one statistic)
            assert set(callback._spectrum_names) <= with_g
            assert "model.model.layers.0.self_attn.o_proj" not in with_g  # in no spectrum layer's group
            assert set(callback._spectra) == set(callback._spectrum_names)
        else:
            assert not with_g
    recording = Recording(ratio=0.5, plots=False)
    recording.compress(copy.deepcopy(base), loader, progress=False)
    assert all("G" in stats for _, stats, _ in recording.seen)
