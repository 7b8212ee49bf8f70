"""Model-agnostic evaluation helpers: perplexity and metric loops over a dataloader, no Trainer needed.

Used by the PrehabModule and the compression callbacks to report metrics before and after each stage. A
batch reaches the model through :func:`forward_batch`: a dict is passed as keyword arguments without its
``labels`` (so Hugging Face models do not compute their own loss), a tuple/list passes its first element, a
tensor is passed as is. Every helper runs under ``torch.no_grad()`` with the model in eval mode and restores
each submodule's train/eval flag afterwards.

Distributed use: the accumulators are torchmetrics ``Metric`` objects, whose states are summed/concatenated
across processes at ``compute()`` when ``sync_dist=True`` (every rank must then call the helper). Feed each
rank a disjoint, unpadded shard (the prehab DataModules do this under a distributed Trainer) or the same full
data on every rank (the perplexity ratio is unchanged); Lightning's default padded ``DistributedSampler``
would count repeated samples twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from prehab.calibration import padding_mask
from prehab.stats import token_rows

IGNORE_INDEX = -100


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``torch.no_grad()`` + eval mode; afterwards every submodule gets back its own train/eval flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, was_training in modes:
            module.training = was_training


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a parameterless model."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: dict -> ``model(**batch minus labels)``, tuple/list -> ``model(batch[0])``,
    tensor -> ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**{key: value for key, value in batch.items() if key != "labels"})
    if isinstance(batch, list | tuple):
        return model(batch[0])
    if isinstance(batch, Tensor):
        return model(batch)
    raise TypeError(f"Cannot feed a batch of type {type(batch).__name__} to the model; use a dict, tuple or tensor.")


def output_logits(output: Any) -> Tensor:
    """The logits of a model output: ``.logits`` (Hugging Face), ``["logits"]``, the first element of a
    tuple, or the tensor itself."""
    if isinstance(output, Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, list | tuple) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"Cannot find logits in a model output of type {type(output).__name__}.")


def batch_targets(batch: Any, target_key: str = "labels") -> Tensor:
    """The targets of a batch: ``batch[target_key]`` for a dict, the second element of a tuple/list."""
    if isinstance(batch, Mapping):
        return batch[target_key]
    if isinstance(batch, list | tuple) and len(batch) > 1:
        return batch[1]
    raise TypeError(f"Cannot find targets in a batch of type {type(batch).__name__}.")


def causal_lm_labels(batch: Any) -> Tensor:
    """Next-token targets of a language-model batch (not yet shifted): ``labels`` if present, else
    ``input_ids`` (or the tensor itself) with padding (``attention_mask == 0``) set to -100."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "labels" in batch:
            return batch["labels"]
        labels = batch["input_ids"]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return labels
    return batch_targets(batch)


