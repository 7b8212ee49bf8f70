"""Two-stream, block-sequential calibration: the pipeline behind AA-SVD, SAES-SVD and SVD-LLM(propagate).

For every targeted layer the methods need ``H = X̂X̂ᵀ`` and ``C = XX̂ᵀ``, where ``X`` is the input in the
original model and ``X̂`` the input in the model whose upstream layers are already compressed. Going
block by block (the repeated ``ModuleList`` of a transformer):

1. the inputs of block 0 (args and kwargs: masks, position embeddings) are captured once per batch;
2. inside a block, targeted layers are grouped by the input tensor they share (q/k/v, gate/up) and
   processed in call order; for each group both streams are run up to the group (early exit), the
   group is solved, and its layers are swapped in, so later groups see it (q/k/v before o, ...);
3. both streams are propagated to the next block: the original stream with the dense block (the
   replaced modules are swapped back for that pass), the shifted one with the compressed block.

Memory: one block of activations per stream (on CPU when the model is on an accelerator), plus the
replaced dense modules, which are kept so that any failure puts the model back exactly as it was.
Models without a repeated block are handled as one "block" that is the whole model (per-layer
early-exit forwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from tqdm.auto import tqdm

from prehab.calibration import calibration_forward
from prehab.lowrank import dense_weight, replace_module
from prehab.stats import RunningCovariance, all_reduce_sum_, calibration_forward_context
from prehab.targets import find_blocks

__all__ = ["GroupStatistics", "sequential_compress"]

# solve(group statistics) -> {layer name: replacement module}; layers left out stay dense.
GroupSolver = Callable[["GroupStatistics"], dict[str, nn.Module]]


class _StopForward(Exception):
    """Raised by a hook to end a forward early, once the inputs it needed are seen."""


@dataclass
class GroupStatistics:
    """Mean second-order statistics of a group of layers that read the same input (q/k/v, gate/up)."""

    names: list[str]
    G: Tensor  # mean X Xᵀ     (original stream)
    H: Tensor  # mean X̂ X̂ᵀ     (shifted stream)
    C: Tensor  # mean X X̂ᵀ     (cross)
    count: int

    def as_dict(self) -> dict[str, Tensor]:
        return {"G": self.G, "H": self.H, "C": self.C}


def _hidden(output: Any) -> Tensor:
    """The hidden state in a block's output (a tensor, or the first element of a tuple/ModelOutput)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Sequence) or hasattr(output, "to_tuple"):
        return output[0]
    raise TypeError(f"cannot find the hidden state in a block output of type {type(output).__name__}.")


def _is_cache(value: Any) -> bool:
    return any(cls.__name__.endswith("Cache") for cls in type(value).__mro__)


def _with_hidden(inputs: tuple[tuple, dict], hidden: Tensor) -> tuple[tuple, dict]:
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _Runner:
    """Runs one stage (a block, or the whole model) on one stream's cached inputs."""

    def __init__(self, whole_model: bool, device: torch.device, offload: bool) -> None:
        self.whole_model, self.device, self.offload = whole_model, device, offload

    def store(self, value: Any) -> Any:
        return move_data_to_device(value, "cpu") if self.offload else value

    def __call__(self, stage: nn.Module, inputs: Any) -> Any:
        inputs = move_data_to_device(inputs, self.device) if self.offload else inputs
        if self.whole_model:
            return calibration_forward(stage, inputs)
        args, kwargs = inputs
        return stage(*args, **kwargs)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==
        return False


