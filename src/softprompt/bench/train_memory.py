"""Peak memory of each side of ``softprompt bench train``, in fresh worker processes.

A process's peak RSS cannot be split between two sides that ran in it (and memory freed by one
side stays mapped for the other), so each main variant runs again in its own fresh process
(``python -m softprompt.bench.train_memory --memory-worker NAME``): setup, reset of the
kernel's peak counter, then a few steps on the variant's largest batches. The three variants of
one dtype run side by side; the dtypes one after the other, so no more than three models are
in memory at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

from softprompt.bench.common import current_rss_mb, peak_rss_mb, reset_peak_rss, run_workers
from softprompt.bench.options import TrainBenchOptions
from softprompt.bench.train_setup import MAIN, VARIANTS, TrainSetup

logger = logging.getLogger(__name__)

MEMORY_STEPS = 3

# dtype -> variant -> the worker's result (or {"error": ...})
Memory = dict[str, dict[str, dict[str, Any]]]


def measure_memory(options: TrainBenchOptions, dtypes: Sequence[str]) -> Memory:
    """Peak memory of each main variant in each dtype, each in its own fresh worker process.

    Args:
        options: the bench's options; each worker loads the model in one of ``dtypes``.
        dtypes: dtype names (resolved: never ``auto``).
    """
    memory: Memory = {}
    for dtype in dtypes:
        payload = json.dumps(dataclasses.asdict(dataclasses.replace(options, dtype=dtype)))
        commands = {
            variant.name: [
                sys.executable,
                "-m",
                "softprompt.bench.train_memory",
                "--memory-worker",
                variant.name,
                "--options",
                payload,
                "--threads",
                str(torch.get_num_threads()),
            ]
            for variant in MAIN
        }
        memory[dtype] = run_workers(commands)
        for name, value in memory[dtype].items():
            if "error" in value:
                logger.warning("memory worker %s (%s) failed: %s", name, dtype, value["error"])
    return memory


def memory_fields(measured: dict[str, dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """``<variant>_peak_rss_mb``, ``<variant>_peak_rss_delta_mb`` (and ``_peak_cuda_mb``) of one
    dtype's workers; None where not measured."""
    fields: dict[str, Any] = {}
    for variant in MAIN:
        value = measured.get(variant.name, {})
        fields[f"{variant.name}_peak_rss_mb"] = value.get("peak_rss_mb")
        fields[f"{variant.name}_peak_rss_delta_mb"] = value.get("peak_rss_delta_mb")
        if device.type == "cuda":
            fields[f"{variant.name}_peak_cuda_mb"] = value.get("peak_cuda_mb")
    return fields


def memory_method(memory: Memory) -> str:
    """How the memory figures were measured (``memory_method`` in the result)."""
    if not memory:
        return "not measured (--no-memory)"
    values = [value for measured in memory.values() for value in measured.values()]
    reset = all(value.get("peak_reset") for value in values)
    scope = "after setup (VmHWM reset)" if reset else "process lifetime (ru_maxrss)"
    return (
        f"one fresh process per variant and dtype; peak RSS {scope} over {MEMORY_STEPS} steps "
        "on the largest batches"
    )


def memory_worker(options: TrainBenchOptions, name: str) -> dict[str, Any]:
    """Set up, then run the variant's largest batches and report the peak memory they needed."""
    from softprompt.training.optim import make_optimizer

    variant = VARIANTS[name]
    setup = TrainSetup(options, validation=False)
    if variant.system == "peft":
        setup.build_peft()
    plan = setup.plans[variant.grouped]
    largest = sorted(plan, key=lambda batch: -len(batch) * setup.text_width(variant, batch))
    parameter = setup.reset(variant.system)
    optimizer = make_optimizer([parameter], "adamw", options.lr)
    before = current_rss_mb()
    reset = reset_peak_rss()
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    for batch in largest[:MEMORY_STEPS]:
        setup.step(variant, batch, optimizer)
    peak = peak_rss_mb()
    result = {
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        "peak_rss_delta_mb": peak - before,
        "peak_reset": reset,
    }
    if setup.device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(setup.device) / (1024 * 1024)
    return result


def _worker_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="memory worker of softprompt bench train (internal)"
    )
    parser.add_argument("--memory-worker", required=True, choices=sorted(VARIANTS))
    parser.add_argument("--options", required=True)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    options = TrainBenchOptions(**json.loads(args.options))
    print(json.dumps(memory_worker(options, args.memory_worker)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
