"""The options of ``softprompt bench train | infer | generate``, and how each run reports.

Torch-free, so that building the command line (and ``--help``) loads no model code. A bench's
settings are its dataclass defaults, then its ``QUICK`` settings (with ``--quick``), then every
option the user gave: :meth:`BenchOptions.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from softprompt.options import DTYPE_HELP, DTYPES, choice_problems, raise_problems

_MODEL_HELP = (
    "smollm2-135m, gemma3-270m, any load_model name; random weights: 'tiny' (smoke tests), "
    "'smollm2-shaped', 'gemma3-shaped' (the real sizes, no weights needed)"
)
_LENGTHS_HELP = "Prompt length of each task (comma-separated or repeated)"


@dataclass
class BenchOptions:
    """Settings every benchmark shares; recorded in its result as ``options``."""

    QUICK: ClassVar[dict[str, Any]] = {}  # the --quick settings
    _positive: ClassVar[tuple[str, ...]] = ()  # fields (beyond the shared ones) that must be >= 1

    model: str = field(default="smollm2-135m", metadata={"help": _MODEL_HELP})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (cuda:N)"})
    dtype: str = field(
        default="auto",
        metadata={"help": DTYPE_HELP + "; every side also runs in float32", "choices": DTYPES},
    )
    batch_size: int = field(default=8, metadata={"help": "Examples (or requests) per batch"})
    repeats: int = field(
        default=3,
        metadata={
            "help": "Timed repeats per side and dtype, alternating, after one untimed run "
            "(median reported)"
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of data order and prompt init"})
    quick: bool = field(
        default=False, metadata={"help": "Tiny settings (~1 min on 2 cores); not a result"}
    )

    def __post_init__(self) -> None:
        raise_problems(f"bench options ({type(self).__name__})", self.problems())

    def problems(self) -> list[str]:
        """Every problem with these settings."""
        problems = [
            f"{name} must be a positive integer, got {getattr(self, name)!r}"
            for name in ("batch_size", "repeats", *self._positive)
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        lengths = getattr(self, "prompt_lengths", None)
        if lengths is not None and (not lengths or min(lengths) < 1):
            problems.append(f"prompt_lengths must be positive integers, got {lengths!r}")
        return problems + choice_problems(self)

    @classmethod
    def resolve(cls, quick: bool = False, **given: Any) -> BenchOptions:
        """Defaults, then ``QUICK`` (when ``quick``), then every non-None ``given`` option."""
        chosen = {key: value for key, value in given.items() if value is not None}
        return cls(**{**(cls.QUICK if quick else {}), **chosen, "quick": quick})


COMPILE_HELP = (
    "Also time softprompt with torch.compile in each dtype (compiling, minutes on a small CPU, "
    "is untimed and reported as compile_seconds)"
)


@dataclass
class TrainBenchOptions(BenchOptions):
    """Settings of ``softprompt bench train``: training throughput, memory and accuracy vs PEFT."""

    QUICK: ClassVar[dict[str, Any]] = {
        "steps": 2,
        "batch_size": 4,
        "repeats": 2,
        "eval_examples": 16,
        "num_virtual_tokens": 8,
    }
    _positive: ClassVar[tuple[str, ...]] = ("steps", "num_virtual_tokens", "eval_examples")

    steps: int = field(default=20, metadata={"help": "Timed optimizer steps per repeat"})
    num_virtual_tokens: int = field(default=20, metadata={"help": "Prompt length"})
    lr: float = field(default=0.01, metadata={"help": "AdamW learning rate of both sides"})
    init: str = field(
        default="TEXT",
        metadata={"help": "Prompt init copied to both sides: TEXT, SAMPLE_VOCAB, ..."},
    )
    eval_examples: int = field(
        default=200, metadata={"help": "Validation examples scored after training"}
    )
    levers: bool = field(
        default=True,
        metadata={"help": "Also time each lever (shared prefix, length grouping) on/off"},
    )
    memory: bool = field(
        default=True, metadata={"help": "Measure each variant's memory in a worker"}
    )
    compile: bool = field(default=False, metadata={"help": COMPILE_HELP})


@dataclass
class InferBenchOptions(BenchOptions):
    """Settings of ``softprompt bench infer``: mixed-task classification, Engine vs PEFT."""

    QUICK: ClassVar[dict[str, Any]] = {
        "requests": 24,
        "batch_size": 8,
        "repeats": 2,
        "prompt_lengths": [4, 8, 12],
    }
    _positive: ClassVar[tuple[str, ...]] = ("requests",)

    batch_size: int = field(default=32, metadata={"help": "Requests per batch"})
    requests: int = field(default=256, metadata={"help": "Requests per repeat"})
    prompt_lengths: list[int] = field(
        default_factory=lambda: [10, 20, 50], metadata={"help": _LENGTHS_HELP}
    )
    compile: bool = field(default=False, metadata={"help": COMPILE_HELP})

    def problems(self) -> list[str]:
        problems = super().problems()
        if len(self.prompt_lengths) < 3:
            problems.append(
                "infer needs at least 3 tasks (--prompt-lengths with 3 or more lengths)"
            )
        return problems


@dataclass
class GenerateBenchOptions(BenchOptions):
    """Settings of ``softprompt bench generate``: generation with vs without the prompt KV cache."""

    QUICK: ClassVar[dict[str, Any]] = {
        "requests": 4,
        "batch_size": 4,
        "max_new_tokens": 8,
        "repeats": 2,
        "prompt_lengths": [4, 8, 12],
    }
    _positive: ClassVar[tuple[str, ...]] = ("requests", "max_new_tokens")

    requests: int = field(default=16, metadata={"help": "Requests per repeat"})
    max_new_tokens: int = field(default=32, metadata={"help": "Greedy tokens per request"})
    prompt_lengths: list[int] = field(
        default_factory=lambda: [10, 20, 50], metadata={"help": _LENGTHS_HELP}
    )


@dataclass
class BenchOutputOptions:
    """How a bench run reports; not part of its result."""

    threads: int | None = field(
        default=None, metadata={"help": "Torch intra-op threads (default: torch's)"}
    )
    json: bool = field(default=False, metadata={"help": "Print one JSON object"})
    save: bool = field(default=False, metadata={"help": "Also write the JSON into --results-dir"})
    results_dir: str = field(default="benchmarks/results", metadata={"help": "Where --save writes"})
