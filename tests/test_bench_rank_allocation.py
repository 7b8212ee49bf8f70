"""The rank-allocation benchmark's --smoke mode runs every path on a tiny random model."""

import runpy
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_rank_allocation.py"


def test_smoke_mode_compares_uniform_and_global_at_the_same_budget(tmp_path, capsys):
    main = runpy.run_path(str(BENCH))["main"]
    rows = main(
        [
            "--smoke",
            "--ratios",
            "0.4",
            "--weightings",
            "relative",
            "raw",
            "--refine-steps",
            "1",
            "--out",
            str(tmp_path / "rows.json"),
        ]
    )
    assert {(r["method"], r["rank_allocation"], r["weighting"]) for r in rows} == {
        (m, a, w)
        for m in ("svd_llm", "saes_svd")
        for a, w in (("uniform", "-"), ("global", "relative"), ("global", "raw"))
    }
    for method in ("svd_llm", "saes_svd"):
        uniform = next(r for r in rows if r["method"] == method and r["rank_allocation"] == "uniform")
        for row in rows:
            if row["method"] == method:
                assert row["target_params_after"] <= uniform["target_params_after"]
                assert all(v > 1 for v in row["perplexity"].values())
    assert (tmp_path / "rows.json").exists()
    assert "| 0.4 | saes_svd | global | raw |" in capsys.readouterr().out
