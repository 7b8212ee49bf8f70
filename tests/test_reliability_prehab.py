"""Issue 9 (PrehabModule, linalg, statistics, calibration): bad arguments, prehab after surgery, iterable
loaders, an all-zero weight in ACES, padded causal-LM batches, train mode of a from_pretrained backbone,
activations too large for a float32 covariance."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SEQ, TokenData, fast_trainer, tiny_bert, tiny_llama
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from prehab.calibration import collect_input_covariances
from prehab.callbacks import SVDLLM
from prehab.evaluation import IGNORE_INDEX, TokenPerplexity
from prehab.linalg import aces_beta, aces_surrogate, damped_cholesky, damping_schedule, solve_lowrank
from prehab.lowrank import LowRankLinear
from prehab.module import PrehabModule
from prehab.stats import CovarianceCollector, RunningCovariance, gram_product

NAN, INF = float("nan"), float("inf")


def _module(**kwargs) -> PrehabModule:
    torch.manual_seed(0)
    options = dict(model=tiny_llama(), lr=3e-3, calibration_batches=2)
    options.update(kwargs)
    return PrehabModule(**options)


def _loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    return DataLoader(TokenData(n), batch_size=batch_size)


# ---------------------------------------------------------------------------------------------- 1: damping
def _singular(n: int = 6) -> torch.Tensor:
    x = torch.randn(n, 2, dtype=torch.float64)
    return x @ x.T  # rank 2: needs damping


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"initial_damping": 0.0}, r"initial_damping=0.0 is invalid.*> 0"),
        ({"initial_damping": -1e-6}, r"initial_damping=-1e-06 is invalid"),
        ({"initial_damping": NAN}, r"initial_damping=nan is invalid"),
        ({"max_damping": 0.0}, r"max_damping=0.0 is invalid"),
        ({"growth": 1.0}, r"growth=1.0 is invalid.*> 1"),
        ({"growth": 1.0 + 1e-9}, r"growth=.* would take .* Cholesky attempts"),
        ({"min_pivot": -1.0}, r"min_pivot=-1.0 is invalid"),
    ],
)
def test_damped_cholesky_rejects_arguments_that_would_not_terminate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        damped_cholesky(_singular(), **kwargs)


def test_damping_escalation_is_bounded():
    assert damping_schedule(1e-6, 1.0, 10.0) == pytest.approx([0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert damping_schedule(2.0, 1.0, 10.0) == [0.0, 2.0]  # a first damping above the cap is tried once
    # A pivot floor no damping can satisfy: the escalation ends with an error instead of looping.
    with pytest.raises(ValueError, match="not positive definite even with damping 1"):
        damped_cholesky(_singular(), min_pivot=1e6)
    assert damped_cholesky(_singular(), initial_damping=1e-3).relative_damping == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------------- 16: arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": NAN}, r"lam=nan is invalid: .*finite number >= 0"),
        ({"lam": INF}, r"lam=inf is invalid"),
        ({"lam": True}, r"lam=True is invalid"),
        ({"layer_weights": {"q_proj": NAN}}, r"layer_weights\['q_proj'\]=nan is invalid: .*finite numbers >= 0"),
        ({"layer_weights": {"q_proj": "heavy"}}, r"layer_weights\['q_proj'\]='heavy' is invalid"),
        ({"layer_weights": {"q_proj(": 1.0}}, r"layer_weights key 'q_proj\(' is not a valid regex"),
        ({"layer_weights": [1.0]}, r"layer_weights=\[1.0\] is invalid: use a dict"),
        ({"task": "sequence_classification", "num_labels": 0}, r"num_labels=0 is invalid: use a positive integer"),
        ({"task": "sequence_classification", "num_labels": -2}, r"num_labels=-2 is invalid"),
        ({"task": "sequence_classification", "num_labels": 2.5}, r"num_labels=2.5 is invalid"),
        ({"task": "sequence_classification", "num_labels": 1}, r"num_labels=1 is invalid.*task='regression'"),
        ({"task": "regression", "num_labels": 3}, r"num_labels=3 is invalid for task='regression': use 1"),
        ({"tail_ratio": "0.5"}, r"tail_ratio='0.5' is invalid: use a fraction in \(0, 1\)"),
        ({"tail_ratio": NAN}, r"tail_ratio=nan is invalid"),
        ({"model": None}, r"model=None is invalid: pass a Hugging Face model name or folder.*nn.Module"),
        ({"model": 3}, r"model=3 is invalid"),
        ({"model": ""}, r"model='' is invalid"),
        ({"damping": 0.0}, r"damping=0.0 is invalid: use a small positive number such as 1e-6"),
        ({"damping": -1e-6}, r"damping=-1e-06 is invalid"),
        ({"damping": NAN}, r"damping=nan is invalid"),
        ({"damping": "1e-6"}, r"damping='1e-6' is invalid"),
        ({"lr": 0.0}, r"lr=0.0 is invalid: use a positive learning rate"),
        ({"lr": -1e-3}, r"lr=-0.001 is invalid"),
        ({"lr": NAN}, r"lr=nan is invalid"),
        ({"pretrained": "yes"}, r"pretrained='yes' is invalid: use true or false"),
        ({"calibration_batches": True}, r"calibration_batches=True is invalid"),
        ({"penalty_fraction": NAN}, r"penalty_fraction=nan is invalid"),
        ({"targets": 3}, r"targets=3 is invalid: use a regex string"),
    ],
)
def test_prehab_module_rejects_bad_arguments_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


# ---------------------------------------------------------------------------------------------- 2: after surgery
@pytest.mark.parametrize("lam", [0.05, 0.0])
def test_prehab_module_trains_again_after_surgery(lam):
    """Prehab after surgery penalizes (and logs) the compressed layers' effective weight ``up @ down``."""
    module = _module(lam=lam, regularizer="stable_rank", whitening_refresh_every=2)
    report = SVDLLM(ratio=0.5, calibration_batches=2).compress(module, _loader(16), progress=False)
    assert report.totals()["layers_compressed"] == len(module.target_names)
    layer = module.model.get_submodule(module.target_names[0])
    assert isinstance(layer, LowRankLinear)
    before = (layer.up.weight.detach().clone(), layer.down.weight.detach().clone())

    trainer = fast_trainer(max_steps=3, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=_loader(32))

    assert trainer.global_step == 3
    assert not torch.equal(layer.up.weight, before[0]) and not torch.equal(layer.down.weight, before[1])
    logged = trainer.callback_metrics
    for key in ("stable_rank/mean", "stable_rank/min", "stable_rank/max"):
        assert math.isfinite(float(logged[key])), key
    max_rank = max(m.rank for m in module.modules() if isinstance(m, LowRankLinear))
    assert 1.0 <= float(logged["stable_rank/min"]) <= float(logged["stable_rank/max"]) <= 1.01 * max_rank
    if lam > 0:  # whitening collected (and refreshed at step 2) on the compressed model
        assert math.isfinite(float(logged["train/penalty"]))
        factor = module.whitening_factor(module.target_names[0])
        assert factor is not None and factor.shape == (layer.in_features, layer.in_features)


