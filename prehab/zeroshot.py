"""Zero-shot accuracy of an in-memory (e.g. compressed) causal LM with lm-evaluation-harness.

    from prehab.zeroshot import zero_shot
    zero_shot(model, tokenizer, tasks=["prehab_rte", "prehab_sst2"], limit=100)
    # {"prehab_rte": {"acc": 0.53, "acc_stderr": 0.05}, "prehab_sst2": {...}}

``lm-eval`` is an optional extra: ``pip install 'prehab[zeroshot]'``. The model is wrapped as it is, in memory
(``lm_eval.models.huggingface.HFLM(pretrained=model, ...)``): a model holding :class:`~prehab.LowRankLinear`
layers is scored exactly as it runs, with nothing saved or reloaded.

Tasks:

- the local tasks shipped with prehab (:data:`LOCAL_TASKS`), which read files under ``data_dir`` and work
  offline: ``prehab_rte`` (GLUE RTE dev: does the premise entail the hypothesis, "True"/"False") and
  ``prehab_sst2`` (GLUE SST-2 dev: "negative"/"positive"), and ``prehab_mrpc_completion`` (HellaSwag-style: the
  first half of a news sentence from GLUE MRPC dev, its own second half among four; ``acc`` and ``acc_norm``;
  unlike RTE and SST-2, models of SmolLM2's size score well above chance on it), over
  ``<data_dir>/glue/<TASK>/dev.tsv`` (the ``download_glue_data.py`` layout; ``train.tsv`` next to it gives the
  few-shot examples when ``num_fewshot > 0``);
- every task of lm-eval by its own name, unchanged (``piqa``, ``arc_easy``, ``hellaswag``, ``winogrande``, ...):
  these download their data from the Hugging Face Hub on first use (cached afterwards).

The task definitions are YAML files in ``prehab/tasks/`` (also usable with lm-eval's own command line:
``lm_eval --include_path <prehab>/tasks --tasks prehab_rte``, data from ``$PREHAB_DATA``).
"""

from __future__ import annotations

import csv
import difflib
import functools
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from prehab.checks import is_count, is_real

__all__ = [
    "DATA_ENV",
    "DEFAULT_DATA_DIR",
    "INSTALL_HINT",
    "LOCAL_TASKS",
    "TASKS_DIR",
    "check_arguments",
    "completion_examples",
    "load_glue",
    "resolve_data_dir",
    "zero_shot",
]

DATA_ENV = "PREHAB_DATA"
"""Environment variable with the default ``data_dir`` of the local tasks."""
DEFAULT_DATA_DIR = "../shared/data"
"""``data_dir`` when neither the argument nor ``$PREHAB_DATA`` gives one (relative to the working directory)."""
TASKS_DIR = Path(__file__).parent / "tasks"
"""The local task definitions (lm-eval YAML), registered with ``TaskManager(include_path=TASKS_DIR)``."""
INSTALL_HINT = "pip install 'prehab[zeroshot]'"
STANDARD_EXAMPLES = ("piqa", "arc_easy", "hellaswag", "winogrande")

# GLUE folder and columns of each local task: task -> (folder, text columns, label column, label -> class id).
_GLUE = {
    "prehab_rte": ("RTE", ("sentence1", "sentence2"), "label", {"entailment": 0, "not_entailment": 1}),
    "prehab_sst2": ("SST-2", ("sentence",), "label", {"0": 0, "1": 1}),
}
# Completion tasks: task -> (GLUE folder, the two sentence columns of each pair).
_COMPLETION = {"prehab_mrpc_completion": ("MRPC", ("#1 String", "#2 String"))}
COMPLETION_CHOICES = 4
"""Endings per example of the completion tasks: the sentence's own and three from other sentences."""
COMPLETION_MIN_WORDS = 10
"""Sentences shorter than this (in words, after detokenizing) give no completion example."""
LOCAL_TASKS: dict[str, str] = {
    "prehab_rte": "GLUE RTE dev (277): premise + 'Question: <hypothesis> True or False?' -> True / False",
    "prehab_sst2": "GLUE SST-2 dev (872): sentence + 'Is this sentence positive or negative?' -> negative / positive",
    "prehab_mrpc_completion": "GLUE MRPC dev sentences (news, 797): the first half of a sentence -> its own second "
    "half among 4 (3 from other sentences, not its paraphrase); acc and acc_norm",
}
"""The offline tasks shipped with prehab: name -> what it asks."""
_METADATA_KEY = "prehab_data_dir"  # how the resolved data_dir reaches the task YAMLs' custom_dataset loaders
_TRAIN_KEY = "prehab_train_split"  # ... and whether they read the training split


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(
            f"zero-shot evaluation needs lm-evaluation-harness (the `lm-eval` package), which is not installed. "
            f"Install it with: {INSTALL_HINT}"
        ) from err
    return lm_eval


