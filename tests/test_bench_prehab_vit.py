"""The issue-11 ViT benchmark in its ``--smoke`` mode (tiny random ViT; the first Fashion-MNIST images when Debian's
package is installed, random IDX images otherwise): every stage runs, the tables and the spectra are written, and the
saved models reload to the numbers in the table."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from prehab.lowrank import LowRankLinear, load_compressed

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prehab_vit.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_prehab_vit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_runs_every_stage_and_saved_models_reproduce_the_table(tmp_path, one_thread):
    import timm

    bench = load_script()
    out = tmp_path / "out"
    bench.main(["--smoke", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"heldout", "sweep", "table", "rehab"}
    chosen = json.loads((out / "chosen.json").read_text())["prehab"]
    assert set(chosen) == {"nuclear", "stable_rank"}

    table = [r for r in rows if r["stage"] == "table"]
    got = {(r["model"], r["method"], r["ratio"]) for r in table}
    for ratio in (0.2, 0.6):
        assert {
            ("pretrained", "svd", ratio),
            ("pretrained", "svd_llm", ratio),
            ("control", "svd_llm", ratio),
            ("nuclear-0.1", "svd_llm", ratio),
            (chosen["stable_rank"], "svd_llm", ratio),
        } <= got
        params = {r["params"] for r in table if r["ratio"] == ratio and r["method"] == "svd_llm"}
        assert len(params) == 1
    assert all(0 <= r["top1"] <= 100 for r in rows)
    rehab = {(r["model"], r["method"]) for r in rows if r["stage"] == "rehab"}
    assert {("pretrained", "svd"), ("pretrained", "svd_llm"), ("control", "svd_llm")} <= rehab

    # the pretrained and prehab'd models are timm folders; a compressed one reloads to its top-1
    settings = json.loads((out / "settings.json").read_text())
    runner = bench.Benchmark(argparse.Namespace(**settings["args"]), settings["settings"])
    dense = timm.create_model(f"local-dir:{out / 'models' / 'control' / 'dense'}", pretrained=True)
    row = next(r for r in table if (r["model"], r["method"], r["ratio"]) == ("control", "svd_llm", 0.6))
    model = load_compressed(out / "models" / "control" / "svd_llm-0.6", model=dense)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert runner.top1(model, "test") == pytest.approx(row["top1"], abs=1e-4)
    assert (out / "models" / "pretrained" / "svd-0.6-rehab").is_dir()

    spectra = json.loads((out / "spectra.json").read_text())
    assert {"pretrained", "control", "nuclear-0.1"} <= set(spectra)
    layer = next(iter(spectra["pretrained"]))
    sigma = spectra["pretrained"][layer]["sigma"]
    assert len(sigma) == min(spectra["pretrained"][layer]["shape"]) and sigma == sorted(sigma, reverse=True)
    assert (out / "whitened_spectra.png").stat().st_size > 10_000
    assert (out / "vit_top1.png").stat().st_size > 10_000
    markdown = (out / "results.md").read_text()
    for title in ("Sweep", "Test top-1", "Table II", "(chosen)", "+ rehab"):
        assert title in markdown
