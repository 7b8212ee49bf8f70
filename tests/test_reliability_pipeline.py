"""Issue 9: targets and the two-stream pipeline on models that are not a plain stack of identical blocks.

Already compressed models, tied weights, several block stacks (BART), MoE models, per-layer masks on later
batches, blocks whose layers differ or run twice, and bad targets=/blocks= values.
"""

import copy
import re
import warnings

import pytest
import torch
import transformers
from conftest import VOCAB, TinyModule, fast_trainer, loader_for, tiny_llama
from test_two_stream import Recording  # AA-SVD that records the statistics each layer was solved from
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prehab import LowRankLinear
from prehab.calibration import calibration_forward
from prehab.callbacks import AASVD, SVD, SVDLLM
from prehab.stats import calibration_forward_context
from prehab.targets import find_block_stacks, resolve_targets


def _config_class(name):
    """The transformers config class, or skip the test when this transformers version lacks the model."""
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_state(module, state):
    after = module.state_dict()
    assert after.keys() == state.keys()
    for key, value in after.items():
        assert torch.equal(value, state[key]), key


def _nested_lowrank(module):
    return [n for n, m in module.named_modules() if isinstance(m, LowRankLinear) and not isinstance(m.up, nn.Linear)]


def _lowrank(module):
    return [n for n, m in module.named_modules() if isinstance(m, LowRankLinear)]


# ------------------------------------------------------------------ slow reference of the two-stream statistics
def _all_inputs(model, name, batches):
    """Every call's input rows of layer `name` over full forwards of `model` (no caching of any kind)."""
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    try:
        with calibration_forward_context(model):
            for batch in batches:
                calibration_forward(model, batch)
    finally:
        handle.remove()
    return torch.cat(rows).double()


def _assert_statistics_match_reference(dense, compressed, seen, batches):
    """Each layer's G/H/C equal those of the dense model and of the dense model with every earlier group replaced."""
    group_of, group = {}, -1
    for i, (name, _, h) in enumerate(seen):
        if i == 0 or h is not seen[i - 1][2]:
            group += 1
        group_of[name] = group
    for name, stats, _ in seen:
        partial = copy.deepcopy(dense)
        for other, other_group in group_of.items():
            if other_group < group_of[name]:
                parent, _, child = other.rpartition(".")
                setattr(partial.get_submodule(parent), child, copy.deepcopy(compressed.get_submodule(other)))
        x, x_hat = _all_inputs(dense, name, batches), _all_inputs(partial, name, batches)
        n = len(x)
        torch.testing.assert_close(stats["G"], x.T @ x / n, rtol=1e-4, atol=1e-5, msg=f"G of {name}")
        torch.testing.assert_close(stats["H"], x_hat.T @ x_hat / n, rtol=1e-4, atol=1e-5, msg=f"H of {name}")
        torch.testing.assert_close(stats["C"], x.T @ x_hat / n, rtol=1e-4, atol=1e-5, msg=f"C of {name}")
    return group_of