# ---------------------------------------------------------------------- argument checks
def _check_tasks(tasks: Any) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(
            f"tasks={tasks!r} is invalid: use a non-empty list of task names, e.g. ['prehab_rte', 'prehab_sst2'] "
            f"(offline) or {list(STANDARD_EXAMPLES)} (lm-eval's own, data from the Hugging Face Hub)."
        )
    bad = [t for t in tasks if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"tasks={list(tasks)!r} is invalid: every task name must be a non-empty string, got {bad}.")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks={list(tasks)!r} names a task twice: list each task once.")
    return list(tasks)


def _check_limit(limit: Any) -> int | float | None:
    if is_real(limit) and isinstance(limit, float) and limit >= 1 and limit.is_integer():
        limit = int(limit)  # 6.0: YAML and jsonargparse may give an integer as a float
    if limit is None or is_count(limit, 1) or (is_real(limit) and isinstance(limit, float) and 0 < limit < 1):
        return limit
    raise ValueError(
        f"limit={limit!r} is invalid: use None (every example), an integer >= 1 (examples per task) or a fraction "
        "in (0, 1) of each task's examples."
    )


def _check_batch_size(batch_size: Any) -> int | str:
    if is_count(batch_size, 1) or (isinstance(batch_size, str) and batch_size.startswith("auto")):
        return batch_size
    raise ValueError(f"batch_size={batch_size!r} is invalid: use an integer >= 1 or 'auto' (lm-eval's search).")


