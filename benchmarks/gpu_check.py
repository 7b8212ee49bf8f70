"""GPU check (issue 12): every calibrated surgery method on SmolLM2-135M and on two LLaMA-7B-shaped blocks.

For each method (svd_llm, aa_svd, saes_svd, saes_svd_onepass: ``true_sequential=False``, and svd_llm_tiles: the
statistics' products by ``--tile``-wide tiles (default 2048), the CPU's route) at ratio 0.2 it
prints the compression time, that time divided by one plain forward pass over the same calibration set, the peak
``torch.cuda.max_memory_allocated`` during the compression, and (SmolLM2 only) WikiText-2 test perplexity; it
writes a JSON and a markdown table naming the device. About 6 minutes on one H100 (estimate; never run on a GPU
yet).

    python benchmarks/gpu_check.py                       # $PREHAB_ASSETS/smollm2-135m, $PREHAB_DATA or ../shared/data
    python benchmarks/gpu_check.py --model PATH --data DATA_FOLDER --out gpu_check.json
    python benchmarks/gpu_check.py --cpu-smoke           # a tiny random model on the CPU, seconds (the test runs it)

Cases:
- ``smollm2``: SmolLM2-135M in float32, 32 windows of 512 tokens from WikiText-2 raw valid (seed 0),
  perplexity over the first 24 non-overlapping 512-token windows of WikiText-2 raw test (as RESULTS.md §2).
- ``llama7b_blocks``: a random Llama with LLaMA-7B's block shapes (hidden 4096, MLP 11008, 32 heads), 2 blocks,
  in ``--dtype`` (bfloat16), calibrated on 32 random windows of 512 tokens. Statistics are float32 products
  accumulated in float64, as the package always does.
- ``inference``: ``bench_inference.py`` on the device: SmolLM2-135M (float32) with every block Linear low-rank at
  20 / 40 / 60% removed, and at 40% with the LM head untied and factorized too, against dense: prefill of 1x512
  (all logits, and the last position's as ``generate`` runs a prompt), 8x512, and greedy decode per token
  (writes ``inference.md`` beside ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# name -> (callback, extra arguments); *_onepass: true_sequential=False (one compressed-stream pass per block)
METHODS = {
    "svd_llm": ("svd_llm", {}),
    "aa_svd": ("aa_svd", {}),
    "saes_svd": ("saes_svd", {}),
    "saes_svd_onepass": ("saes_svd", {"true_sequential": False}),
    "svd_llm_tiles": ("svd_llm", {}),
}
# *_tiles: the statistics' products by ``--tile``-wide tiles (the CPU's route; on a GPU the package
# keeps one product per batch until this comparison says otherwise)
TILED = {"svd_llm_tiles"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_llama(hidden: int, mlp: int, heads: int, blocks: int, vocab: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        torch_dtype=dtype,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def _random_windows(count: int, seq_len: int, vocab: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (count, seq_len), generator=generator)
    return [{"input_ids": ids[i : i + batch_size]} for i in range(0, count, batch_size)]


def _cases(args: argparse.Namespace) -> list[dict]:
    """(name, model on CPU, calibration batches, test batches or None) per case."""
    if args.cpu_smoke:
        model = _random_llama(64, 128, 4, 2, 128, torch.float32)
        calibration = _random_windows(4, 32, 128, 2)
        return [{"name": "tiny_llama_smoke", "model": model, "calibration": calibration, "test": calibration}]
    cases = []
    if "smollm2" in args.cases:
        from transformers import AutoModelForCausalLM

        from prehab.datamodules import WikiText

        for what, path in (("--model", args.model), ("--data", args.data)):
            if not Path(path).exists():
                sys.exit(f"gpu_check: {what} {path} does not exist; pass {what} or set PREHAB_ASSETS/PREHAB_DATA.")
        data = WikiText(
            dataset=args.data,
            tokenizer=args.model,
            seq_len=args.seq_len,
            train_split="valid",
            calibration_split="valid",
            calibration_samples=args.calibration_samples,
            max_eval_windows=args.eval_windows,
            batch_size=args.batch_size,
            seed=0,
        )
        data.setup("test")
        calibration = [{"input_ids": b["input_ids"]} for b in data.calibration_dataloader()]
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        cases.append({"name": "smollm2", "model": model, "calibration": calibration, "test": data.test_dataloader()})
    if "llama7b_blocks" in args.cases:
        dtype = getattr(torch, args.dtype)
        model = _random_llama(4096, 11008, 32, 2, 32000, dtype).eval()
        calibration = _random_windows(args.calibration_samples, args.seq_len, 32000, args.batch_size)
        cases.append({"name": "llama7b_blocks", "model": model, "calibration": calibration, "test": None})
    return cases


def _forward_seconds(model, batches, device) -> float:
    from prehab.stats import calibration_forward_context

    with calibration_forward_context(model):
        model(**batches[0])  # warm-up (kernels, allocator)
        _sync(device)
        tick = time.perf_counter()
        for batch in batches:
            model(**batch)
        _sync(device)
    return time.perf_counter() - tick


def _inference(args: argparse.Namespace, device: torch.device) -> str:
    """Prefill and decode latency, low-rank against dense, on ``device`` (bench_inference.py's measurement)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_inference

    if not args.cpu_smoke and not Path(args.model).exists():
        sys.exit(f"gpu_check: --model {args.model} does not exist; pass --model or set PREHAB_ASSETS.")
    options = argparse.Namespace(
        model=args.model, ratios=[0.2, 0.4, 0.6], module_calls=[], lm_head=[0.4], prefill_tokens=args.seq_len,
        prefill_batches=[1, 8], prompt_tokens=32, new_tokens=64, repeats=5, breakdown=False, smoke=args.cpu_smoke,
        device=str(device), command="python benchmarks/gpu_check.py (case inference)",
    )
    if args.cpu_smoke:
        options.prefill_tokens, options.prefill_batches, options.prompt_tokens = 16, [1, 2], 4
        options.new_tokens, options.repeats = 4, 2
    out = Path(args.out).parent
    out.mkdir(parents=True, exist_ok=True)
    return bench_inference.write_report(bench_inference.run(options), options, out, stem="inference")


def _run(case: dict, args: argparse.Namespace, device: torch.device) -> list[dict]:
    from prehab import LowRankLinear, stats
    from prehab.callbacks import METHODS as CALLBACKS
    from prehab.evaluation import perplexity

    dense = case["model"].to(device)
    calibration = [{k: v.to(device) for k, v in b.items()} for b in case["calibration"]]
    forward = _forward_seconds(dense, calibration, device)
    dtype = next(dense.parameters()).dtype
    rows = []
    dense_ppl = None
    if case["test"] is not None:
        dense_ppl = perplexity(dense, case["test"], device=device)
    print(f"[{case['name']}] {dtype}, one plain forward over the calibration set: {forward:.2f} s", flush=True)
    for method in args.methods:
        model = copy.deepcopy(dense)
        name, extra = METHODS[method]
        callback = CALLBACKS[name](ratio=args.ratio, calibration_batches=len(calibration), plots=False, **extra)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        default_tile = stats.TILE_WIDTH.get(device.type, 0)
        with stats.tile_width(args.tile if method in TILED else default_tile, device.type):
            _sync(device)
            tick = time.perf_counter()
            callback.compress(model, calibration, progress=False)
            _sync(device)
            seconds = time.perf_counter() - tick
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        row = {
            "case": case["name"],
            "method": method,
            "ratio": args.ratio,
            "dtype": str(dtype).removeprefix("torch."),
            "seconds": seconds,
            "forward_seconds": forward,
            "vs_forward": seconds / forward,
            "peak_allocated_mib": None if peak is None else peak / 2**20,
            "allocated_before_mib": None if peak is None else before / 2**20,
            "lowrank_layers": sum(isinstance(m, LowRankLinear) for m in model.modules()),
            "factor_dtypes": sorted({str(p.dtype) for m in model.modules() if isinstance(m, LowRankLinear)
                                     for p in m.parameters()}),
            "perplexity": None if case["test"] is None else perplexity(model, case["test"], device=device),
            "dense_perplexity": dense_ppl,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    case["model"] = dense.cpu()  # frees the device for the next case
    return rows


def _table(device_name: str, rows: list[dict]) -> str:
    lines = [
        f"Device: {device_name}, torch {torch.__version__}",
        "",
        "| case | method | dtype | ratio | compression (s) | / plain forward | peak allocated (MiB) "
        "| WikiText-2 test ppl (dense) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "-" if r["peak_allocated_mib"] is None else f"{r['peak_allocated_mib']:,.0f}"
        ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.2f} ({r['dense_perplexity']:.2f})"
        lines.append(
            f"| {r['case']} | {r['method']} | {r['dtype']} | {r['ratio']:g} | {r['seconds']:.1f} "
            f"| {r['vs_forward']:.2f}x | {peak} | {ppl} |"
        )
    return "\n".join(lines)


def main() -> None:
    assets = os.environ.get("PREHAB_ASSETS")
    data_root = os.environ.get("PREHAB_DATA") or str(REPO.parent / "shared" / "data")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(assets) / "smollm2-135m") if assets else "smollm2-135m")
    parser.add_argument("--data", default=str(Path(data_root) / "wikitext-2-raw"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--cases", nargs="+", default=["smollm2", "llama7b_blocks", "inference"],
                        choices=["smollm2", "llama7b_blocks", "inference"])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="dtype of the LLaMA-7B-shaped blocks")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "gpu_check.json"))
    parser.add_argument("--tile", type=int, default=2048, help="tile width of the *_tiles methods' Gram products")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny random model on the CPU (seconds)")
    args = parser.parse_args()

    if args.cpu_smoke:
        args.tile = 16  # narrower than the tiny model's 64 features, so the tiles are exercised
        device, device_name = torch.device("cpu"), "CPU (smoke test)"
    elif not torch.cuda.is_available():
        print("gpu_check needs CUDA and none is available (torch.cuda.is_available() is False). Run it on a "
              "machine with a GPU, or pass --cpu-smoke for a seconds-long check of the script on a tiny model.")
        sys.exit(2)
    else:
        device, device_name = torch.device("cuda"), torch.cuda.get_device_name(0)
    rows = []
    for case in _cases(args):
        rows += _run(case, args, device)
    latency = _inference(args, device) if "inference" in args.cases else None
    result = {"device": device_name, "torch": torch.__version__, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print(_table(device_name, rows))
    if latency:
        print("\n" + latency)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
