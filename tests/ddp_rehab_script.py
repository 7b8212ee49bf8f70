"""Run by test_rehab.py as `python ddp_rehab_script.py OUT_DIR`: two CPU ranks (gloo) compress then rehab.

Each rank trains LoRA on its own shard of the fit's data; gradients are averaged, so both ranks must end
with bit-identical weights.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TinyModule, fast_trainer, loader_for  # noqa: E402

from prehab import LowRankLinear  # noqa: E402
from prehab.callbacks import SVDLLM, LoRARehab  # noqa: E402


class Snapshot(pl.Callback):
    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def main(out: Path) -> None:
    module = TinyModule("llama")
    snapshot = Snapshot()
    rehab = LoRARehab(steps_per_factor=3, rank=2, lr=1e-2)
    callbacks = [SVDLLM(ratio=0.5, calibration_batches=4), snapshot, rehab]
    trainer = fast_trainer(callbacks=callbacks, max_steps=1, strategy="ddp", devices=2)
    trainer.fit(module, train_dataloaders=loader_for("llama", n=64, batch_size=4))
    torch.save(
        {
            "world": trainer.world_size,
            "state": module.state_dict(),
            "surgery": snapshot.state,
            "losses": rehab.losses,
            "lowrank": sum(isinstance(m, LowRankLinear) for m in module.modules()),
        },
        out / f"rehab_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
