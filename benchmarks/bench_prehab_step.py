"""Training-step time of PrehabModule with the rank penalty against without it (λ = 0), same model and batch.

    python ../shared/tools/fetch_models.py --only smollm2                 # once
    python benchmarks/bench_prehab_step.py --model $PREHAB_ASSETS/smollm2-135m --data ../shared/data/wikitext-2-raw

The whitening factors are collected once (not timed); each timed step is forward + backward + optimizer
step, as Lightning runs it (manual loop over `training_step` here to time steps without the Trainer's
logging). Goal: <= 1.2x for the sketched stable rank.
"""

from __future__ import annotations

import argparse
import time

import torch

from prehab.calibration import collect_input_covariances
from prehab.datamodules import WikiText
from prehab.linalg import damped_cholesky
from prehab.module import PrehabModule


def _step_seconds(module: PrehabModule, batch: dict, steps: int) -> float:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    module.train()
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss, _, _ = module.task_loss(batch)
        if module.lam > 0:
            penalty, _ = module.penalty()
            loss = loss + module.lam * penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    data = WikiText(
        dataset=args.data,
        tokenizer=args.model,
        seq_len=args.seq_len,
        train_split="valid",
        calibration_samples=8,
        batch_size=args.batch_size,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rows = ["| regularizer | λ | penalty_fraction | step (s) | vs λ = 0 |", "|---|---|---|---|---|"]
    baseline = None
    settings = (("stable_rank", 0.0, 1.0), ("stable_rank", 1e-3, 1.0), ("stable_rank", 1e-3, 0.25), ("tail", 1e-3, 1.0))
    for regularizer, lam, fraction in settings:
        torch.manual_seed(0)
        module = PrehabModule(
            model=args.model, lam=lam, regularizer=regularizer, tail_ratio=0.4, penalty_fraction=fraction
        )
        if lam > 0:
            targets = {n: module.model.get_submodule(n) for n in module.target_names}
            covariances, _ = collect_input_covariances(
                module.model, targets, data.calibration_dataloader(), 2, progress=False
            )
            for name in module.target_names:
                factor = damped_cholesky(covariances[name]).factor.float()
                module.whitening.register_buffer(module._buffer_name(name), factor)
        seconds = _step_seconds(module, batch, args.steps)
        baseline = baseline or seconds
        name = regularizer if lam else "(none)"
        rows.append(f"| {name} | {lam:g} | {fraction:g} | {seconds:.2f} | {seconds / baseline:.2f}x |")
        del module
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch_size} x {args.seq_len} "
        f"tokens; median of {args.steps} steps after one warm-up\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
