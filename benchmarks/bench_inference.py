"""Inference latency of a low-rank model against its dense original: prefill and greedy generation (issue 12, 5).

    python benchmarks/bench_inference.py --model assets/smollm2-135m --threads 2 --out benchmarks/out/inference
    python benchmarks/bench_inference.py --smoke --out /tmp/smoke          # tiny random Llama, seconds

Every block Linear is replaced by a ``LowRankLinear`` at each ``--ratios`` (plain SVD of the weight: latency depends
on the shapes, not on how the factors were found); ``--lm-head`` ratios also factor the LM head, untied from the
input embeddings first (more parameters in all than a tied head, fewer read per token). Measured in one process,
settings interleaved per repeat so machine noise hits all of them alike, median of ``--repeats``:

- prefill: one forward of ``B x --prefill-tokens`` tokens without a KV cache, for each ``--prefill-batches`` B
  (all positions' logits, as for perplexity), and for the first B with the last position's logits only (what
  ``generate`` computes for a prompt: the LM head runs on one token);
- generation: greedy ``generate`` with a KV cache after a ``--prompt-tokens`` prompt; the time per new token is
  ``(T(n) − T(1)) / (n − 1)`` for ``n = --new-tokens``, so the prompt's prefill is not counted;
- where the time goes (``--breakdown``): the model's own block Linears (dense, or the two factor GEMMs), each called
  once in turn on inputs of the same size (so each reads its weights from memory, as in the model), and the LM
  head; the rest (attention, norms, embeddings, the generate loop's Python) is the whole forward minus these.

Writes ``OUT/results.md`` and ``OUT/results.json``; the ratios to dense are the numbers to read.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, default_asset  # noqa: E402

from prehab.linalg import rank_from_ratio, truncated_svd  # noqa: E402
from prehab.lowrank import LowRankLinear, dense_weight, replace_module, untie_output_embeddings  # noqa: E402
from prehab.targets import resolve_targets  # noqa: E402


def lowrank_copy(dense: nn.Module, ratio: float, head: bool = False) -> nn.Module:
    """``dense`` with every default target (block Linears) factorized by plain SVD at ``ratio`` removed; ``head``:
    the LM head too, untied from the input embeddings first (``prehab.untie_output_embeddings``)."""
    model = copy.deepcopy(dense)
    targets = resolve_targets(model)
    if head:
        untie_output_embeddings(model)
        output = model.get_output_embeddings()
        targets.update({name: m for name, m in model.named_modules() if m is output})
    for name, layer in targets.items():
        weight = dense_weight(layer)
        rank = rank_from_ratio(weight.shape[0], weight.shape[1], ratio)
        left, singular, right = truncated_svd(weight, rank)
        root = singular.sqrt()
        replace_module(model, name, LowRankLinear.from_factors(left * root, root[:, None] * right, layer.bias, weight))
    return model.eval()


class _ModuleCallsLowRank(LowRankLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def module_calls(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose LowRankLinears call their factors as modules (no functional fast path)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.__class__ = _ModuleCallsLowRank
    return model


def _synchronize() -> None:
    """Wait for queued GPU work (a CUDA call returns before its kernels finish); nothing on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds(fn: Callable[[], Any]) -> float:
    _synchronize()
    started = time.perf_counter()
    fn()
    _synchronize()
    return time.perf_counter() - started


