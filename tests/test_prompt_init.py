"""PromptEmbedding and its inits, checked against exact (golden) embedding rows and against PEFT."""

from __future__ import annotations

import logging

import peft
import pytest
import torch

from softprompt.core.config import PromptTuningConfig
from softprompt.core.prompt import PromptEmbedding
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.models.tiny import EOS_ID, HIDDEN, INIT_TEXT, tiny_llama


def _text_ids(tokenizer, text=INIT_TEXT, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _row_ids(prompt: torch.Tensor, table: torch.Tensor) -> list[int]:
    """The embedding-table id each prompt row is an exact copy of (asserting there is exactly one)."""
    matches = (prompt.unsqueeze(1) == table.unsqueeze(0)).all(dim=-1)  # (rows, vocab), exact
    counts = matches.sum(dim=1)
    assert (counts == 1).all(), f"prompt rows match {counts.tolist()} embedding rows"
    return matches.int().argmax(dim=1).tolist()


def _ordinary_ids(tokenizer) -> set[int]:
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return {
        index
        for index, piece in enumerate(pieces)
        if index not in special and any(char.isalnum() for char in piece)
    }


@pytest.fixture
def text_config(tokenizer_dir):
    """``text_config(n, submodules=1, **overrides)``: a TEXT-init T5 config over the tiny tokenizer."""

    def build(n, submodules=1, **overrides):
        values = {
            "task_type": "SEQ_2_SEQ_LM",
            "num_virtual_tokens": n,
            "num_transformer_submodules": submodules,
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": INIT_TEXT,
            "tokenizer_name_or_path": str(tokenizer_dir),
        }
        return PromptTuningConfig(**{**values, **overrides})

    return build


def _weight(embedding: PromptEmbedding) -> torch.Tensor:
    return embedding.embedding.weight.detach()


# ----------------------------------------------------------------------------- PEFT's example


def test_peft_docstring_example_with_a_local_tokenizer(t5, tokenizer, tokenizer_dir):
    config = PromptTuningConfig(
        peft_type="PROMPT_TUNING",
        task_type="SEQ_2_SEQ_LM",
        num_virtual_tokens=20,
        token_dim=t5.config.d_model,
        num_transformer_submodules=1,
        num_attention_heads=t5.config.num_heads,
        num_layers=t5.config.num_layers,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=str(tokenizer_dir),
    )
    prompt_embedding = PromptEmbedding(config, t5.shared)
    indices = torch.arange(config.total_virtual_tokens).unsqueeze(0).expand(3, -1)
    output = prompt_embedding(indices)
    assert output.shape == (3, config.total_virtual_tokens, t5.config.d_model)
    assert output.dtype == torch.float32
    text_ids = _text_ids(tokenizer)
    assert len(text_ids) == 12
    expected = t5.shared.weight[text_ids].detach()
    for row in range(3):
        assert torch.equal(output[row, :12], expected)
    # Each batch row is the same prompt; the output follows the indices.
    assert torch.equal(prompt_embedding(torch.tensor([[3, 0]]))[0], _weight(prompt_embedding)[[3, 0]])


# ----------------------------------------------------------------------------- TEXT


def test_text_truncation_keeps_first_tokens(t5, tokenizer, text_config, caplog):
    with caplog.at_level("WARNING", logger="softprompt.core.prompt"):
        embedding = PromptEmbedding(text_config(5), t5.shared)
    text_ids = _text_ids(tokenizer)
    assert torch.equal(_weight(embedding), t5.shared.weight[text_ids[:5]].detach())
    report = embedding.init_report
    assert report.strategy == "TEXT"
    assert report.text_token_ids == text_ids
    assert report.truncated == len(text_ids) - 5
    assert [source.split(":")[0] for source in report.sources] == ["text"] * 5
    dropped = "".join(report.text_tokens[5:])
    assert (f"the init text tokenizes to {len(text_ids)} tokens but the prompt has 5 virtual tokens: "
            f"the last {len(text_ids) - 5} ({dropped})") in caplog.text
    caplog.clear()
    PromptEmbedding(text_config(len(text_ids)), t5.shared)
    assert "init text" not in caplog.text  # nothing dropped, nothing said


def test_text_fill_sample_vocab(t5, tokenizer, text_config):
    table = t5.shared.weight.detach()
    text_ids = _text_ids(tokenizer)
    first = _weight(PromptEmbedding(text_config(30, seed=1), t5.shared, tokenizer=tokenizer))
    again = _weight(PromptEmbedding(text_config(30, seed=1), t5.shared, tokenizer=tokenizer))
    other = _weight(PromptEmbedding(text_config(30, seed=2), t5.shared, tokenizer=tokenizer))
    assert torch.equal(first[: len(text_ids)], table[text_ids])
    assert torch.equal(other[: len(text_ids)], table[text_ids])
    fill_ids = _row_ids(first[len(text_ids) :], table)
    assert set(fill_ids) <= _ordinary_ids(tokenizer)
    assert len(set(fill_ids)) > 1  # sampled, not one token repeated
    assert torch.equal(first, again)  # deterministic under the seed
    assert not torch.equal(first[len(text_ids) :], other[len(text_ids) :])  # another seed, another fill


def test_text_fill_repeat_equals_peft_text_init(t5, tokenizer, text_config, tokenizer_dir):
    # PEFT tokenizes the init text with tokenizer(text), i.e. add_special_tokens=True: our
    # tokenizer (like T5's) then appends </s>, so PEFT's prompt contains <eos> rows.
    assert _text_ids(tokenizer, special=True)[-1] == EOS_ID
    for n, submodules in [(20, 1), (5, 1), (12, 2), (13, 1)]:
        ours = PromptEmbedding(
            text_config(n, submodules, prompt_tuning_init_fill="REPEAT", init_add_special_tokens=True), t5.shared
        )
        theirs = _peft_text_prompt(n, submodules, t5, tokenizer_dir)
        assert torch.equal(_weight(ours), theirs), (n, submodules)
    # Without the special tokens (our default) the prompt is not PEFT's: its <eos> rows are missing.
    plain = PromptEmbedding(text_config(20, prompt_tuning_init_fill="REPEAT"), t5.shared)
    assert not torch.equal(_weight(plain), _peft_text_prompt(20, 1, t5, tokenizer_dir))


def _peft_text_prompt(n, submodules, t5, tokenizer_dir):
    config = peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM",
        num_virtual_tokens=n,
        token_dim=HIDDEN,
        num_transformer_submodules=submodules,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=str(tokenizer_dir),
    )
    return peft.PromptEmbedding(config, t5.shared).embedding.weight.detach()


