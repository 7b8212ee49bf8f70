"""Feeding calibration batches to a model we did not write: batch selection, sharding, forward adapter."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from tqdm.auto import tqdm

from prehab.lowrank import LowRankLinear, dense_weight
from prehab.stats import CovarianceCollector, calibration_forward_context

__all__ = [
    "CalibrationForwardError",
    "calibration_forward",
    "collect_input_covariances",
    "known_length",
    "is_encoder_decoder",
    "layer_weight",
    "padding_mask",
    "take_batches",
]

LABEL_KEYS = ("labels", "label", "targets", "target", "y")


class CalibrationForwardError(TypeError):
    """The model could not be called on a calibration batch."""


def known_length(loader: Iterable) -> int | None:
    """``len(loader)``, or None when it is unknown (a DataLoader over an ``IterableDataset`` without
    ``__len__`` raises TypeError; a generator has no ``len`` at all)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def layer_weight(module: nn.Module) -> Tensor:
    """The ``out x in`` weight of a targeted layer: a dense Linear/Conv1D's, or the product ``up @ down`` of a
    ``LowRankLinear`` (a layer that was already compressed still has an input to calibrate and a weight)."""
    if isinstance(module, LowRankLinear):
        return module.weight
    return dense_weight(module)


def take_batches(loader: Iterable, num_batches: int, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
    """The first ``num_batches`` batches of ``loader``, round-robin sharded across ``world_size`` ranks.

    Rank ``k`` gets batches ``k, k + W, k + 2W, ...``, so the union over ranks is exactly the
    single-process calibration set.
    """
    return itertools.islice(loader, rank, num_batches, world_size)


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether any Hugging Face config in ``model`` says encoder-decoder (its decoder reads other positions)."""
    return any(getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True for m in model.modules())


def padding_mask(batch: Any, encoder_decoder: bool = False) -> Tensor | None:
    """The real tokens of a calibration batch (True = real), so statistics can leave padding out.

    A dict batch's 2-D ``attention_mask`` of zeros and ones (Hugging Face's convention) when it marks any
    padding; None otherwise (no mask, nothing padded, tuple batches, 4-D additive masks). None as well for
    encoder-decoder models and batches with ``decoder_*`` inputs: there the mask marks the encoder's
    tokens only, while the decoder's layers read another sequence of possibly the same length.
    """
    if encoder_decoder or not isinstance(batch, Mapping) or any(str(k).startswith("decoder_") for k in batch):
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2 or not bool(((mask == 0) | (mask == 1)).all()):
        return None
    real = mask != 0
    return None if bool(real.all()) else real


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


def collect_input_covariances(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    dataloader: Iterable,
    num_batches: int,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    desc: str = "calibration",
) -> tuple[dict[str, Tensor], int]:
    """Mean input covariance ``G = XXᵀ / n`` of every target over this rank's share of the first
    ``num_batches`` batches, summed over DDP ranks. Returns ``({name: G}, rows per layer)``; layers that
    never ran are left out. Padded positions (``attention_mask == 0``, see :func:`padding_mask`) are
    not counted.
    """
    if num_batches < world_size:
        raise ValueError(
            f"calibration_batches={num_batches} is smaller than the {world_size} DDP ranks: every rank "
            "needs at least one batch. Raise calibration_batches."
        )
    device = layer_weight(next(iter(targets.values()))).device
    features = {name: layer_weight(m).shape[1] for name, m in targets.items()}
    collector = CovarianceCollector(targets, features, device=device)
    length = known_length(dataloader)
    total = None if length is None else len(range(rank, min(num_batches, length), world_size))
    batches = take_batches(dataloader, num_batches, rank, world_size)
    encoder_decoder = is_encoder_decoder(model)
    with calibration_forward_context(model), collector.hooks():
        for batch in tqdm(batches, desc=f"{desc}: calibrating", disable=not progress, unit="batch", total=total):
            collector.mask = padding_mask(batch, encoder_decoder)  # padded positions stay out of G
            calibration_forward(model, batch)
    if not collector.stats:  # decided identically on every rank only if every rank has batches
        raise ValueError(
            "calibration produced no samples for the targeted layers: the calibration dataloader is empty "
            "or the targeted layers are not used in the forward pass."
        )
    collector.all_reduce_()
    return collector.means_(), max(stat.count for stat in collector.unique())
