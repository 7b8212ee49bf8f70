"""Prehab + SVD-LLM against SVD-LLM, AA-SVD and SAES-SVD (each ± LoRA rehab) on all-MiniLM-L6-v2 over GLUE.

    python ../shared/tools/fetch_models.py --only minilm                  # once: $PREHAB_ASSETS/minilm-l6
    python benchmarks/bench_prehab_glue.py --model $PREHAB_ASSETS/minilm-l6 --data ../shared/data --out OUT
    python benchmarks/bench_prehab_glue.py --smoke --out /tmp/smoke       # tiny random BERT, well under a minute

The Low-Rank Prehab paper's Table III (BERT-base on GLUE) scaled down to a CPU: MiniLM (6 layers, hidden 384) on
CoLA, SST-2, MRPC, RTE and STS-B, each with its official metric (CoLA Matthews, MRPC F1, STS-B Spearman, accuracy
otherwise), the larger tasks subsampled (``max_train_samples``, ``max_eval_samples`` of the config's GLUE
arguments). The settings (model, penalty, learning rate, prehab steps, data sizes, rehab) come from
``configs/minilm_glue_prehab.yaml``, which runs one task as it is with ``prehab fit --config``; flags override what a
CPU-sized run changes. Stages, each cached in ``OUT/rows.jsonl`` so an interrupted run resumes where it stopped:

1. ``finetune``: fine-tune the pretrained model on each task (λ = 0, ``--finetune-steps`` at ``--finetune-lr``; the
   paper: 3 epochs, cosine, 5e-5 for CoLA, 2e-5 otherwise) -> the "fine-tuned" model every row starts from.
2. ``sweep``: from it, one prehab run per ``--candidates`` penalty and the λ = 0 control (the config's steps, lr,
   batch), each compressed with SVD-LLM at ``--sweep-ratios`` and scored on ``heldout_samples`` training examples
   that nothing trains or calibrates on. Per task, the candidate with the best mean held-out metric becomes
   "prehab (swept)"; the ``--paper`` candidate (stable rank, λ = 0.1) is always in the table too. No dev set is
   looked at to choose.
3. ``table``: dev metrics of the fine-tuned model with SVD-LLM, AA-SVD and SAES-SVD, and of the paper's and the
   swept prehab model and the control with SVD-LLM, at ``--ratios``; the same calibration examples for all.
   ``--ridges aa_svd:0.1`` adds rows of the fine-tuned model compressed with the callback's ``ridge``.
4. ``rehab``: every table row again after LoRA rehab (the config's LoRARehab settings) on the task's training data.

``--report`` (also run after each stage) writes ``OUT/results.md`` (Table III's layout: tasks and their average, per
ratio, beside the paper's BERT-base numbers), ``OUT/results.json``, ``OUT/rows.csv`` and ``OUT/glue_average.png``.
``--seeds-report OUT OUT_S1 OUT_S2 --out DIR`` writes ``DIR/seeds.md`` and ``DIR/seeds.json``: the runs of several
``--seed`` values side by side (five-task averages of calibration draw 0 per seed and their mean, before and after
rehab, and prehab (swept) − the control and − surgery alone per seed).

Compressed models are saved with ``save_compressed`` under ``OUT/models/<task>/<model>/<method>-<ratio>[-rehab]``
(``--save none`` to skip), the fine-tuned and prehab'd dense models as Hugging Face folders under
``OUT/models/<task>/<model>/dense``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (benchmarks/ is not a package)
    REPO,
    Rows,
    candidate_name,
    compress_at_ratios,
    default_asset,
    default_data,
    parse_candidate,
    parse_ridge,
    pyplot,
    spread,
    write_atomic,
    write_csv,
)

from prehab.callbacks import AASVD, SAESSVD, SVDLLM, LoRARehab  # noqa: E402
from prehab.datamodules import GLUE  # noqa: E402
from prehab.datamodules._common import seeded_sample_indices  # noqa: E402
from prehab.evaluation import evaluate_classification  # noqa: E402
from prehab.lowrank import save_compressed  # noqa: E402
from prehab.module import PrehabModule  # noqa: E402

METHODS = {"svd_llm": SVDLLM, "aa_svd": AASVD, "saes_svd": SAESSVD}
TASKS = ("cola", "sst2", "mrpc", "rte", "stsb")
SWEPT = "prehab (swept per task)"  # report-only model name: every task's chosen prehab model
PRIMARY = {"cola": "matthews", "sst2": "accuracy", "mrpc": "f1", "rte": "accuracy", "stsb": "spearman"}
LABELS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B"}
# Table III of the Low-Rank Prehab paper (BERT-base; CoLA, SST-2, MRPC, RTE, STS-B columns; its average is over
# all nine tasks, so the average here is recomputed over these five).
PAPER = {
    (0.0, "dense"): (0.567, 0.925, 0.898, 0.658, 0.857),
    (0.2, "svd_llm"): (0.452, 0.898, 0.884, 0.527, 0.847),
    (0.2, "prehab"): (0.492, 0.914, 0.901, 0.614, 0.852),
    (0.4, "svd_llm"): (0.410, 0.891, 0.869, 0.486, 0.809),
    (0.4, "prehab"): (0.421, 0.905, 0.887, 0.581, 0.821),
    (0.6, "svd_llm"): (0.259, 0.836, 0.830, 0.520, 0.662),
    (0.6, "prehab"): (0.309, 0.877, 0.847, 0.567, 0.681),
}


# ----------------------------------------------------------------------------------------------- settings
def read_config(path: Path) -> dict[str, Any]:
    """The parts of a ``prehab fit`` config this benchmark uses: PrehabModule's, GLUE's and LoRARehab's args."""
    config = yaml.safe_load(path.read_text())
    callbacks = config["trainer"].get("callbacks", [])
    rehab = next((c["init_args"] for c in callbacks if c["class_path"].endswith("LoRARehab")), None)
    if rehab is None:
        raise SystemExit(f"{path}: no LoRARehab callback in trainer.callbacks; the rehab rows need its settings.")
    data, steps = dict(config["data"]["init_args"]), config["trainer"]["max_steps"]
    return {"model": dict(config["model"]), "data": data, "rehab": dict(rehab), "max_steps": steps}


