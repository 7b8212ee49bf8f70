"""LowRankLinear, saving/loading compressed models, and Lightning checkpoint round trips."""

import copy
import json

import pytest
import torch
from conftest import BUILDERS, TinyModule, fast_trainer, loader_for, tiny_vit
from transformers.pytorch_utils import Conv1D

import prehab
from prehab import LowRankLinear, load_compressed, save_compressed
from prehab.callbacks import SVD, SVDLLM
from prehab.lowrank import dense_weight


def test_lowrank_linear_computes_up_down_with_bias():
    up, down, bias = torch.randn(5, 2), torch.randn(2, 7), torch.randn(5)
    layer = LowRankLinear.from_factors(up, down, bias, like=torch.empty(0))
    x = torch.randn(3, 7)
    torch.testing.assert_close(layer(x), x @ (up @ down).T + bias)
    assert layer.rank == 2 and layer.weight.shape == (5, 7) and layer.bias is layer.up.bias
    assert sum(p.numel() for p in layer.parameters()) == 2 * (5 + 7) + 5


def test_fast_path_matches_the_module_path_and_yields_to_hooks():
    """The functional forward gives the factors' own result bit for bit; any hook on a factor (or a global one)
    takes the module path, so hooks, peft wrappers and backward hooks still see the factors."""
    torch.manual_seed(0)
    layer = LowRankLinear(7, 5, 3, bias=True)
    x = torch.randn(2, 4, 7, requires_grad=True)
    fast = layer(x)
    assert torch.equal(fast, layer.up(layer.down(x)))
    fast.sum().backward()
    assert layer.down.weight.grad is not None and x.grad is not None
    seen = []
    handle = layer.down.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    layer(x)
    handle.remove()
    assert seen == [torch.Size([2, 4, 3])]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    layer(x)
    handle.remove()
    assert seen[1:] == ["Linear", "Linear", "LowRankLinear"]
    layer(x)
    assert len(seen) == 4  # hooks removed: the fast path again, nothing recorded


def test_conv1d_weight_orientation():
    conv = Conv1D(6, 4)  # nx=4 in, nf=6 out; weight stored 4 x 6
    x = torch.randn(3, 4)
    torch.testing.assert_close(conv(x), x @ dense_weight(conv).T + conv.bias)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_save_then_load_compressed_gives_identical_outputs(kind, tmp_path):
    module = TinyModule(kind)
    SVDLLM(ratio=0.4, calibration_batches=2).compress(module, loader_for(kind), progress=False)
    folder = save_compressed(module, tmp_path / kind, metadata={"method": "svd_llm", "ratio": 0.4})
    assert {"config.json", "prehab_model.safetensors", "prehab_compression.json"} <= {p.name for p in folder.iterdir()}
    info = json.loads((folder / "prehab_compression.json").read_text())
    assert info["method"] == "svd_llm" and info["library"] == "transformers"
    assert all(name.startswith(("model.layers", "transformer.h", "bert.encoder")) for name in info["lowrank_layers"])

    loaded = load_compressed(folder)
    assert type(loaded) is type(module.model)
    ids = torch.randint(3, 90, (2, 12))
    with torch.no_grad():
        module.eval()
        expected = module.model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == len(info["lowrank_layers"])
    assert loaded.prehab_compression["ratio"] == 0.4
    if kind == "gpt2":  # tied embeddings survive the de-duplicated safetensors file
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_timm_model_loads_into_a_skeleton(tmp_path):
    torch.manual_seed(0)
    vit = BUILDERS["vit"]()
    SVD(ratio=0.5).compress(vit, None, progress=False)
    save_compressed(vit, tmp_path / "vit")
    with pytest.raises(ValueError, match="pass model="):
        load_compressed(tmp_path / "vit")
    loaded = load_compressed(tmp_path / "vit", model=BUILDERS["vit"]())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), vit.eval()(x), rtol=0, atol=0)


def test_load_compressed_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prehab_compression.json"):
        load_compressed(tmp_path)
    vit = BUILDERS["vit"]()
    SVD(ratio=0.5).compress(vit, None, progress=False)
    save_compressed(vit, tmp_path / "vit")
    with pytest.raises(ValueError, match="same architecture"):
        load_compressed(tmp_path / "vit", model=tiny_vit(embed_dim=96))


def test_lightning_checkpoint_round_trip(tmp_path):
    module = TinyModule("llama")
    trainer = fast_trainer(tmp_path, [SVDLLM(ratio=0.5, calibration_batches=2)])
    trainer.fit(module, train_dataloaders=loader_for("llama"))
    path = tmp_path / "compressed.ckpt"
    trainer.save_checkpoint(path)
    ids = torch.randint(3, 90, (2, 12))
    with torch.no_grad():
        expected = module.eval()(ids)

    restored = prehab.load_from_checkpoint(TinyModule, path)
    assert isinstance(restored, TinyModule)
    assert isinstance(restored.model.model.layers[1].mlp.down_proj, LowRankLinear)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(ids), expected, rtol=0, atol=0)
    # A plain load_from_checkpoint cannot work (dense shapes) and says so through Lightning.
    with pytest.raises(RuntimeError):
        TinyModule.load_from_checkpoint(path)


def test_mixin_module_loads_with_plain_load_from_checkpoint(tmp_path):
    class MixedIn(prehab.LowRankCheckpointMixin, TinyModule):
        pass

    module = MixedIn("gpt2")
    SVD(ratio=0.5).compress(module, None, progress=False)
    trainer = fast_trainer(tmp_path, max_steps=1)
    trainer.fit(copy.deepcopy(module), train_dataloaders=loader_for("gpt2"))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = MixedIn.load_from_checkpoint(tmp_path / "m.ckpt")
    assert isinstance(restored.model.transformer.h[0].attn.c_attn, LowRankLinear)
