"""PromptTunedModel: equivalence with PEFT 0.21, padding invariance, generation, frozen base."""

from __future__ import annotations

import contextlib
import io
import re

import peft
import pytest
import torch

from softprompt.core.config import PromptTuningConfig
from softprompt.core.prompt_model import PromptTunedModel, get_prompt_model
from softprompt.data import pad_batch
from softprompt.models.tiny import (
    PAD_ID,
    random_ids,
    tiny_bert,
    tiny_gemma3,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)

N = 5  # virtual tokens


def _rows(lengths, seed=0):
    return [random_ids(1, length, seed=seed + index)[0] for index, length in enumerate(lengths)]


def _pad(rows, side="right"):
    """``(ids, attention_mask)`` of 1-D id tensors padded with PAD_ID on ``side``."""
    return pad_batch([row.tolist() for row in rows], PAD_ID, side)


def _pair(builder, task, submodules=None, seed=11):
    """Our model and PEFT's on two identical copies of a base model, with the same prompt."""
    ours = PromptTunedModel(
        builder(),
        PromptTuningConfig(task_type=task, num_virtual_tokens=N, num_transformer_submodules=submodules, seed=seed),
    )
    theirs = peft.get_peft_model(
        builder(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N, num_transformer_submodules=submodules)
    )
    theirs.eval()
    ours.eval()
    weight = theirs.prompt_encoder.default.embedding.weight
    assert weight.shape == ours.prompt_encoder.embedding.weight.shape
    with torch.no_grad():
        weight.copy_(ours.prompt_encoder.embedding.weight)
    return ours, theirs


def _assert_same_output(ours, theirs, **inputs):
    with torch.no_grad():
        mine = ours(**inputs)
        peft_output = theirs(**inputs)
    assert mine.logits.shape == peft_output.logits.shape
    assert torch.allclose(mine.logits, peft_output.logits, atol=1e-5)
    if "labels" in inputs:
        assert mine.loss is not None
        assert torch.allclose(mine.loss, peft_output.loss, atol=1e-5)
    return mine


# ----------------------------------------------------------------------------- PEFT equivalence


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2, tiny_gemma3])
def test_causal_lm_matches_peft(builder):
    ids, mask = _pad(_rows([7, 4, 6]))
    labels = ids.masked_fill(mask == 0, -100)
    ours, theirs = _pair(builder, "CAUSAL_LM")
    output = _assert_same_output(ours, theirs, input_ids=ids, attention_mask=mask, labels=labels)
    assert output.logits.shape == (3, N + 7, builder().config.vocab_size)
    _assert_same_output(ours, theirs, input_ids=ids, attention_mask=mask)
    # The prompt matters: a different prompt gives different logits.
    with torch.no_grad():
        ours.prompt_encoder.embedding.weight.add_(torch.randn(N, 32, generator=torch.Generator().manual_seed(0)))
        assert not torch.allclose(ours(input_ids=ids, attention_mask=mask).logits, output.logits, atol=1e-3)


@pytest.mark.parametrize("submodules", [1, 2])
def test_seq2seq_matches_peft(submodules):
    ids, mask = _pad(_rows([7, 4]))
    labels, label_mask = _pad(_rows([3, 5], seed=20))
    labels = labels.masked_fill(label_mask == 0, -100)
    ours, theirs = _pair(tiny_t5, "SEQ_2_SEQ_LM", submodules)
    assert ours.prompt_encoder.embedding.weight.shape[0] == N * submodules
    output = _assert_same_output(ours, theirs, input_ids=ids, attention_mask=mask, labels=labels)
    assert output.logits.shape[:2] == labels.shape  # the decoder gets no prompt (PEFT 0.21)
    decoder_ids = torch.tensor([[0, 9, 10], [0, 11, 12]])
    _assert_same_output(ours, theirs, input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)