def task_kind(task: str) -> dict[str, Any]:
    return {"task": "regression", "num_labels": 1} if task == "stsb" else {"task": "sequence_classification",
                                                                           "num_labels": 2}


# ----------------------------------------------------------------------------------------------- the benchmark
class Benchmark:
    def __init__(self, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        self.args, self.settings = args, settings
        self.out = Path(args.out)
        (self.out / "models").mkdir(parents=True, exist_ok=True)
        self.rows = Rows(self.out / "rows.jsonl")
        self.pretrained = settings["model"]["model"]
        self._data: dict[str, GLUE] = {}

    def data(self, task: str) -> GLUE:
        if task not in self._data:
            init = {k: v for k, v in self.settings["data"].items() if k != "task"}
            init["dataset"] = str(Path(self.args.data) / "glue")
            module = GLUE(task=task, tokenizer=self.pretrained, **init)
            module.setup("fit")
            self._data[task] = module
        return self._data[task]

    def train_loader(self, task: str, seed: int = 0) -> DataLoader:
        data = self.data(task)
        return DataLoader(data.train_dataset, batch_size=data.batch_size, shuffle=True, collate_fn=data.collator,
                          generator=torch.Generator().manual_seed(seed))

    def calibration(self, task: str, draw: int) -> list[dict[str, torch.Tensor]]:
        """Calibration draw ``draw``: seeded training examples (never held-out ones), the same for every model."""
        data = self.data(task)
        indices = seeded_sample_indices(len(data.train_dataset), data.calibration_samples, draw)
        subset = data.train_dataset.select(indices)
        return list(DataLoader(subset, batch_size=data.batch_size, collate_fn=data.collator))

    # ------------------------------------------------------------------------------------------- models
    def folder(self, task: str, name: str) -> Path:
        return self.out / "models" / task / name / "dense"

    def load(self, task: str, name: str) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.folder(task, name), dtype=torch.float32).eval()

    def fit(self, task: str, name: str, source: str, steps: int, lr: float, candidate: dict[str, Any]) -> None:
        """Train ``source`` on ``task`` with ``candidate``'s penalty (λ = 0: plain fine-tuning); save an HF folder."""
        folder = self.folder(task, name)
        if (folder / "config.json").is_file():
            return
        model_args = {k: v for k, v in self.settings["model"].items()
                      if k not in ("regularizer", "lam", "tail_ratio", "task", "num_labels", "model", "lr")}
        model_args.update(candidate, model=source, lr=lr, **task_kind(task))
        if candidate["lam"] == 0:
            model_args["regularizer"] = "stable_rank"  # unused at λ = 0
        if source == self.pretrained:  # a new head for the task (STS-B: 1 output) whatever head the model had
            model_args["model_kwargs"] = {**(model_args.get("model_kwargs") or {}), "ignore_mismatched_sizes": True}
        pl.seed_everything(self.args.seed)
        module = PrehabModule(**model_args)
        trainer = pl.Trainer(accelerator="auto", max_steps=steps, logger=False, enable_checkpointing=False,
                             enable_model_summary=False, limit_val_batches=0, enable_progress_bar=False)
        started = time.perf_counter()
        trainer.fit(module, train_dataloaders=self.train_loader(task, seed=self.args.seed))
        seconds = time.perf_counter() - started
        folder.mkdir(parents=True, exist_ok=True)
        module.model.save_pretrained(folder)
        self.data(task).tokenizer.save_pretrained(folder)
        batch = self.data(task).batch_size
        (folder / "prehab.json").write_text(json.dumps(
            {"candidate": candidate, "source": str(source), "seed": self.args.seed, "steps": steps, "lr": lr,
             "batch_size": batch,
             "examples": steps * batch, "seconds": seconds, "seconds_per_step": seconds / max(steps, 1)}, indent=2))
        print(f"[fit] {task}/{name}: {steps} steps in {seconds:.0f} s ({seconds / max(steps, 1):.2f} s/step)",
              flush=True)

    # ------------------------------------------------------------------------------------------- measurements
    def score(self, task: str, model: torch.nn.Module, split: str) -> dict[str, float]:
        data = self.data(task)
        loader = data.heldout_dataloader() if split == "heldout" else data.val_dataloader()
        return evaluate_classification(model, loader, data.metrics())

    def metric_row(self, task: str, split: str, model: torch.nn.Module, scores: dict[str, float]) -> dict[str, Any]:
        return {"task": task, "split": split, "metric": PRIMARY[task], "score": scores[PRIMARY[task]],
                "metrics": scores, "params": sum(p.numel() for p in model.parameters())}

    def dense_row(self, task: str, name: str, split: str, stage: str) -> None:
        key = f"{stage}|{task}|{name}|dense"
        if key in self.rows:
            return
        model = self.load(task, name)
        self.rows.add({"key": key, "stage": stage, "model": name, "method": "dense", "ratio": 0.0, "draw": None,
                       **self.metric_row(task, split, model, self.score(task, model, split))})

    def surgery_rows(self, task: str, name: str, method: str, ratios: list[float], draw: int, split: str,
                     stage: str, ridge: float = 0.0) -> None:
        """Compress ``name`` with ``method`` at each ratio (one statistics pass shared by one-stream ratios).

        ``ridge`` > 0: the callback's ``ridge``, rows named ``{method}+ridge{ridge}``."""
        label = f"{method}+ridge{ridge:g}" if ridge else method
        keys = {r: f"{stage}|{task}|{name}|{label}|{r:g}|{draw}" for r in ratios}
        todo = [r for r in ratios if keys[r] not in self.rows]
        if not todo:
            return
        dense = self.load(task, name)
        loader = self.calibration(task, draw)
        callback = functools.partial(METHODS[method], ridge=ridge)  # 0: the papers' exact forms, as the rows say
        for ratio, model, totals, seconds in compress_at_ratios(dense, callback, todo, loader):
            row = {"key": keys[ratio], "stage": stage, "model": name, "method": label, "ratio": ratio, "draw": draw,
                   "mean_relative_error": totals["mean_relative_error"], "seconds": seconds,
                   **({"ridge": ridge} if ridge else {}),
                   **self.metric_row(task, split, model, self.score(task, model, split))}
            if stage == "table" and draw == 0 and self.args.save == "draw0":
                save_compressed(model, self.out / "models" / task / name / f"{label}-{ratio:g}",
                                metadata={"calibration_draw": draw, "task": task})
            self.rows.add(row)

    def rehab_row(self, task: str, name: str, method: str, ratio: float) -> None:
        key = f"rehab|{task}|{name}|{method}|{ratio:g}|0"
        if key in self.rows:
            return
        rehab_args = {k: v for k, v in self.settings["rehab"].items() if k not in ("datamodule", "dataloader")}
        if self.args.rehab_steps is not None:
            rehab_args["steps_per_factor"] = self.args.rehab_steps
        loader = self.calibration(task, 0)
        pl.seed_everything(self.args.seed)
        module = PrehabModule(model=self.load(task, name), lam=0.0, task=task_kind(task)["task"])
        surgery = METHODS[method](ratio=ratio, calibration_batches=len(loader), calibration_dataloader=loader,
                                  ridge=0.0, evaluate=False, plots=False, save_dense=False)
        rehab = LoRARehab(dataloader=self.train_loader(task, seed=self.args.seed + 1), evaluate=False, **rehab_args)
        trainer = pl.Trainer(accelerator="auto", max_steps=0, logger=False, enable_checkpointing=False,
                             enable_model_summary=False, enable_progress_bar=False, callbacks=[surgery, rehab])
        started = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        seconds = time.perf_counter() - started
        model = module.model
        row = {"key": key, "stage": "rehab", "model": name, "method": method, "ratio": ratio, "draw": 0,
               "seconds": seconds, "rehab_steps": len(rehab.order) * rehab.steps_per_factor,
               **self.metric_row(task, "dev", model, self.score(task, model, "dev"))}
        if self.args.save == "draw0":
            save_compressed(model, self.out / "models" / task / name / f"{method}-{ratio:g}-rehab")
        self.rows.add(row)

    # ------------------------------------------------------------------------------------------- stages
    def finetune(self) -> None:
        for task in self.args.tasks:
            lr = self.args.finetune_lr if self.args.finetune_lr else (5e-5 if task == "cola" else 2e-5)
            self.fit(task, "finetuned", self.pretrained, self.args.finetune_steps, lr, {"lam": 0.0})
            self.dense_row(task, "finetuned", "dev", "table")

    def candidates(self) -> list[dict[str, Any]]:
        listed = [parse_candidate(c) for c in self.args.candidates]
        paper = parse_candidate(self.args.paper)
        return listed + ([paper] if candidate_name(paper) not in map(candidate_name, listed) else [])

    def prehab_model(self, task: str, candidate: dict[str, Any]) -> str:
        name = candidate_name(candidate)
        self.fit(task, name, str(self.folder(task, "finetuned")), self.args.steps, self.settings["model"]["lr"],
                 candidate)
        return name

    def sweep(self) -> None:
        """Per task: every candidate and the control, SVD-LLM at the sweep ratios, scored on held-out train."""
        chosen = self.chosen_all()
        for task in self.args.tasks:
            scores = {}
            for candidate in [{"lam": 0.0}] + self.candidates():
                name = self.prehab_model(task, candidate)
                self.dense_row(task, name, "heldout", "heldout")
                self.surgery_rows(task, name, "svd_llm", self.args.sweep_ratios, 0, "heldout", "sweep")
                rows = [r for r in self.rows.select(stage="sweep", task=task, model=name)
                        if r["ratio"] in self.args.sweep_ratios]
                scores[name] = statistics.fmean(r["score"] for r in rows)
            self.dense_row(task, "finetuned", "heldout", "heldout")
            self.surgery_rows(task, "finetuned", "svd_llm", self.args.sweep_ratios, 0, "heldout", "sweep")
            penalties = {n: s for n, s in scores.items() if n != "control"}
            chosen[task] = {"prehab": max(penalties, key=penalties.get), "scores": scores}
            write_atomic(self.out / "chosen.json", json.dumps(chosen, indent=2))
            print(f"[sweep] {task}: chosen on held-out train {chosen[task]['prehab']} ({scores})", flush=True)

    def chosen_all(self) -> dict[str, Any]:
        path = self.out / "chosen.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def table_models(self, task: str) -> list[str]:
        """finetuned, control, the paper's prehab model and the swept one (if different)."""
        chosen = self.chosen_all().get(task)
        if chosen is None:
            raise SystemExit(f"{self.out / 'chosen.json'} has no entry for {task}: run the sweep stage first.")
        paper = self.prehab_model(task, parse_candidate(self.args.paper))
        self.prehab_model(task, {"lam": 0.0})
        return list(dict.fromkeys(["finetuned", "control", paper, chosen["prehab"]]))

    def table(self) -> None:
        for task in self.args.tasks:
            models = self.table_models(task)
            for name in models:
                self.dense_row(task, name, "dev", "table")
            for draw in range(self.args.draws):
                for name in models:
                    self.surgery_rows(task, name, "svd_llm", self.args.ratios, draw, "dev", "table")
                for method in self.args.table_methods:
                    if method != "svd_llm":
                        self.surgery_rows(task, "finetuned", method, self.args.ratios, draw, "dev", "table")
                for method, ridge in self.args.ridges:  # the fine-tuned model, beside the exact rows
                    self.surgery_rows(task, "finetuned", method, self.args.ratios, draw, "dev", "table", ridge)

    def rehab(self) -> None:
        for task in self.args.tasks:
            models = self.table_models(task)
            for ratio in self.args.rehab_ratios:
                for method in self.args.table_methods:
                    if method in self.args.rehab_methods:
                        for name in models if method == "svd_llm" else ["finetuned"]:
                            self.rehab_row(task, name, method, ratio)


