"""Launched by tests/test_datamodules.py (never collected by pytest): validate a tiny Llama on 5 WikiText-2
test windows with 2 CPU processes (DDP on gloo) and write the DDP result next to single-process references.

Usage: python ddp_validation_script.py <tokenizer_dir> <out.json>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torchmetrics import SumMetric

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_text_assets import SHARED_DATA, tiny_llama  # noqa: E402

from prehab.datamodules import WikiText  # noqa: E402
from prehab.evaluation import TokenPerplexity, forward_batch, output_logits, perplexity  # noqa: E402


class PerplexityProbe(pl.LightningModule):
    """Validation-only module: accumulates perplexity and the number of windows seen in Metric objects,
    which Lightning synchronises once at epoch end (per-step collectives would hang on uneven shards)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.val_ppl = TokenPerplexity()
        self.windows_seen = SumMetric()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = output_logits(forward_batch(self.model, batch))
        self.val_ppl.update(logits, batch["labels"])
        self.windows_seen.update(torch.tensor(float(batch["input_ids"].shape[0])))
        self.log("val_ppl", self.val_ppl)
        self.log("windows_seen", self.windows_seen)


def main(tokenizer_dir: str, out_path: str) -> None:
    # The tokenizer is loaded from a saved folder (tokenizer training may order tied words differently in
    # each process) and the model is seeded, so both ranks hold the same data and weights.
    datamodule = WikiText(
        dataset=str(SHARED_DATA / "wikitext-2-raw"),
        tokenizer=tokenizer_dir,
        seq_len=32,
        train_split="valid",
        val_split="test",
        max_eval_windows=5,
        batch_size=2,
    )
    model = tiny_llama(len(datamodule.tokenizer))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    result = trainer.validate(PerplexityProbe(model), datamodule=datamodule, verbose=False)[0]
    if trainer.global_rank == 0:
        windows = datamodule.val_dataset.as_tensor()
        report = {
            "world_size": trainer.world_size,
            "ddp_ppl": result["val_ppl"],
            "windows_seen": result["windows_seen"],
            "num_windows": len(windows),
            "single_process_ppl": perplexity(model, windows),
            # What a padded DistributedSampler would compute: window 0 counted twice.
            "padded_ppl": perplexity(model, torch.cat([windows, windows[:1]])),
        }
        Path(out_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
