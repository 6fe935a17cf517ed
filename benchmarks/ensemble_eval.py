"""Scores of prompts served by the Engine, alone and as one ensemble task.

Each prompt directory becomes an Engine task, and all of them together one ensemble task (Lester
et al. 2021, sec. 7); every task answers the same split in the same mixed batches. Classifiers
are scored by accuracy (the ensemble averages the members' label probabilities); generation
prompts by chrF and BLEU of their greedy outputs, cut as ``softprompt eval`` cuts them (the
ensemble's rows share each chosen token, picked from the members' averaged next-token
probabilities). The checkpoints must share a base model and dataset (the ensemble's template and
verbalizer are each member's own).

    python benchmarks/ensemble_eval.py prompts/a/prompt prompts/b/prompt runs/c/prompt
    python benchmarks/ensemble_eval.py --ensemble-only prompts/x/prompt prompts/y/prompt
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+", help="prompt checkpoint directories")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-examples", type=int)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="examples per Engine call (each example is one request per task)")
    parser.add_argument("--ensemble-only", action="store_true",
                        help="score the ensemble task alone (the members' own scores are known)")
    parser.add_argument("--output", type=Path, help="JSON result file")
    args = parser.parse_args(argv)

    from softprompt.core.checkpoint import load_prompt
    from softprompt.data import load_dataset
    from softprompt.inference import Engine
    from softprompt.models.precision import read_cpuinfo

    metadata = load_prompt(args.prompts[0]).metadata
    generation = metadata.get("task") == "generation"
    splits = load_dataset(
        metadata["dataset"],
        text_column=metadata.get("text_column") or "text",
        label_column=None if generation else metadata.get("label_column") or "label",
        target_column=metadata.get("target_column") if generation else None,
        direction=metadata.get("direction"),
    )
    records = splits.split(args.split)[: args.max_examples]
    engine = Engine(metadata["base_model"])
    tasks = {} if args.ensemble_only else {f"member{i}": path for i, path in enumerate(args.prompts)}
    tasks["ensemble"] = "ensemble"
    for name, path in tasks.items():
        engine.add_task(name, list(args.prompts) if name == "ensemble" else path)
    answer = _generate if generation else _classify
    scores = answer(engine, list(tasks), records, splits, metadata, args.batch_size, args.split)
    report = {
        "prompts": args.prompts,
        "split": args.split,
        "examples": len(records),
        ("scores" if generation else "accuracy"): {
            path: scores[name] for name, path in tasks.items()
        },
        "dtype": str(engine.frozen.dtype).removeprefix("torch."),
        "cpu_model": read_cpuinfo().model,
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def _batches(records: list, tasks: list[str], size: int, description: str) -> Iterator[list[tuple]]:
    """The ``(task, record)`` pairs of each batch of ``size`` records, every task mixed in."""
    for start in tqdm(range(0, len(records), size), desc=description):
        yield [(task, record) for record in records[start : start + size] for task in tasks]


def _classify(engine: Any, tasks: list[str], records: list, splits: Any, metadata: dict,
              batch_size: int, split: str) -> dict[str, float]:
    """Accuracy of each task."""
    text_column, label_column = metadata["text_column"], metadata["label_column"]
    correct = dict.fromkeys(tasks, 0)
    for requests in _batches(records, tasks, batch_size, split):
        results = engine.classify([(task, record[text_column]) for task, record in requests], truncate=True)
        for (task, record), result in zip(requests, results, strict=True):
            correct[task] += result.label == record[label_column]
    return {task: correct[task] / len(records) for task in tasks}


def _generate(engine: Any, tasks: list[str], records: list, splits: Any, metadata: dict,
              batch_size: int, split: str) -> dict[str, dict]:
    """chrF, BLEU and exact match of each task's greedy outputs (per group too)."""
    from softprompt.evaluation.evaluate import DEFAULT_MAX_TARGET_LENGTH
    from softprompt.evaluation.generation import default_stop, finish_text, generation_metrics
    from softprompt.inference import GenerateParams

    target = splits.target_column
    stop = metadata.get("stop")
    if stop is None:
        stop = default_stop(record[target] for record in splits.train + records)
    params = GenerateParams(max_new_tokens=metadata.get("max_target_length") or DEFAULT_MAX_TARGET_LENGTH)
    outputs: dict[str, list[str]] = {task: [] for task in tasks}
    for requests in _batches(records, tasks, batch_size, split):
        results = engine.generate(
            [(task, record[splits.text_column], params) for task, record in requests], truncate=True
        )
        for (task, _), result in zip(requests, results, strict=True):
            outputs[task].append(finish_text(result.text, stop))
    references = [record[target] for record in records]
    groups = [record[splits.group_column] for record in records] if splits.group_column else None
    return {
        task: generation_metrics(outputs[task], references, splits.target_language, groups)
        for task in tasks
    }


if __name__ == "__main__":
    sys.exit(main())