# ----------------------------------------------------------------------------------------------- report
def row_label(model: str, method: str, chosen: dict[str, Any], paper: str | None) -> str:
    if method == "dense":
        return {"finetuned": "fine-tuned (dense)", "control": "control (λ = 0), dense"}.get(model, f"{model}, dense")
    if model == "finetuned":
        return method
    if model == "control":
        return f"control (λ = 0) + {method}"
    if model == SWEPT:
        return f"prehab, λ swept per task + {method}" if method != "dense" else "prehab, λ swept per task, dense"
    tags = [t for t, hit in (("paper λ", model == paper), ("swept", model in chosen)) if hit]
    return f"prehab {model} ({', '.join(tags)}) + {method}" if tags else f"prehab {model} + {method}"


def write_report(out: Path) -> None:
    rows = list(Rows(out / "rows.jsonl").rows.values())
    chosen_path, settings_path = out / "chosen.json", out / "settings.json"
    chosen = json.loads(chosen_path.read_text()) if chosen_path.is_file() else {}
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    paper = candidate_name(parse_candidate(settings["args"]["paper"])) if settings else None
    swept = {c["prehab"] for c in chosen.values()}
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    lines = ["# Prehab + SVD-LLM vs SVD-LLM, AA-SVD, SAES-SVD on all-MiniLM-L6-v2 (GLUE dev)", ""]
    if settings:
        args, data = settings["args"], settings["settings"]["data"]
        lines += [f"Fine-tune {args['finetune_steps']} steps, prehab/control {args['steps']} steps, batch "
                  f"{data['batch_size']}, max length {data['max_length']}, training examples ≤ "
                  f"{data.get('max_train_samples')}, dev examples ≤ {data.get('max_eval_samples')}, held-out "
                  f"{data.get('heldout_samples')}, calibration {data['calibration_samples']} examples, "
                  f"{args['draws']} calibration draw(s), training seed {args.get('seed', 0)}. Metrics: "
                  + ", ".join(f"{LABELS[t]} {PRIMARY[t]}" for t in tasks) + ".", ""]
    sweep = [r for r in rows if r["stage"] in ("sweep", "heldout")]
    if sweep:
        ratios = sorted({r["ratio"] for r in sweep if r["method"] != "dense"})
        lines += ["## Sweep: held-out training examples, SVD-LLM (calibration draw 0)", "",
                  "| task | model | dense | " + " | ".join(f"svd_llm {r:g}" for r in ratios) + " |",
                  "|---" * (3 + len(ratios)) + "|"]
        for task in tasks:
            for model in sorted({r["model"] for r in sweep if r["task"] == task}):
                cells = []
                for method, ratio in [("dense", 0.0)] + [("svd_llm", r) for r in ratios]:
                    hit = [r for r in sweep if (r["task"], r["model"], r["method"], r["ratio"]) ==
                           (task, model, method, ratio)]
                    cells.append(f"{hit[0]['score']:.3f}" if hit else "-")
                mark = " (chosen)" if chosen.get(task, {}).get("prehab") == model else ""
                lines.append(f"| {LABELS[task]} | {model}{mark} | " + " | ".join(cells) + " |")
        lines.append("")
    for stage, title in (("table", "Dev metrics, no rehab"), ("rehab", "Dev metrics after LoRA rehab")):
        picked = [r for r in rows if r["stage"] == stage]
        # Each task's swept model side by side, so the swept prehab has an average over the tasks too.
        picked += [{**r, "model": SWEPT} for r in picked
                   if r["model"] == chosen.get(r["task"], {}).get("prehab") and len(swept) > 1]
        if not picked:
            continue
        lines += [f"## {title} (mean ± half-range over calibration draws where several)", "",
                  "| ratio | model + method | " + " | ".join(LABELS[t] for t in tasks) + " | average |",
                  "|---" * (3 + len(tasks)) + "|"]
        groups: dict[tuple, dict[str, list[float]]] = {}
        for r in picked:
            group = groups.setdefault((r["ratio"], r["model"], r["method"]), {})
            group.setdefault(r["task"], []).append(r["score"])

        def order(key: tuple) -> tuple:
            ratio, model, method = key
            return (ratio, model != "finetuned", method, model != "control", model)

        for (ratio, model, method), scores in sorted(groups.items(), key=lambda item: order(item[0])):
            label = row_label(model, method, swept, paper) + (" + rehab" if stage == "rehab" else "")
            cells = [spread(scores.get(t, [])) for t in tasks]
            means = [statistics.fmean(scores[t]) for t in tasks if t in scores]
            average = f"{statistics.fmean(means):.3f}" if len(means) == len(tasks) else "-"
            lines.append(f"| {ratio:g} | {label} | " + " | ".join(cells) + f" | {average} |")
        lines.append("")
    lines += ["## The paper's Table III (BERT-base, same five tasks; average recomputed over them)", "",
              "| ratio | method | CoLA | SST-2 | MRPC | RTE | STS-B | average |", "|---|---|---|---|---|---|---|---|"]
    for (ratio, method), values in PAPER.items():
        name = {"dense": "BERT-base", "svd_llm": "SVD-LLM", "prehab": "Prehab-SVD (λ = 0.1)"}[method]
        lines.append(f"| {ratio:g} | {name} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {statistics.fmean(values):.3f} |")
    lines.append("")
    write_atomic(out / "results.md", "\n".join(lines))
    write_atomic(out / "results.json", json.dumps({"chosen": chosen, "paper_table3": {
        f"{m}@{r:g}": dict(zip(TASKS, v, strict=True)) for (r, m), v in PAPER.items()}, "rows": rows}, indent=2))
    write_csv([{k: v for k, v in r.items() if k != "metrics"} | {f"metric/{k}": v for k, v in r["metrics"].items()}
               for r in rows], out / "rows.csv")
    plot(rows, tasks, swept, paper, out / "glue_average.png")
    print("\n".join(lines))


