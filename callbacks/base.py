"""``LowRankCompression``: the shared plumbing of every surgery method, run at the end of ``fit``.

A method is a small subclass that says which statistics it needs and how to turn them into factors
(``solve_layer``); resolving targets, calibration, validation, swapping, the report, logging and
saving live here once.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import CombinedLoader, rank_zero_only
from torch import Tensor, nn
from tqdm.auto import tqdm

from prehab.calibration import collect_input_covariances, take_batches
from prehab.linalg import LowRankFactors, factor_params, output_error, rank_from_ratio
from prehab.lowrank import (
    CHECKPOINT_KEY,
    LowRankLinear,
    dense_weight,
    lowrank_structure,
    replace_module,
    save_compressed,
)
from prehab.pipeline import GroupStatistics, sequential_compress
from prehab.report import CompressionReport, LayerReport
from prehab.targets import resolve_targets

__all__ = ["LowRankCompression", "METHOD_NAMES"]

METHOD_NAMES = ("svd", "svd_llm", "aa_svd", "saes_svd")

log = logging.getLogger("prehab")


class LowRankCompression(Callback):
    """Base class: replace targeted Linear layers by low-rank factors when ``fit`` ends.

    Subclasses set ``method`` and implement :meth:`solve_layer`. Outside a Trainer, call
    :meth:`compress` on any ``nn.Module`` with a calibration dataloader.

    Args:
        ratio: fraction of the targeted layers' weight parameters removed, in (0, 1). Each layer gets
            rank ``floor((1 - ratio) * m * n / (m + n))``.
        targets: regex or list of regexes searched in module names. Default: every Linear inside the
            model's repeated transformer blocks (never embeddings or the LM head).
        calibration_batches: number of calibration batches (split across ranks under DDP).
        calibration_dataloader: explicit calibration data; otherwise the datamodule's
            ``calibration_dataloader()``, else the first ``calibration_batches`` training batches.
        save_dir: if set, the compressed model (``save_compressed`` folder) and ``report.json`` go here.
        blocks: name of the model's repeated block list (e.g. ``"model.layers"``) when the automatic
            search does not find it.
        damping: first relative damping (x trace/n) tried when a covariance is not positive definite.
        verbose: one log line per layer.
        compare: other methods (by name: ``"svd"``, ``"svd_llm"``, ``"aa_svd"``, ``"saes_svd"``) to run on
            copies of the model at the same ratio, for the report only; the model ends compressed by this one.
        evaluate: when the module has an ``evaluate(dataloader)`` method (``PrehabModule`` does) and the
            datamodule a validation set, report the metrics before and after compression.
    """

    method: ClassVar[str] = "lowrank"
    requires_calibration: ClassVar[bool] = True
    two_stream: bool = False  # True: block-sequential original + shifted streams (prehab.pipeline)

    def __init__(
        self,
        ratio: float = 0.4,
        targets: str | list[str] | None = None,
        calibration_batches: int = 32,
        calibration_dataloader: Iterable | None = None,
        save_dir: str | None = None,
        blocks: str | None = None,
        damping: float = 1e-6,
        verbose: bool = False,
        compare: list[str] | None = None,
        evaluate: bool = True,
    ) -> None:
        if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not 0.0 < ratio < 1.0:
            raise ValueError(
                f"ratio={ratio!r} is invalid: it is the fraction of parameters removed and must lie strictly "
                "between 0 and 1 (e.g. ratio=0.4 removes 40%)."
            )
        if not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches!r} is invalid: use an integer >= 1.")
        if targets is not None and not (
            isinstance(targets, str) or (isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets))
        ):
            raise ValueError(f"targets={targets!r} is invalid: use a regex string, a list of them, or None.")
        if not damping > 0:
            raise ValueError(f"damping={damping!r} is invalid: use a small positive number such as 1e-6.")
        unknown = [m for m in compare or [] if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(
                f"compare={compare!r} names unknown methods {unknown}; valid values: {list(METHOD_NAMES)}."
            )
        self.compare = list(compare or [])
        self.evaluate = evaluate
        self.ratio = float(ratio)
        self.targets = targets
        self.calibration_batches = calibration_batches
        self.calibration_dataloader = calibration_dataloader
        self.save_dir = save_dir
        self.blocks = blocks
        self.damping = damping
        self.verbose = verbose
        self.report: CompressionReport | None = None

    # ------------------------------------------------------------------ method-specific part
    def solve_layer(self, name: str, weight: Tensor, rank: int, stats: dict[str, Tensor]) -> LowRankFactors:
        """Factors for one layer (``weight``: out x in).

        ``stats`` holds mean covariances: ``"G"`` (``XXᵀ``, original inputs) when calibration ran, plus
        ``"H"`` (``X̂X̂ᵀ``, shifted inputs) and ``"C"`` (``XX̂ᵀ``) for two-stream methods; empty without data.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader, sharded = self._calibration_source(trainer)
        where = {
            "rank": 0 if sharded else trainer.global_rank,
            "world_size": 1 if sharded else trainer.world_size,
            "progress": trainer.is_global_zero,
        }
        evaluation = self._evaluation_loader(trainer, pl_module)
        metrics = dict(getattr(pl_module, "stage_metrics", {}))  # e.g. "before_prehab" from PrehabModule
        if evaluation is not None:
            metrics["dense"] = pl_module.evaluate(evaluation)
        comparison = []
        for name in self.compare:
            from prehab.callbacks import METHODS  # the subclasses live in the package that imports this file

            other = METHODS[name](
                ratio=self.ratio,
                targets=self.targets,
                calibration_batches=self.calibration_batches,
                blocks=self.blocks,
                damping=self.damping,
            )
            trial = copy.deepcopy(pl_module, memo={id(trainer): trainer})  # share, don't copy, the Trainer
            totals = other.compress(trial, loader, **where).totals()
            comparison.append(
                {
                    "method": name,
                    "model_params_after": totals["model_params_after"],
                    "mean_relative_error": totals["mean_relative_error"],
                    "metrics": trial.evaluate(evaluation) if evaluation is not None else {},
                }
            )
            del trial
        report = self.compress(pl_module, loader, **where)
        if evaluation is not None:
            metrics[self.method] = pl_module.evaluate(evaluation)
        report.metrics, report.comparison = metrics, comparison
        self._publish(trainer, pl_module, report)

    def _evaluation_loader(self, trainer: Trainer, pl_module: LightningModule) -> Iterable | None:
        if not self.evaluate or not callable(getattr(pl_module, "evaluate", None)):
            return None
        datamodule = trainer.datamodule
        if datamodule is not None and type(datamodule).val_dataloader is not LightningDataModule.val_dataloader:
            return datamodule.val_dataloader()
        loaders = trainer.val_dataloaders
        return loaders if loaders else None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        structure = lowrank_structure(pl_module)
        if structure:  # lets prehab.load_from_checkpoint rebuild the low-rank shapes
            checkpoint[CHECKPOINT_KEY] = structure

    def _calibration_source(self, trainer: Trainer) -> tuple[Iterable | None, bool]:
        """(loader, already sharded per rank)."""
        if self.calibration_dataloader is not None:
            return self.calibration_dataloader, False
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "calibration_dataloader"):
            return datamodule.calibration_dataloader(), False
        if datamodule is not None:
            return datamodule.train_dataloader(), False
        loader = trainer.train_dataloader  # dataloaders passed to fit(): Lightning already sharded them
        if isinstance(loader, CombinedLoader):
            loader = loader.iterables
        return loader, trainer.world_size > 1

    # ------------------------------------------------------------------ the work
    def compress(
        self,
        model: nn.Module,
        dataloader: Iterable | None = None,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
    ) -> CompressionReport:
        """Compress ``model`` in place and return the report.

        Nothing is modified until every layer's factors are computed and checked, so a failure leaves
        the model exactly as it was.
        """
        started = time.perf_counter()
        targets = resolve_targets(model, self.targets, self.blocks)
        plan = {name: self._plan_layer(module) for name, module in targets.items()}
        if dataloader is None and self.requires_calibration:
            raise ValueError(
                f"{type(self).__name__} needs calibration data and found none: pass calibration_dataloader=, "
                "give your LightningDataModule a calibration_dataloader() method, or provide a train dataloader."
            )
        params_before = sum(p.numel() for p in model.parameters())
        reports: dict[str, LayerReport] = {}
        timer = {"solve": 0.0}

        def solve_group(names: list[str], stats: dict[str, Tensor] | None, samples: int) -> dict[str, nn.Module]:
            """Factor the named layers from their (shared) statistics; returns replacements, swaps nothing."""
            tick = time.perf_counter()
            if stats is not None:
                self._check_statistics(names, stats)
            replacements = {}
            for name in names:
                layer_report, replacement = self._solve_one(name, targets[name], plan[name], stats, samples)
                reports[name] = layer_report
                if replacement is not None:
                    replacements[name] = replacement
            timer["solve"] += time.perf_counter() - tick
            return replacements

        samples = 0
        if self.two_stream:
            batches = list(take_batches(dataloader, self.calibration_batches, rank, world_size))

            def solve_shared(group: GroupStatistics) -> dict[str, nn.Module]:
                nonlocal samples
                samples = max(samples, group.count)
                return solve_group(group.names, group.as_dict(), group.count)

            unused = sequential_compress(model, targets, batches, solve_shared, self.blocks, progress, self.method)
            for name in unused:
                solve_group([name], None, 0)
        else:
            stats: dict[str, dict[str, Tensor]] = {}
            if dataloader is not None:
                stats, samples = self.collect_statistics(model, targets, dataloader, rank, world_size, progress)
                for name, layer_stats in stats.items():  # all checked before any factorization
                    self._check_statistics([name], layer_stats)
            solutions: dict[str, nn.Module] = {}
            bar = tqdm(targets, desc=f"{self.method}: factorizing", disable=not progress, unit="layer")
            for name in bar:  # everything is solved before anything is swapped
                layer_stats = stats.get(name) if dataloader is not None else {}
                solutions.update(solve_group([name], layer_stats, samples))
            for name, replacement in solutions.items():
                replace_module(model, name, replacement)

        layers = [reports[name] for name in targets]
        total = time.perf_counter() - started
        report = CompressionReport(
            method=self.method,
            ratio=self.ratio,
            layers=layers,
            model_params_before=params_before,
            model_params_after=sum(p.numel() for p in model.parameters()),
            calibration_samples=samples,
            seconds={"calibration": total - timer["solve"], "factorization": timer["solve"], "total": total},
        )
        self.report = report
        return report

    def _solve_one(
        self,
        name: str,
        module: nn.Module,
        planned: tuple[int | None, str],
        stats: dict[str, Tensor] | None,
        samples: int,
    ) -> tuple[LayerReport, nn.Module | None]:
        """One layer's report line and replacement (None: stays dense). ``stats`` None: it saw no input."""
        weight = dense_weight(module).detach()
        out_features, in_features = weight.shape
        layer_rank, note = planned
        if not torch.isfinite(weight).all():
            raise ValueError(
                f"the weight of layer {name!r} contains NaN/Inf; nothing was modified. Fix the model first."
            )
        dense_params = out_features * in_features
        if layer_rank is None or (stats is None and self.requires_calibration):
            if layer_rank is not None:
                note = (
                    "kept dense: received no input during calibration (its parent reads .weight directly, "
                    "e.g. nn.MultiheadAttention.out_proj, or it is unused)"
                )
            return LayerReport(name, out_features, in_features, None, dense_params, dense_params, None, note=note), None
        stats = stats or {}
        factors = self.solve_layer(name, weight, layer_rank, stats)
        if not (torch.isfinite(factors.up).all() and torch.isfinite(factors.down).all()):
            raise FloatingPointError(f"{self.method} produced non-finite factors for layer {name!r}.")
        error = self._relative_error(weight, factors.up @ factors.down, stats)
        note = "damped: covariance singular" if factors.singular else ""
        if factors.singular and samples and samples < in_features:
            note += f" ({samples} samples < {in_features} features)"
        if self.verbose:
            log.info(
                "%s: %s %dx%d -> rank %d, rel. error %s%s",
                self.method,
                name,
                out_features,
                in_features,
                layer_rank,
                "n/a" if error is None else f"{error:.4g}",
                f" [{note}]" if note else "",
            )
        bias = module.bias if isinstance(getattr(module, "bias", None), Tensor) else None
        layer_report = LayerReport(
            name,
            out_features,
            in_features,
            layer_rank,
            dense_params,
            factor_params(out_features, in_features, layer_rank),
            error,
            factors.relative_damping,
            factors.beta,
            note,
        )
        return layer_report, LowRankLinear.from_factors(factors.up, factors.down, bias, like=weight)

    def _plan_layer(self, module: nn.Module) -> tuple[int | None, str]:
        out_features, in_features = dense_weight(module).shape
        rank = rank_from_ratio(out_features, in_features, self.ratio)
        if factor_params(out_features, in_features, rank) >= out_features * in_features:
            return None, (
                f"kept dense: rank {rank} needs {factor_params(out_features, in_features, rank)} "
                f">= {out_features * in_features} params"
            )
        return rank, ""

    def collect_statistics(
        self,
        model: nn.Module,
        targets: dict[str, nn.Module],
        dataloader: Iterable,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
    ) -> tuple[dict[str, dict[str, Tensor]], int]:
        """One stream: ``G = mean XXᵀ`` of every target's input over the calibration batches, all-reduced."""
        covariances, samples = collect_input_covariances(
            model, targets, dataloader, self.calibration_batches, rank, world_size, progress, desc=self.method
        )
        return {name: {"G": covariance} for name, covariance in covariances.items()}, samples

    @staticmethod
    def _check_statistics(names: list[str], stats: dict[str, Tensor]) -> None:
        for key, value in stats.items():
            if not torch.isfinite(value).all():
                raise ValueError(
                    f"calibration statistics {key} of layer {names[0]!r} contain NaN/Inf: the model produces "
                    "non-finite activations on the calibration data. Nothing was modified; check the model "
                    "(e.g. fp16 overflow) or the data."
                )

    @staticmethod
    def _relative_error(weight: Tensor, approx: Tensor, stats: dict[str, Tensor]) -> float | None:
        if "G" not in stats:
            return None
        g = stats["G"]
        dense = float((weight.double() @ g * weight.double()).sum())
        error = output_error(weight, approx, g, stats.get("C"), stats.get("H"))
        return error / dense if dense > 0 else 0.0

    # ------------------------------------------------------------------ report, logs, files
    def _publish(self, trainer: Trainer, pl_module: LightningModule, report: CompressionReport) -> None:
        totals = report.totals()
        if trainer.logger is not None:
            metrics = {f"compression/{k}": float(v) for k, v in totals.items() if v is not None}
            for stage, values in report.metrics.items():
                metrics.update({f"compression/{stage}/{k}": v for k, v in values.items()})
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        self._print_report(report)
        if self.save_dir is not None:
            self._save(pl_module, report)
            trainer.strategy.barrier("prehab_compression_saved")

    @rank_zero_only
    def _print_report(self, report: CompressionReport) -> None:
        report.print()

    @rank_zero_only
    def _save(self, model: nn.Module, report: CompressionReport) -> None:
        folder = Path(self.save_dir)
        save_compressed(model, folder, metadata=report.to_dict())
        report.save_json(folder / "report.json")
        log.info("saved the compressed model and report to %s", folder)
