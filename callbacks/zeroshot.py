"""``ZeroShotEval``: zero-shot accuracy (lm-evaluation-harness) of the model at the end of fit, into the report."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from prehab.report import CompressionReport
from prehab.zeroshot import check_arguments, zero_shot

from .base import LowRankCompression

__all__ = ["ZeroShotEval"]

PREFIX = "zeroshot"
log = logging.getLogger("prehab")


class ZeroShotEval(Callback):
    """Zero-shot accuracy with lm-evaluation-harness at the end of fit (needs ``pip install 'prehab[zeroshot]'``).

    Runs in ``on_fit_end``, so it measures the model as the callbacks before it in ``callbacks=[...]`` left it:
    put it after the compression callback (and after ``LoRARehab``) to score the compressed (rehabbed) model. The
    numbers go into the last stage of the compression report as ``zeroshot/<task>/<metric>`` (e.g.
    ``zeroshot/prehab_rte/acc``; ``report.json`` and ``report.md`` are written again when the compression
    callback has a ``save_dir``), to ``trainer.logger`` under the same names, and to :attr:`results`. Without a
    compression callback before it (e.g. a run with no surgery: the dense baseline) it logs and prints them only.

    Everything is checked when the callback is built (lm-eval installed, task names known, the local tasks'
    files present), before the fit starts. The model is scored on global rank 0 and the numbers are broadcast
    to the other DDP ranks (which wait: keep ``limit`` small enough to finish within the process-group timeout).

    Args:
        tasks: task names: the offline ``prehab_mrpc_completion`` / ``prehab_rte`` / ``prehab_sst2`` (GLUE dev
            sets under ``data_dir``) and any lm-eval task by its lm-eval name (``piqa``, ``arc_easy``,
            ``hellaswag``, ``winogrande``, ...; their data comes from the Hugging Face Hub).
        limit: examples per task (the first ones): None for all, an integer >= 1, or a fraction in (0, 1).
        batch_size: examples per forward pass, or ``"auto"``.
        num_fewshot: examples from each task's training split put before every question (0: zero-shot).
        data_dir: folder holding ``glue/`` for the local tasks; default ``$PREHAB_DATA``, else ``../shared/data``.
        tokenizer: Hugging Face tokenizer name or folder; default: the datamodule's ``tokenizer``, else the
            module's ``tokenizer`` attribute.
    """

    def __init__(
        self,
        tasks: list[str],
        limit: int | float | None = None,
        batch_size: int | str = 8,
        num_fewshot: int = 0,
        data_dir: str | None = None,
        tokenizer: str | None = None,
    ) -> None:
        if tokenizer is not None and not (isinstance(tokenizer, str) and tokenizer.strip()):
            raise ValueError(f"tokenizer={tokenizer!r} is invalid: use a tokenizer name or folder, or None.")
        # lm-eval installed, the task names known and the local tasks' files present: checked now, before the fit
        self.tasks = check_arguments(tasks, limit, batch_size, num_fewshot, data_dir)
        self.limit, self.batch_size, self.num_fewshot = limit, batch_size, num_fewshot
        self.tokenizer = tokenizer
        self.data_dir = None if data_dir is None else str(data_dir)
        self.results: dict[str, dict[str, float]] = {}
        self._resolved_tokenizer: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _language_model(pl_module)  # the model and the tokenizer are found now, not after the training
        self._resolved_tokenizer = self._tokenizer(trainer, pl_module)
        position = trainer.callbacks.index(self)
        after = [c for c in trainer.callbacks[position + 1 :] if isinstance(c, LowRankCompression)]
        if after and trainer.is_global_zero:
            log.warning(
                "ZeroShotEval comes before %s in callbacks=[...]: it scores the model before the surgery, and its "
                "numbers go to the logger only (put it after the compression callback to score the compressed "
                "model and add the numbers to the report).",
                type(after[0]).__name__,
            )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = None
        if trainer.is_global_zero:
            results = zero_shot(
                _language_model(pl_module),
                self._resolved_tokenizer or self._tokenizer(trainer, pl_module),
                self.tasks,
                limit=self.limit,
                batch_size=self.batch_size,
                num_fewshot=self.num_fewshot,
                data_dir=self.data_dir,
            )
        self.results = trainer.strategy.broadcast(results, src=0)
        metrics = {
            f"{PREFIX}/{task}/{name}": value
            for task, values in self.results.items()
            for name, value in values.items()
            if not name.endswith("_stderr")
        }
        compression = self._compression(trainer)
        if compression is not None and compression.report is not None and compression.report.stages:
            compression.report.stages[-1].metrics.update(metrics)
            self._save_report(compression.report, compression.save_dir, compression.plots)
        self._log(trainer, metrics)

    # ------------------------------------------------------------------ helpers
    def _compression(self, trainer: Trainer) -> LowRankCompression | None:
        """The last compression callback before this one in the list (its report holds the model's stages)."""
        before = trainer.callbacks[: trainer.callbacks.index(self)]
        found = [c for c in before if isinstance(c, LowRankCompression)]
        return found[-1] if found else None

    def _tokenizer(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        from transformers import AutoTokenizer, PreTrainedTokenizerBase

        if self.tokenizer is not None:
            return AutoTokenizer.from_pretrained(self.tokenizer)
        for owner in (getattr(trainer, "datamodule", None), pl_module):
            try:
                found = getattr(owner, "tokenizer", None)
            except (ValueError, OSError):  # e.g. PrehabModule.tokenizer for a model without one
                found = None
            if isinstance(found, PreTrainedTokenizerBase):
                return found
        raise ValueError(
            "ZeroShotEval found no tokenizer: pass tokenizer= (a Hugging Face name or folder), or use a datamodule "
            "or module with a `tokenizer` attribute."
        )

    @rank_zero_only
    def _save_report(self, report: CompressionReport, save_dir: str | None, plots: bool) -> None:
        if save_dir is not None:
            files = report.save(save_dir, plots=plots)
            log.info("added the zero-shot numbers to %s", ", ".join(str(f) for f in files))

    @rank_zero_only
    def _log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.logger is not None and metrics:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        table = Table(title="zero-shot (lm-evaluation-harness)")
        for column in ("task", "metric", "value", "stderr"):
            table.add_column(column, justify="left" if column in ("task", "metric") else "right")
        for task, values in self.results.items():
            for name, value in values.items():
                if not name.endswith("_stderr"):
                    stderr = values.get(f"{name}_stderr")
                    table.add_row(task, name, f"{value:.4f}", "-" if stderr is None else f"{stderr:.4f}")
        Console().print(table)


def _language_model(pl_module: LightningModule) -> Any:
    """The Hugging Face causal LM inside the module: the module itself or its ``.model``."""
    from transformers import PreTrainedModel

    for candidate in (pl_module, getattr(pl_module, "model", None)):
        if isinstance(candidate, PreTrainedModel):
            return candidate
    raise ValueError(
        f"ZeroShotEval scores a Hugging Face causal LM, but {type(pl_module).__name__} is not one and has none "
        "at `.model` (PrehabModule keeps its backbone there)."
    )
