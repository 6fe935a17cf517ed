"""Load test for the softprompt server: concurrent clients mixing tasks and kinds, bounded.

Against a running server (loopback only)::

    python benchmarks/loadtest.py --url http://127.0.0.1:8000 --tasks a,b,c \
        --concurrency 16 --requests 150 [--json]

Or let it start the server itself on a free port, once per scheduler (``--schedulers
batch,step``: the run-to-completion batcher, then the step-level scheduler), run the load, and
stop it::

    python benchmarks/loadtest.py --spawn-model smollm2-135m --task a=DIR --task b=DIR \
        --task c=DIR --concurrency 16 --requests 150

Each server gets two phases (``--phases``): ``classify`` (classification alone, the baseline)
and ``mixed`` (``--generate-share`` 0.2 of the requests are completions of ``--max-tokens`` 64
new tokens, streamed so that the time to first token is seen; the rest classify one text). Each
client is a thread with its own ``httpx.Client``; texts come from the bundled Rotten Tomatoes
test split when available, else built-in sentences. The report gives, per scheduler and phase,
p50/p99 latency per kind, time to first token, generated tokens/s, errors, lost requests and the
server's mean batch size, then the targets: classification p99 mixed over alone, and generation
tokens/s of the step scheduler over the batcher. The exit status is non-zero on any error or
lost request.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

FALLBACK_TEXTS = (
    "A moving, beautifully acted film that stays with you.",
    "Dull, overlong and badly written.",
    "The best comedy of the year, sharp and warm.",
    "I wanted to walk out after twenty minutes.",
    "An uneven but often charming debut.",
    "The plot makes no sense and the jokes fall flat.",
    "Gorgeous to look at and surprisingly tender.",
    "A tedious mess with nothing to say.",
)


def percentile_ms(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` (seconds) in milliseconds, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def latency_summary(values: list[float]) -> dict[str, float | int | None]:
    """Count, p50, p90, p99, mean and max of latencies (seconds) in milliseconds."""
    return {"count": len(values), "p50": percentile_ms(values, 0.50),
            "p90": percentile_ms(values, 0.90), "p99": percentile_ms(values, 0.99),
            "mean": round(statistics.fmean(values) * 1000, 2) if values else None,
            "max": round(max(values) * 1000, 2) if values else None}


@dataclass
class LoadResult:
    """What one load phase measured.

    Attributes:
        sent: Requests sent.
        answered: Requests that got a complete answer (any status; a stream up to its end).
        ok: Answers with status 200 (a stream: ended with ``data: [DONE]``, no error event).
        errors: Requests that failed, by HTTP status, error event or transport error name.
        latencies_s: Latency of each answered request, by kind (``classify``, ``generate``).
        ttft_s: Time to the first streamed text of each generation.
        completion_tokens: Tokens generated in the answers.
        wall_s: Wall time of the phase.
        batch_count: Batches the server ran during the phase (from /metrics), if readable.
        batch_items: Inputs in those batches.
    """

    sent: int = 0
    answered: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies_s: dict[str, list[float]] = field(
        default_factory=lambda: {"classify": [], "generate": []})
    ttft_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    wall_s: float = 0.0
    batch_count: float | None = None
    batch_items: float | None = None

    @property
    def lost(self) -> int:
        """Requests sent that got no answer at all."""
        return self.sent - self.answered

    def summary(self) -> dict[str, Any]:
        """Returns the report as a JSON-ready dict."""
        every = [value for values in self.latencies_s.values() for value in values]
        mean_batch = None
        if self.batch_count:
            mean_batch = round((self.batch_items or 0) / self.batch_count, 2)
        return {
            "sent": self.sent, "answered": self.answered, "ok": self.ok, "lost": self.lost,
            "errors": sum(self.errors.values()), "errors_by_kind": dict(self.errors),
            "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(self.answered / self.wall_s, 2) if self.wall_s else 0.0,
            "latency_ms": latency_summary(every),
            "latency_ms_by_kind": {kind: latency_summary(values)
                                   for kind, values in self.latencies_s.items() if values},
            "time_to_first_token_ms": latency_summary(self.ttft_s),
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": round(self.completion_tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "server_batches": self.batch_count, "server_mean_batch_size": mean_batch,
        }


def check_loopback(url: str) -> str:
    """Returns ``url`` without a trailing slash if its host is a loopback address, else raises."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        raise ValueError(f"refusing non-loopback host {host!r}: this load test only targets "
                         "127.0.0.1 / ::1 / localhost")
    return url.rstrip("/")


