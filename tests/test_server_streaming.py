"""The step-level server under mixed load: streaming, disconnects, classification between
decoding steps, nothing lost. Real uvicorn servers on loopback ports over a tiny random Llama;
clients are httpx and the ``openai`` package.

The engine here can slow each decoding step down (:class:`SlowEngine`), so that generations last
long enough to disconnect from or to classify beside, whatever the machine's speed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from softprompt.inference import Engine  # noqa: E402
from softprompt.server.app import create_app  # noqa: E402
from softprompt.server.options import ServeOptions  # noqa: E402
from tests.test_server import (  # noqa: E402 - the first server tests' tiny model, prompts, helpers
    ECHO_META,
    SENTIMENT_META,
    TEXTS,
    RunningServer,
    build_tiny_model,
    metric_lines,
    running_server,
    write_prompt,
)


class SlowEngine(Engine):
    """The real engine; each step of its schedulers first sleeps ``step_delay`` seconds."""

    step_delay = 0.0

    def scheduler(self, **kwargs: Any) -> Any:
        scheduler = super().scheduler(**kwargs)
        step = scheduler.step

        def slow_step() -> Any:
            time.sleep(self.step_delay)
            return step()

        scheduler.step = slow_step
        return scheduler


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("streaming")
    model = build_tiny_model(root / "model")
    write_prompt(root / "prompts" / "sentiment", 4, SENTIMENT_META, 0)
    write_prompt(root / "prompts" / "echo", 5, ECHO_META, 2)
    write_prompt(root / "prompts" / "echo2", 3, ECHO_META, 3)
    return model, root / "prompts"


def _serve(setup: tuple[Path, Path], **options: Any) -> Any:
    model, prompts = setup
    engine = SlowEngine(str(model))
    for name in ("sentiment", "echo", "echo2"):
        engine.add_task(name, prompts / name)
    return running_server(create_app(engine, ServeOptions(max_queue=256, **options)))


@pytest.fixture(scope="module")
def step_server(setup: tuple[Path, Path]) -> Iterator[RunningServer]:
    with _serve(setup, scheduler="step", max_batch_size=16, prefill_chunk=4) as running:
        running.wait_ready()
        yield running


@pytest.fixture
def slow(step_server: RunningServer) -> Iterator[SlowEngine]:
    engine = step_server.state.engine
    engine.step_delay = 0.02
    try:
        yield engine
    finally:
        engine.step_delay = 0.0


def read_events(response: httpx.Response) -> tuple[dict[int, str], list[dict], bool]:
    """Texts by choice index, the parsed events, and whether ``data: [DONE]`` ended them."""
    texts: dict[int, str] = {}
    events, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: ") and not done, line
        if line == "data: [DONE]":
            done = True
            continue
        event = json.loads(line[len("data: "):])
        events.append(event)
        for choice in event.get("choices", []):
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts, events, done


def metric(running: RunningServer, name: str) -> float:
    with running.client() as client:
        return sum(metric_lines(client.get("/metrics").text, name).values())


def wait_until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["step", "batch"])
def test_streamed_text_equals_the_answer(setup, scheduler) -> None:
    requests = [
        {"model": "echo", "prompt": ["the movie was", "the team loved the game , and"],
         "max_tokens": 12, "temperature": 0},
        {"model": "echo2", "prompt": "a terrible film", "max_tokens": 10, "temperature": 0.9,
         "seed": 3, "stop": ["the"]},
        {"model": "sentiment", "prompt": "very good acting", "max_tokens": 6, "temperature": 0},
    ]
    with _serve(setup, scheduler=scheduler) as running, running.client() as client:
        running.wait_ready()
        for body in requests:
            answer = client.post("/v1/completions", json=body).json()
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                texts, events, done = read_events(response)
            assert done
            assert texts == {choice["index"]: choice["text"] for choice in answer["choices"]}
            finishes = {choice["index"]: choice["finish_reason"] for event in events
                        for choice in event["choices"] if choice["finish_reason"]}
            assert finishes == {c["index"]: c["finish_reason"] for c in answer["choices"]}
            assert all("usage" not in event for event in events[:-1])
            assert events[-1]["usage"] == answer["usage"]
            assert {event["id"] for event in events} == {events[0]["id"]}


def test_openai_client_streams(step_server: RunningServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{step_server.url}/v1", api_key="unused", max_retries=0,
                           http_client=httpx.Client(trust_env=False))
    kwargs = {"model": "echo", "prompt": "the atom and the cell", "max_tokens": 10,
              "temperature": 0}
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_refused_stream_gets_its_status(step_server: RunningServer) -> None:
    with step_server.client() as client:
        too_long = client.post("/v1/completions", json={
            "model": "echo", "prompt": " ".join(["good"] * 100), "stream": True})
        unknown = client.post("/v1/completions", json={"model": "x", "prompt": "a",
                                                       "stream": True})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "input_too_long"
    assert unknown.status_code == 404


def test_max_tokens_is_capped_by_the_server(setup) -> None:
    with _serve(setup, max_tokens_limit=3) as running, running.client() as client:
        running.wait_ready()
        body = client.post("/v1/completions", json={"model": "echo", "prompt": "the game",
                                                     "max_tokens": 40, "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] <= 3


# --- cancellation and mixed load ---------------------------------------------------------------


def test_a_disconnect_mid_stream_frees_the_slot(step_server: RunningServer, slow) -> None:
    cancelled_before = metric(step_server, "softprompt_cancelled_generations_total")
    body = {"model": "echo", "prompt": "the movie", "max_tokens": 45, "temperature": 0,
            "stream": True}
    with step_server.client() as client, client.stream("POST", "/v1/completions",
                                                       json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(step_server, "softprompt_running_sequences") == 1
    # The client is gone after one event; 45 tokens would take about 0.9 s more.
    wait_until(lambda: metric(step_server, "softprompt_running_sequences") == 0, 5.0)
    assert metric(step_server, "softprompt_cancelled_generations_total") == cancelled_before + 1
    with step_server.client() as client:  # and the server goes on serving
        again = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 3})
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3


def test_a_client_gone_before_its_answer_frees_the_slot(step_server: RunningServer,
                                                        slow) -> None:
    """A non-streamed completion whose client disconnects is dropped at the next step, as a
    stream is; it used to run to its end (or to the request timeout) for nobody."""
    slow.step_delay = 0.05
    cancelled_before = metric(step_server, "softprompt_cancelled_generations_total")
    body = {"model": "echo", "prompt": "the movie", "max_tokens": 45, "temperature": 0}
    with (httpx.Client(base_url=step_server.url, timeout=0.5, trust_env=False) as client,
          pytest.raises(httpx.ReadTimeout)):
        client.post("/v1/completions", json=body)
    gone = time.monotonic()  # 45 steps of 0.05 s would take about 1.7 s more
    wait_until(lambda: metric(step_server, "softprompt_running_sequences") == 0, 5.0)
    assert time.monotonic() - gone < 1.0
    assert metric(step_server, "softprompt_cancelled_generations_total") == cancelled_before + 1
    with step_server.client() as client:
        again = client.post("/v1/completions", json={**body, "max_tokens": 3})
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3


def test_classification_is_served_between_decoding_steps(step_server: RunningServer,
                                                         slow) -> None:
    """Four long generations run; a classification meanwhile takes a few steps, not theirs."""
    finished: dict[int, float] = {}
    started = threading.Barrier(5)

    def generate(index: int) -> None:
        body = {"model": "echo2", "prompt": TEXTS[index], "max_tokens": 40, "temperature": 0,
                "stream": True}
        with step_server.client() as client, client.stream("POST", "/v1/completions",
                                                           json=body) as response:
            lines = response.iter_lines()
            next(lines)
            started.wait(10)
            for _ in lines:
                pass
        finished[index] = time.monotonic()

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    started.wait(10)
    with step_server.client() as client:
        sent = time.monotonic()
        response = client.post("/v1/classify", json={"task": "sentiment", "inputs": TEXTS[:2]})
        answered = time.monotonic()
    for thread in threads:
        thread.join(30)
    assert response.status_code == 200
    assert len(finished) == 4 and answered < min(finished.values())
    steps = (min(finished.values()) - sent) / slow.step_delay
    assert answered - sent < 0.25 * (min(finished.values()) - sent), (answered - sent, steps)


def test_nothing_is_lost_under_load_with_cancellations(step_server: RunningServer,
                                                       slow) -> None:
    """Every request gets exactly one answer; streams dropped early free their places."""
    slow.step_delay = 0.005
    outcomes: dict[int, list[str]] = {index: [] for index in range(48)}

    def client_loop(worker: int) -> None:
        with step_server.client() as client:
            for index in range(worker, 48, 8):
                kind = index % 4
                text = TEXTS[index % len(TEXTS)]
                if kind in (0, 1):
                    answer = client.post("/v1/classify", json={"task": "sentiment",
                                                               "inputs": [text]})
                    outcomes[index].append(str(answer.status_code))
                elif kind == 2:
                    answer = client.post("/v1/completions", json={
                        "model": "echo" if index % 8 else "echo2", "prompt": text,
                        "max_tokens": 8 + index % 5, "temperature": 0.7, "seed": index})
                    outcomes[index].append(str(answer.status_code))
                else:  # a stream; every other one is dropped after its first event
                    body = {"model": "echo2", "prompt": text, "max_tokens": 20,
                            "temperature": 0, "stream": True}
                    with client.stream("POST", "/v1/completions", json=body) as response:
                        if index % 8 == 3:
                            next(response.iter_lines())
                            outcomes[index].append("dropped")
                        else:
                            _, _, done = read_events(response)
                            outcomes[index].append(f"{response.status_code}:{done}")

    threads = [threading.Thread(target=client_loop, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(len(answers) == 1 for answers in outcomes.values()), outcomes
    answers = [answers[0] for answers in outcomes.values()]
    assert set(answers) <= {"200", "200:True", "dropped"}, answers
    wait_until(lambda: metric(step_server, "softprompt_running_sequences") == 0)
    assert metric(step_server, "softprompt_waiting_sequences") == 0
    assert metric(step_server, "softprompt_queue_depth") == 0
    with step_server.client() as client:
        assert client.post("/v1/classify", json={"task": "sentiment",
                                                 "inputs": ["good"]}).status_code == 200
    text = httpx.get(f"{step_server.url}/metrics", trust_env=False).text
    for family in ("softprompt_time_to_first_token_seconds",
                   "softprompt_time_per_output_token_seconds"):
        assert f"# TYPE {family} histogram" in text
        assert metric_lines(text, f"{family}_count")[""] > 0
    assert metric_lines(text, "softprompt_generated_tokens_total")[""] > 0
    assert "# TYPE softprompt_tokens_per_second gauge" in text


def test_a_tiny_temperature_samples_greedily_and_spares_its_batch_mates(
        step_server: RunningServer, slow) -> None:
    """A temperature so small that logits / temperature overflow once made NaN probabilities:
    the step raised, and every generation running beside it was answered 500."""
    long = {"model": "echo", "prompt": "the movie", "max_tokens": 30, "temperature": 0,
            "stop": []}
    tiny = {"model": "echo2", "prompt": "the game", "max_tokens": 5, "stop": []}
    with step_server.client() as client:
        expected = client.post("/v1/completions", json=long).json()["choices"][0]["text"]
        greedy = client.post("/v1/completions", json={**tiny, "temperature": 0}).json()
        with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as response:
            lines = response.iter_lines()
            first = next(lines)  # the long generation runs
            sampled = client.post("/v1/completions", json={**tiny, "temperature": 1e-45})
            rest = [line for line in lines if line]
    events = [json.loads(line[len("data: "):]) for line in [first, *rest[:-1]]]
    assert sampled.status_code == 200, sampled.text
    assert sampled.json()["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert rest[-1] == "data: [DONE]" and all("error" not in event for event in events), events
    assert "".join(event["choices"][0]["text"] for event in events) == expected


def test_a_model_without_plain_keys_values_gets_the_batch_worker(setup) -> None:
    from softprompt.server.batcher import MicroBatcher
    from softprompt.server.metrics import ServerMetrics
    from softprompt.server.state import make_batcher
    from softprompt.server.stepper import StepBatcher

    model, _ = setup
    options = ServeOptions()
    assert isinstance(make_batcher(Engine(str(model)), options, ServerMetrics()), StepBatcher)
    fallback = make_batcher(Engine(str(model), use_kv_cache=False), options, ServerMetrics())
    assert type(fallback) is MicroBatcher
    batch = make_batcher(Engine(str(model)), ServeOptions(scheduler="batch"), ServerMetrics())
    assert type(batch) is MicroBatcher


def test_a_task_removed_mid_generation_lets_it_finish(step_server: RunningServer, setup,
                                                      slow) -> None:
    body = {"model": "echo2", "prompt": "the vote", "max_tokens": 20, "temperature": 0}
    state = step_server.state
    with step_server.client() as client:
        expected = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        try:
            with client.stream("POST", "/v1/completions",
                               json={**body, "stream": True}) as response:
                lines = response.iter_lines()
                first = json.loads(next(lines)[len("data: "):])["choices"][0]["text"]
                with state.batcher.engine_lock:  # as DELETE /v1/tasks/echo2 does, between steps
                    state.engine.remove_task("echo2")
                    state.refresh_tasks()
                rest = "".join(json.loads(line[len("data: "):])["choices"][0]["text"]
                               for line in lines if line.startswith("data: {"))
            assert first + rest == expected
            gone = client.post("/v1/completions", json=body)
            assert gone.status_code == 404
        finally:
            with state.batcher.engine_lock:
                state.engine.add_task("echo2", setup[1] / "echo2")
                state.refresh_tasks()
