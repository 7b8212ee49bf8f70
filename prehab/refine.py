"""Block-level refinement of low-rank factors (AA-SVD's post-compression refinement), no Lightning.

After a block's layers are factorized, a few optimizer passes over the calibration batches already in
memory adjust that block's factors (``up``/``down`` weights only; biases, norms and everything else stay
frozen) to minimize the block-output error against the original stream:

    Σ_b ‖block(X_b) − block'(X̂_b)‖² / Σ_b ‖block(X_b)‖²

``X_b`` are the block's inputs in the dense model, ``X̂_b`` in the partially compressed one; no labels and
no forward beyond the block. Optimizer: Adam (``lr`` default 3e-4, no weight decay), one step per
calibration batch, ``steps`` passes over the batches; Adam's per-parameter step size does not depend on
the scale of the factors, which differs a lot between layers. The factors are kept only if the error over
all batches went down (measured before and after with the same forward), so refinement never makes a
block worse on its calibration data. Under DDP the gradients and the errors are summed over ranks, so
every rank takes the same steps and ends with the same factors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prehab.stats import all_reduce_sum_

__all__ = ["DEFAULT_REFINE_LR", "BlockRefinement", "refine_block"]

# Chosen on WikiText-2 valid with SmolLM2-135M (benchmarks/RESULTS.md §8): 1e-4 and 1e-3 both refined less.
DEFAULT_REFINE_LR = 3e-4


@dataclass
class BlockRefinement:
    """What refining one block did: its relative output error before and after, and the time it took."""

    block: str
    steps: int  # optimizer steps taken
    error_before: float
    error_after: float  # the error of the factors kept (== error_before when the refined ones were worse)
    kept: bool  # False: the refined factors were not better and were put back
    seconds: float


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _error(run: Callable[[int], Tensor], target: Callable[[int], Tensor], batches: int, device) -> float:
    """Relative block-output error over all batches (and ranks), without gradients."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for index in range(batches):
            reference = target(index).double()
            sums[0] += (run(index).double() - reference).pow(2).sum()
            sums[1] += reference.pow(2).sum()
    all_reduce_sum_([sums])
    return float(sums[0] / sums[1]) if sums[1] > 0 else 0.0


def refine_block(
    block: nn.Module,
    parameters: list[nn.Parameter],
    run: Callable[[int], Tensor],
    target: Callable[[int], Tensor],
    batches: int,
    steps: int,
    lr: float = DEFAULT_REFINE_LR,
    name: str = "",
) -> BlockRefinement:
    """Adam on ``parameters`` (a block's factors) for ``steps`` passes over ``batches`` calibration batches.

    Args:
        block: the block; every parameter of it not in ``parameters`` is frozen for the duration.
        parameters: the factors to refine.
        run: ``run(b)`` is the compressed block's hidden output on batch ``b`` of the shifted stream.
        target: ``target(b)`` is the dense block's output on batch ``b`` of the original stream.
        batches: number of calibration batches on this rank (under DDP: the same number of steps is
            taken on every rank, the smallest count, each rank cycling over its own batches).
        steps: passes over the batches; 0 returns at once.
        lr: Adam's learning rate.
        name: the block's name, for the report.
    """
    started = time.perf_counter()
    device = parameters[0].device if parameters else torch.device("cpu")
    if steps == 0 or not parameters or batches == 0:
        return BlockRefinement(name, 0, float("nan"), float("nan"), False, 0.0)
    count = torch.tensor([batches], device=device)
    if _world() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
    per_pass = int(count.item())
    before = _error(run, target, batches, device)
    saved = [p.detach().clone() for p in parameters]
    training = {id(p) for p in parameters}
    flags = {p: p.requires_grad for p in block.parameters()}
    try:
        for p in block.parameters():
            p.requires_grad_(id(p) in training)
        for p in parameters:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(parameters, lr=lr)
        taken = 0
        with torch.enable_grad():
            for _ in range(steps):
                for index in range(per_pass):
                    reference = target(index)
                    output = run(index)
                    loss = (output - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30)
                    optimizer.zero_grad(set_to_none=False)
                    loss.backward()
                    if _world() > 1:
                        grads = [p.grad for p in parameters]
                        all_reduce_sum_(grads)
                        for grad in grads:
                            grad.div_(_world())
                    optimizer.step()
                    taken += 1
        for p in parameters:
            p.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    after = _error(run, target, batches, device)
    kept = after < before
    if not kept:
        with torch.no_grad():
            for p, value in zip(parameters, saved, strict=True):
                p.copy_(value)
        after = before
    return BlockRefinement(name, taken, before, after, kept, time.perf_counter() - started)
