"""Profile a training step and an Engine batch, fp32 against bf16: where the time goes.

    python benchmarks/profile_step.py [--model smollm2-135m] [--top 15] [--steps 3]

For each dtype it times a few training steps (batch 8, 20-token prompt, Rotten Tomatoes) and
one mixed-task Engine batch of 32 requests, then prints the profiler's top operators by self
CPU time, so what is not matmul work shows up.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from softprompt.data import Verbalizer, default_template, length_grouped_batches, load_dataset
from softprompt.fastpath.frozen import FrozenModel
from softprompt.models import load_model
from softprompt.training.objectives import ClassificationObjective


def training_step(args: argparse.Namespace, dtype: str) -> None:
    model, tokenizer = load_model(args.model, dtype=dtype)
    frozen = FrozenModel(model.eval().requires_grad_(False), tokenizer)
    splits = load_dataset("rotten_tomatoes")
    verbalizer = Verbalizer.default_for(splits.labels).tokenize(tokenizer)
    objective = ClassificationObjective(
        tokenizer, default_template("rotten_tomatoes"), verbalizer, "label", 256
    )
    data = objective.encode(splits.train[:400])
    batches = length_grouped_batches(objective.lengths(data), 8, seed=0)
    prompt = (frozen.embed(torch.arange(20)).float() * 1.0).detach().requires_grad_(True)

    def step(batch: list[int]) -> None:
        objective.loss(frozen, prompt, data, batch).backward()

    for batch in batches[:2]:
        step(batch)  # warm-up
    started = time.perf_counter()
    for batch in batches[2 : 2 + args.steps]:
        step(batch)
    seconds = (time.perf_counter() - started) / args.steps
    print(f"\n== train step, {dtype}: {seconds * 1000:.0f} ms/step, {8 / seconds:.2f} examples/s")
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for batch in batches[2 : 2 + args.steps]:
            step(batch)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in args.dtypes.split(","):
        training_step(args, dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
