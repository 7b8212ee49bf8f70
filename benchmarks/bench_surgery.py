"""Surgery-core benchmark: solver time vs a plain SVD, one-stream calibration time vs a plain forward, and the
cost of accumulating one batch's covariance against the bare float32 product.

    python benchmarks/bench_surgery.py            # full sizes (768x3072 and 4096x4096; a few minutes on 2 cores)
    python benchmarks/bench_surgery.py --smoke    # tiny sizes, seconds (what CI could run)
    python benchmarks/bench_surgery.py --only statistics error block aces --threads 1

Prints markdown tables. All ratios are measured in the same run, back to back.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import platform
import time

import torch

from prehab import stats
from prehab.callbacks import SVDLLM
from prehab.linalg import rank_from_ratio, solve_lowrank
from prehab.stats import CovarianceCollector, RunningCovariance, calibration_forward_context


def _timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_solver(shapes: list[tuple[int, int]], ratio: float, repeats: int) -> list[str]:
    """The SVD-LLM solve against a float32 SVD of the weight, with the solver's products tiled (``W L`` skipping
    L's zeros, the Gram matrix on its upper tiles: this machine's default) and as one product each, the two
    interleaved in each repeat (best of ``repeats``), and the largest difference of ``W'`` between them."""
    from prehab import linalg  # here: older versions, run for comparison, have no SOLVER_TILE_WIDTH

    tiled = hasattr(linalg, "SOLVER_TILE_WIDTH")
    rows = [
        "| layer (out x in) | rank | torch.linalg.svd fp32 (s) | SVD-LLM solve, fp64 (s) | ratio "
        "| solve, one product each (s) | tiles / one product | max rel. difference of W' | plain SVD solve (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for out_features, in_features in shapes:
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
        mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5
        x = torch.randn(2 * in_features, in_features, generator=g) @ mix  # correlated inputs, full rank
        covariance = (x.T.double() @ x.double()) / len(x)
        rank = rank_from_ratio(out_features, in_features, ratio)
        t_svd = _timed(lambda w=weight: torch.linalg.svd(w, full_matrices=False), repeats)
        solve = functools.partial(solve_lowrank, weight, rank, whitening=covariance)
        t_solve = t_single = float("inf")
        difference = float("nan")
        for _ in range(repeats):
            t_solve = min(t_solve, _timed(solve))
            if tiled:
                t_single = min(t_single, _timed(functools.partial(_untiled, solve)))
        if tiled:
            approx = [f.up @ f.down for f in (solve(), _untiled(solve))]
            difference = float((approx[0] - approx[1]).abs().max() / approx[1].abs().max())
        t_plain = _timed(lambda w=weight, r=rank: solve_lowrank(w, r), repeats)
        rows.append(
            f"| {out_features}x{in_features} | {rank} | {t_svd:.2f} | {t_solve:.2f} | {t_solve / t_svd:.2f}x "
            f"| {t_single:.2f} | {t_solve / t_single:.2f}x | {difference:.1e} | {t_plain:.2f} |"
        )
    return rows


def _untiled(fn):
    with _solver_tiles(0):
        return fn()


@contextlib.contextmanager
def _solver_tiles(width: int):
    from prehab import linalg

    previous = linalg.SOLVER_TILE_WIDTH.get("cpu", 0)
    linalg.SOLVER_TILE_WIDTH["cpu"] = width
    try:
        yield
    finally:
        linalg.SOLVER_TILE_WIDTH["cpu"] = previous


def bench_calibration(hidden: int, layers: int, batches: int, batch_size: int, seq_len: int) -> list[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=seq_len,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    data = [{"input_ids": torch.randint(3, 4096, (batch_size, seq_len))} for _ in range(batches)]

    def forward_only():
        with calibration_forward_context(model):
            for batch in data:
                model(**batch)

    forward_only()  # warm-up
    t_forward = _timed(forward_only, 2)
    callback = SVDLLM(ratio=0.4, calibration_batches=batches)
    report = callback.compress(copy.deepcopy(model), data, progress=False)
    t_cal, t_fact = report.seconds["calibration"], report.seconds["factorization"]
    params = sum(p.numel() for p in model.parameters())
    return [
        "| model | calibration tokens | plain forward (s) | SVD-LLM calibration (s) | calibration / forward "
        "| factorization (s) | total / forward |",
        "|---|---|---|---|---|---|---|",
        f"| Llama {layers}x{hidden} ({params / 1e6:.1f}M) | {batches * batch_size * seq_len:,} | {t_forward:.2f} "
        f"| {t_cal:.2f} | {t_cal / t_forward:.2f}x | {t_fact:.2f} | {report.seconds['total'] / t_forward:.2f}x |",
    ]


def _bare_products(n: int, data: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    for x, y in data:
        x.mT @ (x if y is None else y)


def _before(n: int, data: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """The accumulation of sessions 1-12, for comparison: a float32 product per batch, a check of the whole
    product for overflow, an add into the float64 sum."""
    total = torch.zeros(n, n, dtype=torch.float64)
    for x, y in data:
        product = x.mT @ (x if y is None else y)
        if not bool(torch.isfinite(product).all()):
            raise AssertionError("not reached with these inputs")
        total += product
    return total


def _running(n: int, data: list[tuple[torch.Tensor, torch.Tensor | None]], tile: int | None = None) -> torch.Tensor:
    """:class:`RunningCovariance` as the callbacks' collectors use it; ``tile`` 0: one product per batch (session
    13), None: the device's default (tiles on the CPU)."""
    with contextlib.nullcontext() if tile is None else stats.tile_width(tile):
        stat = RunningCovariance(n, n, scratch={})
        for x, y in data:
            stat.update(x, y)
        return stat.sum  # a symmetric sum's lower triangle filled in: part of the cost


def bench_statistics(features: list[int], rows: list[int], batches: int, tile: int | None = None) -> list[str]:
    """Per-batch time of ``Σ xᵀx`` (one stream's ``G``, two streams' ``H``) and of ``Σ xᵀy`` (two streams' ``C``)
    over ``batches`` batches of ``rows`` rows: the bare float32 product, the accumulation before session 13,
    :class:`RunningCovariance` with one product per batch (session 13: overflow bound read from the inputs, the
    product written into a reused buffer, added to float64 without a copy) and by tiles (``xᵀx`` on the upper
    triangle, the lower one filled in at the end; ``tile``: their width, None for the CPU's default)."""
    out = [
        "| product | features | rows per batch | alone (ms) | before: + product check + float64 add (ms) | "
        "one product per batch (ms) | tiles (ms) | before / alone | one product / alone | tiles / alone |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    routes = (("bare", _bare_products), ("before", _before), ("single", functools.partial(_running, tile=0)),
              ("tiles", functools.partial(_running, tile=tile)))
    for kind in ("xᵀx", "xᵀy"):
        for n in features:
            for count in rows:
                g = torch.Generator().manual_seed(0)
                data = [(torch.randn(count, n, generator=g), None if kind == "xᵀx" else torch.randn(count, n))
                        for _ in range(batches)]
                times = {name: _timed(lambda fn=fn, n=n, data=data: fn(n, data), 2) / batches * 1e3
                         for name, fn in routes}
                out.append(
                    f"| {kind} | {n} | {count} | {times['bare']:.1f} | {times['before']:.1f} | "
                    f"{times['single']:.1f} | {times['tiles']:.1f} | {times['before'] / times['bare']:.2f}x | "
                    f"{times['single'] / times['bare']:.2f}x | {times['tiles'] / times['bare']:.2f}x |"
                )
    return out


def _report_error_before(weight: torch.Tensor, approx: torch.Tensor, g: torch.Tensor) -> float:
    """The report's relative error before session 13 (one stream): ``tr(W G Wᵀ)``, then ``tr(W G W'ᵀ)`` and
    ``tr(W' G W'ᵀ)``, three ``out x in x in`` products."""
    w = weight.double()
    dense = float((w @ g * w).sum())
    return (dense - 2.0 * float((w @ g * approx).sum()) + float((approx @ g * approx).sum())) / dense


def bench_report_error(shapes: list[tuple[int, int]], ratio: float) -> list[str]:
    """The relative output error each layer's report line carries (one stream, float64): the formula before
    session 13 on ``W' = up @ down``, :func:`output_error_and_energy` on the factors (sessions 13-16), and
    :func:`solver_output_error` from the solver's own spectrum (session 17), beside the solve itself."""
    from prehab.linalg import output_error_and_energy, solver_output_error  # here: --only block runs on old versions

    out = [
        "| layer (out x in) | rank | solve (s) | before: three products (s) | W G + factors (s) | solver spectrum (s) "
        "| spectrum / W G + factors | relative error: three products / factors / spectrum |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for out_features, in_features in shapes:
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(out_features, in_features, generator=g)
        x = torch.randn(2 * in_features, in_features, generator=g, dtype=torch.float64)
        covariance = x.T @ x / len(x)
        rank = rank_from_ratio(out_features, in_features, ratio)
        solve = _timed(lambda w=weight, r=rank, c=covariance: solve_lowrank(w, r, whitening=c))
        factors = solve_lowrank(weight, rank, whitening=covariance)
        before = _timed(lambda f=factors, w=weight, c=covariance: _report_error_before(w, f.up @ f.down, c))
        product = _timed(lambda f=factors, w=weight, c=covariance: output_error_and_energy(w, (f.up, f.down), c))
        spectrum = _timed(lambda f=factors, w=weight: solver_output_error(w, f))
        error, dense = output_error_and_energy(weight, (factors.up, factors.down), covariance)
        fast, fast_dense = solver_output_error(weight, factors)
        reference = _report_error_before(weight, factors.up @ factors.down, covariance)
        out.append(
            f"| {out_features}x{in_features} | {rank} | {solve:.2f} | {before:.2f} | {product:.2f} | {spectrum:.3f} "
            f"| {spectrum / product:.3f}x | {reference:.10f} / {error / dense:.10f} / {fast / fast_dense:.10f} |"
        )
    return out


def bench_block_statistics(hidden: int, mlp: int, heads: int, windows: int, seq_len: int) -> list[str]:
    """One Llama block's forward over ``windows`` batches, bare and with the one-stream statistics hooks
    (:class:`CovarianceCollector` on its 7 Linears, as SVD-LLM block by block): what the statistics add, in block
    forwards."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import _random_llama

    model = _random_llama(hidden, mlp, heads, 1, 128, torch.float32).eval()
    block = model.model.layers[0]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, seq_len, hidden, generator=g) for _ in range(windows)]
    rotary = model.model.rotary_emb(inputs[0], torch.arange(seq_len)[None])
    targets = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    features = {n: m.weight.shape[1] for n, m in targets.items()}

    def bare():
        for x in inputs:
            block(x, position_embeddings=rotary)

    def hooked(tile: int | None = None):
        tiled = tile is not None and hasattr(stats, "tile_width")  # older versions, run for comparison, have none
        with stats.tile_width(tile) if tiled else contextlib.nullcontext():
            collector = CovarianceCollector(targets, features)
            with collector.hooks():
                bare()
            collector.means_()

    with calibration_forward_context(model):
        bare()  # warm-up
        t_bare, t_single, t_hooked = _timed(bare, 2), _timed(lambda: hooked(0), 2), _timed(hooked, 2)
    return [
        "| block (hidden, MLP) | tokens | block forward (s) | with statistics, one product per batch (s) | "
        "with statistics, tiles (s) | statistics / block forward: one product | tiles |",
        "|---|---|---|---|---|---|---|",
        f"| {hidden}, {mlp} | {windows} x {seq_len} | {t_bare:.2f} | {t_single:.2f} | {t_hooked:.2f} | "
        f"{(t_single - t_bare) / t_bare:.2f}x | {(t_hooked - t_bare) / t_bare:.2f}x |",
    ]


def bench_aces(shapes: list[tuple[int, int]], ratio: float) -> list[str]:
    """SAES-SVD's ACES (``aces_beta``: β from the tail surrogate) per layer, float64, on a shifted input pair; run
    it with an older package on the path to compare versions."""
    from prehab.linalg import aces_beta

    out = ["| layer (out x in) | rank | aces_beta (s) | β |", "|---|---|---|---|"]
    for out_features, in_features in shapes:
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(out_features, in_features, generator=g)
        x = torch.randn(2 * in_features, in_features, generator=g, dtype=torch.float64)
        x_hat = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        h, c = x_hat.T @ x_hat / len(x), x.T @ x_hat / len(x)
        rank = rank_from_ratio(out_features, in_features, ratio)
        seconds = _timed(lambda w=weight, h=h, c=c, r=rank: aces_beta(w, h, c, r))
        beta = aces_beta(weight, h, c, rank).beta
        out.append(f"| {out_features}x{in_features} | {rank} | {seconds:.2f} | {beta:.6f} |")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--only", choices=["solver", "calibration", "statistics", "error", "block", "aces"], nargs="+")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.only or ["solver", "calibration", "statistics", "error", "block", "aces"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    if "solver" in parts:
        shapes = [(64, 256), (256, 256)] if args.smoke else [(768, 3072), (2048, 5504), (5504, 2048), (4096, 4096)]
        print("\n## Solver time per layer (float32 weight in, float64 factorization)\n")
        print("\n".join(bench_solver(shapes, 0.4, 1 if args.smoke else 2)))
    if "calibration" in parts:
        sizes = dict(hidden=64, layers=2, batches=4, batch_size=2, seq_len=64)
        if not args.smoke:
            sizes = dict(hidden=512, layers=8, batches=16, batch_size=4, seq_len=256)
        print("\n## One-stream compression vs a plain forward over the same calibration batches\n")
        print("\n".join(bench_calibration(**sizes)))
    if "statistics" in parts:
        print("\n## Accumulating one batch's covariance (float64 result) against the bare float32 product\n")
        if args.smoke:
            print("\n".join(bench_statistics([32, 96], rows=[16], batches=2, tile=16)))
        else:
            print("\n".join(bench_statistics([576, 1536, 4096, 11008], rows=[512, 2048], batches=4)))
    if "error" in parts:
        print("\n## The report's relative output error per layer (one stream, float64)\n")
        shapes = [(64, 256), (256, 64)] if args.smoke else [(576, 1536), (1536, 576), (2048, 2048), (2048, 5504)]
        print("\n".join(bench_report_error(shapes, 0.2)))
    if "block" in parts:
        print("\n## One-stream statistics on one block of LLaMA-7B's shapes (random weights)\n")
        sizes = (64, 160, 4, 2, 16) if args.smoke else (4096, 11008, 32, 4, 512)
        print("\n".join(bench_block_statistics(*sizes)))
    if "aces" in parts:
        print("\n## SAES-SVD's ACES per layer (float64)\n")
        shapes = [(64, 256), (256, 64)] if args.smoke else [(576, 1536), (1536, 576), (2048, 2048), (2048, 5504)]
        print("\n".join(bench_aces(shapes, 0.2)))


if __name__ == "__main__":
    main()
