"""Activation statistics: running covariances, input hooks, the calibration context, DDP reduction.

No Trainer here: these take modules and tensors, so they are testable on tiny matrices.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .linalg import all_finite, equal_tile_size

__all__ = [
    "CovarianceCollector",
    "RunningCovariance",
    "all_reduce_sum_",
    "calibration_forward_context",
    "gram_product",
    "input_hooks",
    "tile_width",
    "token_rows",
]


# Below this bound on ``rows · max|a| · max|b|`` no float32 entry of ``aᵀb`` can overflow (float32's largest
# value is ~3.4e38; the margin covers rounding).
_FLOAT32_SAFE = 1e38
_FLOAT32_MAX = torch.finfo(torch.float32).max

# A running ``aᵀb`` at least two tiles wide is accumulated by tiles of about this width, each added to the float64
# sum while it is still in cache; a symmetric ``aᵀa`` only on and above the diagonal, the lower triangle filled in
# once when the sum is read (about half the products and adds). ``bench_surgery.py --only statistics``: ``aᵀa`` at
# 0.6-0.9x the bare float32 product from 1536 features on, against 1.1-1.8x for one product per batch added whole.
# Devices not listed keep one product per batch (not measured there).
TILE_WIDTH: dict[str, int] = {"cpu": 512}


@contextlib.contextmanager
def tile_width(width: int, device_type: str = "cpu") -> Iterator[None]:
    """Within the block, products on ``device_type`` go by tiles of about ``width`` (0: one product per batch);
    the previous setting comes back after (for comparisons and tests)."""
    had, previous = device_type in TILE_WIDTH, TILE_WIDTH.get(device_type)
    TILE_WIDTH[device_type] = width
    try:
        yield
    finally:
        if had:
            TILE_WIDTH[device_type] = previous
        else:
            del TILE_WIDTH[device_type]


def _peak(x: Tensor) -> float:
    """``max|x|`` as a Python float (NaN or inf when ``x`` is not finite)."""
    if not x.numel():
        return 0.0
    low, high = (float(v) for v in torch.aminmax(x))  # no |x| temporary: ~5x cheaper than x.abs().amax()
    return float("nan") if math.isnan(low) or math.isnan(high) else max(-low, high)


def _float32_product(a: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor | None:
    """``aᵀb`` in float32 (into ``out`` when given), or None when that could overflow although the inputs are
    finite. Non-finite inputs give a non-finite product (the callers report it).

    The overflow check reads whichever is smaller: the inputs (``rows x (features_a + features_b)``, for the bound
    ``rows · max|a| · max|b|``) or the product (``features_a x features_b``). With few rows and wide layers (a
    512-token batch into LLaMA-7B's 11008-wide down projection) checking the product costs most of the product.
    """
    rows, features_a = a.shape
    features_b = features_a if b is None else b.shape[1]
    narrow = a.float()
    other = narrow if b is None else b.float()
    if rows * (features_a + (0 if b is None else features_b)) <= features_a * features_b:
        peaks = [_peak(a)] if b is None else [_peak(a), _peak(b)]
        if not all(math.isfinite(p) for p in peaks):
            return torch.mm(narrow.mT, other, out=out)
        # a float64 value beyond float32's range turns into inf in the float32 copy, whatever the bound says
        if rows * peaks[0] * peaks[-1] >= _FLOAT32_SAFE or max(peaks) > _FLOAT32_MAX:
            return None
        return torch.mm(narrow.mT, other, out=out)
    product = torch.mm(narrow.mT, other, out=out)
    if all_finite(product) or not all(math.isfinite(_peak(x)) for x in ((a,) if b is None else (a, b))):
        return product
    return None


def gram_product(a: Tensor, b: Tensor | None = None, where: str = "") -> Tensor:
    """``aᵀb`` (``aᵀa`` when ``b`` is None) of row-major activations ``(rows, features)``.

    Computed in float32 (cheap); when that could overflow although the activations are finite (magnitudes above
    ~4e17 for 512 rows square past float32's 3.4e38), in float64. Non-finite activations give a non-finite
    product, which the callers report as such.

    Args:
        a: ``(rows, features_a)`` activations.
        b: ``(rows, features_b)`` activations, or None for ``a`` itself.
        where: the layer, for the error message.

    Raises:
        OverflowError: the activations are finite but overflow even a float64 product (magnitudes ~1e154).
    """
    product = _float32_product(a, b)
    return product if product is not None else _float64_product(a, b, where)


def _float64_product(a: Tensor, b: Tensor | None, where: str) -> Tensor:
    """``aᵀb`` in float64, for finite inputs whose float32 product could overflow; OverflowError naming ``where``
    if even float64 does."""
    wide = a.double()
    product = wide.mT @ (wide if b is None else b.double())
    if not all_finite(product):
        peak = max(_peak(x) for x in ((a,) if b is None else (a, b)))
        raise OverflowError(
            f"activations of magnitude ~{peak:.1e}{f' in layer {where!r}' if where else ''} overflow even a float64 "
            "covariance; rescale the model's activations (they are finite, but too large to accumulate)."
        )
    return product


def token_rows(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``x`` as ``(rows, features)``, keeping only the rows of real tokens.

    ``mask`` (True = a real token, e.g. a batch's ``attention_mask``) applies when its shape is ``x``'s
    leading shape (``batch x sequence``); otherwise (no mask, or a layer whose input is not laid out per
    token, such as a pooled head) every row is kept.
    """
    flat = x.reshape(-1, x.shape[-1])
    if mask is None or tuple(mask.shape) != tuple(x.shape[:-1]):
        return flat
    return flat[mask.reshape(-1).to(device=flat.device, dtype=torch.bool)]


class RunningCovariance:
    """Running ``Σ aᵀb`` over rows of activations (``aᵀa`` when ``b`` is omitted) with a row count.

    Each batch's product is computed in float32 (cheap; in float64 when the inputs' magnitudes could overflow
    float32, see :func:`gram_product`) and added to a float64 sum (exact enough over many batches; the sum does not
    depend on how batches are grouped, so DDP ranks and one process agree to float64 round-off). A product at least
    two of the device's :data:`TILE_WIDTH` wide is accumulated tile by tile (a symmetric ``aᵀa`` on its upper
    triangle, mirrored when :attr:`sum` is read). ``scratch``: a
    dict shared by accumulators that take turns (a collector's), holding one float32 product buffer per shape so
    that a batch's product is written in place instead of allocated (None: a new product per batch, nothing
    kept). ``mean()`` divides by the count; solvers are invariant to that scale, but it keeps numbers
    comparable across calibration sizes.
    """

    def __init__(
        self,
        rows: int,
        cols: int | None = None,
        device: torch.device | str | None = None,
        scratch: dict | None = None,
    ) -> None:
        self._sum = torch.zeros(rows, rows if cols is None else cols, dtype=torch.float64, device=device)
        self.count = 0
        self._scratch = scratch
        self._lower_stale = False  # symmetric tile updates left the lower triangle behind

    @property
    def sum(self) -> Tensor:
        """The float64 sum ``Σ aᵀb`` (after symmetric tile updates, its lower triangle is filled in first)."""
        if self._lower_stale:
            _mirror_upper_(self._sum, 512)  # any tile size mirrors alike (TILE_WIDTH may have changed since)
            self._lower_stale = False
        return self._sum

    def update(self, a: Tensor, b: Tensor | None = None, mask: Tensor | None = None, where: str = "") -> None:
        """Add a batch. ``a``, ``b``: (..., features); leading dims are samples (tokens, patches).
        ``mask``: the real tokens (see :func:`token_rows`); padded rows are left out. ``where``: the layer, for
        an overflow error."""
        a2 = token_rows(a.detach(), mask)
        b2 = None if b is None else token_rows(b.detach(), mask)
        if b2 is not None and b2.shape[0] != a2.shape[0]:
            raise ValueError(f"streams have {a2.shape[0]} and {b2.shape[0]} rows; they must be paired.")
        width = max(self._sum.shape)
        tile = equal_tile_size(width, TILE_WIDTH.get(a2.device.type, 0))
        if tile < width and self._sum.device == a2.device:
            # the input bound only: tiles are added as they come, there is no whole product to check after
            peaks = [_peak(a2)] if b2 is None else [_peak(a2), _peak(b2)]
            if all(math.isfinite(p) and p <= _FLOAT32_MAX for p in peaks):
                if a2.shape[0] * peaks[0] * peaks[-1] < _FLOAT32_SAFE:
                    self._add_tiles(a2, b2, tile)
                    return
        # a buffer made in inference mode cannot be written outside it (and the reverse is refused too)
        key = (a2.shape[1], a2.shape[1] if b2 is None else b2.shape[1], a2.device, torch.is_inference_mode_enabled())
        buffer = None if self._scratch is None else self._scratch.get(key)
        product = _float32_product(a2, b2, out=buffer)
        if product is None:
            product = _float64_product(a2, b2, where)  # not the float32 attempt a second time
        elif self._scratch is not None and buffer is None:
            self._scratch[key] = product
        self.add_(product, a2.shape[0])

    def _add_tiles(self, a: Tensor, b: Tensor | None, block: int) -> None:
        """``aᵀb`` tile by tile (``aᵀa``: on and above the diagonal only), each float32 tile added to the float64
        sum at once, while it is still in cache."""
        narrow = a.float()
        other = narrow if b is None else b.float()
        key = ("tiles", block, a.device, torch.is_inference_mode_enabled())
        tile = None if self._scratch is None else self._scratch.get(key)
        if tile is None:
            tile = torch.empty(block * block, dtype=torch.float32, device=a.device)
            if self._scratch is not None:
                self._scratch[key] = tile
        for i in range(0, narrow.shape[1], block):
            left = narrow[:, i : i + block].mT
            for j in range(i if b is None else 0, other.shape[1], block):
                right = other[:, j : j + block]
                product = torch.mm(left, right, out=tile[: left.shape[0] * right.shape[1]].view(left.shape[0], -1))
                self._sum[i : i + block, j : j + block].add_(product)
        self._lower_stale = self._lower_stale or b is None
        self.count += a.shape[0]

    def add_(self, product: Tensor, count: int) -> None:
        """Add a precomputed ``aᵀb`` for ``count`` rows."""
        self._sum.add_(product.to(device=self._sum.device))  # float32 -> float64 on the fly, no float64 copy
        self.count += count

    def mean(self) -> Tensor:
        if self.count == 0:
            raise ValueError("no samples were accumulated.")
        return self.sum / self.count

    def all_reduce_(self) -> None:
        """Sum the statistics and counts over DDP ranks (no-op outside torch.distributed)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        all_reduce_sum_([self.sum, count])
        self.count = int(count.item())


def _mirror_upper_(matrix: Tensor, block: int) -> None:
    """Copy the upper triangle of square ``matrix`` onto its lower one, in place, tile by tile (no full-size
    temporary)."""
    size = matrix.shape[0]
    for i in range(0, size, block):
        for j in range(i, size, block):
            upper = matrix[i : i + block, j : j + block]
            if i == j:
                upper.copy_(upper.triu() + upper.triu(1).mT)
            else:
                matrix[j : j + block, i : i + block].copy_(upper.mT)


def all_reduce_sum_(tensors: list[Tensor]) -> None:
    """In-place sum over all ranks when a process group with more than one rank is running."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


@contextlib.contextmanager
def input_hooks(modules: Mapping[str, nn.Module], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, input)`` before each named module runs; the hooks are always removed."""
    handles = []
    try:
        for name, module in modules.items():

            def hook(_module: nn.Module, args: tuple, _name: str = name) -> None:
                fn(_name, args[0])

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class CovarianceCollector:
    """Accumulates ``G = XXᵀ`` of each named module's input over calibration forwards.

    Modules fed the very same tensor (q/k/v, gate/up) share one product and one accumulator: the
    first batch finds them (accumulators are allocated lazily), which keeps memory at one ``in x in``
    matrix per distinct input. Use as ``with collector.hooks(): model(batch)``; set ``collector.mask`` to
    the batch's real tokens (``batch x sequence``, True = real) before each forward so that padding is
    left out of the statistics (see :func:`token_rows`).
    """

    def __init__(self, modules: Mapping[str, nn.Module], features: Mapping[str, int], device=None) -> None:
        self.modules = dict(modules)
        self.features, self.device = dict(features), device
        self.stats: dict[str, RunningCovariance] = {}
        self.mask: Tensor | None = None
        self._last_input: Tensor | None = None
        self._last_rows: Tensor | None = None  # the last input's real rows
        self._last_owner: str | None = None
        self._scratch: dict = {}  # one float32 product buffer per input width, shared by the accumulators

    def _observe(self, name: str, x: Tensor) -> None:
        if x is self._last_input:
            owner = self.stats[self._last_owner]
            stat = self.stats.setdefault(name, owner)  # first sight: share the owner's accumulator
            if stat is not owner:  # its own accumulator, fed the same tensor (shared only from a later batch on)
                stat.update(self._last_rows, where=name)
            return
        flat = self._last_rows = token_rows(x.detach(), self.mask)
        self._last_input, self._last_owner = x, name
        if name not in self.stats:
            self.stats[name] = RunningCovariance(self.features[name], device=self.device, scratch=self._scratch)
        self.stats[name].update(flat, where=name)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[CovarianceCollector]:
        try:
            with input_hooks(self.modules, self._observe):
                yield self
        finally:  # never keep an activation (or a batch's mask) alive past the forward
            self._last_input = self._last_rows = self.mask = None
            self._scratch.clear()

    def unique(self) -> list[RunningCovariance]:
        return list({id(stat): stat for stat in self.stats.values()}.values())

    def all_reduce_(self) -> None:
        for stat in self.unique():  # a shared accumulator must be reduced once
            stat.all_reduce_()

    def means_(self) -> dict[str, Tensor]:
        """``{name: G / count}`` for every module that saw input; shared accumulators give one tensor.

        Divides the sums in place (no second copy of every covariance): call it once, at the end.
        """
        for stat in self.unique():
            if stat.count:
                stat.sum.div_(stat.count)
        return {name: stat.sum for name, stat in self.stats.items() if stat.count}


@contextlib.contextmanager
def calibration_forward_context(model: nn.Module) -> Iterator[None]:
    """``no_grad`` + eval mode + no KV cache for calibration forwards; restores everything after.

    A KV cache among the captured inputs grows with each call and silently corrupts statistics, so
    every Hugging Face config found in the model gets ``use_cache=False`` for the duration. PyTorch's
    fused ``nn.TransformerEncoderLayer`` fast path (taken in eval mode) bypasses the Linear modules,
    and so their hooks; it is switched off too.
    """
    training = {m: m.training for m in model.modules()}
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache") and all(c is not config for c, _ in configs):
            configs.append((config, config.use_cache))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        for config, _ in configs:
            config.use_cache = False
        torch.backends.mha.set_fastpath_enabled(False)
        model.eval()
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for config, value in configs:
            config.use_cache = value
        for module, mode in training.items():
            module.train(mode)