def _check_num_fewshot(num_fewshot: Any) -> int:
    if not is_count(num_fewshot, 0):
        raise ValueError(f"num_fewshot={num_fewshot!r} is invalid: use an integer >= 0 (0: zero-shot).")
    return num_fewshot


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$PREHAB_DATA``, else ``../shared/data`` (relative to the working directory)."""
    if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
        raise ValueError(f"data_dir={data_dir!r} is invalid: use a folder path or None.")
    return Path(data_dir if data_dir is not None else os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR).expanduser()


def _glue_dir(task: str, data_dir: Path) -> Path:
    """The GLUE task folder of a local task: ``<data_dir>/glue/<TASK>`` or ``<data_dir>/<TASK>``."""
    folder = _GLUE[task][0] if task in _GLUE else _COMPLETION[task][0]
    candidates = [data_dir / "glue" / folder, data_dir / folder]
    for candidate in candidates:
        if (candidate / "dev.tsv").is_file():
            return candidate
    raise FileNotFoundError(
        f"task {task!r} reads GLUE {folder} from data_dir={str(data_dir)!r}, but neither "
        f"{candidates[0] / 'dev.tsv'} nor {candidates[1] / 'dev.tsv'} exists. Pass data_dir= (or set ${DATA_ENV}) "
        "to the folder that holds glue/ (the download_glue_data.py layout: glue/RTE/dev.tsv, glue/SST-2/dev.tsv)."
    )


def _tsv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a GLUE TSV file, every row as wide as the header."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0]
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {number}: {len(row)} columns where the header has {len(header)}.")
    return header, rows[1:]


def _read_tsv(path: Path, task: str) -> dict[str, list[Any]]:
    folder, text_columns, label_column, label_ids = _GLUE[task]
    header, body = _tsv_rows(path)
    missing = [c for c in (*text_columns, label_column) if c not in header]
    if missing:
        raise ValueError(f"{path}: no column {missing} in the header {header}; expected the GLUE {folder} format.")
    index = {name: header.index(name) for name in (*text_columns, label_column)}
    columns: dict[str, list[Any]] = {name: [] for name in text_columns}
    columns["label"] = []
    for number, row in enumerate(body, start=2):
        label = row[index[label_column]]
        if label not in label_ids:
            raise ValueError(f"{path}, line {number}: label {label!r} is not one of {sorted(label_ids)}.")
        for name in text_columns:
            columns[name].append(row[index[name]].strip())
        columns["label"].append(label_ids[label])
    return columns


def _detokenize(text: str) -> str:
    """GLUE's tokenized text (``doesn 't``, ``company 's``, ``growth .``) as plain English, so that the
    completions read the way the models were trained on text."""
    words, pending, opened = [], "", False
    for word in text.split():
        if word == '"' and not opened:  # an opening quote joins the next word, a closing one the last
            pending = word
        elif word == '"' and words:
            words[-1] += word
        else:
            words.append(pending + word)
            pending = ""
        opened ^= word == '"'
    text = re.sub(r" '(s|t|re|ve|ll|d|m)\b", r"'\1", " ".join(words + [pending] * bool(pending)))
    text = re.sub(r" ([.,;:!?%)\]])", r"\1", text)
    return re.sub(r"([(\[$]) ", r"\1", text)


def completion_examples(
    pairs: Sequence[tuple[str, str]], seed: int = 0, choices: int = COMPLETION_CHOICES
) -> dict[str, list[Any]]:
    """HellaSwag-style examples from sentence pairs: for every distinct sentence of at least
    :data:`COMPLETION_MIN_WORDS` words, ``context`` is its first half (in words), ``endings`` its own second half
    and ``choices − 1`` second halves of other sentences, ``label`` where its own ending is.

    The other endings are drawn (seeded by ``seed`` and the sentence's position: the same examples on every run)
    from the ``4 · choices`` sentences closest in ending length, never from a sentence it is paired with (MRPC's
    pairs are often paraphrases, whose ending would fit as well). Columns ``context``, ``endings``, ``label``.
    """
    if not is_count(choices, 2):
        raise ValueError(f"choices={choices!r} is invalid: use an integer >= 2 (the own ending and others).")
    sentences: list[str] = []
    index: dict[str, int] = {}
    partners: dict[int, set[int]] = {}
    for pair in pairs:
        ids = []
        for text in pair:
            text = _detokenize(text)
            if len(text.split()) >= COMPLETION_MIN_WORDS:
                ids.append(index.setdefault(text, len(index)))
                if ids[-1] == len(sentences):
                    sentences.append(text)
        for i in ids:
            partners.setdefault(i, set()).update(ids)
    if len(sentences) < 4 * choices + 1:
        raise ValueError(f"completion tasks need more than {4 * choices} sentences of {COMPLETION_MIN_WORDS}+ words; "
                         f"got {len(sentences)}.")
    words = [s.split() for s in sentences]
    cut = [len(w) // 2 for w in words]
    contexts = [" ".join(w[:c]) for w, c in zip(words, cut, strict=True)]
    endings = [" ".join(w[c:]) for w, c in zip(words, cut, strict=True)]
    lengths = [len(w) - c for w, c in zip(words, cut, strict=True)]
    by_length: dict[int, list[int]] = {}
    for j, length in enumerate(lengths):
        by_length.setdefault(length, []).append(j)
    longest = max(lengths)
    columns: dict[str, list[Any]] = {"context": [], "endings": [], "label": []}
    for i, context in enumerate(contexts):
        rng = random.Random(seed * 1_000_003 + i)
        # the other sentences in order of (length difference, position), up to the pool's size
        near: list[int] = []
        for gap in range(longest + 1):
            if len(near) >= 4 * choices:
                break
            ring = by_length.get(lengths[i] - gap, []) + (by_length.get(lengths[i] + gap, []) if gap else [])
            near += [j for j in sorted(ring) if j not in partners[i] and endings[j] != endings[i]]
        picked = [endings[j] for j in rng.sample(near[: 4 * choices], choices - 1)]
        label = rng.randrange(choices)
        picked.insert(label, endings[i])
        columns["context"].append(context)
        columns["endings"].append(picked)
        columns["label"].append(label)
    return columns


def _read_completion(path: Path, task: str) -> dict[str, list[Any]]:
    folder, text_columns = _COMPLETION[task]
    header, body = _tsv_rows(path)
    missing = [c for c in text_columns if c not in header]
    if missing:
        raise ValueError(f"{path}: no column {missing} in the header {header}; expected the GLUE {folder} format.")
    first, second = (header.index(c) for c in text_columns)
    return completion_examples([(row[first], row[second]) for row in body])


def load_glue(task: str, data_dir: str | os.PathLike | None = None, train: bool = True) -> Any:
    """The ``datasets.DatasetDict`` of a local task: ``validation`` (``dev.tsv``) and ``train`` (``train.tsv``; it
    only gives few-shot examples, and is empty when the file is absent or ``train`` is False).

    Used by the task YAMLs (``custom_dataset``); labels are class ids in the order of the task's choices.
    """
    import datasets

    if task not in LOCAL_TASKS:
        raise ValueError(f"task={task!r} is not a local task; local tasks: {sorted(LOCAL_TASKS)}.")
    folder = _glue_dir(task, resolve_data_dir(data_dir))
    read = _read_tsv if task in _GLUE else _read_completion
    validation = datasets.Dataset.from_dict(read(folder / "dev.tsv", task))
    rows = read(folder / "train.tsv", task) if train and (folder / "train.tsv").is_file() else None
    rows = rows or {name: [] for name in validation.column_names}
    return datasets.DatasetDict(
        {"validation": validation, "train": datasets.Dataset.from_dict(rows, features=validation.features)}
    )


# ---------------------------------------------------------------------- lm-eval plumbing
@functools.lru_cache(maxsize=4)
def _task_manager(data_dir: str, standard: bool, fewshot: bool) -> Any:
    """lm-eval's TaskManager with the local tasks; lm-eval's own index (~15k tasks, seconds) only when needed.

    The metadata reaches the local tasks' loaders: where the data is, and whether to read the training split
    (SST-2's has 67k rows; only few-shot examples come from it).
    """
    from lm_eval.tasks import TaskManager

    metadata = {_METADATA_KEY: data_dir, _TRAIN_KEY: fewshot}
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=standard, metadata=metadata)


def _prepare(tasks: Any, data_dir: str | os.PathLike | None, num_fewshot: int = 0) -> tuple[list[str], Any, list[str]]:
    """Check the task names (and the local tasks' files) before anything runs; (tasks, TaskManager, standard)."""
    tasks = _check_tasks(tasks)
    _require_lm_eval()
    folder = resolve_data_dir(data_dir)
    local = [t for t in tasks if t in LOCAL_TASKS]
    standard = [t for t in tasks if t not in LOCAL_TASKS]
    for task in local:
        found = _glue_dir(task, folder)
        if num_fewshot and not (found / "train.tsv").is_file():
            raise FileNotFoundError(
                f"num_fewshot={num_fewshot} takes the examples from the training split, but task {task!r} has no "
                f"{found / 'train.tsv'}: add it or use num_fewshot=0."
            )
    # "prehab_*" names are ours: an unknown one is reported without building lm-eval's index (seconds)
    unknown = [t for t in standard if t.startswith("prehab_")]
    manager = _task_manager(str(folder.resolve()), bool(standard) and not unknown, num_fewshot > 0)
    unknown = unknown or [t for t in standard if t not in manager.all_tasks]
    if unknown:
        hints = []
        for task in unknown:
            close = difflib.get_close_matches(task, sorted({*LOCAL_TASKS, *manager.all_tasks}), n=3)
            hints.append(f"{task!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise ValueError(
            f"tasks: unknown task {', '.join(hints)}. Local tasks (offline, data from data_dir): "
            f"{', '.join(LOCAL_TASKS)}; standard lm-eval tasks by their lm-eval names, e.g. "
            f"{', '.join(STANDARD_EXAMPLES)} (data from the Hugging Face Hub)."
        )
    return tasks, manager, standard


def check_arguments(
    tasks: Any,
    limit: Any = None,
    batch_size: Any = 8,
    num_fewshot: Any = 0,
    data_dir: Any = None,
) -> list[str]:
    """Check :func:`zero_shot`'s arguments without running anything; returns the task names.

    Raises the errors :func:`zero_shot` raises for them: ``ValueError`` (invalid value, unknown task),
    ``ImportError`` (lm-eval missing), ``FileNotFoundError`` (a local task's files are not under ``data_dir``).
    """
    _check_limit(limit)
    _check_batch_size(batch_size)
    return _prepare(tasks, data_dir, _check_num_fewshot(num_fewshot))[0]


def _hub_error(standard: list[str], err: Exception) -> RuntimeError:
    offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "").lower() in ("1", "true")]
    why = f" ({' and '.join(v + '=1' for v in offline)} is set)" if offline else ""
    return RuntimeError(
        f"could not fetch the data of the standard lm-eval task(s) {standard}: the Hugging Face Hub is unreachable"
        f"{why} and the dataset is not in the local cache ({type(err).__name__}: {err}). These tasks download "
        f"their data on first use: run once with network access, or use the local tasks "
        f"{', '.join(LOCAL_TASKS)} (offline, data from data_dir / ${DATA_ENV})."
    )


def _language_model(model: Any) -> nn.Module:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        inner = getattr(model, "model", None)
        hint = " (pass its `.model`)" if isinstance(inner, PreTrainedModel) else ""
        raise TypeError(
            f"model is a {type(model).__name__}: zero-shot evaluation needs the Hugging Face causal LM itself "
            f"(a transformers PreTrainedModel, compressed or not){hint}."
        )
    if not model.can_generate():
        raise TypeError(
            f"model is a {type(model).__name__}, which has no language-model head: zero-shot tasks score the "
            "likelihood of each answer, so use a causal LM (AutoModelForCausalLM)."
        )
    return model


def _flatten(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"acc,none": x, "alias": ...}`` -> ``{"acc": x}`` (numbers only; other filters keep ``,filter``)."""
    flat = {}
    for task, values in results.items():
        flat[task] = {
            key.removesuffix(",none"): float(value)
            for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and "," in key
        }
    return flat


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | float | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    num_fewshot: int = 0,
    data_dir: str | os.PathLike | None = None,
    **evaluate_kwargs: Any,
) -> dict[str, dict[str, float]]:
    """Zero-shot (or few-shot) accuracy of ``model`` on lm-eval tasks, run in memory.

    Every argument and task name is checked, and the local tasks' files are looked up, before the model runs.
    The model's train/eval flags are restored afterwards, and its device too when ``device`` moved it.

    Args:
        model: a Hugging Face causal LM (``PreTrainedModel`` with an LM head), e.g. a compressed one with
            ``LowRankLinear`` layers; a ``PrehabModule``'s backbone is ``module.model``.
        tokenizer: its tokenizer (a ``PreTrainedTokenizerBase``; a name or folder is loaded by lm-eval). lm-eval
            gives it a pad token if it has none.
        tasks: task names: the local ``prehab_rte`` / ``prehab_sst2`` / ``prehab_mrpc_completion`` (offline) and
            any lm-eval task, group or tag by its lm-eval name (``piqa``, ``arc_easy``, ``hellaswag``,
            ``winogrande``, ...; data from the Hub).
        limit: examples per task (the first ones): None for all, an integer >= 1, or a fraction in (0, 1).
        batch_size: examples per forward pass, or ``"auto"`` (lm-eval searches the largest that fits).
        device: run on this device (``"cuda"``, ``"cpu"``, ...); default: where the model is.
        num_fewshot: examples from the task's training split put before each question (0: zero-shot).
        data_dir: folder holding ``glue/`` for the local tasks; default ``$PREHAB_DATA``, else ``../shared/data``.
        **evaluate_kwargs: passed on to ``lm_eval.simple_evaluate`` (e.g. ``random_seed``, ``apply_chat_template``).

    Returns:
        ``{task: {metric: value}}`` with lm-eval's metrics, e.g. ``{"prehab_rte": {"acc": 0.53, "acc_stderr":
        0.03}}`` (``piqa`` etc. also give ``acc_norm``); groups appear as tasks with their aggregate metrics.

    Raises:
        ImportError: lm-eval is not installed (``pip install 'prehab[zeroshot]'``).
        ValueError: an invalid argument or an unknown task name.
        FileNotFoundError: a local task's files are not under ``data_dir``.
        RuntimeError: a standard task's data could not be fetched (Hub unreachable, not cached).
    """
    from prehab.evaluation import evaluating, model_device

    model = _language_model(model)
    limit, batch_size, num_fewshot = _check_limit(limit), _check_batch_size(batch_size), _check_num_fewshot(num_fewshot)
    if device is not None and not isinstance(device, str):
        raise ValueError(f"device={device!r} is invalid: use a device name such as 'cuda' or 'cpu', or None.")
    tasks, manager, standard = _prepare(tasks, data_dir, num_fewshot)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    home = model_device(model)
    if device is not None:
        model.to(device)
    try:
        with evaluating(model):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            options = {"log_samples": False, **evaluate_kwargs}
            try:
                output = lm_eval.simple_evaluate(
                    model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, **options
                )
            except OSError as err:  # datasets' ConnectionError / DatasetNotFoundError for Hub data
                if not standard:
                    raise
                raise _hub_error(standard, err) from err
    finally:
        if device is not None:
            model.to(home)
    if output is None:  # lm-eval returns results on local rank 0 only
        return {}
    return _flatten(output["results"])
