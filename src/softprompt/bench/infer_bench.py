"""`softprompt bench infer`: mixed-task classification, softprompt's Engine against PEFT.

Three or more tasks (random SAMPLE_VOCAB prompts of different lengths, each with its own
template and verbalizer) are saved as checkpoints. The same frozen model (loaded once) serves:

* softprompt: one :class:`~softprompt.inference.Engine` (prompt KV cache on); every batch mixes
  the tasks, split only by text length into a few forwards (``length_bucket_speedup`` compares it
  with the same engine running each batch as one forward padded to its longest text);
* PEFT: one ``PeftModel`` holding every task as an adapter (``from_pretrained`` + ``load_adapter``
  of the same checkpoints); a batch is split by task, and for each group ``set_adapter`` then a
  forward pass over the right-padded group, reading the label words' logits from the full
  LM-head output at the last real position (``n + length - 1``).

Both sides start from the same texts (tokenization is timed on both sides), in the same batches.
Repeats cycle Engine, PEFT, one-forward Engine after one warm-up batch each; the median is
reported. Every request's label must be identical on all three (``predictions_identical``) and
the largest probability difference is reported.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
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
    timed,
)
from softprompt.bench.options import InferBenchOptions

logger = logging.getLogger(__name__)


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
    from softprompt.inference import Engine

    device = resolve_device(options.device)
    model, tokenizer, dtype = load_bench_model(options.model, device, options.dtype)
    specs = task_specs(options.prompt_lengths)
    texts = benchmark_texts(options.requests)
    requests = [(specs[index % len(specs)].name, text) for index, text in enumerate(texts)]
    batches = [
        requests[start : start + options.batch_size]
        for start in range(0, len(requests), options.batch_size)
    ]
    with tempfile.TemporaryDirectory(prefix="softprompt-bench-") as directory:
        paths = save_task_prompts(model, tokenizer, Path(directory), specs)
        engine = Engine(model_and_tokenizer=(model, tokenizer), use_kv_cache=True)
        # The same engine without length buckets: every batch padded to its longest text.
        one_forward = Engine(
            model_and_tokenizer=(model, tokenizer), use_kv_cache=True, bucket_overhead_tokens=10**9
        )
        for spec in specs:
            engine.add_task(spec.name, paths[spec.name])
            one_forward.add_task(spec.name, paths[spec.name])
        peft_side = PeftClassifier(model, tokenizer, specs, paths)

    def run_engine(runner: Engine = engine) -> list[dict[str, float]]:
        return [result.probabilities for batch in batches for result in runner.classify(batch)]

    def run_one_forward() -> list[dict[str, float]]:
        return run_engine(one_forward)

    def run_peft() -> list[dict[str, float]]:
        return [probabilities for batch in batches for probabilities in peft_side.classify(batch)]

    for warm_up in (engine.classify, peft_side.classify, one_forward.classify):
        warm_up(batches[0])
    seconds: dict[str, list[float]] = {"softprompt": [], "peft": [], "one_forward": []}
    outputs: dict[str, list[dict[str, float]]] = {}
    runs = (("softprompt", run_engine), ("peft", run_peft), ("one_forward", run_one_forward))
    for index in range(options.repeats):
        for name, run in runs:
            outputs[name], took = timed(run, device)
            seconds[name].append(took)
            logger.info("repeat %d %-10s %.2f s", index + 1, name, took)
    ours = outputs["softprompt"]
    others = list(zip(outputs["peft"], outputs["one_forward"], strict=True))
    mismatches = [  # the label must agree with PEFT's and with the one-forward engine's
        slot
        for slot, (a, pair) in enumerate(zip(ours, others, strict=True))
        if any(max(a, key=a.get) != max(b, key=b.get) for b in pair)
    ]
    difference = max(
        abs(a[label] - b[label])
        for a, pair in zip(ours, others, strict=True)
        for b in pair
        for label in a
    )
    speed = {name: len(requests) / median(values) for name, values in seconds.items()}
    return {
        "bench": "infer",
        "model": options.model,
        "quick": options.quick,
        **device_facts(device),
        **dtype.report_fields(),
        "options": dataclasses.asdict(options),
        "tasks": [dataclasses.asdict(spec) for spec in specs],
        "requests": len(requests),
        "softprompt_requests_per_second": speed["softprompt"],
        "peft_requests_per_second": speed["peft"],
        "ratio": ratio(speed["softprompt"], speed["peft"]),
        "softprompt_one_forward_requests_per_second": speed["one_forward"],
        "length_bucket_speedup": ratio(speed["softprompt"], speed["one_forward"]),
        "softprompt_seconds": seconds["softprompt"],
        "peft_seconds": seconds["peft"],
        "predictions_identical": not mismatches,
        "mismatched_requests": mismatches,
        "max_probability_difference": difference,
        "softprompt_method": (
            "Engine.classify: mixed-task forwards split by text length, prompt KV cache on"
        ),
        "peft_method": "PeftModel with one adapter per task; set_adapter + forward per task group",
    }


def format_infer(result: dict[str, Any]) -> list[str]:
    """The result as a short text report."""
    return [
        f"bench infer: {result['model']} on {result['device']} ({result['device_name']}), "
        f"{result['requests']} requests over {len(result['tasks'])} tasks, "
        f"batch {result['options']['batch_size']}"
        + (" [QUICK: not a result]" if result["quick"] else ""),
        f"softprompt Engine  "
        f"{format_number(result['softprompt_requests_per_second']):>10} requests/s",
        f"PEFT adapters      {format_number(result['peft_requests_per_second']):>10} requests/s",
        f"Engine, one forward per batch (no length buckets) "
        f"{format_number(result['softprompt_one_forward_requests_per_second'])} requests/s; "
        f"buckets x{format_number(result['length_bucket_speedup'])}",
        f"ratio {format_number(result['ratio'])}x; "
        f"predictions identical: {result['predictions_identical']} "
        f"(max probability difference {result['max_probability_difference']:.2e})",
    ]
