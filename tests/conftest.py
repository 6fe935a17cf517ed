"""Shared fixtures and marker rules for the whole suite.

- Markers: ``slow`` tests run only when ``-m`` names them (``-m slow``); ``cuda`` tests are
  skipped without a CUDA device; ``real`` tests (the bundled SmolLM2-135M) run in ``make test``
  and are left out by ``make test-fast`` (``-m "not real"``).
- Torch runs on one thread in every test not marked ``real``.
- ``--dtype auto`` sees a CPU without native bf16 in every test (and its subprocesses), so the
  suite computes in float32 on every machine; tests of the choice give their own CPU facts.
- Tiny models, one fixture per architecture, come fresh for each test (tests wrap, freeze and
  train them); the tokenizer folder and the tiny training setup are built once per session and
  only read.

The builders themselves live in :mod:`softprompt.models.tiny` (benchmarks and device checks use
them too); tests that need other seeds, sizes or dtypes call them directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from softprompt.models.precision import CPUINFO_ENV
from softprompt.models.tiny import (
    tiny_bert,
    tiny_gemma3,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    tiny_tokenizer,
)


# ----------------------------------------------------------------------------- markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect ``slow`` tests unless ``-m`` names them; skip ``cuda`` tests without CUDA."""
    if not re.search(r"\bslow\b", config.getoption("markexpr") or ""):
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if cuda and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in cuda:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_torch_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run each test on one torch thread, then restore the previous setting.

    Tiny models only pay for intra-op threading in synchronisation: on a busy 2-core machine
    one thread is several times faster. Tests marked ``real`` keep every thread.
    """
    if request.node.get_closest_marker("real"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


CPU_WITHOUT_BF16 = "model name\t: test CPU without bf16 (conftest.py)\nflags\t\t: fpu sse2 avx2\n"


@pytest.fixture(scope="session", autouse=True)
def cpu_without_bf16(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point :func:`~softprompt.models.precision.read_cpuinfo` at an AVX2-only CPU for the whole
    session (before any fixture builds a model), also in subprocesses (through the environment).

    Without it ``auto`` would be bfloat16 on an AMX machine and float32 elsewhere, and tests'
    numbers would depend on the machine. A test may point it elsewhere with ``monkeypatch``.
    """
    path = tmp_path_factory.mktemp("cpuinfo") / "cpuinfo"
    path.write_text(CPU_WITHOUT_BF16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CPUINFO_ENV, str(path))
        yield


# ----------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`~softprompt.models.tiny.tiny_tokenizer` saved as a local folder (never modified)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer().save_pretrained(str(directory))
    return directory


@pytest.fixture
def tokenizer(tokenizer_dir: Path) -> Any:
    """The tiny tokenizer as ``AutoTokenizer`` loads it from its folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture
def llama() -> Any:
    """A fresh seed-0 tiny Llama."""
    return tiny_llama()


@pytest.fixture
def gpt2() -> Any:
    """A fresh seed-0 tiny GPT-2."""
    return tiny_gpt2()


@pytest.fixture
def t5() -> Any:
    """A fresh seed-0 tiny T5."""
    return tiny_t5()


@pytest.fixture
def bert() -> Any:
    """A fresh seed-0 tiny BERT sequence classifier (3 labels)."""
    return tiny_bert()


@pytest.fixture
def gemma3() -> Any:
    """A fresh seed-0 tiny Gemma 3 (sliding-window and full attention layers)."""
    return tiny_gemma3()


# ----------------------------------------------------------------------------- training setup
TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = '{"positive": " positive", "negative": " negative"}'
INIT_TEXT = "classify if this review is positive or negative :"  # every word is one known token
POSITIVE_WORDS = ("great", "good", "wonderful", "fantastic", "loved")
NEGATIVE_WORDS = ("terrible", "boring", "bad", "slow", "okay")
NOUNS = ("movie", "film", "book", "food", "acting", "plot", "service", "experience", "music",
         "topic", "science", "sports")


def load_benchmark(name: str) -> Any:
    """Import the script ``benchmarks/<name>.py`` as module ``name`` (scripts are no package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_jsonl() -> Callable[[Path, list[Any]], Path]:
    """``write_jsonl(path, rows)``: one JSON value per line; returns ``path``."""
    return _write_jsonl


def _sentiment_rows(count: int = 80) -> list[dict[str, str]]:
    """``count`` distinct reviews, alternating positive and negative."""
    rows = []
    for index in range(count):
        k = index // 2  # (k mod 12, k mod 5) never repeats for k < 60
        positive = index % 2 == 0
        adjective = (POSITIVE_WORDS if positive else NEGATIVE_WORDS)[k % 5]
        rows.append({"text": f"the {NOUNS[k % 12]} was very {adjective}",
                     "label": "positive" if positive else "negative"})
    return rows


@dataclass(frozen=True)
class TinySetup:
    """A saved tiny model (``load_model(str(model))`` works) and an 80-review JSONL dataset.

    The model is the tiny Llama with larger random weights (initializer_range 0.1): with the
    default 0.02 the last token alone decides the output, so every review gets the same label;
    here the predictions depend on the review (44 of the 80 come out positive), which lets
    evaluation tests see wrong bookkeeping.
    """

    model: Path
    data: Path
    template: str = TEMPLATE
    verbalizer: str = VERBALIZER
    init_text: str = INIT_TEXT

    def options(self, output_dir: Path, **overrides: Any) -> dict[str, Any]:
        """Options of a fast run on the tiny setup (a few seconds on one core)."""
        return {
            "model": str(self.model),
            "dataset": str(self.data),
            "template": self.template,
            "verbalizer": self.verbalizer,
            "init": "TEXT",
            "init_text": self.init_text,
            "num_virtual_tokens": 4,
            "steps": 6,
            "eval_every": 2,
            "batch_size": 4,
            "warmup_steps": 2,
            "lr": 0.3,
            "device": "cpu",
            "output_dir": str(output_dir),
            **overrides,
        }


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    """The tiny training setup, built once per session; tests only read its files."""
    root = tmp_path_factory.mktemp("tiny-setup")
    tiny_llama(initializer_range=0.1).save_pretrained(str(root / "model"))
    tiny_tokenizer().save_pretrained(str(root / "model"))
    return TinySetup(root / "model", _write_jsonl(root / "reviews.jsonl", _sentiment_rows()))


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Skip drawing curves.png (a second of matplotlib per run) where a test does not read it;
    returns the paths that would have been drawn."""
    import softprompt.training.trainer as trainer_module

    drawn: list[Path] = []
    monkeypatch.setattr(trainer_module, "plot_curves",
                        lambda metrics, output, **labels: drawn.append(Path(output)))
    return drawn


@pytest.fixture
def failing_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.compile`` returns a function that fails as a compiler would (no C++ compiler)."""

    def compile_that_fails(module: Any, **_: Any) -> Callable[..., Any]:
        def run(*__: Any, **___: Any) -> Any:
            raise torch._dynamo.exc.BackendCompilerFailed(
                "inductor", RuntimeError("no C++ compiler found"), None
            )

        return run

    monkeypatch.setattr(torch, "compile", compile_that_fails)
