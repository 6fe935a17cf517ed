"""`softprompt bench infer`: mixed-task classification, softprompt's Engine against PEFT.

Three or more tasks (random SAMPLE_VOCAB prompts of different lengths, each with its own
template and verbalizer) are saved as checkpoints. The same frozen model serves both sides; it
is loaded once per dtype of :func:`~softprompt.bench.compare.bench_dtypes` (the one ``--dtype``
resolves to, and float32), and every dtype serves the same prompts:

* softprompt: one :class:`~softprompt.inference.Engine` (prompt KV cache on); every batch mixes
  the tasks, split only by text length into a few forwards (``length_bucket_speedup`` compares it
  with the same engine running each batch as one forward padded to its longest text);
* PEFT: one ``PeftModel`` holding every task as an adapter (``from_pretrained`` + ``load_adapter``
  of the same checkpoints); a batch is split by task, and for each group ``set_adapter`` then a
  forward pass over the right-padded group, reading the label words' logits from the full
  LM-head output at the last real position (``n + length - 1``).

Both sides start from the same texts (tokenization is timed on both sides), in the same batches.
Each side in each dtype first classifies every batch once untimed (every shape warmed up); then
the repeats cycle through all of them and the median is reported. Within each dtype, every
request's label must agree on all three (``predictions_agree``: identical in float32; in bf16 a
label may flip only on a near tie, see :data:`~softprompt.bench.compare.NEAR_TIE_PROBABILITY`;
``predictions_identical`` says whether none flipped) and the largest probability difference is
reported; across dtypes labels may legitimately differ on near ties, so only the fraction that
agrees is reported (``auto_vs_fp32_label_agreement``).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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
    NEAR_TIE_PROBABILITY,
    agreement,
    bench_dtypes,
    dtype_summary,
    time_workloads,
)
from softprompt.bench.options import InferBenchOptions

Batches = list[list[tuple[str, str]]]  # batches of (task, text) requests


class PeftClassifier:
    """PEFT's multi-adapter classification: one adapter per task, switched per task group."""

    def __init__(
        self, model: Any, tokenizer: Any, specs: list[TaskSpec], paths: dict[str, Path]
    ) -> None:
        from peft import PeftModel

        first, *rest = specs
        self.peft_model = PeftModel.from_pretrained(
            model, str(paths[first.name]), adapter_name=first.name
        )
        for spec in rest:
            self.peft_model.load_adapter(str(paths[spec.name]), adapter_name=spec.name)
        self.peft_model.eval()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.device = model.get_input_embeddings().weight.device
        self.specs = {spec.name: spec for spec in specs}
        self.label_ids = {}
        for spec in specs:
            ids = [
                tokenizer.encode(word, add_special_tokens=False)
                for word in spec.verbalizer.values()
            ]
            if any(len(item) != 1 for item in ids):
                raise ValueError(
                    f"task {spec.name}: the PEFT side reads single-token label words only"
                )
            self.label_ids[spec.name] = torch.tensor([item[0] for item in ids], device=self.device)

    @torch.no_grad()
    def classify(self, requests: list[tuple[str, str]]) -> list[dict[str, float]]:
        """Label probabilities of each ``(task, text)``, in the verbalizer's label order."""
        from softprompt.data import pad_batch

        results: list[dict[str, float]] = [{} for _ in requests]
        groups: dict[str, list[int]] = {}
        for slot, (task, _) in enumerate(requests):
            groups.setdefault(task, []).append(slot)
        for task, slots in groups.items():
            spec = self.specs[task]
            field = spec.template[spec.template.index("{") + 1 : spec.template.index("}")]
            sequences = [
                list(
                    self.tokenizer(spec.template.format(**{field: requests[slot][1]}))["input_ids"]
                )
                for slot in slots
            ]
            ids, mask = pad_batch(sequences, self.pad_id)  # right padding: [prompt, text, pad]
            self.peft_model.set_adapter(task)
            logits = self.peft_model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits
            last = spec.num_virtual_tokens + mask.sum(dim=1).to(self.device) - 1
            rows = torch.arange(len(slots), device=self.device)
            probabilities = (
                logits[rows, last][:, self.label_ids[task]].float().softmax(dim=-1).cpu()
            )
            labels = list(spec.verbalizer)
            for slot, row in zip(slots, probabilities, strict=True):
                results[slot] = {
                    label: float(value) for label, value in zip(labels, row, strict=True)
                }
        return results


