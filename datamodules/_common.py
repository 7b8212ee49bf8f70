"""Pieces shared by the prehab DataModules: argument checks, tokenizer resolution, data-source resolution,
token windows and distributed-safe evaluation loaders."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value that Hugging Face losses (and :mod:`prehab.evaluation`) skip."""


def check_positive_int(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum`` (or None if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be an integer >= {minimum}{extra}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise a ``ValueError`` naming ``name`` and listing the valid values unless ``value`` is one of them."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_loader_args(batch_size: int, num_workers: int, seed: int) -> None:
    """Validate the loader arguments every DataModule shares."""
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_workers", num_workers, minimum=0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an integer, got {seed!r}.")


def looks_like_local_path(source: str) -> bool:
    """True when ``source`` is meant as a local path rather than a Hugging Face dataset name.

    An existing file or folder is local; so is anything absolute, home-relative or dot-relative, so that a
    typo in a path fails with "not found" instead of silently trying a download.
    """
    return Path(source).expanduser().exists() or source.startswith(("/", "~", "."))


def require_local_dir(argument: str, source: str) -> Path:
    """Return ``source`` as an existing directory, or raise naming the argument and what was looked for."""
    path = Path(source).expanduser()
    if not path.exists():
        parent = path.parent
        nearby = sorted(p.name for p in parent.iterdir())[:20] if parent.is_dir() else []
        hint = f" {parent} contains: {nearby}." if nearby else f" Its parent {parent} does not exist either."
        raise FileNotFoundError(f"`{argument}`: local path {path} does not exist.{hint}")
    if not path.is_dir():
        raise NotADirectoryError(f"`{argument}`: expected a directory, but {path} is a file.")
    return path


def list_dir(path: Path, limit: int = 30) -> list[str]:
    """Names in ``path`` (sorted, at most ``limit``), for error messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


def resolve_tokenizer(
    tokenizer: str | PreTrainedTokenizerBase | None, trainer: pl.Trainer | None
) -> PreTrainedTokenizerBase:
    """Turn the ``tokenizer`` argument into a tokenizer instance.

    A string is loaded with ``AutoTokenizer.from_pretrained`` (a hub name or a local folder). ``None`` means
    "take it from the model": the attached Trainer's LightningModule must then have a ``tokenizer`` attribute.
    """
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, str):
        return AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer is None:
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        from_module = getattr(module, "tokenizer", None)
        if isinstance(from_module, PreTrainedTokenizerBase):
            return from_module
        raise ValueError(
            "`tokenizer` is None and no tokenizer could be taken from the model. Pass `tokenizer` as a Hugging "
            "Face name or local folder (e.g. the model's path) or as a PreTrainedTokenizerBase instance, or attach "
            "the DataModule to a Trainer whose LightningModule has a `tokenizer` attribute."
        )
    raise TypeError(
        f"`tokenizer` must be a str, a transformers PreTrainedTokenizerBase or None, got {type(tokenizer).__name__}."
    )


def tokenizer_name(tokenizer: str | PreTrainedTokenizerBase | None) -> str | None:
    """A printable name for reports: the string given, or the instance's ``name_or_path``."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer.name_or_path or type(tokenizer).__name__
    return tokenizer


class TokenWindowDataset(Dataset):
    """Fixed-length windows cut from one long 1-D token stream.

    Item ``i`` is ``{"input_ids", "attention_mask", "labels"}`` for ``tokens[starts[i] : starts[i] + seq_len]``;
    labels equal the inputs (Hugging Face causal LMs shift them internally).
    """

    def __init__(self, tokens: torch.Tensor, starts: Sequence[int], seq_len: int) -> None:
        self.tokens = tokens
        self.starts = [int(s) for s in starts]
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.starts[index]
        input_ids = self.tokens[start : start + self.seq_len].clone()
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": input_ids.clone(),
        }

    def as_tensor(self) -> torch.Tensor:
        """All windows stacked as a ``(num_windows, seq_len)`` LongTensor."""
        if not self.starts:
            return torch.empty(0, self.seq_len, dtype=torch.long)
        return torch.stack([self.tokens[s : s + self.seq_len] for s in self.starts])


