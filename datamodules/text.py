"""Plain-text language-modelling DataModules (WikiText-2, PTB, any line-per-row corpus) with the fixed
perplexity protocol and SVD-LLM style calibration windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ._common import (
    LoaderMixin,
    TokenWindowDataset,
    check_loader_args,
    check_positive_int,
    list_dir,
    looks_like_local_path,
    require_local_dir,
    resolve_tokenizer,
    tokenizer_name,
)

# Local file names tried for a split, in order; "{split}" is each alias of the split name.
TEXT_FILE_PATTERNS = ("wiki.{split}.raw", "wiki.{split}.tokens", "ptb.{split}.txt", "{split}.txt", "{split}.raw")
# Local files say "valid", Hugging Face says "validation": accept either for both.
SPLIT_ALIASES = {"valid": ("valid", "validation"), "validation": ("valid", "validation")}
HF_SPLIT_NAMES = {"valid": "validation"}


class TextDataModule(LoaderMixin, pl.LightningDataModule):
    """Causal language modelling on a plain-text corpus, with the fixed perplexity evaluation protocol.

    Data source: ``dataset`` is either a local folder holding one text file per split
    (``wiki.{train,valid,test}.raw``, ``ptb.{train,valid,test}.txt`` or ``{train,valid,test}.txt``) or a
    Hugging Face dataset name loaded with ``datasets.load_dataset(dataset, dataset_config)``. A local file is
    read as one row per line, exactly as the Hugging Face loaders do: WikiText keeps each line with its
    newline and turns whitespace-only lines into ``""``; with ``strip_lines=True`` (PTB) lines are stripped.

    Protocol (train, validation, test and calibration alike): the split's rows are joined with
    ``join_separator`` and tokenized once. Training and evaluation use the non-overlapping ``seq_len``
    windows of that token stream, the remainder dropped; evaluation optionally keeps the first
    ``max_eval_windows``. Calibration draws ``calibration_samples`` windows at random token offsets (seeded,
    SVD-LLM/GPTQ style) from ``calibration_split``. :meth:`eval_protocol` describes what was evaluated.
    Batches are ``{"input_ids", "attention_mask", "labels"}`` dicts, so ``model(**batch)`` works for a
    Hugging Face causal LM (labels equal the inputs; the model shifts them).

    Args:
        dataset: Local folder with one text file per split, or a Hugging Face dataset name
            (e.g. ``"wikitext"``, ``"ptb_text_only"``).
        tokenizer: Hugging Face tokenizer name or local folder (loaded with ``AutoTokenizer.from_pretrained``),
            or a tokenizer instance. ``None`` takes ``trainer.lightning_module.tokenizer`` at setup.
        dataset_config: Hugging Face configuration name (e.g. ``"wikitext-2-raw-v1"``); unused for local data.
        text_column: Column holding the text in the Hugging Face dataset.
        seq_len: Tokens per window (the papers use 2048).
        train_split: Split used for training windows. The shared WikiText-2/PTB copies have no train file:
            pass ``train_split="valid"`` to train on the validation text.
        val_split: Split evaluated during fit/validate.
        test_split: Split evaluated by ``trainer.test`` (WikiText-2/PTB test for the papers' numbers).
        calibration_split: Split the calibration windows are drawn from; ``None`` means ``train_split``.
        calibration_samples: Number of calibration windows.
        max_eval_windows: Keep only the first this-many evaluation windows; ``None`` keeps all.
        join_separator: String joining the rows before tokenization (``"\\n\\n"`` in the papers).
        strip_lines: Strip every line of a local file (PTB convention) instead of the WikiText convention.
        add_special_tokens: Let the tokenizer add its special tokens (e.g. BOS) once at the start of the
            joined text.
        batch_size: Windows per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory for faster GPU transfer.
        seed: Seed of the calibration windows and of the training shuffle order.
    """

    file_patterns: tuple[str, ...] = TEXT_FILE_PATTERNS

    def __init__(
        self,
        dataset: str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        seq_len: int = 2048,
        train_split: str = "train",
        val_split: str = "valid",
        test_split: str = "test",
        calibration_split: str | None = None,
        calibration_samples: int = 256,
        max_eval_windows: int | None = None,
        join_separator: str = "\n\n",
        strip_lines: bool = False,
        add_special_tokens: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"`dataset` must be a local folder or a Hugging Face dataset name, got {dataset!r}.")
        check_positive_int("seq_len", seq_len, minimum=2)
        check_positive_int("calibration_samples", calibration_samples)
        check_positive_int("max_eval_windows", max_eval_windows, allow_none=True)
        check_loader_args(batch_size, num_workers, seed)
        for name, split in [("train_split", train_split), ("val_split", val_split), ("test_split", test_split)]:
            if not isinstance(split, str) or not split:
                raise ValueError(f"`{name}` must be a non-empty split name such as 'train', 'valid' or 'test'.")
        self.local_dir = require_local_dir("dataset", dataset) if looks_like_local_path(dataset) else None
        self.save_hyperparameters(ignore=["tokenizer"])
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.text_column = text_column
        self.tokenizer_arg = tokenizer
        self.seq_len = seq_len
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.calibration_split = calibration_split or train_split
        self.calibration_samples = calibration_samples
        self.max_eval_windows = max_eval_windows
        self.join_separator = join_separator
        self.strip_lines = strip_lines
        self.add_special_tokens = add_special_tokens
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._token_streams: dict[str, torch.Tensor] = {}
        self._sources: dict[str, str] = {}
        self._calibration_dataset: TokenWindowDataset | None = None
        self.train_dataset: TokenWindowDataset | None = None
        self.val_dataset: TokenWindowDataset | None = None
        self.test_dataset: TokenWindowDataset | None = None

    # ---------------------------------------------------------------- data loading
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The resolved tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(self.tokenizer_arg, self.trainer)
        return self._tokenizer

    def local_split_file(self, split: str) -> Path:
        """The local file holding ``split``; the error names every file looked for and what the folder has."""
        assert self.local_dir is not None
        aliases = SPLIT_ALIASES.get(split, (split,))
        candidates = [pattern.format(split=alias) for alias in aliases for pattern in self.file_patterns]
        for name in candidates:
            if (self.local_dir / name).is_file():
                return self.local_dir / name
        raise FileNotFoundError(
            f"No file for split {split!r} in {self.local_dir}: looked for {candidates}; the folder has "
            f"{list_dir(self.local_dir)}. Choose an existing split with `train_split`, `val_split`, `test_split` "
            "or `calibration_split` (the shared WikiText-2 and PTB copies hold only 'valid' and 'test', so e.g. "
            "train_split='valid')."
        )

    def load_rows(self, split: str) -> list[str]:
        """The split's text rows (lines), before joining."""
        if self.local_dir is not None:
            path = self.local_split_file(split)
            self._sources[split] = str(path)
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            if self.strip_lines:
                return [line.strip() for line in lines]
            return [line if line.strip() else "" for line in lines]
        import datasets

        hf_split = HF_SPLIT_NAMES.get(split, split)
        self._sources[split] = f"hf:{self.dataset}/{self.dataset_config or ''}:{hf_split}"
        return list(datasets.load_dataset(self.dataset, self.dataset_config, split=hf_split)[self.text_column])

    def token_stream(self, split: str) -> torch.Tensor:
        """The split joined with ``join_separator`` and tokenized once, as a 1-D LongTensor (cached)."""
        if split not in self._token_streams:
            text = self.join_separator.join(self.load_rows(split))
            # verbose=False: the whole split is far longer than model_max_length on purpose.
            ids = self.tokenizer(
                text, add_special_tokens=self.add_special_tokens, return_attention_mask=False, verbose=False
            )["input_ids"]
            tokens = torch.tensor(ids, dtype=torch.long)
            if tokens.numel() < self.seq_len:
                raise ValueError(
                    f"`seq_len`={self.seq_len} is longer than split {split!r} ({tokens.numel()} tokens): no "
                    f"window fits. Lower `seq_len` to at most {tokens.numel()}."
                )
            self._token_streams[split] = tokens
        return self._token_streams[split]

    def windows(self, split: str, max_windows: int | None = None) -> TokenWindowDataset:
        """Non-overlapping ``seq_len`` windows of ``split``, remainder dropped, optionally the first ``max_windows``."""
        tokens = self.token_stream(split)
        starts = range(0, tokens.numel() - self.seq_len + 1, self.seq_len)
        return TokenWindowDataset(tokens, starts[:max_windows] if max_windows else starts, self.seq_len)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self.train_dataset = self.windows(self.train_split)
            if self.train_split == self.val_split:
                rank_zero_warn(
                    f"train_split == val_split == {self.val_split!r}: validation perplexity is not held out. "
                    "Evaluate on a different split (e.g. test) for a fair number."
                )
        if stage in ("fit", "validate", None):
            self.val_dataset = self.windows(self.val_split, self.max_eval_windows)
        if stage in ("test", None):
            self.test_dataset = self.windows(self.test_split, self.max_eval_windows)

    # ---------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._train_loader(self.train_dataset)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        return self._eval_loader(self.test_dataset)

    @property
    def calibration_dataset(self) -> TokenWindowDataset:
        """``calibration_samples`` windows at seeded random offsets of ``calibration_split`` (built once)."""
        if self._calibration_dataset is None:
            tokens = self.token_stream(self.calibration_split)
            generator = torch.Generator().manual_seed(self.seed)
            starts = torch.randint(
                0, tokens.numel() - self.seq_len + 1, (self.calibration_samples,), generator=generator
            )
            self._calibration_dataset = TokenWindowDataset(tokens, starts.tolist(), self.seq_len)
        return self._calibration_dataset

    def calibration_dataloader(self, num_replicas: int = 1, rank: int = 0) -> DataLoader:
        """The fixed calibration windows in a fixed order.

        Args:
            num_replicas: Number of processes sharing the set; with ``> 1`` this returns only rank ``rank``'s
                disjoint, unpadded share (statistics summed over ranks then see every window once).
            rank: This process's rank in ``[0, num_replicas)``.
        """
        return self._calibration_loader(self.calibration_dataset, num_replicas, rank)

    # ---------------------------------------------------------------- reporting
    def eval_protocol(self, split: str | None = None) -> dict[str, Any]:
        """What the perplexity of ``split`` (default: ``test_split``) is computed on, for reports."""
        split = split or self.test_split
        tokens = self.token_stream(split)
        total_windows = tokens.numel() // self.seq_len
        used = min(total_windows, self.max_eval_windows or total_windows)
        return {
            "dataset": self.dataset,
            "dataset_config": self.dataset_config,
            "split": split,
            "source": self._sources.get(split),
            "tokenizer": tokenizer_name(self.tokenizer_arg) or self.tokenizer.name_or_path,
            "join_separator": self.join_separator,
            "add_special_tokens": self.add_special_tokens,
            "seq_len": self.seq_len,
            "num_tokens": int(tokens.numel()),
            "num_windows": total_windows,
            "windows_evaluated": used,
            "tokens_evaluated": used * self.seq_len,
            "remainder_tokens_dropped": int(tokens.numel() - total_windows * self.seq_len),
            "max_eval_windows": self.max_eval_windows,
            "windows": "non-overlapping",
            "metric": "perplexity = exp(sum of token NLL / number of predicted tokens), float32 log-softmax",
        }


class WikiText(TextDataModule):
    """WikiText (default: WikiText-2 raw from the Hugging Face hub) with the perplexity protocol.

    For the offline copy pass ``dataset="<path>/wikitext-2-raw"`` (``wiki.valid.raw`` and ``wiki.test.raw``
    only: set ``train_split``/``calibration_split`` to ``"valid"``). Every other argument is
    :class:`TextDataModule`'s.

    Args:
        dataset: Local folder with ``wiki.{train,valid,test}.raw`` or a Hugging Face dataset name.
        dataset_config: Hugging Face configuration, e.g. ``"wikitext-2-raw-v1"`` or ``"wikitext-103-raw-v1"``.
        text_column: Column holding the text in the Hugging Face dataset.
        **kwargs: Any other :class:`TextDataModule` argument.
    """

    def __init__(
        self,
        dataset: str = "wikitext",
        dataset_config: str | None = "wikitext-2-raw-v1",
        text_column: str = "text",
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset=dataset, dataset_config=dataset_config, text_column=text_column, **kwargs)


class PTB(TextDataModule):
    """Penn Treebank (Mikolov's language-modelling version) with the perplexity protocol.

    Rows are stripped lines (the Hugging Face ``ptb_text_only`` convention), joined with ``join_separator``.
    For the offline copy pass ``dataset="<path>/ptb"`` (``valid.txt`` and ``test.txt`` only: set
    ``train_split``/``calibration_split`` to ``"valid"``).

    Args:
        dataset: Local folder with ``ptb.{split}.txt`` or ``{split}.txt``, or a Hugging Face dataset name.
        dataset_config: Hugging Face configuration name.
        text_column: Column holding the text in the Hugging Face dataset.
        strip_lines: Strip every line of a local file (the ``ptb_text_only`` convention).
        **kwargs: Any other :class:`TextDataModule` argument.
    """

    def __init__(
        self,
        dataset: str = "ptb_text_only",
        dataset_config: str | None = "penn_treebank",
        text_column: str = "sentence",
        strip_lines: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dataset=dataset,
            dataset_config=dataset_config,
            text_column=text_column,
            strip_lines=strip_lines,
            **kwargs,
        )
