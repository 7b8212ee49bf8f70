"""DataModules on the shared offline data: window counts, seeded calibration, GLUE dev sets, ImageNet sample,
bad-input errors, and DDP validation without duplicated samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_text_assets import SHARED_DATA, tiny_llama, wikitext_tokenizer
from torch import nn

from prehab.datamodules import GLUE, GLUE_TASKS, PTB, Alpaca, ImageNet, TextDataModule, WikiText, alpaca_prompt
from prehab.evaluation import evaluate_classification

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent")

WIKI_DIR = SHARED_DATA / "wikitext-2-raw"
PTB_DIR = SHARED_DATA / "ptb"
GLUE_DIR = SHARED_DATA / "glue"
IMAGENET_SAMPLE_DIR = SHARED_DATA / "imagenet-sample-images"
ALPACA_FILE = SHARED_DATA / "alpaca" / "alpaca_5000.json"


@pytest.fixture(scope="module")
def tokenizer():
    return wikitext_tokenizer()


def independent_token_count(tokenizer, path: Path, strip: bool) -> list[int]:
    """The protocol written out by hand: rows as the Hugging Face loaders make them, joined with a blank
    line, encoded by the raw `tokenizers` backend plus the leading <s> the wrapper's template adds."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            rows.append(line.strip() if strip else (line if line.strip() else ""))
    ids = tokenizer.backend_tokenizer.encode("\n\n".join(rows), add_special_tokens=False).ids
    return [tokenizer.bos_token_id, *ids]


@pytest.mark.parametrize(
    ("module_class", "folder", "file_name", "strip"),
    [(WikiText, WIKI_DIR, "wiki.test.raw", False), (PTB, PTB_DIR, "test.txt", True)],
)
def test_perplexity_windows_match_independent_count(tokenizer, module_class, folder, file_name, strip):
    seq_len = 128
    datamodule = module_class(dataset=str(folder), tokenizer=tokenizer, seq_len=seq_len, train_split="valid")
    datamodule.setup("test")
    expected_ids = independent_token_count(tokenizer, folder / file_name, strip)
    expected_windows = len(expected_ids) // seq_len

    assert len(datamodule.test_dataset) == expected_windows
    windows = datamodule.test_dataset.as_tensor()
    assert windows[0].tolist() == expected_ids[:seq_len]
    assert windows[-1].tolist() == expected_ids[(expected_windows - 1) * seq_len : expected_windows * seq_len]
    protocol = datamodule.eval_protocol()
    assert protocol["split"] == "test"
    assert protocol["num_tokens"] == len(expected_ids)
    assert protocol["remainder_tokens_dropped"] == len(expected_ids) % seq_len
    assert protocol["join_separator"] == "\n\n"
    assert protocol["source"].endswith(file_name)