def test_seq2seq_decoder_rows_are_unused(t5):
    ids, mask = _pad(_rows([6, 3]))
    labels = random_ids(2, 4, seed=3)
    model = PromptTunedModel(t5, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N))
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        model.prompt_encoder.embedding.weight[N:] += 1.0
        after_decoder_change = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        model.prompt_encoder.embedding.weight[:N] += 1.0
        after_encoder_change = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert torch.equal(before, after_decoder_change)
    assert not torch.allclose(before, after_encoder_change, atol=1e-3)


def test_sequence_classification_matches_peft():
    ids, mask = _pad(_rows([8, 5, 3]))
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, 3:] = 1
    token_type_ids = token_type_ids * mask
    labels = torch.tensor([0, 2, 1])
    ours, theirs = _pair(tiny_bert, "SEQ_CLS")
    output = _assert_same_output(
        ours, theirs, input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids, labels=labels
    )
    assert output.logits.shape == (3, 3)
    # token_type_ids are used (not dropped): other types change the result, in PEFT's way too.
    _assert_same_output(ours, theirs, input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    with torch.no_grad():
        other = ours(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
    assert not torch.allclose(other, output.logits, atol=1e-2)


def test_inputs_embeds_equal_input_ids(llama):
    ids, mask = _pad(_rows([6, 4]))
    model = PromptTunedModel(llama, PromptTuningConfig(num_virtual_tokens=N))
    with torch.no_grad():
        by_ids = model(input_ids=ids, attention_mask=mask).logits
        embeds = model.word_embeddings(ids)
        by_embeds = model(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.equal(by_ids, by_embeds)
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        model(attention_mask=mask)


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2, tiny_gemma3])
def test_left_padding_equals_no_padding(builder):
    rows = _rows([7, 3, 5])
    model = PromptTunedModel(builder(), PromptTuningConfig(num_virtual_tokens=N, seed=4))
    ids, mask = _pad(rows, "left")
    right_ids, right_mask = _pad(rows)
    with torch.no_grad():
        left = model(input_ids=ids, attention_mask=mask).logits
        right = model(input_ids=right_ids, attention_mask=right_mask).logits
        for index, row in enumerate(rows):
            alone = model(input_ids=row.unsqueeze(0)).logits[0]
            assert alone.shape[0] == N + len(row)
            # Left padding: the prompt sits right before the text, the real positions are last.
            assert torch.allclose(left[index, -(N + len(row)) :], alone, atol=1e-5)
            # Right padding: prompt, text, then pads.
            assert torch.allclose(right[index, : N + len(row)], alone, atol=1e-5)


def test_left_padding_labels_follow_their_tokens(llama):
    rows = _rows([6, 3])
    model = PromptTunedModel(llama, PromptTuningConfig(num_virtual_tokens=N))
    ids, mask = _pad(rows, "left")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        batch_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        # Mean over all predicted tokens of both rows, computed row by row.
        total, count = 0.0, 0
        for row in rows:
            # The last virtual token predicts the first text token; the last token predicts nothing.
            logits = model(input_ids=row.unsqueeze(0)).logits[0, N - 1 : -1]
            total += torch.nn.functional.cross_entropy(logits, row, reduction="sum")
            count += len(row)
    assert torch.allclose(batch_loss, total / count, atol=1e-5)


# ----------------------------------------------------------------------------- generation


def _greedy_model(builder):
    model = PromptTunedModel(builder(), PromptTuningConfig(num_virtual_tokens=N, seed=9))
    # No early stop: generate always makes max_new_tokens tokens, as the manual loop does.
    model.base_model.generation_config.eos_token_id = None
    model.base_model.generation_config.pad_token_id = PAD_ID
    return model


def _manual_greedy(model, row, steps):
    tokens = row.unsqueeze(0)
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(input_ids=tokens).logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2, tiny_gemma3])
def test_greedy_generate_equals_manual_loop(builder):
    model = _greedy_model(builder)
    row = _rows([6])[0]
    generated = model.generate(row.unsqueeze(0), max_new_tokens=8, do_sample=False)
    expected = _manual_greedy(model, row, 8)
    assert generated.shape == (1, 6 + 8)
    assert torch.equal(generated, expected)


