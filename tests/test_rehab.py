"""LoRA rehab (LoRARehab), ratio sweeps (ratios=), and the whole-pipeline report (JSON, markdown, plots)."""

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import VOCAB, TinyModule, TokenData, fast_trainer, loader_for, run_ddp_script, tiny_llama
from torch import nn
from torch.utils.data import DataLoader

from prehab import LowRankLinear, load_compressed
from prehab.callbacks import SVD, SVDLLM, LoRARehab
from prehab.evaluation import perplexity
from prehab.linalg import factor_params, rank_from_ratio


def heldout_loss(module, seed=7):
    """Mean next-token loss of a TinyModule on data it never trained on."""
    loader = DataLoader(TokenData(32, seed=seed), batch_size=8)
    with torch.no_grad():
        module.eval()
        losses = [
            nn.functional.cross_entropy(
                module(b["input_ids"])[:, :-1].reshape(-1, VOCAB), b["input_ids"][:, 1:].reshape(-1)
            )
            for b in loader
        ]
    return float(sum(losses) / len(losses))


class Snapshot(pl.Callback):
    """Placed between the compression and the rehab: the state right after surgery."""

    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.loss = heldout_loss(pl_module)


def test_rehab_trains_only_lora_merges_back_and_lowers_the_loss():
    torch.manual_seed(0)
    module = TinyModule("llama")
    snapshot = Snapshot()
    rehab = LoRARehab(steps_per_factor=30, rank=2, alpha=4, lr=3e-3, dropout=0.0)
    trainer = fast_trainer(callbacks=[SVDLLM(ratio=0.5, calibration_batches=4), snapshot, rehab], max_steps=2)
    trainer.fit(module, train_dataloaders=loader_for("llama", n=64))

    lowrank = {n: m for n, m in module.named_modules() if isinstance(m, LowRankLinear)}
    assert len(lowrank) == 14
    for name, layer in lowrank.items():  # same ranks and parameter counts as right after surgery
        up, down = snapshot.state[f"{name}.up.weight"], snapshot.state[f"{name}.down.weight"]
        assert layer.rank == up.shape[1] == down.shape[0]
        assert layer.up.weight.shape == up.shape and layer.down.weight.shape == down.shape
    assert not any("lora" in n.lower() for n, _ in module.named_modules())
    assert not any("lora" in n.lower() for n, _ in module.named_parameters())
    assert not hasattr(module, "peft_config")
    state = module.state_dict()
    assert set(state) == set(snapshot.state)
    assert sum(p.numel() for p in module.parameters()) == sum(
        v.numel() for k, v in snapshot.state.items() if k in dict(module.named_parameters())
    )
    changed = 0
    for key, before in snapshot.state.items():
        after = state[key]
        if key.endswith((".up.weight", ".down.weight")) and key.rsplit(".", 2)[0] in lowrank:
            delta = (after - before).double()
            # A merged LoRA update has rank <= the LoRA rank (2), far below the factor's own rank.
            assert torch.linalg.matrix_rank(delta, rtol=1e-6) <= 2, key
            changed += bool(delta.abs().max() > 0)
        else:
            assert torch.equal(after, before), key  # everything else bit-identical (biases included)
    assert changed == 28  # both factors of every layer moved
    assert rehab.losses["up"] and rehab.losses["down"]
    assert all(p.requires_grad for p in module.parameters())  # the user's flags are back
    assert heldout_loss(module) < snapshot.loss


class RNGProbe(pl.Callback):
    def on_fit_end(self, trainer, pl_module):
        self.state = torch.get_rng_state()


