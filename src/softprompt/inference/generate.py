"""Generation for requests of any tasks, run together to the end of the longest.

With the prompt KV cache the requests all join one :class:`~softprompt.fastpath.step_batch.StepDecoder`
(the step-level machinery the :class:`~softprompt.inference.Scheduler` drives request by request);
without it (models whose cache is not plain keys/values) the prompts run in the input and
:func:`~softprompt.fastpath.decoding.decode` loops over a batch cache. A request owns one row per
prompt of its task; an ensemble's rows share the chosen tokens.
Each request's budget is its ``max_new_tokens`` capped by the room its longest row leaves in
the model's positions (generation then stops with ``"length"``).
"""

from __future__ import annotations

from softprompt.fastpath.decoding import DecodeRequest, GenerateParams, GenerateResult, decode
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import uncached_batch
from softprompt.fastpath.step_batch import decode_together
from softprompt.inference.tasks import Task


def decode_request(
    frozen: FrozenModel,
    task: Task,
    encoded: list[list[int]],
    params: GenerateParams,
    rows: list[int] | None = None,
) -> DecodeRequest:
    """A request's decoding state; its budget is capped by the room its longest row leaves.

    Args:
        frozen: the frozen model (its position limit).
        task: the request's task.
        encoded: token ids per ensemble member.
        params: the request's parameters.
        rows: its rows in a batch (a :class:`~softprompt.fastpath.step_batch.StepDecoder`
            assigns them itself).
    """
    pairs = list(zip(task.members, encoded, strict=True))
    room = min(frozen.max_positions - member.length - len(ids) for member, ids in pairs)
    budget = min(params.max_new_tokens, room)
    return DecodeRequest(task.info.name, list(rows or []), params, budget, len(encoded[0]))


def generate_requests(
    frozen: FrozenModel,
    requests: list[tuple[int, Task, list[list[int]], GenerateParams]],
    *,
    use_kv_cache: bool,
) -> dict[int, GenerateResult]:
    """Generate for encoded requests.

    Args:
        frozen: the frozen model.
        requests: per request its slot, task, token ids per ensemble member and parameters.
        use_kv_cache: read prompts from their cached keys/values (else run them in the input).

    Returns:
        The result of each slot.
    """
    if use_kv_cache:
        jobs = [(decode_request(frozen, task, encoded, params),
                 [member.kv for member in task.members], encoded)
                for _, task, encoded, params in requests]
        outputs = decode_together(frozen, jobs)
        return {slot: output for (slot, *_), output in zip(requests, outputs, strict=True)}
    members, texts, decoding = [], [], []
    for slot, task, encoded, params in requests:
        own_rows = list(range(len(texts), len(texts) + len(encoded)))
        members += task.members
        texts += encoded
        decoding.append((slot, decode_request(frozen, task, encoded, params, own_rows)))
    batch = uncached_batch(frozen, [member.prompt for member in members], texts)
    outputs = decode(frozen, batch, [request for _, request in decoding])
    return {slot: output for (slot, _), output in zip(decoding, outputs, strict=True)}
