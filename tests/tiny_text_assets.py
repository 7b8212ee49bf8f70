"""Offline stand-ins for a real model's tokenizer and causal LM, shared by the data and evaluation tests
(and by the DDP script they launch). Nothing here downloads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]


def word_level_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """A WordLevel tokenizer (whitespace + punctuation split, unknown words -> <unk>) trained on ``texts``,
    wrapped as a ``PreTrainedTokenizerFast`` that prepends <s> like a Llama tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    bos = backend.token_to_id("<s>")
    eos = backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B:1", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def wikitext_tokenizer(vocab_size: int = 2000):
    """The tiny tokenizer trained on the shared WikiText-2 raw valid split."""
    text = (SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")
    return word_level_tokenizer(text.splitlines(), vocab_size)


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer, 32-wide Llama with random weights (fixed by ``seed``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