class TokenPerplexity(Metric):
    """Perplexity ``exp(sum NLL / token count)`` over every predicted token of a causal LM.

    ``update(logits, labels)`` shifts internally (position ``t`` predicts label ``t + 1``, as Hugging Face
    does), computes the NLL with a float32 log-softmax (``F.cross_entropy``) and skips labels equal to -100.
    The NLL sum is accumulated in float64 and the token count as an integer, both summed across processes,
    so the result does not depend on how batches or ranks split the tokens. (torchmetrics' ``Perplexity``
    takes ``log(softmax)``, which underflows to ``inf`` for the very unlikely tokens that a badly compressed
    model produces, and does not shift.)
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("token_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        shifted_logits = logits[..., :-1, :].float()
        shifted_labels = labels[..., 1:].to(logits.device)
        nll = F.cross_entropy(
            shifted_logits.reshape(-1, shifted_logits.shape[-1]),
            shifted_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        self.nll_sum += nll.double()
        self.token_count += (shifted_labels != IGNORE_INDEX).sum()

    def compute(self) -> Tensor:
        return torch.exp(self.nll_sum / self.token_count).float()


def _language_model_batches(data: Any, batch_size: int) -> Iterable[Any]:
    """Batches from a dataloader/iterable of batches, or from a ``(N, T)`` tensor / list of windows."""
    if isinstance(data, Tensor):
        if data.dim() != 2:
            raise ValueError(f"A tensor of windows must be (num_windows, seq_len), got shape {tuple(data.shape)}.")
        return ({"input_ids": chunk} for chunk in data.split(batch_size))
    if isinstance(data, list | tuple) and data and isinstance(data[0], Tensor):
        return _language_model_batches(torch.stack(list(data)), batch_size)
    return data


def _set_sync(metrics: Metric | MetricCollection, sync_dist: bool) -> None:
    # torchmetrics has no public per-call switch: `sync_on_compute` is the documented flag, `_to_sync` its
    # working copy that compute() reads.
    for metric in metrics.values() if isinstance(metrics, MetricCollection) else [metrics]:
        metric.sync_on_compute = sync_dist
        metric._to_sync = sync_dist


def perplexity(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    sync_dist: bool = False,
) -> float:
    """Perplexity of a causal language model: ``exp(sum of token NLL / number of predicted tokens)``.

    Args:
        model: Any module whose output holds next-token logits ``(B, T, V)`` (a Hugging Face causal LM works).
        data: A dataloader (or any iterable) of LM batches — dicts with ``input_ids`` and optionally
            ``attention_mask``/``labels`` (-100 = ignored) — or a ``(num_windows, seq_len)`` LongTensor
            (or list of 1-D windows), which is batched by ``batch_size``.
        batch_size: Batch size when ``data`` is a tensor of windows.
        device: Where to run; defaults to the model's device.
        max_batches: Stop after this many batches.
        sync_dist: Sum the NLL and token counts over all processes (every rank must call this).

    Returns:
        The perplexity as a float (computed in float32 per token, accumulated in float64).
    """
    device = torch.device(device) if device is not None else model_device(model)
    metric = TokenPerplexity(sync_on_compute=sync_dist).to(device)
    with evaluating(model):
        for index, batch in enumerate(_language_model_batches(data, batch_size)):
            if max_batches is not None and index >= max_batches:
                break
            batch = move_data_to_device(batch, device)
            metric.update(output_logits(forward_batch(model, batch)), causal_lm_labels(batch))
    if int(metric.token_count) == 0 and not sync_dist:
        raise ValueError("perplexity: no tokens were evaluated (empty data or every label is -100).")
    return float(metric.compute())


def logits_to_predictions(logits: Tensor) -> Tensor:
    """Class ids (argmax over the last dim) for classification logits; the squeezed float score for a
    one-output regression head (STS-B)."""
    if logits.shape[-1] == 1:
        return logits.squeeze(-1).float()
    return logits.argmax(dim=-1)


def evaluate_metrics(
    model: nn.Module,
    dataloader: Iterable[Any],
    metrics: Metric | MetricCollection,
    *,
    output_transform: Callable[[Tensor], Tensor] | None = None,
    target_key: str = "labels",
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    sync_dist: bool | None = None,
) -> dict[str, float]:
    """Feed every batch through ``model`` and ``metrics``; return the computed values as floats.

    Args:
        model: Any module; batches go through :func:`forward_batch`, logits through :func:`output_logits`.
        dataloader: Iterable of dict batches (targets under ``target_key``) or ``(inputs, targets)`` tuples.
        metrics: A torchmetrics ``Metric`` or ``MetricCollection``; it is reset first and left holding this
            run's state.
        output_transform: Maps logits to what the metrics expect (default: the logits unchanged).
        target_key: Key of the targets in dict batches.
        device: Where to run; defaults to the model's device.
        max_batches: Stop after this many batches.
        sync_dist: Override the metrics' ``sync_on_compute`` (``True``: reduce over all processes, every rank
            must call this); ``None`` keeps their own setting.

    Returns:
        ``{name: value}``; a single ``Metric`` is reported under its class name.
    """
    device = torch.device(device) if device is not None else model_device(model)
    metrics = metrics.to(device)
    metrics.reset()
    if sync_dist is not None:
        _set_sync(metrics, sync_dist)
    with evaluating(model):
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            batch = move_data_to_device(batch, device)
            logits = output_logits(forward_batch(model, batch))
            predictions = output_transform(logits) if output_transform is not None else logits
            metrics.update(predictions, batch_targets(batch, target_key).to(device))
    values = metrics.compute()
    if isinstance(values, Tensor):
        values = {type(metrics).__name__: values}
    return {name: float(value) for name, value in values.items()}


def evaluate_classification(
    model: nn.Module,
    dataloader: Iterable[Any],
    metrics: Metric | MetricCollection,
    **kwargs: Any,
) -> dict[str, float]:
    """:func:`evaluate_metrics` with logits turned into class ids (or regression scores) first, which is
    what ``GLUE.metrics()`` and ``ImageNet.metrics()`` expect. Keyword arguments are
    :func:`evaluate_metrics`'s."""
    kwargs.setdefault("output_transform", logits_to_predictions)
    return evaluate_metrics(model, dataloader, metrics, **kwargs)