def test_rehab_result_depends_on_its_seed_not_on_the_process_rng_and_leaves_that_rng_alone():
    """Dropout masks and LoRA init come from the rehab's own seeded RNG: the same seed after different global RNG
    histories gives bit-identical weights, another seed does not, and the caller's RNG stream is not advanced."""
    torch.manual_seed(0)
    compressed = TinyModule("llama")
    SVDLLM(ratio=0.5, calibration_batches=2).compress(compressed.model, list(loader_for("llama", n=16)))

    def rehabbed(global_seed: int, seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
        module = copy.deepcopy(compressed)
        torch.manual_seed(global_seed)
        torch.rand(global_seed + 1)  # a different history of draws before the rehab
        rehab = LoRARehab(steps_per_factor=4, rank=2, alpha=4, lr=3e-3, dropout=0.3, seed=seed,
                          dataloader=DataLoader(TokenData(32), batch_size=8, shuffle=True))
        before, after = RNGProbe(), RNGProbe()  # the global CPU RNG state right before and right after the rehab
        trainer = fast_trainer(callbacks=[before, rehab, after], max_steps=0)
        trainer.fit(module, train_dataloaders=loader_for("llama", n=8))
        return module.state_dict(), before.state, after.state

    first, before, after = rehabbed(1)
    assert torch.equal(before, after)  # the global stream is where the caller left it
    second, _, _ = rehabbed(5)
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    other, _, _ = rehabbed(1, seed=1)  # the seed does reach the training: the weights differ
    assert any(not torch.equal(first[k], other[k]) for k in first if k.endswith((".up.weight", ".down.weight")))
    assert not torch.equal(first["model.model.layers.0.mlp.up_proj.up.weight"],
                           compressed.state_dict()["model.model.layers.0.mlp.up_proj.up.weight"])


class PlainLM(pl.LightningModule):
    """A LightningModule that knows nothing of prehab: a tiny Llama and a next-token loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = tiny_llama()

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["input_ids"][:, 1:].reshape(-1))
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["input_ids"][:, 1:].reshape(-1))
        self.log("val_loss", loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_drop_in_module_ends_compressed_and_rehabbed_better_than_without():
    def run(callbacks):
        torch.manual_seed(0)
        module = PlainLM()
        trainer = fast_trainer(callbacks=callbacks, max_steps=3, num_sanity_val_steps=0)
        trainer.fit(
            module,
            train_dataloaders=loader_for("llama", n=64),
            val_dataloaders=DataLoader(TokenData(16, seed=3), batch_size=8),
        )
        return module

    compression = SVDLLM(ratio=0.5, calibration_batches=4)
    rehabbed = run([compression, LoRARehab(steps_per_factor=10)])
    plain = run([SVDLLM(ratio=0.5, calibration_batches=4)])
    assert sum(isinstance(m, LowRankLinear) for m in rehabbed.modules()) == 14
    assert not any("lora" in n for n, _ in rehabbed.named_parameters())
    assert heldout_loss(rehabbed) < heldout_loss(plain)
    # The report evaluated the drop-in module with its own validation_step: before, dense, surgery, rehab.
    metrics = compression.report.metrics
    assert set(metrics) == {"before_prehab", "dense", "svd_llm", "rehab"}
    assert metrics["rehab"]["val_loss"] < metrics["svd_llm"]["val_loss"]


def test_rehab_under_ddp_ends_bit_identical_on_both_ranks(tmp_path):
    run_ddp_script(Path(__file__).parent / "ddp_rehab_script.py", tmp_path)
    ranks = [torch.load(tmp_path / f"rehab_rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["lowrank"] == 14
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trained on its own shard
    moved = 0
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
        moved += not torch.equal(value, ranks[0]["surgery"][key])
    assert moved >= 28  # the factors changed: rehab did train


# ----------------------------------------------------------------------------------------- ratios
def _counting(module):
    calls = []
    module.model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("compare", [[], ["svd"]])
def test_ratios_sweep_reports_each_ratio_and_collects_one_stream_statistics_once(compare):
    module = TinyModule("llama")
    calls = _counting(module)
    dense_params = sum(p.numel() for p in module.parameters())
    shapes = {n: (m.out_features, m.in_features) for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    shapes = {n: s for n, s in shapes.items() if ".layers." in n}
    callback = SVDLLM(ratios=[0.2, 0.4, 0.6], calibration_batches=4, compare=compare)
    fast_trainer(callbacks=[callback], max_steps=0).fit(module, train_dataloaders=loader_for("llama"))

    assert len(calls) == 4  # one statistics pass of 4 batches, shared by every ratio and method
    rows = callback.report.sweep
    assert [(r.method, r.ratio) for r in rows] == [(m, r) for m in [*compare, "svd_llm"] for r in (0.2, 0.4, 0.6)]
    for row in rows:
        removed = sum(
            m * n - factor_params(m, n, rank_from_ratio(m, n, row.ratio))
            for m, n in shapes.values()
            if factor_params(m, n, rank_from_ratio(m, n, row.ratio)) < m * n
        )
        assert row.params == dense_params - removed
    assert [r.final for r in rows] == [False] * (len(rows) - 1) + [True]
    # The model ends at the last ratio.
    assert sum(p.numel() for p in module.parameters()) == rows[-1].params
    down = module.get_submodule("model.model.layers.0.mlp.down_proj")
    assert down.rank == rank_from_ratio(32, 64, 0.6)


def test_two_stream_ratios_restore_dense_between_runs():
    from prehab.callbacks import SAESSVD

    loader = loader_for("llama")
    swept, single = TinyModule("llama"), TinyModule("llama")
    SAESSVD(ratios=[0.6, 0.3], calibration_batches=2).sweep(swept, loader, progress=False)
    SAESSVD(ratio=0.3, calibration_batches=2).compress(single, loader, progress=False)
    for (name, a), (_, b) in zip(swept.state_dict().items(), single.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # the 0.6 run left no trace on the 0.3 result


# ----------------------------------------------------------------------------------------- the report
def test_whole_run_writes_report_files_and_every_saved_folder_reproduces_its_metric(tmp_path):
    from test_module import Bytes

    from prehab.module import PrehabModule

    torch.manual_seed(0)
    data = Bytes(train_windows=64)
    module = PrehabModule(model=tiny_llama(), lam=0.05, lr=3e-3, calibration_batches=2)
    compression = SVDLLM(ratios=[0.3, 0.5], calibration_batches=2, compare=["svd"], save_dir=str(tmp_path / "run"))
    rehab = LoRARehab(steps_per_factor=4, lr=1e-3)
    trainer = fast_trainer(callbacks=[compression, rehab], max_steps=3, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)

    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "prehab.report" and report["version"] == 1
    assert {"method", "ratio", "ratios", "stages", "sweep", "layers", "totals", "seconds", "spectra"} <= set(report)
    assert [s["name"] for s in report["stages"]] == ["before_prehab", "dense", "svd_llm", "rehab"]
    for stage in report["stages"]:
        assert {"name", "label", "params", "size_mb", "seconds", "metrics"} <= set(stage)
        assert stage["params"] > 0 and stage["size_mb"] > 0 and stage["metrics"]["perplexity"] > 1
    assert report["stages"][2]["params"] < report["stages"][1]["params"] == report["stages"][0]["params"]
    assert report["stages"][3]["params"] == report["stages"][2]["params"]
    assert [(r["method"], r["ratio"]) for r in report["sweep"]] == [
        ("svd", 0.3),
        ("svd", 0.5),
        ("svd_llm", 0.3),
        ("svd_llm", 0.5),
    ]
    assert report["ratio"] == 0.5 and len(report["layers"]) == 14
    assert len(report["spectra"]) == 4
    for curves in report["spectra"].values():
        assert len(curves["before_prehab"]) == len(curves["after_prehab"]) > curves["rank"] > 0
    markdown = (out / "report.md").read_text()
    assert "## Stages" in markdown and "after rehab (LoRA)" in markdown and "## Methods x ratios" in markdown
    for image in ("stages", "ratios", "layers", "spectra"):
        png = out / f"{image}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({image}.png)" in markdown
    json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))

    # Every saved folder reloads without the module and reproduces the metric of its stage.
    for folder, stage in (("dense", "dense"), ("compressed", "svd_llm"), ("rehab", "rehab")):
        reloaded = load_compressed(out / folder)
        expected = next(s for s in report["stages"] if s["name"] == stage)["metrics"]["perplexity"]
        assert perplexity(reloaded, data.val_dataloader()) == pytest.approx(expected, rel=1e-5), folder
    assert not any(isinstance(m, LowRankLinear) for m in load_compressed(out / "dense").modules())


def test_report_json_is_strict_and_errors_are_never_negative():
    from prehab.report import CompressionReport, LayerReport

    report = CompressionReport("svd_llm", 0.5, [LayerReport("a", 4, 4, 1, 16, 8, 0.0, float("inf"))])
    text = json.dumps(report.to_dict(), allow_nan=False)  # Infinity would raise here
    assert json.loads(text)["layers"][0]["damping"] is None
    module = TinyModule("llama")
    exact = SVDLLM(ratio=0.01, calibration_batches=1).compress(module, loader_for("llama", n=8), progress=False)
    assert all(layer.relative_error >= 0 for layer in exact.layers if layer.relative_error is not None)
    assert "-0" not in "".join(str(c) for row in exact._layer_rows(False) for c in row[5:6])


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps_per_factor": 0}, r"steps_per_factor=0 is invalid"),
        ({"steps_per_factor": -3}, r"steps_per_factor=-3 is invalid"),
        ({"steps_per_factor": 5, "rank": 0}, r"rank=0 is invalid"),
        ({"steps_per_factor": 5, "order": ["up", "middle"]}, r"order=.*unknown factors \['middle'\].*'up', 'down'"),
        ({"steps_per_factor": 5, "order": "up"}, r"order='up' is invalid"),
        ({"steps_per_factor": 5, "lr": 0}, r"lr=0 is invalid"),
        ({"steps_per_factor": 5, "dropout": 1.0}, r"dropout=1.0 is invalid"),
        ({"steps_per_factor": 5, "alpha": 0}, r"alpha=0 is invalid"),
        ({"steps_per_factor": 5, "weight_decay": -0.1}, r"weight_decay=-0.1 is invalid"),
        ({"steps_per_factor": 5, "dataloader": 3}, r"dataloader=3 is not iterable"),
        ({"steps_per_factor": 5, "datamodule": "alpaca"}, r"datamodule='alpaca' is invalid"),
        ({"steps_per_factor": 5, "dataloader": [1], "datamodule": pl.LightningDataModule()}, r"both given"),
        ({"steps_per_factor": 5, "seed": "0"}, r"seed='0' is invalid"),
        ({"steps_per_factor": 5, "evaluate": "yes"}, r"evaluate='yes' is invalid"),
        ({"steps_per_factor": 2.5}, r"steps_per_factor=2.5 is invalid"),
    ],
)
def test_rehab_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRARehab(**kwargs)


@pytest.mark.parametrize("where", ["alone", "before"])
def test_rehab_without_compression_first_fails_before_any_training(where):
    module = TinyModule("llama")
    before = copy.deepcopy(module.state_dict())
    callbacks = [LoRARehab(steps_per_factor=2)] + ([SVDLLM(ratio=0.5)] if where == "before" else [])
    with pytest.raises(ValueError, match="compression callback must come first|Put one first"):
        fast_trainer(callbacks=callbacks, max_steps=2).fit(module, train_dataloaders=loader_for("llama"))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.3, "ratios": [0.2, 0.4]}, r"ratio=0.3 and ratios=\[0.2, 0.4\] are both given"),
        ({"ratios": [0.2, 1.2]}, r"ratios\[1\]=1.2 is invalid"),
        ({"ratios": [0.0]}, r"ratios\[0\]=0.0 is invalid"),
        ({"ratios": []}, r"ratios=\[\] is invalid"),
        ({"ratios": [0.2, 0.2]}, r"repeats a value"),
        ({"ratios": "0.2"}, r"ratios='0.2' is invalid"),
        ({"ratio": 0.5, "save_dense": 1}, r"save_dense=1 is invalid"),
        ({"ratio": 0.5, "plots": "no"}, r"plots='no' is invalid"),
    ],
)
def test_ratio_and_ratios_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SVD(**kwargs)


class Counting(TinyModule):
    """Records, per training_step call, whether autocast was on (the Trainer's precision)."""

    def __init__(self):
        super().__init__("llama")
        self.calls = []

    def training_step(self, batch, batch_idx):
        self.calls.append(torch.is_autocast_enabled("cpu"))
        return super().training_step(batch, batch_idx)


def test_rehab_follows_the_trainers_accumulation_and_precision():
    module = Counting()
    rehab = LoRARehab(steps_per_factor=3, rank=2)
    trainer = fast_trainer(
        callbacks=[SVDLLM(ratio=0.5, calibration_batches=2), rehab],
        max_steps=1,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
    )
    trainer.fit(module, train_dataloaders=loader_for("llama", n=64))
    during_rehab = module.calls[2:]  # the fit's one optimizer step took 2 batches
    assert len(during_rehab) == 2 * 3 * 2  # factors x steps x accumulated batches
    assert all(during_rehab)  # every rehab forward ran under the Trainer's bf16 autocast
    assert len(rehab.losses["up"]) == len(rehab.losses["down"]) == 3
    assert sum(isinstance(m, LowRankLinear) for m in module.modules()) == 14
