"""LoRA rehab on a real model: SmolLM2-135M, SVD-LLM surgery, then LoRARehab on Alpaca.

    python ../shared/tools/fetch_models.py --only smollm2          # once: writes $PREHAB_ASSETS/smollm2-135m
    python benchmarks/bench_rehab.py --model $PREHAB_ASSETS/smollm2-135m --data ../shared/data

Reports WikiText-2 test perplexity (the DESIGN's protocol: 24 windows of 512 tokens; in-domain for the
calibration, out-of-domain for the Alpaca rehab) and PTB test perplexity (out-of-domain for both) before
surgery, after surgery and after rehab, and the time of one rehab step (LoRA on a factor of the compressed
model: forward, backward, AdamW) against one plain training step of the dense model (all parameters, AdamW)
on the same Alpaca batches. Results go to ``benchmarks/out/rehab.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from prehab.callbacks import SVDLLM, LoRARehab
from prehab.datamodules import PTB, Alpaca, WikiText
from prehab.evaluation import perplexity
from prehab.module import PrehabModule


class PTBProbe(pl.Callback):
    """PTB test perplexity at this point of ``on_fit_end`` (placed between the surgery and the rehab)."""

    def __init__(self, loader) -> None:
        self.loader, self.value = loader, None

    def on_fit_end(self, trainer, pl_module) -> None:
        self.value = perplexity(pl_module.model, self.loader)


def dense_step_seconds(module: PrehabModule, batches: list, warmup: int = 2) -> float:
    """Mean time of a plain training step of the dense model (all parameters, AdamW) over ``batches``; the
    model's weights are put back afterwards (the timing must not fine-tune the model the table evaluates)."""
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    module.train()
    times = []
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        loss, _, _ = module.task_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    module.load_state_dict(saved)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="SmolLM2-135M folder (fetch_models.py)")
    parser.add_argument("--data", default="../shared/data", help="folder with wikitext-2-raw, ptb, alpaca")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=60, help="LoRA steps per factor")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--timing-steps", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/out/rehab.json")
    args = parser.parse_args()
    data = Path(args.data)
    torch.manual_seed(0)

    module = PrehabModule(model=args.model, lam=0.0)
    wikitext = WikiText(
        dataset=str(data / "wikitext-2-raw"),
        seq_len=512,
        train_split="valid",
        val_split="test",
        calibration_split="valid",
        calibration_samples=32,
        max_eval_windows=24,
        batch_size=4,
    )
    ptb = PTB(
        dataset=str(data / "ptb"),
        tokenizer=module.tokenizer,
        seq_len=512,
        val_split="test",
        max_eval_windows=24,
        batch_size=4,
    )
    alpaca = Alpaca(
        dataset=str(data / "alpaca" / "alpaca_5000.json"),
        tokenizer=module.tokenizer,
        cutoff_len=args.cutoff_len,
        batch_size=args.batch_size,
        val_size=0,
    )
    alpaca.setup("fit")
    timing_batches = [b for _, b in zip(range(args.timing_steps + 2), alpaca.train_dataloader(), strict=False)]
    dense_step = dense_step_seconds(module, timing_batches)
    ptb_dense = perplexity(module.model, ptb.val_dataloader())

    probe = PTBProbe(ptb.val_dataloader())
    compression = SVDLLM(ratio=args.ratio, calibration_batches=8)
    rehab = LoRARehab(steps_per_factor=args.steps, rank=args.rank, lr=args.lr, datamodule=alpaca, dropout=0.05)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[compression, probe, rehab],
    )
    trainer.fit(module, datamodule=wikitext)
    report = compression.report
    stages = {s.name: s for s in report.stages}
    rehab_seconds = sum(rehab.seconds.values())  # training only (the stage's time also has the data setup)
    rehab_step = rehab_seconds / (len(rehab.order) * args.steps)
    result = {
        "model": args.model,
        "ratio": args.ratio,
        "rehab": {
            "steps_per_factor": args.steps,
            "order": rehab.order,
            "batch_size": args.batch_size,
            "cutoff_len": args.cutoff_len,
            "lr": args.lr,
            "rank": args.rank,
            "tokens_seen": len(rehab.order) * args.steps * args.batch_size * args.cutoff_len,
        },
        "wikitext2_test_ppl": {
            "dense": stages["dense"].metrics["perplexity"],
            "surgery": stages["svd_llm"].metrics["perplexity"],
            "rehab": stages["rehab"].metrics["perplexity"],
        },
        "ptb_test_ppl": {
            "dense": ptb_dense,
            "surgery": probe.value,
            "rehab": perplexity(module.model, ptb.val_dataloader()),
        },
        "params": {"dense": stages["dense"].params, "compressed": stages["svd_llm"].params},
        "seconds": {
            "dense_train_step": dense_step,
            "rehab_step": rehab_step,
            "rehab_step_over_dense_step": rehab_step / dense_step,
            "rehab_total": rehab_seconds,
            "rehab_per_factor": rehab.seconds,
        },
        "loss_first_last": {f: (losses[0], losses[-1]) for f, losses in rehab.losses.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
