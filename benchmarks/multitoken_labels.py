"""Multi-token label words: memory and speed of `softprompt train` against single-token words.

Eight labels whose words are several tokens each (``" crude oil"``, ``" money-fx"``, ...) used to
copy every text once per label. Now the text runs once and only the label continuations run
behind its keys/values. This script runs ``softprompt train`` twice on the same long texts
(Rotten Tomatoes snippets joined to about 256 tokens, 8 balanced labels), once with multi-token
label words and once with single-token ones, each in its own process, and reports peak RSS
and training examples/s of each and their ratio.

    python benchmarks/multitoken_labels.py [--steps 10] [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LABELS = ["earn", "acq", "money-fx", "grain", "crude", "trade", "interest", "ship"]
MULTI_TOKEN = {
    "earn": " earnings report", "acq": " acquisition deal", "money-fx": " money-fx",
    "grain": " grain markets", "crude": " crude oil", "trade": " trade balance",
    "interest": " interest rates", "ship": " shipping lanes",
}
SINGLE_TOKEN = {
    "earn": " profit", "acq": " merger", "money-fx": " currency", "grain": " wheat",
    "crude": " oil", "trade": " export", "interest": " rates", "ship": " shipping",
}
SNIPPETS_PER_TEXT = 11  # Rotten Tomatoes snippets average about 25 SmolLM2 tokens


def write_dataset(directory: Path, rows_per_split: dict[str, int]) -> Path:
    """A folder of ``train/validation/test.csv`` (``text,label``): long texts of joined
    snippets, labels in rotation."""
    from softprompt.data import load_dataset

    snippets = [record["text"] for record in load_dataset("rotten_tomatoes").train]
    folder = directory / "long-8-labels"
    folder.mkdir()
    position = 0
    for split, count in rows_per_split.items():
        with (folder / f"{split}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for index in range(count):
                text = " ".join(snippets[position : position + SNIPPETS_PER_TEXT])
                position += SNIPPETS_PER_TEXT
                writer.writerow([text, LABELS[index % len(LABELS)]])
    return folder


def check_words(model: str) -> dict[str, list[int]]:
    """Token counts of each verbalizer's words (the single-token set must be single)."""
    from softprompt.models import load_model

    _, tokenizer = load_model(model)
    counts = {
        name: [len(tokenizer.encode(word, add_special_tokens=False)) for word in words.values()]
        for name, words in (("multi", MULTI_TOKEN), ("single", SINGLE_TOKEN))
    }
    if any(count != 1 for count in counts["single"]) or min(counts["multi"]) < 2:
        raise SystemExit(f"word token counts are not as intended: {counts}")
    return counts


def run_train(data: Path, words: dict[str, str], output: Path, args: argparse.Namespace) -> dict:
    """One ``softprompt train`` process; its peak RSS from ``wait4``."""
    command = [
        sys.executable, "-m", "softprompt", "train", "--model", args.model, "--dataset", str(data),
        "--verbalizer", json.dumps(words), "--template", "Article: {text}\nTopic:",
        "--init-text", "Classify the article's topic:", "--max-length", "256",
        "--batch-size", str(args.batch_size), "--steps", str(args.steps),
        "--eval-every", str(args.steps), "--max-eval-examples", str(args.eval_examples),
        "--max-validation-examples", str(args.eval_examples), "--no-baselines",
        "--dtype", args.dtype, "--output-dir", str(output),
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"train failed ({status}): {' '.join(command)}")
    report = json.loads((output / "report.json").read_text())
    return {
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "train_examples_per_second": report["train_examples_per_second"],
        "test_accuracy": report["test_accuracy"],
        "wall_seconds": time.perf_counter() - started,
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/results/multitoken-labels-smollm2-135m-cpu.json")
    args = parser.parse_args()
    counts = check_words(args.model)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        data = write_dataset(Path(root), {"train": 400, "validation": 64, "test": 64})
        for name, words in (("multi_token", MULTI_TOKEN), ("single_token", SINGLE_TOKEN)):
            results[name] = run_train(data, words, Path(root) / name, args)
            print(name, json.dumps(results[name]), flush=True)
    result = {
        "command": "python " + " ".join(sys.argv),
        "cpu_model": cpu_model(),
        "model": args.model,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "steps": args.steps,
        "word_tokens": counts,
        **results,
        "multi_vs_single_examples_per_second": results["single_token"]["train_examples_per_second"]
        / results["multi_token"]["train_examples_per_second"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
