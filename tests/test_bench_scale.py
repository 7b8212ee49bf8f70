"""The LLaMA-7B-shape projection benchmark's --smoke mode: subprocess per run, per-block difference, projection."""

import json
import re
import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_scale.py"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_smoke_mode_measures_one_and_two_blocks_and_projects(tmp_path):
    main = runpy.run_path(str(BENCH))["main"]
    rows = main(["--smoke", "--variants", "svd_llm", "aa_svd_rerun", "saes_svd_onepass", "--out", str(tmp_path),
                 "--profile"])
    assert [(r["variant"], r["blocks"]) for r in rows] == [
        ("svd_llm", 1), ("svd_llm", 2), ("aa_svd_rerun", 1), ("aa_svd_rerun", 2),
        ("saes_svd_onepass", 1), ("saes_svd_onepass", 2),
    ]
    for row in rows:
        assert row["peak_extra_mib"] > 0 and row["seconds"]["total"] > 0 and row["tokens"] == 32
    text = (tmp_path / "results.md").read_text()
    assert "| svd_llm | 2 | 32 |" in text and "projected hours" in text
    assert "| svd_llm | " in text.split("projected hours")[1]  # the projection row
    # --profile: each function's own time, 2 blocks minus 1; one truncated SVD per target layer (7 per block)
    profiles = json.loads((tmp_path / "rows.json").read_text())["profiles"]
    assert set(profiles) == {"svd_llm", "aa_svd_rerun", "saes_svd_onepass"}
    assert "Where svd_llm's per-block time goes" in text
    everything = profiles["svd_llm"][-1]
    assert everything["function"] == "all functions" and everything["calls_2"] > everything["calls_1"] > 0
    assert everything["own_2_s"] > everything["own_1_s"] > 0
    assert all(f["calls_2"] >= f["calls_1"] for f in profiles["svd_llm"])
    # and the parts of the 2-block run: every part inside the whole, the passes' statistics inside the passes
    parts = {r["part"]: r for r in json.loads((tmp_path / "rows.json").read_text())["parts"]["svd_llm"]}
    whole = parts["compress, all"]["seconds"]
    passes = parts["block passes (forward + statistics hooks)"]["seconds"]
    assert 0 < parts["  of which statistics products (hooks)"]["seconds"] < passes < whole
    assert 0 < parts["rollback copies of the replaced layers"]["seconds"] < whole
    assert parts["compress, all"]["per_block_s"] == pytest.approx(whole / 2)
    assert "Parts of svd_llm's compression" in text


def test_projection_fits_fixed_plus_per_token_calibration_from_two_token_counts():
    """Hand-made rows: per block 3 s fixed + 2 s per 1k tokens, 100 s factorization; the fit recovers them and
    projects only the per-token part to the paper's tokens."""
    project = runpy.run_path(str(BENCH))["project"]

    def row(blocks: int, tokens: int) -> dict:
        calibration = 5.0 + blocks * (3.0 + 2.0 * tokens / 1000)  # 5 s outside the blocks
        return {"variant": "svd_llm", "blocks": blocks, "tokens": tokens, "forward_seconds": 1.0 + blocks,
                "seconds": {"calibration": calibration, "factorization": 100.0 * blocks}, "peak_extra_mib": 1.0}

    projection = project([row(b, t) for t in (2048, 4096) for b in (1, 2)])
    assert [p["tokens"] for p in projection] == [2048, 4096]
    low, high = projection
    assert low["block_calibration_s"] == pytest.approx(3.0 + 2.0 * 2.048)
    assert high["block_calibration_s"] == pytest.approx(3.0 + 2.0 * 4.096)
    assert low["block_calibration_fixed_s"] == pytest.approx(3.0)
    assert low["block_calibration_per_1k_tokens_s"] == pytest.approx(2.0)
    paper = 256 * 2048
    assert low["projected_hours_fitted_32_blocks"] == pytest.approx(32 * (3.0 + 2.0 * paper / 1000 + 100.0) / 3600)
    # the one-count projection scales the fixed 3 s with the tokens too, so it comes out higher
    assert low["projected_hours_32_blocks"] == pytest.approx(32 * ((3.0 + 4.096) * paper / 2048 + 100.0) / 3600)
    assert low["projected_hours_32_blocks"] > low["projected_hours_fitted_32_blocks"]
    assert "block_calibration_fixed_s" not in project([row(b, 2048) for b in (1, 2)])[0]  # one count: no fit


@pytest.mark.parametrize(
    ("argv", "match"),
    [(["--profile"], "--profile writes OUT/profiles: pass --out OUT too"),
     (["--windows", "4", "0"], r"--windows \[4, 0\] is invalid: use counts >= 1")],
)
def test_bad_flags_are_refused_by_name_before_any_run(argv, match, capsys):
    main = runpy.run_path(str(BENCH))["main"]
    with pytest.raises(SystemExit):
        main(argv)
    assert re.search(match, capsys.readouterr().err)