def _check_blocks_share_kwargs(model: nn.Module, blocks: nn.Module, batch: Any) -> None:
    """Every block must get the same non-hidden inputs as block 0 (cached once and reused for all blocks).

    Models that pass per-layer inputs (e.g. sliding-window masks on some layers) would be silently wrong.
    """
    seen: list[dict] = []
    handles = [b.register_forward_pre_hook(lambda _m, _a, kw: seen.append(dict(kw)), with_kwargs=True) for b in blocks]
    try:
        calibration_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    skip = {"hidden_states", "past_key_values", "past_key_value", "layer_past", "use_cache", "cache_position"}
    for index, kwargs in enumerate(seen[1:], start=1):
        for key in set(kwargs) | set(seen[0]):
            if key not in skip and not _same(kwargs.get(key), seen[0].get(key)):
                raise ValueError(
                    f"block {index} is called with a different {key!r} than block 0 (per-layer inputs, e.g. "
                    "sliding-window attention masks). The two-stream pipeline reuses block 0's inputs for every "
                    "block, so it cannot compress this model: use the one-stream SVDLLM or SVD instead."
                )


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: list, runner: _Runner) -> list[tuple]:
    captured: list[tuple] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not args and "hidden_states" not in kwargs:
            raise TypeError(
                "the first block was called without a positional or `hidden_states` input; "
                "pass blocks= to name a block list whose first argument is the hidden state."
            )
        # A KV cache grows with every call and would corrupt every later statistic: never keep one.
        kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
        captured.append(runner.store((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward):
                calibration_forward(model, batch)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError(f"the first block ran on {len(captured)} of {len(batches)} calibration batches.")
    return captured


@contextlib.contextmanager
def _hooks(modules: dict[str, nn.Module], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(lambda _m, args, _n=name: fn(_n, args[0])))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _group_by_shared_input(
    stage: nn.Module, targets: dict[str, nn.Module], first_input: Any, runner: _Runner
) -> tuple[list[list[str]], list[str]]:
    """Targets grouped by the very input tensor they read, in call order; plus those never called."""
    order: list[tuple[str, int]] = []
    seen_inputs: list[Tensor] = []

    def record(name: str, x: Tensor) -> None:
        if any(name == n for n, _ in order):
            return
        index = next((i for i, t in enumerate(seen_inputs) if t is x), None)
        if index is None:
            seen_inputs.append(x)
            index = len(seen_inputs) - 1
        order.append((name, index))

    with _hooks(targets, record):
        runner(stage, first_input)
    groups: dict[int, list[str]] = {}
    for name, index in order:
        groups.setdefault(index, []).append(name)
    called = {name for name, _ in order}
    return list(groups.values()), [n for n in targets if n not in called]


def sequential_compress(
    model: nn.Module,
    targets: dict[str, nn.Module],
    batches: list,
    solve: GroupSolver,
    blocks: str | None = None,
    progress: bool = True,
    desc: str = "two-stream",
) -> list[str]:
    """Compress ``targets`` block by block from two calibration streams, calling ``solve`` per group.

    Args:
        model: the model (its targeted layers are replaced in place).
        targets: layers to compress, by name relative to ``model``.
        batches: this rank's calibration batches (fed through :func:`calibration_forward`).
        solve: turns a group's (all-reduced) statistics into replacement modules.
        blocks: name of the repeated block list; found automatically when None. Without one, the
            whole model is the single stage (per-layer early-exit forwards).
        progress: show a progress bar.

    Returns:
        Names of targets that never received an input (left dense).

    On any exception every replaced layer is put back, so the model is left as it was.
    """
    if not batches:
        raise ValueError("this rank received no calibration batches; use calibration_batches >= the number of ranks.")
    device = dense_weight(next(iter(targets.values()))).device
    found = find_blocks(model, blocks)
    originals: dict[str, nn.Module] = {}  # name -> dense module, for the dense stream and for rollback

    with calibration_forward_context(model):
        try:
            if found is None:
                stages = [("", model, dict(targets))]
                runner = _Runner(whole_model=True, device=device, offload=False)
                original_inputs = shifted_inputs = list(batches)
            else:
                prefix, container = found
                outside = [n for n in targets if not n.startswith(prefix + ".")]
                if outside:
                    raise ValueError(
                        f"targets outside the repeated blocks {prefix!r} cannot use the two-stream pipeline: "
                        f"{outside[:5]}. Restrict targets= to the blocks, or pass blocks= for another block list."
                    )
                stages = []
                for index, block in enumerate(container):
                    block_prefix = f"{prefix}.{index}."
                    stages.append(
                        (block_prefix, block, {n: m for n, m in targets.items() if n.startswith(block_prefix)})
                    )
                runner = _Runner(whole_model=False, device=device, offload=device.type != "cpu")
                _check_blocks_share_kwargs(model, container, batches[0])
                original_inputs = _capture_block_inputs(model, container[0], batches, runner)
                shifted_inputs = list(original_inputs)

            unused: list[str] = []
            group_cache: dict[tuple, tuple[list[list[str]], list[str]]] = {}
            bar = tqdm(stages, desc=f"{desc}: blocks", disable=not progress, unit="block")
            for block_prefix, stage, stage_targets in bar:
                stage_targets = {n[len(block_prefix) :] if block_prefix else n: m for n, m in stage_targets.items()}
                root = block_prefix.rstrip(".")
                if stage_targets:
                    # Repeated blocks share their structure: find the groups once per block class and layer set.
                    key = (type(stage), tuple(stage_targets))
                    if key not in group_cache:
                        group_cache[key] = _group_by_shared_input(stage, stage_targets, shifted_inputs[0], runner)
                    groups, never_called = group_cache[key]
                    unused += [block_prefix + n for n in never_called]
                else:
                    groups = []
                next_original: list | None = None
                for group_index, group in enumerate(groups):
                    last = group_index == len(groups) - 1 and found is not None
                    stats, outputs = _group_statistics(
                        stage,
                        {n: stage_targets[n] for n in group},
                        original_inputs,
                        shifted_inputs,
                        runner,
                        originals,
                        root,
                        model,
                        keep_original_outputs=last,
                    )
                    if last:
                        next_original = outputs
                    stats.names = [block_prefix + n for n in group]
                    replacements = solve(stats)
                    for full_name, new in replacements.items():
                        originals[full_name] = replace_module(model, full_name, new)
                if found is None:
                    continue
                with _dense(model, originals, root):
                    if next_original is None:
                        next_original = [runner.store(_hidden(runner(stage, inp)).detach()) for inp in original_inputs]
                next_shifted = [runner.store(_hidden(runner(stage, inp)).detach()) for inp in shifted_inputs]
                original_inputs = [_with_hidden(inp, h) for inp, h in zip(original_inputs, next_original, strict=True)]
                shifted_inputs = [_with_hidden(inp, h) for inp, h in zip(shifted_inputs, next_shifted, strict=True)]
            return unused
        except BaseException:
            for name, module in originals.items():
                replace_module(model, name, module)
            raise


@contextlib.contextmanager
def _dense(model: nn.Module, originals: dict[str, nn.Module], root: str) -> Iterator[None]:
    """Temporarily put the dense layers back under ``root`` (the original stream's view)."""
    prefix = root + "." if root else ""
    swapped = {n: replace_module(model, n, m) for n, m in originals.items() if n.startswith(prefix)}
    try:
        yield
    finally:
        for name, module in swapped.items():
            replace_module(model, name, module)


def _group_statistics(
    stage: nn.Module,
    group: dict[str, nn.Module],
    original_inputs: list,
    shifted_inputs: list,
    runner: _Runner,
    originals: dict[str, nn.Module],
    root: str,
    model: nn.Module,
    keep_original_outputs: bool,
) -> tuple[GroupStatistics, list | None]:
    """Run both streams up to the group (both streams' inputs of one group are one tensor each)."""
    features = dense_weight(next(iter(group.values()))).shape[1]
    device = dense_weight(next(iter(group.values()))).device
    g, h, c = (RunningCovariance(features, device=device) for _ in range(3))
    first = next(iter(group))
    outputs: list | None = [] if keep_original_outputs else None

    def capture(store: list, stop: bool) -> Callable[[str, Tensor], None]:
        def fn(name: str, x: Tensor) -> None:
            if name == first and not store:
                store.append(x.detach())
                if stop:
                    raise _StopForward

        return fn

    for original, shifted in zip(original_inputs, shifted_inputs, strict=True):
        seen_original: list[Tensor] = []
        seen_shifted: list[Tensor] = []
        # The dense stream: this stage's replaced layers swapped back for the pass.
        with _dense(model, originals, root), _hooks(group, capture(seen_original, not keep_original_outputs)):
            try:
                out = runner(stage, original)
                if outputs is not None:
                    outputs.append(runner.store(_hidden(out).detach()))
            except _StopForward:
                pass
        with _hooks(group, capture(seen_shifted, True)), contextlib.suppress(_StopForward):
            runner(stage, shifted)
        if not seen_original or not seen_shifted:
            raise RuntimeError(f"layer {root + '.' if root else ''}{first} was not called in both streams.")
        x, x_hat = seen_original[0], seen_shifted[0]
        g.update(x)
        h.update(x_hat)
        c.update(x, x_hat)
    count = torch.tensor([float(h.count)], dtype=torch.float64, device=device)
    all_reduce_sum_([g.sum, h.sum, c.sum, count])
    total = int(count.item())
    return GroupStatistics(list(group), g.sum / total, h.sum / total, c.sum / total, total), outputs
