"""The ``softprompt`` command: thin wrappers over the same functions as the Python API.

``softprompt train``'s flags are generated from :class:`TrainOptions`, so the CLI, the Python
API and the saved ``options.json`` cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from softprompt.training.options import TrainOptions

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(function: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = function
        return function

    return register


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        help_text = item.metadata.get("help", "")
        if item.default is not dataclasses.MISSING:
            help_text += f" (default: {item.default})"
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
        base = next(arg for arg in args if arg is not type(None))
        if base is bool:
            parser.add_argument(_flag(item.name), dest=item.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(_flag(item.name), dest=item.name, type=base, default=argparse.SUPPRESS, help=help_text)


def _options_from(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    names = {item.name for item in dataclasses.fields(cls)}
    return {key: value for key, value in vars(args).items() if key in names}


@command("train")
def _train(args: argparse.Namespace) -> int:
    from softprompt.training import train

    result = train(**_options_from(args, TrainOptions))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone reports
        return 0
    report = result.report
    print(f"\nrun directory: {result.output_dir}")
    for key in ("zero_shot_accuracy", "init_accuracy", "test_accuracy", "best_validation_accuracy"):
        if key in report:
            print(f"  {key:<26} {report[key]:.4f}")
    print(f"  {'train_examples_per_second':<26} {report['train_examples_per_second']:.2f}")
    print(f"  {'wall_seconds':<26} {report['wall_seconds']:.1f}")
    print(f"  prompt checkpoint: {result.output_dir / 'prompt'}")
    return 0


@command("eval")
def _eval(args: argparse.Namespace) -> int:
    from softprompt.evaluation.evaluate import evaluate_prompt, format_metrics

    options = {key: value for key, value in vars(args).items() if key not in ("command", "verbose", "json")}
    result = evaluate_prompt(**options)
    print(json.dumps(result, indent=2) if args.json else format_metrics(result))
    return 0


@command("inspect")
def _inspect(args: argparse.Namespace) -> int:
    from softprompt.evaluation.inspection import format_inspection, inspect_prompt

    result = inspect_prompt(args.prompt_dir, model=args.model, top_k=args.top_k)
    print(json.dumps(result, indent=2) if args.json else format_inspection(result))
    return 0


@command("predict")
def _predict(args: argparse.Namespace) -> int:
    from softprompt.inference import Engine

    engine = Engine(args.model, device=args.device) if args.model else None
    if engine is None:
        from softprompt.core.checkpoint import load_prompt

        base_model = load_prompt(args.prompt).metadata.get("base_model") or "smollm2-135m"
        engine = Engine(base_model, device=args.device)
    engine.add_task("task", args.prompt)
    for text, result in zip(args.texts, engine.classify([("task", text) for text in args.texts]), strict=True):
        probabilities = ", ".join(f"{label} {value:.3f}" for label, value in result.probabilities.items())
        print(json.dumps({"text": text, "label": result.label, "probabilities": result.probabilities})
              if args.json else f"{result.label:<12} ({probabilities})  {text}")
    return 0


@command("serve")
def _serve(args: argparse.Namespace) -> int:
    from softprompt.server.run import serve

    tasks = {}
    for item in args.task or []:
        name, separator, path = item.partition("=")
        if not separator or not name or not path:
            raise ValueError(f"--task {item!r}: expected NAME=PROMPT_DIR")
        tasks[name] = path
    serve(
        args.model, tasks, prompts_dir=args.prompts_dir, host=args.host, port=args.port,
        admin_key=args.admin_key, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, request_timeout_s=args.request_timeout, device=args.device,
    )
    return 0


@command("models")
def _models(args: argparse.Namespace) -> int:
    from softprompt.models import format_models_table, list_bundled_models

    rows = list_bundled_models()
    print(json.dumps(rows, indent=2) if args.json else format_models_table(rows))
    return 0


@command("data")
def _data(args: argparse.Namespace) -> int:
    from softprompt.data import Template, preview_dataset

    tokenizer = None
    if args.model:
        from softprompt.models import load_model

        _, tokenizer = load_model(args.model)
    print(preview_dataset(
        args.name_or_path, tokenizer=tokenizer, template=Template(args.template) if args.template else None,
        n=args.examples, text_column=args.text_column, label_column=args.label_column,
    ))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the tests that check every ``--help``)."""
    parser = argparse.ArgumentParser(prog="softprompt", description="Soft prompt tuning for frozen transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="tune a soft prompt (defaults: SmolLM2-135M on Rotten Tomatoes)")
    _add_dataclass_flags(train, TrainOptions)

    evaluate = sub.add_parser("eval", help="evaluate a prompt or a zero-/few-shot baseline")
    evaluate.add_argument("--prompt", help="prompt checkpoint directory")
    evaluate.add_argument("--model", help="base model (default: from the checkpoint)")
    evaluate.add_argument("--dataset", help="dataset (default: from the checkpoint)")
    evaluate.add_argument("--split", default="test", help="train, validation or test (default: test)")
    evaluate.add_argument("--baseline", choices=["zero-shot", "few-shot"], help="evaluate without a soft prompt")
    evaluate.add_argument("--shots", type=int, default=4, help="few-shot examples in context (default: 4)")
    evaluate.add_argument("--template", help="template (default: from the checkpoint or dataset)")
    evaluate.add_argument("--verbalizer", help="verbalizer (default: from the checkpoint or labels)")
    evaluate.add_argument("--max-examples", type=int, dest="max_examples", help="cap on examples")
    evaluate.add_argument("--batch-size", type=int, default=16, dest="batch_size")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--output", help="JSON result path")
    evaluate.add_argument("--json", action="store_true", help="print JSON")

    inspect = sub.add_parser("inspect", help="show a prompt's init, drift and nearest tokens")
    inspect.add_argument("prompt_dir")
    inspect.add_argument("--model", help="base model (default: from the checkpoint)")
    inspect.add_argument("--top-k", type=int, default=5, dest="top_k")
    inspect.add_argument("--json", action="store_true")

    predict = sub.add_parser("predict", help="classify texts with a prompt")
    predict.add_argument("--prompt", required=True, help="prompt checkpoint directory")
    predict.add_argument("--model", help="base model (default: from the checkpoint)")
    predict.add_argument("--device", default="cpu")
    predict.add_argument("--json", action="store_true")
    predict.add_argument("texts", nargs="+")

    serve = sub.add_parser("serve", help="serve many task prompts over HTTP on one frozen model")
    serve.add_argument("--model", default="smollm2-135m")
    serve.add_argument("--task", action="append", help="NAME=PROMPT_DIR (repeatable)")
    serve.add_argument("--prompts-dir", dest="prompts_dir", help="directory runtime task loads may read from")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--admin-key", dest="admin_key", help="key for POST/DELETE /v1/tasks (or SOFTPROMPT_ADMIN_KEY)")
    serve.add_argument("--max-batch-size", type=int, default=32, dest="max_batch_size")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, dest="max_wait_ms")
    serve.add_argument("--max-queue", type=int, default=256, dest="max_queue")
    serve.add_argument("--request-timeout", type=float, default=30.0, dest="request_timeout")
    serve.add_argument("--device", default="cpu")

    models = sub.add_parser("models", help="list the bundled models")
    models.add_argument("--json", action="store_true")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    preview = data_sub.add_parser("preview", help="split sizes, label counts and rendered examples")
    preview.add_argument("name_or_path")
    preview.add_argument("--model", help="count tokens with this model's tokenizer")
    preview.add_argument("--template")
    preview.add_argument("--examples", type=int, default=3)
    preview.add_argument("--text-column", default="text", dest="text_column")
    preview.add_argument("--label-column", default="label", dest="label_column")

    from softprompt.bench import add_bench_parser

    add_bench_parser(sub, command)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"softprompt {args.command}: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from softprompt.training import TrainingDivergedError

        if not isinstance(error, TrainingDivergedError):
            raise
        # A diverged run is not a usage error: its message says where the best prompt is.
        print(f"softprompt {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
