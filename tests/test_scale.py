"""Issue 12 (scale to 7B-class models): rollback copies off the device, half-precision models, the GPU check script."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_llama

from prehab import LowRankLinear
from prehab.callbacks import AASVD, SAESSVD, SVDLLM
from prehab.rollback import RollbackStore

ROOT = Path(__file__).resolve().parents[1]


def _batches(n=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (4, 16), generator=generator)} for _ in range(n)]


def _snapshot(model):
    """Every state_dict tensor (cloned) and the identity of every parameter object."""
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: id(p) for n, p in model.named_parameters()}


def _assert_identical(model, snapshot):
    state, ids = snapshot
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in after.items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    assert {n: id(p) for n, p in model.named_parameters()} == ids  # the same Parameter objects came back


class _Spy:
    """Wraps RollbackStore.put: after every put, where each stored module's data lives."""

    def __init__(self, monkeypatch):
        self.stores, self.checks = [], []
        original = RollbackStore.put

        def put(store, name, module):
            original(store, name, module)
            if store not in self.stores:
                self.stores.append(store)
            self.checks.append(self.where(store))

        monkeypatch.setattr(RollbackStore, "put", put)

    @staticmethod
    def where(store):
        modules = store._entries  # name -> (module, tensors, copy)
        emptied = all(p.numel() == 0 for module, _, _ in modules.values() for p in module.parameters())
        folder = None if store._dir is None else Path(store._dir.name)
        on_disk = folder is not None and sum(f.stat().st_size for f in folder.iterdir())
        return {"names": list(modules), "emptied": emptied, "bytes_on_disk": on_disk, "folder": folder}


@pytest.mark.parametrize("method", [AASVD, SAESSVD])
def test_failure_at_the_last_block_restores_the_model_bit_identically_from_the_temporary_file(method, monkeypatch):
    model = tiny_llama(num_hidden_layers=3)
    snapshot = _snapshot(model)
    spy = _Spy(monkeypatch)
    original_solve = method.solve_layer

    def failing(self, name, weight, rank, stats):
        if name == "model.layers.2.mlp.down_proj":
            raise RuntimeError("injected solver failure")
        return original_solve(self, name, weight, rank, stats)

    monkeypatch.setattr(method, "solve_layer", failing)
    with pytest.raises(RuntimeError, match="injected solver failure"):
        method(ratio=0.4).compress(model, _batches(), progress=False)
    _assert_identical(model, snapshot)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert model(**_batches(1)[0]).logits.isfinite().all()  # the restored layers work
    # Blocks 0 and 1 (7 layers each) went to the store once done; each time, every module it held was
    # emptied on the device and its bytes were in the temporary file (a CPU model).
    assert len(spy.checks) == 14
    assert spy.checks[6]["names"][-1] == "model.layers.0.mlp.down_proj"
    weights_bytes = {
        n: m.weight.numel() * m.weight.element_size() for n, m in model.named_modules() if n in spy.checks[-1]["names"]
    }
    for check in spy.checks:
        assert check["emptied"]
        assert check["bytes_on_disk"] >= sum(weights_bytes[n] for n in check["names"])
    # The temporary folder is gone, the store is empty.
    assert spy.checks[-1]["folder"] is not None and not spy.checks[-1]["folder"].exists()
    assert all(len(store) == 0 for store in spy.stores)


def test_successful_two_stream_run_removes_the_temporary_folder_and_the_model_works(monkeypatch):
    model = tiny_llama(num_hidden_layers=3)
    spy = _Spy(monkeypatch)
    AASVD(ratio=0.4).compress(model, _batches(), progress=False)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 21
    assert len(spy.checks) == 21 and spy.checks[-1]["emptied"]  # the last block is offloaded too
    assert not spy.checks[-1]["folder"].exists()
    assert model(**_batches(1)[0]).logits.isfinite().all()


