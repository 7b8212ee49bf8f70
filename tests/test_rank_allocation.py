"""rank_allocation="global" on every method, and block refinement of the two-stream methods (issue 13)."""

import copy
import math

import pytest
import torch
from conftest import TinyModule, fast_trainer, loader_for, tiny_llama

from prehab import LowRankLinear, load_compressed, save_compressed
from prehab.callbacks import AASVD, SAESSVD, SVD, SVDLLM
from prehab.linalg import factor_params, rank_from_ratio
from prehab.targets import resolve_targets


def _batches(n=4, seed=0):
    return [{"input_ids": batch["input_ids"]} for batch in loader_for("llama", n=8 * n, batch_size=8, seed=seed)]


def _skewed_llama():
    """A tiny Llama whose layers have very different whitened spectra: the MLP weights are made nearly rank 2."""
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=32, intermediate_size=64)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("gate_proj", "up_proj", "down_proj")):
                u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
                module.weight.copy_((u * (s * torch.logspace(0, -3, s.numel()))) @ vh)
    return model


def _uniform_budget(model, ratio):
    total = 0
    for module in resolve_targets(model, None, None).values():
        m, n = module.weight.shape
        total += factor_params(m, n, rank_from_ratio(m, n, ratio))
    return total


def _ranks(model):
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_global_allocation_meets_the_uniform_budget_and_lowers_the_total_truncation_loss(ratio):
    model = _skewed_llama()
    budget = _uniform_budget(model, ratio)
    widest = max(sum(m.weight.shape) for m in resolve_targets(model, None, None).values())
    uniform, spread = copy.deepcopy(model), copy.deepcopy(model)
    u = SVDLLM(ratio=ratio, plots=False).compress(uniform, _batches(), progress=False)
    g = SVDLLM(ratio=ratio, rank_allocation="global", allocation_weighting="relative", plots=False).compress(
        spread, _batches(), progress=False
    )
    params = g.totals()["target_params_after"]
    assert budget - widest < params <= budget
    assert u.totals()["target_params_after"] == budget
    assert g.seconds["allocation"] >= 0 and "allocation" not in u.seconds
    assert g.rank_allocation == "global" and g.to_dict()["rank_allocation"] == "global"
    # SVD-LLM reaches each layer's whitened tail energy, so the report's errors are the predicted losses
    # ("relative" weighting: the sum of relative errors is what the allocation minimizes).
    total = lambda report: sum(layer.relative_error or 0.0 for layer in report.layers)  # noqa: E731
    assert total(g) < 0.8 * total(u)
    mlp = [layer.params_after / layer.params_before for layer in g.layers if "mlp" in layer.name]
    attention = [layer.params_after / layer.params_before for layer in g.layers if "attn" in layer.name]
    assert max(mlp) < min(attention)  # the nearly low-rank MLP gives its parameters to attention
    assert min(mlp) >= 0.1 - 1e-9  # min_kept_fraction
    # The default objective ("equal") minimizes the largest relative error instead: below uniform's largest.
    equal = copy.deepcopy(model)
    e = SVDLLM(ratio=ratio, rank_allocation="global", plots=False).compress(equal, _batches(), progress=False)
    worst = lambda report: max(layer.relative_error or 0.0 for layer in report.layers)  # noqa: E731
    assert budget - widest < e.totals()["target_params_after"] <= budget
    assert worst(e) < 0.8 * worst(u) and worst(e) <= worst(g)


def test_two_stream_methods_allocate_from_the_original_model_spectra():
    """AA-SVD and SAES-SVD allocate before block 0 from a one-stream pass: the same ranks as SVD-LLM's."""
    model = _skewed_llama()
    reference = copy.deepcopy(model)
    SVDLLM(ratio=0.4, rank_allocation="global", plots=False).compress(reference, _batches(), progress=False)
    for method in (AASVD, SAESSVD):
        compressed = copy.deepcopy(model)
        report = method(ratio=0.4, rank_allocation="global", plots=False).compress(
            compressed, _batches(), progress=False
        )
        assert _ranks(compressed) == _ranks(reference)
        assert report.seconds["allocation"] > 0
        assert len(set(_ranks(compressed).values())) > 2


