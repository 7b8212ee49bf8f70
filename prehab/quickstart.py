"""Offline quickstart: train a small byte-level Llama on real text, compress it two ways, compare.

Needs no network and no files outside the installed packages: the text is the docstrings of Python's
own standard library (about 0.7 MB of English technical prose), tokenized as bytes. Real runs use the
configs in ``configs/`` with real models and datasets.

    python -m prehab.quickstart            # ~1-2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import ast
import copy
import math
import sysconfig
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset

from prehab.callbacks import SVD, SVDLLM

__all__ = ["ByteTextDataModule", "ByteLM", "stdlib_docstrings", "main"]


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings (at least ``min_chars`` long) of the running Python's standard-library modules, in a fixed order."""
    docs: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


class ByteWindows(Dataset):
    """Windows of ``seq_len`` bytes: random offsets (seeded) or non-overlapping, remainder dropped."""

    def __init__(self, data: torch.Tensor, seq_len: int, count: int | None = None, seed: int = 0) -> None:
        self.data, self.seq_len = data, seq_len
        if count is None:
            self.starts = torch.arange(0, len(data) - seq_len + 1, seq_len)
        else:
            g = torch.Generator().manual_seed(seed)
            self.starts = torch.randint(0, len(data) - seq_len, (count,), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[self.starts[i] : self.starts[i] + self.seq_len].long()
        return {"input_ids": ids, "labels": ids}


class ByteTextDataModule(pl.LightningDataModule):
    """Python's stdlib docstrings as bytes; every 10th docstring is held out for validation.

    Args:
        seq_len: tokens (bytes) per window.
        batch_size: windows per batch.
        train_windows: random training windows per epoch.
        calibration_samples: seeded random windows from the training text for compression.
        val_windows: non-overlapping validation windows used for perplexity.
        seed: seed of the random windows.
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 16,
        train_windows: int = 4096,
        calibration_samples: int = 32,
        val_windows: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        docs = stdlib_docstrings()
        encode = lambda parts: torch.frombuffer(bytearray("\n\n".join(parts).encode("utf-8")), dtype=torch.uint8)  # noqa: E731
        self.train_bytes = encode([d for i, d in enumerate(docs) if i % 10])
        self.val_bytes = encode([d for i, d in enumerate(docs) if not i % 10])

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            ByteWindows(self.train_bytes, hp.seq_len, hp.train_windows, hp.seed + 1), batch_size=hp.batch_size
        )

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        windows = ByteWindows(self.val_bytes, hp.seq_len)
        windows.starts = windows.starts[: hp.val_windows]
        return DataLoader(windows, batch_size=hp.batch_size)

    def calibration_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            ByteWindows(self.train_bytes, hp.seq_len, hp.calibration_samples, hp.seed), batch_size=hp.batch_size
        )


class ByteLM(pl.LightningModule):
    """A small Llama (transformers) over bytes, trained from scratch."""

    def __init__(self, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=256,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 8 // 3,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=512,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
        self.model = LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        steps = max(1, int(self.trainer.estimated_stepping_batches))  # 0 when only compressing
        return [optimizer], [
            {
                "scheduler": torch.optim.lr_scheduler.OneCycleLR(
                    optimizer, self.hparams.lr, total_steps=steps, pct_start=0.1
                ),
                "interval": "step",
            }
        ]


@torch.no_grad()
def byte_perplexity(module: ByteLM, loader: DataLoader) -> float:
    """exp(mean next-byte NLL) over all predicted tokens of the loader."""
    module.eval()
    total, count = 0.0, 0
    for batch in loader:
        logits = module(batch["input_ids"])[:, :-1]
        targets = batch["input_ids"][:, 1:]
        total += float(
            nn.functional.cross_entropy(logits.reshape(-1, 256).float(), targets.reshape(-1), reduction="sum")
        )
        count += targets.numel()
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--ratio", type=float, default=0.3, help="fraction of block parameters removed")
    parser.add_argument("--out", default="quickstart_out", help="where compressed models and reports go")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    console = Console()
    started = time.perf_counter()

    datamodule = ByteTextDataModule()
    module = ByteLM()
    trainer_kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    pl.Trainer(max_steps=args.steps, **trainer_kwargs).fit(module, datamodule=datamodule)
    val = datamodule.val_dataloader()
    rows = [("dense (trained)", "-", sum(p.numel() for p in module.parameters()), byte_perplexity(module, val))]

    for method in (SVD, SVDLLM):
        compressed = copy.deepcopy(module)
        callback = method(ratio=args.ratio, save_dir=f"{args.out}/{method.method}")
        # max_steps=0: no training, straight to on_fit_end, where the callback compresses.
        pl.Trainer(max_steps=0, callbacks=[callback], enable_progress_bar=False, **trainer_kwargs).fit(
            compressed, datamodule=datamodule
        )
        rows.append(
            (
                method.method,
                f"{args.ratio:g}",
                sum(p.numel() for p in compressed.parameters()),
                byte_perplexity(compressed, val),
            )
        )

    table = Table(title=f"quickstart: byte-level Llama on Python docstrings ({time.perf_counter() - started:.0f} s)")
    for column in ("model", "ratio", "params", "val. perplexity (bytes)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, ratio, params, ppl in rows:
        table.add_row(name, ratio, f"{params:,}", f"{ppl:.3f}")
    console.print(table)
    console.print(f"compressed models and report.json files are in {args.out}/")


if __name__ == "__main__":
    main()
