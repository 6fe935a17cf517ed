"""Seeded random models built from configs, and a local word-level tokenizer (no download).

For tests, smoke benchmarks and device checks. Every model builder seeds torch right before
building, so two calls with the same arguments give bit-identical weights on the same device;
models come back in eval mode (no dropout), so logits compare exactly.

- ``tiny_*``: one builder per architecture the project supports (Llama, GPT-2, T5, BERT,
  Gemma 3), 2-3 layers of width :data:`HIDDEN`; any config field can be overridden by keyword.
- ``*_shaped``: random models with the sizes of the real SmolLM2-135M and Gemma-3-270M, for
  speed and memory checks where the weights' values do not matter.

Nothing is built at import time, and transformers is imported only by the builders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Special tokens by role; their ids are their positions in this mapping (pad 0 ... bos 3).
SPECIAL_TOKENS: Mapping[str, str] = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
}
PAD_ID, UNK_ID, EOS_ID, BOS_ID = range(4)

VOCAB_SIZE = 128  # tiny models' vocabulary: larger than the tokenizer's, as in real models
HIDDEN = 32

# The instruction of PEFT's PromptEmbedding docstring example.
INIT_TEXT = "Predict if sentiment of this review is positive, negative or neutral"
# The corpus of :func:`tiny_tokenizer` (its 60-odd words all fit in VOCAB_SIZE).
SENTENCES = (
    INIT_TEXT,
    "the movie was great and the acting was very good",
    "a terrible film with a boring plot and bad acting",
    "i loved this book , it is wonderful",
    "the food was okay but the service was slow",
    "what a fantastic experience , highly recommended",
    "classify the topic : sports politics science music",
    "very positive mildly negative totally neutral answer label",
)


# ----------------------------------------------------------------------------- tokenizers
def word_level_tokenizer(
    texts: Iterable[str],
    *,
    special_tokens: Mapping[str, str] = SPECIAL_TOKENS,
    vocab_size: int | None = None,
    by_frequency: bool = True,
    append_eos: bool = False,
) -> PreTrainedTokenizerFast:
    """A lower-casing tokenizer with one id per word (split on whitespace and punctuation).

    Args:
        texts: The corpus the vocabulary is taken from.
        special_tokens: Role (``pad_token``, ``unk_token``, ...) -> token; they get the first
            ids, in this order. Unknown words map to the ``unk_token``.
        vocab_size: At most this many ids, special tokens included; None keeps every word.
        by_frequency: Rank words by frequency, as a real vocabulary is built; False keeps the
            order in which words first appear, so a word list gives its own ids.
        append_eos: Append the ``eos_token`` when ``add_special_tokens=True`` (as T5 does).

    Returns:
        PreTrainedTokenizerFast: The tokenizer (``save_pretrained`` makes a local folder).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    specials = list(special_tokens.values())
    normalizer, pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    if by_frequency:
        tokenizer = Tokenizer(WordLevel(unk_token=special_tokens.get("unk_token")))
        limit = {} if vocab_size is None else {"vocab_size": vocab_size}
        trainer = WordLevelTrainer(special_tokens=specials, show_progress=False, **limit)
        tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
        tokenizer.train_from_iterator(texts, trainer=trainer)
    else:
        words = dict.fromkeys(specials)  # an ordered set
        for text in texts:
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
                words.setdefault(word)
        vocab = {word: index for index, word in enumerate(list(words)[:vocab_size])}
        tokenizer = Tokenizer(WordLevel(vocab, unk_token=special_tokens.get("unk_token")))
        tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    if append_eos:
        eos = special_tokens["eos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, specials.index(eos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer: :data:`SENTENCES`' words, :data:`SPECIAL_TOKENS`, ``<eos>`` appended."""
    return word_level_tokenizer(SENTENCES, append_eos=True)


def random_ids(
    batch: int, length: int, seed: int = 0, low: int = 4, vocab_size: int = VOCAB_SIZE
) -> torch.Tensor:
    """``(batch, length)`` random ids in ``[low, vocab_size)``: by default never a special id."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (batch, length), generator=generator)


# ----------------------------------------------------------------------------- models
def _build(
    model_class: str,
    config_class: str,
    config: dict[str, Any],
    seed: int,
    dtype: torch.dtype | None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Seed, then build ``model_class(config_class(**config))`` in eval mode.

    With a ``device`` the weights are created there directly (no CPU copy first).
    """
    import transformers

    built_config = getattr(transformers, config_class)(**config)
    torch.manual_seed(seed)
    if device is None:
        model = getattr(transformers, model_class)(built_config)
    else:
        with torch.device(device):
            model = getattr(transformers, model_class)(built_config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


_IDS = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def tiny_llama(seed: int = 0, dtype: torch.dtype | None = None, **config: Any) -> PreTrainedModel:
    """A 2-layer ``LlamaForCausalLM`` (4 query heads, 2 key/value heads, 256 positions).

    Args:
        seed: Torch seed of the random weights.
        dtype: Cast the weights to this dtype (None: float32).
        **config: ``LlamaConfig`` fields replacing the defaults (``hidden_size``, ``vocab_size``,
            ``tie_word_embeddings``, ``initializer_range``, ...).
    """
    defaults = {
        "vocab_size": VOCAB_SIZE, "hidden_size": HIDDEN, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "tie_word_embeddings": False, **_IDS,
    }
    return _build("LlamaForCausalLM", "LlamaConfig", {**defaults, **config}, seed, dtype)


def tiny_gpt2(seed: int = 0, dtype: torch.dtype | None = None, **config: Any) -> PreTrainedModel:
    """A 2-layer ``GPT2LMHeadModel`` (learned absolute positions); ``config`` as :func:`tiny_llama`."""
    defaults = {"vocab_size": VOCAB_SIZE, "n_embd": HIDDEN, "n_layer": 2, "n_head": 4,
                "n_positions": 256, **_IDS}
    return _build("GPT2LMHeadModel", "GPT2Config", {**defaults, **config}, seed, dtype)


def tiny_t5(seed: int = 0, dtype: torch.dtype | None = None, **config: Any) -> PreTrainedModel:
    """A 2+2-layer ``T5ForConditionalGeneration`` (encoder-decoder); ``config`` as :func:`tiny_llama`."""
    defaults = {
        "vocab_size": VOCAB_SIZE, "d_model": HIDDEN, "d_kv": 8, "d_ff": 64, "num_layers": 2,
        "num_decoder_layers": 2, "num_heads": 4, "pad_token_id": PAD_ID, "eos_token_id": EOS_ID,
        "decoder_start_token_id": PAD_ID,
    }
    return _build("T5ForConditionalGeneration", "T5Config", {**defaults, **config}, seed, dtype)


def tiny_bert(seed: int = 0, dtype: torch.dtype | None = None, **config: Any) -> PreTrainedModel:
    """A 2-layer ``BertForSequenceClassification`` with 3 labels; ``config`` as :func:`tiny_llama`."""
    defaults = {
        "vocab_size": VOCAB_SIZE, "hidden_size": HIDDEN, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 256,
        "type_vocab_size": 2, "num_labels": 3, "pad_token_id": PAD_ID,
        "initializer_range": 0.2,  # the default 0.02 makes a 2-layer classifier nearly constant
    }
    return _build("BertForSequenceClassification", "BertConfig", {**defaults, **config}, seed, dtype)


def tiny_gemma3(seed: int = 0, dtype: torch.dtype | None = None, **config: Any) -> PreTrainedModel:
    """A 3-layer ``Gemma3ForCausalLM``: two sliding-window layers (window 4), then a full one.

    The window is shorter than most test rows, so sliding-window caching is really exercised.
    ``config`` as :func:`tiny_llama`.
    """
    defaults = {
        "vocab_size": VOCAB_SIZE, "hidden_size": HIDDEN, "intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 256, "sliding_window": 4,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], **_IDS,
    }
    return _build("Gemma3ForCausalLM", "Gemma3TextConfig", {**defaults, **config}, seed, dtype)


def smollm2_shaped(
    seed: int = 0, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> PreTrainedModel:
    """A random ``LlamaForCausalLM`` with SmolLM2-135M-Instruct's config (134.5M parameters).

    Sizes from the bundled GGUF: 30 layers, hidden 576, 9 query / 3 key-value heads,
    intermediate 1536, vocabulary 49152, 8192 positions, RoPE base 100000, tied embeddings.

    Args:
        seed: Torch seed of the random weights (same device, same weights).
        dtype: Cast the weights to this dtype (None: float32).
        device: Create the weights there (None: CPU).
    """
    config = {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }
    return _build("LlamaForCausalLM", "LlamaConfig", config, seed, dtype, device)


def gemma3_shaped(
    seed: int = 0, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> PreTrainedModel:
    """A random ``Gemma3ForCausalLM`` with Gemma-3-270M's config (268M parameters).

    18 layers (every sixth full attention, the others a 512-token sliding window), hidden 640,
    4 query heads / 1 key-value head of width 256, intermediate 2048, vocabulary 262144,
    32768 positions, tied embeddings (RoPE bases 10000 local / 1000000 global, the defaults).
    Arguments as :func:`smollm2_shaped`.
    """
    config = {
        "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "query_pre_attn_scalar": 256, "max_position_embeddings": 32768,
        "sliding_window": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    }
    return _build("Gemma3ForCausalLM", "Gemma3TextConfig", config, seed, dtype, device)
