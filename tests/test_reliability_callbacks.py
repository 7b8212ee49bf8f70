"""Issue 9 items of the compression callbacks: early checks, argument types, unusable data, one-shot iterators,
checkpoints of the compressed module, and which evaluation the report uses."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyModule, fast_trainer, loader_for
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import prehab
from prehab import LowRankLinear
from prehab.callbacks import AASVD, SAESSVD, SVD, SVDLLM


class StepCounter(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": "no_such_layer"}, r"pattern 'no_such_layer' matches no Linear"),
        ({"blocks": "model.nowhere"}, r"blocks='model.nowhere' is not a submodule"),
    ],
)
def test_bad_targets_and_blocks_fail_before_the_first_training_step(kwargs, match):
    counter = StepCounter()
    module = TinyModule("llama")
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=match):
        fast_trainer(callbacks=[counter, SVDLLM(ratio=0.5, **kwargs)], max_steps=5).fit(
            module, train_dataloaders=loader_for("llama")
        )
    assert counter.steps == 0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (SVDLLM, {"damping": "1e-6"}, r"damping='1e-6' is invalid"),
        (SVDLLM, {"damping": None}, r"damping=None is invalid"),
        (SVDLLM, {"damping": math.inf}, r"damping=inf is invalid"),
        (SVDLLM, {"damping": 0.0}, r"damping=0.0 is invalid"),
        (AASVD, {"ridge": -0.1}, r"ridge=-0.1 is invalid: use a number >= 0"),
        (AASVD, {"ridge": math.nan}, r"ridge=nan is invalid"),
        (AASVD, {"dense_cache_gb": -1}, r"dense_cache_gb=-1 is invalid: use a number of GiB >= 0"),
        (SAESSVD, {"dense_cache_gb": "4"}, r"dense_cache_gb='4' is invalid"),
        (AASVD, {"true_sequential": "no"}, r"true_sequential='no' is invalid: use true or false"),
        (SVDLLM, {"true_sequential": False}, r"true_sequential=False needs a two-stream method.*true_sequential=True"),
        (SAESSVD, {"ridge": "0.01"}, r"ridge='0.01' is invalid"),
        (SVD, {"ridge": 0.1}, r"ridge=0.1 has no effect on SVD.*use ridge=0, or an activation-aware method"),
        (SAESSVD, {"beta": "0.5"}, r"beta='0.5' is invalid: use a number in \[0, 1\]"),
        (SAESSVD, {"beta_cap": "x"}, r"beta_cap='x' is invalid"),
        (SVDLLM, {"targets": []}, r"targets=\[\] selects no layer"),
        (SVDLLM, {"targets": 5}, r"targets=5 is invalid"),
        (SVDLLM, {"compare": "svd"}, r"compare='svd' is invalid: use a list.*\['svd'\]"),
        (SVDLLM, {"compare": ["svd", "best"]}, r"unknown methods \['best'\]; valid values"),
        (SVDLLM, {"propagate": "yes"}, r"propagate='yes' is invalid"),
        (SVDLLM, {"calibration_batches": True}, r"calibration_batches=True is invalid"),
        (SVDLLM, {"calibration_batches": 2.5}, r"calibration_batches=2.5 is invalid"),
        (SVDLLM, {"blocks": 5}, r"blocks=5 is invalid"),
        (SVDLLM, {"save_dir": 5}, r"save_dir=5 is invalid"),
        (SVDLLM, {"verbose": "no"}, r"verbose='no' is invalid"),
        (SVDLLM, {"calibration_dataloader": 3}, r"calibration_dataloader=3 is not iterable"),
    ],
)
def test_callback_arguments_of_the_wrong_kind_name_themselves(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(ratio=0.5, **kwargs)


class Unusable(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return "not a tensor"


class Overflowing(nn.Module):
    """Activations overflow to inf on the calibration data."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.b(self.a(x) * 1e38)


@pytest.mark.parametrize("case", ["batch the model cannot take", "non-finite activations"])
def test_plain_svd_works_when_the_calibration_data_is_unusable(case):
    if case == "batch the model cannot take":
        model, loader = TinyModule("llama"), DataLoader(Unusable(), batch_size=4)
        expected = 14
    else:
        model, loader = Overflowing(), [torch.randn(4, 16) * 1e3 for _ in range(2)]
        expected = 2
    with pytest.warns(UserWarning, match="needs no calibration data"):
        report = SVD(ratio=0.6, targets=None if expected == 14 else ["a", "b"]).compress(model, loader, progress=False)
    assert report.totals()["layers_compressed"] == expected
    assert all(layer.relative_error is None for layer in report.layers)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == expected
    with pytest.raises((TypeError, ValueError)):  # the data-driven method still refuses the data
        SVDLLM(ratio=0.6, targets=None if expected == 14 else ["a", "b"]).compress(
            TinyModule("llama") if expected == 14 else Overflowing(), loader, progress=False
        )


def test_one_shot_calibration_iterator_serves_the_comparison_and_the_compression():
    batches = list(loader_for("llama", n=32, batch_size=8))
    by_list, by_iterator = TinyModule("llama"), TinyModule("llama")
    trainer_kwargs = {"max_steps": 0}
    reference = SVDLLM(ratio=0.5, calibration_batches=4, calibration_dataloader=batches, compare=["svd", "aa_svd"])
    one_shot = SVDLLM(
        ratio=0.5, calibration_batches=4, calibration_dataloader=(b for b in batches), compare=["svd", "aa_svd"]
    )
    fast_trainer(callbacks=[reference], **trainer_kwargs).fit(by_list, train_dataloaders=loader_for("llama"))
    fast_trainer(callbacks=[one_shot], **trainer_kwargs).fit(by_iterator, train_dataloaders=loader_for("llama"))
    assert one_shot.report.calibration_samples == reference.report.calibration_samples == 4 * 8 * 16
    for (name, a), (_, b) in zip(by_list.state_dict().items(), by_iterator.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [r.mean_relative_error for r in one_shot.report.sweep] == [
        r.mean_relative_error for r in reference.report.sweep
    ]


def test_model_checkpoint_in_the_compressing_fit_gets_a_compressed_checkpoint(tmp_path):
    module = TinyModule("llama")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = fast_trainer(tmp_path, [SVDLLM(ratio=0.5, calibration_batches=2), checkpoint], enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=loader_for("llama"))
    path = tmp_path / "ckpt" / "compressed.ckpt"
    assert path.is_file()
    reloaded = prehab.load_from_checkpoint(TinyModule, path)
    assert sum(isinstance(m, LowRankLinear) for m in reloaded.modules()) == 14
    batch = next(iter(loader_for("llama")))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.calibration_step(batch), module.calibration_step(batch))


class HasItsOwnEvaluate(TinyModule):
    """A user module whose unrelated evaluate() must never be called by the callback."""

    def evaluate(self, *args, **kwargs):
        raise AssertionError("the callback called the module's own evaluate()")

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))


def test_report_uses_validation_step_not_a_modules_own_evaluate():
    callback = SVDLLM(ratio=0.5, calibration_batches=2)
    trainer = fast_trainer(callbacks=[callback], num_sanity_val_steps=0, limit_val_batches=2)
    trainer.fit(HasItsOwnEvaluate("llama"), loader_for("llama"), loader_for("llama", seed=4))
    metrics = callback.report.metrics
    assert set(metrics) == {"before_prehab", "dense", "svd_llm"}
    assert all(set(m) == {"val_loss"} and m["val_loss"] > 0 for m in metrics.values())
