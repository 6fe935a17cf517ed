"""Peak memory and speed of training with and without ``--gradient-checkpointing``.

Each variant trains a few steps of one large batch in a fresh process (a process's peak RSS
covers everything it ever held, so variants cannot share one), twice, one variant after the
other; run it on an otherwise idle machine. Results are appended to a JSON-lines file, one
record per run, with the processor and thread count (default:
``benchmarks/results/gradient-checkpointing-<model>.jsonl``; the AMD EPYC figures of the README
are in ``results/amd-epyc/``).

    python benchmarks/recompute_memory.py --model smollm2-135m --batch-size 32 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).parent / "results"

# name -> train() options of the variant
VARIANTS: dict[str, dict[str, Any]] = {
    "prompt-fast-path": {},
    "prompt-one-forward": {"shared_prefix": False},
    "prompt-fast-path-checkpointed": {"gradient_checkpointing": True},
    "prompt-one-forward-checkpointed": {"shared_prefix": False, "gradient_checkpointing": True},
    "deep-prompt": {"method": "prefix"},
    "deep-prompt-checkpointed": {"method": "prefix", "gradient_checkpointing": True},
}


def run_variant(name: str, model: str, batch_size: int, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps of the variant in this process; its peak RSS and speed."""
    from softprompt.bench.common import peak_rss_mb
    from softprompt.models.precision import read_cpuinfo
    from softprompt.training import train

    with tempfile.TemporaryDirectory() as output:
        run = train(model=model, steps=steps, eval_every=steps, batch_size=batch_size,
                    max_eval_examples=batch_size, max_validation_examples=batch_size,
                    baselines=False, seed=0, output_dir=output, **VARIANTS[name])
    return {
        "name": name,
        **VARIANTS[name],
        "model": model,
        "batch_size": batch_size,
        "steps": steps,
        "peak_rss_mib": peak_rss_mb(),
        "train_examples_per_second": run.report["train_examples_per_second"],
        "cpu_model": read_cpuinfo().model,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    parser.add_argument("--results", type=Path, help="JSON-lines file to append to")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.model, args.batch_size, args.steps)))
        return
    results = args.results or RESULTS_DIR / f"gradient-checkpointing-{args.model}.jsonl"
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    for repeat in range(args.repeats):
        for name in names:
            command = [sys.executable, __file__, "--worker", name, "--model", args.model,
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            record = {**json.loads(output.strip().splitlines()[-1]), "repeat": repeat}
            print(f"{name}: {record['peak_rss_mib']:,.0f} MiB, "
                  f"{record['train_examples_per_second']:.1f} examples/s", flush=True)
            with results.open("a") as file:
                file.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
