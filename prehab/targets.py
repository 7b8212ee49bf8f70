"""Which layers get compressed: the model's repeated block stacks and the ``targets`` patterns over names.

Everything here reads module names, types and parameter identities only (no forward pass), so it is
cheap enough to validate ``targets=``/``blocks=`` when ``fit`` starts.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Sequence

from torch import nn

from prehab.lowrank import LowRankLinear, is_dense_linear, storage_key

__all__ = ["find_block_stacks", "find_blocks", "resolve_targets"]

# Output heads and embeddings are never default targets (DESIGN: "never embeddings or the LM head").
_HEAD_NAMES = re.compile(r"(^|\.)(lm_head|head|heads|classifier|score|pooler|embed_out|output_projection)(\.|$)")

# A repeated stack with less than this share of the largest stack's parameters (per-layer prediction
# heads, a small vision tower next to an LLM) is not a default target; resolve_targets says so.
_MIN_STACK_SHARE = 0.1
# Matrices inside the blocks that no targeted layer owns (fused MoE experts, routers) are reported when
# they are at least this share of the blocks' parameters.
_MIN_UNCOVERED_SHARE = 0.01

_NOT_AGAIN = (
    "A low-rank layer is not factored again: to compress further, reload the dense model and compress it "
    "once with the final ratio you want (a higher ratio removes more)."
)


def _has_linear(module: nn.Module) -> bool:
    return any(is_dense_linear(m) or isinstance(m, LowRankLinear) for m in module.modules())


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _candidate_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every top-level repeated block stack, in module order.

    A stack is an ``nn.ModuleList``/``nn.Sequential`` (not the model itself) of at least two callable
    children of one class that contain Linear layers; a stack inside another stack (MoE experts inside
    the decoder layers) is part of its blocks, not a stack of its own.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.ModuleList | nn.Sequential) or len(module) < 2:
            continue
        if _HEAD_NAMES.search(name) or any(name.startswith(other + ".") for other, _ in found):
            continue
        children = list(module.children())
        first = children[0]
        if len({type(c) for c in children}) != 1 or is_dense_linear(first) or isinstance(first, LowRankLinear):
            continue
        if isinstance(first, nn.ModuleList | nn.ModuleDict) or not _has_linear(first):
            continue  # a list of lists is not callable block by block: its inner lists are the stacks
        found.append((name, module))
    return found


def _named_stack(model: nn.Module, blocks: str) -> tuple[str, nn.Module]:
    try:
        container = model.get_submodule(blocks)
    except AttributeError as err:
        lists = [n for n, _ in _candidate_stacks(model)] or [
            n for n, m in model.named_modules() if n and isinstance(m, nn.ModuleList | nn.Sequential)
        ]
        raise ValueError(
            f"blocks={blocks!r} is not a submodule of the model; block lists in this model: {lists[:10]}. "
            "Pass one of them, or None to find them automatically."
        ) from err
    if not isinstance(container, nn.ModuleList | nn.Sequential):
        raise ValueError(
            f"blocks={blocks!r} is a {type(container).__name__}, not a ModuleList/Sequential of blocks; "
            "name the list that holds the repeated blocks (e.g. 'model.layers')."
        )
    return blocks, container


def find_block_stacks(
    model: nn.Module, blocks: str | None = None, *, include_small: bool = False
) -> list[tuple[str, nn.Module]]:
    """The model's main repeated block stacks, as ``(name, container)`` in module order.

    Found generically (see :func:`find_blocks`): every top-level stack holding at least a tenth of the
    parameters of the largest one, e.g. BART's ``model.encoder.layers`` and ``model.decoder.layers``.
    Smaller stacks (per-layer prediction heads, a small vision tower next to a language model) are
    left out; :func:`resolve_targets` warns about them.

    Args:
        model: the model.
        blocks: dotted name of one block list, overriding the search.
        include_small: also return the smaller stacks (every top-level stack).

    Returns:
        The stacks; empty when the model has none.

    Raises:
        ValueError: ``blocks`` is not a submodule, or not a ModuleList/Sequential.
    """
    if blocks is not None:
        return [_named_stack(model, blocks)]
    stacks = _candidate_stacks(model)
    if include_small or not stacks:
        return stacks
    largest = max(_params(m) for _, m in stacks)
    return [(n, m) for n, m in stacks if _params(m) >= _MIN_STACK_SHARE * largest]


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.Module] | None:
    """The model's largest list of repeated transformer blocks, as ``(name, container)``.

    Found generically: the ``nn.ModuleList``/``nn.Sequential`` of at least two children of one class
    that contain Linear layers, with the most parameters (Llama ``model.layers``, GPT-2
    ``transformer.h``, BERT ``encoder.layer``, timm ViT ``blocks``). ``blocks`` names it explicitly.
    Models with several stacks (encoder-decoder) have more: see :func:`find_block_stacks`.
    """
    if blocks is not None:
        return _named_stack(model, blocks)
    stacks = _candidate_stacks(model)
    return max(stacks, key=lambda item: _params(item[1])) if stacks else None


def _check_arguments(targets: object, blocks: object) -> list[str] | None:
    """``targets`` as a list of patterns (None: the default), after checking both arguments' types."""
    if blocks is not None and (not isinstance(blocks, str) or not blocks):
        raise ValueError(
            f"blocks={blocks!r} is invalid: use the dotted name of the model's block list as a string "
            "(e.g. 'model.layers' or 'encoder.layer'), or None to find it automatically."
        )
    if targets is None:
        return None
    usage = "use a regex string, a non-empty list of them (e.g. ['q_proj', 'v_proj']), or None for the default"
    if isinstance(targets, str):
        patterns = [targets]
    elif isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets):
        patterns = list(targets)
    else:
        raise ValueError(f"targets={targets!r} is invalid: {usage}.")
    if not patterns:
        raise ValueError(
            f"targets={targets!r} is an empty list, so there would be nothing to compress: {usage} "
            "(every Linear inside the repeated blocks)."
        )
    if any(not p for p in patterns):
        raise ValueError(f"targets={targets!r} contains an empty pattern, which matches every layer: {usage}.")
    return patterns


