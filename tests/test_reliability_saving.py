"""Saving and loading compressed models under misuse: what is saved, dtypes, all-or-nothing loads,
corrupt or untrusted folders, atomic re-saves, and Lightning checkpoints without the callback."""

from __future__ import annotations

import builtins
import copy
import io
import json
import os
import pickle
import re
import shutil
import sys

import lightning.pytorch as pl
import pytest
import torch
from conftest import VOCAB, TinyModule, fast_trainer, loader_for, tiny_gpt2, tiny_llama, tiny_vit
from torch import nn

import prehab
from prehab import CompressedFolderError, LowRankLinear, PrehabModule, load_compressed, save_compressed
from prehab.lowrank import CHECKPOINT_KEY, lowrank_structure, lowrank_structure_from_state_dict, replace_module

IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


class SavedModule(TinyModule):
    """A module-level LightningModule class, as a user's would be (pickle finds it by name)."""


class HeadModule(pl.LightningModule):
    """A Hugging Face backbone plus a head of the module's own."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = tiny_llama()
        self.head = nn.Linear(VOCAB, 3)

    def forward(self, ids):
        return self.head(self.backbone(input_ids=ids).logits.mean(1))


class TeacherStudent(pl.LightningModule):
    """A frozen teacher and a student, both Hugging Face models; only the student gets compressed."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.teacher = tiny_llama().requires_grad_(False)
        self.student = tiny_llama()

    def forward(self, ids):
        return self.teacher(input_ids=ids).logits, self.student(input_ids=ids).logits


