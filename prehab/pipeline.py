"""Two-stream, block-sequential calibration: the pipeline behind AA-SVD, SAES-SVD and SVD-LLM(propagate).

For every targeted layer the methods need ``H = X̂X̂ᵀ`` and ``C = XX̂ᵀ``, where ``X`` is the input in the
original model and ``X̂`` the input in the model whose upstream layers are already compressed. Going
block by block through each repeated block stack (BART: the encoder's layers, then the decoder's), in
the order the model runs them:

1. the inputs of the stack's first block (args and kwargs: masks, position embeddings, encoder outputs)
   are captured once per batch, from the dense model and from the partially compressed one. The first
   batch of every distinct input shape runs the whole model to check that every block of the stack
   is called once, in order, with the same non-hidden inputs as the first block (per-layer inputs such
   as sliding-window masks are refused, since block 0's are reused for every block);
2. inside a block, one probe forward records every call of every targeted layer: layers fed the very
   same tensors form a group (q/k/v, gate/up), processed in call order. The dense block runs once over
   every batch with every target's inputs kept (when they fit ``dense_cache_gb``; else the dense stream
   is rerun per group like the compressed one) and each target's ``‖W x‖²`` taken from its outputs. For
   each group the compressed stream is run until each layer has made its calls (early exit), every
   call's input rows go into the statistics, the group is solved, and its layers are swapped in, so
   later groups see it (q/k/v before o, ...; ``true_sequential=False`` instead records the compressed
   stream's inputs of every group in one pass with the block still dense, like the dense stream's, and
   solves every group from them). Groups are derived per block, and verified on every
   batch: layers that stop sharing their inputs get statistics of their own, and layers the probe did
   not see are collected last. ``G = XXᵀ`` is collected only for the groups a caller asks for
   (``original_covariance``): the solvers read ``H`` and ``C``, the report's error needs only ``‖W x‖²``;
3. both streams are propagated to the next block: the original stream with the dense block (the
   replaced modules are swapped back for that pass), the shifted one with the compressed block.

Padded positions (a dict batch's ``attention_mask == 0``, :func:`~prehab.calibration.padding_mask`) are left
out of every statistic and of the refinement's error; the blocks still run on the padded batches.

Memory: one block of activations per stream (on CPU when the model is on an accelerator), plus the dense
block's layer inputs over all batches on the model's device (up to ``dense_cache_gb``; ~5.7 hidden states per
token for a Llama block). The replaced
dense modules are kept so that any failure puts the model back exactly as it was, but only the current
block's stay on the model's device: once a block is done they go to a :class:`~prehab.rollback.RollbackStore`
(host memory for an accelerator, a temporary file for a CPU model). After a successful run the replaced
modules are left empty (their data is dropped), unless the caller passes its own ``rollback`` store.
Models without a repeated block are handled as one "block" that is the whole model (per-layer
early-exit forwards).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from tqdm.auto import tqdm

from prehab.calibration import calibration_forward, is_encoder_decoder, padding_mask
from prehab.lowrank import LowRankLinear, dense_weight, replace_module
from prehab.rollback import RollbackStore
from prehab.stats import (
    CovarianceCollector,
    RunningCovariance,
    all_reduce_sum_,
    calibration_forward_context,
    token_rows,
)
from prehab.targets import find_block_stacks

__all__ = ["BlockRefiner", "GroupStatistics", "covered_by_blocks", "one_stream_blocks", "sequential_compress"]

# solve(group statistics) -> {layer name: replacement module}; layers left out stay dense.
GroupSolver = Callable[["GroupStatistics"], dict[str, nn.Module]]
# refine(block name, block, its factors, run(b) -> compressed output, target(b) -> dense output, batches)
BlockRefiner = Callable[
    [str, nn.Module, list[nn.Parameter], Callable[[int], Tensor], Callable[[int], Tensor], int], None
]

# Default memory for one block's original-stream layer inputs (see sequential_compress's dense_cache_gb).
DENSE_CACHE_GB = 4.0

# Block inputs that legitimately differ per block (or hold no per-layer meaning) in the kwargs check.
_PER_CALL_INPUTS = frozenset(
    {"hidden_states", "past_key_values", "past_key_value", "layer_past", "cache", "use_cache", "cache_position"}
)


class _StopForward(Exception):
    """Raised by a hook to end a forward early, once the inputs it needed are seen."""


@dataclass
class GroupStatistics:
    """Mean second-order statistics of a group of layers that read the same input (q/k/v, gate/up).

    ``G`` is None where the caller did not ask for it (``original_covariance=``) and the dense stream's outputs
    gave each layer's ``dense_energy`` instead: ``mean ‖W x‖² = tr(W G Wᵀ)``, all the report's error needs.
    """

    names: list[str]
    G: Tensor | None  # mean X Xᵀ     (original stream)
    H: Tensor  # mean X̂ X̂ᵀ     (shifted stream)
    C: Tensor  # mean X X̂ᵀ     (cross)
    count: int
    dense_energy: dict[str, float] = field(default_factory=dict)  # layer name -> mean ‖W x‖² over the rows

    def as_dict(self) -> dict[str, Tensor]:
        return {"H": self.H, "C": self.C} if self.G is None else {"G": self.G, "H": self.H, "C": self.C}


def _hidden(output: Any) -> Tensor:
    """The hidden state in a block's output (a tensor, or the first element of a tuple/ModelOutput)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Sequence) or hasattr(output, "to_tuple"):
        return output[0]
    raise TypeError(f"cannot find the hidden state in a block output of type {type(output).__name__}.")


