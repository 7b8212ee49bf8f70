"""Which layers get compressed: the model's repeated blocks and the ``targets`` patterns over names."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from torch import nn

from prehab.lowrank import is_dense_linear

__all__ = ["find_blocks", "resolve_targets"]

# Output heads and embeddings are never default targets (DESIGN: "never embeddings or the LM head").
_HEAD_NAMES = re.compile(r"(^|\.)(lm_head|head|heads|classifier|score|pooler|embed_out|output_projection)(\.|$)")


def _has_dense_linear(module: nn.Module) -> bool:
    return any(is_dense_linear(m) for m in module.modules())


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.Module] | None:
    """The model's list of repeated transformer blocks, as ``(name, container)``.

    Found generically: the ``nn.ModuleList``/``nn.Sequential`` of at least two children of one class
    that contain Linear layers, with the most parameters (Llama ``model.layers``, GPT-2
    ``transformer.h``, BERT ``encoder.layer``, timm ViT ``blocks``). ``blocks`` names it explicitly.
    """
    if blocks is not None:
        try:
            container = model.get_submodule(blocks)
        except AttributeError as err:
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList | nn.Sequential)]
            raise ValueError(f"blocks={blocks!r} is not a submodule of the model; module lists: {lists[:10]}") from err
        if not isinstance(container, nn.ModuleList | nn.Sequential):
            raise ValueError(f"blocks={blocks!r} is a {type(container).__name__}, not a ModuleList/Sequential.")
        return blocks, container
    best: tuple[int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential) or len(module) < 2:
            continue
        children = list(module.children())
        if len({type(c) for c in children}) != 1 or is_dense_linear(children[0]):
            continue
        if not _has_dense_linear(children[0]):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    return None if best is None else (best[1], best[2])


def resolve_targets(
    model: nn.Module, targets: str | Sequence[str] | None = None, blocks: str | None = None
) -> dict[str, nn.Module]:
    """Dense Linear/Conv1D layers to compress, by name, in module order.

    Args:
        model: the model (names are relative to it).
        targets: a regex or list of regexes searched (``re.search``) in module names. None means every
            Linear inside the repeated blocks (see :func:`find_blocks`); for a model without blocks,
            every Linear except output heads.
        blocks: explicit name of the block list, overriding the automatic search.

    Raises:
        ValueError: a pattern matches no Linear layer (the message lists layers that exist).
    """
    linears = {name: m for name, m in model.named_modules() if name and is_dense_linear(m)}
    if not linears:
        raise ValueError("the model has no nn.Linear (or Conv1D) layers to compress.")
    if targets is None:
        found = find_blocks(model, blocks)
        if found is not None:
            prefix = found[0] + "."
            return {n: m for n, m in linears.items() if n.startswith(prefix)}
        chosen = {n: m for n, m in linears.items() if not _HEAD_NAMES.search(n)}
        warnings.warn(
            "no repeated transformer blocks found; targeting every Linear except output heads "
            f"({len(chosen)} layers). Pass targets= to choose explicitly.",
            stacklevel=2,
        )
        if not chosen:
            raise ValueError(f"only output heads are Linear ({list(linears)[:5]}); pass targets= explicitly.")
        return chosen
    patterns = [targets] if isinstance(targets, str) else list(targets)
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"targets: {pattern!r} is not a valid regular expression ({err}).") from err
        hits = [n for n in linears if regex.search(n)]
        if not hits:
            examples = ", ".join(list(linears)[:8])
            raise ValueError(
                f"targets: pattern {pattern!r} matches no Linear layer. Linear layers in this model include: "
                f"{examples} ({len(linears)} in all). Fix the pattern (it is searched in these names)."
            )
        chosen.update({n: linears[n] for n in hits})
    return {n: m for n, m in linears.items() if n in chosen}