def _lowrank_names(model: nn.Module) -> dict[str, str]:
    """Every ``LowRankLinear`` and its factor Linears: ``{name: name of the LowRankLinear}``."""
    names: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            for inner, _ in module.named_modules():
                names[f"{name}.{inner}" if inner else name] = name
    return names


def _check_not_tied(model: nn.Module, chosen: dict[str, nn.Module]) -> None:
    """Refuse targets whose weight is also used by another module (tied embeddings, shared layers).

    Factoring one user of a shared weight leaves the weight in place for the other, so the model grows
    while the report counts a reduction, and the two are no longer tied.
    """
    users: dict[object, list[str]] = defaultdict(list)
    for param_name, param in model.named_parameters(remove_duplicate=False):
        users[storage_key(param)].append(param_name.rpartition(".")[0])
    for name, module in chosen.items():
        others = sorted({owner for owner in users[storage_key(module.weight)] if owner != name})
        if others:
            shown = ", ".join(repr(o) for o in others[:4])
            raise ValueError(
                f"targets: layer {name!r} shares its weight with {shown} (tied weights, e.g. an LM head tied to "
                "the input embeddings, or one Linear registered twice). Factoring it would untie them and add "
                "the factors next to the shared weight, so the model would grow. Exclude it from targets=, or "
                "untie the weights first (an LM head: prehab.untie_output_embeddings(model), or PrehabModule's "
                "untie_lm_head=True in a config). Nothing was modified."
            )


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _warn_uncovered(
    model: nn.Module,
    stacks: list[tuple[str, nn.Module]],
    chosen: dict[str, nn.Module],
    lowrank: dict[str, str],
    blocks: str | None,
) -> None:
    """Warn about what the default targets leave out: smaller stacks (unless ``blocks=`` chose one) and
    non-Linear matrices in the blocks."""
    names = {n for n, _ in stacks}
    skipped = [] if blocks is not None else [(n, m) for n, m in _candidate_stacks(model) if n not in names]
    if skipped:
        listed = ", ".join(f"{n!r} ({len(m)} x {type(m[0]).__name__})" for n, m in skipped[:5])
        example = re.escape(skipped[0][0]) + r"\."
        warnings.warn(
            f"default targets skip the smaller repeated block stacks {listed}: they hold less than "
            f"{_MIN_STACK_SHARE:.0%} of the parameters of the largest stack. To compress them too, name them "
            f"with targets= (e.g. targets=[r'^{example}'] plus the others you want) or pass blocks=.",
            stacklevel=4,
        )
    owners: dict[tuple[str, str], int] = defaultdict(int)
    total = 0
    for prefix, container in stacks:
        total += _params(container)
        for name, module in container.named_modules(prefix=prefix):
            if name in chosen or name in lowrank or is_dense_linear(module):
                continue
            heavy = sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
            if heavy:
                owners[(_pattern(name), type(module).__name__)] += heavy
    uncovered = sum(owners.values())
    if total and uncovered >= _MIN_UNCOVERED_SHARE * total:
        largest = sorted(owners.items(), key=lambda item: -item[1])[:6]
        listed = ", ".join(f"{n} ({cls}, {count / total:.1%})" for (n, cls), count in largest)
        warnings.warn(
            f"{uncovered / total:.0%} of the block parameters are not in nn.Linear/Conv1D layers and stay dense: "
            f"{listed}. prehab factors only nn.Linear and Conv1D layers (modules that hold raw weight matrices, such "
            "as fused MoE experts, routers or nn.MultiheadAttention's in_proj_weight, are not supported), so the "
            "ratio applies to the targeted Linear layers only.",
            stacklevel=4,
        )


