"""Low-rank modules, module surgery, and saving/loading compressed models.

``LowRankLinear`` replaces a dense ``nn.Linear`` (or transformers' GPT-2 ``Conv1D``) by two
``nn.Linear`` factors, ``down`` (in -> r) then ``up`` (r -> out), so peft's LoRA can target them by
name during rehab. A compressed model saves as a ``save_pretrained``-style folder that reloads
without the code that compressed it (:func:`save_compressed`, :func:`load_compressed`), and a
Lightning checkpoint of a compressed module reloads with :func:`load_from_checkpoint`.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules import module as _module_hooks

__all__ = [
    "COMPRESSION_FILE",
    "CompressedFolderError",
    "LowRankCheckpointMixin",
    "LowRankLinear",
    "apply_lowrank_structure",
    "dense_weight",
    "is_dense_linear",
    "load_compressed",
    "load_from_checkpoint",
    "lowrank_structure",
    "lowrank_structure_from_state_dict",
    "replace_module",
    "save_compressed",
    "untie_output_embeddings",
]

log = logging.getLogger("prehab")

COMPRESSION_FILE = "prehab_compression.json"
WEIGHTS_FILE = "model.safetensors"  # a folder without low-rank layers is a plain Hugging Face folder
LOWRANK_WEIGHTS_FILE = "prehab_model.safetensors"  # a name from_pretrained does not look for
HF_CONFIG_FILE = "config.json"
LOWRANK_MODEL_TYPE = "prehab_lowrank"  # config.json's model_type when the folder has low-rank layers
BASE_MODEL_TYPE_FIELD = "prehab_base_model_type"  # ... and the real one
CHECKPOINT_KEY = "prehab_lowrank"
FORMAT_VERSION = 2  # 1: folders from before the version field (model.safetensors, no dtype)
LIBRARIES = ("transformers", "torch")
TRUSTED_PACKAGES = ("transformers", "timm", "prehab")
RESERVED_FIELDS = frozenset(
    {"format_version", "model_class", "library", "saved_from", "weights", "dtype", "dtypes", "lowrank_layers"}
)
# What save_compressed owns in a folder: its own files, and every weight file transformers would load
# with the folder's config.json (those of an earlier save would contradict the new config).
OWNED_FILES = frozenset(
    {
        COMPRESSION_FILE,
        HF_CONFIG_FILE,
        "generation_config.json",
        WEIGHTS_FILE,
        LOWRANK_WEIGHTS_FILE,
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    }
)
_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_dense_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2 style, weight stored in x out)."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def dense_weight(module: nn.Module) -> Tensor:
    """The weight as ``out x in`` (``y = x Wᵀ + b``), whatever the module stores."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_dense_linear(module):  # Conv1D: y = x @ weight + bias, weight is in x out
        return module.weight.mT
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D layer.")


def _plain_linear(module: nn.Module) -> bool:
    """``module`` is an ``nn.Linear`` whose call would run nothing but its ``forward`` (no hooks of any kind)."""
    return (
        type(module) is nn.Linear
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (module._backward_hooks or module._backward_pre_hooks)
        and not (_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks)
        and not (_module_hooks._global_backward_hooks or _module_hooks._global_backward_pre_hooks)
    )


class LowRankLinear(nn.Module):
    """``y = up(down(x))`` with ``down``: in -> rank (no bias) and ``up``: rank -> out (+ bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}.")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, up: Tensor, down: Tensor, bias: Tensor | None, like: Tensor) -> LowRankLinear:
        """Build from ``up`` (out x r) and ``down`` (r x in), in ``like``'s dtype and device."""
        layer = cls(
            down.shape[1], up.shape[0], up.shape[1], bias=bias is not None, device=like.device, dtype=like.dtype
        )
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        down, up = self.down, self.up
        if _plain_linear(down) and _plain_linear(up):
            # Two functional calls skip two Module.__call__s: decode 0.91x -> 0.86x dense at 40% removed on CPU
            # (benchmarks/RESULTS.md §11). Wrapped factors (peft LoRA) and hooks keep the module path.
            return F.linear(F.linear(x, down.weight), up.weight, up.bias)
        return up(down(x))

    @property
    def weight(self) -> Tensor:
        """The dense product ``up @ down`` (out x in), for code that reads ``.weight`` directly."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted ``name``; returns the old one."""
    old = root.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
    return old