def plot(rows: list[dict[str, Any]], tasks: list[str], swept: set[str], paper: str | None, path: Path) -> None:
    """Average dev metric over the tasks vs ratio, per model + method, without and with rehab."""
    picked = [r for r in rows if r["stage"] in ("table", "rehab")]
    if not picked or not tasks:
        return
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    dense = [r for r in rows if r["stage"] == "table" and r["model"] == "finetuned" and r["method"] == "dense"]
    for axis, stage in zip(axes, ("table", "rehab"), strict=True):
        series = sorted({(r["model"], r["method"]) for r in picked if r["stage"] == stage and r["method"] != "dense"})
        for model, method in series:
            points = []
            for ratio in sorted({r["ratio"] for r in picked if r["stage"] == stage}):
                per_task = [[r["score"] for r in picked if (r["stage"], r["model"], r["method"], r["ratio"], r["task"])
                             == (stage, model, method, ratio, t)] for t in tasks]
                if all(per_task):
                    points.append((ratio, statistics.fmean(statistics.fmean(v) for v in per_task)))
            if points:
                style = "o-" if model == "finetuned" else ("s--" if model == "control" else "^-")
                axis.plot(*zip(*points, strict=True), style, label=row_label(model, method, swept, paper))
        if len(dense) == len(tasks):
            axis.axhline(statistics.fmean(r["score"] for r in dense), color="gray", ls=":", label="fine-tuned, dense")
        axis.set_xlabel("fraction of block parameters removed")
        axis.set_title("no rehab" if stage == "table" else "after LoRA rehab")
        axis.legend(fontsize=7)
    axes[0].set_ylabel("average GLUE dev metric (" + ", ".join(LABELS[t] for t in tasks) + ")")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- seeds