def test_sweep_restores_the_dense_layers_from_the_store_between_runs_and_on_failure(monkeypatch):
    batches = _batches()
    torch.manual_seed(0)
    reference = tiny_llama(num_hidden_layers=2)
    SAESSVD(ratio=0.5).compress(reference, batches, progress=False)  # what the sweep's last run must give
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=2)
    snapshot = _snapshot(model)
    spy = _Spy(monkeypatch)
    report = SAESSVD(ratio=0.5, compare=["svd_llm", "aa_svd"]).sweep(model, batches, progress=False)
    assert [(row.method, row.ratio) for row in report.sweep] == [("svd_llm", 0.5), ("aa_svd", 0.5), ("saes_svd", 0.5)]
    for key, value in reference.state_dict().items():  # earlier runs left no trace on the dense model
        assert torch.equal(model.state_dict()[key], value), key
    assert spy.checks and all(check["emptied"] for check in spy.checks)
    assert all(len(store) == 0 for store in spy.stores)
    # A failure in the last run (after one-stream and two-stream runs went through the store): back to dense.
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=2)
    snapshot = _snapshot(model)
    calls = {}
    original_solve = SAESSVD.solve_layer

    def failing(self, name, weight, rank, stats):
        calls[name] = calls.get(name, 0) + 1
        if name == "model.layers.1.self_attn.o_proj":  # block 1 of the last run, after svd_llm's
            raise RuntimeError("injected failure in the last run")
        return original_solve(self, name, weight, rank, stats)

    monkeypatch.setattr(SAESSVD, "solve_layer", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        SAESSVD(ratio=0.5, compare=["svd_llm"]).sweep(model, batches, progress=False)
    assert calls["model.layers.0.mlp.down_proj"] == 1  # block 0 of the last run went through
    _assert_identical(model, snapshot)


@pytest.mark.parametrize("to_disk", [True, False])
def test_rollback_store_round_trip_is_bit_identical_and_atomic(to_disk, monkeypatch):
    module = torch.nn.Linear(12, 5).to(torch.bfloat16)
    module.register_buffer("scale", torch.randn(5, dtype=torch.float64))
    weight, state = module.weight, {k: v.clone() for k, v in module.state_dict().items()}
    store = RollbackStore("cpu", to_disk=to_disk)
    store.put("layer", module)
    assert module.weight.numel() == 0 and module.scale.numel() == 0  # nothing left in memory on the device
    assert (store._dir is not None) == to_disk
    with store.loaded() as modules:
        assert modules["layer"] is module and torch.equal(module.weight, state["weight"])
    assert module.weight.numel() == 0  # offloaded again after the pass
    holder = torch.nn.ModuleDict({"layer": torch.nn.Identity()})
    store.restore(holder)
    assert holder["layer"] is module and module.weight is weight and len(store) == 0
    for key, value in module.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    store.close()
    # A copy that cannot be written leaves the module untouched.
    other = torch.nn.Linear(4, 4)
    before = other.weight.clone()
    if to_disk:
        monkeypatch.setattr("safetensors.torch.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            store.put("other", other)
        assert torch.equal(other.weight, before) and "other" not in store
    assert RollbackStore("cuda:0").to_disk is False and RollbackStore("cpu").to_disk is True
    store.close()


# ------------------------------------------------------------------------------------------ half precision
@pytest.mark.parametrize("method", [SVDLLM, SAESSVD])
def test_bfloat16_llama_keeps_its_dtype(method):
    model = tiny_llama(torch_dtype=torch.bfloat16).to(torch.bfloat16)
    batches = _batches()
    method(ratio=0.4).compress(model, batches, progress=False)
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(lowrank) == 14
    assert {p.dtype for m in lowrank for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = model(**batches[0]).logits
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()


def _overflowing_fp16_llama():
    """float16 Llama whose block-1 MLP up projection outputs ~1e5 > 65504 (finite weights): inf activations."""
    model = tiny_llama().to(torch.float16)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(100.0)
        mlp.up_proj.weight.fill_(1000.0)
        mlp.gate_proj.weight.fill_(1.0)
    assert all(p.isfinite().all() for p in model.parameters())
    return model


@pytest.mark.parametrize("method", [SVDLLM, SAESSVD])
def test_float16_activation_overflow_names_the_layer_and_changes_nothing(method):
    model = _overflowing_fp16_llama()
    snapshot = _snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"'model\.layers\.1\.mlp\.down_proj'.*NaN/Inf.*float16.*65504.*"
        r"Nothing was modified.*bfloat16 or float32",
    ):
        method(ratio=0.4).compress(model, _batches(), progress=False)
    _assert_identical(model, snapshot)  # the two-stream run had swapped block 0 in: put back bit-identically


# ------------------------------------------------------------------------------------------ GPU check script
def test_gpu_check_script_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    import json

    result = json.loads(out.read_text())
    methods = [row["method"] for row in result["rows"]]
    assert methods == ["svd_llm", "aa_svd", "saes_svd", "saes_svd_onepass", "svd_llm_tiles"]
    by_method = {row["method"]: row for row in result["rows"]}  # tiles change float32 rounding, nothing else
    assert abs(by_method["svd_llm_tiles"]["perplexity"] / by_method["svd_llm"]["perplexity"] - 1) < 1e-3
    for row in result["rows"]:
        assert row["seconds"] > 0 and row["vs_forward"] > 0 and row["lowrank_layers"] > 0
    assert "| method |" in done.stdout and result["device"] in done.stdout
    # the inference case: dense, three ratios and 40% with the LM head, prefill and decode timed on the device
    latency = json.loads((tmp_path / "inference.json").read_text())
    assert list(latency["params"]) == ["dense", "0.2", "0.4", "0.6", "0.4 +head"] and latency["device"] == "cpu"
    # decode is a difference of two timings (n tokens minus 1): finite, not always > 0 for a tiny model on a busy CPU
    assert set(latency["decode"]) == set(latency["params"]) and all(map(math.isfinite, latency["decode"].values()))
    assert "| 0.4 removed, LM head too (untied) |" in done.stdout
    # Without CUDA and without --cpu-smoke: a clear message and a non-zero exit.
    refused = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    assert refused.returncode != 0 and "needs CUDA" in refused.stdout + refused.stderr


# ---------------------------------------------------------------------- block-by-block one-stream statistics
def _factors(model):
    return {
        name: (module.up.weight.detach().clone(), module.down.weight.detach().clone())
        for name, module in model.named_modules()
        if isinstance(module, LowRankLinear)
    }


def _assert_same_factors(a, b, rtol=1e-4):
    assert a.keys() == b.keys() and a
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            assert x.shape == y.shape, name
            # Factors are unique up to sign/rotation within equal singular values; their product is not.
        product_a, product_b = a[name][0] @ a[name][1], b[name][0] @ b[name][1]
        assert torch.allclose(product_a, product_b, rtol=rtol, atol=rtol * product_a.abs().max()), name


def _compress_both_ways(model, method, batches, **options):
    """The same compression with every statistic in one pass (default budget) and block by block (budget 0)."""
    import copy

    one_pass, blockwise = copy.deepcopy(model), copy.deepcopy(model)
    reports = [
        method(**options).compress(one_pass, batches, progress=False),
        method(**options, statistics_budget_gb=0).compress(blockwise, batches, progress=False),
    ]
    return one_pass, blockwise, reports


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_block_by_block_svd_llm_gives_the_factors_of_one_whole_model_pass(allocation, monkeypatch):
    import prehab.calibration
    from prehab.callbacks import base

    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=3).eval()
    batches = _batches(n=4)
    passes = []
    original = prehab.calibration.collect_input_covariances
    monkeypatch.setattr(base, "collect_input_covariances", lambda *a, **k: passes.append(1) or original(*a, **k))
    one_pass, blockwise, reports = _compress_both_ways(
        model, SVDLLM, batches, ratio=0.4, calibration_batches=4, rank_allocation=allocation
    )
    assert len(passes) == 1  # only the default run made a whole-model pass
    _assert_same_factors(_factors(one_pass), _factors(blockwise))
    assert [layer.rank for layer in reports[0].layers] == [layer.rank for layer in reports[1].layers]
    assert reports[0].calibration_samples == reports[1].calibration_samples == 4 * 4 * 16
    for a, b in zip(reports[0].layers, reports[1].layers, strict=True):
        assert (a.relative_error is None) == (b.relative_error is None)  # None: kept dense
        assert a.relative_error is None or a.relative_error == pytest.approx(b.relative_error, rel=1e-5, abs=1e-9)
    if allocation == "global":
        assert len({layer.rank for layer in reports[1].layers}) > 2  # heterogeneous ranks


def test_block_by_block_ranks_for_two_stream_global_allocation_match_one_pass():
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=3).eval()
    one_pass, blockwise, reports = _compress_both_ways(
        model, AASVD, _batches(n=3), ratio=0.4, calibration_batches=3, rank_allocation="global"
    )
    assert [layer.rank for layer in reports[0].layers] == [layer.rank for layer in reports[1].layers]
    _assert_same_factors(_factors(one_pass), _factors(blockwise))


