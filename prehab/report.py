"""The run report: per-layer table, stages (before/after prehab, surgery, rehab), ratio sweeps, spectra.

Written as ``report.json`` (strict JSON, schema below), ``report.md`` (the tables a person reads) and PNG
plots (:mod:`prehab.plots`). Printed as rich tables at the end of a run.

``report.json`` schema (``"schema": "prehab.report"``, ``"version": 1``):

- ``method``, ``ratio`` (the ratio the model ends at), ``ratios`` (every ratio run), ``calibration_samples``;
- ``seconds``: the surgery's ``calibration``, ``factorization`` and ``total`` seconds, plus ``allocation`` (with
  ``rank_allocation="global"``: spectra and allocation, and for two-stream methods the extra one-stream pass)
  and ``refinement`` (with ``refine_steps``) when used;
- ``rank_allocation``: ``"uniform"`` or ``"global"``;
- ``ridge``: the solvers' Tikhonov ``ε`` (0: the exact closed form; see :func:`prehab.linalg.ridge_statistics`);
- ``refinement``: one entry per refined block ``{block, steps, error_before, error_after, kept, seconds}``
  (relative block-output errors on the calibration data); empty without refinement;
- ``totals``: layer and parameter counts of the targeted layers and of the whole model (see :meth:`totals`);
- ``stages``: one entry per stage the model went through, in order: ``before_prehab`` (before the fit),
  ``dense`` (after prehab / fine-tuning), the surgery (named by the method), ``rehab`` (after LoRA) — each
  ``{name, label, params, size_mb, seconds, metrics}``; ``seconds`` is the time the stage took (null: not timed),
  ``size_mb`` the parameters' bytes / 1e6 (shared tensors counted once);
- ``sweep``: every (method, ratio) compressed in the run, the model's own final compression included —
  ``{method, ratio, params, mean_relative_error, metrics, seconds, final}``;
- ``layers``: the per-layer table of the final compression — ``{name, out_features, in_features, rank,
  params_before, params_after, relative_error, damping, beta, note}`` (``rank`` null: kept dense);
- ``spectra``: for a few layers, whitened singular values ``σ_i(W L)`` (``L Lᵀ`` = the layer's input covariance
  at surgery) ``{layer: {"rank": r, "before_prehab": [...], "after_prehab": [...]}}``; ``before_prehab`` uses the
  weights from before the fit, both use the same ``L``.

Non-finite numbers are written as ``null`` (strict JSON).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

__all__ = [
    "REPORT_SCHEMA",
    "REPORT_VERSION",
    "CompressionReport",
    "LayerReport",
    "StageReport",
    "SweepRow",
    "model_size",
]

REPORT_SCHEMA = "prehab.report"
REPORT_VERSION = 1

STAGE_LABELS = {
    "before_prehab": "before prehab",
    "dense": "after prehab (dense)",
    "rehab": "after rehab (LoRA)",
}


def model_size(model: nn.Module) -> tuple[int, float]:
    """(parameters, MB of parameter storage) with shared tensors counted once (``parameters()`` de-duplicates)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params) / 1e6


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf become None (``json`` would write the non-standard ``Infinity``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _number(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None when the layer stayed dense
    params_before: int
    params_after: int
    relative_error: float | None  # ‖WX − W'X̂‖² / ‖WX‖² on the calibration data
    damping: float = 0.0  # relative damping (x trace/n) added to the whitening covariance
    beta: float | None = None
    note: str = ""

    @property
    def compressed(self) -> bool:
        return self.rank is not None


@dataclass
class StageReport:
    """The model after one stage of the pipeline."""

    name: str  # "before_prehab", "dense", the surgery method, "rehab"
    params: int
    size_mb: float
    seconds: float | None = None  # time the stage took
    metrics: dict[str, float] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or STAGE_LABELS.get(self.name, f"after surgery ({self.name})")


@dataclass
class SweepRow:
    """One (method, ratio) compression of the run, evaluated."""

    method: str
    ratio: float
    params: int
    mean_relative_error: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    final: bool = False  # the compression the model itself ends with


@dataclass
class CompressionReport:
    method: str
    ratio: float
    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    calibration_samples: int = 0  # rows (tokens/patches) seen per layer
    seconds: dict[str, float] = field(default_factory=dict)
    stages: list[StageReport] = field(default_factory=list)
    sweep: list[SweepRow] = field(default_factory=list)
    spectra: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank_allocation: str = "uniform"
    ridge: float = 0.0
    refinement: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """``{stage name: metrics}`` for the stages that were evaluated."""
        return {stage.name: stage.metrics for stage in self.stages if stage.metrics}

    @property
    def ratios(self) -> list[float]:
        return sorted({row.ratio for row in self.sweep}) or [self.ratio]

    def stage(self, name: str) -> StageReport | None:
        return next((s for s in self.stages if s.name == name), None)

    def set_stage(self, stage: StageReport) -> None:
        """Add a stage, or replace the one with the same name (a re-run of that stage)."""
        self.stages = [s for s in self.stages if s.name != stage.name] + [stage]

    def totals(self) -> dict[str, Any]:
        before = sum(layer.params_before for layer in self.layers)
        after = sum(layer.params_after for layer in self.layers)
        errors = [layer.relative_error for layer in self.layers if layer.relative_error is not None]
        return {
            "layers": len(self.layers),
            "layers_compressed": sum(layer.compressed for layer in self.layers),
            "target_params_before": before,
            "target_params_after": after,
            "target_ratio_removed": 1.0 - after / before if before else 0.0,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_ratio_removed": 1.0 - self.model_params_after / self.model_params_before
            if self.model_params_before
            else 0.0,
            "mean_relative_error": sum(errors) / len(errors) if errors else None,
            "max_relative_error": max(errors) if errors else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return _finite(
            {
                "schema": REPORT_SCHEMA,
                "version": REPORT_VERSION,
                "method": self.method,
                "ratio": self.ratio,
                "ratios": self.ratios,
                "calibration_samples": self.calibration_samples,
                "rank_allocation": self.rank_allocation,
                "ridge": self.ridge,
                "seconds": self.seconds,
                "totals": self.totals(),
                "stages": [asdict(stage) for stage in self.stages],
                "sweep": [asdict(row) for row in self.sweep],
                "layers": [asdict(layer) for layer in self.layers],
                "spectra": self.spectra,
                "refinement": self.refinement,
            }
        )

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False))
        return path

    def save(self, folder: str | Path, plots: bool = True) -> list[Path]:
        """Write ``report.json``, ``report.md`` and (with ``plots``) the PNG plots into ``folder``."""
        folder = Path(folder)
        written = [self.save_json(folder / "report.json")]
        images = []
        if plots:
            from prehab.plots import save_plots

            images = save_plots(self, folder)
        (folder / "report.md").write_text(self.to_markdown([p.name for p in images]))
        return [*written, folder / "report.md", *images]

    # ------------------------------------------------------------------ tables
    def metric_names(self) -> list[str]:
        return sorted({k for row in [*self.stages, *self.sweep] for k in row.metrics})

    def summary_rows(self) -> list[dict[str, Any]]:
        """The closing table: stages in order, other compressions of the sweep just before the model's own."""
        rows = []
        errors = self.totals()["mean_relative_error"]
        others = [r for r in self.sweep if not r.final]
        for stage in self.stages:
            if stage.name == self.method:
                for row in others:
                    rows.append(
                        {
                            "model": f"{row.method}, {row.ratio:g} removed (copy)",
                            "params": row.params,
                            "size_mb": None,
                            "error": row.mean_relative_error,
                            "seconds": row.seconds,
                            "metrics": row.metrics,
                        }
                    )
            label = f"{stage.label}, {self.ratio:g} removed" if stage.name == self.method else stage.label
            rows.append(
                {
                    "model": label,
                    "params": stage.params,
                    "size_mb": stage.size_mb,
                    "error": errors if stage.name == self.method else None,
                    "seconds": stage.seconds,
                    "metrics": stage.metrics,
                }
            )
        return rows

    def table(self) -> Table:
        """The per-layer table."""
        show_beta = any(layer.beta is not None for layer in self.layers)
        totals = self.totals()
        caption = (
            f"whole model: {totals['model_params_before']:,} -> {totals['model_params_after']:,} params "
            f"({100 * totals['model_ratio_removed']:.1f}% removed); targeted layers: "
            f"{100 * totals['target_ratio_removed']:.1f}% removed; {self.calibration_samples:,} calibration rows"
        )
        table = Table(
            title=f"prehab compression: {self.method}, ratio {self.ratio:g}, {self.rank_allocation} ranks",
            caption=caption,
            show_footer=True,
        )
        columns = ["layer", "shape", "rank", "kept", "params before", "params after", "rel. error", "damping"]
        columns += ["beta"] if show_beta else []
        columns += ["note"]
        footers = {
            "layer": f"{totals['layers_compressed']}/{totals['layers']} compressed",
            "params before": f"{totals['target_params_before']:,}",
            "params after": f"{totals['target_params_after']:,}",
            "rel. error": "" if totals["mean_relative_error"] is None else f"mean {totals['mean_relative_error']:.3g}",
        }
        for column in columns:
            left = column in ("layer", "note")
            table.add_column(
                column, footer=footers.get(column, ""), justify="left" if left else "right", no_wrap=column == "layer"
            )
        for row in self._layer_rows(show_beta):
            table.add_row(*row)
        return table

    def _layer_rows(self, show_beta: bool) -> list[list[str]]:
        rows = []
        for layer in self.layers:
            row = [
                layer.name,
                f"{layer.out_features}x{layer.in_features}",
                "dense" if layer.rank is None else str(layer.rank),
                _number(layer.params_after / layer.params_before if layer.params_before else None, ".3f"),
                f"{layer.params_before:,}",
                f"{layer.params_after:,}",
                _number(layer.relative_error, ".3g"),
                _number(layer.damping, ".0e") if layer.damping else "0",
            ]
            row += [_number(layer.beta, ".3f")] if show_beta else []
            rows.append([*row, layer.note])
        return rows

    def metrics_table(self) -> Table:
        """The closing table: every stage and every compression of the run, with its metrics."""
        names = self.metric_names()
        table = Table(title=f"prehab run: {self.method}, the model ends at ratio {self.ratio:g}")
        for column in ["model", "params", "size (MB)", "mean rel. error", *names, "seconds"]:
            table.add_column(column, justify="left" if column == "model" else "right")
        for row in self.summary_rows():
            table.add_row(*self._summary_cells(row, names))
        return table

    @staticmethod
    def _summary_cells(row: dict[str, Any], names: list[str]) -> list[str]:
        return [
            row["model"],
            f"{row['params']:,}",
            _number(row["size_mb"], ".2f"),
            _number(row["error"], ".3g"),
            *[_number(row["metrics"].get(n)) for n in names],
            _number(row["seconds"], ".1f"),
        ]

    def print(self, console: Console | None = None) -> None:
        # Layer names are long: never squeeze the table below 140 columns (a log file has no width).
        console = console or Console()
        if console.width < 140:
            console = Console(file=console.file, width=140)
        console.print(self.table())
        if self.stages or self.sweep:
            console.print(self.metrics_table())

    def to_markdown(self, images: list[str] | None = None) -> str:
        """``report.md``: the closing table, the method x ratio tables, the per-layer table, the plots."""
        names = self.metric_names()
        totals = self.totals()
        lines = [
            f"# prehab report: {self.method}, the model ends at ratio {self.ratio:g}",
            "",
            f"Whole model {totals['model_params_before']:,} -> {totals['model_params_after']:,} parameters "
            f"({100 * totals['model_ratio_removed']:.1f}% removed; targeted layers "
            f"{100 * totals['target_ratio_removed']:.1f}% removed). Calibration: {self.calibration_samples:,} rows "
            "per layer (tokens or patches; padded positions are not counted). "
            f"Ranks: {self.rank_allocation}. "
            + (f"Ridge {self.ridge:g} (solved with ε·trace/n·I added to the covariances). " if self.ridge else "")
            + f"Surgery: {self.seconds.get('total', 0.0):.1f} s"
            + "".join(
                f", {key} {self.seconds[key]:.1f} s" for key in ("allocation", "refinement") if key in self.seconds
            )
            + ".",
            "",
            "## Stages",
            "",
        ]
        lines += _markdown_table(
            ["model", "params", "size (MB)", "mean rel. error", *names, "seconds"],
            [self._summary_cells(row, names) for row in self.summary_rows()],
        )
        methods = list(dict.fromkeys(row.method for row in self.sweep))
        if self.sweep and (len(self.ratios) > 1 or len(methods) > 1):
            for name in names or [None]:
                title = name or "parameters"
                lines += ["", f"## Methods x ratios: {title}", ""]
                cells = []
                for method in methods:
                    by_ratio = {row.ratio: row for row in self.sweep if row.method == method}
                    cells.append(
                        [
                            method,
                            *[
                                "-"
                                if r not in by_ratio
                                else (_number(by_ratio[r].metrics.get(name)) if name else f"{by_ratio[r].params:,}")
                                for r in self.ratios
                            ],
                        ]
                    )
                lines += _markdown_table(["method", *[f"{r:g} removed" for r in self.ratios]], cells)
        show_beta = any(layer.beta is not None for layer in self.layers)
        lines += ["", "## Layers", ""]
        header = ["layer", "shape", "rank", "kept", "params before", "params after", "rel. error", "damping"]
        lines += _markdown_table([*header, *(["beta"] if show_beta else []), "note"], self._layer_rows(show_beta))
        if self.refinement:
            lines += ["", "## Block refinement", ""]
            lines += _markdown_table(
                ["block", "steps", "error before", "error after", "kept", "seconds"],
                [
                    [
                        r["block"],
                        str(r["steps"]),
                        _number(r["error_before"], ".4g"),
                        _number(r["error_after"], ".4g"),
                        "yes" if r["kept"] else "no (not better)",
                        _number(r["seconds"], ".2f"),
                    ]
                    for r in self.refinement
                ],
            )
        if images:
            lines += ["", "## Plots", ""] + [f"![{Path(image).stem}]({image})" for image in images]
        return "\n".join(lines) + "\n"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def escape(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]


def control_comparison(treated: CompressionReport, control: CompressionReport, lam: float, control_lam: float) -> dict:
    """The same run with and without the penalty, row by row of the closing table (``control.json``)."""
    names = sorted(set(treated.metric_names()) | set(control.metric_names()))
    rows = []
    for mine, theirs in zip(treated.summary_rows(), control.summary_rows(), strict=False):
        rows.append(
            {
                "model": mine["model"],
                "params": mine["params"],
                "metrics": mine["metrics"],
                "control_metrics": theirs["metrics"],
            }
        )
    sweep = [
        {"method": a.method, "ratio": a.ratio, "metrics": a.metrics, "control_metrics": b.metrics}
        for a, b in zip(treated.sweep, control.sweep, strict=False)
        if (a.method, a.ratio) == (b.method, b.ratio)
    ]
    dense = treated.stage("dense"), control.stage("dense")
    return _finite(
        {
            "lam": lam,
            "control_lam": control_lam,
            "metrics": names,
            "rows": rows,
            "sweep": sweep,
            "dense": [None if d is None else d.metrics for d in dense],
        }
    )


def control_table(comparison: dict) -> Table:
    lam, control = comparison["lam"], comparison["control_lam"]
    table = Table(title=f"with the prehab penalty (λ = {lam:g}) against the control (λ = {control:g}), same run")
    header = ["model", "params"]
    for name in comparison["metrics"]:
        header += [f"{name}, λ = {lam:g}", f"{name}, λ = {control:g}"]
    for column in header:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in _control_cells(comparison):
        table.add_row(*row)
    return table


def control_markdown(comparison: dict) -> str:
    lam, control = comparison["lam"], comparison["control_lam"]
    header = ["model", "params"]
    for name in comparison["metrics"]:
        header += [f"{name}, λ = {lam:g}", f"{name}, λ = {control:g} (control)"]
    lines = [f"# Prehab (λ = {lam:g}) against its control (λ = {control:g})", ""]
    lines += [
        "The same job twice (same seed, data, steps and optimizer); only the penalty weight differs.",
        "",
    ]
    return "\n".join(lines + _markdown_table(header, _control_cells(comparison))) + "\n"


def _control_cells(comparison: dict) -> list[list[str]]:
    cells = []
    for row in comparison["rows"]:
        line = [row["model"], f"{row['params']:,}"]
        for name in comparison["metrics"]:
            line += [_number(row["metrics"].get(name)), _number(row["control_metrics"].get(name))]
        cells.append(line)
    return cells
