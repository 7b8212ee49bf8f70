"""Running covariances, hooks that always come off, and the calibration context."""

import pytest
import torch
from torch import nn

from prehab.stats import CovarianceCollector, RunningCovariance, calibration_forward_context, input_hooks


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