def layer_output_errors(
    original: nn.Module, compressed: nn.Module, batches: Iterable[Any], names: Iterable[str]
) -> dict[str, float]:
    """Each named layer's relative output error ``‖W X − W' X̂‖² / ‖W X‖²`` on new data (not the calibration set).

    ``X`` is what the layer receives inside ``original`` and ``X̂`` what its replacement receives inside
    ``compressed`` on the same batch, so this is the anchored objective of AA-SVD (and the one-stream objective
    of SVD-LLM for the first compressed layer) measured out of sample; the compression report's
    ``relative_error`` is the same quantity on the calibration data. ``‖W X‖²`` is taken from the original
    layer's output minus its bias. Padded tokens of a dict batch's ``attention_mask`` are left out (see
    :func:`prehab.calibration.padding_mask`).

    Args:
        original: the model before compression (same module names as ``compressed``).
        compressed: the model after compression.
        batches: inputs both models accept (see :func:`forward_batch`); one batch's outputs of every named
            layer are held at once, so keep batches small.
        names: module names present in both models, e.g. the keys of ``compressed``'s report.

    Returns:
        ``{name: relative error}``; NaN for a layer whose original output was zero on every batch.
    """
    names = list(names)
    errors = dict.fromkeys(names, 0.0)
    references = dict.fromkeys(names, 0.0)
    modules = {
        "original": {name: original.get_submodule(name) for name in names},
        "compressed": {name: compressed.get_submodule(name) for name in names},
    }
    outputs: dict[str, dict[str, Tensor]] = {"original": {}, "compressed": {}}  # one batch's, overwritten

    def keep(side: str, name: str) -> Callable[..., None]:
        return lambda _module, _inputs, out: outputs[side].__setitem__(name, out.detach())

    handles = [
        module.register_forward_hook(keep(side, name))
        for side, layers in modules.items()
        for name, module in layers.items()
    ]
    device = model_device(compressed)
    try:
        with evaluating(original), evaluating(compressed):
            for batch in batches:
                batch = move_data_to_device(batch, device)
                mask = padding_mask(batch)
                forward_batch(original, batch)
                forward_batch(compressed, batch)
                for name in names:
                    y = token_rows(outputs["original"][name], mask).double()
                    y_hat = token_rows(outputs["compressed"][name], mask).double()
                    bias = getattr(modules["original"][name], "bias", None)
                    signal = y if bias is None else y - bias.double()
                    errors[name] += float((y - y_hat).pow(2).sum())
                    references[name] += float(signal.pow(2).sum())
    finally:
        for handle in handles:
            handle.remove()
    return {name: errors[name] / references[name] if references[name] > 0 else float("nan") for name in names}
