"""The issue-11 GLUE benchmark in its ``--smoke`` mode (tiny random BERT, the real GLUE files cut to a few rows):
every stage runs, the tables are written, and the saved models reload to the numbers in the table."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
from tiny_text_assets import SHARED_DATA

from prehab.evaluation import evaluate_classification
from prehab.lowrank import LowRankLinear, load_compressed

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prehab_glue.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_prehab_glue", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="needs ../shared/data/glue")
def test_smoke_runs_every_stage_and_saved_models_reproduce_the_table(tmp_path, one_thread):
    bench = load_script()
    out = tmp_path / "out"
    flags = ["--smoke", "--out", str(out), "--data", str(SHARED_DATA), "--ridges", "aa_svd:0.1"]
    bench.main(flags)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"heldout", "sweep", "table", "rehab"}
    assert {r["task"] for r in rows} == {"rte", "stsb"}
    assert {r["metric"] for r in rows if r["task"] == "stsb"} == {"spearman"}
    chosen = json.loads((out / "chosen.json").read_text())
    assert set(chosen) == {"rte", "stsb"} and all(c["prehab"] != "control" for c in chosen.values())

    table = [r for r in rows if r["stage"] == "table"]
    for task in ("rte", "stsb"):
        got = {(r["model"], r["method"], r["ratio"]) for r in table if r["task"] == task}
        for ratio in (0.2, 0.6):
            assert {("finetuned", m, ratio) for m in ("svd_llm", "aa_svd", "saes_svd")} <= got
            assert {("control", "svd_llm", ratio), ("stable_rank-0.1", "svd_llm", ratio)} <= got
        # the comparison is at equal size: one parameter count per ratio, below the dense one
        dense = {r["params"] for r in table if r["task"] == task and r["method"] == "dense"}
        for ratio in (0.2, 0.6):
            params = {r["params"] for r in table if r["task"] == task and r["ratio"] == ratio}
            assert len(params) == 1 and params.pop() < min(dense)
        # --ridges: AA-SVD again with ridge 0.1 beside the exact rows; the exact solve minimizes the anchored
        # error on the calibration data, so the ridged one's is at least as large
        exact = {r["ratio"]: r for r in table if (r["task"], r["method"]) == (task, "aa_svd")}
        ridged = {r["ratio"]: r for r in table if (r["task"], r["method"]) == (task, "aa_svd+ridge0.1")}
        assert set(ridged) == set(exact) == {0.2, 0.6} and all(r["ridge"] == 0.1 for r in ridged.values())
        for ratio, r in ridged.items():
            assert r["mean_relative_error"] >= exact[ratio]["mean_relative_error"] * (1 - 1e-6)
            assert r["params"] == exact[ratio]["params"]
    rehab = {(r["task"], r["model"], r["method"]) for r in rows if r["stage"] == "rehab"}
    assert ("rte", "finetuned", "saes_svd") in rehab and ("stsb", "control", "svd_llm") in rehab

    # the saved compressed model reloads to the dev metric in the table
    settings = json.loads((out / "settings.json").read_text())
    runner = bench.Benchmark(argparse.Namespace(**settings["args"]), settings["settings"])
    row = next(
        r for r in table if (r["task"], r["model"], r["method"], r["ratio"]) == ("stsb", "control", "svd_llm", 0.6)
    )
    model = load_compressed(out / "models" / "stsb" / "control" / "svd_llm-0.6")
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    data = runner.data("stsb")
    assert evaluate_classification(model, data.val_dataloader(), data.metrics())["spearman"] == pytest.approx(
        row["score"], abs=1e-5
    )
    from transformers import AutoModelForSequenceClassification

    dense = AutoModelForSequenceClassification.from_pretrained(out / "models" / "rte" / "stable_rank-0.1" / "dense")
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert (out / "models" / "rte" / "finetuned" / "aa_svd-0.6-rehab").is_dir()

    markdown = (out / "results.md").read_text()
    for title in ("Sweep", "Dev metrics, no rehab", "after LoRA rehab", "Table III", "(chosen)", "average"):
        assert title in markdown
    assert (out / "glue_average.png").stat().st_size > 10_000
    assert (out / "rows.csv").read_text().count("\n") == len({r["key"] for r in rows}) + 1

    # resumable: a second run finds every row and adds none
    before = (out / "rows.jsonl").read_text()
    bench.main(flags)
    assert (out / "rows.jsonl").read_text() == before


@pytest.mark.parametrize("value", ["svd:0.1", "aa_svd", "aa_svd:-1", "aa_svd:nan", "aa_svd:0"])
def test_bad_ridges_are_refused_by_name_before_any_work(tmp_path, value, capsys):
    bench = load_script()
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--out", str(tmp_path / "out"), "--ridges", value])
    assert f"--ridges {value!r} is invalid: use METHOD:RIDGE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="needs ../shared/data/glue")
def test_seed_changes_the_fine_tune_and_is_recorded(tmp_path, one_thread):
    """--seed is a second fine-tune seed (new head, data order, dropout): other weights, the same data."""
    import torch
    from safetensors.torch import load_file

    bench = load_script()
    weights = {}
    for seed in (0, 1, 1):
        out = tmp_path / f"seed{seed}-{len(weights)}"
        bench.main(["--smoke", "--out", str(out), "--data", str(SHARED_DATA), "--stages", "finetune",
                    "--seed", str(seed)])
        folder = out / "models" / "rte" / "finetuned" / "dense"
        assert json.loads((folder / "prehab.json").read_text())["seed"] == seed
        weights[(seed, len(weights))] = load_file(folder / "model.safetensors")
    (a, b, c) = weights.values()
    assert a.keys() == b.keys() == c.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # seed 0 vs 1
    assert all(torch.equal(b[k], c[k]) for k in b)  # seed 1 twice: reproducible
    assert "training seed 1" in (tmp_path / "seed1-2" / "results.md").read_text()


def test_seeds_report_averages_each_seed_over_the_tasks_and_differences_per_seed(tmp_path, capsys):
    bench = load_script()

    def run(folder: Path, seed: int, scores: dict[tuple, float]) -> Path:
        folder.mkdir()
        (folder / "settings.json").write_text(json.dumps({"args": {"seed": seed, "paper": "stable_rank:0.1"}}))
        (folder / "chosen.json").write_text(json.dumps({"cola": {"prehab": "stable_rank-0.03"},
                                                        "rte": {"prehab": "stable_rank-0.1"}}))
        rows = [{"key": "|".join(map(str, key)), "stage": key[0], "task": key[1], "model": key[2], "method": key[3],
                 "ratio": key[4], "draw": None if key[3] == "dense" else key[5], "score": score}
                for key, score in scores.items()]
        (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    first = {
        ("table", "cola", "finetuned", "dense", 0.0, 0): 0.30, ("table", "rte", "finetuned", "dense", 0.0, 0): 0.60,
        ("table", "cola", "finetuned", "svd_llm", 0.4, 0): 0.20, ("table", "rte", "finetuned", "svd_llm", 0.4, 0): 0.50,
        ("table", "cola", "finetuned", "svd_llm", 0.4, 1): 0.90,  # another calibration draw: not read
        ("table", "cola", "control", "svd_llm", 0.4, 0): 0.10, ("table", "rte", "control", "svd_llm", 0.4, 0): 0.52,
        # the swept model is per task: stable_rank-0.03 on CoLA, stable_rank-0.1 (the paper's) on RTE
        ("table", "cola", "stable_rank-0.03", "svd_llm", 0.4, 0): 0.26,
        ("table", "cola", "stable_rank-0.1", "svd_llm", 0.4, 0): 0.00,
        ("table", "rte", "stable_rank-0.1", "svd_llm", 0.4, 0): 0.56,
        ("rehab", "cola", "stable_rank-0.03", "svd_llm", 0.4, 0): 0.30,
        ("rehab", "rte", "stable_rank-0.1", "svd_llm", 0.4, 0): 0.60,
        ("rehab", "cola", "control", "svd_llm", 0.4, 0): 0.20, ("rehab", "rte", "control", "svd_llm", 0.4, 0): 0.60,
    }
    second = {key: score - 0.1 for key, score in first.items() if key[:3] != ("rehab", "rte", "control")}
    folders = [run(tmp_path / "s0", 0, first), run(tmp_path / "s3", 3, second)]
    bench.main(["--seeds-report", *map(str, folders), "--out", str(tmp_path / "both")])
    lines = (tmp_path / "both" / "seeds.md").read_text().splitlines()
    assert "| removed | row | seed 0 | seed 3 | mean |" in lines
    assert "| 0% | fine-tuned, dense | 0.450 | 0.350 | 0.400 |" in lines
    assert "| 40% | fine-tuned + SVD-LLM | 0.350 | 0.250 | 0.300 |" in lines
    assert "| 40% | prehab (swept) + SVD-LLM | 0.410 | 0.310 | 0.360 |" in lines
    assert "| 40% | prehab, paper λ + SVD-LLM | 0.280 | 0.180 | 0.230 |" in lines
    assert "| 40% | control (λ = 0) + SVD-LLM | 0.310 | 0.210 | 0.260 |" in lines
    assert "| 40% | control (λ = 0) + SVD-LLM | 0.400 | - | - |" in lines  # after rehab: seed 3 lacks RTE
    assert "| 40% | prehab − control | +0.100 | +0.100 | +0.100 |" in lines
    assert "| 40% | prehab − surgery alone | +0.060 | +0.060 | +0.060 |" in lines
    assert "| 40% | prehab − control, after rehab | +0.050 | - | - |" in lines
    saved = json.loads((tmp_path / "both" / "seeds.json").read_text())
    assert saved["seeds"] == [0, 3] and len(saved["rows"]) == len([x for x in lines if x.startswith("| 40%")]) + 3
    with pytest.raises(SystemExit):
        bench.main(["--seeds-report", str(tmp_path / "missing"), "--out", str(tmp_path / "none")])
    assert f"--seeds-report {tmp_path / 'missing'}: no rows.jsonl there" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
