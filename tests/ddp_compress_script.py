"""Run by test_ddp.py as `python ddp_compress_script.py OUT_DIR`: two CPU ranks (gloo) compress the same model.

Rank r calibrates on batches r, r+2, ... of the same loader; statistics are all-reduced, so every rank
must end with identical factors, equal to a single process calibrating on all batches.
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TinyModule, fast_trainer, loader_for  # noqa: E402

from prehab import stats  # noqa: E402
from prehab.callbacks import AASVD, SAESSVD, SVDLLM  # noqa: E402


def main(out: Path) -> None:
    loader = loader_for("llama", n=32, batch_size=4, seed=5)
    module = TinyModule("llama")
    dense = copy.deepcopy(module)
    callback = SAESSVD(ratio=0.5, calibration_batches=8, calibration_dataloader=loader)
    trainer = fast_trainer(callbacks=[callback], max_steps=0, strategy="ddp", devices=2)
    trainer.fit(module, train_dataloaders=loader)
    rank, world = trainer.global_rank, trainer.world_size
    states = {"saes_svd": module.state_dict()}
    for other in (AASVD(ratio=0.5, calibration_batches=8), SVDLLM(ratio=0.5, calibration_batches=8)):
        copy_ = copy.deepcopy(dense)
        other.compress(copy_, loader, rank=rank, world_size=world, progress=False)
        states[other.method] = copy_.state_dict()
    # one-stream statistics block by block (statistics_budget_gb=0), all-reduced per block
    copy_ = copy.deepcopy(dense)
    blockwise = SVDLLM(ratio=0.5, calibration_batches=8, statistics_budget_gb=0)
    blockwise.compress(copy_, loader, rank=rank, world_size=world, progress=False)
    states["svd_llm_blockwise"] = copy_.state_dict()
    # the statistics by 5x5 tiles (the CPU's default tile is wider than tiny models' inputs)
    with stats.tile_width(5):
        for name, tiled in (("svd_llm_tiles", SVDLLM), ("saes_svd_tiles", SAESSVD)):
            copy_ = copy.deepcopy(dense)
            tiled(ratio=0.5, calibration_batches=8).compress(copy_, loader, rank=rank, world_size=world, progress=False)
            states[name] = copy_.state_dict()
    # global rank allocation (its one-stream pass all-reduced) and block refinement (gradients all-reduced)
    refined = AASVD(ratio=0.5, calibration_batches=8, rank_allocation="global", refine_steps=1, refine_lr=1e-3)
    copy_ = copy.deepcopy(dense)
    refined.compress(copy_, loader, rank=rank, world_size=world, progress=False)
    states["aa_svd_global_refined"] = copy_.state_dict()
    torch.save(
        {"states": states, "world": world, "samples": callback.report.calibration_samples}, out / f"rank{rank}.pt"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
