"""``PrehabModule``: fine-tune with a rank penalty on activation-whitened weights (Low-Rank Prehab).

Loss = task loss + λ(t) · Σ_ℓ λ_ℓ · R(W_ℓ L_ℓ), where ``L_ℓ`` is the Cholesky factor of layer ℓ's input
covariance, collected once before the first training step (``on_train_start``; all-reduced under DDP) and kept
as a frozen buffer that travels with checkpoints, so a resumed run does not recollect it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from prehab.calibration import collect_input_covariances, layer_weight
from prehab.checks import is_count, is_real
from prehab.evaluation import TokenPerplexity, causal_lm_labels, evaluating
from prehab.linalg import damped_cholesky, rank_from_ratio
from prehab.lowrank import LowRankCheckpointMixin, untie_output_embeddings
from prehab.regularizers import get_regularizer, stable_rank_exact
from prehab.targets import resolve_targets

__all__ = ["PrehabModule", "TASKS"]

TASKS = ("causal_lm", "sequence_classification", "regression", "image_classification")
WHITENING_PREFIX = "whitening."


def resolve_model_path(model: str) -> str:
    """``"prehab:<name>"`` -> the folder of a config shipped inside the package (offline quickstart)."""
    if model.startswith("prehab:"):
        assets = Path(__file__).parent / "assets"
        folder = assets / model.removeprefix("prehab:")
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"model={model!r}: no such packaged model; packaged: {sorted(p.name for p in assets.iterdir())}."
            )
        return str(folder)
    return model


def _check_arguments(
    model: Any,
    task: Any,
    num_labels: Any,
    pretrained: Any,
    model_kwargs: Any,
    untie_lm_head: Any,
    lam: Any,
    lam_warmup_steps: Any,
    layer_weights: Any,
    targets: Any,
    tail_ratio: Any,
    calibration_batches: Any,
    whitening_refresh_every: Any,
    penalty_fraction: Any,
    damping: Any,
    lr: Any,
) -> None:
    """Every ``PrehabModule`` argument that can be checked before the backbone is built."""
    if not (isinstance(model, nn.Module) or (isinstance(model, str) and model.strip())):
        raise ValueError(
            f"model={model!r} is invalid: pass a Hugging Face model name or folder, 'timm:<name>', "
            "'prehab:byte-llama', or an nn.Module instance."
        )
    if task not in TASKS:
        raise ValueError(f"task={task!r} is invalid; valid values: {', '.join(map(repr, TASKS))}.")
    if num_labels is not None:
        if not is_count(num_labels, 1):
            raise ValueError(f"num_labels={num_labels!r} is invalid: use a positive integer (the number of classes).")
        if task in ("sequence_classification", "image_classification") and num_labels < 2:
            raise ValueError(
                f"num_labels={num_labels!r} is invalid for task={task!r}: a classifier needs at least 2 classes "
                "(use task='regression' for a single score)."
            )
        if task == "regression" and num_labels != 1:
            raise ValueError(f"num_labels={num_labels!r} is invalid for task='regression': use 1 (or leave it unset).")
    if task in ("sequence_classification", "image_classification") and num_labels is None and isinstance(model, str):
        raise ValueError(f"num_labels is required for task={task!r} (e.g. num_labels=2).")
    if not isinstance(pretrained, bool):
        raise ValueError(f"pretrained={pretrained!r} is invalid: use true or false.")
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise ValueError(f"model_kwargs={model_kwargs!r} is invalid: use a dict of keyword arguments or None.")
    if not isinstance(untie_lm_head, bool):
        raise ValueError(f"untie_lm_head={untie_lm_head!r} is invalid: use true or false.")
    if not is_real(lam) or lam < 0:
        raise ValueError(
            f"lam={lam!r} is invalid: the penalty weight must be a finite number >= 0 (0 = plain fine-tuning)."
        )
    for name, value in (("lam_warmup_steps", lam_warmup_steps), ("whitening_refresh_every", whitening_refresh_every)):
        if not is_count(value, 0):
            raise ValueError(f"{name}={value!r} is invalid: use an integer >= 0.")
    if layer_weights is not None:
        if not isinstance(layer_weights, Mapping):
            raise ValueError(
                f"layer_weights={layer_weights!r} is invalid: use a dict {{regex: weight}}, e.g. {{'mlp': 2.0}}."
            )
        for pattern, weight in layer_weights.items():
            if not isinstance(pattern, str):
                raise ValueError(f"layer_weights key {pattern!r} is invalid: keys are regexes (strings).")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"layer_weights key {pattern!r} is not a valid regex ({err}).") from err
            if not is_real(weight) or weight < 0:
                raise ValueError(
                    f"layer_weights[{pattern!r}]={weight!r} is invalid: weights must be finite numbers >= 0."
                )
    if targets is not None and not (
        isinstance(targets, str) or (isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets))
    ):
        raise ValueError(f"targets={targets!r} is invalid: use a regex string, a list of them, or None.")
    if tail_ratio is not None and not (is_real(tail_ratio) and 0 < tail_ratio < 1):
        raise ValueError(f"tail_ratio={tail_ratio!r} is invalid: use a fraction in (0, 1) or None.")
    if not is_count(calibration_batches, 1):
        raise ValueError(f"calibration_batches={calibration_batches!r} is invalid: use an integer >= 1.")
    if not (is_real(penalty_fraction) and 0 < penalty_fraction <= 1):
        raise ValueError(f"penalty_fraction={penalty_fraction!r} is invalid: use a fraction in (0, 1].")
    if not (is_real(damping) and damping > 0):
        raise ValueError(
            f"damping={damping!r} is invalid: use a small positive number such as 1e-6 (the first relative damping "
            "of a singular covariance; 0 or less never makes it positive definite)."
        )
    if not (is_real(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} is invalid: use a positive learning rate such as 5e-5.")


def _from_pretrained_default(model: nn.Module) -> bool:
    """A Hugging Face model entirely in eval mode: the state ``from_pretrained`` returns, not a user's choice."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and not any(m.training for m in model.modules())


