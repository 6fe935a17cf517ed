"""The HTTP server, run for real: uvicorn on a loopback port, a tiny random Llama, httpx clients.

One module-scoped server serves three tasks (two classification, one generation). A second
server wraps the same tiny model in a gated engine (its batches wait on an event) to fill the
queue (429), time requests out (504) and crash a batch on purpose (500). The spawned-server
load test is marked ``slow`` (a fresh interpreter imports torch and transformers).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

import uvicorn  # noqa: E402

from softprompt.core.checkpoint import save_prompt  # noqa: E402
from softprompt.core.config import PromptTuningConfig  # noqa: E402
from softprompt.inference import Engine, GenerateParams  # noqa: E402
from softprompt.models.tiny import HIDDEN, tiny_llama, word_level_tokenizer  # noqa: E402
from softprompt.server.app import create_app  # noqa: E402
from softprompt.server.batcher import MicroBatcher  # noqa: E402
from softprompt.server.metrics import ServerMetrics  # noqa: E402
from softprompt.server.options import ServeOptions  # noqa: E402
from softprompt.server.run import build_app  # noqa: E402
from softprompt.server.schemas import ApiError  # noqa: E402
from softprompt.server.security import check_admin, resolve_prompt_path  # noqa: E402
from tests.conftest import load_benchmark  # noqa: E402

MAX_POSITIONS = 64
ADMIN_KEY = "test-admin-key"
WORDS = [
    "review", "sentiment", "topic", "of", "text", "answer", "q", "a", "the", "movie", "was",
    "great", "good", "bad", "terrible", "film", "plot", "acting", "boring", "loved", "it", "and",
    "but", "very", "not", "sports", "politics", "science", "music", "game", "team", "vote",
    "election", "atom", "cell", "this", "is", "about", ":", "?", ",", ".",
]
TEXTS = [
    "the movie was great",
    "a terrible film with a boring plot",
    "the team loved the game",
    "the vote was about the election",
    "the atom and the cell",
    "very good acting",
    "not great , not terrible",
]
SENTIMENT_META = {"template": "Review: {text}\nSentiment:", "task": "classification",
                  "verbalizer": {"positive": " good", "negative": " bad"}}
TOPIC_META = {"template": "Text: {text}\nTopic:", "task": "classification",
              "verbalizer": {"sports": " sports", "politics": " politics", "science": " science"}}
ECHO_META = {"template": "Q: {text}\nA:", "task": "generation"}
TASKS = {"sentiment": (4, SENTIMENT_META), "topic": (6, TOPIC_META), "echo": (5, ECHO_META)}


# --- tiny model, prompts and a real uvicorn server ---------------------------------------------


def build_tiny_model(directory: Path) -> Path:
    """Saves a seeded random Llama and a word-level tokenizer (WORDS, in order) as a local folder."""
    tokenizer = word_level_tokenizer(WORDS, by_frequency=False)
    tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_prompt(directory: Path, num_virtual_tokens: int, metadata: dict, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_virtual_tokens, HIDDEN, generator=generator) * 0.5
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                token_dim=HIDDEN)
    return save_prompt(directory, weights, config, metadata=dict(metadata))


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class RunningServer:
    url: str
    app: Any
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def state(self) -> Any:
        return self.app.state.server

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, trust_env=False, **kwargs)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while time.monotonic() < deadline:
                if client.get("/health").status_code == 200:
                    return
                time.sleep(0.05)
        raise TimeoutError(f"server not healthy: {self.state.status} {self.state.error}")


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[RunningServer]:
    """Serves ``app`` with uvicorn on a free loopback port in a thread."""
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app, server, thread)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prompts/{sentiment,topic,echo,extra}, a symlink escaping it and one staying inside."""
    base = tmp_path_factory.mktemp("prompt-store")
    prompts = base / "prompts"
    for seed, (name, (length, meta)) in enumerate(TASKS.items()):
        write_prompt(prompts / name, length, meta, seed)
    write_prompt(prompts / "extra", 3, SENTIMENT_META, 10)
    write_prompt(base / "outside", 3, SENTIMENT_META, 11)
    (prompts / "escape").symlink_to(base / "outside", target_is_directory=True)
    (prompts / "alias").symlink_to(prompts / "extra", target_is_directory=True)
    return prompts


@dataclass
class MainServer:
    running: RunningServer
    health_before_load: httpx.Response

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def engine(self) -> Engine:
        return self.running.state.engine

    def client(self, **kwargs: Any) -> httpx.Client:
        return self.running.client(**kwargs)

    def expected(self, task: str, text: str) -> Any:
        """The engine's answer for one input alone (taken while no batch runs)."""
        with self.running.state.batcher.engine_lock:
            return self.engine.classify([(task, text)])[0]


