"""``RollbackStore``: dense layers replaced during a compression, kept off the model's device until needed.

A compression that swaps layers in one by one (the two-stream pipeline, a ratio sweep) must be able to put
the dense layers back on failure. Keeping them as they are costs a second copy of the targeted weights
on the model's device (≈ the whole model for a 7B LLM). Instead, :meth:`RollbackStore.put` copies a module's
tensors out, to host memory when the model is on an accelerator, to a temporary safetensors file when it is
on the CPU (host memory is then the memory to spare), and leaves the module object itself in place with
empty placeholders: the very same module and ``Parameter`` objects come back (an optimizer or a caller
holding them keeps valid references), with bit-identical data.

A module handed to the store is unusable (empty tensors) until :meth:`load`, :meth:`loaded` or
:meth:`restore` brings its data back; after :meth:`close` the data is gone for good.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from prehab.lowrank import replace_module

__all__ = ["RollbackStore"]


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``module`` by a unique key (each tensor object once)."""
    found: dict[str, Tensor] = {}
    seen: set[int] = set()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for kind, table in (("p", sub._parameters), ("b", sub._buffers)):
            for key, tensor in table.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    found[f"{kind}:{prefix}:{key}"] = tensor
    return found


class RollbackStore:
    """Offloaded dense modules by name; see the module docstring.

    Args:
        device: the model's device: ``cpu`` stores to a temporary file, anything else to host memory.
        to_disk: override that choice (True: always a temporary file).
    """

    def __init__(self, device: torch.device | str, to_disk: bool | None = None) -> None:
        self.to_disk = torch.device(device).type == "cpu" if to_disk is None else bool(to_disk)
        self._dir: tempfile.TemporaryDirectory | None = None
        # name -> (module, {key: (tensor object, its device)}, host copies or the file holding them)
        self._entries: dict[str, tuple[nn.Module, dict[str, tuple[Tensor, torch.device]], dict | Path]] = {}
        self._files = 0

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def put(self, name: str, module: nn.Module) -> None:
        """Copy ``module``'s tensors out and free them on its device (it stays unusable until loaded).

        Atomic: if writing the copy fails, the module is left untouched and the error propagates.
        """
        if name in self._entries:
            raise ValueError(f"RollbackStore already holds a module named {name!r}.")
        tensors = _tensors(module)
        with torch.no_grad():
            if self.to_disk:
                from safetensors.torch import save_file

                if self._dir is None:
                    self._dir = tempfile.TemporaryDirectory(prefix="prehab-rollback-")
                copies = Path(self._dir.name) / f"{self._files}.safetensors"
                self._files += 1
                save_file({k: t.detach().contiguous() for k, t in tensors.items()}, str(copies))
            else:
                copies = {k: t.detach().to("cpu", copy=True) for k, t in tensors.items()}
            self._entries[name] = (module, {k: (t, t.device) for k, t in tensors.items()}, copies)
            self._unload(name)

    def _unload(self, name: str) -> None:
        for tensor, _ in self._entries[name][1].values():
            # Empty, same dtype and device (set_data refuses meta tensors): any use fails loudly on the shape.
            tensor.data = tensor.data.new_empty(0)

    def load(self, names: list[str] | None = None) -> dict[str, nn.Module]:
        """Bring the data of ``names`` (default: all) back onto their devices; returns those modules."""
        chosen = self.names() if names is None else names
        with torch.no_grad():
            for name in chosen:
                _, tensors, copies = self._entries[name]
                if isinstance(copies, Path):
                    from safetensors import safe_open

                    with safe_open(str(copies), framework="pt") as f:
                        for key, (tensor, device) in tensors.items():
                            tensor.data = f.get_tensor(key).to(device)
                else:
                    for key, (tensor, device) in tensors.items():
                        tensor.data = copies[key].to(device, copy=True)
        return {name: self._entries[name][0] for name in chosen}

    @contextlib.contextmanager
    def loaded(self) -> Iterator[dict[str, nn.Module]]:
        """Every stored module usable inside the block (e.g. for a pass through the dense model), offloaded after."""
        try:
            yield self.load()
        finally:
            for name in self._entries:
                self._unload(name)

    def restore(self, model: nn.Module) -> None:
        """Load every stored module and swap it back into ``model``; the store forgets them."""
        for name, module in self.load().items():
            replace_module(model, name, module)
        self._clear()

    def _clear(self) -> None:
        self._entries.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def close(self) -> None:
        """Drop every copy and remove the temporary folder (modules still stored stay empty: their data is gone)."""
        self._clear()

    def __enter__(self) -> RollbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