SEED_ROWS = [  # (model, method, label) of the across-seed tables; SWEPT: each task's chosen prehab model
    ("finetuned", "svd_llm", "fine-tuned + SVD-LLM"),
    ("control", "svd_llm", "control (λ = 0) + SVD-LLM"),
    ("paper", "svd_llm", "prehab, paper λ + SVD-LLM"),
    (SWEPT, "svd_llm", "prehab (swept) + SVD-LLM"),
    ("finetuned", "aa_svd", "fine-tuned + AA-SVD"),
    ("finetuned", "saes_svd", "fine-tuned + SAES-SVD"),
]


def task_average(rows: list[dict[str, Any]], tasks: list[str], chosen: dict[str, Any], paper: str | None,
                 stage: str, model: str, method: str, ratio: float, draw: int) -> float | None:
    """The average over ``tasks`` of one row (``None`` unless every task has it); ``SWEPT`` takes each task's
    chosen prehab model, ``"paper"`` the ``--paper`` candidate's."""
    scores = []
    for task in tasks:
        name = {SWEPT: chosen.get(task, {}).get("prehab"), "paper": paper}.get(model, model)
        hits = [r["score"] for r in rows
                if (r["stage"], r["task"], r["model"], r["method"]) == (stage, task, name, method)
                and abs(r["ratio"] - ratio) < 1e-9 and (method == "dense" or r["draw"] == draw)]
        if not hits:
            return None
        scores.append(statistics.fmean(hits))
    return statistics.fmean(scores)


