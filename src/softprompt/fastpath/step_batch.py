"""Step-level decoding: requests join a running batch at any step and leave when they finish.

:func:`~softprompt.fastpath.decoding.decode` runs a batch from its prefill to its longest
sequence. Here the batch is never closed: :class:`StepDecoder` takes requests of any tasks at
any time; each :meth:`StepDecoder.step` runs one prefill chunk for the requests that are joining
and one decoding step for the running ones, and a request leaves as soon as it finishes (EOS,
stop string, budget) or is cancelled. Token choice, stop strings and budgets are
:func:`~softprompt.fastpath.decoding.advance`'s, the same as in ``decode``.

Every row keeps its own sequence of keys and values (:class:`KVRows`): the prompt's, taken from
the task's cache, then its text and its tokens. Rows are left-padded to a common width and each
column carries its position (-1: padding), so rows of any lengths and ages share a forward; the
attention mask is built from positions (causal, and windowed for sliding-window layers), so a
row sees exactly what it would see alone, whoever its batch-mates are.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softprompt.fastpath.decoding import DecodeRequest, GenerateResult, advance
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import PromptKV, position_mask, stack_prompt_kv

DEFAULT_PREFILL_CHUNK = 128


@dataclass(frozen=True)
class KVRows:
    """Keys and values of rows that run together, each its own sequence, left-padded.

    Attributes:
        layers: per layer ``(keys, values)``, each ``(R, kv_heads, W, head_dim)``.
        positions: ``(R, W)`` long, the position of each column; -1 marks padding.
        next_positions: ``(R,)`` long, the position of each row's next token.
    """

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    positions: torch.Tensor
    next_positions: torch.Tensor

    @property
    def rows(self) -> int:
        return self.positions.shape[0]

    @classmethod
    def from_prefix(cls, prefix: PromptKV) -> KVRows:
        """Rows that hold only their prompts' keys/values (right-aligned, as in ``prefix``)."""
        width = prefix.width
        lengths = prefix.lengths.to(prefix.layers[0][0].device)
        columns = torch.arange(width, device=lengths.device).unsqueeze(0)
        positions = columns - (width - lengths).unsqueeze(1)
        return cls(prefix.layers, positions.clamp(min=-1), lengths.clone())

    def concat(self, other: KVRows) -> KVRows:
        """These rows, then ``other``'s, left-padded to the wider of the two."""
        width = max(self.positions.shape[1], other.positions.shape[1])
        first, second = self._pad_to(width), other._pad_to(width)
        layers = tuple(
            (torch.cat([k1, k2]), torch.cat([v1, v2]))
            for (k1, v1), (k2, v2) in zip(first.layers, second.layers, strict=True)
        )
        return KVRows(
            layers,
            torch.cat([first.positions, second.positions]),
            torch.cat([first.next_positions, second.next_positions]),
        )

    def select(self, index: Sequence[int]) -> KVRows:
        """The given rows, with the leading columns that are padding in all of them dropped."""
        rows = torch.tensor(list(index), dtype=torch.long, device=self.positions.device)
        positions = self.positions[rows]
        valid = (positions >= 0).any(dim=0)
        start = int(valid.long().argmax()) if bool(valid.any()) else positions.shape[1]
        layers = tuple((keys[rows, :, start:], values[rows, :, start:]) for keys, values in self.layers)
        return KVRows(layers, positions[:, start:], self.next_positions[rows])

    def _pad_to(self, width: int) -> KVRows:
        missing = width - self.positions.shape[1]
        if missing == 0:
            return self
        layers = tuple(
            (F.pad(keys, (0, 0, missing, 0)), F.pad(values, (0, 0, missing, 0)))
            for keys, values in self.layers
        )
        positions = F.pad(self.positions, (missing, 0), value=-1)
        return KVRows(layers, positions, self.next_positions)


