"""Prehab + surgery (+ LoRA rehab) against surgery alone on a real LLM: SmolLM2-135M, WikiText-2 and PTB.

    python ../shared/tools/fetch_models.py --only smollm2                 # once: $PREHAB_ASSETS/smollm2-135m
    python benchmarks/bench_prehab_llm.py --model $PREHAB_ASSETS/smollm2-135m --data ../shared/data --out OUT
    python benchmarks/bench_prehab_llm.py --smoke --out /tmp/smoke        # tiny random model, about a minute

The settings (model, penalty, learning rate, steps, data, calibration, rehab) come from a config that runs as it is
with ``prehab fit --config configs/smollm2_prehab.yaml`` (one calibration draw of the same comparison); flags
override the few things a CPU-sized run changes. Stages, each cached in ``OUT/rows.jsonl`` so an interrupted run
resumes where it stopped (delete the file to start over):

1. ``sweep``: fine-tune each candidate (λ = 0 and every ``--candidates`` penalty) for the same steps on the first
   windows of WikiText-2 **valid**, compress with SVD-LLM at ``--sweep-ratios`` (calibration draw 0), and score
   on the last ``--heldout-windows`` windows of valid, which no candidate trained on. The candidate with the
   lowest mean held-out perplexity over the sweep ratios becomes "prehab"; λ = 0 is the "control". No test split
   is looked at to choose. The step count is swept by running this stage with ``--steps S`` into one OUT per S
   (every candidate and the control fine-tuned for S steps; RESULTS.md §7, "Session 20").
2. ``table``: models base (the pretrained model, no fine-tune), prehab, control; methods SVD-LLM (every ratio),
   SAES-SVD and AA-SVD (``--two-stream-ratios``; AA-SVD on base only unless ``--aa-all``); ``--draws`` calibration
   draws (the same windows for every model and method), WikiText-2 test and PTB test perplexity; ``--table-models``
   limits the models (e.g. ``control prehab`` for a new step count: surgery alone does not depend on it).
3. ``rehab``: LoRA rehab on Alpaca (the config's LoRARehab settings) after SVD-LLM and SAES-SVD
   (``--rehab-methods``; ``--rehab-ridges aa_svd:0.1`` for a surgery with the callback's ridge) at
   ``--rehab-ratios``, calibration draws ``--first-draw`` to ``--rehab-draws`` − 1 (default: draw 0), for each of
   ``--rehab-models`` (default: every model).
4. ``calibration``: SVD-LLM, AA-SVD and SAES-SVD (``--calibration-methods``) at 0.2 on the base model with
   ``--calibration-sizes`` windows, ``--draws`` calibration draws each.
5. ``zeroshot``: zero-shot accuracy (``prehab.zeroshot``, lm-eval on the local tasks over GLUE files) of every
   saved draw-0 model, and with ``--zeroshot-compress`` of the ones that were not saved, compressed (and rehab'd)
   again (needs ``pip install 'prehab[zeroshot]'``).
6. ``diagnose`` (not run by default): per-layer relative output errors of SVD-LLM / AA-SVD (``--diagnose-methods``)
   on the base model at 0.2 with ``--diagnose-sizes`` calibration windows, on the calibration data and on new text
   (WikiText-2 test, PTB test), and each factorized weight's norm against the original's.

7. ``tails`` (not run by default): for the saved draw-0 compressions of the base model, the LM head input's error
   and quantiles of the per-token NLL increase over the dense model (``--diagnose-windows`` test windows).
8. ``ridge`` (not run by default): the solvers' ``ridge`` (Tikhonov term toward the original weights) for AA-SVD
   and SAES-SVD (``--ridge-methods``): ``--ridges`` scored on the held-out valid windows (base model at 0.2, draw
   0), the best on the test splits for ``--ridge-models`` at ``--ridge-ratios`` over ``--draws`` draws, and with
   ``--ridge-sizes`` calibration windows (base at 0.2, draw 0).

``--report`` (also run at the end) writes ``OUT/results.md``, ``OUT/results.json``, ``OUT/rows.csv`` and
``OUT/prehab_vs_surgery.png`` from whatever rows exist. Draw-0 compressed models are saved with
``save_compressed`` under ``OUT/models/<model>/<method>-<ratio>`` (``--save none`` to skip), the fine-tuned dense
models as plain Hugging Face folders under ``OUT/models/<model>/dense``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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
import common  # noqa: E402  (benchmarks/ is not a package; the pieces shared with the GLUE and ViT benchmarks)
from common import (  # noqa: E402
    Rows,
    candidate_name,
    compress_at_ratios,
    parse_candidate,
    parse_ridge,
    pyplot,
    write_atomic,
    write_csv,
)

from prehab.callbacks import AASVD, SAESSVD, SVDLLM, LoRARehab  # noqa: E402
from prehab.datamodules import PTB, Alpaca, WikiText  # noqa: E402
from prehab.datamodules._common import TokenWindowDataset  # noqa: E402
from prehab.evaluation import perplexity  # noqa: E402
from prehab.lowrank import save_compressed  # noqa: E402
from prehab.module import PrehabModule  # noqa: E402

METHODS = {"svd_llm": SVDLLM, "saes_svd": SAESSVD, "aa_svd": AASVD}
MODEL_ORDER = ("base", "control", "prehab")
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- settings
def read_config(path: Path) -> dict[str, Any]:
    """The parts of a ``prehab fit`` config this benchmark uses: PrehabModule's, WikiText's and LoRARehab's args."""
    config = yaml.safe_load(path.read_text())
    model = dict(config["model"])
    data = dict(config["data"]["init_args"])
    rehab = next(
        (c["init_args"] for c in config["trainer"].get("callbacks", []) if c["class_path"].endswith("LoRARehab")), None
    )
    if rehab is None:
        raise SystemExit(f"{path}: no LoRARehab callback in trainer.callbacks; the rehab rows need its settings.")
    return {"model": model, "data": data, "rehab": dict(rehab), "max_steps": config["trainer"]["max_steps"]}


