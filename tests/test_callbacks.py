"""The compression callbacks inside a real Trainer, on tiny Llama / GPT-2 (Conv1D) / BERT / timm ViT."""

import copy
import csv
import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyModule, fast_trainer, loader_for
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers.pytorch_utils import Conv1D

from prehab import LowRankLinear
from prehab.calibration import CalibrationForwardError
from prehab.callbacks import AASVD, SAESSVD, SVD, SVDLLM, LowRankCompression
from prehab.linalg import output_error_and_energy, rank_from_ratio

EXPECTED_TARGETS = {"llama": 14, "gpt2": 8, "bert": 12, "vit": 8}


def _outputs(module, loader):
    with torch.no_grad():
        module.eval()
        return torch.cat(
            [
                module.calibration_step(b).float().reshape(len(b["input_ids"] if isinstance(b, dict) else b[0]), -1)
                for b in loader
            ]
        )


def _dense_linears(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear | Conv1D)}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "vit"])
def test_svd_llm_in_trainer_compresses_every_block_linear(kind, tmp_path):
    module = TinyModule(kind)
    before = {
        n: (m.weight.shape if isinstance(m, nn.Linear) else m.weight.shape[::-1])
        for n, m in _dense_linears(module).items()
    }
    params_before = sum(p.numel() for p in module.parameters())
    callback = SVDLLM(ratio=0.5, calibration_batches=4)
    trainer = fast_trainer(tmp_path, [callback], logger=CSVLogger(tmp_path, name="logs"))
    trainer.fit(module, train_dataloaders=loader_for(kind))

    lowrank = {n: m for n, m in module.named_modules() if isinstance(m, LowRankLinear)}
    assert len(lowrank) == EXPECTED_TARGETS[kind]
    blocks = {
        "llama": "model.model.layers.",
        "gpt2": "model.transformer.h.",
        "bert": "model.bert.encoder.layer.",
        "vit": "model.blocks.",
    }[kind]
    assert all(n.startswith(blocks) for n in lowrank)
    assert not any(isinstance(m, LowRankLinear) for n, m in module.named_modules() if not n.startswith(blocks))
    for name, layer in lowrank.items():
        out_features, in_features = before[name]
        assert (layer.out_features, layer.in_features) == (out_features, in_features)
        assert layer.rank == rank_from_ratio(out_features, in_features, 0.5)
    report = callback.report
    totals = report.totals()
    assert totals["layers_compressed"] == len(lowrank)
    removed = sum(r.params_before - r.params_after for r in report.layers)
    assert totals["model_params_before"] == params_before
    assert totals["model_params_after"] == sum(p.numel() for p in module.parameters()) == params_before - removed
    assert 0.5 <= totals["target_ratio_removed"] < 0.56  # floor() rounds ranks down: at least `ratio` removed
    assert all(0 <= r.relative_error < 1 for r in report.layers)
    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["compression/model_params_after"]) == totals["model_params_after"]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "vit"])
def test_svd_llm_beats_plain_svd_on_calibration_data(kind):
    torch.manual_seed(0)
    base = TinyModule(kind)
    fast_trainer(max_steps=30).fit(base, train_dataloaders=loader_for(kind))  # give weights some structure
    loader = loader_for(kind, n=32, seed=1)
    dense = _outputs(base, loader)
    errors, reports = {}, {}
    for method in (SVD, SVDLLM):
        module = copy.deepcopy(base)
        reports[method.method] = method(ratio=0.5, calibration_batches=4).compress(module, loader, progress=False)
        errors[method.method] = float((_outputs(module, loader) - dense).norm() / dense.norm())
    # Layer-wise, SVD-LLM is the optimum of the very error the report measures.
    for plain, whitened in zip(reports["svd"].layers, reports["svd_llm"].layers, strict=True):
        assert whitened.relative_error <= plain.relative_error + 1e-9
    assert errors["svd_llm"] < errors["svd"], errors


