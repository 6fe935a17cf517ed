"""Evaluation: metrics, few-shot contexts, and `evaluate_prompt` on the tiny setup."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from softprompt.core.config import PromptTuningConfig
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.data import Template, load_dataset
from softprompt.evaluation.classification import classification_metrics, few_shot_context
from softprompt.evaluation.evaluate import evaluate_prompt, format_metrics
from softprompt.models import load_model

LABELS = ["positive", "negative"]
WORDS = {"positive": " positive", "negative": " negative"}
TEMPLATE = "Review: {text}\nSentiment:"


# ------------------------------------------------------------------ metrics
def test_classification_metrics_on_a_hand_made_case():
    labels = ["a", "b", "c"]
    # gold:      a  a  a  b  b  c  c  c
    # predicted: a  a  b  b  a  b  b  a   (c is never predicted)
    targets = [0, 0, 0, 1, 1, 2, 2, 2]
    predicted = [0, 0, 1, 1, 0, 1, 1, 0]
    scores = torch.full((8, 3), -1.0)
    scores[torch.arange(8), torch.tensor(predicted)] = 2.0
    metrics = classification_metrics(scores, targets, labels)
    assert metrics["confusion_matrix"] == {
        "labels": labels,
        "rows_gold_columns_predicted": [[2, 1, 0], [1, 1, 0], [1, 2, 0]],
    }
    assert metrics["accuracy"] == pytest.approx(3 / 8)
    assert metrics["examples"] == 8
    a, b, c = (metrics["per_label"][label] for label in labels)
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 4), pytest.approx(2 / 3), 3)
    assert a["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert (b["precision"], b["recall"], b["support"]) == (pytest.approx(1 / 4), pytest.approx(1 / 2), 2)
    assert b["f1"] == pytest.approx(2 * (1 / 4) * (1 / 2) / (1 / 4 + 1 / 2))
    assert c == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}


def test_macro_f1_weighs_every_class_alike():
    # gold rows, predicted columns: a [3 1 0], b [1 2 1], c [0 0 2]; d is never gold or predicted
    confusion = [[3, 1, 0, 0], [1, 2, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
    targets, predicted = [], []
    for gold, row in enumerate(confusion):
        for guess, count in enumerate(row):
            targets += [gold] * count
            predicted += [guess] * count
    scores = torch.nn.functional.one_hot(torch.tensor(predicted), 4).float()
    # F1: a 3/4 (P 3/4, R 3/4), b 4/7 (P 2/3, R 1/2), c 4/5 (P 2/3, R 1), d 0
    metrics = classification_metrics(scores, targets, ["a", "b", "c", "d"])
    assert metrics["macro_f1"] == pytest.approx((3 / 4 + 4 / 7 + 4 / 5) / 4, abs=1e-12)
    three = classification_metrics(scores[:, :3], targets, ["a", "b", "c"])
    assert three["macro_f1"] == pytest.approx(297 / 420, abs=1e-12)  # accuracy would say 7/10
    assert three["accuracy"] == pytest.approx(7 / 10)
    result = {**three, "prompt": None, "baseline": "zero-shot", "shots": None, "dataset": "d",
              "split": "test", "model": "m"}
    assert "accuracy: 0.7000  macro-F1: 0.7071" in format_metrics(result)


def test_classification_metrics_perfect_and_empty():
    perfect = classification_metrics(torch.eye(2), [0, 1], ["x", "y"])
    assert perfect["accuracy"] == 1.0
    assert all(values["f1"] == 1.0 for values in perfect["per_label"].values())
    empty = classification_metrics(torch.zeros(0, 2), [], ["x", "y"])
    assert empty["accuracy"] == 0.0 and empty["examples"] == 0 and empty["macro_f1"] == 0.0
    assert perfect["macro_f1"] == 1.0


# ------------------------------------------------------------------ few-shot context
def _train_records():
    # 12 positive, 3 negative: an unbalanced pool.
    positives = [{"text": f"good thing {i}", "label": "positive"} for i in range(12)]
    negatives = [{"text": f"bad thing {i}", "label": "negative"} for i in range(3)]
    return positives + negatives


def _shots(context: str) -> list[str]:
    return [part for part in context.split("\n\n") if part.startswith("Review:")]


@pytest.mark.parametrize("shots", [4, 6])
def test_few_shot_context_is_balanced(shots):
    context = few_shot_context(_train_records(), Template(TEMPLATE), WORDS, "label", shots, seed=3)
    examples = _shots(context)
    assert len(examples) == shots
    counts = Counter("positive" if part.endswith(" positive") else "negative" for part in examples)
    assert counts == {"positive": shots // 2, "negative": shots // 2}
    # Each shot is a rendered record followed by its label word.
    for part in examples:
        text = part.split("\n")[0].removeprefix("Review: ")
        label = "positive" if text.startswith("good") else "negative"
        assert part == f"Review: {text}\nSentiment:{WORDS[label]}"
    assert context.endswith("\n\n")


def test_few_shot_context_is_deterministic_and_keeps_the_instruction():
    records = _train_records()
    first = few_shot_context(records, Template(TEMPLATE), WORDS, "label", 4, seed=7, instruction="Classify:")
    again = few_shot_context(list(records), Template(TEMPLATE), WORDS, "label", 4, seed=7, instruction="Classify:")
    assert first == again
    assert first.startswith("Classify:\n\n")
    others = {few_shot_context(records, Template(TEMPLATE), WORDS, "label", 4, seed=seed) for seed in range(8)}
    assert len(others) > 1  # the seed picks the examples


# ------------------------------------------------------------------ evaluate_prompt
def _save_prompt(tiny, directory, seed=4):
    base, tokenizer = load_model(str(tiny.model))
    model = PromptTunedModel(base, PromptTuningConfig(num_virtual_tokens=3, seed=seed))
    model.save_pretrained(directory, {
        "base_model": str(tiny.model), "dataset": str(tiny.data), "template": TEMPLATE, "verbalizer": WORDS,
    })
    return directory


def _expected_metrics(tiny, prompt_dir=None, context=""):
    """Predictions made by hand: one full forward per test record, label logits at the end."""
    base, tokenizer = load_model(str(tiny.model))
    model = PromptTunedModel.from_pretrained(base, prompt_dir) if prompt_dir else None
    word_ids = [tokenizer.encode(WORDS[label], add_special_tokens=False)[0] for label in LABELS]
    records = load_dataset(str(tiny.data)).test
    confusion = [[0, 0], [0, 0]]
    with torch.no_grad():
        for record in records:
            ids = torch.tensor([tokenizer(context + Template(TEMPLATE).render(record))["input_ids"]])
            logits = (model(input_ids=ids) if model else base(input_ids=ids)).logits[0, -1, word_ids]
            confusion[LABELS.index(record["label"])][int(logits.argmax())] += 1
    return confusion, len(records)


def test_evaluate_prompt_directory_uses_its_metadata_and_writes_json(tiny, tmp_path):
    prompt_dir = _save_prompt(tiny, tmp_path / "run" / "prompt")
    result = evaluate_prompt(prompt=prompt_dir, batch_size=3)
    confusion, count = _expected_metrics(tiny, prompt_dir)
    assert all(sum(column) for column in zip(*confusion, strict=True))  # both labels predicted: a telling case
    assert result["confusion_matrix"] == {"labels": LABELS, "rows_gold_columns_predicted": confusion}
    assert result["examples"] == count
    assert result["accuracy"] == pytest.approx((confusion[0][0] + confusion[1][1]) / count)
    assert (result["model"], result["dataset"], result["template"]) == (str(tiny.model), str(tiny.data), TEMPLATE)
    written = tmp_path / "run" / "eval-test.json"  # next to the prompt directory
    assert result["output"] == str(written)
    on_disk = json.loads(written.read_text())
    assert on_disk == {key: value for key, value in result.items() if key != "output"}
    assert "accuracy:" in format_metrics(result)


# (instruction, seed) picked so that the random tiny model predicts both labels.
@pytest.mark.parametrize(("baseline", "instruction", "seed"), [("zero-shot", "classify :", 0), ("few-shot", "", 2)])
def test_evaluate_prompt_baselines(tiny, tmp_path, baseline, instruction, seed):
    output = tmp_path / f"{baseline}.json"
    result = evaluate_prompt(
        baseline=baseline, model=str(tiny.model), dataset=str(tiny.data), template=TEMPLATE,
        verbalizer=json.dumps(WORDS), instruction=instruction, shots=2, seed=seed, output=output,
    )
    assert json.loads(output.read_text())["accuracy"] == result["accuracy"]
    assert result["baseline"] == baseline and result["prompt"] is None
    assert result["shots"] == (2 if baseline == "few-shot" else None)
    if baseline == "zero-shot":
        context = instruction + "\n"
    else:
        splits = load_dataset(str(tiny.data))
        context = few_shot_context(splits.train, Template(TEMPLATE), WORDS, "label", 2, seed, instruction)
        assert len(_shots(context)) == 2
    confusion, count = _expected_metrics(tiny, context=context)
    assert all(sum(column) for column in zip(*confusion, strict=True))  # both labels predicted: a telling case
    assert result["confusion_matrix"]["rows_gold_columns_predicted"] == confusion
    assert result["examples"] == count


def test_evaluate_prompt_rejects_bad_requests(tiny):
    with pytest.raises(ValueError, match="--prompt DIR, or --baseline"):
        evaluate_prompt(model=str(tiny.model), dataset=str(tiny.data))
    with pytest.raises(ValueError, match="baseline='one-shot' is not valid"):
        evaluate_prompt(baseline="one-shot", model=str(tiny.model), dataset=str(tiny.data))
    with pytest.raises(ValueError, match="split='dev' is not valid"):
        evaluate_prompt(baseline="zero-shot", split="dev", model=str(tiny.model), dataset=str(tiny.data))


# ------------------------------------------------------------------ a checkpoint remembers
def _renamed_rows(tiny) -> list[dict[str, str]]:
    return [
        {"review": row["text"], "sentiment": row["label"]}
        for row in map(json.loads, tiny.data.read_text().splitlines())
    ]


def test_prompt_trained_with_a_column_mapping_evaluates_with_prompt_alone(tiny, tmp_path, write_jsonl):
    from softprompt.training import train

    data = write_jsonl(tmp_path / "renamed.jsonl", _renamed_rows(tiny))
    options = tiny.options(
        tmp_path / "run", dataset=str(data), text_column="review", label_column="sentiment",
        template="Review: {review}\nSentiment:", steps=2, eval_every=2, max_eval_examples=None,
        baselines=False,
    )
    report = train(**options).report
    result = evaluate_prompt(prompt=tmp_path / "run" / "prompt")
    assert result["dataset"] == str(data) and result["examples"] == report["test_examples"]
    assert result["accuracy"] == pytest.approx(report["test_accuracy"])


def test_long_texts_eval_engine_and_server_agree(tiny, tmp_path, write_jsonl):
    """Texts of 1,000+ tokens, cut to the trained limit the same way by eval, Engine and server."""
    from fastapi.testclient import TestClient

    from softprompt.inference import Engine
    from softprompt.server.app import create_app
    from softprompt.training import train

    rows = []
    for index, row in enumerate(map(json.loads, tiny.data.read_text().splitlines())):
        filler = " ".join(["the plot and the acting"] * (200 + index))  # 1,000+ words (tokens)
        rows.append({"text": f"{row['text']} . {filler}" if index % 2 else f"{filler} {row['text']}",
                     "label": row["label"]})
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    train(**tiny.options(tmp_path / "run", dataset=str(data), max_length=48, steps=2, eval_every=2,
                         baselines=False))
    prompt_dir = tmp_path / "run" / "prompt"
    predictions = tmp_path / "predictions.jsonl"
    evaluate_prompt(prompt=prompt_dir, predictions=str(predictions), batch_size=5)
    expected = [json.loads(line) for line in predictions.read_text().splitlines()]
    texts = [item["record"]["text"] for item in expected]
    assert min(len(text.split()) for text in texts) > 1000
    engine = Engine(str(tiny.model))
    engine.add_task("long", prompt_dir)
    served = engine.classify([("long", text) for text in texts], truncate=True)
    with TestClient(create_app(engine)) as client:
        response = client.post("/v1/classify", json={"task": "long", "inputs": texts, "truncate": True})
    assert response.status_code == 200, response.text
    over_http = response.json()["results"]
    for item, local, remote in zip(expected, served, over_http, strict=True):
        assert item["label"] == local.label == remote["label"]
        for label, probability in item["probabilities"].items():
            assert local.probabilities[label] == pytest.approx(probability, abs=1e-5)
            assert remote["probabilities"][label] == pytest.approx(probability, abs=1e-5)
    # A telling case: the inputs differ after the cut, and so do their probabilities.
    assert len({round(item["probabilities"]["positive"], 6) for item in expected}) > 2
