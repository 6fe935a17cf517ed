"""Generation: token choice (greedy, temperature, nucleus), stop strings, budgets, and the batch
decoding loop of the uncached path.

:func:`advance` is the one decoding step's bookkeeping: it picks every running request's next
token from its rows' logits and updates its text and finish state. Two loops drive it:
:class:`~softprompt.fastpath.step_batch.StepDecoder` (requests join and leave a running batch;
the engine and the server use it whenever prompts come from their keys/values cache), and
:func:`decode` here, which runs one prefilled batch to its end over a model cache (prompts run
in the input: models whose cache is not plain keys/values). A request of an ensemble task owns
one row per prompt; its next-token distribution is the mean of its rows' distributions, and the
chosen token is fed to all of them.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import PrefixedBatch, run


@dataclass
class GenerateParams:
    """How to generate for one request.

    Attributes:
        max_new_tokens: at most this many new tokens (>= 1).
        temperature: 0 for greedy decoding, else the softmax temperature (> 0).
        top_p: nucleus sampling mass in (0, 1]; 1 keeps the whole distribution.
        stop: strings that end the generation; the text is cut before the first one found. A
            single string is accepted and wrapped in a list.
        seed: seed of this request's sampler (same seed, same request: same text); None draws
            a fresh one.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(item, str) and item for item in self.stop
        ):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")


@dataclass(frozen=True)
class GenerateResult:
    """The outcome of one generation request.

    Attributes:
        task: the task name.
        text: the generated text (special tokens skipped, cut before a stop string).
        num_tokens: tokens generated, an EOS included (a stop string may end mid-way through
            the last ones).
        finish_reason: ``"stop"`` (EOS or a stop string) or ``"length"`` (max_new_tokens, or the
            model's position limit).
        token_ids: the generated token ids (``num_tokens`` of them).
        prompt_tokens: tokens of the input the model read (template rendered, cut to the task's
            limit; an ensemble's first member), the virtual tokens not counted.
    """

    task: str
    text: str
    num_tokens: int
    finish_reason: Literal["stop", "length"]
    token_ids: list[int] = field(default_factory=list, repr=False)
    prompt_tokens: int = 0


@dataclass
class DecodeRequest:
    """A request's place in a decoding batch.

    Attributes:
        task: task name (copied to the result).
        rows: its rows in the batch, one per ensemble member.
        params: its parameters.
        budget: new tokens allowed: ``max_new_tokens`` capped by the room left in the model's
            positions (may be 0).
        prompt_tokens: tokens of its encoded input (see :class:`GenerateResult`).
        tokens, text, finish_reason: the state of the generation, filled by :func:`decode`.
        generator: the request's sampler (sampling only), seeded from ``params.seed``.
    """

    task: str
    rows: list[int]
    params: GenerateParams
    budget: int
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.params.temperature > 0:
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)

    def settled_text(self, tokenizer: Any) -> str:
        """The text so far that later tokens can no longer change (what a stream may send).

        Once finished, the final text. While running, the decoded tokens less an incomplete
        last character and less any ending that could be the start of a stop string (the
        final text may be cut there).
        """
        if self.finish_reason is not None:
            return self.text
        text = _decode(tokenizer, self.tokens).rstrip("\ufffd")
        held = max(
            (size for stop in self.params.stop for size in range(1, len(stop))
             if text.endswith(stop[:size])),
            default=0,
        )
        return text[: len(text) - held]

    def result(self) -> GenerateResult:
        return GenerateResult(
            self.task, self.text, len(self.tokens), self.finish_reason, list(self.tokens),
            self.prompt_tokens,
        )


def combine_members(logits: torch.Tensor) -> torch.Tensor:
    """One next-token score vector from an ensemble's rows.

    Args:
        logits: ``(M, V)`` fp32 logits, one row per ensemble member.

    Returns:
        ``(V,)``: the logits themselves for one member (so greedy decoding matches
        ``model.generate`` exactly), else the log of the mean of the members' probabilities.
    """
    if logits.shape[0] == 1:
        return logits[0]
    return logits.log_softmax(dim=-1).logsumexp(dim=0) - math.log(logits.shape[0])


