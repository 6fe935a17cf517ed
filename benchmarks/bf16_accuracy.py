"""Does bf16 move accuracy? One trained prompt evaluated in fp32 and in bf16, and prompts trained
in each dtype, on the full Rotten Tomatoes test split.

    python benchmarks/bf16_accuracy.py --prompt runs/demo-fp32/prompt \
        [--trained-bf16 runs/demo-bf16/prompt] [--out benchmarks/results/bf16-accuracy-...json]

Reports each evaluation's accuracy, the fraction of test examples whose predicted label changes
between fp32 and bf16 evaluation, and the largest probability difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from softprompt.evaluation.evaluate import evaluate_prompt
from softprompt.models.precision import read_cpuinfo


def _evaluate(prompt: str, dtype: str, predictions: Path) -> tuple[dict, list[dict]]:
    result = evaluate_prompt(prompt=prompt, dtype=dtype, predictions=str(predictions), output=str(predictions.with_suffix(".json")))
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    return result, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", required=True, help="a prompt trained in fp32")
    parser.add_argument("--trained-bf16", help="the same run's prompt trained in bf16")
    parser.add_argument("--out", default="benchmarks/results/bf16-accuracy-smollm2-135m-cpu.json")
    args = parser.parse_args()
    report: dict = {"command": "python " + " ".join(sys.argv), "cpu_model": read_cpuinfo().model}
    with tempfile.TemporaryDirectory() as root:
        fp32, fp32_rows = _evaluate(args.prompt, "float32", Path(root) / "fp32.jsonl")
        bf16, bf16_rows = _evaluate(args.prompt, "bfloat16", Path(root) / "bf16.jsonl")
        changed = sum(a["label"] != b["label"] for a, b in zip(fp32_rows, bf16_rows, strict=True))
        largest = max(
            abs(a["probabilities"][label] - b["probabilities"][label])
            for a, b in zip(fp32_rows, bf16_rows, strict=True)
            for label in a["probabilities"]
        )
        report["same_prompt"] = {
            "prompt": args.prompt,
            "examples": fp32["examples"],
            "fp32_accuracy": fp32["accuracy"],
            "bf16_accuracy": bf16["accuracy"],
            "accuracy_difference_points": 100 * (bf16["accuracy"] - fp32["accuracy"]),
            "changed_predictions": changed,
            "changed_fraction": changed / len(fp32_rows),
            "max_probability_difference": largest,
        }
        if args.trained_bf16:
            trained, _ = _evaluate(args.trained_bf16, "bfloat16", Path(root) / "trained-bf16.jsonl")
            report["trained_in_bf16"] = {
                "prompt": args.trained_bf16,
                "bf16_accuracy": trained["accuracy"],
                "fp32_trained_fp32_accuracy": fp32["accuracy"],
                "difference_points": 100 * (trained["accuracy"] - fp32["accuracy"]),
            }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
