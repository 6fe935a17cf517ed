"""Test accuracy of prompts served by the Engine, alone and as one ensemble task.

Each prompt directory becomes an Engine task, and all of them together one ensemble task (Lester
et al. 2021, sec. 7: the members' label probabilities averaged); every task classifies the same
split in the same mixed batches. The checkpoints must share a base model and labels (the
ensemble's template and verbalizer are each member's own).

    python benchmarks/ensemble_eval.py prompts/a/prompt prompts/b/prompt runs/c/prompt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+", help="prompt checkpoint directories")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-examples", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, help="JSON result file")
    args = parser.parse_args(argv)

    from softprompt.core.checkpoint import load_prompt
    from softprompt.data import load_dataset
    from softprompt.inference import Engine
    from softprompt.models.precision import read_cpuinfo

    metadata = load_prompt(args.prompts[0]).metadata
    splits = load_dataset(metadata["dataset"])
    records = splits.split(args.split)[: args.max_examples]
    engine = Engine(metadata["base_model"])
    names = [f"member{index}" for index in range(len(args.prompts))]
    for name, path in zip(names, args.prompts, strict=True):
        engine.add_task(name, path)
    engine.add_task("ensemble", list(args.prompts))
    tasks = [*names, "ensemble"]
    correct = dict.fromkeys(tasks, 0)
    text_column, label_column = metadata["text_column"], metadata["label_column"]
    for start in tqdm(range(0, len(records), args.batch_size), desc=args.split):
        batch = records[start : start + args.batch_size]
        requests = [(task, record[text_column]) for record in batch for task in tasks]
        results = engine.classify(requests, truncate=True)
        for (task, _), result, record in zip(
            requests, results, [r for r in batch for _ in tasks], strict=True
        ):
            correct[task] += result.label == record[label_column]
    report = {
        "prompts": args.prompts,
        "split": args.split,
        "examples": len(records),
        "accuracy": {
            (path if task != "ensemble" else "ensemble"): correct[task] / len(records)
            for task, path in zip(tasks, [*args.prompts, "ensemble"], strict=True)
        },
        "dtype": str(engine.frozen.dtype).removeprefix("torch."),
        "cpu_model": read_cpuinfo().model,
    }
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