def seeded_sample_indices(population: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indices out of ``range(population)``, fixed by ``seed`` (``count`` is capped)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(population, generator=generator)[: min(count, population)].tolist()


def uses_distributed_sampler(trainer: pl.Trainer | None) -> bool:
    """Whether Lightning would shard this trainer's dataloaders (distributed run, sampler replacement on)."""
    if trainer is None or trainer.world_size <= 1:
        return False
    # Trainer keeps `use_distributed_sampler` only on its private accelerator connector; default to sharding.
    return bool(getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True))


def unpadded_shard_sampler(dataset: Dataset, num_replicas: int, rank: int) -> UnrepeatedDistributedSampler:
    """A distributed sampler that gives each rank a disjoint, unpadded share (rank ``r`` gets ``r::num_replicas``).

    Lightning's default ``DistributedSampler`` pads the last shards by repeating samples so every rank runs the
    same number of batches; for evaluation and calibration that counts some samples twice. Lightning keeps a
    loader whose sampler is already a ``DistributedSampler``, so returning this one opts out of the padding.
    Evaluation code must then not call collectives per step (ranks may run one batch fewer): accumulate in
    torchmetrics ``Metric`` objects, which synchronise once at ``compute()``.
    """
    if len(dataset) < num_replicas:
        raise ValueError(
            f"Cannot shard {len(dataset)} evaluation samples over {num_replicas} processes without leaving a "
            "process empty; use more samples (e.g. raise `max_eval_windows`) or fewer devices."
        )
    return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)


class LoaderMixin:
    """DataLoader construction shared by the DataModules (expects ``batch_size``, ``num_workers``,
    ``pin_memory``, ``seed`` attributes and, when attached, ``trainer``)."""

    batch_size: int
    num_workers: int
    pin_memory: bool
    seed: int
    trainer: pl.Trainer | None

    @property
    def _pin(self) -> bool:
        # Pinning without an accelerator only triggers a DataLoader warning.
        return self.pin_memory and torch.accelerator.is_available()

    def _train_loader(self, dataset: Dataset, collate_fn: Callable | None = None) -> DataLoader:
        # A seeded generator makes the single-process shuffle order reproducible; under DDP Lightning swaps in
        # a DistributedSampler (seeded by the global seed), which is fine for training.
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            pin_memory=self._pin,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, dataset: Dataset, collate_fn: Callable | None = None) -> DataLoader:
        """Ordered loader; under a distributed Trainer each rank gets a disjoint unpadded shard."""
        sampler = None
        if uses_distributed_sampler(self.trainer):
            sampler = unpadded_shard_sampler(dataset, self.trainer.world_size, self.trainer.global_rank)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self._pin,
            collate_fn=collate_fn,
        )

    def _calibration_loader(
        self, dataset: Dataset, num_replicas: int, rank: int, collate_fn: Callable | None = None
    ) -> DataLoader:
        """Ordered loader over the fixed calibration set; ``num_replicas > 1`` returns rank ``rank``'s
        unpadded shard so that statistics summed over ranks count every sample exactly once."""
        check_positive_int("num_replicas", num_replicas)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in [0, {num_replicas}), got {rank}.")
        if num_replicas > 1:
            # Same rank::num_replicas split as the eval sampler, but an empty shard is allowed here: a rank
            # without calibration samples simply contributes zero to the summed statistics.
            dataset = Subset(dataset, list(range(rank, len(dataset), num_replicas)))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self._pin,
            collate_fn=collate_fn,
        )


class SampledCalibrationMixin(LoaderMixin):
    """``calibration_dataloader`` for DataModules of examples (expects ``train_dataset`` (a ``datasets.Dataset``),
    ``collator``, ``calibration_samples`` and ``setup``)."""

    def calibration_dataloader(self, num_replicas: int = 1, rank: int = 0) -> DataLoader:
        """``calibration_samples`` training examples chosen with ``seed`` (fixed set, fixed order).

        Args:
            num_replicas: Number of processes sharing the set; ``> 1`` returns rank ``rank``'s unpadded share.
            rank: This process's rank in ``[0, num_replicas)``.
        """
        self.setup("fit")
        indices = seeded_sample_indices(len(self.train_dataset), self.calibration_samples, self.seed)
        return self._calibration_loader(self.train_dataset.select(indices), num_replicas, rank, self.collator)
