"""``LowRankCompression``: the shared plumbing of every surgery method, run at the end of ``fit``.

A method is a small subclass that says which statistics it needs and how to turn them into factors
(``solve_layer``); resolving targets, calibration, validation, swapping, ratio sweeps, the report,
logging and saving live here once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import CombinedLoader, rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from tqdm.auto import tqdm

from prehab.allocation import allocate_equal_error, allocate_ranks
from prehab.calibration import collect_input_covariances, take_batches
from prehab.checks import is_count, is_real
from prehab.linalg import (
    LowRankFactors,
    all_finite,
    damped_cholesky,
    factor_params,
    output_error_and_energy,
    rank_from_ratio,
    reused_cholesky,
    ridge_shift,
    ridge_statistics,
    solver_output_error,
)
from prehab.lowrank import (
    CHECKPOINT_KEY,
    LowRankLinear,
    dense_weight,
    lowrank_structure,
    replace_module,
    save_compressed,
)
from prehab.pipeline import (
    DENSE_CACHE_GB,
    GroupStatistics,
    covered_by_blocks,
    one_stream_blocks,
    sequential_compress,
)
from prehab.refine import DEFAULT_REFINE_LR, refine_block
from prehab.report import CompressionReport, LayerReport, StageReport, SweepRow, model_size
from prehab.rollback import RollbackStore
from prehab.targets import find_blocks, resolve_targets

from .steps import validation_metrics

__all__ = ["Evaluator", "LowRankCompression", "METHOD_NAMES", "make_evaluator"]

METHOD_NAMES = ("svd", "svd_llm", "aa_svd", "saes_svd")
RANK_ALLOCATIONS = ("uniform", "global")
ALLOCATION_WEIGHTINGS = ("equal", "relative", "raw")
DEFAULT_RATIO = 0.4
SPECTRUM_LAYERS = 4  # layers whose whitened spectra the report plots

# () -> validation metrics of the module as it is now
Evaluator = Callable[[], dict[str, float]]

log = logging.getLogger("prehab")


def _check_ratio(name: str, value: Any) -> float:
    if not (is_real(value) and 0.0 < value < 1.0):
        raise ValueError(
            f"{name}={value!r} is invalid: it is the fraction of parameters removed and must lie strictly "
            "between 0 and 1 (e.g. 0.4 removes 40%)."
        )
    return float(value)


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: use true or false.")
    return value


def _check_positive_int(name: str, value: Any) -> int:
    if not is_count(value, 1):
        raise ValueError(f"{name}={value!r} is invalid: use an integer >= 1.")
    return value


def _check_damping(value: Any) -> float:
    if not (is_real(value) and value > 0):
        raise ValueError(f"damping={value!r} is invalid: use a small positive number such as 1e-6.")
    return float(value)


def _spectrum_layers(names: list[str], count: int = SPECTRUM_LAYERS) -> list[str]:
    """``count`` evenly spaced names, the first and the last included."""
    if len(names) <= count:
        return list(names)
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


def _whitened_spectrum(weight: Tensor, covariance: Tensor) -> list[float]:
    lower = damped_cholesky(covariance).factor.to(weight.device)
    return torch.linalg.svdvals(weight.double() @ lower).tolist()


def make_evaluator(trainer: Trainer, pl_module: LightningModule) -> Evaluator | None:
    """How the report measures the module, or None when there is no validation data or no way to evaluate.

    A ``PrehabModule`` is evaluated with its own torchmetrics (``PrehabModule.evaluate``); any other
    LightningModule with what its ``validation_step`` logs, averaged over the validation data. A module's own
    unrelated ``evaluate`` method is never called.
    """
    loader = _validation_loader(trainer)
    if loader is None:
        return None
    from prehab.module import PrehabModule

    if isinstance(pl_module, PrehabModule):
        return lambda: pl_module.evaluate(loader)
    if is_overridden("validation_step", pl_module, LightningModule):
        return lambda: validation_metrics(pl_module, loader, trainer)
    return None


def _validation_loader(trainer: Trainer) -> Iterable | None:
    datamodule = trainer.datamodule
    if datamodule is not None and is_overridden("val_dataloader", datamodule, LightningDataModule):
        return datamodule.val_dataloader()
    loaders = trainer.val_dataloaders
    if isinstance(loaders, list | tuple):  # several validation loaders: the first one
        loaders = loaders[0] if loaders else None
    return loaders or None


class LowRankCompression(Callback):
    """Base class: replace targeted Linear layers by low-rank factors when ``fit`` ends.

    Subclasses set ``method`` and implement :meth:`solve_layer`. Outside a Trainer, call
    :meth:`compress` on any ``nn.Module`` with a calibration dataloader.

    At the end of ``fit`` the callback evaluates the model (see ``evaluate``), saves the dense model when
    ``save_dir`` is set, compresses (at every ratio of ``ratios`` and with every ``compare`` method, on the
    model itself, putting the dense layers back between runs), leaves the model compressed by this method at
    the last ratio, prints the report and writes it.

    Args:
        ratio: fraction of the targeted layers' weight parameters removed, in (0, 1). Each layer gets
            rank ``floor((1 - ratio) * m * n / (m + n))``. Default 0.4 (when ``ratios`` is not given either).
        ratios: several ratios to run in one fit, instead of ``ratio``: each is compressed and evaluated (one-stream
            methods share one statistics pass) and reported in one table and one plot; the model ends
            compressed at the **last** ratio of the list.
        targets: regex or list of regexes searched in module names. Default: every Linear inside the
            model's repeated transformer blocks (never embeddings or the LM head).
        calibration_batches: number of calibration batches (split across ranks under DDP).
        calibration_dataloader: explicit calibration data; otherwise the datamodule's
            ``calibration_dataloader()``, else the first ``calibration_batches`` training batches. A one-shot
            iterator (e.g. a generator) is read once and reused by every method and ratio.
        save_dir: output folder. ``dense/`` (the model before surgery, when ``save_dense``), ``compressed/``
            (after surgery; ``load_compressed`` reloads both), ``report.json``, ``report.md`` and PNG plots.
            With a ``ModelCheckpoint`` in the Trainer, a ``compressed.ckpt`` of the compressed module is also written
            into its folder (Lightning's own checkpoints are taken before ``on_fit_end``, on the dense model).
        blocks: name of the model's repeated block list (e.g. ``"model.layers"``) when the automatic
            search does not find it.
        damping: first relative damping (x trace/n) tried when a covariance is not positive definite.
        ridge: ``ε`` of a Tikhonov term ``ε · trace/n · ‖W − W'‖²`` added to every layer's objective (see
            :func:`prehab.linalg.ridge_statistics`): keeps the original weights in input directions the calibration
            data barely reaches, where the exact closed form (``0``, the papers') may put huge coefficients.
            ``None`` (default): the method's own default (benchmarks/RESULTS.md §7, §10): ``0.1`` for AA-SVD,
            whose exact solution reaches 220x the original weight norm in some SmolLM2 layers (the ridge halves
            its PTB perplexity at 20% and 40% removed and stops its collapse on MiniLM with few calibration
            tokens; with ample calibration data it can cost ~1-2% at 60-90%), ``0`` (the papers' exact closed
            forms) for the others; SAES-SVD gains a little from ``0.01`` at 20%. The report's errors stay those
            on the real data. Not for plain ``SVD`` (no statistics). ``compare=`` methods get the same ``ridge``
            when it is set, else their own defaults.
        verbose: one log line per layer.
        compare: other methods (by name: ``"svd"``, ``"svd_llm"``, ``"aa_svd"``, ``"saes_svd"``) to run at the same
            ratios, for the report only; the model ends compressed by this one.
        evaluate: report validation metrics before the fit, after it (dense), after each compression (and after
            rehab). A ``PrehabModule`` is evaluated with its own metrics (``PrehabModule.evaluate``); any other
            LightningModule with what its ``validation_step`` logs, averaged over the validation data.
        save_dense: with ``save_dir``, also save the dense model before surgery (nothing of the training is lost
            if the surgery fails).
        plots: with ``save_dir``, write the PNG plots (matplotlib).
        rank_allocation: ``"uniform"``: every layer keeps the same fraction ``1 - ratio`` of its parameters.
            ``"global"``: per-layer ranks chosen from each layer's whitened spectrum ``σ_i(W L)`` (its predicted
            loss at rank r is the tail energy ``Σ_{i>r} σ_i²``; see ``allocation_weighting``) with at most the
            parameters that ``"uniform"`` keeps in the targeted layers; a layer may stay dense when that is cheaper
            than the rank it would get. Spectra come from the original model's input covariances (two-stream
            methods pay one extra one-stream calibration pass for them, reported as ``allocation`` seconds).
        min_kept_fraction: with ``"global"``, the least fraction of its parameters any factorized layer keeps,
            in (0, 1) and below ``1 - ratio``.
        allocation_weighting: the objective of ``"global"``: ``"equal"`` (the smallest largest relative error
            ``Σ_{i>r} σ_i² / Σ_i σ_i²``: every layer as good as the budget allows the worst), ``"relative"`` (the
            smallest sum of relative errors) or ``"raw"`` (the smallest sum of tail energies: layers with large
            activations weigh more). Chosen on WikiText-2 valid (SmolLM2-135M, SVD-LLM; perplexity at 20% / 40%
            removed): uniform 74.3 / 218.3, ``"equal"`` 66.4 / 205.9, ``"relative"`` 70.2 / 619, ``"raw"`` 711 at
            20% (sums of errors buy many layers' zero error by keeping them dense and cut a few to the floor).
        refine_steps: two-stream methods only: passes of Adam over the calibration batches after each block is
            factorized, adjusting that block's factors (nothing else) to reproduce the dense block's output
            (:mod:`prehab.refine`). 0: no refinement.
        refine_lr: Adam's learning rate for ``refine_steps``. Chosen on WikiText-2 valid (SmolLM2-135M, SAES-SVD +
            global ranks at 20%, 4 steps): no refinement 55.9, lr 1e-4 50.8, 3e-4 47.3, 1e-3 48.2.
        statistics_budget_gb: one-stream statistics (SVD, SVD-LLM; and the original-model spectra of
            ``rank_allocation="global"``) are float64 ``in x in`` covariances, one per targeted layer. When all of
            them take at most this many GiB they are collected in one pass over the whole model (a ``ratios`` sweep
            then shares that pass); above it, block by block (memory of one block's statistics; each ratio pays
            its own pass, and ``"global"`` ranks one more, since every spectrum is needed before the first block
            is solved; needs the targets inside a repeated block list, else one pass with a warning).
            LLaMA-7B's take ~44 GiB, SmolLM2-135M's ~1 GiB. 0: always block by block; ``inf`` (YAML ``.inf``):
            always in one pass.
        dense_cache_gb: two-stream methods (AA-SVD, SAES-SVD, SVD-LLM with ``propagate``): memory on the
            model's device that may keep one block's original-model layer inputs over the whole calibration set,
            so that the dense block runs once per block instead of once per group of layers (q/k/v, o, gate/up,
            down), and the original inputs' covariance ``G`` is not needed (calibration time
            0.75-0.79x on SmolLM2, same factors: ``benchmarks/RESULTS.md`` §9).
            A block whose inputs would not fit runs the dense block per group. SmolLM2-135M with 8k calibration
            tokens needs ~0.1 GiB, LLaMA-7B with 256 x 2048 tokens ~46 GiB in float32. 0: never keep them.
        true_sequential: two-stream methods: ``True`` (default, exact, the papers'): a block's layer groups are
            solved one after another, each from the compressed model's inputs with the block's earlier groups
            already low-rank (q/k/v before o, gate/up before down). ``False`` (GPTQ's option of the same name): all
            groups of a block from one pass of the compressed stream with the block still dense, so a layer does
            not see the error of earlier layers in its own block (earlier blocks' errors still propagate); one pass
            of the compressed stream per block instead of one per group. Measured on SmolLM2-135M
            (``benchmarks/RESULTS.md`` §9): 0.85-0.88x the calibration time; the same perplexity for
            ``SVDLLM(propagate=True)``, but 1.6-2.2x (SAES-SVD) to 12x (AA-SVD) for the anchored solvers, which fit
            each layer to the compressed inputs they saw, and this option changes them (they warn). Needs a
            repeated block list and both streams' layer inputs within ``dense_cache_gb`` (else that block runs
            true-sequential, with a warning).
    """

    method: ClassVar[str] = "lowrank"
    requires_calibration: ClassVar[bool] = True
    default_ridge: ClassVar[float] = 0.0  # what ``ridge=None`` means for the method (AA-SVD: 0.1, measured)
    two_stream: bool = False  # True: block-sequential original + shifted streams (prehab.pipeline)
    # Two-stream solvers that read "G" say so; the built-in ones read only H and C, so G (the original inputs'
    # covariance, a third product per group) is collected only for the spectrum plot's layers.
    reads_original_covariance: ClassVar[bool] = True
    # Solvers whose target is the dense model's output (the cross term C): they fit the compressed inputs they
    # saw, so true_sequential=False (which changes those inputs) costs them much (benchmarks/RESULTS.md §9).
    anchored: ClassVar[bool] = False

    def __init__(
        self,
        ratio: float | None = None,
        ratios: list[float] | None = None,
        targets: str | list[str] | None = None,
        calibration_batches: int = 32,
        calibration_dataloader: Iterable | None = None,
        save_dir: str | None = None,
        blocks: str | None = None,
        damping: float = 1e-6,
        ridge: float | None = None,
        verbose: bool = False,
        compare: list[str] | None = None,
        evaluate: bool = True,
        save_dense: bool = True,
        plots: bool = True,
        rank_allocation: str = "uniform",
        min_kept_fraction: float = 0.1,
        allocation_weighting: str = "equal",
        refine_steps: int = 0,
        refine_lr: float = DEFAULT_REFINE_LR,
        statistics_budget_gb: float = 2.0,
        dense_cache_gb: float = DENSE_CACHE_GB,
        true_sequential: bool = True,
    ) -> None:
        if ratio is not None and ratios is not None:
            raise ValueError(
                f"ratio={ratio!r} and ratios={ratios!r} are both given: pass ratio= for one compression or ratios= "
                "to run several (the model ends at the last one), not both."
            )
        if ratios is not None:
            if isinstance(ratios, str) or not isinstance(ratios, Sequence) or not ratios:
                raise ValueError(f"ratios={ratios!r} is invalid: use a non-empty list such as [0.2, 0.4, 0.6].")
            self.ratios = [_check_ratio(f"ratios[{i}]", r) for i, r in enumerate(ratios)]
            if len(set(self.ratios)) != len(self.ratios):
                raise ValueError(f"ratios={ratios!r} repeats a value: list each ratio once.")
        else:
            self.ratios = [_check_ratio("ratio", DEFAULT_RATIO if ratio is None else ratio)]
        self.ratio = self.ratios[-1]
        self.calibration_batches = _check_positive_int("calibration_batches", calibration_batches)
        if targets is not None and not isinstance(targets, str):
            if not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets):
                raise ValueError(f"targets={targets!r} is invalid: use a regex string, a list of them, or None.")
            if not targets:
                raise ValueError("targets=[] selects no layer: give at least one regex, or None for the default.")
        if blocks is not None and not isinstance(blocks, str):
            raise ValueError(f"blocks={blocks!r} is invalid: name the block list as a string, e.g. 'model.layers'.")
        if save_dir is not None and not isinstance(save_dir, str | os.PathLike):
            raise ValueError(f"save_dir={save_dir!r} is invalid: use a folder path (string) or None.")
        if compare is not None and (isinstance(compare, str) or not isinstance(compare, Sequence)):
            raise ValueError(
                f"compare={compare!r} is invalid: use a list of method names, e.g. compare=['svd']; "
                f"valid names: {list(METHOD_NAMES)}."
            )
        unknown = [m for m in compare or [] if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(
                f"compare={compare!r} names unknown methods {unknown}; valid values: {list(METHOD_NAMES)}."
            )
        if calibration_dataloader is not None and not isinstance(calibration_dataloader, Iterable):
            raise ValueError(
                f"calibration_dataloader={calibration_dataloader!r} is not iterable: pass a DataLoader or a list "
                "of batches."
            )
        if rank_allocation not in RANK_ALLOCATIONS:
            raise ValueError(
                f"rank_allocation={rank_allocation!r} is invalid; valid values: "
                f"{', '.join(map(repr, RANK_ALLOCATIONS))}."
            )
        if not (is_real(min_kept_fraction) and 0.0 < min_kept_fraction < 1.0):
            raise ValueError(
                f"min_kept_fraction={min_kept_fraction!r} is invalid: it is the least fraction of its parameters a "
                "layer keeps under rank_allocation='global' and must lie strictly between 0 and 1 (e.g. 0.1)."
            )
        if rank_allocation == "global" and min_kept_fraction >= 1.0 - max(self.ratios):
            raise ValueError(
                f"min_kept_fraction={min_kept_fraction!r} is invalid with ratio {max(self.ratios)!r}: every layer "
                f"would keep more than the {1.0 - max(self.ratios):g} of the parameters the budget allows; use a "
                "min_kept_fraction below 1 - ratio."
            )
        if allocation_weighting not in ALLOCATION_WEIGHTINGS:
            raise ValueError(
                f"allocation_weighting={allocation_weighting!r} is invalid; valid values: "
                f"{', '.join(map(repr, ALLOCATION_WEIGHTINGS))}."
            )
        if not is_count(refine_steps, 0):
            raise ValueError(f"refine_steps={refine_steps!r} is invalid: use an integer >= 0 (0: no refinement).")
        if refine_steps and not self.two_stream:
            raise ValueError(
                f"refine_steps={refine_steps!r} needs a two-stream method (AASVD, SAESSVD, or SVDLLM with "
                f"propagate=True); {type(self).__name__} has no original stream to refine against. Use refine_steps=0."
            )
        if not (is_real(refine_lr) and refine_lr > 0):
            raise ValueError(
                f"refine_lr={refine_lr!r} is invalid: use a small positive learning rate such as {DEFAULT_REFINE_LR:g}."
            )
        if not ((is_real(statistics_budget_gb) or statistics_budget_gb == float("inf")) and statistics_budget_gb >= 0):
            raise ValueError(
                f"statistics_budget_gb={statistics_budget_gb!r} is invalid: use a number of GiB >= 0 (e.g. 2.0; 0: "
                "one-stream statistics always block by block; .inf: always in one pass)."
            )
        self.statistics_budget_gb = float(statistics_budget_gb)
        if not ((is_real(dense_cache_gb) or dense_cache_gb == float("inf")) and dense_cache_gb >= 0):
            raise ValueError(
                f"dense_cache_gb={dense_cache_gb!r} is invalid: use a number of GiB >= 0 (e.g. {DENSE_CACHE_GB:g}; "
                "0: the two-stream pipeline reruns the dense block per group of layers instead of keeping its inputs)."
            )
        self.dense_cache_gb = float(dense_cache_gb)
        self.true_sequential = _check_flag("true_sequential", true_sequential)
        if not self.true_sequential and not self.two_stream:
            raise ValueError(
                f"true_sequential=False needs a two-stream method (AASVD, SAESSVD, or SVDLLM with propagate=True); "
                f"{type(self).__name__} collects its statistics in one pass of the original model, with no groups "
                "solved in sequence. Use true_sequential=True."
            )
        if not self.true_sequential and type(self).anchored:
            warnings.warn(
                f"true_sequential=False with {type(self).__name__}: measured on SmolLM2-135M it saves ~15% of the "
                "calibration time and multiplies the perplexity 2-12x, since this solver fits each layer to the "
                "compressed inputs it saw and the option changes them (benchmarks/RESULTS.md §9). It suits "
                "SVDLLM(propagate=True); keep true_sequential=True here unless you have measured otherwise.",
                stacklevel=2,
            )
        self.rank_allocation, self.min_kept_fraction = rank_allocation, float(min_kept_fraction)
        self.allocation_weighting = allocation_weighting
        self.refine_steps, self.refine_lr = refine_steps, float(refine_lr)
        self.damping = _check_damping(damping)
        if ridge is not None and not (is_real(ridge) and 0.0 <= ridge < float("inf")):
            raise ValueError(
                f"ridge={ridge!r} is invalid: use a number >= 0 (0: the exact closed form; e.g. 1e-2 to keep the "
                "original weights where the calibration inputs have almost no variance) or None (the method's "
                "default)."
            )
        if ridge and not type(self).requires_calibration:
            raise ValueError(
                f"ridge={ridge!r} has no effect on {type(self).__name__}, which solves without activation statistics: "
                "use ridge=0, or an activation-aware method (SVDLLM, AASVD, SAESSVD)."
            )
        self.ridge_arg = ridge  # as given: what compare= methods inherit (None: each method's own default)
        self.ridge = float(type(self).default_ridge if ridge is None else ridge)
        self.verbose = _check_flag("verbose", verbose)
        self.evaluate = _check_flag("evaluate", evaluate)
        self.save_dense = _check_flag("save_dense", save_dense)
        self.plots = _check_flag("plots", plots)
        self.compare = list(compare or [])
        self.targets = targets
        self.calibration_dataloader = calibration_dataloader
        self.save_dir = None if save_dir is None else str(save_dir)
        self.blocks = blocks
        self.report: CompressionReport | None = None
        self._fit_started: float | None = None
        self._initial_metrics: dict[str, float] | None = None
        self._initial_weights: dict[str, Tensor] = {}  # a few layers' weights before the fit (spectra plot)
        self._fit_targets: list[str] = []  # resolved at fit start, to refuse a second callback on the same layers
        self._spectrum_names: list[str] = []
        self._spectra: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ method-specific part
    def solve_layer(self, name: str, weight: Tensor, rank: int, stats: dict[str, Tensor]) -> LowRankFactors:
        """Factors for one layer (``weight``: out x in).

        ``stats`` holds mean covariances: ``"G"`` (``XXᵀ``, original inputs) when calibration ran, plus
        ``"H"`` (``X̂X̂ᵀ``, shifted inputs) and ``"C"`` (``XX̂ᵀ``) for two-stream methods; empty without data.
        A two-stream method whose class sets ``reads_original_covariance = False`` may get no ``"G"``.
        """
        raise NotImplementedError

    def method_kwargs(self) -> dict[str, Any]:
        """Arguments shared with the ``compare`` methods (same targets, data and numerics)."""
        return {
            "targets": self.targets,
            "calibration_batches": self.calibration_batches,
            "blocks": self.blocks,
            "damping": self.damping,
            "ridge": self.ridge_arg,
            "rank_allocation": self.rank_allocation,
            "min_kept_fraction": self.min_kept_fraction,
            "allocation_weighting": self.allocation_weighting,
            "statistics_budget_gb": self.statistics_budget_gb,
            "dense_cache_gb": self.dense_cache_gb,
            "true_sequential": self.true_sequential,
            "evaluate": False,
            "plots": False,
        }

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Bad targets= / blocks= fail now, before any training step, not after the whole fit.
        targets = resolve_targets(pl_module, self.targets, self.blocks)
        if self.blocks is not None:
            find_blocks(pl_module, self.blocks)
        position = trainer.callbacks.index(self) if self in trainer.callbacks else len(trainer.callbacks)
        for other in trainer.callbacks[:position]:
            shared = sorted(set(getattr(other, "_fit_targets", ())) & set(targets))
            if isinstance(other, LowRankCompression) and shared:
                raise ValueError(
                    f"{type(other).__name__} and {type(self).__name__} in one Trainer both target {shared[:3]} "
                    f"({len(shared)} layers): the second would find them already low-rank. Use compare=[...] to run "
                    "other methods on the same model for the report, or give the callbacks disjoint targets=."
                )
        self._fit_targets = list(targets)
        self._spectrum_names = _spectrum_layers(list(targets))
        self._fit_started, self._initial_metrics, self._initial_weights = None, None, {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self._initial_weights = {
            name: dense_weight(pl_module.get_submodule(name)).detach().to("cpu", copy=True)
            for name in self._spectrum_names
        }
        from prehab.module import PrehabModule  # PrehabModule evaluates itself before prehab

        if not isinstance(pl_module, PrehabModule):
            evaluator = self.evaluator(trainer, pl_module)
            self._initial_metrics = evaluator() if evaluator is not None else None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit_seconds = None if self._fit_started is None else time.perf_counter() - self._fit_started
        loader, sharded = self._calibration_source(trainer)
        where = {
            "rank": 0 if sharded else trainer.global_rank,
            "world_size": 1 if sharded else trainer.world_size,
            "progress": trainer.is_global_zero,
        }
        evaluator = self.evaluator(trainer, pl_module)
        stages = []
        initial = getattr(pl_module, "stage_metrics", {}).get("before_prehab", self._initial_metrics)
        params, size = model_size(pl_module)
        if initial is not None:
            stages.append(StageReport("before_prehab", params, size, None, dict(initial)))
        stages.append(StageReport("dense", params, size, fit_seconds, evaluator() if evaluator else {}))
        if self.save_dir is not None and self.save_dense:
            self._save_model(pl_module, Path(self.save_dir) / "dense", None)
            trainer.strategy.barrier("prehab_dense_saved")
        report = self.sweep(pl_module, loader, evaluator=evaluator, **where)
        final = next(row for row in report.sweep if row.final)
        params, size = model_size(pl_module)
        stages.append(StageReport(self.method, params, size, report.seconds["total"], final.metrics))
        report.stages = stages
        self.publish(trainer, pl_module, report, stage=self.method)

    def evaluator(self, trainer: Trainer, pl_module: LightningModule) -> Evaluator | None:
        """How to measure the module now (:func:`make_evaluator`), or None with ``evaluate=False``."""
        return make_evaluator(trainer, pl_module) if self.evaluate else None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        structure = lowrank_structure(pl_module)
        if structure:  # lets prehab.load_from_checkpoint rebuild the low-rank shapes
            checkpoint[CHECKPOINT_KEY] = structure

    def _calibration_source(self, trainer: Trainer) -> tuple[Iterable | None, bool]:
        """(loader, already sharded per rank)."""
        if self.calibration_dataloader is not None:
            loader, sharded = self.calibration_dataloader, False
        elif trainer.datamodule is not None and hasattr(trainer.datamodule, "calibration_dataloader"):
            loader, sharded = trainer.datamodule.calibration_dataloader(), False
        elif trainer.datamodule is not None:
            loader, sharded = trainer.datamodule.train_dataloader(), False
        else:
            loader = trainer.train_dataloader  # dataloaders passed to fit(): Lightning already sharded them
            if isinstance(loader, CombinedLoader):
                loader = loader.iterables
            sharded = trainer.world_size > 1
        return loader, sharded

    # ------------------------------------------------------------------ the work
    def sweep(
        self,
        model: nn.Module,
        dataloader: Iterable | None,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
        evaluator: Evaluator | None = None,
    ) -> CompressionReport:
        """Compress ``model`` with every ``compare`` method and then this one, at every ratio, evaluating each.

        Runs on the model itself and puts the dense layers back between runs (no copy of the model); one-stream
        statistics are collected once and shared. The model ends compressed by this method at the last ratio;
        on any failure it is put back dense, as it was.
        """
        from prehab.callbacks import METHODS  # the subclasses live in the package that imports this file

        dataloader = self._reusable(dataloader)  # every run must see the same batches

        def compared(name: str) -> LowRankCompression:  # the ridge only where the method has statistics to ridge
            kwargs = self.method_kwargs()
            if not METHODS[name].requires_calibration:
                kwargs["ridge"] = None
            if not METHODS[name].two_stream:  # one-stream methods have no groups solved in sequence
                kwargs["true_sequential"] = True
            return METHODS[name](**kwargs)

        runs = [(compared(name), ratio) for name in self.compare for ratio in self.ratios]
        runs += [(self, ratio) for ratio in self.ratios]
        dense = resolve_targets(model, self.targets, self.blocks)
        # The dense layers a run replaced wait off the model's device (host memory or a temporary file).
        store = RollbackStore(dense_weight(next(iter(dense.values()))).device)
        shared: dict[str, Any] = {}  # one-stream statistics, collected by the first run that needs them
        rows = []
        try:
            for index, (method, ratio) in enumerate(runs):
                final = index == len(runs) - 1
                report = method.compress(
                    model, dataloader, rank, world_size, progress, ratio=ratio, shared_statistics=shared, rollback=store
                )
                for name, module in dense.items():  # layers a one-stream run replaced are not in it yet
                    if name not in store and model.get_submodule(name) is not module:
                        store.put(name, module)
                metrics = evaluator() if evaluator is not None else {}
                totals = report.totals()
                rows.append(
                    SweepRow(
                        method.method,
                        ratio,
                        totals["model_params_after"],
                        totals["mean_relative_error"],
                        metrics,
                        report.seconds["total"],
                        final,
                    )
                )
                if not final:
                    _restore(model, dense, store)
        except BaseException:
            _restore(model, dense, store)
            raise
        finally:
            store.close()
        report.sweep = rows
        return report

    def compress(
        self,
        model: nn.Module,
        dataloader: Iterable | None = None,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
        ratio: float | None = None,
        shared_statistics: dict[str, Any] | None = None,
        rollback: RollbackStore | None = None,
    ) -> CompressionReport:
        """Compress ``model`` in place at ``ratio`` (default: the last of ``ratios``) and return the report.

        A failure leaves the model exactly as it was: a one-pass one-stream run modifies nothing until every
        layer's factors are computed and checked; block-by-block runs put the replaced layers back.
        ``shared_statistics`` (a dict, filled on first use) lets several
        one-stream compressions of the same dense model share one statistics pass.

        Two-stream methods move each finished block's replaced dense layers to ``rollback`` (default: a store
        of their own, dropped at the end: the replaced layer objects are then left empty); see
        :mod:`prehab.rollback`. One-stream methods keep no copy: they swap everything at once at the end,
        except block by block (``statistics_budget_gb``), where each block's dense layers go to the store too.
        """
        ratio = self.ratio if ratio is None else _check_ratio("ratio", ratio)
        started = time.perf_counter()
        targets = resolve_targets(model, self.targets, self.blocks)
        plan = {name: self._plan_layer(module, ratio) for name, module in targets.items()}
        if dataloader is None and self.requires_calibration:
            raise ValueError(
                f"{type(self).__name__} needs calibration data and found none: pass calibration_dataloader=, "
                "give your LightningDataModule a calibration_dataloader() method, or provide a train dataloader."
            )
        dataloader = self._reusable(dataloader)
        params_before = sum(p.numel() for p in model.parameters())
        reports: dict[str, LayerReport] = {}
        timer = {"solve": 0.0, "allocation": 0.0, "refinement": 0.0}
        refinements: list[dict[str, Any]] = []
        self._spectra = {}
        if self.plots and not self._spectrum_names:
            self._spectrum_names = _spectrum_layers(list(targets))

        def solve_group(
            names: list[str],
            stats: dict[str, Tensor] | None,
            samples: int,
            dense_energy: dict[str, float] | None = None,
        ) -> dict[str, nn.Module]:
            """Factor the named layers from their (shared) statistics; returns replacements, swaps nothing.

            ``dense_energy``: each layer's mean ``‖W x‖²`` where ``stats`` has no ``"G"`` (two streams)."""
            tick = time.perf_counter()
            if stats is not None:
                self._check_statistics(names, stats)
            # once per group, not per layer: q/k/v share one statistic (an n x n copy each at 7B shapes)
            solver_stats = ridge_statistics(stats, self.ridge) if stats is not None else None
            replacements = {}
            with reused_cholesky():  # the group's layers share their statistics: one Cholesky factor per group
                for name in names:
                    inputs = dense_weight(targets[name]).shape[1]
                    if stats is not None and 0 < samples < inputs:
                        short_of_rows[name] = inputs  # read now: swapped-out layers may be offloaded later
                    layer_report, replacement = self._solve_one(
                        name, targets[name], plan[name], stats, samples, solver_stats, (dense_energy or {}).get(name)
                    )
                    reports[name] = layer_report
                    if replacement is not None:
                        replacements[name] = replacement
            timer["solve"] += time.perf_counter() - tick
            return replacements

        short_of_rows: dict[str, int] = {}  # layers whose statistics saw fewer token rows than they have inputs
        samples = 0
        stats = None
        # Block-by-block one-stream statistics when they do not fit statistics_budget_gb: `blocks()` gives a pass.
        opened = None
        spectra_cached = shared_statistics is not None and self._spectrum_key() in shared_statistics.get("spectra", {})
        if self._over_budget(model, targets, dataloader) and not (self.two_stream and spectra_cached):
            batches = list(take_batches(dataloader, self.calibration_batches, rank, world_size))
            opened = [self._open_blocks(model, targets, batches, progress)]  # None: cannot (warned)
        blockwise = opened is not None and opened[0] is not None

        def blocks() -> Iterator[tuple[dict[str, Tensor], int]]:
            return opened.pop() if opened else self._open_blocks(model, targets, batches, progress)

        if not self.two_stream and not blockwise:
            stats, samples = self._one_stream_statistics(
                model, targets, dataloader, rank, world_size, progress, shared_statistics
            )
        if self.rank_allocation == "global":
            tick = time.perf_counter()
            cache = shared_statistics.setdefault("spectra", {}) if shared_statistics is not None else {}
            if self._spectrum_key() not in cache:
                if blockwise:
                    cache[self._spectrum_key()] = self._blockwise_spectra(targets, blocks())
                else:
                    if self.two_stream:  # ranks are needed before block 0: one extra one-stream pass, not kept
                        stats = self._one_stream_statistics(
                            model, targets, dataloader, rank, world_size, progress, None
                        )[0]
                    cache[self._spectrum_key()] = self._spectra_from(targets, stats)
            self._allocate(targets, plan, ratio, cache[self._spectrum_key()])
            if self.two_stream:
                stats = None  # memory stays at one block
            timer["allocation"] = time.perf_counter() - tick

        def refine(name: str, block: nn.Module, factors: list, run: Callable, target: Callable, count: int) -> None:
            result = refine_block(block, factors, run, target, count, self.refine_steps, self.refine_lr, name)
            timer["refinement"] += result.seconds
            refinements.append(dataclasses.asdict(result))
            if self.verbose:
                log.info(
                    "%s: refined %s in %d steps: block-output error %.4g -> %.4g%s",
                    self.method,
                    name,
                    result.steps,
                    result.error_before,
                    result.error_after,
                    "" if result.kept else " (not better: factors put back)",
                )

        if self.two_stream:
            batches = list(take_batches(dataloader, self.calibration_batches, rank, world_size))

            def solve_shared(group: GroupStatistics) -> dict[str, nn.Module]:
                nonlocal samples
                samples = max(samples, group.count)
                return solve_group(group.names, group.as_dict(), group.count, group.dense_energy)

            unused = sequential_compress(
                model,
                targets,
                batches,
                solve_shared,
                self.blocks,
                progress,
                self.method,
                refine=refine if self.refine_steps else None,
                rollback=rollback,
                original_covariance=None
                if self.reads_original_covariance
                else set(self._spectrum_names if self.plots else ()),
                dense_cache_gb=self.dense_cache_gb,
                true_sequential=self.true_sequential,
            )
            for name in unused:
                solve_group([name], None, 0)
        elif blockwise:
            store = RollbackStore(dense_weight(next(iter(targets.values()))).device) if rollback is None else rollback
            try:
                for block_stats, count in blocks():
                    samples = max(samples, count)
                    for name in block_stats:  # the block checked before any of its layers is replaced
                        self._check_statistics([name], {"G": block_stats[name]})
                    solutions = {}
                    with reused_cholesky():  # q/k/v (gate/up) share one G, one after another
                        for name, covariance in block_stats.items():
                            solutions.update(solve_group([name], {"G": covariance}, count))
                    for name, replacement in solutions.items():  # the dense layer leaves the device
                        store.put(name, replace_module(model, name, replacement))
                for name in targets:
                    if name not in reports:  # never called during calibration
                        solve_group([name], None, samples)
            except BaseException:
                store.restore(model)
                raise
            finally:
                if rollback is None:
                    store.close()
        else:
            solutions: dict[str, nn.Module] = {}
            bar = tqdm(targets, desc=f"{self.method}: factorizing", disable=not progress, unit="layer")
            with reused_cholesky():  # q/k/v (gate/up) share one G, one after another
                for name in bar:  # everything is solved before anything is swapped
                    layer_stats = stats.get(name) if stats else {}
                    solutions.update(solve_group([name], layer_stats, samples))
            for name, replacement in solutions.items():
                replace_module(model, name, replacement)

        layers = [reports[name] for name in targets]
        if short_of_rows and self.requires_calibration:  # plain SVD's factors do not use the statistics
            widest, first = max(short_of_rows.values()), next(iter(short_of_rows))
            warnings.warn(
                f"{self.method}: {len(short_of_rows)} layers (e.g. {first!r}) saw fewer calibration token "
                f"rows ({samples}) than they have inputs (up to {widest}), padding not counted: their covariance is "
                "rank-deficient, so the factors fit the calibration tokens and may not generalize (the exact "
                "shift-aware forms suffer most: on MiniLM/GLUE AA-SVD with ridge=0 at 20% lost 0.05 more than SVD-LLM "
                "with ~650 real tokens; its default ridge=0.1 kept it ahead). Pass more calibration data: at least "
                f"{widest} token rows, better several times that, or a ridge= > 0.",
                stacklevel=2,
            )
        total = time.perf_counter() - started
        seconds = {
            "calibration": total - timer["solve"] - timer["allocation"] - timer["refinement"],
            "factorization": timer["solve"],
            "total": total,
        }
        if self.rank_allocation == "global":
            seconds["allocation"] = timer["allocation"]
        if self.refine_steps:
            seconds["refinement"] = timer["refinement"]
        report = CompressionReport(
            method=self.method,
            ratio=ratio,
            layers=layers,
            model_params_before=params_before,
            model_params_after=sum(p.numel() for p in model.parameters()),
            calibration_samples=samples,
            seconds=seconds,
            spectra=self._spectra,
            rank_allocation=self.rank_allocation,
            ridge=self.ridge,
            refinement=refinements,
        )
        self.report = report
        return report

    def _reusable(self, dataloader: Iterable | None) -> Iterable | None:
        """A one-shot iterator (e.g. a generator) read once into a list of the batches calibration uses."""
        if isinstance(dataloader, Iterator):
            return list(itertools.islice(dataloader, self.calibration_batches))
        return dataloader

    def _one_stream_statistics(
        self,
        model: nn.Module,
        targets: dict[str, nn.Module],
        dataloader: Iterable | None,
        rank: int,
        world_size: int,
        progress: bool,
        shared: dict[str, Any] | None,
    ) -> tuple[dict[str, dict[str, Tensor]] | None, int]:
        """``({name: {"G": ...}}, samples)``; None without data. Plain SVD (which needs no data) warns and goes
        on without them when the data cannot be used."""
        if dataloader is None:
            return None, 0
        if shared is not None and "stats" in shared:
            return shared["stats"], shared["samples"]
        try:
            stats, samples = self.collect_statistics(model, targets, dataloader, rank, world_size, progress)
            for name, layer_stats in stats.items():  # all checked before any factorization
                self._check_statistics([name], layer_stats)
        except Exception as err:
            if self.requires_calibration:
                raise
            warnings.warn(
                f"{type(self).__name__} needs no calibration data, so it goes on without it; the report's error "
                f"column stays empty because the calibration data could not be used ({type(err).__name__}: {err}).",
                stacklevel=2,
            )
            return None, 0
        if shared is not None:
            shared.update(stats=stats, samples=samples)
        return stats, samples

    def _solve_one(
        self,
        name: str,
        module: nn.Module,
        planned: tuple[int | None, str],
        stats: dict[str, Tensor] | None,
        samples: int,
        solver_stats: dict[str, Tensor] | None = None,
        dense_energy: float | None = None,
    ) -> tuple[LayerReport, nn.Module | None]:
        """One layer's report line and replacement (None: stays dense). ``stats`` None: it saw no input.

        ``solver_stats``: what the solver reads (``stats`` with the ridge added); the report's error uses ``stats``
        (and ``dense_energy``, the mean ``‖W x‖²``, where ``stats`` has no ``"G"``).
        """
        weight = dense_weight(module).detach()
        out_features, in_features = weight.shape
        layer_rank, note = planned
        if not all_finite(weight):
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
        solver_stats = solver_stats if solver_stats is not None else ridge_statistics(stats, self.ridge)
        factors = self.solve_layer(name, weight, layer_rank, solver_stats)
        if not (all_finite(factors.up) and all_finite(factors.down)):
            raise FloatingPointError(f"{self.method} produced non-finite factors for layer {name!r}.")
        error = self._relative_error(weight, factors, stats, dense_energy, solver_stats)
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
        if self.plots and name in self._spectrum_names and "G" in stats:
            self._spectra[name] = {"rank": layer_rank, "after_prehab": _whitened_spectrum(weight, stats["G"])}
            if name in self._initial_weights:
                self._spectra[name]["before_prehab"] = _whitened_spectrum(
                    self._initial_weights[name].to(weight.device), stats["G"]
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

    def allocation_spectrum(self, weight: Tensor, stats: dict[str, Tensor]) -> Tensor:
        """Singular values whose tail energy is the layer's predicted loss at a rank: ``σ(W L)`` with ``L Lᵀ = G``
        (the original model's input covariance), or ``σ(W)`` without statistics."""
        w = weight.detach().double()
        if "G" in stats:
            w = w @ damped_cholesky(stats["G"], initial_damping=self.damping).factor.to(w.device)
        gram = w.mT @ w if w.shape[0] >= w.shape[1] else w @ w.mT
        return torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt().flip(0).cpu()

    def _spectrum_key(self) -> tuple:
        """Methods with the same key share spectra in a sweep (SVD's unwhitened ones differ from the others')."""
        return (type(self).allocation_spectrum, self.damping)

    def _over_budget(self, model: nn.Module, targets: dict[str, nn.Module], dataloader: Iterable | None) -> bool:
        """Whether one-stream statistics should be collected block by block (see ``statistics_budget_gb``)."""
        if dataloader is None or (self.two_stream and self.rank_allocation != "global"):
            return False
        size = sum(8 * dense_weight(module).shape[1] ** 2 for module in targets.values())
        if size <= self.statistics_budget_gb * 2**30:
            return False
        if covered_by_blocks(model, targets, self.blocks):
            return True
        warnings.warn(
            f"{self.method}: the one-stream statistics take ~{size / 2**30:.1f} GiB (above statistics_budget_gb="
            f"{self.statistics_budget_gb:g}) but some targets lie outside a repeated block list, so they are "
            "collected in one pass. Restrict targets= to the blocks, or pass blocks=, for block-by-block collection.",
            stacklevel=3,
        )
        return False

    def _open_blocks(
        self, model: nn.Module, targets: dict[str, nn.Module], batches: list, progress: bool
    ) -> Iterator[tuple[dict[str, Tensor], int]] | None:
        """:func:`~prehab.pipeline.one_stream_blocks`, or None (with a warning) when the model's blocks cannot be run
        one by one: the statistics are then collected in one pass."""
        try:
            return one_stream_blocks(model, targets, batches, self.blocks, progress, self.method)
        except ValueError as err:
            warnings.warn(
                f"{self.method}: the statistics are collected in one pass over the whole model (memory of every "
                f"layer's statistics) because its blocks cannot be run one by one: {err}",
                stacklevel=3,
            )
            return None

    def _blockwise_spectra(
        self, targets: dict[str, nn.Module], blocks: Iterator[tuple[dict[str, Tensor], int]]
    ) -> dict[str, Tensor]:
        """Every target's allocation spectrum from block-by-block statistics (nothing is replaced)."""
        spectra = {}
        for block_stats, _ in blocks:
            for name, covariance in block_stats.items():
                self._check_statistics([name], {"G": covariance})
                spectra[name] = self.allocation_spectrum(dense_weight(targets[name]), {"G": covariance})
        if not self.requires_calibration:
            for name in targets:
                spectra.setdefault(name, self.allocation_spectrum(dense_weight(targets[name]), {}))
        return spectra

    def _spectra_from(
        self, targets: dict[str, nn.Module], stats: dict[str, dict[str, Tensor]] | None
    ) -> dict[str, Tensor]:
        """Every target's allocation spectrum from one-pass statistics; layers that saw no input are left out
        (they stay dense) unless the method needs no calibration."""
        spectra = {}
        for name, module in targets.items():
            layer_stats = stats.get(name) if stats else None
            if layer_stats is None and self.requires_calibration:
                continue
            spectra[name] = self.allocation_spectrum(dense_weight(module), layer_stats or {})
        return spectra

    def _allocate(
        self,
        targets: dict[str, nn.Module],
        plan: dict[str, tuple[int | None, str]],
        ratio: float,
        spectra: dict[str, Tensor],
    ) -> None:
        """Replace the uniform ``plan`` (in place) by ranks from :mod:`prehab.allocation` with at most the same
        parameter count. Layers that saw no calibration input keep their plan (they stay dense)."""
        names = [name for name in targets if name in spectra]
        if not names:
            return
        shapes = [tuple(dense_weight(targets[name]).shape) for name in names]
        budget = sum(
            m * n if plan[name][0] is None else factor_params(m, n, plan[name][0])
            for name, (m, n) in zip(names, shapes, strict=True)
        )
        layer_spectra = [spectra[n] for n in names]
        if self.allocation_weighting == "equal":
            allocation = allocate_equal_error(layer_spectra, shapes, budget, self.min_kept_fraction)
        else:
            weights = None
            if self.allocation_weighting == "relative":
                energy = [float((spectrum.double() ** 2).sum()) for spectrum in layer_spectra]
                weights = [1.0 / e if e > 0 else 0.0 for e in energy]
            allocation = allocate_ranks(layer_spectra, shapes, budget, self.min_kept_fraction, weights)
        for name, layer_rank in zip(names, allocation.ranks, strict=True):
            if layer_rank is None:
                plan[name] = (None, "kept dense: global rank allocation (cheaper than the rank it would get)")
            else:
                plan[name] = (layer_rank, "")
        if self.verbose:
            log.info(
                "%s: global rank allocation (%s) at ratio %g: %d params (budget %d), predicted loss %.4g",
                self.method,
                self.allocation_weighting,
                ratio,
                allocation.params,
                budget,
                allocation.loss,
            )

    def _plan_layer(self, module: nn.Module, ratio: float) -> tuple[int | None, str]:
        out_features, in_features = dense_weight(module).shape
        rank = rank_from_ratio(out_features, in_features, ratio)
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
            if not all_finite(value):
                raise ValueError(
                    f"calibration statistics {key} of layer {names[0]!r} contain NaN/Inf: the inputs of that layer "
                    "are non-finite on the calibration data (usually an upstream layer overflowed its dtype: float16 "
                    "saturates at 65504). Nothing was modified. Compress in bfloat16 or float32 instead (e.g. "
                    "model.to(torch.bfloat16)), or check the model and the data."
                )

    def _relative_error(
        self,
        weight: Tensor,
        factors: LowRankFactors,
        stats: dict[str, Tensor],
        dense_energy: float | None = None,
        solver_stats: dict[str, Tensor] | None = None,
    ) -> float | None:
        """``‖WX − W'X̂‖² / ‖WX‖²`` on the calibration statistics ``stats`` (None: nothing to measure it on).

        ``solver_stats``: what the solver read (``stats`` with the ridge added). Where the solver factored those
        (its whitening and cross term are these very tensors), the error comes from its spectrum
        (:func:`~prehab.linalg.solver_output_error`) instead of an ``out x in x in`` product: 27% of SVD-LLM's
        factorization time at LLaMA-7B's shapes."""
        solver_stats = stats if solver_stats is None else solver_stats
        whitening, cross = factors.whitening, factors.cross
        if whitening is not None and "H" not in stats and cross is None and whitening is solver_stats.get("G"):
            error, dense = solver_output_error(weight, factors, None, ridge_shift(stats, self.ridge))  # SVD-LLM
        elif (
            dense_energy is not None and "H" in stats and whitening is not None and cross is not None
            and whitening is solver_stats.get("H") and cross is solver_stats.get("C")
        ):  # AA-SVD; ‖WX‖² measured on the dense block's outputs
            error, dense = solver_output_error(weight, factors, dense_energy, ridge_shift(stats, self.ridge))
        elif "G" in stats or (dense_energy is not None and "H" in stats):
            error, dense = output_error_and_energy(  # ‖WX‖² from G, else from the dense block's outputs
                weight, (factors.up, factors.down), stats.get("G"), stats.get("C"), stats.get("H"),
                dense=None if "G" in stats else dense_energy,
            )
        else:
            return None
        # Round-off can make an exact fit slightly negative (printed as -0.0): the error is a squared norm.
        return max(error, 0.0) / dense if dense > 0 else 0.0

    # ------------------------------------------------------------------ report, logs, files
    def publish(self, trainer: Trainer, pl_module: LightningModule, report: CompressionReport, stage: str) -> None:
        """Log the report, print it, and (with ``save_dir``) save the model after ``stage`` and the report files.

        Also used by :class:`~prehab.callbacks.LoRARehab` after it adds its stage to this callback's report.
        """
        self.report = report
        if trainer.logger is not None:
            metrics = {f"compression/{k}": float(v) for k, v in report.totals().items() if v is not None}
            for name, values in report.metrics.items():
                metrics.update({f"compression/{name}/{k}": v for k, v in values.items()})
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        self._print_report(report)
        folder = "compressed" if stage == self.method else stage
        if self.save_dir is not None:
            self._save_model(pl_module, Path(self.save_dir) / folder, report)
            self._save_report(report)
            trainer.strategy.barrier("prehab_saved")
        checkpoints = [c for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        if checkpoints:  # Lightning's own checkpoints hold the dense model: save the compressed one too
            path = Path(checkpoints[0].dirpath) / f"{folder}.ckpt"
            trainer.save_checkpoint(path, weights_only=True)
            if trainer.is_global_zero:
                log.info("saved a checkpoint of the module after %s to %s", stage, path)

    @rank_zero_only
    def _print_report(self, report: CompressionReport) -> None:
        report.print()

    @rank_zero_only
    def _save_model(self, model: nn.Module, folder: Path, report: CompressionReport | None) -> None:
        save_compressed(model, folder, metadata=None if report is None else report.to_dict())
        log.info("saved the model to %s", folder)

    @rank_zero_only
    def _save_report(self, report: CompressionReport) -> None:
        files = report.save(self.save_dir, plots=self.plots)
        log.info("wrote %s", ", ".join(str(f) for f in files))


def _restore(model: nn.Module, dense: dict[str, nn.Module], store: RollbackStore) -> None:
    """Put the dense layers back wherever a run replaced them (those in ``store`` get their data back first)."""
    store.restore(model)
    for name, module in dense.items():
        if model.get_submodule(name) is not module:
            replace_module(model, name, module)
