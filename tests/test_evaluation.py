"""prehab.evaluation: perplexity against a hand-written loop and a uniform model, metric loops against
hand-computed Matthews/F1/Pearson/Spearman values, eval-mode handling and the batch adapter."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_text_assets import tiny_llama
from torch import nn
from torch.utils.data import DataLoader

from prehab.datamodules import GLUE
from prehab.evaluation import (
    TokenPerplexity,
    evaluate_classification,
    evaluate_metrics,
    forward_batch,
    perplexity,
)

VOCAB = 50


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, seed=0)


@pytest.fixture(scope="module")
def windows():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(4, VOCAB, (6, 16), generator=generator)


def reference_perplexity(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Hand-written: per sequence and position, -log p(next token) in float64, summed over every
    non-ignored target, divided by their count."""
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"]).logits.double()
            labels = batch.get("labels", batch["input_ids"])
            log_probs = torch.log_softmax(logits, dim=-1)
            for row in range(labels.shape[0]):
                for position in range(labels.shape[1] - 1):
                    target = int(labels[row, position + 1])
                    if target == -100:
                        continue
                    total_nll -= float(log_probs[row, position, target])
                    total_tokens += 1
    return math.exp(total_nll / total_tokens)


def test_perplexity_matches_hand_written_loop(model, windows):
    expected = reference_perplexity(model, [{"input_ids": windows}])
    from_tensor = perplexity(model, windows, batch_size=4)  # batches of 4 and 2 windows
    loader = DataLoader(
        [{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w} for w in windows], batch_size=5
    )
    from_loader = perplexity(model, loader)
    assert from_tensor == pytest.approx(expected, rel=1e-5)
    assert from_loader == pytest.approx(expected, rel=1e-5)
    assert 1.0 < expected < 10 * VOCAB


def test_perplexity_weights_tokens_not_batches(model, windows):
    # Two batches with very different numbers of scored tokens (labels -100 elsewhere).
    sparse_labels = torch.full_like(windows[:3], -100)
    sparse_labels[:, 5] = windows[:3, 5]
    batches = [
        {"input_ids": windows[:3], "labels": sparse_labels},
        {"input_ids": windows[3:], "labels": windows[3:]},
    ]
    expected = reference_perplexity(model, batches)
    assert perplexity(model, batches) == pytest.approx(expected, rel=1e-5)

    per_batch = [perplexity(model, [batch]) for batch in batches]
    mean_of_batch_means = math.exp(sum(math.log(p) for p in per_batch) / 2)
    assert abs(mean_of_batch_means - expected) > 1e-3 * expected  # the two averages really differ here


