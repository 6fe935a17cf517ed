"""Generation evaluation: greedy outputs behind the prompt's keys/values, scored by chrF and BLEU.

The one place for generation metrics: training's validation and test
(:class:`softprompt.training.objectives.GenerationObjective`), ``softprompt eval`` on a generation
checkpoint and the zero-/few-shot baselines all call `generate_texts` and `generation_metrics`.

Scores are sacrebleu's corpus chrF and BLEU (0-100). BLEU tokenizes Chinese targets with
sacrebleu's ``zh`` tokenizer (one token per character) and others with its default ``13a``; chrF
works on characters and needs no tokenizer. With a group column (``hsk_level``) every score is
also reported per group value.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sacrebleu
import torch
from tqdm.auto import tqdm

from softprompt.core.prefix import DeepPrompt
from softprompt.data import Record, Template
from softprompt.data.encoding import InputEncoding
from softprompt.fastpath.decoding import DecodeRequest, GenerateParams, decode, find_stop
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import (
    PromptKV,
    compute_prompt_kv,
    prefixed_batch,
    share_leading_tokens,
)
from softprompt.fastpath.step_batch import decode_together


@dataclass
class GeneratedSplit:
    """A text-to-text split, encoded.

    Attributes:
        inputs: token ids of each rendered input (the model continues them).
        targets: token ids of each target, EOS appended (the training labels).
        target_texts: each target as text (the references of the metrics).
        groups: each example's group value (e.g. its HSK level), or None.
    """

    inputs: list[list[int]]
    targets: list[list[int]]
    target_texts: list[str]
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.inputs)


def encode_generation(
    records: Sequence[Record],
    encoding: InputEncoding,
    target_column: str,
    max_target_length: int,
    group_column: str | None = None,
    split: str = "split",
) -> GeneratedSplit:
    """Encode inputs (see :mod:`softprompt.data.encoding`) and targets (EOS appended).

    Args:
        records: the examples.
        encoding: template, length limit and context of the inputs.
        target_column: field holding the target text.
        max_target_length: most tokens a target may have (EOS not counted).
        group_column: field whose values group the metrics, or None.
        split: names the records in errors (``"train"``).

    Raises:
        ValueError: a target is longer than ``max_target_length`` (naming split, row and text).
    """
    tokenizer = encoding.tokenizer
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    texts = [record[target_column] for record in records]
    target_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    for row, ids in enumerate(target_ids):
        if len(ids) > max_target_length:
            raise ValueError(
                f"{split} row {row}: target {texts[row][:60]!r} is {len(ids)} tokens, more than "
                f"max_target_length={max_target_length}; raise --max-target-length or drop it"
            )
    groups = [record[group_column] for record in records] if group_column else None
    return GeneratedSplit(
        encoding.encode(records), [list(ids) + eos for ids in target_ids], texts, groups
    )


@torch.no_grad()
def generate_texts(
    frozen: FrozenModel,
    prompt: torch.Tensor | DeepPrompt | PromptKV | None,
    inputs: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    description: str | None = None,
) -> list[str]:
    """Greedy generation for every input, the prompt's keys/values (with the tokens every
    input starts with) computed once.

    Args:
        frozen: the frozen model.
        prompt: ``(n, H)`` soft prompt, a deep prompt, their keys/values, or None (the model
            alone: baselines).
        inputs: encoded inputs.
        max_new_tokens: most tokens generated per input (fewer where the model's positions end).
        batch_size: inputs per decoding batch (batches are formed by length).
        stop: strings that end a generated text (see `finish_text`).
        description: progress bar label; None hides the bar.

    Returns:
        The generated texts, stripped, in the order of ``inputs``.
    """
    prefix = prompt
    if isinstance(prompt, (torch.Tensor, DeepPrompt)):
        prefix = compute_prompt_kv(frozen, prompt)
    prefix, inputs = share_leading_tokens(frozen, prefix, inputs)  # a baseline's context runs once
    prompt_length = 0 if prefix is None else int(prefix.lengths.max())
    # Stop strings are applied afterwards (`finish_text`): a model may begin with a newline, which
    # as a stop string in the decoding loop would end its text before it starts.
    params = GenerateParams(max_new_tokens=max_new_tokens)
    order = sorted(range(len(inputs)), key=lambda position: len(inputs[position]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    texts = [""] * len(inputs)
    for batch in tqdm(batches, desc=description or "generate", leave=False,
                      disable=description is None):
        requests = []
        for row, index in enumerate(batch):
            room = frozen.max_positions - prompt_length - len(inputs[index])
            requests.append(DecodeRequest("eval", [row], params, min(max_new_tokens, room)))
        encoded = [list(inputs[index]) for index in batch]
        if prefix is None:  # a baseline: the model alone, one padded batch
            outputs = decode(frozen, prefixed_batch(frozen, None, encoded), requests)
        else:  # each row exact, as it would run alone (and as the Engine serves it)
            outputs = decode_together(frozen, [
                (request, [prefix], [text]) for request, text in zip(requests, encoded, strict=True)
            ])
        for index, output in zip(batch, outputs, strict=True):
            texts[index] = finish_text(output.text, stop)
    return texts


def finish_text(text: str, stop: Sequence[str] = ()) -> str:
    """A generated text as it is scored: leading whitespace dropped, cut before the first stop
    string after that, stripped. ``predict`` and Engine users apply it to match evaluation."""
    text = text.lstrip()
    cut = find_stop(text, list(stop))
    return (text if cut is None else text[:cut]).strip()


def default_stop(targets: Iterable[str]) -> tuple[str, ...]:
    """Strings that end a generated text besides EOS (`finish_text`): a newline when every target
    is one line (a model without a tuned prompt would go on to write more examples), else none."""
    return () if any("\n" in target for target in targets) else ("\n",)


def bleu_tokenizer(target_language: str | None) -> str:
    """sacrebleu's BLEU tokenizer for targets in ``target_language``: ``zh`` or ``13a``."""
    return "zh" if target_language == "zh" else "13a"


def _scores(hypotheses: list[str], references: list[str], tokenize: str) -> dict[str, Any]:
    if not hypotheses:
        return {"chrf": 0.0, "bleu": 0.0, "exact_match": 0.0, "examples": 0}
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
    return {
        "chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score),
        "bleu": float(sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize).score),
        "exact_match": exact / len(hypotheses),
        "examples": len(hypotheses),
    }