def _vector_batches(n=24, seq=5, width=16, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return list(
        DataLoader(TensorDataset(torch.randn(n, seq, width, generator=g).cumsum(-1) / 3), batch_size=batch_size)
    )


# ------------------------------------------------------------------------------------ item 6: compressed twice
def test_compress_twice_is_refused_and_changes_nothing():
    module = TinyModule("llama")
    loader = loader_for("llama", n=8, batch_size=4)
    AASVD(ratio=0.5, calibration_batches=2).compress(module, loader, progress=False)
    assert len(_lowrank(module)) == 14
    state = _state(module)
    for method in (AASVD, SVDLLM, SVD):
        with pytest.raises(ValueError, match=r"already low-rank.*reload the dense model"):
            method(ratio=0.5, calibration_batches=2).compress(module, loader, progress=False)
    _assert_same_state(module, state)
    assert not _nested_lowrank(module)


def test_two_compression_callbacks_in_one_trainer_never_nest():
    module = TinyModule("llama")
    first, second = SVDLLM(ratio=0.5, calibration_batches=2), SVD(ratio=0.3)
    state = _state(module)
    with pytest.raises(ValueError, match="both target .* already low-rank. Use compare="):
        fast_trainer(callbacks=[first, second], max_steps=1).fit(module, loader_for("llama", n=8, batch_size=4))
    _assert_same_state(module, state)  # refused at fit start, before any training or surgery
    assert first.report is None and second.report is None
    # Disjoint targets are fine: each callback compresses its own layers, none nested.
    attention, mlp = SVDLLM(ratio=0.5, targets="self_attn", calibration_batches=2), SVD(ratio=0.3, targets="mlp")
    fast_trainer(callbacks=[attention, mlp], max_steps=1).fit(module, loader_for("llama", n=8, batch_size=4))
    assert len(_lowrank(module)) == 14 and not _nested_lowrank(module)


@pytest.mark.parametrize(
    "pattern", [r"q_proj", r"self_attn\.q_proj$", r"q_proj\.up", r"layers\.0\.self_attn\.q_proj\.down"]
)
def test_explicit_targets_naming_lowrank_layers_or_factors_are_refused(pattern):
    module = TinyModule("llama")
    loader = loader_for("llama", n=8, batch_size=4)
    SVDLLM(ratio=0.5, targets="q_proj", calibration_batches=2).compress(module, loader, progress=False)
    state = _state(module)
    with pytest.raises(
        ValueError, match=r"already low-rank \(LowRankLinear\): model\.model\.layers\.0\.self_attn\.q_proj"
    ):
        SVDLLM(ratio=0.5, targets=pattern, calibration_batches=2).compress(module, loader, progress=False)
    _assert_same_state(module, state)


def test_default_targets_of_a_partly_compressed_model_are_the_dense_layers():
    module = TinyModule("llama")
    loader = loader_for("llama", n=8, batch_size=4)
    SVDLLM(ratio=0.5, targets="mlp", calibration_batches=2).compress(module, loader, progress=False)
    with pytest.warns(UserWarning, match="6 layers inside the blocks .* already low-rank"):
        targets = resolve_targets(module)
    assert len(targets) == 8 and not any("mlp" in n for n in targets)
    with pytest.warns(UserWarning, match="already low-rank"):
        AASVD(ratio=0.5, calibration_batches=2).compress(module, loader, progress=False)
    assert len(_lowrank(module)) == 14 and not _nested_lowrank(module)


# -------------------------------------------------------------------------------------- item 10: tied weights
def test_tied_lm_head_is_refused_naming_both_modules():
    llama = tiny_llama(tie_word_embeddings=True)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    batches = [{"input_ids": torch.randint(3, VOCAB, (2, 8))}]
    state = _state(llama)
    refused = r"'lm_head' shares its weight with 'model\.embed_tokens'.*untie_output_embeddings\(model\)"
    with pytest.raises(ValueError, match=refused):
        SVDLLM(ratio=0.5, targets="lm_head").compress(llama, batches, progress=False)
    _assert_same_state(llama, state)
    gpt2 = TinyModule("gpt2")  # GPT-2 ties its head by default
    with pytest.raises(ValueError, match=r"'model\.lm_head' shares its weight with 'model\.transformer\.wte'"):
        resolve_targets(gpt2, "lm_head")
    assert len(resolve_targets(gpt2)) == 8  # the default targets have no tied weight


def test_untied_lm_head_compresses_and_reloads_untied(tmp_path):
    """untie_output_embeddings makes a tied head a target: same logits, then a low-rank head that saves and
    reloads with its own factors while the input embeddings keep the full matrix."""
    from prehab import load_compressed, save_compressed, untie_output_embeddings

    llama = tiny_llama(tie_word_embeddings=True).eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        before = llama(input_ids=ids).logits
    embeddings = llama.model.embed_tokens.weight.detach().clone()
    params = sum(p.numel() for p in llama.parameters())
    assert untie_output_embeddings(llama) is True
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight and not llama.config.tie_word_embeddings
    assert sum(p.numel() for p in llama.parameters()) == params + llama.lm_head.weight.numel()
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=ids).logits, before, rtol=0, atol=0)
    assert untie_output_embeddings(llama) is False  # already untied: nothing to do

    batches = [{"input_ids": torch.randint(3, VOCAB, (2, 8))} for _ in range(4)]
    SVDLLM(ratio=0.5, targets=[r"layers\.", "lm_head"]).compress(llama, batches, progress=False)
    assert isinstance(llama.lm_head, LowRankLinear) and llama.lm_head.rank < VOCAB * 32 // (VOCAB + 32)
    assert torch.equal(llama.model.embed_tokens.weight, embeddings)
    with torch.no_grad():
        compressed = llama(input_ids=ids).logits
    reloaded = load_compressed(save_compressed(llama, tmp_path / "untied")).eval()
    assert isinstance(reloaded.lm_head, LowRankLinear) and not reloaded.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, compressed)