def extend(
    frozen: FrozenModel, rows: KVRows, embeds: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, KVRows]:
    """Run new tokens behind each row's keys/values and keep theirs.

    Args:
        frozen: the frozen model.
        rows: the rows' keys/values so far.
        embeds: ``(R, Q, H)`` the new tokens' embeddings, right-padded.
        lengths: ``(R,)`` long, the real new tokens of each row (0 allowed).

    Returns:
        ``(R, Q, H)`` final hidden states (token q of row r at ``[r, q]``) and the rows with the
        new tokens' keys/values appended (padding columns marked -1).
    """
    device = frozen.device
    width = embeds.shape[1]
    steps = torch.arange(width, device=device).unsqueeze(0)
    query_positions = rows.next_positions.unsqueeze(1) + steps  # (R, Q)
    real = steps < lengths.unsqueeze(1)
    key_positions = torch.cat([rows.positions, torch.where(real, query_positions, -1)], dim=1)
    keys = key_positions.unsqueeze(1)  # (R, 1, K)
    allowed = (keys >= 0) & (keys <= query_positions.unsqueeze(2))  # (R, Q, K)
    mask = position_mask(frozen, allowed, query_positions, key_positions)
    cache = frozen.new_cache(sliding=False)  # every column kept: the rows' own layout
    for layer_index, (layer_keys, layer_values) in enumerate(rows.layers):
        # Start each layer empty, then hand it the rows' tensors as they are: filling it with
        # update() would copy every key and value once more per step.
        cache.update(layer_keys[:, :, :0], layer_values[:, :, :0], layer_index)
        layer = cache.layers[layer_index]
        layer.keys, layer.values = layer_keys, layer_values
    hidden = frozen.hidden_states(embeds, mask, query_positions, cache)
    layers = tuple((layer.keys, layer.values) for layer in cache.layers)
    return hidden, KVRows(layers, key_positions, rows.next_positions + lengths)


