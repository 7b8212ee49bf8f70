"""The surgery-core benchmark's --smoke mode: the statistics and report-error parts run and compare like with like."""

import re
import runpy
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_surgery.py"


def test_smoke_mode_statistics_and_report_error(capsys):
    main = runpy.run_path(str(BENCH))["main"]
    main(["--smoke", "--only", "solver", "statistics", "error", "block", "aces"])
    printed = capsys.readouterr().out
    s, x = r"[\d.]+", r"[\d.]+x"  # seconds, ratio
    solver = re.findall(rf"^\| (\d+x\d+) \| \d+ \| {s} \| {s} \| {x} \| {s} \| {x} \| [\d.e+-]+ \| {s} \|$",
                        printed, re.M)
    assert solver == ["64x256", "256x256"]  # the solve with the solver's tiles and with one product each
    statistics = [line for line in printed.splitlines() if re.match(r"\| xᵀ[xy] \| (32|96) \| 16 \|", line)]
    assert len(statistics) == 4
    errors = re.findall(r"\| (\d+)x(\d+) \| \d+ \|.*\| ([\d.]+) / ([\d.]+) / ([\d.]+) \|", printed)
    assert [(o, i) for o, i, *_ in errors] == [("64", "256"), ("256", "64")]
    for *_, before, factors, spectrum in errors:  # the cheaper routes compute the same relative error
        assert 0 < float(spectrum) < 1
        assert abs(float(before) - float(factors)) < 1e-9 and abs(float(before) - float(spectrum)) < 1e-9
    assert re.search(r"\| 64, 160 \| 2 x 16 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| -?[\d.]+x \| -?[\d.]+x \|", printed)
    betas = [float(b) for b in re.findall(r"^\| \d+x\d+ \| 40 \| [\d.]+ \| ([\d.]+) \|$", printed, re.M)]
    assert len(betas) == 2 and all(0.25 <= b <= 0.75 for b in betas)  # ACES's default interval
