"""``LoRARehab``: recover a compressed model with LoRA on its low-rank factors (peft), merged back."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor, nn
from tqdm.auto import tqdm

from prehab.checks import is_real
from prehab.lowrank import LowRankLinear, replace_module, save_compressed
from prehab.report import StageReport, model_size

from .base import LowRankCompression, _check_flag, _check_positive_int, make_evaluator
from .steps import captured_logs, step_loss

__all__ = ["FACTORS", "LoRARehab"]

FACTORS = ("up", "down")
log = logging.getLogger("prehab")


def _check_positive_number(name: str, value: Any) -> float:
    if not (is_real(value) and value > 0):
        raise ValueError(f"{name}={value!r} is invalid: use a positive number.")
    return float(value)


class LoRARehab(Callback):
    """LoRA on the low-rank factors after surgery, one factor at a time, merged back (SVD-LLM's protocol).

    Runs in ``on_fit_end`` after the compression callback that precedes it in ``callbacks=[...]``. For each
    factor in ``order`` it wraps that factor (``up``: ``r -> out``, or ``down``: ``in -> r``) of every
    :class:`~prehab.LowRankLinear` with peft LoRA (only the LoRA parameters train), takes ``steps_per_factor``
    optimizer steps and merges. Afterwards the model holds plain ``LowRankLinear`` modules again: same ranks,
    same parameter count, no peft wrapper or LoRA parameter left. On a failure the LoRA wrappers are removed
    without merging (the model is as the previous factor left it).

    The loss is the module's own ``training_step`` (its ``self.log`` calls are recorded and forwarded to the
    Trainer's logger under ``rehab/``), or its ``rehab_step(batch, batch_idx)`` when it defines one
    (``PrehabModule`` does: the task loss without the penalty). The data: the fit's training data, or
    ``dataloader=`` / ``datamodule=`` when given (e.g. ``Alpaca`` for LLMs). Honoured from the Trainer:
    ``accumulate_grad_batches``, ``gradient_clip_val``/``gradient_clip_algorithm``, the precision plugin's autocast
    (``16-mixed`` and ``bf16-mixed``, with its gradient scaler), the device and DDP. Not used: the module's
    ``configure_optimizers`` and LR schedulers (rehab has its own AdamW on the LoRA parameters, constant ``lr``),
    ``max_steps``/epochs, and manual optimization (refused). Under DDP every rank trains on its shard (the fit's
    sharded train loader; ``dataloader=``/``datamodule=`` loaders are split round-robin by batch), gradients are
    averaged and the LoRA weights start from rank 0's, so all ranks end with identical weights.

    Args:
        steps_per_factor: optimizer steps per factor.
        rank: LoRA rank.
        alpha: LoRA scaling numerator (the update is ``alpha / rank · B A``).
        dropout: LoRA dropout on the factor's input.
        lr: AdamW learning rate of the LoRA parameters.
        order: factors to train, in order (each merged before the next): ``"up"``, ``"down"``.
        dataloader: training batches for rehab (default: the fit's training data).
        datamodule: a LightningDataModule whose ``train_dataloader()`` gives the rehab batches.
        weight_decay: AdamW weight decay.
        evaluate: evaluate after rehab and add the ``rehab`` stage to the compression report.
        save_dir: where to save the rehabbed model (``save_compressed`` folder); default ``<save_dir of the
            compression callback>/rehab`` when that one has a ``save_dir``.
        seed: seed of each factor's LoRA training (initialization, dropout, data order): factor ``i`` of
            ``order`` runs on its own RNG seeded with ``seed + i``, so a rehab gives the same result wherever
            it runs in a process, and leaves the global RNG as it found it.
    """

    def __init__(
        self,
        steps_per_factor: int,
        rank: int = 8,
        alpha: int = 16,
        dropout: float = 0.05,
        lr: float = 1e-4,
        order: Sequence[str] = FACTORS,
        dataloader: Iterable | None = None,
        datamodule: LightningDataModule | None = None,
        weight_decay: float = 0.0,
        evaluate: bool = True,
        save_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        self.steps_per_factor = _check_positive_int("steps_per_factor", steps_per_factor)
        self.rank = _check_positive_int("rank", rank)
        self.alpha = _check_positive_number("alpha", alpha)
        self.lr = _check_positive_number("lr", lr)
        if not (is_real(dropout) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout={dropout!r} is invalid: use a probability in [0, 1).")
        if not (is_real(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay={weight_decay!r} is invalid: use a number >= 0.")
        if isinstance(order, str) or not isinstance(order, Sequence) or not order:
            raise ValueError(f"order={order!r} is invalid: use a non-empty list of factors from {list(FACTORS)}.")
        unknown = [f for f in order if f not in FACTORS]
        if unknown:
            raise ValueError(f"order={list(order)!r} names unknown factors {unknown}; valid values: {list(FACTORS)}.")
        if dataloader is not None and not isinstance(dataloader, Iterable):
            raise ValueError(f"dataloader={dataloader!r} is not iterable: pass a DataLoader or a list of batches.")
        if datamodule is not None and not isinstance(datamodule, LightningDataModule):
            raise ValueError(f"datamodule={datamodule!r} is invalid: pass a LightningDataModule (or use dataloader=).")
        if dataloader is not None and datamodule is not None:
            raise ValueError("dataloader= and datamodule= are both given: pass one source of rehab data.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is invalid: use an integer.")
        self.dropout, self.weight_decay, self.order, self.seed = float(dropout), float(weight_decay), list(order), seed
        self.dataloader, self.datamodule = dataloader, datamodule
        self.evaluate = _check_flag("evaluate", evaluate)
        self.save_dir = None if save_dir is None else str(save_dir)
        self.losses: dict[str, list[float]] = {}  # factor -> loss per optimizer step (this rank)
        self.seconds: dict[str, float] = {}  # factor -> wall time of its LoRA training, wrap and merge included

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"LoRARehab trains with {type(pl_module).__name__}.training_step under automatic optimization; this "
                "module uses manual optimization (automatic_optimization=False), which LoRARehab cannot drive."
            )
        position = trainer.callbacks.index(self)
        before = [c for c in trainer.callbacks[:position] if isinstance(c, LowRankCompression)]
        after = [c for c in trainer.callbacks[position + 1 :] if isinstance(c, LowRankCompression)]
        if after and not before:
            raise ValueError(
                f"LoRARehab comes before {type(after[0]).__name__} in callbacks=[...]; rehab trains the factors that "
                "the compression creates, so the compression callback must come first in the list."
            )
        if not before and not _lowrank_layers(pl_module):
            raise ValueError(
                "LoRARehab has nothing to train: the model holds no LowRankLinear and no compression callback "
                "(SVD, SVDLLM, AASVD, SAESSVD) comes before LoRARehab in callbacks=[...]. Put one first."
            )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layers = _lowrank_layers(pl_module)
        if not layers:
            raise ValueError(
                "LoRARehab found no LowRankLinear in the model at the end of fit: the compression callback must "
                "come before LoRARehab in callbacks=[...], and it must compress at least one layer."
            )
        started = time.perf_counter()
        batches = self._batches(trainer)
        for index, factor in enumerate(self.order):
            tick = time.perf_counter()
            self.losses[factor] = self.train_factor(trainer, pl_module, list(layers), factor, batches, index)
            self.seconds[factor] = time.perf_counter() - tick
        seconds = time.perf_counter() - started
        compression = self._compression(trainer)
        metrics = {}
        if self.evaluate:
            evaluator = make_evaluator(trainer, pl_module)
            metrics = evaluator() if evaluator is not None else {}
        if self.save_dir is not None:
            if trainer.is_global_zero:
                save_compressed(pl_module, self.save_dir)
            trainer.strategy.barrier("prehab_rehab_saved")
        if compression is not None and compression.report is not None:
            params, size = model_size(pl_module)
            compression.report.set_stage(StageReport("rehab", params, size, seconds, metrics))
            compression.publish(trainer, pl_module, compression.report, stage="rehab")
        elif trainer.is_global_zero:
            log.info("LoRA rehab done in %.1f s; metrics after rehab: %s", seconds, metrics)

    # ------------------------------------------------------------------ the work
    def train_factor(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        layers: list[str],
        factor: str,
        batches: Iterator[Any],
        index: int = 0,
    ) -> list[float]:
        """LoRA on ``factor`` of every named ``LowRankLinear``, ``steps_per_factor`` steps, merged. Returns losses."""
        from peft import LoraConfig, inject_adapter_in_model

        requires_grad = {p: p.requires_grad for p in pl_module.parameters()}
        modes = {m: m.training for m in pl_module.modules()}
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=[f"{name}.{factor}" for name in layers],
            bias="none",
        )
        # The whole factor's training (LoRA init, dropout masks, a reshuffled epoch) runs on its own seeded RNG:
        # the result depends on seed, model and data only, not on what ran before in the process, and the
        # caller's RNG stream is left as it was.
        device = pl_module.device
        forked = []
        if device.type == "cuda":
            forked = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(self.seed + index)
            inject_adapter_in_model(config, pl_module)
            merged = False
            try:
                lora = [p for n, p in pl_module.named_parameters() if ".lora_" in n]
                for parameter in pl_module.parameters():
                    parameter.requires_grad_(False)
                for parameter in lora:
                    parameter.requires_grad_(True)
                if trainer.world_size > 1:  # every rank starts from rank 0's LoRA weights
                    state = trainer.strategy.broadcast([p.detach().cpu() for p in lora], src=0)
                    with torch.no_grad():
                        for parameter, value in zip(lora, state, strict=True):
                            parameter.copy_(value)
                losses = self._train(trainer, pl_module, lora, batches, factor, index)
                merged = True
                return losses
            finally:
                _unload_lora(pl_module, merge=merged)
                for parameter, flag in requires_grad.items():
                    parameter.requires_grad_(flag)
                for module, mode in modes.items():
                    module.training = mode

    def _train(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        parameters: list[Tensor],
        batches: Iterator[Any],
        factor: str,
        index: int,
    ) -> list[float]:
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        precision = trainer.precision_plugin
        scaler = getattr(precision, "scaler", None)
        accumulate = max(1, int(trainer.accumulate_grad_batches))
        pl_module.train()
        losses: list[float] = []
        bar = tqdm(
            range(self.steps_per_factor),
            desc=f"rehab: LoRA on {factor}",
            disable=not trainer.is_global_zero,
            unit="step",
        )
        log_every = max(1, trainer.log_every_n_steps or 50)
        training_step = getattr(pl_module, "rehab_step", None) or pl_module.training_step
        with captured_logs(pl_module) as recorder:
            for step in bar:
                total = 0.0
                for micro in range(accumulate):
                    batch = trainer.strategy.batch_to_device(next(batches))
                    recorder.observe(batch)
                    with precision.train_step_context():
                        loss = step_loss(training_step(batch, step * accumulate + micro))
                    if loss is None:  # the step skipped this batch, as Lightning allows
                        continue
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"rehab: the training loss is {float(loss)} at LoRA step {step} on {factor!r}; lower lr="
                        )
                    scaled = loss / accumulate
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    total += float(loss.detach()) / accumulate
                self._average_gradients(trainer, parameters)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if trainer.gradient_clip_val:
                    if trainer.gradient_clip_algorithm == "value":
                        torch.nn.utils.clip_grad_value_(parameters, trainer.gradient_clip_val)
                    else:
                        torch.nn.utils.clip_grad_norm_(parameters, trainer.gradient_clip_val)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(total)
                bar.set_postfix(loss=f"{total:.4g}")
                if trainer.logger is not None and (step + 1) % log_every == 0:
                    window = losses[-log_every:]
                    trainer.logger.log_metrics(
                        {f"rehab/{factor}/loss": sum(window) / len(window)},
                        step=trainer.global_step + index * self.steps_per_factor + step,
                    )
        if trainer.logger is not None:
            logged = {f"rehab/{factor}/{name}": value for name, value in recorder.means().items()}
            if logged:
                trainer.logger.log_metrics(logged, step=trainer.global_step + (index + 1) * self.steps_per_factor)
        return losses

    @staticmethod
    def _average_gradients(trainer: Trainer, parameters: list[Tensor]) -> None:
        """Mean of the LoRA gradients over DDP ranks (one collective call on a flat buffer)."""
        if trainer.world_size <= 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
        offset = 0
        for parameter in parameters:
            parameter.grad = flat[offset : offset + parameter.numel()].view_as(parameter).clone()
            offset += parameter.numel()

    def _batches(self, trainer: Trainer) -> Iterator[Any]:
        """This rank's rehab batches, cycling over the data as long as needed."""
        rank, world = trainer.global_rank, trainer.world_size
        if self.dataloader is not None:
            loader, sharded = self.dataloader, False
        elif self.datamodule is not None:
            self.datamodule.trainer = trainer  # e.g. text datamodules take the module's tokenizer from it
            self.datamodule.prepare_data()
            self.datamodule.setup("fit")
            loader, sharded = self.datamodule.train_dataloader(), False
        elif trainer.train_dataloader is not None:  # the fit's own data, already sharded by Lightning
            loader, sharded = trainer.train_dataloader, True
            if isinstance(loader, CombinedLoader):
                loader = loader.iterables
        elif trainer.datamodule is not None:
            loader, sharded = trainer.datamodule.train_dataloader(), False
        else:
            raise ValueError("LoRARehab found no training data: pass dataloader= or datamodule=.")
        if isinstance(loader, Iterator):  # one-shot: keep what it yields so it can be cycled
            loader = list(loader)
        if not sharded and hasattr(loader, "__len__"):
            try:
                size = len(loader)
            except TypeError:  # e.g. a DataLoader over an IterableDataset
                size = None
            if size is not None and size < world:
                raise ValueError(f"the rehab data has {size} batches for {world} DDP ranks: every rank needs one.")
        return _cycle(loader, 0 if sharded else rank, 1 if sharded else world)

    @staticmethod
    def _compression(trainer: Trainer) -> LowRankCompression | None:
        found = [c for c in trainer.callbacks if isinstance(c, LowRankCompression)]
        return found[-1] if found else None


def _cycle(loader: Iterable, rank: int, world: int) -> Iterator[Any]:
    while True:
        seen = False
        for batch in itertools.islice(loader, rank, None, world):
            seen = True
            yield batch
        if not seen:
            raise ValueError("the rehab data is empty (no batch for this rank).")


def _lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _unload_lora(model: nn.Module, merge: bool) -> None:
    """Replace every peft LoRA wrapper by its base layer (after merging the update into it when ``merge``)."""
    from peft.tuners.lora import LoraLayer

    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, wrapper in wrappers:
        if merge:
            wrapper.merge(safe_merge=True)
        replace_module(model, name, wrapper.get_base_layer())
    model.__dict__.pop("peft_config", None)  # set by peft's inject_adapter_in_model