def generation_metrics(
    hypotheses: Sequence[str],
    references: Sequence[str],
    target_language: str | None = None,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Corpus chrF and BLEU (0-100) and the exact-match rate, overall and per group.

    Args:
        hypotheses: generated texts.
        references: one reference per hypothesis.
        target_language: the references' language (``zh`` picks BLEU's ``zh`` tokenizer).
        groups: each example's group value (e.g. HSK level), or None.

    Returns:
        ``chrf``, ``bleu``, ``exact_match``, ``accuracy`` (= exact match), ``examples``,
        ``bleu_tokenize``, and with groups ``per_group``: value -> the same scores.
    """
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    tokenize = bleu_tokenizer(target_language)
    result = _scores(hypotheses, references, tokenize)
    result["accuracy"] = result["exact_match"]
    result["bleu_tokenize"] = tokenize
    if groups is not None:
        by_group: dict[str, list[int]] = {}
        for index, group in enumerate(groups):
            by_group.setdefault(group, []).append(index)
        result["per_group"] = {
            group: _scores([hypotheses[i] for i in rows], [references[i] for i in rows], tokenize)
            for group, rows in sorted(by_group.items(), key=lambda item: _group_key(item[0]))
        }
    return result


def _group_key(value: str) -> tuple[int, float, str]:
    """Numeric group values in numeric order (``"2"`` before ``"10"``), then the rest."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def few_shot_pairs_context(
    train: Sequence[Record],
    template: Template,
    target_column: str,
    shots: int,
    seed: int,
    instruction: str = "",
) -> str:
    """K training pairs rendered as an in-context prefix: the instruction, then
    ``template(record) + " " + target`` per pair, blank lines between."""
    if shots > len(train):
        raise ValueError(f"shots={shots} but the train split has only {len(train)} examples")
    chosen = random.Random(seed).sample(list(train), shots)
    parts = [instruction] if instruction else []
    parts += [template.render(record) + " " + record[target_column] for record in chosen]
    return "\n\n".join(parts) + "\n\n"


def chat_template(tokenizer: Any, instruction: str, field: str = "text") -> Template:
    """A template that puts ``instruction`` and the text in one user turn of the tokenizer's chat
    template, ending where the assistant's answer begins.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"the tokenizer of {name!r} has no chat template; drop --chat-template")
    marker = "\u0000TEXT\u0000"  # cannot occur in a chat template
    content = f"{instruction}\n{marker}" if instruction else marker
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    escaped = rendered.replace("{", "{{").replace("}", "}}")
    return Template(escaped.replace(marker, "{" + field + "}"))
