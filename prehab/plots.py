"""PNG plots of a run report (matplotlib, headless): metric per stage, metric vs ratio, per-layer rank and
error, whitened singular-value spectra before and after prehab."""

from __future__ import annotations

import math
import re
from pathlib import Path

from prehab.report import CompressionReport

__all__ = ["save_control_plot", "save_plots"]

LOWER_IS_BETTER = ("perplexity", "loss")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps a user's interactive backend if one is set
    import matplotlib.pyplot as plt

    return plt


def _log_scale(name: str, values: list[float]) -> bool:
    positive = [v for v in values if v is not None and v > 0]
    return any(key in name for key in LOWER_IS_BETTER) and len(positive) > 1 and max(positive) / min(positive) > 10


def save_plots(report: CompressionReport, folder: str | Path) -> list[Path]:
    """Write the plots that have data; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = []
    for name, draw in (
        ("stages", _stages),
        ("ratios", _ratios),
        ("layers", _layers),
        ("allocation", _allocation),
        ("spectra", _spectra),
    ):
        figure = draw(plt, report)
        if figure is None:
            continue
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def _stages(plt, report: CompressionReport):
    """Each metric across the stages (before prehab, after prehab, surgery, rehab) and the other compressions."""
    names = report.metric_names()
    rows = [r for r in report.summary_rows() if r["metrics"]]
    if not names or not rows:
        return None
    figure, axes = plt.subplots(1, len(names), figsize=(max(6, 1.1 * len(rows)) * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        values = [r["metrics"].get(name, math.nan) for r in rows]
        bars = axis.bar(range(len(rows)), values, color="tab:blue")
        axis.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=8)
        axis.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=30, ha="right", fontsize=8)
        axis.set_ylabel(name)
        if _log_scale(name, values):
            axis.set_yscale("log")
        axis.set_title(f"{name} after each stage")
    return figure


def _ratios(plt, report: CompressionReport):
    """Each metric against the fraction of parameters removed, one line per method (the papers' tables)."""
    names = report.metric_names()
    if len(report.ratios) < 2 or not names:
        return None
    figure, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    dense = report.stage("dense")
    for axis, name in zip(axes[0], names, strict=True):
        values = []
        for method in dict.fromkeys(row.method for row in report.sweep):
            rows = sorted((r for r in report.sweep if r.method == method and name in r.metrics), key=lambda r: r.ratio)
            values += [r.metrics[name] for r in rows]
            axis.plot([r.ratio for r in rows], [r.metrics[name] for r in rows], marker="o", label=method)
        if dense is not None and name in dense.metrics:
            axis.axhline(dense.metrics[name], color="gray", linestyle="--", label="dense")
            values.append(dense.metrics[name])
        axis.set_xlabel("fraction of targeted parameters removed")
        axis.set_ylabel(name)
        if _log_scale(name, values):
            axis.set_yscale("log")
        axis.legend()
        axis.set_title(f"{name} vs ratio")
    return figure


def _short(name: str) -> str:
    """``model.model.layers.3.self_attn.q_proj`` -> ``3.self_attn.q_proj``."""
    match = re.search(r"(\d+\..*)$", name)
    return match.group(1) if match else name


def _layers(plt, report: CompressionReport):
    """Kept fraction of parameters and relative output error of every targeted layer."""
    layers = report.layers
    if not layers:
        return None
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.18 * len(layers)), 6), sharex=True)
    x = range(len(layers))
    kept = [layer.params_after / layer.params_before if layer.params_before else 1.0 for layer in layers]
    top.bar(x, kept, color=["tab:gray" if layer.rank is None else "tab:blue" for layer in layers])
    top.set_ylabel("kept fraction of params")
    top.set_title(f"{report.method}: rank per layer (gray: kept dense)")
    for index, layer in enumerate(layers):
        if layer.rank is not None and len(layers) <= 64:
            top.text(index, kept[index], str(layer.rank), ha="center", va="bottom", fontsize=6)
    errors = [layer.relative_error for layer in layers]
    if any(e is not None for e in errors):
        bottom.bar(x, [e if e is not None else 0.0 for e in errors], color="tab:red")
        if any(e is not None and e > 0 for e in errors):
            bottom.set_yscale("log")
    bottom.set_ylabel("relative output error")
    bottom.set_xticks(list(x), [_short(layer.name) for layer in layers], rotation=90, fontsize=6)
    return figure


