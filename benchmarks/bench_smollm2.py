"""Real-model check and two-stream cost: SmolLM2-135M on WikiText-2, every surgery method.

The DESIGN's reference point: 32 calibration windows of 512 tokens drawn at random from WikiText-2 raw
valid, perplexity over the first 24 non-overlapping 512-token windows of WikiText-2 raw test (dense 32.6;
SVD-LLM ≈ 124 at 20% removed, ≈ 384 at 40%; plain SVD above 1e7).

    python ../shared/tools/fetch_models.py --only smollm2          # once: writes $PREHAB_ASSETS/smollm2-135m
    python benchmarks/bench_smollm2.py --model $PREHAB_ASSETS/smollm2-135m --data ../shared/data/wikitext-2-raw

For each method it reports perplexity, compression wall time divided by the time of one plain forward pass
over the same calibration set, and the peak resident memory during compression above the dense model's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import threading
import time

import psutil
import torch
from transformers import AutoModelForCausalLM

from prehab import stats, untie_output_embeddings
from prehab.callbacks import AASVD, SAESSVD, SVD, SVDLLM
from prehab.datamodules import PTB, WikiText
from prehab.evaluation import perplexity
from prehab.stats import calibration_forward_context

METHODS = {
    "svd": lambda r, n: SVD(ratio=r, calibration_batches=n),
    "svd_llm": lambda r, n: SVDLLM(ratio=r, calibration_batches=n),
    # One-stream statistics block by block instead of all layers' at once (issue 12).
    "svd_llm_blockwise": lambda r, n: SVDLLM(ratio=r, calibration_batches=n, statistics_budget_gb=0),
    "svd_llm_propagate": lambda r, n: SVDLLM(ratio=r, calibration_batches=n, propagate=True),
    # the LM head too, untied from the embeddings first (issue 12, item 5: what decode latency gains from it)
    "svd_llm_head": lambda r, n: SVDLLM(ratio=r, calibration_batches=n, targets=[r"^model\.layers\.", r"^lm_head$"]),
    # ridge=0: the papers' exact closed forms, as measured in README / RESULTS §2 (AA-SVD defaults to ridge=0.1)
    "aa_svd": lambda r, n: AASVD(ratio=r, calibration_batches=n, ridge=0.0),
    "saes_svd": lambda r, n: SAESSVD(ratio=r, calibration_batches=n, ridge=0.0),
    # dense_cache_gb=0: the dense block rerun for every group of layers, as before the dense-input cache (issue 12)
    "aa_svd_rerun": lambda r, n: AASVD(ratio=r, calibration_batches=n, ridge=0.0, dense_cache_gb=0),
    "saes_svd_rerun": lambda r, n: SAESSVD(ratio=r, calibration_batches=n, ridge=0.0, dense_cache_gb=0),
    # true_sequential=False: one compressed-stream pass per block for all its groups (GPTQ's option; issue 12)
    "aa_svd_onepass": lambda r, n: AASVD(ratio=r, calibration_batches=n, ridge=0.0, true_sequential=False),
    "saes_svd_onepass": lambda r, n: SAESSVD(ratio=r, calibration_batches=n, ridge=0.0, true_sequential=False),
    # whitening with the compressed model's inputs only (no anchoring to the dense outputs), one pass per block
    "svd_llm_propagate_onepass": lambda r, n: SVDLLM(
        ratio=r, calibration_batches=n, propagate=True, true_sequential=False
    ),
    # AA-SVD with the callback's default ridge (0.1), exact and one pass per block
    "aa_svd_ridge": lambda r, n: AASVD(ratio=r, calibration_batches=n),
    "aa_svd_ridge_onepass": lambda r, n: AASVD(ratio=r, calibration_batches=n, true_sequential=False),
}
# "<method>_single": the statistics' Gram products as one product per batch, as before the tiles (issue 12)
METHODS.update({f"{name}_single": METHODS[name] for name in ("svd_llm", "aa_svd", "saes_svd")})


class PeakRSS:
    """Samples this process's resident memory every 50 ms while active."""

    def __init__(self) -> None:
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face folder of SmolLM2-135M")
    parser.add_argument("--data", required=True, help="folder with wiki.valid.raw and wiki.test.raw")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="calibration draw (the windows drawn from valid)")
    parser.add_argument("--ptb", help="PTB folder (../shared/data/ptb): adds PTB test perplexity (out of domain)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = WikiText(
        dataset=args.data,
        tokenizer=args.model,
        seq_len=args.seq_len,
        train_split="valid",
        calibration_split="valid",
        calibration_samples=args.calibration_samples,
        max_eval_windows=args.eval_windows,
        batch_size=4,
        seed=args.seed,
    )
    data.setup("test")
    calibration = list(data.calibration_dataloader())
    test = data.test_dataloader()
    ptb = None
    if args.ptb:
        ptb = PTB(dataset=args.ptb, tokenizer=args.model, seq_len=args.seq_len).windows("test", args.eval_windows)
        ptb = ptb.as_tensor()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    start = time.perf_counter()
    with calibration_forward_context(model):
        for batch in calibration:
            model(input_ids=batch["input_ids"])
    forward_seconds = time.perf_counter() - start
    dense_ppl = perplexity(model, test)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {sum(p.numel() for p in model.parameters()):,} "
        f"params; calibration {len(calibration)} batches x {calibration[0]['input_ids'].shape}; "
        f"protocol {data.eval_protocol('test')}"
    )
    print(f"dense perplexity {dense_ppl:.2f}; one plain forward over the calibration set: {forward_seconds:.1f} s\n")
    print(
        "| method | ratio | perplexity | compression (s) | / plain forward | peak RSS above start (MiB) "
        "| dense model (MiB) | calibration (s) | calibration / plain forward | parameters |"
        + (" PTB |" if ptb is not None else "")
    )
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ptb is not None else ""))
    params = sum(p.numel() for p in model.parameters())

    def ptb_cell(m: torch.nn.Module) -> str:
        return "" if ptb is None else f" {perplexity(m, ptb, batch_size=4):,.2f} |"

    print(f"| dense | - | {dense_ppl:.2f} | - | - | - | {dense_bytes / 2**20:.0f} | - | - | {params / 1e6:.1f} M |"
          + ptb_cell(model), flush=True)
    for ratio in args.ratios:
        for name in args.methods:
            compressed = copy.deepcopy(model)
            if name.endswith("_head"):
                untie_output_embeddings(compressed)
            callback = METHODS[name](ratio, len(calibration))
            tiles = stats.tile_width(0) if name.endswith("_single") else contextlib.nullcontext()
            with tiles, PeakRSS() as memory:
                tick = time.perf_counter()
                callback.compress(compressed, calibration, progress=False)
                seconds = time.perf_counter() - tick
            ppl = perplexity(compressed, test)
            calibration_seconds = callback.report.seconds["calibration"]  # without the solver's time
            print(
                f"| {name} | {ratio:g} | {ppl:,.2f} | {seconds:.1f} | {seconds / forward_seconds:.2f}x "
                f"| {(memory.peak - memory.start) / 2**20:.0f} | {dense_bytes / 2**20:.0f} "
                f"| {calibration_seconds:.1f} | {calibration_seconds / forward_seconds:.2f}x "
                f"| {sum(p.numel() for p in compressed.parameters()) / 1e6:.1f} M |" + ptb_cell(compressed),
                flush=True,
            )
            del compressed


if __name__ == "__main__":
    main()