@pytest.mark.parametrize(
    ("method", "options", "spectrum_route"),
    [(SVDLLM, {}, True), (SVDLLM, {"ridge": 0.1}, True), (AASVD, {}, True), (AASVD, {"ridge": 0.0}, True),
     (SAESSVD, {}, False), (SVDLLM, {"propagate": True}, False)],
    ids=["svd_llm", "svd_llm-ridge", "aa_svd-ridge", "aa_svd", "saes_svd", "svd_llm-propagate"],
)
def test_report_error_from_the_solver_spectrum_matches_the_covariance_formula(
    method, options, spectrum_route, monkeypatch
):
    """Where the solver factored the report's statistics (SVD-LLM on G, AA-SVD on H and C, each with or without a
    ridge), the report's error comes from the solver's spectrum instead of the ``out x in x in`` covariance
    formula; it must equal that formula on every layer. SAES-SVD's mixed cross term and SVD-LLM's propagated
    whitening are other objectives: they keep the formula."""
    import prehab.callbacks.base as base

    spectrum_calls, checked = [], []
    spectrum = base.solver_output_error
    monkeypatch.setattr(base, "solver_output_error", lambda *a: spectrum_calls.append(1) or spectrum(*a))
    relative_error = LowRankCompression._relative_error

    def both(self, weight, factors, stats, dense_energy=None, solver_stats=None):
        error = relative_error(self, weight, factors, stats, dense_energy, solver_stats)
        dense = None if "G" in stats else dense_energy
        slow, energy = output_error_and_energy(
            weight, (factors.up, factors.down), stats.get("G"), stats.get("C"), stats.get("H"), dense=dense
        )
        checked.append((error, max(slow, 0.0) / energy))
        return error

    monkeypatch.setattr(LowRankCompression, "_relative_error", both)
    module = TinyModule("llama")
    fast_trainer(max_steps=10).fit(module, train_dataloaders=loader_for("llama"))
    method(ratio=0.5, calibration_batches=2, **options).compress(module, loader_for("llama", seed=1), progress=False)
    assert len(checked) == EXPECTED_TARGETS["llama"]
    assert len(spectrum_calls) == (len(checked) if spectrum_route else 0)
    for error, slow in checked:
        # G, where a two-stream group has it, and the dense block's outputs give ‖WX‖² to float32 round-off
        assert error == pytest.approx(slow, rel=1e-5, abs=1e-12)
        assert 0.0 < error < 1.0


@pytest.mark.parametrize(
    ("method", "options"),
    [
        (SVDLLM, {}),  # one stream, every layer's G collected at once
        (SVDLLM, {"statistics_budget_gb": 0.0}),  # one stream, block by block
        (AASVD, {}),  # two streams, H and C with the default ridge
        (SAESSVD, {}),  # two streams, ACES's β search and the solve from one factor
    ],
)
def test_layers_sharing_statistics_share_one_cholesky_factor(method, options, monkeypatch):
    """q/k/v and gate/up read one input: its covariance is factored once per group (4 factors per Llama block,
    not 7), and the compressed model is the very one that factoring per layer gives."""
    import contextlib

    import prehab.callbacks.base as base
    from prehab import linalg

    factored = []
    uncached = linalg._damped_cholesky
    monkeypatch.setattr(linalg, "_damped_cholesky", lambda *a: factored.append(1) or uncached(*a))
    module = TinyModule("llama")
    fast_trainer(max_steps=10).fit(module, train_dataloaders=loader_for("llama"))
    results = []
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(base, "reused_cholesky", contextlib.nullcontext)
        factored.clear()
        compressed = copy.deepcopy(module)
        method(ratio=0.5, calibration_batches=2, plots=False, **options).compress(
            compressed, loader_for("llama", seed=1), progress=False
        )
        results.append((len(factored), compressed.state_dict()))
    (with_reuse, reused), (per_layer, separate) = results
    assert (with_reuse, per_layer) == (4 * 2, EXPECTED_TARGETS["llama"])
    assert reused.keys() == separate.keys()
    for key in reused:
        assert torch.equal(reused[key], separate[key]), key