def test_max_eval_windows_keeps_the_first_windows(tokenizer):
    full = WikiText(dataset=str(WIKI_DIR), tokenizer=tokenizer, seq_len=64, train_split="valid")
    capped = WikiText(dataset=str(WIKI_DIR), tokenizer=tokenizer, seq_len=64, train_split="valid", max_eval_windows=3)
    full.setup("test")
    capped.setup("test")
    assert len(capped.test_dataset) == 3
    assert torch.equal(capped.test_dataset.as_tensor(), full.test_dataset.as_tensor()[:3])
    batch = next(iter(capped.test_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (3, 64)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert bool(batch["attention_mask"].all())
    # The batch feeds a Hugging Face causal LM directly.
    loss = tiny_llama(len(tokenizer))(**batch).loss
    assert torch.isfinite(loss)


def calibration_windows(tokenizer, seed: int) -> torch.Tensor:
    datamodule = WikiText(
        dataset=str(WIKI_DIR),
        tokenizer=tokenizer,
        seq_len=64,
        calibration_split="valid",
        train_split="valid",
        calibration_samples=6,
        batch_size=4,
        seed=seed,
    )
    return torch.cat([batch["input_ids"] for batch in datamodule.calibration_dataloader()])


def test_calibration_windows_are_seeded(tokenizer):
    first = calibration_windows(tokenizer, seed=0)
    again = calibration_windows(tokenizer, seed=0)
    other = calibration_windows(tokenizer, seed=1)
    assert first.shape == (6, 64)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Every window is a contiguous slice of the calibration split's token stream.
    stream = WikiText(dataset=str(WIKI_DIR), tokenizer=tokenizer, train_split="valid").token_stream("valid")
    all_windows = stream.unfold(0, 64, 1)
    assert all(bool((all_windows == window).all(dim=1).any()) for window in first)


def test_calibration_shards_are_disjoint_and_complete(tokenizer):
    datamodule = WikiText(
        dataset=str(WIKI_DIR), tokenizer=tokenizer, seq_len=32, train_split="valid", calibration_samples=5, batch_size=8
    )
    whole = next(iter(datamodule.calibration_dataloader()))["input_ids"]
    shard0 = next(iter(datamodule.calibration_dataloader(num_replicas=2, rank=0)))["input_ids"]
    shard1 = next(iter(datamodule.calibration_dataloader(num_replicas=2, rank=1)))["input_ids"]
    assert (len(shard0), len(shard1)) == (3, 2)
    assert torch.equal(torch.cat([shard0, shard1]), whole[[0, 2, 4, 1, 3]])


def test_tokenizer_from_a_saved_folder_and_from_the_model(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    by_name = TextDataModule(dataset=str(WIKI_DIR), tokenizer=str(tmp_path / "tok"), seq_len=64)
    by_instance = TextDataModule(dataset=str(WIKI_DIR), tokenizer=tokenizer, seq_len=64)
    assert torch.equal(by_name.token_stream("valid")[:500], by_instance.token_stream("valid")[:500])
    with pytest.raises(ValueError, match="`tokenizer` is None"):
        TextDataModule(dataset=str(WIKI_DIR), seq_len=64).token_stream("valid")


def test_text_bad_inputs_say_what_was_looked_for(tokenizer, tmp_path):
    missing_train = WikiText(dataset=str(WIKI_DIR), tokenizer=tokenizer, seq_len=64)
    with pytest.raises(FileNotFoundError) as error:
        missing_train.setup("fit")
    message = str(error.value)
    assert "wiki.train.raw" in message and "wiki.valid.raw" in message and "train_split" in message

    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        WikiText(dataset=str(tmp_path / "no_such_corpus"), tokenizer=tokenizer)

    (tmp_path / "wiki.test.raw").write_text(" = Tiny = \n a short text \n", encoding="utf-8")
    too_short = WikiText(dataset=str(tmp_path), tokenizer=tokenizer, seq_len=512)
    with pytest.raises(ValueError, match=r"`seq_len`=512 is longer than split 'test' \(\d+ tokens\)"):
        too_short.setup("test")

    with pytest.raises(ValueError, match="`seq_len` must be an integer >= 2"):
        WikiText(dataset=str(WIKI_DIR), seq_len=0)


# Dev-set sizes and positive-class counts from shared/data/glue/SOURCE.md.
GLUE_DEV = {
    "cola": (1043, 721),
    "sst2": (872, 444),
    "mrpc": (408, 279),
    "rte": (277, 131),  # label 1 = not_entailment (Hugging Face ids)
    "stsb": (1500, None),
}


@pytest.mark.parametrize("task", sorted(GLUE_DEV))
def test_glue_dev_sets_load_with_counts_and_label_types(tokenizer, task):
    rows, positives = GLUE_DEV[task]
    datamodule = GLUE(task=task, tokenizer=tokenizer, dataset=str(GLUE_DIR), batch_size=16)
    datamodule.setup("validate")
    dev = datamodule.eval_datasets["validation"]
    assert len(dev) == rows
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["input_ids"].shape[0] == 16
    if task == "stsb":
        assert datamodule.num_labels == 1 and datamodule.is_regression
        assert batch["labels"].dtype == torch.float32
        scores = torch.tensor(dev["labels"])
        assert 0.0 <= scores.min() and scores.max() <= 5.0 and len(scores.unique()) > 2
    else:
        assert datamodule.num_labels == 2
        assert batch["labels"].dtype == torch.int64
        assert sum(dev["labels"]) == positives


def test_glue_sentence_pairs_are_encoded_as_pairs(tokenizer):
    pair = GLUE(task="mrpc", tokenizer=tokenizer, dataset=str(GLUE_DIR))
    single = GLUE(task="sst2", tokenizer=tokenizer, dataset=str(GLUE_DIR))
    pair.setup("validate")
    single.setup("validate")
    separator = tokenizer.eos_token_id  # the tiny tokenizer's pair template: <s> A </s> B
    assert all(separator in ids for ids in pair.eval_datasets["validation"]["input_ids"][:20])
    assert not any(separator in ids for ids in single.eval_datasets["validation"]["input_ids"][:20])


def test_glue_calibration_is_seeded_and_unknown_task_lists_valid_ones(tokenizer):
    def calibration_labels(seed):
        datamodule = GLUE(task="rte", tokenizer=tokenizer, dataset=str(GLUE_DIR), calibration_samples=8, seed=seed)
        return [row.tolist() for batch in datamodule.calibration_dataloader() for row in batch["input_ids"]]

    assert calibration_labels(0) == calibration_labels(0)
    assert calibration_labels(0) != calibration_labels(1)
    assert len(calibration_labels(0)) == 8

    with pytest.raises(ValueError) as error:
        GLUE(task="squad")
    assert all(name in str(error.value) for name in GLUE_TASKS) and "squad" in str(error.value)
    with pytest.raises(FileNotFoundError, match="MNLI"):
        GLUE(task="mnli", dataset=str(GLUE_DIR))


def test_alpaca_prompt_masking_cutoff_and_val_split(tokenizer):
    with_input = alpaca_prompt("Translate.", "Bonjour")
    without_input = alpaca_prompt("Say hi.")
    assert with_input.endswith("### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:")
    assert "### Input:" not in without_input and without_input.startswith("Below is an instruction")

    datamodule = Alpaca(dataset=str(ALPACA_FILE), tokenizer=tokenizer, cutoff_len=2048, val_size=300, seed=3)
    record = {"instruction": ["Say hi."], "input": [""], "output": ["hi there"]}
    encoded = datamodule.tokenize(record)
    prompt_len = len(tokenizer(without_input)["input_ids"])
    labels, input_ids = encoded["labels"][0], encoded["input_ids"][0]
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == input_ids[prompt_len:]
    assert input_ids[-1] == tokenizer.eos_token_id
    datamodule.cutoff_len = 10
    assert len(datamodule.tokenize(record)["input_ids"][0]) == 10

    datamodule.cutoff_len = 2048
    datamodule.setup("fit")
    assert (len(datamodule.train_dataset), len(datamodule.val_dataset)) == (4700, 300)
    batch = next(iter(datamodule.val_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    padding = batch["attention_mask"] == 0
    assert bool((batch["labels"][padding] == -100).all())
    assert bool((batch["labels"] != -100).any(dim=1).all())


def test_imagenet_sample_folder_transforms_and_labels():
    datamodule = ImageNet(
        root=str(IMAGENET_SAMPLE_DIR),
        model_name="vit_tiny_patch16_224",
        data_config={"input_size": (3, 64, 64)},
        calibration_split="val",
        calibration_samples=5,
        max_eval_samples=6,
        batch_size=3,
        num_workers=2,
    )
    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    # The sample holds the even ImageNet-1k classes; ids follow the sorted 1000-wnid order.
    assert labels.dtype == torch.int64 and bool(((labels >= 0) & (labels < 1000) & (labels % 2 == 0)).all())
    assert datamodule.data_config["mean"] == (0.5, 0.5, 0.5)  # from the ViT's pretrained config

    folders = ImageNet(
        root=str(IMAGENET_SAMPLE_DIR),
        label_space="folders",
        data_config={"input_size": (3, 32, 32)},
        calibration_split="val",
        calibration_samples=5,
        batch_size=5,
        num_workers=0,
    )
    assert folders.num_classes == 500
    folder_images, folder_labels = next(iter(folders.calibration_dataloader()))
    imagenet_labels = torch.cat([labels for _, labels in datamodule.calibration_dataloader()])
    assert folder_images.shape == (5, 3, 32, 32)
    assert torch.equal(imagenet_labels, 2 * folder_labels)  # same seeded images, two label spaces

    with pytest.raises(FileNotFoundError, match="calibration_split='val'"):
        datamodule.train_dataloader()
    with pytest.raises(ValueError, match="label_space"):
        ImageNet(root=str(IMAGENET_SAMPLE_DIR), label_space="coco")


def test_ddp_validation_counts_every_window_once(tokenizer, tmp_path):
    """2 CPU processes (gloo): the validation perplexity equals the single-process one, with 5 windows over
    2 ranks, where Lightning's padded DistributedSampler would count a window twice."""
    tokenizer.save_pretrained(tmp_path / "tok")
    script = Path(__file__).resolve().parent / "ddp_validation_script.py"
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "tok"), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    assert report["windows_seen"] == report["num_windows"] == 5
    assert report["ddp_ppl"] == pytest.approx(report["single_process_ppl"], rel=1e-5)
    assert abs(report["padded_ppl"] - report["single_process_ppl"]) > 1e-3 * report["single_process_ppl"]


def write_mnli_folder(root: Path) -> None:
    """A 3-row-per-file MNLI folder in the glue_data layout (real header, gold_label last)."""
    header = [
        "index",
        "promptID",
        "pairID",
        "genre",
        "sentence1_binary_parse",
        "sentence2_binary_parse",
        "sentence1_parse",
        "sentence2_parse",
        "sentence1",
        "sentence2",
        "label1",
        "gold_label",
    ]
    labels = ["neutral", "contradiction", "entailment"]
    (root / "MNLI").mkdir(parents=True)
    for stem in ("train", "dev_matched", "dev_mismatched"):
        lines = ["\t".join(header)]
        for i, label in enumerate(labels):
            lines.append(
                "\t".join(
                    [
                        str(i),
                        "1",
                        "1n",
                        stem,
                        "(a)",
                        "(b)",
                        "(a)",
                        "(b)",
                        f"The {stem} premise {i} .",
                        f"A hypothesis {i} .",
                        label,
                        label,
                    ]
                )
            )
        (root / "MNLI" / f"{stem}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_mnli_has_matched_and_mismatched_validation(tokenizer, tmp_path):
    write_mnli_folder(tmp_path)
    datamodule = GLUE(task="mnli", tokenizer=tokenizer, dataset=str(tmp_path), batch_size=8)
    loaders = datamodule.val_dataloader()
    assert datamodule.eval_split_names == ["validation_matched", "validation_mismatched"]
    assert isinstance(loaders, list) and len(loaders) == 2
    labels = [next(iter(loader))["labels"].tolist() for loader in loaders]
    assert labels == [[1, 2, 0], [1, 2, 0]]  # Hugging Face ids: entailment 0, neutral 1, contradiction 2
    assert datamodule.num_labels == 3
    assert evaluate_classification(
        nn.Identity(), [(torch.eye(3)[[1, 2, 2]], torch.tensor([1, 2, 0]))], datamodule.metrics()
    ) == {"accuracy": pytest.approx(2 / 3)}