def load_texts(limit: int = 2000) -> list[str]:
    """Texts from the Rotten Tomatoes test split, or built-in sentences if it is unavailable."""
    try:
        from softprompt.data import load_dataset

        splits = load_dataset("rotten_tomatoes")
        texts = [record[splits.text_column] for record in splits.test][:limit]
        if texts:
            return texts
    except Exception:  # any failure (no corpus, no package) means: use the fallback texts
        pass
    return list(FALLBACK_TEXTS)


def _scrape_batches(client: httpx.Client, url: str) -> tuple[float, float] | None:
    """Returns (batch count, batch item sum) from the server's /metrics, if it has them."""
    try:
        text = client.get(f"{url}/metrics").text
    except httpx.HTTPError:
        return None
    count = re.search(r"^softprompt_batch_size_count (\S+)$", text, re.MULTILINE)
    total = re.search(r"^softprompt_batch_size_sum (\S+)$", text, re.MULTILINE)
    if not (count and total):
        return None
    return float(count.group(1)), float(total.group(1))


def task_kinds(client: httpx.Client, url: str, tasks: list[str]) -> dict[str, str]:
    """Asks the server each task's kind (classification or generation)."""
    response = client.get(f"{url}/v1/models")
    response.raise_for_status()
    kinds = {card["id"]: card.get("kind", "classification") for card in response.json()["data"]}
    missing = [task for task in tasks if task not in kinds]
    if missing:
        raise ValueError(f"server has no task(s) {missing}; it serves {sorted(kinds)}")
    return {task: kinds[task] for task in tasks}