class DropInTransformer(pl.LightningModule):
    """A user's own small transformer classifier: no Hugging Face, no prehab."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0) for _ in range(2)
        )
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class DropInMLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_drop_in_user_transformer_ends_fit_compressed():
    data = TensorDataset(torch.randn(64, 10, 8), torch.randint(0, 3, (64,)))
    module = DropInTransformer()
    callback = SVDLLM(ratio=0.5, calibration_batches=4)
    trainer = fast_trainer(callbacks=[callback], max_steps=3)
    trainer.fit(module, DataLoader(data, batch_size=16))
    for layer in module.layers:  # eval-mode fused fast path must not hide them from calibration
        assert isinstance(layer.linear1, LowRankLinear) and isinstance(layer.linear2, LowRankLinear)
        assert type(layer.self_attn.out_proj) is not LowRankLinear  # MHA reads .weight: no hook ever fires
    notes = {r.name: r.note for r in callback.report.layers}
    assert "received no input during calibration" in notes["layers.0.self_attn.out_proj"]
    assert isinstance(module.embed, nn.Linear) and isinstance(module.head, nn.Linear)
    x = torch.randn(2, 10, 8)
    module.train()
    reference = module(x)
    module.eval()  # fused fast path, which reads linear1.weight/.bias of the low-rank layers
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference, rtol=1e-4, atol=1e-5)
    assert reference.shape == (2, 3) and torch.isfinite(reference).all()


def test_drop_in_mlp_uses_fallback_and_keeps_useless_rank_dense():
    data = TensorDataset(torch.randn(64, 16), torch.randn(64))
    module = DropInMLP()
    callback = SVDLLM(ratio=0.5, calibration_batches=2)
    with pytest.warns(UserWarning, match="no repeated transformer blocks"):
        fast_trainer(callbacks=[callback], max_steps=2).fit(module, DataLoader(data, batch_size=32))
    assert isinstance(module.net[0], LowRankLinear) and isinstance(module.net[2], LowRankLinear)
    assert isinstance(module.net[4], nn.Linear)  # 64 -> 1: rank 1 needs 65 params > 64
    last = callback.report.layers[-1]
    assert last.rank is None and last.params_after == last.params_before and "kept dense" in last.note


def test_datamodule_calibration_loader_is_used(tmp_path):
    calls = []

    class DataModule(pl.LightningDataModule):
        def train_dataloader(self):
            return loader_for("llama")

        def calibration_dataloader(self):
            calls.append(1)
            return loader_for("llama", n=8, batch_size=2, seed=3)

    callback = SVDLLM(ratio=0.3, calibration_batches=100, save_dir=str(tmp_path / "out"))
    fast_trainer(callbacks=[callback]).fit(TinyModule("llama"), datamodule=DataModule())
    assert calls == [1]
    assert callback.report.calibration_samples == 8 * 16
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["method"] == "svd_llm" and len(saved["layers"]) == 14
    info = json.loads((tmp_path / "out" / "compressed" / "prehab_compression.json").read_text())
    assert info["ratio"] == 0.3 and info["lowrank_layers"]["model.layers.0.mlp.down_proj"]["rank"] == rank_from_ratio(
        32, 64, 0.3
    )


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2, True])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match=r"ratio=.*strictly between 0 and 1"):
        SVDLLM(ratio=ratio)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="calibration_batches=0"):
        SVDLLM(calibration_batches=0)
    with pytest.raises(ValueError, match="targets="):
        SVDLLM(targets=[3])
    with pytest.raises(ValueError, match="damping="):
        SVDLLM(damping=0)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_untouched(module, state):
    assert not any(isinstance(m, LowRankLinear) for m in module.modules())
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, state[key], equal_nan=True, rtol=0, atol=0)


def test_targets_matching_nothing_lists_existing_layers():
    module = TinyModule("llama")
    state = _state(module)
    with pytest.raises(ValueError, match=r"'qq_proj' matches no Linear.*model\.model\.layers\.0\.self_attn\.q_proj"):
        SVDLLM(ratio=0.5, targets=["q_proj", "qq_proj"]).compress(module, loader_for("llama"), progress=False)
    _assert_untouched(module, state)


def test_targets_subset_only():
    module = TinyModule("llama")
    SVDLLM(ratio=0.5, targets=r"mlp\.(gate|up)_proj").compress(module, loader_for("llama"), progress=False)
    lowrank = [n for n, m in module.named_modules() if isinstance(m, LowRankLinear)]
    assert len(lowrank) == 4 and all("gate_proj" in n or "up_proj" in n for n in lowrank)


def test_no_calibration_data_is_a_clear_error():
    module = TinyModule("llama")
    with pytest.raises(ValueError, match="needs calibration data.*calibration_dataloader"):
        SVDLLM(ratio=0.5).compress(module, None)
    _assert_untouched(module, _state(module))
    # Plain SVD needs none.
    report = SVD(ratio=0.5).compress(module, None, progress=False)
    assert report.layers[0].relative_error is None and report.totals()["layers_compressed"] == 14


def test_nan_statistics_name_the_layer_and_change_nothing():
    module = TinyModule("llama")
    with torch.no_grad():
        module.model.model.layers[1].mlp.act_fn = nn.Identity()
        module.model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    state = _state(module)
    with pytest.raises(ValueError, match=r"model\.model\.layers\.1\.mlp\.down_proj.*NaN/Inf.*Nothing was modified"):
        SVDLLM(ratio=0.5).compress(module, loader_for("llama"), progress=False)
    _assert_untouched(module, state)


def test_failure_midway_leaves_model_intact():
    class Failing(SVDLLM):
        def solve_layer(self, name, weight, rank, stats):
            if name.endswith("layers.1.mlp.down_proj"):
                raise RuntimeError("solver failed")
            return super().solve_layer(name, weight, rank, stats)

    module = TinyModule("llama")
    state = _state(module)
    with pytest.raises(RuntimeError, match="solver failed"):
        Failing(ratio=0.5).compress(module, loader_for("llama"), progress=False)
    _assert_untouched(module, state)


def test_singular_covariance_is_damped_and_reported():
    module = TinyModule("llama")
    tiny = DataLoader(TensorDataset(torch.randint(3, 90, (1, 8))), batch_size=1)

    class Ids(pl.LightningModule):
        pass

    module.calibration_step = lambda batch: module(batch[0])
    with pytest.warns(UserWarning, match=r"fewer calibration token rows \(8\) than they have inputs \(up to 64\)"):
        report = SVDLLM(ratio=0.5, calibration_batches=1).compress(module, tiny, progress=False)
    down = next(r for r in report.layers if r.name.endswith("layers.0.mlp.down_proj"))
    assert down.damping > 0 and "damped" in down.note and "8 samples < 64 features" in down.note


@pytest.mark.parametrize("method", [SVDLLM, AASVD])
def test_enough_calibration_rows_give_no_rank_deficiency_warning(method):
    module = TinyModule("llama")
    loader = loader_for("llama", n=16, batch_size=8)  # 16 sequences x 16 tokens = 256 rows > 64 inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method(ratio=0.5, calibration_batches=2).compress(module, loader, progress=False)
    assert not [w for w in caught if "fewer calibration token rows" in str(w.message)]
    out = module(torch.randint(3, 90, (2, 8)))
    assert torch.isfinite(out).all()


def test_module_without_forward_gets_calibration_step_hint():
    class NoForward(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))

    module = NoForward()
    loader = DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=4)
    with pytest.raises(CalibrationForwardError, match="calibration_step"):
        SVDLLM(ratio=0.5).compress(module, loader, progress=False)


def test_base_class_requires_solve_layer():
    with pytest.raises(NotImplementedError):
        LowRankCompression(ratio=0.5).compress(TinyModule("llama"), loader_for("llama"), progress=False)
