"""The issue-10 benchmark script in its ``--smoke`` mode (tiny random Llama, real WikiText-2/PTB/Alpaca files):
every stage runs, the tables are written, and the saved models reload to the numbers in the table."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_text_assets import SHARED_DATA

from prehab.evaluation import perplexity
from prehab.lowrank import LowRankLinear, load_compressed

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prehab_llm.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_prehab_llm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (SHARED_DATA / "ptb").is_dir(), reason="needs ../shared/data")
def test_smoke_runs_every_stage_and_saved_models_reproduce_the_table(tmp_path, one_thread):
    bench = load_script()
    ridges_used = []

    class RecordingAASVD(bench.METHODS["aa_svd"]):  # the ridge each AA-SVD surgery before rehab really ran with
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if kwargs.get("save_dense") is False:  # only the rehab stage's surgeries pass it
                ridges_used.append(self.ridge)

    bench.METHODS["aa_svd"] = RecordingAASVD
    out = tmp_path / "out"
    bench.main(
        [
            "--smoke",
            "--out",
            str(out),
            "--data",
            str(SHARED_DATA),
            "--stages",
            "sweep",
            "table",
            "rehab",
            "calibration",
            "zeroshot",
            "diagnose",
            "tails",
            "ridge",
            "--ridge-models",
            "base",
            "prehab",
            "--ridge-ratios",
            "0.2",
            "0.4",
            "--rehab-methods",
            "svd_llm",
            "aa_svd",
            "--rehab-ridges",
            "aa_svd:0.1",
            "--ridge-size-draws",
            "2",
        ]
    )
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in rows}
    assert {"heldout", "sweep", "test", "table", "rehab", "calibration", "zeroshot", "diagnose"} <= stages
    zeroshot = [r for r in rows if r["stage"] == "zeroshot"]
    assert {r["method"] for r in zeroshot} >= {"dense", "svd_llm", "svd_llm+rehab", "aa_svd+ridge+rehab"}
    assert all(0 <= r[f"{task}/acc"] <= 1 for r in zeroshot for task in ("prehab_rte", "prehab_sst2"))
    chosen = json.loads((out / "chosen.json").read_text())["prehab"]
    assert chosen != "control" and chosen in {r["model"] for r in rows}
    # --rehab-ridges: AA-SVD's surgery before rehab ran with ridge 0.1 for every model, SVD-LLM's without one
    rehab = {(r["model"], r["method"]): r for r in rows if r["stage"] == "rehab"}
    assert set(rehab) == {(m, x) for m in ("base", "control", chosen) for x in ("svd_llm", "aa_svd+ridge")}
    assert all(r.get("ridge", 0.0) == (0.1 if r["method"] == "aa_svd+ridge" else 0.0) for r in rehab.values())
    assert ridges_used == [0.1] * 3 and (out / "models" / "base" / "aa_svd+ridge-0.4-rehab").is_dir()
    # --ridge-sizes' rows (2 windows of 32 tokens in --smoke) on draws 0 and 1, with other windows each
    sized = {r["draw"]: r for r in rows if r["stage"] == "ridge" and r["calibration_tokens"] == 2 * 32}
    assert set(sized) == {0, 1} and sized[0]["wikitext2"] != sized[1]["wikitext2"]

    table = [r for r in rows if r["stage"] == "table"]
    # every model x method x ratio has one row per calibration draw, and the draws differ
    assert {(r["model"], r["method"], r["ratio"]) for r in table if r["draw"] == 1} == {
        (r["model"], r["method"], r["ratio"]) for r in table if r["draw"] == 0
    }
    first = {(r["model"], r["method"], r["ratio"]): r["wikitext2"] for r in table if r["draw"] == 0}
    second = {(r["model"], r["method"], r["ratio"]): r["wikitext2"] for r in table if r["draw"] == 1}
    assert any(abs(first[k] - second[k]) > 1e-6 for k in first)
    # same parameter count for every model at a ratio (the comparison is at equal size), fewer than dense
    dense_params = {r["params"] for r in rows if r["method"] == "dense"}
    for ratio in {r["ratio"] for r in table}:
        params = {r["params"] for r in table if r["ratio"] == ratio}
        assert len(params) == 1 and params.pop() < min(dense_params)

    # the saved compressed model reloads to the perplexity in the table
    row = next(r for r in table if r["model"] == chosen and r["method"] == "svd_llm" and r["draw"] == 0)
    model = load_compressed(out / "models" / chosen / f"svd_llm-{row['ratio']:g}")
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    settings = json.loads((out / "settings.json").read_text())
    windows = bench.Benchmark(argparse.Namespace(**settings["args"]), settings["settings"]).test
    assert perplexity(model, windows, batch_size=2) == pytest.approx(row["wikitext2"], rel=1e-5)
    # the fine-tuned dense models are plain Hugging Face folders
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(out / "models" / chosen / "dense")
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())

    markdown = (out / "results.md").read_text()
    for title in ("Sweep", "Main table", "After LoRA rehab", "Calibration size", "Zero-shot accuracy", "Paired"):
        assert title in markdown
    assert "(chosen)" in markdown and "± " in markdown
    # rehab after AA-SVD with the ridge: prehab / control after rehab, paired on draw 0
    quotient = rehab[(chosen, "aa_svd+ridge")]["ptb"] / rehab[("control", "aa_svd+ridge")]["ptb"]
    line = next(x for x in markdown.splitlines() if x.startswith("| aa_svd+ridge+rehab | 0.4 | 0 | 1 |"))
    assert line.split(" | ")[5].startswith(f"{quotient:.3f} [")
    # the paired quotient: prehab's PTB perplexity over the control's on the same draw, averaged over draws
    ptb = {(r["model"], r["draw"]): r["ptb"] for r in table if r["method"] == "svd_llm" and r["ratio"] == 0.4}
    quotients = [ptb[(chosen, d)] / ptb[("control", d)] for d in (0, 1)]
    line = next(x for x in markdown.splitlines() if x.startswith("| svd_llm | 0.4 | 0 | 2 |"))
    assert line.split(" | ")[5].startswith(f"{sum(quotients) / 2:.3f} [{min(quotients):.3f}, {max(quotients):.3f}]")
    assert (out / "prehab_vs_surgery.png").stat().st_size > 10_000

    # calibration sizes: every method at every size on both draws
    calibration = {(r["method"], r["calibration_tokens"], r["draw"]) for r in rows if r["stage"] == "calibration"}
    assert calibration == {(m, n * 32, d) for m in ("svd_llm", "aa_svd", "saes_svd") for n in (2, 4) for d in (0, 1)}
    # diagnose: the same compression as the calibration stage's (same draw and size: same perplexity) ...
    diagnosed = {(r["method"], r["calibration_tokens"]): r for r in rows if r["stage"] == "diagnose"}
    assert set(diagnosed) == {(m, n * 32) for m in ("aa_svd", "svd_llm") for n in (2, 4)}
    for r in rows:
        same = diagnosed.get((r["method"], r.get("calibration_tokens")))
        if r["stage"] == "calibration" and r["draw"] == 0 and same:
            assert same["wikitext2"] == pytest.approx(r["wikitext2"], rel=1e-6)
    # ... and where nothing upstream is compressed yet (block 0's q/k/v read the same X in both streams) AA-SVD's
    # anchored solution is SVD-LLM's, so their errors on new text agree (with 128 tokens: 64 tokens of a 32-wide
    # model leave XXᵀ so ill-conditioned that the two float paths differ off the data's span)
    layers = {m: {x["name"]: x for x in diagnosed[m, 128]["layers"]} for m in ("aa_svd", "svd_llm")}
    for corpus in ("wikitext2", "ptb"):
        first = layers["svd_llm"]["model.layers.0.self_attn.q_proj"][corpus]
        assert layers["aa_svd"]["model.layers.0.self_attn.q_proj"][corpus] == pytest.approx(first, rel=1e-4)
    assert all(x["wikitext2"] > 0 and x["ptb"] > 0 and x["norm_ratio"] > 0 for x in layers["aa_svd"].values())
    assert "Diagnose" in markdown and (out / "layer_errors.png").stat().st_size > 10_000
    # ridge: every value scored on held-out valid for both two-stream methods; the best one on the test splits
    sweep = [r for r in rows if r["stage"] == "ridge_sweep"]
    assert sorted((r["method"], r.get("ridge", 0.0)) for r in sweep) == sorted(
        (m + ("+ridge" if v else ""), v) for m in ("aa_svd", "saes_svd") for v in (0.0, 1e-3, 1e-2, 1e-1))
    for method in ("aa_svd", "saes_svd"):
        scores = {r.get("ridge", 0.0): r["heldout_valid"] for r in sweep if r["method"].startswith(method)}
        best = min(scores, key=scores.get)
        tested = {(r["model"], r["ratio"], r["draw"], r["calibration_tokens"], r["ridge"]) for r in rows
                  if r["stage"] == "ridge" and r["method"] == method + "+ridge"}
        expected = {(m, ratio, d, 128, best) for m in ("base", chosen) for ratio in (0.2, 0.4) for d in (0, 1)}
        expected |= {("base", 0.2, d, 64, best) for d in (0, 1)}  # --ridge-sizes 2 (smoke), --ridge-size-draws 2
        assert tested == (expected if best else set())
        if best:  # the ridge rows join the paired table: prehab / surgery alone, both with the chosen ridge
            ridged = {(r["model"], r["draw"]): r["ptb"] for r in rows
                      if r["stage"] == "ridge" and r["method"] == method + "+ridge" and r["ratio"] == 0.4}
            quotients = [ridged[(chosen, d)] / ridged[("base", d)] for d in (0, 1)]
            line = next(x for x in markdown.splitlines() if x.startswith(f"| {method}+ridge | 0.4 | 0 | 2 |"))
            assert line.split(" | ")[7].startswith(f"{sum(quotients) / 2:.3f} [{min(quotients):.3f}")
    assert "Ridge (Tikhonov" in markdown
    # tails: one row per saved draw-0 compression of the base model, quantiles in order
    tails = {(r["method"], r["ratio"]): r for r in rows if r["stage"] == "tails"}
    assert set(tails) == {(r["method"], r["ratio"]) for r in table if r["model"] == "base" and r["draw"] == 0}
    for r in tails.values():
        for corpus in ("wikitext2", "ptb"):
            t = r[corpus]
            assert t["hidden_error"] > 0 and t["nll_increase_median"] <= t["nll_increase_p90"] <= t["nll_increase_p99"]
    assert "Where the loss goes" in markdown

    assert (out / "rows.csv").read_text().count("\n") == len({r["key"] for r in rows}) + 1

    # a second fine-tune seed: control and the chosen penalty are fine-tuned again, paired with each other
    bench.main(["--smoke", "--out", str(out), "--data", str(SHARED_DATA), "--stages", "table",
                "--table-methods", "svd_llm", "--finetune-seed", "1"])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    for name in ("control", chosen):
        meta = json.loads((out / "models" / f"{name}-seed1" / "dense" / "prehab.json").read_text())
        assert meta["seed"] == 1
        first = AutoModelForCausalLM.from_pretrained(out / "models" / name / "dense").state_dict()
        second = AutoModelForCausalLM.from_pretrained(out / "models" / f"{name}-seed1" / "dense").state_dict()
        assert any(not first[k].equal(second[k]) for k in first)
    seeded = {(r["model"], r["ratio"]) for r in rows if r["stage"] == "table" and r["model"].endswith("-seed1")}
    assert seeded == {(f"{m}-seed1", ratio) for m in ("control", chosen) for ratio in (0.2, 0.4)}
    ptb = {(r["model"], r["draw"]): r["ptb"] for r in rows if r["stage"] == "table" and r["ratio"] == 0.4
           and r["method"] == "svd_llm"}
    quotients = [ptb[(f"{chosen}-seed1", d)] / ptb[("control-seed1", d)] for d in (0, 1)]
    markdown = (out / "results.md").read_text()
    line = next(x for x in markdown.splitlines() if x.startswith("| svd_llm | 0.4 | 1 | 2 |"))
    assert line.split(" | ")[5].startswith(f"{sum(quotients) / 2:.3f} [{min(quotients):.3f}, {max(quotients):.3f}]")
    assert "fine-tune seed 1" in markdown
    # ... and a line pooling both seeds' (seed, draw) pairs
    quotients += [ptb[(chosen, d)] / ptb[("control", d)] for d in (0, 1)]
    line = next(x for x in markdown.splitlines() if x.startswith("| svd_llm | 0.4 | all | 4 |"))
    assert line.split(" | ")[5].startswith(f"{sum(quotients) / 4:.3f} [{min(quotients):.3f}, {max(quotients):.3f}]")


@pytest.mark.skipif(not (SHARED_DATA / "ptb").is_dir(), reason="needs ../shared/data")
def test_a_new_out_without_a_sweep_fine_tunes_the_penalty_given_by_flag(tmp_path, one_thread):
    bench = load_script()
    out = tmp_path / "out"
    common = ["--smoke", "--out", str(out), "--data", str(SHARED_DATA), "--finetune-seed", "2"]
    flags = [*common, "--stages", "table", "--table-methods", "svd_llm"]  # --smoke: 2 draws, ratios 0.2 and 0.4
    with pytest.raises(SystemExit, match="run the sweep stage first .* or name the penalty with --prehab"):
        bench.main(flags)
    bench.main([*flags, "--prehab", "tail:1:0.4"])
    assert json.loads((out / "chosen.json").read_text())["prehab"] == "tail-1-r0.4"
    meta = json.loads((out / "models" / "tail-1-r0.4-seed2" / "dense" / "prehab.json").read_text())
    assert meta["seed"] == 2 and meta["candidate"] == {"regularizer": "tail", "lam": 1.0, "tail_ratio": 0.4}
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows if r["stage"] == "table"} == {"base", "control-seed2", "tail-1-r0.4-seed2"}
    assert "| svd_llm | 0.4 | 2 | 2 |" in (out / "results.md").read_text()  # prehab / control, paired
    with pytest.raises(SystemExit, match="differs from .*chosen.json's tail-1-r0.4"):
        bench.main([*flags, "--prehab", "stable_rank:0.1"])
    # the paired models only (surgery alone's rows left out), in a new OUT
    paired = tmp_path / "paired"
    bench.main([*flags, "--out", str(paired), "--prehab", "tail:1:0.4", "--table-models", "control", "prehab"])
    rows = [json.loads(line) for line in (paired / "rows.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"control-seed2", "tail-1-r0.4-seed2"}
    assert {r["draw"] for r in rows if r["method"] == "svd_llm"} == {0, 1}
    # rehab on two calibration draws: one row per draw, paired by draw, only draw 0 saved
    rehab_flags = ["--stages", "rehab", "--rehab-methods", "svd_llm", "--rehab-ratios", "0.4", "--rehab-draws", "2"]
    rehab_flags += ["--prehab", "tail:1:0.4", "--rehab-models", "control", "prehab"]
    bench.main([*common, *rehab_flags, "--first-draw", "1"])  # draw 1 only, as a second process would
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["draw"] for r in rows if r["stage"] == "rehab"} == {1}
    bench.main([*common, *rehab_flags])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    rehab = {(r["model"], r["draw"]): r for r in rows if r["stage"] == "rehab"}
    assert set(rehab) == {(m, d) for m in ("control-seed2", "tail-1-r0.4-seed2") for d in (0, 1)}
    assert rehab[("control-seed2", 0)]["wikitext2"] != rehab[("control-seed2", 1)]["wikitext2"]
    assert (out / "models" / "control-seed2" / "svd_llm-0.4-rehab").is_dir()
    quotients = [rehab[("tail-1-r0.4-seed2", d)]["ptb"] / rehab[("control-seed2", d)]["ptb"] for d in (0, 1)]
    line = next(x for x in (out / "results.md").read_text().splitlines()
                if x.startswith("| svd_llm+rehab | 0.4 | 2 | 2 |"))
    assert line.split(" | ")[5].startswith(f"{sum(quotients) / 2:.3f} [{min(quotients):.3f}, {max(quotients):.3f}]")

    # zero-shot: a surgery-only model that was not saved is skipped, or compressed again with --zeroshot-compress
    shutil.rmtree(out / "models" / "control-seed2" / "svd_llm-0.4")
    shutil.rmtree(out / "models" / "control-seed2" / "svd_llm-0.4-rehab")
    zeroshot_flags = ["--stages", "zeroshot", "--prehab", "tail:1:0.4", "--zeroshot-methods", "svd_llm",
                      "svd_llm+rehab", "--zeroshot-tasks", "prehab_mrpc_completion", "--zeroshot-models", "control",
                      "--zeroshot-ratios", "0.4"]
    bench.main([*common, *zeroshot_flags])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    zeroshot = {(r["model"], r["ratio"]): r for r in rows if r["stage"] == "zeroshot"}
    assert set(zeroshot) == set()  # the 0.4 models are not saved any more; 0.2's are left out by --zeroshot-ratios
    bench.main([*common, *zeroshot_flags, "--zeroshot-compress"])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows if r["stage"] == "zeroshot") == ["svd_llm", "svd_llm+rehab"]
    again = next(r for r in rows if r["stage"] == "zeroshot" and r["model"] == "control-seed2" and r["ratio"] == 0.4)
    table = next(r for r in rows if r["stage"] == "table" and r["model"] == "control-seed2" and r["ratio"] == 0.4
                 and r["method"] == "svd_llm" and r["draw"] == 0)
    assert again["recompressed"] and again["params"] == table["params"]
    assert again["mean_relative_error"] == pytest.approx(table["mean_relative_error"], rel=1e-9)  # the same surgery
    assert 0 <= again["prehab_mrpc_completion/acc"] <= 1 and 0 <= again["prehab_mrpc_completion/acc_norm"] <= 1
    again = next(r for r in rows if r["stage"] == "zeroshot" and r["method"] == "svd_llm+rehab")
    assert again["recompressed"] and again["wikitext2"] == pytest.approx(rehab[("control-seed2", 0)]["wikitext2"])
    assert again["ptb"] == pytest.approx(rehab[("control-seed2", 0)]["ptb"])  # the same surgery and rehab
    assert "prehab_mrpc_completion/acc_norm" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prehab", "tail:0:0.4"], "--prehab tail:0:0.4 is invalid: the prehab model needs a penalty"),
        (["--rehab-draws", "0"], "--rehab-draws 0 is invalid"),
        (["--ridge-size-draws", "0"], "--ridge-size-draws 0 is invalid"),
        (["--rehab-models", "prehab-seed2"], "argument --rehab-models: invalid choice: 'prehab-seed2'"),
        (["--table-models", "surgery"], "argument --table-models: invalid choice: 'surgery'"),
        (["--finetune-seed", "-1"], "--finetune-seed -1 is invalid: use 0"),
        (["--zeroshot-methods", "svd-llm"], "argument --zeroshot-methods: invalid choice: 'svd-llm'"),
        (["--ridges", "0", "-0.1"], "--ridges 0.0 -0.1 is invalid: use numbers >= 0"),
        (["--ridges", "nan"], "--ridges nan is invalid"),
        (["--diagnose-sizes", "0"], "--diagnose-sizes [0] is invalid: use window counts >= 1"),
        (["--diagnose-windows", "0"], "--diagnose-windows 0 is invalid"),
        (["--ridge-ratios", "0.2", "40"], "--ridge-ratios [0.2, 40.0] is invalid: use fractions"),
        (["--ratios", "0"], "--ratios [0.0] is invalid: use fractions"),
        (["--zeroshot-ratios", "20"], "--zeroshot-ratios [20.0] is invalid: use fractions"),
        (["--zeroshot-models", "prehab-seed1"], "argument --zeroshot-models: invalid choice: 'prehab-seed1'"),
        (["--ridge-models", "prehab-seed1"], "argument --ridge-models: invalid choice: 'prehab-seed1'"),
        (["--rehab-ridges", "aa_svd:0"], "--rehab-ridges 'aa_svd:0' is invalid: use METHOD:RIDGE"),
        (["--rehab-ridges", "aasvd:0.1"], "--rehab-ridges 'aasvd:0.1' is invalid: use METHOD:RIDGE"),
    ],
)
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        load_script().main(["--smoke", "--out", str(tmp_path / "out"), *flags])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tail_statistics_of_a_model_against_itself_are_zero_and_scale_with_the_error():
    bench = load_script()
    hidden = torch.randn(2, 5, 4, dtype=torch.float64)
    nll = torch.rand(2, 4, dtype=torch.float64)
    same = bench.tail_statistics((hidden, nll), (hidden, nll))
    assert all(value == 0.0 for value in same.values())
    shifted = bench.tail_statistics((hidden, nll), (hidden * 1.1, nll + 0.5))
    assert shifted["hidden_error"] == pytest.approx(0.01) and shifted["hidden_error_median"] == pytest.approx(0.01)
    assert shifted["nll_increase_mean"] == pytest.approx(0.5) and shifted["nll_increase_p99"] == pytest.approx(0.5)