def resolve_targets(
    model: nn.Module, targets: str | Sequence[str] | None = None, blocks: str | None = None
) -> dict[str, nn.Module]:
    """Dense Linear/Conv1D layers to compress, by name, in module order. Cheap: no forward pass.

    Low-rank layers (``LowRankLinear``) and their factors are never targets, and a layer whose weight
    is shared with another module (tied embeddings) is refused.

    Args:
        model: the model (names are relative to it).
        targets: a regex or list of regexes searched (``re.search``) in module names. None means every
            Linear inside the model's repeated block stacks (see :func:`find_block_stacks`: all of them
            for an encoder-decoder); for a model without blocks, every Linear except output heads.
        blocks: explicit name of the block list, overriding the automatic search.

    Returns:
        ``{name: module}``, never empty.

    Raises:
        ValueError: a bad ``targets``/``blocks`` value, a pattern that matches no Linear layer (the message
            lists layers that exist), a pattern that names an already low-rank layer, a target with a tied
            weight, or nothing left to compress.
    """
    patterns = _check_arguments(targets, blocks)
    lowrank = _lowrank_names(model)
    linears = {name: m for name, m in model.named_modules() if name and is_dense_linear(m) and name not in lowrank}
    if patterns is None:
        chosen = _default_targets(model, linears, lowrank, blocks)
    else:
        chosen = {}
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"targets: {pattern!r} is not a valid regular expression ({err}).") from err
            already = sorted({lowrank[n] for n in lowrank if regex.search(n)})
            if already:
                raise ValueError(
                    f"targets: pattern {pattern!r} matches layers that are already low-rank (LowRankLinear): "
                    f"{', '.join(already[:5])}{' ...' if len(already) > 5 else ''}. {_NOT_AGAIN} Or narrow "
                    "the pattern to layers that are still dense."
                )
            hits = [n for n in linears if regex.search(n)]
            if not hits:
                examples = ", ".join(list(linears)[:8])
                raise ValueError(
                    f"targets: pattern {pattern!r} matches no Linear layer. Linear layers in this model include: "
                    f"{examples} ({len(linears)} in all). Fix the pattern (it is searched in these names)."
                )
            chosen.update({n: linears[n] for n in hits})
        chosen = {n: m for n, m in linears.items() if n in chosen}
    _check_not_tied(model, chosen)
    return chosen


def _default_targets(
    model: nn.Module, linears: dict[str, nn.Module], lowrank: dict[str, str], blocks: str | None
) -> dict[str, nn.Module]:
    stacks = find_block_stacks(model, blocks)
    if stacks:
        prefixes = tuple(n + "." for n, _ in stacks)
        chosen = {n: m for n, m in linears.items() if n.startswith(prefixes)}
        done = sorted({owner for n, owner in lowrank.items() if n.startswith(prefixes)})
        where = "inside the blocks " + ", ".join(repr(n) for n, _ in stacks)
    else:
        chosen = {n: m for n, m in linears.items() if not _HEAD_NAMES.search(n)}
        done = sorted(set(lowrank.values()))
        where = "outside the output heads"
    if not chosen:
        if done:
            raise ValueError(
                f"nothing to compress: every Linear layer {where} is already low-rank ({len(done)} LowRankLinear, "
                f"e.g. {done[0]!r}); was the model compressed already (a second compression callback, a second "
                f"fit or compress())? {_NOT_AGAIN}"
            )
        if linears:
            raise ValueError(
                f"no Linear layer {where}; pass targets= to name the layers to compress (Linear layers in "
                f"this model include: {', '.join(list(linears)[:8])})."
            )
        raise ValueError("the model has no nn.Linear (or Conv1D) layers to compress.")
    if done:
        warnings.warn(
            f"{len(done)} layers {where} are already low-rank (e.g. {done[0]!r}) and are not compressed again; "
            f"targeting the {len(chosen)} dense ones.",
            stacklevel=3,
        )
    if stacks:
        _warn_uncovered(model, stacks, chosen, lowrank, blocks)
    else:
        warnings.warn(
            "no repeated transformer blocks found; targeting every Linear except output heads "
            f"({len(chosen)} layers). Pass targets= to choose explicitly.",
            stacklevel=3,
        )
    return chosen
