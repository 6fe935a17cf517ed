"""Every side of a benchmark in every dtype: which dtypes, timing them fairly, and the summary.

Each bench runs its sides (softprompt and PEFT, or the two engines of ``generate``) in the
dtype ``--dtype`` resolves to (``auto``: bfloat16 where the hardware runs it natively) and in
float32, PEFT's default (a PEFT user's model loads in float32); with only float32 on a machine
without native bf16. Each dtype's figures form one block (``by_dtype``); the float32 block's
fields also keep their names at the top level, so results from before stay comparable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from softprompt.bench.common import ratio, timed
from softprompt.models.precision import DtypeChoice, resolve_dtype

logger = logging.getLogger(__name__)

FLOAT32 = "float32"

# dtype -> side -> a function running that side's whole timed workload once.
Workloads = Mapping[str, Mapping[str, Callable[[], Any]]]
BySide = dict[str, dict[str, Any]]  # dtype -> side -> value


def bench_dtypes(requested: str, device: torch.device) -> tuple[DtypeChoice, list[str]]:
    """The choice for ``requested`` and the dtypes a bench runs: that one, then float32.

    Args:
        requested: ``--dtype``: ``"auto"`` or a dtype name.
        device: where the model runs.

    Returns:
        The choice (its dtype, reason and CPU), and ``[choice.dtype, "float32"]``, or
        ``["float32"]`` when the choice is float32.
    """
    choice = resolve_dtype(requested, device)
    return choice, list(dict.fromkeys((choice.dtype, FLOAT32)))


def time_workloads(
    workloads: Workloads, repeats: int, device: torch.device
) -> tuple[BySide, BySide, BySide]:
    """Time every workload ``repeats`` times, alternating between them, after one untimed run.

    The untimed run executes exactly the shapes of the timed ones: on a CPU with AMX, oneDNN
    builds a bf16 kernel the first time it meets an input shape (about 10x a later call), and
    CUDA libraries choose their algorithms per shape too, so warming up one batch is not enough.
    Alternating spreads a busy machine's slow periods over every side and dtype.

    Args:
        workloads: dtype -> side -> function running the whole workload once.
        repeats: timed runs of each workload.
        device: synchronised before each clock reading.

    Returns:
        The last timed run's result, every timed run's seconds and the untimed run's seconds
        (which include any compilation), each as dtype -> side -> value.
    """
    warmup: BySide = {dtype: {} for dtype in workloads}
    for dtype, sides in workloads.items():
        for name, run in sides.items():
            _, warmup[dtype][name] = timed(run, device)
            logger.info("warm-up  %-9s %-26s %.2f s", dtype, name, warmup[dtype][name])
    outputs: BySide = {dtype: {} for dtype in workloads}
    seconds: dict[str, dict[str, list[float]]] = {
        dtype: {name: [] for name in sides} for dtype, sides in workloads.items()
    }
    for index in range(repeats):
        for dtype, sides in workloads.items():
            for name, run in sides.items():
                outputs[dtype][name], took = timed(run, device)
                seconds[dtype][name].append(took)
                logger.info("repeat %d %-9s %-26s %.2f s", index + 1, dtype, name, took)
    return outputs, seconds, warmup


# Within float32 every side must compute the same outputs. In reduced precision two correct
# computation orders may round a near tie differently, so the checks tolerate exactly that:
# a flipped label whose two probabilities differ by less than NEAR_TIE_PROBABILITY, and greedy
# generations of which at least MIN_IDENTICAL_GENERATIONS are identical token for token.
NEAR_TIE_PROBABILITY = 0.1
MIN_IDENTICAL_GENERATIONS = 0.75


def dtype_summary(
    by_dtype: dict[str, dict[str, Any]],
    dtype: str,
    speed: str,
    check: str,
    baselines: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The top-level fields of a bench that ran in several dtypes.

    Args:
        by_dtype: dtype -> that dtype's fields; it has ``"float32"``.
        dtype: the dtype ``--dtype`` chose (the softprompt default).
        speed: softprompt's throughput field in each block.
        check: the field, in each block, that is True when the sides computed the same outputs.
        baselines: ratio field -> the compared side's throughput field. For each, ``<ratio>``
            is softprompt at ``dtype`` over that side at float32 (each one's default), and
            ``same_dtype_<ratio>`` over that side at ``dtype``.

    Returns:
        The float32 block's fields (their names and meaning as before), then ``dtypes``,
        ``by_dtype``, ``auto_vs_fp32`` (softprompt at ``dtype`` / at float32), the ratios, and
        ``check``: True only when it holds in every dtype.
    """
    ours, reference = by_dtype[dtype], by_dtype[FLOAT32]
    fields: dict[str, Any] = {
        **reference,
        "dtypes": list(by_dtype),
        "by_dtype": by_dtype,
        "auto_vs_fp32": ratio(ours[speed], reference[speed]),
        check: all(block[check] for block in by_dtype.values()),
    }
    for name, theirs in (baselines or {}).items():
        fields[name] = ratio(ours[speed], reference[theirs])
        fields[f"same_dtype_{name}"] = ratio(ours[speed], ours[theirs])
    return fields


def agreement(ours: list[Any], theirs: list[Any]) -> float:
    """The fraction of positions where two equally long lists hold equal values (1.0 if empty)."""
    if len(ours) != len(theirs):
        raise ValueError(f"cannot compare {len(ours)} outputs with {len(theirs)}")
    return sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours) if ours else 1.0