def storage_key(tensor: Tensor) -> object:
    """Two parameters with the same key are one weight (tied), also when they are distinct ``Parameter`` objects."""
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        pointer = 0
    if not pointer:  # meta tensors: only identity tells
        return id(tensor)
    return pointer, tensor.storage_offset(), tuple(tensor.shape), tensor.stride()


def untie_output_embeddings(model: nn.Module) -> bool:
    r"""Give a model's output layer (the LM head) its own copy of the weight it shares with the input embeddings.

    A tied head cannot be factored (the embeddings still need the full matrix, so the model would grow):
    untying first makes the head an ordinary target, e.g. ``targets=[r"layers\.", "lm_head"]``. The copy adds the
    head's parameters once (28 M for SmolLM2-135M) until it is compressed; the config's
    ``tie_word_embeddings`` is set to False so that ``save_pretrained``/:func:`save_compressed` keep both
    matrices and the folder reloads untied. Outputs are unchanged.

    Args:
        model: a transformers model (``get_input_embeddings``/``get_output_embeddings``).

    Returns:
        True when the weights were tied and are now two copies; False when there was nothing to untie.

    Raises:
        ValueError: ``model`` has no output or input embeddings to untie.
    """
    getters = ("get_input_embeddings", "get_output_embeddings")
    layers = [getattr(model, getter, lambda: None)() for getter in getters]
    if any(layer is None or not isinstance(getattr(layer, "weight", None), Tensor) for layer in layers):
        raise ValueError(
            f"untie_output_embeddings: {type(model).__name__} has no input and output embeddings with weights "
            "(get_input_embeddings()/get_output_embeddings()); nothing can be untied. Name the head to compress "
            "with targets= if it is already a separate Linear."
        )
    embeddings, head = layers
    if storage_key(embeddings.weight) != storage_key(head.weight):  # the same test as the targets' tied check
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    config = getattr(model, "config", None)
    for part in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c}.values():
        if hasattr(part, "tie_word_embeddings"):
            part.tie_word_embeddings = False
    return True


