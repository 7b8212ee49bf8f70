"""The inference-latency benchmark's --smoke mode: every setting measured, factors at the right ranks, report."""

import json
import runpy
from pathlib import Path

import torch

from prehab.linalg import rank_from_ratio
from prehab.lowrank import LowRankLinear

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_inference.py"


def test_smoke_mode_times_dense_and_every_ratio(tmp_path):
    main = runpy.run_path(str(BENCH))["main"]
    main(["--smoke", "--ratios", "0.2", "0.6", "--module-calls", "0.6", "--lm-head", "0.6", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    params = results["params"]
    assert list(params) == ["dense", "0.2", "0.6", "0.6 module calls", "0.6 +head"]
    assert params["dense"] > params["0.2"] > params["0.6"] == params["0.6 module calls"]
    # the untied head adds its factors beside the full embedding matrix: 256 x 64 vocab x hidden, rank 19 at 0.6
    assert params["0.6 +head"] == params["0.6"] + rank_from_ratio(256, 64, 0.6) * (256 + 64)
    assert set(results["prefill"]) == {"1x16", "1x16, last logits", "2x16"}
    assert all(t > 0 for times in results["prefill"].values() for t in times.values())
    assert set(results["breakdown_decode"]) == {"dense", "0.2", "0.6", "0.6 module calls", "0.6 +head"}
    # the low-rank head is timed as the LM head, not among the block Linears
    blocks = results["breakdown_decode"]
    assert [s["count"] for s in blocks["0.6 +head"]["per_shape"]] == [s["count"] for s in blocks["0.6"]["per_shape"]]
    text = (tmp_path / "results.md").read_text()
    assert "| 0.6 removed |" in text and "| 0.6 removed, module calls |" in text
    assert "| 0.6 removed, LM head too (untied) |" in text
    assert "Where the time goes, decode" in text


def test_lowrank_copy_is_the_truncated_svd_of_each_block_linear():
    namespace = runpy.run_path(str(BENCH))
    from gpu_check import _random_llama  # benchmarks/ is on sys.path once the script ran

    dense = _random_llama(hidden=32, mlp=64, heads=4, blocks=1, vocab=64, dtype=torch.float32)
    model = namespace["lowrank_copy"](dense, 0.4)
    layer = model.model.layers[0].mlp.down_proj
    original = dense.model.layers[0].mlp.down_proj.weight.detach().double()
    assert isinstance(layer, LowRankLinear) and layer.rank == rank_from_ratio(32, 64, 0.4)
    # Eckart–Young: the rank-r factorization's error is the energy of the discarded singular values.
    singular = torch.linalg.svdvals(original)
    error = torch.linalg.matrix_norm(layer.weight.double() - original) ** 2
    assert torch.allclose(error, (singular[layer.rank :] ** 2).sum(), rtol=1e-4)
    assert isinstance(dense.model.layers[0].mlp.down_proj, torch.nn.Linear)  # the dense model is untouched
