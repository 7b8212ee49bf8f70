"""Run a shipped LightningCLI config end to end on tiny local substitutes (no download, a few seconds each).

Only paths and sizes change; the config's structure (classes, callbacks, their other arguments, the logger,
precision, the task) stays as shipped:

* the model becomes a tiny folder written here: a 2-layer Llama (causal LM configs), a 2-layer BERT with the
  config's ``num_labels`` (GLUE configs), a tiny timm ViT whose "pretrained" weights are a local file (the
  ImageNet config), or a tiny 28x28 grayscale ViT timm folder for a ``timm:local-dir:`` model (the Fashion-MNIST
  config); the offline quickstart keeps its packaged ``prehab:byte-llama``;
* the data becomes a few rows in the config's own format, taken from ``../shared/data`` where it exists
  (WikiText-2 lines, GLUE TSV rows, ImageNet sample images, the first Fashion-MNIST images when Debian's package is
  installed, random IDX images otherwise) and written in the GLUE layout otherwise;
* every callback's ``save_dir``/``dirpath`` and a logger's ``save_dir`` go under ``tmp_path``, and sizes found
  in any callback's ``init_args`` (``calibration_batches``, ``steps_per_factor``, ...) shrink, so a callback
  added to a config later is handled too; a datamodule inside a callback's arguments (LoRARehab's
  ``datamodule: Alpaca``) reads a few local rows;
* the trainer runs one step on the CPU with the config's logger (Lightning's default logger when the config
  names none) writing under ``tmp_path``.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from tiny_image_assets import tiny_fashion_mnist, tiny_fashion_vit
from tiny_text_assets import SHARED_DATA, word_level_tokenizer
from tiny_text_assets import tiny_llama as tiny_llama_for

from prehab.cli import cli

VIT_SHAPE = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
ROWS = 24  # rows per GLUE split
# Callback init_args that are sizes: shrunk to this value (any integer argument whose name ends so).
CALLBACK_SIZES = {"calibration_batches": 2, "steps_per_factor": 1, "max_steps": 1, "steps": 1}
# Datamodule init_args that are sizes, by class name (only those the class accepts).
DATA_SIZES: dict[str, dict[str, Any]] = {
    "TextDataModule": {"seq_len": 32, "calibration_samples": 4, "max_eval_windows": 2, "batch_size": 2},
    "GLUE": {"max_length": 32, "calibration_samples": 4, "batch_size": 4, "heldout_samples": 4, "max_eval_samples": 8},
    "ImageNet": {
        "calibration_samples": 2,
        "max_eval_samples": 4,
        "batch_size": 2,
        "num_workers": 0,
        "data_config": {"input_size": [3, 32, 32]},
    },
    "StdlibText": {"seq_len": 32, "batch_size": 2, "train_windows": 8, "calibration_samples": 4, "val_windows": 2},
    "FashionMNIST": {
        "heldout_samples": 8,
        "train_samples": 32,
        "max_eval_samples": 8,
        "calibration_samples": 4,
        "batch_size": 4,
        "num_workers": 0,
    },
}
# Sizes set only when the config sets them (subsets a config opts into), so other configs keep their data as is.
OPTIONAL_SIZES = ("heldout_samples", "max_train_samples", "train_samples", "max_eval_samples")
DATA_KINDS = {"WikiText": "TextDataModule", "PTB": "TextDataModule", "TextDataModule": "TextDataModule"}


# ---------------------------------------------------------------------------------------------- tiny assets
class TinyAssets:
    """Tiny models and data under ``root``, built once per test session and shared by every config."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._bert: dict[int, Path] = {}
        self.wikitext = self._wikitext()
        self.glue = self._glue()
        self.imagenet = self._imagenet()
        self.llama = self._llama()
        self.vit_weights = self._vit()
        self.fashion_mnist = tiny_fashion_mnist(root / "fashion-mnist")  # first images of the real files if installed
        self.fashion_vit = tiny_fashion_vit(root / "tiny-fashion-vit")

    def _wikitext(self) -> Path:
        folder = self.root / "wikitext-2-raw"
        folder.mkdir(parents=True)
        for split, source in (("train", "valid"), ("valid", "valid"), ("test", "test")):
            lines = (SHARED_DATA / "wikitext-2-raw" / f"wiki.{source}.raw").read_text(encoding="utf-8").splitlines()
            (folder / f"wiki.{split}.raw").write_text("\n".join(lines[:120]) + "\n", encoding="utf-8")
        return folder

    def _glue(self) -> Path:
        """A ``glue_data`` folder with all nine tasks: the shared ones capped to ``ROWS`` rows, the others
        (QQP, MNLI, QNLI, WNLI) written in their official TSV layouts from RTE sentence pairs."""
        shared, folder = SHARED_DATA / "glue", self.root / "glue"
        for task in ("CoLA", "SST-2", "MRPC", "RTE", "STS-B"):
            (folder / task).mkdir(parents=True)
            for split in ("train", "dev"):
                with (shared / task / f"{split}.tsv").open(encoding="utf-8-sig") as handle:
                    lines = [next(handle) for _ in range(ROWS + 1)]
                (folder / task / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
        with (shared / "RTE" / "train.tsv").open(encoding="utf-8") as handle:
            pairs = [row[1:3] for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)][1 : ROWS + 1]
        nli = ("entailment", "neutral", "contradiction")
        layouts = {  # task: (header, dev files, row from (index, first text, second text))
            "QQP": (
                ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                ("dev",),
                lambda i, a, b: [i, i, i, a, b, i % 2],
            ),
            "QNLI": (
                ["index", "question", "sentence", "label"],
                ("dev",),
                lambda i, a, b: [i, a, b, ("entailment", "not_entailment")[i % 2]],
            ),
            "WNLI": (["index", "sentence1", "sentence2", "label"], ("dev",), lambda i, a, b: [i, a, b, i % 2]),
            "MNLI": (
                ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1", "gold_label"],
                ("dev_matched", "dev_mismatched"),
                lambda i, a, b: [i, i, i, "fiction", a, b, nli[(i + 1) % 3], nli[i % 3]],
            ),
        }
        for task, (header, dev_splits, row) in layouts.items():
            (folder / task).mkdir()
            for split in ("train", *dev_splits):
                with (folder / task / f"{split}.tsv").open("w", encoding="utf-8", newline="") as handle:
                    writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
                    writer.writerow(header)
                    writer.writerows(row(i, a, b) for i, (a, b) in enumerate(pairs))
        return folder

    def _imagenet(self) -> Path:
        """``train/<wnid>/`` and ``val/<wnid>/`` with one shared sample image per class, four classes."""
        folder = self.root / "imagenet"
        classes = sorted(p for p in (SHARED_DATA / "imagenet-sample-images").iterdir() if p.is_dir())[:4]
        for split in ("train", "val"):
            for wnid in classes:
                (folder / split / wnid.name).mkdir(parents=True)
                image = next(wnid.glob("*.JPEG"))
                shutil.copy(image, folder / split / wnid.name / image.name)
        return folder

    def _llama(self) -> Path:
        folder = self.root / "tiny-llama"
        tokenizer = word_level_tokenizer((self.wikitext / "wiki.train.raw").read_text().splitlines(), 400)
        tiny_llama_for(len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    def bert(self, num_labels: int) -> Path:
        """A 2-layer BERT classifier with ``num_labels`` outputs and a tokenizer trained on the GLUE rows."""
        if num_labels not in self._bert:
            from transformers import BertConfig, BertForSequenceClassification

            texts = [line for path in sorted(self.glue.rglob("*.tsv")) for line in path.read_text().splitlines()]
            tokenizer = word_level_tokenizer(texts, 400)
            config = BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
                num_labels=num_labels,
                pad_token_id=tokenizer.pad_token_id,
            )
            torch.manual_seed(0)
            folder = self.root / f"tiny-bert-{num_labels}"
            BertForSequenceClassification(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            self._bert[num_labels] = folder
        return self._bert[num_labels]

    def _vit(self) -> Path:
        """Weights of a tiny timm ViT with the ImageNet-1k head, loaded through timm's ``pretrained_cfg_overlay``
        (``file=``), so a config's ``pretrained: true`` path runs without a download."""
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, **VIT_SHAPE)
        path = self.root / "tiny-vit.safetensors"
        save_file(model.state_dict(), str(path))
        return path


