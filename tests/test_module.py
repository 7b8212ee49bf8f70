"""PrehabModule: the rank penalty on whitened weights, its schedule, whitening buffers, resume, bad input."""

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from prehab.callbacks import SVDLLM
from prehab.datamodules.stdlib_text import ByteWindows, StdlibText
from prehab.module import PrehabModule


class Bytes(pl.LightningDataModule):
    """Real text (stdlib docstrings) as bytes folded into the tiny models' vocabulary, short windows."""

    def __init__(self, seq_len=24, batch_size=8, train_windows=2400, seed=0):
        super().__init__()
        text = StdlibText(seq_len=seq_len, val_windows=8)
        self.train_bytes = (text.train_bytes % 93 + 3)[:200_000]
        self.val_bytes = text.val_bytes % 93 + 3
        self.seq_len, self.batch_size, self.train_windows, self.seed = seq_len, batch_size, train_windows, seed

    def train_dataloader(self):
        return DataLoader(
            ByteWindows(self.train_bytes, self.seq_len, self.train_windows, self.seed + 1), batch_size=self.batch_size
        )

    def val_dataloader(self):
        windows = ByteWindows(self.val_bytes, self.seq_len)
        windows.starts = windows.starts[:16]
        return DataLoader(windows, batch_size=self.batch_size)

    def calibration_dataloader(self):
        return DataLoader(ByteWindows(self.train_bytes, self.seq_len, 32, self.seed), batch_size=self.batch_size)


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _trainer(steps, callbacks=(), **kwargs):
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def _module(**kwargs):
    torch.manual_seed(0)
    options = dict(model=tiny_llama(), lr=3e-3, calibration_batches=2)
    options.update(kwargs)
    return PrehabModule(**options)


def test_lambda_zero_is_plain_fine_tuning():
    torch.manual_seed(0)
    plain_model = tiny_llama()
    module = _module(model=copy.deepcopy(plain_model), lam=0.0)
    recorder = LossRecorder()
    data = Bytes(train_windows=80)
    _trainer(8, [recorder]).fit(module, datamodule=data)
    assert not hasattr(module.whitening, "model__layers__0__mlp__up_proj")  # λ = 0: nothing collected

    optimizer = torch.optim.AdamW(plain_model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
    plain_model.train()
    expected = []
    for batch in data.train_dataloader():
        loss = plain_model(**batch).loss
        expected.append(float(loss))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if len(expected) == 8:
            break
    assert recorder.losses == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_prehab_lowers_whitened_stable_rank_and_truncation_error():
    data = Bytes()
    results = {}
    for lam in (0.0, 0.05):
        module = _module(lam=lam, regularizer="stable_rank")
        _trainer(300).fit(module, datamodule=data)
        if lam == 0:  # measure both runs in the same whitened space
            module.collect_whitening()
        ranks = module.whitened_stable_ranks()
        compressed = copy.deepcopy(module)
        report = SVDLLM(ratio=0.5, calibration_batches=4).compress(
            compressed, data.calibration_dataloader(), progress=False
        )
        results[lam] = (sum(ranks) / len(ranks), report.totals()["mean_relative_error"])
    assert results[0.05][0] < results[0.0][0], results
    assert results[0.05][1] < results[0.0][1], results


def test_whitening_buffers_survive_checkpoint_resume(tmp_path, monkeypatch):
    data = Bytes(train_windows=32)  # 4 batches per epoch: the step-4 checkpoint is an epoch boundary, so the
    # resumed run sees the same batches (a plain DataLoader cannot be resumed mid-epoch)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    straight = LossRecorder()
    module = _module(lam=0.05, regularizer="nuclear")
    _trainer(8, [straight, checkpoints], enable_checkpointing=True).fit(module, datamodule=data)
    factor = module.whitening_factor("model.layers.0.mlp.up_proj")
    assert factor is not None and torch.equal(factor, torch.tril(factor))

    collections = []
    original = PrehabModule.collect_whitening
    monkeypatch.setattr(PrehabModule, "collect_whitening", lambda self: collections.append(1) or original(self))
    resumed = LossRecorder()
    fresh = _module(lam=0.05, regularizer="nuclear")
    _trainer(8, [resumed]).fit(fresh, datamodule=data, ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert collections == []  # the buffers came from the checkpoint
    torch.testing.assert_close(fresh.whitening_factor("model.layers.0.mlp.up_proj"), factor)
    assert resumed.losses == pytest.approx(straight.losses[4:], rel=1e-5)
    restored = PrehabModule.load_from_checkpoint(tmp_path / "step=8.ckpt", model=tiny_llama())
    torch.testing.assert_close(
        restored.whitening_factor("model.layers.1.self_attn.o_proj"),
        module.whitening_factor("model.layers.1.self_attn.o_proj"),
    )


def test_lambda_warmup_and_layer_weights():
    module = _module(lam=0.2, lam_warmup_steps=10, layer_weights={r"mlp\.down_proj": 0.0, "q_proj": 2.0})
    assert module.layer_weights["model.layers.0.mlp.down_proj"] == 0.0
    assert module.layer_weights["model.layers.1.self_attn.q_proj"] == 2.0
    assert module.layer_weights["model.layers.1.self_attn.k_proj"] == 1.0
    assert module.lam_now() == 0.0  # global_step 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"regularizer": "rank"}, r"regularizer.*'stable_rank'.*'nuclear'.*'tail'"),
        ({"task": "translation"}, r"task='translation'.*'causal_lm', 'sequence_classification'"),
        ({"lam": -1.0}, r"lam=-1.0 is invalid"),
        ({"targets": "qq_proj"}, r"'qq_proj' matches no Linear.*model\.layers\.0\.self_attn\.q_proj"),
        ({"layer_weights": {"nothing": 1.0}}, r"layer_weights: pattern 'nothing' matches no targeted layer"),
        ({"tail_ratio": 1.5}, r"tail_ratio=1.5"),
        ({"calibration_batches": 0}, r"calibration_batches=0"),
        ({"penalty_fraction": 0.0}, r"penalty_fraction=0.0 is invalid"),
    ],
)
def test_bad_arguments_are_rejected_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


