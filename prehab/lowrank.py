"""Low-rank modules, module surgery, and saving/loading compressed models.

``LowRankLinear`` replaces a dense ``nn.Linear`` (or transformers' GPT-2 ``Conv1D``) by two
``nn.Linear`` factors, ``down`` (in -> r) then ``up`` (r -> out), so peft's LoRA can target them by
name during rehab. A compressed model saves as a ``save_pretrained``-style folder that reloads
without the code that compressed it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

__all__ = [
    "COMPRESSION_FILE",
    "LowRankCheckpointMixin",
    "LowRankLinear",
    "apply_lowrank_structure",
    "dense_weight",
    "is_dense_linear",
    "load_compressed",
    "load_from_checkpoint",
    "lowrank_structure",
    "replace_module",
    "save_compressed",
]

COMPRESSION_FILE = "prehab_compression.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_KEY = "prehab_lowrank"


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
        return self.up(self.down(x))

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


def apply_lowrank_structure(model: nn.Module, structure: dict[str, dict[str, Any]]) -> None:
    """Replace the named dense layers by empty ``LowRankLinear`` of the recorded shape (before loading)."""
    for name, spec in structure.items():
        old = model.get_submodule(name)
        if isinstance(old, LowRankLinear):
            if old.rank != spec["rank"]:
                raise ValueError(f"{name} already has rank {old.rank}, the saved model has {spec['rank']}.")
            continue
        weight = dense_weight(old)
        if tuple(weight.shape) != (spec["out_features"], spec["in_features"]):
            raise ValueError(
                f"{name}: the model has shape {tuple(weight.shape)} but the saved low-rank layer expects "
                f"{(spec['out_features'], spec['in_features'])}; is it the same architecture?"
            )
        replace_module(
            model,
            name,
            LowRankLinear(
                spec["in_features"],
                spec["out_features"],
                spec["rank"],
                bias=spec["bias"],
                device=weight.device,
                dtype=weight.dtype,
            ),
        )


def _find_pretrained(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost Hugging Face ``PreTrainedModel`` inside ``model`` (or ``model`` itself)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return None
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return name, module
    return None


def save_compressed(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Save a (partially) low-rank model as a reloadable folder.

    Writes ``model.safetensors``, the model's own ``config.json`` when it is (or wraps) a Hugging Face
    model, and ``prehab_compression.json`` with the low-rank layer shapes plus ``metadata`` (method,
    ratio, per-layer rank, damping, ...). When ``model`` wraps a Hugging Face model (e.g. a
    LightningModule with a ``.model``), the inner model is what gets saved, under its own names.

    Returns:
        The folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    found = _find_pretrained(model)
    root = found[1] if found else model
    info: dict[str, Any] = dict(metadata or {})
    info["model_class"] = f"{type(root).__module__}.{type(root).__qualname__}"
    info["library"] = "transformers" if found else "torch"
    info["lowrank_layers"] = lowrank_structure(root)
    if found:
        root.config.save_pretrained(path)
    save_model(root, str(path / WEIGHTS_FILE))  # de-duplicates tied weights
    (path / COMPRESSION_FILE).write_text(json.dumps(info, indent=2, default=str))
    return path


def load_compressed(path: str | Path, model: nn.Module | None = None, device: str | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`.

    Args:
        path: folder written by ``save_compressed``.
        model: an uncompressed instance of the same architecture to fill in. Needed for models
            that are not Hugging Face models (timm, plain ``nn.Module``); optional otherwise.
        device: where to load the weights (default CPU).
    """
    path = Path(path)
    info_file = path / COMPRESSION_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"path={str(path)!r} has no {COMPRESSION_FILE}; save it with save_compressed().")
    info = json.loads(info_file.read_text())
    if model is None:
        if info.get("library") != "transformers":
            raise ValueError(
                f"{path} holds a {info.get('model_class')} (not a Hugging Face model); pass model= an "
                "uncompressed instance of that architecture to load_compressed()."
            )
        from transformers import AutoConfig

        module_name, _, class_name = info["model_class"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        model = cls(AutoConfig.from_pretrained(path))
    apply_lowrank_structure(model, info["lowrank_layers"])
    load_model(model, str(path / WEIGHTS_FILE), strict=True, device=device or "cpu")
    model.prehab_compression = {k: v for k, v in info.items() if k != "lowrank_layers"}
    return model.eval()


class LowRankCheckpointMixin:
    """Mix into a LightningModule so its checkpoints keep low-rank layers through ``load_from_checkpoint``.

    Lightning calls ``on_load_checkpoint`` before ``load_state_dict``, which is the moment to give
    the freshly built dense module the saved low-rank shapes.
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        structure = lowrank_structure(self)  # type: ignore[arg-type]
        if structure:
            checkpoint[CHECKPOINT_KEY] = structure

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        if CHECKPOINT_KEY in checkpoint:
            apply_lowrank_structure(self, checkpoint[CHECKPOINT_KEY])  # type: ignore[arg-type]


def load_from_checkpoint(module_class: type, checkpoint_path: str | Path, **kwargs: Any) -> nn.Module:
    """``module_class.load_from_checkpoint`` for a checkpoint of a compressed model.

    Works for any LightningModule class, also one that knows nothing of prehab: the low-rank shapes
    recorded in the checkpoint (by the compression callback or :class:`LowRankCheckpointMixin`) are
    applied before the weights load.
    """
    if issubclass(module_class, LowRankCheckpointMixin):
        return module_class.load_from_checkpoint(checkpoint_path, **kwargs)
    patched = type(module_class.__name__, (LowRankCheckpointMixin, module_class), {})
    patched.__module__ = module_class.__module__
    patched.__qualname__ = module_class.__qualname__
    return patched.load_from_checkpoint(checkpoint_path, **kwargs)