# ---------------------------------------------------------------------------------------------- the runner
def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


# Datamodules given inside a callback's init_args (e.g. LoRARehab's Alpaca): local data and small sizes.
NESTED_DATA = {
    "Alpaca": {
        "dataset": str(SHARED_DATA / "alpaca" / "alpaca_5000.json"),
        "max_samples": 16,
        "val_size": 0,
        "cutoff_len": 32,
        "batch_size": 2,
    },
}


def _shrink_callback_args(init_args: dict[str, Any], out: Path) -> None:
    for key, value in list(init_args.items()):
        if isinstance(value, dict) and "class_path" in value:
            nested = value.setdefault("init_args", {})
            nested.update(NESTED_DATA.get(_short(value["class_path"]), {}))
            _shrink_callback_args(nested, out / key)
        elif key.endswith("save_dir") or key in ("dirpath", "output_dir"):
            init_args[key] = str(out / key)
        elif isinstance(value, int) and not isinstance(value, bool):
            size = next((v for suffix, v in CALLBACK_SIZES.items() if key.endswith(suffix)), None)
            if size is not None:
                init_args[key] = min(value, size)


def substituted_config(path: Path, out: Path) -> Path:
    """A copy of the config whose callbacks and logger write under ``out`` and calibrate on few batches."""
    config = yaml.safe_load(path.read_text())
    trainer = config.setdefault("trainer", {})
    for callback in trainer.get("callbacks") or []:
        _shrink_callback_args(callback.setdefault("init_args", {}), out / "callbacks" / _short(callback["class_path"]))
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and "save_dir" in logger.get("init_args", {}):
            logger["init_args"]["save_dir"] = str(out / "logs")
    copy = out / path.name
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