def _padding_masks(model: nn.Module, batches: list) -> list[Tensor | None]:
    """Each calibration batch's real tokens (see :func:`~prehab.calibration.padding_mask`)."""
    encoder_decoder = is_encoder_decoder(model)
    return [padding_mask(batch, encoder_decoder) for batch in batches]


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

    def load(self, value: Any) -> Any:
        return move_data_to_device(value, self.device) if self.offload else value

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


def _signature(value: Any) -> Hashable:
    """Shapes, dtypes and structure of a block's inputs: batches with equal signatures are checked once."""
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, Mapping):
        return ("map", tuple((str(k), _signature(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("seq", tuple(_signature(v) for v in value))
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return type(value).__name__


def _differing_input(first: tuple[tuple, dict], other: tuple[tuple, dict]) -> str | None:
    """The first non-hidden block input that differs between two block calls (None: they agree)."""
    (args0, kwargs0), (args1, kwargs1) = first, other
    if len(args0) != len(args1):
        return "number of positional arguments"
    for position, (a, b) in enumerate(zip(args0[1:], args1[1:], strict=True), start=1):
        if not (_is_cache(a) or _is_cache(b) or _same(a, b)):
            return f"positional argument {position}"
    for key in sorted(set(kwargs0) | set(kwargs1), key=str):
        a, b = kwargs0.get(key), kwargs1.get(key)
        if key not in _PER_CALL_INPUTS and not (_is_cache(a) or _is_cache(b) or _same(a, b)):
            return repr(key)
    return None


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank, so data-dependent decisions cannot desynchronize the all-reduces."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _agree(error: Exception | None, device: torch.device) -> None:
    """Raise on every rank when any rank failed a check (a lone failing rank would leave the others waiting)."""
    flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=device)
    all_reduce_sum_([flag])
    if error is not None:
        raise error
    if flag.item() > 0:
        raise ValueError(
            "another DDP rank's calibration batches failed a check of the two-stream pipeline; see its error."
        )


@contextlib.contextmanager
def _hooks(modules: dict[str, nn.Module], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    """``fn(name, input)`` before every call of every module (the input as passed: identity matters)."""
    handles = []
    try:
        for name, module in modules.items():
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, kwargs, _n=name: fn(_n, args[0] if args else next(iter(kwargs.values()))),
                    with_kwargs=True,
                )
            )
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _output_hooks(modules: dict[str, nn.Module], fn: Callable[[str, nn.Module, Tensor], None]) -> Iterator[None]:
    """``fn(name, module, output)`` after every call of every module."""
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(lambda m, _args, out, _n=name: fn(_n, m, out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


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


# ------------------------------------------------------------------------------------------ stacks
def _stacks_for(model: nn.Module, targets: dict[str, nn.Module], blocks: str | None) -> list[tuple[str, nn.Module]]:
    """The block stacks holding targets (empty: the whole model is the one stage)."""
    stacks = find_block_stacks(model, blocks, include_small=True)
    if not stacks:
        return []
    prefixes = tuple(name + "." for name, _ in stacks)
    outside = [n for n in targets if not n.startswith(prefixes)]
    if outside:
        names = ", ".join(repr(name) for name, _ in stacks[:4])
        raise ValueError(
            f"targets outside the repeated blocks ({names}) cannot use the two-stream pipeline: {outside[:5]}. "
            "Restrict targets= to the blocks, or pass blocks= for another block list."
        )
    return [(name, stack) for name, stack in stacks if any(n.startswith(name + ".") for n in targets)]


def _stack_order(model: nn.Module, stacks: list[tuple[str, nn.Module]], batch: Any) -> list[int]:
    """Indices of the stacks in the order the model runs them; a stack that is not run is left out."""
    sequence: list[int] = []
    handles = [
        block.register_forward_pre_hook(lambda _m, _a, _s=index: sequence.append(_s))
        for index, (_, stack) in enumerate(stacks)
        for block in stack
    ]
    try:
        calibration_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    runs = [s for i, s in enumerate(sequence) if i == 0 or sequence[i - 1] != s]
    if len(runs) != len(set(runs)):
        order = " -> ".join(stacks[s][0] for s in runs[:8])
        raise ValueError(
            f"the model interleaves the blocks of several stacks ({order}), so they cannot be compressed stack "
            "after stack. Pass blocks= to compress one stack, or use the one-stream SVDLLM."
        )
    return runs


def _capture_stack_inputs(
    model: nn.Module, prefix: str, stack: nn.Module, batches: list, runner: _Runner, check: bool
) -> list[tuple]:
    """Inputs of the stack's first block on every batch; with ``check``, also verify its blocks (see module doc).

    The first batch of each distinct input signature runs the whole model with hooks on every block
    (the check); the others stop at the first block.
    """
    captured: list[tuple] = []
    checked: set[Hashable] = set()
    state: dict[str, Any] = {}

    def hook(index: int, args: tuple, kwargs: dict) -> None:
        if index == 0 and "first" not in state:
            if not args and "hidden_states" not in kwargs:
                raise ValueError(
                    f"the first block of {prefix!r} was called without a positional or `hidden_states` input; "
                    "pass blocks= to name a block list whose first argument is the hidden state."
                )
            # A KV cache grows with every call and would corrupt every later statistic: never keep one.
            kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
            inputs = (tuple(a.detach() if isinstance(a, Tensor) else a for a in args), kwargs)
            captured.append(runner.store(inputs))
            signature = _signature(inputs)
            if not check or signature in checked:
                raise _StopForward
            checked.add(signature)
            state["first"] = (args, kwargs)
        elif "first" not in state:
            return  # a later block called before the first: caught by the order check below
        if index != state["calls"]:
            raise ValueError(
                f"block {index} of {prefix!r} is called after block {state['calls'] - 1} (blocks must run once "
                "each, in order, for the two-stream pipeline to pass each block's output to the next). Pass "
                "blocks= for another block list, or use the one-stream SVDLLM."
            )
        state["calls"] += 1
        if index:
            what = _differing_input(state["first"], (args, kwargs))
            if what is not None:
                raise ValueError(
                    f"block {index} is called with a different {what} than block 0 in {prefix!r} (on calibration "
                    f"batch {state['batch']}: per-layer inputs, e.g. sliding-window attention masks on inputs longer "
                    "than the window). The two-stream pipeline reuses block 0's inputs for every block, so it cannot "
                    "compress this model: use the one-stream SVDLLM or SVD instead."
                )

    handles = [
        block.register_forward_pre_hook(lambda _m, a, kw, _i=index: hook(_i, a, kw), with_kwargs=True)
        for index, block in enumerate(stack)
    ]
    error: Exception | None = None
    try:
        for batch_index, batch in enumerate(batches):
            state.clear()
            state.update(calls=0, batch=batch_index)
            with contextlib.suppress(_StopForward):
                calibration_forward(model, batch)
            if "first" in state and state["calls"] != len(stack):
                raise ValueError(
                    f"only {state['calls']} of the {len(stack)} blocks of {prefix!r} ran on calibration batch "
                    f"{batch_index}; the two-stream pipeline needs every block to run once, in order. Pass blocks= "
                    "for another block list, or use the one-stream SVDLLM."
                )
    except ValueError as err:
        error = err
    finally:
        for handle in handles:
            handle.remove()
    _agree(error, runner.device)
    if len(captured) != len(batches):
        raise RuntimeError(
            f"the first block of {prefix!r} ran on {len(captured)} of {len(batches)} calibration batches."
        )
    return captured


# ------------------------------------------------------------------------------------------ one stage
@dataclass
class _Structure:
    """Which targets a stage calls on its probe batch, grouped by shared inputs, in order of first call."""

    groups: list[list[str]]
    calls: dict[str, int]  # calls per layer in the probe forward
    uncalled: list[str]
    input_bytes: int = 0  # the distinct target inputs of the probe batch (what a dense-input cache holds per batch)


def _probe_structure(stage: nn.Module, targets: dict[str, nn.Module], inputs: Any, runner: _Runner) -> _Structure:
    sequences: dict[str, list[int]] = {}
    index_of: dict[int, int] = {}
    alive: list[Tensor] = []  # keeps every input alive during the forward, so that ids stay unique

    def record(name: str, x: Tensor) -> None:
        if id(x) not in index_of:
            index_of[id(x)] = len(alive)
            alive.append(x)
        sequences.setdefault(name, []).append(index_of[id(x)])

    with _hooks(targets, record):
        runner(stage, inputs)
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, sequence in sequences.items():  # insertion order: order of first calls
        groups.setdefault(tuple(sequence), []).append(name)
    return _Structure(
        list(groups.values()),
        {n: len(s) for n, s in sequences.items()},
        [n for n in targets if n not in sequences],
        sum(x.numel() * x.element_size() for x in alive),
    )


class _Accumulator:
    """Running ``G`` (unless ``original`` is False), ``H``, ``C`` sums over paired input rows of the two streams."""

    def __init__(self, features: int, device: torch.device, original: bool = True, where: str = "") -> None:
        self.where = where  # the layer, for an overflow error
        scratch: dict = {}  # one float32 product buffer, written by each product in turn
        self.h = RunningCovariance(features, device=device, scratch=scratch)
        self.c = RunningCovariance(features, device=device, scratch=scratch)
        self.g = RunningCovariance(features, device=device, scratch=scratch) if original else None

    def add(self, originals: list[Tensor], shifted: list[Tensor], mask: Tensor | None) -> None:
        for x, x_hat in zip(originals, shifted, strict=True):
            x, x_hat = token_rows(x, mask), token_rows(x_hat, mask)  # select the real rows once, not per product
            if self.g is not None:
                self.g.update(x, where=self.where)
            self.h.update(x_hat, where=self.where)
            self.c.update(x, x_hat, where=self.where)

    def statistics(self, names: list[str], energy: dict[str, Tensor] | None = None) -> GroupStatistics:
        """Means over all ranks (all-reduced), divided in place (call it once); zeros with ``count == 0`` when no
        rank saw an input.

        ``energy``: each layer's summed ``‖W x‖²`` on this rank (from the dense stream's outputs), averaged alike.
        """
        device = self.h.sum.device
        count = torch.tensor([float(self.h.count)], dtype=torch.float64, device=device)
        energies = torch.stack([energy[n].to(device) for n in names]) if energy is not None else None
        sums = [self.h.sum, self.c.sum, count] + ([] if self.g is None else [self.g.sum])
        all_reduce_sum_(sums + ([] if energies is None else [energies]))
        total = int(count.item())
        scale = max(total, 1)
        # in place (call once, at the end): no second copy of each in x in matrix
        g = None if self.g is None else self.g.sum.div_(scale)
        dense_energy = {} if energies is None else dict(zip(names, (energies / scale).tolist(), strict=True))
        return GroupStatistics(names, g, self.h.sum.div_(scale), self.c.sum.div_(scale), total, dense_energy)


@dataclass
class _DenseInputs:
    """One full dense pass of a block over every batch: each target's call inputs (tensors read by several
    targets are stored once, so the shared-input check still sees one object), each target's summed ``‖W x‖²``
    over real rows (from its outputs minus bias), and the block's outputs (the next block's original inputs)."""

    calls: list[dict[str, list[Any]]]
    energy: dict[str, Tensor]
    outputs: list | None

    def batch(self, index: int, names: list[str]) -> dict[str, list[Tensor]]:
        """Batch ``index``'s inputs of ``names`` (on the model's device)."""
        return {n: list(self.calls[index].get(n, [])) for n in names}


def _record_dense(
    stage: nn.Module,
    targets: dict[str, nn.Module],
    inputs: list,
    masks: list[Tensor | None],
    runner: _Runner,
    keep_outputs: bool,
    energies: bool = True,
    stop_after: dict[str, int] | None = None,
) -> _DenseInputs:
    """Run the (dense) stage once per batch with every target's inputs (and, with ``energies``, the targets'
    output energies) recorded; with ``stop_after`` (every target's call count), each forward ends at the last
    call (no outputs then)."""
    calls: list[dict[str, list[Any]]] = []
    device = dense_weight(next(iter(targets.values()))).device
    energy = {name: torch.zeros((), dtype=torch.float64, device=device) for name in targets}
    outputs: list | None = [] if keep_outputs else None
    for index, batch in enumerate(inputs):
        seen: dict[str, list[Any]] = {name: [] for name in targets}
        stored: dict[int, Any] = {}
        alive: list[Tensor] = []  # the inputs stay alive during the forward, so that ids stay unique

        def record(name: str, x: Tensor, _seen=seen, _stored=stored, _alive=alive) -> None:
            if id(x) not in _stored:
                _alive.append(x)
                # A copy (a later in-place op of the block must not change what the statistics read), kept on
                # the model's device: on an accelerator a trip to host memory and back costs more than the
                # block forwards it saves.
                _stored[id(x)] = x.detach().clone()
            _seen[name].append(_stored[id(x)])
            if stop_after is not None and all(len(_seen[n]) >= stop_after[n] for n in _seen):
                raise _StopForward

        def output(name: str, module: nn.Module, y: Tensor, _mask=masks[index]) -> None:
            rows = token_rows(y.detach(), _mask).to(torch.float64)
            bias = getattr(module, "bias", None)
            if isinstance(bias, Tensor):
                rows = rows - bias.detach().to(torch.float64)
            energy[name] += rows.square().sum().to(device)

        with _hooks(targets, record), _output_hooks(targets if energies else {}, output):
            if stop_after is None:
                out = runner(stage, batch)
            else:
                with contextlib.suppress(_StopForward):
                    runner(stage, batch)
        if outputs is not None:
            outputs.append(runner.store(_hidden(out).detach()))
        calls.append(seen)
    return _DenseInputs(calls, energy, outputs)


def _cache_estimate(structure: _Structure, inputs: list) -> float:
    """Bytes :class:`_DenseInputs` would hold: the probe batch's distinct target inputs, scaled by token rows."""
    rows = [_rows(_block_hidden(inp)) for inp in inputs]
    return structure.input_bytes * sum(rows) / max(rows[0], 1)


def _block_hidden(inputs: tuple[tuple, dict]) -> Tensor:
    args, kwargs = inputs
    return args[0] if args else kwargs["hidden_states"]


def _identical(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


def _run_recording(
    stage: nn.Module,
    members: dict[str, nn.Module],
    inputs: Any,
    runner: _Runner,
    expected: dict[str, int] | None,
    outputs: list | None,
) -> dict[str, list[Tensor]]:
    """Every call's input of every member; stops once each made its ``expected`` calls (None: full run)."""
    seen: dict[str, list[Tensor]] = {name: [] for name in members}

    def record(name: str, x: Tensor) -> None:
        seen[name].append(x)
        if expected is not None and all(len(seen[n]) >= expected[n] for n in members):
            raise _StopForward

    with _hooks(members, record), contextlib.suppress(_StopForward):
        out = runner(stage, inputs)
        if outputs is not None:
            outputs.append(runner.store(_hidden(out).detach()))
    return seen


def _collect(
    stage: nn.Module,
    members: dict[str, nn.Module],
    expected: dict[str, int] | None,
    streams: tuple[list, list],
    masks: list[Tensor | None],
    runner: _Runner,
    dense_view: Callable[[], contextlib.AbstractContextManager],
    keep_outputs: bool,
    where: str,
    dense_inputs: _DenseInputs | None = None,
    original_covariance: bool = True,
    shifted_inputs: _DenseInputs | None = None,
) -> tuple[list[GroupStatistics], list | None] | None:
    """Both streams' statistics of ``members`` over all batches, every call of every member counted.

    With ``expected`` (the probe's call counts) the members are assumed to read the very same tensors,
    so they share one statistic; that is verified on every batch, and None is returned when it fails
    anywhere (the caller then collects again with ``expected=None``: one statistic per member).
    ``masks[b]``: batch ``b``'s real tokens (None: every row counts; see :func:`~prehab.stats.token_rows`).
    ``dense_inputs``: the original stream's inputs recorded by one full dense pass (the dense stage is then not
    run again); its energies go into the statistics, and ``G`` is left out unless ``original_covariance``.
    ``shifted_inputs``: the compressed stream's inputs recorded likewise, before any group of the stage was
    solved (``true_sequential=False``); the compressed stage is then not run either.
    """
    names = list(members)
    shared = expected is not None and len(names) > 1
    first_weight = dense_weight(members[names[0]])
    with_g = original_covariance or dense_inputs is None
    accumulators = {
        name: _Accumulator(dense_weight(module).shape[1], first_weight.device, with_g, where + name)
        for name, module in (list(members.items())[:1] if shared else members.items())
    }
    unpaired, unshared = [0.0] * len(names), [0.0] * len(names)
    problem = ""
    outputs: list | None = [] if keep_outputs else None
    for batch_index, (original, shifted) in enumerate(zip(*streams, strict=True)):
        if dense_inputs is not None:
            seen_original = dense_inputs.batch(batch_index, names)
        else:  # The dense stream: this stage's replaced layers swapped back for the pass.
            with dense_view():  # full run when its outputs are kept: they are the next block's original inputs
                stop = None if keep_outputs else expected
                seen_original = _run_recording(stage, members, original, runner, stop, outputs)
        if shifted_inputs is not None:
            seen_shifted = shifted_inputs.batch(batch_index, names)
        else:
            seen_shifted = _run_recording(stage, members, shifted, runner, expected, None)
        for index, name in enumerate(names):
            xs, ys = seen_original[name], seen_shifted[name]
            if len(xs) != len(ys) or any(_rows(x) != _rows(y) for x, y in zip(xs, ys, strict=False)):
                unpaired[index] = 1.0
                problem = problem or (
                    f"layer {where + name!r} received {len(xs)} calls ({sum(map(_rows, xs))} input rows) in the "
                    f"original stream but {len(ys)} calls ({sum(map(_rows, ys))} rows) in the compressed one on "
                    f"calibration batch {batch_index}"
                )
            elif shared and not (_identical(xs, seen_original[names[0]]) and _identical(ys, seen_shifted[names[0]])):
                unshared[index] = 1.0
        for index, (name, accumulator) in enumerate(accumulators.items()):
            if not unpaired[index]:
                accumulator.add(seen_original[name], seen_shifted[name], masks[batch_index])
    flags = torch.tensor([unpaired, unshared], dtype=torch.float64, device=first_weight.device)
    all_reduce_sum_([flags])  # every rank takes the same branch below
    if flags[0].any():
        flagged = [where + n for n, f in zip(names, flags[0].tolist(), strict=True) if f]
        raise ValueError(
            f"{problem or f'layers {flagged} received different inputs in the two streams on another rank'}. "
            "Such calls depend on the data (e.g. routed MoE experts), so the two-stream methods cannot pair the "
            "compressed model's inputs with the original model's. Exclude the layer with targets=, or use the "
            "one-stream SVDLLM. Nothing was modified."
        )
    if shared and flags[1].any():
        return None
    energy = None if dense_inputs is None else dense_inputs.energy
    if shared:
        return [accumulators[names[0]].statistics(names, energy)], outputs
    return [accumulators[name].statistics([name], energy) for name in names], outputs


def _compress_stage(
    model: nn.Module,
    stage: nn.Module,
    prefix: str,
    targets: dict[str, nn.Module],
    streams: tuple[list, list],
    masks: list[Tensor | None],
    runner: _Runner,
    originals: dict[str, nn.Module],
    solve: GroupSolver,
    keep_outputs: bool,
    original_covariance: Collection[str] | None = None,
    cache_bytes: float = 0.0,
    true_sequential: bool = True,
) -> tuple[list[str], list | None]:
    """Solve and swap in the stage's targets (names relative to the stage), group after group.

    Returns the names (relative to ``model``) of targets that received no input, and, with
    ``keep_outputs``, the dense stage's outputs on the original stream when the last group's pass
    produced them (else None).

    When the original stream's inputs of every target fit ``cache_bytes`` (estimated from the probe batch),
    the dense stage runs once per batch for all groups (:class:`_DenseInputs`) instead of once per group, and
    ``G`` is collected only for groups with a layer in ``original_covariance`` (full names; None: every group).
    Without ``true_sequential`` the compressed stream's inputs of every target are recorded the same way, in one
    pass with the stage still dense (when they fit too), so every group is solved from them.
    """
    if not targets:
        return [], None
    root = prefix[:-1]
    structure = _broadcast(_probe_structure(stage, targets, streams[1][0], runner))
    passes = [(group, True) for group in structure.groups]
    if structure.uncalled:  # not called on the probe batch: maybe on others (routing, data-dependent code)
        passes.append((structure.uncalled, False))
    dense_inputs = shifted_inputs = None
    estimate = 0.0 if runner.whole_model else _broadcast(_cache_estimate(structure, streams[0]))
    if not runner.whole_model and estimate <= cache_bytes:
        with _dense(model, originals, root):
            dense_inputs = _record_dense(stage, targets, streams[0], masks, runner, keep_outputs)
    if not true_sequential and not runner.whole_model:
        if (1 + (dense_inputs is not None)) * estimate <= cache_bytes:
            # the forward ends at the last target's call unless some target's calls are not known from the probe
            stop = None if structure.uncalled else structure.calls
            shifted_inputs = _record_dense(stage, targets, streams[1], masks, runner, False, False, stop)
        else:
            warnings.warn(
                # no block name in the message: Python shows it once, not once per block of a deep model
                f"true_sequential=False: a block's layer inputs of both streams (~{2 * estimate / 2**30:.2f} GiB) do "
                f"not fit dense_cache_gb={cache_bytes / 2**30:g}, so such blocks' groups are calibrated one after "
                "another (true_sequential=True). Raise dense_cache_gb to calibrate them in one pass.",
                stacklevel=2,
            )
    unused: list[str] = []
    outputs: list | None = None if dense_inputs is None else dense_inputs.outputs
    for pass_index, (names, probed) in enumerate(passes):
        keep = keep_outputs and pass_index == len(passes) - 1 and dense_inputs is None
        members = {n: targets[n] for n in names}
        args = (stage, members)
        wants_g = original_covariance is None or any(prefix + n in original_covariance for n in names)
        rest = (streams, masks, runner, lambda: _dense(model, originals, root), keep, prefix, dense_inputs, wants_g)
        rest += (shifted_inputs,)
        collected = _collect(*args, {n: structure.calls[n] for n in names} if probed else None, *rest)
        if collected is None:  # the members did not always share their inputs: one statistic each
            collected = _collect(*args, None, *rest)
        results, collected_outputs = collected
        outputs = outputs if dense_inputs is not None else collected_outputs
        for stats in results:
            stats.names = [prefix + n for n in stats.names]
            stats.dense_energy = {prefix + n: e for n, e in stats.dense_energy.items()}
            if stats.count == 0:
                unused += stats.names
                continue
            for full_name, new in solve(stats).items():
                originals[full_name] = replace_module(model, full_name, new)
    return unused, outputs


# ------------------------------------------------------------------------------------------ entry point
def sequential_compress(
    model: nn.Module,
    targets: dict[str, nn.Module],
    batches: list,
    solve: GroupSolver,
    blocks: str | None = None,
    progress: bool = True,
    desc: str = "two-stream",
    refine: BlockRefiner | None = None,
    rollback: RollbackStore | None = None,
    original_covariance: Collection[str] | None = None,
    dense_cache_gb: float = DENSE_CACHE_GB,
    true_sequential: bool = True,
) -> list[str]:
    """Compress ``targets`` block by block from two calibration streams, calling ``solve`` per group.

    Args:
        model: the model (its targeted layers are replaced in place).
        targets: layers to compress, by name relative to ``model``.
        batches: this rank's calibration batches (fed through :func:`calibration_forward`).
        solve: turns a group's (all-reduced) statistics into replacement modules.
        blocks: name of the repeated block list; found automatically when None (every stack that holds
            targets, in the order the model runs them). Without one, the whole model is the single
            stage (per-layer early-exit forwards).
        progress: show a progress bar.
        desc: the progress bar's label.
        refine: called once per block after its layers are swapped in, with the block's low-rank factors
            and the two streams (compressed block on the shifted inputs, dense block on the original ones),
            before the shifted stream is propagated to the next block (see :mod:`prehab.refine`). Models
            without a repeated block are not refined (a warning says so).
        rollback: where finished blocks' dense modules go (see the module doc); default: a store of this
            call, closed at the end. A caller's store is left holding them after a success (a ratio sweep
            restores the dense model from it) and is restored from on failure.
        original_covariance: names of the targets whose group statistics must carry ``G`` (the original
            inputs' covariance; e.g. for a spectrum plot). None: every group. Groups without it carry each
            layer's ``dense_energy`` (``tr(W G Wᵀ)``, from the dense block's outputs) instead; ``G`` is always
            collected when the dense inputs are not cached (below).
        dense_cache_gb: memory (on the model's device) that may hold one block's original inputs of every
            target over all batches, so that the dense block runs once per block instead of once per group of
            layers. Blocks whose inputs would not fit run the dense stream per group (the
            results are the same to float round-off). 0: never cache.
        true_sequential: solve a block's groups one after another, each from the compressed stream with the
            block's earlier groups already swapped in (q/k/v before o, ...; exact, the papers'). False (GPTQ's
            ``true_sequential=False``): every group of a block from one pass of the compressed stream with the
            block still dense, so later groups do not see the error of earlier ones in the same block (earlier
            blocks' still propagates); one compressed-stream pass per block instead of one per group. Needs both
            streams' layer inputs within ``dense_cache_gb``; a block where they do not fit runs true-sequential
            (with a warning). Models without a repeated block always run true-sequential.

    Returns:
        Names of targets that never received an input (left dense).

    Raises:
        ValueError: no targets or batches; targets outside the block stacks; blocks called with
            per-layer inputs, out of order or interleaved between stacks; a layer whose calls differ
            between the two streams. All before that layer's stack or group is modified.

    On any exception every replaced layer is put back, so the model is left as it was.
    """
    if not targets:
        raise ValueError("targets is empty: there is nothing to compress (resolve_targets never returns an empty set).")
    if not batches:
        raise ValueError("this rank received no calibration batches; use calibration_batches >= the number of ranks.")
    device = dense_weight(next(iter(targets.values()))).device
    stacks = _stacks_for(model, targets, blocks)
    originals: dict[str, nn.Module] = {}  # name -> dense module of the current block (dense stream, rollback)
    store = RollbackStore(device) if rollback is None else rollback  # finished blocks' dense modules
    masks = _padding_masks(model, batches)  # padded positions stay out of G, H, C
    if len(store):
        raise ValueError(f"rollback= already holds {store.names()[:3]}: restore it before the next compression.")

    with calibration_forward_context(model), contextlib.ExitStack() as cleanup:
        if rollback is None:
            cleanup.callback(store.close)
        try:
            if not stacks:
                if refine is not None:
                    warnings.warn(
                        "block refinement needs a repeated block list and this model has none: the factors are "
                        "not refined. Pass blocks= to name the block list.",
                        stacklevel=2,
                    )
                if not true_sequential:
                    warnings.warn(
                        "true_sequential=False needs a repeated block list and this model has none: its layers are "
                        "calibrated one group after another. Pass blocks= to name the block list.",
                        stacklevel=2,
                    )
                runner = _Runner(whole_model=True, device=device, offload=False)
                with tqdm(total=1, desc=f"{desc}: blocks", disable=not progress, unit="block") as bar:
                    streams = (list(batches), list(batches))
                    unused, _ = _compress_stage(
                        model,
                        model,
                        "",
                        dict(targets),
                        streams,
                        masks,
                        runner,
                        originals,
                        solve,
                        False,
                        original_covariance,
                    )
                    bar.update()
                return unused
            runner = _Runner(whole_model=False, device=device, offload=device.type != "cpu")
            order = _broadcast(_stack_order(model, stacks, batches[0])) if len(stacks) > 1 else [0]
            skipped = tuple(name + "." for s, (name, _) in enumerate(stacks) if s not in order)
            unused = [n for n in targets if n.startswith(skipped)]  # stacks the model never ran
            work = [(stacks[s], _blocks_with_targets(stacks[s], targets)) for s in order]
            total = sum(last + 1 for _, last in work)
            with tqdm(total=total, desc=f"{desc}: blocks", disable=not progress, unit="block") as bar:
                for (name, stack), last in work:
                    unused += _compress_stack(
                        model,
                        name,
                        stack,
                        last,
                        targets,
                        batches,
                        masks,
                        runner,
                        originals,
                        solve,
                        bar,
                        store,
                        refine,
                        original_covariance,
                        dense_cache_gb * 2**30,
                        true_sequential,
                    )
            return unused
        except BaseException:
            for name, module in originals.items():
                replace_module(model, name, module)
            store.restore(model)
            raise


def covered_by_blocks(model: nn.Module, targets: dict[str, nn.Module], blocks: str | None = None) -> bool:
    """Whether every target lies in a repeated block list, so that :func:`one_stream_blocks` can run."""
    try:
        return bool(_stacks_for(model, targets, blocks))
    except ValueError:
        return False


def one_stream_blocks(
    model: nn.Module,
    targets: dict[str, nn.Module],
    batches: list,
    blocks: str | None = None,
    progress: bool = True,
    desc: str = "one-stream",
) -> Iterator[tuple[dict[str, Tensor], int]]:
    """The original model's input covariances ``G = mean XXᵀ``, one block at a time: memory of one block.

    Yields ``({name: G}, rows)`` per block that holds targets, in the order the model runs them (layers
    that read the same tensor share one ``G``; layers never called are left out), all-reduced over DDP
    ranks. The inputs of every stack's first block are captured before the first yield, with the
    dense model (the checks of :func:`sequential_compress` apply); each block's dense outputs are
    computed before its statistics are yielded, so the caller may replace the block's layers at once:
    later blocks still see the original model's activations. The factors match those from one
    whole-model pass (:func:`~prehab.calibration.collect_input_covariances`) to float round-off.

    The checks and the capture run at the call (not at the first ``next``), so their errors come first.

    Raises:
        ValueError: no batches, targets outside the block lists (:func:`covered_by_blocks` says), or
            blocks the pipeline cannot run one by one (see :func:`sequential_compress`).
    """
    if not batches:
        raise ValueError("this rank received no calibration batches; use calibration_batches >= the number of ranks.")
    device = dense_weight(next(iter(targets.values()))).device
    stacks = _stacks_for(model, targets, blocks)
    if not stacks:
        raise ValueError("no repeated block list holds the targets: collect their statistics in one pass instead.")
    runner = _Runner(whole_model=False, device=device, offload=device.type != "cpu")
    with calibration_forward_context(model):
        order = _broadcast(_stack_order(model, stacks, batches[0])) if len(stacks) > 1 else [0]
        masks = _padding_masks(model, batches)
        # Every stack's inputs before anything is yielded (and maybe replaced): all from the dense model.
        work = [
            (
                stacks[s],
                _blocks_with_targets(stacks[s], targets),
                _capture_stack_inputs(model, *stacks[s], batches, runner, check=True),
            )
            for s in order
        ]
    return _one_stream_iterator(model, targets, work, masks, runner, device, progress, desc)


def _one_stream_iterator(
    model: nn.Module,
    targets: dict[str, nn.Module],
    work: list,
    masks: list[Tensor | None],
    runner: _Runner,
    device: torch.device,
    progress: bool,
    desc: str,
) -> Iterator[tuple[dict[str, Tensor], int]]:
    total = sum(last + 1 for _, last, _ in work)
    with tqdm(total=total, desc=f"{desc}: blocks", disable=not progress, unit="block") as bar:
        for (name, stack), last, inputs in work:
            for index in range(last + 1):
                prefix = f"{name}.{index}."
                members = {n: m for n, m in targets.items() if n.startswith(prefix)}
                features = {n: dense_weight(m).shape[1] for n, m in members.items()}
                collector = CovarianceCollector(members, features, device=device)
                outputs = []
                with calibration_forward_context(model), collector.hooks():
                    for block_inputs, mask in zip(inputs, masks, strict=True):
                        collector.mask = mask  # padded positions stay out of G
                        output = runner(stack[index], block_inputs)
                        if index < last:
                            outputs.append(runner.store(_hidden(output).detach()))
                collector.all_reduce_()
                count = max((stat.count for stat in collector.unique()), default=0)
                statistics = collector.means_()
                del collector
                bar.update()
                yield statistics, count
                del statistics
                if index < last:
                    inputs = [_with_hidden(inp, h) for inp, h in zip(inputs, outputs, strict=True)]


def _blocks_with_targets(stack: tuple[str, nn.Module], targets: dict[str, nn.Module]) -> int:
    """Index of the stack's last block that holds a target (the blocks after it need no pass)."""
    name, container = stack
    return max(i for i in range(len(container)) if any(n.startswith(f"{name}.{i}.") for n in targets))


def _compress_stack(
    model: nn.Module,
    name: str,
    stack: nn.Module,
    last: int,
    targets: dict[str, nn.Module],
    batches: list,
    masks: list[Tensor | None],
    runner: _Runner,
    originals: dict[str, nn.Module],
    solve: GroupSolver,
    bar: tqdm,
    store: RollbackStore,
    refine: BlockRefiner | None = None,
    original_covariance: Collection[str] | None = None,
    cache_bytes: float = 0.0,
    true_sequential: bool = True,
) -> list[str]:
    # Earlier stacks' dense layers (e.g. the encoder's, for the decoder's inputs) come back for this one pass.
    with store.loaded() as earlier, _dense(model, {**earlier, **originals}, ""):
        original_inputs = _capture_stack_inputs(model, name, stack, batches, runner, check=True)
    # Upstream layers (earlier stacks, e.g. the encoder for a decoder's cross-attention) may be compressed.
    if originals or len(store):
        shifted_inputs = _capture_stack_inputs(model, name, stack, batches, runner, check=False)
    else:
        shifted_inputs = list(original_inputs)
    unused: list[str] = []
    for index in range(last + 1):
        block, prefix = stack[index], f"{name}.{index}."
        block_targets = {n[len(prefix) :]: m for n, m in targets.items() if n.startswith(prefix)}
        more = index < last
        streams = (original_inputs, shifted_inputs)
        missing, next_original = _compress_stage(
            model,
            block,
            prefix,
            block_targets,
            streams,
            masks,
            runner,
            originals,
            solve,
            more or refine is not None,
            original_covariance,
            cache_bytes,
            true_sequential,
        )
        unused += missing
        factors = [
            p
            for full_name in originals
            if full_name.startswith(prefix) and isinstance(model.get_submodule(full_name), LowRankLinear)
            for p in (model.get_submodule(full_name).up.weight, model.get_submodule(full_name).down.weight)
        ]
        if refine is not None and factors:
            if next_original is None:
                with _dense(model, originals, prefix[:-1]):
                    next_original = [runner.store(_hidden(runner(block, inp)).detach()) for inp in original_inputs]
            dense_out = next_original

            def compressed_output(b: int, _block: nn.Module = block, _inputs: list = shifted_inputs) -> Tensor:
                return token_rows(_hidden(runner(_block, _inputs[b])), masks[b])

            refine(  # the output error of real tokens only: padding is not fitted
                prefix[:-1],
                block,
                factors,
                compressed_output,
                lambda b, _out=dense_out: token_rows(runner.load(_out[b]), masks[b]),
                len(shifted_inputs),
            )
        bar.update()
        if more:
            with _dense(model, originals, prefix[:-1]):
                if next_original is None:
                    next_original = [runner.store(_hidden(runner(block, inp)).detach()) for inp in original_inputs]
            next_shifted = [runner.store(_hidden(runner(block, inp)).detach()) for inp in shifted_inputs]
        for done in [n for n in originals if n.startswith(prefix)]:  # the block is done: off the device
            store.put(done, originals[done])
            del originals[done]  # after put, which leaves the module untouched if it fails
        if not more:
            break
        original_inputs = [_with_hidden(inp, h) for inp, h in zip(original_inputs, next_original, strict=True)]
        shifted_inputs = [_with_hidden(inp, h) for inp, h in zip(shifted_inputs, next_shifted, strict=True)]
    return unused
