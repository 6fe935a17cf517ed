"""`ServeOptions`: every knob of ``softprompt serve``, validated together before any model loads.

Light on purpose: no torch, transformers or fastapi here, so ``softprompt serve --help`` (whose
flags are generated from these fields) starts fast and works without the ``serve`` extra.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from softprompt.options import (
    DTYPE_HELP,
    DTYPES,
    choice_problems,
    positive_problems,
    raise_problems,
)

TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TASK_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
SCHEDULERS = ("step", "batch")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's

_TASK_NAME = re.compile(TASK_NAME_PATTERN)


def is_task_name(name: str) -> bool:
    """Whether ``name`` may name a task (names appear in URLs: ``/v1/models/{name}``)."""
    return bool(_TASK_NAME.match(name))


@dataclass
class ServeOptions:
    """Options of a server; the same names as the CLI flags (``--max-batch-size``)."""

    model: str = field(default="smollm2-135m",
                       metadata={"help": "Bundled name, local folder or .gguf file"})
    task: list[str] = field(default_factory=list, metadata={"metavar": "NAME=PROMPT_DIR", "help": (
        "Task to load at startup (repeat; a repeated NAME makes an ensemble)")})
    prompts_dir: str | None = field(default=None, metadata={"help": (
        "The only directory POST /v1/tasks may load from (unset: runtime loading disabled)")})
    host: str = field(default="127.0.0.1", metadata={"help": (
        "Interface to bind; a non-loopback address exposes the server")})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    admin_key: str | None = field(default=None, metadata={"help": (
        "Key for POST/DELETE /v1/tasks; unset: $SOFTPROMPT_ADMIN_KEY (neither: disabled)")})
    scheduler: str = field(default="step", metadata={"choices": SCHEDULERS, "help": (
        "step: generations join and leave a running batch at every decoding step, "
        "classification runs between steps; batch: run each batch to completion")})
    max_batch_size: int = field(default=32, metadata={"help": (
        "Inputs per engine batch at most (step: also the running generations at most)")})
    prefill_chunk: int = field(default=128, metadata={"help": (
        "step: prompt tokens a joining generation runs per step at most")})
    max_tokens_limit: int = field(default=1024, metadata={"help": (
        "A completion's max_tokens is capped at this many new tokens")})
    max_wait_ms: float = field(default=5.0, metadata={"help": (
        "How long a batch waits for more inputs after its first one arrived")})
    max_queue: int = field(default=256, metadata={"help": (
        "Inputs waiting at once; beyond it requests get 429")})
    request_timeout: float = field(default=30.0, metadata={"help": (
        "Seconds a request may wait before a 504")})
    device: str = field(default="cpu", metadata={"help": (
        "Torch device of the model (cpu, cuda, cuda:1, mps)")})
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": DTYPES})
    log_level: str = field(default="info",
                           metadata={"help": "uvicorn's log level", "choices": LOG_LEVELS})

    def __post_init__(self) -> None:
        raise_problems("serve options", self.problems())

    def problems(self) -> list[str]:
        """Every problem with these options (checks that need no model)."""
        if isinstance(self.task, str):
            problems = [f"task must be a list of NAME=PROMPT_DIR items, got {self.task!r}"]
        else:
            problems = [problem for item in self.task for problem in _task_item_problems(item)]
        if self.prompts_dir is not None and not Path(self.prompts_dir).is_dir():
            problems.append(f"prompts_dir {str(self.prompts_dir)!r} is not a directory")
        for name in ("model", "host", "device"):
            if not getattr(self, name):
                problems.append(f"{name} must not be empty")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            problems.append(f"port must be an integer in 0..65535, got {self.port!r}")
        problems += positive_problems(
            self, ("max_batch_size", "max_queue", "prefill_chunk", "max_tokens_limit"))
        problems += choice_problems(self)
        if not self.max_wait_ms >= 0:
            problems.append(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        if not self.request_timeout > 0:
            problems.append(f"request_timeout must be > 0 seconds, got {self.request_timeout!r}")
        return problems

    @property
    def tasks(self) -> dict[str, str | list[str]]:
        """The startup tasks: name -> prompt directory, or the list of them of an ensemble."""
        dirs: dict[str, list[str]] = {}
        for item in self.task:
            name, _, path = item.partition("=")
            dirs.setdefault(name, []).append(path)
        return {name: paths[0] if len(paths) == 1 else paths for name, paths in dirs.items()}


def _task_item_problems(item: str) -> list[str]:
    """What is wrong with one ``--task NAME=PROMPT_DIR`` item (nothing: an empty list)."""
    name, separator, path = item.partition("=") if isinstance(item, str) else ("", "", "")
    if not separator or not name or not path:
        return [f"--task {item!r}: expected NAME=PROMPT_DIR"]
    if not is_task_name(name):
        return [f"--task {item!r}: invalid task name {name!r}; use {TASK_NAME_RULE}"]
    if not Path(path).is_dir():
        return [f"--task {item!r}: prompt directory {path!r} not found"]
    return []