def test_plain_svd_allocates_on_unwhitened_spectra_without_data():
    model = _skewed_llama()
    report = SVD(ratio=0.4, rank_allocation="global", plots=False).compress(model, None, progress=False)
    assert report.totals()["target_params_after"] <= _uniform_budget(_skewed_llama(), 0.4)
    # random attention weights have flat spectra: dense costs little more than a useful rank, and the nearly
    # low-rank MLP pays for it
    assert _ranks(model) and all("mlp" in name for name in _ranks(model))
    assert all("global rank allocation" in layer.note for layer in report.layers if "attn" in layer.name)


def test_ratio_sweep_allocates_once_per_ratio_and_compare_methods_follow(tmp_path):
    model = _skewed_llama()
    callback = SVDLLM(ratios=[0.2, 0.5], compare=["aa_svd"], rank_allocation="global", plots=True, evaluate=False)
    report = callback.sweep(model, _batches(), progress=False)
    for row in report.sweep:
        budget = _uniform_budget(_skewed_llama(), row.ratio)
        dense_rest = sum(p.numel() for p in _skewed_llama().parameters()) - sum(
            m.weight.numel() for m in resolve_targets(_skewed_llama(), None, None).values()
        )
        assert row.params - dense_rest <= budget
    assert report.ratio == 0.5 and report.rank_allocation == "global"
    files = [p.name for p in report.save(tmp_path)]
    assert "allocation.png" in files
    text = (tmp_path / "report.md").read_text()
    assert "| kept |" in text and "Ranks: global" in text


