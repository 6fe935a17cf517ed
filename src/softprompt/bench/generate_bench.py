"""`softprompt bench generate`: generation with the prompt KV cache against without it.

Two :class:`~softprompt.inference.Engine` objects share one frozen model: one computes each
task's prompt keys/values once when the task is added (``use_kv_cache=True``), the other runs
the prompt through the model in every batch's prefill (``use_kv_cache=False``). The model is
loaded once per dtype of :func:`~softprompt.bench.compare.bench_dtypes` (the one ``--dtype``
resolves to, and float32), each serving the same prompts. The same mixed batches of greedy
requests go to every engine; each first generates them all once untimed (every shape warmed
up), then the repeats alternate. Throughput is generated tokens per second (median of repeats).
Within float32 the greedy outputs must be identical; in bf16 at least
:data:`~softprompt.bench.compare.MIN_IDENTICAL_GENERATIONS` of them (``outputs_agree``; a near
tie rounded differently changes the rest of a sequence). Across dtypes only the fraction of
identical outputs is reported.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from softprompt.bench.common import (
    TaskSpec,
    benchmark_texts,
    device_facts,
    format_number,
    load_bench_model,
    median,
    ratio,
    resolve_device,
    save_task_prompts,
    task_specs,
)
from softprompt.bench.compare import (
    FLOAT32,
    MIN_IDENTICAL_GENERATIONS,
    agreement,
    bench_dtypes,
    dtype_summary,
    time_workloads,
)
from softprompt.bench.options import GenerateBenchOptions


def run_generate_bench(options: GenerateBenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the result object (see the module docstring)."""
    from softprompt.inference import GenerateParams

    device = resolve_device(options.device)
    choice, dtypes = bench_dtypes(options.dtype, device)
    specs = task_specs(options.prompt_lengths)
    params = GenerateParams(max_new_tokens=options.max_new_tokens, temperature=0.0)
    texts = benchmark_texts(options.requests)
    requests = [(specs[index % len(specs)].name, text, params) for index, text in enumerate(texts)]
    batches = [
        requests[start : start + options.batch_size]
        for start in range(0, len(requests), options.batch_size)
    ]
    models = {dtype: load_bench_model(options.model, device, dtype) for dtype in dtypes}
    with tempfile.TemporaryDirectory(prefix="softprompt-bench-") as directory:
        # The same float32 prompts serve every dtype, so that the dtypes' outputs compare.
        paths = save_task_prompts(*models[FLOAT32], Path(directory), specs)
        workloads = {
            dtype: _engines(model, tokenizer, specs, paths, batches)
            for dtype, (model, tokenizer) in models.items()
        }
    outputs, seconds, _ = time_workloads(workloads, options.repeats, device)
    by_dtype = {dtype: _dtype_fields(outputs[dtype], seconds[dtype], dtype) for dtype in dtypes}
    summary = dtype_summary(by_dtype, choice.dtype, "cached_tokens_per_second", "outputs_agree")
    return {
        "bench": "generate",
        "model": options.model,
        "quick": options.quick,
        **device_facts(device),
        **choice.report_fields(),
        "options": dataclasses.asdict(options),
        "tasks": [dataclasses.asdict(spec) for spec in specs],
        "requests": len(requests),
        **summary,
        "ratio": by_dtype[choice.dtype]["ratio"],  # the cache's speedup where it is used
        "auto_vs_fp32_output_agreement": agreement(
            [result.token_ids for result in outputs[choice.dtype]["cached"]],
            [result.token_ids for result in outputs[FLOAT32]["cached"]],
        ),
    }


def _engines(
    model: Any, tokenizer: Any, specs: list[TaskSpec], paths: dict[str, Path], batches: list[Any]
) -> dict[str, Callable[[], list[Any]]]:
    """With and without the prompt KV cache on one model, each a function generating every
    batch."""
    from softprompt.inference import Engine

    runs = {}
    for name, use_cache in (("cached", True), ("uncached", False)):
        engine = Engine(model_and_tokenizer=(model, tokenizer), use_kv_cache=use_cache)
        for spec in specs:
            engine.add_task(spec.name, paths[spec.name])

        def run(engine: Engine = engine) -> list[Any]:
            return [result for batch in batches for result in engine.generate(batch)]

        runs[name] = run
    return runs


def _dtype_fields(
    outputs: dict[str, list[Any]], seconds: dict[str, list[float]], dtype: str
) -> dict[str, Any]:
    """One dtype's figures; its two engines' outputs must agree (same dtype only)."""
    cached, uncached = outputs["cached"], outputs["uncached"]
    differing = [
        slot
        for slot, (a, b) in enumerate(zip(cached, uncached, strict=True))
        if a.token_ids != b.token_ids
    ]
    tokens = {
        name: sum(result.num_tokens for result in results) for name, results in outputs.items()
    }
    speed = {name: tokens[name] / median(values) for name, values in seconds.items()}
    return {
        "generated_tokens": tokens["cached"],
        "cached_tokens_per_second": speed["cached"],
        "uncached_tokens_per_second": speed["uncached"],
        "ratio": ratio(speed["cached"], speed["uncached"]),
        "cached_seconds": seconds["cached"],
        "uncached_seconds": seconds["uncached"],
        "outputs_identical": not differing,
        "outputs_agree": not differing or (
            dtype != FLOAT32 and 1 - len(differing) / len(cached) >= MIN_IDENTICAL_GENERATIONS
        ),
        "differing_requests": differing,
        "sample_output": cached[0].text if cached else None,
    }


def format_generate(result: dict[str, Any]) -> list[str]:
    """The result as a short text report: tokens/s of each engine, one column per dtype."""
    dtype, blocks = result["dtype"], result["by_dtype"]
    lines = [
        f"bench generate: {result['model']} on {result['device']} ({result['device_name']}), "
        f"{result['requests']} greedy requests x {result['options']['max_new_tokens']} new tokens, "
        f"batch {result['options']['batch_size']}"
        + (" [QUICK: not a result]" if result["quick"] else ""),
        f"dtype {dtype}: {result['dtype_reason']}",
        f"{'tokens/s':<20}" + "".join(f"{name:>12}" for name in blocks),
    ]
    for label, field in (
        ("prompt KV cache", "cached_tokens_per_second"),
        ("no prompt KV cache", "uncached_tokens_per_second"),
    ):
        lines.append(
            f"{label:<20}" + "".join(f"{format_number(b[field]):>12}" for b in blocks.values())
        )
    lines.append(
        f"cache ratio {format_number(result['ratio'])}x ({dtype}); "
        f"cached {dtype} / float32: {format_number(result['auto_vs_fp32'])}x"
    )
    for name, block in blocks.items():
        lines.append(
            f"{name}: outputs identical with and without the cache: {block['outputs_identical']}"
        )
    lines.append(
        f"outputs {dtype} vs float32 (cached): "
        f"{format_number(100 * result['auto_vs_fp32_output_agreement'], 1)}% identical"
    )
    return lines
