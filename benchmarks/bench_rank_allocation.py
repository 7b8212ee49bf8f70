"""Uniform against global rank allocation (issue 13) at the same parameter count, same calibration data.

SmolLM2-135M, 32 calibration windows of 512 tokens from WikiText-2 raw valid (seed 0); perplexity over the
first 24 non-overlapping 512-token windows of WikiText-2 raw test and PTB test (the DESIGN's protocol):

    python benchmarks/bench_rank_allocation.py --model assets/smollm2-135m \\
        --wikitext ../shared/data/wikitext-2-raw --ptb ../shared/data/ptb

Choosing the weighting (``allocation_weighting``) is done on WikiText-2 *valid*, never on a test split:

    python benchmarks/bench_rank_allocation.py --model ... --wikitext ... --eval-split valid --no-ptb \\
        --methods svd_llm --ratios 0.2 --weightings relative raw

``--refine-steps N`` adds block refinement to the two-stream methods. ``--smoke`` runs every code path on a
tiny random Llama in well under a minute (tested). One table row per (ratio, method, allocation, weighting):
targeted parameters kept, perplexities, surgery seconds and the part of them the allocation took.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from prehab.callbacks import AASVD, SAESSVD, SVDLLM
from prehab.evaluation import perplexity

METHODS = {"svd_llm": SVDLLM, "aa_svd": AASVD, "saes_svd": SAESSVD}


def _smoke_setup(seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_len,
    )
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    base = torch.arange(seq_len) * 7 % 120 + 3
    windows = lambda n: (base + torch.randint(0, 11, (n, 1), generator=g)) % 128  # noqa: E731
    calibration = [{"input_ids": windows(4)} for _ in range(2)]
    return model, calibration, {"wikitext": windows(4), "ptb": windows(4)}


def _real_setup(args):
    from transformers import AutoModelForCausalLM

    from prehab.datamodules import PTB, WikiText

    common = dict(tokenizer=args.model, seq_len=args.seq_len, max_eval_windows=args.eval_windows, seed=0)
    wiki = WikiText(
        dataset=args.wikitext,
        train_split="valid",
        calibration_split="valid",
        val_split="valid",
        test_split=args.eval_split,
        calibration_samples=args.calibration_samples,
        batch_size=4,
        **common,
    )
    wiki.setup("test")
    calibration = list(wiki.calibration_dataloader())
    evaluation = {"wikitext": wiki.test_dataloader()}
    if args.ptb:
        ptb = PTB(
            dataset=args.ptb, train_split="valid", calibration_split="valid", test_split=args.eval_split, **common
        )
        ptb.setup("test")
        evaluation["ptb"] = ptb.test_dataloader()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    return model, calibration, evaluation


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face folder of SmolLM2-135M")
    parser.add_argument("--wikitext", help="folder with wiki.valid.raw and wiki.test.raw")
    parser.add_argument("--ptb", help="folder with valid.txt and test.txt")
    parser.add_argument("--no-ptb", action="store_true", help="skip PTB")
    parser.add_argument("--eval-split", default="test", choices=["test", "valid"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=["svd_llm", "saes_svd"], choices=list(METHODS))
    parser.add_argument("--allocations", nargs="+", default=["uniform", "global"], choices=["uniform", "global"])
    parser.add_argument("--weightings", nargs="+", default=["relative"], choices=["relative", "raw"])
    parser.add_argument("--min-kept-fraction", type=float, default=0.1)
    parser.add_argument("--refine-steps", type=int, default=0, help="block refinement for two-stream methods")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, random tokens (CI)")
    args = parser.parse_args(argv)
    if args.no_ptb:
        args.ptb = None
    if args.smoke:
        model, calibration, evaluation = _smoke_setup(seq_len=16)
    else:
        if not (args.model and args.wikitext):
            parser.error("--model and --wikitext are required (or --smoke)")
        model, calibration, evaluation = _real_setup(args)

    dense = {name: perplexity(model, data) for name, data in evaluation.items()}
    names = list(evaluation)
    print(
        f"calibration: {len(calibration)} batches x {tuple(calibration[0]['input_ids'].shape)}; eval split "
        f"{args.eval_split}; dense " + ", ".join(f"{n} {v:.2f}" for n, v in dense.items())
    )
    print(
        "| ratio | method | ranks | weighting | targeted params | " + " | ".join(names) + " | seconds | allocation s |"
    )
    print("|---|---|---|---|---|" + "---|" * len(names) + "---|---|", flush=True)
    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            for allocation in args.allocations:
                for weighting in args.weightings if allocation == "global" else ["-"]:
                    options = dict(ratio=ratio, calibration_batches=len(calibration), plots=False, evaluate=False)
                    if allocation == "global":
                        options.update(
                            rank_allocation="global",
                            allocation_weighting=weighting,
                            min_kept_fraction=args.min_kept_fraction,
                        )
                    if args.refine_steps and METHODS[method].two_stream:
                        options["refine_steps"] = args.refine_steps
                    compressed = copy.deepcopy(model)
                    tick = time.perf_counter()
                    report = METHODS[method](**options).compress(compressed, calibration, progress=False)
                    seconds = time.perf_counter() - tick
                    metrics = {name: perplexity(compressed, data) for name, data in evaluation.items()}
                    row = {
                        "ratio": ratio,
                        "method": method,
                        "rank_allocation": allocation,
                        "weighting": weighting,
                        "target_params_after": report.totals()["target_params_after"],
                        "perplexity": metrics,
                        "seconds": seconds,
                        "allocation_seconds": report.seconds.get("allocation", 0.0),
                        "ranks": {layer.name: layer.rank for layer in report.layers},
                    }
                    rows.append(row)
                    print(
                        f"| {ratio:g} | {method} | {allocation} | {weighting} | {row['target_params_after']:,} | "
                        + " | ".join(f"{metrics[n]:,.2f}" for n in names)
                        + f" | {seconds:.1f} | {row['allocation_seconds']:.1f} |",
                        flush=True,
                    )
                    del compressed
    if args.out:
        Path(args.out).write_text(json.dumps({"dense": dense, "rows": rows, "args": vars(args)}, indent=2))
    return rows


if __name__ == "__main__":
    main()