def test_two_stream_blocks_then_a_one_stream_head():
    """AA-SVD refuses layers outside the blocks; the head is compressed after it by SVD-LLM, from the statistics
    of the already compressed model (what the head will see), leaving the blocks' factors alone."""
    from prehab import untie_output_embeddings

    llama = tiny_llama(tie_word_embeddings=True).eval()
    untie_output_embeddings(llama)
    batches = [{"input_ids": torch.randint(3, VOCAB, (2, 8))} for _ in range(4)]
    with pytest.raises(ValueError, match=r"outside the repeated blocks.*lm_head"):
        AASVD(ratio=0.4, targets=[r"layers\.", "lm_head"]).compress(llama, batches, progress=False)
    AASVD(ratio=0.4).compress(llama, batches, progress=False)
    blocks = {n: m.weight.detach().clone() for n, m in llama.named_modules() if isinstance(m, LowRankLinear)}
    report = SVDLLM(ratio=0.4, targets="lm_head").compress(llama, batches, progress=False)
    assert [layer.name for layer in report.layers] == ["lm_head"] and isinstance(llama.lm_head, LowRankLinear)
    assert all(torch.equal(llama.get_submodule(n).weight, w) for n, w in blocks.items())


def test_untie_output_embeddings_refuses_a_model_without_embeddings():
    from prehab import untie_output_embeddings

    with pytest.raises(ValueError, match=r"untie_output_embeddings: Sequential has no input and output embeddings"):
        untie_output_embeddings(nn.Sequential(nn.Linear(4, 4)))
    from prehab import PrehabModule

    with pytest.raises(ValueError, match=r"untie_lm_head=True is invalid for this model: .*Sequential"):
        PrehabModule(model=nn.Sequential(nn.Linear(4, 4)), task="regression", untie_lm_head=True)
    with pytest.raises(ValueError, match=r"untie_lm_head='yes' is invalid: use true or false"):
        PrehabModule(model=tiny_llama(), untie_lm_head="yes")


def test_two_linears_sharing_one_parameter_are_refused():
    net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    net[2].weight = net[0].weight
    with pytest.raises(ValueError, match=r"layer '0' shares its weight with '2'.*Exclude it from targets="):
        resolve_targets(net, ["0"])
    with pytest.raises(ValueError, match=r"layer '2' shares its weight with '0'"):
        resolve_targets(net, [r"^2$"])
    assert list(resolve_targets(net, ["4"])) == ["4"]
    state = _state(net)
    with pytest.raises(ValueError, match="shares its weight"), pytest.warns(UserWarning, match="no repeated"):
        SVDLLM(ratio=0.5).compress(net, _vector_batches(width=16), progress=False)
    _assert_same_state(net, state)


# ----------------------------------------------------------------------------- item 8: per-layer masks, per batch
def _sliding_qwen2():
    config_class = _config_class("Qwen2Config")
    from transformers import Qwen2ForCausalLM

    config = config_class(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,  # layer 0 full attention, layer 1 sliding window
    )
    return Qwen2ForCausalLM(config)