class ConstantLogits(nn.Module):
    """Predicts the uniform distribution over ``vocab_size`` tokens everywhere."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.offset = nn.Parameter(torch.tensor(3.0))

    def forward(self, input_ids: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        return self.offset.expand(*input_ids.shape, self.vocab_size)


def test_uniform_model_has_perplexity_equal_to_vocabulary_size(windows):
    assert perplexity(ConstantLogits(VOCAB), windows) == pytest.approx(VOCAB, rel=1e-5)
    assert perplexity(ConstantLogits(32000), windows) == pytest.approx(32000, rel=1e-5)


def test_token_perplexity_metric_is_independent_of_batch_split(model, windows):
    whole, split = TokenPerplexity(), TokenPerplexity()
    with torch.no_grad():
        whole.update(model(input_ids=windows).logits, windows)
        for chunk in windows.split(1):
            split.update(model(input_ids=chunk).logits, chunk)
    assert int(whole.token_count) == int(split.token_count) == 6 * 15
    assert float(whole.compute()) == pytest.approx(float(split.compute()), rel=1e-6)


class ModeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.frozen = nn.Dropout(0.5)
        self.seen: list[tuple[bool, bool, set[str]]] = []

    def forward(self, x: torch.Tensor | None = None, **kwargs: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_grad_enabled(), set(kwargs)))
        return self.linear(x if x is not None else kwargs["features"])


def test_helpers_run_in_eval_no_grad_and_restore_modes():
    model = ModeRecorder().train()
    model.frozen.eval()  # a deliberately frozen submodule must stay in eval afterwards
    data = [(torch.randn(2, 4), torch.tensor([0, 1]))]
    evaluate_classification(model, data, GLUE(task="sst2").metrics())
    assert model.seen[-1][:2] == (False, False)
    assert model.training and model.linear.training and not model.frozen.training

    # Dict batches reach the model as keyword arguments without their labels.
    forward_batch(model, {"features": torch.randn(2, 4), "labels": torch.tensor([0, 1])})
    assert model.seen[-1][2] == {"features"}


def confusion(preds: list[int], target: list[int]) -> tuple[int, int, int, int]:
    tp = sum(p == 1 and t == 1 for p, t in zip(preds, target, strict=True))
    tn = sum(p == 0 and t == 0 for p, t in zip(preds, target, strict=True))
    fp = sum(p == 1 and t == 0 for p, t in zip(preds, target, strict=True))
    fn = sum(p == 0 and t == 1 for p, t in zip(preds, target, strict=True))
    return tp, tn, fp, fn


def logits_for(classes: list[int], num_classes: int = 2) -> torch.Tensor:
    """Logits whose argmax is ``classes``."""
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float() * 2.0 - 1.0


PREDS = [1, 1, 0, 1, 0, 0, 1, 1, 0, 1]
TARGET = [1, 0, 0, 1, 1, 0, 1, 1, 0, 0]


def test_matthews_and_f1_against_formulas():
    tp, tn, fp, fn = confusion(PREDS, TARGET)
    assert (tp, tn, fp, fn) == (4, 3, 2, 1)
    matthews = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    f1 = 2 * tp / (2 * tp + fp + fn)
    accuracy = (tp + tn) / len(PREDS)
    # Two batches, so the states accumulate across updates.
    data = [(logits_for(PREDS[:6]), torch.tensor(TARGET[:6])), (logits_for(PREDS[6:]), torch.tensor(TARGET[6:]))]

    cola = evaluate_classification(nn.Identity(), data, GLUE(task="cola").metrics())
    mrpc = evaluate_classification(nn.Identity(), data, GLUE(task="mrpc").metrics())
    assert cola == {"matthews": pytest.approx(matthews, abs=1e-6)}
    assert mrpc["f1"] == pytest.approx(f1, abs=1e-6)
    assert mrpc["accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_stsb_pearson_and_spearman_against_formulas():
    predicted = [0.5, 2.0, 1.0, 4.5, 3.0, 2.5]
    gold = [1.0, 1.5, 0.0, 5.0, 4.0, 2.0]
    n = len(gold)
    rank = lambda values: {v: i + 1 for i, v in enumerate(sorted(values))}  # noqa: E731 - no ties here
    predicted_rank, gold_rank = rank(predicted), rank(gold)
    d_squared = sum((predicted_rank[p] - gold_rank[g]) ** 2 for p, g in zip(predicted, gold, strict=True))
    spearman = 1 - 6 * d_squared / (n * (n * n - 1))
    mean_p, mean_g = sum(predicted) / n, sum(gold) / n
    covariance = sum((p - mean_p) * (g - mean_g) for p, g in zip(predicted, gold, strict=True))
    pearson = covariance / math.sqrt(sum((p - mean_p) ** 2 for p in predicted) * sum((g - mean_g) ** 2 for g in gold))

    # A one-output regression head: logits (N, 1) become scores.
    data = [(torch.tensor(predicted).unsqueeze(-1), torch.tensor(gold))]
    stsb = GLUE(task="stsb")
    values = evaluate_classification(nn.Identity(), data, stsb.metrics())
    assert spearman == pytest.approx(1 - 12 / 210)  # by hand: rank differences -1, 0, 1, 0, 0, 0
    assert values["spearman"] == pytest.approx(spearman, abs=1e-5)
    assert values["pearson"] == pytest.approx(pearson, abs=1e-5)


def test_evaluate_metrics_on_dict_batches_and_max_batches():
    metrics = GLUE(task="sst2").metrics(prefix="val_")
    data = [
        {"features": torch.zeros(2, 4), "labels": torch.tensor([1, 1])},
        {"features": torch.zeros(2, 4), "labels": torch.tensor([0, 0])},
    ]

    class AlwaysOne(nn.Module):
        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return logits_for([1] * features.shape[0])

    assert evaluate_classification(AlwaysOne(), data, metrics) == {"val_accuracy": 0.5}
    assert evaluate_classification(AlwaysOne(), data, metrics, max_batches=1) == {"val_accuracy": 1.0}
    # The generic loop passes logits through untouched unless told otherwise.
    argmax = evaluate_metrics(AlwaysOne(), data, metrics, output_transform=lambda logits: logits.argmax(-1))
    assert argmax == {"val_accuracy": 0.5}


def _replace_with_svd(model: nn.Module, name: str, rank: int) -> None:
    from prehab.lowrank import LowRankLinear, dense_weight, replace_module

    layer = model.get_submodule(name)
    weight = dense_weight(layer)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    new = LowRankLinear.from_factors(u[:, :rank] * s[:rank], vh[:rank], layer.bias, like=weight)
    replace_module(model, name, new)


def _inputs(model: nn.Module, name: str, batch: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    with torch.no_grad():
        model.eval()(batch)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).double()


def test_layer_output_errors_against_explicit_activations():
    """GPT-2 (Conv1D, biases): one layer of block 0 replaced. Layers upstream of it are exact; it and an unchanged
    layer of block 1 get ‖W X − W' X̂‖² / ‖W X‖² computed from explicitly captured inputs."""
    import copy

    from conftest import tiny_gpt2

    from prehab.evaluation import layer_output_errors
    from prehab.lowrank import LowRankLinear, dense_weight

    torch.manual_seed(0)
    original = tiny_gpt2()
    compressed = copy.deepcopy(original)
    _replace_with_svd(compressed, "transformer.h.0.mlp.c_proj", rank=3)
    names = [f"transformer.h.{b}.{layer}" for b in (0, 1) for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                          "mlp.c_proj")]
    batches = [torch.randint(0, 96, (2, 12)), torch.randint(0, 96, (3, 12))]
    errors = layer_output_errors(original, compressed, batches, names)
    for upstream in names[:3]:
        assert errors[upstream] == 0.0
    for name in ("transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn"):
        w = dense_weight(original.get_submodule(name)).double()
        replaced = compressed.get_submodule(name)
        w_new = (replaced.weight if isinstance(replaced, LowRankLinear) else dense_weight(replaced)).double()
        err = ref = 0.0
        for batch in batches:
            x, x_hat = _inputs(original, name, batch), _inputs(compressed, name, batch)
            err += float((x @ w.T - x_hat @ w_new.T).pow(2).sum())
            ref += float((x @ w.T).pow(2).sum())
        assert errors[name] == pytest.approx(err / ref, rel=1e-5)
        assert errors[name] > 1e-4


def test_layer_output_errors_leave_padding_out():
    """A right-padded row with its attention_mask counts exactly like the same row cut to its real tokens."""
    import copy

    from conftest import tiny_llama as tiny_llama_config

    from prehab.evaluation import layer_output_errors

    torch.manual_seed(0)
    original = tiny_llama_config()
    compressed = copy.deepcopy(original)
    _replace_with_svd(compressed, "model.layers.0.mlp.up_proj", rank=2)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    ids = torch.randint(3, 96, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    padded = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    cut = [{"input_ids": ids[:1, :9]}, {"input_ids": ids[1:]}]
    with_mask = layer_output_errors(original, compressed, [padded], names)
    reference = layer_output_errors(original, compressed, cut, names)
    unmasked = layer_output_errors(original, compressed, [{"input_ids": padded["input_ids"]}], names)
    for name in names:
        assert with_mask[name] == pytest.approx(reference[name], rel=1e-5)
        assert unmasked[name] != pytest.approx(reference[name], rel=1e-3)  # the padded rows would have counted
