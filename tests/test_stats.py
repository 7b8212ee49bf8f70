"""Running covariances, hooks that always come off, and the calibration context."""

import pytest
import torch
from torch import nn

from prehab import stats
from prehab.stats import CovarianceCollector, RunningCovariance, calibration_forward_context, input_hooks


@pytest.fixture(autouse=True, params=["single product", "3x3 tiles"])
def gram_route(request, monkeypatch):
    """Every test here runs twice: each batch's ``aᵀb`` as one product, and tile by tile (``aᵀa`` on the upper
    triangle) where the sum is at least two 3-wide tiles wide (6-8 features: tiles of 3 or of 3, 3 and 2)."""
    monkeypatch.setitem(stats.TILE_WIDTH, "cpu", 0 if request.param == "single product" else 3)
    return request.param


def test_mirror_upper_fills_the_lower_triangle_in_place():
    matrix = torch.randn(8, 8, dtype=torch.float64)
    expected = matrix.triu() + matrix.triu(1).T
    stats._mirror_upper_(matrix, 3)
    assert torch.equal(matrix, expected)


def test_triangle_updates_match_products_and_are_exactly_symmetric(monkeypatch):
    """Tiles of 3 over 7 features (a partial last tile), several batches, a full-product ``add_`` between them and
    a second accumulator of another width sharing the tile buffer: the sum is ``Σ aᵀa``, symmetric bit for bit."""
    monkeypatch.setitem(stats.TILE_WIDTH, "cpu", 3)
    generator = torch.Generator().manual_seed(0)
    batches = torch.randn(4, 5, 7, generator=generator)
    scratch: dict = {}
    stat, other = RunningCovariance(7, scratch=scratch), RunningCovariance(6, scratch=scratch)
    for i, x in enumerate(batches):
        stat.update(x)
        other.update(x[:, :6])
        if i == 1:
            stat.add_(x.T @ x, x.shape[0])  # a caller's precomputed product lands on both triangles
    assert len(scratch) == 1  # one float32 tile buffer for both widths
    flat = batches.reshape(-1, 7).double()
    expected = flat.T @ flat + batches[1].double().T @ batches[1].double()
    torch.testing.assert_close(stat.sum, expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(stat.sum, stat.sum.T)
    assert stat.count == 25
    stat.update(batches[0])
    monkeypatch.setitem(stats.TILE_WIDTH, "cpu", 0)  # the tiles' width changed (or gone) before the sum is read
    torch.testing.assert_close(stat.sum, expected + flat[:5].T @ flat[:5], rtol=1e-6, atol=1e-5)
    assert torch.equal(stat.sum, stat.sum.T)
    torch.testing.assert_close(other.mean(), flat[:, :6].T @ flat[:, :6] / 20, rtol=1e-6, atol=1e-6)


def test_tile_width_context_restores_the_setting():
    before = dict(stats.TILE_WIDTH)
    with stats.tile_width(7), stats.tile_width(9, "cuda"):
        assert stats.TILE_WIDTH["cpu"] == 7 and stats.TILE_WIDTH["cuda"] == 9
    assert stats.TILE_WIDTH == before  # the CPU's value back, no CUDA entry left behind


def test_collector_gives_the_same_statistics_by_either_route(monkeypatch):
    """A tiny Llama's input covariances with and without triangle tiles agree to float32 round-off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n}
    batch = torch.randint(0, 64, (2, 9))
    means = {}
    for block in (0, 6):
        monkeypatch.setitem(stats.TILE_WIDTH, "cpu", block)
        collector = CovarianceCollector(linears, {n: m.in_features for n, m in linears.items()})
        with calibration_forward_context(model), collector.hooks():
            model(batch)
            model(batch.flip(1))
        means[block] = collector.means_()
    assert means[0].keys() == means[6].keys() and len(means[0]) == len(linears)
    for name in means[0]:
        torch.testing.assert_close(means[6][name], means[0][name], rtol=1e-5, atol=1e-6)
        assert torch.equal(means[6][name], means[6][name].T)


def test_running_covariance_equals_full_products():
    x = torch.randn(5, 7, 6)
    x_hat = x + 0.1 * torch.randn(5, 7, 6)
    g, c = RunningCovariance(6), RunningCovariance(6)
    for i in range(5):
        g.update(x[i])
        c.update(x[i], x_hat[i])
    flat, flat_hat = x.reshape(-1, 6).double(), x_hat.reshape(-1, 6).double()
    assert g.count == c.count == 35
    torch.testing.assert_close(g.sum, flat.T @ flat, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(c.mean(), flat.T @ flat_hat / 35, rtol=1e-6, atol=1e-6)
    assert g.sum.dtype == torch.float64


def test_running_covariances_sharing_a_scratch_buffer_equal_full_products(gram_route):
    """``H``, ``C`` and a wider cross term take turns writing their batch products into shared float32 buffers
    (one per shape); each sum still equals its own product of all rows."""
    generator = torch.Generator().manual_seed(0)
    x, x_hat, y = (torch.randn(9, 7, width, generator=generator) for width in (6, 6, 4))
    scratch: dict = {}
    h, c, cross = (RunningCovariance(6, cols, scratch=scratch) for cols in (None, None, 4))
    for i in range(9):
        h.update(x_hat[i])
        c.update(x[i], x_hat[i])
        cross.update(x[i], y[i])
    # one buffer per (rows, cols) shape
    assert len(scratch) == (2 if gram_route == "single product" else 1)  # or one tile buffer for all
    flat, flat_hat, flat_y = (t.reshape(-1, t.shape[-1]).double() for t in (x, x_hat, y))
    assert h.count == c.count == cross.count == 63
    torch.testing.assert_close(h.sum, flat_hat.T @ flat_hat, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(c.sum, flat.T @ flat_hat, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(cross.sum, flat.T @ flat_y, rtol=1e-6, atol=1e-5)


def test_running_covariance_sums_past_float32_range_exactly():
    """Each batch is float32-safe (4 rows of magnitude 3e18: entries 3.6e37), but ten of them sum past float32's
    3.4e38: batches are added in float64."""
    signs = torch.randint(0, 2, (10, 4, 3), generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = signs.float() * 3e18
    stat = RunningCovariance(3, scratch={})
    for x in batches:
        stat.update(x)
    flat = batches.reshape(-1, 3).double()
    assert torch.isfinite(stat.sum).all()
    torch.testing.assert_close(stat.sum, flat.T @ flat, rtol=1e-5, atol=0)
    assert float(stat.sum[0, 0]) > torch.finfo(torch.float32).max


@pytest.mark.parametrize("rows", [2, 40])  # 2 x 8 < 8²: the inputs are checked; 40 x 8 > 8²: the product is
def test_huge_or_non_finite_batches_on_either_overflow_check(rows):
    """Either check (inputs' bound or product) sends float32-overflowing batches to float64 and lets non-finite
    inputs through as non-finite sums."""
    generator = torch.Generator().manual_seed(0)
    huge = torch.randn(rows, 8, generator=generator) * 1e25  # finite in float32, products ~1e50 are not
    stat = RunningCovariance(8, scratch={})
    stat.update(huge)
    stat.update(huge, huge)
    wide = huge.double()
    torch.testing.assert_close(stat.sum, 2 * wide.T @ wide, rtol=1e-5, atol=0)
    broken = huge.clone()
    broken[0, 3] = float("nan")
    stat.update(broken)
    assert not torch.isfinite(stat.sum).all()


@pytest.mark.parametrize("rows", [2, 40])
def test_float64_inputs_beyond_float32_range_are_summed_in_float64(rows):
    """A finite float64 activation above float32's 3.4e38 is inf in a float32 copy: it must go to float64 on either
    check, also beside a tiny second factor that keeps the bound ``rows · max|a| · max|b|`` small."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, 8, generator=generator, dtype=torch.float64)
    a[0, 0] = 1e39
    b = torch.randn(rows, 8, generator=generator, dtype=torch.float64) * 1e-10
    cross, gram = RunningCovariance(8, 8, scratch={}), RunningCovariance(8, scratch={})
    cross.update(a, b)
    torch.testing.assert_close(cross.sum, a.T @ b, rtol=1e-5, atol=0)
    with pytest.raises(OverflowError, match="in layer .blocks.3.fc."):  # (1e159)² overflows even float64
        gram.update(a * 1e120, where="blocks.3.fc")


def test_scratch_buffers_survive_autograd_and_inference_mode():
    """Inputs that require grad, and a buffer made in inference mode then written outside it, still accumulate."""
    x = torch.randn(5, 4, requires_grad=True)
    stat = RunningCovariance(4, scratch={})
    stat.update(x)
    stat.update(x * 2)
    with torch.inference_mode():
        stat.update(x.detach())
    stat.update(x.detach())
    flat = x.detach().double()
    torch.testing.assert_close(stat.sum, (1 + 4 + 1 + 1) * flat.T @ flat, rtol=1e-6, atol=1e-6)
    assert stat.count == 20


def test_two_stream_overflow_names_the_layer():
    from prehab.pipeline import _Accumulator

    accumulator = _Accumulator(3, torch.device("cpu"), where="model.layers.2.mlp.down_proj")
    huge = torch.full((2, 3), 1e200, dtype=torch.float64)
    with pytest.raises(OverflowError, match=r"1\.0e\+200 in layer 'model\.layers\.2\.mlp\.down_proj'"):
        accumulator.add([huge], [huge], None)


def test_running_covariance_rejects_unpaired_streams_and_empty_mean():
    stat = RunningCovariance(3)
    with pytest.raises(ValueError, match="paired"):
        stat.update(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="no samples"):
        stat.mean()


def test_hooks_are_removed_even_on_error():
    layer = nn.Linear(3, 3)
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with input_hooks({"layer": layer}, lambda name, x: seen.append(name)):
            layer(torch.randn(2, 3))
            raise RuntimeError("boom")
    assert seen == ["layer"]
    assert not layer._forward_pre_hooks
    layer(torch.randn(2, 3))
    assert seen == ["layer"]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.o(self.q(x) * self.k(x))


def test_collector_shares_products_for_one_input_and_matches_reference():
    model = Attention()
    modules = {"q": model.q, "k": model.k, "o": model.o}
    collector = CovarianceCollector(modules, {n: 6 for n in modules})
    batches = [torch.randn(4, 5, 6) for _ in range(3)]
    with collector.hooks():
        for b in batches:
            model(b)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    inner = torch.cat([(model.q(b) * model.k(b)).reshape(-1, 6) for b in batches]).double().detach()
    torch.testing.assert_close(collector.stats["q"].mean(), x.T @ x / 60)
    assert collector.stats["k"] is collector.stats["q"]  # one accumulator for one input
    assert collector.stats["o"] is not collector.stats["q"] and len(collector.unique()) == 2
    torch.testing.assert_close(collector.stats["o"].mean(), inner.T @ inner / 60, rtol=1e-5, atol=1e-6)
    means = collector.means_()
    assert means["q"] is means["k"]
    torch.testing.assert_close(means["q"], x.T @ x / 60)
    torch.testing.assert_close(means["o"], inner.T @ inner / 60, rtol=1e-5, atol=1e-6)
    assert collector._last_input is None  # no activation kept alive after the hooks


def test_calibration_context_restores_modes_and_cache_flag():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2))
    model.train()
    model.transformer.h[0].eval()  # a mixed state must come back as it was
    assert model.config.use_cache
    with calibration_forward_context(model):
        assert not model.training and not torch.is_grad_enabled()
        assert model.config.use_cache is False
    assert model.training and not model.transformer.h[0].training
    assert model.config.use_cache is True