def test_heterogeneous_ranks_round_trip_through_save_and_load(tmp_path):
    model = _skewed_llama()
    SVDLLM(ratio=0.4, rank_allocation="global", plots=False).compress(model, _batches(), progress=False)
    assert len(set(_ranks(model).values())) > 2
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    assert _ranks(loaded) == _ranks(model)
    ids = _batches()[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_global_allocation_in_a_trainer_runs_after_the_fit():
    """At the end of fit (after prehab / fine-tuning): the weights the allocation sees are the trained ones."""
    module = TinyModule("llama")
    callback = SVDLLM(ratio=0.4, rank_allocation="global", plots=False, evaluate=False)
    trainer = fast_trainer(callbacks=[callback], max_steps=2)
    trainer.fit(module, train_dataloaders=loader_for("llama"))
    assert callback.report.rank_allocation == "global"
    assert callback.report.totals()["target_params_after"] <= _uniform_budget(TinyModule("llama").model, 0.4)
    assert _ranks(module)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank_allocation": "greedy"}, "rank_allocation='greedy' is invalid; valid values: 'uniform', 'global'"),
        ({"min_kept_fraction": 0.0}, "min_kept_fraction=0.0 is invalid"),
        ({"min_kept_fraction": 1.0}, "min_kept_fraction=1.0 is invalid"),
        ({"min_kept_fraction": float("nan")}, "min_kept_fraction=nan is invalid"),
        ({"min_kept_fraction": True}, "min_kept_fraction=True is invalid"),
        ({"rank_allocation": "global", "ratio": 0.5, "min_kept_fraction": 0.6}, "below 1 - ratio"),
        ({"allocation_weighting": "fisher"}, "allocation_weighting='fisher' is invalid"),
        ({"refine_steps": -1}, "refine_steps=-1 is invalid"),
        ({"refine_steps": 1.5}, "refine_steps=1.5 is invalid"),
        ({"refine_lr": 0.0}, "refine_lr=0.0 is invalid"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        AASVD(**kwargs)


def test_refinement_needs_two_streams():
    with pytest.raises(ValueError, match="refine_steps=2 needs a two-stream method"):
        SVDLLM(refine_steps=2)
    SVDLLM(refine_steps=2, propagate=True)  # two-stream: accepted


def _block_errors(dense, compressed, batches):
    """Relative block-output error ‖block(X) − block'(X̂)‖² / ‖block(X)‖² of every block, from full forwards."""
    outputs = {}

    def record(model, key):
        handles = []
        for index, block in enumerate(model.model.layers):
            handles.append(
                block.register_forward_hook(
                    lambda _m, _a, out, _i=index: outputs.setdefault((key, _i), []).append(
                        (out[0] if isinstance(out, tuple) else out).double()
                    )
                )
            )
        return handles

    handles = record(dense, "dense") + record(compressed, "compressed")
    with torch.no_grad():
        for batch in batches:
            dense(**batch)
            compressed(**batch)
    for handle in handles:
        handle.remove()
    errors = []
    for index in range(len(dense.model.layers)):
        pairs = zip(outputs[("dense", index)], outputs[("compressed", index)], strict=True)
        num = den = 0.0
        for reference, output in pairs:
            num += float((output - reference).pow(2).sum())
            den += float(reference.pow(2).sum())
        errors.append(num / den)
    return errors


def test_refinement_lowers_every_block_error_and_changes_only_the_factors():
    torch.manual_seed(0)
    dense = tiny_llama()
    batches = _batches()
    plain, refined = copy.deepcopy(dense), copy.deepcopy(dense)
    AASVD(ratio=0.5, plots=False).compress(plain, batches, progress=False)
    report = AASVD(ratio=0.5, plots=False, refine_steps=3, refine_lr=1e-3).compress(refined, batches, progress=False)
    assert [r["block"] for r in report.refinement] == ["model.layers.0", "model.layers.1"]
    assert report.seconds["refinement"] > 0
    measured = _block_errors(dense, refined, batches)
    for entry, error in zip(report.refinement, measured, strict=True):
        assert entry["kept"] and entry["steps"] == 3 * len(batches)
        assert entry["error_after"] < entry["error_before"]
        assert error == pytest.approx(entry["error_after"], rel=1e-3)  # what the report says is what the model does
    # block 0 sees the same inputs with or without refinement: an independent before/after comparison
    assert measured[0] < _block_errors(dense, plain, batches)[0]
    assert measured[0] == pytest.approx(report.refinement[0]["error_after"], rel=1e-3)
    before, after = plain.state_dict(), refined.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("up.weight", "down.weight")) for k in changed)
    assert all(p.requires_grad for p in refined.parameters())  # requires_grad flags are restored
    assert all(p.grad is None for p in refined.parameters())


def test_refine_steps_zero_is_bit_identical_to_no_refinement():
    dense = tiny_llama()
    batches = _batches()
    default, zero = copy.deepcopy(dense), copy.deepcopy(dense)
    SAESSVD(ratio=0.4, plots=False).compress(default, batches, progress=False)
    report = SAESSVD(ratio=0.4, plots=False, refine_steps=0).compress(zero, batches, progress=False)
    assert report.refinement == [] and "refinement" not in report.seconds
    a, b = default.state_dict(), zero.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refinement_that_does_not_help_puts_the_factors_back():
    """A learning rate far too large makes the error worse: the block keeps its closed-form factors."""
    dense = tiny_llama()
    batches = _batches(2)
    plain, refined = copy.deepcopy(dense), copy.deepcopy(dense)
    AASVD(ratio=0.5, plots=False).compress(plain, batches, progress=False)
    report = AASVD(ratio=0.5, plots=False, refine_steps=1, refine_lr=10.0).compress(refined, batches, progress=False)
    assert not any(r["kept"] for r in report.refinement)
    assert all(math.isclose(r["error_after"], r["error_before"]) for r in report.refinement)
    a, b = plain.state_dict(), refined.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
