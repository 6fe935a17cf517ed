"""Load test for the softprompt server: concurrent clients mixing tasks, bounded in count and time.

Against a running server (loopback only)::

    python benchmarks/loadtest.py --url http://127.0.0.1:8000 --tasks a,b,c \
        --concurrency 8 --requests 400 --duration-limit 60 [--json]

Or let it start the server itself on a free port, run the load, and stop it::

    python benchmarks/loadtest.py --spawn-model smollm2-135m --task a=runs/a --task b=runs/b

Each client is a thread with its own ``httpx.Client``. Classification tasks get
``POST /v1/classify`` with one review text; generation tasks ``POST /v1/completions``. Texts come
from the bundled Rotten Tomatoes test split when available, else built-in sentences. The report
gives requests/s, latency percentiles, errors by status, the server's mean batch size, and checks
that every request sent got an answer. The exit status is non-zero on any error or lost request.
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


@dataclass
class LoadResult:
    """What one load test measured.

    Attributes:
        sent: Requests sent.
        answered: Requests that got an HTTP response (any status).
        ok: Responses with status 200.
        errors: Requests that failed, by HTTP status or transport error name.
        latencies_s: Latency of each answered request.
        wall_s: Wall time of the load phase.
        batch_count: Batches the server ran during the test (from /metrics), if readable.
        batch_items: Inputs in those batches.
    """

    sent: int = 0
    answered: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    batch_count: float | None = None
    batch_items: float | None = None

    @property
    def lost(self) -> int:
        """Requests sent that got no answer at all."""
        return self.sent - self.answered

    def summary(self) -> dict[str, Any]:
        """Returns the report as a JSON-ready dict."""
        ordered = sorted(self.latencies_s)

        def percentile(q: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

        mean_batch = None
        if self.batch_count:
            mean_batch = round((self.batch_items or 0) / self.batch_count, 2)
        return {
            "sent": self.sent, "answered": self.answered, "ok": self.ok, "lost": self.lost,
            "errors": sum(self.errors.values()), "errors_by_kind": dict(self.errors),
            "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(self.answered / self.wall_s, 2) if self.wall_s else 0.0,
            "latency_ms": {
                "p50": percentile(0.50), "p90": percentile(0.90), "p99": percentile(0.99),
                "mean": round(statistics.fmean(ordered) * 1000, 2) if ordered else None,
                "max": round(ordered[-1] * 1000, 2) if ordered else None},
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


def run_load(url: str, tasks: list[str], *, concurrency: int = 8, requests: int = 400,
             duration_limit_s: float = 60.0, max_tokens: int = 8, timeout_s: float = 60.0,
             texts: list[str] | None = None) -> LoadResult:
    """Sends ``requests`` requests from ``concurrency`` threads, stopping early at the time limit.

    Request ``i`` uses task ``tasks[i % len(tasks)]``, so concurrent clients mix tasks.
    """
    url = check_loopback(url)
    texts = texts or load_texts()
    result = LoadResult()
    lock = threading.Lock()
    counter = itertools.count()
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        kinds = task_kinds(client, url, tasks)
        before = _scrape_batches(client, url)
    started = time.perf_counter()
    deadline = started + duration_limit_s

    def client_loop() -> None:
        with httpx.Client(timeout=timeout_s, trust_env=False) as http:
            while time.perf_counter() < deadline:
                index = next(counter)
                if index >= requests:
                    return
                task = tasks[index % len(tasks)]
                text = texts[index % len(texts)]
                if kinds[task] == "classification":
                    path, body = "/v1/classify", {"task": task, "inputs": [text], "truncate": True}
                else:
                    path, body = "/v1/completions", {"model": task, "prompt": text,
                                                     "max_tokens": max_tokens, "temperature": 0,
                                                     "truncate": True}
                with lock:
                    result.sent += 1
                sent_at = time.perf_counter()
                try:
                    response = http.post(url + path, json=body)
                except httpx.HTTPError as error:
                    with lock:
                        result.errors[type(error).__name__] += 1
                    continue
                elapsed = time.perf_counter() - sent_at
                with lock:
                    result.answered += 1
                    result.latencies_s.append(elapsed)
                    if response.status_code == 200:
                        result.ok += 1
                    else:
                        result.errors[f"http_{response.status_code}"] += 1

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


def _print_report(summary: dict[str, Any], tasks: list[str], concurrency: int) -> None:
    latency = summary["latency_ms"]
    print(f"tasks={','.join(tasks)} concurrency={concurrency}")
    print(f"sent {summary['sent']}, answered {summary['answered']}, ok {summary['ok']}, "
          f"lost {summary['lost']}, errors {summary['errors']} {summary['errors_by_kind'] or ''}")
    print(f"{summary['requests_per_s']} requests/s over {summary['wall_s']}s; latency ms: "
          f"p50 {latency['p50']}, p90 {latency['p90']}, p99 {latency['p99']}, "
          f"max {latency['max']}")
    if summary["server_mean_batch_size"] is not None:
        print(f"server: {summary['server_batches']:g} batches, mean batch size "
              f"{summary['server_mean_batch_size']}")


def main(argv: list[str] | None = None) -> int:
    """Runs the load test; returns 0 when every request was answered with 200, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="server base URL (loopback only)")
    parser.add_argument("--tasks", help="comma-separated task names (default: spawned tasks)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="requests to send in total")
    parser.add_argument("--duration-limit", type=float, default=60.0, help="seconds at most")
    parser.add_argument("--max-tokens", type=int, default=8, help="for generation tasks")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="client timeout per request, seconds (keep it above the server's)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--spawn-model", help="start a server with this model first")
    parser.add_argument("--task", action="append", default=[], metavar="NAME=DIR",
                        help="task for the spawned server (repeat)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for the spawned server "
                             "(e.g. --server-arg=--max-wait-ms=10)")
    args = parser.parse_args(argv)
    if (args.url is None) == (args.spawn_model is None):
        parser.error("give exactly one of --url and --spawn-model")
    if args.concurrency < 1 or args.requests < 1 or args.duration_limit <= 0 or args.timeout <= 0:
        parser.error("--concurrency and --requests must be >= 1, "
                     "--duration-limit and --timeout > 0")
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

    process = None
    url = args.url
    if args.spawn_model:
        process, url = spawn_server(args.spawn_model, args.task, extra=args.server_arg)
    try:
        result = run_load(url, tasks, concurrency=args.concurrency, requests=args.requests,
                          duration_limit_s=args.duration_limit, max_tokens=args.max_tokens,
                          timeout_s=args.timeout)
    except (ValueError, httpx.HTTPError) as error:
        print(f"load test could not start: {error}", file=sys.stderr)
        return 2
    finally:
        if process is not None:
            stop_server(process)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_report(summary, tasks, args.concurrency)
    failed = (result.sent == 0 or result.lost > 0 or summary["errors"] > 0
              or result.ok != result.sent)
    if failed:
        print("FAILED: errors or unanswered requests", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
