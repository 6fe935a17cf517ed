"""`evaluate_prompt()`: the ``softprompt eval`` command and its Python API.

Scores a tuned prompt, or a baseline without one (zero-shot instruction, optionally in the
model's chat template; few-shot in-context examples), on a dataset split. Classification reports
accuracy, macro-F1, per-label precision/recall and the confusion matrix; generation reports
chrF, BLEU and exact match of greedy outputs, overall and per group (HSK level), computed by
:mod:`softprompt.evaluation.generation` like training's. A checkpoint remembers how it was
trained (dataset, columns, template, verbalizer, input length limit: its ``softprompt.json``), so
``--prompt DIR`` alone reproduces training's setting; any of them can be overridden. Inputs are
encoded and cut exactly as the Engine and the server do (:mod:`softprompt.data.encoding`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from softprompt.core.checkpoint import atomic_write_json, atomic_write_text, load_prompt
from softprompt.data import (
    SPLITS,
    DatasetSplits,
    Record,
    Template,
    Verbalizer,
    default_instruction,
    default_template,
    load_dataset,
    resolve_verbalizer,
)
from softprompt.data.encoding import InputEncoding, input_limit, keeps_start, text_field_of
from softprompt.data.hsk import HSK_NAME
from softprompt.evaluation.classification import (
    classification_metrics,
    encode_classification,
    few_shot_context,
    score_split,
)
from softprompt.evaluation.generation import (
    chat_template,
    default_stop,
    few_shot_pairs_context,
    generate_texts,
    generation_metrics,
)
from softprompt.evaluation.options import EvalOptions

if TYPE_CHECKING:
    from softprompt.fastpath.frozen import FrozenModel

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATASET = "rotten_tomatoes"
DEFAULT_MAX_TARGET_LENGTH = 64


def evaluate_prompt(
    options: EvalOptions | None = None,
    *,
    loaded_models: dict[tuple[str, str, str], FrozenModel] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate a prompt checkpoint or a baseline on one split.

    Args:
        options: what to evaluate; or give its fields as keyword arguments.
        loaded_models: frozen base models already loaded, by (model, dtype, device); the one this
            evaluation needs is taken from here, or loaded and added. Pass one dict to several
            calls (a greedy soup's trials) to load each base model once.
        **overrides: fields applied on top of ``options``.

    Returns:
        Metrics (classification: accuracy, per_label, confusion_matrix, examples; generation:
        chrf, bleu, exact_match, per_group, examples) and what was evaluated; also written to
        ``options.output`` (default ``<prompt>/../eval-<split>.json`` for a prompt).

    Raises:
        ValueError: bad options, or a checkpoint/dataset that does not fit them.
    """
    options = _resolve(options, overrides)
    checkpoint = load_prompt(options.prompt) if options.prompt else None
    setting = _setting(
        options, checkpoint.metadata if checkpoint else {}, checkpoint.base_model if checkpoint else None
    )
    generation = setting["task"] == "generation"
    splits = load_dataset(
        setting["dataset"],
        text_column=setting["text_column"],
        label_column=None if generation else setting["label_column"],
        target_column=setting["target_column"] if generation else None,
        direction=setting["direction"],
    )
    if generation and not splits.target_column:
        raise ValueError(
            f"dataset {setting['dataset']!r}: a generation evaluation needs --target-column"
        )
    words = None
    if not generation:
        verbalizer = resolve_verbalizer(options.verbalizer, splits.labels or [], setting["verbalizer"])
        words = [verbalizer.words(label)[0].strip() for label in verbalizer.labels]
    if setting["instruction"] is None:  # "" is no instruction; None is the dataset's default
        setting["instruction"] = default_instruction(setting["dataset"], words, setting["direction"])
    template = Template(setting["template"])
    records = splits.split(options.split)
    records = records[: options.max_examples] if options.max_examples else records

    from softprompt.core.prefix import servable_prompt
    from softprompt.fastpath.prompt_kv import check_prompt
    from softprompt.models.precision import resolve_dtype

    dtype = resolve_dtype(options.dtype, options.device)
    key = (setting["model"], dtype.dtype, str(options.device))
    loaded_models = {} if loaded_models is None else loaded_models
    if key not in loaded_models:
        loaded_models[key] = _load_frozen(*key)
    frozen = loaded_models[key]
    tokenizer = frozen.tokenizer
    prompt = None
    if checkpoint is not None:
        prompt = servable_prompt(checkpoint).to(frozen.device)
        check_prompt(frozen, prompt, str(options.prompt), checkpoint.config.base_model_name_or_path)
    what = {
        "prompt": str(options.prompt) if options.prompt else None,
        "baseline": options.baseline,
        "shots": options.shots if options.baseline == "few-shot" else None,
        "instruction": setting["instruction"] if options.baseline else None,
        "split": options.split,
        **{key: setting[key] for key in ("model", "dataset", "template", "max_length")},
        **dtype.report_fields(),
    }
    if generation:
        result = _evaluate_generation(options, setting, splits, records, frozen, prompt)
        return _write({**what, **result}, options)  # result: the template in effect
    tokenized = verbalizer.tokenize(tokenizer)
    context = _baseline_context(options, setting, splits.train, template, verbalizer)
    limit = input_limit(
        setting["max_length"], frozen.max_positions, 0 if prompt is None else prompt.shape[0],
        tokenized.continuation_room,
    )
    encoding = InputEncoding(
        tokenizer, template, text_field_of(template, setting["text_column"]), limit, context
    )
    encoded = encode_classification(records, encoding, tokenized.labels, setting["label_column"])
    scores = score_split(
        frozen, prompt, encoded.sequences, tokenized, options.batch_size,
        description=f"eval {options.split}",
    )
    result = classification_metrics(scores, encoded.targets, tokenized.labels)
    if options.predictions:
        _write_predictions(options.predictions, records, scores, encoded.targets, tokenized.labels)
        result["predictions"] = str(options.predictions)
    result.update(what)
    return _write(result, options)


