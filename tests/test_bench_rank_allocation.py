"""The rank-allocation benchmark's --smoke mode runs every path on a tiny random model."""

import runpy
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_rank_allocation.py"


def test_smoke_mode_compares_uniform_and_global_at_the_same_budget(tmp_path, capsys):
    main = runpy.run_path(str(BENCH))["main"]
    args = "--smoke --ratios 0.4 --weightings equal raw --refine-steps 1 --draws 2 --out".split()
    rows = main([*args, str(tmp_path / "out")])
    variants = {(r["method"], r["rank_allocation"], r["weighting"], r["refine_steps"]) for r in rows}
    expected = {
        (m, a, w, 0)
        for m in ("svd_llm", "saes_svd")
        for a, w in (("uniform", "-"), ("global", "equal"), ("global", "raw"))
    }
    # Refinement: on top of the last allocation, two-stream methods only.
    assert variants == expected | {("saes_svd", "global", "raw", 1)}
    assert len(rows) == 2 * len(variants)  # every variant on both calibration draws
    for method in ("svd_llm", "saes_svd"):
        for draw in (0, 1):
            mine = [r for r in rows if r["method"] == method and r["draw"] == draw]
            uniform = next(r for r in mine if r["rank_allocation"] == "uniform")
            for row in mine:
                assert row["target_params_after"] <= uniform["target_params_after"]
                assert all(v > 1 for v in row["perplexity"].values())
    out = capsys.readouterr().out
    assert "| 0.4 | saes_svd | global | raw | 1 |" in out
    assert "| 0.4 | saes_svd | global | raw | 1 (lr 0.0003) |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "results.md").read_text() in out
    # Resumable: a second run computes nothing and gives the same rows; --report-only never computes.
    again = main([*args, str(tmp_path / "out")])
    assert len(main([*args[:-1], "--ratios", "0.2", "--out", str(tmp_path / "out"), "--report-only"])) == 0
    assert [r["perplexity"] for r in again] == [r["perplexity"] for r in rows]
    assert "[row]" not in capsys.readouterr().out