def interleaved(settings: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable; one warm-up each, then ``repeats`` rounds over all of them in turn."""
    for fn in settings.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, fn in settings.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def block_linears(model: nn.Module) -> dict[tuple[int, int, int | None], list[nn.Module]]:
    """``(in, out, rank or None) -> layers`` of the block Linears (low-rank, else the dense targets), in model order."""
    groups: dict[tuple[int, int, int | None], list[nn.Module]] = {}
    head = model.get_output_embeddings()
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear) and m is not head]
    for layer in lowrank or list(resolve_targets(model).values()):
        if isinstance(layer, LowRankLinear):
            key = (layer.in_features, layer.out_features, layer.rank)
        else:
            out_features, in_features = dense_weight(layer).shape
            key = (in_features, out_features, None)
        groups.setdefault(key, []).append(layer)
    return groups


def layers_time(layers: list[nn.Module], in_features: int, tokens: int, repeats: int) -> float:
    """Median seconds to call each of ``layers`` once, in turn, on ``tokens`` tokens: every call reads its own
    weights, as in the model (one layer looped would keep its weights in cache and flatter small inputs)."""
    x = torch.randn(1, tokens, in_features, device=next(layers[0].parameters()).device)

    def run() -> None:
        for layer in layers:
            layer(x)

    return interleaved({"layers": run}, repeats)["layers"]


def breakdown(models: dict[str, nn.Module], tokens: int, repeats: int, whole: dict[str, float]) -> dict[str, Any]:
    """Seconds in block Linears, the LM head and the rest of one forward of ``tokens`` tokens, per setting."""
    parts = {}
    for name, model in models.items():
        shapes = {
            key: (len(layers), layers_time(layers, key[0], tokens, repeats))
            for key, layers in block_linears(model).items()
        }
        linears = sum(total for _, total in shapes.values())
        head = model.get_output_embeddings()
        head_s = layers_time([head], head.in_features, tokens, repeats) if head is not None else 0.0
        parts[name] = {
            "block_linears": linears,
            "lm_head": head_s,
            "rest": max(0.0, whole[name] - linears - head_s),
            "total": whole[name],
            "per_shape": [
                {"in": i, "out": o, "rank": r, "count": count, "seconds": total / count}
                for (i, o, r), (count, total) in shapes.items()
            ],
        }
    return parts


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    if args.smoke:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from gpu_check import _random_llama

        dense = _random_llama(hidden=64, mlp=128, heads=4, blocks=2, vocab=256, dtype=torch.float32).eval()
        dense.config.tie_word_embeddings = True  # as SmolLM2: the head is the embedding matrix
        dense.lm_head.weight = dense.model.embed_tokens.weight
    else:
        dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    vocab = dense.config.vocab_size
    models = {"dense": dense, **{f"{r:g}": lowrank_copy(dense, r) for r in args.ratios}}
    for ratio in args.module_calls:  # the same factors through two nn.Linear calls (LowRankLinear before its fast path)
        models[f"{ratio:g} module calls"] = module_calls(models.get(f"{ratio:g}") or lowrank_copy(dense, ratio))
    for ratio in args.lm_head:  # the LM head untied and factorized at the same ratio as the blocks
        models[f"{ratio:g} +head"] = lowrank_copy(dense, ratio, head=True)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    device = torch.device(args.device)
    models = {name: m.to(device) for name, m in models.items()}
    generator = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "device": str(device), "params": params,
                               "prefill": {}, "decode": {}}
    with torch.inference_mode():
        for batch in args.prefill_batches:
            ids = torch.randint(3, vocab, (batch, args.prefill_tokens), generator=generator).to(device)
            results["prefill"][f"{batch}x{args.prefill_tokens}"] = interleaved(
                {n: (lambda m=m, ids=ids: m(input_ids=ids, use_cache=False)) for n, m in models.items()}, args.repeats
            )
            if batch == args.prefill_batches[0]:  # what generate's prefill does: logits of the last position only
                results["prefill"][f"{batch}x{args.prefill_tokens}, last logits"] = interleaved(
                    {
                        n: (lambda m=m, ids=ids: m(input_ids=ids, use_cache=False, logits_to_keep=1))
                        for n, m in models.items()
                    },
                    args.repeats,
                )
        prompt = torch.randint(3, vocab, (1, args.prompt_tokens), generator=generator).to(device)

        def generate(model: nn.Module, new: int) -> Callable[[], Any]:
            return lambda: model.generate(
                prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )

        long = interleaved({n: generate(m, args.new_tokens) for n, m in models.items()}, args.repeats)
        short = interleaved({n: generate(m, 1) for n, m in models.items()}, args.repeats)
        results["decode"] = {n: (long[n] - short[n]) / (args.new_tokens - 1) for n in models}
        if args.breakdown:
            ids = torch.randint(3, vocab, (1, args.prefill_tokens), generator=generator).to(device)
            whole = interleaved(
                {n: (lambda m=m, ids=ids: m(input_ids=ids, use_cache=False)) for n, m in models.items()}, args.repeats
            )
            results["breakdown_prefill"] = breakdown(models, args.prefill_tokens, args.repeats, whole)
            results["breakdown_decode"] = breakdown(models, 1, args.repeats, results["decode"])
    return results


def write_report(results: dict[str, Any], args: argparse.Namespace, out: Path, stem: str = "results") -> str:
    """Writes ``OUT/{stem}.md`` and ``OUT/{stem}.json``; returns the markdown."""
    names = list(results["params"])
    command = getattr(args, "command", None) or " ".join(["python benchmarks/bench_inference.py", *sys.argv[1:]])
    lines = [
        f"# Inference latency, low-rank vs dense ({'smoke: random Llama' if args.smoke else args.model}, "
        f"{results['device']}, {results['threads']} CPU threads, median of {args.repeats})",
        "",
        f"Command: `{command}`",
        "",
        "| setting | parameters | "
        + " | ".join(f"prefill {k} (ms, x dense)" for k in results["prefill"])
        + " | decode per token (ms, x dense) |",
        "|---|---:|" + "---:|" * (len(results["prefill"]) + 1),
    ]
    for name in names:
        cells = [f"{results['params'][name] / 1e6:.1f} M"]
        for times in results["prefill"].values():
            cells.append(f"{1e3 * times[name]:.1f} ({times[name] / times['dense']:.2f}x)")
        decode = results["decode"]
        cells.append(f"{1e3 * decode[name]:.2f} ({decode[name] / decode['dense']:.2f}x)")
        ratio, _, variant = name.partition(" ")
        extra = {"": "", "module calls": ", module calls", "+head": ", LM head too (untied)"}[variant]
        label = "dense" if name == "dense" else f"{ratio} removed{extra}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, title in (("breakdown_prefill", f"prefill 1x{args.prefill_tokens}"), ("breakdown_decode", "decode")):
        if key not in results:
            continue
        lines += [
            "",
            f"Where the time goes, {title} (ms; layers timed alone, rest = whole − layers):",
            "",
            "| setting | block Linears | LM head | rest | whole |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, part in results[key].items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{1e3 * part[k]:.2f}" for k in ("block_linears", "lm_head", "rest", "total"))
                + " |"
            )
        dense_shapes = {(s["in"], s["out"]): s["seconds"] for s in results[key]["dense"]["per_shape"]}
        lines += [
            "",
            "One layer alone (µs): dense, and low-rank at each setting (rank, x dense):",
            "",
            "| in x out | count | dense | " + " | ".join(n for n in results[key] if n != "dense") + " |",
            "|---|---:|---:|" + "---:|" * (len(results[key]) - 1),
        ]
        for (i, o), dense_s in dense_shapes.items():
            cells = []
            for name, part in results[key].items():
                if name == "dense":
                    continue
                hit = [s for s in part["per_shape"] if (s["in"], s["out"]) == (i, o)]
                cells.append(
                    f"{1e6 * hit[0]['seconds']:.1f} (r {hit[0]['rank']}, {hit[0]['seconds'] / dense_s:.2f}x)"
                    if hit
                    else "-"
                )
            count = next(s["count"] for s in results[key]["dense"]["per_shape"] if (s["in"], s["out"]) == (i, o))
            lines.append(f"| {i} x {o} | {count} | {1e6 * dense_s:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_asset("smollm2-135m") or str(REPO / "assets" / "smollm2-135m"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "inference"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument(
        "--module-calls",
        type=float,
        nargs="*",
        default=[],
        help="ratios also measured with the factors called as modules (the fast path's control)",
    )
    parser.add_argument(
        "--lm-head",
        type=float,
        nargs="*",
        default=[],
        help="ratios also measured with the LM head untied from the embeddings and factorized at the same ratio",
    )
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--prefill-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true", help="time the Linear layers alone too")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device of the models (e.g. cuda)")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, short sequences (for tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prefill_tokens, args.prefill_batches, args.prompt_tokens = 16, [1, 2], 4
        args.new_tokens, args.repeats, args.breakdown = 4, 2, True
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the time per token is a difference of two runs).")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(write_report(run(args), args, out), flush=True)


if __name__ == "__main__":
    main()