def write_seed_report(folders: list[Path], out: Path, draw: int = 0) -> str:
    """Several fine-tune seeds' OUT folders (``--seed``) side by side: the five-task average of every row per seed
    and their mean, before and after rehab, and prehab (swept) − the control and − surgery alone per seed, so the
    seed-to-seed spread is read beside the effect. Writes ``out/seeds.md`` and ``out/seeds.json``."""
    runs = []
    for folder in folders:
        settings = json.loads((folder / "settings.json").read_text())
        chosen_path = folder / "chosen.json"
        runs.append({"folder": str(folder), "seed": settings["args"].get("seed", 0),
                     "paper": candidate_name(parse_candidate(settings["args"]["paper"])),
                     "chosen": json.loads(chosen_path.read_text()) if chosen_path.is_file() else {},
                     "rows": list(Rows(folder / "rows.jsonl").rows.values())})
    seeds = [run["seed"] for run in runs]
    tasks = [t for t in TASKS if any(r["task"] == t for run in runs for r in run["rows"])]
    ratios = sorted({r["ratio"] for run in runs for r in run["rows"] if r["stage"] == "table" and r["ratio"] > 0})

    def averages(stage: str, model: str, method: str, ratio: float) -> list[float | None]:
        return [task_average(run["rows"], tasks, run["chosen"], run["paper"], stage, model, method, ratio, draw)
                for run in runs]

    def cells(values: list[float | None], signed: bool = False) -> str:
        form = "{:+.3f}" if signed else "{:.3f}"
        text = ["-" if v is None else form.format(v) for v in values]
        known = [v for v in values if v is not None]
        mean = form.format(statistics.fmean(known)) if len(known) == len(values) else "-"
        return " | ".join(text) + f" | {mean} |"

    header = "| removed | row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |"
    rule = "|---|---|" + "---|" * (len(seeds) + 1)
    lines = [f"# Across fine-tune seeds: average GLUE dev metric over {', '.join(LABELS[t] for t in tasks)} "
             f"(calibration draw {draw})", "", "Folders: " + ", ".join(f"`{run['folder']}` (seed {run['seed']})"
                                                                      for run in runs), ""]
    result: dict[str, Any] = {"seeds": seeds, "draw": draw, "folders": [run["folder"] for run in runs], "rows": []}
    for stage, title in (("table", "No rehab"), ("rehab", "After LoRA rehab")):
        lines += [f"## {title}", "", header, rule]
        if stage == "table":
            dense = (("finetuned", "fine-tuned"), ("control", "control (λ = 0)"), (SWEPT, "prehab (swept)"))
            for model, label in dense:
                values = averages("table", model, "dense", 0.0)
                lines.append(f"| 0% | {label}, dense | " + cells(values))
                result["rows"].append({"stage": stage, "row": f"{label}, dense", "ratio": 0.0, "values": values})
        for ratio in ratios:
            for model, method, label in SEED_ROWS:
                values = averages(stage, model, method, ratio)
                if any(v is not None for v in values):
                    lines.append(f"| {ratio:.0%} | {label} | " + cells(values))
                    result["rows"].append({"stage": stage, "row": label, "ratio": ratio, "values": values})
        lines.append("")
    lines += ["## Prehab (swept) + SVD-LLM minus the control + SVD-LLM, and minus surgery alone (fine-tuned + SVD-LLM)",
              "", "Above 0: prehab is better. Per seed, then the mean.", "",
              "| removed | difference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", rule]
    for stage, suffix in (("table", ""), ("rehab", ", after rehab")):
        for ratio in ratios:
            prehab = averages(stage, SWEPT, "svd_llm", ratio)
            for other, name in (("control", "− control"), ("finetuned", "− surgery alone")):
                values = [None if a is None or b is None else a - b
                          for a, b in zip(prehab, averages(stage, other, "svd_llm", ratio), strict=True)]
                if any(v is not None for v in values):
                    lines.append(f"| {ratio:.0%} | prehab {name}{suffix} | " + cells(values, signed=True))
                    result["rows"].append({"stage": stage, "row": f"prehab {name}", "ratio": ratio, "values": values})
    lines.append("")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "seeds.md", text)
    write_atomic(out / "seeds.json", json.dumps(result, indent=2))
    print(text)
    return text


