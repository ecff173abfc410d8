"""The tiny test model and tokenizer (built in code, offline, in milliseconds): a
WordPiece tokenizer in which the template and label words are single tokens, and a randomly
initialised 2-layer Llama, saved like a real model folder for the entry points."""
from __future__ import annotations

import torch

TEMPLATE_WORDS = (
    "### Text : Question What is the sentiment of the given text ? Sentiment "
    "positive negative neutral unknown None"
).split()
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
CHARACTERS = [chr(code) for code in range(33, 127)]  # printable ASCII except space


def tiny_tokenizer_vocab() -> dict[str, int]:
    """Special tokens, whole template/label words, then single characters and their
    word-continuation forms, so that any ASCII text tokenizes without <unk>."""
    tokens = list(SPECIAL_TOKENS.values()) + TEMPLATE_WORDS
    tokens += CHARACTERS + ["##" + char for char in CHARACTERS]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def tiny_tokenizer():
    """Offline WordPiece tokenizer for tests, built in milliseconds.

    Template words and the labels are single tokens; other words split into characters.
    Like LLaMA-2 it prepends BOS and has no pad token (``load_tokenizer`` then pads with EOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_tokenizer_vocab()
    backend = Tokenizer(models.WordPiece(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A tiny randomly initialised ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads,
    intermediate 64); ``overrides`` go into its ``LlamaConfig``. Seeded without touching the
    global RNG state."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=2048,
    )
    config = LlamaConfig(**{**settings, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def save_tiny_model(out_dir, tokenizer_source=None, seed: int = 0, **overrides) -> str:
    """Write a tiny Llama (config + safetensors) and its tokenizer to ``out_dir``, loadable
    like a real model by ``resolve_model``/``load_model``/``load_tokenizer``.

    The tokenizer is ``tiny_tokenizer()``, or the one at ``tokenizer_source`` (for example the
    converted embedded model's folder) when given. Returns the folder as a string.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source) if tokenizer_source else tiny_tokenizer()
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = tiny_llama(len(tokenizer), seed=seed, **{**special_ids, **overrides})
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