def _ids(batch, seq, seed):
    return {"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))}


def test_sliding_window_mask_on_a_later_longer_batch_is_refused():
    model = _sliding_qwen2()
    state = _state(model)
    batches = [_ids(2, 3, 0), _ids(2, 16, 1)]  # batch 0 fits in the window: both layers get the same mask
    with pytest.raises(ValueError, match=r"block 1 is called with a different 'attention_mask'.*batch 1.*SVDLLM"):
        AASVD(ratio=0.5).compress(model, batches, progress=False)
    _assert_same_state(model, state)
    assert not _lowrank(model)


def test_per_layer_check_runs_once_per_input_shape():
    model = _sliding_qwen2()
    calls = []
    model.model.norm.register_forward_pre_hook(lambda *_: calls.append(1))  # runs only in whole-model forwards
    batches = [_ids(2, 3, s) for s in range(4)] + [_ids(2, 2, 9)]  # all within the window: two shapes
    AASVD(ratio=0.5).compress(model, batches, progress=False)
    assert len(calls) == 2 and len(_lowrank(model)) == 14


# ---------------------------------------------------------------- item 9: blocks that differ, layers called twice
class OptionalBlock(nn.Module):
    def __init__(self, uses_extra):
        super().__init__()
        self.uses_extra = uses_extra
        self.extra, self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        if self.uses_extra:
            x = x + self.extra(torch.tanh(x))
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("uses_extra", [(True, False, True), (False, True, False)])
def test_layers_used_by_some_blocks_only(uses_extra):
    torch.manual_seed(0)
    dense = Stack(OptionalBlock(u) for u in uses_extra)
    model = copy.deepcopy(dense)
    batches = _vector_batches()
    callback = Recording(ratio=0.5)
    report = callback.compress(model, batches, progress=False)
    for index, used in enumerate(uses_extra):
        extra = f"layers.{index}.extra"
        assert isinstance(model.get_submodule(extra), LowRankLinear) is used
        note = next(layer.note for layer in report.layers if layer.name == extra)
        assert ("received no input" in note) is (not used)
    assert len(callback.seen) == 2 * len(uses_extra) + sum(uses_extra)
    _assert_statistics_match_reference(dense, model, callback.seen, batches)


class TwiceBlock(nn.Module):
    """Calls one Linear twice per forward (its statistics must hold both calls' rows)."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return x + self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def test_layer_called_twice_is_calibrated_on_every_call():
    torch.manual_seed(0)
    dense = Stack(TwiceBlock() for _ in range(2))
    model = copy.deepcopy(dense)
    batches = _vector_batches(n=16)
    callback = Recording(ratio=0.5)
    report = callback.compress(model, batches, progress=False)
    assert report.calibration_samples == 2 * 16 * 5  # two calls of fc per token
    _assert_statistics_match_reference(dense, model, callback.seen, batches)


def test_albert_shared_layer_is_calibrated_on_all_its_calls():
    config_class = _config_class("AlbertConfig")
    from transformers import AlbertModel

    torch.manual_seed(0)
    config = config_class(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    dense = AlbertModel(config)
    model = copy.deepcopy(dense)
    batches = [{k: v for k, v in b.items() if k != "label"} for b in loader_for("bert", n=8, batch_size=4)]
    callback = Recording(ratio=0.5)
    with pytest.warns(UserWarning, match="no repeated transformer blocks"):
        report = callback.compress(model, batches, progress=False)
    attention = "encoder.albert_layer_groups.0.albert_layers.0.attention.query"
    assert next(layer for layer in report.layers if layer.name == attention).rank is not None
    assert report.calibration_samples == 3 * 8 * 16  # the shared layer runs 3 times per forward
    group_of = _assert_statistics_match_reference(dense, model, callback.seen, batches)
    assert group_of[attention] == group_of[attention.replace("query", "value")]


class RoutedBlock(nn.Module):
    """Sends each token to one of two experts by the sign of a feature (data-dependent calls)."""

    def __init__(self):
        super().__init__()
        self.pre, self.expert_a, self.expert_b = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.pre(x)
        out = torch.zeros_like(h)
        chosen = h[..., 0] > 0
        out[chosen] = self.expert_a(h[chosen])
        out[~chosen] = self.expert_b(h[~chosen])
        return x + out


def test_data_dependent_calls_that_cannot_be_paired_are_refused():
    torch.manual_seed(0)
    model = Stack(RoutedBlock() for _ in range(2))
    state = _state(model)
    with pytest.raises(ValueError, match=r"'layers\.0\.expert_a' received .* calls .* routed MoE experts.*targets="):
        AASVD(ratio=0.9).compress(model, _vector_batches(n=32), progress=False)
    _assert_same_state(model, state)


# ---------------------------------------------------------------------- item 14: several stacks, MoE models
def _tiny_bart():
    config_class = _config_class("BartConfig")
    from transformers import BartForConditionalGeneration

    config = config_class(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return BartForConditionalGeneration(config)


def test_bart_default_targets_cover_encoder_and_decoder():
    torch.manual_seed(0)
    model = _tiny_bart()
    assert [n for n, _ in find_block_stacks(model)] == ["model.encoder.layers", "model.decoder.layers"]
    targets = resolve_targets(model)
    assert len([n for n in targets if ".encoder." in n]) == 2 * 6
    assert len([n for n in targets if ".decoder." in n]) == 2 * 10
    batches = [{k: v for k, v in b.items() if k != "label"} for b in loader_for("llama", n=8, batch_size=4)]
    SVDLLM(ratio=0.5, calibration_batches=2).compress(model, batches, progress=False)
    assert len(_lowrank(model)) == 32


def test_bart_two_stream_runs_encoder_then_decoder_with_compressed_encoder_outputs():
    torch.manual_seed(0)
    dense = _tiny_bart()
    model = copy.deepcopy(dense)
    batches = [{k: v for k, v in b.items() if k != "label"} for b in loader_for("llama", n=6, batch_size=3)]
    callback = Recording(ratio=0.5)
    callback.compress(model, batches, progress=False)
    assert len(callback.seen) == 32 and len(_lowrank(model)) == 32
    names = [name for name, _, _ in callback.seen]
    assert max(i for i, n in enumerate(names) if ".encoder." in n) < min(
        i for i, n in enumerate(names) if ".decoder." in n
    )
    # The decoder's cross-attention keys/values read the encoder output: X̂ is the compressed encoder's.
    cross = {name: stats for name, stats, _ in callback.seen if "encoder_attn.k_proj" in name}
    assert all((s["H"] - s["G"]).norm() > 1e-3 * s["G"].norm() for s in cross.values())
    _assert_statistics_match_reference(dense, model, callback.seen, batches)


def _default_targets_and_warnings(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        targets = resolve_targets(model)
    return targets, " ".join(str(w.message) for w in caught)


def _fused_experts(model):
    """transformers 5 fuses MoE experts into 3D parameters; older versions have one nn.Linear per expert."""
    return not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if ".experts." in n)


def test_mixtral_fused_experts_are_reported_not_skipped_silently():
    config_class = _config_class("MixtralConfig")
    from transformers import MixtralForCausalLM

    config = config_class(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(config)
    targets, warned = _default_targets_and_warnings(model)
    if _fused_experts(model):
        assert re.search(r"\d+% of the block parameters are not in nn\.Linear.*mlp\.experts \(MixtralExperts", warned)
        assert "mlp.gate (MixtralTopKRouter" in warned
        assert sorted({n.split(".")[-1] for n in targets}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    else:
        assert any(".experts." in n for n in targets)


def test_qwen2_moe_router_and_fused_experts_are_reported():
    config_class = _config_class("Qwen2MoeConfig")
    from transformers import Qwen2MoeForCausalLM

    config = config_class(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    )
    model = Qwen2MoeForCausalLM(config)
    targets, warned = _default_targets_and_warnings(model)
    assert "model.layers.1.mlp.shared_expert.down_proj" in targets  # the always-on shared expert is Linear
    if _fused_experts(model):
        assert re.search(r"mlp\.experts \(Qwen2MoeExperts.*mlp\.gate \(Qwen2MoeTopKRouter", warned)


def test_small_stacks_are_reported_not_targeted():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(TwiceBlock() for _ in range(2))
            self.probes = nn.ModuleList(nn.Sequential(nn.Linear(16, 2)) for _ in range(2))

        def forward(self, x):
            return x

    model = Model()
    for layer in model.layers:  # make the main stack much larger than the probe stack
        layer.fc = nn.Linear(16, 256)
        layer.out = nn.Linear(256, 16)
    with pytest.warns(UserWarning, match=r"skip the smaller repeated block stacks 'probes'.*targets="):
        targets = resolve_targets(model)
    assert all(n.startswith("layers.") for n in targets)


def test_interleaved_stacks_are_refused_for_two_stream():
    class Interleaved(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleList(TwiceBlock() for _ in range(2))
            self.ffn = nn.ModuleList(TwiceBlock() for _ in range(2))

        def forward(self, x):
            for attn, ffn in zip(self.attn, self.ffn, strict=True):
                x = ffn(attn(x))
            return x

    model = Interleaved()
    state = _state(model)
    assert len(resolve_targets(model)) == 8
    with pytest.raises(ValueError, match=r"interleaves the blocks of several stacks.*blocks="):
        AASVD(ratio=0.5).compress(model, _vector_batches(n=8), progress=False)
    _assert_same_state(model, state)
    AASVD(ratio=0.5, blocks="attn").compress(model, _vector_batches(n=8), progress=False)  # one stack is fine
    assert len(_lowrank(model)) == 4


# --------------------------------------------------------------------- item 15 (part): bad targets=/blocks=
class NoForward(nn.Module):
    """Resolving targets must not run the model."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(TwiceBlock() for _ in range(2))

    def forward(self, x):
        raise AssertionError("resolve_targets ran a forward pass")


@pytest.mark.parametrize(
    ("targets", "blocks", "match"),
    [
        ([], None, r"targets=\[\] is an empty list"),
        ((), None, r"targets=\(\) is an empty list"),
        ("", None, "empty pattern"),
        (["fc", ""], None, "empty pattern"),
        (5, None, "targets=5 is invalid"),
        (["fc", 3], None, r"targets=\['fc', 3\] is invalid"),
        ({"fc"}, None, "is invalid: use a regex string"),
        (None, 5, r"blocks=5 is invalid.*'model\.layers'"),
        (None, "", "blocks='' is invalid"),
        (None, ["layers"], r"blocks=\['layers'\] is invalid"),
        (None, "layers.0", "not a ModuleList"),
        (None, "nope", r"blocks='nope' is not a submodule.*\['layers'\]"),
        ("[", None, "not a valid regular expression"),
    ],
)
def test_bad_targets_and_blocks_are_clear_value_errors(targets, blocks, match):
    with pytest.raises(ValueError, match=match):
        resolve_targets(NoForward(), targets, blocks)


def test_empty_targets_list_through_compress_is_a_value_error_not_stop_iteration():
    module = TinyModule("llama")
    for method in (AASVD, SVDLLM):
        with pytest.raises(ValueError, match=r"targets=\[\]"):
            method(ratio=0.5, targets=[]).compress(module, loader_for("llama", n=4, batch_size=4), progress=False)
    assert not _lowrank(module)


def test_resolve_targets_is_cheap_and_silent_on_plain_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kind in ("llama", "gpt2", "bert", "vit"):
            resolve_targets(TinyModule(kind))
        assert len(resolve_targets(NoForward())) == 4