def test_block_by_block_runs_encoder_then_decoder_from_the_dense_model():
    from test_reliability_pipeline import _tiny_bart

    torch.manual_seed(0)
    batches = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"])} for b in _batches(3)]
    one_pass, blockwise, reports = _compress_both_ways(_tiny_bart().eval(), SVDLLM, batches, ratio=0.5)
    factors = _factors(blockwise)
    assert len(factors) == 32  # encoder and decoder, cross-attention included
    _assert_same_factors(_factors(one_pass), factors)


def test_block_by_block_failure_at_the_last_block_restores_the_model(monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=3).eval()
    snapshot = _snapshot(model)
    solve = SVDLLM.solve_layer

    def failing(self, name, weight, rank, stats):
        if name.startswith("model.layers.2.mlp"):
            raise RuntimeError("injected failure")
        return solve(self, name, weight, rank, stats)

    monkeypatch.setattr(SVDLLM, "solve_layer", failing)
    spy = _Spy(monkeypatch)
    with pytest.raises(RuntimeError, match="injected failure"):
        SVDLLM(ratio=0.4, statistics_budget_gb=0).compress(model, _batches(), progress=False)
    assert spy.checks and spy.checks[-1]["bytes_on_disk"]  # earlier blocks' dense layers had gone to the file
    _assert_identical(model, snapshot)


