"""Running a user's ``training_step`` / ``validation_step`` outside Lightning's loops (at ``on_fit_end``).

Rehab trains with the module's own ``training_step`` and the report evaluates with its own
``validation_step``, but ``self.log`` is only allowed inside Lightning's loops. :func:`captured_logs`
replaces ``log``/``log_dict`` on the instance for the duration and records what the step logs instead,
averaged over the batches like an epoch-level ``self.log`` (weighted by batch size; a logged torchmetrics
``Metric`` is computed once at the end).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torchmetrics import Metric

from prehab.evaluation import evaluating

__all__ = ["LogRecorder", "captured_logs", "step_loss", "validation_metrics"]


class LogRecorder:
    """Collects ``self.log(name, value)`` calls: batch-size-weighted means of numbers, Metric objects as is."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.metrics: dict[str, Metric] = {}
        self.batch_size = 1

    def log(self, name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        if isinstance(value, Metric):
            self.metrics[name] = value
            return
        if isinstance(value, Tensor):
            if value.numel() != 1:
                return
            value = float(value.detach())
        if not isinstance(value, int | float) or isinstance(value, bool):
            return
        weight = float(batch_size or self.batch_size)
        self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.weights[name] = self.weights.get(name, 0.0) + weight

    def log_dict(self, values: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        for name, value in values.items():
            self.log(name, value, *args, **kwargs)

    def observe(self, batch: Any) -> None:
        """The size of the batch the next logs belong to (as Lightning infers it)."""
        try:
            self.batch_size = extract_batch_size(batch)
        except Exception:  # a batch Lightning cannot size: weight 1
            self.batch_size = 1

    def means(self, trainer: Trainer | None = None) -> dict[str, float]:
        """Means of what was logged, summed over DDP ranks first when a Trainer is given."""
        names = sorted(self.sums)
        values = {}
        if names:
            totals = torch.tensor([[self.sums[n], self.weights[n]] for n in names], dtype=torch.float64)
            if trainer is not None:
                totals = trainer.strategy.reduce(totals.to(trainer.strategy.root_device), reduce_op="sum").cpu()
            values = {n: float(total / weight) for n, (total, weight) in zip(names, totals.tolist(), strict=True)}
        for name, metric in self.metrics.items():
            values[name] = float(metric.compute())
            metric.reset()
        return values


@contextlib.contextmanager
def captured_logs(module: LightningModule) -> Iterator[LogRecorder]:
    """``module.log``/``module.log_dict`` record into a :class:`LogRecorder` inside the block; restored after."""
    recorder = LogRecorder()
    module.log, module.log_dict = recorder.log, recorder.log_dict
    try:
        yield recorder
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)


def step_loss(output: Any) -> Tensor | None:
    """The loss a ``training_step`` returned: a tensor, ``{"loss": tensor}``, or None (skip the batch)."""
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise TypeError(
        f"training_step returned a {type(output).__name__}; LoRARehab needs a loss tensor or a dict with a 'loss' "
        "tensor (automatic optimization)."
    )


def validation_metrics(module: LightningModule, dataloader: Iterable, trainer: Trainer) -> dict[str, float]:
    """What ``validation_step`` (plus ``on_validation_epoch_start/end``) logs over ``dataloader``, averaged.

    Runs under ``no_grad`` in eval mode; every submodule gets its train/eval flag back afterwards.
    """
    with evaluating(module), captured_logs(module) as recorder:
        module.on_validation_epoch_start()
        for index, batch in enumerate(dataloader):
            batch = trainer.strategy.batch_to_device(batch)
            recorder.observe(batch)
            module.validation_step(batch, index)
        module.on_validation_epoch_end()
    return recorder.means(trainer)