# ---------------------------------------------------------------------------------------------- 3: iterable data
class IterableTokens(IterableDataset):
    """TokenData as a stream: no ``__len__``, so ``len(DataLoader)`` raises TypeError."""

    def __init__(self, n: int = 32) -> None:
        self.data = TokenData(n)

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


def test_calibration_and_prehab_whitening_accept_an_iterable_dataset():
    model = tiny_llama()
    targets = {"model.layers.0.mlp.up_proj": model.get_submodule("model.layers.0.mlp.up_proj")}
    streamed, rows = collect_input_covariances(
        model, targets, DataLoader(IterableTokens(), batch_size=8), 3, progress=True
    )
    mapped, _ = collect_input_covariances(model, targets, DataLoader(TokenData(32), batch_size=8), 3, progress=False)
    assert rows == 3 * 8 * SEQ
    torch.testing.assert_close(streamed["model.layers.0.mlp.up_proj"], mapped["model.layers.0.mlp.up_proj"])

    module = _module(lam=0.05)
    fast_trainer(max_steps=2).fit(module, train_dataloaders=DataLoader(IterableTokens(), batch_size=8))
    assert all(module.whitening_factor(name) is not None for name in module.target_names)
    report = SVDLLM(ratio=0.5, calibration_batches=2).compress(module, DataLoader(IterableTokens(), batch_size=8))
    assert report.totals()["layers_compressed"] == len(module.target_names)