def _build_backbone(
    model: str | nn.Module, task: str, num_labels: int | None, pretrained: bool, model_kwargs: dict[str, Any]
) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    model = resolve_model_path(model)
    if task == "image_classification" or model.startswith("timm:"):
        import timm

        name = model.removeprefix("timm:")
        extra = {"num_classes": num_labels} if num_labels is not None else {}
        return timm.create_model(name, pretrained=pretrained, **extra, **model_kwargs)
    import transformers

    auto = transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModelForSequenceClassification
    extra = {} if task == "causal_lm" else {"num_labels": 1 if task == "regression" else (num_labels or 2)}
    if pretrained:
        return auto.from_pretrained(model, **extra, **model_kwargs)
    config = transformers.AutoConfig.from_pretrained(model, **extra, **model_kwargs)
    return auto.from_config(config)


class PrehabModule(LowRankCheckpointMixin, pl.LightningModule):
    """Low-Rank Prehab: a short fine-tune whose penalty makes the later low-rank surgery lose little.

    Args:
        model: the backbone: a Hugging Face name or folder, ``"timm:<name>"`` (or any timm name with
            ``task="image_classification"``), ``"prehab:byte-llama"`` (a small config shipped with the package,
            for the offline quickstart; use ``pretrained: false``), or an ``nn.Module``. A backbone built from a
            name, or a Hugging Face model passed entirely in eval mode (as ``from_pretrained`` returns it), is put
            in train mode (dropout on); any other module keeps the modes it was given.
        task: ``"causal_lm"``, ``"sequence_classification"``, ``"regression"`` or ``"image_classification"``;
            fixes the loss and the validation metrics.
        num_labels: classes for classification tasks.
        pretrained: load pretrained weights (False: the architecture from its config, randomly initialized).
        model_kwargs: extra arguments for ``from_pretrained`` / ``AutoConfig`` / ``timm.create_model``.
        untie_lm_head: give an LM head tied to the input embeddings its own copy of the weight
            (:func:`prehab.untie_output_embeddings`), so a surgery callback can compress it (``targets`` naming
            ``lm_head``, with ``SVD`` or ``SVDLLM``). The model grows by the head until it is factored.
        regularizer: ``"stable_rank"`` (randomized sketch), ``"nuclear"`` (exact), ``"tail"`` (energy past the
            target rank), or a callable ``R(A) -> scalar``.
        lam: the penalty weight λ (0 = plain fine-tuning). After surgery (a targeted layer replaced by a
            ``LowRankLinear``), the penalty, the whitening and the stable-rank logs use the layer's effective
            weight ``up @ down``, so training a compressed module again keeps preparing it for truncation.
        lam_warmup_steps: λ ramps linearly from 0 over this many steps.
        layer_weights: per-layer weights λ_ℓ, ``{regex: weight}`` searched in layer names (first match wins;
            default 1).
        targets: layers to regularize (same semantics as the compression callbacks' ``targets``).
        tail_ratio: ratio whose rank the ``tail`` regularizer aims at; default: the ``ratio`` of a compression
            callback in the same Trainer.
        calibration_batches: batches used to collect the whitening covariances.
        whitening_refresh_every: recollect the whitening factors every N steps (0 = never).
        penalty_fraction: fraction of the targeted layers penalized per step, a block that rotates with the
            step and is reweighted (unbiased over a rotation); below 1 it cuts the penalty's per-step cost.
        damping: first relative damping for non-positive-definite covariances.
        lr: learning rate of the default optimizer (AdamW with weight decay 0.01).
        optimizer: optimizer factory (from the CLI: ``--model.optimizer AdamW``); overrides ``lr``.
        scheduler: LR scheduler factory; default cosine decay over the run.
    """

    def __init__(
        self,
        model: str | nn.Module,
        task: str = "causal_lm",
        num_labels: int | None = None,
        pretrained: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        untie_lm_head: bool = False,
        regularizer: str | Callable[[Tensor], Tensor] = "stable_rank",
        lam: float = 1e-3,
        lam_warmup_steps: int = 0,
        layer_weights: dict[str, float] | None = None,
        targets: str | list[str] | None = None,
        tail_ratio: float | None = None,
        calibration_batches: int = 16,
        whitening_refresh_every: int = 0,
        penalty_fraction: float = 1.0,
        damping: float = 1e-6,
        lr: float = 5e-5,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(
            model,
            task,
            num_labels,
            pretrained,
            model_kwargs,
            untie_lm_head,
            lam,
            lam_warmup_steps,
            layer_weights,
            targets,
            tail_ratio,
            calibration_batches,
            whitening_refresh_every,
            penalty_fraction,
            damping,
            lr,
        )
        self.penalty_fn = get_regularizer(regularizer)  # raises with the valid names
        self.save_hyperparameters(
            ignore=["model", "optimizer", "scheduler"] if isinstance(model, nn.Module) else ["optimizer", "scheduler"]
        )
        self.task, self.regularizer_name = task, regularizer if isinstance(regularizer, str) else "custom"
        self.lam, self.lam_warmup_steps, self.tail_ratio = float(lam), lam_warmup_steps, tail_ratio
        self.penalty_fraction = float(penalty_fraction)
        self.calibration_batches, self.whitening_refresh_every, self.damping = (
            calibration_batches,
            whitening_refresh_every,
            damping,
        )
        self.lr, self.optimizer_factory, self.scheduler_factory = lr, optimizer, scheduler
        self.model = _build_backbone(model, task, num_labels, pretrained, dict(model_kwargs or {}))
        if untie_lm_head:
            try:
                untie_output_embeddings(self.model)
            except ValueError as err:
                raise ValueError(f"untie_lm_head=True is invalid for this model: {err}") from err
        if not isinstance(model, nn.Module) or _from_pretrained_default(self.model):
            # Hugging Face's from_pretrained returns eval mode (dropout off) and Lightning keeps module modes:
            # prehab is training, so train like the model was trained. A module given in a mode of the user's
            # choosing (e.g. frozen norm layers) keeps it.
            self.model.train()
        # Validate targets now, before any training: names relative to the backbone.
        self.target_names = list(resolve_targets(self.model, targets))
        self.layer_weights = self._layer_weights(layer_weights or {})
        self.whitening = nn.Module()  # buffers "<layer name with __>" = lower Cholesky factors
        self.val_metrics = self._metrics(num_labels)
        self._extra_val_metrics: dict[int, torchmetrics.MetricCollection] = {}  # further validation dataloaders
        self.stage_metrics: dict[str, dict[str, float]] = {}  # "before_prehab" -> validation metrics

    # ------------------------------------------------------------------ setup
    def _layer_weights(self, patterns: Mapping[str, float]) -> dict[str, float]:
        compiled = [(re.compile(p), float(w)) for p, w in patterns.items()]  # values checked in __init__
        for pattern, _ in compiled:
            if not any(pattern.search(n) for n in self.target_names):
                raise ValueError(
                    f"layer_weights: pattern {pattern.pattern!r} matches no targeted layer "
                    f"(targets include {self.target_names[:4]})."
                )
        return {n: next((w for p, w in compiled if p.search(n)), 1.0) for n in self.target_names}

    def _metrics(self, num_labels: int | None) -> torchmetrics.MetricCollection:
        if self.task == "causal_lm":
            return torchmetrics.MetricCollection({"perplexity": TokenPerplexity()})
        if self.task == "regression":
            return torchmetrics.MetricCollection(
                {"pearson": torchmetrics.PearsonCorrCoef(), "spearman": torchmetrics.SpearmanCorrCoef()}
            )
        classes = num_labels or getattr(getattr(self.model, "config", None), "num_labels", None) or 2
        return torchmetrics.MetricCollection({"accuracy": torchmetrics.Accuracy("multiclass", num_classes=classes)})

    @property
    def tokenizer(self) -> Any:
        """The backbone's tokenizer (datamodules built with ``tokenizer=None`` take it from here)."""
        if getattr(self, "_tokenizer", None) is None:
            from transformers import AutoTokenizer

            source = self.hparams.get("model")
            if not isinstance(source, str) or source.startswith(("prehab:", "timm:")):
                raise ValueError("this model has no Hugging Face tokenizer; pass tokenizer= to the datamodule.")
            self._tokenizer = AutoTokenizer.from_pretrained(source)
        return self._tokenizer

    def _buffer_name(self, layer: str) -> str:
        return layer.replace(".", "__")

    def whitening_factor(self, layer: str) -> Tensor | None:
        return getattr(self.whitening, self._buffer_name(layer), None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # The whitening buffers exist only after collection: create them so the state dict loads.
        for key, value in checkpoint.get("state_dict", {}).items():
            if key.startswith(WHITENING_PREFIX):
                self.whitening.register_buffer(key[len(WHITENING_PREFIX) :], torch.empty_like(value))

    def on_train_start(self) -> None:  # data is set up by now; runs before the first training step
        datamodule = self.trainer.datamodule
        if (
            "before_prehab" not in self.stage_metrics
            and datamodule is not None
            and (type(datamodule).val_dataloader is not pl.LightningDataModule.val_dataloader)
        ):  # the compression report shows it next to the metrics after prehab and after surgery
            self.stage_metrics["before_prehab"] = self.evaluate(datamodule.val_dataloader())
        if self.lam > 0 and any(self.whitening_factor(n) is None for n in self.target_names):
            self.collect_whitening()

    @torch.no_grad()
    def collect_whitening(self) -> None:
        """Input covariances of the targeted layers on calibration data -> Cholesky factors (buffers)."""
        trainer = self.trainer
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "calibration_dataloader"):
            loader, sharded = datamodule.calibration_dataloader(), False
        elif datamodule is not None:
            loader, sharded = datamodule.train_dataloader(), False
        else:  # dataloaders passed to fit(): Lightning already sharded them per rank
            loader, sharded = trainer.train_dataloader, True
            loader = getattr(loader, "iterables", loader)
        targets = {n: self.model.get_submodule(n) for n in self.target_names}
        covariances, _ = collect_input_covariances(
            self.model,
            targets,
            loader,
            self.calibration_batches,
            0 if sharded else trainer.global_rank,
            1 if sharded else trainer.world_size,
            progress=trainer.is_global_zero,
            desc="prehab whitening",
        )
        for name in self.target_names:
            if name not in covariances:
                raise ValueError(f"targeted layer {name!r} received no input on the calibration data.")
            factor = damped_cholesky(covariances[name], initial_damping=self.damping).factor
            self.whitening.register_buffer(self._buffer_name(name), factor.to(layer_weight(targets[name]).dtype))

    # ------------------------------------------------------------------ the loss
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def calibration_step(self, batch: Any) -> Any:
        if isinstance(batch, Mapping):  # dicts and transformers' BatchEncoding (a UserDict)
            return self.model(**_model_inputs(batch))
        return self.model(batch) if isinstance(batch, Tensor) else self.model(batch[0])

    def task_loss(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, predictions or logits, targets).

        Causal LM: the targets are the batch's ``labels``, else its ``input_ids`` with padding
        (``attention_mask == 0``) set to -100, so padded positions count neither in the loss nor in the perplexity.
        """
        if self.task == "causal_lm":
            if isinstance(batch, Tensor):
                batch = {"input_ids": batch}
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"a causal_lm batch must be a dict with input_ids (and attention_mask, labels) or a tensor of "
                    f"token ids; got {type(batch).__name__}."
                )
            labels = causal_lm_labels(batch)
            out = self.model(**_model_inputs(batch), labels=labels)
            return out.loss, out.logits, labels
        if isinstance(batch, Mapping):
            labels = batch["labels"] if "labels" in batch else batch["label"]
            logits = self.model(**_model_inputs(batch)).logits
        else:
            inputs, labels = batch[0], batch[1]
            logits = self.model(inputs)
            logits = getattr(logits, "logits", logits)
        if self.task == "regression":
            predictions = logits.squeeze(-1)
            return F.mse_loss(predictions, labels.float()), predictions, labels
        return F.cross_entropy(logits, labels), logits, labels

    def lam_now(self) -> float:
        if self.lam_warmup_steps:
            return self.lam * min(1.0, self.global_step / self.lam_warmup_steps)
        return self.lam

    def _tail_rank(self, out_features: int, in_features: int) -> int:
        ratio = self.tail_ratio
        if ratio is None:
            ratio = next(
                (
                    c.ratio
                    for c in getattr(self.trainer, "callbacks", [])
                    if hasattr(c, "ratio") and hasattr(c, "solve_layer")
                ),
                None,
            )
        if ratio is None:
            raise ValueError("regularizer='tail' needs a target rank: set tail_ratio= or add a compression callback.")
        return rank_from_ratio(out_features, in_features, ratio)

    def penalty_layers(self, step: int) -> list[str]:
        """The layers penalized at ``step``: all of them, or a rotating block of ``penalty_fraction`` of them."""
        count = len(self.target_names)
        chosen = max(1, math.ceil(self.penalty_fraction * count))
        return [self.target_names[(step * chosen + offset) % count] for offset in range(chosen)]

    def penalty(self) -> tuple[Tensor, list[float]]:
        """λ-free penalty Σ λ_ℓ R(W_ℓ L_ℓ) and each penalized layer's R value.

        With ``penalty_fraction < 1`` only this step's rotating subset is evaluated, scaled by
        ``layers / subset`` so that, averaged over a rotation, it equals the full penalty.
        """
        names = self.penalty_layers(self.global_step)
        scale = len(self.target_names) / len(names)
        total = torch.zeros((), device=self.device)
        values = []
        for name in names:
            weight = layer_weight(self.model.get_submodule(name))  # up @ down after surgery
            whitened = weight @ self.whitening_factor(name)
            if self.regularizer_name == "tail":
                value = self.penalty_fn(whitened, self._tail_rank(*weight.shape))
            elif self.regularizer_name == "stable_rank":
                value = self.penalty_fn(whitened, seed=self.global_step * 7919 + self.target_names.index(name))
            else:
                value = self.penalty_fn(whitened)
            values.append(float(value.detach()))
            total = total + self.layer_weights[name] * value
        return scale * total, values

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.whitening_refresh_every and self.global_step and self.global_step % self.whitening_refresh_every == 0:
            self.collect_whitening()
        loss, _, _ = self.task_loss(batch)
        self.log("train/task_loss", loss, prog_bar=True)
        lam = self.lam_now()
        if self.lam > 0:
            penalty, values = self.penalty()
            self.log("train/penalty", penalty)
            self.log("train/lam", lam)
            loss = loss + lam * penalty
            if self.regularizer_name == "stable_rank":
                self._log_stable_ranks(values)
        if self.lam == 0 or self.regularizer_name != "stable_rank":
            if self.trainer.log_every_n_steps and self.global_step % self.trainer.log_every_n_steps == 0:
                self._log_stable_ranks(self.whitened_stable_ranks())
        self.log("train/loss", loss)
        return loss

    def rehab_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The loss :class:`~prehab.callbacks.LoRARehab` trains with: the task loss alone.

        The penalty prepares the weights for the surgery; after it, it has done its job (rehab trains only the
        LoRA parameters, and whitening refreshes belong to prehab's own steps).
        """
        loss, _, _ = self.task_loss(batch)
        self.log("train/task_loss", loss)
        return loss

    @torch.no_grad()
    def whitened_stable_ranks(self) -> list[float]:
        """Exact stable rank ‖WL‖_*²/‖WL‖_F² of every targeted layer (raw W when not whitened yet; ``W = up @ down``
        for a layer already compressed)."""
        values = []
        for name in self.target_names:
            weight = layer_weight(self.model.get_submodule(name)).float()
            factor = self.whitening_factor(name)
            values.append(float(stable_rank_exact(weight @ factor if factor is not None else weight)))
        return values

    def _log_stable_ranks(self, values: list[float]) -> None:
        if values:
            self.log_dict(
                {
                    "stable_rank/mean": sum(values) / len(values),
                    "stable_rank/min": min(values),
                    "stable_rank/max": max(values),
                }
            )

    def _loader_metrics(self, dataloader_idx: int) -> torchmetrics.MetricCollection:
        """The validation metrics of one validation dataloader (GLUE MNLI has two: matched, mismatched)."""
        if dataloader_idx == 0:
            return self.val_metrics
        if dataloader_idx not in self._extra_val_metrics:
            self._extra_val_metrics[dataloader_idx] = self.val_metrics.clone()
            self._extra_val_metrics[dataloader_idx].reset()
        return self._extra_val_metrics[dataloader_idx].to(self.device)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        loss, logits, labels = self.task_loss(batch)
        self.log("val/loss", loss, sync_dist=True)
        self._loader_metrics(dataloader_idx).update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()}, prog_bar=True)
        self.val_metrics.reset()
        for index, metrics in sorted(self._extra_val_metrics.items()):
            values = {f"val/{k}/dataloader_idx_{index}": v for k, v in metrics.compute().items()}
            self.log_dict(values, add_dataloader_idx=False)
            metrics.reset()

    @torch.no_grad()
    def evaluate(self, dataloader: Iterable | Sequence[DataLoader]) -> dict[str, float]:
        """The validation metrics on ``dataloader`` outside a Trainer loop (used to report before/after surgery).

        A list of DataLoaders (GLUE MNLI's matched and mismatched dev sets) gives the first one's metrics under
        their names and the others' with ``/dataloader_idx_<i>`` appended, as Lightning names them.
        """
        if isinstance(dataloader, list | tuple) and dataloader and all(isinstance(d, DataLoader) for d in dataloader):
            results: dict[str, float] = {}
            for index, loader in enumerate(dataloader):
                suffix = f"/dataloader_idx_{index}" if index else ""
                results.update({f"{k}{suffix}": v for k, v in self.evaluate(loader).items()})
            return results
        metrics = self.val_metrics.clone()
        metrics.reset()
        with evaluating(self):  # no_grad + eval; every submodule gets its own mode back
            for batch in dataloader:
                batch = move_data_to_device(batch, self.device)
                _, logits, labels = self.task_loss(batch)
                metrics.update(logits, labels)
        return {k: float(v) for k, v in metrics.compute().items()}

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = (
            self.optimizer_factory(params)
            if self.optimizer_factory
            else torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        )
        steps = max(1, int(self.trainer.estimated_stepping_batches))  # 0 when only compressing
        scheduler = (
            self.scheduler_factory(optimizer)
            if self.scheduler_factory
            else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k not in ("labels", "label")}