class StepDecoder:
    """A decoding batch that requests join and leave at every step.

    Args:
        frozen: the frozen model; its cache must be plain keys/values (see
            :func:`~softprompt.fastpath.prompt_kv.prompt_cache_supported`).
        prefill_chunk: text tokens a joining row runs per step at most, so that a long text
            does not hold up the running rows (nor whatever waits between steps).
    """

    def __init__(self, frozen: FrozenModel, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.frozen = frozen
        self.prefill_chunk = prefill_chunk
        self._row_ids = itertools.count()
        self._owner: dict[int, DecodeRequest] = {}  # row id -> its request
        # Joining rows: their texts, how much of each has run, the logits after the last token.
        self._joining: KVRows | None = None
        self._joining_rows: list[int] = []
        self._texts: dict[int, list[int]] = {}
        self._fed: dict[int, int] = {}
        self._last_logits: dict[int, torch.Tensor] = {}
        # Decoding rows and the token each feeds next.
        self._decoding: KVRows | None = None
        self._decoding_rows: list[int] = []
        self._next_token: dict[int, int] = {}

    def __len__(self) -> int:
        return len({id(request) for request in self._owner.values()})

    def join(
        self, request: DecodeRequest, prefixes: Sequence[PromptKV], texts: Sequence[Sequence[int]]
    ) -> None:
        """Add a request: its texts run behind its prompts in the next steps, then it decodes.

        Args:
            request: a new request (its ``rows`` are assigned here, one per text).
            prefixes: one-row prompt keys/values, one per text (an ensemble has several).
            texts: the token ids of each row's text (non-empty).
        """
        if len(prefixes) != len(texts) or not texts or any(len(ids) == 0 for ids in texts):
            raise ValueError("join needs one prompt per text and non-empty texts")
        request.rows = [next(self._row_ids) for _ in texts]
        if request.budget <= 0:  # no room for a single token
            request.finish_reason = "length"
            return
        new = KVRows.from_prefix(stack_prompt_kv(list(prefixes)))
        self._joining = new if self._joining is None else self._joining.concat(new)
        for row, ids in zip(request.rows, texts, strict=True):
            self._owner[row] = request
            self._joining_rows.append(row)
            self._texts[row], self._fed[row] = list(ids), 0

    def cancel(self, request: DecodeRequest) -> None:
        """Drop a request from the batch now (its rows free their place at once)."""
        rows = set(request.rows)
        if not rows & self._owner.keys():
            return
        self._drop_joining([row for row in self._joining_rows if row in rows])
        keep = [index for index, row in enumerate(self._decoding_rows) if row not in rows]
        self._keep_decoding(keep)
        for row in rows:
            self._forget(row)

    @torch.no_grad()
    def step(self) -> list[DecodeRequest]:
        """One prefill chunk for the joining rows, then one token for every decoding row.

        Returns:
            The requests that got tokens in this step (finished ones included; they have left).
        """
        advanced = self._prefill() if self._joining_rows else []
        if self._decoding_rows:
            advanced += self._decode()
        return list({id(request): request for request in advanced}.values())

    # ----------------------------------------------------------------- the two forwards
    def _prefill(self) -> list[DecodeRequest]:
        frozen, rows = self.frozen, self._joining_rows
        chunks = [self._texts[row][self._fed[row] : self._fed[row] + self.prefill_chunk] for row in rows]
        lengths = [len(chunk) for chunk in chunks]
        ids = torch.full((len(rows), frozen.padded_length(max(lengths))), frozen.pad_id, dtype=torch.long)
        for index, chunk in enumerate(chunks):
            ids[index, : len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
        lengths_tensor = torch.tensor(lengths, device=frozen.device)
        hidden, self._joining = extend(frozen, self._joining, frozen.embed(ids.to(frozen.device)), lengths_tensor)
        ends = [index for index, row in enumerate(rows) if lengths[index] and self._ends(row, lengths[index])]
        if ends:
            last = torch.tensor([lengths[index] - 1 for index in ends], device=frozen.device)
            logits = frozen.logits(hidden[torch.tensor(ends, device=frozen.device), last]).float()
            for index, row_logits in zip(ends, logits, strict=True):
                self._last_logits[rows[index]] = row_logits
        for row, length in zip(rows, lengths, strict=True):
            self._fed[row] += length
        ready = [
            request for request in {id(self._owner[row]): self._owner[row] for row in rows}.values()
            if all(row in self._last_logits for row in request.rows)
        ]
        for request in ready:
            self._start_decoding(request)
        return ready

    def _ends(self, row: int, length: int) -> bool:
        return self._fed[row] + length == len(self._texts[row])

    def _start_decoding(self, request: DecodeRequest) -> None:
        """Choose a request's first token and move its rows from the joining to the decoding set."""
        logits = torch.stack([self._last_logits[row] for row in request.rows])
        where = {row: index for index, row in enumerate(request.rows)}
        next_tokens = advance([request], logits, where, self.frozen.eos_ids, self.frozen.tokenizer)
        index = [self._joining_rows.index(row) for row in request.rows]
        moved = self._joining.select(index) if next_tokens else None
        self._drop_joining(request.rows)
        if moved is None:  # finished at its first token
            for row in request.rows:
                self._forget(row)
            return
        self._decoding = moved if self._decoding is None else self._decoding.concat(moved)
        self._decoding_rows += request.rows
        self._next_token.update(next_tokens)

    def _decode(self) -> list[DecodeRequest]:
        frozen, rows = self.frozen, self._decoding_rows
        ids = torch.tensor([[self._next_token[row]] for row in rows], device=frozen.device)
        ones = torch.ones(len(rows), dtype=torch.long, device=frozen.device)
        hidden, self._decoding = extend(frozen, self._decoding, frozen.embed(ids), ones)
        logits = frozen.logits(hidden[:, -1]).float()
        requests = list({id(self._owner[row]): self._owner[row] for row in rows}.values())
        where = {row: index for index, row in enumerate(rows)}
        self._next_token = advance(requests, logits, where, frozen.eos_ids, frozen.tokenizer)
        finished = [row for row in rows if row not in self._next_token]
        self._keep_decoding([index for index, row in enumerate(rows) if row in self._next_token])
        for row in finished:
            self._forget(row)
        return requests

    # ----------------------------------------------------------------- bookkeeping
    def _drop_joining(self, rows: Sequence[int]) -> None:
        if not rows:
            return
        gone = set(rows)
        keep = [index for index, row in enumerate(self._joining_rows) if row not in gone]
        self._joining = self._joining.select(keep) if keep else None
        self._joining_rows = [self._joining_rows[index] for index in keep]
        for row in gone:
            self._texts.pop(row, None)
            self._fed.pop(row, None)
            self._last_logits.pop(row, None)

    def _keep_decoding(self, keep: list[int]) -> None:
        if len(keep) == len(self._decoding_rows):
            return
        self._decoding = self._decoding.select(keep) if keep else None
        self._decoding_rows = [self._decoding_rows[index] for index in keep]

    def _forget(self, row: int) -> None:
        self._owner.pop(row, None)
        self._next_token.pop(row, None)


def decode_together(
    frozen: FrozenModel,
    jobs: Sequence[tuple[DecodeRequest, Sequence[PromptKV], Sequence[Sequence[int]]]],
) -> list[GenerateResult]:
    """Run requests that all start now to their ends (the run-to-completion case).

    Args:
        frozen: the frozen model.
        jobs: per request its state, its one-row prompt keys/values per text, and its texts
            (as :meth:`StepDecoder.join`).

    Returns:
        One result per request, in order.
    """
    decoder = StepDecoder(frozen, prefill_chunk=frozen.max_positions)
    for request, prefixes, texts in jobs:
        decoder.join(request, prefixes, texts)
    while len(decoder):
        decoder.step()
    return [request.result() for request, _, _ in jobs]