def test_left_padded_batch_generate_equals_per_row():
    model = _greedy_model(tiny_llama)
    rows = _rows([7, 3, 5], seed=30)
    ids, mask = _pad(rows, "left")
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert batch.shape == (3, 7 + 6)
    assert torch.equal(batch[:, :7], ids)
    for index, row in enumerate(rows):
        alone = model.generate(row.unsqueeze(0), max_new_tokens=6, do_sample=False)
        assert torch.equal(batch[index, -6:], alone[0, -6:])


def test_seq2seq_generate_uses_the_prompt(t5):
    model = PromptTunedModel(t5, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N))
    model.base_model.generation_config.eos_token_id = None
    ids = _rows([6])[0].unsqueeze(0)
    output = model.generate(ids, max_new_tokens=4, do_sample=False)
    # Seq2seq: the decoder's ids (start token + new tokens), checked against a manual loop.
    decoder = torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        for _ in range(4):
            logits = model(input_ids=ids, decoder_input_ids=decoder).logits
            decoder = torch.cat([decoder, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(output, decoder)


# ----------------------------------------------------------------------------- frozen base


def test_training_changes_only_the_prompt(llama):
    model = PromptTunedModel(llama, PromptTuningConfig(num_virtual_tokens=N, seed=2))
    model.train()
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable == ["prompt_encoder.embedding.weight"]
    base_before = {name: parameter.detach().clone() for name, parameter in model.base_model.named_parameters()}
    prompt_before = model.prompt_encoder.embedding.weight.detach().clone()
    # Every parameter goes to the optimizer: the frozen ones must stay put by themselves.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids, mask = _pad(_rows([6, 4]))
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert not torch.equal(model.prompt_encoder.embedding.weight.detach(), prompt_before)
    assert losses[-1] < losses[0]
    for name, parameter in model.base_model.named_parameters():
        assert torch.equal(parameter, base_before[name]), name
        assert parameter.grad is None, name


def test_inference_mode_freezes_the_prompt(llama):
    model = PromptTunedModel(llama, PromptTuningConfig(num_virtual_tokens=N, inference_mode=True))
    assert not any(parameter.requires_grad for parameter in model.parameters())
    model = get_prompt_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N))
    assert model.prompt_encoder.embedding.weight.requires_grad


# ----------------------------------------------------------------------------- reporting


@pytest.mark.parametrize(("builder", "task"), [(tiny_llama, "CAUSAL_LM"), (tiny_t5, "SEQ_2_SEQ_LM")])
def test_print_trainable_parameters_like_peft(builder, task):
    ours, theirs = _pair(builder, task)
    outputs = []
    for model in (ours, theirs):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            model.print_trainable_parameters()
        outputs.append(buffer.getvalue())
    assert outputs[0] == outputs[1]
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})\n", outputs[0])
    assert match
    trainable, total = (int(group.replace(",", "")) for group in match.groups()[:2])
    submodules = ours.peft_config.num_transformer_submodules
    assert trainable == N * submodules * 32
    assert total == trainable + sum(parameter.numel() for parameter in builder().parameters())
    assert float(match.group(3)) == pytest.approx(100 * trainable / total, abs=1e-4)
    assert ours.get_nb_trainable_parameters() == (trainable, total)


@pytest.mark.parametrize(("builder", "task", "rows"), [(tiny_llama, "CAUSAL_LM", N), (tiny_t5, "SEQ_2_SEQ_LM", 2 * N)])
def test_prompt_embedding_to_save(builder, task, rows):
    ours, theirs = _pair(builder, task)
    saved = ours.get_prompt_embedding_to_save()
    assert saved.shape == (rows, 32)
    assert not saved.requires_grad
    assert torch.equal(saved, theirs.get_prompt_embedding_to_save("default"))
    saved += 1.0  # a copy: the parameter is untouched
    assert not torch.equal(saved, ours.prompt_encoder.embedding.weight.detach())
