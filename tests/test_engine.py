"""Tests of `softprompt.inference.Engine` on tiny random models (plus one on SmolLM2-135M)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from softprompt.core.checkpoint import load_prompt, save_prompt
from softprompt.core.config import PromptTuningConfig
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.data.templates import Template
from softprompt.data.verbalizer import Verbalizer
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.scoring import label_scores
from softprompt.inference import (
    ClassifyResult,
    Engine,
    GenerateParams,
    GenerateResult,
    InputTooLongError,
    TaskLoadError,
    TaskNotFoundError,
)
from softprompt.inference import classify as classify_module
from softprompt.inference.tasks import encode_input
from softprompt.models.tiny import HIDDEN, tiny_gemma3, tiny_llama

MAX_POSITIONS = 64
SENTIMENT = {
    "template": "Review: {text}\nSentiment:",
    "verbalizer": {"positive": " positive", "negative": " negative"},
    "task": "classification",
}
TOPIC = {  # three labels, one of them multi-token
    "template": "Topic: {text}\nAnswer:",
    "verbalizer": {"sports": " sports", "politics": " politics", "film": " the movie"},
    "task": "classification",
}
GENERATION = {"template": "{text}", "task": "generation"}
TEXTS = ["the movie was great and fun", "a terrible boring film", "sports news", "fun"]


# ----------------------------------------------------------------------------- fixtures
def _tokenizer() -> PreTrainedTokenizerFast:
    words = "the movie was great and fun a terrible boring film positive negative sports politics"
    corpus = [words, "Review: Sentiment: Topic: Answer:"] * 5
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def tiny(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, Path]:
    """A tiny random Llama and its tokenizer, also saved so that `load_model(folder)` works."""
    tokenizer = _tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS, bos_token_id=1)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def _save(directory: Path, length: int, metadata: dict, seed: int, width: int = HIDDEN) -> Path:
    weights = torch.randn(length, width, generator=torch.Generator().manual_seed(seed)) * 0.5
    return save_prompt(
        directory, weights, PromptTuningConfig(num_virtual_tokens=length, token_dim=width), metadata
    )


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    return {
        "sentiment": _save(root / "sentiment", 5, SENTIMENT, 1),
        "sentiment2": _save(root / "sentiment2", 7, SENTIMENT, 11),
        "topic": _save(root / "topic", 9, TOPIC, 2),
        "gen": _save(root / "gen", 3, GENERATION, 3),
        "gen2": _save(root / "gen2", 6, GENERATION, 4),
    }


def _engine(
    tiny,
    prompts,
    use_kv_cache: bool = True,
    tasks: tuple[str, ...] | None = None,
    bucket_overhead_tokens: int | None = None,
) -> Engine:
    model, tokenizer, _ = tiny
    engine = Engine(
        model_and_tokenizer=(model, tokenizer),
        use_kv_cache=use_kv_cache,
        bucket_overhead_tokens=bucket_overhead_tokens,
    )
    for name in tasks if tasks is not None else ("sentiment", "topic", "gen", "gen2"):
        engine.add_task(name, prompts[name])
    return engine


def _mixed_requests() -> list[tuple[str, str]]:
    return [(task, text) for text in TEXTS for task in ("sentiment", "topic")]


def _assert_same(first: ClassifyResult, second: ClassifyResult, atol: float = 1e-5) -> None:
    assert first.task == second.task and list(first.probabilities) == list(second.probabilities)
    expected = torch.tensor(list(second.probabilities.values()))
    assert torch.allclose(torch.tensor(list(first.probabilities.values())), expected, atol=atol)


def _reference(tiny, prompt_dir: Path, text: str) -> torch.Tensor:
    """Label probabilities from the checkpoint scored alone, the prompt run in the input."""
    model, tokenizer, _ = tiny
    checkpoint = load_prompt(prompt_dir)
    verbalizer = Verbalizer(checkpoint.metadata["verbalizer"]).tokenize(tokenizer)
    ids = tokenizer(Template(checkpoint.metadata["template"]).render({"text": text}))["input_ids"]
    with torch.no_grad():
        scores = label_scores(FrozenModel(model, tokenizer), [ids], verbalizer, prompts=[checkpoint.weights])
    return scores.softmax(dim=-1)[0]


# ----------------------------------------------------------------------------- classification
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_single_task_matches_prompt_tuned_model(tiny, prompts, use_kv_cache):
    engine = _engine(tiny, prompts, use_kv_cache)
    for name in ("sentiment", "topic"):
        for text in TEXTS:
            (result,) = engine.classify([(name, text)])
            expected = _reference(tiny, prompts[name], text)
            assert torch.allclose(
                torch.tensor(list(result.probabilities.values())), expected, atol=1e-5
            )
            assert result.label == list(result.probabilities)[int(expected.argmax())]


@pytest.mark.parametrize("overhead", [0, 10**9], ids=["bucket-per-length", "one-forward"])
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_mixed_batch_equals_separate_runs(tiny, prompts, use_kv_cache, overhead):
    engine = _engine(tiny, prompts, use_kv_cache, bucket_overhead_tokens=overhead)
    requests = _mixed_requests()  # prompt lengths 5 and 9; 2 labels and 3 (one multi-token)
    mixed = engine.classify(requests)
    for request, result in zip(requests, mixed, strict=True):
        _assert_same(result, engine.classify([request])[0])
    assert [r.task for r in mixed] == [task for task, _ in requests]
    assert set(mixed[1].probabilities) == {"sports", "politics", "film"}


def test_length_buckets_do_not_change_results(tiny, prompts, monkeypatch):
    """Texts of many lengths: one forward per distinct length == one padded forward."""
    texts = ["good", *(" ".join(["the film was good"] * n) for n in (1, 2, 3, 4))]
    requests = [(task, text) for text in texts for task in ("sentiment", "topic")]
    split = _engine(tiny, prompts, bucket_overhead_tokens=0)
    forwards = []
    original = classify_module.bucket_scores
    monkeypatch.setattr(
        classify_module, "bucket_scores",
        lambda frozen, rows, cached: forwards.append(rows) or original(frozen, rows, cached),
    )
    bucketed = split.classify(requests)
    row_lengths = [{len(row.token_ids) for row in rows} for rows in forwards]
    assert all(len(lengths) == 1 for lengths in row_lengths)  # one length per forward
    assert len(forwards) == len(set.union(*row_lengths)) > len(texts) // 2
    forwards.clear()
    whole = _engine(tiny, prompts, bucket_overhead_tokens=10**9).classify(requests)
    assert len(forwards) == 1
    for first, second in zip(bucketed, whole, strict=True):
        _assert_same(first, second)
    with pytest.raises(ValueError, match="bucket_overhead_tokens"):
        _engine(tiny, prompts, bucket_overhead_tokens=-1)


def test_kv_cached_equals_uncached(tiny, prompts):
    cached = _engine(tiny, prompts, True).classify(_mixed_requests())
    uncached = _engine(tiny, prompts, False).classify(_mixed_requests())
    for first, second in zip(cached, uncached, strict=True):
        _assert_same(first, second)


def test_sliding_window_model_cached_equals_uncached(tiny, prompts):
    """Gemma 3 mixes sliding-window and full layers; a window shorter than the rows tests it."""
    _, tokenizer, _ = tiny
    model = tiny_gemma3(vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS, bos_token_id=1)
    engines = [
        Engine(model_and_tokenizer=(model, tokenizer), use_kv_cache=flag) for flag in (True, False)
    ]
    for engine in engines:
        engine.add_task("sentiment", prompts["sentiment"])
        engine.add_task("topic", prompts["topic"])
    requests = _mixed_requests()[:4]
    cached, uncached = (engine.classify(requests) for engine in engines)
    for request, first, second in zip(requests, cached, uncached, strict=True):
        _assert_same(first, second)
        _assert_same(first, engines[1].classify([request])[0])
    params = GenerateParams(max_new_tokens=6)
    requests = [("topic", TEXTS[0], params), ("sentiment", "fun", params)]
    mixed = engines[0].generate(requests)  # texts of different lengths side by side
    for request, result in zip(requests, mixed, strict=True):
        # Alone, a row has no padding: the uncached path is exact there.
        assert result.token_ids == engines[1].generate([request])[0].token_ids


def test_ensemble_averages_member_probabilities(tiny, prompts):
    engine = _engine(tiny, prompts, tasks=("sentiment",))
    info = engine.add_task("both", [prompts["sentiment"], prompts["sentiment2"]])
    assert info.num_virtual_tokens == [5, 7] and info.labels == ["positive", "negative"]
    engine.add_task("second", prompts["sentiment2"])
    for text in TEXTS:
        ensemble, first, second = engine.classify(
            [("both", text), ("sentiment", text), ("second", text)]
        )
        for label in ensemble.probabilities:
            mean = (first.probabilities[label] + second.probabilities[label]) / 2
            assert ensemble.probabilities[label] == pytest.approx(mean, abs=1e-5)
        assert ensemble.label == max(ensemble.probabilities, key=ensemble.probabilities.get)


def test_ensemble_members_must_share_labels(tiny, prompts):
    engine = _engine(tiny, prompts, tasks=())
    with pytest.raises(TaskLoadError, match="labels"):
        engine.add_task("bad", [prompts["sentiment"], prompts["topic"]])


# ----------------------------------------------------------------------------- errors
def test_errors_stay_in_their_slots(tiny, prompts):
    engine = _engine(tiny, prompts)
    long_text = "the movie was great and fun " * 20
    requests = [
        ("sentiment", "fun"),
        ("nope", "fun"),
        ("topic", long_text),
        ("topic", "sports news"),
    ]
    results = engine.classify_batch(requests)
    assert isinstance(results[1], TaskNotFoundError) and isinstance(results[1], KeyError)
    assert "nope" in str(results[1]) and "sentiment" in str(results[1])
    assert isinstance(results[2], InputTooLongError) and isinstance(results[2], ValueError)
    assert str(results[2].limit) in str(results[2]) and str(results[2].length) in str(results[2])
    _assert_same(results[0], engine.classify([requests[0]])[0])
    _assert_same(results[3], engine.classify([requests[3]])[0])
    with pytest.raises(TaskNotFoundError):
        engine.classify(requests)
    generated = engine.generate_batch(
        [("gen", "fun", GenerateParams()), ("nope", "x", GenerateParams())]
    )
    assert isinstance(generated[0], GenerateResult) and isinstance(generated[1], TaskNotFoundError)


def test_truncate_keeps_the_template_suffix(tiny, prompts):
    engine = _engine(tiny, prompts)
    long_text = "the movie was great and fun " * 20
    (result,) = engine.classify([("sentiment", long_text)], truncate=True)
    assert set(result.probabilities) == {"positive", "negative"}
    tokenizer = tiny[1]
    tasks = engine._registry.snapshot()
    ids = encode_input(
        engine.frozen, tasks["sentiment"], tasks["sentiment"].members[0], long_text,
        kind="classification", truncate=True,
    )
    suffix = tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
    assert len(ids) <= MAX_POSITIONS - 5 and ids[-len(suffix) :] == suffix
    assert tokenizer.decode(ids).startswith("Review: the movie was great")
    (generated,) = engine.generate(
        [("gen", long_text + "END", GenerateParams(max_new_tokens=3))], truncate=True
    )
    assert generated.finish_reason == "length"
    kept = encode_input(
        engine.frozen, tasks["gen"], tasks["gen"].members[0], long_text + "END",
        kind="generation", truncate=True,
    )
    assert tokenizer.decode(kept).endswith("END")


def test_width_mismatch_is_refused(tiny, tmp_path):
    engine = Engine(model_and_tokenizer=tiny[:2])
    wrong = _save(tmp_path / "wide", 4, SENTIMENT, 5, width=HIDDEN * 2)
    with pytest.raises(TaskLoadError, match=rf"{HIDDEN * 2}.*{HIDDEN}"):
        engine.add_task("wide", wrong)
    with pytest.raises(TaskLoadError):
        engine.add_task("missing", tmp_path / "does-not-exist")
    assert engine.tasks() == []


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"max_length": 0}, "max_length=0, not a positive integer"),
        ({"stop": "\n"}, "stop='\\n', not a list of non-empty strings"),
        ({"task": "summarise"}, "task='summarise', not classification or generation"),
    ],
)
def test_unusable_settings_in_softprompt_json_are_refused_naming_the_checkpoint(tiny, tmp_path, setting,
                                                                                 message):
    engine = Engine(model_and_tokenizer=tiny[:2])
    bad = _save(tmp_path / "bad", 4, {**GENERATION, **setting}, 5)
    with pytest.raises(TaskLoadError) as error:
        engine.add_task("bad", bad)
    assert str(error.value) == f"{bad}: softprompt.json has {message}"
    assert engine.tasks() == []


def test_remove_unknown_task(tiny, prompts):
    engine = _engine(tiny, prompts, tasks=("sentiment",))
    with pytest.raises(TaskNotFoundError, match="sentiment"):
        engine.remove_task("other")
    engine.remove_task("sentiment")
    assert engine.tasks() == [] and engine.max_input_tokens == MAX_POSITIONS


def test_load_model_folder_and_task_info(tiny, prompts):
    engine = Engine(str(tiny[2]))
    info = engine.add_task("topic", prompts["topic"])
    assert info.kind == "classification" and info.paths == [str(prompts["topic"])]
    assert engine.add_task("gen", prompts["gen"]).labels is None
    assert [task.name for task in engine.tasks()] == ["gen", "topic"]
    assert engine.model_name == str(tiny[2])
    assert (
        engine.max_input_tokens == MAX_POSITIONS - 9 - 2
    )  # the longest prompt; " the movie" = 3 tokens
    assert not any(parameter.requires_grad for parameter in engine.model.parameters())


def test_add_and_remove_while_batches_run(tiny, prompts):
    engine = _engine(tiny, prompts, tasks=("sentiment", "topic"))
    expected = {request: engine.classify([request])[0] for request in _mixed_requests()}
    failures: list[BaseException] = []
    done = threading.Event()

    def serve() -> None:
        try:
            while not done.is_set():
                requests = _mixed_requests() + [("extra", "fun")]
                for request, result in zip(requests, engine.classify_batch(requests), strict=True):
                    if request[0] == "extra":
                        assert isinstance(result, (ClassifyResult, TaskNotFoundError)), result
                    else:
                        _assert_same(result, expected[request])
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        for round_ in range(6):
            engine.add_task("extra", prompts["sentiment2" if round_ % 2 else "sentiment"])
            engine.add_task("topic", prompts["topic"])  # replace a task in use
            engine.remove_task("extra")
    finally:
        done.set()
        worker.join(timeout=60)
    assert not failures, failures


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_greedy_matches_prompt_tuned_model_generate(tiny, prompts, use_kv_cache):
    model, tokenizer, _ = tiny
    engine = _engine(tiny, prompts, use_kv_cache)
    params = GenerateParams(max_new_tokens=12)
    requests = [(name, text, params) for text in TEXTS[:2] for name in ("gen", "gen2", "sentiment")]
    mixed = engine.generate(requests)
    for (name, text, _), result in zip(requests, mixed, strict=True):
        assert result.token_ids == engine.generate([(name, text, params)])[0].token_ids
        checkpoint = load_prompt(prompts[name])
        prompted = PromptTunedModel(model, checkpoint.config, prompt_weights=checkpoint.weights)
        rendered = Template(checkpoint.metadata["template"]).render({"text": text})
        input_ids = tokenizer(rendered, return_tensors="pt")["input_ids"]
        output = prompted.generate(input_ids, max_new_tokens=12, do_sample=False)
        new = output[0, input_ids.shape[1] :].tolist()
        if 2 in new:  # HF stops at EOS (and may pad after it)
            new = new[: new.index(2) + 1]
        assert result.token_ids == new
        assert result.num_tokens == len(new)
        assert result.finish_reason == ("stop" if new[-1] == 2 else "length")
        assert result.text == tokenizer.decode(new, skip_special_tokens=True)


def test_stop_strings_and_eos(tiny, prompts):
    model, tokenizer, _ = tiny
    engine = _engine(tiny, prompts)
    (full,) = engine.generate([("gen", "fun", GenerateParams(max_new_tokens=12))])
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert stop
    (stopped,) = engine.generate(
        [("gen", "fun", GenerateParams(max_new_tokens=12, stop=[stop, "zzz"]))]
    )
    cut = full.text.index(stop)
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:cut]
    assert stopped.num_tokens <= full.num_tokens
    # Make the first greedy token the EOS: generation stops at once, with no text.
    eos_model = LlamaForCausalLM(model.config).eval()
    eos_model.load_state_dict(model.state_dict())
    eos_model.generation_config.eos_token_id = full.token_ids[0]
    eos_engine = Engine(model_and_tokenizer=(eos_model, tokenizer))
    eos_engine.add_task("gen", prompts["gen"])
    (ended,) = eos_engine.generate([("gen", "fun", GenerateParams(max_new_tokens=12))])
    assert (ended.finish_reason, ended.text, ended.num_tokens) == ("stop", "", 1)


def test_ensemble_of_one_prompt_twice_generates_the_same(tiny, prompts):
    engine = _engine(tiny, prompts)
    engine.add_task("twice", [prompts["gen"], prompts["gen"]])
    params = GenerateParams(max_new_tokens=8)
    single, double = engine.generate([("gen", "fun", params), ("twice", "fun", params)])
    assert single.token_ids == double.token_ids


def test_sampling_is_deterministic_under_seed(tiny, prompts):
    engine = _engine(tiny, prompts)
    params = GenerateParams(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    alone = engine.generate([("gen", "fun", params)])[0]
    again = engine.generate([("gen2", "boring", params), ("gen", "fun", params)])[1]
    assert alone.token_ids == again.token_ids
    others = {
        tuple(
            engine.generate(
                [("gen", "fun", GenerateParams(max_new_tokens=10, temperature=1.5, seed=s))]
            )[0].token_ids
        )
        for s in range(4)
    }
    assert len(others) > 1


def test_generate_params_are_validated():
    for bad in (
        {"max_new_tokens": 0},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"stop": [""]},
        {"seed": -3},
    ):
        with pytest.raises(ValueError):
            GenerateParams(**bad)
    assert GenerateParams(stop="###").stop == ["###"]


def test_generation_stops_at_the_position_limit(tiny, prompts):
    engine = _engine(tiny, prompts)
    text = "the movie was great and fun " * 5
    length = len(tiny[1](text)["input_ids"])
    (result,) = engine.generate([("gen2", text, GenerateParams(max_new_tokens=MAX_POSITIONS))])
    assert result.finish_reason in ("length", "stop")
    assert result.num_tokens <= MAX_POSITIONS - 6 - length


# ----------------------------------------------------------------------------- real model
@pytest.mark.real
def test_real_smollm2_mixed_batch_and_kv_cache(tmp_path):
    models = pytest.importorskip("softprompt.models")
    try:
        model, tokenizer = models.load_model("smollm2-135m")
    except Exception as error:  # noqa: BLE001 - not installed here
        pytest.skip(f"smollm2-135m unavailable: {error}")
    width = model.get_input_embeddings().weight.shape[1]
    dirs = []
    for length, init in ((20, "SAMPLE_VOCAB"), (100, "RANDOM")):
        config = PromptTuningConfig(num_virtual_tokens=length, prompt_tuning_init=init, seed=length)
        prompted = PromptTunedModel(model, config, tokenizer=tokenizer)
        meta = (
            SENTIMENT
            if length == 20
            else {**TOPIC, "verbalizer": {"a": " yes", "b": " no", "c": " maybe not"}}
        )
        dirs.append(
            save_prompt(
                tmp_path / f"p{length}", prompted.get_prompt_embedding_to_save(), config, meta
            )
        )
    assert config.token_dim == width
    requests = [(name, text) for text in TEXTS[:2] for name in ("short", "long")]
    results = {}
    for flag in (True, False):
        engine = Engine(model_and_tokenizer=(model, tokenizer), use_kv_cache=flag)
        engine.add_task("short", dirs[0])
        engine.add_task("long", dirs[1])
        results[flag] = engine.classify(requests)
        for request, result in zip(requests, results[flag], strict=True):
            _assert_same(result, engine.classify([request])[0], atol=1e-4)
    for first, second in zip(results[True], results[False], strict=True):
        _assert_same(first, second, atol=1e-4)
