"""Feeding calibration batches to a model we did not write: batch selection, sharding, forward adapter."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import nn

__all__ = ["CalibrationForwardError", "calibration_forward", "take_batches"]

LABEL_KEYS = ("labels", "label", "targets", "target", "y")


class CalibrationForwardError(TypeError):
    """The model could not be called on a calibration batch."""


def take_batches(loader: Iterable, num_batches: int, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
    """The first ``num_batches`` batches of ``loader``, round-robin sharded across ``world_size`` ranks.

    Rank ``k`` gets batches ``k, k + W, k + 2W, ...``, so the union over ranks is exactly the
    single-process calibration set.
    """
    return itertools.islice(loader, rank, num_batches, world_size)


def calibration_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on ``batch`` for calibration (never ``training_step``: it logs and steps schedulers).

    ``model.calibration_step(batch)`` when defined; otherwise dict -> ``model(**batch)`` without label
    keys, tuple/list -> ``model(batch[0])``, tensor -> ``model(batch)``. The batch is moved to the
    model's device first.
    """
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    batch = move_data_to_device(batch, device)
    step: Callable | None = getattr(model, "calibration_step", None)
    if step is not None:
        return step(batch)
    try:
        if isinstance(batch, Mapping):
            return model(**{k: v for k, v in batch.items() if k not in LABEL_KEYS})
        if isinstance(batch, list | tuple):
            return model(batch[0])
        return model(batch)
    except (NotImplementedError, TypeError) as err:
        raise CalibrationForwardError(
            f"could not run {type(model).__name__} on a calibration batch of type {type(batch).__name__} "
            f"({type(err).__name__}: {err}). Define `def calibration_step(self, batch)` on your module to "
            "run its forward on one batch (dict batches are called as model(**batch) minus labels, "
            "tuples as model(batch[0]))."
        ) from err