def test_block_by_block_falls_back_to_one_pass_with_a_warning_when_targets_leave_the_blocks():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    with pytest.warns(UserWarning, match="outside a repeated block list, so they are collected in one pass"):
        report = SVDLLM(ratio=0.4, targets=[r"layers\.\d+\.mlp", "lm_head"], statistics_budget_gb=0).compress(
            model, _batches(), progress=False
        )
    assert any(layer.name == "lm_head" and layer.rank for layer in report.layers)


@pytest.mark.parametrize("budget", [-1, "2", float("nan")])
def test_bad_statistics_budget_is_refused(budget):
    with pytest.raises(ValueError, match=r"statistics_budget_gb=.* is invalid: use a number of GiB >= 0"):
        SVDLLM(statistics_budget_gb=budget)


def _peak_extra_mib(method: str, blocks: int) -> float:
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "memory_scale_script.py"), method, str(blocks)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["extra_mib"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
@pytest.mark.parametrize("method", ["svd_llm", "aa_svd", "saes_svd"])
def test_peak_extra_memory_does_not_grow_with_depth(method):
    # 16 blocks of hidden 256 / MLP 1024: all statistics at once would take ~150 MiB more than 4 blocks'
    # (measured: one-pass SVD-LLM 103 -> 252 MiB); one block's at a time do not grow.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # two processes side by side: each measures its own peak
        four, sixteen = pool.map(_peak_extra_mib, [method, method], [4, 16])
    assert sixteen <= 1.5 * four, (four, sixteen)


def test_block_by_block_ratio_sweep_ends_at_the_last_ratio_and_allocates_once():
    batches = _batches()
    torch.manual_seed(0)
    reference = tiny_llama(num_hidden_layers=2)
    SVDLLM(ratio=0.5, rank_allocation="global").compress(reference, batches, progress=False)
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=2)
    callback = SVDLLM(ratios=[0.3, 0.5], rank_allocation="global", statistics_budget_gb=0, compare=["aa_svd"])
    report = callback.sweep(model, batches, progress=False)
    assert [(row.method, row.ratio) for row in report.sweep] == [
        ("aa_svd", 0.3),
        ("aa_svd", 0.5),
        ("svd_llm", 0.3),
        ("svd_llm", 0.5),
    ]
    _assert_same_factors(_factors(model), _factors(reference))  # earlier runs restored, then block by block