# ----------------------------------------------------------------------------------------------- the benchmark
class Benchmark:
    def __init__(self, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        self.args, self.settings = args, settings
        self.out = Path(args.out)
        (self.out / "models").mkdir(parents=True, exist_ok=True)
        self.rows = Rows(self.out / "rows.jsonl")
        data = settings["data"]
        self.seq_len = data["seq_len"]
        self.batch_size = data["batch_size"]
        self.wikitext = self.text_module(seed=0)
        self.tokenizer = self.wikitext.tokenizer
        valid = self.wikitext.windows("valid")
        heldout = args.heldout_windows
        if len(valid) <= heldout:
            raise SystemExit(f"WikiText-2 valid has {len(valid)} windows of {self.seq_len}: lower --heldout-windows.")
        self.train_windows = TokenWindowDataset(valid.tokens, valid.starts[:-heldout], self.seq_len)
        self.heldout = TokenWindowDataset(valid.tokens, valid.starts[-heldout:], self.seq_len).as_tensor()
        self.test = self.wikitext.windows("test", args.eval_windows).as_tensor()
        ptb = PTB(dataset=str(Path(args.data) / "ptb"), tokenizer=self.tokenizer, seq_len=self.seq_len)
        self.ptb = ptb.windows("test", args.eval_windows).as_tensor()
        self.base_folder = settings["model"]["model"]

    def text_module(self, seed: int, samples: int | None = None) -> WikiText:
        data = self.settings["data"]
        return WikiText(
            dataset=str(Path(self.args.data) / "wikitext-2-raw"),
            tokenizer=self.settings["model"]["model"] if not hasattr(self, "tokenizer") else self.tokenizer,
            seq_len=data["seq_len"],
            train_split="valid",
            val_split="test",
            calibration_split="valid",
            calibration_samples=samples or self.args.calibration_windows,
            batch_size=data["batch_size"],
            seed=seed,
        )

    def calibration(self, draw: int, samples: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Calibration draw ``draw``: windows at seeded random offsets of valid, the same for every model/method."""
        module = self.text_module(seed=draw, samples=samples)
        module.setup("fit")
        return list(module.calibration_dataloader())

    # ------------------------------------------------------------------------------------------- models
    def model_folder(self, name: str) -> str:
        return self.base_folder if name == "base" else str(self.out / "models" / name / "dense")

    def load(self, name: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_folder(name), dtype=torch.float32).eval()

    def train(self, name: str, candidate: dict[str, Any], seed: int = 0) -> None:
        """Fine-tune the base model with ``candidate``'s penalty (λ = 0: the control) and save it as an HF folder.

        ``seed`` sets the fine-tune's initial RNG state and the order of its batches (the same for every candidate).
        """
        folder = Path(self.model_folder(name))
        if (folder / "config.json").is_file():
            return
        model_args = {k: v for k, v in self.settings["model"].items() if k not in ("regularizer", "lam", "tail_ratio")}
        model_args.update(candidate)
        if candidate["lam"] == 0:
            model_args["regularizer"] = "stable_rank"  # unused at λ = 0
        pl.seed_everything(seed)
        module = PrehabModule(**model_args)
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(self.train_windows, batch_size=self.batch_size, shuffle=True, generator=generator)
        trainer = pl.Trainer(
            accelerator="auto",
            max_steps=self.args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        started = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        seconds = time.perf_counter() - started
        folder.mkdir(parents=True, exist_ok=True)
        module.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / "prehab.json").write_text(
            json.dumps({"candidate": candidate, "seed": seed, "steps": self.args.steps, "lr": model_args.get("lr"),
                        "tokens": self.args.steps * self.batch_size * self.seq_len, "seconds": seconds}, indent=2)
        )

    # ------------------------------------------------------------------------------------------- measurements
    def ppl(self, model: torch.nn.Module, windows: torch.Tensor) -> float:
        return perplexity(model, windows, batch_size=self.batch_size)

    def dense_row(self, name: str, split: str) -> None:
        key = f"{split}|{name}|dense"
        if key in self.rows:
            return
        model = self.load(name)
        params = sum(p.numel() for p in model.parameters())
        if split == "heldout":
            row = {"heldout_valid": self.ppl(model, self.heldout)}
        else:
            row = {"wikitext2": self.ppl(model, self.test), "ptb": self.ppl(model, self.ptb)}
        self.rows.add({"key": key, "stage": split, "model": name, "method": "dense", "ratio": 0.0, "draw": None,
                       "params": params, **row})

    def surgery_rows(self, name: str, method: str, ratios: list[float], draw: int, split: str = "test",
                     samples: int | None = None, stage: str = "table", ridge: float = 0.0) -> None:
        """Compress model ``name`` with ``method`` at each ratio (one statistics pass shared by one-stream ratios).

        ``ridge`` > 0: the callback's ``ridge`` (rows named ``{method}+ridge``, with the value in ``ridge``)."""
        samples = samples or self.args.calibration_windows
        suffix = f"|ridge{ridge:g}" if ridge else ""
        keys = {r: f"{stage}|{name}|{method}|{r:g}|{draw}|{samples}{suffix}" for r in ratios}
        todo = [r for r in ratios if keys[r] not in self.rows]
        if not todo:
            return
        dense = self.load(name)
        loader = self.calibration(draw, samples)
        callback = functools.partial(METHODS[method], ridge=ridge)  # 0: the papers' exact forms, as the rows say
        for ratio, model, totals, seconds in compress_at_ratios(dense, callback, todo, loader):
            row = {"key": keys[ratio], "stage": stage, "model": name, "method": method + ("+ridge" if ridge else ""),
                   "ratio": ratio, "draw": draw, "calibration_tokens": samples * self.seq_len,
                   "params": totals["model_params_after"], "mean_relative_error": totals["mean_relative_error"],
                   "seconds": seconds, **({"ridge": ridge} if ridge else {})}
            if split == "heldout":
                row["heldout_valid"] = self.ppl(model, self.heldout)
            else:
                row["wikitext2"] = self.ppl(model, self.test)
                row["ptb"] = self.ppl(model, self.ptb)
            if draw == 0 and stage == "table" and self.args.save == "draw0":
                save_compressed(model, self.out / "models" / name / f"{method}-{ratio:g}",
                                metadata={"calibration_draw": draw, "calibration_tokens": samples * self.seq_len})
            self.rows.add(row)

    def rehab_row(self, name: str, method: str, ratio: float, ridge: float = 0.0, draw: int = 0) -> None:
        """Surgery (calibration ``draw``) then LoRA rehab; ``ridge`` > 0: the callback's ``ridge`` (rows named
        ``{method}+ridge``, saved as ``{method}+ridge-{ratio}-rehab``; draw 0 only is saved)."""
        key = f"rehab|{name}|{method}|{ratio:g}|{draw}" + (f"|ridge{ridge:g}" if ridge else "")
        if key in self.rows:
            return
        label = method + ("+ridge" if ridge else "")
        model, seconds, rehab_tokens = self.rehabbed(name, method, ratio, ridge, draw)
        row = {"key": key, "stage": "rehab", "model": name, "method": label, "ratio": ratio, "draw": draw,
               **({"ridge": ridge} if ridge else {}),
               "params": sum(p.numel() for p in model.parameters()), "seconds": seconds,
               "rehab_tokens": rehab_tokens, "wikitext2": self.ppl(model, self.test), "ptb": self.ppl(model, self.ptb)}
        if self.args.save == "draw0" and draw == 0:
            save_compressed(model, self.out / "models" / name / f"{label}-{ratio:g}-rehab")
        self.rows.add(row)

    def rehabbed(self, name: str, method: str, ratio: float, ridge: float, draw: int) -> tuple[Any, float, int]:
        """Model ``name`` after surgery (calibration ``draw``) and LoRA rehab: (model, seconds, rehab tokens)."""
        rehab_args = dict(self.settings["rehab"])
        alpaca_args = dict(rehab_args.pop("datamodule")["init_args"])
        alpaca_args["dataset"] = str(Path(self.args.data) / "alpaca" / Path(alpaca_args["dataset"]).name)
        alpaca = Alpaca(tokenizer=self.tokenizer, **alpaca_args)
        if self.args.rehab_steps is not None:
            rehab_args["steps_per_factor"] = self.args.rehab_steps
        loader = self.calibration(draw)
        module = PrehabModule(model=self.load(name), lam=0.0)
        surgery = METHODS[method](ratio=ratio, calibration_batches=len(loader), calibration_dataloader=loader,
                                  ridge=ridge, evaluate=False, plots=False, save_dense=False)
        rehab = LoRARehab(datamodule=alpaca, evaluate=False, **rehab_args)
        trainer = pl.Trainer(accelerator="auto", max_steps=0, logger=False, enable_checkpointing=False,
                             enable_model_summary=False, callbacks=[surgery, rehab])
        started = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        seconds = time.perf_counter() - started
        return module.model, seconds, len(rehab.order) * rehab.steps_per_factor * alpaca.batch_size * alpaca.cutoff_len

    # ------------------------------------------------------------------------------------------- stages
    def sweep(self) -> str:
        """Train every candidate, score it on held-out valid after SVD-LLM; returns the chosen candidate's name."""
        candidates = [{"regularizer": "stable_rank", "lam": 0.0}] + [parse_candidate(c) for c in self.args.candidates]
        scores = {}
        for candidate in candidates:
            name = candidate_name(candidate)
            self.train(name, candidate)
            self.dense_row(name, "heldout")
            self.surgery_rows(name, "svd_llm", self.args.sweep_ratios, 0, split="heldout", stage="sweep")
            rows = [r for r in self.rows.select(stage="sweep", model=name)]
            scores[name] = statistics.fmean(math.log(r["heldout_valid"]) for r in rows)
        self.dense_row("base", "heldout")
        self.surgery_rows("base", "svd_llm", self.args.sweep_ratios, 0, split="heldout", stage="sweep")
        penalties = {n: s for n, s in scores.items() if n != "control"}
        chosen = min(penalties, key=penalties.get)
        write_atomic(self.out / "chosen.json", json.dumps({"prehab": chosen, "scores_mean_log_ppl": scores}, indent=2))
        print(f"[sweep] chosen on held-out WikiText-2 valid: {chosen} (mean log ppl {scores})", flush=True)
        return chosen

    def chosen(self) -> str:
        """The sweep's penalty (``OUT/chosen.json``), or ``--prehab``'s, recorded there for the report when absent."""
        path = self.out / "chosen.json"
        given = candidate_name(parse_candidate(self.args.prehab)) if self.args.prehab else None
        if not path.is_file():
            if given is None:
                raise SystemExit(f"{path} is missing: run the sweep stage first (--stages sweep ...), or name the "
                                 "penalty with --prehab, e.g. --prehab tail:1:0.4.")
            write_atomic(path, json.dumps({"prehab": given, "given": self.args.prehab}, indent=2))
        chosen = json.loads(path.read_text())["prehab"]
        if given is not None and given != chosen:
            raise SystemExit(f"--prehab {self.args.prehab} ({given}) differs from {path}'s {chosen}: use another "
                             "--out, or leave --prehab out to use the sweep's choice.")
        return chosen

    def alias(self, chosen: str) -> dict[str, str]:
        """Model names for ``--finetune-seed``: seed 0 is the sweep's models, seed s > 0 fine-tunes the control and
        the chosen penalty again (``control-seed{s}``, ``{chosen}-seed{s}``); the base model has no fine-tune."""
        seed = self.args.finetune_seed
        if seed == 0:
            return {"base": "base", "control": "control", "prehab": chosen}
        return {"base": "base", "control": f"control-seed{seed}", "prehab": f"{chosen}-seed{seed}"}

    def seed_models(self) -> dict[str, str]:
        """:meth:`alias`'s names, with seed s > 0's two models fine-tuned first where they are not saved yet."""
        chosen = self.chosen()
        names = self.alias(chosen)
        if self.args.prehab:  # no sweep in this OUT: fine-tune both models of this seed where they are missing
            candidate = parse_candidate(self.args.prehab)
        elif self.args.finetune_seed:
            candidate = json.loads((Path(self.model_folder(chosen)) / "prehab.json").read_text())["candidate"]
        else:
            return names
        self.train(names["control"], {"regularizer": "stable_rank", "lam": 0.0}, self.args.finetune_seed)
        self.train(names["prehab"], candidate, self.args.finetune_seed)
        return names

    def table(self) -> None:
        names = self.seed_models()
        models = [label for label in MODEL_ORDER if label in self.args.table_models]
        for label in models:
            self.dense_row(names[label], "test")
        methods = self.args.table_methods
        aa_models = [label for label in models if self.args.aa_all or label == "base"]
        # cheapest first, so an interrupted run has whole draws of SVD-LLM
        for draw in range(self.args.first_draw, self.args.draws):
            for label in models if "svd_llm" in methods else ():
                self.surgery_rows(names[label], "svd_llm", self.args.ratios, draw)
            for label in models if "saes_svd" in methods else ():
                self.surgery_rows(names[label], "saes_svd", self.args.two_stream_ratios, draw)
            for label in aa_models if "aa_svd" in methods else ():
                self.surgery_rows(names[label], "aa_svd", self.args.two_stream_ratios, draw)

    def rehab(self) -> None:
        names = self.seed_models()
        for draw in range(self.args.first_draw, self.args.rehab_draws):
            for ratio in self.args.rehab_ratios:
                for method in self.args.rehab_methods:
                    for label in self.args.rehab_models:
                        self.rehab_row(names[label], method, ratio, self.args.rehab_ridges.get(method, 0.0), draw)

    def zeroshot(self) -> None:
        """Zero-shot accuracy (lm-eval, ``--zeroshot-tasks``) of every draw-0 model: dense, surgery, rehab.

        A saved model is loaded; one that was not saved (``--save none``) is compressed (and rehab'd) again from
        the same calibration windows and rehab data when ``--zeroshot-compress`` is given, else skipped. Such a row
        says ``recompressed`` and carries a number to compare with its source row (surgery: the
        ``mean_relative_error``; rehab: the WikiText-2 and PTB test perplexities)."""
        from prehab.lowrank import load_compressed
        from prehab.zeroshot import zero_shot

        names = self.seed_models()
        for label in self.args.zeroshot_models:
            name = names[label]
            folders = [("dense", 0.0, None, None)] + [
                (r["method"] + ("+rehab" if r["stage"] == "rehab" else ""), r["ratio"], r["stage"], r)
                for r in sorted(self.rows.select(model=name), key=lambda r: (r["method"], r["ratio"]))
                if r["stage"] in ("table", "rehab") and r["draw"] == 0
            ]
            for method, ratio, stage, source in folders:
                key = f"zeroshot|{name}|{method}|{ratio:g}"
                if key in self.rows or (self.args.zeroshot_methods and method not in self.args.zeroshot_methods):
                    continue
                if stage is not None and self.args.zeroshot_ratios and ratio not in self.args.zeroshot_ratios:
                    continue
                extra: dict[str, Any] = {}
                if stage is None:
                    model = self.load(name)
                else:
                    suffix = "-rehab" if stage == "rehab" else ""
                    folder = self.out / "models" / name / f"{method.removesuffix('+rehab')}-{ratio:g}{suffix}"
                    if folder.is_dir():
                        model = load_compressed(folder)
                    elif stage == "table" and self.args.zeroshot_compress:
                        loader = self.calibration(0, source["calibration_tokens"] // self.seq_len)
                        [(_, model, totals, _)] = compress_at_ratios(self.load(name), METHODS[method], [ratio], loader)
                        extra = {"recompressed": True, "mean_relative_error": totals["mean_relative_error"]}
                    elif stage == "rehab" and self.args.zeroshot_compress:
                        base_method = source["method"].removesuffix("+ridge")
                        model = self.rehabbed(name, base_method, ratio, source.get("ridge", 0.0), 0)[0]
                        extra = {"recompressed": True, "wikitext2": self.ppl(model, self.test),
                                 "ptb": self.ppl(model, self.ptb)}
                    else:
                        continue
                started = time.perf_counter()
                scores = zero_shot(model, self.tokenizer, self.args.zeroshot_tasks, limit=self.args.zeroshot_limit,
                                   batch_size=self.batch_size * 4, data_dir=self.args.data)
                self.rows.add({"key": key, "stage": "zeroshot", "model": name, "method": method, "ratio": ratio,
                               "draw": 0, "params": sum(p.numel() for p in model.parameters()),
                               "seconds": time.perf_counter() - started, **extra,
                               **{f"{task}/{metric}": values[metric] for task, values in scores.items()
                                  for metric in ("acc", "acc_norm") if metric in values}})

    def diagnose(self) -> None:
        """Per-layer errors of the base model's compression at ``--diagnose-sizes`` (draw 0, ratio 0.2): on the
        calibration data (the report's), on ``--diagnose-windows`` WikiText-2 test and PTB test windows
        (:func:`~prehab.evaluation.layer_output_errors`), and ``‖W'‖ / ‖W‖``; tells a solution that fits its
        calibration set but not new text (or blows up its weights) from one that is merely a worse fit."""
        import copy

        from prehab.evaluation import layer_output_errors

        windows = self.args.diagnose_windows
        held_out = {"wikitext2": list(self.test[:windows].split(1)), "ptb": list(self.ptb[:windows].split(1))}
        todo = [(samples, method) for samples in self.args.diagnose_sizes for method in self.args.diagnose_methods
                if f"diagnose|base|{method}|0.2|0|{samples}" not in self.rows]
        dense = self.load("base") if todo else None
        for samples, method in todo:
            key = f"diagnose|base|{method}|0.2|0|{samples}"
            model = copy.deepcopy(dense)
            loader = self.calibration(0, samples)
            callback = METHODS[method](ratio=0.2, calibration_batches=len(loader), plots=False, ridge=0.0)
            started = time.perf_counter()
            report = callback.compress(model, loader, progress=False)
            seconds = time.perf_counter() - started
            layers = [layer for layer in report.layers if layer.compressed]
            names = [layer.name for layer in layers]
            errors = {corpus: layer_output_errors(dense, model, batches, names)
                      for corpus, batches in held_out.items()}
            rows = []
            for layer in layers:
                weight = dense.get_submodule(layer.name).weight.detach().double()
                approx = model.get_submodule(layer.name).weight.detach().double()
                rows.append({"name": layer.name, "rank": layer.rank, "calibration": layer.relative_error,
                             "damping": layer.damping, "norm_ratio": float(approx.norm() / weight.norm()),
                             **{corpus: errors[corpus][layer.name] for corpus in held_out}})
            self.rows.add({"key": key, "stage": "diagnose", "model": "base", "method": method, "ratio": 0.2,
                           "draw": 0, "calibration_tokens": samples * self.seq_len,
                           "params": report.totals()["model_params_after"], "seconds": seconds,
                           "held_out_windows": windows, "wikitext2": self.ppl(model, self.test),
                           "ptb": self.ppl(model, self.ptb), "layers": rows})
            del model

    def tails(self) -> None:
        """Where the loss goes, for every saved draw-0 compression of the base model: the relative error of the LM
        head's input (the last hidden state) against the dense model's, token-weighted and its per-token median,
        and quantiles of the per-token NLL increase, on ``--diagnose-windows`` test windows of each corpus."""
        from prehab.lowrank import load_compressed

        windows = self.args.diagnose_windows
        corpora = {"wikitext2": self.test[:windows], "ptb": self.ptb[:windows]}
        saved = sorted({(r["method"], r["ratio"]) for r in self.rows.select(model="base")
                        if r["stage"] == "table" and r["draw"] == 0})
        todo = [(m, ratio) for m, ratio in saved if f"tails|base|{m}|{ratio:g}|0" not in self.rows
                and (self.out / "models" / "base" / f"{m}-{ratio:g}").is_dir()]
        if not todo:
            return
        reference = {corpus: hidden_and_nll(self.load("base"), data) for corpus, data in corpora.items()}
        for method, ratio in todo:
            model = load_compressed(self.out / "models" / "base" / f"{method}-{ratio:g}")
            row = {"key": f"tails|base|{method}|{ratio:g}|0", "stage": "tails", "model": "base", "method": method,
                   "ratio": ratio, "draw": 0, "held_out_windows": windows}
            for corpus, data in corpora.items():
                hidden, nll = hidden_and_nll(model, data)
                row[corpus] = tail_statistics(reference[corpus], (hidden, nll))
            self.rows.add(row)

    def ridge(self) -> None:
        """The ``ridge`` argument of the two-stream solvers, chosen on the base model at 0.2: ``--ridges`` scored on
        held-out WikiText-2 valid (draw 0); the best one (lowest held-out perplexity) then on the test splits for
        each of ``--ridge-models`` at ``--ridge-ratios`` over ``--draws`` draws, and on the base model at 0.2 with
        each of ``--ridge-sizes`` calibration windows (draws ``--first-draw`` to ``--ridge-size-draws`` − 1)."""
        names = self.seed_models() if set(self.args.ridge_models) - {"base"} else {"base": "base"}
        for method in self.args.ridge_methods:
            for ridge in self.args.ridges:
                self.surgery_rows("base", method, [0.2], 0, split="heldout", stage="ridge_sweep", ridge=ridge)
            scores = {r.get("ridge", 0.0): r["heldout_valid"] for r in self.rows.rows.values()
                      if r["stage"] == "ridge_sweep" and base_method(r) == method}
            best = min(scores, key=scores.get)
            if not best:
                continue  # the exact closed form won: its test rows are the main table's
            for draw in range(self.args.first_draw, self.args.draws):
                for label in self.args.ridge_models:
                    self.surgery_rows(names[label], method, self.args.ridge_ratios, draw, stage="ridge", ridge=best)
            for draw in range(self.args.first_draw, self.args.ridge_size_draws):
                for samples in self.args.ridge_sizes:
                    self.surgery_rows("base", method, [0.2], draw, samples=samples, stage="ridge", ridge=best)

    def calibration_sizes(self) -> None:
        for samples in self.args.calibration_sizes:
            for method in self.args.calibration_methods:
                for draw in range(self.args.first_draw, self.args.draws):
                    self.surgery_rows("base", method, [0.2], draw, samples=samples, stage="calibration")


# ----------------------------------------------------------------------------------------------- report
def spread(values: list[float]) -> str:
    """``mean ± half-range (n=k)``, with ``(n=1)`` too: the tables mix rows of one and of several draws."""
    return common.spread(values, digits=2) + (" (n=1)" if len(values) == 1 else "")


def write_report(out: Path) -> None:
    rows = Rows(out / "rows.jsonl")
    all_rows = list(rows.rows.values())
    chosen_path = out / "chosen.json"
    chosen = json.loads(chosen_path.read_text()) if chosen_path.is_file() else {}
    prehab = chosen.get("prehab")
    label = {"base": "base (no fine-tune)", "control": "control (λ = 0 fine-tune)"}
    if prehab:
        label[prehab] = f"prehab ({prehab})"
    for seed in finetune_seeds(all_rows, prehab):
        label[f"control-seed{seed}"] = f"control (λ = 0 fine-tune, seed {seed})"
        label[f"{prehab}-seed{seed}"] = f"prehab ({prehab}, fine-tune seed {seed})"
    lines = ["# Prehab + surgery vs surgery alone (SmolLM2-135M)", ""]
    sweep = [r for r in all_rows if r["stage"] in ("sweep", "heldout")]
    if sweep:
        lines += ["## Sweep: held-out WikiText-2 valid perplexity after SVD-LLM (calibration draw 0)", "",
                  "error: mean relative output error of the compressed layers on the calibration data.", "",
                  "| model | dense | " + " | ".join(f"svd_llm {r:g}" for r in sorted({
                      r["ratio"] for r in sweep if r["method"] != "dense"})) + " |"]
        ratios = sorted({r["ratio"] for r in sweep if r["method"] != "dense"})
        lines.append("|---" * (2 + len(ratios)) + "|")
        for model in sorted({r["model"] for r in sweep}):
            dense = [r for r in sweep if r["model"] == model and r["method"] == "dense"]
            cells = [f"{dense[0]['heldout_valid']:.2f}" if dense else "-"]
            for ratio in ratios:
                hit = [r for r in sweep if r["model"] == model and r["method"] == "svd_llm" and r["ratio"] == ratio]
                error = hit[0].get("mean_relative_error") if hit else None
                cells.append(f"{hit[0]['heldout_valid']:.2f} (error {error:.4f})" if error is not None else
                             f"{hit[0]['heldout_valid']:.2f}" if hit else "-")
            mark = " (chosen)" if model == prehab else ""
            lines.append(f"| {model}{mark} | " + " | ".join(cells) + " |")
        lines.append("")
    for stage, title in (("table", "Main table: WikiText-2 test / PTB test perplexity, mean ± half-range over "
                                   "calibration draws"),
                         ("rehab", "After LoRA rehab on Alpaca, mean ± half-range over calibration draws"),
                         ("calibration", "Calibration size (base model, ratio 0.2), mean ± half-range over "
                                         "calibration draws")):
        picked = [r for r in all_rows if r["stage"] == stage or (stage == "table" and r["stage"] == "test")]
        if stage == "calibration" and picked:  # the main table's base rows at 0.2 are the default size's draws
            methods = {r["method"] for r in picked}
            picked += [r for r in all_rows if r["stage"] == "table" and r["model"] == "base" and r["ratio"] == 0.2
                       and r["method"] in methods]
        if not picked:
            continue
        lines += [f"## {title}", "", "| model | method | ratio | calibration tokens | params | WikiText-2 | PTB |",
                  "|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in picked:
            groups.setdefault((r["model"], r["method"], r["ratio"], r.get("calibration_tokens")), []).append(r)

        def order(item: tuple) -> tuple:
            model, method, ratio, tokens = item[0]
            rank = 0 if model == "base" else 1 if model.startswith("control") else 2
            return (ratio, tokens or 0, method != "dense", method, rank, model)

        for (model, method, ratio, tokens), group in sorted(groups.items(), key=order):
            lines.append(
                f"| {label.get(model, model)} | {method} | {ratio:g} | {tokens or '-'} | {group[0]['params']:,} | "
                f"{spread([g['wikitext2'] for g in group])} | {spread([g['ptb'] for g in group])} |"
            )
        lines.append("")
    lines += paired_lines(all_rows, prehab)
    zeroshot = [r for r in all_rows if r["stage"] == "zeroshot"]
    if zeroshot:
        tasks = sorted({k for r in zeroshot for k in r if k.endswith(("/acc", "/acc_norm"))})
        lines += ["## Zero-shot accuracy (lm-eval, calibration draw 0)", "",
                  "| model | method | ratio | " + " | ".join(tasks) + " |", "|---" * (3 + len(tasks)) + "|"]
        for r in sorted(zeroshot, key=lambda r: (r["ratio"], r["method"], r["model"])):
            cells = " | ".join(f"{r[t]:.3f}" if t in r else "-" for t in tasks)
            lines.append(f"| {label.get(r['model'], r['model'])} | {r['method']} | {r['ratio']:g} | {cells} |")
        lines.append("")
    lines += ridge_lines(all_rows)
    diagnosed = [r for r in all_rows if r["stage"] == "diagnose"]
    lines += diagnose_lines(diagnosed)
    lines += tails_lines([r for r in all_rows if r["stage"] == "tails"])
    write_atomic(out / "results.md", "\n".join(lines))
    write_atomic(out / "results.json", json.dumps({"chosen": chosen, "rows": all_rows}, indent=2))
    write_csv([{k: v for k, v in r.items() if k != "layers" and not isinstance(v, dict)} for r in all_rows],
              out / "rows.csv")
    plot(all_rows, prehab, out / "prehab_vs_surgery.png")
    if diagnosed:
        plot_layer_errors(diagnosed, out / "layer_errors.png")
    print("\n".join(lines))


def hidden_and_nll(model: torch.nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden state (the LM head's input) and each next-token NLL, one window at a time."""
    hidden, nll = [], []
    model.eval()
    with torch.no_grad():
        for window in windows.split(1):
            out = model(window, output_hidden_states=True)
            logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
            nll.append(-logp.gather(-1, window[:, 1:, None])[..., 0].double())
            hidden.append(out.hidden_states[-1].double())
    return torch.cat(hidden), torch.cat(nll)


def tail_statistics(dense: tuple[torch.Tensor, torch.Tensor], compressed: tuple[torch.Tensor, torch.Tensor]
                    ) -> dict[str, float]:
    """Final-hidden-state error and quantiles of the per-token NLL increase (see :meth:`Benchmark.tails`)."""
    error = (compressed[0] - dense[0]).pow(2).sum(-1)
    signal = dense[0].pow(2).sum(-1)
    increase = (compressed[1] - dense[1]).flatten()
    quantiles = torch.quantile(increase, torch.tensor([0.5, 0.9, 0.99], dtype=increase.dtype)).tolist()
    return {"hidden_error": float(error.sum() / signal.sum()), "hidden_error_median": float((error / signal).median()),
            "nll_increase_mean": float(increase.mean()), "nll_increase_median": quantiles[0],
            "nll_increase_p90": quantiles[1], "nll_increase_p99": quantiles[2]}


def tails_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["## Where the loss goes: the LM head's input and the per-token NLL increase over the dense model", "",
             f"Base model, calibration draw 0 (the saved models), the first {rows[0]['held_out_windows']} test windows "
             "of each corpus. hidden error: ‖h − ĥ‖² / ‖h‖² of the last hidden state, over all tokens (median of "
             "the per-token ratio in brackets); ΔNLL: compressed minus dense next-token NLL, in nats.", "",
             "| method | ratio | corpus | hidden error | ΔNLL mean | ΔNLL median | ΔNLL p90 | ΔNLL p99 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["ratio"], r["method"])):
        for corpus in ("wikitext2", "ptb"):
            t = r[corpus]
            name = "WikiText-2" if corpus == "wikitext2" else "PTB"
            quantiles = " | ".join(f"{t[f'nll_increase_{q}']:.3f}" for q in ("mean", "median", "p90", "p99"))
            lines.append(f"| {r['method']} | {r['ratio']:g} | {name} | {t['hidden_error']:.3f} "
                         f"({t['hidden_error_median']:.3f}) | {quantiles} |")
    return lines + [""]


def base_method(row: dict[str, Any]) -> str:
    """The surgery a row ran, without the ``+ridge`` / ``+rehab`` suffix."""
    return row["method"].split("+")[0]


def ridge_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The ridge stage: the held-out sweep, then the chosen ridge against the exact closed form on the test splits
    (the exact rows: the main table's and the calibration-size stage's, same model, ratio and draws)."""
    sweep = [r for r in rows if r["stage"] == "ridge_sweep"]
    if not sweep:
        return []
    lines = ["## Ridge (Tikhonov term toward W) for the two-stream solvers", "",
             "Held-out WikiText-2 valid perplexity, base model at 0.2, calibration draw 0 (chooses the ridge; no test "
             "split is used):", "",
             "| method | ridge | held-out valid | mean relative error (calibration data) |", "|---|---|---|---|"]
    for r in sorted(sweep, key=lambda r: (base_method(r), r.get("ridge", 0.0))):
        lines.append(f"| {base_method(r)} | {r.get('ridge', 0.0):g} | {r['heldout_valid']:.2f} | "
                     f"{r['mean_relative_error']:.4f} |")
    tested = [r for r in rows if r["stage"] == "ridge"]
    if tested:
        # the exact rows of the same (model, method, ratio, calibration tokens, draw): paired by draw
        paired = {(r["model"], base_method(r), r["ratio"], r["calibration_tokens"], r["draw"]) for r in tested}
        exact = [r for r in rows if r["stage"] in ("table", "calibration")
                 and (r["model"], r["method"], r["ratio"], r.get("calibration_tokens"), r["draw"]) in paired]
        lines += ["", "Test splits: the chosen ridge against the exact closed form (mean ± half-range over the same "
                  "draws; no exact row: not run for that model):", "",
                  "| model | method | ratio | ridge | calibration tokens | WikiText-2 | PTB |",
                  "|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in tested + exact:
            key = (MODEL_ORDER.index(r["model"]) if r["model"] in MODEL_ORDER else len(MODEL_ORDER), r["model"],
                   base_method(r), r["ratio"], r["calibration_tokens"], r.get("ridge", 0.0))
            groups.setdefault(key, []).append(r)
        for (_, model, method, ratio, tokens, ridge), group in sorted(groups.items()):
            lines.append(f"| {model} | {method} | {ratio:g} | {ridge:g} | {tokens} | "
                         f"{spread([g['wikitext2'] for g in group])} | {spread([g['ptb'] for g in group])} |")
    return lines + [""]


def block_of(name: str) -> int:
    """The block index in a layer name like ``model.layers.12.mlp.up_proj`` (-1 when there is none)."""
    return next((int(part) for part in name.split(".") if part.isdigit()), -1)


def diagnose_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The diagnose stage's table: layer errors and weight norms, averaged over each third of the blocks."""
    if not rows:
        return []
    blocks = max(block_of(layer["name"]) for r in rows for layer in r["layers"]) + 1
    thirds = [(0, blocks // 3), (blocks // 3, 2 * blocks // 3), (2 * blocks // 3, blocks)]
    lines = ["## Diagnose: relative layer output error ‖WX − W'X̂‖² / ‖WX‖², on the calibration data and on new text",
             "", f"Base model, ratio 0.2, calibration draw 0; new text: the first {rows[0]['held_out_windows']} test "
             "windows of each corpus. Mean over the layers of each third of the blocks; norm: ‖W'‖_F / ‖W‖_F "
             "(mean, max).", "",
             "| method | calibration tokens | blocks | calibration data | WikiText-2 test | PTB test | norm mean | "
             "norm max | perplexity WikiText-2 / PTB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["calibration_tokens"])):
        for first, stop in thirds:
            part = [layer for layer in r["layers"] if first <= block_of(layer["name"]) < stop]
            if not part:
                continue
            mean = {k: statistics.fmean(layer[k] for layer in part) for k in ("calibration", "wikitext2", "ptb",
                                                                                 "norm_ratio")}
            lines.append(
                f"| {r['method']} | {r['calibration_tokens']} | {first}-{stop - 1} | {mean['calibration']:.4f} | "
                f"{mean['wikitext2']:.4f} | {mean['ptb']:.4f} | {mean['norm_ratio']:.3f} | "
                f"{max(layer['norm_ratio'] for layer in part):.3f} | {r['wikitext2']:.2f} / {r['ptb']:.2f} |"
            )
    return lines + [""]


def plot_layer_errors(rows: list[dict[str, Any]], path: Path) -> None:
    """Per-layer relative output error on WikiText-2 test and PTB test against depth, one line per row."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for axis, corpus in zip(axes, ("wikitext2", "ptb"), strict=True):
        for r in sorted(rows, key=lambda r: (r["method"], r["calibration_tokens"])):
            axis.plot([layer[corpus] for layer in r["layers"]], linewidth=0.9,
                      label=f"{r['method']}, {r['calibration_tokens']} tokens")
        axis.set_yscale("log")
        axis.set_xlabel("compressed layer (model order)")
        axis.set_title(f"relative output error on {'WikiText-2' if corpus == 'wikitext2' else 'PTB'} test")
        axis.legend(fontsize=8)
    axes[0].set_ylabel("‖WX − W'X̂‖² / ‖WX‖²")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def finetune_seeds(rows: list[dict[str, Any]], prehab: str | None) -> list[int]:
    """The ``--finetune-seed`` values s > 0 with rows for both ``control-seed{s}`` and ``{prehab}-seed{s}``."""
    models = {r["model"] for r in rows}
    seeds = {int(m.removeprefix("control-seed")) for m in models if m.startswith("control-seed")}
    return sorted(s for s in seeds if f"{prehab}-seed{s}" in models)


def seed_pairs(rows: list[dict[str, Any]], prehab: str | None) -> list[tuple[int, str | None, str]]:
    """(fine-tune seed, prehab model, control model) for seed 0 and every later seed with rows of both models."""
    return [(0, prehab, "control")] + [
        (seed, f"{prehab}-seed{seed}", f"control-seed{seed}") for seed in finetune_seeds(rows, prehab)]


def paired_lines(rows: list[dict[str, Any]], prehab: str | None) -> list[str]:
    """Prehab's perplexity divided by the control's (and by surgery alone's) on the same calibration draw:
    the draws move every model alike, so the per-draw ratio is what tells the penalty's effect apart. One line
    per fine-tune seed (prehab and control fine-tuned with the same seed), and with several seeds a line ``all``
    pooling every (seed, draw) pair."""
    tokens = {r["calibration_tokens"] for r in rows if r["stage"] == "table"}  # ridge rows of the table's size
    table = [dict(r, method=r["method"] + ("+rehab" if r["stage"] == "rehab" else ""))
             for r in rows if r["stage"] in ("table", "rehab")
             or (r["stage"] == "ridge" and r["calibration_tokens"] in tokens)]
    by_key = {(r["model"], r["method"], r["ratio"], r["draw"]): r for r in table}
    header = ["## Paired: prehab / control and prehab / surgery alone, same calibration draw", "",
              "Below 1: prehab is better. mean [min, max] over the draws both rows have (`all`: over every fine-tune "
              "seed and draw).", "",
              "| method | ratio | fine-tune seed | draws | WikiText-2 vs control | PTB vs control | "
              "WikiText-2 vs surgery alone | PTB vs surgery alone |", "|---|---|---|---|---|---|---|---|"]
    lines = list(header)
    seeds = seed_pairs(rows, prehab)
    columns = [(other, metric) for other in ("control", "base") for metric in ("wikitext2", "ptb")]

    def quotients(model: str, other: str, method: str, ratio: float, metric: str) -> list[float]:
        return [by_key[(model, method, ratio, d)][metric] / by_key[(other, method, ratio, d)][metric]
                for (m, me, ra, d) in by_key if (m, me, ra) == (model, method, ratio)
                and (other, method, ratio, d) in by_key]

    def line(method: str, ratio: float, seed: Any, cells: list[list[float]]) -> str:
        text = [f"{statistics.fmean(q):.3f} [{min(q):.3f}, {max(q):.3f}]" if q else "-" for q in cells]
        return f"| {method} | {ratio:g} | {seed} | {max(len(q) for q in cells)} | " + " | ".join(text) + " |"

    prehab_models = {model for _, model, _ in seeds}  # an OUT may hold only a later seed's models
    for method, ratio in sorted({(r["method"], r["ratio"]) for r in table if r["model"] in prehab_models}):
        pooled: list[list[float]] = [[] for _ in columns]
        seeds_seen = 0
        for seed, model, control in seeds:
            cells = [quotients(model, control if other == "control" else "base", method, ratio, metric)
                     for other, metric in columns]
            if not any(cells):
                continue
            seeds_seen += 1
            lines.append(line(method, ratio, seed, cells))
            for column, values in zip(pooled, cells, strict=True):
                column += values
        if seeds_seen > 1:
            lines.append(line(method, ratio, "all", pooled))
    return lines + [""] if len(lines) > len(header) else []


def plot(rows: list[dict[str, Any]], prehab: str | None, path: Path) -> None:
    table = [r for r in rows if r["stage"] == "table"]
    if not table:
        return
    plt = pyplot()
    methods = [m for m in ("svd_llm", "saes_svd") if any(r["method"] == m for r in table)]
    # the first fine-tune seed with table rows (an OUT may hold only a later seed's models)
    present = {r["model"] for r in table}
    pairs = seed_pairs(rows, prehab)
    _, prehab, control = next((pair for pair in pairs if set(pair[1:]) & present), pairs[0])
    figure, axes = plt.subplots(len(methods), 2, figsize=(10, 3.6 * len(methods)), squeeze=False)
    for row_index, method in enumerate(methods):
        for col, (metric, title) in enumerate((("wikitext2", "WikiText-2 test"), ("ptb", "PTB test"))):
            axis = axes[row_index][col]
            for model, style in (("base", "o-"), (control, "s--"), (prehab, "^-")):
                picked = [r for r in table if r["model"] == model and r["method"] == method]
                ratios = sorted({r["ratio"] for r in picked})
                if not ratios:
                    continue
                means, errors = [], []
                for ratio in ratios:
                    values = [r[metric] for r in picked if r["ratio"] == ratio]
                    means.append(statistics.fmean(values))
                    errors.append((max(values) - min(values)) / 2)
                axis.errorbar(ratios, means, yerr=errors, fmt=style, capsize=3,
                              label={"base": "surgery alone", control: f"λ = 0 fine-tune ({control}) + surgery"}.get(
                                  model, f"prehab ({model}) + surgery"))
            axis.set_yscale("log")
            axis.set_xlabel("fraction of block parameters removed")
            axis.set_ylabel("perplexity")
            axis.set_title(f"{method}: {title}")
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- smoke
def smoke_setup(args: argparse.Namespace) -> dict[str, Any]:
    """A tiny random Llama with a word-level tokenizer trained on WikiText-2 valid, saved as an HF folder."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_text_assets import tiny_llama, wikitext_tokenizer

    folder = Path(args.out) / "tiny-llama"
    if not (folder / "config.json").is_file():
        tokenizer = wikitext_tokenizer(vocab_size=500)
        model = tiny_llama(len(tokenizer))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    settings = read_config(Path(args.config))
    settings["model"].update(model=str(folder), calibration_batches=2, penalty_fraction=1.0)
    settings["data"].update(seq_len=32, batch_size=2)
    settings["rehab"].update(steps_per_factor=2)
    settings["rehab"]["datamodule"]["init_args"].update(cutoff_len=32, batch_size=2)
    args.steps, args.draws, args.eval_windows, args.calibration_windows = 3, 2, 4, 4
    args.heldout_windows, args.rehab_steps = 4, 2
    args.candidates = args.candidates[:1]
    args.ratios, args.two_stream_ratios, args.sweep_ratios, args.rehab_ratios = [0.2, 0.4], [0.4], [0.4], [0.4]
    args.calibration_sizes = args.diagnose_sizes = [2, 4]
    args.ridge_sizes = [2]  # not the 4 windows of the other rows: their own keys
    args.diagnose_windows = 2
    args.zeroshot_limit = 4
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "smollm2_prehab.yaml"))
    parser.add_argument("--model", help="SmolLM2-135M folder (default: the config's model)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"),
                        help="folder with wikitext-2-raw, ptb, alpaca (default ../shared/data)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "prehab_llm"))
    parser.add_argument("--stages", nargs="+", default=["sweep", "table", "rehab"],
                        choices=["sweep", "table", "rehab", "calibration", "zeroshot", "diagnose", "tails", "ridge"])
    parser.add_argument("--report", action="store_true", help="only write the tables/plots from OUT/rows.jsonl")
    parser.add_argument("--candidates", nargs="+",
                        default=["stable_rank:0.01", "tail:0.1:0.4", "tail:1:0.4", "tail:10:0.4"],
                        help="penalties tried in the sweep: regularizer:lam[:tail_ratio]")
    parser.add_argument("--steps", type=int, help="fine-tune steps (default: the config's trainer.max_steps)")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--first-draw", type=int, default=0,
                        help="run draws FIRST_DRAW..DRAWS-1 (when draw 0's rows live in another OUT; the rehab "
                             "stage: FIRST_DRAW..REHAB_DRAWS-1)")
    parser.add_argument("--finetune-seed", type=int, default=0,
                        help="s > 0: fine-tune the control and the chosen penalty again with seed s (stages table, "
                             "rehab, zeroshot), as models control-seed{s} and {chosen}-seed{s}")
    parser.add_argument("--prehab", metavar="CANDIDATE",
                        help="the penalty of the prehab model (regularizer:lam[:tail_ratio]) for an OUT without a "
                             "sweep, e.g. a new fine-tune seed: tail:1:0.4 (default: OUT/chosen.json's)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--table-methods", nargs="+", default=["svd_llm", "saes_svd", "aa_svd"], choices=METHODS)
    parser.add_argument("--table-models", nargs="+", default=list(MODEL_ORDER), choices=MODEL_ORDER,
                        help="models of the table stage (e.g. control prehab: the paired rows only, when surgery "
                             "alone's rows exist elsewhere)")
    parser.add_argument("--rehab-methods", nargs="+", default=["svd_llm", "saes_svd"], choices=METHODS)
    parser.add_argument("--two-stream-ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--sweep-ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--rehab-ratios", type=float, nargs="+", default=[0.4])
    parser.add_argument("--rehab-ridges", nargs="*", default=[], metavar="METHOD:RIDGE",
                        help="the surgery before rehab with the callback's ridge for METHOD, e.g. aa_svd:0.1 (rows "
                             "named aa_svd+ridge); other methods: the exact form (ridge 0)")
    parser.add_argument("--rehab-steps", type=int, help="LoRA steps per factor (default: the config's)")
    parser.add_argument("--rehab-draws", type=int, default=1, help="calibration draws 0..N-1 of the rehab stage")
    parser.add_argument("--rehab-models", nargs="+", default=list(MODEL_ORDER), choices=MODEL_ORDER,
                        help="models of the rehab stage (e.g. control prehab: the paired rows only)")
    parser.add_argument("--calibration-windows", type=int, help="default: the config's calibration_samples")
    parser.add_argument("--calibration-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--calibration-methods", nargs="+", default=["svd_llm", "aa_svd", "saes_svd"],
                        choices=METHODS)
    parser.add_argument("--ridges", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 1e-1],
                        help="ridge values of the ridge stage's sweep (0: the exact closed form)")
    parser.add_argument("--ridge-methods", nargs="+", default=["aa_svd", "saes_svd"], choices=METHODS)
    parser.add_argument("--ridge-models", nargs="+", default=["base"], choices=MODEL_ORDER,
                        help="models of the ridge stage's test rows (the ridge is chosen on base at 0.2)")
    parser.add_argument("--ridge-ratios", type=float, nargs="+", default=[0.2],
                        help="ratios of the ridge stage's test rows")
    parser.add_argument("--ridge-sizes", type=int, nargs="*", default=[128],
                        help="calibration windows of the ridge stage's extra test rows")
    parser.add_argument("--ridge-size-draws", type=int, default=1,
                        help="the --ridge-sizes rows run on draws --first-draw .. this - 1 (default: draw 0)")
    parser.add_argument("--diagnose-sizes", type=int, nargs="+", default=[32, 128],
                        help="calibration windows of the diagnose stage")
    parser.add_argument("--diagnose-methods", nargs="+", default=["aa_svd", "svd_llm"], choices=METHODS)
    parser.add_argument("--diagnose-windows", type=int, default=8, help="test windows per corpus for layer errors")
    parser.add_argument("--eval-windows", type=int, help="test windows per corpus (default: max_eval_windows)")
    parser.add_argument("--heldout-windows", type=int, default=16, help="last valid windows kept for the sweep")
    parser.add_argument("--aa-all", action="store_true", help="AA-SVD on every model, not only base")
    parser.add_argument("--save", choices=["draw0", "none"], default="draw0")
    parser.add_argument("--zeroshot-tasks", nargs="+", default=["prehab_mrpc_completion", "prehab_rte", "prehab_sst2"])
    parser.add_argument("--zeroshot-compress", action="store_true",
                        help="compress (and rehab) the draw-0 models that were not saved again, instead of skipping "
                             "them (the same calibration windows and rehab data as their rows)")
    parser.add_argument("--zeroshot-models", nargs="+", choices=MODEL_ORDER, default=list(MODEL_ORDER),
                        help="score these models' rows (default: all)")
    parser.add_argument("--zeroshot-ratios", nargs="+", type=float, help="only the compressed rows at these ratios")
    parser.add_argument("--zeroshot-methods", nargs="+",
                        choices=["dense", *METHODS, *(f"{m}{r}+rehab" for m in METHODS for r in ("", "+ridge"))],
                        help="only these rows, e.g. dense svd_llm+rehab saes_svd+rehab (default: every saved model)")
    parser.add_argument("--zeroshot-limit", type=int, default=200, help="examples per zero-shot task")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, a few windows (for tests)")
    args = parser.parse_args(argv)
    args.rehab_ridges = dict(parse_ridge(parser, "--rehab-ridges", text, METHODS) for text in args.rehab_ridges)
    if args.prehab and parse_candidate(args.prehab)["lam"] <= 0:
        parser.error(f"--prehab {args.prehab} is invalid: the prehab model needs a penalty λ > 0 (λ = 0 is the "
                     "control, always fine-tuned beside it).")
    if args.finetune_seed < 0:
        parser.error(f"--finetune-seed {args.finetune_seed} is invalid: use 0 (the sweep's models) or a seed > 0.")
    if not all(math.isfinite(r) and r >= 0 for r in args.ridges):
        parser.error(f"--ridges {' '.join(map(str, args.ridges))} is invalid: use numbers >= 0 (0: the exact solve).")
    for flag in ("diagnose_sizes", "ridge_sizes", "calibration_sizes"):
        if any(n < 1 for n in getattr(args, flag)):
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} is invalid: use window counts >= 1.")
    for flag in ("ratios", "two_stream_ratios", "sweep_ratios", "rehab_ratios", "ridge_ratios", "zeroshot_ratios"):
        if not all(0 < r < 1 for r in getattr(args, flag) or ()):
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} is invalid: use fractions of the "
                         "parameters removed in (0, 1), e.g. 0.2 0.4.")
    if args.rehab_draws < 1:
        parser.error(f"--rehab-draws {args.rehab_draws} is invalid: use a number of calibration draws >= 1.")
    if args.ridge_size_draws < 1:
        parser.error(f"--ridge-size-draws {args.ridge_size_draws} is invalid: use a number of calibration draws >= 1.")
    if args.diagnose_windows < 1:
        parser.error(f"--diagnose-windows {args.diagnose_windows} is invalid: use a window count >= 1.")
    out = Path(args.out)
    if args.report:
        write_report(out)
        return
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        settings = smoke_setup(args)
    else:
        settings = read_config(Path(args.config))
        if args.model:
            settings["model"]["model"] = args.model
    args.steps = args.steps or settings["max_steps"]
    args.calibration_windows = args.calibration_windows or settings["data"]["calibration_samples"]
    args.eval_windows = args.eval_windows or settings["data"].get("max_eval_windows") or 24
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "settings.json", json.dumps({"args": vars(args), "settings": settings}, indent=2, default=str))
    bench = Benchmark(args, settings)
    for stage in ("sweep", "table", "rehab", "calibration", "zeroshot", "diagnose", "tails", "ridge"):
        if stage in args.stages:
            run = {"sweep": bench.sweep, "table": bench.table, "rehab": bench.rehab,
                   "calibration": bench.calibration_sizes, "zeroshot": bench.zeroshot, "diagnose": bench.diagnose,
                   "tails": bench.tails, "ridge": bench.ridge}
            run[stage]()
            write_report(out)


if __name__ == "__main__":
    main()
