"""Surgery-core benchmark: solver time vs a plain SVD, and one-stream calibration time vs a plain forward.

    python benchmarks/bench_surgery.py            # full sizes (768x3072 and 4096x4096; a few minutes on 2 cores)
    python benchmarks/bench_surgery.py --smoke    # tiny sizes, seconds (what CI could run)

Prints markdown tables. All ratios are measured in the same run, back to back.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

from prehab.callbacks import SVDLLM
from prehab.linalg import rank_from_ratio, solve_lowrank
from prehab.stats import calibration_forward_context


def _timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_solver(shapes: list[tuple[int, int]], ratio: float, repeats: int) -> list[str]:
    rows = [
        "| layer (out x in) | rank | torch.linalg.svd fp32 (s) | SVD-LLM solve, fp64 (s) | ratio "
        "| plain SVD solve (s) |",
        "|---|---|---|---|---|---|",
    ]
    for out_features, in_features in shapes:
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
        mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5
        x = torch.randn(2 * in_features, in_features, generator=g) @ mix  # correlated inputs, full rank
        covariance = (x.T.double() @ x.double()) / len(x)
        rank = rank_from_ratio(out_features, in_features, ratio)
        t_svd = _timed(lambda w=weight: torch.linalg.svd(w, full_matrices=False), repeats)
        t_solve = _timed(lambda w=weight, r=rank, h=covariance: solve_lowrank(w, r, whitening=h), repeats)
        t_plain = _timed(lambda w=weight, r=rank: solve_lowrank(w, r), repeats)
        rows.append(
            f"| {out_features}x{in_features} | {rank} | {t_svd:.2f} | {t_solve:.2f} | {t_solve / t_svd:.2f}x "
            f"| {t_plain:.2f} |"
        )
    return rows


def bench_calibration(hidden: int, layers: int, batches: int, batch_size: int, seq_len: int) -> list[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=seq_len,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    data = [{"input_ids": torch.randint(3, 4096, (batch_size, seq_len))} for _ in range(batches)]

    def forward_only():
        with calibration_forward_context(model):
            for batch in data:
                model(**batch)

    forward_only()  # warm-up
    t_forward = _timed(forward_only, 2)
    callback = SVDLLM(ratio=0.4, calibration_batches=batches)
    report = callback.compress(copy.deepcopy(model), data, progress=False)
    t_cal, t_fact = report.seconds["calibration"], report.seconds["factorization"]
    params = sum(p.numel() for p in model.parameters())
    return [
        "| model | calibration tokens | plain forward (s) | SVD-LLM calibration (s) | calibration / forward "
        "| factorization (s) | total / forward |",
        "|---|---|---|---|---|---|---|",
        f"| Llama {layers}x{hidden} ({params / 1e6:.1f}M) | {batches * batch_size * seq_len:,} | {t_forward:.2f} "
        f"| {t_cal:.2f} | {t_cal / t_forward:.2f}x | {t_fact:.2f} | {report.seconds['total'] / t_forward:.2f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    if args.smoke:
        solver = bench_solver([(64, 256), (256, 256)], 0.4, 1)
        calibration = bench_calibration(hidden=64, layers=2, batches=4, batch_size=2, seq_len=64)
    else:
        solver = bench_solver([(768, 3072), (3072, 768), (4096, 4096)], 0.4, 2)
        calibration = bench_calibration(hidden=512, layers=8, batches=16, batch_size=4, seq_len=256)
    print("\n## Solver time per layer (float32 weight in, float64 factorization)\n")
    print("\n".join(solver))
    print("\n## One-stream compression vs a plain forward over the same calibration batches\n")
    print("\n".join(calibration))


if __name__ == "__main__":
    main()
