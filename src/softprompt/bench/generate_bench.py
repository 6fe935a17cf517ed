"""`softprompt bench generate`: generation with the prompt KV cache against without it.

Two :class:`~softprompt.inference.Engine` objects share one frozen model: one computes each
task's prompt keys/values once when the task is added (``use_kv_cache=True``), the other runs
the prompt through the model in every batch's prefill (``use_kv_cache=False``). The same mixed
batches of greedy requests go to both; repeats alternate after one warm-up batch each. Throughput
is generated tokens per second (median of repeats), and the greedy outputs must be identical.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

from softprompt.bench.common import (
    benchmark_texts,
    device_facts,
    format_number,
    load_bench_model,
    median,
    ratio,
    resolve_device,
    save_task_prompts,
    task_specs,
    timed,
)
from softprompt.bench.options import GenerateBenchOptions

logger = logging.getLogger(__name__)


def run_generate_bench(options: GenerateBenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the result object (see the module docstring)."""
    from softprompt.inference import Engine, GenerateParams

    device = resolve_device(options.device)
    model, tokenizer, dtype = load_bench_model(options.model, device, options.dtype)
    specs = task_specs(options.prompt_lengths)
    params = GenerateParams(max_new_tokens=options.max_new_tokens, temperature=0.0)
    texts = benchmark_texts(options.requests)
    requests = [(specs[index % len(specs)].name, text, params) for index, text in enumerate(texts)]
    batches = [
        requests[start : start + options.batch_size]
        for start in range(0, len(requests), options.batch_size)
    ]
    engines = {}
    with tempfile.TemporaryDirectory(prefix="softprompt-bench-") as directory:
        paths = save_task_prompts(model, tokenizer, Path(directory), specs)
        for name, use_cache in (("cached", True), ("uncached", False)):
            engine = Engine(model_and_tokenizer=(model, tokenizer), use_kv_cache=use_cache)
            for spec in specs:
                engine.add_task(spec.name, paths[spec.name])
            engines[name] = engine
    for engine in engines.values():
        engine.generate(batches[0])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    outputs: dict[str, list[Any]] = {}
    for index in range(options.repeats):
        for name, engine in engines.items():
            outputs[name], took = timed(
                lambda engine=engine: [
                    result for batch in batches for result in engine.generate(batch)
                ],
                device,
            )
            seconds[name].append(took)
            logger.info("repeat %d %-9s %.2f s", index + 1, name, took)
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
        "bench": "generate",
        "model": options.model,
        "quick": options.quick,
        **device_facts(device),
        **dtype.report_fields(),
        "options": dataclasses.asdict(options),
        "tasks": [dataclasses.asdict(spec) for spec in specs],
        "requests": len(requests),
        "generated_tokens": tokens["cached"],
        "cached_tokens_per_second": speed["cached"],
        "uncached_tokens_per_second": speed["uncached"],
        "ratio": ratio(speed["cached"], speed["uncached"]),
        "cached_seconds": seconds["cached"],
        "uncached_seconds": seconds["uncached"],
        "outputs_identical": not differing,
        "differing_requests": differing,
        "sample_output": cached[0].text if cached else None,
    }


def format_generate(result: dict[str, Any]) -> list[str]:
    """The result as a short text report."""
    return [
        f"bench generate: {result['model']} on {result['device']} ({result['device_name']}), "
        f"{result['requests']} greedy requests x {result['options']['max_new_tokens']} new tokens, "
        f"batch {result['options']['batch_size']}"
        + (" [QUICK: not a result]" if result["quick"] else ""),
        f"prompt KV cache     {format_number(result['cached_tokens_per_second']):>10} tokens/s",
        f"no prompt KV cache  {format_number(result['uncached_tokens_per_second']):>10} tokens/s",
        f"ratio {format_number(result['ratio'])}x; "
        f"outputs identical: {result['outputs_identical']}",
    ]
