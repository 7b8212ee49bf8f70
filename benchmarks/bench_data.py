"""Data-pipeline benchmark: WikiText-2 test tokenization + perplexity-window building, and ImageNet-sample
loading throughput compared with a tiny ViT's forward throughput.

Tokenizers (all built offline, nothing is downloaded):
  * ``wordlevel-2k``: the tests' WordLevel tokenizer (whitespace/punctuation split, 2,000 words) trained on
    WikiText-2 raw valid;
  * ``bytelevel-bpe-8k``: a GPT-2-style byte-level BPE with 8,000 tokens trained on WikiText-2 raw valid;
  * ``--tokenizer PATH``: additionally any local Hugging Face tokenizer folder (e.g. SmolLM2 written by
    ``../shared/tools/fetch_models.py``).

Run from the repository root:
    .venv/bin/python benchmarks/bench_data.py            # full run (about a minute on 2 CPU cores)
    .venv/bin/python benchmarks/bench_data.py --smoke    # seconds; for CI
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the offline tokenizer the tests use
from tiny_text_assets import SHARED_DATA, SPECIAL_TOKENS, wikitext_tokenizer  # noqa: E402

from prehab.datamodules import ImageNet, TextDataModule  # noqa: E402


def byte_level_bpe(vocab_size: int = 8000):
    """A byte-level BPE (GPT-2 style) trained on WikiText-2 raw valid, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = (SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")
    backend.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def bench_text(name: str, tokenizer, seq_lens: list[int], repeats: int) -> list[dict]:
    rows = []
    for seq_len in seq_lens:
        tokenize_s, window_s = [], []
        for _ in range(repeats):
            datamodule = TextDataModule(
                dataset=str(SHARED_DATA / "wikitext-2-raw"), tokenizer=tokenizer, seq_len=seq_len
            )
            start = time.perf_counter()
            tokens = datamodule.token_stream("test")  # read, join with "\n\n", tokenize once
            middle = time.perf_counter()
            datamodule.setup("test")  # the stream is cached: this only cuts the windows
            batches = sum(1 for _ in datamodule.test_dataloader())  # materialise every window once
            windows = datamodule.test_dataset
            end = time.perf_counter()
            tokenize_s.append(middle - start)
            window_s.append(end - middle)
        rows.append(
            {
                "tokenizer": name,
                "seq_len": seq_len,
                "tokens": tokens.numel(),
                "windows": len(windows),
                "batches": batches,
                "tokenize_s": statistics.median(tokenize_s),
                "windows_s": statistics.median(window_s),
            }
        )
    return rows


def bench_image_loading(num_workers: int, batch_size: int, max_images: int | None) -> dict:
    datamodule = ImageNet(
        root=str(SHARED_DATA / "imagenet-sample-images"),
        model_name="vit_tiny_patch16_224",
        max_eval_samples=max_images,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    loader = datamodule.val_dataloader()
    start = time.perf_counter()
    first_batch_s = None
    images = 0
    for batch, _ in loader:
        images += batch.shape[0]
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - start
    total = time.perf_counter() - start
    return {
        "what": f"ImageNet sample, eval transform 224 px, num_workers={num_workers}",
        "images": images,
        "seconds": total,
        "samples_per_s": images / total,
        "first_batch_s": first_batch_s,
    }


def bench_vit_forward(batch_size: int, iterations: int) -> dict:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    images = torch.randn(batch_size, 3, 224, 224)
    with torch.inference_mode():
        model(images)  # warm-up
        start = time.perf_counter()
        for _ in range(iterations):
            model(images)
        total = time.perf_counter() - start
    return {
        "what": f"vit_tiny_patch16_224 forward (12 blocks, random init), batch {batch_size}, no grad",
        "images": batch_size * iterations,
        "seconds": total,
        "samples_per_s": batch_size * iterations / total,
        "first_batch_s": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    parser.add_argument("--tokenizer", help="extra local Hugging Face tokenizer folder to benchmark")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repeats = 1 if args.smoke else args.repeats

    tokenizers = {"wordlevel-2k": wikitext_tokenizer()}
    if not args.smoke:
        tokenizers["bytelevel-bpe-8k"] = byte_level_bpe()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizers[Path(args.tokenizer).name] = AutoTokenizer.from_pretrained(args.tokenizer)
    seq_lens = [2048] if args.smoke else [512, 2048]
    text_rows = [row for name, tok in tokenizers.items() for row in bench_text(name, tok, seq_lens, repeats)]

    max_images = 32 if args.smoke else None
    image_rows = [bench_image_loading(workers, 32, max_images) for workers in ([2] if args.smoke else [0, 2])]
    image_rows.append(bench_vit_forward(32, 1 if args.smoke else 5))

    command = (
        "python benchmarks/bench_data.py"
        + (" --smoke" if args.smoke else "")
        + (f" --tokenizer {args.tokenizer}" if args.tokenizer else "")
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"Command: `{command}`  \nMachine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; load average at the end: {load}\n"
    )
    print(
        "### WikiText-2 raw test: tokenize once + non-overlapping windows (median of "
        f"{repeats} run{'s' if repeats > 1 else ''})\n"
    )
    print("| tokenizer | seq_len | tokens | windows | read+join+tokenize (s) | tokens/s | windows + one pass (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in text_rows:
        print(
            f"| {row['tokenizer']} | {row['seq_len']} | {row['tokens']:,} | {row['windows']:,} | "
            f"{row['tokenize_s']:.3f} | {row['tokens'] / row['tokenize_s']:,.0f} | {row['windows_s']:.3f} |"
        )
    print("\n### Images: loading throughput vs. model forward (batch 32, CPU)\n")
    print("| what | images | seconds | samples/s | first batch (s) |")
    print("|---|---:|---:|---:|---:|")
    for row in image_rows:
        first = f"{row['first_batch_s']:.2f}" if row["first_batch_s"] is not None else "-"
        print(f"| {row['what']} | {row['images']} | {row['seconds']:.2f} | {row['samples_per_s']:.1f} | {first} |")


if __name__ == "__main__":
    main()
