"""Alpaca instruction tuning data (Stanford prompt template, prompt tokens masked from the loss)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from ._common import (
    IGNORE_INDEX,
    SampledCalibrationMixin,
    check_loader_args,
    check_positive_int,
    list_dir,
    looks_like_local_path,
    resolve_tokenizer,
)

# The Stanford Alpaca templates, verbatim (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:  # `input`: the dataset's field name
    """The Stanford Alpaca prompt for one record (the with-input template when ``input`` is non-empty)."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


class Alpaca(SampledCalibrationMixin, pl.LightningDataModule):
    """Alpaca-style instruction data for causal-LM fine-tuning (e.g. LoRA rehab after compression).

    Each record ``{instruction, input, output}`` becomes ``prompt + output + EOS`` with the Stanford Alpaca
    template (:data:`PROMPT_WITH_INPUT` / :data:`PROMPT_NO_INPUT`). Prompt and response are tokenized
    separately and concatenated, so the mask boundary is exact: prompt tokens get label ``-100`` (no loss),
    response and EOS tokens keep their ids. Sequences are cut to ``cutoff_len`` tokens; records whose response
    is cut away entirely are dropped (they would contribute no loss). A validation split of ``val_size``
    records is carved out with ``datasets.Dataset.train_test_split(seed=seed)``. Batches are right-padded
    ``{"input_ids", "attention_mask", "labels"}`` dicts (padding labelled ``-100``).

    Args:
        dataset: Local Alpaca JSON file (a list of records, or JSON lines), a folder holding exactly one
            ``*.json`` file, or a Hugging Face dataset name (``"tatsu-lab/alpaca"``, ``"yahma/alpaca-cleaned"``).
        tokenizer: Hugging Face tokenizer name or local folder, or an instance; ``None`` takes
            ``trainer.lightning_module.tokenizer``. Without a pad token, the EOS token is used for padding.
        cutoff_len: Maximum tokens per example (prompt + response + EOS).
        val_size: Number of records held out for validation (0 disables validation).
        max_samples: Use only this many records (after a seeded shuffle); ``None`` uses all.
        calibration_samples: Number of training examples in the fixed calibration set.
        add_eos_token: Append the tokenizer's EOS token to every response.
        batch_size: Examples per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory for faster GPU transfer.
        seed: Seed of the validation split, the calibration subset and the training shuffle order.
    """

    def __init__(
        self,
        dataset: str = "tatsu-lab/alpaca",
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        cutoff_len: int = 256,
        val_size: int = 200,
        max_samples: int | None = None,
        calibration_samples: int = 128,
        add_eos_token: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"`dataset` must be a local JSON path or a Hugging Face dataset name, got {dataset!r}.")
        check_positive_int("cutoff_len", cutoff_len, minimum=2)
        check_positive_int("val_size", val_size, minimum=0)
        check_positive_int("max_samples", max_samples, allow_none=True)
        check_positive_int("calibration_samples", calibration_samples)
        check_loader_args(batch_size, num_workers, seed)
        self.local_file = self._find_local_file(dataset) if looks_like_local_path(dataset) else None
        self.save_hyperparameters(ignore=["tokenizer"])
        self.dataset = dataset
        self.tokenizer_arg = tokenizer
        self.cutoff_len = cutoff_len
        self.val_size = val_size
        self.max_samples = max_samples
        self.calibration_samples = calibration_samples
        self.add_eos_token = add_eos_token
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_dataset = None
        self.val_dataset = None

    @staticmethod
    def _find_local_file(dataset: str) -> Path:
        path = Path(dataset).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            candidates = sorted(path.glob("*.json")) + sorted(path.glob("*.jsonl"))
            if len(candidates) == 1:
                return candidates[0]
            raise FileNotFoundError(
                f"`dataset`: expected exactly one *.json/*.jsonl file in {path}, found {len(candidates)}: "
                f"{list_dir(path)}. Pass the JSON file itself."
            )
        parent_listing = list_dir(path.parent) if path.parent.is_dir() else "(parent missing)"
        raise FileNotFoundError(f"`dataset`: {path} does not exist; {path.parent} has {parent_listing}.")

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The resolved tokenizer; a missing pad token is set to the EOS token (standard for causal LMs)."""
        if self._tokenizer is None:
            tokenizer = resolve_tokenizer(self.tokenizer_arg, self.trainer)
            if tokenizer.pad_token is None:
                if tokenizer.eos_token is None:
                    raise ValueError("`tokenizer` has neither a pad nor an EOS token; set `tokenizer.pad_token`.")
                tokenizer.pad_token = tokenizer.eos_token
            if self.add_eos_token and tokenizer.eos_token_id is None:
                raise ValueError("`add_eos_token=True` but the tokenizer has no EOS token; pass add_eos_token=False.")
            self._tokenizer = tokenizer
        return self._tokenizer

    def load_records(self):
        """All records as a ``datasets.Dataset`` with ``instruction``, ``input``, ``output`` columns."""
        import datasets

        if self.local_file is None:
            records = datasets.load_dataset(self.dataset, split="train")
        else:
            text = self.local_file.read_text(encoding="utf-8")
            rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines()]
            records = datasets.Dataset.from_list(rows)
        missing = {"instruction", "output"} - set(records.column_names)
        if missing:
            raise ValueError(
                f"Alpaca data needs columns instruction/input/output; {sorted(missing)} missing "
                f"(columns: {records.column_names})."
            )
        if self.max_samples is not None:
            records = records.shuffle(seed=self.seed).select(range(min(self.max_samples, len(records))))
        return records

    def tokenize(self, batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        """Batched ``datasets.map`` function: prompt tokens masked to -100, cut to ``cutoff_len``."""
        tokenizer = self.tokenizer
        inputs = batch.get("input") or [""] * len(batch["instruction"])
        prompts = [alpaca_prompt(ins, inp or "") for ins, inp in zip(batch["instruction"], inputs, strict=True)]
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if self.add_eos_token else []
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, response in zip(prompt_ids, response_ids, strict=True):
            ids = (prompt + response + eos)[: self.cutoff_len]
            labels = ([IGNORE_INDEX] * len(prompt) + response + eos)[: self.cutoff_len]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    def _prepare(self, records):
        tokenized = records.map(self.tokenize, batched=True, remove_columns=records.column_names)
        return tokenized.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]))

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        records = self.load_records()
        if self.val_size >= len(records):
            raise ValueError(f"`val_size`={self.val_size} leaves no training records (only {len(records)}).")
        if self.val_size > 0:
            split = records.train_test_split(test_size=self.val_size, seed=self.seed)
            self.train_dataset, self.val_dataset = self._prepare(split["train"]), self._prepare(split["test"])
        else:
            self.train_dataset = self._prepare(records)

    @property
    def collator(self) -> DataCollatorForSeq2Seq:
        """Right-pads ``input_ids``/``attention_mask`` with the tokenizer and ``labels`` with -100."""
        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._train_loader(self.train_dataset, self.collator)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return self._eval_loader(self.val_dataset, self.collator) if self.val_dataset is not None else []
