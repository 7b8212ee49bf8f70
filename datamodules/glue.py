"""GLUE benchmark DataModule: the nine tasks, local ``glue_data`` TSVs or the Hugging Face ``nyu-mll/glue``."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
)
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from ._common import (
    SampledCalibrationMixin,
    check_choice,
    check_loader_args,
    check_positive_int,
    list_dir,
    looks_like_local_path,
    require_local_dir,
    resolve_tokenizer,
    seeded_sample_indices,
)


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is laid out locally and on the hub, and how it is scored.

    ``tsv_columns`` name the local TSV columns (header names, or positions for header-less CoLA) holding the
    text field(s) and then the label; ``text_fields`` are the matching Hugging Face column names.
    ``label_names`` maps string labels to ids in the Hugging Face order; ``None`` means numeric labels.
    ``eval_splits`` maps each validation split name to its local file stem.
    """

    folder: str
    text_fields: tuple[str, ...]
    tsv_columns: tuple[str | int, ...]
    num_labels: int
    metric_names: tuple[str, ...]
    label_names: tuple[str, ...] | None = None
    has_header: bool = True
    eval_splits: tuple[tuple[str, str], ...] = (("validation", "dev"),)


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", ("sentence",), (3, 1), 2, ("matthews",), has_header=False),
    "sst2": GlueTask("SST-2", ("sentence",), ("sentence", "label"), 2, ("accuracy",)),
    "mrpc": GlueTask("MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String", "Quality"), 2, ("f1", "accuracy")),
    "qqp": GlueTask(
        "QQP", ("question1", "question2"), ("question1", "question2", "is_duplicate"), 2, ("f1", "accuracy")
    ),
    "stsb": GlueTask(
        "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2", "score"), 1, ("pearson", "spearman")
    ),
    "mnli": GlueTask(
        "MNLI",
        ("premise", "hypothesis"),
        ("sentence1", "sentence2", "gold_label"),
        3,
        ("accuracy",),
        label_names=("entailment", "neutral", "contradiction"),
        eval_splits=(("validation_matched", "dev_matched"), ("validation_mismatched", "dev_mismatched")),
    ),
    "qnli": GlueTask(
        "QNLI",
        ("question", "sentence"),
        ("question", "sentence", "label"),
        2,
        ("accuracy",),
        label_names=("entailment", "not_entailment"),
    ),
    "rte": GlueTask(
        "RTE",
        ("sentence1", "sentence2"),
        ("sentence1", "sentence2", "label"),
        2,
        ("accuracy",),
        label_names=("entailment", "not_entailment"),
    ),
    "wnli": GlueTask("WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2", "label"), 2, ("accuracy",)),
}
"""The nine GLUE tasks by their Hugging Face config names."""


def read_glue_tsv(path: Path, task: GlueTask) -> dict[str, list]:
    """Read one ``glue_data`` TSV into Hugging Face-style columns (text fields + ``label``).

    GLUE TSVs contain unbalanced quotes, so quoting is off. Rows with too few columns (a handful in the
    original QQP/MNLI dumps) are skipped with a warning.
    """
    columns: dict[str, list] = {name: [] for name in (*task.text_fields, "label")}
    skipped = 0
    # utf-8-sig: the MRPC files start with a byte-order mark.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.has_header:
            header = next(reader)
            missing = [c for c in task.tsv_columns if c not in header]
            if missing:
                raise ValueError(f"{path}: header {header} lacks the GLUE columns {missing}.")
            positions = [header.index(c) for c in task.tsv_columns]
        else:
            positions = list(task.tsv_columns)
        for row in reader:
            if len(row) <= max(positions):
                skipped += 1
                continue
            values = [row[p] for p in positions]
            for name, value in zip(task.text_fields, values[:-1], strict=True):
                columns[name].append(value)
            raw_label = values[-1].strip()
            if task.num_labels == 1:
                label: int | float = float(raw_label)
            elif task.label_names is not None:
                label = task.label_names.index(raw_label)
            else:
                label = int(raw_label)
            columns["label"].append(label)
    if skipped:
        rank_zero_warn(f"{path}: skipped {skipped} malformed rows.")
    return columns