def _evaluate_generation(
    options: EvalOptions,
    setting: dict[str, Any],
    splits: DatasetSplits,
    records: list[Record],
    frozen: Any,
    prompt: Any,
) -> dict[str, Any]:
    """Greedy outputs of ``records`` behind the prompt (or a baseline's context), scored."""
    template = Template(setting["template"])
    context = ""
    if options.baseline == "zero-shot" and options.chat_template:
        template = chat_template(frozen.tokenizer, setting["instruction"], setting["text_column"])
    elif options.baseline == "zero-shot":
        context = setting["instruction"] + "\n"
    elif options.baseline == "few-shot":
        context = few_shot_pairs_context(
            splits.train, template, splits.target_column, options.shots, options.seed,
            setting["instruction"],
        )
    limit = input_limit(
        setting["max_length"], frozen.max_positions, 0 if prompt is None else prompt.shape[0]
    )
    encoding = InputEncoding(
        frozen.tokenizer, template, text_field_of(template, setting["text_column"]), limit,
        context, keep_start=keeps_start("generation"),
    )
    references = [record[splits.target_column] for record in records]
    stop = setting["stop"]
    if stop is None:
        stop = default_stop(record[splits.target_column] for record in splits.train + records)
    hypotheses = generate_texts(
        frozen, prompt, encoding.encode(records), setting["max_target_length"], options.batch_size,
        stop, description=f"eval {options.split}",
    )
    groups = [record[splits.group_column] for record in records] if splits.group_column else None
    result = generation_metrics(hypotheses, references, splits.target_language, groups)
    if options.predictions:
        lines = [
            json.dumps({"record": record, "reference": reference, "prediction": hypothesis},
                       ensure_ascii=False)
            for record, reference, hypothesis in zip(records, references, hypotheses, strict=True)
        ]
        atomic_write_text(options.predictions, "".join(line + "\n" for line in lines))
        result["predictions"] = str(options.predictions)
    result.update({
        "task": "generation",
        "direction": splits.direction,
        "group_column": splits.group_column,
        "chat_template": options.chat_template,
        "stop": list(stop),
        "max_target_length": setting["max_target_length"],
        "template": template.format,
    })
    return result


def _load_frozen(model: str, dtype: str, device: str) -> FrozenModel:
    """The base model ``model`` in ``dtype`` on ``device``, frozen and in eval mode."""
    from softprompt.fastpath.frozen import FrozenModel
    from softprompt.models import load_model

    base, tokenizer = load_model(model, dtype=dtype, device=device)
    return FrozenModel(base.eval().requires_grad_(False), tokenizer)


def _resolve(options: EvalOptions | None, overrides: dict[str, Any]) -> EvalOptions:
    """The options, checked for what a checkpoint cannot fill in."""
    options = EvalOptions(**overrides) if options is None else dataclasses.replace(options, **overrides)
    if options.prompt is None and options.baseline is None:
        raise ValueError("give --prompt DIR, or --baseline zero-shot|few-shot")
    if options.split not in SPLITS:
        raise ValueError(f"split={options.split!r} is not valid; allowed: {', '.join(SPLITS)}")
    return options


