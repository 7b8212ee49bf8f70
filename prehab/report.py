"""The compression report: per-layer table, totals, JSON, and a readable rich table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["CompressionReport", "LayerReport"]


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
class CompressionReport:
    method: str
    ratio: float
    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    calibration_samples: int = 0  # rows (tokens/patches) seen per layer
    seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # stage ("dense", method) -> metrics
    comparison: list[dict[str, Any]] = field(default_factory=list)  # other methods run on copies, same ratio

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
        return {
            "method": self.method,
            "ratio": self.ratio,
            "calibration_samples": self.calibration_samples,
            "seconds": self.seconds,
            "totals": self.totals(),
            "metrics": self.metrics,
            "comparison": self.comparison,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def table(self) -> Table:
        show_beta = any(layer.beta is not None for layer in self.layers)
        totals = self.totals()
        caption = (
            f"whole model: {totals['model_params_before']:,} -> {totals['model_params_after']:,} params "
            f"({100 * totals['model_ratio_removed']:.1f}% removed); targeted layers: "
            f"{100 * totals['target_ratio_removed']:.1f}% removed; {self.calibration_samples:,} calibration rows"
        )
        table = Table(
            title=f"prehab compression: {self.method}, ratio {self.ratio:g}", caption=caption, show_footer=True
        )
        columns = ["layer", "shape", "rank", "params before", "params after", "rel. error", "damping"]
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
        for layer in self.layers:
            row = [
                layer.name,
                f"{layer.out_features}x{layer.in_features}",
                "dense" if layer.rank is None else str(layer.rank),
                f"{layer.params_before:,}",
                f"{layer.params_after:,}",
                "-" if layer.relative_error is None else f"{layer.relative_error:.3g}",
                f"{layer.damping:.0e}" if layer.damping else "0",
            ]
            row += ["-" if layer.beta is None else f"{layer.beta:.3f}"] if show_beta else []
            row += [layer.note]
            table.add_row(*row)
        return table

    def print(self, console: Console | None = None) -> None:
        # Layer names are long: never squeeze the table below 140 columns (a log file has no width).
        console = console or Console()
        if console.width < 140:
            console = Console(file=console.file, width=140)
        console.print(self.table())
        if self.metrics or self.comparison:
            console.print(self.metrics_table())

    def metrics_table(self) -> Table:
        """Metrics of the dense model, this method and the compared methods, side by side."""
        rows = (
            [("before prehab", self.model_params_before, None, self.metrics["before_prehab"])]
            if ("before_prehab" in self.metrics)
            else []
        )
        rows.append(("dense", self.model_params_before, None, self.metrics.get("dense", {})))
        rows += [
            (c["method"], c["model_params_after"], c["mean_relative_error"], c["metrics"]) for c in self.comparison
        ]
        rows.append(
            (
                self.method,
                self.model_params_after,
                self.totals()["mean_relative_error"],
                self.metrics.get(self.method, {}),
            )
        )
        names = sorted({k for *_, metrics in rows for k in metrics})
        table = Table(title=f"metrics before and after compression (ratio {self.ratio:g})")
        for column in ["model", "params", "mean rel. error", *names]:
            table.add_column(column, justify="left" if column == "model" else "right")
        for model, params, error, metrics in rows:
            table.add_row(
                model,
                f"{params:,}",
                "-" if error is None else f"{error:.3g}",
                *[f"{metrics[n]:.4g}" if n in metrics else "-" for n in names],
            )
        return table