def run_load(url: str, tasks: list[str], *, concurrency: int = 16, requests: int = 150,
             duration_limit_s: float = 120.0, max_tokens: int = 64, timeout_s: float = 120.0,
             generate_share: float = 0.2, stream: bool = True,
             texts: list[str] | None = None) -> LoadResult:
    """Sends ``requests`` requests from ``concurrency`` threads, stopping early at the time limit.

    Every ``1 / generate_share``-th request is a completion (``max_tokens`` new tokens, greedy,
    streamed when ``stream``, so its time to first token is seen); the others classify one
    text. Tasks rotate, so concurrent clients mix tasks; classification goes to classification
    tasks only, completions to any task. ``generate_share`` 0 classifies only, 1 only generates.
    """
    url = check_loopback(url)
    texts = texts or load_texts()
    result = LoadResult()
    lock = threading.Lock()
    counter = itertools.count()
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        kinds = task_kinds(client, url, tasks)
        before = _scrape_batches(client, url)
    classifiers = [task for task in tasks if kinds[task] == "classification"]
    if generate_share < 1 and not classifiers:
        raise ValueError(f"no classification task among {tasks}; use --generate-share 1")
    started = time.perf_counter()
    deadline = started + duration_limit_s

    def is_generation(index: int) -> bool:
        # Spread evenly: request i generates when the running share first reaches the target.
        return int((index + 1) * generate_share) > int(index * generate_share)

    def one_request(http: httpx.Client, index: int) -> None:
        text = texts[index % len(texts)]
        generate = is_generation(index)
        if generate:
            task = tasks[index % len(tasks)]
            path, body = "/v1/completions", {"model": task, "prompt": text,
                                             "max_tokens": max_tokens, "temperature": 0,
                                             "truncate": True, "stream": stream}
        else:
            task = classifiers[index % len(classifiers)]
            path, body = "/v1/classify", {"task": task, "inputs": [text], "truncate": True}
        with lock:
            result.sent += 1
        sent_at = time.perf_counter()
        first_text_at, tokens, error = None, 0, None
        try:
            if generate and stream:
                with http.stream("POST", url + path, json=body) as response:
                    status = response.status_code
                    if status == 200:
                        done = False
                        for line in response.iter_lines():
                            if not line.startswith("data: "):
                                continue
                            if line == "data: [DONE]":
                                done = True
                                continue
                            event = json.loads(line[len("data: "):])
                            if "error" in event:
                                error = f"stream_{event['error'].get('code')}"
                            if first_text_at is None and any(
                                    choice.get("text") for choice in event.get("choices", [])):
                                first_text_at = time.perf_counter()
                            tokens += (event.get("usage") or {}).get("completion_tokens", 0)
                        if not done and error is None:
                            error = "stream_incomplete"
                    else:
                        response.read()
            else:
                response = http.post(url + path, json=body)
                status = response.status_code
                if status == 200 and generate:
                    tokens = response.json()["usage"]["completion_tokens"]
        except httpx.HTTPError as failure:
            with lock:
                result.errors[type(failure).__name__] += 1
            return
        elapsed = time.perf_counter() - sent_at
        with lock:
            result.answered += 1
            result.latencies_s["generate" if generate else "classify"].append(elapsed)
            result.completion_tokens += tokens
            if first_text_at is not None:
                result.ttft_s.append(first_text_at - sent_at)
            if status != 200:
                result.errors[f"http_{status}"] += 1
            elif error is not None:
                result.errors[error] += 1
            else:
                result.ok += 1

    def client_loop() -> None:
        with httpx.Client(timeout=timeout_s, trust_env=False) as http:
            while time.perf_counter() < deadline:
                index = next(counter)
                if index >= requests:
                    return
                one_request(http, index)

    threads = [threading.Thread(target=client_loop, name=f"load-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - started
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        after = _scrape_batches(client, url)
    if before and after:
        result.batch_count, result.batch_items = after[0] - before[0], after[1] - before[1]
    return result


def run_phases(url: str, tasks: list[str], phases: list[str], label: str,
               **load: Any) -> list[dict[str, Any]]:
    """Runs each phase (``classify``: classification alone; ``mixed``: with generation)."""
    runs = []
    for phase in phases:
        share = 0.0 if phase == "classify" else load["generate_share"]
        result = run_load(url, tasks, **{**load, "generate_share": share})
        runs.append({"scheduler": label, "phase": phase, **result.summary()})
    return runs


def targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, from the runs present: classification p99 under mixed load over its
    p99 alone (step scheduler: at most 2), generation tokens/s step over batch (at least 2)."""
    found = {(run["scheduler"], run["phase"]): run for run in runs}
    report: dict[str, Any] = {}
    for label in {run["scheduler"] for run in runs}:
        alone, mixed = found.get((label, "classify")), found.get((label, "mixed"))
        if alone and mixed:
            p99_alone = alone["latency_ms_by_kind"].get("classify", {}).get("p99")
            p99_mixed = mixed["latency_ms_by_kind"].get("classify", {}).get("p99")
            if p99_alone and p99_mixed:
                report[f"{label}_classify_p99_mixed_over_alone"] = round(p99_mixed / p99_alone, 2)
    step, batch = found.get(("step", "mixed")), found.get(("batch", "mixed"))
    if step and batch and batch["tokens_per_s"]:
        report["step_over_batch_tokens_per_s"] = round(
            step["tokens_per_s"] / batch["tokens_per_s"], 2)
    return report


def processor_name() -> str:
    """The CPU's model name from /proc/cpuinfo (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_server(model: str, tasks: list[str], *, extra: list[str] | None = None,
                 startup_timeout_s: float = 600.0) -> tuple[subprocess.Popen, str]:
    """Starts ``python -m softprompt serve`` on a free loopback port; waits for /health."""
    port = free_port()
    command = [sys.executable, "-m", "softprompt", "serve", "--model", model,
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    for task in tasks:
        command += ["--task", task]
    command += extra or []
    process = subprocess.Popen(command, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with status {process.returncode} during startup")
            try:
                response = client.get(f"{url}/health")
                if response.status_code == 200:
                    return process, url
                if response.json().get("status") == "failed":
                    stop_server(process)
                    raise RuntimeError(f"server failed to load: {response.json().get('error')}")
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    stop_server(process)
    raise TimeoutError(f"server not healthy after {startup_timeout_s:g}s")


def stop_server(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Stops a spawned server: SIGINT-like terminate, then kill if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _print_report(report: dict[str, Any]) -> None:
    print(f"tasks={','.join(report['tasks'])} concurrency={report['concurrency']} "
          f"processor={report['processor'] or '?'}")
    for run in report["runs"]:
        print(f"[{run['scheduler']} / {run['phase']}] sent {run['sent']}, answered "
              f"{run['answered']}, ok {run['ok']}, lost {run['lost']}, errors {run['errors']} "
              f"{run['errors_by_kind'] or ''}")
        print(f"  {run['requests_per_s']} requests/s over {run['wall_s']}s; "
              f"{run['tokens_per_s']} generated tokens/s")
        for kind, latency in run["latency_ms_by_kind"].items():
            print(f"  {kind}: n={latency['count']} p50 {latency['p50']} ms, p99 "
                  f"{latency['p99']} ms, max {latency['max']} ms")
        ttft = run["time_to_first_token_ms"]
        if ttft["count"]:
            print(f"  time to first token: p50 {ttft['p50']} ms, p99 {ttft['p99']} ms")
        if run["server_mean_batch_size"] is not None:
            print(f"  server: {run['server_batches']:g} batches, mean batch size "
                  f"{run['server_mean_batch_size']}")
    for name, value in report["targets"].items():
        print(f"{name}: {value}")


def main(argv: list[str] | None = None) -> int:
    """Runs the load test; returns 0 when every request was answered with 200, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="server base URL (loopback only)")
    parser.add_argument("--tasks", help="comma-separated task names (default: spawned tasks)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=150, help="requests per phase")
    parser.add_argument("--duration-limit", type=float, default=120.0,
                        help="seconds per phase at most")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per completion")
    parser.add_argument("--generate-share", type=float, default=0.2,
                        help="share of completions in the mixed phase")
    parser.add_argument("--phases", default="classify,mixed",
                        help="classify (classification alone) and/or mixed, comma-separated")
    parser.add_argument("--no-stream", action="store_true",
                        help="ask for completions without streaming (no time to first token)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="client timeout per request, seconds (keep it above the server's)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--spawn-model", help="start a server with this model first")
    parser.add_argument("--task", action="append", default=[], metavar="NAME=DIR",
                        help="task for the spawned server (repeat)")
    parser.add_argument("--schedulers", default="batch,step",
                        help="spawned servers, one after the other: their --scheduler values")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for the spawned server "
                             "(e.g. --server-arg=--max-wait-ms=10)")
    args = parser.parse_args(argv)
    if (args.url is None) == (args.spawn_model is None):
        parser.error("give exactly one of --url and --spawn-model")
    if args.concurrency < 1 or args.requests < 1 or args.duration_limit <= 0 or args.timeout <= 0:
        parser.error("--concurrency and --requests must be >= 1, "
                     "--duration-limit and --timeout > 0")
    if not 0 <= args.generate_share <= 1:
        parser.error("--generate-share must be in [0, 1]")
    phases = [phase for phase in args.phases.split(",") if phase]
    schedulers = [name for name in args.schedulers.split(",") if name]
    if not phases or set(phases) - {"classify", "mixed"}:
        parser.error("--phases takes classify and/or mixed")
    if set(schedulers) - {"batch", "step"} or not schedulers:
        parser.error("--schedulers takes batch and/or step")
    if args.url:
        try:
            check_loopback(args.url)
        except ValueError as error:
            parser.error(str(error))
    if args.spawn_model and not args.task:
        parser.error("--spawn-model needs at least one --task NAME=DIR")
    tasks = [t for t in (args.tasks or "").split(",") if t]
    if not tasks:
        if not args.task:
            parser.error("--tasks is required with --url")
        tasks = list(dict.fromkeys(pair.partition("=")[0] for pair in args.task))

    load = {"concurrency": args.concurrency, "requests": args.requests,
            "duration_limit_s": args.duration_limit, "max_tokens": args.max_tokens,
            "timeout_s": args.timeout, "generate_share": args.generate_share,
            "stream": not args.no_stream}
    runs: list[dict[str, Any]] = []
    try:
        if args.url:
            runs = run_phases(args.url, tasks, phases, "server", **load)
        for scheduler in schedulers if args.spawn_model else []:
            extra = [*args.server_arg, "--scheduler", scheduler]
            process, url = spawn_server(args.spawn_model, args.task, extra=extra)
            try:
                runs += run_phases(url, tasks, phases, scheduler, **load)
            finally:
                stop_server(process)
    except (ValueError, httpx.HTTPError, RuntimeError, TimeoutError) as error:
        print(f"load test could not run: {error}", file=sys.stderr)
        return 2
    report = {"processor": processor_name(), "tasks": tasks, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "generate_share": args.generate_share,
              "runs": runs, "targets": targets(runs)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    failed = any(run["sent"] == 0 or run["lost"] > 0 or run["errors"] > 0
                 or run["ok"] != run["sent"] for run in runs)
    if failed:
        print("FAILED: errors or unanswered requests", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