def _setting(
    options: EvalOptions, metadata: dict[str, Any], base_model: str | None = None
) -> dict[str, Any]:
    """Each dataset setting: the option if given, else the checkpoint's, else the default
    (``base_model``: the model the checkpoint names, :attr:`PromptCheckpoint.base_model`)."""

    def pick(name: str, default: Any = None) -> Any:
        value = getattr(options, name)
        return value if value is not None else metadata.get(name, default)

    dataset = pick("dataset", DEFAULT_DATASET)
    task = options.task_type or metadata.get("task") or (
        "generation" if dataset == HSK_NAME else "classification"
    )
    text_column = pick("text_column", "text")
    direction = pick("direction")
    return {
        "task": task,
        "model": options.model or base_model or DEFAULT_MODEL,
        "dataset": dataset,
        "text_column": text_column,
        "label_column": pick("label_column", "label"),
        "target_column": pick("target_column"),
        "direction": direction,
        "template": pick("template") or default_template(dataset, text_column, direction).format,
        "verbalizer": metadata.get("verbalizer"),
        "max_length": pick("max_length"),
        "max_target_length": pick("max_target_length", DEFAULT_MAX_TARGET_LENGTH),
        "stop": metadata.get("stop"),
        "instruction": options.instruction,  # None: resolved once the labels are known
    }


def _baseline_context(
    options: EvalOptions, setting: dict[str, Any], train: list, template: Template,
    verbalizer: Verbalizer,
) -> str:
    """The text before every example: the instruction (zero-shot), examples (few-shot), or none."""
    if options.chat_template:
        raise ValueError("--chat-template is for generation datasets; this one is classification")
    if options.baseline == "zero-shot":
        return setting["instruction"] + "\n"
    if options.baseline == "few-shot":
        words = {label: verbalizer.words(label)[0] for label in verbalizer.labels}
        return few_shot_context(
            train, template, words, setting["label_column"], options.shots, options.seed,
            setting["instruction"],
        )
    return ""


def _write_predictions(
    path: str | Path, records: list, scores: Any, targets: list[int], labels: list[str]
) -> None:
    """One JSON line per example: its record, gold label, predicted label and probabilities."""
    probabilities = scores.softmax(dim=-1).tolist()
    lines = []
    for record, gold, row in zip(records, targets, probabilities, strict=True):
        best = max(range(len(labels)), key=row.__getitem__)
        lines.append(json.dumps({
            "record": record, "gold": labels[gold], "label": labels[best],
            "probabilities": dict(zip(labels, row, strict=True)),
        }, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _write(result: dict[str, Any], options: EvalOptions) -> dict[str, Any]:
    output = options.output
    if output is None and options.prompt is not None:
        output = Path(options.prompt).parent / f"eval-{options.split}.json"
    if output is not None:
        atomic_write_json(output, result)
        result["output"] = str(output)
    return result


def format_metrics(result: dict[str, Any]) -> str:
    """Accuracy, macro-F1, per-label table and confusion matrix as text; chrF/BLEU per group for
    generation."""
    what = result["prompt"] or f"baseline {result['baseline']}" + (f" (K={result['shots']})" if result.get("shots") else "")
    if result.get("chat_template"):
        what += " (chat template)"
    title = f"{what} on {result['dataset']}/{result['split']} ({result['examples']} examples, model {result['model']})"
    if result.get("task") == "generation":
        return _format_generation(title, result)
    lines = [
        title,
        f"accuracy: {result['accuracy']:.4f}  macro-F1: {result['macro_f1']:.4f}",
        f"{'label':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}",
    ]
    for label, values in result["per_label"].items():
        lines.append(
            f"{label:<16}{values['precision']:>10.4f}{values['recall']:>10.4f}{values['f1']:>10.4f}{values['support']:>9d}"
        )
    matrix = result["confusion_matrix"]
    lines.append("confusion matrix (rows gold, columns predicted): " + " ".join(matrix["labels"]))
    for label, row in zip(matrix["labels"], matrix["rows_gold_columns_predicted"], strict=True):
        lines.append(f"  {label:<14} " + " ".join(f"{value:>6d}" for value in row))
    return "\n".join(lines)



def _format_generation(title: str, result: dict[str, Any]) -> str:
    lines = [
        title + (f", direction {result['direction']}" if result.get("direction") else ""),
        f"chrF {result['chrf']:.2f}  BLEU {result['bleu']:.2f} (tokenize {result['bleu_tokenize']})"
        f"  exact match {result['exact_match']:.4f}",
    ]
    if result.get("per_group"):
        lines.append(f"{result['group_column'] or 'group':<12}{'chrF':>8}{'BLEU':>8}{'exact':>8}{'examples':>10}")
        for group, scores in result["per_group"].items():
            lines.append(
                f"{group:<12}{scores['chrf']:>8.2f}{scores['bleu']:>8.2f}"
                f"{scores['exact_match']:>8.3f}{scores['examples']:>10d}"
            )
    if result.get("predictions"):
        lines.append(f"predictions: {result['predictions']}")
    return "\n".join(lines)
