"""Request and response bodies of the HTTP API, and the one error type every layer raises.

Completions and model listings follow OpenAI's shapes so its clients work unchanged; the
``model`` of a completion request names a task. Errors are answered as OpenAI does::

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": "..."}}
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4
MAX_SEED = 2**64 - 1  # the largest seed a torch.Generator takes
MAX_INPUT_CHARS = 100_000  # per text; far above any model's context, stops abusive bodies early

InputText = Annotated[str, Field(max_length=MAX_INPUT_CHARS)]


class ApiError(Exception):
    """An error answered to the client with ``status`` and an OpenAI-style error body.

    Args:
        status: HTTP status code.
        message: Human-readable explanation, sent to the client.
        reason: Short machine-readable code; also the ``reason`` label of the errors metric.
        error_type: OpenAI error ``type``.
        param: The request field at fault, if any.
        headers: Extra response headers (e.g. ``WWW-Authenticate``).
    """

    def __init__(self, status: int, message: str, reason: str, *,
                 error_type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.error_type = error_type
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """Returns the JSON error body."""
        return ErrorResponse(error=ErrorDetail(
            message=self.message, type=self.error_type, param=self.param, code=self.reason,
        )).model_dump()


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- POST /v1/classify -------------------------------------------------------------------------


class ClassifyRequest(BaseModel):
    """Classify each input with one classification task."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, description="Name of a loaded classification task.")
    inputs: list[InputText] = Field(
        min_length=1, description="Texts to classify (at least one); each fills the task's "
                                  "template (which has one field).")
    truncate: bool = Field(False, description="Cut inputs that are too long instead of failing.")


class ClassifyItem(BaseModel):
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    task: str
    results: list[ClassifyItem]


# --- POST /v1/completions ----------------------------------------------------------------------


class CompletionRequest(BaseModel):
    """OpenAI's completion request; ``model`` names the task. Unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="Name of the task whose prompt is used.")
    prompt: InputText | list[InputText] = Field(
        description="One text or a list of texts to complete.")
    max_tokens: int = Field(16, ge=1, le=4096, description="New tokens to generate at most.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(
        None, description="Up to 4 stop sequences; omitted or null: the task's own (those its "
                          "prompt was trained with, listed in /v1/models); [] for none.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="Seed for reproducible sampling (0 to 2**64 - 1).")
    n: int = Field(1, ge=1, le=1, description="Completions per prompt; only 1 is supported.")
    stream: bool = Field(False, description="Send the text as server-sent events as it is "
                                            "generated, then data: [DONE].")
    truncate: bool = Field(False, description="Cut prompts that are too long instead of failing.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt list must not be empty")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def prompts(self) -> list[str]:
        """Returns the prompt(s) as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str


class Usage(BaseModel):
    """Tokens of a completion request: ``prompt_tokens`` counts each input as the model read it
    (the task's template rendered, cut where truncation cut it; virtual tokens not counted)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion; the last one carries ``usage``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


# --- GET /v1/models, POST /v1/tasks, DELETE /v1/tasks/{name} ----------------------------------


class ModelCard(BaseModel):
    """One task, listed as an OpenAI model with softprompt's task details."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "softprompt"
    kind: str
    labels: list[str] | None = None
    num_virtual_tokens: list[int]
    paths: list[str]
    base_model: str
    stop: list[str] = Field(default_factory=list,
                            description="Stop sequences used when a completion names none.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AddTaskRequest(BaseModel):
    """Load a task from checkpoint directories inside the server's prompts directory."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="New task name.")
    path: str | list[str] = Field(
        description="Checkpoint directory (or several, for an ensemble), relative to the "
                    "server's prompts directory.")

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("path list must not be empty")
        return value

    def paths(self) -> list[str]:
        """Returns the path(s) as a list."""
        return [self.path] if isinstance(self.path, str) else list(self.path)


class DeleteTaskResponse(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# --- GET /health -------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "failed", "stopping"]
    model: str | None = None
    tasks: int = 0
    error: str | None = None
