"""The prompt keys/values module: cached prompts give the plain ``[prompt, text]`` forward's numbers."""

from __future__ import annotations

import pytest
import torch

from softprompt.core.combine import insert_prompt
from softprompt.data import TokenizedVerbalizer
from softprompt.evaluation.classification import score_split
from softprompt.evaluation.generation import generate_texts
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import (
    common_leading_tokens,
    compute_prompt_kv,
    continuation_batch,
    prefixed_batch,
    run,
    share_leading_tokens,
    stack_prompt_kv,
    uncached_batch,
)
from softprompt.models.tiny import HIDDEN, random_ids, tiny_gemma3, tiny_gpt2, tiny_llama

LENGTHS = (7, 3, 5, 1)
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "gemma3": tiny_gemma3}


def _prompt(length: int, seed: int) -> torch.Tensor:
    # On the scale of N(0, 1): a prompt the size of real embeddings would hardly move the output.
    return torch.randn(length, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _texts(lengths=LENGTHS, seed=0) -> list[list[int]]:
    return [random_ids(1, length, seed=seed + index)[0].tolist() for index, length in enumerate(lengths)]


def _plain_hidden(frozen: FrozenModel, prompt: torch.Tensor | None, text: list[int]) -> torch.Tensor:
    """``(t, H)`` text hidden states of one unpadded ``[prompt, text]`` forward, built with the
    PEFT-compatible core's combine (independent of the module under test)."""
    ids = torch.tensor([text])
    embeds = frozen.embed(ids)
    if prompt is None:
        return frozen.body(inputs_embeds=embeds).last_hidden_state[0]
    combined = insert_prompt(prompt.unsqueeze(0).to(embeds.dtype), embeds, None)
    hidden = frozen.body(
        inputs_embeds=combined.inputs_embeds, attention_mask=combined.attention_mask,
        position_ids=combined.position_ids,
    ).last_hidden_state
    return hidden[0, prompt.shape[0] :]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_shared_and_per_row_prompts_equal_the_plain_forward(name):
    frozen = FrozenModel(BUILDERS[name]())
    prompt, texts = _prompt(5, 1), _texts()
    with torch.no_grad():
        kv = compute_prompt_kv(frozen, prompt)
        shared = prefixed_batch(frozen, kv, texts)
        per_row = prefixed_batch(frozen, stack_prompt_kv([kv] * len(texts)), texts)
        uncached = uncached_batch(frozen, [prompt] * len(texts), texts)
        outputs = [run(frozen, batch)[:, batch.text_offset :] for batch in (shared, per_row, uncached)]
        for row, text in enumerate(texts):
            expected = _plain_hidden(frozen, prompt, text)
            for hidden in outputs:
                assert torch.allclose(hidden[row, : len(text)], expected, atol=1e-5)
        # The prompt matters: without it the text comes out different.
        assert not torch.allclose(outputs[0][0, : len(texts[0])], _plain_hidden(frozen, None, texts[0]), atol=1e-3)


def test_gradients_equal_the_plain_forward():
    frozen = FrozenModel(tiny_llama().requires_grad_(False))
    texts = _texts()
    projection = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(9))
    gradients = {}
    for path in ("shared", "per_row", "plain"):
        prompt = _prompt(5, 1).requires_grad_(True)
        if path == "plain":
            rows = [_plain_hidden(frozen, prompt, text) for text in texts]
        else:
            kv = compute_prompt_kv(frozen, prompt)
            kv = kv if path == "shared" else stack_prompt_kv([kv] * len(texts))
            hidden = run(frozen, prefixed_batch(frozen, kv, texts))
            rows = [hidden[row, : len(text)] for row, text in enumerate(texts)]
        # A loss over real positions only, touching every row and every position.
        sum(((row @ projection) ** 2).sum() for row in rows).backward()
        assert prompt.grad is not None and prompt.grad.abs().sum() > 0
        gradients[path] = prompt.grad
    assert all(parameter.grad is None for parameter in frozen.model.parameters())
    for path in ("shared", "per_row"):
        assert torch.allclose(gradients[path], gradients["plain"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_rows_with_different_prompts_each_see_their_own(name):
    """Prompts of different lengths (and none) in one batch: each row equals its forward alone."""
    frozen = FrozenModel(BUILDERS[name]())
    prompts = [_prompt(5, 1), _prompt(2, 2), _prompt(5, 1), _prompt(8, 3)]
    texts = _texts()
    with torch.no_grad():
        kvs = [compute_prompt_kv(frozen, prompt) for prompt in prompts]
        cached = run(frozen, prefixed_batch(frozen, stack_prompt_kv(kvs), texts))
        uncached_inputs = uncached_batch(frozen, prompts, texts)
        uncached = run(frozen, uncached_inputs)[:, uncached_inputs.text_offset :]
        for row, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
            expected = _plain_hidden(frozen, prompt, text)
            assert torch.allclose(cached[row, : len(text)], expected, atol=1e-5)
            assert torch.allclose(uncached[row, : len(text)], expected, atol=1e-5)
        alone = run(frozen, uncached_batch(frozen, [None], texts[:1]))[0, : len(texts[0])]
        assert torch.allclose(alone, _plain_hidden(frozen, None, texts[0]), atol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_continuations_run_behind_each_text(name):
    """Packed continuations (several per row, none for one row) each equal
    ``[prompt, text, continuation]`` run alone; Gemma 3's window of 4 is shorter than the rows."""
    frozen = FrozenModel(BUILDERS[name]())
    prompts = [_prompt(5, 1), _prompt(2, 2), _prompt(5, 1)]
    texts = _texts((6, 2, 4))
    continuations = [[[9, 10], [11], [12, 13, 14]], [], [[15, 16, 17]]]
    with torch.no_grad():
        kvs = [compute_prompt_kv(frozen, prompt) for prompt in prompts]
        batch = prefixed_batch(frozen, stack_prompt_kv(kvs), texts, keep_all_positions=True)
        run(frozen, batch)
        follows, starts = continuation_batch(frozen, batch, continuations)
        hidden = run(frozen, follows)
        assert starts == [[0, 2, 3], [], [0]]
        for row, sequences in enumerate(continuations):
            for start, tokens in zip(starts[row], sequences, strict=True):
                full = _plain_hidden(frozen, prompts[row], texts[row] + tokens)
                expected = full[len(texts[row]) :]
                assert torch.allclose(hidden[row, start : start + len(tokens)], expected, atol=1e-5)
    with pytest.raises(ValueError, match="every position kept"):
        continuation_batch(frozen, prefixed_batch(frozen, kvs[0], texts[:1]), [[[9]]])


def test_common_leading_tokens_leave_every_text_a_token_of_its_own():
    assert common_leading_tokens([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_leading_tokens([[1, 2, 3], [1, 2, 3]]) == 2  # not all three: a text needs one
    assert common_leading_tokens([[1, 2], [3, 2]]) == 0
    assert common_leading_tokens([[4]]) == 0
    assert common_leading_tokens([]) == 0


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("with_prompt", [False, True], ids=["no_prompt", "prompt"])
def test_shared_leading_tokens_run_once_with_the_plain_forwards_numbers(name, with_prompt):
    """A context every text starts with moves into the prefix; each text's own tokens then come
    out as in the plain forward of [prompt, context, text] (Gemma 3's window of 4 is shorter
    than the rows)."""
    frozen = FrozenModel(BUILDERS[name]())
    prompt = _prompt(5, 1) if with_prompt else None
    context = random_ids(1, 6, seed=40)[0].tolist()
    texts = [context + text for text in _texts()]
    with torch.no_grad():
        kv = compute_prompt_kv(frozen, prompt) if prompt is not None else None
        shared, rest = share_leading_tokens(frozen, kv, texts)
        assert [len(text) for text in rest] == list(LENGTHS)
        assert int(shared.lengths[0]) == len(context) + (5 if with_prompt else 0) == shared.width
        batch = prefixed_batch(frozen, shared, rest)
        hidden = run(frozen, batch)
        for row, text in enumerate(texts):
            expected = _plain_hidden(frozen, prompt, text)[len(context) :]
            assert torch.allclose(hidden[row, : len(rest[row])], expected, atol=1e-5)
        # Nothing shared: the prefix and the texts come back as they were.
        assert share_leading_tokens(frozen, kv, _texts()) == (kv, _texts())


def test_scores_and_generations_with_a_shared_context_match_the_unshared_path(tokenizer):
    """Zero-/few-shot baselines: the context runs once, the labels' scores (single- and
    multi-token words) and the greedy texts do not change."""
    frozen = FrozenModel(tiny_llama(seed=1), tokenizer)
    context = random_ids(1, 9, seed=41)[0].tolist()
    texts = [context + text for text in _texts((6, 2, 4, 3, 7))]
    verbalizers = [
        TokenizedVerbalizer(["a", "b"], [[11], [23]], [[[11]], [[23]]]),
        TokenizedVerbalizer(["a", "b", "c"], [[11, 12], [23], [11, 30, 31]],
                            [[[11, 12]], [[23]], [[11, 30, 31]]]),
    ]
    for verbalizer in verbalizers:
        shared = score_split(frozen, None, texts, verbalizer, batch_size=2)
        unshared = score_split(frozen, None, texts, verbalizer, batch_size=2, shared_prefix=False)
        assert torch.allclose(shared, unshared, atol=1e-4)
    generated = generate_texts(frozen, None, texts, max_new_tokens=5, batch_size=2)
    with torch.no_grad():  # transformers' own greedy decoding of each whole text
        reference = [
            frozen.model.generate(torch.tensor([text]), max_new_tokens=5, do_sample=False)[0, len(text) :]
            for text in texts
        ]
    expected = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in reference]
    assert generated == expected and any(generated)


def test_prompt_kv_shapes_and_one_forward_per_cache():
    frozen = FrozenModel(tiny_llama())
    config = frozen.config
    prompt = _prompt(5, 1).requires_grad_(True)
    kv = compute_prompt_kv(frozen, prompt)
    head_dim = config.hidden_size // config.num_attention_heads
    assert len(kv.layers) == config.num_hidden_layers and kv.rows == 1 and kv.width == 5
    for keys, values in kv.layers:
        assert keys.shape == values.shape == (1, config.num_key_value_heads, 5, head_dim)
        assert keys.requires_grad  # differentiable with respect to the prompt
    # Two batches from one prompt cache own separate caches (a forward appends to its cache).
    with torch.no_grad():
        first, second = (prefixed_batch(frozen, kv, [[5, 6, 7]]) for _ in range(2))
        run(frozen, first)
    assert first.cache.get_seq_length() == 5 + 3 and second.cache.get_seq_length() == 5
    with pytest.raises(ValueError, match="at least one token"):
        prefixed_batch(frozen, kv, [[5], []])
    with pytest.raises(ValueError, match="2 rows cannot serve 3"):
        prefixed_batch(frozen, stack_prompt_kv([kv, kv]), [[5], [6], [7]])
