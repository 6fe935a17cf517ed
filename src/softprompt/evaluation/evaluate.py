"""`evaluate_prompt()`: the ``softprompt eval`` command and its Python API.

Scores a tuned prompt, or a baseline without one (zero-shot instruction, few-shot in-context
examples), on a dataset split, and reports accuracy, per-label precision/recall and the
confusion matrix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from softprompt.core.checkpoint import atomic_write_json, load_prompt
from softprompt.core.config import PromptTuningConfig
from softprompt.data import (
    SPLITS,
    Template,
    Verbalizer,
    default_template,
    load_dataset,
    parse_verbalizer,
)
from softprompt.evaluation.classification import (
    classification_metrics,
    encode_classification,
    few_shot_context,
    score_encoded,
)
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.training.options import DEFAULT_INIT_TEXT

logger = logging.getLogger(__name__)
BASELINES = ("zero-shot", "few-shot")


def evaluate_prompt(
    prompt: str | Path | None = None,
    *,
    model: str | None = None,
    dataset: str | None = None,
    split: str = "test",
    baseline: str | None = None,
    shots: int = 4,
    instruction: str = DEFAULT_INIT_TEXT,
    template: str | None = None,
    verbalizer: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    max_examples: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
    output: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a prompt checkpoint or a baseline on one split.

    Args:
        prompt: checkpoint directory; template, verbalizer, model and dataset default to its metadata.
        baseline: ``zero-shot`` (instruction, no prompt) or ``few-shot`` (``shots`` examples in context).
        output: where to write the JSON result (default: ``<prompt>/../eval-<split>.json`` for a prompt).

    Returns:
        Metrics: accuracy, per_label, confusion_matrix, plus what was evaluated.
    """
    from softprompt.models import load_model

    if prompt is None and baseline is None:
        raise ValueError("give --prompt DIR, or --baseline zero-shot|few-shot")
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r} is not valid; allowed: {', '.join(BASELINES)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; allowed: {', '.join(SPLITS)}")
    metadata: dict[str, Any] = {}
    checkpoint = None
    if prompt is not None:
        checkpoint = load_prompt(prompt)
        metadata = checkpoint.metadata
    model = model or metadata.get("base_model") or "smollm2-135m"
    dataset = dataset or metadata.get("dataset") or "rotten_tomatoes"
    splits = load_dataset(dataset, text_column=text_column, label_column=label_column)
    records = splits.split(split)[:max_examples] if max_examples else splits.split(split)
    template_obj = Template(template or metadata.get("template") or default_template(dataset, text_column).format)
    if verbalizer:
        verbalizer_obj = parse_verbalizer(verbalizer)
    elif metadata.get("verbalizer"):
        verbalizer_obj = Verbalizer(metadata["verbalizer"])
    else:
        verbalizer_obj = Verbalizer.default_for(splits.labels or [])
    verbalizer_obj.check_labels(splits.labels or [])
    base, tokenizer = load_model(model, dtype="float32", device=device)
    tokenized = verbalizer_obj.tokenize(tokenizer)
    if checkpoint is not None:
        prompted = PromptTunedModel.from_pretrained(base, prompt)
    else:
        config = PromptTuningConfig(num_virtual_tokens=1, seed=seed)
        prompted = PromptTunedModel(base, config)
    context = ""
    if baseline == "zero-shot":
        context = instruction + "\n"
    elif baseline == "few-shot":
        words = {label: verbalizer_obj.words(label)[0] for label in verbalizer_obj.labels}
        context = few_shot_context(splits.train, template_obj, words, label_column, shots, seed, instruction)
    encoded = encode_classification(
        records, template_obj, tokenizer, tokenized.labels, label_column, max_length=2048, context=context
    )
    scores = score_encoded(
        prompted, encoded, tokenized, tokenizer.pad_token_id, batch_size,
        use_prompt=baseline is None, description=f"eval {split}",
    )
    result = classification_metrics(scores, encoded.targets, tokenized.labels)
    result.update({
        "prompt": str(prompt) if prompt else None,
        "baseline": baseline,
        "shots": shots if baseline == "few-shot" else None,
        "model": model,
        "dataset": dataset,
        "split": split,
        "template": template_obj.format,
    })
    if output is None and prompt is not None:
        output = Path(prompt).parent / f"eval-{split}.json"
    if output is not None:
        atomic_write_json(output, result)
        result["output"] = str(output)
    return result


def format_metrics(result: dict[str, Any]) -> str:
    """Accuracy, per-label table and confusion matrix as text."""
    what = result["prompt"] or f"baseline {result['baseline']}" + (f" (K={result['shots']})" if result.get("shots") else "")
    lines = [
        f"{what} on {result['dataset']}/{result['split']} ({result['examples']} examples, model {result['model']})",
        f"accuracy: {result['accuracy']:.4f}",
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