def _flag(key: str, value: Any) -> list[str]:
    return [f"--{key}", json.dumps(value) if isinstance(value, dict | list | bool) or value is None else str(value)]


def config_args(path: Path, assets: TinyAssets, out: Path) -> list[str]:
    """``prehab fit`` arguments that run ``path`` for one step on the tiny assets."""
    config = yaml.safe_load(path.read_text())
    trainer, model, data = config.get("trainer", {}), config["model"], config["data"]
    args = ["fit", "--config", str(substituted_config(path, out))]
    args += _flag("trainer.max_steps", 1) + _flag("trainer.accelerator", "cpu") + _flag("trainer.devices", 1)
    args += _flag("trainer.default_root_dir", out / "root") + _flag("trainer.limit_val_batches", 1)
    args += _flag("trainer.enable_progress_bar", False)
    if "val_check_interval" in trainer:
        args += _flag("trainer.val_check_interval", 1)

    task, name = model.get("task", "causal_lm"), str(model["model"])
    if task == "causal_lm" and not name.startswith("prehab:"):
        args += _flag("model.model", assets.llama)
    elif task in ("sequence_classification", "regression"):
        args += _flag("model.model", assets.bert(model.get("num_labels") or 1))
    elif task == "image_classification" and name.startswith("timm:local-dir:"):  # a timm folder (Fashion-MNIST ViT)
        args += _flag("model.model", f"timm:local-dir:{assets.fashion_vit}")
    elif task == "image_classification":
        overlay = {"pretrained_cfg_overlay": {"file": str(assets.vit_weights)}}  # timm loads "pretrained" from it
        kwargs = {**(model.get("model_kwargs") or {}), **VIT_SHAPE, **overlay}
        args += _flag("model.model", "timm:vit_tiny_patch16_224") + _flag("model.model_kwargs", kwargs)
    args += _flag("model.calibration_batches", 2)

    kind = DATA_KINDS.get(_short(data["class_path"]), _short(data["class_path"]))
    source = {
        "TextDataModule": ("dataset", assets.wikitext),
        "GLUE": ("dataset", assets.glue),
        "ImageNet": ("root", assets.imagenet),
        "FashionMNIST": ("root", assets.fashion_mnist),
    }
    if kind in source:
        args += _flag(f"data.init_args.{source[kind][0]}", source[kind][1])
    for key, value in DATA_SIZES.get(kind, {}).items():
        if key not in OPTIONAL_SIZES or key in data.get("init_args", {}):
            args += _flag(f"data.init_args.{key}", value)
    if kind == "FashionMNIST":
        args += _flag("data.init_args.cache_dir", out / "fashion-mnist-cache")
    return args


def run_config(path: Path, assets: TinyAssets, out: Path) -> Any:
    """Run ``prehab fit`` on ``path`` with tiny substitutes; returns the LightningCLI object."""
    out.mkdir(parents=True, exist_ok=True)
    return cli(config_args(path, assets, out))