def _allocation(plt, report: CompressionReport):
    """Kept fraction by block (columns) and layer type (rows), for a global rank allocation."""
    if report.rank_allocation != "global":
        return None
    cells: dict[tuple[str, int], float] = {}
    for layer in report.layers:
        match = re.search(r"(?:^|\.)(\d+)\.(.+)$", layer.name)
        if match and layer.params_before:
            cells[(match.group(2), int(match.group(1)))] = layer.params_after / layer.params_before
    if not cells:
        return None
    kinds = list(dict.fromkeys(kind for kind, _ in cells))
    blocks = sorted({block for _, block in cells})
    grid = [[cells.get((kind, block), math.nan) for block in blocks] for kind in kinds]
    figure, axis = plt.subplots(figsize=(max(6, 0.3 * len(blocks) + 3), max(2.5, 0.4 * len(kinds) + 1.5)))
    image = axis.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axis.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    axis.set_yticks(range(len(kinds)), kinds, fontsize=7)
    axis.set_xlabel("block")
    figure.colorbar(image, ax=axis, label="kept fraction of params (1: dense)")
    axis.set_title(f"{report.method}: global rank allocation at ratio {report.ratio:g}")
    return figure


def _spectra(plt, report: CompressionReport):
    """Whitened singular values σ_i(W L)/σ_1 of a few layers, before and after prehab, with the kept rank."""
    spectra = report.spectra
    if not spectra:
        return None
    figure, axes = plt.subplots(1, len(spectra), figsize=(4.5 * len(spectra), 3.6), squeeze=False)
    for axis, (name, curves) in zip(axes[0], spectra.items(), strict=True):
        for key, style in (("before_prehab", "tab:gray"), ("after_prehab", "tab:blue")):
            values = curves.get(key)
            if values:
                top = values[0] or 1.0
                axis.semilogy(range(1, len(values) + 1), [max(v / top, 1e-12) for v in values], color=style, label=key)
        if curves.get("rank"):
            axis.axvline(curves["rank"], color="tab:red", linestyle="--", label=f"kept rank {curves['rank']}")
        axis.set_title(_short(name), fontsize=9)
        axis.set_xlabel("index i")
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("σ_i / σ_1 of W L")
    return figure


def save_control_plot(comparison: dict, path: str | Path) -> Path | None:
    """Each metric against the ratio, per method, with the penalty (solid) and in the control run (dashed)."""
    names, sweep = comparison["metrics"], comparison["sweep"]
    if not names or not sweep:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lam, control = comparison["lam"], comparison["control_lam"]
    for axis, name in zip(axes[0], names, strict=True):
        values = []
        for index, method in enumerate(dict.fromkeys(row["method"] for row in sweep)):
            rows = sorted((r for r in sweep if r["method"] == method), key=lambda r: r["ratio"])
            for key, style, label in (("metrics", "-", f"λ = {lam:g}"), ("control_metrics", "--", f"λ = {control:g}")):
                points = [(r["ratio"], r[key][name]) for r in rows if r[key].get(name) is not None]
                values += [v for _, v in points]
                if points:
                    ratios, metric = zip(*points, strict=True)
                    color = colors[index % len(colors)]
                    axis.plot(ratios, metric, style, marker="o", color=color, label=f"{method}, {label}")
        axis.set_xlabel("fraction of targeted parameters removed")
        axis.set_ylabel(name)
        if _log_scale(name, values):
            axis.set_yscale("log")
        axis.legend(fontsize=7)
        axis.set_title(f"{name}: prehab (solid) vs control (dashed)")
    path = Path(path)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
