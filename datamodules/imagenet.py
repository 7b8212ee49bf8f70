"""ImageNet-style image classification DataModule with timm transforms."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from timm.data import ImageNetInfo, create_transform, resolve_data_config, resolve_model_data_config
from timm.models import get_pretrained_cfg
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision.datasets import ImageFolder

from ._common import (
    LoaderMixin,
    check_choice,
    check_loader_args,
    check_positive_int,
    list_dir,
    looks_like_local_path,
    require_local_dir,
    seeded_sample_indices,
)

LABEL_SPACES = ("imagenet-1k", "folders")


class WnidImageFolder(ImageFolder):
    """``torchvision`` ImageFolder whose class ids come from a given wnid -> index map instead of the
    folders present (so a subset of ImageNet keeps the ImageNet-1k ids)."""

    def __init__(self, root: Path, class_to_idx: dict[str, int] | None, **kwargs: Any) -> None:
        self._given_class_to_idx = class_to_idx
        super().__init__(str(root), **kwargs)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes, folder_to_idx = super().find_classes(directory)
        if self._given_class_to_idx is None:
            return classes, folder_to_idx
        unknown = [c for c in classes if c not in self._given_class_to_idx]
        if unknown:
            raise ValueError(
                f"{directory}: folders {unknown[:5]}{'...' if len(unknown) > 5 else ''} are not ImageNet-1k wnids; "
                "pass label_space='folders' to number the folders present instead."
            )
        return classes, {c: self._given_class_to_idx[c] for c in classes}


class HFImageDataset(Dataset):
    """A Hugging Face image dataset (``image``/``label`` columns) with a torchvision-style transform."""

    def __init__(self, hf_dataset: Any, transform: Any, image_key: str = "image", label_key: str = "label") -> None:
        self.hf_dataset, self.transform = hf_dataset, transform
        self.image_key, self.label_key = image_key, label_key

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.hf_dataset[index]
        return self.transform(row[self.image_key].convert("RGB")), int(row[self.label_key])


class ImageNet(LoaderMixin, pl.LightningDataModule):
    """ImageNet-1k (or any ``<wnid>/*.JPEG`` folder tree) for image classification, with timm transforms.

    Layouts: ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``; or a flat ``<root>/<wnid>/*.JPEG``
    folder (like the shared 500-image sample), which serves as the validation split (and, with
    ``calibration_split="val"``, as the calibration source). A non-local ``root`` is a Hugging Face dataset
    name (e.g. ``"ILSVRC/imagenet-1k"``) with ``image``/``label`` columns.

    Label order: with ``label_space="imagenet-1k"`` (default) a class id is the position of its wnid in the
    sorted list of the 1000 ImageNet-1k wnids (timm's ``ImageNetInfo``) — the standard torchvision/ILSVRC
    order that pretrained timm heads use, and identical to numbering the folders in sorted order when all
    1000 are present; a subset (e.g. the sample's even classes) keeps its ImageNet-1k ids.
    ``label_space="folders"`` numbers the folders present in sorted wnid order (torchvision ``ImageFolder``),
    for datasets that are not ImageNet-1k subsets.

    Transforms come from the model: ``model_name``'s timm pretrained config (input size, interpolation,
    mean/std, crop) via ``resolve_data_config`` + ``create_transform``, overridden key by key by
    ``data_config``; with neither, from the first timm model (a module with ``pretrained_cfg``) inside the
    attached Trainer's LightningModule. Training uses timm's training augmentation; validation and calibration
    the deterministic eval transform. Batches are ``(images, labels)`` tuples.

    Args:
        root: Dataset folder (see the layouts above) or a Hugging Face dataset name.
        model_name: timm model name whose pretrained data config defines the transforms
            (no weights are downloaded).
        data_config: timm data-config entries (``input_size``, ``interpolation``, ``mean``, ``std``,
            ``crop_pct``, ``crop_mode``) that override the model's.
        label_space: ``"imagenet-1k"`` or ``"folders"`` (see label order above).
        train_dir: Sub-folder of the training split.
        val_dir: Sub-folder of the validation split; if absent, ``root`` itself is used when it holds
            class folders.
        calibration_split: ``"train"`` or ``"val"``: where calibration images are drawn from.
        calibration_samples: Number of calibration images (seeded random subset).
        max_eval_samples: Evaluate only a seeded random subset of this size; ``None`` uses all.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes (JPEG decoding is the bottleneck: use several).
        pin_memory: Pin host memory for faster GPU transfer.
        seed: Seed of the calibration and evaluation subsets and of the training shuffle order.
    """

    def __init__(
        self,
        root: str,
        model_name: str | None = None,
        data_config: dict[str, Any] | None = None,
        label_space: Literal["imagenet-1k", "folders"] = "imagenet-1k",
        train_dir: str = "train",
        val_dir: str = "val",
        calibration_split: Literal["train", "val"] = "train",
        calibration_samples: int = 256,
        max_eval_samples: int | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(root, str) or not root:
            raise ValueError(f"`root` must be a local folder or a Hugging Face dataset name, got {root!r}.")
        check_choice("label_space", label_space, LABEL_SPACES)
        check_choice("calibration_split", calibration_split, ("train", "val"))
        check_positive_int("calibration_samples", calibration_samples)
        check_positive_int("max_eval_samples", max_eval_samples, allow_none=True)
        check_loader_args(batch_size, num_workers, seed)
        if model_name is not None and get_pretrained_cfg(model_name) is None:
            raise ValueError(
                f"`model_name`={model_name!r} has no timm pretrained config; pass a timm model name "
                "(see timm.list_models()) or give `data_config` instead."
            )
        if data_config is not None and not isinstance(data_config, dict):
            raise ValueError(f"`data_config` must be a dict of timm data-config entries, got {data_config!r}.")
        self.root_dir = require_local_dir("root", root) if looks_like_local_path(root) else None
        self.save_hyperparameters()
        self.root = root
        self.model_name = model_name
        # YAML gives lists; timm's configs use tuples.
        self.data_config_override = {k: tuple(v) if isinstance(v, list) else v for k, v in (data_config or {}).items()}
        self.label_space = label_space
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.calibration_split = calibration_split
        self.calibration_samples = calibration_samples
        self.max_eval_samples = max_eval_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self._datasets: dict[tuple[str, bool], Dataset] = {}

    # ---------------------------------------------------------------- transforms and labels
    @property
    def data_config(self) -> dict[str, Any]:
        """The resolved timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode)."""
        if self.model_name is not None:
            return resolve_data_config(
                args=self.data_config_override, pretrained_cfg=get_pretrained_cfg(self.model_name).to_dict()
            )
        if self.data_config_override:
            return resolve_data_config(args=self.data_config_override)
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        timm_model = next((m for m in module.modules() if hasattr(m, "pretrained_cfg")), None) if module else None
        if timm_model is None:
            raise ValueError(
                "No image transform: pass `model_name` (a timm model name) or `data_config` (e.g. "
                "{'input_size': [3, 224, 224]}), or attach the DataModule to a Trainer whose model is a timm model."
            )
        return resolve_model_data_config(timm_model)

    def transform(self, training: bool) -> Any:
        """timm's train (augmenting) or eval (resize + center crop) transform for :attr:`data_config`."""
        return create_transform(**self.data_config, is_training=training)

    @property
    def class_to_idx(self) -> dict[str, int] | None:
        """wnid -> class id for ``label_space="imagenet-1k"``; ``None`` for ``"folders"``."""
        if self.label_space == "folders":
            return None
        return {wnid: index for index, wnid in enumerate(sorted(ImageNetInfo().label_names()))}

    @property
    def num_classes(self) -> int:
        """1000 for the ImageNet-1k label space, else the number of class folders of the validation split."""
        if self.label_space == "imagenet-1k":
            return 1000
        return len(self.split_dataset("val", training=False).classes)

    def metrics(self, prefix: str | None = None) -> MetricCollection:
        """Top-1 accuracy (fed with predicted class ids)."""
        return MetricCollection(
            {"top1": MulticlassAccuracy(num_classes=self.num_classes, average="micro")}, prefix=prefix
        )

    # ---------------------------------------------------------------- datasets
    def split_folder(self, split: str) -> Path:
        """The folder of ``split`` ("train" or "val"); the error lists what ``root`` holds."""
        assert self.root_dir is not None
        sub = self.root_dir / (self.train_dir if split == "train" else self.val_dir)
        if sub.is_dir():
            return sub
        # A flat layout: class folders directly under root (and no train/ folder that would make it a tree).
        holds_class_folders = not (self.root_dir / self.train_dir).is_dir() and any(
            p.is_dir() for p in self.root_dir.iterdir()
        )
        if split == "val" and holds_class_folders:
            return self.root_dir
        fix = (
            " This looks like a flat <wnid>/*.JPEG folder, which serves only as the validation split: use "
            "calibration_split='val' and validate/test instead of fit."
            if holds_class_folders
            else ""
        )
        raise FileNotFoundError(
            f"ImageNet split {split!r}: looked for {sub} (set `{'train_dir' if split == 'train' else 'val_dir'}`)"
            f"; {self.root_dir} has {list_dir(self.root_dir, 8)}.{fix}"
        )

    def split_dataset(self, split: str, training: bool) -> Dataset:
        """The whole ``split`` with the train or eval transform (built once per combination)."""
        key = (split, training)
        if key not in self._datasets:
            transform = self.transform(training)
            if self.root_dir is None:
                import datasets

                hf_split = "train" if split == "train" else "validation"
                self._datasets[key] = HFImageDataset(datasets.load_dataset(self.root, split=hf_split), transform)
            else:
                self._datasets[key] = WnidImageFolder(self.split_folder(split), self.class_to_idx, transform=transform)
        return self._datasets[key]

    def eval_dataset(self) -> Dataset:
        """The validation split, or its seeded ``max_eval_samples`` subset."""
        dataset = self.split_dataset("val", training=False)
        if self.max_eval_samples is None:
            return dataset
        return Subset(dataset, sorted(seeded_sample_indices(len(dataset), self.max_eval_samples, self.seed)))

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self.split_dataset("train", training=True)
        if stage in ("fit", "validate", "test", None):
            self.eval_dataset()

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.split_dataset("train", training=True))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.eval_dataset())

    def test_dataloader(self) -> DataLoader:
        """The validation split (ImageNet test labels are not public)."""
        return self.val_dataloader()

    def calibration_dataloader(self, num_replicas: int = 1, rank: int = 0) -> DataLoader:
        """``calibration_samples`` images of ``calibration_split`` chosen with ``seed``, eval transform.

        Args:
            num_replicas: Number of processes sharing the set; ``> 1`` returns rank ``rank``'s unpadded share.
            rank: This process's rank in ``[0, num_replicas)``.
        """
        dataset = self.split_dataset(self.calibration_split, training=False)
        indices = seeded_sample_indices(len(dataset), self.calibration_samples, self.seed)
        return self._calibration_loader(Subset(dataset, indices), num_replicas, rank)