def lowrank_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Shape of every ``LowRankLinear`` in ``model``: ``{name: {in, out, rank, bias}}``."""
    return {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "rank": m.rank,
            "bias": m.up.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, LowRankLinear)
    }


def _check_structure(model: nn.Module, structure: dict[str, dict[str, Any]], source: str) -> None:
    """Raise before anything is replaced when ``structure`` does not fit ``model``."""
    for name, spec in structure.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{source} records a low-rank layer {name!r} but {type(model).__name__} has no such submodule; "
                "is it the same architecture?"
            ) from None
        if isinstance(old, LowRankLinear):
            if old.rank != spec["rank"]:
                raise ValueError(f"{name} already has rank {old.rank}, {source} records rank {spec['rank']}.")
            continue
        if not is_dense_linear(old):
            raise ValueError(
                f"{source} records a low-rank layer {name!r} but that module is a {type(old).__name__}, not a "
                "Linear/Conv1D layer; is it the same architecture?"
            )
        shape = tuple(dense_weight(old).shape)
        if shape != (spec["out_features"], spec["in_features"]):
            raise ValueError(
                f"{name}: the model has shape {shape} but the saved low-rank layer expects "
                f"{(spec['out_features'], spec['in_features'])}; is it the same architecture?"
            )


def apply_lowrank_structure(
    model: nn.Module, structure: dict[str, dict[str, Any]], source: str = "the saved model"
) -> dict[str, nn.Module]:
    """Replace the named dense layers by empty ``LowRankLinear`` of the recorded shape (before loading).

    Every layer is checked before the first one is replaced, so a mismatch leaves ``model`` as it was.

    Args:
        model: the dense (or already partly low-rank) model.
        structure: ``{name: {in_features, out_features, rank, bias}}`` as :func:`lowrank_structure` returns.
        source: what recorded ``structure``, for error messages.

    Returns:
        The replaced dense modules by name (layers that were already low-rank are not listed).
    """
    _check_structure(model, structure, source)
    replaced = {}
    for name, spec in structure.items():
        old = model.get_submodule(name)
        if isinstance(old, LowRankLinear):
            continue
        weight = dense_weight(old)
        new = LowRankLinear(
            spec["in_features"],
            spec["out_features"],
            spec["rank"],
            bias=spec["bias"],
            device=weight.device,
            dtype=weight.dtype,
        )
        replaced[name] = replace_module(model, name, new)
    return replaced


def lowrank_structure_from_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    """Infer the low-rank layers of a state dict saved without a structure record.

    A layer counts as low-rank when ``state_dict`` holds ``<name>.down.weight`` (r x in) and
    ``<name>.up.weight`` (out x r) but no ``<name>.weight``, and ``model`` has a dense Linear/Conv1D
    (or a ``LowRankLinear``) at ``<name>``; modules of the user's own that happen to have ``down``/``up``
    children are left alone.

    Args:
        model: the freshly built (dense) model the state dict is for.
        state_dict: the saved state dict (only key names and shapes are read).

    Returns:
        ``{name: {in_features, out_features, rank, bias}}``, as :func:`lowrank_structure`.
    """
    structure = {}
    for key, down in state_dict.items():
        if not key.endswith(".down.weight"):
            continue
        name = key[: -len(".down.weight")]
        up = state_dict.get(f"{name}.up.weight")
        if up is None or f"{name}.weight" in state_dict or down.ndim != 2 or up.ndim != 2:
            continue
        if up.shape[1] != down.shape[0]:
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if is_dense_linear(module) or isinstance(module, LowRankLinear):
            structure[name] = {
                "in_features": int(down.shape[1]),
                "out_features": int(up.shape[0]),
                "rank": int(down.shape[0]),
                "bias": f"{name}.up.bias" in state_dict,
            }
    return structure


# ---------------------------------------------------------------------------------------- saving
def _is_hf_model(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def _is_timm_model(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "timm"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _saved_root(model: nn.Module) -> tuple[str, nn.Module, str]:
    """(name inside ``model``, module to save, library): see :func:`save_compressed` for the rule."""
    params = {id(p) for p in model.parameters()}
    for name, module in model.named_modules():  # pre-order: the outermost candidate comes first
        if (_is_hf_model(module) or _is_timm_model(module)) and {id(p) for p in module.parameters()} == params:
            return name, module, "transformers" if _is_hf_model(module) else "torch"
    return "", model, "torch"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_record(state: dict[str, Tensor]) -> tuple[str | None, dict[str, str]]:
    """The most common floating dtype of ``state`` and the tensors that differ from it."""
    floating = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
    if not floating:
        return None, {}
    sizes: Counter[torch.dtype] = Counter()
    for key, dtype in floating.items():
        sizes[dtype] += state[key].numel()  # by size: many small float32 norms do not outvote the matrices
    main = max(sizes, key=sizes.__getitem__)
    return _dtype_name(main), {k: _dtype_name(d) for k, d in floating.items() if d != main}


def _owned_files(folder: Path) -> set[str]:
    """Files in ``folder`` that :func:`save_compressed` owns (and so replaces or removes on a re-save)."""
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if p.is_file() and (p.name in OWNED_FILES or _SHARD.fullmatch(p.name))}


def save_compressed(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Save a (partially) low-rank model as a reloadable folder.

    What is saved: if all of ``model``'s parameters live inside one Hugging Face ``PreTrainedModel``
    (``model`` itself, or e.g. a ``PrehabModule``/LightningModule whose only parameters are its ``.model``),
    that model is saved as a Hugging Face folder (library ``"transformers"``) that
    :func:`load_compressed` rebuilds with no code; buffers outside it (``PrehabModule``'s ``whitening.*``
    Cholesky factors, metric states) are not saved. Likewise, if they all live inside one timm model,
    that model is saved (library ``"torch"``). Otherwise, e.g. a LightningModule with a Hugging Face
    backbone plus its own head, or one holding a teacher and a student, the whole ``model`` is saved
    (library ``"torch"``) and reloads with ``load_compressed(path, model=<an uncompressed instance of the
    same class>)``. To save one part only, pass that part.

    Files (the ones ``save_compressed`` owns in ``path``):

    - the weights, ``model.safetensors`` when the model has no low-rank layer, else
      ``prehab_model.safetensors``;
    - ``config.json`` (Hugging Face models; with low-rank layers its ``model_type`` is
      ``"prehab_lowrank"``, the original under ``"prehab_base_model_type"``, so that
      ``AutoModel.from_pretrained`` fails loudly instead of loading random dense layers; without
      low-rank layers the folder is a plain Hugging Face folder);
    - ``generation_config.json`` (Hugging Face models that generate);
    - ``prehab_compression.json``: ``metadata`` plus the saved class, library, weights file, dtype(s)
      and the low-rank layer shapes.

    The folder is written atomically: everything goes to a temporary folder next to ``path`` first, then
    replaces these files; other Hugging Face weight files (``model*.safetensors``, ``pytorch_model*.bin``
    and their shard indexes) left by an earlier save are removed, since they would contradict the new
    ``config.json``. Any other file in ``path`` (``report.json``, plots, a tokenizer, ...) is kept.

    Args:
        model: the model or LightningModule to save.
        path: the folder (created if missing).
        metadata: JSON-serializable extra fields for ``prehab_compression.json`` (method, ratio, report).

    Returns:
        The folder.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_compressed(model=...) needs an nn.Module, got {type(model).__name__}.")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"save_compressed(path={str(path)!r}): that is a file; pass a folder.")
    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & RESERVED_FIELDS)
    if clash:
        raise ValueError(
            f"save_compressed(metadata=...) may not set {clash}: save_compressed writes those fields itself; "
            "rename them."
        )
    name, root, library = _saved_root(model)
    structure = lowrank_structure(root)
    state = root.state_dict()
    dtype, dtypes = _dtype_record(state)
    weights = LOWRANK_WEIGHTS_FILE if structure else WEIGHTS_FILE
    info: dict[str, Any] = {
        **metadata,
        "format_version": FORMAT_VERSION,
        "model_class": _class_path(type(root)),
        "library": library,
        "saved_from": name,
        "weights": weights,
        "dtype": dtype,
        "dtypes": dtypes,
        "lowrank_layers": structure,
    }
    text = json.dumps(info, indent=2, default=str)  # fails here, before any file is written

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    try:
        save_model(root, str(staging / weights))  # de-duplicates tied weights
        if library == "transformers":
            _save_hf_files(root, staging, dtype, lowrank=bool(structure))
        (staging / COMPRESSION_FILE).write_text(text)
        written = sorted(p.name for p in staging.iterdir())
        path.mkdir(exist_ok=True)
        stale = _owned_files(path) - set(written)
        # The weights first and prehab_compression.json last: a folder is never described by a JSON
        # whose weights are missing.
        for file in sorted(written, key=lambda f: f == COMPRESSION_FILE):
            os.replace(staging / file, path / file)
        for file in stale:
            (path / file).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _save_hf_files(root: nn.Module, folder: Path, dtype: str | None, lowrank: bool) -> None:
    """``config.json`` (with the low-rank marker when needed) and ``generation_config.json``."""
    config = copy.deepcopy(root.config)
    config.architectures = [type(root).__name__]
    if dtype is not None:  # what from_pretrained(dtype="auto") reads; the attribute is torch_dtype before v5
        setattr(config, "dtype" if "dtype" in vars(config) else "torch_dtype", getattr(torch, dtype))
    config.save_pretrained(folder)
    if lowrank:
        config_file = folder / HF_CONFIG_FILE
        fields = json.loads(config_file.read_text())
        fields[BASE_MODEL_TYPE_FIELD] = fields.get("model_type")
        fields["model_type"] = LOWRANK_MODEL_TYPE
        config_file.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    generation = getattr(root, "generation_config", None)
    if generation is not None and root.can_generate():
        try:
            generation.save_pretrained(folder)
        except ValueError as error:  # transformers refuses to save an inconsistent one; the model matters more
            log.warning("generation_config.json not written: %s", error)


# ---------------------------------------------------------------------------------------- loading
class CompressedFolderError(ValueError):
    """A folder written by :func:`save_compressed` is corrupt or does not match the model given."""


def _read_json(file: Path, saved: str | None = None) -> dict[str, Any]:
    holds = f" (the folder holds a {saved})" if saved else ""
    try:
        fields = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CompressedFolderError(
            f"{file} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}){holds}; "
            "the folder is corrupt: save it again with save_compressed()."
        ) from None
    if not isinstance(fields, dict):
        raise CompressedFolderError(f"{file} holds a {type(fields).__name__}, not a JSON object{holds}.")
    return fields


def _read_info(path: Path) -> dict[str, Any]:
    """``prehab_compression.json``, checked field by field."""
    info_file = path / COMPRESSION_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"path={str(path)!r} has no {COMPRESSION_FILE}; save it with save_compressed().")
    info = _read_json(info_file)
    saved = info.get("model_class", "<unknown>")

    def bad(field: str, problem: str) -> CompressedFolderError:
        return CompressedFolderError(f"{info_file}: field {field!r} {problem} (the folder holds a {saved}).")

    version = info.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise bad("format_version", f"is {version!r}; this prehab reads versions up to {FORMAT_VERSION}: upgrade it")
    for field in ("model_class", "library", "lowrank_layers"):
        if field not in info:
            raise bad(field, "is missing")
    if not isinstance(info["model_class"], str) or "." not in info["model_class"]:
        raise bad("model_class", f"must be a dotted class path like 'transformers.LlamaForCausalLM', got {saved!r}")
    if info["library"] not in LIBRARIES:
        raise bad("library", f"is {info['library']!r}; valid values: {list(LIBRARIES)}")
    weights = info.setdefault("weights", WEIGHTS_FILE)
    if weights not in (WEIGHTS_FILE, LOWRANK_WEIGHTS_FILE):  # a file name, never a path out of the folder
        raise bad("weights", f"is {weights!r}; valid values: {[WEIGHTS_FILE, LOWRANK_WEIGHTS_FILE]}")
    dtypes = info.setdefault("dtypes", {})
    if not isinstance(dtypes, dict):
        raise bad("dtypes", f"must map tensor names to dtypes, got a {type(dtypes).__name__}")
    for field, value in [("dtype", info.get("dtype")), *((f"dtypes.{k}", v) for k, v in dtypes.items())]:
        if value is not None and not isinstance(getattr(torch, str(value), None), torch.dtype):
            raise bad(field, f"is {value!r}, not a torch dtype such as 'float32' or 'bfloat16'")
    layers = info["lowrank_layers"]
    if not isinstance(layers, dict):
        raise bad("lowrank_layers", f"must map layer names to shapes, got a {type(layers).__name__}")
    for name, spec in layers.items():
        if not isinstance(spec, dict):
            raise bad(f"lowrank_layers.{name}", f"must be an object, got {spec!r}")
        for key in ("in_features", "out_features", "rank", "bias"):
            if key not in spec:
                raise bad(f"lowrank_layers.{name}.{key}", "is missing")
            kind = bool if key == "bias" else int
            if not isinstance(spec[key], kind) or (kind is int and (isinstance(spec[key], bool) or spec[key] < 1)):
                raise bad(
                    f"lowrank_layers.{name}.{key}", f"must be a {'boolean' if kind is bool else 'positive integer'}"
                )
    return info


def _import_saved_class(model_class: str, source: Path) -> type:
    """The Hugging Face class named in the folder, refusing anything outside the trusted libraries.

    The name comes from a file that may be untrusted: check the package before importing anything,
    and the result before calling it.
    """
    module_name, _, class_name = model_class.rpartition(".")
    refused = CompressedFolderError(
        f"{source} names model_class={model_class!r}, which load_compressed will not build: only "
        f"transformers PreTrainedModel classes are built from a folder (trusted packages: "
        f"{list(TRUSTED_PACKAGES)}). If you trust this folder, pass the class or an uncompressed instance "
        "yourself: load_compressed(path, model=...)."
    )
    if module_name.split(".")[0] not in TRUSTED_PACKAGES or class_name.startswith("_"):
        raise refused
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        cls = None
    if cls is None and module_name.startswith("transformers"):  # the class moved between versions
        import transformers

        cls = getattr(transformers, class_name, None) if hasattr(transformers, class_name) else None
    if cls is None:
        raise CompressedFolderError(
            f"{source} names model_class={model_class!r}, which cannot be imported here (another transformers "
            "version?); pass model= the class or an uncompressed instance."
        )
    from transformers import PreTrainedModel

    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise refused
    return cls


def _check_class(given: type, saved: str, source: Path) -> None:
    if saved not in {_class_path(c) for c in given.__mro__}:
        short = saved.rpartition(".")[2]
        raise CompressedFolderError(
            f"{source} holds a {saved}, but model= is a {_class_path(given)}; pass an uncompressed {short} "
            f"(or its class). Folders saved from a LightningModule hold its Hugging Face/timm model when it "
            "has no other parameters."
        )


def _build_hf(cls: type, path: Path, info: dict[str, Any]) -> nn.Module:
    """A dense ``cls`` from the folder's ``config.json`` (undoing the low-rank marker)."""
    config_file = path / HF_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} has no {HF_CONFIG_FILE}, which a {info['model_class']} needs; the folder is incomplete: "
            "save it again with save_compressed(), or pass model= an uncompressed instance."
        )
    fields = _read_json(config_file, info["model_class"])
    if fields.get("model_type") == LOWRANK_MODEL_TYPE:
        if BASE_MODEL_TYPE_FIELD not in fields:
            raise CompressedFolderError(f"{config_file}: field {BASE_MODEL_TYPE_FIELD!r} is missing.")
        fields["model_type"] = fields.pop(BASE_MODEL_TYPE_FIELD)
    expected = getattr(cls.config_class, "model_type", "")
    if expected and fields.get("model_type") != expected:
        raise CompressedFolderError(
            f"{config_file} describes a {fields.get('model_type')!r} model but {COMPRESSION_FILE} names "
            f"{info['model_class']} (model type {expected!r}); the folder is inconsistent."
        )
    config = cls.config_class.from_dict(fields)
    return cls(config)