def test_text_repeat_golden(t5, tokenizer, text_config):
    embedding = PromptEmbedding(text_config(30, prompt_tuning_init_fill="REPEAT"), t5.shared)
    text_ids = _text_ids(tokenizer)  # 12 ids, no special tokens by default
    expected_ids = (text_ids * 3)[:30]
    assert torch.equal(_weight(embedding), t5.shared.weight[expected_ids].detach())
    assert EOS_ID not in _row_ids(_weight(embedding), t5.shared.weight.detach())


def test_text_init_uses_the_embedding_module_output(tokenizer, text_config):
    class Scaled(torch.nn.Embedding):  # Gemma-style embedding that scales inside forward
        def forward(self, ids):
            return super().forward(ids) * 3.0

    torch.manual_seed(0)
    scaled = Scaled(64, HIDDEN)
    embedding = PromptEmbedding(text_config(4, task_type="CAUSAL_LM"), scaled)
    assert torch.allclose(_weight(embedding), scaled.weight[_text_ids(tokenizer)[:4]].detach() * 3.0)


def test_tokenizer_kwargs_reach_auto_tokenizer(monkeypatch, t5, text_config, tokenizer_dir):
    import transformers

    seen = {}
    original = transformers.AutoTokenizer.from_pretrained

    def recording(name, **kwargs):
        seen.update(name=name, kwargs=kwargs)
        return original(name, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    PromptEmbedding(text_config(4, tokenizer_kwargs={"padding_side": "left"}), t5.shared)
    assert seen == {"name": str(tokenizer_dir), "kwargs": {"padding_side": "left"}}


def test_unloadable_tokenizer_names_the_field(t5, tmp_path, text_config):
    config = text_config(4, tokenizer_name_or_path=str(tmp_path / "no-tokenizer-here"))
    with pytest.raises(ValueError, match="tokenizer_name_or_path=.*no-tokenizer-here.*could not be loaded"):
        PromptEmbedding(config, t5.shared)


# ----------------------------------------------------------------------------- CLASS_LABEL


def test_class_label_averages_multi_token_labels(t5, tokenizer, tokenizer_dir):
    labels = ["very positive", "negative", "totally neutral"]
    config = PromptTuningConfig(
        num_virtual_tokens=6,
        prompt_tuning_init="CLASS_LABEL",
        prompt_tuning_init_labels=labels,
        tokenizer_name_or_path=str(tokenizer_dir),
        seed=3,
    )
    weight = _weight(PromptEmbedding(config, t5.shared))
    table = t5.shared.weight.detach()
    very, positive = _text_ids(tokenizer, "very positive")
    totally, neutral = _text_ids(tokenizer, "totally neutral")
    assert very != positive and totally != neutral
    assert torch.allclose(weight[0], (table[very] + table[positive]) / 2, atol=1e-7)
    assert torch.equal(weight[1], table[_text_ids(tokenizer, "negative")[0]])
    assert torch.allclose(weight[2], (table[totally] + table[neutral]) / 2, atol=1e-7)
    assert not torch.allclose(weight[0], table[very])  # a mean, not the first token
    assert set(_row_ids(weight[3:], table)) <= _ordinary_ids(tokenizer)


def test_class_label_more_labels_than_tokens(t5, tokenizer, caplog, tokenizer_dir):
    config = PromptTuningConfig(
        num_virtual_tokens=2,
        prompt_tuning_init="CLASS_LABEL",
        prompt_tuning_init_labels=["positive", "negative", "neutral"],
        tokenizer_name_or_path=str(tokenizer_dir),
    )
    with caplog.at_level(logging.WARNING, logger="softprompt.core.prompt"):
        weight = _weight(PromptEmbedding(config, t5.shared))
    assert "3 labels for 2 virtual tokens" in caplog.text
    ids = [_text_ids(tokenizer, word)[0] for word in ("positive", "negative")]
    assert torch.equal(weight, t5.shared.weight[ids].detach())


# ----------------------------------------------------------------------------- SAMPLE_VOCAB / RANDOM


def test_sample_vocab_excludes_special_tokens(t5, tokenizer, tokenizer_dir):
    table = t5.shared.weight.detach()
    config = PromptTuningConfig(num_virtual_tokens=300, prompt_tuning_init="SAMPLE_VOCAB", seed=5)
    ids = _row_ids(_weight(PromptEmbedding(config, t5.shared, tokenizer=tokenizer)), table)
    ordinary = _ordinary_ids(tokenizer)
    assert set(ids) <= ordinary
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert len(set(ids)) > len(ordinary) // 2  # 300 draws cover most of the ~50 ordinary tokens
    # The same when the tokenizer is loaded from tokenizer_name_or_path.
    by_path = PromptTuningConfig(
        num_virtual_tokens=300, prompt_tuning_init="SAMPLE_VOCAB", seed=5, tokenizer_name_or_path=str(tokenizer_dir)
    )
    assert _row_ids(_weight(PromptEmbedding(by_path, t5.shared)), table) == ids


def test_sample_vocab_deterministic_and_seeded(t5):
    def build(seed):
        config = PromptTuningConfig(num_virtual_tokens=16, prompt_tuning_init="SAMPLE_VOCAB", seed=seed)
        return _weight(PromptEmbedding(config, t5.shared))

    assert torch.equal(build(0), build(0))
    assert not torch.equal(build(0), build(1))
    _row_ids(build(0), t5.shared.weight.detach())  # every row is a real embedding row


def test_random_matches_embedding_statistics_and_is_deterministic(llama):
    embeddings = llama.get_input_embeddings()
    table = embeddings.weight.detach()

    def build(seed):
        config = PromptTuningConfig(num_virtual_tokens=2000, prompt_tuning_init="RANDOM", seed=seed)
        return _weight(PromptEmbedding(config, embeddings))

    prompt = build(7)
    assert torch.equal(prompt, build(7))
    assert not torch.equal(prompt, build(8))
    table_std = table.std(dim=0)
    assert ((prompt.mean(dim=0) - table.mean(dim=0)).abs() < 0.25 * table_std).all()
    ratio = prompt.std(dim=0) / table_std
    assert ((ratio > 0.8) & (ratio < 1.2)).all()
    # On the table's scale (std ~0.02 here), not PEFT's N(0, 1).
    assert prompt.std() < 3 * table.std()
    assert prompt.shape == (2000, HIDDEN)


# ----------------------------------------------------------------------------- dtype, weights


def test_prompt_is_fp32_for_a_bf16_model(tokenizer, tokenizer_dir):
    model = tiny_llama(dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    config = PromptTuningConfig(
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=str(tokenizer_dir),
    )
    prompt_model = PromptTunedModel(model, config)
    weight = prompt_model.prompt_encoder.embedding.weight
    assert weight.dtype == torch.float32
    expected = model.get_input_embeddings().weight[_text_ids(tokenizer)[:4]].detach().float()
    assert torch.equal(weight.detach(), expected)
    ids = torch.tensor([[5, 6, 7]])
    output = prompt_model(input_ids=ids, labels=ids)
    assert output.logits.dtype == torch.bfloat16
    output.loss.backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32
    assert weight.grad.abs().sum() > 0


def test_given_weights_are_used_and_checked(t5):
    config = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB")
    values = torch.randn(3, HIDDEN)
    embedding = PromptEmbedding(config, t5.shared, weights=values)
    assert torch.equal(_weight(embedding), values)
    assert embedding.init_report.strategy == "LOADED"
    with pytest.raises(ValueError, match=r"prompt weights have shape \(2, 32\), expected \(3, 32\)"):
        PromptEmbedding(config, t5.shared, weights=torch.zeros(2, HIDDEN))


def test_random_init_does_not_load_a_tokenizer(t5, tmp_path):
    # A tokenizer path left in the config (e.g. from an earlier TEXT config) is not needed for
    # RANDOM and must not be loaded (here it does not even exist).
    config = PromptTuningConfig(num_virtual_tokens=3, tokenizer_name_or_path=str(tmp_path / "gone"))
    assert _weight(PromptEmbedding(config, t5.shared)).shape == (3, HIDDEN)
    sample = PromptTuningConfig(
        num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB", tokenizer_name_or_path=str(tmp_path / "gone")
    )
    with pytest.raises(ValueError, match="could not be loaded"):  # SAMPLE_VOCAB does use it
        PromptEmbedding(sample, t5.shared)


def test_token_dim_filled_from_the_embedding(t5):
    config = PromptTuningConfig(num_virtual_tokens=3)
    assert config.token_dim is None
    embedding = PromptEmbedding(config, t5.shared)
    assert config.token_dim == HIDDEN
    assert _weight(embedding).shape == (3, HIDDEN)
