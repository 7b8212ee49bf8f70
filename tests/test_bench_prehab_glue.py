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
