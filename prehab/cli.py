"""The ``prehab`` command: a LightningCLI over ``PrehabModule`` and any LightningDataModule.

    prehab fit --config configs/quickstart.yaml
    prehab fit --config configs/smollm2_wikitext.yaml --trainer.max_steps 0    # compression only, no prehab
    prehab fit --config configs/quickstart.yaml --control_lam 0              # also the λ = 0 control run

Callbacks and datamodules are given by ``class_path``; short names work for everything in
``prehab.callbacks`` and ``prehab.datamodules`` (e.g. ``class_path: SVDLLM``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console

import prehab.callbacks  # noqa: F401  (registers the short class names for class_path)
import prehab.datamodules  # noqa: F401
from prehab.callbacks import LowRankCompression
from prehab.module import PrehabModule
from prehab.plots import save_control_plot
from prehab.report import control_comparison, control_markdown, control_table

__all__ = ["PrehabCLI", "cli", "main"]

CONTROL_FOLDER = "control"
JOB_KEYS = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler")
OUTPUT_KEYS = ("default_root_dir", "save_dir", "dirpath")  # paths a control run must not share with the main run


class PrehabCLI(LightningCLI):
    """LightningCLI with prehab's defaults (config overwrite allowed, seed 0) and the ``control_lam`` option.

    ``control_lam: 0`` runs the whole job a second time with ``model.lam`` set to it — same seed, data, steps,
    optimizer and callbacks, outputs under ``<each output folder>/control`` — and prints every stage of both runs
    side by side (saved as ``control.md``, ``control.json`` and ``control.png`` next to the compression report):
    the effect of the penalty itself, separated from the effect of fine-tuning.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--control_lam",
            type=float | None,
            default=None,
            help="Also run the same job with model.lam set to this value (e.g. 0: the control) and compare.",
        )

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.get("control_lam") is None:
            return
        # The classes' settings only: the fit's own arguments (ckpt_path, weights_only, ...) are not the job's.
        settings = {k: v for k, v in config.as_dict().items() if k in JOB_KEYS}
        settings["model"]["lam"] = float(config.control_lam)
        control = cli(_redirect_outputs(settings), run=False)
        control.trainer.fit(control.model, datamodule=control.datamodule)
        self._compare(config, control)

    @rank_zero_only
    def _compare(self, config: Any, control: PrehabCLI) -> None:
        treated, untreated = _compression(self.trainer), _compression(control.trainer)
        if treated is None or untreated is None or treated.report is None or untreated.report is None:
            return
        comparison = control_comparison(treated.report, untreated.report, config.model.lam, config.control_lam)
        Console(width=max(Console().width, 140)).print(control_table(comparison))
        if treated.save_dir is not None:
            folder = Path(treated.save_dir)
            (folder / "control.json").write_text(json.dumps(comparison, indent=2, allow_nan=False))
            (folder / "control.md").write_text(control_markdown(comparison))
            if treated.plots:
                save_control_plot(comparison, folder / "control.png")


def _compression(trainer: Any) -> LowRankCompression | None:
    found = [c for c in trainer.callbacks if isinstance(c, LowRankCompression)]
    return found[0] if found else None


def _redirect_outputs(settings: Any) -> Any:
    """A copy of the settings whose output folders get a ``control`` subfolder."""
    if isinstance(settings, dict):
        return {
            key: str(Path(value) / CONTROL_FOLDER)
            if key in OUTPUT_KEYS and isinstance(value, str | os.PathLike)
            else _redirect_outputs(value)
            for key, value in settings.items()
        }
    if isinstance(settings, list):
        return [_redirect_outputs(value) for value in settings]
    return settings


def cli(args: Any = None, run: bool = True) -> PrehabCLI:
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
