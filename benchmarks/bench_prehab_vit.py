"""Prehab (nuclear and stable rank) + SVD-LLM against SVD and SVD-LLM (each ± LoRA rehab) on a timm ViT trained from
scratch on Fashion-MNIST.

    apt-get install dataset-fashion-mnist                                  # once: /usr/share/datasets/fashion-mnist
    python benchmarks/bench_prehab_vit.py --out OUT                        # every stage
    python benchmarks/bench_prehab_vit.py --smoke --out /tmp/smoke         # tiny random ViT, a few images, < 1 min

The Low-Rank Prehab paper's Table II (ViT-B/16 on ImageNet) scaled down to what a CPU and this machine can have: no
pretrained ViT can be fetched, so the ``pretrain`` stage trains a small timm ViT (``--arch``: 28x28 grayscale,
patch 4, 6 blocks of width 128) on Fashion-MNIST to the accuracy it records, and that checkpoint is the
"pretrained" model. The settings (penalty, learning rate, prehab steps, data sizes, rehab) come from
``configs/vit_fashion_mnist.yaml``, which runs as it is with ``prehab fit --config`` once the ``pretrain`` stage has
written the model; flags override what a CPU-sized run changes. Data: ``--fashion-mnist`` (default
``$PREHAB_FASHION_MNIST``, ``$PREHAB_DATA/fashion-mnist``, or Debian's folder; ``apt-get install
dataset-fashion-mnist`` is tried when it is missing). Stages, each cached in ``OUT/rows.jsonl`` (resumable):

1. ``pretrain``: train the ViT from scratch (``--pretrain-epochs``, λ = 0) and record its test top-1.
2. ``sweep``: one prehab run per ``--candidates`` penalty and the λ = 0 control (the config's steps and lr), each
   compressed with SVD-LLM at ``--sweep-ratios`` and scored on the ``heldout_samples`` training images set aside;
   the best candidate of each regularizer (nuclear, stable rank) goes to the table, with the ``--paper`` one
   (nuclear, λ = 0.1). No test image is looked at to choose.
3. ``table``: test top-1 of the pretrained model with SVD and SVD-LLM, and of the prehab models and the control with
   SVD-LLM, at ``--ratios``; the same calibration images for all.
4. ``rehab``: every table row again after LoRA rehab (the config's LoRARehab settings) on the training images.
5. ``spectra``: the whitened spectra σ_i(W L) of every targeted layer before (pretrained, control) and after prehab,
   ``OUT/whitened_spectra.png`` and ``OUT/spectra.json``.

``--report`` (also run after each stage) writes ``OUT/results.md`` (beside the paper's ViT-B numbers),
``OUT/results.json``, ``OUT/rows.csv`` and ``OUT/vit_top1.png``. Compressed models are saved with ``save_compressed``
under ``OUT/models/<model>/<method>-<ratio>[-rehab]`` (``--save none`` to skip), the pretrained and prehab'd dense
models as timm folders (``timm.create_model("local-dir:<folder>")``) under ``OUT/models/<model>/dense``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    Rows,
    candidate_name,
    compress_at_ratios,
    parse_candidate,
    pyplot,
    spread,
    write_atomic,
    write_csv,
)

from prehab.calibration import collect_input_covariances  # noqa: E402
from prehab.callbacks import SVD, SVDLLM, LoRARehab  # noqa: E402
from prehab.datamodules import FashionMNIST  # noqa: E402
from prehab.datamodules.fashion_mnist import DEBIAN_FOLDER, FILES, MEAN, STD, default_root  # noqa: E402
from prehab.evaluation import evaluate_classification  # noqa: E402
from prehab.linalg import damped_cholesky, rank_from_ratio  # noqa: E402
from prehab.lowrank import save_compressed  # noqa: E402
from prehab.module import PrehabModule  # noqa: E402
from prehab.targets import resolve_targets  # noqa: E402

METHODS = {"svd": SVD, "svd_llm": SVDLLM}
ARCH = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 128, "depth": 6, "num_heads": 4, "mlp_ratio": 2.0}
TIMM_NAME = "vit_tiny_patch16_224"  # the architecture family; every size comes from ARCH
# Table II of the Low-Rank Prehab paper (ViT-B/16, ImageNet-1k top-1 %, "ratio" = fraction removed).
PAPER = {"dense": {0.0: 81.10}, "svd": {0.2: 70.24, 0.4: 39.60, 0.5: 10.06, 0.6: 0.52},
         "svd_llm": {0.2: 76.56, 0.4: 67.83, 0.5: 58.42, 0.6: 28.38},
         "prehab": {0.2: 78.49, 0.4: 71.92, 0.5: 64.06, 0.6: 48.12},
         "svd_llm+LoRA": {0.2: 77.51, 0.4: 72.95, 0.5: 66.41, 0.6: 50.06},
         "prehab+LoRA": {0.2: 78.68, 0.4: 74.41, 0.5: 68.59, 0.6: 58.97}}


# ----------------------------------------------------------------------------------------------- settings
def read_config(path: Path) -> dict[str, Any]:
    """The parts of a ``prehab fit`` config this benchmark uses: PrehabModule's, FashionMNIST's and LoRARehab's."""
    config = yaml.safe_load(path.read_text())
    callbacks = config["trainer"].get("callbacks", [])
    rehab = next((c["init_args"] for c in callbacks if c["class_path"].endswith("LoRARehab")), None)
    if rehab is None:
        raise SystemExit(f"{path}: no LoRARehab callback in trainer.callbacks; the rehab rows need its settings.")
    data, steps = dict(config["data"]["init_args"]), config["trainer"]["max_steps"]
    return {"model": dict(config["model"]), "data": data, "rehab": dict(rehab), "max_steps": steps}


