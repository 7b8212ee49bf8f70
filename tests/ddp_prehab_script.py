"""Run by test_ddp.py: prehab (PrehabModule) on two CPU ranks (gloo), then SVD-LLM surgery at fit end."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import fast_trainer, tiny_llama  # noqa: E402
from test_module import Bytes  # noqa: E402

from prehab.callbacks import SVDLLM  # noqa: E402
from prehab.module import PrehabModule  # noqa: E402


def main(out: Path) -> None:
    torch.manual_seed(0)
    module = PrehabModule(model=tiny_llama(), lam=0.05, regularizer="stable_rank", calibration_batches=4, lr=1e-3)
    callback = SVDLLM(ratio=0.5, calibration_batches=4)
    trainer = fast_trainer(
        callbacks=[callback], max_steps=3, strategy="ddp", devices=2, limit_val_batches=0, num_sanity_val_steps=0
    )
    trainer.fit(module, datamodule=Bytes(train_windows=64))
    whitening = {k: v for k, v in module.state_dict().items() if k.startswith("whitening.")}
    torch.save(
        {"whitening": whitening, "state": module.state_dict(), "compressed": callback.report.totals()},
        out / f"prehab_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
