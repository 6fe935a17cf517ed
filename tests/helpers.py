"""Shared builders for the core tests: tiny random models and a tiny local tokenizer.

Everything is built locally from configs (no downloads) and seeded, so two calls with the same
arguments give bit-identical models. Models are returned in eval mode (no dropout) so logits can
be compared exactly.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

# The instruction of PEFT's PromptEmbedding docstring example.
INIT_TEXT = "Predict if sentiment of this review is positive, negative or neutral"

# Ids 0..3 are the special tokens, in this order.
SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>", "<bos>"]
PAD_ID, UNK_ID, EOS_ID, BOS_ID = range(4)

SENTENCES = [
    INIT_TEXT,
    "the movie was great and the acting was very good",
    "a terrible film with a boring plot and bad acting",
    "i loved this book , it is wonderful",
    "the food was okay but the service was slow",
    "what a fantastic experience , highly recommended",
    "classify the topic : sports politics science music",
    "very positive mildly negative totally neutral answer label",
]

VOCAB_SIZE = 128  # model vocabulary: larger than the tokenizer's (unused rows, as in real models)
HIDDEN = 32


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the previous setting.

    The models here are so small that intra-op threading only costs synchronisation; on a busy
    2-core machine one thread is several times faster.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_tokenizer_dir(directory: str | Path) -> Path:
    """Train a WordLevel tokenizer on :data:`SENTENCES` and save it as a transformers tokenizer.

    It lower-cases, splits on whitespace and punctuation, and (like T5) appends ``<eos>`` when
    ``add_special_tokens=True``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False)
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", pair="$A <eos> $B <eos>", special_tokens=[("<eos>", EOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        bos_token="<bos>",
    )
    directory = Path(directory)
    fast.save_pretrained(str(directory))
    return directory


@functools.lru_cache(maxsize=1)
def tokenizer_dir() -> Path:
    """A tokenizer directory shared by the whole test session (built once, never modified)."""
    return build_tokenizer_dir(Path(tempfile.mkdtemp(prefix="softprompt-tok-")))


def load_test_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def _finish(model, dtype: torch.dtype | None):
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model


def tiny_llama(seed: int = 0, dtype: torch.dtype | None = None, tie: bool = False, hidden: int = HIDDEN):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(config), dtype)


def tiny_gpt2(seed: int = 0, dtype: torch.dtype | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=256,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    return _finish(GPT2LMHeadModel(config), dtype)


def tiny_t5(seed: int = 0, dtype: torch.dtype | None = None):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=HIDDEN,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    return _finish(T5ForConditionalGeneration(config), dtype)


def tiny_bert(seed: int = 0, num_labels: int = 3, dtype: torch.dtype | None = None):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        type_vocab_size=2,
        initializer_range=0.2,  # the default 0.02 makes a 2-layer classifier nearly constant
        num_labels=num_labels,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    return _finish(BertForSequenceClassification(config), dtype)


def random_ids(batch: int, length: int, seed: int = 0, low: int = 4) -> torch.Tensor:
    """``(batch, length)`` ids of ordinary tokens (never a special id)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB_SIZE, (batch, length), generator=generator)


def right_pad(rows: list[torch.Tensor], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id tensors into ``(ids, attention_mask)``."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row
        mask[index, : len(row)] = 1
    return ids, mask


def left_pad(rows: list[torch.Tensor], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors into ``(ids, attention_mask)``."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, length - len(row) :] = row
        mask[index, length - len(row) :] = 1
    return ids, mask