class GLUE(SampledCalibrationMixin, pl.LightningDataModule):
    """A GLUE task for sequence classification (or regression for STS-B).

    Examples are tokenized as single sentences or sentence pairs (``tokenizer(a, b)``), truncated to
    ``max_length`` and padded per batch; batches are dicts with ``input_ids``, ``attention_mask`` (and
    ``token_type_ids`` when the tokenizer makes them) and ``labels`` (int64 class ids, float32 scores for STS-B),
    so ``model(**batch)`` works for a Hugging Face ``AutoModelForSequenceClassification`` with
    ``num_labels=dm.num_labels``. Labels follow the Hugging Face ``nyu-mll/glue`` ids (e.g. RTE/QNLI:
    entailment=0; MNLI: entailment, neutral, contradiction).

    Validation uses the dev sets (MNLI: matched and mismatched, two validation dataloaders in
    :attr:`eval_split_names` order); since GLUE test labels are hidden, ``test_dataloader`` returns the dev
    sets too. :meth:`metrics` gives each task's official metric(s).

    Args:
        task: One of ``cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli``.
        tokenizer: Hugging Face tokenizer name or local folder, or an instance; ``None`` takes
            ``trainer.lightning_module.tokenizer``.
        dataset: Local ``glue_data`` folder (holding ``<Task>/train.tsv`` and ``dev.tsv``, e.g. ``SST-2/``;
            MNLI ``dev_matched.tsv``/``dev_mismatched.tsv``), the task folder itself, or a Hugging Face
            dataset name (``"nyu-mll/glue"``).
        max_length: Maximum tokens per example (truncation).
        calibration_samples: Number of training examples in the fixed calibration set.
        heldout_samples: Training examples set aside (seeded) for ``heldout_dataloader()``, for choosing
            hyperparameters without looking at the dev set; never trained or calibrated on (0: none).
        max_train_samples: Train on a seeded subset of this size of the remaining examples (``None``: all);
            for CPU-sized runs on the larger tasks.
        max_eval_samples: Evaluate on a seeded subset of this size of each dev set (``None``: all).
        batch_size: Examples per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory for faster GPU transfer.
        seed: Seed of the calibration subset and the training shuffle order.
    """

    def __init__(
        self,
        task: str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        dataset: str = "nyu-mll/glue",
        max_length: int = 128,
        calibration_samples: int = 128,
        heldout_samples: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        task_key = task.lower().replace("-", "") if isinstance(task, str) else task
        check_choice("task", task_key, GLUE_TASKS)
        check_positive_int("max_length", max_length, minimum=2)
        check_positive_int("calibration_samples", calibration_samples)
        check_positive_int("heldout_samples", heldout_samples, minimum=0)
        check_positive_int("max_train_samples", max_train_samples, allow_none=True)
        check_positive_int("max_eval_samples", max_eval_samples, allow_none=True)
        check_loader_args(batch_size, num_workers, seed)
        self.task_dir = self._find_task_dir(dataset, GLUE_TASKS[task_key]) if looks_like_local_path(dataset) else None
        # Saved as "glue_task": Lightning logs the module's and the datamodule's hparams together and refuses
        # a key they share with different values, and PrehabModule's `task` is "sequence_classification".
        self.save_hyperparameters(
            {
                "glue_task": task_key,
                "dataset": dataset,
                "max_length": max_length,
                "calibration_samples": calibration_samples,
                "heldout_samples": heldout_samples,
                "max_train_samples": max_train_samples,
                "max_eval_samples": max_eval_samples,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "pin_memory": pin_memory,
                "seed": seed,
            }
        )
        self.task = task_key
        self.spec = GLUE_TASKS[task_key]
        self.tokenizer_arg = tokenizer
        self.dataset = dataset
        self.max_length = max_length
        self.calibration_samples = calibration_samples
        self.heldout_samples = heldout_samples
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_dataset = None
        self.heldout_dataset = None
        self.eval_datasets: dict = {}

    @staticmethod
    def _find_task_dir(dataset: str, spec: GlueTask) -> Path:
        root = require_local_dir("dataset", dataset)
        for candidate in (root / spec.folder, root):
            if (candidate / "dev.tsv").is_file() or (candidate / f"{spec.eval_splits[0][1]}.tsv").is_file():
                return candidate
        raise FileNotFoundError(
            f"`dataset`: no GLUE {spec.folder} files under {root}: looked for {root / spec.folder}/"
            f"{spec.eval_splits[0][1]}.tsv and {root}/{spec.eval_splits[0][1]}.tsv; {root} has {list_dir(root)}."
        )

    @property
    def num_labels(self) -> int:
        """Output size of the classification head: 1 for STS-B (regression), else the number of classes."""
        return self.spec.num_labels

    @property
    def is_regression(self) -> bool:
        """True for STS-B, whose labels are float similarity scores in [0, 5]."""
        return self.spec.num_labels == 1

    @property
    def eval_split_names(self) -> list[str]:
        """Validation split names, in dataloader order (MNLI: matched, mismatched)."""
        return [name for name, _ in self.spec.eval_splits]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The resolved tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(self.tokenizer_arg, self.trainer)
        return self._tokenizer

    def metrics(self, prefix: str | None = None) -> MetricCollection:
        """The task's official metrics, fed with predicted class ids (int) or, for STS-B, predicted scores.

        CoLA: Matthews correlation; MRPC/QQP: F1 (positive class) and accuracy; STS-B: Pearson and Spearman;
        the rest: accuracy. :func:`prehab.evaluation.evaluate_classification` turns logits into these inputs.
        """
        multiclass_accuracy = partial(MulticlassAccuracy, num_classes=self.num_labels, average="micro")
        factories = {
            "matthews": BinaryMatthewsCorrCoef,
            "f1": BinaryF1Score,
            "accuracy": BinaryAccuracy if self.num_labels == 2 else multiclass_accuracy,
            "pearson": PearsonCorrCoef,
            "spearman": SpearmanCorrCoef,
        }
        return MetricCollection({name: factories[name]() for name in self.spec.metric_names}, prefix=prefix)

    def load_split(self, split: str):
        """Raw ``datasets.Dataset`` of a split (``train`` or one of :attr:`eval_split_names`)."""
        import datasets

        if self.task_dir is None:
            return datasets.load_dataset(self.dataset, self.task, split=split)
        stem = "train" if split == "train" else dict(self.spec.eval_splits)[split]
        path = self.task_dir / f"{stem}.tsv"
        if not path.is_file():
            raise FileNotFoundError(
                f"GLUE {self.task} split {split!r}: {path} not found; {self.task_dir} has {list_dir(self.task_dir)}."
            )
        features = datasets.Features(
            {
                **{name: datasets.Value("string") for name in self.spec.text_fields},
                "label": datasets.Value("float32" if self.is_regression else "int64"),
            }
        )
        return datasets.Dataset.from_dict(read_glue_tsv(path, self.spec), features=features)

    def tokenize_split(self, split: str):
        """The split tokenized (truncated to ``max_length``, not padded) with a ``labels`` column."""
        raw = self.load_split(split)

        def encode(batch):
            texts = [batch[name] for name in self.spec.text_fields]
            return self.tokenizer(*texts, truncation=True, max_length=self.max_length)

        encoded = raw.map(encode, batched=True, remove_columns=[c for c in raw.column_names if c != "label"])
        return encoded.rename_column("label", "labels")

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_dataset is None:
            full = self.tokenize_split("train")
            if self.heldout_samples >= len(full):
                raise ValueError(
                    f"`heldout_samples`={self.heldout_samples} leaves no training example "
                    f"({self.task} has {len(full)})."
                )
            order = seeded_sample_indices(len(full), len(full), self.seed)
            heldout, rest = order[: self.heldout_samples], order[self.heldout_samples :]
            if self.heldout_samples or self.max_train_samples is not None:
                self.heldout_dataset = full.select(sorted(heldout))
                self.train_dataset = full.select(sorted(rest[: self.max_train_samples]))
            else:
                self.train_dataset = full
        if stage in ("fit", "validate", "test", None) and not self.eval_datasets:
            self.eval_datasets = {name: self.tokenize_split(name) for name in self.eval_split_names}
            if self.max_eval_samples is not None:
                self.eval_datasets = {
                    name: split.select(sorted(seeded_sample_indices(len(split), self.max_eval_samples, self.seed)))
                    for name, split in self.eval_datasets.items()
                }

    @property
    def collator(self) -> DataCollatorWithPadding:
        return DataCollatorWithPadding(self.tokenizer, return_tensors="pt")

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._train_loader(self.train_dataset, self.collator)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        self.setup("validate")
        loaders = [self._eval_loader(self.eval_datasets[name], self.collator) for name in self.eval_split_names]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The dev set(s): GLUE test labels are not public."""
        return self.val_dataloader()

    def heldout_dataloader(self) -> DataLoader:
        """The ``heldout_samples`` training examples set aside (fixed order)."""
        if not self.heldout_samples:
            raise ValueError("heldout_dataloader() needs heldout_samples > 0 (training examples set aside).")
        self.setup("fit")
        return self._eval_loader(self.heldout_dataset, self.collator)