def test_tail_regularizer_takes_rank_from_the_compression_callback():
    data = Bytes(train_windows=40)
    module = _module(lam=0.1, regularizer="tail")
    callback = SVDLLM(ratio=0.5, calibration_batches=2)
    _trainer(3, [callback]).fit(module, datamodule=data)
    assert module._tail_rank(64, 32) == 10  # floor(0.5 * 64 * 32 / 96)
    assert callback.report.totals()["layers_compressed"] == 14
    # Metrics at every stage: before prehab, after prehab (dense), after surgery; perplexity over bytes.
    metrics = callback.report.metrics
    assert set(metrics) == {"before_prehab", "dense", "svd_llm"}
    assert all(1.0 < m["perplexity"] < 200 for m in metrics.values())
    assert metrics["before_prehab"]["perplexity"] != metrics["dense"]["perplexity"]
    with pytest.raises(ValueError, match="tail_ratio"):
        lonely = _module(lam=0.1, regularizer="tail")
        _trainer(1).fit(lonely, datamodule=data)


def test_model_named_once_gives_the_datamodule_its_tokenizer(tmp_path):
    """A Hugging Face folder as `model=`; the WikiText datamodule (tokenizer=None) takes the module's tokenizer."""
    from tiny_text_assets import tiny_llama as tiny_llama_for
    from tiny_text_assets import wikitext_tokenizer

    from prehab.datamodules import WikiText

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"
    if not shared.is_dir():
        pytest.skip("shared WikiText-2 data not available")
    tokenizer = wikitext_tokenizer(vocab_size=500)
    folder = tmp_path / "tiny-hf"
    tiny_llama_for(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    module = PrehabModule(model=str(folder), lam=0.01, calibration_batches=2)
    data = WikiText(
        dataset=str(shared), seq_len=32, train_split="valid", calibration_samples=8, max_eval_windows=4, batch_size=4
    )
    callback = SVDLLM(ratio=0.5, calibration_batches=2)
    _trainer(2, [callback]).fit(module, datamodule=data)
    assert data.tokenizer.vocab_size == tokenizer.vocab_size
    assert callback.report.totals()["layers_compressed"] > 0
    assert set(callback.report.metrics) == {"before_prehab", "dense", "svd_llm"}


def test_penalty_fraction_rotates_an_unbiased_subset():
    full, half = _module(lam=1.0, regularizer="nuclear"), _module(lam=1.0, regularizer="nuclear", penalty_fraction=0.5)
    for module in (full, half):
        for name in module.target_names:  # identity whitening: R(W) itself
            width = module.model.get_submodule(name).in_features
            module.whitening.register_buffer(module._buffer_name(name), torch.eye(width))
    names = half.target_names
    first, second = half.penalty_layers(0), half.penalty_layers(1)
    assert len(first) == len(second) == 7 and set(first) | set(second) == set(names) and not set(first) & set(second)
    total, values = full.penalty()
    subset, subset_values = half.penalty()  # global_step 0: the first rotating block, reweighted x2
    assert subset_values == pytest.approx(values[:7])
    expected = 2 * sum(float(torch.linalg.svdvals(half.model.get_submodule(n).weight.detach()).sum()) for n in first)
    assert float(subset) == pytest.approx(expected, rel=1e-5)
    assert float(total) == pytest.approx(sum(values), rel=1e-5)
