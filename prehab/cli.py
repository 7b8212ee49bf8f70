"""The ``prehab`` command: a LightningCLI over ``PrehabModule`` and any LightningDataModule.

    prehab fit --config configs/quickstart.yaml
    prehab fit --config configs/smollm2_wikitext.yaml --trainer.max_steps 0    # compression only, no prehab

Callbacks and datamodules are given by ``class_path``; short names work for everything in
``prehab.callbacks`` and ``prehab.datamodules`` (e.g. ``class_path: SVDLLM``).
"""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

import prehab.callbacks  # noqa: F401  (registers the short class names for class_path)
import prehab.datamodules  # noqa: F401
from prehab.module import PrehabModule

__all__ = ["PrehabCLI", "cli", "main"]


class PrehabCLI(LightningCLI):
    """LightningCLI with prehab's defaults: config overwrite allowed, seed 0."""


def cli(args: list[str] | None = None, run: bool = True) -> PrehabCLI:
    """Build (and by default run) the CLI; returns it, for tests and notebooks."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return PrehabCLI(
        PrehabModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
        run=run,
    )


def main() -> None:
    """Console entry point ``prehab`` (returns nothing, so the exit status is 0 on success)."""
    cli()


if __name__ == "__main__":
    main()
