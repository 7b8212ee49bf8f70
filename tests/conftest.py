"""Tiny random models built from configs (no downloads) and a generic LightningModule around them."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

VOCAB = 96
SEQ = 16


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(LlamaConfig(**{**settings, **overrides}))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config)


def tiny_bert(**overrides):
    from transformers import BertConfig, BertForSequenceClassification

    settings = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
    )
    return BertForSequenceClassification(BertConfig(**{**settings, **overrides}))


def tiny_vit(embed_dim: int = 48):
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=embed_dim,
        depth=2,
        num_heads=3,
        num_classes=5,
    )


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "vit": tiny_vit}


class TokenData(Dataset):
    """Structured token sequences (a noisy repeating pattern), so activations are not isotropic."""

    def __init__(self, n: int = 64, seed: int = 0, num_labels: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.arange(SEQ) * 7 % (VOCAB - 3) + 3
        shift = torch.randint(0, 11, (n, 1), generator=g)
        noise = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        keep = torch.rand(n, SEQ, generator=g) < 0.8
        self.ids = torch.where(keep, (base + shift) % VOCAB, noise)
        self.labels = shift.squeeze(1) % num_labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "label": self.labels[i]}


class ImageData(Dataset):
    def __init__(self, n: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g).cumsum(-1) / 4  # smooth, correlated pixels
        self.y = torch.randint(0, 5, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def loader_for(kind: str, n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    data = ImageData(n, seed) if kind == "vit" else TokenData(n, seed)
    return DataLoader(data, batch_size=batch_size)


class TinyModule(pl.LightningModule):
    """A plain LightningModule around one of the tiny models; it knows nothing of prehab."""

    def __init__(self, kind: str = "llama", seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.kind = kind
        self.model = BUILDERS[kind]()

    def forward(self, input_ids=None, attention_mask=None, pixels=None):
        if self.kind == "vit":
            return self.model(pixels if pixels is not None else input_ids)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def calibration_step(self, batch):
        return self(pixels=batch[0]) if self.kind == "vit" else self(batch["input_ids"], batch["attention_mask"])

    def training_step(self, batch, batch_idx):
        if self.kind == "vit":
            x, y = batch
            return nn.functional.cross_entropy(self(pixels=x), y)
        logits = self(batch["input_ids"], batch["attention_mask"])
        if self.kind == "bert":
            return nn.functional.cross_entropy(logits, batch["label"])
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["input_ids"][:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def run_ddp_script(script, out) -> None:
    """Run a DDP test script (2 CPU ranks on gloo) as `python script OUT_DIR` in a subprocess; show its stderr."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(script), str(out)], cwd=out, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-4000:]


def fast_trainer(tmp_path=None, callbacks=(), max_steps: int = 2, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    if tmp_path is not None:
        options["default_root_dir"] = str(tmp_path)
    options.update(kwargs)
    return pl.Trainer(**options)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: thread start-up costs more than it saves (and much more on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
