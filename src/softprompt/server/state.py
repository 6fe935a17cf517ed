"""What the endpoints of one app share: options, metrics, and once loaded the engine and batcher.

The engine is built in a loader thread (:meth:`ServerState.load`) while the HTTP port is already
open, so ``/health`` answers 503 during the load; :meth:`ServerState.ready` is the gate every
inference and admin endpoint passes first.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import Request

from softprompt.inference import TaskInfo
from softprompt.server import schemas as s
from softprompt.server.batcher import MicroBatcher, unknown_task_error
from softprompt.server.metrics import ServerMetrics
from softprompt.server.options import ServeOptions
from softprompt.server.schemas import ApiError
from softprompt.server.stepper import StepBatcher

logger = logging.getLogger(__name__)

EngineSource = Any  # an Engine, or a zero-argument callable that builds one


class ServerState:
    """The shared state of one app; its ``status`` is loading, ok, failed or stopping."""

    def __init__(self, options: ServeOptions, metrics: ServerMetrics) -> None:
        self.options = options
        self.metrics = metrics
        self.status = "loading"
        self.error: str | None = None
        self.engine: Any = None
        self.batcher: MicroBatcher | None = None
        self.tasks: dict[str, TaskInfo] = {}
        self.created: dict[str, int] = {}
        self.loaded = threading.Event()

    def load(self, source: EngineSource) -> None:
        """Builds the engine, loads the startup tasks and starts the batcher (loader thread)."""
        options = self.options
        try:
            engine = source if hasattr(source, "classify_batch") else source()
            for name, paths in options.tasks.items():
                engine.add_task(name, paths)
            batcher = make_batcher(engine, options, self.metrics)
            if self.status == "stopping":
                return
            batcher.start()
            self.engine, self.batcher = engine, batcher
            self.refresh_tasks()
            self.status = "ok"
            self.metrics.model_loaded.set(1)
            logger.info("model %s ready with %d task(s)", engine.model_name, len(self.tasks))
        except Exception as error:
            logger.exception("loading the model failed")
            self.status, self.error = "failed", f"{type(error).__name__}: {error}"
        finally:
            self.loaded.set()

    def refresh_tasks(self) -> None:
        """Snapshots the engine's tasks, so requests check names without touching the engine."""
        now = int(time.time())
        tasks = {info.name: info for info in self.engine.tasks()}
        self.created = {name: self.created.get(name, now) for name in tasks}
        self.tasks = tasks
        self.metrics.tasks.set(len(tasks))

    def ready(self) -> MicroBatcher:
        """Returns the batcher, or raises 503 while loading, after a failure or when stopping."""
        if self.status == "ok" and self.batcher is not None:
            return self.batcher
        if self.status == "loading":
            raise ApiError(503, "model is still loading; retry shortly", "not_ready",
                           error_type="server_error", headers={"Retry-After": "1"})
        if self.status == "failed":
            raise ApiError(503, f"model failed to load: {self.error}", "load_failed",
                           error_type="server_error")
        raise ApiError(503, "server is shutting down", "shutting_down", error_type="server_error")

    def task(self, name: str, param: str) -> TaskInfo:
        """Returns a loaded task's info, or raises 404 naming the known tasks."""
        info = self.tasks.get(name)
        if info is None:
            raise unknown_task_error(name, list(self.tasks), param)
        return info

    def card(self, info: TaskInfo) -> s.ModelCard:
        """Describes one task as an OpenAI model."""
        return s.ModelCard(
            id=info.name, created=self.created.get(info.name, 0), kind=info.kind,
            labels=list(info.labels) if info.labels is not None else None,
            num_virtual_tokens=list(info.num_virtual_tokens),
            paths=[self._display_path(path) for path in info.paths],
            base_model=self.engine.model_name, stop=list(info.stop))

    def _display_path(self, path: str) -> str:
        """Shows prompts-dir paths relative to it, so listings do not reveal server paths."""
        if self.options.prompts_dir is None:
            return str(path)
        root = Path(self.options.prompts_dir).resolve()
        resolved = Path(path).resolve()
        return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(path)


def make_batcher(engine: Any, options: ServeOptions, metrics: ServerMetrics) -> MicroBatcher:
    """The worker ``options.scheduler`` names: step-level, or run-to-completion batches.

    An engine that cannot run step by step (its model's cache is not plain keys/values) gets
    the run-to-completion batcher, with a warning.
    """
    limits = {"max_batch_size": options.max_batch_size, "max_wait_ms": options.max_wait_ms,
              "max_queue": options.max_queue, "metrics": metrics}
    if options.scheduler == "step":
        if getattr(engine, "steps_supported", False):
            return StepBatcher(engine, prefill_chunk=options.prefill_chunk, **limits)
        logger.warning("the model cannot run step by step; using the run-to-completion batcher")
    return MicroBatcher(engine, **limits)


def server_state(request: Request) -> ServerState:
    """The FastAPI dependency that hands each endpoint its app's :class:`ServerState`."""
    return request.app.state.server
