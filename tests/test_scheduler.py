"""Step-level scheduling (`softprompt.inference.Scheduler` over `fastpath.step_batch`) on tiny
random Llama and Gemma 3 (sliding window 4, shorter than every row here).

The reference is the run-to-completion path (`Engine.generate`, itself tested against
`PromptTunedModel.generate`): a request gives the same tokens alone, joined to a running batch
midway, beside other tasks with prompts and texts of other lengths, prefilled in small chunks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from softprompt.core.checkpoint import save_prompt
from softprompt.core.config import PromptTuningConfig
from softprompt.fastpath.decoding import DecodeRequest
from softprompt.fastpath.step_batch import KVRows
from softprompt.inference import Engine, GenerateParams, TaskNotFoundError
from softprompt.models.tiny import HIDDEN, tiny_gemma3, tiny_llama, word_level_tokenizer

WORDS = ["the", "movie", "was", "great", "and", "fun", "a", "terrible", "boring", "film", "review", "topic", "answer", "sports", "news", "politics", ":", "?", "."]
TEXTS = ["the movie was great and fun", "a terrible boring film", "sports news",
         "fun", "the film was a great and boring movie and the news was fun . the end ?"]
TASKS = {  # name: (prompt length, template, seed)
    "short": (2, "{text}", 1),
    "long": (9, "review : {text} answer :", 2),
    "mid": (5, "topic : {text} ?", 3),
}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    paths = {}
    for name, (length, template, seed) in TASKS.items():
        weights = torch.randn(length, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.5
        config = PromptTuningConfig(num_virtual_tokens=length, token_dim=HIDDEN)
        paths[name] = save_prompt(root / name, weights, config,
                                  {"template": template, "task": "generation"})
    return paths


def _engine(build: Any, prompts: dict[str, Path]) -> Engine:
    tokenizer = word_level_tokenizer(WORDS, by_frequency=False)
    model = build(vocab_size=len(tokenizer), max_position_embeddings=96)
    engine = Engine(model_and_tokenizer=(model, tokenizer))
    for name, path in prompts.items():
        engine.add_task(name, path)
    engine.add_task("pair", [prompts["short"], prompts["mid"]])  # an ensemble: two rows
    return engine


def _requests(params: GenerateParams) -> list[tuple[str, str, GenerateParams]]:
    names = [*TASKS, "pair"]
    return [(names[i % len(names)], text, params) for i, text in enumerate(TEXTS * 2)]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("prefill_chunk", [3, 128])
def test_greedy_tokens_do_not_depend_on_joining_or_batch_mates(build, prompts, prefill_chunk):
    engine = _engine(build, prompts)
    requests = [(task, text, GenerateParams(max_new_tokens=6 + 3 * (i % 4)))
                for i, (task, text, _) in enumerate(_requests(GenerateParams()))]
    alone = [engine.generate([request])[0] for request in requests]
    scheduler = engine.scheduler(prefill_chunk=prefill_chunk)
    running = []
    for index, request in enumerate(requests):  # they join at different steps, mid-generation
        running.append(scheduler.add(*request))
        for _ in range(index % 3):
            scheduler.step()
    scheduler.run()
    assert [request.result() for request in running] == alone
    assert len({len(result.token_ids) for result in alone}) > 2  # they leave at different steps


def test_each_request_alone_in_the_scheduler_equals_run_to_completion(prompts):
    engine = _engine(tiny_gemma3, prompts)
    params = GenerateParams(max_new_tokens=10)
    for request in _requests(params)[:5]:
        scheduler = engine.scheduler(prefill_chunk=2)
        solo = scheduler.add(*request)
        scheduler.run()
        assert solo.tokens == engine.generate([request])[0].token_ids


def test_seeded_sampling_is_reproducible_whatever_the_batch_mates(prompts):
    engine = _engine(tiny_llama, prompts)
    sampled = GenerateParams(max_new_tokens=12, temperature=1.3, top_p=0.9, seed=5)
    alone = engine.generate([("mid", "the movie was great", sampled)])[0].token_ids
    scheduler = engine.scheduler(prefill_chunk=4)
    others = [scheduler.add(task, text, GenerateParams(max_new_tokens=9, temperature=0.8,
                                                       seed=i))
              for i, (task, text, _) in enumerate(_requests(sampled)[:4])]
    scheduler.step()
    scheduler.step()
    target = scheduler.add("mid", "the movie was great", sampled)
    scheduler.run()
    assert target.tokens == alone
    assert all(other.finish_reason is not None for other in others)
    unseeded = {tuple(engine.generate([("mid", "fun", GenerateParams(
        max_new_tokens=8, temperature=1.3, seed=seed))])[0].token_ids) for seed in range(4)}
    assert len(unseeded) > 1  # the seed matters


def test_stop_strings_and_budgets_match_run_to_completion(prompts):
    engine = _engine(tiny_llama, prompts)
    (full,) = engine.generate([("long", "fun", GenerateParams(max_new_tokens=12))])
    words = full.text.split()
    stop = " ".join(words[3:5])
    params = GenerateParams(max_new_tokens=12, stop=[stop])
    (expected,) = engine.generate([("long", "fun", params)])
    assert expected.finish_reason == "stop" and len(expected.token_ids) < 12
    scheduler = engine.scheduler()
    long_running = scheduler.add("short", "fun", GenerateParams(max_new_tokens=30))
    scheduler.step()
    stopped = scheduler.add("long", "fun", params)
    one = scheduler.add("mid", "fun", GenerateParams(max_new_tokens=1))
    finished_early = []
    while scheduler.running:
        scheduler.step()
        if stopped.finish_reason and long_running.finish_reason is None:
            finished_early.append(True)
    assert stopped.result() == expected
    assert finished_early, "the stopped request did not leave before its batch-mate ended"
    assert (len(one.tokens), one.finish_reason) == (1, "length")


def test_cancel_frees_the_rows_and_the_others_are_unaffected(prompts):
    engine = _engine(tiny_gemma3, prompts)
    params = GenerateParams(max_new_tokens=10)
    keep = ("mid", "the movie was great", params)
    scheduler = engine.scheduler(prefill_chunk=2)
    kept = scheduler.add(*keep)
    dropped = [scheduler.add("long", text, params) for text in TEXTS[:3]]
    scheduler.step()
    scheduler.step()
    assert scheduler.running == 4
    for request in dropped:
        scheduler.cancel(request)
    assert scheduler.running == 1
    scheduler.run()
    assert kept.tokens == engine.generate([keep])[0].token_ids
    assert all(request.finish_reason is None for request in dropped)


def test_a_removed_task_lets_its_running_requests_finish(prompts):
    engine = _engine(tiny_llama, prompts)
    params = GenerateParams(max_new_tokens=8)
    expected = engine.generate([("mid", "fun", params)])[0].token_ids
    scheduler = engine.scheduler()
    running = scheduler.add("mid", "fun", params)
    scheduler.step()
    engine.remove_task("mid")
    with pytest.raises(TaskNotFoundError):
        scheduler.add("mid", "fun", params)
    scheduler.run()
    assert running.tokens == expected


def test_no_room_finishes_at_once_and_bad_input_raises(prompts):
    engine = _engine(tiny_llama, prompts)
    scheduler = engine.scheduler()
    text = " ".join(["fun"] * 200)
    with pytest.raises(ValueError, match="at most"):
        scheduler.add("short", text, GenerateParams())
    cut = scheduler.add("short", text, GenerateParams(max_new_tokens=50), truncate=True)
    assert cut.budget < 50
    scheduler.run()
    assert len(cut.tokens) <= cut.budget and cut.finish_reason in ("length", "stop")
    with pytest.raises(TypeError):
        scheduler.add("short", "fun", {"max_new_tokens": 3})


def test_kv_rows_pad_select_and_trim():
    def rows(lengths: list[int], width: int) -> KVRows:
        positions = torch.arange(width).unsqueeze(0) - (width - torch.tensor(lengths)).unsqueeze(1)
        positions = positions.clamp(min=-1)
        keys = torch.randn(len(lengths), 1, width, 2)
        return KVRows(((keys, keys + 1),), positions, torch.tensor(lengths))

    short, wide = rows([2], 2), rows([5, 3], 5)
    both = short.concat(wide)
    assert both.positions.tolist() == [[-1, -1, -1, 0, 1], [0, 1, 2, 3, 4], [-1, -1, 0, 1, 2]]
    assert torch.equal(both.layers[0][0][0, :, 3:], short.layers[0][0][0])
    picked = both.select([0, 2])  # the first two columns are padding in both: dropped
    assert picked.positions.tolist() == [[-1, 0, 1], [0, 1, 2]]
    assert picked.next_positions.tolist() == [2, 3]
    assert torch.equal(picked.layers[0][1][1], both.layers[0][1][2, :, 2:])


def test_settled_text_holds_back_what_a_stop_string_may_cut(prompts):
    engine = _engine(tiny_llama, prompts)
    tokenizer = engine.tokenizer
    ids = tokenizer("the movie was great", add_special_tokens=False)["input_ids"]
    request = DecodeRequest("t", [0], GenerateParams(stop=["great and"]), budget=10)
    request.tokens = list(ids)
    assert request.settled_text(tokenizer) == "the movie was "
    request.params = GenerateParams(stop=["boring"])
    assert request.settled_text(tokenizer) == "the movie was great"
    request.finish_reason, request.text = "stop", "final"
    assert request.settled_text(tokenizer) == "final"


@pytest.mark.real
def test_real_smollm2_joined_midway_equals_alone():
    """SmolLM2-135M in its served dtype: the demo sentiment prompt continuing reviews, joined
    to a running batch at different steps, gives the tokens it gives alone."""
    demo = Path(__file__).resolve().parents[1] / "prompts" / "smollm2-135m-rotten-tomatoes-demo-fp32"
    try:
        engine = Engine("smollm2-135m")
    except Exception as error:  # noqa: BLE001 - not installed here
        pytest.skip(f"smollm2-135m unavailable: {error}")
    engine.add_task("sentiment", demo / "prompt")
    requests = [
        ("sentiment", "A gorgeous, witty, seductive movie.", GenerateParams(max_new_tokens=10)),
        ("sentiment", "The plot makes no sense and the jokes fall flat at every turn.",
         GenerateParams(max_new_tokens=6)),
        ("sentiment", "Dull.", GenerateParams(max_new_tokens=8, temperature=0.8, seed=3)),
    ]
    alone = [engine.generate([request])[0] for request in requests]
    scheduler = engine.scheduler(prefill_chunk=8)
    running = []
    for request in requests:
        running.append(scheduler.add(*request))
        scheduler.step()
        scheduler.step()
    scheduler.run()
    assert [request.result() for request in running] == alone