def top_p_filter(probabilities: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``; renormalise.

    Args:
        probabilities: ``(V,)`` a distribution.
        top_p: mass to keep, in (0, 1].

    Returns:
        ``(V,)`` the filtered distribution (the most likely token is always kept).
    """
    if top_p >= 1:
        return probabilities
    sorted_probs, order = probabilities.sort(descending=True)
    # A token is kept when the mass before it is still short of top_p.
    keep_sorted = (sorted_probs.cumsum(dim=0) - sorted_probs) < top_p
    keep_sorted[0] = True
    keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
    filtered = probabilities * keep
    return filtered / filtered.sum()


def choose_token(
    scores: torch.Tensor, params: GenerateParams, generator: torch.Generator | None
) -> int:
    """Pick the next token.

    Args:
        scores: ``(V,)`` fp32 logits (or log-probabilities).
        params: the request's parameters.
        generator: the request's sampler (None for greedy).

    Returns:
        The token id.
    """
    if params.temperature == 0:
        return int(scores.argmax())
    # Sampling runs on the CPU with the request's own generator: the same seed gives the same
    # tokens whatever the device or the batch-mates. The best score is subtracted first, so a
    # tiny temperature cannot overflow to inf (and NaN probabilities): it tends to greedy.
    scores = scores.float().cpu()
    probabilities = ((scores - scores.max()) / params.temperature).softmax(dim=-1)
    probabilities = top_p_filter(probabilities, params.top_p)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def _append(request: DecodeRequest, token: int, eos_ids: set[int], tokenizer: Any) -> None:
    """Add a request's next token and update its finish state."""
    request.tokens.append(token)
    if token in eos_ids:
        request.finish_reason = "stop"
        request.text = _decode(tokenizer, request.tokens[:-1])
        return
    if request.params.stop:
        text = _decode(tokenizer, request.tokens)
        cut = find_stop(text, request.params.stop)
        if cut is not None:
            request.finish_reason, request.text = "stop", text[:cut]
            return
    if len(request.tokens) >= request.budget:
        request.finish_reason = "length"
        request.text = _decode(tokenizer, request.tokens)


def _decode(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""


def advance(
    requests: Sequence[DecodeRequest],
    logits: torch.Tensor,
    where: dict[int, int],
    eos_ids: set[int],
    tokenizer: Any,
) -> dict[int, int]:
    """Choose each unfinished request's next token and update its state (one decoding step).

    Args:
        requests: the requests of the step; finished ones are skipped.
        logits: ``(R, V)`` fp32 next-token logits, one row per batch row.
        where: row id (``DecodeRequest.rows``) -> its row in ``logits``.
        eos_ids: tokens that end a generation.
        tokenizer: decodes the text (stop strings, the final text).

    Returns:
        The token to feed next to each row of every request still running.
    """
    greedy = logits.argmax(dim=-1).tolist()  # one device sync for all greedy rows
    next_tokens: dict[int, int] = {}
    for request in requests:
        if request.finish_reason is not None:
            continue
        if len(request.tokens) >= request.budget:  # a budget of 0: no room at all
            request.finish_reason = "length"
            continue
        if request.params.temperature == 0 and len(request.rows) == 1:
            token = greedy[where[request.rows[0]]]
        else:
            scores = combine_members(logits[[where[row] for row in request.rows]])
            token = choose_token(scores, request.params, request.generator)
        _append(request, token, eos_ids, tokenizer)
        if request.finish_reason is None:
            next_tokens.update(dict.fromkeys(request.rows, token))
    return next_tokens


@torch.no_grad()
def decode(frozen: FrozenModel, batch: PrefixedBatch, requests: list[DecodeRequest]) -> list[GenerateResult]:
    """Generate for every request of a batch.

    Known limit: the steps extend a 0/1 mask, so the model windows its sliding-window layers by
    cache column; rows whose texts differ in length (right padding) then see a window shifted
    by their padding (Gemma 2/3). :func:`~softprompt.fastpath.step_batch.decode_together` masks
    by position and is exact; prefer it whenever the prompts have cached keys/values.

    Args:
        frozen: the frozen model (its tokenizer decodes the text and finds stop strings).
        batch: the prefill batch; without a cache, one is created and filled by the prefill.
        requests: the requests, whose ``rows`` index ``batch``'s rows.

    Returns:
        One result per request, in order.
    """
    tokenizer, eos_ids = frozen.tokenizer, frozen.eos_ids
    cache = batch.cache if batch.cache is not None else frozen.new_cache()
    hidden = run(frozen, batch, cache)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    logits = frozen.logits(hidden[rows, batch.last_text_index()]).float()  # (R, V)
    active = list(range(hidden.shape[0]))  # original row id of each cache row
    mask = batch.attention_mask
    positions = batch.prefix_lengths + batch.text_lengths  # (R,) position of the next token
    while True:
        where = {row: index for index, row in enumerate(active)}
        next_tokens = advance(requests, logits, where, eos_ids, tokenizer)
        if not next_tokens:
            break
        keep = [index for index, row in enumerate(active) if row in next_tokens]
        if len(keep) < len(active):
            keep_index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(keep_index)
            mask, positions = mask[keep_index], positions[keep_index]
            active = [active[index] for index in keep]
        token_ids = torch.tensor([[next_tokens[row]] for row in active], device=mask.device)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        hidden = frozen.hidden_states(frozen.embed(token_ids), mask, positions.unsqueeze(1), cache)
        positions = positions + 1
        logits = frozen.logits(hidden[:, -1]).float()
    return [request.result() for request in requests]