def ensure_fashion_mnist(folder: str) -> str:
    """``folder`` when it holds the four IDX files; else install Debian's package (Debian's folder) or fail clearly."""
    def complete(path: Path) -> bool:
        return all((path / name).is_file() or (path / f"{name}.gz").is_file() for name in FILES)

    if complete(Path(folder)):
        return folder
    if folder == DEBIAN_FOLDER and shutil.which("apt-get"):
        print(f"[data] {folder} is missing: apt-get install -y dataset-fashion-mnist", flush=True)
        done = subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], capture_output=True, text=True)
        if done.returncode == 0 and complete(Path(folder)):
            return folder
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"Fashion-MNIST: `apt-get install -y dataset-fashion-mnist` failed ({detail[0]}); install it "
                         "as root, or pass --fashion-mnist a folder with the four IDX files (plain or .gz).")
    raise SystemExit(f"--fashion-mnist {folder}: the four Fashion-MNIST IDX files {list(FILES)} (plain or .gz) are not "
                     f"there; run `apt-get install dataset-fashion-mnist` (writes {DEBIAN_FOLDER}) or pass the folder.")


# ----------------------------------------------------------------------------------------------- the benchmark
class Benchmark:
    def __init__(self, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        self.args, self.settings = args, settings
        self.out = Path(args.out)
        (self.out / "models").mkdir(parents=True, exist_ok=True)
        self.rows = Rows(self.out / "rows.jsonl")
        data = {k: v for k, v in settings["data"].items() if k not in ("root", "cache_dir")}
        self.data = FashionMNIST(root=args.fashion_mnist, cache_dir=str(self.out / "fashion-mnist-idx"), **data)
        self.data.setup("fit")

    def calibration(self, draw: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Calibration draw ``draw``: seeded training images (never held-out ones), the same for every model."""
        data = self.data
        dataset = torch.utils.data.Subset(data.split(train=True), data.indices["train"])
        generator = torch.Generator().manual_seed(draw)
        indices = torch.randperm(len(dataset), generator=generator)[: data.calibration_samples].tolist()
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=data.batch_size)
        return list(loader)

    # ------------------------------------------------------------------------------------------- models
    def folder(self, name: str) -> Path:
        return self.out / "models" / name / "dense"

    def load(self, name: str) -> torch.nn.Module:
        import timm

        return timm.create_model(f"local-dir:{self.folder(name)}", pretrained=True).eval()

    def save(self, model: torch.nn.Module, name: str, info: dict[str, Any]) -> None:
        from timm.models import save_for_hf

        folder = self.folder(name)
        save_for_hf(model, str(folder), model_args={**self.args.arch, "num_classes": 10}, safe_serialization=True,
                    data_config={"input_size": (1, 28, 28), "mean": (MEAN,), "std": (STD,)})
        (folder / "prehab.json").write_text(json.dumps(info, indent=2))

    def fit(self, name: str, steps: int, lr: float, candidate: dict[str, Any], source: str | None) -> None:
        """Train ``source`` (None: a fresh random ViT) with ``candidate``'s penalty; save a timm folder."""
        if (self.folder(name) / "config.json").is_file():
            return
        model_args = {k: v for k, v in self.settings["model"].items()
                      if k not in ("regularizer", "lam", "tail_ratio", "model", "lr", "model_kwargs", "pretrained")}
        model_args.update(candidate, lr=lr, task="image_classification", num_labels=10)
        if candidate["lam"] == 0:
            model_args["regularizer"] = "stable_rank"  # unused at λ = 0
        pl.seed_everything(0)
        if source is None:
            model = PrehabModule(model=f"timm:{TIMM_NAME}", pretrained=False, model_kwargs=self.args.arch, **model_args)
        else:
            model = PrehabModule(model=f"timm:local-dir:{self.folder(source)}", pretrained=True, **model_args)
        trainer = pl.Trainer(accelerator="auto", max_steps=steps, logger=False, enable_checkpointing=False,
                             enable_model_summary=False, limit_val_batches=0, enable_progress_bar=False)
        started = time.perf_counter()
        trainer.fit(model, train_dataloaders=self.data.train_dataloader())
        seconds = time.perf_counter() - started
        self.save(model.model, name, {"candidate": candidate, "source": source, "steps": steps, "lr": lr,
                                      "batch_size": self.data.batch_size, "images": steps * self.data.batch_size,
                                      "seconds": seconds, "seconds_per_step": seconds / max(steps, 1)})
        print(f"[fit] {name}: {steps} steps in {seconds:.0f} s ({seconds / max(steps, 1):.3f} s/step)", flush=True)

    # ------------------------------------------------------------------------------------------- measurements
    def top1(self, model: torch.nn.Module, split: str) -> float:
        loader = self.data.heldout_dataloader() if split == "heldout" else self.data.test_dataloader()
        return 100 * evaluate_classification(model, loader, self.data.metrics())["top1"]

    def dense_row(self, name: str, split: str, stage: str) -> None:
        key = f"{stage}|{name}|dense"
        if key in self.rows:
            return
        model = self.load(name)
        self.rows.add({"key": key, "stage": stage, "model": name, "method": "dense", "ratio": 0.0, "draw": None,
                       "split": split, "top1": self.top1(model, split),
                       "params": sum(p.numel() for p in model.parameters())})

    def surgery_rows(self, name: str, method: str, ratios: list[float], draw: int, split: str, stage: str) -> None:
        keys = {r: f"{stage}|{name}|{method}|{r:g}|{draw}" for r in ratios}
        todo = [r for r in ratios if keys[r] not in self.rows]
        if not todo:
            return
        dense = self.load(name)
        loader = self.calibration(draw)
        for ratio, model, totals, seconds in compress_at_ratios(dense, METHODS[method], todo, loader):
            row = {"key": keys[ratio], "stage": stage, "model": name, "method": method, "ratio": ratio, "draw": draw,
                   "split": split, "top1": self.top1(model, split), "params": totals["model_params_after"],
                   "mean_relative_error": totals["mean_relative_error"], "seconds": seconds}
            if stage == "table" and draw == 0 and self.args.save == "draw0":
                save_compressed(model, self.out / "models" / name / f"{method}-{ratio:g}",
                                metadata={"calibration_draw": draw, "timm_arch": self.args.arch})
            self.rows.add(row)

    def rehab_row(self, name: str, method: str, ratio: float) -> None:
        key = f"rehab|{name}|{method}|{ratio:g}|0"
        if key in self.rows:
            return
        rehab_args = {k: v for k, v in self.settings["rehab"].items() if k not in ("datamodule", "dataloader")}
        if self.args.rehab_steps is not None:
            rehab_args["steps_per_factor"] = self.args.rehab_steps
        loader = self.calibration(0)
        pl.seed_everything(0)
        module = PrehabModule(model=self.load(name), lam=0.0, task="image_classification")
        surgery = METHODS[method](ratio=ratio, calibration_batches=len(loader), calibration_dataloader=loader,
                                  evaluate=False, plots=False, save_dense=False)
        rehab = LoRARehab(dataloader=self.data.train_dataloader(), evaluate=False, **rehab_args)
        trainer = pl.Trainer(accelerator="auto", max_steps=0, logger=False, enable_checkpointing=False,
                             enable_model_summary=False, enable_progress_bar=False, callbacks=[surgery, rehab])
        started = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        seconds = time.perf_counter() - started
        model = module.model
        self.rows.add({"key": key, "stage": "rehab", "model": name, "method": method, "ratio": ratio, "draw": 0,
                       "split": "test", "top1": self.top1(model, "test"), "seconds": seconds,
                       "params": sum(p.numel() for p in model.parameters()),
                       "rehab_steps": len(rehab.order) * rehab.steps_per_factor})
        if self.args.save == "draw0":
            save_compressed(model, self.out / "models" / name / f"{method}-{ratio:g}-rehab")

    # ------------------------------------------------------------------------------------------- stages
    def pretrain(self) -> None:
        steps = self.args.pretrain_steps or self.args.pretrain_epochs * len(self.data.train_dataloader())
        self.fit("pretrained", steps, self.args.pretrain_lr, {"lam": 0.0}, source=None)
        self.dense_row("pretrained", "test", "table")

    def candidates(self) -> list[dict[str, Any]]:
        listed = [parse_candidate(c) for c in self.args.candidates]
        paper = parse_candidate(self.args.paper)
        return listed + ([paper] if candidate_name(paper) not in map(candidate_name, listed) else [])

    def prehab_model(self, candidate: dict[str, Any]) -> str:
        name = candidate_name(candidate)
        self.fit(name, self.args.steps, self.settings["model"]["lr"], candidate, source="pretrained")
        return name

    def sweep(self) -> None:
        scores: dict[str, float] = {}
        regularizers: dict[str, str] = {}
        for candidate in [{"lam": 0.0}] + self.candidates():
            name = self.prehab_model(candidate)
            regularizers[name] = candidate.get("regularizer", "none")
            self.dense_row(name, "heldout", "heldout")
            self.surgery_rows(name, "svd_llm", self.args.sweep_ratios, 0, "heldout", "sweep")
            scores[name] = statistics.fmean(r["top1"] for r in self.rows.select(stage="sweep", model=name)
                                            if r["ratio"] in self.args.sweep_ratios)
        self.dense_row("pretrained", "heldout", "heldout")
        self.surgery_rows("pretrained", "svd_llm", self.args.sweep_ratios, 0, "heldout", "sweep")
        chosen = {}
        for regularizer in sorted({r for n, r in regularizers.items() if n != "control"}):
            names = [n for n, r in regularizers.items() if r == regularizer and n != "control"]
            chosen[regularizer] = max(names, key=scores.get)
        write_atomic(self.out / "chosen.json", json.dumps({"prehab": chosen, "scores": scores}, indent=2))
        print(f"[sweep] chosen on held-out training images: {chosen} ({scores})", flush=True)

    def table_models(self) -> list[str]:
        path = self.out / "chosen.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run the sweep stage first (--stages sweep ...).")
        chosen = json.loads(path.read_text())["prehab"]
        paper = self.prehab_model(parse_candidate(self.args.paper))
        self.prehab_model({"lam": 0.0})
        return list(dict.fromkeys(["pretrained", "control", paper, *chosen.values()]))

    def table(self) -> None:
        models = self.table_models()
        for name in models:
            self.dense_row(name, "test", "table")
        for draw in range(self.args.draws):
            for name in models:
                self.surgery_rows(name, "svd_llm", self.args.ratios, draw, "test", "table")
            if "svd" in self.args.table_methods:
                self.surgery_rows("pretrained", "svd", self.args.ratios, draw, "test", "table")

    def rehab(self) -> None:
        models = self.table_models()
        for ratio in self.args.rehab_ratios:
            for method in self.args.rehab_methods:
                for name in models if method == "svd_llm" else ["pretrained"]:
                    self.rehab_row(name, method, ratio)

    def spectra(self) -> None:
        """σ_i(W L) of every targeted layer, L from each model's own calibration inputs (what SVD-LLM truncates)."""
        path = self.out / "spectra.json"
        spectra = json.loads(path.read_text()) if path.is_file() else {}
        loader = self.calibration(0)
        for name in self.table_models():
            if name in spectra:
                continue
            model = self.load(name)
            targets = resolve_targets(model)
            covariances, _ = collect_input_covariances(model, targets, loader, len(loader), progress=False)
            spectra[name] = {}
            for layer, module in targets.items():
                factor = damped_cholesky(covariances[layer].double()).factor
                values = torch.linalg.svdvals(module.weight.detach().double() @ factor)
                spectra[name][layer] = {"shape": list(module.weight.shape), "sigma": values.tolist()}
        path.write_text(json.dumps(spectra))
        plot_spectra(spectra, self.args.ratios, self.out / "whitened_spectra.png")


# ----------------------------------------------------------------------------------------------- report
def row_label(model: str, method: str, chosen: dict[str, str], paper: str | None) -> str:
    base = {"pretrained": "pretrained ViT", "control": "control (λ = 0)"}.get(model)
    if base is None:
        tags = [t for t, hit in (("paper λ", model == paper), ("swept", model in chosen.values())) if hit]
        base = f"prehab {model}" + (f" ({', '.join(tags)})" if tags else "")
    return f"{base}, dense" if method == "dense" else (method if model == "pretrained" else f"{base} + {method}")


def write_report(out: Path) -> None:
    rows = list(Rows(out / "rows.jsonl").rows.values())
    chosen_path, settings_path = out / "chosen.json", out / "settings.json"
    chosen = json.loads(chosen_path.read_text())["prehab"] if chosen_path.is_file() else {}
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    paper = candidate_name(parse_candidate(settings["args"]["paper"])) if settings else None
    lines = ["# Prehab + SVD-LLM vs SVD and SVD-LLM on a ViT trained from scratch on Fashion-MNIST (top-1 %)", ""]
    if settings:
        args, data = settings["args"], settings["settings"]["data"]
        info = out / "models" / "pretrained" / "dense" / "prehab.json"
        pretrain = json.loads(info.read_text()) if info.is_file() else {}
        lines += [f"ViT `{TIMM_NAME}` family with {args['arch']}; pretrained from scratch for "
                  f"{pretrain.get('steps', '?')} steps of {data.get('batch_size')} images (lr {args['pretrain_lr']}); "
                  f"prehab/control {args['steps']} steps; held-out {data.get('heldout_samples')} training images, "
                  f"calibration {data.get('calibration_samples')} images, {args['draws']} calibration draw(s); "
                  f"test images: {data.get('max_eval_samples') or 'all'}.", ""]
    sweep = [r for r in rows if r["stage"] in ("sweep", "heldout")]
    if sweep:
        ratios = sorted({r["ratio"] for r in sweep if r["method"] != "dense"})
        lines += ["## Sweep: held-out training images, SVD-LLM (calibration draw 0)", "",
                  "| model | dense | " + " | ".join(f"svd_llm {r:g}" for r in ratios) + " |",
                  "|---" * (2 + len(ratios)) + "|"]
        for model in sorted({r["model"] for r in sweep}):
            cells = []
            for method, ratio in [("dense", 0.0)] + [("svd_llm", r) for r in ratios]:
                hit = [r for r in sweep if (r["model"], r["method"], r["ratio"]) == (model, method, ratio)]
                cells.append(f"{hit[0]['top1']:.2f}" if hit else "-")
            mark = " (chosen)" if model in chosen.values() else ""
            lines.append(f"| {model}{mark} | " + " | ".join(cells) + " |")
        lines.append("")
    table = [r for r in rows if r["stage"] in ("table", "rehab")]
    if table:
        ratios = sorted({r["ratio"] for r in table if r["method"] != "dense"})
        lines += ["## Test top-1 (%), without and with LoRA rehab (mean ± half-range over calibration draws)", "",
                  "| model + method | params | dense | " + " | ".join(f"{r:g}" for r in ratios) + " | "
                  + " | ".join(f"{r:g} + rehab" for r in ratios) + " |", "|---" * (3 + 2 * len(ratios)) + "|"]
        for r in sorted((r for r in table if r["method"] == "dense"), key=lambda r: r["model"] != "pretrained"):
            lines.append(f"| {row_label(r['model'], 'dense', chosen, paper)} | {r['params']:,} | {r['top1']:.2f} |"
                         + " - |" * (2 * len(ratios)))
        series = sorted({(r["model"], r["method"]) for r in table if r["method"] != "dense"},
                        key=lambda s: (s[0] != "pretrained", s[1], s[0] != "control", s[0]))
        for model, method in series:
            cells = []
            for stage in ("table", "rehab"):
                for ratio in ratios:
                    hit = [r["top1"] for r in table if (r["stage"], r["model"], r["method"], r["ratio"]) ==
                           (stage, model, method, ratio)]
                    cells.append(spread(hit, 2))
            sizes = sorted({r["params"] for r in table if (r["model"], r["method"]) == (model, method)}, reverse=True)
            lines.append(f"| {row_label(model, method, chosen, paper)} | {' / '.join(f'{p:,}' for p in sizes)} | - | "
                         + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## The paper's Table II (ViT-B/16, ImageNet-1k top-1 %)", "",
              "| method | " + " | ".join(f"{r:g}" for r in (0.0, 0.2, 0.4, 0.5, 0.6)) + " |", "|---" * 6 + "|"]
    for method, values in PAPER.items():
        lines.append(f"| {method} | " + " | ".join(f"{values[r]:.2f}" if r in values else "-"
                                                   for r in (0.0, 0.2, 0.4, 0.5, 0.6)) + " |")
    lines.append("")
    write_atomic(out / "results.md", "\n".join(lines))
    write_atomic(out / "results.json", json.dumps({"chosen": chosen, "paper_table2": PAPER, "rows": rows}, indent=2))
    write_csv(rows, out / "rows.csv")
    plot(rows, chosen, paper, out / "vit_top1.png")
    print("\n".join(lines))


def plot(rows: list[dict[str, Any]], chosen: dict[str, str], paper: str | None, path: Path) -> None:
    picked = [r for r in rows if r["stage"] in ("table", "rehab")]
    if not picked:
        return
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    dense = [r for r in picked if r["model"] == "pretrained" and r["method"] == "dense"]
    for axis, stage in zip(axes, ("table", "rehab"), strict=True):
        for model, method in sorted({(r["model"], r["method"]) for r in picked
                                     if r["stage"] == stage and r["method"] != "dense"}):
            ratios = sorted({r["ratio"] for r in picked if (r["stage"], r["model"], r["method"]) ==
                             (stage, model, method)})
            means = [statistics.fmean(r["top1"] for r in picked if (r["stage"], r["model"], r["method"], r["ratio"])
                                      == (stage, model, method, ratio)) for ratio in ratios]
            style = "o-" if model == "pretrained" else ("s--" if model == "control" else "^-")
            axis.plot(ratios, means, style, label=row_label(model, method, chosen, paper))
        if dense:
            axis.axhline(dense[0]["top1"], color="gray", ls=":", label="pretrained, dense")
        axis.set_xlabel("fraction of block parameters removed")
        axis.set_title("no rehab" if stage == "table" else "after LoRA rehab")
        axis.legend(fontsize=7)
    axes[0].set_ylabel("Fashion-MNIST test top-1 (%)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_spectra(spectra: dict[str, dict[str, Any]], ratios: list[float], path: Path) -> None:
    """One panel per targeted layer: σ_i(W L)/σ_1 of each model (log scale), with the ranks kept at each ratio."""
    if not spectra:
        return
    plt = pyplot()
    layers = list(next(iter(spectra.values())))
    columns = 4
    rows = (len(layers) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False)
    for index, layer in enumerate(layers):
        axis = axes[index // columns][index % columns]
        for name, layers_of in spectra.items():
            sigma = torch.tensor(layers_of[layer]["sigma"])
            style = ":" if name == "pretrained" else ("--" if name == "control" else "-")
            axis.semilogy((sigma / sigma[0]).clamp_min(1e-8).tolist(), style, label=name, lw=1)
        out_features, in_features = spectra[next(iter(spectra))][layer]["shape"]
        for ratio in ratios:
            axis.axvline(rank_from_ratio(out_features, in_features, ratio), color="gray", lw=0.5)
        axis.set_title(layer.replace("blocks.", "b"), fontsize=8)
        axis.tick_params(labelsize=6)
    for index in range(len(layers), rows * columns):
        axes[index // columns][index % columns].axis("off")
    axes[0][0].legend(fontsize=6)
    figure.suptitle("whitened spectra σ_i(W L)/σ_1 (grey lines: ranks kept at " + ", ".join(f"{r:g}" for r in ratios)
                    + " removed)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- smoke
def smoke_setup(args: argparse.Namespace) -> dict[str, Any]:
    """The first images of the real Fashion-MNIST files (random ones without them) and a tiny random ViT."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_image_assets import tiny_fashion_mnist

    out = Path(args.out)
    args.fashion_mnist = str(tiny_fashion_mnist(out / "smoke-data" / "fashion-mnist", Path(args.fashion_mnist)))
    settings = read_config(Path(args.config))
    settings["model"].update(calibration_batches=2)
    settings["data"].update(heldout_samples=16, calibration_samples=16, max_eval_samples=None, batch_size=16)
    args.arch = {**ARCH, "patch_size": 7, "embed_dim": 24, "depth": 2, "num_heads": 2}
    args.pretrain_epochs, args.pretrain_steps, args.steps, args.rehab_steps, args.draws = 1, None, 2, 1, 1
    args.candidates = ["nuclear:0.01", "stable_rank:0.1"]
    args.ratios, args.sweep_ratios, args.rehab_ratios = [0.2, 0.6], [0.6], [0.6]
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "vit_fashion_mnist.yaml"))
    parser.add_argument("--fashion-mnist", default=default_root(),
                        help="folder with the four IDX files (default $PREHAB_FASHION_MNIST, $PREHAB_DATA/fashion-mnist"
                             f" if it exists, else {DEBIAN_FOLDER})")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "prehab_vit"))
    parser.add_argument("--stages", nargs="+", default=["pretrain", "sweep", "table", "rehab", "spectra"],
                        choices=["pretrain", "sweep", "table", "rehab", "spectra"])
    parser.add_argument("--report", action="store_true", help="only write the tables/plots from OUT/rows.jsonl")
    parser.add_argument("--arch", type=json.loads, default=ARCH, help=f"timm ViT arguments (JSON), default {ARCH}")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, help="overrides --pretrain-epochs")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, help="prehab/control steps (default: the config's trainer.max_steps)")
    parser.add_argument("--paper", default="nuclear:0.1", help="the paper's ViT penalty, always in the table")
    parser.add_argument("--candidates", nargs="+",
                        default=["nuclear:0.001", "nuclear:0.01", "stable_rank:0.01", "stable_rank:0.1"],
                        help="penalties tried in the sweep (regularizer:lam); the best of each regularizer is kept")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--sweep-ratios", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--table-methods", nargs="+", default=["svd", "svd_llm"], choices=METHODS)
    parser.add_argument("--rehab-methods", nargs="+", default=["svd", "svd_llm"], choices=METHODS)
    parser.add_argument("--rehab-ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--rehab-steps", type=int, help="LoRA steps per factor (default: the config's)")
    parser.add_argument("--draws", type=int, default=1, help="calibration draws in the table stage")
    parser.add_argument("--save", choices=["draw0", "none"], default="draw0")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    parser.add_argument("--smoke", action="store_true", help="tiny random ViT, a few images (for tests)")
    args = parser.parse_args(argv)
    out = Path(args.out)
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
        args.fashion_mnist = ensure_fashion_mnist(args.fashion_mnist)
        settings = read_config(Path(args.config))
    args.steps = args.steps or settings["max_steps"]
    if not settings["data"].get("heldout_samples") and "sweep" in args.stages:
        raise SystemExit(f"{args.config}: data.init_args.heldout_samples is 0; the sweep needs held-out images.")
    write_atomic(out / "settings.json", json.dumps({"args": vars(args), "settings": settings}, indent=2, default=str))
    bench = Benchmark(args, settings)
    for stage in ("pretrain", "sweep", "table", "rehab", "spectra"):
        if stage in args.stages:
            getattr(bench, stage)()
            write_report(out)


if __name__ == "__main__":
    main()
