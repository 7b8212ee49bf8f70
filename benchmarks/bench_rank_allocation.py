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
import sys
import time
from pathlib import Path

import torch

from prehab.callbacks import AASVD, SAESSVD, SVDLLM
from prehab.evaluation import perplexity
from prehab.refine import DEFAULT_REFINE_LR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Rows, spread  # noqa: E402

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
    base = torch.arange(seq_len) * 7 % 120 + 3

    def windows(n: int, seed: int) -> torch.Tensor:
        return (base + torch.randint(0, 11, (n, 1), generator=torch.Generator().manual_seed(seed))) % 128

    def calibration(draw: int) -> list[dict[str, torch.Tensor]]:
        return [{"input_ids": windows(4, seed=100 * draw + i)} for i in range(2)]

    return model, calibration, {"wikitext": windows(4, seed=-1), "ptb": windows(4, seed=-2)}


def _real_setup(args):
    from transformers import AutoModelForCausalLM

    from prehab.datamodules import PTB, WikiText

    common = dict(tokenizer=args.model, seq_len=args.seq_len, max_eval_windows=args.eval_windows)

    def wikitext(seed: int) -> WikiText:
        module = WikiText(
            dataset=args.wikitext,
            train_split="valid",
            calibration_split="valid",
            val_split="valid",
            test_split=args.eval_split,
            calibration_samples=args.calibration_samples,
            batch_size=4,
            seed=seed,
            **common,
        )
        module.setup("test")
        return module

    def calibration(draw: int) -> list[dict[str, torch.Tensor]]:
        # Draw d: windows at offsets seeded by d, the same for every method, ratio and allocation.
        return list(wikitext(draw).calibration_dataloader())

    evaluation = {"wikitext": wikitext(0).test_dataloader()}
    if args.ptb:
        ptb = PTB(
            dataset=args.ptb,
            train_split="valid",
            calibration_split="valid",
            test_split=args.eval_split,
            seed=0,
            **common,
        )
        ptb.setup("test")
        evaluation["ptb"] = ptb.test_dataloader()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    return model, calibration, evaluation


def _variants(args) -> list[tuple[str, str, int]]:
    """(allocation, weighting, refine_steps) rows per (method, ratio); refinement on top of the last allocation."""
    variants = [(a, w, 0) for a in args.allocations for w in (args.weightings if a == "global" else ["-"])]
    if args.refine_steps:
        allocation, weighting, _ = variants[-1]
        variants.append((allocation, weighting, args.refine_steps))
    return variants


