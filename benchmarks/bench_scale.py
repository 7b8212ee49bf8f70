"""Projection to LLaMA-7B, measured (issue 12): each surgery method on a random Llama with LLaMA-7B's block
shapes (hidden 4096, MLP 11008, 32 heads, vocabulary 32000), float32 on this CPU, with 1 and 2 blocks.

Each (method, block count) runs in a fresh process: compression time split as the report splits it
(calibration passes, factorization, allocation), one plain forward over the same calibration set, and the peak
resident memory during ``compress`` above the size just before (the peak is reset through
/proc/self/clear_refs). The per-block cost is the difference between the 2-block and the 1-block run (what
the embedding and the head cost cancels out); the projection to 32 blocks and to a paper's calibration set
scales the calibration part by tokens and the factorization part by blocks only (it does not depend on the
number of tokens):

    python benchmarks/bench_scale.py --threads 2 --out benchmarks/out/scale
    python benchmarks/bench_scale.py --smoke     # tiny shapes, seconds (the test runs it)

One-stream SVD-LLM runs with ``statistics_budget_gb=0`` (block by block) and with the whole-model pass, to show
what the budget buys; ``aa_svd_rerun``/``saes_svd_rerun`` run the two-stream methods without the dense-input cache
(``dense_cache_gb=0``), to show what it saves; ``aa_svd_onepass``/``saes_svd_onepass`` calibrate every group of a
block from one compressed-stream pass (``true_sequential=False``).
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check's random Llama

SHAPES = {"hidden": 4096, "mlp": 11008, "heads": 32, "vocab": 32000}
SMOKE_SHAPES = {"hidden": 64, "mlp": 160, "heads": 4, "vocab": 128}
# Calibration sets of the papers' LLaMA-7B timings: SVD-LLM 256 x 2048 tokens; SAES-SVD 128 x 2048 (its Table
# R3-1: 0.5 h in all for SAES-SVD against 4.1 h for SVD-LLM with its fine-tuning, A6000).
PAPER_TOKENS = {"svd_llm": 256 * 2048, "svd_llm_one_pass": 256 * 2048, "aa_svd": 256 * 2048, "saes_svd": 128 * 2048}
PAPER_TOKENS.update({f"{m}_{v}": PAPER_TOKENS[m] for m in ("aa_svd", "saes_svd") for v in ("rerun", "onepass")})
VARIANTS = (
    "svd_llm",
    "svd_llm_one_pass",
    "aa_svd",
    "saes_svd",
    "aa_svd_rerun",
    "saes_svd_rerun",
    "aa_svd_onepass",
    "saes_svd_onepass",
)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


def child(variant: str, blocks: int, windows: int, seq_len: int, smoke: bool, profile: str | None = None) -> dict:
    """One compression in this process; returns its measurements (``profile``: cProfile ``compress`` into that
    folder as ``{variant}-{blocks}-{tokens}.prof``)."""
    from gpu_check import _random_llama

    from prehab.callbacks import AASVD, SAESSVD, SVDLLM
    from prehab.stats import calibration_forward_context

    shapes = SMOKE_SHAPES if smoke else SHAPES
    model = _random_llama(shapes["hidden"], shapes["mlp"], shapes["heads"], blocks, shapes["vocab"], torch.float32)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(3, shapes["vocab"], (1, seq_len), generator=generator)} for _ in range(windows)
    ]
    with calibration_forward_context(model):
        model(**batches[0])  # warm-up
        tick = time.perf_counter()
        for batch in batches:
            model(**batch)
        forward = time.perf_counter() - tick
    # ridge 0 as in RESULTS §9; blocks named, so a 1-block model runs block by block like the deeper ones (a
    # ModuleList of one block is not found as a repeated stack, and a whole-model pass costs differently)
    options = dict(ratio=0.2, calibration_batches=windows, plots=False, evaluate=False, ridge=0.0,
                   blocks="model.layers")
    callback = {
        "svd_llm": lambda: SVDLLM(**options, statistics_budget_gb=0),
        "svd_llm_one_pass": lambda: SVDLLM(**options, statistics_budget_gb=float("inf")),
        "aa_svd": lambda: AASVD(**options),
        "saes_svd": lambda: SAESSVD(**options),
        # the dense block rerun per layer group (dense_cache_gb=0): the pipeline before the dense-input cache
        "aa_svd_rerun": lambda: AASVD(**options, dense_cache_gb=0),
        "saes_svd_rerun": lambda: SAESSVD(**options, dense_cache_gb=0),
        # one compressed-stream pass per block for all its groups (true_sequential=False, GPTQ's option)
        "aa_svd_onepass": lambda: AASVD(**options, true_sequential=False),
        "saes_svd_onepass": lambda: SAESSVD(**options, true_sequential=False),
    }[variant]()
    Path("/proc/self/clear_refs").write_text("5")  # the peak so far (building the model) does not count
    before = _status("VmRSS")
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    report = callback.compress(model, batches, progress=False)
    if profiler is not None:
        profiler.disable()
        Path(profile).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(Path(profile) / f"{variant}-{blocks}-{windows * seq_len}.prof"))
    return {
        "variant": variant,
        "blocks": blocks,
        "tokens": windows * seq_len,
        "forward_seconds": forward,
        "seconds": report.seconds,
        "peak_extra_mib": (_status("VmHWM") - before) / 2**20,
        "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "torch_threads": torch.get_num_threads(),
    }


def project(rows: list[dict]) -> list[dict]:
    """Per-block costs (2 blocks minus 1 block) and the projection to 32 blocks and the paper's tokens.

    One row per (variant, calibration tokens). With two or more token counts, the per-block calibration is also
    fitted as ``fixed + per_token x tokens`` from the smallest and the largest count: checks, rollback copies and
    allocations do not grow with the calibration set, and scaling them with it (the one-count projection)
    overstates the paper-sized run. ``projected_hours_fitted_32_blocks`` uses that fit."""
    out = []
    calibration = lambda r: r["seconds"]["calibration"] + r["seconds"].get("allocation", 0.0)  # noqa: E731
    for variant in dict.fromkeys(r["variant"] for r in rows):
        per_tokens = []
        for tokens in sorted({r["tokens"] for r in rows if r["variant"] == variant}):
            by_blocks = {r["blocks"]: r for r in rows if r["variant"] == variant and r["tokens"] == tokens}
            if not {1, 2} <= set(by_blocks):
                continue
            one, two = by_blocks[1], by_blocks[2]
            block_calibration = calibration(two) - calibration(one)
            block_solve = two["seconds"]["factorization"] - one["seconds"]["factorization"]
            block_forward = two["forward_seconds"] - one["forward_seconds"]
            scale = PAPER_TOKENS[variant] / tokens
            per_tokens.append(
                {
                    "variant": variant,
                    "tokens": tokens,
                    "block_calibration_s": block_calibration,
                    "block_factorization_s": block_solve,
                    "block_forward_s": block_forward,
                    "calibration_vs_forward": block_calibration / block_forward if block_forward > 0 else None,
                    "peak_extra_mib_1_block": one["peak_extra_mib"],
                    "peak_extra_mib_2_blocks": two["peak_extra_mib"],
                    "paper_tokens": PAPER_TOKENS[variant],
                    "projected_hours_32_blocks": 32 * (block_calibration * scale + block_solve) / 3600,
                }
            )
        if len(per_tokens) >= 2:
            low, high = per_tokens[0], per_tokens[-1]
            per_token = (high["block_calibration_s"] - low["block_calibration_s"]) / (high["tokens"] - low["tokens"])
            fixed = low["block_calibration_s"] - per_token * low["tokens"]
            solve = statistics.fmean(p["block_factorization_s"] for p in per_tokens)
            for p in per_tokens:
                p["block_calibration_fixed_s"] = fixed
                p["block_calibration_per_1k_tokens_s"] = 1000 * per_token
                p["projected_hours_fitted_32_blocks"] = 32 * (fixed + per_token * p["paper_tokens"] + solve) / 3600
        out += per_tokens
    return out


def profile_difference(folder: Path, variant: str, tokens: int, top: int = 15) -> list[dict]:
    """Own time per function of ``compress`` (cProfile), 2 blocks minus 1 block, largest differences first: where
    the per-block time goes. Empty when either profile is missing."""
    paths = [folder / f"{variant}-{blocks}-{tokens}.prof" for blocks in (1, 2)]
    if not all(path.is_file() for path in paths):
        return []
    one, two = (pstats.Stats(str(path)).stats for path in paths)  # {(file, line, name): (cc, nc, tt, ct, callers)}

    def label(key: tuple) -> str:
        file, line, name = key
        return name if file == "~" else f"{Path(file).name}:{line}({name})"

    rows = []
    for key, value in two.items():
        _, calls, own = one.get(key, (0, 0, 0.0))[:3]
        rows.append({"function": label(key), "calls_1": calls, "calls_2": value[1], "own_1_s": own,
                     "own_2_s": value[2], "own_per_block_s": value[2] - own})
    rows.sort(key=lambda r: -r["own_per_block_s"])
    total = {"function": "all functions", "calls_1": sum(v[1] for v in one.values()),
             "calls_2": sum(v[1] for v in two.values()), "own_1_s": sum(v[2] for v in one.values()),
             "own_2_s": sum(v[2] for v in two.values())}
    total["own_per_block_s"] = total["own_2_s"] - total["own_1_s"]
    return rows[:top] + [total]


# Parts of ``compress`` in one profiled run: (label, [(file, function), ...]); each (file, function) counts its
# largest cumulative time among same-named functions (the outer one: an inner namesake's time is inside it).
PASSES = "block passes (forward + statistics hooks)"
STATISTICS = "  of which statistics products (hooks)"
FACTORIZATION = "factorization (solver, report error, checks)"
PARTS = [
    ("capture of the first block's inputs + the layout check (1 batch through every block)",
     [("pipeline.py", "_capture_stack_inputs")]),
    (PASSES, [("pipeline.py", "__call__")]),
    (STATISTICS, [("stats.py", "_observe"), ("pipeline.py", "add")]),
    ("dense-input cache (two streams)", [("pipeline.py", "_record_dense")]),
    ("NaN/Inf checks of the statistics (every caller, the solver's too)", [("base.py", "_check_statistics")]),
    ("rollback copies of the replaced layers", [("rollback.py", "put")]),
    (FACTORIZATION, [("base.py", "solve_group")]),
    ("  of which the report's relative error", [("base.py", "_relative_error")]),
]


def profile_parts(path: Path, blocks: int) -> list[dict]:
    """Cumulative seconds of each :data:`PARTS` entry in one profiled ``compress`` (all from the same run, so
    the machine's load is shared by every part), per block, and against the block passes without statistics."""
    stats = pstats.Stats(str(path)).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    total = max(value[3] for (_, _, name), value in stats.items() if name == "compress")
    out = [{"part": "compress, all", "seconds": total, "per_block_s": total / blocks}]
    for label, functions in PARTS:
        seconds = 0.0
        for file, function in functions:
            matches = [v[3] for (f, _, n), v in stats.items() if n == function and Path(f).name == file]
            seconds += max(matches, default=0.0)
        out.append({"part": label, "seconds": seconds, "per_block_s": seconds / blocks})
    by_label = {r["part"]: r["seconds"] for r in out}
    outside = total - by_label[FACTORIZATION]
    out.insert(1, {"part": "outside the factorization (the report's calibration)", "seconds": outside,
                   "per_block_s": outside / blocks})
    plain = by_label[PASSES] - by_label[STATISTICS]  # the block passes without statistics
    for r in out:
        r["vs_plain_pass"] = r["seconds"] / plain if plain > 0 else None
    return out


def _section(title: str | None, columns: list[str], body: list[str]) -> list[str]:
    """A markdown table (after a blank line and ``title``, when given) with ``columns`` as its header."""
    head = ["", title, ""] if title else []
    return head + ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *body]


