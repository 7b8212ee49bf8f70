"""Real English text that ships with every Python: the standard library's docstrings, as bytes.

For the offline quickstart and tests that must run with no network and no files outside the installed
packages. Byte-level tokens (vocabulary 256) need no tokenizer. Real runs use ``WikiText``/``PTB``/``GLUE``.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["StdlibText", "stdlib_docstrings"]


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings (at least ``min_chars`` long) of the running Python's top-level stdlib modules, in a fixed order."""
    return list(_stdlib_docstrings(min_chars))


@functools.lru_cache(maxsize=4)
def _stdlib_docstrings(min_chars: int) -> tuple[str, ...]:
    # Parsing the whole stdlib takes seconds: once per process (the text does not change while Python runs).
    docs: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return tuple(docs)


class ByteWindows(Dataset):
    """Windows of ``seq_len`` bytes: seeded random offsets (``count`` given) or non-overlapping, remainder dropped."""

    def __init__(self, data: torch.Tensor, seq_len: int, count: int | None = None, seed: int = 0) -> None:
        self.data, self.seq_len = data, seq_len
        if count is None:
            self.starts = torch.arange(0, len(data) - seq_len + 1, seq_len)
        else:
            generator = torch.Generator().manual_seed(seed)
            self.starts = torch.randint(0, len(data) - seq_len, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.data[self.starts[index] : self.starts[index] + self.seq_len].long()
        return {"input_ids": ids, "labels": ids}


class StdlibText(pl.LightningDataModule):
    """Python's stdlib docstrings (~0.7 MB of English technical prose) as bytes; every 10th docstring is held out.

    Args:
        seq_len: bytes per window.
        batch_size: windows per batch.
        train_windows: seeded random training windows per epoch.
        calibration_samples: seeded random windows from the training text, for compression and whitening.
        val_windows: first non-overlapping held-out windows used for validation (perplexity per byte).
        seed: seed of the random windows.
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 16,
        train_windows: int = 4096,
        calibration_samples: int = 32,
        val_windows: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("seq_len", seq_len),
            ("batch_size", batch_size),
            ("train_windows", train_windows),
            ("calibration_samples", calibration_samples),
            ("val_windows", val_windows),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: use an integer >= 1.")
        self.save_hyperparameters()
        docs = stdlib_docstrings()
        self.train_bytes = self._encode(d for i, d in enumerate(docs) if i % 10)
        self.val_bytes = self._encode(d for i, d in enumerate(docs) if not i % 10)
        if len(self.val_bytes) < seq_len * val_windows:
            raise ValueError(
                f"seq_len * val_windows = {seq_len * val_windows} exceeds the {len(self.val_bytes)} "
                "held-out bytes; lower one of them."
            )

    @staticmethod
    def _encode(parts) -> torch.Tensor:
        return torch.frombuffer(bytearray("\n\n".join(parts).encode("utf-8")), dtype=torch.uint8)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        windows = ByteWindows(self.train_bytes, hp.seq_len, hp.train_windows, hp.seed + 1)
        return DataLoader(windows, batch_size=hp.batch_size)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        windows = ByteWindows(self.val_bytes, hp.seq_len)
        windows.starts = windows.starts[: hp.val_windows]
        return DataLoader(windows, batch_size=hp.batch_size)

    def calibration_dataloader(self) -> DataLoader:
        hp = self.hparams
        windows = ByteWindows(self.train_bytes, hp.seq_len, hp.calibration_samples, hp.seed)
        return DataLoader(windows, batch_size=hp.batch_size)