def _check_weights(
    model: nn.Module, structure: dict[str, dict[str, Any]], tensors: dict[str, Tensor], file: Path, saved: str
) -> None:
    """Every key and shape of ``tensors`` against ``model`` once ``structure`` is applied, before any change."""
    current = model.state_dict(keep_vars=True)
    expected = {key: tuple(t.shape) for key, t in current.items()}
    for name, spec in structure.items():
        if isinstance(model.get_submodule(name), LowRankLinear):
            continue
        expected.pop(f"{name}.weight", None)
        expected.pop(f"{name}.bias", None)
        expected[f"{name}.down.weight"] = (spec["rank"], spec["in_features"])
        expected[f"{name}.up.weight"] = (spec["out_features"], spec["rank"])
        if spec["bias"]:
            expected[f"{name}.up.bias"] = (spec["out_features"],)
    stored = {id(current[k]) for k in tensors if k in current}
    # safetensors keeps one name of tied tensors: the others are not missing
    missing = [k for k in expected if k not in tensors and not (k in current and id(current[k]) in stored)]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [
        f"{k}: file {tuple(t.shape)}, model {expected[k]}"
        for k, t in tensors.items()
        if k in expected and tuple(t.shape) != expected[k]
    ]
    if missing or unexpected or shapes:

        def some(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

        problems = [
            f"missing {some(missing)}" if missing else "",
            f"unexpected {some(unexpected)}" if unexpected else "",
            f"shape mismatch {some(shapes)}" if shapes else "",
        ]
        raise CompressedFolderError(
            f"{file} does not match the model ({saved}, with the low-rank layers of {COMPRESSION_FILE}): "
            f"{'; '.join(p for p in problems if p)}. Pass model= an uncompressed instance of the saved "
            "architecture, or save the folder again with save_compressed()."
        )


@contextmanager
def _restored_on_failure(model: nn.Module) -> Iterator[None]:
    """Put back every submodule, parameter and buffer of ``model`` if the block raises (no data is copied)."""
    modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    data = [
        (t, t.data) for m, _, params, buffers in modules for t in (*params.values(), *buffers.values()) if t is not None
    ]
    try:
        yield
    except BaseException:
        for module, children, params, buffers in modules:
            for attribute, saved in (("_modules", children), ("_parameters", params), ("_buffers", buffers)):
                getattr(module, attribute).clear()
                getattr(module, attribute).update(saved)
        for tensor, value in data:
            tensor.data = value
        raise


def load_compressed(
    path: str | Path, model: nn.Module | type | None = None, device: str | torch.device | None = None
) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`.

    Everything in the folder is checked (the JSON fields, the class, every weight's name and shape)
    before ``model`` is touched, and a failure after that puts ``model`` back as it was.

    Args:
        path: folder written by ``save_compressed``.
        model: an uncompressed instance of the saved architecture to fill in (needed for library
            ``"torch"`` folders: timm models, plain ``nn.Module``s, whole LightningModules), or the class
            to build from the folder's ``config.json`` (a Hugging Face class of your own). Without it, only
            ``transformers`` ``PreTrainedModel`` classes are built: the folder names its class, and an
            untrusted folder must not make us import or call anything else.
        device: where the model ends up (default: CPU for a model built here, the given model's device
            otherwise).

    Returns:
        The model, in ``eval()`` mode, in the dtype(s) it was saved in, with the folder's metadata as
        ``.prehab_compression``.
    """
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"load_compressed(device={device!r}) is not a device ({error}); e.g. 'cpu', 'cuda:0'."
            ) from None
    path = Path(path)
    info = _read_info(path)
    info_file = path / COMPRESSION_FILE
    saved = info["model_class"]
    weights_file = path / info["weights"]
    if not weights_file.is_file():
        raise FileNotFoundError(
            f"{weights_file} is missing: {info_file} says the weights of the {saved} are there; the folder is "
            "incomplete: save it again with save_compressed()."
        )
    if isinstance(model, type):
        _check_class(model, saved, info_file)
        if info["library"] != "transformers":
            raise TypeError(
                f"{info_file} holds a {saved} (library 'torch'), which cannot be built from the folder: "
                "pass model= an uncompressed instance, not the class."
            )
        model = _build_hf(model, path, info)
    elif model is None:
        if info["library"] != "transformers":
            raise ValueError(
                f"{path} holds a {saved} (not a Hugging Face model); pass model= an uncompressed instance of that "
                "architecture to load_compressed()."
            )
        model = _build_hf(_import_saved_class(saved, info_file), path, info)
    elif isinstance(model, nn.Module):
        _check_class(type(model), saved, info_file)
    else:
        raise TypeError(f"load_compressed(model=...) takes an nn.Module, a class or None, got {type(model).__name__}.")

    structure = info["lowrank_layers"]
    _check_structure(model, structure, str(info_file))
    try:
        tensors = load_file(weights_file, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CompressedFolderError(f"{weights_file} is not a readable safetensors file ({error}).") from None
    _check_weights(model, structure, tensors, weights_file, saved)
    generation = None
    if (path / "generation_config.json").is_file() and _is_hf_model(model) and model.can_generate():
        from transformers import GenerationConfig

        generation = GenerationConfig.from_pretrained(path)

    dtype = getattr(torch, info["dtype"]) if info.get("dtype") else None
    dtypes = {k: getattr(torch, v) for k, v in info.get("dtypes", {}).items()}
    with _restored_on_failure(model), torch.no_grad():
        apply_lowrank_structure(model, structure, str(info_file))
        if dtype is not None:  # non-persistent buffers (rotary tables) follow the model's dtype, as when saved
            model.to(dtype)
        current = model.state_dict(keep_vars=True)
        for key, value in tensors.items():
            target = current[key]
            if dtype is None:  # a folder from before dtypes were recorded: keep the model's
                wanted = target.dtype
            else:
                wanted = dtypes.get(key, dtype if value.is_floating_point() else value.dtype)
            target.data = value.to(device=target.device, dtype=wanted)
        if device is not None:
            model.to(device)
    if generation is not None:
        model.generation_config = generation
    model.prehab_compression = {k: v for k, v in info.items() if k != "lowrank_layers"}
    return model.eval()


# ---------------------------------------------------------------------------------------- Lightning checkpoints
class LowRankCheckpointMixin:
    """Mix into a LightningModule so its checkpoints keep low-rank layers through ``load_from_checkpoint``.

    Lightning calls ``on_load_checkpoint`` before ``load_state_dict``, which is the moment to give
    the freshly built dense module the saved low-rank shapes: the ones recorded under
    ``"prehab_lowrank"`` (by the compression callbacks or this mixin), else the ones the state dict
    implies (a checkpoint written by a Trainer that never had a compression callback).
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        structure = lowrank_structure(self)  # type: ignore[arg-type]
        if structure:
            checkpoint[CHECKPOINT_KEY] = structure

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        structure = checkpoint.get(CHECKPOINT_KEY)
        if structure is None:
            structure = lowrank_structure_from_state_dict(self, checkpoint.get("state_dict", {}))  # type: ignore[arg-type]
        if structure:
            apply_lowrank_structure(self, structure, "the checkpoint")  # type: ignore[arg-type]


def load_from_checkpoint(module_class: type, checkpoint_path: str | Path, **kwargs: Any) -> nn.Module:
    """``module_class.load_from_checkpoint`` for a checkpoint of a compressed model.

    Works for any LightningModule class, also one that knows nothing of prehab, and for checkpoints
    written with or without a compression callback in the Trainer: the low-rank shapes recorded in the
    checkpoint, or else inferred from its state dict, are applied before the weights load.

    Args:
        module_class: the LightningModule class.
        checkpoint_path: the ``.ckpt`` file.
        **kwargs: passed to ``load_from_checkpoint`` (``map_location``, ``strict``, hyperparameter overrides).

    Returns:
        A plain instance of ``module_class`` (it pickles, ``torch.save``s and deep-copies like any other).
    """
    from lightning.pytorch import LightningModule

    if not (isinstance(module_class, type) and issubclass(module_class, LightningModule)):
        raise TypeError(
            f"load_from_checkpoint(module_class=...) takes a LightningModule class, got {module_class!r}; "
            "for a folder written by save_compressed use prehab.load_compressed."
        )
    if issubclass(module_class, LowRankCheckpointMixin):
        return module_class.load_from_checkpoint(checkpoint_path, **kwargs)
    # Lightning builds the module and calls its on_load_checkpoint before loading the state dict; a
    # throwaway subclass adds the mixin's hook, then the instance becomes a plain module_class again
    # (the subclass adds no state), so pickle finds its class by name.
    patched = type(module_class.__name__, (LowRankCheckpointMixin, module_class), {})
    patched.__module__ = module_class.__module__
    patched.__qualname__ = module_class.__qualname__
    module = patched.load_from_checkpoint(checkpoint_path, **kwargs)
    module.__class__ = module_class
    return module