def _report(rows: list[dict], dense: dict[str, float], names: list[str], args) -> str:
    """Mean ± half-range over the draws, and each row's perplexity over uniform's on the same draw (paired)."""
    lines = [
        "Dense: " + ", ".join(f"{n} {v:.2f}" for n, v in dense.items()) + f"; eval split `{args.eval_split}`, "
        f"{args.eval_windows} windows of {args.seq_len} tokens; {args.calibration_samples} calibration windows "
        "per draw.",
        "",
        "| ratio | method | ranks | weighting | refine | targeted params | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{n} / uniform" for n in names)
        + " | surgery s | allocation s |",
        "|---|---|---|---|---|---|" + "---|" * (2 * len(names)) + "---|---|",
    ]
    for ratio in args.ratios:
        for method in args.methods:
            uniform = {
                r["draw"]: r
                for r in rows
                if (r["ratio"], r["method"], r["rank_allocation"]) == (ratio, method, "uniform")
            }
            for allocation, weighting, refine in _variants(args):
                if refine and not METHODS[method].two_stream:
                    continue
                mine = [
                    r
                    for r in rows
                    if (r["ratio"], r["method"], r["rank_allocation"], r["weighting"], r["refine_steps"])
                    == (ratio, method, allocation, weighting, refine)
                ]
                if not mine:
                    continue
                cells = [spread([r["perplexity"][n] for r in mine], 2) for n in names]
                paired = []
                for n in names:
                    quotients = [
                        r["perplexity"][n] / uniform[r["draw"]]["perplexity"][n] for r in mine if r["draw"] in uniform
                    ]
                    baseline = allocation == "uniform" and not refine
                    if baseline or not quotients:  # no uniform row of the same draw: nothing to pair with
                        paired.append("1" if baseline else "-")
                    else:
                        mean = sum(quotients) / len(quotients)
                        paired.append(f"{mean:.3f} [{min(quotients):.3f}, {max(quotients):.3f}]")
                lines.append(
                    f"| {ratio:g} | {method} | {allocation} | {weighting} | "
                    f"{f'{refine} (lr {args.refine_lr:g})' if refine else 0} | "
                    f"{mine[0]['target_params_after']:,} | "
                    + " | ".join(cells)
                    + " | "
                    + " | ".join(paired)
                    + f" | {sum(r['seconds'] for r in mine) / len(mine):.0f} | "
                    f"{sum(r['allocation_seconds'] for r in mine) / len(mine):.1f} |"
                )
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--weightings", nargs="+", default=["equal"], choices=["equal", "relative", "raw"])
    parser.add_argument("--min-kept-fraction", type=float, default=0.1)
    parser.add_argument(
        "--refine-steps", type=int, default=0, help="add a row per two-stream method: the last allocation + refinement"
    )
    parser.add_argument("--refine-lr", type=float, default=DEFAULT_REFINE_LR)
    parser.add_argument("--draws", type=int, default=1, help="calibration draws (seeds 0..N-1), same for every row")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--out", help="folder: rows.jsonl (resumable: finished rows are skipped), results.md/json")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, random tokens (CI)")
    parser.add_argument("--report-only", action="store_true", help="only tabulate the rows already in --out")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_ptb:
        args.ptb = None
    if args.smoke:
        model, calibration, evaluation = _smoke_setup(seq_len=16)
    else:
        if not (args.model and args.wikitext):
            parser.error("--model and --wikitext are required (or --smoke)")
        model, calibration, evaluation = _real_setup(args)

    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    store = Rows(out / "rows.jsonl") if out else Rows(Path("/dev/null"))
    names = list(evaluation)
    dense_key = f"{args.eval_split}|dense|{','.join(names)}"
    if dense_key not in store:
        row = {"key": dense_key, "perplexity": {name: perplexity(model, data) for name, data in evaluation.items()}}
        if out:
            store.add(row)
        store.rows[dense_key] = row
    dense = store.rows[dense_key]["perplexity"]
    print(f"eval split {args.eval_split}; dense " + ", ".join(f"{n} {v:.2f}" for n, v in dense.items()))
    print(
        "| draw | ratio | method | ranks | weighting | refine | targeted params | " + " | ".join(names) + " | seconds |"
    )
    print("|---|---|---|---|---|---|---|" + "---|" * len(names) + "---|", flush=True)
    rows = []
    for draw in range(args.draws):  # whole draws first, so an interrupted run still pairs
        loader = None
        for method in args.methods:
            shared: dict = {}  # one-stream statistics and spectra of this draw, shared by ratios and allocations
            for ratio in args.ratios:
                for allocation, weighting, refine in _variants(args):
                    if refine and not METHODS[method].two_stream:
                        continue
                    key = f"{args.eval_split}|{draw}|{ratio:g}|{method}|{allocation}|{weighting}|{refine}"
                    key += f"@{args.refine_lr:g}" if refine else ""
                    if key in store:
                        rows.append(store.rows[key])
                        continue
                    if args.report_only:
                        continue
                    loader = loader if loader is not None else calibration(draw)
                    # ridge=0: the papers' exact closed forms, as in RESULTS §8 (the callbacks default to a ridge)
                    options = dict(ratio=ratio, calibration_batches=len(loader), plots=False, evaluate=False,
                                   ridge=0.0)
                    if allocation == "global":
                        options.update(
                            rank_allocation="global",
                            allocation_weighting=weighting,
                            min_kept_fraction=args.min_kept_fraction,
                        )
                    if refine:
                        options.update(refine_steps=refine, refine_lr=args.refine_lr)
                    compressed = copy.deepcopy(model)
                    tick = time.perf_counter()
                    report = METHODS[method](**options).compress(
                        compressed, loader, shared_statistics=shared, progress=False
                    )
                    seconds = time.perf_counter() - tick
                    metrics = {name: perplexity(compressed, data) for name, data in evaluation.items()}
                    row = {
                        "key": key,
                        "draw": draw,
                        "ratio": ratio,
                        "method": method,
                        "rank_allocation": allocation,
                        "weighting": weighting,
                        "refine_steps": refine,
                        "refine_lr": args.refine_lr if refine else None,
                        "target_params_after": report.totals()["target_params_after"],
                        "perplexity": metrics,
                        "seconds": seconds,
                        "allocation_seconds": report.seconds.get("allocation", 0.0),
                        "refinement_seconds": report.seconds.get("refinement", 0.0),
                        "ranks": {layer.name: layer.rank for layer in report.layers},
                    }
                    rows.append(row)
                    if out:
                        store.add(row)
                    print(
                        f"| {draw} | {ratio:g} | {method} | {allocation} | {weighting} | {refine} | "
                        f"{row['target_params_after']:,} | "
                        + " | ".join(f"{metrics[n]:,.2f}" for n in names)
                        + f" | {seconds:.1f} |",
                        flush=True,
                    )
                    del compressed
    table = _report(rows, dense, names, args)
    print(table)
    if out:
        (out / "results.md").write_text(table)
        (out / "results.json").write_text(json.dumps({"dense": dense, "rows": rows, "args": vars(args)}, indent=2))
    return rows


if __name__ == "__main__":
    main()
