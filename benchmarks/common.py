"""Pieces shared by the prehab-vs-surgery benchmarks (LLM, GLUE, ViT):
the resumable results store, penalty candidates, mean ± half-range formatting and the saved-models layout."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def default_data() -> str:
    """``$PREHAB_DATA``, else ``../shared/data`` beside the repository."""
    return os.environ.get("PREHAB_DATA") or str(REPO.parent / "shared" / "data")


def default_asset(name: str) -> str | None:
    """``$PREHAB_ASSETS/<name>`` when ``PREHAB_ASSETS`` is set, else None (the config's path is used)."""
    return str(Path(os.environ["PREHAB_ASSETS"]) / name) if os.environ.get("PREHAB_ASSETS") else None


def parse_candidate(text: str) -> dict[str, Any]:
    """``"tail:0.1:0.4"`` -> regularizer tail, λ 0.1, tail_ratio 0.4; ``"stable_rank:0.01"``."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"candidate {text!r}: use regularizer:lam or tail:lam:tail_ratio, e.g. stable_rank:0.1")
    try:
        candidate = {"regularizer": parts[0], "lam": float(parts[1])}
        if len(parts) == 3:
            candidate["tail_ratio"] = float(parts[2])
    except ValueError as error:
        raise SystemExit(f"candidate {text!r}: λ and tail_ratio must be numbers ({error}).") from error
    return candidate


def parse_ridge(parser: argparse.ArgumentParser, flag: str, text: str, methods: Any) -> tuple[str, float]:
    """``"aa_svd:0.1"`` -> ``("aa_svd", 0.1)``; anything else is refused by ``flag``'s name before any work."""
    method, _, value = text.partition(":")
    try:
        ridge = float(value)
    except ValueError:
        ridge = math.nan
    if method not in methods or not (math.isfinite(ridge) and ridge > 0):
        parser.error(f"{flag} {text!r} is invalid: use METHOD:RIDGE with METHOD one of {', '.join(methods)} and "
                     "RIDGE a number > 0, e.g. aa_svd:0.1.")
    return method, ridge


def candidate_name(candidate: dict[str, Any]) -> str:
    """``control`` for λ = 0, else e.g. ``stable_rank-0.1`` or ``tail-0.1-r0.4``."""
    if candidate["lam"] == 0:
        return "control"
    name = f"{candidate['regularizer']}-{candidate['lam']:g}"
    return name + (f"-r{candidate['tail_ratio']:g}" if "tail_ratio" in candidate else "")


class Rows:
    """Results keyed by what produced them, appended to a JSON-lines file as they come (resumable)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        shown = {k: v for k, v in row.items() if k != "key"}
        print(f"[row] {row['key']}: {shown}", flush=True)

    def select(self, **where: Any) -> list[dict[str, Any]]:
        return [r for r in self.rows.values() if all(r.get(k) == v for k, v in where.items())]


def spread(values: list[float], digits: int = 3) -> str:
    """``mean ± half-range (n=k)``; ``-`` for no values."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    half = (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ± {half:.{digits}f} (n={len(values)})"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so that another process sharing the output
    folder (a benchmark split by ``--tasks``) never reads it half-written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import csv

    if not rows:
        return
    fields = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def compress_at_ratios(dense: Any, method: type, ratios: list[float], loader: list) -> Any:
    """Yield ``(ratio, model, totals, seconds)``: a fresh copy of ``dense`` compressed by ``method`` at each ratio,
    one-stream statistics shared by the ratios; the caller measures/saves ``model`` before the next copy is made."""
    import copy
    import time

    shared: dict[str, Any] = {}
    for ratio in ratios:
        model = copy.deepcopy(dense)
        callback = method(ratio=ratio, calibration_batches=len(loader), plots=False)
        started = time.perf_counter()
        report = callback.compress(model, loader, ratio=ratio, shared_statistics=shared, progress=False)
        yield ratio, model, report.totals(), time.perf_counter() - started
        del model
