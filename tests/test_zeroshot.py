"""Zero-shot evaluation with lm-evaluation-harness: the local GLUE tasks offline, the scoring against a direct
log-likelihood reference, the ZeroShotEval callback in a `prehab fit` run, and the errors."""

from __future__ import annotations

import csv
import json
import logging
import re
import sys

import lightning.pytorch as pl
import pytest
import torch
from tiny_text_assets import SHARED_DATA, tiny_llama, word_level_tokenizer
from torch import nn

from prehab.callbacks import SVD, ZeroShotEval
from prehab.zeroshot import INSTALL_HINT, check_arguments, completion_examples, load_glue, zero_shot

GLUE = SHARED_DATA / "glue"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"shared GLUE data {GLUE} is absent")
WORDS = "Question Answer True False positive negative Is this sentence or"


def _glue_rows(folder: str) -> list[dict[str, str]]:
    with (GLUE / folder / "dev.tsv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the RTE and SST-2 dev text (every answer word is in its vocabulary)."""
    if not GLUE.is_dir():
        pytest.skip(f"shared GLUE data {GLUE} is absent")
    texts = [WORDS] * 50 + [r["sentence"] for r in _glue_rows("SST-2")]
    texts += [r["sentence1"] + " " + r["sentence2"] for r in _glue_rows("RTE")]
    return word_level_tokenizer(texts, vocab_size=256)


@pytest.fixture()
def model(tokenizer):
    return tiny_llama(len(tokenizer), seed=0)


# ---------------------------------------------------------------------- without lm-eval
def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ImportError, match=f"lm-eval.*not installed.*{re.escape(INSTALL_HINT)}"):
        check_arguments(["prehab_rte"])
    with pytest.raises(ImportError, match="prehab\\[zeroshot\\]"):
        ZeroShotEval(tasks=["prehab_sst2"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": []}, r"tasks=\[\] is invalid: use a non-empty list"),
        ({"tasks": "prehab_rte"}, "tasks='prehab_rte' is invalid"),
        ({"tasks": ["prehab_rte", ""]}, "every task name must be a non-empty string"),
        ({"tasks": ["prehab_rte", "prehab_rte"]}, "names a task twice"),
        ({"tasks": ["prehab_rte"], "limit": 0}, "limit=0 is invalid"),
        ({"tasks": ["prehab_rte"], "limit": -3}, "limit=-3 is invalid"),
        ({"tasks": ["prehab_rte"], "limit": 1.5}, "limit=1.5 is invalid"),
        ({"tasks": ["prehab_rte"], "batch_size": 0}, "batch_size=0 is invalid"),
        ({"tasks": ["prehab_rte"], "num_fewshot": -1}, "num_fewshot=-1 is invalid"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_arguments(**kwargs)
    with pytest.raises(ValueError, match=message):
        ZeroShotEval(**kwargs)


# ---------------------------------------------------------------------- with lm-eval
@needs_glue
def test_unknown_local_task_suggests_the_close_name():
    pytest.importorskip("lm_eval")
    with pytest.raises(
        ValueError, match=r"unknown task 'prehab_rtee' \(did you mean 'prehab_rte'.*Local tasks.*prehab_sst2"
    ):
        check_arguments(["prehab_rtee"], data_dir=SHARED_DATA)


def test_missing_data_dir_names_the_folder_and_the_variable(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("PREHAB_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"prehab_sst2.*{tmp_path}.*glue/SST-2/dev.tsv.*PREHAB_DATA"):
        check_arguments(["prehab_sst2"])


@needs_glue
def test_local_tasks_load_offline_with_the_glue_labels():
    rte, sst2 = load_glue("prehab_rte", SHARED_DATA), load_glue("prehab_sst2", GLUE)  # data_dir or glue/ itself
    assert (len(rte["validation"]), len(rte["train"]), len(sst2["validation"])) == (277, 2490, 872)
    # Class balance from shared/data/glue/SOURCE.md: RTE 146 entailment (class 0 = "True"), SST-2 444 positive.
    assert rte["validation"]["label"].count(0) == 146 and sst2["validation"]["label"].count(1) == 444
    assert rte["validation"][0]["sentence2"] == "Christopher Reeve had an accident."

    pytest.importorskip("lm_eval")
    from prehab.zeroshot import _prepare

    manager = _prepare(["prehab_rte"], SHARED_DATA)[1]
    task = manager.load(["prehab_rte"])["tasks"]["prehab_rte"]
    doc = task.validation_docs()[1]
    question = "Question: Bacteria is winning the war against antibiotics. True or False?\nAnswer:"
    assert task.doc_to_text(doc).endswith(question)
    assert task.doc_to_choice(doc) == ["True", "False"] and task.doc_to_target(doc) == 0  # entailment


def _reference_accuracy(model, tokenizer, docs) -> tuple[float, list[int]]:
    """RTE accuracy by scoring each answer's log-likelihood with the model directly, one sequence at a time."""
    predictions = []
    for doc in docs:
        context = f"{doc['sentence1']}\nQuestion: {doc['sentence2']} True or False?\nAnswer:"
        scores = []
        for choice in ("True", "False"):
            context_ids = tokenizer(context)["input_ids"]
            ids = tokenizer(f"{context} {choice}")["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
        predictions.append(int(scores[1] > scores[0]))
    return sum(p == d["label"] for p, d in zip(predictions, docs, strict=True)) / len(docs), predictions


@needs_glue
def test_accuracy_matches_a_direct_log_likelihood_reference_on_a_compressed_model(model, tokenizer):
    pytest.importorskip("lm_eval")
    with torch.no_grad():  # large weights: a random model whose answer depends on the question
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.mul_(20)
    SVD(ratio=0.5).compress(model, None, progress=False)  # LowRankLinear layers, scored in memory
    model.train()
    limit = 12
    results = zero_shot(model, tokenizer, ["prehab_rte"], limit=limit, data_dir=SHARED_DATA)

    assert set(results) == {"prehab_rte"} and set(results["prehab_rte"]) == {"acc", "acc_stderr"}
    assert all(m.training for m in model.modules())  # the model's train flags are restored
    docs = load_glue("prehab_rte", SHARED_DATA)["validation"].select(range(limit))
    expected, predictions = _reference_accuracy(model.eval(), tokenizer, list(docs))
    assert 0 < sum(predictions) < limit  # the reference does not pick one answer for every example
    assert results["prehab_rte"]["acc"] == pytest.approx(expected)


def _sentence(i: int, words: int = 12) -> str:
    return " ".join(f"w{i}x{k}" for k in range(words)) + " ."


def test_completion_examples_keep_each_sentence_s_own_ending_and_never_its_partner_s():
    # 30 pairs of distinct 12-word sentences, plus a duplicate pair and a pair whose second sentence is too short
    pairs = [(_sentence(2 * i), _sentence(2 * i + 1)) for i in range(30)]
    pairs += [pairs[0], (_sentence(99), "too short .")]
    examples = completion_examples(pairs, seed=3)

    sentences = [_sentence(i).replace(" .", ".") for i in range(60)] + [_sentence(99).replace(" .", ".")]
    assert examples["context"] == [" ".join(s.split()[:6]) for s in sentences]  # deduplicated, short ones dropped
    partner = {2 * i: 2 * i + 1 for i in range(30)} | {2 * i + 1: 2 * i for i in range(30)}
    for i, (endings, label) in enumerate(zip(examples["endings"], examples["label"], strict=True)):
        assert len(endings) == 4 == len(set(endings))
        assert f"{examples['context'][i]} {endings[label]}" == sentences[i]  # its own ending, where label says
        if i in partner:
            assert not any(e.startswith(f"w{partner[i]}x") for e in endings)  # never the paraphrase's ending
    assert len(set(examples["label"])) == 4  # the answer's position varies
    assert completion_examples(pairs, seed=3) == examples  # the same examples on every run
    assert completion_examples(pairs, seed=4)["endings"] != examples["endings"]
    with pytest.raises(ValueError, match="need more than 16 sentences of 10"):
        completion_examples(pairs[:8])
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match=rf"choices={bad!r} is invalid: use an integer >= 2"):
            completion_examples(pairs, choices=bad)
    assert {len(e) for e in completion_examples(pairs, choices=2)["endings"]} == {2}


@needs_glue
def test_mrpc_completion_loads_offline_and_reads_as_plain_english():
    task = load_glue("prehab_mrpc_completion", SHARED_DATA)
    # 408 dev pairs -> 797 distinct sentences of 10+ words; train: 3668 pairs -> 6916
    assert (task["validation"].num_rows, task["train"].num_rows) == (797, 6916)
    first = task["validation"][0]
    assert first["context"] == "He said the foodservice pie business"
    assert first["endings"][first["label"]] == "doesn't fit the company's long-term growth strategy."
    assert task["validation"][1]["context"].startswith('"The foodservice')  # quotes and contractions rejoined

    pytest.importorskip("lm_eval")
    from prehab.zeroshot import _prepare

    manager = _prepare(["prehab_mrpc_completion"], SHARED_DATA)[1]
    loaded = manager.load(["prehab_mrpc_completion"])["tasks"]["prehab_mrpc_completion"]
    doc = loaded.validation_docs()[0]
    assert loaded.doc_to_text(doc) == first["context"] and loaded.doc_to_choice(doc) == first["endings"]
    assert loaded.doc_to_target(doc) == first["label"]


@needs_glue
def test_completion_accuracy_and_its_length_normalized_form_match_a_direct_reference():
    pytest.importorskip("lm_eval")
    rows = _glue_rows("MRPC")
    news = word_level_tokenizer([r["#1 String"] + " " + r["#2 String"] for r in rows], vocab_size=512)
    model = tiny_llama(len(news), seed=1)
    limit = 10
    task = "prehab_mrpc_completion"
    results = zero_shot(model, news, [task], limit=limit, data_dir=SHARED_DATA)[task]

    docs = list(load_glue("prehab_mrpc_completion", SHARED_DATA)["validation"].select(range(limit)))
    plain, normalized = [], []
    for doc in docs:
        scores = []
        for ending in doc["endings"]:
            context_ids = news(doc["context"])["input_ids"]
            ids = news(f"{doc['context']} {ending}")["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
        # lm-eval's acc_norm: log-likelihood per character of the answer (HellaSwag's rule)
        plain.append(max(range(4), key=lambda k: scores[k]) == doc["label"])
        normalized.append(max(range(4), key=lambda k: scores[k] / len(doc["endings"][k])) == doc["label"])
    assert results["acc"] == pytest.approx(sum(plain) / limit)
    assert results["acc_norm"] == pytest.approx(sum(normalized) / limit)
    assert plain != normalized  # the two rules disagree somewhere, so both are checked


@needs_glue
@pytest.mark.parametrize("favoured", ["positive", "negative"])
def test_a_model_that_always_answers_one_word_scores_that_class_share(model, tokenizer, favoured):
    pytest.importorskip("lm_eval")
    head = nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    head.bias.data[tokenizer.convert_tokens_to_ids(favoured)] = 5.0  # every next token: `favoured` most likely
    model.lm_head = head
    limit = 20
    results = zero_shot(model, tokenizer, ["prehab_sst2"], limit=limit, data_dir=SHARED_DATA, batch_size=4)
    labels = [int(row["label"]) for row in _glue_rows("SST-2")[:limit]]
    share = labels.count(1 if favoured == "positive" else 0) / limit
    assert 0 < share < 1 and results["prehab_sst2"]["acc"] == pytest.approx(share)


@needs_glue
def test_data_dir_comes_from_the_environment(tmp_path, monkeypatch, model, tokenizer):
    pytest.importorskip("lm_eval")
    folder = tmp_path / "glue" / "RTE"
    folder.mkdir(parents=True)
    rows = (GLUE / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "dev.tsv").write_text("".join(rows[:4]), encoding="utf-8")  # header + 3 examples, no train.tsv
    monkeypatch.setenv("PREHAB_DATA", str(tmp_path))
    results = zero_shot(model, tokenizer, ["prehab_rte"])
    assert results["prehab_rte"]["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert load_glue("prehab_rte")["validation"].num_rows == 3
    with pytest.raises(FileNotFoundError, match=r"num_fewshot=1 takes the examples from the training split.*train.tsv"):
        zero_shot(model, tokenizer, ["prehab_rte"], num_fewshot=1)


@needs_glue
def test_few_shot_takes_examples_from_the_training_split(model, tokenizer):
    pytest.importorskip("lm_eval")
    results = zero_shot(model, tokenizer, ["prehab_rte"], limit=2, num_fewshot=2, data_dir=SHARED_DATA)
    assert results["prehab_rte"]["acc"] in (0.0, 0.5, 1.0)
    assert load_glue("prehab_rte", SHARED_DATA, train=False)["train"].num_rows == 0


def test_standard_task_without_the_hub_says_so(model, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"unknown task 'piqaa' \(did you mean 'piqa'"):
        check_arguments(["piqaa"])
    with pytest.raises(RuntimeError, match=r"task\(s\) \['piqa'\]: the Hugging Face Hub is unreachable.*prehab_rte"):
        zero_shot(model, tokenizer, ["piqa"], limit=2)


# ---------------------------------------------------------------------- the callback, from the command line
CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 0
  enable_checkpointing: false
  enable_model_summary: false
  enable_progress_bar: false
  num_sanity_val_steps: 0
  default_root_dir: {out}
  logger:
    class_path: CSVLogger
    init_args:
      save_dir: {out}
  callbacks:
    - class_path: SVD
      init_args:
        ratio: 0.5
        save_dir: {out}
        plots: false
    - class_path: ZeroShotEval
      init_args:
        tasks: [prehab_sst2, prehab_rte]
        limit: 4
        batch_size: 4
        data_dir: {data}
        tokenizer: {tokenizer}
model:
  model: prehab:byte-llama
  pretrained: false
  model_kwargs: {{num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64, head_dim: 8}}
data:
  class_path: StdlibText
  init_args:
    seq_len: 32
    batch_size: 4
    train_windows: 8
    calibration_samples: 8
    val_windows: 4
"""


@needs_glue
def test_callback_adds_zero_shot_numbers_to_the_report_and_the_logger(tmp_path, tokenizer):
    pytest.importorskip("lm_eval")
    from prehab.cli import cli

    byte_vocab = word_level_tokenizer([WORDS] * 50 + [r["sentence"] for r in _glue_rows("SST-2")], vocab_size=256)
    byte_vocab.save_pretrained(tmp_path / "tokenizer")  # byte-llama has 256 embeddings: a 256-word vocabulary
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(out=out, data=SHARED_DATA, tokenizer=tmp_path / "tokenizer"))
    run = cli(["fit", "--config", str(config)])

    callback = next(c for c in run.trainer.callbacks if isinstance(c, ZeroShotEval))
    assert set(callback.results) == {"prehab_sst2", "prehab_rte"}
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][-1]
    assert stage["name"] == "svd"
    for task in ("prehab_sst2", "prehab_rte"):
        assert stage["metrics"][f"zeroshot/{task}/acc"] == pytest.approx(callback.results[task]["acc"])
        assert 0.0 <= callback.results[task]["acc"] <= 1.0
    assert "zeroshot/prehab_rte/acc" in (out / "report.md").read_text()
    logged = next(out.rglob("metrics.csv")).read_text()
    assert "zeroshot/prehab_sst2/acc" in logged


def test_callback_refuses_a_missing_data_folder_at_construction(tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(FileNotFoundError, match="prehab_rte"):
        ZeroShotEval(tasks=["prehab_rte"], data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="tokenizer='' is invalid"):
        ZeroShotEval(tasks=["prehab_rte"], data_dir=str(SHARED_DATA), tokenizer="")


@needs_glue
def test_callback_without_compression_scores_the_dense_model_with_the_module_tokenizer(model, tokenizer, caplog):
    pytest.importorskip("lm_eval")
    from conftest import fast_trainer, loader_for

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tokenizer = model, tokenizer

        def forward(self, input_ids, attention_mask=None):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

        def training_step(self, batch, batch_idx):
            return self(batch["input_ids"]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    callback = ZeroShotEval(tasks=["prehab_sst2"], limit=3, data_dir=str(SHARED_DATA))
    trainer = fast_trainer(callbacks=[callback, SVD(ratio=0.5)], max_steps=0)
    with caplog.at_level(logging.WARNING, logger="prehab"):
        trainer.fit(Module(), train_dataloaders=loader_for("llama", n=8))
    assert "ZeroShotEval comes before SVD" in caplog.text
    assert set(callback.results) == {"prehab_sst2"} and callback.results["prehab_sst2"]["acc"] in (0, 1 / 3, 2 / 3, 1)
    assert not any("zeroshot" in k for stage in trainer.callbacks[1].report.stages for k in stage.metrics)


@needs_glue
def test_callback_without_a_tokenizer_fails_at_fit_start():
    pytest.importorskip("lm_eval")
    from conftest import TinyModule, fast_trainer, loader_for

    callback = ZeroShotEval(tasks=["prehab_sst2"], limit=2, data_dir=str(SHARED_DATA))
    trainer = fast_trainer(callbacks=[SVD(ratio=0.5), callback], max_steps=1)
    with pytest.raises(ValueError, match="ZeroShotEval found no tokenizer: pass tokenizer="):
        trainer.fit(TinyModule("llama"), train_dataloaders=loader_for("llama", n=8))
    assert trainer.global_step == 0 and callback.results == {}


@pytest.mark.parametrize(("task", "folder"), [("prehab_rte", "RTE"), ("prehab_mrpc_completion", "MRPC")])
def test_a_row_narrower_than_the_header_is_named_by_line(tmp_path, task, folder):
    (tmp_path / "glue" / folder).mkdir(parents=True)
    (tmp_path / "glue" / folder / "dev.tsv").write_text("a\tb\tc\n1\t2\t3\n1\t2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dev.tsv, line 3: 2 columns where the header has 3"):
        load_glue(task, tmp_path, train=False)