# ----------------------------------------------------------------------------------------------- smoke
def smoke_setup(args: argparse.Namespace) -> dict[str, Any]:
    """A tiny random BERT with a word-level tokenizer, and the real GLUE files cut to a few rows, under OUT."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_text_assets import word_level_tokenizer

    out = Path(args.out)
    glue = out / "smoke-data" / "glue"
    source = Path(args.data) / "glue"
    for task in TASKS:
        folder = glue / GLUE(task=task).spec.folder
        folder.mkdir(parents=True, exist_ok=True)
        for split, count in (("train", 64), ("dev", 16)):
            with (source / folder.name / f"{split}.tsv").open(encoding="utf-8-sig") as handle:
                lines = [next(handle) for _ in range(count + 1)]
            (folder / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
    model_folder = out / "tiny-bert"
    if not (model_folder / "config.json").is_file():
        from transformers import BertConfig, BertForSequenceClassification

        texts = [line for path in sorted(glue.rglob("*.tsv")) for line in path.read_text().splitlines()]
        tokenizer = word_level_tokenizer(texts, 300)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(model_folder)
        tokenizer.save_pretrained(model_folder)
    settings = read_config(Path(args.config))
    settings["model"].update(model=str(model_folder), calibration_batches=2)
    settings["data"].update(max_length=32, calibration_samples=8, heldout_samples=16, max_train_samples=40,
                            max_eval_samples=16, batch_size=8)
    args.data = str(out / "smoke-data")
    args.tasks = args.tasks if args.tasks != list(TASKS) else ["rte", "stsb"]
    args.finetune_steps, args.steps, args.rehab_steps, args.draws = 3, 2, 1, 1
    args.candidates = args.candidates[:2]
    args.ratios, args.sweep_ratios, args.rehab_ratios = [0.2, 0.6], [0.6], [0.6]
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "minilm_glue_prehab.yaml"))
    parser.add_argument("--model", default=default_asset("minilm-l6"),
                        help="all-MiniLM-L6-v2 folder (default: $PREHAB_ASSETS/minilm-l6, else the config's model)")
    parser.add_argument("--data", default=default_data(), help="folder holding glue/ (default $PREHAB_DATA or "
                                                               "../shared/data)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "prehab_glue"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--stages", nargs="+", default=["finetune", "sweep", "table", "rehab"],
                        choices=["finetune", "sweep", "table", "rehab"])
    parser.add_argument("--report", action="store_true", help="only write the tables/plots from OUT/rows.jsonl")
    parser.add_argument("--seeds-report", nargs="+", metavar="FOLDER",
                        help="only write OUT/seeds.md: these runs' folders (one per --seed) side by side, calibration "
                             "draw 0, before and after rehab, with prehab − control and − surgery alone per seed")
    parser.add_argument("--finetune-steps", type=int, default=150, help="fine-tuning steps per task (λ = 0)")
    parser.add_argument("--finetune-lr", type=float, help="default: the paper's, 5e-5 for CoLA and 2e-5 otherwise")
    parser.add_argument("--steps", type=int, help="prehab/control steps (default: the config's trainer.max_steps)")
    parser.add_argument("--paper", default="stable_rank:0.1", help="the paper's penalty, always in the table")
    parser.add_argument("--candidates", nargs="+", default=["stable_rank:0.03", "stable_rank:0.1", "stable_rank:0.3"],
                        help="penalties tried in the sweep: regularizer:lam[:tail_ratio]")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--sweep-ratios", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--table-methods", nargs="+", default=["svd_llm", "aa_svd", "saes_svd"], choices=METHODS)
    parser.add_argument("--rehab-methods", nargs="+", default=["svd_llm", "aa_svd", "saes_svd"], choices=METHODS)
    parser.add_argument("--rehab-ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--rehab-steps", type=int, help="LoRA steps per factor (default: the config's)")
    parser.add_argument("--ridges", nargs="*", default=[], metavar="METHOD:RIDGE",
                        help="extra table rows of the fine-tuned model with the callback's ridge, e.g. aa_svd:0.1 "
                             "saes_svd:0.01 (rows named aa_svd+ridge0.1)")
    parser.add_argument("--draws", type=int, default=1, help="calibration draws in the table stage")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed (new head, data order, dropout) of the fine-tune, prehab and rehab runs; "
                             "use a new --out per seed")
    parser.add_argument("--calibration-samples", type=int,
                        help="training examples per calibration draw (default: the config's data.calibration_samples)")
    parser.add_argument("--save", choices=["draw0", "none"], default="draw0")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    parser.add_argument("--smoke", action="store_true", help="tiny random BERT, a few examples (for tests)")
    args = parser.parse_args(argv)
    args.ridges = [parse_ridge(parser, "--ridges", text, METHODS) for text in args.ridges]
    out = Path(args.out)
    if args.seeds_report:
        missing = [f for f in args.seeds_report if not (Path(f) / "rows.jsonl").is_file()]
        if missing:
            parser.error(f"--seeds-report {' '.join(missing)}: no rows.jsonl there; give this script's --out folders.")
        write_seed_report([Path(f) for f in args.seeds_report], out)
        return
    if args.report:
        write_report(out)
        return
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        settings = smoke_setup(args)
    else:
        settings = read_config(Path(args.config))
        if args.model:
            settings["model"]["model"] = args.model
        if args.calibration_samples:
            settings["data"]["calibration_samples"] = args.calibration_samples
    if not (Path(settings["model"]["model"]) / "config.json").is_file():
        raise SystemExit(f"--model {settings['model']['model']}: no Hugging Face folder there; fetch it with "
                         "`PREHAB_ASSETS=assets python ../shared/tools/fetch_models.py --only minilm` or pass --model.")
    if not (Path(args.data) / "glue").is_dir():
        raise SystemExit(f"--data {args.data}: no glue/ folder there (set --data or PREHAB_DATA).")
    args.steps = args.steps or settings["max_steps"]
    if not settings["data"].get("heldout_samples") and "sweep" in args.stages:
        raise SystemExit(f"{args.config}: data.init_args.heldout_samples is 0; the sweep needs held-out examples.")
    write_atomic(out / "settings.json", json.dumps({"args": vars(args), "settings": settings}, indent=2, default=str))
    bench = Benchmark(args, settings)
    for stage in ("finetune", "sweep", "table", "rehab"):
        if stage in args.stages:
            getattr(bench, stage)()
            write_report(out)


if __name__ == "__main__":
    main()