@pytest.fixture(scope="module")
def server(model_dir: Path, prompts_dir: Path) -> Iterator[MainServer]:
    """The real server with 3 tasks; the model load waits for a gate so /health is seen at 503."""
    gate = threading.Event()

    def build_engine() -> Engine:
        gate.wait(30)
        return Engine(str(model_dir))

    options = ServeOptions(
        prompts_dir=str(prompts_dir), admin_key=ADMIN_KEY, max_batch_size=32, max_wait_ms=50,
        max_queue=256, request_timeout=30, task=[f"{name}={prompts_dir / name}" for name in TASKS])
    with running_server(create_app(build_engine, options)) as running:
        with running.client() as client:
            before = client.get("/health")
        gate.set()
        running.wait_ready()
        yield MainServer(running, before)


class GatedEngine(Engine):
    """The real engine whose classify batches first wait for ``gate`` (and may crash once)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.crash_next = False

    def classify_batch(self, requests: list, truncate: bool = False) -> list:
        self.entered.set()
        self.gate.wait(30)
        if self.crash_next:
            self.crash_next = False
            raise RuntimeError("simulated engine crash")
        return super().classify_batch(requests, truncate=truncate)


@pytest.fixture(scope="module")
def gated(model_dir: Path, prompts_dir: Path) -> Iterator[RunningServer]:
    """A server with a tiny queue, one input per batch and no admin key."""
    engine = GatedEngine(str(model_dir))
    engine.add_task("sentiment", prompts_dir / "sentiment")
    options = ServeOptions(prompts_dir=str(prompts_dir), max_batch_size=1, max_wait_ms=0,
                           max_queue=2, request_timeout=30)
    with running_server(create_app(engine, options)) as running:
        running.wait_ready()
        yield running


def metric_lines(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric family's samples in exposition text."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return {match.group(1) or "": float(match.group(2)) for match in pattern.finditer(text)}


def batch_histogram(client: httpx.Client, name: str = "softprompt_batch_size") -> dict[str, float]:
    """Bucket counts of an unlabelled histogram, plus its ``count``."""
    text = client.get("/metrics").text
    return metric_lines(text, f"{name}_bucket") | {"count": metric_lines(text, f"{name}_count")[""]}


# --- health, classify, completions, models -----------------------------------------------------


def test_health_is_503_while_loading_then_200(server: MainServer) -> None:
    assert server.health_before_load.status_code == 503
    assert server.health_before_load.json()["status"] == "loading"
    with server.client() as client:
        response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": server.engine.model_name, "tasks": 3,
                               "error": None}


@pytest.mark.parametrize("task", ["sentiment", "topic"])
def test_classify_each_task(server: MainServer, task: str) -> None:
    with server.client() as client:
        response = client.post("/v1/classify", json={"task": task, "inputs": TEXTS[:3]})
    assert response.status_code == 200, response.text
    body = response.json()
    labels = list(TASKS[task][1]["verbalizer"])
    assert body["task"] == task and len(body["results"]) == 3
    for text, result in zip(TEXTS[:3], body["results"], strict=True):
        assert set(result["probabilities"]) == set(labels)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        alone = server.expected(task, text)
        assert result["label"] == alone.label
        assert result["probabilities"] == pytest.approx(alone.probabilities, abs=1e-5)


def test_concurrent_clients_are_batched_across_tasks(server: MainServer) -> None:
    """Threads mixing three tasks share batches; every answer equals the input run alone."""
    jobs = [("sentiment" if i % 2 else "topic", TEXTS[i % len(TEXTS)]) for i in range(12)]
    jobs += [("echo", TEXTS[i]) for i in range(3)]
    expected = {job: server.expected(*job) for job in jobs if job[0] != "echo"}
    greedy = GenerateParams(max_new_tokens=4, temperature=0.0)
    with server.running.state.batcher.engine_lock:
        expected |= {job: server.engine.generate([(job[0], job[1], greedy)])[0]
                     for job in jobs if job[0] == "echo"}
    with server.client() as client:
        before, tasks_before = batch_histogram(client), batch_histogram(
            client, "softprompt_batch_tasks")
    barrier = threading.Barrier(len(jobs))
    answers: dict[int, httpx.Response] = {}

    def run(index: int, task: str, text: str) -> None:
        with server.client() as client:
            barrier.wait()
            if task == "echo":
                answers[index] = client.post("/v1/completions", json={
                    "model": task, "prompt": text, "max_tokens": 4, "temperature": 0})
            else:
                answers[index] = client.post("/v1/classify", json={"task": task,
                                                                    "inputs": [text]})

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == len(jobs)
    for index, job in enumerate(jobs):
        response = answers[index]
        assert response.status_code == 200, response.text
        if job[0] == "echo":
            assert response.json()["choices"][0]["text"] == expected[job].text
        else:
            result = response.json()["results"][0]
            assert result["label"] == expected[job].label
            assert result["probabilities"] == pytest.approx(expected[job].probabilities, abs=1e-5)
    with server.client() as client:
        after, tasks_after = batch_histogram(client), batch_histogram(
            client, "softprompt_batch_tasks")
    batches = after["count"] - before["count"]
    single = after['{le="1.0"}'] - before['{le="1.0"}']
    assert 0 < batches < len(jobs)
    assert single < batches, "no batch held more than one request"
    mixed = (tasks_after["count"] - tasks_before["count"]) - (
        tasks_after['{le="1.0"}'] - tasks_before['{le="1.0"}'])
    assert mixed >= 1, "no batch mixed tasks"


def test_one_bad_input_fails_only_its_request(server: MainServer) -> None:
    """A too-long input in a batch answers 400 to its client; its batch-mates still get 200."""
    long_text = " ".join(["good"] * 100)
    jobs = [("sentiment", long_text)] + [("topic", text) for text in TEXTS[:5]]
    barrier = threading.Barrier(len(jobs))
    answers: dict[int, httpx.Response] = {}

    def run(index: int, task: str, text: str) -> None:
        with server.client() as client:
            barrier.wait()
            answers[index] = client.post("/v1/classify", json={"task": task, "inputs": [text]})

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers[0].status_code == 400
    assert [answers[i].status_code for i in range(1, len(jobs))] == [200] * (len(jobs) - 1)


def test_input_too_long_is_400_and_truncate_works(server: MainServer) -> None:
    long_text = " ".join(["great"] * 100)
    with server.client() as client:
        too_long = client.post("/v1/classify", json={"task": "sentiment", "inputs": [long_text]})
        cut = client.post("/v1/classify", json={"task": "sentiment", "inputs": [long_text],
                                                "truncate": True})
        completion = client.post("/v1/completions", json={"model": "echo", "prompt": long_text})
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["code"] == "input_too_long" and "at most" in error["message"]
    assert re.search(r"at most \d+", error["message"])
    assert cut.status_code == 200 and len(cut.json()["results"]) == 1
    assert completion.status_code == 400


def test_completions_openai_shape(server: MainServer) -> None:
    request = {"model": "echo", "prompt": ["the movie was", "the game"], "max_tokens": 5,
               "temperature": 0, "stop": ["\n"]}
    with server.client() as client:
        first = client.post("/v1/completions", json=request)
        again = client.post("/v1/completions", json=request)
        sampled = [client.post("/v1/completions", json={
            "model": "echo", "prompt": "the film", "max_tokens": 5, "temperature": 1.0,
            "top_p": 0.9, "seed": 7}).json() for _ in range(2)]
        single = client.post("/v1/completions", json={"model": "sentiment", "prompt": "good"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == "echo"
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # The input as the model read it: the task's template rendered around the text.
    tokenizer = server.engine.tokenizer
    read = sum(len(tokenizer(f"Q: {text}\nA:")["input_ids"]) for text in request["prompt"])
    assert 0 < usage["completion_tokens"] <= 10 and usage["prompt_tokens"] == read
    assert read > len(tokenizer(" ".join(request["prompt"]), add_special_tokens=False)["input_ids"])
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in body["choices"]]
    assert sampled[0]["choices"][0]["text"] == sampled[1]["choices"][0]["text"]
    assert single.status_code == 200  # a classification prompt can still generate


def test_a_completion_without_stop_uses_the_tasks_own(server: MainServer, prompts_dir: Path) -> None:
    """A generation prompt was trained and scored with stop strings (softprompt.json ``stop``);
    a completion that names none ends at them, and ``"stop": []`` turns them off."""
    echo_seed = list(TASKS).index("echo")
    request = {"prompt": "the movie was", "max_tokens": 8, "temperature": 0}
    with server.client() as client:
        free = client.post("/v1/completions", json={**request, "model": "echo", "stop": []}).json()
        text = free["choices"][0]["text"]
        words = text.split()
        assert len(words) >= 2, text  # greedy on the tiny model: 8 tokens, word-level
        stop = f" {words[1]}"
        write_prompt(prompts_dir / "echo-stop", TASKS["echo"][0], {**ECHO_META, "stop": [stop]},
                     echo_seed)  # the echo task's prompt, with a stop string
        added = client.post("/v1/tasks", json={"name": "echo-stop", "path": "echo-stop"},
                            headers={"X-API-Key": ADMIN_KEY})
        assert added.status_code == 201, added.text
        assert added.json()["stop"] == [stop]
        stopped = client.post("/v1/completions", json={**request, "model": "echo-stop"}).json()
        unstopped = client.post("/v1/completions",
                                json={**request, "model": "echo-stop", "stop": []}).json()
        assert client.delete("/v1/tasks/echo-stop", headers={"X-API-Key": ADMIN_KEY}).status_code == 200
    choice = stopped["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (text[:text.index(stop)], "stop")
    assert unstopped["choices"][0]["text"] == text


def test_an_input_that_tokenizes_to_nothing_is_400(server: MainServer, prompts_dir: Path) -> None:
    """With a bare ``{text}`` template an empty text has no tokens: the engine refuses it, and
    the client is told so (400 naming the field), not answered 500."""
    admin = {"X-API-Key": ADMIN_KEY}
    bare = {"sentiment": {**SENTIMENT_META, "template": "{text}"},
            "echo": {**ECHO_META, "template": "{text}"}}
    with server.client() as client:
        for name, meta in bare.items():
            write_prompt(prompts_dir / f"bare-{name}", 3, meta, 12)
            added = client.post("/v1/tasks", json={"name": f"bare-{name}", "path": f"bare-{name}"},
                                headers=admin)
            assert added.status_code == 201, added.text
        try:
            classify = client.post("/v1/classify", json={"task": "bare-sentiment",
                                                         "inputs": ["good", ""]})
            complete = client.post("/v1/completions", json={"model": "bare-echo", "prompt": ""})
            streamed = client.post("/v1/completions", json={"model": "bare-echo", "prompt": "",
                                                            "stream": True})
            fine = client.post("/v1/completions", json={"model": "bare-echo", "prompt": "good",
                                                        "max_tokens": 2})
        finally:
            for name in bare:
                client.delete(f"/v1/tasks/bare-{name}", headers=admin)
    for response, param in ((classify, "inputs"), (complete, "prompt"), (streamed, "prompt")):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_input" and error["param"] == param
        assert "tokenizes to no tokens" in error["message"]
    assert fine.status_code == 200


def test_models_lists_tasks(server: MainServer) -> None:
    with server.client() as client:
        body = client.get("/v1/models").json()
        one = client.get("/v1/models/topic")
        missing = client.get("/v1/models/nope")
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) >= set(TASKS)
    assert cards["sentiment"]["object"] == "model"
    assert cards["sentiment"]["owned_by"] == "softprompt"
    assert cards["sentiment"]["kind"] == "classification"
    assert cards["sentiment"]["labels"] == ["positive", "negative"]
    assert cards["topic"]["num_virtual_tokens"] == [6]
    assert cards["echo"]["kind"] == "generation" and cards["echo"]["labels"] is None
    assert cards["echo"]["paths"] == ["echo"]  # shown relative to the prompts directory
    assert one.json()["id"] == "topic" and missing.status_code == 404


# --- errors and validation ---------------------------------------------------------------------


def test_unknown_task_is_404(server: MainServer) -> None:
    with server.client() as client:
        classify = client.post("/v1/classify", json={"task": "nope", "inputs": ["x"]})
        complete = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert classify.status_code == 404 and complete.status_code == 404
    message = classify.json()["error"]["message"]
    assert message.startswith("unknown task 'nope'; known tasks:")
    assert all(name in message for name in TASKS)
    assert complete.json()["error"]["param"] == "model"


def test_classify_on_generation_task_is_400(server: MainServer) -> None:
    with server.client() as client:
        response = client.post("/v1/classify", json={"task": "echo", "inputs": ["x"]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "wrong_task_kind"


def test_malformed_json_is_400(server: MainServer) -> None:
    with server.client() as client:
        response = client.post("/v1/classify", content=b'{"task": "sentiment", "inputs": [',
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert "malformed JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize("body", [
    {"task": "sentiment", "inputs": []},
    {"task": "sentiment"},
    {"task": "sentiment", "inputs": "not a list"},
    {"task": "sentiment", "inputs": ["x"], "unexpected": 1},
    {"task": "", "inputs": ["x"]},
    {"task": "sentiment", "inputs": ["x" * 100_001]},
    [1, 2, 3],
])
def test_schema_errors_are_422(server: MainServer, body: Any) -> None:
    with server.client() as client:
        response = client.post("/v1/classify", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" and error["message"].startswith("invalid request")


def test_a_record_input_is_422_naming_inputs(server: MainServer) -> None:
    """A template has one field, so an input is a text; a record was once accepted by the schema
    and then refused by the engine with a 500."""
    with server.client() as client:
        response = client.post("/v1/classify", json={"task": "sentiment",
                                                     "inputs": [{"text": "good"}]})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "inputs"


@pytest.mark.parametrize("body", [
    {"model": "echo", "prompt": []},
    {"model": "echo", "prompt": "x", "max_tokens": 0},
    {"model": "echo", "prompt": "x", "temperature": -1},
    {"model": "echo", "prompt": "x", "stream": "yes please"},
    {"model": "echo", "prompt": "x", "n": 2},
    {"model": "echo", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
    {"model": "echo", "prompt": "x", "temperature": 1, "seed": -1},
    {"model": "echo", "prompt": "x", "temperature": 1, "seed": 2**64},  # beyond a torch seed
])
def test_completion_schema_errors_are_422(server: MainServer, body: dict) -> None:
    with server.client() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] in body


# --- task management ---------------------------------------------------------------------------


def test_add_and_remove_task_needs_the_admin_key(server: MainServer) -> None:
    new = {"name": "extra-task", "path": "extra"}
    with server.client() as client:
        assert client.post("/v1/tasks", json=new).status_code == 401
        wrong = client.post("/v1/tasks", json=new, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        added = client.post("/v1/tasks", json=new, headers={"X-API-Key": ADMIN_KEY})
        assert added.status_code == 201, added.text
        assert added.json()["id"] == "extra-task" and added.json()["num_virtual_tokens"] == [3]
        again = client.post("/v1/tasks", json=new, headers={"X-API-Key": ADMIN_KEY})
        assert again.status_code == 409
        classify = client.post("/v1/classify", json={"task": "extra-task", "inputs": ["good"]})
        assert classify.status_code == 200
        assert "extra-task" in {card["id"] for card in client.get("/v1/models").json()["data"]}
        assert client.get("/health").json()["tasks"] == 4
        assert client.delete("/v1/tasks/extra-task").status_code == 401
        removed = client.delete("/v1/tasks/extra-task",
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert removed.status_code == 200 and removed.json()["deleted"] is True
        gone = client.post("/v1/classify", json={"task": "extra-task", "inputs": ["good"]})
        assert gone.status_code == 404
        missing = client.delete("/v1/tasks/extra-task", headers={"X-API-Key": ADMIN_KEY})
        assert missing.status_code == 404


def test_add_task_through_a_symlink_inside_the_prompts_dir(server: MainServer) -> None:
    admin = {"X-API-Key": ADMIN_KEY}
    with server.client() as client:
        added = client.post("/v1/tasks", json={"name": "aliased", "path": "alias"}, headers=admin)
        assert added.status_code == 201, added.text
        assert client.delete("/v1/tasks/aliased", headers=admin).status_code == 200


@pytest.mark.parametrize(("path", "status"), [
    ("ABSOLUTE", 400),
    ("../outside", 400),
    ("extra/../../outside", 400),
    ("escape", 403),
    ("does-not-exist", 400),
    ("C:\\prompts\\extra", 400),
    ("~/prompts", 400),
])
def test_path_traversal_is_rejected(server: MainServer, prompts_dir: Path, path: str,
                                    status: int) -> None:
    if path == "ABSOLUTE":
        path = str(prompts_dir / "extra")
    with server.client() as client:
        response = client.post("/v1/tasks", json={"name": "sneaky", "path": path},
                               headers={"X-API-Key": ADMIN_KEY})
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == "path"
        names = {card["id"] for card in client.get("/v1/models").json()["data"]}
    assert "sneaky" not in names


def test_bad_task_name_and_bad_checkpoint_are_400(server: MainServer, prompts_dir: Path) -> None:
    (prompts_dir / "empty-dir").mkdir(exist_ok=True)
    admin = {"X-API-Key": ADMIN_KEY}
    with server.client() as client:
        bad_name = client.post("/v1/tasks", json={"name": "../x", "path": "extra"}, headers=admin)
        not_prompt = client.post("/v1/tasks", json={"name": "empty", "path": "empty-dir"},
                                 headers=admin)
    assert bad_name.status_code == 400 and bad_name.json()["error"]["code"] == "invalid_task_name"
    assert not_prompt.status_code == 400
    assert not_prompt.json()["error"]["code"] == "task_load_failed"


def test_admin_endpoints_disabled_without_key(gated: RunningServer) -> None:
    with gated.client() as client:
        added = client.post("/v1/tasks", json={"name": "x", "path": "extra"},
                            headers={"X-API-Key": "anything"})
        removed = client.delete("/v1/tasks/sentiment")
    assert added.status_code == 403 and removed.status_code == 403
    assert "admin endpoints disabled" in added.json()["error"]["message"]


# --- queue limits, timeouts, crashes -----------------------------------------------------------


def _post_in_thread(running: RunningServer, body: dict, out: list) -> threading.Thread:
    def run() -> None:
        with running.client() as client:
            out.append(client.post("/v1/classify", json=body))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


def test_queue_full_is_429_and_nothing_is_lost(gated: RunningServer) -> None:
    engine, batcher = gated.state.engine, gated.state.batcher
    body = {"task": "sentiment", "inputs": ["good"]}
    engine.gate.clear()
    engine.entered.clear()
    answers: list[httpx.Response] = []
    try:
        threads = [_post_in_thread(gated, body, answers)]
        assert engine.entered.wait(10)  # the worker holds the first request
        threads += [_post_in_thread(gated, body, answers) for _ in range(2)]
        _wait_for(lambda: batcher.depth == 2)
        with gated.client() as client:
            refused = client.post("/v1/classify", json=body)
            too_many = client.post("/v1/classify", json={"task": "sentiment",
                                                        "inputs": ["a", "b", "c"]})
    finally:
        engine.gate.set()
    for thread in threads:
        thread.join(30)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "queue full" in refused.json()["error"]["message"]
    assert too_many.status_code == 413
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    with gated.client() as client:
        errors = metric_lines(client.get("/metrics").text, "softprompt_errors_total")
    assert errors['{reason="queue_full"}'] >= 1


def test_request_timeout_is_504(gated: RunningServer) -> None:
    engine, options = gated.state.engine, gated.state.options
    engine.gate.clear()
    options.request_timeout = 0.5
    try:
        with gated.client() as client:
            response = client.post("/v1/classify", json={"task": "sentiment", "inputs": ["x"]})
    finally:
        options.request_timeout = 30
        engine.gate.set()
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    with gated.client() as client:  # the worker is still serving
        assert client.post("/v1/classify", json={"task": "sentiment",
                                                 "inputs": ["x"]}).status_code == 200


def test_engine_crash_fails_only_that_batch(gated: RunningServer) -> None:
    engine = gated.state.engine
    engine.crash_next = True
    with gated.client() as client:
        crashed = client.post("/v1/classify", json={"task": "sentiment", "inputs": ["x"]})
        after = client.post("/v1/classify", json={"task": "sentiment", "inputs": ["x"]})
    assert crashed.status_code == 500 and crashed.json()["error"]["code"] == "engine_error"
    assert after.status_code == 200


def test_batcher_shutdown_drains_or_fails_pending(model_dir: Path, prompts_dir: Path) -> None:
    """stop(drain=True) runs queued items; stop(drain=False) answers them 503, never drops them."""
    engine = GatedEngine(str(model_dir))
    engine.add_task("sentiment", prompts_dir / "sentiment")

    async def scenario(drain: bool) -> list[Any]:
        batcher = MicroBatcher(engine, max_batch_size=1, max_wait_ms=0, max_queue=8)
        batcher.start()
        engine.gate.clear()
        engine.entered.clear()
        items = batcher.submit("classify", "sentiment", ["good", "bad", "great"])
        await asyncio.to_thread(engine.entered.wait, 10)
        stopper = asyncio.create_task(asyncio.to_thread(batcher.stop, drain, 30))
        await asyncio.sleep(0.05)
        engine.gate.set()
        await stopper
        outcomes = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
        with pytest.raises(ApiError) as refused:
            batcher.submit("classify", "sentiment", ["late"])
        assert refused.value.status == 503
        return outcomes

    drained = asyncio.run(scenario(drain=True))
    assert [type(outcome).__name__ for outcome in drained] == ["ClassifyResult"] * 3
    failed = asyncio.run(scenario(drain=False))
    assert type(failed[0]).__name__ == "ClassifyResult"  # already running: finished
    assert [getattr(outcome, "status", None) for outcome in failed[1:]] == [503, 503]


def test_health_503_when_the_model_fails_to_load() -> None:
    def broken() -> Engine:
        raise FileNotFoundError("no such model")

    app = create_app(broken, ServeOptions())
    with running_server(app) as running, running.client() as client:
        _wait_for(lambda: client.get("/health").json()["status"] != "loading")
        health = client.get("/health")
        classify = client.post("/v1/classify", json={"task": "x", "inputs": ["y"]})
    assert health.status_code == 503 and "no such model" in health.json()["error"]
    assert classify.status_code == 503


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_exposition(server: MainServer) -> None:
    with server.client() as client:
        client.post("/v1/classify", json={"task": "sentiment", "inputs": ["good"]})
        client.post("/v1/classify", json={"task": "nope", "inputs": ["good"]})
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for family, kind in [("softprompt_requests_total", "counter"),
                         ("softprompt_errors_total", "counter"),
                         ("softprompt_queue_depth", "gauge"),
                         ("softprompt_batch_size", "histogram"),
                         ("softprompt_request_latency_seconds", "histogram")]:
        assert f"# TYPE {family} {kind}" in text
    requests = metric_lines(text, "softprompt_requests_total")
    assert requests['{endpoint="/v1/classify",status="200"}'] >= 1
    assert requests['{endpoint="/v1/classify",status="404"}'] >= 1
    assert metric_lines(text, "softprompt_errors_total")['{reason="unknown_task"}'] >= 1
    assert metric_lines(text, "softprompt_queue_depth")[""] == 0
    buckets = metric_lines(text, "softprompt_request_latency_seconds_bucket")
    assert buckets['{endpoint="/v1/classify",le="+Inf"}'] == metric_lines(
        text, "softprompt_request_latency_seconds_count")['{endpoint="/v1/classify"}']


def test_server_metrics_render_the_text_format() -> None:
    """Escaped label values, cumulative buckets with sum and count, one registry per instance."""
    metrics, other = ServerMetrics(), ServerMetrics()
    metrics.requests.labels(endpoint='a"b\\c\n', status="200").inc()
    for value in (1, 3, 7):
        metrics.batch_size.observe(value)
    depth = [5]
    metrics.watch_queue(lambda: depth[0])
    text = metrics.render().decode()
    lines = text.splitlines()
    assert 'softprompt_requests_total{endpoint="a\\"b\\\\c\\n",status="200"} 1.0' in lines
    buckets = metric_lines(text, "softprompt_batch_size_bucket")
    assert [buckets[f'{{le="{bound}"}}'] for bound in ("1.0", "2.0", "4.0", "8.0", "+Inf")] == [
        1, 1, 2, 3, 3]
    assert metric_lines(text, "softprompt_batch_size_sum")[""] == 11
    assert metric_lines(text, "softprompt_batch_size_count")[""] == 3
    assert metric_lines(text, "softprompt_queue_depth")[""] == 5
    depth[0] = 0  # read at every scrape, never a stale copy
    assert metric_lines(metrics.render().decode(), "softprompt_queue_depth")[""] == 0
    assert "softprompt_requests_total{" not in other.render().decode()
    with pytest.raises(ValueError):
        metrics.requests.labels(endpoint="x", status="200").inc(-1)


# --- options and build_app ---------------------------------------------------------------------


def test_serve_options_task_map_and_errors(prompts_dir: Path) -> None:
    sentiment, extra = prompts_dir / "sentiment", prompts_dir / "extra"
    options = ServeOptions(task=[f"pair={sentiment}", f"topic={prompts_dir / 'topic'}",
                                 f"pair={extra}"])
    assert options.tasks == {"pair": [str(sentiment), str(extra)],
                             "topic": str(prompts_dir / "topic")}
    with pytest.raises(ValueError) as bad:
        ServeOptions(task=["x", "a b=" + str(sentiment), f"c={prompts_dir / 'nope'}"],
                     max_queue=0, request_timeout=0, log_level="loud")
    message = str(bad.value)
    for expected in ("--task 'x': expected NAME=PROMPT_DIR", "invalid task name 'a b'",
                     f"prompt directory '{prompts_dir / 'nope'}' not found",
                     "max_queue must be a positive integer, got 0",
                     "request_timeout must be > 0", "log_level='loud' is not valid"):
        assert expected in message
    with pytest.raises(ValueError, match="prompts_dir '/no/such/dir' is not a directory"):
        ServeOptions(prompts_dir="/no/such/dir")


def test_serve_options_import_nothing_heavy() -> None:
    import subprocess

    code = ("import sys, softprompt.server.options; "
            "print(sorted({'torch', 'transformers', 'fastapi'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_build_app_serves_a_repeated_task_as_an_ensemble(model_dir: Path,
                                                         prompts_dir: Path) -> None:
    options = ServeOptions(model=str(model_dir), task=[f"pair={prompts_dir / 'sentiment'}",
                                                       f"pair={prompts_dir / 'extra'}"])
    with running_server(build_app(options)) as running, running.client() as client:
        running.wait_ready()
        card = client.get("/v1/models/pair").json()
        classify = client.post("/v1/classify", json={"task": "pair", "inputs": ["good"]})
    assert card["num_virtual_tokens"] == [4, 3] and card["base_model"] == str(model_dir)
    assert classify.status_code == 200
    assert set(classify.json()["results"][0]["probabilities"]) == {"positive", "negative"}


# --- security helpers --------------------------------------------------------------------------


def test_check_admin_rules() -> None:
    with pytest.raises(ApiError) as disabled:
        check_admin(None, "Bearer k", None)
    assert disabled.value.status == 403
    with pytest.raises(ApiError) as missing:
        check_admin("k", None, None)
    assert missing.value.status == 401
    with pytest.raises(ApiError) as wrong:
        check_admin("k", "Basic k", None)
    assert wrong.value.status == 401
    check_admin("k", "Bearer k", None)
    check_admin("k", None, "k")


def test_resolve_prompt_path(prompts_dir: Path) -> None:
    assert resolve_prompt_path(prompts_dir, "extra") == (prompts_dir / "extra").resolve()
    assert resolve_prompt_path(prompts_dir, "alias") == (prompts_dir / "extra").resolve()
    with pytest.raises(ApiError) as disabled:
        resolve_prompt_path(None, "extra")
    assert disabled.value.status == 403
    for bad in ("", "/etc", "..", "a/../..", "\\\\server\\share", "x\x00y"):
        with pytest.raises(ApiError) as rejected:
            resolve_prompt_path(prompts_dir, bad)
        assert rejected.value.status == 400, bad


# --- load test ---------------------------------------------------------------------------------


def test_loadtest_against_the_server(server: MainServer, capsys: pytest.CaptureFixture) -> None:
    import json

    loadtest = load_benchmark("loadtest")
    code = loadtest.main(["--url", server.url, "--tasks", "sentiment,topic,echo",
                          "--concurrency", "4", "--requests", "30", "--duration-limit", "60",
                          "--max-tokens", "3", "--generate-share", "0.3", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert [(run["scheduler"], run["phase"]) for run in report["runs"]] == [
        ("server", "classify"), ("server", "mixed")]
    alone, mixed = report["runs"]
    for run in report["runs"]:
        assert run["sent"] == run["answered"] == run["ok"] == 30
        assert run["errors"] == 0 and run["lost"] == 0
    assert set(alone["latency_ms_by_kind"]) == {"classify"}
    assert mixed["latency_ms_by_kind"]["generate"]["count"] == 9  # 30% of 30, streamed
    assert mixed["latency_ms_by_kind"]["classify"]["count"] == 21
    assert mixed["time_to_first_token_ms"]["count"] == 9
    assert 0 < mixed["completion_tokens"] <= 27 and mixed["tokens_per_s"] > 0
    assert "server_classify_p99_mixed_over_alone" in report["targets"]


def test_loadtest_refuses_non_loopback_hosts() -> None:
    loadtest = load_benchmark("loadtest")
    with pytest.raises(SystemExit) as exit_info:
        loadtest.main(["--url", "http://10.1.2.3:8000", "--tasks", "a"])
    assert exit_info.value.code == 2
    for url in ("http://example.com", "http://192.168.0.1:80", "ftp://127.0.0.1"):
        with pytest.raises(ValueError):
            loadtest.check_loopback(url)
    assert loadtest.check_loopback("http://localhost:1/") == "http://localhost:1"
    assert loadtest.check_loopback("http://[::1]:8000") == "http://[::1]:8000"


@pytest.mark.slow
def test_loadtest_spawns_a_server(model_dir: Path, prompts_dir: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    """``--spawn-model`` starts ``python -m softprompt serve``, loads, and stops it."""
    loadtest = load_benchmark("loadtest")
    code = loadtest.main(["--spawn-model", str(model_dir),
                          "--task", f"sentiment={prompts_dir / 'sentiment'}",
                          "--task", f"echo={prompts_dir / 'echo'}",
                          "--concurrency", "4", "--requests", "20", "--max-tokens", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    for scheduler in ("batch", "step"):
        for phase in ("classify", "mixed"):
            assert f"[{scheduler} / {phase}] sent 20, answered 20, ok 20, lost 0, errors 0" in out
    assert "step_over_batch_tokens_per_s" in out