def compress(model: nn.Module, pattern: str = r"layers\.\d+\.", rank: int = 8) -> nn.Module:
    """Truncated SVD of the matching Linears (what the surgery callbacks leave behind, without their cost)."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.Linear) and re.search(pattern, name):
            u, s, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
            new = LowRankLinear.from_factors(u[:, :rank] * s[:rank], vh[:rank], layer.bias, like=layer.weight)
            replace_module(model, name, new)
    return model


def compressed_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return compress(tiny_llama()).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def snapshot(model: nn.Module) -> tuple[list, dict]:
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple[list, dict]) -> None:
    types, state = before
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """One compressed tiny Llama folder; tests that break it work on a copy."""
    folder = tmp_path_factory.mktemp("saved") / "llama"
    model = compressed_llama()
    save_compressed(model, folder, metadata={"method": "svd", "ratio": 0.5})
    return folder, logits(model)


@pytest.fixture
def folder_copy(llama_folder, tmp_path):
    return shutil.copytree(llama_folder[0], tmp_path / "copy")


def edit_info(folder, change) -> None:
    file = folder / "prehab_compression.json"
    info = json.loads(file.read_text())
    change(info)
    file.write_text(json.dumps(info))


# ------------------------------------------------------------------ 5 and 20: Lightning checkpoints
@pytest.fixture(scope="module")
def later_checkpoint(tmp_path_factory):
    """A compressed module trained on by a Trainer that never had a compression callback."""
    folder = tmp_path_factory.mktemp("ckpt")
    module = compress(SavedModule("llama"))
    trainer = fast_trainer(folder, max_steps=1)
    trainer.fit(module, train_dataloaders=loader_for("llama"))
    trainer.save_checkpoint(folder / "later.ckpt")
    with torch.no_grad():
        return folder / "later.ckpt", module.eval()(IDS), lowrank_structure(module)


def test_module_from_load_from_checkpoint_is_a_plain_instance_that_pickles(later_checkpoint, tmp_path):
    path, expected, structure = later_checkpoint
    checkpoint = torch.load(path, weights_only=False)
    checkpoint[CHECKPOINT_KEY] = structure  # as the compression callback records it
    torch.save(checkpoint, tmp_path / "c.ckpt")

    restored = prehab.load_from_checkpoint(SavedModule, tmp_path / "c.ckpt")
    assert type(restored) is SavedModule
    buffer = io.BytesIO()
    torch.save(restored, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert type(again) is SavedModule and type(pickle.loads(pickle.dumps(restored))) is SavedModule
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(IDS), expected, rtol=0, atol=0)


def test_checkpoint_written_without_the_compression_callback_reloads(later_checkpoint):
    path, expected, _ = later_checkpoint
    assert CHECKPOINT_KEY not in torch.load(path, weights_only=False)

    restored = prehab.load_from_checkpoint(SavedModule, path)
    assert isinstance(restored.model.model.layers[1].mlp.down_proj, LowRankLinear)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(IDS), expected, rtol=0, atol=0)


def test_structure_inference_leaves_user_modules_named_up_and_down_alone():
    class Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Linear(8, 2, bias=False), nn.Linear(2, 8)

    model = nn.Module()
    model.adapter, model.proj = Adapter(), nn.Linear(8, 8)
    state = {**model.state_dict(), "proj.down.weight": torch.zeros(3, 8), "proj.up.weight": torch.zeros(8, 3)}
    del state["proj.weight"]
    assert lowrank_structure_from_state_dict(model, state) == {
        "proj": {"in_features": 8, "out_features": 8, "rank": 3, "bias": False}
    }


def test_load_from_checkpoint_rejects_a_non_lightning_class(tmp_path):
    with pytest.raises(TypeError, match="module_class"):
        prehab.load_from_checkpoint(nn.Linear, tmp_path / "x.ckpt")


# ------------------------------------------------------------------ 7: what gets saved
def test_backbone_with_its_own_head_saves_the_whole_module(tmp_path):
    module = compress(HeadModule())
    save_compressed(module, tmp_path / "out")
    info = json.loads((tmp_path / "out" / "prehab_compression.json").read_text())
    assert info["library"] == "torch" and info["model_class"].endswith(".HeadModule")
    assert "backbone.model.layers.0.mlp.up_proj" in info["lowrank_layers"]
    with pytest.raises(ValueError, match="pass model="):
        load_compressed(tmp_path / "out")

    loaded = load_compressed(tmp_path / "out", model=HeadModule(seed=1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), module.eval()(IDS), rtol=0, atol=0)


def test_teacher_and_student_are_both_saved(tmp_path):
    module = compress(TeacherStudent(), r"^student\.model\.layers")
    save_compressed(module, tmp_path / "out")
    info = json.loads((tmp_path / "out" / "prehab_compression.json").read_text())
    assert info["library"] == "torch" and all(n.startswith("student.") for n in info["lowrank_layers"])

    loaded = load_compressed(tmp_path / "out", model=TeacherStudent(seed=1))
    with torch.no_grad():
        for got, expected in zip(loaded(IDS), module.eval()(IDS), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_prehab_module_saves_its_hugging_face_model_without_its_buffers(tmp_path):
    module = compress(PrehabModule(model=tiny_llama(), lam=0))
    module.whitening.register_buffer("model__layers__0__mlp__up_proj", torch.eye(32))
    save_compressed(module, tmp_path / "out")
    info = json.loads((tmp_path / "out" / "prehab_compression.json").read_text())
    assert info["library"] == "transformers" and info["saved_from"] == "model"
    torch.testing.assert_close(logits(load_compressed(tmp_path / "out")), logits(module.model), rtol=0, atol=0)


def test_prehab_module_with_a_timm_backbone_saves_the_timm_model(tmp_path):
    module = compress(PrehabModule(model=tiny_vit(), task="image_classification", num_labels=5, lam=0), r"blocks")
    module.whitening.register_buffer("blocks__0__mlp__fc1", torch.eye(48))
    save_compressed(module, tmp_path / "vit")
    info = json.loads((tmp_path / "vit" / "prehab_compression.json").read_text())
    assert info["library"] == "torch" and info["model_class"].startswith("timm.") and info["saved_from"] == "model"
    loaded = load_compressed(tmp_path / "vit", model=tiny_vit())  # a bare timm model, as the README says
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.model.eval()(x), rtol=0, atol=0)


# ------------------------------------------------------------------ 11: dtype, all-or-nothing, from_pretrained
def test_bfloat16_model_reloads_in_bfloat16(tmp_path):
    model = compressed_llama().to(torch.bfloat16)
    model.model.norm.weight.data = model.model.norm.weight.data.float()  # one tensor kept in float32
    save_compressed(model, tmp_path / "bf16")
    info = json.loads((tmp_path / "bf16" / "prehab_compression.json").read_text())
    assert info["dtype"] == "bfloat16" and info["dtypes"] == {"model.norm.weight": "float32"}

    loaded = load_compressed(tmp_path / "bf16")
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in model.state_dict().items()}
    model.model.norm.to(torch.bfloat16)  # a uniform dtype again to compare outputs
    loaded.model.norm.to(torch.bfloat16)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_failed_load_leaves_the_given_model_untouched(llama_folder, folder_copy, monkeypatch):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises((RuntimeError, AssertionError)):  # fails after every layer and weight was swapped in
        load_compressed(llama_folder[0], model=model, device="cuda:99")
    assert_unchanged(model, before)

    calls = []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        return original(*args, **kwargs)

    original = prehab.lowrank.replace_module
    monkeypatch.setattr(prehab.lowrank, "replace_module", fail_on_third)
    with pytest.raises(MemoryError):
        load_compressed(llama_folder[0], model=model)
    assert_unchanged(model, before)

    monkeypatch.undo()
    edit_info(folder_copy, lambda info: info.update(dtype="bfloat16"))  # structure fine, one rank wrong:
    edit_info(folder_copy, lambda info: info["lowrank_layers"]["model.layers.1.mlp.down_proj"].update(rank=3))
    with pytest.raises(CompressedFolderError, match="shape mismatch"):
        load_compressed(folder_copy, model=model)
    assert_unchanged(model, before)


def test_from_pretrained_refuses_a_lowrank_folder_but_loads_a_dense_one(llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    folder, expected = llama_folder
    with pytest.raises(ValueError, match="prehab_lowrank"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(OSError, match="model.safetensors"):
        LlamaForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(logits(load_compressed(folder)), expected, rtol=0, atol=0)

    dense = tiny_llama()
    save_compressed(dense, tmp_path / "dense")
    assert {p.name for p in (tmp_path / "dense").iterdir()} >= {"config.json", "model.safetensors"}
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")), logits(dense), rtol=0, atol=0
    )


# ------------------------------------------------------------------ 17: corrupt or mismatched folders
@pytest.mark.parametrize(
    ("breakage", "error", "match"),
    [
        ("bad_json", CompressedFolderError, r"prehab_compression\.json is not valid JSON"),
        ("no_layers", CompressedFolderError, r"'lowrank_layers' is missing .*LlamaForCausalLM"),
        ("no_rank", CompressedFolderError, r"'lowrank_layers\.model\.layers\.0\.mlp\.up_proj\.rank' is missing"),
        ("bad_library", CompressedFolderError, r"'library' is 'jax'; valid values: \['transformers', 'torch'\]"),
        ("wrong_class", CompressedFolderError, r"describes a 'llama' model .*GPT2LMHeadModel"),
        ("unknown_class", CompressedFolderError, r"NoSuchModel.*cannot be imported"),
        ("no_weights", FileNotFoundError, r"prehab_model\.safetensors is missing.*LlamaForCausalLM"),
        ("bad_weights", CompressedFolderError, r"prehab_model\.safetensors is not a readable safetensors file"),
        ("missing_tensor", CompressedFolderError, r"missing model\.layers\.0\.mlp\.up_proj\.down\.weight"),
        ("bad_config", CompressedFolderError, r"config\.json is not valid JSON .*LlamaForCausalLM"),
    ],
)
def test_corrupt_folders_name_the_file_and_field(folder_copy, breakage, error, match):
    from safetensors.torch import load_file, save_file

    weights = folder_copy / "prehab_model.safetensors"
    if breakage == "bad_json":
        (folder_copy / "prehab_compression.json").write_text('{"model_class": ')
    elif breakage == "no_layers":
        edit_info(folder_copy, lambda info: info.pop("lowrank_layers"))
    elif breakage == "no_rank":
        edit_info(folder_copy, lambda info: info["lowrank_layers"]["model.layers.0.mlp.up_proj"].pop("rank"))
    elif breakage == "bad_library":
        edit_info(folder_copy, lambda info: info.update(library="jax"))
    elif breakage == "wrong_class":
        edit_info(folder_copy, lambda info: info.update(model_class="transformers.GPT2LMHeadModel"))
    elif breakage == "unknown_class":
        edit_info(folder_copy, lambda info: info.update(model_class="transformers.NoSuchModel"))
    elif breakage == "no_weights":
        weights.unlink()
    elif breakage == "bad_weights":
        weights.write_bytes(b"not a safetensors file")
    elif breakage == "missing_tensor":
        tensors = load_file(weights)
        del tensors["model.layers.0.mlp.up_proj.down.weight"]
        save_file(tensors, weights)
    elif breakage == "bad_config":
        (folder_copy / "config.json").write_text("{")
    with pytest.raises(error, match=match):
        load_compressed(folder_copy)


def test_a_model_of_another_class_is_refused_by_name(llama_folder):
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(CompressedFolderError, match=r"holds a .*LlamaForCausalLM, but model= is a .*GPT2LMHeadModel"):
        load_compressed(llama_folder[0], model=model)
    assert_unchanged(model, before)


def test_folders_in_the_first_format_still_load(llama_folder, folder_copy):
    """Before format_version 2: model.safetensors, a plain config.json, no dtype fields."""
    (folder_copy / "prehab_model.safetensors").rename(folder_copy / "model.safetensors")
    config = json.loads((folder_copy / "config.json").read_text())
    config["model_type"] = config.pop("prehab_base_model_type")
    (folder_copy / "config.json").write_text(json.dumps(config))
    edit_info(folder_copy, lambda info: [info.pop(k) for k in ("format_version", "weights", "dtype", "dtypes")])
    torch.testing.assert_close(logits(load_compressed(folder_copy)), llama_folder[1], rtol=0, atol=0)


# ------------------------------------------------------------------ 21: untrusted folders
@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "transformers.pipeline", "evil_plugin.Model"])
def test_untrusted_model_class_is_never_imported_or_called(folder_copy, tmp_path, monkeypatch, name):
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    monkeypatch.setattr(builtins, "eval", lambda *a: called.append(a))
    (tmp_path / "evil_plugin.py").write_text("import builtins\nbuiltins.EVIL_IMPORTED = True\nModel = print\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    edit_info(folder_copy, lambda info: info.update(model_class=name))
    with pytest.raises(CompressedFolderError, match=f"model_class='{name}', which load_compressed will not build"):
        load_compressed(folder_copy)
    assert called == [] and not hasattr(builtins, "EVIL_IMPORTED") and "evil_plugin" not in sys.modules


def test_a_class_passed_explicitly_is_trusted(llama_folder):
    from transformers import LlamaForCausalLM

    folder, expected = llama_folder
    torch.testing.assert_close(logits(load_compressed(folder, model=LlamaForCausalLM)), expected, rtol=0, atol=0)


# ------------------------------------------------------------------ atomic saves, stale files
def test_resave_replaces_its_own_files_and_keeps_the_users(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    stale = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    users = ["report.json", "report.md", "spectra.png", "tokenizer.json", "notes.txt"]
    for name in stale + users:
        (folder / name).write_text("old")
    model = compressed_llama()
    save_compressed(model, folder)
    names = {p.name for p in folder.iterdir()}
    assert names == set(users) | {"config.json", "generation_config.json", "prehab_model.safetensors", COMPRESSION}
    assert all((folder / name).read_text() == "old" for name in users)
    torch.testing.assert_close(logits(load_compressed(folder)), logits(model), rtol=0, atol=0)

    dense = tiny_llama()  # re-saved without low-rank layers: a plain Hugging Face folder again
    save_compressed(dense, folder)
    assert "prehab_model.safetensors" not in {p.name for p in folder.iterdir()}
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    torch.testing.assert_close(logits(load_compressed(folder)), logits(dense), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


COMPRESSION = "prehab_compression.json"


def test_a_failed_save_leaves_the_folder_as_it_was(llama_folder, folder_copy, monkeypatch):
    before = {p.name: p.read_bytes() for p in folder_copy.iterdir()}

    def write_half_then_fail(model, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(prehab.lowrank, "save_model", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(tiny_llama(), folder_copy)
    assert {p.name: p.read_bytes() for p in folder_copy.iterdir()} == before
    assert [p.name for p in folder_copy.parent.iterdir()] == ["copy"]


def test_load_compressed_bad_device_is_refused_before_anything(llama_folder):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"device='gpu0'"):
        load_compressed(llama_folder[0], model=model, device="gpu0")
    assert_unchanged(model, before)


def test_save_compressed_bad_arguments(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="path="):
        save_compressed(tiny_llama(), tmp_path / "file")
    with pytest.raises(ValueError, match=r"metadata=.*\['lowrank_layers'\]"):
        save_compressed(tiny_llama(), tmp_path / "out", metadata={"lowrank_layers": {}})
    with pytest.raises(TypeError, match="model="):
        save_compressed(copy.deepcopy, tmp_path / "out")
    assert not (tmp_path / "out").exists()