def table(rows: list[dict], projection: list[dict], threads: int, profiles: dict[str, list[dict]] | None = None,
          parts: dict[str, list[dict]] | None = None) -> str:
    lines = [f"Measured: random Llama with LLaMA-7B's block shapes, float32, CPU, {threads} torch thread(s).", ""]
    lines += _section(None, ["method", "blocks", "tokens", "plain forward (s)", "calibration (s)",
                             "factorization (s)", "total (s)", "peak extra RSS (MiB)"], [
        f"| {r['variant']} | {r['blocks']} | {r['tokens']:,} | {r['forward_seconds']:.1f} | "
        f"{r['seconds']['calibration'] + r['seconds'].get('allocation', 0.0):.1f} | "
        f"{r['seconds']['factorization']:.1f} | {r['seconds']['total']:.1f} | {r['peak_extra_mib']:,.0f} |"
        for r in rows
    ])
    lines += _section(
        "Per block (2 blocks minus 1 block) and projected to 32 blocks with the paper's calibration tokens:",
        ["method", "tokens", "calibration / block (s)", "/ plain block forward", "factorization / block (s)",
         "paper tokens", "projected hours, 32 blocks, this CPU (calibration scaled by tokens)"], [
            f"| {p['variant']} | {p['tokens']:,} | {p['block_calibration_s']:.1f} | "
            f"{'-' if p['calibration_vs_forward'] is None else format(p['calibration_vs_forward'], '.2f') + 'x'} | "
            f"{p['block_factorization_s']:.1f} | {p['paper_tokens']:,} | {p['projected_hours_32_blocks']:.2f} |"
            for p in projection
        ])
    fitted = {p["variant"]: p for p in projection if "projected_hours_fitted_32_blocks" in p}
    if fitted:
        lines += _section(
            "Per-block calibration fitted as fixed + per-token cost (smallest and largest token count), projected "
            "with only the per-token part scaled:",
            ["method", "fixed / block (s)", "per 1k tokens / block (s)", "projected hours, 32 blocks, this CPU"], [
                f"| {v} | {p['block_calibration_fixed_s']:.1f} | {p['block_calibration_per_1k_tokens_s']:.2f} | "
                f"{p['projected_hours_fitted_32_blocks']:.2f} |"
                for v, p in fitted.items()
            ])
    for variant, functions in (profiles or {}).items():
        lines += _section(
            f"Where {variant}'s per-block time goes: own time per function in ``compress`` (cProfile), 2 blocks "
            "minus 1 block:",
            ["function", "calls, 1 block", "calls, 2 blocks", "own s, 1 block", "own s, 2 blocks", "per block (s)"], [
                f"| `{f['function']}` | {f['calls_1']:,} | {f['calls_2']:,} | {f['own_1_s']:.2f} | "
                f"{f['own_2_s']:.2f} | {f['own_per_block_s']:.2f} |"
                for f in functions
            ])
    for variant, rows_ in (parts or {}).items():
        lines += _section(
            f"Parts of {variant}'s compression in its deepest profiled run (cProfile cumulative time; one run, so "
            "every part ran under the same load):",
            ["part", "seconds", "per block", "/ block pass without statistics"], [
                f"| {r['part']} | {r['seconds']:.1f} | {r['per_block_s']:.1f} | "
                f"{'-' if r['vs_plain_pass'] is None else format(r['vs_plain_pass'], '.2f') + 'x'} |"
                for r in rows_ if r["seconds"] > 0
            ])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[:4]), choices=VARIANTS)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--windows", type=int, nargs="+", default=[4],
                        help="calibration windows; two or more counts also fit each block's calibration as fixed + "
                             "per-token cost")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="folder for rows.json and results.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CI)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile each compression (OUT/profiles/VARIANT-BLOCKS-TOKENS.prof; needs --out) and "
                             "tabulate each function's own time, 2 blocks minus 1 block (first --windows count)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "BLOCKS"), help=argparse.SUPPRESS)
    parser.add_argument("--profile-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile and not args.out:
        parser.error("--profile writes OUT/profiles: pass --out OUT too.")
    if any(w < 1 for w in args.windows):
        parser.error(f"--windows {args.windows} is invalid: use counts >= 1.")
    if args.smoke and not args.child:  # a child gets its windows and sequence length passed
        args.windows, args.seq_len = ([2] if len(args.windows) == 1 else [2, 4]), 16
    if args.child:
        torch.set_num_threads(args.threads)
        row = child(args.child[0], int(args.child[1]), args.windows[0], args.seq_len, args.smoke, args.profile_dir)
        print(json.dumps(row))
        return [row]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = Path(args.out) if args.out else None
    done = {}  # rows of an interrupted run, resumed from rows.jsonl (same threads only)
    if out is not None and (out / "rows.jsonl").exists():
        for line in (out / "rows.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["torch_threads"] == args.threads:
                done[(row["variant"], row["blocks"], row["tokens"])] = row
    rows = []
    for variant, windows, blocks in itertools.product(args.variants, args.windows, args.blocks):
        if (variant, blocks, windows * args.seq_len) in done:
            rows.append(done[(variant, blocks, windows * args.seq_len)])
            continue
        command = [
            sys.executable,
            __file__,
            "--child",
            variant,
            str(blocks),
            "--threads",
            str(args.threads),
            "--windows",
            str(windows),
            "--seq-len",
            str(args.seq_len),
        ]
        if args.smoke:
            command.append("--smoke")
        if args.profile:
            command += ["--profile-dir", str(out / "profiles")]
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"{variant} with {blocks} blocks failed:\n{run.stderr[-3000:]}")
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "rows.jsonl", "a") as log:
                log.write(json.dumps(rows[-1]) + "\n")
    projection = project(rows)
    profiles = {}
    if out is not None and (out / "profiles").is_dir():
        tokens = args.windows[0] * args.seq_len  # the first --windows value's profiles
        profiles = {v: p for v in args.variants if (p := profile_difference(out / "profiles", v, tokens))}
    parts = {}
    for variant in args.variants if out is not None else ():
        deepest = max(args.blocks)
        path = out / "profiles" / f"{variant}-{deepest}-{args.windows[0] * args.seq_len}.prof"
        if path.is_file():
            parts[variant] = profile_parts(path, deepest)
    text = table(rows, projection, args.threads, profiles, parts)
    print(text)
    if out is not None:
        (out / "rows.json").write_text(
            json.dumps({"rows": rows, "projection": projection, "profiles": profiles, "parts": parts,
                        "args": vars(args)}, indent=2)
        )
        (out / "results.md").write_text(text)
    return rows


if __name__ == "__main__":
    main()