def run_infer_bench(options: InferBenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the result object (see the module docstring)."""
    device = resolve_device(options.device)
    choice, dtypes = bench_dtypes(options.dtype, device)
    specs = task_specs(options.prompt_lengths)
    texts = benchmark_texts(options.requests)
    requests = [(specs[index % len(specs)].name, text) for index, text in enumerate(texts)]
    batches = [
        requests[start : start + options.batch_size]
        for start in range(0, len(requests), options.batch_size)
    ]
    models = {dtype: load_bench_model(options.model, device, dtype) for dtype in dtypes}
    with tempfile.TemporaryDirectory(prefix="softprompt-bench-") as directory:
        # The same float32 prompts serve every dtype, so that the dtypes' labels compare.
        paths = save_task_prompts(*models[FLOAT32], Path(directory), specs)
        built = {
            dtype: _sides(model, tokenizer, specs, paths, batches, options.compile)
            for dtype, (model, tokenizer) in models.items()
        }
    workloads = {dtype: sides for dtype, (sides, _) in built.items()}
    outputs, seconds, warmup = time_workloads(workloads, options.repeats, device)
    by_dtype = {
        dtype: _dtype_fields(
            outputs[dtype], seconds[dtype], warmup[dtype], built[dtype][1], len(requests), dtype
        )
        for dtype in dtypes
    }
    return {
        "bench": "infer",
        "model": options.model,
        "quick": options.quick,
        **device_facts(device),
        **choice.report_fields(),
        "options": dataclasses.asdict(options),
        "tasks": [dataclasses.asdict(spec) for spec in specs],
        "requests": len(requests),
        **dtype_summary(
            by_dtype,
            choice.dtype,
            "softprompt_requests_per_second",
            "predictions_agree",
            {"ratio": "peft_requests_per_second"},
        ),
        "auto_vs_fp32_label_agreement": agreement(
            _labels(outputs[choice.dtype]["softprompt"]), _labels(outputs[FLOAT32]["softprompt"])
        ),
        "softprompt_method": (
            "Engine.classify: mixed-task forwards split by text length, prompt KV cache on"
        ),
        "peft_method": "PeftModel with one adapter per task; set_adapter + forward per task group",
    }


def _sides(
    model: Any,
    tokenizer: Any,
    specs: list[TaskSpec],
    paths: dict[str, Path],
    batches: Batches,
    compile: bool = False,
) -> tuple[dict[str, Callable[[], list[dict[str, float]]]], dict[str, float]]:
    """The sides on one model, each a function classifying every batch: the Engine, PEFT, the
    same Engine without length buckets (every batch padded to its longest text), and with
    ``compile`` the Engine with a compiled body. Also the seconds each Engine took to build and
    load its tasks (a compiled one starts compiling there, computing the prompts' keys/values)."""
    from softprompt.inference import Engine

    build_seconds: dict[str, float] = {}

    def engine_with(name: str, **settings: Any) -> Engine:
        started = time.perf_counter()
        engine = Engine(model_and_tokenizer=(model, tokenizer), use_kv_cache=True, **settings)
        for spec in specs:
            engine.add_task(spec.name, paths[spec.name])
        build_seconds[name] = time.perf_counter() - started
        return engine

    engine = engine_with("softprompt")
    engines = {"one_forward": engine_with("one_forward", bucket_overhead_tokens=10**9)}
    if compile:
        engines["compiled"] = engine_with("compiled", compile=True)
    peft_side = PeftClassifier(model, tokenizer, specs, paths)

    def run_engine(runner: Engine = engine) -> list[dict[str, float]]:
        return [result.probabilities for batch in batches for result in runner.classify(batch)]

    def run_peft() -> list[dict[str, float]]:
        return [probabilities for batch in batches for probabilities in peft_side.classify(batch)]

    sides = {
        "softprompt": run_engine,
        "peft": run_peft,
        **{name: functools.partial(run_engine, other) for name, other in engines.items()},
    }
    return sides, build_seconds


def _labels(probabilities: list[dict[str, float]]) -> list[str]:
    return [max(row, key=row.get) for row in probabilities]


def _dtype_fields(
    outputs: dict[str, list[dict[str, float]]],
    seconds: dict[str, list[float]],
    warmup: dict[str, float],
    build_seconds: dict[str, float],
    requests: int,
    dtype: str,
) -> dict[str, Any]:
    """One dtype's figures; its labels must agree on every side (same dtype only)."""
    ours = _labels(outputs["softprompt"])
    sides = [name for name in outputs if name != "softprompt"]
    others = [_labels(outputs[name]) for name in sides]
    mismatches = [  # the label must agree with PEFT's and with the other engines'
        slot for slot, label in enumerate(ours) if any(other[slot] != label for other in others)
    ]
    probabilities = outputs["softprompt"]
    near_ties = dtype != FLOAT32 and all(
        abs(probabilities[slot][ours[slot]] - probabilities[slot][other[slot]])
        < NEAR_TIE_PROBABILITY
        for slot in mismatches
        for other in others
    )
    difference = max(
        abs(a[label] - b[label])
        for name in sides
        for a, b in zip(outputs["softprompt"], outputs[name], strict=True)
        for label in a
    )
    speed = {name: requests / median(values) for name, values in seconds.items()}
    compiled = {}
    if "compiled" in speed:
        # Compiling happens in the first forwards: loading the tasks (their keys/values) and the
        # untimed first pass. Its cost is what those took beyond the eager engine's.
        extra_build = build_seconds["compiled"] - build_seconds["softprompt"]
        extra_first_pass = warmup["compiled"] - median(seconds["compiled"])
        compiled = {
            "compiled_requests_per_second": speed["compiled"],
            "compiled_speedup": ratio(speed["compiled"], speed["softprompt"]),
            "compile_seconds": max(0.0, extra_build) + max(0.0, extra_first_pass),
        }
    return {
        "softprompt_requests_per_second": speed["softprompt"],
        "peft_requests_per_second": speed["peft"],
        "ratio": ratio(speed["softprompt"], speed["peft"]),
        "softprompt_one_forward_requests_per_second": speed["one_forward"],
        "length_bucket_speedup": ratio(speed["softprompt"], speed["one_forward"]),
        "softprompt_seconds": seconds["softprompt"],
        "peft_seconds": seconds["peft"],
        "predictions_identical": not mismatches,
        "predictions_agree": not mismatches or near_ties,
        "mismatched_requests": mismatches,
        "max_probability_difference": difference,
        **compiled,
    }


def format_infer(result: dict[str, Any]) -> list[str]:
    """The result as a short text report: requests/s of each side, one column per dtype."""
    dtype, blocks = result["dtype"], result["by_dtype"]
    rows = (
        ("softprompt Engine", "softprompt_requests_per_second"),
        ("PEFT adapters", "peft_requests_per_second"),
        ("Engine, one forward", "softprompt_one_forward_requests_per_second"),
    )
    lines = [
        f"bench infer: {result['model']} on {result['device']} ({result['device_name']}), "
        f"{result['requests']} requests over {len(result['tasks'])} tasks, "
        f"batch {result['options']['batch_size']}"
        + (" [QUICK: not a result]" if result["quick"] else ""),
        f"dtype {dtype}: {result['dtype_reason']}",
        f"{'requests/s':<20}" + "".join(f"{name:>12}" for name in blocks),
    ]
    for label, field in rows:
        lines.append(
            f"{label:<20}" + "".join(f"{format_number(b[field]):>12}" for b in blocks.values())
        )
    lines.append(
        f"ratio softprompt {dtype} / PEFT float32 (each one's default): "
        f"{format_number(result['ratio'])}x; same dtype ({dtype}): "
        f"{format_number(result['same_dtype_ratio'])}x; softprompt {dtype} / float32: "
        f"{format_number(result['auto_vs_fp32'])}x; length buckets x"
        f"{format_number(blocks[dtype]['length_bucket_speedup'])} ({dtype})"
    )
    for name, block in blocks.items():
        if "compiled_speedup" in block:
            lines.append(
                f"compiled Engine {name}: {format_number(block['compiled_requests_per_second'])} "
                f"requests/s, x{format_number(block['compiled_speedup'])} eager, compiling took "
                f"{format_number(block['compile_seconds'], 0)} s"
            )
        lines.append(
            f"{name}: predictions identical on all sides: {block['predictions_identical']} "
            f"(max probability difference {block['max_probability_difference']:.2e})"
        )
    lines.append(
        f"labels {dtype} vs float32 (softprompt): "
        f"{format_number(100 * result['auto_vs_fp32_label_agreement'], 1)}% agree"
    )
    return lines
