"""Compression under DDP: 2 CPU processes (gloo), launched as a script in a subprocess."""

from pathlib import Path

import torch
from conftest import TinyModule, loader_for, run_ddp_script

from prehab.callbacks import AASVD, SAESSVD, SVDLLM

SCRIPT = Path(__file__).parent / "ddp_compress_script.py"


def test_ddp_ranks_identical_and_equal_to_single_process(tmp_path, monkeypatch):
    from prehab import stats

    run_ddp_script(SCRIPT, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == 2
    loader = loader_for("llama", n=32, batch_size=4, seed=5)
    for method, callback in (
        ("saes_svd", SAESSVD),
        ("aa_svd", AASVD),
        ("svd_llm", SVDLLM),
        ("svd_llm_blockwise", SVDLLM),  # block by block under DDP = one process's whole-model pass
        ("svd_llm_tiles", SVDLLM),  # statistics by 5-wide tiles under DDP and in one process
        ("saes_svd_tiles", SAESSVD),  # the two-stream H (upper triangle) and C (all tiles) too
    ):
        monkeypatch.setitem(stats.TILE_WIDTH, "cpu", 5 if method.endswith("_tiles") else 0)
        zero, one = ranks[0]["states"][method], ranks[1]["states"][method]
        lowrank_keys = [k for k in zero if k.endswith(("up.weight", "down.weight"))]
        assert len(lowrank_keys) == 28
        for key in zero:  # bit-identical across ranks
            assert torch.equal(zero[key], one[key]), (method, key)
        single = TinyModule("llama")
        callback(ratio=0.5, calibration_batches=8).compress(single, loader, progress=False)
        reference = single.state_dict()
        for key in lowrank_keys:  # same weights as one process over the union of the shards
            if key.endswith("up.weight"):
                down = key.replace("up.weight", "down.weight")
                torch.testing.assert_close(
                    zero[key] @ zero[down], reference[key] @ reference[down], rtol=1e-4, atol=1e-5
                )
    assert ranks[0]["samples"] == 8 * 4 * 16  # the all-reduced count covers both shards
    zero, one = ranks[0]["states"]["aa_svd_global_refined"], ranks[1]["states"]["aa_svd_global_refined"]
    assert all(torch.equal(zero[key], one[key]) for key in zero)  # refinement steps agree across ranks
    single = TinyModule("llama")
    AASVD(ratio=0.5, calibration_batches=8, rank_allocation="global").compress(single, loader, progress=False)
    shapes = {k: v.shape for k, v in single.state_dict().items()}
    assert {k: v.shape for k, v in zero.items()} == shapes  # the same ranks as one process over all batches
    assert len({v.shape for k, v in zero.items() if k.endswith("down.weight")}) > 2  # heterogeneous ranks


def test_prehab_under_ddp_whitening_identical_and_equal_to_union(tmp_path):
    from conftest import tiny_llama
    from test_module import Bytes

    from prehab.calibration import collect_input_covariances
    from prehab.linalg import damped_cholesky
    from prehab.module import PrehabModule

    run_ddp_script(Path(__file__).parent / "ddp_prehab_script.py", tmp_path)
    ranks = [torch.load(tmp_path / f"prehab_rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]["whitening"]) == 14
    for key, value in ranks[0]["whitening"].items():
        assert torch.equal(value, ranks[1]["whitening"][key]), key
    # Single process over the union of both shards (the first 4 calibration batches), on the initial weights.
    torch.manual_seed(0)
    module = PrehabModule(model=tiny_llama(), lam=0.05, calibration_batches=4)
    targets = {n: module.model.get_submodule(n) for n in module.target_names}
    covariances, _ = collect_input_covariances(
        module.model, targets, Bytes().calibration_dataloader(), 4, progress=False
    )
    for name in module.target_names:
        expected = damped_cholesky(covariances[name]).factor.float()
        torch.testing.assert_close(
            ranks[0]["whitening"]["whitening." + name.replace(".", "__")], expected, rtol=1e-4, atol=1e-5
        )
    # Surgery ran at fit end on the prehab'd weights, identically on both ranks.
    assert ranks[0]["compressed"]["layers_compressed"] == 14
    assert any(k.endswith("mlp.down_proj.up.weight") for k in ranks[0]["state"])
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
