"""Fashion-MNIST (28x28 grayscale, 10 classes) from local IDX files, read by torchvision; never downloads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision import datasets, transforms
from torchvision.datasets.utils import extract_archive

from ._common import LoaderMixin, check_loader_args, check_positive_int, list_dir, seeded_sample_indices

DEBIAN_FOLDER = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package puts the four ``.gz`` IDX files."""
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MEAN, STD = 0.2860, 0.3530  # of the 60,000 training images, pixels in [0, 1]
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), which writes " + DEBIAN_FOLDER


def default_root() -> str:
    """``$PREHAB_FASHION_MNIST``, else ``$PREHAB_DATA/fashion-mnist`` when that folder exists, else Debian's folder."""
    if os.environ.get("PREHAB_FASHION_MNIST"):
        return os.environ["PREHAB_FASHION_MNIST"]
    shared = Path(os.environ.get("PREHAB_DATA", "")) / "fashion-mnist"
    return str(shared) if os.environ.get("PREHAB_DATA") and shared.is_dir() else DEBIAN_FOLDER


def stage_idx_files(root: Path, cache_dir: Path) -> Path:
    """Lay the four IDX files of ``root`` (plain or ``.gz``) out as torchvision expects them,
    ``<cache_dir>/FashionMNIST/raw/<name>`` (decompressing ``.gz`` once, linking plain files); returns ``cache_dir``.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"`root`: Fashion-MNIST folder {root} does not exist; {INSTALL_HINT}, or pass root=.")
    found = {name: next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None) for name in FILES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"`root`: {root} lacks the Fashion-MNIST IDX files {missing} (plain or .gz); it has {list_dir(root, 12)}. "
            f"{INSTALL_HINT[0].upper()}{INSTALL_HINT[1:]}, or pass root= a folder with the four files."
        )
    raw = cache_dir / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, source in found.items():
        target = raw / name
        if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        if source.suffix == ".gz":
            staging = raw / ".partial"  # decompressed here, then renamed: a killed run leaves no half-written file
            staging.mkdir(exist_ok=True)
            os.replace(extract_archive(str(source), str(staging)), target)
            staging.rmdir()
        else:
            target.unlink(missing_ok=True)
            try:
                target.symlink_to(source.resolve())
            except OSError:
                shutil.copyfile(source, target)
    return cache_dir


class FashionMNIST(LoaderMixin, pl.LightningDataModule):
    """Fashion-MNIST for image classification (a small ViT trained from scratch), from local IDX files.

    The files are read with ``torchvision.datasets.FashionMNIST`` (``download=False``): the four IDX files of
    ``root``, plain or gzipped (Debian's package ships ``.gz``), are staged once under ``cache_dir`` in the layout
    torchvision expects. Batches are ``(images, labels)``: images ``(batch, 1, 28, 28)`` normalized with the
    training set's mean and std, so a timm ViT built with ``in_chans=1, img_size=28`` (``patch_size`` 4 or 7)
    takes them as they are.

    Splits: ``heldout_samples`` seeded training images are set aside (``heldout_dataloader()``, for choosing
    hyperparameters without looking at the test split); ``train_samples`` caps the rest (a seeded subset, for
    CPU-sized runs); validation and test are the official 10,000-image test split (``max_eval_samples``: a seeded
    subset of it).

    Args:
        root: Folder with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
            ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``). Default: ``$PREHAB_FASHION_MNIST``, else
            ``$PREHAB_DATA/fashion-mnist`` if it exists, else ``/usr/share/datasets/fashion-mnist``
            (``apt-get install dataset-fashion-mnist``).
        cache_dir: Where the files are decompressed for torchvision (about 55 MB). Default:
            ``$XDG_CACHE_HOME/prehab/fashion-mnist`` (``~/.cache/...``).
        augment: Random 2-pixel-padded crops and horizontal flips on training images (eval images never).
        heldout_samples: Training images set aside for ``heldout_dataloader()`` (0: none).
        train_samples: Use only this many of the remaining training images (``None``: all).
        max_eval_samples: Evaluate on a seeded subset of the test split of this size (``None``: all 10,000).
        calibration_samples: Training images in the fixed calibration set (``calibration_dataloader()``).
        batch_size: Images per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory for faster GPU transfer.
        seed: Seed of the held-out, training, evaluation and calibration subsets and of the shuffle order.
    """

    num_classes = 10

    def __init__(
        self,
        root: str | None = None,
        cache_dir: str | None = None,
        augment: bool = True,
        heldout_samples: int = 0,
        train_samples: int | None = None,
        max_eval_samples: int | None = None,
        calibration_samples: int = 256,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if root is not None and (not isinstance(root, str) or not root):
            raise ValueError(f"`root` must be a folder with the Fashion-MNIST IDX files or None, got {root!r}.")
        if not isinstance(augment, bool):
            raise ValueError(f"`augment` must be true or false, got {augment!r}.")
        check_positive_int("heldout_samples", heldout_samples, minimum=0)
        check_positive_int("train_samples", train_samples, allow_none=True)
        check_positive_int("max_eval_samples", max_eval_samples, allow_none=True)
        check_positive_int("calibration_samples", calibration_samples)
        check_loader_args(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.root = Path(root or default_root()).expanduser()
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prehab" / "fashion-mnist"
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else cache
        self.augment = augment
        self.heldout_samples, self.train_samples = heldout_samples, train_samples
        self.max_eval_samples, self.calibration_samples = max_eval_samples, calibration_samples
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self._splits: dict[tuple[bool, bool], datasets.FashionMNIST] = {}
        self._indices: dict[str, list[int]] | None = None

    # ---------------------------------------------------------------- transforms and metrics
    def transform(self, training: bool) -> transforms.Compose:
        """ToTensor + normalization, after a padded random crop and a horizontal flip when training with ``augment``."""
        steps: list = [transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip()]
        steps = steps if training and self.augment else []
        return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])

    def metrics(self, prefix: str | None = None) -> MetricCollection:
        """Top-1 accuracy (fed with predicted class ids)."""
        return MetricCollection({"top1": MulticlassAccuracy(num_classes=10, average="micro")}, prefix=prefix)

    # ---------------------------------------------------------------- datasets
    def split(self, train: bool, training_transform: bool = False) -> datasets.FashionMNIST:
        """The whole official split (``train=False``: the 10,000 test images) with the train or eval transform."""
        key = (train, training_transform)
        if key not in self._splits:
            cache = stage_idx_files(self.root, self.cache_dir)
            self._splits[key] = datasets.FashionMNIST(
                str(cache), train=train, transform=self.transform(training_transform), download=False
            )
        return self._splits[key]

    @property
    def indices(self) -> dict[str, list[int]]:
        """Training-split indices of the ``heldout``, ``train`` and ``calibration`` sets (disjoint held-out set)."""
        if self._indices is None:
            total = len(self.split(train=True))
            if self.heldout_samples >= total:
                raise ValueError(f"`heldout_samples`={self.heldout_samples} leaves no training image (of {total}).")
            order = seeded_sample_indices(total, total, self.seed)
            heldout, rest = order[: self.heldout_samples], order[self.heldout_samples :]
            train = rest[: self.train_samples] if self.train_samples is not None else rest
            calibration = train[: self.calibration_samples]  # already a seeded draw
            self._indices = {"heldout": sorted(heldout), "train": sorted(train), "calibration": calibration}
        return self._indices

    def eval_dataset(self) -> Dataset:
        """The test split, or its seeded ``max_eval_samples`` subset."""
        dataset = self.split(train=False)
        if self.max_eval_samples is None:
            return dataset
        return Subset(dataset, sorted(seeded_sample_indices(len(dataset), self.max_eval_samples, self.seed)))

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self.indices  # noqa: B018  (reads the training split and checks the sizes)
        if stage in ("fit", "validate", "test", None):
            self.eval_dataset()

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(Subset(self.split(train=True, training_transform=True), self.indices["train"]))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.eval_dataset())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def heldout_dataloader(self) -> DataLoader:
        """The ``heldout_samples`` training images set aside (eval transform, fixed order)."""
        if not self.heldout_samples:
            raise ValueError("heldout_dataloader() needs heldout_samples > 0 (training images set aside).")
        return self._eval_loader(Subset(self.split(train=True), self.indices["heldout"]))

    def calibration_dataloader(self, num_replicas: int = 1, rank: int = 0) -> DataLoader:
        """``calibration_samples`` training images chosen with ``seed`` (never held-out ones), eval transform.

        Args:
            num_replicas: Number of processes sharing the set; ``> 1`` returns rank ``rank``'s unpadded share.
            rank: This process's rank in ``[0, num_replicas)``.
        """
        dataset = Subset(self.split(train=True), self.indices["calibration"])
        return self._calibration_loader(dataset, num_replicas, rank)