# ---------------------------------------------------------------------------------------------- 4: ACES, zero weight
def test_aces_on_an_all_zero_weight_gives_beta_min_and_zero_factors():
    x = torch.randn(64, 8)
    x_hat = x + 0.1 * torch.randn(64, 8)
    h, c = x_hat.T @ x_hat / 64, x.T @ x_hat / 64
    weight = torch.zeros(6, 8)
    choice = aces_beta(weight, h, c, 3, beta_min=0.3, beta_max=0.7)
    assert choice.beta == 0.3 and choice.coefficients == (0.0,) * 6
    assert all(score == 0.0 for score in choice.scores)
    assert aces_surrogate(0.5, choice.coefficients) == 0.0
    assert torch.equal(aces_surrogate(torch.tensor([0.2, 0.9]), choice.coefficients), torch.zeros(2))
    cross = (1 - choice.beta) * h.double() + choice.beta * c.double()
    factors = solve_lowrank(weight, 3, whitening=h, cross=cross)
    assert torch.equal(factors.up, torch.zeros(6, 3, dtype=torch.float64))
    assert torch.equal(factors.down, torch.zeros(3, 8, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- 12: padding
def test_causal_lm_loss_and_perplexity_skip_padding():
    module = _module(lam=0.0).eval()
    ids = TokenData(4).ids[:, :12].clone()
    mask = torch.ones_like(ids)
    mask[0, 7:], mask[2, 4:] = 0, 0  # right padding
    ids[mask == 0] = 0  # the pad token
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        loss, logits, targets = module.task_loss({"input_ids": ids, "attention_mask": mask})
        expected = module.model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(targets, labels)
    torch.testing.assert_close(loss, expected.loss)
    reference = TokenPerplexity()
    reference.update(expected.logits, labels)
    perplexity = module.evaluate([{"input_ids": ids, "attention_mask": mask}])["perplexity"]
    assert perplexity == pytest.approx(float(reference.compute()), rel=1e-5)


# ---------------------------------------------------------------------------------------------- 13: train mode
def test_from_pretrained_backbone_trains_with_dropout_and_evaluate_restores_modes(tmp_path):
    tiny_bert(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.1).save_pretrained(tmp_path / "tiny-bert")

    class Watched(PrehabModule):
        def training_step(self, batch, batch_idx):
            self.dropout_modes.append({m.training for m in self.model.modules() if isinstance(m, nn.Dropout)})
            return super().training_step(batch, batch_idx)

    module = Watched(model=str(tmp_path / "tiny-bert"), task="sequence_classification", num_labels=3, lam=0.0)
    module.dropout_modes = []
    dropouts = [m for m in module.model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and dropouts[0].p > 0
    fast_trainer(max_steps=2, limit_val_batches=1).fit(module, _loader(16), _loader(8))
    assert module.dropout_modes == [{True}, {True}]

    during = []
    hook = dropouts[0].register_forward_pre_hook(lambda m, args: during.append(m.training))
    module.evaluate(_loader(8))
    hook.remove()
    assert during and not any(during)  # evaluation runs in eval mode ...
    assert all(m.training for m in dropouts)  # ... and gives every module its mode back


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")
def test_batch_encoding_batches_are_dicts():
    """GLUE batches arrive as transformers' BatchEncoding (a UserDict, not a dict)."""
    from conftest import tiny_bert
    from transformers import BatchEncoding

    module = _module(model=tiny_bert(), task="sequence_classification", lam=0.0).eval()
    data = TokenData(4)
    batch = BatchEncoding({"input_ids": data.ids, "attention_mask": torch.ones_like(data.ids), "labels": data.labels})
    loss, logits, labels = module.task_loss(batch)
    assert logits.shape == (4, 3) and torch.equal(labels, data.labels) and torch.isfinite(loss)
    module.validation_step(batch, 0)


# ---------------------------------------------------------------------------------------------- stats: overflow
def test_covariance_of_huge_but_finite_activations():
    """Activations ~1e25 are finite in float32, but their float32 products (~1e50) are not."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8) * 1e25
    expected = x.reshape(-1, 8).double().T @ x.reshape(-1, 8).double()
    running = RunningCovariance(8)
    running.update(x[:2])
    running.update(x[2:], x[2:])
    assert torch.isfinite(running.sum).all()
    torch.testing.assert_close(running.sum, expected, rtol=1e-5, atol=0)

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    collector = CovarianceCollector(dict(model.named_children()), {"0": 8, "1": 8})
    with torch.no_grad(), collector.hooks():
        model(x)
    means = collector.means_()
    assert all(torch.isfinite(m).all() for m in means.values())
    torch.testing.assert_close(means["0"], expected / 20, rtol=1e-5, atol=0)

    loader = DataLoader([x[i] for i in range(4)], batch_size=2)
    report = SVDLLM(ratio=0.5, targets=r"^\d$", calibration_batches=2).compress(model, loader, progress=False)
    assert report.totals()["layers_compressed"] == 2
    assert all(math.isfinite(layer.relative_error) for layer in report.layers)

    too_big = torch.full((2, 2), 1e200, dtype=torch.float64)
    with pytest.raises(OverflowError, match=r"activations of magnitude ~1\.0e\+200 in layer 'blocks\.0' overflow"):
        gram_product(too_big, where="blocks.0")
