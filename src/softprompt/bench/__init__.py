"""Benchmarks side by side with PEFT: ``softprompt bench train | infer | generate``.

* ``train``: softprompt's training fast path vs PEFT prompt tuning (:mod:`.train_bench`);
* ``infer``: mixed-task classification, softprompt's Engine vs PEFT adapters (:mod:`.infer_bench`);
* ``generate``: generation with vs without the prompt KV cache (:mod:`.generate_bench`).

Each prints a text report, or one JSON object with ``--json``; ``--save`` also writes it to
``benchmarks/results/<bench>-<model>-<device>.json`` (``-quick`` added for ``--quick`` runs,
whose figures are smoke-test output, never results). The benchmark modules (and PEFT) are
imported only when a benchmark runs, so building the CLI's parser stays cheap.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]

__all__ = ["add_bench_arguments", "add_bench_parser", "main", "run_bench"]


def _common(parser: argparse.ArgumentParser, batch_help: str) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="smollm2-135m (default), gemma3-270m, any load_model name, or 'tiny' (smoke tests)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--batch-size", type=int, dest="batch_size", help=batch_help)
    parser.add_argument(
        "--repeats", type=int, help="timed repeats per side, alternating (median reported)"
    )
    parser.add_argument("--seed", type=int, help="seed of data order and prompt init (default 0)")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny settings (~1 min on 2 cores); not a result"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--save", action="store_true", help="also write the JSON into --results-dir"
    )
    parser.add_argument(
        "--results-dir",
        default="benchmarks/results",
        dest="results_dir",
        help="where --save writes (default: benchmarks/results)",
    )


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train``, ``infer`` and ``generate`` sub-commands to ``parser``."""
    sub = parser.add_subparsers(
        dest="bench_command", required=True, metavar="{train,infer,generate}"
    )
    train = sub.add_parser(
        "train", help="training throughput, memory and accuracy vs PEFT prompt tuning"
    )
    _common(train, "examples per step (default 8; quick 4)")
    train.add_argument(
        "--steps", type=int, help="timed optimizer steps per repeat (default 20; quick 2)"
    )
    train.add_argument(
        "--num-virtual-tokens",
        type=int,
        dest="num_virtual_tokens",
        help="prompt length (default 20; quick 8)",
    )
    train.add_argument("--lr", type=float, help="AdamW learning rate for both sides (default 0.01)")
    train.add_argument(
        "--init", help="prompt init copied to both sides: TEXT (default), SAMPLE_VOCAB, ..."
    )
    train.add_argument(
        "--eval-examples",
        type=int,
        dest="eval_examples",
        help="validation examples scored after training (default 200; quick 16)",
    )
    train.add_argument(
        "--no-levers",
        action="store_false",
        dest="levers",
        default=None,
        help="skip the per-lever runs (shared prefix / length grouping on and off)",
    )
    train.add_argument(
        "--no-memory",
        action="store_false",
        dest="memory",
        default=None,
        help="skip the per-variant memory worker processes",
    )

    infer = sub.add_parser("infer", help="mixed-task classification: Engine vs PEFT adapters")
    _common(infer, "requests per batch (default 32; quick 8)")
    infer.add_argument("--requests", type=int, help="requests per repeat (default 256; quick 24)")
    infer.add_argument(
        "--prompt-lengths",
        dest="prompt_lengths",
        help="comma-separated prompt length of each task (default 10,20,50; quick 4,8,12)",
    )

    generate = sub.add_parser("generate", help="generation with vs without the prompt KV cache")
    _common(generate, "requests per batch (default 8; quick 4)")
    generate.add_argument("--requests", type=int, help="requests per repeat (default 16; quick 4)")
    generate.add_argument(
        "--max-new-tokens",
        type=int,
        dest="max_new_tokens",
        help="greedy tokens per request (default 32; quick 8)",
    )
    generate.add_argument(
        "--prompt-lengths",
        dest="prompt_lengths",
        help="comma-separated prompt length of each task (default 10,20,50; quick 4,8,12)",
    )


def add_bench_parser(
    subparsers: Any, command: Callable[[str], Callable[[Handler], Handler]]
) -> None:
    """Register ``softprompt bench`` on the CLI's sub-parsers.

    Args:
        subparsers: the CLI's ``add_subparsers()`` object.
        command: the CLI's registration decorator: ``command(name)(fn)``.
    """
    parser = subparsers.add_parser(
        "bench", help="benchmarks side by side with PEFT (train, infer, generate)"
    )
    add_bench_arguments(parser)
    command("bench")(run_bench)


def _parse_lengths(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--prompt-lengths {text!r}: expected comma-separated integers") from None
    if len(lengths) < 1 or min(lengths) < 1:
        raise ValueError(f"--prompt-lengths {text!r}: expected positive integers")
    return lengths


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark named by ``args.bench_command``; 0 on success, 1 when a check failed."""
    import torch

    from softprompt.bench.common import TINY_MODEL, emit, result_path

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.model == TINY_MODEL:
        torch.set_num_threads(1)  # a tiny model only pays for thread synchronisation
    try:
        options, result, checks_passed, lines = _run(args)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (e.g. a test session) is kept
    save_to = None
    if args.save:
        device = result["device"]
        lengths = getattr(options, "prompt_lengths", None)
        default_lengths = getattr(type(options).resolve(options.quick), "prompt_lengths", None)
        variant = (  # non-default prompt lengths get their own file
            "prompts-" + "-".join(map(str, lengths)) if lengths != default_lengths else ""
        )
        save_to = result_path(
            args.results_dir, args.bench_command, options.model, device, options.quick, variant
        )
    emit(result, args.json, lines, save_to)
    if not checks_passed:
        print(
            f"softprompt bench {args.bench_command}: CHECK FAILED: outputs differ (see the report)",
            file=sys.stderr,
        )
        return 1
    return 0


def _run(args: argparse.Namespace) -> tuple[Any, dict[str, Any], bool, list[str]]:
    """Options, result, whether its identity checks passed, and its text report."""
    common = {
        "model": args.model,
        "device": args.device,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    if args.bench_command == "train":
        from softprompt.bench.train_bench import TrainBenchOptions, format_train, run_train_bench

        options = TrainBenchOptions.resolve(
            args.quick,
            **common,
            steps=args.steps,
            num_virtual_tokens=args.num_virtual_tokens,
            lr=args.lr,
            init=args.init,
            eval_examples=args.eval_examples,
            levers=args.levers,
            memory=args.memory,
        )
        result = run_train_bench(options)
        return options, result, bool(result["same_function"]), format_train(result)
    if args.bench_command == "infer":
        from softprompt.bench.infer_bench import InferBenchOptions, format_infer, run_infer_bench

        options = InferBenchOptions.resolve(
            args.quick,
            **common,
            requests=args.requests,
            prompt_lengths=_parse_lengths(args.prompt_lengths),
        )
        result = run_infer_bench(options)
        return options, result, bool(result["predictions_identical"]), format_infer(result)
    from softprompt.bench.generate_bench import (
        GenerateBenchOptions,
        format_generate,
        run_generate_bench,
    )

    options = GenerateBenchOptions.resolve(
        args.quick,
        **common,
        requests=args.requests,
        max_new_tokens=args.max_new_tokens,
        prompt_lengths=_parse_lengths(args.prompt_lengths),
    )
    result = run_generate_bench(options)
    return options, result, bool(result["outputs_identical"]), format_generate(result)


def main(argv: list[str] | None = None) -> int:
    """``python -m softprompt.bench {train,infer,generate} ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m softprompt.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return run_bench(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"softprompt bench: error: {error}", file=sys.stderr)
        return 2
